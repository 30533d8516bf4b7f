"""Triton kernel for the fused task-vector pass (ties, dare_*, breadcrumbs*, della*), and its launcher.

Same contract as csrc/cpu/task_vectors.cpp (see pymerge/ops/task_vector_ops.py): per element,
d_i = x_i - B, keep_i from the model's sparsifier (rank boundary, Philox draw, or DELLA bitmask),
v_i = keep_i ? (d_i * r_i) * w_i : d_i * 0, optional sign consensus, normalize, lambda, + B, one
rounding to the output dtype, bit for bit as the CPU: the launch disables FMA contraction and the
division rounds to nearest. One exception: a NaN comes out as the GPU's canonical NaN, where the CPU
keeps its sign and payload (so do kernels/weighted_sum.py and weighted_sum_grouped.py).

Every per-call value (input addresses, dtype codes, per-model settings, seed, name hash, element
offset) travels in ONE int64 table, copied to the device with one non-blocking copy from pinned
memory: no host sync, and no integer argument whose value (1, a multiple of 16, > 2**31) would make
Triton compile another variant, or turn it into a constant the code cannot call .to() on.

With consensus, the models are walked twice per block: once for the elected sign, once for the
agreeing sum and divisor. The second walk re-reads the same BLOCK of each input right after the
first, so on a GPU it is served from L2.

Philox: tl.philox(seed, c0, c1, c2, c3) keys with (seed low, seed high) -- the layout of
pymerge/ops/philox.py with c0 = j // 4, c1 = model index, (c2, c3) = name hash; word j % 4. When the
block starts on a multiple of 4 (always, unless the caller's offset is not), one call yields the
draws of 4 consecutive elements.
"""
import contextlib

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on the CPU
    triton = None

from pymerge._native import DTYPE_CODES
from pymerge.kernels import E4M3, body_and_tail, interpreted as _interpreted, refuse_e4m3, to_device

_MIXED = -1

# The int64 parameter table: field f of model i at f * n + i -- 0 input address, 1 dtype code,
# 2 sparsifier mode, 3/4 low boundary key/index, 5/6 high boundary key/index, 7 random threshold,
# 8 bitmask address, 9 scale and 10 weight (float32 bits), 11 Philox model index -- then the
# per-call values at 12 * n: seed, name hash h0, h1, global element offset, base address.
_FIELDS = 12


if triton is not None:
    from pymerge.kernels.weighted_sum import _load_as_f32, _load_mixed, _store

    @triton.jit
    def _field(tab, f, i, n):
        return tl.load(tab + f * n + i)

    @triton.jit
    def _f32_field(tab, f, i, n):
        return tl.load(tab + f * n + i).to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _draws(seed, goffs, goff0, model, h0, h1, BLOCK: tl.constexpr, GROUPED: tl.constexpr):
        """32-bit Philox draws (as int64) of global elements goffs = goff0 + arange(BLOCK) for one model.

        GROUPED: goff0 is a multiple of 4, so each Philox call serves 4 elements."""
        m = model.to(tl.uint32)
        a = h0.to(tl.uint32)
        b = h1.to(tl.uint32)
        if GROUPED:
            grp = (goff0 >> 2) + tl.arange(0, BLOCK // 4)
            g = grp.to(tl.uint32)
            zero = g * 0
            w0, w1, w2, w3 = tl.philox(seed, g, zero + m, zero + a, zero + b)
            # join(join(w0, w2), join(w1, w3)) is [BLOCK/4, 2, 2] with [r, p, q] = w_{2p+q}: row-major
            # order is w0 w1 w2 w3 per group, i.e. element order.
            w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])
        else:
            g = (goffs >> 2).to(tl.uint32)
            zero = g * 0
            w0, w1, w2, w3 = tl.philox(seed, g, zero + m, zero + a, zero + b)
            lane = goffs & 3
            w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        return w.to(tl.int64) & 0xFFFFFFFF

    @triton.jit
    def _delta_value(tab, i, n, b, offs, goffs, goff0, mask, seed, h0, h1, IN_DT: tl.constexpr, BLOCK: tl.constexpr,
                     GROUPED: tl.constexpr, ALIGNED: tl.constexpr, HAS_E4M3: tl.constexpr):
        """v_i for one block: the sparsified, rescaled, weighted delta of model i."""
        addr = _field(tab, 0, i, n)
        if IN_DT == -1:
            x = _load_mixed(addr, _field(tab, 1, i, n), offs, mask, ALIGNED, HAS_E4M3)
        else:
            x = _load_as_f32(addr, offs, mask, IN_DT, ALIGNED)
        d = x - b
        mode = _field(tab, 2, i, n)
        key = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        keep = offs >= 0  # mode 0: keep everything
        if mode == 1:  # top-k: |d| > T or (|d| == T and index < I)
            t = _field(tab, 5, i, n)
            keep = (key > t) | ((key == t) & (goffs < _field(tab, 6, i, n)))
        elif mode == 2:  # ascending range [lo, hi)
            th = _field(tab, 5, i, n)
            tlo = _field(tab, 3, i, n)
            below_hi = (key < th) | ((key == th) & (goffs < _field(tab, 6, i, n)))
            below_lo = (key < tlo) | ((key == tlo) & (goffs < _field(tab, 4, i, n)))
            keep = below_hi & (below_lo == 0)
        elif mode == 3:  # random
            keep = _draws(seed, goffs, goff0, _field(tab, 11, i, n), h0, h1, BLOCK, GROUPED) < _field(tab, 7, i, n)
        elif mode == 4:  # bitmask
            words = tl.load(_field(tab, 8, i, n).to(tl.pointer_type(tl.int64)) + (goffs >> 6), mask=mask, other=0)
            keep = ((words >> (goffs & 63)) & 1) != 0
        elif mode == 5:
            keep = offs < 0
        w = _f32_field(tab, 10, i, n)
        return tl.where(keep, (d * _f32_field(tab, 9, i, n)) * w, d * 0.0), w

    @triton.jit
    def _tv_merge_kernel(tab, out_ptr, start, end, n_models, lam, divisor, IN_DT: tl.constexpr,
                         BASE_DT: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                         GROUPED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_E4M3: tl.constexpr):
        # Elements [start, end): the launcher runs the body (end a multiple of 16: 16-byte loads) and
        # the tail as separate launches, as kernels/weighted_sum.py does.
        pid = tl.program_id(0).to(tl.int64)
        offs = start + pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        hdr = tab + 12 * n_models
        seed = tl.load(hdr + 0)
        h0 = tl.load(hdr + 1)
        h1 = tl.load(hdr + 2)
        goff0 = start + pid * BLOCK + tl.load(hdr + 3)
        goffs = goff0 + tl.arange(0, BLOCK)
        b = _load_as_f32(tl.load(hdr + 4), offs, mask, BASE_DT, ALIGNED)
        mixed = tl.zeros([BLOCK], tl.float32)
        if CONSENSUS:
            s = tl.zeros([BLOCK], tl.float32)
            for i in range(n_models):
                v, w = _delta_value(tab, i, n_models, b, offs, goffs, goff0, mask, seed, h0, h1, IN_DT, BLOCK, GROUPED,
                                    ALIGNED, HAS_E4M3)
                s += v
            positive = s >= 0
            div = tl.zeros([BLOCK], tl.float32)
            for i in range(n_models):
                v, w = _delta_value(tab, i, n_models, b, offs, goffs, goff0, mask, seed, h0, h1, IN_DT, BLOCK, GROUPED,
                                    ALIGNED, HAS_E4M3)
                agree = tl.where(positive, v > 0, v < 0).to(tl.float32)
                mixed += v * agree
                div += w * agree
            div = tl.where(div == 0, 1.0, div)
        else:
            for i in range(n_models):
                v, w = _delta_value(tab, i, n_models, b, offs, goffs, goff0, mask, seed, h0, h1, IN_DT, BLOCK, GROUPED,
                                    ALIGNED, HAS_E4M3)
                mixed += v
            div = tl.zeros([BLOCK], tl.float32) + divisor
        if NORMALIZE:
            mixed = tl.div_rn(mixed, div)
        mixed = mixed * lam
        res = b + mixed
        _store(out_ptr, offs, mask, res)  # bfloat16: nearest even on the bits

    @triton.jit
    def _draws_kernel(out_ptr, tab, n, BLOCK: tl.constexpr, GROUPED: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        goff0 = pid * BLOCK + tl.load(tab + 4)
        d = _draws(tl.load(tab + 0), goff0 + tl.arange(0, BLOCK), goff0, tl.load(tab + 1), tl.load(tab + 2),
                   tl.load(tab + 3), BLOCK, GROUPED)
        tl.store(out_ptr + offs, d, mask=offs < n)


def _f32_bits(x: float) -> int:
    """The float32 bit pattern of x, as the table's int64 (the kernel bitcasts it back)."""
    return int(np.array(x, dtype=np.float32).view(np.int32))


def _to_device(values, device) -> torch.Tensor:
    """One int64 table on the device (to_device: no stream sync on a GPU)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the Triton task-vector pass cannot be captured in a CUDA graph "
                           "(its per-call table is copied from the host)")
    return to_device(values, torch.int64, device)


def _signed64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= (1 << 63) else v


def _device(t: torch.Tensor):
    if t.device.type != "cuda" and not _interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {t.device}")
    return t.device


def tv_merge(inputs, base, plans, out, *, consensus, normalize, lam, divisor, seed, h0, h1, offset,
             block: int = 1024, num_warps: int = 4) -> None:
    """Launches the fused pass; inputs/base/out contiguous, one device; plans from task_vector_ops."""
    if triton is None:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
    device = _device(base)
    numel = base.numel()
    n = len(inputs)
    codes = [DTYPE_CODES[t.dtype] for t in inputs]
    in_dt = codes[0] if all(c == codes[0] for c in codes) else _MIXED
    refuse_e4m3(device, codes + [DTYPE_CODES[base.dtype]], "tv_merge")
    bits = [p.bits.to(device) if p.bits is not None else None for p in plans]
    columns = [
        [t.data_ptr() for t in inputs], codes, [p.mode for p in plans],
        [p.lo.key for p in plans], [p.lo.index for p in plans], [p.hi.key for p in plans], [p.hi.index for p in plans],
        [p.thr for p in plans], [b.data_ptr() if b is not None else 0 for b in bits],
        [_f32_bits(p.scale) for p in plans], [_f32_bits(p.weight) for p in plans], [p.model & 0xFFFFFFFF for p in plans]]
    assert len(columns) == _FIELDS
    values = [v for col in columns for v in col] + [_signed64(seed), h0, h1, offset, base.data_ptr()]
    tab = _to_device(values, device)
    aligned = all(t.data_ptr() % 16 == 0 for t in (*inputs, base))
    if _interpreted():
        block = min(block, 256)
    for lo, hi, blk, warps in body_and_tail(numel, block, num_warps):
        _tv_merge_kernel[(triton.cdiv(hi - lo, blk),)](
            tab, out, lo, hi, n, float(lam), float(divisor), IN_DT=in_dt, BASE_DT=DTYPE_CODES[base.dtype],
            CONSENSUS=bool(consensus), NORMALIZE=bool(normalize), GROUPED=offset % 4 == 0, ALIGNED=aligned,
            BLOCK=blk, HAS_E4M3=E4M3 in codes, num_warps=warps, enable_fp_fusion=False)
    del bits  # kept alive until the launch was queued


def philox_draws(seed: int, name, model: int, offset: int, n: int, device=None, grouped=None) -> torch.Tensor:
    """The Triton kernel's draws for elements offset .. offset+n-1 (philox.draws on a GPU; tests compare them to
    the torch form). name: the tensor's name or its name_hash().

    grouped: force the one-call-per-4-elements path (True) or the per-element path (False); by
    default the kernel's own choice (grouped when offset is a multiple of 4)."""
    from pymerge.ops.philox import name_hash
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h0, h1 = name if isinstance(name, tuple) else name_hash(name)
    grouped = offset % 4 == 0 if grouped is None else grouped
    if grouped and offset % 4:
        raise ValueError("grouped draws need an offset that is a multiple of 4")
    # Triton launches on the current device's current stream: made the tensors' (cuda:1's draws launched on GPU 0)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        out = torch.empty(n, dtype=torch.int64, device=device)
        tab = _to_device([_signed64(seed), model & 0xFFFFFFFF, h0, h1, offset], device)
        _draws_kernel[(triton.cdiv(n, 128),)](out, tab, n, BLOCK=128, GROUPED=grouped)
    return out
