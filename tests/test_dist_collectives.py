"""pymerge.dist collectives and layouts without a process group (group=None: this rank is everything)."""
import random

import pytest
import torch

import dist_helpers
import pymerge
from pymerge.dist import collectives
from pymerge.dist.layout import Box
from pymerge.dist.reads import byte_runs, read_box
from pymerge.errors import InputError
from pymerge.ops import select


@pytest.mark.parametrize("seed", range(6))
def test_boundaries_equal_select_ranks(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 17, 1000, 4111])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    base = torch.randn(n, generator=g)
    same = torch.rand(n, generator=g) < 0.3
    x[same] = base[same]  # zero deltas: one long run of equal keys
    x[: n // 5] = base[: n // 5] + 0.25  # runs of equal magnitudes
    if n > 10:
        x[3], x[5] = float("nan"), float("inf")
    keys = select.magnitude_keys(x, base)
    ranks = sorted({0, n, rng.randrange(n + 1), rng.randrange(n + 1), n // 5, max(0, n // 5 - 1)})
    for descending in (True, False):
        want = select.select_ranks(x, base, ranks, descending, backend="torch")
        got = collectives.boundaries([keys] * len(ranks), ranks, [descending] * len(ranks), n,
                                     lambda: torch.arange(n), None)
        assert got == want, (n, descending, ranks)


def test_box_runs_and_reads():
    """Boxes read, indexed and found contiguous as slicing the tensor says. A box whose leading dimension has
    length 1 (row 2, columns 1..3, all of dim 2: one run from 52) was not found contiguous when length-1 leading
    dimensions were not skipped, and merges fell back to the slower bitmask path (a mutation audit)."""
    t = torch.arange(5 * 6 * 4, dtype=torch.float32).reshape(5, 6, 4)
    raw = t.reshape(-1).view(torch.uint8)
    for offset, shape in (((1, 0, 0), (3, 6, 4)), ((0, 2, 0), (5, 3, 4)), ((2, 1, 1), (2, 4, 2)),
                          ((4, 0, 0), (0, 6, 4)), ((2, 1, 0), (1, 3, 4))):
        box = Box((5, 6, 4), offset, shape, ())
        want = t[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        assert torch.equal(read_box(raw, torch.float32, box), want)
        assert torch.equal(box.global_indices(), want.reshape(-1).long())
        touched = sorted(b for a, e in byte_runs(box, 4) for b in range(a, e))
        assert touched == sorted(b for i in want.reshape(-1).long().tolist() for b in range(4 * i, 4 * i + 4))
        start = box.contiguous_start()
        contiguous = want.numel() == 0 or bool((want.reshape(-1).diff() == 1).all())
        assert (start is not None) == contiguous
        if start is not None and want.numel():
            assert start == int(want.reshape(-1)[0])
    assert Box((5, 6, 4), (2, 1, 0), (1, 3, 4), ()).contiguous_start() == 2 * 24 + 1 * 4


def test_shard_like_needs_a_process_group(tmp_path):
    sd = {"w": torch.ones(3)}
    with pytest.raises(InputError, match="initialized torch.distributed process group"):
        pymerge.CheckpointPool([sd, sd], shard_like=sd)


def soft_worker(rank, world):
    from pymerge.dist import collectives
    import torch.distributed as dist
    group = dist.group.WORLD
    out = [collectives.agree(None, group, (7, 1), differs=("hard", None)),  # alike: no flag
           collectives.agree(None, group, (7, rank), differs=("hard", None)),  # the soft value differs: the flag
           collectives.agree(None, group, (7, 1), differs=("hard", None), flag=rank == 1)]
    try:
        collectives.agree(None, group, (rank, rank), differs=("hard", None))  # a hard one too: its message
    except Exception as exc:
        out.append(f"{type(exc).__name__}: {exc}")
    return out


def test_a_value_whose_difference_only_raises_the_flag():
    """agree's None message: a value compared across ranks whose difference is a decision (plan again), not an
    error (the sharded pool's kept plans)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        results = dist_helpers.run(soft_worker, 2, d)
    assert results == [[False, True, True, "InputError: hard"]] * 2, results


def test_stats_cache_counts_every_change():
    """The sharded task-vector call reuses its resolved arrays while the generation stays: dict's update,
    setdefault, pop, popitem and |= bypass __setitem__/__delitem__ (a review), so each counts itself."""
    from pymerge.dist.pool import StatsCache
    c = StatsCache()
    changes = [lambda: c.__setitem__("a", 1), lambda: c.update(b=2), lambda: c.setdefault("c", 3),
               lambda: c.pop("a"), lambda: c.popitem(), lambda: c.__ior__({"x": 1}), lambda: c.__delitem__("x"),
               c.clear]
    for k, change in enumerate(changes, 1):
        change()
        assert c.generation == k
    assert c == {} and isinstance(c, StatsCache)


def test_stats_cache_pickles_and_copies_with_its_seeded_families(monkeypatch):
    """A dict subclass's pickle and copy set its items, through __setitem__, before its attributes: an item past
    the cap cleared a cache whose seeded families were not there yet (AttributeError; a review)."""
    import copy
    import pickle
    from pymerge.dist.pool import StatsCache
    monkeypatch.setattr(StatsCache, "MAX_ENTRIES", 2)
    c = StatsCache({k: k for k in range(5)})  # past the cap: dict's own __init__ takes no notice
    c.put_seeded(("w", 0, "random", 7), ("w", 0, "random"), "mask")
    for d in (pickle.loads(pickle.dumps(c)), copy.copy(c), copy.deepcopy(c)):
        assert dict(d) == dict(c) and d.seeded == c.seeded and d.seeded is not c.seeded
        assert d.generation == c.generation and isinstance(d, StatsCache)
        d.put_seeded(("w", 0, "random", 8), ("w", 0, "random"), "other")  # the copy's seed replaces its own
        assert ("w", 0, "random", 7) not in d and ("w", 0, "random", 7) in c


def mixed_errors_worker(rank, world):
    """Each rank fails (or not) as the plan below says, in one agreement."""
    import torch.distributed as dist

    from pymerge.dist import collectives
    from pymerge.errors import InputError
    plans = {"input_and_memory": [InputError("bad weights"), MemoryError("out of memory here"), None],
             "runtime_and_input": [RuntimeError("kernel failed"), InputError("bad weights"), None],
             "runtime_alone": [None, RuntimeError("kernel failed"), None]}
    out = {}
    for name, errors in plans.items():
        mine = errors[rank]
        try:
            collectives.agree(mine, dist.group.WORLD)
            out[name] = None
        except BaseException as exc:
            out[name] = (type(exc).__name__, str(exc), exc is mine)
    return out


def test_ranks_failing_differently_each_keep_what_is_not_input():
    """Several ranks failing at once: a MemoryError beside another rank's InputError became that InputError on
    every rank (a caller backing off on MemoryError caught nothing), and a rank with its own InputError beside
    another's RuntimeError raised it without saying where (a review). A rank's own failure that is not input
    stays itself; the others raise the first input error, named by rank, else a DistributedError."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        results = dist_helpers.run(mixed_errors_worker, 3, d)
    r0, r1, r2 = results
    assert r0["input_and_memory"] == r2["input_and_memory"] == ("InputError", "rank 0: bad weights", False), results
    assert r1["input_and_memory"] == ("MemoryError", "out of memory here", True), results
    assert r0["runtime_and_input"] == ("RuntimeError", "kernel failed", True), results
    assert r1["runtime_and_input"][:2] == r2["runtime_and_input"][:2] == ("InputError", "rank 1: bad weights"), results
    assert r1["runtime_alone"] == ("RuntimeError", "kernel failed", True), results
    assert r0["runtime_alone"] == r2["runtime_alone"] == ("DistributedError", "rank 1: kernel failed (RuntimeError there)",
                                                          False), results
