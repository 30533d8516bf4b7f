"""Two-pass ops for SLERP, NuSLERP and Model Stock: one reduction pass, one elementwise pass.

A tensor is seen as a [rows, cols] view and reduced per group: the whole tensor ("whole"), each
row ("rows") or each column ("cols"). group_dots returns every pairwise dot product <v_i, v_j> of
v_i = x_i - B (or x_i) per group, in float64 (whole tensors: exact sums rounded once, so a sharded
pool's dots are the same bits); the methods turn those few numbers into per-group
coefficients, and group_lincomb writes out = cB * B + sum_i c_i * v_i in one pass, rounded once.

Backends: "cpu" (csrc/cpu/interp.cpp, the custom ops pymerge::group_dots / group_lincomb_out) and "torch" (any device, blockwise for "whole").
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from pymerge import _native
from pymerge.errors import short
from pymerge.ops import exact_sum, library
from pymerge.ops._checks import as_flag, check_layout, check_merge_args, check_threads
from pymerge.ops._memory import check_backed, check_native
from pymerge.ops._versions import mark_written
from pymerge.ops.weighted_sum import BACKENDS

GROUPS = {"whole": 0, "rows": 1, "cols": 2}
_BLOCK = 1 << 20


def _backend(t: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:  # (any other name ran the torch path)
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "cpu" if t.device.type == "cpu" and _native.cpu is not None else "torch"
    if backend not in ("cpu", "torch"):
        return "torch"  # GPU backends: reductions and a lincomb run fine as torch ops
    return backend


def view_2d(shape: Sequence[int], group: str) -> Tuple[int, int]:
    """[rows, cols] of a tensor for a grouping: rows = last-dim vectors, cols = dim-0 vectors."""
    if group == "rows":  # (products, not numel divided: a (5, 0) tensor has 5 empty rows)
        return math.prod(shape[:-1]), (shape[-1] if len(shape) else 1)
    if group == "cols":
        return (shape[0] if len(shape) else 1), math.prod(shape[1:])
    return 1, math.prod(shape)


_WHOLE_ONLY = object()  # whole_dots: no group argument


def _check_group_args(op: str, base: Optional[torch.Tensor], sub: bool, group=_WHOLE_ONLY) -> None:
    """What both backends need, before either runs (the torch path took a group name of any spelling as
    the whole tensor, and raised AttributeError for sub without a base; None was a KeyError)."""
    if group is not _WHOLE_ONLY and (not isinstance(group, str) or group not in GROUPS):
        raise ValueError(f"{op}: group must be one of {', '.join(GROUPS)}, got {group!r}")
    if sub and base is None:
        raise ValueError(f"{op}: sub needs a base")


def group_dots(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor], sub: bool, group: str,
               backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """float64 [G, K, K] symmetric matrix of dot products of v_i = x_i - sub*B per group
    (the whole tensor: exact sums rounded once, see whole_dot_parts)."""
    # the caller's __index__ and __bool__ before the storage tests, never after
    num_threads, sub = check_threads(num_threads), as_flag(sub, "sub")
    _check_group_args("group_dots", base, sub, group)
    read, _ = check_merge_args(xs, base, None, "group_dots")  # before contiguous() reads them
    if xs[0].is_meta:  # the result is numbers on the host: a meta call has none to give
        raise ValueError("group_dots: dot products need data; got meta tensors")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [*xs, base]):
        # the kernel's result was silently detached (the torch path tracked some groups, not "whole")
        raise RuntimeError("group_dots(): records no gradient, but an input requires grad; call it under "
                           "torch.no_grad() or pass detached tensors")
    # the kernel need not test them again where nothing read since could run code of the caller's
    checked = (library.INPUTS,) if read and library.trusted(sub, group, backend, num_threads) else ()
    xs = [x.contiguous() for x in xs]
    k = len(xs)
    rows, cols = view_2d(xs[0].shape, group)
    if _backend(xs[0], backend) == "cpu" and xs[0].numel():  # (an empty tensor's base has no address)
        pairs = library.call("group_dots", xs, base, sub, rows, cols, GROUPS[group], num_threads, checked=checked)
    else:
        pairs = _dots_torch(xs, base, sub, group, rows, cols)
    iu = torch.triu_indices(k, k, device="cpu")  # on the host whatever the default device (a meta result)
    g = torch.zeros(pairs.shape[0], k, k, dtype=torch.float64, device="cpu")
    g[:, iu[0], iu[1]] = pairs.cpu()
    g[:, iu[1], iu[0]] = pairs.cpu()
    return g


def whole_dot_parts(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor], sub: bool, backend: str = "auto",
                    num_threads: int = 0) -> torch.Tensor:
    """int64 [K(K+1)/2, PARTS]: the upper-triangle dot products <v_i, v_j> over the whole tensors as
    exact-sum parts (pymerge/ops/exact_sum.py). Element order does not matter, so the parts of the
    pieces of a split tensor (a sharded pool's local shards) add up to the whole tensor's."""
    # the caller's __index__ and __bool__ before the storage tests, never after
    num_threads, sub = check_threads(num_threads), as_flag(sub, "sub")
    _check_group_args("whole_dots", base, sub)
    read, _ = check_merge_args(xs, base, None, "whole_dots")
    if xs[0].is_meta:  # the result is numbers on the host: a meta call has none to give
        raise ValueError("whole_dots: dot products need data; got meta tensors")
    # nothing of the caller's runs until the kernel (no subclass's contiguous()): no second storage test
    backed = read and library.trusted(backend, xs, base)
    xs = [x.contiguous() for x in xs]
    k = len(xs)
    if _backend(xs[0], backend) == "cpu" and xs[0].numel():
        base = base.contiguous() if base is not None else None
        check_native(xs + [base], [], xs[0].numel(), "whole_dots", inputs_backed=backed)
        flat = _native.require_cpu().whole_dots(
            [x.data_ptr() for x in xs], [_native.DTYPE_CODES[x.dtype] for x in xs],
            base.data_ptr() if base is not None else 0, _native.DTYPE_CODES[base.dtype] if base is not None else 0,
            sub, xs[0].numel(), num_threads)
        return torch.from_numpy(flat).view(-1, exact_sum.PARTS)
    iu = torch.triu_indices(k, k, device="cpu").tolist()
    out = torch.zeros(len(iu[0]), exact_sum.PARTS, dtype=torch.int64, device="cpu")
    for s in range(0, xs[0].numel(), _BLOCK):
        vs = _vs(xs, base, sub, slice(s, s + _BLOCK))
        out += exact_sum.stack(vs[i].double() * vs[j].double() for i, j in zip(*iu))
    return out


def _vs(xs, base, sub, sl=None):
    out = []
    for x in xs:
        v = (x.reshape(-1) if sl is None else x.reshape(-1)[sl]).float()
        if sub:
            v = v - (base.reshape(-1) if sl is None else base.reshape(-1)[sl]).float()
        out.append(v)
    return out


def _dots_torch(xs, base, sub, group, rows, cols):
    if group == "whole":
        return torch.tensor([exact_sum.totals(whole_dot_parts(xs, base, sub, "torch"))], dtype=torch.float64,
                            device="cpu")
    k = len(xs)
    iu = torch.triu_indices(k, k, device="cpu").tolist()
    vs = [v.view(rows, cols) for v in _vs(xs, base, sub)]
    dim = 1 if group == "rows" else 0
    return torch.stack([(vs[i].double() * vs[j].double()).sum(dim) for i, j in zip(*iu)], dim=1).cpu()


def group_lincomb(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor], sub: bool, group: str,
                  coef: torch.Tensor, out: torch.Tensor, backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """out = coef[g, K] * B + sum_i coef[g, i] * (x_i - sub*B); coef is [G, K+1] (float32-rounded)."""
    # the caller's __index__ and __bool__ before the storage tests, never after
    num_threads, sub = check_threads(num_threads), as_flag(sub, "sub")
    _check_group_args("group_lincomb", base, sub, group)
    read, read_out = check_merge_args(xs, base, out, "group_lincomb")  # before contiguous() reads them
    if not isinstance(coef, torch.Tensor):  # (a list raised pybind11's four-line TypeError)
        raise TypeError(f"group_lincomb: coef must be a float tensor [G, K+1], got {short(coef)}")
    check_layout(coef, "group_lincomb: coef")
    if coef.is_meta and not xs[0].is_meta:
        raise ValueError("group_lincomb: coef is a meta tensor; the kernels need its values")
    if not torch.compiler.is_compiling():  # (traced, coef has no storage to test: the op checks it when it runs)
        check_backed(coef, "group_lincomb: coef")
        # out is written in place: a coef wanting a gradient lost it in silence (the raw op refused it)
        library.no_grad_for_out([], coef, [], "group_lincomb")
    # (the kernel need not test them again where nothing read since could run code of the caller's)
    checked = (library.INPUTS,) if read and library.trusted(sub, group, coef, backend, num_threads) else ()
    xs = [x.contiguous() for x in xs]
    k = len(xs)
    rows, cols = view_2d(xs[0].shape, group)
    # (the torch path used row 0 of a longer one)
    library.check_coef_size(coef, {"whole": 1, "rows": rows, "cols": cols}[group], k)
    coef = coef.to(torch.float32).reshape(-1, k + 1)
    if not xs[0].numel():
        return out  # nothing to write (a rank's empty shard: its base has no address for the kernel)
    if _backend(xs[0], backend) == "cpu":
        # the kernel writes by address
        target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
        if target is out and read_out and checked:
            checked += (library.OUTS,)  # (one of its own making the kernel checks)
        library.call("group_lincomb_out", xs, base, sub, rows, cols, GROUPS[group], coef, target, num_threads,
                     checked=checked)
        if target is not out:
            out.copy_(target)
        else:  # written by address: as torch's own in-place writes, bump its version
            mark_written([out])
        return out
    coef = coef.to(xs[0].device)
    # read whole before out is written: a non-contiguous base over out's memory (out's transpose) was read
    # again block by block, after earlier blocks had written it (an audit: 139,815 wrong elements)
    base = base.contiguous() if base is not None else None
    if group == "whole":
        n = xs[0].numel()
        # by blocks into out's own memory (reshape of a non-contiguous out is a copy, which was written instead)
        flat = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
        for s in range(0, n, _BLOCK):
            sl = slice(s, s + _BLOCK)
            acc = sum(coef[0, i] * v for i, v in enumerate(_vs(xs, base, sub, sl)))
            if base is not None:
                acc = acc + coef[0, k] * base.reshape(-1)[sl].float()
            flat[sl] = acc.to(out.dtype)
        if not out.is_contiguous():
            out.copy_(flat.view(out.shape))
        return out
    c = coef.view(rows, 1, k + 1) if group == "rows" else coef.view(1, cols, k + 1)
    vs = [v.view(rows, cols) for v in _vs(xs, base, sub)]
    acc = sum(c[..., i] * v for i, v in enumerate(vs))
    if base is not None:
        acc = acc + c[..., k] * base.reshape(rows, cols).float()
    out.copy_(acc.to(out.dtype).view(out.shape))
    return out


# ---- coefficient rules (mergekit 0.1.5), from the dot products ------------------------------------
# NaN propagates as in torch (a NaN input makes the whole group NaN, as it does in mergekit).

def _clamp(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return x if math.isnan(x) else max(lo, min(hi, x))


def slerp_coefs(t: float, aa: float, bb: float, ab: float, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> Tuple[float, float]:
    """SLERP from v0 (t = 0) to v1: norms <= eps count as 1; |cos| > threshold falls back to lerp."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = _clamp(ab / (na * nb))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    return _spherical(t, dot)


def nuslerp_coefs(t: float, aa: float, bb: float, ab: float, eps: float = 1e-8) -> Tuple[float, float]:
    """NuSLERP: normalize with norms clamped at 1e-7; colinear when 1 - cos^2 <= eps^2 (lerp)."""
    na, nb = max(math.sqrt(aa), 1e-7), max(math.sqrt(bb), 1e-7)
    cos = _clamp(ab / (na * nb))
    # mergekit's test, 1 - cos^2 <= eps^2 in float32, means cos is +-1 to within its float32 rounding, and
    # exactly opposite vectors that miss it go down the spherical branch to divide by sin(theta) ~ 1e-8
    # to 5e-4 (outputs 1000x to 1e7x too large, as mergekit's own are unless its float32 sum lands on
    # exactly -1). Our dots are float64 sums (whole tensors: exact), so cos is off by ~1e-16, not
    # 1e-7: |cos| within 2^-22 of 1 counts as colinear, as mergekit means it. Near theta = 0 slerp
    # differs from lerp there by ~t(1 - t) theta^2 / 6 < 1e-7 for t in [0, 1].
    if 1 - cos * cos <= max(eps * eps, 2.0 ** -21):
        return 1.0 - t, t
    return _spherical(t, cos)


def _spherical(t: float, cos: float) -> Tuple[float, float]:
    """sin((1-t)θ)/sin θ and sin(tθ)/sin θ for θ = acos(cos); NaN in, NaN out."""
    if math.isnan(cos):
        return math.nan, math.nan
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def model_stock_t(gram: torch.Tensor) -> float:
    """t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine (norm product clamped at 1e-6)."""
    n = gram.shape[0]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = max(math.sqrt(float(gram[i, i])) * math.sqrt(float(gram[j, j])), 1e-6)
            cosines.append(_clamp(float(gram[i, j]) / prod))
    cos = sum(cosines) / len(cosines)
    den = 1 + (n - 1) * cos
    return 0.0 if abs(den) < 1e-6 else n * cos / den  # NaN cos -> NaN t
