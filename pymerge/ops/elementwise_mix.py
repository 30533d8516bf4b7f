"""nearswap and ram, elementwise: the fused C++ kernels (csrc/cpu/elementwise_mix.cpp) on the CPU,
the same float32 formulas as torch ops elsewhere (GPU) or with backend="torch".

    nearswap(base, x, t, out)   w = clamp(t / max(|B - x|, 1e-6), 0, 1); out = w x + (1 - w) B
    ram(xs, base, eps, out)     out = B + sum_i d_i / c over the c models with |d_i| > eps (d_i = x_i - B);
                                a delta only its model moved counts once, times boosts[i] (ramplus_tl; else 1)

Inputs are any float dtype (float8 too on the CPU), out float32/float16/bfloat16, rounded once.
"""
from typing import Optional, Sequence

import torch

from pymerge import _native
from pymerge.ops import library
from pymerge.ops._checks import check_apart, check_merge_args, check_threads, not_nan
from pymerge.ops._memory import check_native, trusted
from pymerge.ops._versions import mark_written
from pymerge.ops.weighted_sum import BACKENDS


def _native_ok(op: str, tensors, out, backend: str, read=(False, False)) -> bool:
    """Whether the native kernel takes these, checked for it. read: what check_merge_args returned for these
    very tensors, with no code of the caller's run since (their storage is not tested again)."""
    if backend not in BACKENDS:  # (any other name ran the torch path; the pool passes its own: GPU ones run torch)
        raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend not in ("auto", "cpu") or not hasattr(_native.cpu, op) or out.numel() == 0 or library.tracing():
        return False  # (torch.jit.trace records the torch path; a write by address it would miss)
    if not (all(t.device.type == "cpu" and t.dtype in _native.DTYPE_CODES for t in tensors)
            and out.dtype in (torch.float32, torch.float16, torch.bfloat16) and out.is_contiguous()):
        return False
    # nothing of the caller's ran since: its == just now, and no subclass's __torch_function__ (out.numel()...)
    trust = trusted(backend, list(tensors), out)
    # the kernel will trust these addresses and sizes
    check_native(tensors, [out], out.numel(), op, inputs_backed=read[0] and trust, outs_backed=read[1] and trust)
    check_apart(tensors, [out], op)
    # the kernel writes by address: a graph that saved out raises rather than backpropagating new values
    mark_written([out])
    return True


def nearswap(base: torch.Tensor, x: torch.Tensor, t: float, out: torch.Tensor, backend: str = "auto",
             num_threads: int = 0) -> torch.Tensor:
    # the caller's numbers first: an __float__ or __index__ of theirs runs before the storage tests, never after
    t, num_threads = not_nan(t, "t", "nearswap"), check_threads(num_threads)
    read = check_merge_args([x], base, out, "nearswap", base_first=True)
    if _native_ok("nearswap", (base, x), out, backend, read):
        base, x = base.contiguous(), x.contiguous()
        _native.cpu.nearswap(base.data_ptr(), _native.DTYPE_CODES[base.dtype], x.data_ptr(),
                             _native.DTYPE_CODES[x.dtype], out.numel(), t, out.data_ptr(),
                             _native.DTYPE_CODES[out.dtype], num_threads)
        return out
    a, b = base.float(), x.float()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    out.copy_((w * b + (1 - w) * a).reshape(out.shape))
    return out


def ram(xs: Sequence[torch.Tensor], base: torch.Tensor, eps: float, out: torch.Tensor, backend: str = "auto",
        num_threads: int = 0, boosts: Optional[Sequence[float]] = None) -> torch.Tensor:
    # the caller's numbers first: an __float__ or __index__ of theirs runs before the storage tests, never after
    eps, num_threads = not_nan(eps, "eps", "ram"), check_threads(num_threads)
    boosts = None if boosts is None else [float(b) for b in boosts]  # (ramplus_tl's 0/0 is NaN, as mergekit's)
    read = check_merge_args(xs, base, out, "ram")
    if boosts is not None and len(boosts) != len(xs):
        raise ValueError(f"ram: one boost per input ({len(xs)}), got {len(boosts)}")
    boosts = [1.0] * len(xs) if boosts is None else boosts
    if _native_ok("ram", list(xs) + [base], out, backend, read):
        xs, base = [x.contiguous() for x in xs], base.contiguous()
        _native.cpu.ram([x.data_ptr() for x in xs], [_native.DTYPE_CODES[x.dtype] for x in xs], base.data_ptr(),
                        _native.DTYPE_CODES[base.dtype], out.numel(), eps, boosts, out.data_ptr(),
                        _native.DTYPE_CODES[out.dtype], num_threads)
        return out
    b = base.float()
    deltas = [x.float() - b for x in xs]
    moved = [d.abs() > eps for d in deltas]
    count = torch.stack(moved).sum(dim=0)
    unique, shared = count == 1, count > 1
    acc = torch.zeros_like(b)
    for d, m, boost in zip(deltas, moved, boosts):
        z = d * m
        acc += z * unique * boost + z * shared / count.clamp(min=1)  # mergekit's products: NaN/inf deltas give NaN
    out.copy_((b + acc).reshape(out.shape))
    return out
