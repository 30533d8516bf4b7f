"""Triton kernel for weighted_sum / weighted_sum_many, and its launcher.

One program owns BLOCK output elements. The inputs come as a table of raw addresses (int64),
so N is a runtime loop bound: no recompilation per N. When all inputs share a dtype it is a
compile-time constant (one load path); mixed dtypes branch per input on a dtype code.
K outputs (a population) are produced from one read of the inputs, up to MAX_OUTPUTS per launch.
With delta, input 0 is a base B and the sum is the C++ kernel's delta form (csrc/cpu/weighted_sum.cpp):
fma(w_0, B, sum_{i>=1} w_i (x_i - B)), task_arithmetic as mergekit computes it.
"""
from collections import OrderedDict

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on the CPU
    triton = None

from pymerge._native import DTYPE_CODES
from pymerge.kernels import E4M3, body_and_tail, interpreted as _interpreted, refuse_e4m3, synchronize_gpus, to_device

MAX_OUTPUTS = 4
_MIXED = -1


if triton is not None:

    @triton.jit
    def _typed(addr, T: tl.constexpr, ALIGNED: tl.constexpr):
        # An address from the table carries no alignment facts; without the hint every element is
        # loaded on its own (ld.global.b16) instead of 16 bytes at a time.
        p = addr.to(tl.pointer_type(T))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def _neg_zeros(BLOCK: tl.constexpr):
        # -0.0 from its bits: Triton 3.6 builds tl.full(..., -0.0) as +0.0 (it takes any value == 0 for
        # the null constant), which turned every all-zero-product sum's -0.0 into +0.0 on an H200
        return tl.full([BLOCK], 0x80000000, tl.uint32).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_as_f32(addr, offs, mask, DT: tl.constexpr, ALIGNED: tl.constexpr):
        if DT == 0:
            x = tl.load(_typed(addr, tl.float32, ALIGNED) + offs, mask=mask, other=0.0)
        elif DT == 1:
            x = tl.load(_typed(addr, tl.float16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        elif DT == 2:
            x = tl.load(_typed(addr, tl.bfloat16, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        elif DT == 3:
            x = tl.load(_typed(addr, tl.float8e4nv, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(_typed(addr, tl.float8e5, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _load_mixed(addr, code, offs, mask, ALIGNED: tl.constexpr, HAS_E4M3: tl.constexpr):
        # Runtime dtype dispatch; every branch yields float32. The float8_e4m3fn branch (code 3) is built
        # only when HAS_E4M3 (the launcher sets it when an input is one): Triton has tl.float8e4nv from
        # sm_89 on and rejects a kernel that merely contains it, taken or not, when compiling for an A100.
        if code == 0:
            x = _load_as_f32(addr, offs, mask, 0, ALIGNED)
        elif code == 1:
            x = _load_as_f32(addr, offs, mask, 1, ALIGNED)
        elif code == 2:
            x = _load_as_f32(addr, offs, mask, 2, ALIGNED)
        else:
            if HAS_E4M3:
                if code == 3:
                    x = _load_as_f32(addr, offs, mask, 3, ALIGNED)
                else:
                    x = _load_as_f32(addr, offs, mask, 4, ALIGNED)
            else:
                x = _load_as_f32(addr, offs, mask, 4, ALIGNED)
        return x

    @triton.jit
    def _store(out_ptr, offs, mask, acc):
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # nearest even on the bits, as the C++ store and a GPU's cvt.rn (the interpreter's float cast truncated
            # half of all outputs one step toward zero: an audit); NaNs stay quiet NaNs
            b = acc.to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(acc != acc, (b >> 16) | 0x40, r)
            tl.store(out_ptr.to(tl.pointer_type(tl.uint16)) + offs, r.to(tl.uint16), mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_input(addr_table, code_table, i, offs, mask, IN_DT: tl.constexpr, ALIGNED: tl.constexpr,
                    HAS_E4M3: tl.constexpr):
        addr = tl.load(addr_table + i)
        if IN_DT == -1:
            x = _load_mixed(addr, tl.load(code_table + i), offs, mask, ALIGNED, HAS_E4M3)
        else:
            x = _load_as_f32(addr, offs, mask, IN_DT, ALIGNED)
        return x

    @triton.jit
    def _weighted_sum_kernel(addr_table, code_table, w_table, out0, out1, out2, out3, start, end, n_in,
                             IN_DT: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                             HAS_E4M3: tl.constexpr, DELTA: tl.constexpr):
        # Elements [start, end). The launcher runs the body (end a multiple of 16, so Triton can
        # prove the mask constant over 16-byte vectors and loads 16 bytes at a time) and the short
        # tail as two launches; one launch over an odd end would load every element on its own.
        pid = tl.program_id(0).to(tl.int64)
        offs = start + pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        # -0.0 + w*x == w*x bit for bit (a +0.0 start would turn a -0.0 product into +0.0), so the
        # fused first step rounds exactly as the CPU's `acc = w * x`. tl.fma, not `acc += w * x`: the same
        # one rounding as the C++ kernel's fma whether or not the compiler contracts (the interpreter does not).
        acc0 = _neg_zeros(BLOCK)
        acc1 = _neg_zeros(BLOCK)
        acc2 = _neg_zeros(BLOCK)
        acc3 = _neg_zeros(BLOCK)
        if DELTA:  # input 0 is the base: the terms are x_i - B, and B's own term comes last
            b = _load_input(addr_table, code_table, 0, offs, mask, IN_DT, ALIGNED, HAS_E4M3)
        # 1 if DELTA, not range(DELTA, ...): compiled, a True constexpr is an i1 that the loop's signed i32
        # bound sign-extends to -1 (the interpreter's Python range reads it as 1; a review of the TTIR)
        for i in range(1 if DELTA else 0, n_in):
            x = _load_input(addr_table, code_table, i, offs, mask, IN_DT, ALIGNED, HAS_E4M3)
            if DELTA:
                x = x - b
            acc0 = tl.fma(tl.load(w_table + i), x, acc0)
            if K > 1:
                acc1 = tl.fma(tl.load(w_table + n_in + i), x, acc1)
            if K > 2:
                acc2 = tl.fma(tl.load(w_table + 2 * n_in + i), x, acc2)
            if K > 3:
                acc3 = tl.fma(tl.load(w_table + 3 * n_in + i), x, acc3)
        if DELTA:
            acc0 = tl.fma(tl.load(w_table), b, acc0)
            if K > 1:
                acc1 = tl.fma(tl.load(w_table + n_in), b, acc1)
            if K > 2:
                acc2 = tl.fma(tl.load(w_table + 2 * n_in), b, acc2)
            if K > 3:
                acc3 = tl.fma(tl.load(w_table + 3 * n_in), b, acc3)
        _store(out0, offs, mask, acc0)
        if K > 1:
            _store(out1, offs, mask, acc1)
        if K > 2:
            _store(out2, offs, mask, acc2)
        if K > 3:
            _store(out3, offs, mask, acc3)


_TABLES = OrderedDict()  # (device, addresses, dtype codes) -> (address table, dtype-code table) on the device
_CAPTURED = {}  # tables a CUDA graph captured: they live as long as the process (a graph may replay any time)
_TABLES_MAX = 4096


def _tables(tensors, device):
    """Device-side address and dtype tables, built once per set of inputs.

    Reusing them keeps repeated calls (the search loop) free of host-to-device copies, so they can
    be captured in a CUDA graph. A key holds the addresses themselves, so a hit is always right.
    Eviction is least-recently-used, waits for the device's queued work, and never touches a table a graph
    captured.
    """
    key = (str(device),) + tuple((t.data_ptr(), DTYPE_CODES[t.dtype]) for t in tensors)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = _CAPTURED.get(key) or _TABLES.get(key)
    if hit is None:
        if capturing:
            raise RuntimeError("weighted_sum: run the call once before capturing it in a CUDA graph "
                               "(its address tables are built by a host-to-device copy, which a capture cannot hold)")
        addrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)
        codes = torch.tensor([DTYPE_CODES[t.dtype] for t in tensors], dtype=torch.int32).to(device)
        hit = _TABLES[key] = (addrs, codes)
        if len(_TABLES) > _TABLES_MAX:
            # a kernel on another stream may still read the table: the allocator would reuse its memory on the
            # stream that made it, unordered with that kernel (rare: past _TABLES_MAX sets of inputs)
            synchronize_gpus(list(_TABLES)[:len(_TABLES) - _TABLES_MAX])
            while len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
    elif key in _TABLES:
        _TABLES.move_to_end(key)
    if capturing:
        _CAPTURED[key] = hit
    return hit


def weighted_sum_many(tensors, rows, outs, block: int = 4096, num_warps: int = 8, delta: bool = False) -> None:
    """Launches the kernel; inputs contiguous and validated, outs contiguous, one device.

    rows: K lists of N floats, or a float32 [K, N] tensor (kept on the device: no host sync).
    delta: tensors[0] is a base the others are taken relative to (the module docstring).
    """
    if triton is None:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
    device = tensors[0].device
    if device.type != "cuda" and not _interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
    numel = tensors[0].numel()
    codes = [DTYPE_CODES[t.dtype] for t in tensors]
    in_dt = codes[0] if all(c == codes[0] for c in codes) else _MIXED
    refuse_e4m3(device, codes, "weighted_sum")
    addr_table, code_table = _tables(tensors, device)
    aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
    if isinstance(rows, torch.Tensor):
        weights = rows.to(device=device, dtype=torch.float32).contiguous()
    elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("weighted_sum: inside a CUDA graph capture pass the weights as a CUDA tensor "
                         "(host weights would be copied once at capture and never again)")
    else:
        weights = to_device(rows, torch.float32, device)
    if _interpreted():
        block, num_warps = min(block, 1024), 4
    launches = body_and_tail(numel, block, num_warps)
    for start in range(0, len(outs), MAX_OUTPUTS):
        group = outs[start:start + MAX_OUTPUTS]
        w_table = weights[start:start + MAX_OUTPUTS]
        slots = group + [group[0]] * (MAX_OUTPUTS - len(group))
        for lo, hi, blk, warps in launches:
            _weighted_sum_kernel[(triton.cdiv(hi - lo, blk),)](
                addr_table, code_table, w_table, *slots, lo, hi, len(tensors), IN_DT=in_dt, K=len(group),
                BLOCK=blk, ALIGNED=aligned, HAS_E4M3=E4M3 in codes, DELTA=bool(delta), num_warps=warps)
