"""Whole-tensor statistics of sharded tensors, and errors every rank agrees on.

Everything here is a collective over the pool's group (torch.distributed, whatever backend the
group has; its timeout bounds every wait), called in the same order on every rank of the group.

- agree():  one all_reduce of an error flag (and a fingerprint of the caller's arguments, and a
            decision flag), then, only on failure, an all_gather of the messages: every rank raises
            the same error. agree_catalog(): the same for what each rank read (tensors, dtypes).
- sum_parts(): the exact sums of pymerge/ops/exact_sum.py (L1 norms, dot products), which the
            single-process kernels compute too: each rank's integer parts are all-reduced (no
            rounding, any order) and rounded once, so the result is the single process's bits.
- boundaries(): the exact global magnitude rank selection of pymerge/ops/select.py (same key,
            same index tie-break) from all-reduced radix histograms: 11 + 10 + 10 key bits, then,
            only when the boundary splits a run of equal keys, a bisection over global indices.
"""
import functools
import hashlib
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from pymerge.errors import CheckpointError, DistributedError, InputError, MergeConfigError, first_line
from pymerge.ops import exact_sum
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
    """A 62-bit digest of plain values (str, numbers, None, lists and tuples of them: weights, method,
    parameters) that ranks must pass alike. Of their repr, not their pickle: pickle writes a string met
    twice as a back-reference when it is one object, so equal lists could differ between ranks."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") >> 2


def _settling(fn):
    """What fn raises needs no agreement: an error raised alike on every rank, or a collective's failure (gloo
    raises a plain RuntimeError on a timeout; another collective would fail too, or wait as long)."""
    @functools.wraps(fn)
    def settling(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            try:
                exc.pymerge_settled = True
            except AttributeError:  # an exception type without a __dict__: agreed again at worst
                pass
            raise
    return settling


def settled(exc: BaseException) -> bool:
    """Whether exc came out of agree(), agree_catalog() or agreed_order() (see _settling), or a DistError."""
    return getattr(exc, "pymerge_settled", False) or isinstance(exc, dist.DistError)


ARGUMENTS_DIFFER = ("ranks called the sharded pool with different arguments (weights, method or parameters); "
                     "every rank of the model's mesh, replicas included, must pass the same")


def error_kind(error: BaseException) -> str:
    """An error as ranks exchange it: the user's input by its family (a subclass such as NotInMesh is an
    InputError), anything else by its own type's name."""
    return next((c.__name__ for c in type(error).__mro__ if _ERRORS.get(c.__name__) is c), type(error).__name__)


def raise_agreed(errors: list, own: Optional[BaseException]):
    """Raises what every rank raises once the ranks' errors are known (errors: the (kind, message) of each rank
    that failed, in rank order; own: this rank's, or None). Anything but the user's input (a RuntimeError, a
    MemoryError) stays itself where it was raised: a pipeline that catches MemoryError to back off caught
    nothing when every rank raised InputError (an audit). The others raise the first rank's input error if any
    rank had one, else a DistributedError naming the failure (the CLI's one line, exit 1)."""
    if own is not None and error_kind(own) not in _ERRORS:
        raise own
    kind, message = next((e for e in errors if e[0] in _ERRORS), errors[0])
    if kind in _ERRORS:
        raise _ERRORS[kind](message) from own
    raise DistributedError(f"{message} ({kind} there)")


@_settling
def agree(error: Optional[BaseException], group, what=0, flag: bool = False, differs=ARGUMENTS_DIFFER) -> bool:
    """Raises on every rank of group if any rank had an error (or passed a different `what`: an int, or a
    tuple of ints each with its message in the tuple `differs`, None for a value whose difference only raises
    the flag); else returns whether any rank raised `flag` (a decision every rank must take alike, in the same
    call)."""
    if group is None:
        if error is not None:
            raise error
        return flag
    whats, messages = (what, differs) if isinstance(what, tuple) else ((what,), (differs,))
    flags = _all_reduce(torch.tensor([int(error is not None), int(flag)] + [v for w in whats for v in (w, -w)],
                                     dtype=torch.int64), group, dist.ReduceOp.MAX).tolist()
    split = [k for k in range(len(whats)) if flags[2 + 2 * k] != -flags[3 + 2 * k]]
    if flags[0] == 0 and all(messages[k] is None for k in split):
        return bool(flags[1]) or bool(split)
    if flags[0] == 0:
        raise InputError(next(messages[k] for k in split if messages[k] is not None))
    mine = None
    if error is not None:
        first = first_line(error)
        # the user's input by its family (a subclass such as NotInMesh is an InputError), else its own type
        mine = (error_kind(error), first)
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, mine, group=group)
    # as raise_agreed, but naming the rank where only some ranks saw the error
    if error is not None and mine[0] not in _ERRORS:
        raise error
    picked = next((m for m in messages if m is not None and m[0] in _ERRORS), None) or \
        next(m for m in messages if m is not None)
    i = messages.index(picked)
    kind, message = picked
    if any(m != picked for m in messages):  # seen by some ranks only: say where
        message = f"rank {dist.get_global_rank(group, i)}: {message}"
    if kind in _ERRORS:  # the same one-line error on every rank
        raise _ERRORS[kind](message) from (error if picked == mine else None)
    raise DistributedError(f"{message} ({kind} there)")


@_settling
def agree_catalog(catalog: list, group) -> None:
    """Raises the same InputError on every rank of group unless all hold the same catalog (a list of
    plain entries: checkpoint counts, a list of digests of each checkpoint's values, then (tensor, dtypes) in
    any order): collectives pair tensors by
    name, so one rank's other tensors would mix one tensor's statistics with another's, or hang."""
    if group is None:
        return
    catalog = [e for e in catalog if not isinstance(e, tuple)] + sorted(e for e in catalog if isinstance(e, tuple))
    if _same(fingerprint(catalog), group):
        return
    catalogs = [None] * dist.get_world_size(group)
    dist.all_gather_object(catalogs, catalog, group=group)
    i = next((i for i, c in enumerate(catalogs) if c != catalogs[0]), None)
    if i is None:
        return
    first, other = f"rank {dist.get_global_rank(group, 0)}", f"rank {dist.get_global_rank(group, i)}"
    raise InputError(f"{other} read other checkpoints than {first}: "
                     f"{_first_difference(catalogs[0], catalogs[i], first, other)}; every rank must read the "
                     "same checkpoints (no pool was built)")


@_settling
def agree_layouts(layouts: list, group) -> None:
    """Raises the same InputError on every rank of group unless every rank that holds a part of each tensor
    describes its layout alike (layouts: (name, layout_key) in the agreed order; None where this rank holds
    none of it). Each rank checked its targets against its own pool's layout only: a tensor sharded on one
    dimension on one rank and another on the next merged ties' statistics from overlapping pieces (a wrong
    merge, exit 0), and one replicated on one rank only left the ranks in different collectives (a hang until
    the timeout; an audit)."""
    if group is None or _same(fingerprint(layouts), group):
        return
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, layouts, group=group)
    for i, (name, _) in enumerate(layouts):
        seen = [(r, g[i][1]) for r, g in enumerate(gathered) if g[i][1] is not None]
        odd = next(((r, key) for r, key in seen if key != seen[0][1]), None)
        if odd is not None:
            (r0, key0), (r1, key1) = seen[0], odd
            raise InputError(f"tensor {name!r} is laid out {key1} on rank {dist.get_global_rank(group, r1)} but "
                             f"{key0} on rank {dist.get_global_rank(group, r0)}; every rank must build the pool "
                             "from the same layout (shard_like: the same sharding plan on every rank)")


@_settling
def agreed_order(names: List[str], group) -> List[str]:
    """The group's first rank's order of names (the same set on every rank, see agree_catalog): a copy of
    a file saved in another tensor order gives the same pool, tied targets written alike included."""
    if group is None or _same(fingerprint(names), group):
        return names
    order = [names]
    dist.broadcast_object_list(order, src=dist.get_global_rank(group, 0), group=group)
    return order[0]


def _same(digest: int, group) -> bool:
    flags = _all_reduce(torch.tensor([digest, -digest], dtype=torch.int64), group, dist.ReduceOp.MAX).tolist()
    return flags[0] == -flags[1]


def _first_difference(a: list, b: list, first: str, other: str) -> str:
    head_a, head_b = [e for e in a if not isinstance(e, tuple)], [e for e in b if not isinstance(e, tuple)]
    if head_a[:2] != head_b[:2]:
        return f"{other} has {head_b[0]} checkpoints (base: {head_b[1]}), {first} {head_a[0]} (base: {head_a[1]})"
    da, db = dict(e for e in a if isinstance(e, tuple)), dict(e for e in b if isinstance(e, tuple))
    missing = [n for n in da if n not in db]
    if missing:
        return f"tensor {missing[0]!r} is missing on {other} ({len(missing)} in all)"
    extra = [n for n in db if n not in da]
    if extra:
        return f"tensor {extra[0]!r} is on {other} only ({len(extra)} in all)"
    name = next((n for n in da if da[n] != db[n]), None)
    if name is not None:
        return f"tensor {name!r} has dtypes {list(db[name])} on {other}, {list(da[name])} on {first}"
    # the same tensors: the values sampled from each checkpoint differ (ShardedPool)
    k = next(k for k, (x, y) in enumerate(zip(head_a[2], head_b[2])) if x != y)
    which = f"checkpoint {k}" if k < head_a[0] else "the base"
    return f"{which} holds other values on {other} than on {first} (another file, or the checkpoints listed in another order)"


# ---- exact sums -------------------------------------------------------------------------------------
def sum_parts(parts: torch.Tensor, group) -> List[float]:
    """Totals of exact-sum parts (pymerge/ops/exact_sum.py, [..., PARTS] int64: this rank's share)
    summed over the group: integer addition, so the same bits as one process summing everything."""
    if group is not None:
        parts = _all_reduce(parts.contiguous(), group)
    return exact_sum.totals(parts)


# ---- rank selection ---------------------------------------------------------------------------------
_LEVELS = ((20, 11), (10, 10), (0, 10))  # (shift, bits) of the 31-bit magnitude key, top down


def boundaries(keys: Sequence[torch.Tensor], ranks: Sequence[int], descending: Sequence[bool],
               numel: Union[int, Sequence[int]], global_index: Union[Callable[[], torch.Tensor], Sequence[Callable]],
               group) -> List[Boundary]:
    """Boundary of rank ranks[j] in the global order of keys[j] (this rank's magnitude keys, see
    pymerge.ops.select) over a tensor of `numel` elements; global_index() gives the keys' global
    flat indices. Same answer as select.select_ranks on the whole tensor. numel and global_index may also be
    given per key (keys of several tensors: one collective per round for all of them)."""
    numel = [numel] * len(keys) if isinstance(numel, int) else list(numel)
    index_of = [global_index] * len(keys) if callable(global_index) else list(global_index)
    out: List[Optional[Boundary]] = [None] * len(keys)
    jobs = []
    for j, r in enumerate(ranks):
        if not 0 <= r <= numel[j]:
            raise ValueError(f"rank {r} outside [0, {numel[j]}]")
        if r == numel[j]:
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
        made: dict = {}  # each global_index called once (two keys of one tensor share it)
        for j in split:
            if id(index_of[j]) not in made:
                made[id(index_of[j])] = index_of[j]()
        ties = {j: torch.sort(made[id(index_of[j])][keys[j] == prefix[j]]).values for j in split}
        lo = {j: 0 for j in split}
        hi = {j: numel[j] - 1 for j in split}
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
