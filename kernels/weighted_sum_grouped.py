"""Triton kernel for a whole model's weighted sums in one launch (three at most), and its launcher.

The GPU twin of csrc/cpu/grouped.cpp: a model of many small tensors merged one launch per tensor
pays a launch (and a mostly idle GPU) per tensor. Here one program owns BLOCK elements of one
tensor, found through a per-block table (tensor index, first element); per tensor an address row
of its N inputs and K outputs, its element count and weight group; weights a float32 [G, K, N]
device tensor. Tables live on the device and are built once per set of tensors (GroupedTable),
so a launch reads no host memory and can be captured in a CUDA graph. The blocks are ordered so that
full blocks of 16-byte aligned tensors, which load 16 bytes at a time, get a launch of their own.

The arithmetic is kernels/weighted_sum.py's: -0.0 start, one fused multiply-add per input in input
order, one rounding to the output dtype (all outputs of one launch share a dtype).
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on the CPU
    triton = None

from pymerge._native import DTYPE_CODES
from pymerge.kernels import E4M3, interpreted as _interpreted, refuse_e4m3

_MIXED = -1

if triton is not None:
    from pymerge.kernels.weighted_sum import _load_as_f32, _load_mixed, _neg_zeros, _store, _typed

    @triton.jit
    def _grouped_kernel(blk_tensor, blk_start, in_addr, in_code, out_addr, numels, groups, weights, n_in, k_total,
                        first, IN_DT: tl.constexpr, OUT_T: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                        FULL: tl.constexpr, ALIGNED: tl.constexpr, HAS_E4M3: tl.constexpr):
        pid = first + tl.program_id(0)
        t = tl.load(blk_tensor + pid).to(tl.int64)
        start = tl.load(blk_start + pid)
        if ALIGNED:  # every address 16-byte aligned (the table checks) and blocks start at multiples of BLOCK
            start = tl.multiple_of(start, BLOCK)
        offs = start + tl.arange(0, BLOCK)
        # A full block's mask is a constant, so Triton loads and stores 16 bytes at a time; a mask from
        # the table's element count would keep every element its own load.
        if FULL:
            mask = tl.full([BLOCK], 1, tl.int1)
        else:
            mask = offs < tl.load(numels + t)
        g = tl.load(groups + t).to(tl.int64)
        for k in tl.static_range(K):  # K outputs: each re-reads the block, from cache after the first
            acc = _neg_zeros(BLOCK)
            w_row = weights + (g * k_total + k) * n_in
            for i in range(n_in):
                addr = tl.load(in_addr + t * n_in + i)
                if IN_DT == -1:
                    x = _load_mixed(addr, tl.load(in_code + t * n_in + i), offs, mask, ALIGNED, HAS_E4M3)
                else:
                    x = _load_as_f32(addr, offs, mask, IN_DT, ALIGNED)
                acc = tl.fma(tl.load(w_row + i), x, acc)  # one rounding, as the C++ fma
            out = _typed(tl.load(out_addr + t * k_total + k), OUT_T, ALIGNED)
            _store(out, offs, mask, acc)  # bfloat16: nearest even on the bits


_OUT_TYPES = {}


def _out_type(dtype: torch.dtype):
    if not _OUT_TYPES:
        _OUT_TYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return _OUT_TYPES[dtype]


class GroupedTable:
    """Device tables for inputs[t] (N tensors each) -> outputs[t] (K tensors each), weight group groups[t].

    The tensors must stay alive and in place while the table is used (the pool's plan cache owns it).
    """

    def __init__(self, inputs, outputs, groups, n_groups: int, block: int = 1024):
        if triton is None:
            raise RuntimeError("the grouped Triton kernel needs triton")
        device = inputs[0][0].device
        self.n, self.k, self.n_groups = len(inputs[0]), len(outputs[0]), n_groups
        out_dtypes = {o.dtype for os in outputs for o in os}
        if len(out_dtypes) != 1:
            raise ValueError("a grouped launch writes one output dtype")
        self.out_t = _out_type(out_dtypes.pop())
        codes = [[DTYPE_CODES[x.dtype] for x in xs] for xs in inputs]
        flat = {c for row in codes for c in row}
        refuse_e4m3(device, flat, "weighted_sum")
        self.has_e4m3 = E4M3 in flat
        self.in_dt = flat.pop() if len(flat) == 1 else _MIXED
        self.block = min(block, 1024) if _interpreted() else block
        numels = [xs[0].numel() for xs in inputs]
        # Full blocks of 16-byte aligned tensors, full blocks of the others, then each tensor's partial
        # last block: three launches, as only the first can load 16 bytes at a time (FULL: a constant
        # mask; ALIGNED: every address of the tensor a multiple of 16, which a view may not be).
        kinds = ([], [], [])  # (tensor, first element) per launch
        for t, n in enumerate(numels):
            aligned = all(x.data_ptr() % 16 == 0 for x in list(inputs[t]) + list(outputs[t]))
            kinds[0 if aligned else 1].extend((t, s) for s in range(0, n - n % self.block, self.block))
            if n % self.block:
                kinds[2].append((t, n - n % self.block))
        counts = [len(k) for k in kinds]
        firsts = (0, counts[0], counts[0] + counts[1])
        self.launches = [(first, count, full, aligned) for first, count, full, aligned in zip(
            firsts, counts, (True, True, False), (True, False, False)) if count]  # (first block, blocks, FULL, ALIGNED)
        self.n_blocks = sum(counts)
        blk_tensor, blk_start = [b[0] for k in kinds for b in k], [b[1] for k in kinds for b in k]

        def put(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device)

        self.tables = (put(blk_tensor, torch.int32), put(blk_start, torch.int64),
                       put([[x.data_ptr() for x in xs] for xs in inputs], torch.int64),
                       put(codes, torch.int32), put([[o.data_ptr() for o in os] for os in outputs], torch.int64),
                       put(numels, torch.int64), put(list(groups), torch.int32))
        # the streams the tables are known to be ordered on: the one they were made on, then each launch's (run)
        self._streams = {torch.cuda.current_stream(device)} if device.type == "cuda" else set()

    def _record_stream(self) -> None:
        """A launch on a stream the tables were not made on: when the plan cache drops them (an eviction, a
        target collected), the allocator would hand their memory out again on their own stream, unordered with
        this launch, which may not have run yet. record_stream holds it until the launch's work is done. (A
        capture keeps its entries alive instead: the pool holds them for replays.)"""
        stream = torch.cuda.current_stream(self.tables[0].device)
        if stream not in self._streams and not torch.cuda.is_current_stream_capturing():
            for t in self.tables:
                t.record_stream(stream)
            self._streams.add(stream)

    def run(self, weights: torch.Tensor) -> None:
        """weights: float32 [G, K, N] on the tables' device (read there: no host sync)."""
        if tuple(weights.shape) != (self.n_groups, self.k, self.n):
            raise ValueError(f"weights must have shape {(self.n_groups, self.k, self.n)}, got {tuple(weights.shape)}")
        if weights.dtype != torch.float32 or weights.device != self.tables[0].device:  # bfloat16 was read as it was
            raise ValueError(f"weights must be float32 on {self.tables[0].device}, got {weights.dtype} on {weights.device}")
        weights = weights.contiguous()
        if self.tables[0].is_cuda:
            self._record_stream()
        for first, count, full, aligned in self.launches:
            _grouped_kernel[(count,)](*self.tables, weights, self.n, self.k, first, IN_DT=self.in_dt, OUT_T=self.out_t,
                                      K=self.k, BLOCK=self.block, FULL=full, ALIGNED=aligned,
                                      HAS_E4M3=self.has_e4m3, num_warps=4)
