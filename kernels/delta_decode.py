"""Triton kernel for delta-compressed pools: out_k = sum_t w[k, t] * decode(term_t), one pass.

Terms come as tables of raw addresses with a kind per term (dense dtype codes 0-2, int8 = 16,
int4 = 17; layouts in pymerge/pool/compressed.py): T is a runtime loop bound, so one compiled
kernel serves every mix of formats. The arithmetic is csrc/cpu/delta_decode.cpp's, so the bits are
the C++ kernel's: coef = float32(w * scale) per scale block (w for dense terms), then
acc = fma(coef, x, acc) over the terms in order from acc = -0.0 (x: the code, exact in float32, or
the dense value); each output is rounded once to its dtype. Up to MAX_OUTPUTS candidates per launch
share one read of the codes.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on the CPU
    triton = None

from pymerge._native import DTYPE_CODES
from pymerge.kernels import E4M3, body_and_tail, interpreted as _interpreted, refuse_e4m3, synchronize_gpus, to_device

MAX_OUTPUTS = 4
Q8, Q4 = 16, 17
QBLOCK = 64


if triton is not None:
    from pymerge.kernels.weighted_sum import _load_mixed, _store, _typed

    _QBLOCK = tl.constexpr(QBLOCK)  # elements per scale (a global a kernel reads must be a constexpr)

    @triton.jit
    def _neg_zeros_2d(ROWS: tl.constexpr, COLS: tl.constexpr):
        # -0.0 from its bits (weighted_sum's _neg_zeros: Triton builds tl.full(..., -0.0) as +0.0)
        return tl.full([ROWS, COLS], 0x80000000, tl.uint32).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale(scale_addr, sidx, smask):
        return tl.load(scale_addr.to(tl.pointer_type(tl.bfloat16)) + sidx, mask=smask, other=0.0).to(tl.float32)

    @triton.jit
    def _decode(addr, scale_addr, kind, offs, mask, sidx, smask, ALIGNED: tl.constexpr, HAS_E4M3: tl.constexpr):
        # (x, s): the code (exact in float32) and its block's scale, or the dense value and 1; s has sidx's shape
        # (a scale per row of 64 elements, or per element). ALIGNED (every term 16-byte aligned, offs in whole
        # runs of 16 from a multiple of 16): codes and dense values load 16 bytes at a time, where an address
        # from the table alone gave one load per element
        if kind == 17:  # int4: 32-bit word (e % 128) % 16 of group e // 128, nibble h = (e % 128) // 16
            p = _typed(addr, tl.uint32, ALIGNED)
            word = tl.load(p + (offs // 128) * 16 + offs % 16, mask=mask, other=0)
            nib = ((word >> (((offs % 128) // 16) * 4).to(tl.uint32)) & 15).to(tl.int32)
            x = (nib - 8).to(tl.float32)
            s = _scale(scale_addr, sidx, smask)
        elif kind == 16:
            p = _typed(addr, tl.int8, ALIGNED)
            x = tl.load(p + offs, mask=mask, other=0).to(tl.float32)
            s = _scale(scale_addr, sidx, smask)
        else:
            x = _load_mixed(addr, kind, offs, mask, ALIGNED, HAS_E4M3)
            s = tl.zeros_like(sidx).to(tl.float32) + 1.0
        return x, s

    @triton.jit
    def _delta_kernel(data_table, scale_table, kind_table, w_table, out0, out1, out2, out3, start, end, n_terms,
                      K: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr, ALIGNED: tl.constexpr,
                      HAS_E4M3: tl.constexpr):
        # a block is BLOCK // COLS rows of COLS elements
        pid = tl.program_id(0).to(tl.int64)
        first = start + pid * BLOCK
        rows = tl.arange(0, BLOCK // COLS)[:, None]
        offs = first + rows * COLS + tl.arange(0, COLS)[None, :]
        mask = offs < end
        if COLS == _QBLOCK:  # rows of one scale block each (first is a multiple of 64): a scale load and a
            sidx = first // _QBLOCK + rows  # coefficient w * s per row, not per element
            smask = first + rows * _QBLOCK < end
        else:
            sidx = offs // _QBLOCK
            smask = mask
        # -0.0 + p == p bit for bit (a +0.0 start would turn a -0.0 product into +0.0)
        acc0 = _neg_zeros_2d(BLOCK // COLS, COLS)
        acc1 = _neg_zeros_2d(BLOCK // COLS, COLS)
        acc2 = _neg_zeros_2d(BLOCK // COLS, COLS)
        acc3 = _neg_zeros_2d(BLOCK // COLS, COLS)
        for t in range(n_terms):
            x, s = _decode(tl.load(data_table + t), tl.load(scale_table + t), tl.load(kind_table + t), offs, mask,
                           sidx, smask, ALIGNED, HAS_E4M3)
            acc0 = tl.fma(tl.load(w_table + t) * s, x, acc0)  # coef = float32(w * s), broadcast along its row
            if K > 1:
                acc1 = tl.fma(tl.load(w_table + n_terms + t) * s, x, acc1)
            if K > 2:
                acc2 = tl.fma(tl.load(w_table + 2 * n_terms + t) * s, x, acc2)
            if K > 3:
                acc3 = tl.fma(tl.load(w_table + 3 * n_terms + t) * s, x, acc3)
        _store(out0, offs, mask, acc0)
        if K > 1:
            _store(out1, offs, mask, acc1)
        if K > 2:
            _store(out2, offs, mask, acc2)
        if K > 3:
            _store(out3, offs, mask, acc3)

_TABLES = {}  # (device, addresses, kinds) -> device tables, built once per tensor's terms


def device_weights(w, device) -> torch.Tensor:
    """The [K, T] float32 weights on `device`, without a stream sync (to_device: one per tensor and candidate
    before, the GPU idle while Python prepared the next)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_current_stream_capturing():  # the graph would keep the capture's weights, and its block
                raise RuntimeError("delta_accumulate: a compressed pool cannot be captured in a CUDA graph (its "
                                   "weights come from the host on every call)")
    return to_device(w, torch.float32, device)


def device_tables(tensors, scales, kinds, device):
    """(term addresses int64, scale addresses int64, kinds int32) on `device`, cached per terms;
    the Triton and CUDA kernels read them."""
    key = (str(device),) + tuple((t.data_ptr(), 0 if s is None else s.data_ptr(), k)
                                 for t, s, k in zip(tensors, scales, kinds))
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) > 65536:
            synchronize_gpus(_TABLES)  # a queued kernel (any stream) may still read a table freed here
            _TABLES.clear()
        hit = _TABLES[key] = (
            torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device),
            torch.tensor([0 if s is None else s.data_ptr() for s in scales], dtype=torch.int64).to(device),
            torch.tensor(list(kinds), dtype=torch.int32).to(device))
    return hit


def delta_accumulate(tensors, scales, kinds, numel: int, w, outs, block: int = 2048, num_warps: int = 8) -> None:
    """Launches the kernel: terms and outputs validated, contiguous, on one device; w is [K, T]."""
    if triton is None:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
    device = tensors[0].device
    if device.type != "cuda" and not _interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
    for o in outs:
        if o.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"delta_accumulate: output dtype {o.dtype} is not float32, float16 or bfloat16")
    assert all(k in (Q8, Q4) or k in DTYPE_CODES.values() for k in kinds)
    refuse_e4m3(device, kinds, "delta_accumulate")
    data_table, scale_table, kind_table = device_tables(tensors, scales, kinds, device)
    weights = device_weights(w, device)
    if _interpreted():
        block, num_warps = min(block, 1024), 4
    if block % QBLOCK:
        raise ValueError(f"delta_accumulate: block must be a multiple of {QBLOCK}, got {block}")
    # the body (whole runs of 16 elements, in rows of one scale block) with 16-byte loads where every term
    # allows them, then the last numel % 16 elements element by element: as weighted_sum's launcher
    aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
    launches = body_and_tail(numel, block, num_warps)
    for first in range(0, len(outs), MAX_OUTPUTS):
        group = outs[first:first + MAX_OUTPUTS]
        slots = group + [group[0]] * (MAX_OUTPUTS - len(group))
        for lo, hi, blk, warps in launches:
            body = blk == block  # rows of one scale block (block is a multiple of 64, never the tail's 16)
            _delta_kernel[(triton.cdiv(hi - lo, blk),)](
                data_table, scale_table, kind_table, weights[first:first + MAX_OUTPUTS], *slots, lo, hi,
                len(tensors), K=len(group), BLOCK=blk, COLS=QBLOCK if body else blk, ALIGNED=aligned and body,
                HAS_E4M3=E4M3 in kinds, num_warps=warps)
