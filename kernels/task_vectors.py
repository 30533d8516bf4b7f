"""Triton kernel for the fused task-vector pass (ties, dare_*, breadcrumbs*, della*), and its launcher.

Same contract as csrc/cpu/task_vectors.cpp (see pymerge/ops/task_vector_ops.py): per element,
d_i = x_i - B, keep_i from the model's sparsifier (rank boundary, Philox draw, or DELLA bitmask),
v_i = keep_i ? (d_i * r_i) * w_i : d_i * 0, optional sign consensus, normalize, lambda, + B, one
rounding to the output dtype. Per-model settings come in small device tables, so the number of
models is a runtime loop bound (no recompilation per N).

With consensus, the models are walked twice per block: once for the elected sign, once for the
agreeing sum and divisor. The second walk re-reads the same BLOCK of each input right after the
first, so on a GPU it is served from L2; Philox draws are recomputed (cheap ALU work).

Philox: tl.philox(seed, c0, c1, c2, c3) keys with (seed low, seed high) -- the layout of
pymerge/ops/philox.py with c0 = j // 4, c1 = model index, (c2, c3) = name hash; word j % 4.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on the CPU
    triton = None

from pymerge._native import DTYPE_CODES
from pymerge.kernels import interpreted as _interpreted

_MIXED = -1


if triton is not None:
    from pymerge.kernels.weighted_sum import _load_as_f32, _load_mixed

    @triton.jit
    def _draws(seed, offs, model, h0, h1):
        """32-bit Philox draws (as int64) of global elements offs for one model."""
        grp = (offs >> 2).to(tl.uint32)
        zero = grp * 0
        w0, w1, w2, w3 = tl.philox(seed, grp, zero + model.to(tl.uint32), zero + h0.to(tl.uint32),
                                   zero + h1.to(tl.uint32))
        lane = offs & 3
        w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        return w.to(tl.int64) & 0xFFFFFFFF

    @triton.jit
    def _delta_value(i, addr_table, code_table, mode_t, tlo_t, ilo_t, thi_t, ihi_t, thr_t, bits_t, scale_t,
                     weight_t, model_t, b, offs, goffs, mask, seed, h0, h1, IN_DT: tl.constexpr):
        """v_i for one block: the sparsified, rescaled, weighted delta of model i."""
        addr = tl.load(addr_table + i)
        if IN_DT == -1:
            x = _load_mixed(addr, tl.load(code_table + i), offs, mask, False)
        else:
            x = _load_as_f32(addr, offs, mask, IN_DT, False)
        d = x - b
        mode = tl.load(mode_t + i)
        key = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        keep = offs >= 0  # mode 0: keep everything
        if mode == 1:  # top-k: |d| > T or (|d| == T and index < I)
            t = tl.load(thi_t + i)
            keep = (key > t) | ((key == t) & (goffs < tl.load(ihi_t + i)))
        elif mode == 2:  # ascending range [lo, hi)
            th = tl.load(thi_t + i)
            tlo = tl.load(tlo_t + i)
            below_hi = (key < th) | ((key == th) & (goffs < tl.load(ihi_t + i)))
            below_lo = (key < tlo) | ((key == tlo) & (goffs < tl.load(ilo_t + i)))
            keep = below_hi & (below_lo == 0)
        elif mode == 3:  # random
            keep = _draws(seed, goffs, tl.load(model_t + i), h0, h1) < tl.load(thr_t + i)
        elif mode == 4:  # bitmask
            words = tl.load(tl.load(bits_t + i).to(tl.pointer_type(tl.int64)) + (goffs >> 6), mask=mask, other=0)
            keep = ((words >> (goffs & 63)) & 1) != 0
        elif mode == 5:
            keep = offs < 0
        r = tl.load(scale_t + i)
        w = tl.load(weight_t + i)
        return tl.where(keep, (d * r) * w, d * 0.0), w

    @triton.jit
    def _tv_merge_kernel(addr_table, code_table, mode_t, tlo_t, ilo_t, thi_t, ihi_t, thr_t, bits_t, scale_t,
                         weight_t, model_t, base_addr, out_ptr, numel, offset, n_models, lam, divisor,
                         seed, h0, h1, IN_DT: tl.constexpr, BASE_DT: tl.constexpr, CONSENSUS: tl.constexpr,
                         NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        goffs = offs + offset
        b = _load_as_f32(base_addr, offs, mask, BASE_DT, False)
        mixed = tl.zeros([BLOCK], tl.float32)
        if CONSENSUS:
            s = tl.zeros([BLOCK], tl.float32)
            for i in range(n_models):
                v, w = _delta_value(i, addr_table, code_table, mode_t, tlo_t, ilo_t, thi_t, ihi_t, thr_t, bits_t,
                                    scale_t, weight_t, model_t, b, offs, goffs, mask, seed, h0, h1, IN_DT)
                s += v
            positive = s >= 0
            div = tl.zeros([BLOCK], tl.float32)
            for i in range(n_models):
                v, w = _delta_value(i, addr_table, code_table, mode_t, tlo_t, ilo_t, thi_t, ihi_t, thr_t, bits_t,
                                    scale_t, weight_t, model_t, b, offs, goffs, mask, seed, h0, h1, IN_DT)
                agree = tl.where(positive, v > 0, v < 0).to(tl.float32)
                mixed += v * agree
                div += w * agree
            div = tl.where(div == 0, 1.0, div)
        else:
            for i in range(n_models):
                v, w = _delta_value(i, addr_table, code_table, mode_t, tlo_t, ilo_t, thi_t, ihi_t, thr_t, bits_t,
                                    scale_t, weight_t, model_t, b, offs, goffs, mask, seed, h0, h1, IN_DT)
                mixed += v
            div = tl.zeros([BLOCK], tl.float32) + divisor
        if NORMALIZE:
            mixed = mixed / div
        mixed = mixed * lam
        res = b + mixed
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _draws_kernel(out_ptr, n, offset, seed, model, h0, h1, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, _draws(seed, offs.to(tl.int64) + offset, model, h0, h1), mask=offs < n)


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
    codes = [DTYPE_CODES[t.dtype] for t in inputs]
    in_dt = codes[0] if all(c == codes[0] for c in codes) else _MIXED

    def table(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device)
    bits = [p.bits.to(device) if p.bits is not None else None for p in plans]
    tables = dict(
        addr=table([t.data_ptr() for t in inputs], torch.int64), code=table(codes, torch.int32),
        mode=table([p.mode for p in plans], torch.int32),
        tlo=table([p.lo.key for p in plans], torch.int64), ilo=table([p.lo.index for p in plans], torch.int64),
        thi=table([p.hi.key for p in plans], torch.int64), ihi=table([p.hi.index for p in plans], torch.int64),
        thr=table([p.thr for p in plans], torch.int64),
        bits=table([b.data_ptr() if b is not None else 0 for b in bits], torch.int64),
        scale=table([p.scale for p in plans], torch.float32), weight=table([p.weight for p in plans], torch.float32),
        model=table([p.model & 0xFFFFFFFF for p in plans], torch.int64))
    if _interpreted():
        block = min(block, 256)
    seed_i = seed - (1 << 64) if seed >= (1 << 63) else seed
    grid = (triton.cdiv(numel, block),)
    _tv_merge_kernel[grid](tables["addr"], tables["code"], tables["mode"], tables["tlo"], tables["ilo"],
                           tables["thi"], tables["ihi"], tables["thr"], tables["bits"], tables["scale"],
                           tables["weight"], tables["model"], base.data_ptr(), out, numel, offset, len(inputs),
                           float(lam), float(divisor), seed_i, h0, h1, IN_DT=in_dt, BASE_DT=DTYPE_CODES[base.dtype],
                           CONSENSUS=bool(consensus), NORMALIZE=bool(normalize), BLOCK=block, num_warps=num_warps)
    del bits  # kept alive until the launch was queued


def philox_draws(seed: int, name: str, model: int, offset: int, n: int, device=None) -> torch.Tensor:
    """The Triton kernel's draws for elements offset .. offset+n-1 (tests compare them to the torch form)."""
    from pymerge.ops.philox import name_hash
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    h0, h1 = name_hash(name)
    out = torch.empty(n, dtype=torch.int64, device=device)
    _draws_kernel[(triton.cdiv(n, 128),)](out, n, offset, seed, model, h0, h1, BLOCK=128)
    return out
