"""Exact sums rounded once: the one definition of the whole-tensor sums behind L1 rescales (DARE,
DELLA) and dot products (SLERP, NuSLERP, Model Stock), wherever and however a tensor is split.

A sum is held as "parts", an int64 vector: parts[b] counts multiples of 2^(b - LOW) (b < BINS),
then the counts of NaN, +inf and -inf. Parts add exactly, in any order: blocks, threads, the
ranks of a sharded pool (one all_reduce). total() rounds the exact value once to float64, so a
statistic does not depend on the summation order (the single-process pool and every rank count
give the same bits), and it is more accurate than float partial sums.

The C++ kernels (csrc/cpu/exact_sum.h) fill the same layout; parts() here does it with torch on
any device, for float64 values that are exact (|float32|, products of two float32s): each value
is split into its 53-bit integer mantissa's two halves, binned by binary exponent.
"""
from typing import Iterable, List

import torch

LOW = 1133           # bin b counts multiples of 2^(b - LOW): 2^-1133 is below every half-mantissa's unit
BINS = 2160          # the native kernels (csrc/cpu/exact_sum.h) split 128-bit bins up to bin 2156
PARTS = BINS + 3     # then #NaN, #+inf, #-inf
_BLOCK = 1 << 20     # elements binned at a time (bounds the temporaries)


def block_for(device: torch.device) -> int:
    """Elements per block of the torch paths that work block by block: 4M on a GPU, where each torch op
    is a launch and its host work (an uncached DARE-TIES tensor of 3 x 16M elements made 18,720 launches at
    1M per block: ~300 ms of host time on an H200, the GPU busy ~100 ms of it), 1M elsewhere. Either bounds
    the temporaries."""
    return _BLOCK << 2 if device.type == "cuda" else _BLOCK


def parts(values: torch.Tensor) -> torch.Tensor:
    """int64 [PARTS] of the sum of the float64 values (any shape, any device; on the CPU)."""
    flat = values.reshape(-1)
    out = torch.zeros(PARTS, dtype=torch.int64, device=flat.device)
    block, by_bincount = block_for(flat.device), _bincount_is_faster(flat.device)
    for s in range(0, flat.numel(), block):
        v = flat[s:s + block].double()
        finite = torch.isfinite(v)
        out[-3] += torch.isnan(v).sum()
        out[-2] += (v == float("inf")).sum()
        out[-1] += (v == float("-inf")).sum()
        m, e = torch.frexp(v[finite])
        big = (m * 2.0 ** 53).to(torch.int64)  # exact: |m| < 1 has 53 significant bits; v = big * 2^(e - 53)
        hi = big >> 26                          # floor: big = hi * 2^26 + lo with 0 <= lo < 2^26
        lo_bin = e.to(torch.int64) - 53 + LOW
        _add_counts(out, lo_bin, big - (hi << 26), hi, by_bincount)
    return out.cpu()


def _bincount_is_faster(device: torch.device) -> bool:
    """index_add_ of int64 on a GPU serializes on the few bins a block's exponents fill (1.4 ms per 4M
    elements on an H200, 73 % of an uncached DARE-TIES call). torch.bincount is allowed only while
    deterministic algorithms are off (its float64 sums are exact here, so any order gives the same bits)."""
    return device.type == "cuda" and not torch.are_deterministic_algorithms_enabled()


def _add_counts(out: torch.Tensor, lo_bin: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, by_bincount: bool):
    """out[lo_bin] += lo and out[lo_bin + 26] += hi, exactly. bincount's float64 sums are exact: each
    term is an integer of magnitude at most 2^27 and a block holds at most 2^25 of them."""
    if by_bincount:
        if lo.numel() > 1 << 25:
            raise ValueError(f"exact_sum: a block of {lo.numel()} values; float64 bin sums are exact up to 2^25")
        out += torch.bincount(lo_bin, weights=lo.double(), minlength=PARTS).to(torch.int64)
        out += torch.bincount(lo_bin + 26, weights=hi.double(), minlength=PARTS).to(torch.int64)
    else:
        out.index_add_(0, lo_bin, lo)
        out.index_add_(0, lo_bin + 26, hi)


def total(p: torch.Tensor) -> float:
    """The exact sum that parts p hold, rounded once to float64 (NaN if any NaN or both infinities)."""
    nan, pinf, ninf = (int(x) for x in p[BINS:])
    if nan or (pinf and ninf):
        return float("nan")
    if pinf or ninf:
        return float("inf") if pinf else float("-inf")
    bins = p[:BINS]
    nz = torch.nonzero(bins).flatten().tolist()
    if not nz:
        return 0.0
    low = nz[0]
    exact = sum(int(bins[b]) << (b - low) for b in nz)  # = sum / 2^(low - LOW)
    try:  # int / int is correctly rounded in Python
        return exact * 2.0 ** (low - LOW) if low >= LOW else exact / (1 << (LOW - low))
    except OverflowError:
        return float("inf") if exact > 0 else float("-inf")


def totals(rows: torch.Tensor) -> List[float]:
    """total() of each row of a [R, PARTS] tensor."""
    return [total(r) for r in rows.reshape(-1, PARTS)]


def stack(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """[len, PARTS] parts of each float64 tensor in values (a generator: one tensor alive at a time)."""
    rows = [parts(v) for v in values]
    return torch.stack(rows) if rows else torch.zeros(0, PARTS, dtype=torch.int64, device="cpu")
