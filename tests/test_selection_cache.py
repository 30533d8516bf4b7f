"""Selection caches have owners: nothing is reused across run_merge calls or pools (issue 8, item 1).

Successive bf16 checkpoints of one run share shapes, sizes and often the few values a fingerprint
would sample; a cache keyed by addresses and samples handed the second merge the first one's
thresholds. Here the second set of checkpoints differs from the first everywhere except at those
positions, and each merge must match its own float64 reference.
"""
import pytest
import torch
from safetensors.torch import save_file

from methods_reference import ref_task_vectors, rel_err
from pymerge.merge import run_merge
from pymerge.ops import task_vector_ops as tvo
from pymerge.pool import CheckpointPool

SHAPE = (97, 61)
METHODS = ("ties", "breadcrumbs", "dare_ties")
WEIGHTS, DENSITIES = [0.7071, 0.4142, 0.8660], [0.4, 0.3, 0.5]  # no exact cancellations of bf16 deltas


def _same_samples(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b with a's values at the positions a sampling fingerprint would read (first, thirds, middle, last)."""
    n = a.numel()
    out = b.clone().reshape(-1)
    for i in {0, n // 3, n // 2, (2 * n) // 3, n - 1}:
        out[i] = a.reshape(-1)[i]
    return out.reshape(a.shape)


def _checkpoints(seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    first = [(base.float() + 0.1 * torch.randn(SHAPE, generator=g)).bfloat16() for _ in range(3)]
    second = [_same_samples(x, (base.float() + 0.1 * torch.randn(SHAPE, generator=g)).bfloat16()) for x in first]
    return base, first, second


def _write(folder, tensor):
    folder.mkdir()
    save_file({"w": tensor.contiguous()}, str(folder / "model.safetensors"))
    return str(folder)


def _config(method, base, models):
    return {"merge_method": method, "base_model": base, "dtype": "float32", "out_dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": w, "density": d}}
                       for m, w, d in zip(models, WEIGHTS, DENSITIES)]}


def _read(folder):
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        return h.get_tensor("w")


def _check(out, xs, base, method):
    ref = ref_task_vectors(xs, base, WEIGHTS, DENSITIES, method, name="w").reshape(SHAPE)
    assert rel_err(out, ref) < 1e-6, f"{method}: result is not this merge's own"


@pytest.mark.parametrize("method", METHODS)
def test_two_run_merges_in_one_process(tmp_path, method):
    base, first, second = _checkpoints(1)
    b = _write(tmp_path / "base", base)
    for run, xs in (("a", first), ("b", second)):
        models = [_write(tmp_path / f"{run}{i}", x) for i, x in enumerate(xs)]
        run_merge(_config(method, b, models), tmp_path / f"out_{run}", quiet=True, device="cpu")
        _check(_read(tmp_path / f"out_{run}"), xs, base, method)


@pytest.mark.parametrize("residency", [None, "mmap"])
@pytest.mark.parametrize("method", METHODS)
def test_two_pools_one_after_another(method, residency):
    """The second pool reads the next checkpoints; with residency="mmap" it reads them in place from the
    caller's buffers, which the caller refilled (same addresses, same sampled values)."""
    base, first, second = _checkpoints(2)
    bufs = [torch.empty(SHAPE, dtype=torch.bfloat16) for _ in first]
    for xs in (first, second):
        for b, x in zip(bufs, xs):
            b.copy_(x)
        pool = CheckpointPool([{"w": b} for b in bufs], base={"w": base}, residency=residency)
        target = {"w": torch.empty(SHAPE)}
        pool.materialize(WEIGHTS, into=target, method=method, density=DENSITIES)
        _check(target["w"], xs, base, method)
        del pool


def test_the_ops_cache_nothing_by_default():
    base, first, second = _checkpoints(3)
    sp = [tvo.Sparsifier("magnitude", d) for d in DENSITIES]
    for xs in (first, second):
        x32 = [x.float() for x in xs]  # fresh buffers, same sizes: allocators hand back the same addresses
        out = tvo.task_vector_merge(x32, base.float(), torch.empty(SHAPE), sp, WEIGHTS, consensus=True,
                                    normalize=True, name="w")
        _check(out, xs, base, "ties")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_piece_at_an_offset_keeps_its_own_top_k_and_della_wants_the_whole_tensor(backend):
    """task_vector_merge(offset=...) on a piece (found by a review): the tie index of the magnitude boundary was
    local while the kernels compare global indices, so 20 equal |d| at density 0.5 kept none of them at offset
    10; DELLA's mask was drawn and read at different indices; an offset past the 32-bit draw counter wrapped."""
    x, base = torch.ones(20), torch.zeros(20)
    for sp in (tvo.Sparsifier("magnitude", density=0.5), tvo.Sparsifier("magnitude_outliers", density=0.5, gamma=0.1)):
        kept = []
        for offset in (0, 10, 12345):
            out = tvo.task_vector_merge([x], base, torch.empty(20), [sp], [1.0], consensus=False, normalize=False,
                                        offset=offset, backend=backend)
            kept.append(out.ne(0).nonzero().flatten().tolist())
        assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 10, kept  # ties broken by index, the same set
    with pytest.raises(ValueError, match="DELLA's mask ranks whole rows of the tensor"):
        tvo.task_vector_merge([x], base, torch.empty(20), [tvo.Sparsifier("della_magprune", density=0.5, epsilon=0.1)],
                              [1.0], consensus=False, normalize=False, offset=64, backend=backend)
    with pytest.raises(ValueError, match="the random draws index at most"):
        tvo.task_vector_merge([x], base, torch.empty(20), [tvo.Sparsifier("random", density=0.5)], [1.0],
                              consensus=False, normalize=False, offset=(1 << 34) - 10, backend=backend)


def test_selection_cache_lookups_do_not_race_another_threads_eviction():
    """The pool's methods path shares one SelectionCache between threads: one thread's LRU eviction could
    pop the key another had just found, before its move_to_end (KeyError; the same race PlanCache had).
    Made deterministic: thread A is held between its lookup and move_to_end while B evicts its key."""
    import threading
    from collections import OrderedDict
    from pymerge.ops.task_vector_ops import SelectionCache
    inside, proceed = threading.Event(), threading.Event()

    class Held(OrderedDict):
        def move_to_end(self, key, last=True):
            if threading.current_thread().name == "A":
                inside.set()
                proceed.wait(5)
            return super().move_to_end(key, last)
    cache = SelectionCache(max_entries=1)
    cache._data = Held()
    cache.put("a", (1,))
    errors = []

    def run(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the race's KeyError is what is tested
            errors.append(exc)
    ta = threading.Thread(target=run, args=(lambda: cache.get("a"),), name="A")
    ta.start()
    assert inside.wait(5)
    tb = threading.Thread(target=run, args=(lambda: cache.put("b", (2,)),), name="B")
    tb.start()
    tb.join(0.3)  # with the lock B waits for A; without it B evicts "a" now
    proceed.set()
    ta.join(5)
    tb.join(5)
    assert not errors and not ta.is_alive() and not tb.is_alive()


def test_a_pool_of_many_tensors_keeps_the_statistics_of_several_settings():
    """An LRU smaller than one cycle of a search never hits: 20,000 tensors x 2 checkpoints under two
    densities are 80,000 entries, and the pool's 65,536 recomputed every one on every call (4 s per call
    here; the sizing is checked instead of timing those misses)."""
    n = 20000
    g = torch.Generator().manual_seed(0)
    sources = [{f"t{i}": t for i, t in enumerate(torch.randn(n, 2, generator=g))} for _ in range(2)]
    pool = CheckpointPool(sources, base={f"t{i}": torch.zeros(2) for i in range(n)})
    assert pool._selection.max_entries >= 2 * n * 3
    small = CheckpointPool([{"w": torch.ones(3)}] * 2)
    assert small._selection.max_entries == 65536


def test_a_write_while_thresholds_are_computed_is_seen_next_call(monkeypatch):
    """Another thread's in-place write to a pool tensor while a TIES call computed its thresholds was recorded as
    seen (the versions were read after the work): every later call kept the old data's thresholds (43 of 60
    threaded trials differed from a fresh pool; an audit). The versions are read first now."""
    torch.manual_seed(0)
    names = ("a", "b")
    base = {n: torch.zeros(1000) for n in names}
    pool = CheckpointPool([{n: torch.randn(1000) for n in names} for _ in range(2)], base=base)
    target = {n: torch.empty(1000) for n in names}
    pool.materialize([0.5, 0.5], into=target, method="ties", density=0.2)
    real = tvo.plan_model

    def meanwhile(x, b, sp, w, i, *, name="", **kw):
        if name == "b" and i == 1:  # where the other thread's write lands: 'a' planned already
            with torch.no_grad():
                pool.tensor(0, "a").mul_(10)
        return real(x, b, sp, w, i, name=name, **kw)
    with torch.no_grad():
        pool.tensor(1, "b").add_(0)  # a change: the next call selects again
    monkeypatch.setattr(tvo, "plan_model", meanwhile)
    pool.materialize([0.5, 0.5], into=target, method="ties", density=0.2)
    monkeypatch.setattr(tvo, "plan_model", real)
    pool.materialize([0.5, 0.5], into=target, method="ties", density=0.2)  # nothing changes from here on
    now = [{n: pool.tensor(i, n).clone() for n in names} for i in range(2)]
    fresh = {n: torch.empty(1000) for n in names}
    CheckpointPool(now, base=base).materialize([0.5, 0.5], into=fresh, method="ties", density=0.2)
    assert all(torch.equal(target[n], fresh[n]) for n in names)


def _child_materializes(pool, queue):
    target = {"w": torch.empty(64)}
    pool.materialize([0.5, 0.5], into=target, method="ties", density=0.5)
    queue.put(float(target["w"].abs().sum()))


def test_a_child_forked_while_another_thread_held_the_pools_locks_can_use_the_pool():
    """A DataLoader worker forked while another thread planned a call inherited the pool's cache locks held,
    and waited for them forever (1 fork in ~100; an audit). A forked child renews them."""
    import multiprocessing
    pool = CheckpointPool([{"w": torch.randn(64)}, {"w": torch.randn(64)}], base={"w": torch.zeros(64)})
    expected = {"w": torch.empty(64)}
    pool.materialize([0.5, 0.5], into=expected, method="ties", density=0.5)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    locks = [pool._plan_cache._lock, pool._selection._lock]
    for lock in locks:  # as another thread of this process would hold them at the fork
        lock.acquire()
    try:
        child = ctx.Process(target=_child_materializes, args=(pool, queue))
        child.start()
    finally:
        for lock in locks:
            lock.release()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert got == float(expected["w"].abs().sum()) and child.exitcode == 0


def test_a_fork_from_code_run_under_the_pools_lock_leaves_the_child_holding_it():
    """A fork from a target's own code while the pool planned (under its lock): the child's renewed lock was
    free, and leaving the lock in the child raised "release unlocked lock" (a review). The forking thread held
    it: so does the child's."""
    import os
    from pymerge.pool import grouped
    cache = grouped.PlanCache()
    pid = None

    def build():  # the pool's planning, under the lock: a target's code forks here
        nonlocal pid
        pid = os.fork()
        return []

    def entry(make):
        return cache.entry(("k",), [], make, lambda plans: [], lambda plans: None)
    try:
        entry(build)
        if pid == 0:
            entry(lambda: [])  # free again, and usable (the key's entry is kept: planned once more or not)
            cache.clear()
            os._exit(0 if not cache._lock.locked() else 2)
    except BaseException:
        if pid == 0:
            os._exit(1)
        raise
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
