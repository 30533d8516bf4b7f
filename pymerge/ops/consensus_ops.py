"""sce, ramplus_tl and arcee_fusion on whole tensors: the fused C++ passes (csrc/cpu/consensus.cpp) on
the CPU, the same formulas as torch ops elsewhere (GPU) or with backend="torch". arcee_fusion's
scores stay torch ops everywhere (see importance).

    sce(xs, base, select_topk, out)             pymerge/methods/consensus.py describes the math
    ramplus_tl(xs, base, r, alpha, eps, out)
    arcee_fusion(base, x, out)                  pymerge/methods/swap.py

Per-tensor scalars (sce's top-k count and model weights, ramplus_tl's boosts, arcee_fusion's
quantiles and threshold) are computed with torch on a few numbers, exactly as mergekit does; the
passes over elements are native: sce's top-k picks torch.topk's elements without sorting them,
one selection (pymerge/ops/select.py) replaces arcee_fusion's three sorts. Inputs are any float dtype, out float32/float16/bfloat16, rounded once.
"""
from typing import Optional, Sequence

import torch

from pymerge import _native
from pymerge.ops import elementwise_mix, select
from pymerge.ops._checks import check_merge_args, check_threads, float32_param, not_nan

def _native_ok(op: str, tensors, out, backend: str, read=(False, False)) -> bool:
    return elementwise_mix._native_ok(op, tensors, out, backend, read)


def _ptrs(ts):
    return [t.data_ptr() for t in ts], [_native.DTYPE_CODES[t.dtype] for t in ts]


# ---- sce ---------------------------------------------------------------------------------------
def sce(xs: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float, out: torch.Tensor,
        backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    # the caller's numbers first: an __float__ or __index__ of theirs runs before the storage tests, never after
    select_topk, num_threads = not_nan(select_topk, "select_topk", "sce"), check_threads(num_threads)
    read = check_merge_args(xs, base, out, "sce")
    if out.numel() == 0 or out.is_meta:  # (meta: a shape-only call, as the other ops answer it)
        return out
    if not _native_ok("sce_merge", list(xs) + [base], out, backend, read):
        out.copy_(_sce_torch(xs, base, select_topk).reshape(out.shape))  # (any out of as many elements)
        return out
    xs, base = [x.contiguous() for x in xs], base.contiguous()
    ptrs, codes = _ptrs(xs)
    args = (ptrs, codes, base.data_ptr(), _native.DTYPE_CODES[base.dtype], out.numel())
    mask = _sce_mask(args, select_topk, out.numel(), num_threads)
    mask_ptr = mask.data_ptr() if mask is not None else 0
    sums = _native.cpu.sce_squares(*args, mask_ptr, num_threads)
    weights = _sce_weights(torch.tensor(sums, dtype=torch.float64, device="cpu") / out.numel())
    _native.cpu.sce_merge(*args, mask_ptr, weights.tolist(), out.data_ptr(), _native.DTYPE_CODES[out.dtype],
                          num_threads)
    return out


def _sce_mask(args, topk: float, numel: int, num_threads: int) -> Optional[torch.Tensor]:
    """uint8 top-k mask by variance (mergekit's elements, ties included), or None: no mask at all."""
    if topk >= 1:
        return None
    mask = torch.zeros(numel, dtype=torch.uint8, device="cpu")
    if topk <= 0:
        return mask
    var = torch.empty(numel, dtype=torch.float32, device="cpu")
    _native.cpu.sce_variance(*args, var.data_ptr(), num_threads)
    k = int(torch.count_nonzero(var) * topk)  # float32 product, as mergekit rounds it
    if k:
        _native.cpu.sce_topk_mask(var.data_ptr(), numel, k, mask.data_ptr())
    return mask


def _sce_weights(mean_squares: torch.Tensor) -> torch.Tensor:
    """mergekit's sce_weight on the per-model mean squares: normalized, uniform when they sum to ~0."""
    ms = mean_squares.float()
    total = float(ms.sum())
    return torch.full_like(ms, 1.0 / len(ms)) if abs(total) < 1e-6 else ms / total


def _sce_torch(xs, base, topk):
    b = base.float()
    d = torch.stack([x.float() - b for x in xs])
    if topk < 1:
        d *= _variance_mask(d, topk)
    agree = d.sign() == (d.sum(dim=0) >= 0).float() * 2 - 1
    w = _sce_weights(d.square().reshape(len(xs), -1).mean(dim=1))
    w = w.view(-1, *([1] * (d.dim() - 1))) * agree
    return b + (d * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


def _variance_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """1 where an element's variance across the models is among the k largest (torch.topk's, as mergekit)."""
    if density <= 0:
        return torch.zeros_like(d[0])
    var = d.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[var.abs().reshape(-1).topk(k).indices] = 1
    return mask


# ---- ramplus_tl ------------------------------------------------------------------------------------
def ramplus_tl(xs: Sequence[torch.Tensor], base: torch.Tensor, r: float, alpha: float, eps: float,
               out: torch.Tensor, backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    # the caller's numbers first: an __float__ or __index__ of theirs runs before the storage tests, never after
    # float32 arithmetic, as mergekit's (a finite 1e39 raised torch's overflow error, naming nothing)
    r, alpha = float32_param(r, "r", "ramplus_tl"), float32_param(alpha, "alpha", "ramplus_tl")
    eps = float32_param(eps, "eps", "ramplus_tl")
    num_threads = check_threads(num_threads)
    read = check_merge_args(xs, base, out, "ramplus_tl")
    if out.is_meta:  # a shape-only call: the boosts need data
        return out
    if _native_ok("ram_counts", list(xs) + [base], out, backend, read):
        xs, base = [x.contiguous() for x in xs], base.contiguous()
        ptrs, codes = _ptrs(xs)
        shared, unique = _native.cpu.ram_counts(ptrs, codes, base.data_ptr(), _native.DTYPE_CODES[base.dtype],
                                                out.numel(), eps, num_threads)
        shared, unique = torch.tensor(shared, device="cpu"), torch.tensor(unique, device="cpu")
    else:
        b = base.float()
        moved = torch.stack([(x.float() - b).abs() > eps for x in xs]).reshape(len(xs), -1)
        count = moved.sum(dim=0)
        shared, unique = (moved & (count > 1)).sum(dim=1), (moved & (count == 1)).sum(dim=1)
    # mergekit's arithmetic: int64 counts, a float32 ratio, float32 boosts
    rho = shared / unique.clamp(min=eps)
    boosts = 1 + r * rho.clamp(min=0, max=alpha)
    return elementwise_mix.ram(xs, base, eps, out, backend, num_threads, boosts=boosts.tolist())


# ---- arcee_fusion ----------------------------------------------------------------------------------
def arcee_fusion(base: torch.Tensor, x: torch.Tensor, out: torch.Tensor, backend: str = "auto",
                 num_threads: int = 0) -> torch.Tensor:
    num_threads = check_threads(num_threads)  # the caller's __index__ before the storage tests, never after
    read = check_merge_args([x], base, out, "arcee_fusion", base_first=True)  # before float() reads them
    if out.numel() == 0:
        return out
    b, y = base.float(), x.float()
    scores = importance(y, b)
    if not _native_ok("fusion_blend", (base, x), out, backend, read):
        out.copy_((b + (y - b) * (scores >= fusion_threshold(scores))).reshape(out.shape))
        return out
    native = not bool((scores < 0).any())  # magnitude order is value order: one native selection
    threshold = fusion_threshold(scores, num_threads if native else None)
    base, x = base.contiguous(), x.contiguous()
    _native.cpu.fusion_blend(x.data_ptr(), _native.DTYPE_CODES[x.dtype], base.data_ptr(),
                             _native.DTYPE_CODES[base.dtype], x.numel(), scores.data_ptr(), float(threshold),
                             out.data_ptr(), _native.DTYPE_CODES[out.dtype], num_threads)
    return out


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - B| times the KL divergence of the softmaxes along the last dim (float32): mergekit's torch
    ops bit for bit (the KL sums cancel, so any other softmax, log or order moves elements across the
    threshold), in place where that changes nothing."""
    p = torch.softmax(x, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    # elementwise, so the quotient may overwrite q (a temporary the size of the tensor less at the peak);
    # the row sums stay whole-tensor ops: torch's reduction order, hence the bits, depend on the shape
    kl = torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    return (x - base).abs_().mul_(kl).contiguous()


def fusion_threshold(scores: torch.Tensor, num_threads: Optional[int] = None) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), quantile q taken as the element at floor(q (n - 1)) in sorted order.
    With num_threads (scores known to hold no negative value) one native selection finds all three."""
    flat = scores.reshape(-1)
    n = flat.numel()
    pos = (torch.tensor([0.25, 0.5, 0.75], device="cpu") * (n - 1)).long().tolist()  # float32 positions, as mergekit
    if num_threads is not None and flat.device.type == "cpu" and _native.cpu is not None:
        # non-negative floats sort as their bits; NaN (above inf) sorts last, as in torch.sort
        found = select.select_ranks(flat, None, pos, descending=False, num_threads=num_threads)
        q1, med, q3 = _floats([b.key for b in found], flat.device)
    elif flat.device.type == "cuda" and flat.dtype == torch.float32 and not bool((flat < 0).any()):
        # torch.kthvalue runs one thread block on a CUDA tensor (224 ms for 16M values on an H200, three per
        # tensor here); two histograms of the same bits instead (int32 keys: 4 bytes per element)
        q1, med, q3 = _floats(quartile_keys(flat, pos), flat.device)
    else:
        q1, med, q3 = (torch.kthvalue(flat, p + 1).values for p in pos)
    return med + 1.5 * (q3 - q1)


def quartile_keys(flat: torch.Tensor, pos) -> list:
    """The bits of the values of ranks pos of non-negative float32 values, which sort as their bits with the
    sign cleared (-0.0 with +0.0, NaN of either sign last, as in torch.sort and kthvalue)."""
    return select.smallest_keys(flat.contiguous().view(torch.int32) & 0x7FFFFFFF, pos)


def _floats(keys, device) -> tuple:
    return tuple(torch.tensor([k], dtype=torch.int32, device=device).view(torch.float32)[0] for k in keys)
