"""Whole-tensor statistics of sharded tensors, and errors every rank agrees on.

Everything here is a collective over the pool's group (torch.distributed, whatever backend the
group has; its timeout bounds every wait), called in the same order on every rank of the group.

- agree():  one all_reduce of an error flag (and a fingerprint of the caller's arguments), then,
            only on failure, an all_gather of the messages: every rank raises the same error.
- exact_sums(): sums of float64 values (|d|, products of float32s: all exact in float64) that
            are EXACT and then rounded once: each value is split into a 53-bit integer mantissa
            (two 27-bit halves) binned by its binary exponent; the bins are summed in int64 and
            all-reduced (integer addition: no rounding, any order), and the total is rounded to
            float64 once. So the result does not depend on the rank count or the summation order.
            (The single-process kernels sum float32/float64 partials blockwise; their float32-
            rounded scales and coefficients agree with these except when a sum falls within that
            rounding error of a float32 rounding boundary.)
- boundaries(): the exact global magnitude rank selection of pymerge/ops/select.py (same key,
            same index tie-break) from all-reduced radix histograms: 11 + 10 + 10 key bits, then,
            only when the boundary splits a run of equal keys, a bisection over global indices.
"""
import hashlib
import pickle
from fractions import Fraction
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

from pymerge.errors import CheckpointError, InputError, MergeConfigError
from pymerge.ops.select import ALL_ASC, ALL_DESC, Boundary

_ERRORS = {cls.__name__: cls for cls in (InputError, CheckpointError, MergeConfigError)}


def _on_wire(t: torch.Tensor, group) -> torch.Tensor:
    """t where the group's backend can reduce it: NCCL-only groups reduce CUDA tensors, gloo CPU ones."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "cpu" not in backend:
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    """All-reduces t (sum by default) over group; returns the result on the CPU."""
    wire = _on_wire(t, group)
    dist.all_reduce(wire, op=op or dist.ReduceOp.SUM, group=group)
    return wire.cpu()


def fingerprint(*values) -> int:
    """A 62-bit digest of picklable arguments (weights, method, parameters): ranks must pass the same."""
    return int.from_bytes(hashlib.blake2b(pickle.dumps(values), digest_size=8).digest(), "little") >> 2


def agree(error: Optional[BaseException], group, what: int = 0) -> None:
    """Raises on every rank of group if any rank had an error (or passed a different `what`)."""
    if group is None:
        if error is not None:
            raise error
        return
    flags = _all_reduce(torch.tensor([int(error is not None), what, -what], dtype=torch.int64), group,
                        dist.ReduceOp.MAX)
    if flags[0] == 0 and flags[1] == -flags[2]:
        return
    if flags[0] == 0:
        raise InputError("ranks called the sharded pool with different arguments (weights, method or "
                         "parameters); every rank of the group must pass the same")
    mine = None
    if error is not None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        mine = (type(error).__name__, first)
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, mine, group=group)
    i = next(i for i, m in enumerate(messages) if m is not None)
    kind, message = messages[i]
    if any(m != messages[i] for m in messages):  # seen by some ranks only: say where
        message = f"rank {dist.get_global_rank(group, i)}: {message}"
    raise _ERRORS.get(kind, InputError)(message) from (error if messages[i] == mine else None)


# ---- exact sums -------------------------------------------------------------------------------------
_OFFSET = 1080                  # frexp exponents of float64 lie in [-1073, 1024]
_BINS = 2110
_SCALE = 1073 + 53              # value = sum (hi * 2^26 + lo) * 2^(e - 53)


def _parts(v: torch.Tensor) -> torch.Tensor:
    """[hi bins, lo bins, #NaN, #+inf, #-inf] of the float64 values v (int64, exactly summable)."""
    v = v.reshape(-1).double().cpu()
    finite = torch.isfinite(v)
    out = torch.zeros(2 * _BINS + 3, dtype=torch.int64)
    out[-3] = int(torch.isnan(v).sum())
    out[-2] = int((v == float("inf")).sum())
    out[-1] = int((v == float("-inf")).sum())
    m, e = torch.frexp(v[finite])
    big = (m * 2.0 ** 53).to(torch.int64)  # exact: |m| < 1 has 53 significant bits
    hi = big >> 26                          # floor: big = hi * 2^26 + lo with 0 <= lo < 2^26
    lo = big - (hi << 26)
    idx = e.to(torch.int64) + _OFFSET
    out[:_BINS].index_add_(0, idx, hi)
    out[_BINS:2 * _BINS].index_add_(0, idx, lo)
    return out


def _total(parts: torch.Tensor) -> float:
    nan, pinf, ninf = (int(x) for x in parts[-3:])
    if nan or (pinf and ninf):
        return float("nan")
    if pinf or ninf:
        return float("inf") if pinf else float("-inf")
    hi, lo = parts[:_BINS].tolist(), parts[_BINS:2 * _BINS].tolist()
    total = sum(((h << 26) + l) << (b - _OFFSET - 53 + _SCALE) for b, (h, l) in enumerate(zip(hi, lo)) if h or l)
    try:
        return float(Fraction(total, 1 << _SCALE))
    except OverflowError:
        return float("inf") if total > 0 else float("-inf")


def exact_sums(values: Iterable[torch.Tensor], group) -> List[float]:
    """The exact global sum of each float64 tensor in values (this rank's parts), rounded once.
    values may be a generator: each tensor is binned and dropped before the next is made."""
    parts = [_parts(v) for v in values]
    if not parts:
        return []
    parts = torch.stack(parts)
    if group is not None:
        parts = _all_reduce(parts, group)
    return [_total(p) for p in parts]


# ---- rank selection ---------------------------------------------------------------------------------
_LEVELS = ((20, 11), (10, 10), (0, 10))  # (shift, bits) of the 31-bit magnitude key, top down


def boundaries(keys: Sequence[torch.Tensor], ranks: Sequence[int], descending: Sequence[bool], numel: int,
               global_index: Callable[[], torch.Tensor], group) -> List[Boundary]:
    """Boundary of rank ranks[j] in the global order of keys[j] (this rank's magnitude keys, see
    pymerge.ops.select) over a tensor of `numel` elements; global_index() gives the keys' global
    flat indices. Same answer as select.select_ranks on the whole tensor."""
    out: List[Optional[Boundary]] = [None] * len(keys)
    jobs = []
    for j, r in enumerate(ranks):
        if not 0 <= r <= numel:
            raise ValueError(f"rank {r} outside [0, {numel}]")
        if r == numel:
            out[j] = Boundary(ALL_DESC if descending[j] else ALL_ASC, 0)
        else:
            jobs.append(j)
    prefix = {j: 0 for j in jobs}
    left = {j: ranks[j] for j in jobs}  # elements still to place before the boundary
    for shift, bits in _LEVELS:
        if not jobs:
            break
        hists = []
        for j in jobs:
            k = keys[j]
            digit = (k >> shift) & ((1 << bits) - 1)
            if shift + bits < 31:
                digit = digit[(k >> (shift + bits)) == prefix[j]]
            hists.append(torch.bincount(digit, minlength=1 << bits))
        hist = torch.stack(hists).cpu()
        if group is not None:
            hist = _all_reduce(hist, group)
        for row, j in zip(hist, jobs):
            ordered = row.flip(0) if descending[j] else row
            cum = ordered.cumsum(0)
            pos = int(torch.searchsorted(cum, torch.tensor(left[j]), right=True))
            left[j] -= int(cum[pos - 1]) if pos else 0
            digit = (len(row) - 1 - pos) if descending[j] else pos
            prefix[j] = (prefix[j] << bits) | digit
    split = [j for j in jobs if left[j] > 0]  # the boundary falls inside a run of equal keys
    index = {j: 0 for j in jobs}
    if split:
        gidx = global_index()
        ties = {j: torch.sort(gidx[keys[j] == prefix[j]]).values for j in split}
        lo = {j: 0 for j in split}
        hi = {j: numel - 1 for j in split}
        while any(lo[j] < hi[j] for j in split):
            mids = {j: (lo[j] + hi[j]) // 2 for j in split}
            counts = torch.tensor([int(torch.searchsorted(ties[j], torch.tensor(mids[j], device=ties[j].device),
                                                          right=True))
                                   for j in split], dtype=torch.int64)  # ties at index <= mid
            if group is not None:
                counts = _all_reduce(counts, group)
            for c, j in zip(counts.tolist(), split):
                if lo[j] == hi[j]:
                    continue
                if c >= left[j] + 1:
                    hi[j] = mids[j]
                else:
                    lo[j] = mids[j] + 1
        index = {j: lo[j] for j in split}
    for j in jobs:
        out[j] = Boundary(prefix[j], index.get(j, 0))
    return out
