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
from pymerge.kernels import E4M3, interpreted as _interpreted, refuse_e4m3

MAX_OUTPUTS = 4
Q8, Q4 = 16, 17
QBLOCK = 64


if triton is not None:
    from pymerge.kernels.weighted_sum import _load_mixed, _neg_zeros

    @triton.jit
    def _store(out_ptr, offs, mask, acc):
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # nearest even on the bits, as the C++ store (the interpreter's float cast truncates);
            # NaNs stay quiet NaNs
            b = acc.to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(acc != acc, (b >> 16) | 0x40, r)
            tl.store(out_ptr.to(tl.pointer_type(tl.uint16)) + offs, r.to(tl.uint16), mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode(addr, scale_addr, kind, offs, mask, HAS_E4M3: tl.constexpr):
        # (x, s): the code (exact in float32) and its block's scale, or the dense value and 1
        if kind == 17:  # int4: 32-bit word (e % 128) % 16 of group e // 128, nibble h = (e % 128) // 16
            p = addr.to(tl.pointer_type(tl.uint32))
            word = tl.load(p + (offs // 128) * 16 + offs % 16, mask=mask, other=0)
            nib = ((word >> (((offs % 128) // 16) * 4).to(tl.uint32)) & 15).to(tl.int32)
            s = tl.load(scale_addr.to(tl.pointer_type(tl.bfloat16)) + offs // 64, mask=mask, other=0.0)
            x = (nib - 8).to(tl.float32)
            s = s.to(tl.float32)
        elif kind == 16:
            p = addr.to(tl.pointer_type(tl.int8))
            c = tl.load(p + offs, mask=mask, other=0)
            s = tl.load(scale_addr.to(tl.pointer_type(tl.bfloat16)) + offs // 64, mask=mask, other=0.0)
            x = c.to(tl.float32)
            s = s.to(tl.float32)
        else:
            x = _load_mixed(addr, kind, offs, mask, False, HAS_E4M3)
            s = tl.zeros_like(x) + 1.0
        return x, s

    @triton.jit
    def _delta_kernel(data_table, scale_table, kind_table, w_table, out0, out1, out2, out3, numel, n_terms,
                      K: tl.constexpr, BLOCK: tl.constexpr, HAS_E4M3: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        # -0.0 + p == p bit for bit (a +0.0 start would turn a -0.0 product into +0.0)
        acc0 = _neg_zeros(BLOCK)
        acc1 = _neg_zeros(BLOCK)
        acc2 = _neg_zeros(BLOCK)
        acc3 = _neg_zeros(BLOCK)
        for t in range(n_terms):
            x, s = _decode(tl.load(data_table + t), tl.load(scale_table + t), tl.load(kind_table + t), offs, mask,
                           HAS_E4M3)
            acc0 = tl.fma(tl.load(w_table + t) * s, x, acc0)
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


def device_tables(tensors, scales, kinds, device):
    """(term addresses int64, scale addresses int64, kinds int32) on `device`, cached per terms;
    the Triton and CUDA kernels read them."""
    key = (str(device),) + tuple((t.data_ptr(), 0 if s is None else s.data_ptr(), k)
                                 for t, s, k in zip(tensors, scales, kinds))
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) > 65536:
            if device.type == "cuda":  # a queued kernel (any stream) may still read a table freed here
                torch.cuda.synchronize(device)
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
    weights = torch.as_tensor(w, dtype=torch.float32).to(device).contiguous()
    if _interpreted():
        block, num_warps = min(block, 1024), 4
    grid = (triton.cdiv(numel, block),)
    for start in range(0, len(outs), MAX_OUTPUTS):
        group = outs[start:start + MAX_OUTPUTS]
        slots = group + [group[0]] * (MAX_OUTPUTS - len(group))
        _delta_kernel[grid](data_table, scale_table, kind_table, weights[start:start + MAX_OUTPUTS], *slots,
                            numel, len(tensors), K=len(group), BLOCK=block, HAS_E4M3=E4M3 in kinds,
                            num_warps=num_warps)
