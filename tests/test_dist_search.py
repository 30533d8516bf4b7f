"""Distributed search on gloo (2 ranks): the same candidates and result as one process, and resume.

Layouts: FSDP2 over both ranks (one replica group: both ranks materialize and evaluate every
candidate), a (replicas=2, shards=1) mesh (two replica groups, each evaluating half of every
generation), and an unsharded pool (each rank a replica group). evaluate() gathers the full weights (a collective inside the replica group).
"""
import os

import numpy as np
import pytest
import torch

import dist_helpers
from test_dist_pool import build, write_checkpoints

SEARCH = dict(budget=9, popsize=4, seed=3, sigma0=0.3, method="ties", density=0.6, log=None)
TARGET_SEED = 11


def score(params, model):
    """Deterministic scores: closeness of the full weights to a fixed random model, and a forward pass."""
    g = torch.Generator().manual_seed(TARGET_SEED)
    total = 0.0
    for name in sorted(params):
        target = torch.randn(params[name].shape, generator=g, dtype=torch.float64)
        total -= float(((params[name].double() - target) ** 2).sum())
    with torch.no_grad():  # under FSDP2: all-gathers the shards inside the replica group
        out = model(torch.randn(3, 13, generator=g))
    return {"fit": total, "forward": float(out.double().sum())}


def single_process(files, **kw):
    import pymerge
    pool = pymerge.CheckpointPool(files[:3], base=files[3])
    model = build()
    return pymerge.search.optimize(pool, lambda m: score({n: p.detach() for n, p in m.named_parameters()}, m),
                                   model=model, **{**SEARCH, **kw})


def worker(rank, world, d, files):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import pymerge

    def evaluate(m):
        return score({n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in m.named_parameters()},
                     m)

    out = {}
    for label, shape in (("shards", (world,)), ("replicas", (world, 1))):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("shards",) if len(shape) == 1 else ("replicas", "shards"))
        model = build()
        fully_shard(model, mesh=mesh)
        pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=model)
        res = pymerge.search.optimize(pool, evaluate, model=model, **SEARCH)
        out[label] = [(r["x"], r["objective"], r["scores"]) for r in res.history], res.best_index
    # a pool every rank holds whole: every rank is a replica group of its own
    plain_model = build()
    plain = pymerge.CheckpointPool(files[:3], base=files[3])
    res = pymerge.search.optimize(plain, lambda m: score({n: p.detach() for n, p in m.named_parameters()}, m),
                                  model=plain_model, **SEARCH)
    out["plain"] = [(r["x"], r["objective"], r["scores"]) for r in res.history], res.best_index
    # resume: stop after one generation, then continue to the full budget
    state = os.path.join(d, "state.pkl") if rank == 0 else None
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    fully_shard(model, mesh=mesh)
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=model)
    pymerge.search.optimize(pool, evaluate, model=model, **{**SEARCH, "budget": 5}, state_path=state)
    res = pymerge.search.optimize(pool, evaluate, model=model, **SEARCH, state_path=state)
    out["resumed"] = [(r["x"], r["objective"], r["scores"]) for r in res.history], res.best_index
    # a state a single process saved resumes on the ranks (the pool's dtype and sample are compared only where
    # both recorded them: the leader's ranks hold shards; they refused each other's states for a while)
    state = os.path.join(d, "single.json") if rank == 0 else None
    res = pymerge.search.optimize(pool, evaluate, model=model, **SEARCH, state_path=state)
    out["single then ranks"] = [(r["x"], r["objective"], r["scores"]) for r in res.history], res.best_index
    try:  # an error in evaluate on one rank stops every rank with the same message
        def flaky(m):
            evaluate(m)
            if rank == world - 1:
                raise ValueError("evaluation failed here")
            return 1.0
        pymerge.search.optimize(pool, flaky, model=model, **SEARCH)
        out["error"] = None
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    calls = [0]

    def flaky_later(m):  # fails on one rank at a candidate inside a generation, after others succeeded
        calls[0] += 1
        scores = evaluate(m)
        if rank == world - 1 and calls[0] == 3:
            raise ValueError("evaluation failed later")
        return scores
    try:  # the other rank went on to the next candidate's collectives: a hang until the timeout
        pymerge.search.optimize(pool, flaky_later, model=model, **SEARCH)
        out["later_error"] = None
    except Exception as exc:
        out["later_error"] = f"{type(exc).__name__}: {exc}"

    def bad_input(m):  # the user's input error: the same one line on every rank
        evaluate(m)
        if rank == world - 1:
            raise pymerge.InputError("no such task 'qa'")
        return 1.0
    try:
        pymerge.search.optimize(pool, bad_input, model=model, **SEARCH)
        out["input_error"] = None
    except Exception as exc:
        out["input_error"] = f"{type(exc).__name__}: {exc}"
    def nearly(m):  # a GPU's nondeterministic reductions: the ranks' scores differ in the last bits
        scores = evaluate(m)
        return {**scores, "fit": scores["fit"] * (1 + 1e-9 * rank)}
    out["nearly"] = len(pymerge.search.optimize(pool, nearly, model=model, **SEARCH).history)

    def unreduced(m):  # a data-parallel metric not reduced across the group: each rank scored its own share
        scores = evaluate(m)
        return {**scores, "fit": scores["fit"] + rank}
    try:
        pymerge.search.optimize(pool, unreduced, model=model, **SEARCH)
        out["unreduced"] = None
    except Exception as exc:
        out["unreduced"] = f"{type(exc).__name__}: {exc}"
    try:  # a sharded pool merges with collectives: no search of one rank's own
        pymerge.search.optimize(pool, evaluate, model=model, distributed=False, **SEARCH)
        out["sharded_alone"] = None
    except Exception as exc:
        out["sharded_alone"] = f"{type(exc).__name__}: {exc}"
    if rank == 0:  # one rank's own search on a plain pool, the other rank elsewhere (it waited in the start's
        # agreement until the group's timeout)
        res = pymerge.search.optimize(plain, lambda m: score({n: p.detach() for n, p in m.named_parameters()}, m),
                                      model=build(), distributed=False, **SEARCH)
        out["alone"] = [(r["x"], r["objective"], r["scores"]) for r in res.history], res.best_index
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dsearch"))
    files = write_checkpoints(d)
    ref = single_process(files)
    single_process(files, budget=5, state_path=os.path.join(d, "single.json"))
    return [(r["x"], r["objective"], r["scores"]) for r in ref.history], ref.best_index, \
        dist_helpers.run(worker, 2, d, d, files)


@pytest.mark.parametrize("label", ["shards", "replicas", "plain", "resumed", "single then ranks"])
def test_distributed_search_equals_single_process(runs, label):
    ref_history, ref_best, results = runs
    assert len(ref_history) == SEARCH["budget"]
    for rank, res in enumerate(results):
        history, best = res[label]
        assert best == ref_best, (rank, label)
        assert len(history) == len(ref_history)
        for (x, obj, sc), (rx, robj, rsc) in zip(history, ref_history):
            assert np.array_equal(x, rx), (rank, label)  # the same candidates, in the same order
            assert obj == robj and sc == rsc, (rank, label)


def test_evaluate_error_stops_every_rank(runs):
    """The error itself where it was raised, a DistributedError naming it on the others: every rank raised an
    InputError, so a caller catching MemoryError (or torch's out-of-memory error) to back off caught nothing and
    the CLI took an evaluate's bug for bad input (a scale-out audit)."""
    assert [res["error"] for res in runs[2]] == ["DistributedError: rank 1: evaluation failed here (ValueError there)",
                                                 "ValueError: evaluation failed here"]
    assert [res["input_error"] for res in runs[2]] == ["InputError: rank 1: no such task 'qa'"] * 2


def test_evaluate_error_inside_a_generation_stops_every_rank(runs):
    assert [res["later_error"] for res in runs[2]] == [
        "DistributedError: rank 1: evaluation failed later (ValueError there)", "ValueError: evaluation failed later"]


def test_ranks_of_a_replica_group_returning_other_scores_stop_every_rank(runs):
    """Every rank of a replica group scores each of its candidates; the lowest rank's scores were taken silently,
    so a data-parallel evaluate that forgot to reduce its metric drove CMA-ES with rank 0's share (a scale-out
    audit). Scores within 1e-4 relative (a GPU's last bits) are the same scores."""
    assert [res["nearly"] for res in runs[2]] == [SEARCH["budget"]] * 2
    errors = [res["unreduced"] for res in runs[2]]
    assert errors[0] == errors[1] and errors[0].startswith(
        "InputError: evaluate returned different scores on ranks 0 and 1 of one replica group for candidate 0 ("), errors
    assert "reduce a metric computed on each rank's share of the data across the group" in errors[0]


def resume_worker(rank, world, d, files):
    """Resumes under a process group, plain pools (compress= allowed): states saved on another pool kind."""
    import pymerge

    def search(compress, budget, state):
        pool = pymerge.CheckpointPool(files[:3], base=files[3], compress=compress)
        res = pymerge.search.optimize(pool, lambda m: score({n: p.detach() for n, p in m.named_parameters()}, m),
                                      model=build(), **{**SEARCH, "budget": budget},
                                      state_path=state if rank == 0 else None)
        return len(res.history)

    out = {}
    for label, first, second in (("int4 then exact", "int4", None), ("exact then int4", None, "int4")):
        state = os.path.join(d, f"{label}.json")
        search(first, 5, state)
        try:
            out[label] = search(second, 9, state)
        except Exception as exc:
            out[label] = f"{type(exc).__name__}: {exc}"
        out[f"{label}, same kind"] = search(first, 9, state)
    try:  # a single process's exact state (its pool sample recorded), resumed by int4 ranks
        out["single then int4 ranks"] = search("int4", 9, os.path.join(d, "single_plain.json"))
    except Exception as exc:
        out["single then int4 ranks"] = f"{type(exc).__name__}: {exc}"
    out["single then exact ranks"] = search(None, 9, os.path.join(d, "single_plain.json"))
    # a resumed search's candidates are numbered on from the state's (an error named candidate 0 for the 6th)
    state = os.path.join(d, "numbered.json")
    search(None, 5, state)
    pool = pymerge.CheckpointPool(files[:3], base=files[3])
    try:
        pymerge.search.optimize(pool, lambda m: {"fit": "x"}, model=build(), **{**SEARCH, "budget": 9},
                                state_path=state if rank == 0 else None)
    except Exception as exc:
        out["numbered"] = f"{type(exc).__name__}: {exc}"
    return out


def test_resume_on_a_pool_compressed_otherwise_is_refused_on_every_rank(tmp_path):
    """The leader's stand-in pool did not say whether the real one was compressed: a state saved on an int4
    pool was resumed on an exact one (and the reverse), mixing the scores of two merges (a bug hunt). And a
    resumed search's errors name its candidates as one process does."""
    d = str(tmp_path)
    files = write_checkpoints(d)
    single_process(files, budget=5, state_path=os.path.join(d, "single_plain.json"))
    for rank, res in enumerate(dist_helpers.run(resume_worker, 2, d, d, files)):
        for label in ("int4 then exact", "exact then int4", "single then int4 ranks"):
            assert isinstance(res[label], str) and "differs in pool (compressed" in res[label], (rank, label)
            assert res[label].startswith("InputError: " + ("rank 0: " if rank else "")), (rank, res[label])
        for label in ("int4 then exact, same kind", "exact then int4, same kind", "single then exact ranks"):
            assert res[label] == 9, (rank, label)
        assert "evaluate returned 'x' for task 'fit' of candidate 5;" in res["numbered"], res["numbered"]


def arguments_worker(rank, world, d, files):
    """Rank 1 passes other arguments (or builds another pool) than rank 0, plain pools."""
    import pymerge

    def search(compress=None, **kw):
        pool = pymerge.CheckpointPool(files[:3], base=files[3], compress=compress)
        kw = {k: v for k, v in {**SEARCH, "budget": 5, **kw}.items() if v is not None}  # None: left out
        res = pymerge.search.optimize(pool, lambda m: score({n: p.detach() for n, p in m.named_parameters()}, m),
                                      model=build(), **kw)
        return [r["objective"] for r in res.history]

    def grouping(first):  # functions of one name (grouping.<locals>.rule) that group, or map, otherwise per rank
        def rule(name):
            return int(name.startswith("0.")) if first else int(not name.startswith("0."))
        return rule

    def naming(swap):
        def rule(name):
            return {"2.weight": "2.bias", "2.bias": "2.weight"}.get(name, name) if swap else name
        return rule

    out = {"errors": {}}
    for label, mine, ours in (("method", dict(method="linear"), {}), ("density", dict(density=0.3), {}),
                              ("budget", dict(budget=0), {}), ("seed", dict(seed=4), {}),
                              ("pool", dict(compress="int4"), {}),
                              ("groups", dict(groups=grouping(False)), dict(groups=grouping(True))),
                              ("names", dict(names=naming(True)), dict(names=naming(False))),
                              ("log", dict(log=5), {}), ("normalize", dict(normalize="yes"), {})):
        try:
            search(**(mine if rank == 1 else ours))
            out["errors"][label] = None
        except Exception as exc:
            out["errors"][label] = f"{type(exc).__name__}: {exc}"
    # alike: a parameter in method_params= or as a keyword, a numpy seed, the state file on rank 0 only
    out["alike"] = search(state_path=os.path.join(d, "alike.json")) if rank == 0 else search(
        density=None, method_params={"density": SEARCH["density"]}, seed=np.int64(SEARCH["seed"]))
    return out


def test_ranks_passing_other_arguments_fail_together(tmp_path):
    """Only a sharded pool compared the ranks' arguments: with plain pools a rank passing another method or
    parameters merged its share of the candidates with them, recorded as rank 0's, and a budget=0 was
    ignored (a bug hunt)."""
    d = str(tmp_path)
    files = write_checkpoints(d)
    results = dist_helpers.run(arguments_worker, 2, d, d, files)
    errors = dist_helpers.agreed_errors(results)
    for label in ("method", "density", "budget", "seed", "groups", "names"):
        assert errors[label].startswith("InputError: ranks called optimize with different arguments"), errors[label]
    assert errors["pool"].startswith("InputError: ranks called optimize with different pools"), errors["pool"]
    # refused by optimize's own checks on rank 1 alone: rank 0 waited in the start's agreement (an audit)
    assert errors["log"] == "InputError: rank 1: log must be a function, got 5", errors["log"]
    assert errors["normalize"].startswith("InputError: rank 1: normalize must be a bool"), errors["normalize"]
    expected = [r["objective"] for r in single_process(files, budget=5).history]
    assert results[0]["alike"] == results[1]["alike"] == expected


def one_rank_fails_between_collectives_worker(rank, world, d, files):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    model = build()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=model)
    calls = [0]

    def evaluate(m):  # rank 1 fails before its sharded forward (its all-gathers), on its second candidate
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise ValueError("boom")
        with torch.no_grad():
            return float(m(torch.ones(2, 13)).sum())
    try:
        pymerge.search.optimize(pool, evaluate, model=model, **SEARCH)
    except Exception as exc:
        message = (str(exc).splitlines() or [""])[0]  # (Python 3.10 also puts the notes in the message)
        return f"{type(exc).__name__}: {message}" + "".join(f" | {note}" for note in getattr(exc, "__notes__", []))
    return None


def test_an_evaluate_failing_on_one_rank_between_collectives_reports_its_own_error(tmp_path):
    """The other rank waits in the forward's all-gather until the process group's timeout (nothing can end a
    peer's collective); the failing rank's error was lost, replaced by gloo's timeout (a scale-out audit)."""
    from datetime import timedelta
    files = write_checkpoints(str(tmp_path))
    # 20 s: the other rank waits that long in its all-gather; 5 s also timed out a collective before the failure on
    # a loaded 2-core CI machine (the run then failed with gloo's timeout on both ranks)
    results = dist_helpers.run(one_rank_fails_between_collectives_worker, 2, str(tmp_path), str(tmp_path), files,
                               timeout=timedelta(seconds=20), wall_s=180)
    assert results[1].startswith("ValueError: boom | the other ranks never reached the agreement"), results[1]
    assert results[0] is not None, results  # the timeout, on the rank that waited


def test_a_rank_may_search_alone_on_a_plain_pool(runs):
    ref_history, ref_best, results = runs
    history, best = results[0]["alone"]
    assert best == ref_best and len(history) == len(ref_history)
    for (x, obj, sc), (rx, robj, rsc) in zip(history, ref_history):
        assert np.array_equal(x, rx) and obj == robj and sc == rsc
    for res in results:
        assert res["sharded_alone"].startswith("InputError: distributed=False: a sharded pool merges with "
                                               "collectives"), res["sharded_alone"]


def test_distributed_takes_a_bool_or_none():
    """0 == False but is not False: it ran the distributed search where False ran this rank's own (a review)."""
    from pymerge.dist.search import across_ranks
    from pymerge.errors import InputError
    for bad in (0, 1, np.False_, "no"):
        with pytest.raises(InputError, match="distributed must be True, False or None"):
            across_ranks(object(), bad)
    assert across_ranks(object(), False) is None and across_ranks(object(), None) is None  # no process group here
    with pytest.raises(InputError, match="distributed=True needs an initialized"):
        across_ranks(object(), True)
