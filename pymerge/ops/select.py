"""Exact magnitude rank selection for TIES / breadcrumbs thresholds: O(n), no sort.

Elements are ranked by the magnitude of their float32 delta d = float32(x) - float32(base), keyed
by the bits of |d| (a monotone integer key; NaN ranks above inf). Ties are broken by index:
- "descending" order: larger |d| first, equal |d| lowest index first  (TIES' top-k),
- "ascending" order:  smaller |d| first, equal |d| lowest index first (breadcrumbs' sort),
i.e. exactly what a *stable* sort in that direction gives. So "keep the k largest" keeps exactly k
elements, and among equal magnitudes at the threshold it keeps the lowest indices.

The answer for rank r is a Boundary (key, index): the r elements ranked before r are those whose
key is strictly before ``key`` in the order, plus those with key == ``key`` and index < ``index``.
Kernels then test membership per element with two integer compares.

Backends: "cpu" is csrc/cpu/select.cpp (the custom op pymerge::select_ranks) (two-level radix histogram over the key bits: two reads of
the inputs, a partial third only when the boundary splits a run of ties); "torch" is, on any device, the
same two-level histogram in torch ops, then counts of the keys below and equal (materializes the keys;
the GPU path until it has its own kernel).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from pymerge import _native
from pymerge.ops import library
from pymerge.ops._memory import check_readable

ALL_ASC = 1 << 31   # ascending boundary that has every element before it
ALL_DESC = -1       # descending boundary that has every element before it


@dataclass(frozen=True)
class Boundary:
    key: int    # |d| float32 bits (sign cleared)
    index: int  # ties at `key` with a lower index are before the boundary


def magnitude_keys(x: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 keys of |float32(x) - float32(base)| (flattened): the float bits with the sign cleared."""
    d = x.reshape(-1).float()
    if base is not None:
        d = d - base.reshape(-1).float()
    return (d.view(torch.int32).to(torch.int64) & 0x7FFFFFFF)


def before(keys: torch.Tensor, b: Boundary, descending: bool, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of the elements ranked before boundary b (keys from magnitude_keys)."""
    if index is None:
        index = torch.arange(keys.numel(), device=keys.device)
    strict = keys > b.key if descending else keys < b.key
    return strict | ((keys == b.key) & (index < b.index))


def select_ranks(x: torch.Tensor, base: Optional[torch.Tensor], ranks: Sequence[int], descending: bool,
                 backend: str = "auto", num_threads: int = 0) -> List[Boundary]:
    """Boundaries of ranks (each in [0, numel]) in the order described in the module docstring."""
    numel = x.numel()
    for r in ranks:
        if not 0 <= r <= numel:
            raise ValueError(f"rank {r} outside [0, {numel}]")
    if base is not None and base.shape != x.shape:
        raise ValueError(f"base has shape {tuple(base.shape)} but x has {tuple(x.shape)}")
    read = check_readable([x, base], "select_ranks: input")  # before any torch op reads them
    if backend == "auto":
        backend = "cpu" if x.device.type == "cpu" and _native.cpu is not None else "torch"
    if backend == "cpu":
        # the kernel need not test x's and base's storage again where nothing read since could run code of the
        # caller's (an int() of a rank of a type of its own: library.trusted)
        checked = (library.INPUTS,) if read and library.trusted(ranks, descending, backend, num_threads) else ()
        found = library.call("select_ranks", x, base, [int(r) for r in ranks], descending, num_threads,
                             checked=checked)
        return [Boundary(int(t), int(i)) for t, i in found.tolist()]
    if backend != "torch":
        raise ValueError(f"select_ranks: unknown backend {backend!r}")
    return _select_torch(magnitude_keys(x, base), ranks, descending)


def _select_torch(keys: torch.Tensor, ranks: Sequence[int], descending: bool) -> List[Boundary]:
    numel = keys.numel()
    order_keys = (0x7FFFFFFF - keys) if descending else keys  # ascending order in both cases
    histogram = _Histogram(order_keys) if numel and any(r < numel for r in ranks) else None
    result = []
    for r in ranks:
        if r == numel:
            result.append(Boundary(ALL_DESC if descending else ALL_ASC, 0))
            continue
        t = histogram.kth_smallest(r)
        j = r - int((order_keys < t).sum())
        idx = 0 if j == 0 else int(torch.nonzero(order_keys == t).flatten()[j])
        result.append(Boundary(0x7FFFFFFF - t if descending else t, idx))
    return result


class _Histogram:
    """Keys of rank r (0-based, ascending) among int64 keys in [0, 2**31): a histogram of the high 15 bits
    (built once per call) finds the bucket that holds rank r, a histogram of the low 16 bits of that
    bucket's keys the key. torch.kthvalue on one CUDA tensor runs in one thread block: 224 ms for 16M keys
    on an H200, the whole uncached cost of a TIES tensor (this: 24 ms for the tensor's three models)."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys  # (the high bits are not kept: a copy of the keys' size, for the whole call)
        self.cum = torch.bincount(keys >> 16, minlength=1 << 15).cumsum(0)

    def kth_smallest(self, r: int) -> int:
        bucket = _first_above(self.cum, r)
        below = int(self.cum[bucket - 1]) if bucket else 0
        low = torch.bincount(self.keys[(self.keys >> 16) == bucket] & 0xFFFF, minlength=1 << 16).cumsum(0)
        return (bucket << 16) | _first_above(low, r - below)


def smallest_keys(keys: torch.Tensor, ranks: Sequence[int]) -> List[int]:
    """The key of each rank (0-based, ascending, each below keys.numel()) among integer keys in [0, 2**31) of
    any integer dtype and device (int32 keys halve the memory): the histograms alone, no tie index."""
    histogram = _Histogram(keys)
    return [histogram.kth_smallest(r) for r in ranks]


def _first_above(cum: torch.Tensor, r: int) -> int:
    """The first index whose cumulative count exceeds r."""
    return int(torch.searchsorted(cum, torch.tensor([r], device=cum.device), right=True))
