"""Merge search: known optimum, resume == uninterrupted, Pareto front, reports, the CLI."""
import contextlib
import errno
import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pymerge.errors import MAX_ERROR_CHARS, InputError
from pymerge.pool import CheckpointPool
from pymerge.search import cli_main, optimize
from pymerge.search.report import pareto_front

optimize_module = importlib.import_module("pymerge.search.optimize")  # the package names the function alike
search_cli = importlib.import_module("pymerge.search.cli")


class Vec(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(d))


def synthetic(n=4, d=64, seed=0):
    """A pool whose best weights are known: score = -||theta - sum_i w*_i theta_i||^2, w* on the simplex."""
    g = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(d, generator=g) for _ in range(n)]
    w_star = np.array([0.45, 0.05, 0.3, 0.2][:n])
    w_star = w_star / w_star.sum()
    target = sum(float(w) * t for w, t in zip(w_star, thetas))
    pool = CheckpointPool([{"theta": t} for t in thetas])

    def evaluate(model):
        return -float(((model.theta.detach() - target) ** 2).sum())
    return pool, evaluate, w_star


def test_reaches_the_known_optimum():
    pool, evaluate, w_star = synthetic()
    res = optimize(pool, evaluate, model=Vec(), budget=400, seed=0, log=None)
    assert len(res.history) == 400
    assert res.best_objective > -1e-3
    np.testing.assert_allclose(res.best_weights, w_star, atol=0.02)
    assert res.history[0]["weights"] == pytest.approx([0.25] * 4)  # candidate 0: the uniform merge


def test_an_all_zero_candidate_merges_uniformly():
    """With normalize, a candidate whose weights are all 0 (x0, or clipped to the lower bound 0) is the uniform
    merge, not 0/0 (a mutation audit: the fallback was unpinned)."""
    pool, evaluate, _ = synthetic(n=3, d=8)
    result = optimize(pool, evaluate, model=Vec(8), budget=3, popsize=2, x0=[0, 0, 0], log=None)
    assert result.history[0]["x"] == [0.0, 0.0, 0.0] and result.history[0]["weights"] == [1 / 3] * 3
    model = Vec(8)
    pool.materialize([1 / 3] * 3, into=model)
    assert result.history[0]["objective"] == evaluate(model)


def test_the_pool_holds_no_replica_after_the_search():
    """optimize fills deep copies of the model (replicas); the pool's plan cache kept them alive after it
    returned (every copy, until the pool itself was dropped). They are freed with the search now, and
    their plans dropped even where evaluate kept a copy."""
    import gc
    import weakref
    pool, evaluate, _ = synthetic()
    model, seen, kept = Vec(), weakref.WeakSet(), []
    given = set()

    def weakly(m):
        seen.add(m)
        given.add(id(m))
        return evaluate(m)
    optimize(pool, weakly, model=model, budget=14, popsize=7, log=None)
    gc.collect()
    assert len(given) == 7 and [m for m in seen if m is not model] == []

    def strongly(m):
        kept.append(m)
        return evaluate(m)
    optimize(pool, strongly, model=model, budget=14, popsize=7, log=None)
    replicas = {id(m) for m in kept if m is not model}
    assert len(replicas) == 6
    assert not [key for key in pool._plan_cache._entries if replicas.intersection(key[0])]


def _two_group_pool():
    """Three checkpoints of a model with an embedding group and one layer group, and a live model."""
    g = torch.Generator().manual_seed(1)
    sources = [{"embed.w": torch.randn(8, generator=g), "layers.0.w": torch.randn(8, generator=g)} for _ in range(3)]
    model = torch.nn.Module()
    model.embed = torch.nn.Module()
    model.embed.w = torch.nn.Parameter(torch.zeros(8))
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].w = torch.nn.Parameter(torch.zeros(8))
    return sources, CheckpointPool(sources), model


def test_per_group_search_has_a_weight_row_per_group():
    sources, pool, model = _two_group_pool()
    # best: embed from checkpoint 0, layer 0 from checkpoint 2
    goal = {"embed.w": sources[0]["embed.w"], "layers.0.w": sources[2]["layers.0.w"]}

    def evaluate(m):
        return -sum(float(((dict(m.named_parameters())[k].detach() - v) ** 2).sum()) for k, v in goal.items())
    res = optimize(pool, evaluate, model=model, budget=300, groups="layer", seed=3, log=None)
    assert res.best_weights.shape == (2, 3)
    assert res.best_weights[0, 0] > 0.9 and res.best_weights[1, 2] > 0.9


def _interrupting(evaluate, after):
    calls = {"n": 0}

    def wrapped(model):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt("simulated crash")
        return evaluate(model)
    return wrapped


def test_resume_equals_uninterrupted_run(tmp_path):
    """An interrupt writes the candidates evaluated since the last write (it lost up to 30 s of them, a whole run
    of a fast evaluate here), mid-generation too: resumes replay them and end as one uninterrupted run."""
    pool, evaluate, _ = synthetic()
    full = optimize(pool, evaluate, model=Vec(), budget=60, popsize=8, seed=7, log=None)
    path = str(tmp_path / "state.json")
    kept = []
    for after in (5, 13, 30):  # crash mid-generation, three times
        with pytest.raises(KeyboardInterrupt):
            optimize(pool, _interrupting(evaluate, after), model=Vec(), budget=60, popsize=8, seed=7,
                     state_path=path, log=None)
        kept.append(len(json.loads(open(path).read())["history"]))
    assert kept == [5, 18, 48]  # every candidate evaluated (popsize 8: generations cut at 4, 1 and 7)
    resumed = optimize(pool, evaluate, model=Vec(), budget=60, popsize=8, seed=7, state_path=path, log=None)
    assert [r["weights"] for r in resumed.history] == [r["weights"] for r in full.history]
    assert [r["objective"] for r in resumed.history] == [r["objective"] for r in full.history]
    np.testing.assert_array_equal(resumed.best_weights, full.best_weights)
    # a finished state returns at once, without evaluating
    again = optimize(pool, _interrupting(evaluate, 0), model=Vec(), budget=60, popsize=8, seed=7,
                     state_path=path, log=None)
    assert again.best_objective == full.best_objective
    with pytest.raises(InputError, match="differs in seed"):
        optimize(pool, evaluate, model=Vec(), budget=60, popsize=8, seed=8, state_path=path, log=None)


@pytest.mark.parametrize("first", [12, 17, 1])
def test_larger_budget_finishes_the_generation_a_budget_cut(tmp_path, first):
    """A budget ending mid-generation (1 + 8 + 3 = 12 evaluations) and then a larger one: the second run
    finishes the cut generation before asking a new one, so both runs equal one uninterrupted run."""
    pool, evaluate, _ = synthetic()
    full = optimize(pool, evaluate, model=Vec(), budget=40, popsize=8, seed=7, log=None)
    path = str(tmp_path / "state.json")
    part = optimize(pool, evaluate, model=Vec(), budget=first, popsize=8, seed=7, state_path=path, log=None)
    assert len(part.history) == first
    more = optimize(pool, evaluate, model=Vec(), budget=40, popsize=8, seed=7, state_path=path, log=None)
    assert [r["x"] for r in more.history] == [r["x"] for r in full.history]
    assert [r["generation"] for r in more.history] == [r["generation"] for r in full.history]
    assert more.generations == full.generations


def test_global_numpy_rng_does_not_change_the_search():
    pool, evaluate, _ = synthetic()

    def noisy_user(model):  # an evaluate that draws from numpy's global RNG
        np.random.rand(3)
        return evaluate(model)
    a = optimize(pool, evaluate, model=Vec(), budget=30, seed=2, log=None)
    b = optimize(pool, noisy_user, model=Vec(), budget=30, seed=2, log=None)
    assert [r["weights"] for r in a.history] == [r["weights"] for r in b.history]


def test_pareto_front_on_a_hand_made_case():
    pts = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.5), (0.6, 0.45), (0.2, 0.2), (0.9, 0.05)]
    # (0.4,0.4) < (0.5,0.5); the second (0.5,0.5) is a duplicate; (0.2,0.2) dominated; (0.9,0.05) < (0.9,0.1)
    assert pareto_front(pts) == [0, 1, 3, 5]
    assert pareto_front([(1.0,)]) == [0]
    assert pareto_front([(float("nan"), 1.0), (0.0, 0.0)]) == [1]
    assert pareto_front([(float("inf"), float("inf")), (0.0, 0.0), (-float("inf"), 2.0)]) == [1]  # failed runs


def test_dict_scores_macro_average_replicas_and_reports(tmp_path):
    pool, evaluate, _ = synthetic(n=3)
    seen = []

    def two_tasks(model):
        seen.append(id(model))
        t = model.theta.detach()
        return {"a": -float((t[:32] ** 2).sum()), "b": -float(((t[32:] - 1) ** 2).sum())}
    lines = []
    res = optimize(pool, two_tasks, model=Vec(), budget=25, popsize=6, replicas=3, seed=0, log=lines.append)
    assert len(set(seen)) == 3  # the population went into three model copies, via materialize_many
    assert res.tasks == ["a", "b"]
    for r in res.history:
        assert r["objective"] == pytest.approx((r["scores"]["a"] + r["scores"]["b"]) / 2)
    front = {tuple(res.history[i]["scores"].values()) for i in res.pareto}
    for r in res.history:  # nothing outside the front dominates a front member
        s = tuple(r["scores"].values())
        assert not any(s[0] >= f[0] and s[1] >= f[1] and s != f for f in front)
    assert lines and "materialize" in lines[0] and "evaluate" in lines[0]
    paths = res.save(str(tmp_path / "out"))
    data = json.load(open(paths["json"]))
    assert data["best"]["objective"] == res.best_objective and len(data["history"]) == 25
    assert open(paths["csv"]).readline().startswith("eval,generation,objective,task:a,task:b")
    assert os.path.getsize(paths["png"]) > 1000


def test_a_save_that_fails_out_of_descriptors_leaves_no_hidden_folder(tmp_path, monkeypatch):
    """Out of descriptors (ulimit -n), the write failed and so did the removal of the hidden folder it was staged in,
    silently (rmtree needs two descriptors): the folder and the files already written stayed in out (an audit). The
    lock's descriptor is given up and the staged files go by name (reviews: one descriptor was not enough)."""
    pool, _, _ = synthetic(n=3)
    res = optimize(pool, lambda m: -float(m.theta.detach().norm()), model=Vec(), budget=3, popsize=3, log=None)
    calls = []

    def rmtree_out_of_descriptors(path, *a, **k):
        calls.append(path)  # fails as it would with fewer than two descriptors left (ignore_errors: silently)

    def emfile(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(optimize_module.shutil, "rmtree", rmtree_out_of_descriptors)
    monkeypatch.setattr(optimize_module, "write_csv", emfile)
    with pytest.raises(OSError, match="Too many open files"):
        res.save(str(tmp_path / "out"))
    assert len(calls) == 1 and os.listdir(tmp_path / "out") == []


def test_a_ctrl_c_as_a_save_makes_its_hidden_folder_leaves_none(tmp_path, monkeypatch, ctrl_c):
    """A SIGINT just as SearchResult.save's hidden folder was made (before the try that removes it) left the folder
    in out (an audit's Ctrl-C storm). It waits until the folder is known; the cleanup then removes it."""
    import tempfile
    pool, _, _ = synthetic(n=3)
    res = optimize(pool, lambda m: -float(m.theta.detach().norm()), model=Vec(), budget=3, popsize=3, log=None)
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kw):
        made = real_mkdtemp(*args, **kw)
        ctrl_c()
        time.sleep(0.01)  # (delivered here, between bytecodes, where nothing holds it)
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(KeyboardInterrupt):
        res.save(str(tmp_path / "out"))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "out") == []
    assert sorted(os.listdir(res.save(str(tmp_path / "out"))["json"].rsplit(os.sep, 1)[0])) == \
        ["history.csv", "history.json", "search.png"]


@pytest.mark.parametrize("suffix", [".probe", ".lock"])
def test_a_ctrl_c_as_the_state_is_probed_or_locked_leaves_nothing(tmp_path, monkeypatch, ctrl_c, suffix):
    """A SIGINT inside the state folder's write probe left state.json.XXXX.probe there for good, its descriptor
    open; one as the state's lock file was opened leaked the descriptor (an audit's Ctrl-C storm)."""
    pool, _, _ = synthetic(n=3)
    real_open = os.open

    def opened(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith(suffix):
            ctrl_c()
            time.sleep(0.01)
        return fd

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "open", opened)
    with pytest.raises(KeyboardInterrupt):
        optimize(pool, lambda m: -float(m.theta.detach().norm()), model=Vec(), budget=3, popsize=3, log=None,
                 state_path=str(tmp_path / "state.json"))
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".probe")]


def test_cli_runs_a_config(tmp_path):
    cfg = _cli_setup(tmp_path, state_path="state.json")
    assert cli_main([str(cfg)]) == 0
    assert (tmp_path / "out" / "history.json").exists() and (tmp_path / "out" / "best_merge.yml").exists()
    assert (tmp_path / "state.json").exists()
    bad = tmp_path / "bad.yml"
    bad.write_text("sources: []\nmodel: nope:build\nevaluate: evalmod:evaluate\n")
    assert cli_main([str(bad)]) == 2


@pytest.mark.parametrize("state", ["c1.safetensors", "s.yml", "base.safetensors", "models/state.json"])
def test_cli_refuses_a_state_path_that_is_an_input(tmp_path, capsys, state):
    """A state_path naming a source or the config was read as a broken state, and the error advised deleting it
    (an audit). Nothing is written or changed."""
    (tmp_path / "models").mkdir()
    extra = {"base": "base.safetensors"} if state == "base.safetensors" else {}
    if state.startswith("models/"):
        save_file({"theta": torch.zeros(16)}, str(tmp_path / "models" / "model.safetensors"))
        extra = {"base": "models"}
    cfg = _cli_setup(tmp_path, state_path=state, **extra)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"state_path {tmp_path / state}: is an input of the search" in err[0], err
    assert "delete" not in err[0] and {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "out").exists()


def test_method_params_reach_the_method_and_the_state_fingerprint(tmp_path):
    """A method's own `normalize` (or any name optimize takes itself) was out of reach: the search CLI's
    method_params: {normalize: true} crashed on a duplicate keyword. Now method_params= carries them to
    the pool, and a saved state refuses to resume under other method parameters."""
    g = torch.Generator().manual_seed(0)
    base = {"theta": torch.randn(16, generator=g)}
    sources = [{"theta": torch.randn(16, generator=g)} for _ in range(3)]
    pool = CheckpointPool(sources, base=base)
    seen = []

    def evaluate(model):
        seen.append(model.theta.detach().clone())
        return -float(model.theta.detach().norm())
    state = str(tmp_path / "s.json")
    res = optimize(pool, evaluate, model=Vec(16), budget=6, popsize=3, seed=0, state_path=state, log=None,
                   method="task_arithmetic", method_params={"normalize": False}, **{"lambda": 2.0})
    for r, theta in zip(res.history, seen):  # weights sum to one, so normalize only changes lambda's scale here
        delta = sum(w * (s["theta"] - base["theta"]) for w, s in zip(r["weights"], sources))
        torch.testing.assert_close(theta, base["theta"] + 2.0 * delta, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"differs in method_params"):
        optimize(pool, evaluate, model=Vec(16), budget=6, popsize=3, seed=0, state_path=state, log=None,
                 method="task_arithmetic", method_params={"normalize": True}, **{"lambda": 2.0})
    bare = str(tmp_path / "bare.json")  # saved with no method parameters: a resume may not add some
    optimize(pool, evaluate, model=Vec(16), budget=3, popsize=3, state_path=bare, log=None, method="ties")
    with pytest.raises(InputError, match=r"differs in method_params"):
        optimize(pool, evaluate, model=Vec(16), budget=6, popsize=3, state_path=bare, log=None, method="ties",
                 density=0.2)
    state = json.load(open(bare))  # as the states written before the fingerprint always held the key
    del state["fingerprint"]["method_params"]
    state["digest"] = optimize_module._digest({k: v for k, v in state.items() if k != "digest"})
    json.dump(state, open(bare, "w"))
    with pytest.raises(InputError, match=r"differs in method_params"):
        optimize(pool, evaluate, model=Vec(16), budget=6, popsize=3, state_path=bare, log=None, method="ties",
                 density=0.2)
    assert len(optimize(pool, evaluate, model=Vec(16), budget=6, popsize=3, state_path=bare, log=None,
                        method="ties").history) == 6
    with pytest.raises(InputError, match="method parameter 'lambda' is given twice"):
        optimize(pool, evaluate, model=Vec(16), budget=6, log=None, method="task_arithmetic",
                 method_params={"lambda": 1.0}, **{"lambda": 2.0})

    cli = tmp_path / "cli"  # the search CLI's method_params: reach TIES' own normalize too
    cli.mkdir()
    cfg = _cli_setup(cli, base="base.safetensors", method="ties", method_params={"normalize": False, "density": 0.5})
    assert cli_main([str(cfg)]) == 0


# ---- the state file is JSON, checked on load (issue 8, item 9) ----------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a crafted pickle does on load: call anything with any arguments
        return (open, (self.marker, "w"))


def _state(tmp_path, budget=20, evaluate=None):
    pool, ev, _ = synthetic(n=3)
    path = tmp_path / "state.json"
    optimize(pool, evaluate or ev, model=Vec(), budget=budget, popsize=6, seed=4, state_path=str(path), log=None)
    return pool, ev, path


def test_state_is_json_and_a_pickle_is_never_loaded(tmp_path):
    import pickle
    pool, evaluate, path = _state(tmp_path)
    state = json.loads(path.read_text())
    assert state["version"] == 2 and len(state["history"]) == 20 and state["generation"] == 4
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"version": 1, "x": _Exploit(str(marker))}))
    # (not "delete the file": a state_path may name the user's own pickle, a torch.save checkpoint; an audit)
    with pytest.raises(InputError, match="state.json: cannot read it as a search state: not JSON but a pickle .*; "
                                         "choose another state_path, or delete it if it is an old search state$"):
        optimize(pool, evaluate, model=Vec(), budget=20, popsize=6, seed=4, state_path=str(path), log=None)
    assert not marker.exists()


def _edit(state, how):
    if how == "not an object":
        return [state]
    h = state["history"]
    edits = {
        "version": lambda: state.update(version=1),
        "extra key": lambda: state.update(es="x"),
        "generation type": lambda: state.update(generation="4"),
        "generation bool": lambda: state.update(x0_done=1),
        "history type": lambda: state.update(history={}),
        "entry keys": lambda: h[3].pop("x"),
        "eval order": lambda: h[3].update(eval=7),
        "generation order": lambda: h[3].update(generation=9),
        "x shape": lambda: h[3].update(x=h[3]["x"][:2]),
        "x nan": lambda: h[3]["x"].__setitem__(0, float("nan")),
        "x string": lambda: h[3]["x"].__setitem__(0, "0.5"),
        "x bool": lambda: h[3]["x"].__setitem__(0, True),
        "weights ragged": lambda: h[3].update(weights=[[0.1], 0.2, 0.3]),
        "timing inf": lambda: h[3].update(evaluate_s=float("inf")),
        "scores empty": lambda: h[3].update(scores={}),
        "objective type": lambda: h[3].update(objective=None),
        "edited candidate": lambda: h[8]["x"].__setitem__(1, h[8]["x"][1] + 0.01),
        "edited weights": lambda: h[8]["weights"].__setitem__(1, 0.9),
        "partial middle": lambda: state.update(history=[dict(r, eval=i) for i, r in enumerate(h[:9] + h[13:])]),
    }
    edits[how]()
    return state


@pytest.mark.parametrize("how", ["not an object", "version", "extra key", "generation type", "generation bool",
                                 "history type", "entry keys", "eval order", "generation order", "x shape", "x nan",
                                 "x string", "x bool", "weights ragged", "timing inf", "scores empty",
                                 "objective type", "edited candidate", "edited weights", "partial middle"])
def test_a_corrupt_or_crafted_state_is_an_input_error(tmp_path, how):
    pool, evaluate, path = _state(tmp_path)
    state = _edit(json.loads(path.read_text()), how)
    path.write_text(json.dumps(state))
    with pytest.raises(InputError, match="state.json"):
        optimize(pool, evaluate, model=Vec(), budget=30, popsize=6, seed=4, state_path=str(path), log=None)


@pytest.mark.parametrize("text", ["", "{", "[" * 100000 + "]" * 100000, "\xff\xfe", "NaN"])
def test_unreadable_state_files(tmp_path, text):
    pool, evaluate, _ = synthetic(n=3)
    path = tmp_path / "state.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match="state.json"):
        optimize(pool, evaluate, model=Vec(), budget=10, popsize=6, seed=4, state_path=str(path), log=None)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_state_path_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    """Was: a FIFO blocked the search forever, /dev/zero read until memory ran out."""
    pool, evaluate, _ = synthetic(n=3)
    path = tmp_path / "state.fifo" if kind == "fifo" else kind
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(InputError, match=f"{path}: is a (FIFO|character device), not a regular file"):
        optimize(pool, evaluate, model=Vec(), budget=10, popsize=6, seed=4, state_path=str(path), log=None)


@pytest.mark.parametrize("where", ["missing", "existing"])
def test_a_state_path_ending_in_a_separator_is_refused_in_one_line(tmp_path, where):
    """Was: "<path>/.lock: cannot open it to lock it" (missing folder), a message about a file never named."""
    pool, evaluate, _ = synthetic(n=3)
    path = str(tmp_path / "state") + "/"
    if where == "existing":
        os.mkdir(path)
    with pytest.raises(InputError, match=f"^{re.escape(path)}: ends in '/', a folder's name; name a file$"):
        optimize(pool, evaluate, model=Vec(), budget=10, popsize=6, seed=4, state_path=path, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["state"] if where == "existing" else [])


def test_resume_with_nan_scores_and_groups(tmp_path, monkeypatch):
    """NaN objectives round-trip through the JSON state; a per-group search resumes exactly too."""
    monkeypatch.setattr(optimize_module, "_SAVE_EVERY_S", 0.0)  # every generation saved: the crash keeps some
    monkeypatch.setattr(optimize_module, "_SAVE_SHARE", float("inf"))
    sources, pool, model = _two_group_pool()
    calls = {"n": 0}

    def evaluate(m):
        calls["n"] += 1
        v = -float((m.embed.w.detach() - sources[1]["embed.w"]).pow(2).sum())
        return {"a": float("nan") if calls["n"] % 5 == 0 else v, "b": v}
    full = optimize(pool, evaluate, model=model, budget=40, popsize=6, groups="layer", seed=2, log=None)
    calls["n"] = 0
    path = str(tmp_path / "s.json")
    with pytest.raises(KeyboardInterrupt):
        optimize(pool, _interrupting(evaluate, 22), model=model, budget=40, popsize=6, groups="layer", seed=2,
                 state_path=path, log=None)
    saved = json.loads(open(path).read())["history"]
    assert len(saved) > 6 and any(math.isnan(r["scores"]["a"]) for r in saved)
    calls["n"] = len(saved)  # the evaluations saved, as if never interrupted
    resumed = optimize(pool, evaluate, model=model, budget=40, popsize=6, groups="layer", seed=2, state_path=path,
                       log=None)
    assert [r["x"] for r in resumed.history] == [r["x"] for r in full.history]
    assert str([r["scores"] for r in resumed.history]) == str([r["scores"] for r in full.history])


def test_a_resume_with_a_groups_or_names_function_that_maps_otherwise_is_refused(tmp_path):
    """A function was recorded by its name only: every lambda is "<lambda>", so a resume whose groups= swapped
    the rows (or names= the targets) was accepted, the saved best's score from another merge (an audit). What
    the function does to the pool's tensors is compared; another function object doing the same resumes."""
    sources, pool, model = _two_group_pool()
    evaluate = lambda m: -float((m.embed.w.detach() - sources[1]["embed.w"]).pow(2).sum())  # noqa: E731
    path = str(tmp_path / "s.json")
    run = dict(model=model, popsize=4, seed=1, state_path=path, log=None)
    optimize(pool, evaluate, budget=5, groups=lambda n: 0 if n.startswith("embed") else 1, **run)
    with pytest.raises(InputError, match=r"differs in pool \(group_of\)\); use another"):
        optimize(pool, evaluate, budget=9, groups=lambda n: 1 if n.startswith("embed") else 0, **run)
    res = optimize(pool, evaluate, budget=9, groups=lambda name: 1 - name.startswith("embed"), **run)  # the same map
    assert len(res.history) == 9
    path = str(tmp_path / "n.json")
    run["state_path"] = path
    optimize(pool, evaluate, budget=5, names=lambda n: n, **run)
    swap = {"embed.w": "layers.0.w", "layers.0.w": "embed.w"}
    with pytest.raises(InputError, match=r"differs in pool \(target_of\)\); use another"):
        optimize(pool, evaluate, budget=9, names=lambda n: swap[n], **run)
    assert len(optimize(pool, evaluate, budget=9, names=lambda name: str(name), **run).history) == 9
    # by tensor name, not the pool's order (the first checkpoint's, or rank 0's): the same checkpoints saved in
    # another tensor order are the same search (a review)
    reordered = CheckpointPool([dict(reversed(list(sd.items()))) for sd in sources])
    assert reordered.names == pool.names[::-1]
    run["state_path"] = str(tmp_path / "s.json")
    assert len(optimize(reordered, evaluate, budget=11, groups=lambda n: 1 - n.startswith("embed"), **run).history) == 11


def test_a_state_path_whose_folder_cannot_be_made_is_named(tmp_path, monkeypatch):
    """A new folder in a read-only one: its error was swallowed and the lock file's reported ("state.json.lock:
    cannot open it to lock it: No such file or directory", a file the user never named; an audit). (Root
    ignores permissions: the refusal is simulated.)"""
    sources, pool, model = _two_group_pool()
    (tmp_path / "ro").mkdir()
    path = str(tmp_path / "ro" / "sub" / "state.json")

    def read_only(name, mode=0o777, exist_ok=False):
        raise PermissionError(13, "Permission denied", name)
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(InputError, match=r"state.json: cannot create its folder .*/ro/sub: Permission denied; "
                                         r"choose another state_path$"):
        optimize(pool, lambda m: 0.0, model=model, budget=3, popsize=2, state_path=path, log=None)


def test_a_state_from_other_checkpoints_is_refused(tmp_path):
    """Resumed with the sources reordered, the saved weights were paired with other checkpoints: the
    history's best was not the merge best_merge.yml then built. A path spelled with "./" is the same; a
    compressed pool saved and loaded again (labels as written, no base label) resumes its search."""
    g = torch.Generator().manual_seed(3)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({"theta": torch.randn(16, generator=g)}, files[-1])
    state = str(tmp_path / "s.json")
    evaluate = lambda m: -float(m.theta.detach().norm())  # noqa: E731
    optimize(CheckpointPool(files), evaluate, model=Vec(16), budget=4, popsize=3, state_path=state, log=None)
    with pytest.raises(InputError, match=r"differs in pool \(sample, sources, spread\)\) \(sources are compared by their paths"):
        optimize(CheckpointPool(files[::-1]), evaluate, model=Vec(16), budget=6, popsize=3, state_path=state, log=None)
    with pytest.raises(InputError, match=r"differs in pool \(groups\)\); use another"):
        optimize(CheckpointPool(files), evaluate, model=Vec(16), budget=6, popsize=3, state_path=state, log=None,
                 groups="layer")
    other_spelling = [os.path.join(os.path.dirname(f), ".", os.path.basename(f)) for f in files]
    res = optimize(CheckpointPool(other_spelling), evaluate, model=Vec(16), budget=6, popsize=3, state_path=state,
                   log=None)
    assert len(res.history) == 6
    packed = CheckpointPool(files, base=files[0], compress="int8", dtype=torch.bfloat16)  # load() forgets dtype=
    cstate = str(tmp_path / "c.json")
    optimize(packed, evaluate, model=Vec(16), budget=4, popsize=3, state_path=cstate, log=None)
    packed.save(str(tmp_path / "pool.safetensors"))
    loaded = CheckpointPool.load(str(tmp_path / "pool.safetensors"))
    assert len(optimize(loaded, evaluate, model=Vec(16), budget=6, popsize=3, state_path=cstate,
                        log=None).history) == 6
    # a state written before the fingerprint held the pool (or the model, the objective, the method's parameters)
    # resumed unchecked, here on the sources reordered, and was saved back so (an audit): refused
    for key in ("pool", "model", "objective", "method_params"):
        saved = json.load(open(state))
        del saved["fingerprint"][key]
        saved.pop("digest")
        json.dump(saved, open(tmp_path / "old.json", "w"))
        with pytest.raises(InputError, match=rf"old.json: saved search state was written by an older pymerge, "
                                             rf"which did not record the {key} it searched"):
            optimize(CheckpointPool(files[::-1]), evaluate, model=Vec(16), budget=7, popsize=3,
                     state_path=str(tmp_path / "old.json"), log=None)


def test_a_state_resumes_with_its_sources_named_through_a_symlink_or_its_target(tmp_path):
    """Sources are compared by their paths; two spellings of one file (a symlinked folder and its target) are the
    same search. pymerge search resolves a config's folder with realpath since 2026-12-07 (abspath before), so a
    search started through a symlinked folder was refused on resume after the upgrade, as if the project had moved
    (an audit). Another file under a name that was a source's stays refused."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    g = torch.Generator().manual_seed(4)
    for i in range(3):
        save_file({"theta": torch.randn(16, generator=g)}, str(real / f"c{i}.safetensors"))
    through_link = [str(tmp_path / "link" / f"c{i}.safetensors") for i in range(3)]
    resolved = [str(real / f"c{i}.safetensors") for i in range(3)]
    state = str(tmp_path / "s.json")
    evaluate = lambda m: -float(m.theta.detach().norm())  # noqa: E731
    first = optimize(CheckpointPool(through_link), evaluate, model=Vec(16), budget=4, popsize=3, state_path=state,
                     log=None)
    res = optimize(CheckpointPool(resolved), evaluate, model=Vec(16), budget=6, popsize=3, state_path=state, log=None)
    assert len(res.history) == 6 and res.history[:4] == first.history
    assert json.loads(open(state).read())["fingerprint"]["pool"]["sources"] == resolved  # kept as now spelled
    assert len(optimize(CheckpointPool(through_link), evaluate, model=Vec(16), budget=7, popsize=3,
                        state_path=state, log=None).history) == 7
    assert len(optimize(CheckpointPool(resolved), evaluate, model=Vec(16), budget=8, popsize=3, state_path=state,
                        log=None).history) == 8
    (tmp_path / "link").unlink()  # the link it was first saved through gone: it resumes as last saved, through another
    os.symlink(real, tmp_path / "link2", target_is_directory=True)
    assert len(optimize(CheckpointPool([p.replace("link", "link2") for p in through_link]), evaluate, model=Vec(16),
                        budget=9, popsize=3, state_path=state, log=None).history) == 9
    swapped = [resolved[0], resolved[2], resolved[1]]  # c1 and c2 exchanged: other files under the saved names
    with pytest.raises(InputError, match=r"differs in pool \(sample, sources, spread\)"):
        optimize(CheckpointPool(swapped), evaluate, model=Vec(16), budget=8, popsize=3, state_path=state, log=None)


def test_a_state_from_reordered_in_memory_sources_or_another_dtype_is_refused(tmp_path):
    """In-memory sources are labelled by position only: [A, B, C] resumed as [C, B, A], or with dtype= added,
    was accepted and the saved weights paired with other checkpoints (a bug hunt). A state written before
    the fingerprint held the pool's dtype and a sample of its contents still resumes."""
    g = torch.Generator().manual_seed(5)
    sources = [{"theta": torch.randn(16, generator=g)} for _ in range(3)]
    state = str(tmp_path / "s.json")
    evaluate = lambda m: -float(m.theta.detach().norm())  # noqa: E731
    optimize(CheckpointPool(sources), evaluate, model=Vec(16), budget=4, popsize=3, state_path=state, log=None)
    for pool in (CheckpointPool(sources[::-1]), CheckpointPool(sources, dtype=torch.bfloat16)):
        with pytest.raises(InputError, match=r"differs in pool"):
            optimize(pool, evaluate, model=Vec(16), budget=6, popsize=3, state_path=state, log=None)
    assert len(optimize(CheckpointPool(sources), evaluate, model=Vec(16), budget=6, popsize=3, state_path=state,
                        log=None).history) == 6
    saved = json.load(open(state))
    del saved["fingerprint"]["pool"]["dtype"], saved["fingerprint"]["pool"]["sample"]
    del saved["fingerprint"]["pool"]["spread"]
    saved["digest"] = optimize_module._digest({k: v for k, v in saved.items() if k != "digest"})
    json.dump(saved, open(state, "w"))
    assert len(optimize(CheckpointPool(sources), evaluate, model=Vec(16), budget=7, popsize=3, state_path=state,
                        log=None).history) == 7


def test_a_checkpoint_rewritten_past_its_first_values_between_runs_is_refused(tmp_path):
    """A checkpoint rewritten between a search and its resume, its first values kept (a frozen head, an edited
    file), was accepted: the history mixed two models' scores, and best_merge.yml named the new file with the old
    one's best weights (an audit). Values spread through each tensor are part of the state's fingerprint."""
    g = torch.Generator().manual_seed(9)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"theta": torch.randn(4096, generator=g), "head": torch.randn(8, 8, generator=g)}, files[-1])
    state = str(tmp_path / "s.json")
    evaluate = lambda m: -float(m.theta.detach().norm())  # noqa: E731
    model = lambda: torch.nn.ParameterDict({"theta": torch.nn.Parameter(torch.zeros(4096)),  # noqa: E731
                                            "head": torch.nn.Parameter(torch.zeros(8, 8))})
    optimize(CheckpointPool(files), evaluate, model=model(), budget=4, popsize=3, state_path=state, log=None)
    tensors = load_file(files[2])
    tensors["theta"][2000:2100] += 1  # the first 16 values (what the fingerprint sampled) unchanged
    save_file(tensors, files[2])
    with pytest.raises(InputError, match=r"differs in pool \(spread\)"):
        optimize(CheckpointPool(files), evaluate, model=model(), budget=6, popsize=3, state_path=state, log=None)


def test_a_method_without_weights_is_refused_before_anything_runs(tmp_path):
    """karcher, model_stock, sce... take no per-model weight: every candidate was the same merge, the whole budget
    spent on it, exit 0 (an audit)."""
    sources = [{"theta": torch.randn(16)} for _ in range(3)]
    for method in ("karcher", "model_stock", "sce", "slerp", "passthrough"):
        with pytest.raises(InputError, match=f"method {method}: takes no per-model weight"):
            optimize(CheckpointPool(sources), lambda m: 0.0, model=Vec(16), budget=4, log=None, method=method)


def test_a_state_resumed_on_a_pool_compressed_otherwise_is_refused(tmp_path):
    """Exact -> int4 (or int8 -> int4) was accepted: the history then mixed the scores of two merges."""
    g = torch.Generator().manual_seed(6)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"theta": torch.randn(4096, generator=g)}, files[-1])
    evaluate = lambda m: -float(m.theta.detach().norm())  # noqa: E731
    for first, second in ((None, "int4"), ("int8", "int4"), ("int8", None)):
        state = str(tmp_path / f"{first}-{second}.json")
        optimize(CheckpointPool(files[1:], base=files[0], compress=first), evaluate, model=Vec(4096), budget=4,
                 popsize=3, state_path=state, log=None)
        with pytest.raises(InputError, match=r"differs in pool"):
            optimize(CheckpointPool(files[1:], base=files[0], compress=second), evaluate, model=Vec(4096), budget=6,
                     popsize=3, state_path=state, log=None)
        assert len(optimize(CheckpointPool(files[1:], base=files[0], compress=first), evaluate, model=Vec(4096),
                            budget=6, popsize=3, state_path=state, log=None).history) == 6


def test_each_log_line_reports_the_best_of_every_candidate_so_far_resumed_ones_included(tmp_path):
    """The log's best is kept as candidates come (it rescanned the whole history each generation: quadratic in a
    long search), over a resumed state's candidates too."""
    pool, evaluate, _ = synthetic(n=3)
    calls = {"n": 0}

    def noisy(m):  # a NaN now and then, and a late best among worse ones
        calls["n"] += 1
        return float("nan") if calls["n"] % 7 == 3 else evaluate(m) - (calls["n"] % 4)
    path = str(tmp_path / "state.json")
    with pytest.raises(KeyboardInterrupt):
        optimize(pool, _interrupting(noisy, 13), model=Vec(), budget=40, popsize=5, seed=1, state_path=path, log=None)
    lines = []
    res = optimize(pool, noisy, model=Vec(), budget=40, popsize=5, seed=1, state_path=path, log=lines.append)
    logged = [(int(m.group(1)), float(m.group(2))) for m in
              (re.search(r"evals +(\d+)  best (\S+)", line) for line in lines) if m]
    assert len(logged) >= 5 and logged[0][0] > 13
    for evals, best in logged:
        finite = [r["objective"] for r in res.history[:evals] if math.isfinite(r["objective"])]
        assert best == pytest.approx(max(finite), abs=1e-4), (evals, best)


def test_log_reports_the_best_finite_objective_and_huge_integers_in_a_state_are_refused(tmp_path):
    """The generation log said "best nan" (or inf) for the rest of the run after one candidate scored NaN,
    where the result skips it; a state holding an integer past 2**64 in its weights raised a TypeError."""
    pool, evaluate, _ = synthetic(n=3)
    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        return float("nan") if calls["n"] == 1 else float("inf") if calls["n"] == 2 else evaluate(m)
    lines = []
    path = tmp_path / "state.json"
    res = optimize(pool, flaky, model=Vec(), budget=12, popsize=6, seed=4, state_path=str(path), log=lines.append)
    best = [float(re.search(r"best (\S+)", line).group(1)) for line in lines]
    assert all(np.isfinite(best)) and best[-1] == pytest.approx(res.best_objective, abs=1e-4)
    state = json.loads(path.read_text())
    del state["digest"]  # as files before digests were written
    state["history"][2]["weights"][1] = 2**70
    path.write_text(json.dumps(state))
    with pytest.raises(InputError, match="state.json"):
        optimize(pool, evaluate, model=Vec(), budget=18, popsize=6, seed=4, state_path=str(path), log=None)


def test_pareto_front_equals_the_definition_on_random_points_with_ties_and_failures():
    """The front is found in lexicographic order against the front so far (and for two tasks by a running
    maximum): against every point, 10,000 candidates took 5-8 s at a search's end and 50,000 three to four
    minutes. The same indices as the definition: non-dominated, of equal points the first, failures out."""
    def definition(pts):
        ok = [all(math.isfinite(v) for v in p) for p in pts]
        return [i for i, p in enumerate(pts) if ok[i] and not any(
            ok[j] and j != i and all(a >= b for a, b in zip(q, p)) and (tuple(q) != tuple(p) or j < i)
            for j, q in enumerate(pts))]
    rng = np.random.default_rng(5)
    for trial in range(1500):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 5)) if trial % 2 else 2
        pts = rng.integers(0, 4, (n, k)).astype(float)  # few values: ties everywhere
        pts[rng.random(n) < 0.1] = np.nan
        pts[rng.random(n) < 0.05, 0] = np.inf
        pts = pts.tolist()
        assert pareto_front(pts) == definition(pts), pts
    line = np.random.default_rng(0).random(3000)
    assert len(pareto_front(np.stack([line, 1 - line], 1))) == 3000  # every point on the front


def test_pareto_front_of_nothing_is_empty():
    assert pareto_front([]) == []


def test_a_per_group_search_leaves_no_earlier_best_merge_yml(tmp_path, capsys):
    """best_merge.yml (flat weights only) stayed from an earlier search beside the new history.json. The
    README said a search always writes one (a bug hunt): it and the CLI's last line say where the weights are."""
    g = torch.Generator().manual_seed(2)
    names = ["model.layers.0.w", "model.layers.1.w"]
    for i in range(3):
        save_file({n: torch.randn(8, generator=g) for n in names}, str(tmp_path / f"c{i}.safetensors"))
    (tmp_path / "layered.py").write_text(textwrap.dedent("""
        import torch
        def build():
            m = torch.nn.Module()
            m.model = torch.nn.Module()
            m.model.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
            for layer in m.model.layers:
                layer.w = torch.nn.Parameter(torch.zeros(8))
            return m
        def evaluate(m):
            return -float(sum(layer.w.detach().norm() for layer in m.model.layers))
    """))
    data = {"sources": [f"c{i}.safetensors" for i in range(3)], "model": "layered:build", "evaluate": "layered:evaluate",
            "search": {"budget": 4, "popsize": 3, "seed": 1}, "out": "out"}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(data))
    assert cli_main([str(tmp_path / "s.yml")]) == 0 and (tmp_path / "out" / "best_merge.yml").exists()
    data["search"]["groups"] = "layer"
    (tmp_path / "s.yml").write_text(yaml.safe_dump(data))
    assert cli_main([str(tmp_path / "s.yml")]) == 0
    assert not (tmp_path / "out" / "best_merge.yml").exists()
    assert np.asarray(json.load(open(tmp_path / "out" / "history.json"))["best"]["weights"]).ndim == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "no best_merge.yml: a per-group search's best weights (one row per group) are in history.json"
    readme = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    assert "per-group search (`search: {groups: layer}`, for one) writes no best_merge.yml" in readme


def test_evaluate_must_score_the_same_tasks_every_time():
    """Tasks that changed between candidates ran the whole budget on objectives that do not compare, then
    the report failed with a KeyError; a score past float's range was an OverflowError."""
    pool, _, _ = synthetic(n=3)
    calls = []

    def evaluate(m):
        calls.append(1)
        return {"a": 1.0, "b": 2.0} if len(calls) < 3 else {"a": 1.0, "c": 2.0}
    with pytest.raises(InputError, match=r"evaluate returned tasks \['a', 'c'\] for candidate 2 but \['a', 'b'\]"):
        optimize(pool, evaluate, model=Vec(), budget=8, popsize=3, log=None)
    with pytest.raises(InputError, match=r"scores must be numbers within float's range"):
        optimize(pool, lambda m: {"a": 10**400}, model=Vec(), budget=3, popsize=3, log=None)


@pytest.mark.parametrize("returned, says", [
    ("0.5", "evaluate must return a float or a dict of floats, got '0.5'"), (True, "got True"),
    ({"a": "0.5"}, "evaluate returned '0.5' for task 'a'"), ({"a": np.bool_(True)}, "for task 'a'"),
    ({1: 0.1, "1": 0.2}, "evaluate returned keys 1 and '1' for candidate 0, one task name '1'")])
def test_scores_that_are_not_numbers_are_refused_not_parsed(returned, says):
    """A string score "0.5" or True was parsed into 0.5 / 1.0, keys 1 and "1" merged into one task (a bug hunt)."""
    pool, _, _ = synthetic(n=3)
    with pytest.raises(InputError, match=re.escape(says)):
        optimize(pool, lambda m: returned, model=Vec(), budget=3, popsize=3, log=None)


def test_an_objective_that_returns_no_number_is_an_input_error():
    pool, evaluate, _ = synthetic(n=3)
    with pytest.raises(InputError, match="objective returned 'best' for candidate 0; it must return a number"):
        optimize(pool, evaluate, model=Vec(), budget=3, popsize=3, log=None, objective=lambda s: "best")
    result = optimize(pool, lambda m: {"a": torch.tensor(0.25), "b": np.float32(0.5)}, model=Vec(), budget=3,
                      popsize=3, log=None, objective=lambda s: np.float64(s["a"]))
    assert result.best_objective == 0.25


def test_a_state_from_another_pool_says_what_differs(tmp_path):
    _, _, path = _state(tmp_path)  # three checkpoints
    pool, evaluate, _ = synthetic(n=4)
    with pytest.raises(InputError, match=r"different search \(differs in n, pool \(sample, sources, spread\), x0\)"):
        optimize(pool, evaluate, model=Vec(), budget=30, popsize=6, seed=4, state_path=str(path), log=None)


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma0": float("nan")}, "sigma0 must be a finite step size"), ({"sigma0": 0.0}, "sigma0 must be"),
    ({"sigma0": float("inf")}, "sigma0 must be"), ({"sigma0": 1e-320}, "sigma0 must be"),
    ({"budget": 2.5}, "budget must be an integer from 1"), ({"budget": float("inf")}, "budget must be an integer"),
    ({"budget": 0}, "budget must be an integer from 1"), ({"popsize": 10**7}, "popsize must be an integer from 2"),
    ({"popsize": 1}, "popsize must be"), ({"model": None}, "model must be the live torch.nn.Module"),
    ({"model": {"w": torch.zeros(3)}}, "model must be the live torch.nn.Module .*, got dict"),
    ({"sigma0": 10**400}, "sigma0 must be"), ({"sigma0": 10**5000}, "sigma0 must be .*got <an integer of 16610 bits>"),
    ({"bounds": (0, 10**400)}, "bounds must be two numbers"), ({"x0": [10**400] * 3}, "x0 must be 3 numbers")])
def test_bad_search_arguments_are_one_clear_error(kwargs, message):
    """Were cma's bare AssertionError (sigma0 NaN, inf, tiny), ZeroDivisionError (0), "slice indices must be
    integers" (budget 2.5 or inf), AttributeError (model None), a minute of work (popsize 10**7)."""
    pool, evaluate, _ = synthetic(n=3)
    args = dict(model=Vec(), budget=10, popsize=6, seed=4, log=None)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        optimize(pool, evaluate, **args)


@pytest.mark.parametrize("kw, message", [
    ({"bounds": (0,)}, r"bounds must be two numbers \(low, high\)"),
    ({"bounds": (float("nan"), 1)}, "bounds must be finite with low < high"),
    ({"bounds": (1, 0)}, "bounds must be finite with low < high"),
    ({"bounds": (0, 5e-324)}, r"bounds \(0.0, 5e-324\) are narrower than 1e-12"),  # cma's bare AssertionError
    ({"bounds": (-1, 1)}, r"bounds \(-1.0, 1.0\) reach below 0, where normalize=True"),
    ({"x0": [float("nan")] * 3}, r"x0\[0\] is nan, outside bounds"),
    ({"x0": [0.5, 5, 0.5]}, r"x0\[1\] is 5.0, outside bounds \[0.0, 1.0\]"),
    ({"x0": ["a", 1, 1]}, "x0 must be 3 numbers"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"replicas": "x"}, "replicas must be an integer"),
    ({"replicas": 0}, "replicas must be an integer"),
])
def test_search_arguments_are_named_when_wrong(kw, message):
    """Were an IndexError, cma's "argument of inverse must be within the given bounds", numpy's cast
    error and int()'s ValueError, none naming the argument (found by a review)."""
    pool, evaluate, _ = synthetic(n=3)
    with pytest.raises(InputError, match=message):
        optimize(pool, evaluate, model=Vec(), budget=4, log=None, **kw)


def test_the_default_start_lies_inside_the_bounds():
    pool, evaluate, _ = synthetic(n=3)  # 1/3 is below 0.5: unnormalized, the start is the bounds' middle
    res = optimize(pool, evaluate, model=Vec(), budget=4, popsize=2, normalize=False, bounds=(0.5, 1.0), log=None)
    assert np.allclose(res.history[0]["x"], 0.75)


# ---- the search CLI's files and config (found by a review, 2026-12-02) ---------------------------------------
def test_cli_refuses_a_state_path_that_is_an_entry_points_module(tmp_path, capsys, monkeypatch):
    """The model/evaluate module was not among the inputs compared: as state_path it was read as a corrupt state,
    and the error advised deleting the user's code (an audit)."""
    monkeypatch.delitem(sys.modules, "evalcli", raising=False)  # (another test's folder's module otherwise)
    cfg = _cli_setup(tmp_path, state_path="evalcli.py")
    code = (tmp_path / "evalcli.py").read_bytes()
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"state_path {tmp_path / 'evalcli.py'}: is an input of the search" in err[0], err
    assert (tmp_path / "evalcli.py").read_bytes() == code and not (tmp_path / "out").exists()


def _cli_setup(tmp_path, **extra):
    g = torch.Generator().manual_seed(5)
    base = {"theta": torch.randn(16, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(3):
        save_file({"theta": base["theta"] + torch.randn(16, generator=g)}, str(tmp_path / f"c{i}.safetensors"))
    (tmp_path / "evalcli.py").write_text(textwrap.dedent("""
        import torch
        def build():
            m = torch.nn.Module()
            m.theta = torch.nn.Parameter(torch.zeros(16))
            return m
        def evaluate(m):
            t = m.theta.detach()
            return {"a": -float(t.norm()), "b": float(t[0])}
        CALLS = [0]
        def evaluate_inf(m):  # every third candidate scores inf
            CALLS[0] += 1
            return float("inf") if CALLS[0] % 3 == 2 else -float(m.theta.detach().norm())
        NOT_A_FUNCTION = 3
    """))
    cfg = {"sources": [f"c{i}.safetensors" for i in range(3)], "model": "evalcli:build", "evaluate": "evalcli:evaluate",
           "search": {"budget": 6, "popsize": 3, "seed": 2}, "out": "out", **extra}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "s.yml"


def test_the_script_runs_the_user_codes_exit_work(tmp_path):
    """`pymerge search` imports the user's evaluate module: its files are flushed and its exit handlers run when
    the interpreter exits, which ending the process at once would skip (a review of a change that did)."""
    cfg = _cli_setup(tmp_path, evaluate="evalexit:evaluate")
    (tmp_path / "evalexit.py").write_text(textwrap.dedent("""
        import atexit
        from evalcli import evaluate as score
        LOG = open("evals.log", "w")  # never flushed nor closed by the user's code
        atexit.register(lambda: open("exit_ran", "w").close())
        def evaluate(m):
            LOG.write("one evaluation\\n")
            return score(m)
    """))
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-m", "pymerge", "search", str(cfg)], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "exit_ran").exists() and (tmp_path / "evals.log").read_text().count("one evaluation") == 6


@pytest.mark.parametrize("method, note, head", [("dare_ties", True, "lm_head.weight"), ("ties", False, "lm_head.weight"),
                                                ("dare_ties", True, "cls.predictions.decoder.weight")])
def test_best_merge_says_where_it_cannot_rebuild_a_tied_head(tmp_path, capsys, method, note, head):
    """A model tying its head to its embedding, searched with DARE's masks over checkpoints that store the head as
    a copy: the search scored the merged embedding as the head, `pymerge merge` of best_merge.yml draws the head's
    masks of its own and unties it, a head up to 0.28 off, unsaid (an audit). best_merge.yml and a warning say so,
    and how to get the model scored; TIES (no masks) rebuilds it exactly and says nothing. The pool writes the
    later of the two names: BERT's head comes after its embedding (a review: the advice had it backwards)."""
    embedding = {"lm_head.weight": "model.embed_tokens.weight",
                 "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}[head]
    g = torch.Generator().manual_seed(3)
    base = torch.randn(32, 8, generator=g)
    for name, t in (("base", base), ("c0", base + 0.1 * torch.randn(32, 8, generator=g)),
                    ("c1", base + 0.1 * torch.randn(32, 8, generator=g))):
        save_file({embedding: t, head: t.clone()}, str(tmp_path / f"{name}.safetensors"))
    module = f"evaltied_{head.split('.')[0]}"  # (one per case: a module imported once stays in sys.modules)
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        import torch
        def _place(m, path, module):
            *parents, last = path.split(".")
            for p in parents:
                if not hasattr(m, p):
                    setattr(m, p, torch.nn.Module())
                m = getattr(m, p)
            setattr(m, last, module)
        def build():
            m = torch.nn.Module()
            _place(m, {embedding.rsplit(".", 1)[0]!r}, torch.nn.Embedding(32, 8))
            _place(m, {head.rsplit(".", 1)[0]!r}, torch.nn.Linear(8, 32, bias=False))
            m.get_submodule({head.rsplit(".", 1)[0]!r}).weight = m.get_submodule({embedding.rsplit(".", 1)[0]!r}).weight
            return m
        def evaluate(m):
            return -float(m.get_parameter({head!r}).detach().double().pow(2).sum())
    """))
    cfg = {"sources": ["c0.safetensors", "c1.safetensors"], "base": "base.safetensors", "model": f"{module}:build",
           "evaluate": f"{module}:evaluate", "method": method, "method_params": {"density": 0.5},
           "search": {"budget": 4, "popsize": 2, "seed": 0}, "out": "out"}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert cli_main([str(tmp_path / "s.yml")]) == 0
    text = " ".join((tmp_path / "out" / "best_merge.yml").read_text().replace("#", " ").split())
    from pymerge.pool import CheckpointPool
    names = CheckpointPool([str(tmp_path / "c0.safetensors")]).names
    scored, other = sorted((head, embedding), key=names.index, reverse=True)  # the later name's merge is written
    said = f"Its {scored} is the one scored: for the model scored, copy it into {other}." in text
    assert said == note and (f"best_merge.yml: The model searched ties {head}" in capsys.readouterr().err) == note
    from pymerge import run_merge
    run_merge(str(tmp_path / "out" / "best_merge.yml"), tmp_path / "merged", quiet=True)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    objective = json.loads((tmp_path / "out" / "history.json").read_text())["best"]["objective"]
    assert -float(merged[scored].double().pow(2).sum()) == objective  # the advice holds
    assert torch.equal(merged[head], merged[embedding]) != note


def test_a_search_killed_or_failing_while_writing_its_results_leaves_the_earlier_ones_whole(tmp_path, monkeypatch,
                                                                                                capsys):
    """The result files were replaced one at a time and best_merge.yml last: killed while the plot was drawn, a
    search left the previous search's best_merge.yml beside its own history.json, and `pymerge merge` of it built
    the old winner (a bug hunt). Then they were deleted first: a write that failed (a file size limit, a full disk)
    lost the earlier search's results and this one's (an audit). Now they are moved into place together once all
    are written: an interrupt or a failure anywhere before leaves the earlier search's files as they were."""
    cfg = _cli_setup(tmp_path, state_path="state.json")
    out = tmp_path / "out"
    assert cli_main([str(cfg)]) == 0 and (out / "best_merge.yml").exists()
    earlier = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert {"history.json", "history.csv", "best_merge.yml"} <= set(earlier)
    # its sources are .safetensors files, which mergekit cannot read (a docs audit)
    assert b"# It names .safetensors files, which pymerge merge reads; mergekit 0.1.5 reads model folders only" \
        in earlier["best_merge.yml"]

    def killed(*a, **k):
        raise KeyboardInterrupt  # the signal lands while the plot is drawn

    def too_large(path, *a, **k):
        raise InputError(f"{path}: File too large")

    def efbig(path, *a, **k):
        raise OSError(errno.EFBIG, "File too large", path)
    for where, fault, budget in (("plot", killed, 9), ("write_csv", killed, 12), ("write_json", too_large, 14),
                                 ("_best_yaml", too_large, 16), ("write_csv", efbig, 17)):
        monkeypatch.setattr(search_cli if where == "_best_yaml" else optimize_module, where, fault)
        # (an OSError is the pymerge command's to say in one line, naming its file)
        expected = {killed: KeyboardInterrupt, efbig: OSError}.get(fault)
        with pytest.raises(expected) if expected else contextlib.nullcontext() as raised:
            assert cli_main([str(cfg), "--budget", str(budget)]) == 2
        monkeypatch.undo()
        assert {n: (out / n).read_bytes() for n in os.listdir(out)} == earlier, where  # nothing else there either
        # the file in out, not in the hidden folder (gone by then: a review)
        name = "history.csv" if where == "write_csv" else "best_merge.yml" if where == "_best_yaml" else "history.json"
        if fault is efbig:
            assert raised.value.filename == str(out / name)
        elif fault is too_large:
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.endswith(f"{out / name}: File too large"), err
    # an interrupt while the files are moved into place waits for the moves (a review: a new history.json beside
    # the earlier search's best_merge.yml)
    real_replace = os.replace
    moved = []

    def replace_then_interrupted(a, b):
        real_replace(a, b)
        moved.append(b)
        if len(moved) == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(optimize_module.os, "replace", replace_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli_main([str(cfg), "--budget", "18"])
    monkeypatch.undo()
    assert len(moved) == 4 and set(os.listdir(out)) == set(earlier)
    assert len(json.load(open(out / "history.json"))["history"]) == 18
    assert (out / "best_merge.yml").read_bytes() != earlier["best_merge.yml"]  # this search's too
    # a move that fails (EIO): the others go on, the earlier file at its path goes (not beside this search's), and
    # its error names the file in out (a review: the moves stopped, a mix of two searches' files)
    def replace_failing(a, b):
        if b.endswith("history.csv"):
            raise OSError(errno.EIO, "Input/output error", a)
        real_replace(a, b)
    monkeypatch.setattr(optimize_module.os, "replace", replace_failing)
    with pytest.raises(OSError) as raised:
        cli_main([str(cfg), "--budget", "19"])
    monkeypatch.undo()
    assert raised.value.filename == str(out / "history.csv")
    assert set(os.listdir(out)) == set(earlier) - {"history.csv"}
    assert len(json.load(open(out / "history.json"))["history"]) == 19
    # a killed save's hidden folder is swept once unlocked and a minute old; a live save's (locked), never
    dead, live = (out / f"{optimize_module._STAGE_PREFIX}dead"), (out / f"{optimize_module._STAGE_PREFIX}live")
    ahead = out / f"{optimize_module._STAGE_PREFIX}ahead"  # a time ahead of the clock (skew): as old (it was kept)
    dead.mkdir()
    live.mkdir()
    ahead.mkdir()
    for folder in (dead, live):
        os.utime(folder, (time.time() - 120, time.time() - 120))
    os.utime(ahead, (time.time() + 3600,) * 2)
    import fcntl
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert cli_main([str(cfg), "--budget", "20"]) == 0  # resumed from the state: this search's, all of them
    finally:
        os.close(fd)
    assert len(json.load(open(out / "history.json"))["history"]) == 20
    assert set(os.listdir(out)) == set(earlier) | {live.name}


def test_commands_under_python_OO(tmp_path):
    """python -OO strips docstrings: doctor, bench and demo built their help from __doc__ (AttributeError, exit 1),
    and the search died inside cma's import, which reads its own (an audit). The first run; the search says why
    in one line, exit 2."""
    import subprocess
    cfg = _cli_setup(tmp_path)
    env = {**os.environ, "PYTHONOPTIMIZE": "2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for command in (["doctor"], ["bench", "--help"], ["demo", "--help"]):
        p = subprocess.run([sys.executable, "-m", "pymerge", *command], cwd=root, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (command, p.stderr)
    p = subprocess.run([sys.executable, "-m", "pymerge", "search", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "cma" in err[0] and "without -OO" in err[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_non_ascii_paths_under_an_ascii_locale(tmp_path):
    """A non-ASCII out: printed to an ASCII stdout, the search's last line raised UnicodeEncodeError after every
    result was written (exit 1); under LC_ALL=C without UTF-8 mode, where no such file can be named, realpath
    raised it (a traceback), and a merge said 'model path not found' of a folder that is there (an audit)."""
    import subprocess
    cfg = _cli_setup(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["out"] = "out_\u00e9"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in ("LANG", "PYTHONUTF8")}
    p = subprocess.run([sys.executable, "-m", "pymerge", "search", str(cfg)], cwd=tmp_path, capture_output=True,
                       env={**env, "PYTHONIOENCODING": "ascii"}, timeout=120)
    assert p.returncode == 0 and b"out_\\xe9" in p.stdout, p.stderr
    assert "history.json" in os.listdir(tmp_path / "out_\u00e9")
    data["out"] = "out2_\u00e9"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    merge = tmp_path / "m.yml"
    merge.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "c0_\u00e9.safetensors", "parameters": {"weight": 1.0}}]}, allow_unicode=True), encoding="utf-8")
    os.symlink(tmp_path / "c0.safetensors", tmp_path / "c0_\u00e9.safetensors")
    for command in (["search", str(cfg)], ["merge", str(merge), "o"]):
        p = subprocess.run([sys.executable, "-m", "pymerge", *command], cwd=tmp_path, capture_output=True, text=True,
                           env={**env, "LC_ALL": "C", "PYTHONUTF8": "0"}, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and "cannot name a file under this locale" in err[0], p.stderr
    assert not (tmp_path / "out2_\u00e9").exists() and not (tmp_path / "o").exists()


def test_paths_and_task_names_that_are_no_ascii_under_an_ascii_locale(tmp_path):
    """Under LC_ALL=C without UTF-8 mode a folder named caf\u00e9 is 'caf\\udcc3\\udca9' to Python: best_merge.yml wrote
    it as "\\uDCC3" escapes PyYAML's own loader refuses; task names that are no ASCII lost every result file to a
    UnicodeEncodeError (a traceback, out removed); a folder whose name is no UTF-8 at all wrote a best_merge.yml no
    merge could load (an audit). Now the files are UTF-8, and such a path is refused before the search."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in ("LANG", "PYTHONUTF8")}
    home = tmp_path / "caf\u00e9"
    home.mkdir()
    _cli_setup(home, evaluate="evaltext:evaluate")
    (home / "evaltext.py").write_text(textwrap.dedent("""
        from evalcli import evaluate as score
        def evaluate(m):
            s = score(m)
            return {"pr\\u00e9cision \\u2713": s["a"], "b": s["b"]}
    """))
    p = subprocess.run([sys.executable, "-m", "pymerge", "search", "s.yml"], cwd=home, capture_output=True, text=True,
                       env={**env, "LC_ALL": "C", "PYTHONUTF8": "0"}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(home / "out")) == ["best_merge.yml", "history.csv", "history.json", "search.png"]
    assert "task:pr\u00e9cision \u2713" in (home / "out" / "history.csv").read_text(encoding="utf-8")
    best = yaml.safe_load((home / "out" / "best_merge.yml").read_text(encoding="utf-8"))
    assert [m["model"] for m in best["models"]] == [str(home / f"c{i}.safetensors") for i in range(3)]
    p = subprocess.run([sys.executable, "-m", "pymerge", "merge", "out/best_merge.yml", "o"], cwd=home,
                       capture_output=True, text=True, env=env, timeout=120)  # (no LC_ALL: Python's UTF-8 mode)
    assert p.returncode == 0 and (home / "o" / "model.safetensors").is_file(), p.stderr
    odd = tmp_path / os.fsdecode(b"p\xff")
    odd.mkdir()
    _cli_setup(odd)
    p = subprocess.run([sys.executable, "-m", "pymerge", "search", "s.yml"], cwd=odd, capture_output=True, text=True,
                       env=env, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "bytes are not UTF-8" in err[0], p.stderr
    assert not (odd / "out").exists()
    data = yaml.safe_load((odd / "s.yml").read_text())
    data["search"]["groups"] = "layer"  # a search with groups may write no best_merge.yml: not refused (a review)
    (odd / "s.yml").write_text(yaml.safe_dump(data))
    p = subprocess.run([sys.executable, "-m", "pymerge", "search", "s.yml"], cwd=odd, capture_output=True, text=True,
                       env=env, timeout=120)  # (this one's model has no layers: one group, so said why there is none)
    assert p.returncode == 0 and "best_merge.yml" not in os.listdir(odd / "out"), p.stderr
    assert "warning: no best_merge.yml: " in p.stderr and "bytes are not UTF-8" in p.stderr, p.stderr


def test_cli_refuses_an_empty_out_a_weightless_method_and_hints_at_yaml_numbers(tmp_path, capsys):
    """--out "" was ignored (the results went to the config's out); a method without weights spent the whole budget
    on one merge; sigma0: 1e-3 (text to PyYAML) was refused without saying why (an audit). One line each, before the
    pool is built; nothing written."""
    cfg = _cli_setup(tmp_path)
    assert cli_main([str(cfg), "--out", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--out: an empty path")
    for key, value, message in (("method", "karcher", "method karcher: takes no per-model weight"),
                                ("search", {"sigma0": "1e-3"}, "YAML reads 1e3 or 1e-3 as text; write 1000 or 1.0e-3"),
                                ("search", {"budget": "1e3"}, "YAML reads 1e3 or 1e-3 as text")):
        data = yaml.safe_load(cfg.read_text())
        data[key] = value
        cfg.write_text(yaml.safe_dump(data))
        assert cli_main([str(cfg)]) == 2, key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_truncated_state_is_named_so_and_the_failed_run_leaves_no_new_folder(tmp_path, capsys):
    """A cut-short state.json was reported as an older pymerge's pickle; and the failed run left OUT behind,
    empty (it is made before the state is read)."""
    cfg = _cli_setup(tmp_path, state_path="state.json", out="new/out")
    assert cli_main([str(cfg)]) == 0
    full = (tmp_path / "state.json").read_bytes()
    (tmp_path / "state.json").write_bytes(full[:len(full) // 2])
    shutil.rmtree(tmp_path / "new")
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "state.json: cannot read it as a search state: truncated or not JSON (" in err and "pickle" not in err
    assert "choose another state_path, or delete it if it is this search's state" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()  # a folder that was there stays, and so does whatever it holds
    (tmp_path / "new" / "out").mkdir()
    (tmp_path / "new" / "out" / "notes.txt").write_text("mine")
    assert cli_main([str(cfg), "--out", str(tmp_path / "new" / "out" / "a" / "b")]) == 2
    assert sorted(os.listdir(tmp_path / "new" / "out")) == ["notes.txt"]
    assert cli_main([str(cfg), "--out", str(tmp_path / "new")]) == 2
    assert sorted(os.listdir(tmp_path / "new")) == ["out"]
    capsys.readouterr()


def test_search_cli_replaces_links_in_its_out_folder_never_their_targets(tmp_path):
    cfg = _cli_setup(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "out").mkdir()
    for name in ("history.csv", "best_merge.yml", "search.png", "history.json"):
        (tmp_path / "mine" / name).write_text("USER DATA")
        os.symlink(tmp_path / "mine" / name, tmp_path / "out" / name)
    assert cli_main([str(cfg)]) == 0
    assert all((tmp_path / "mine" / n).read_text() == "USER DATA" for n in os.listdir(tmp_path / "mine"))
    assert not any(os.path.islink(tmp_path / "out" / n) for n in os.listdir(tmp_path / "out"))
    assert yaml.safe_load((tmp_path / "out" / "best_merge.yml").read_text())["merge_method"] == "linear"


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}), ("linear", {}),
                                            ("ties", {"density": [0.2, 0.9, 0.5], "normalize": False})])
def test_search_cli_best_merge_yml_reproduces_the_best_merge(tmp_path, capsys, method, params):
    """It had no base_model and no method parameters, and forced TIES' own normalize: false; linear with a
    pool base must not name it (pymerge merge would take it as one more model). A list is one value per
    checkpoint in the pool, so it goes to each model's parameters (at the top, a layer gradient)."""
    from safetensors.torch import load_file
    from pymerge.cli import main as pymerge_main
    cfg = _cli_setup(tmp_path, base="base.safetensors", method=method, method_params=params)
    assert cli_main([str(cfg)]) == 0
    best = json.load(open(tmp_path / "out" / "history.json"))["best"]
    written = yaml.safe_load((tmp_path / "out" / "best_merge.yml").read_text())
    if method == "ties":
        per_model = {k: v for k, v in params.items() if isinstance(v, list)}
        assert written["base_model"] == str(tmp_path / "base.safetensors")
        assert written["parameters"] == {k: v for k, v in params.items() if k not in per_model}
        for i, model in enumerate(written["models"]):
            assert {k: model["parameters"][k] for k in per_model} == {k: v[i] for k, v in per_model.items()}
    else:
        assert "base_model" not in written and written["parameters"] == {"normalize": False}
    assert pymerge_main(["merge", str(tmp_path / "out" / "best_merge.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    pool = CheckpointPool([str(tmp_path / f"c{i}.safetensors") for i in range(3)], base=str(tmp_path / "base.safetensors"))
    target = {"theta": torch.empty(16)}
    pool.materialize(best["weights"], into=target, method=method, method_params=params)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["theta"]
    torch.testing.assert_close(merged, target["theta"], rtol=1e-6, atol=1e-6)
    assert written["dtype"] == "float32" and written["out_dtype"] == "float32"


def test_the_search_cli_runs_without_matplotlib(tmp_path, capsys, monkeypatch):
    """Without the plot extra the search ran to its end, then exited 2 before best_merge.yml (the README
    promises search on core dependencies; a bug hunt). Now no search.png, and an earlier one is removed."""
    from pymerge.extras import MissingExtraError
    from pymerge.search import report

    def no_matplotlib(*args, **kwargs):
        raise MissingExtraError("plotting the search needs matplotlib, which is not installed")
    cfg = _cli_setup(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "search.png").write_bytes(b"an earlier search")
    monkeypatch.setattr(report, "plot", no_matplotlib)
    monkeypatch.setattr(importlib.import_module("pymerge.search.optimize"), "plot", no_matplotlib)
    assert cli_main([str(cfg)]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["best_merge.yml", "history.csv", "history.json"]
    assert "matplotlib is not installed: no search.png" in capsys.readouterr().out


def test_best_merge_yml_of_bfloat16_checkpoints_is_the_float32_candidate_searched(tmp_path):
    """bfloat16 checkpoints merged into a float32 model: best_merge.yml had no dtype, so pymerge merge
    computed and wrote the merge in bfloat16, not the candidate the search scored (a bug hunt)."""
    from safetensors.torch import load_file, save_file
    from pymerge.cli import main as pymerge_main
    cfg = _cli_setup(tmp_path)
    for i in range(3):
        path = tmp_path / f"c{i}.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path))
    assert cli_main([str(cfg)]) == 0
    best = json.load(open(tmp_path / "out" / "history.json"))["best"]
    written = yaml.safe_load((tmp_path / "out" / "best_merge.yml").read_text())
    assert written["dtype"] == "float32" and written["out_dtype"] == "float32"
    assert pymerge_main(["merge", str(tmp_path / "out" / "best_merge.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    target = {"theta": torch.empty(16)}
    CheckpointPool([str(tmp_path / f"c{i}.safetensors") for i in range(3)]).materialize(best["weights"], into=target)
    assert torch.equal(load_file(str(tmp_path / "merged" / "model.safetensors"))["theta"], target["theta"])


def test_best_merge_yml_of_a_pool_with_a_lower_dtype_says_it_is_one_rounding_away(tmp_path):
    """With dtype: bfloat16 the pool reads its checkpoints in bfloat16 and sums in float32, but pymerge merge
    (as mergekit) also rounds the sum to bfloat16: the file said nothing and its docstring promised the same
    merge (a bug hunt: off by up to 7e-3). Now it says so, and the merge is within that one rounding."""
    from safetensors.torch import load_file
    from pymerge.cli import main as pymerge_main
    cfg = _cli_setup(tmp_path, dtype="bfloat16")
    assert cli_main([str(cfg)]) == 0
    best = json.load(open(tmp_path / "out" / "history.json"))["best"]
    text = (tmp_path / "out" / "best_merge.yml").read_text()
    assert text.startswith("# The search's pool held its checkpoints in bfloat16 and summed them in float32")
    assert yaml.safe_load(text)["dtype"] == "bfloat16"
    assert pymerge_main(["merge", str(tmp_path / "out" / "best_merge.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    target = {"theta": torch.empty(16)}
    pool = CheckpointPool([str(tmp_path / f"c{i}.safetensors") for i in range(3)], dtype=torch.bfloat16)
    pool.materialize(best["weights"], into=target)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["theta"]
    assert torch.equal(merged, target["theta"].bfloat16().float())


@pytest.mark.parametrize("change, message", [
    ({"search": {"budget": "many"}}, "budget must be an integer"),
    ({"search": {"budget": 6.7}}, "budget must be an integer"),
    ({"search": {"seed": 1.5}}, "seed must be an integer"),
    ({"search": {"sigma0": "x"}}, "sigma0 must be a finite step size from 1e-12 to 1e6, got 'x'"),
    ({"search": {"normalize": "false"}}, "search.normalize must be true or false"),
    ({"search": [1]}, "search must be a mapping"),
    ({"sources": "c0.safetensors"}, "sources must be a list of paths"),
    ({"sources": None}, "sources must be a list of paths"),
    ({"state_path": 5}, "state_path must be a string"),
    ({"evaluate": "evalcli:NOT_A_FUNCTION"}, "is a int, not a function"),
    ({"method_params": [1]}, "method_params must be a mapping"),
    # taken for "none" before (a 200-evaluation search with the defaults, exit 0: an audit)
    ({"search": []}, "search must be a mapping"),
    ({"search": 0}, "search must be a mapping"),
    ({"method_params": 0}, "method_params must be a mapping"),
    ({"method_params": False}, "method_params must be a mapping"),
    # importlib's ValueError and TypeError were tracebacks
    ({"model": ":build"}, "model: expected 'module:function'"),
    ({"model": ".evalcli:build"}, "model: expected 'module:function'"),
    ({"evaluate": "evalcli:"}, "evaluate: expected 'module:function'"),
    # refused after the pool and the model were built
    ({"method": "nope"}, "nope"),
    ({"method": "ties"}, "needs a base_model"),
    ({"method_params": {"nope": 1}}, "has no parameter 'nope'"),
    ({"state_path": "."}, "is a folder, not a file"),
    ({"out": "c0.safetensors"}, "exists and is not a folder"),
    ({"out": "c0.safetensors/new/out"}, "cannot create it: "),  # found after the pool was built
])
def test_search_cli_config_errors_are_one_line_before_the_search(tmp_path, capsys, change, message):
    cfg = _cli_setup(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data.update(change)
    cfg.write_text(yaml.safe_dump(data))
    assert cli_main([str(cfg)]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "history.json").exists()
    assert captured.out == "", captured.out  # refused before the pool was built (it prints what it holds)


def test_an_infinite_score_is_never_the_best(tmp_path, capsys):
    """CMA-ES ranked inf last but the result picked it with nanargmax (and wrote its weights as the best)."""
    cfg = _cli_setup(tmp_path, evaluate="evalcli:evaluate_inf")
    data = yaml.safe_load(cfg.read_text())
    data["search"] = {"budget": 12, "popsize": 4, "seed": 0, "sigma0": 0.5}
    cfg.write_text(yaml.safe_dump(data))
    assert cli_main([str(cfg)]) == 0
    def strict(constant):  # history.json is standard JSON: a non-finite score is null, not a bare Infinity
        raise AssertionError(f"history.json holds {constant}")

    saved = json.loads((tmp_path / "out" / "history.json").read_text(), parse_constant=strict)
    objectives = [r["objective"] for r in saved["history"]]
    assert any(o is None for o in objectives), "the case needs an infinite score"
    assert saved["best"]["objective"] == max(o for o in objectives if o is not None)
    best = saved["history"][saved["best"]["index"]]  # the index named the inf candidate (np.nanargmax)
    assert best["objective"] == saved["best"]["objective"] and best["weights"] == saved["best"]["weights"]
    assert all(saved["history"][i]["objective"] is not None for i in saved["pareto"])


def test_an_edited_state_is_refused_even_where_replaying_cannot_tell(tmp_path):
    """Replay checks each generation's candidates against the objectives before them, so an edit of the last
    generation's objectives went unnoticed (found by a review); the file's digest catches it. A state written
    before the digest existed still resumes."""
    pool, evaluate, _ = synthetic(n=3)
    path = str(tmp_path / "s.json")
    optimize(pool, evaluate, model=Vec(), budget=7, popsize=3, seed=1, state_path=path, log=None)
    state = json.load(open(path))
    assert "digest" in state
    edited = json.loads(json.dumps(state))
    edited["history"][-1]["objective"] = 1e9
    json.dump(edited, open(path, "w"))
    with pytest.raises(InputError, match="s.json: saved search state was edited"):
        optimize(pool, evaluate, model=Vec(), budget=10, popsize=3, seed=1, state_path=path, log=None)
    del state["digest"]
    json.dump(state, open(path, "w"))
    resumed = optimize(pool, evaluate, model=Vec(), budget=10, popsize=3, seed=1, state_path=path, log=None)
    straight = optimize(pool, evaluate, model=Vec(), budget=10, popsize=3, seed=1, log=None)
    assert [r["x"] for r in resumed.history] == [r["x"] for r in straight.history]


def test_any_integer_seed_runs_reproducibly_and_old_states_without_method_params_are_refused(tmp_path):
    """The review of the argument checks: seeds outside 0..2**32-2 ran before and must still. A state saved
    before the fingerprint held method parameters resumed, with other parameters too: it cannot be checked
    (an audit), and is refused."""
    pool, evaluate, _ = synthetic(n=3)
    for seed in (-1, 2**32 - 1, 2**40):
        a = optimize(pool, evaluate, model=Vec(), budget=5, popsize=2, seed=seed, log=None)
        b = optimize(pool, evaluate, model=Vec(), budget=5, popsize=2, seed=seed, log=None)
        assert [r["x"] for r in a.history] == [r["x"] for r in b.history]
    path = str(tmp_path / "s.json")
    kw = dict(model=Vec(), budget=6, popsize=3, seed=4, log=None, method="task_arithmetic", **{"lambda": 0.5})
    base_pool = CheckpointPool([{"theta": torch.randn(64)} for _ in range(3)], base={"theta": torch.zeros(64)})
    optimize(base_pool, evaluate, state_path=path, **kw)
    state = json.load(open(path))
    del state["fingerprint"]["method_params"], state["digest"]
    json.dump(state, open(path, "w"))
    with pytest.raises(InputError, match="older pymerge, which did not record the method_params it searched"):
        optimize(base_pool, evaluate, state_path=path, **{**kw, "budget": 9})


def test_result_files_get_the_umask_mode_without_setting_the_umask(tmp_path, monkeypatch):
    """replace_file read the umask by setting it to 0 for an instant: a file another thread created then
    was world-writable. /proc/self/status says it; the files still get 0666 less the umask."""
    from pymerge.search.report import replace_file
    old = os.umask(0o027)
    try:
        calls = []
        real = os.umask
        monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
        replace_file(str(tmp_path / "h.json"), lambda p: open(p, "w").write("{}"))
        assert calls == [] and oct(os.stat(tmp_path / "h.json").st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)


def test_best_merge_yml_of_a_model_of_several_dtypes_says_what_it_writes(tmp_path):
    """bfloat16 weights and float32 norms: the search scored each tensor rounded to its dtype, the file wrote
    them all in float32 and said it made the best merge."""
    from pymerge.search.cli import _best_yaml
    model = torch.nn.Module()
    model.theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    model.phi = torch.nn.Parameter(torch.zeros(3))
    path = str(tmp_path / "best.yml")
    _best_yaml(path, ["a", "b"], None, [0.5, 0.5], "linear", {}, model=model)
    text = open(path).read()
    assert "several dtypes (bfloat16, float32)" in text and "out_dtype" not in yaml.safe_load(text)
    model.theta.data = model.theta.data.float()
    _best_yaml(path, ["a", "b"], None, [0.5, 0.5], "linear", {}, model=model)
    assert "#" not in open(path).read() and yaml.safe_load(open(path))["out_dtype"] == "float32"
    # a merged buffer counts (it was left out: out_dtype bfloat16 and no note); one the pool skips does not
    from pymerge.search.cli import _merged_tensors
    model.theta.data = model.theta.data.bfloat16()
    model.phi.data = model.phi.data.bfloat16()
    model.register_buffer("norm", torch.zeros(3))
    model.register_buffer("inv_freq", torch.zeros(2), persistent=False)
    g = torch.Generator().manual_seed(0)
    pool = CheckpointPool([{"theta": torch.randn(3, generator=g), "phi": torch.randn(3, generator=g), "norm": t}
                           for t in torch.randn(2, 3, generator=g)])
    _best_yaml(path, ["a", "b"], None, [0.5, 0.5], "linear", {}, model=model, merged=_merged_tensors(pool, model, None))
    assert "several dtypes (bfloat16, float32)" in open(path).read()
    pool = CheckpointPool([{"theta": torch.randn(3, generator=g), "phi": torch.randn(3, generator=g)}] * 2)
    _best_yaml(path, ["a", "b"], None, [0.5, 0.5], "linear", {}, model=model, merged=_merged_tensors(pool, model, None))
    assert "#" not in open(path).read() and yaml.safe_load(open(path))["out_dtype"] == "bfloat16"


def test_a_resume_with_a_smaller_budget_says_it_runs_nothing(tmp_path):
    """A state of 9 candidates resumed with budget=3 returned all 9 without a word."""
    pool, evaluate, _ = synthetic(n=3)
    state = str(tmp_path / "s.json")
    optimize(pool, evaluate, model=Vec(), budget=9, popsize=4, state_path=state, log=None)
    said = []
    res = optimize(pool, evaluate, model=Vec(), budget=3, popsize=4, state_path=state, log=said.append)
    assert len(res.history) == 9 and said == ["the saved state already holds 9 candidates, more than budget=3: "
                                              "nothing to run, the result is the saved search"]


def test_a_model_that_cannot_be_deep_copied_runs_with_one_replica_or_is_refused_in_one_line():
    """optimize deep-copies the model for replicas (by default): a model holding a lock stopped it with
    copy.deepcopy's TypeError traceback (a bug hunt). Without replicas= it falls back to one, saying why."""
    import threading
    pool, evaluate, _ = synthetic(n=3)
    model = Vec()
    model.lock = threading.Lock()
    seen, lines = set(), []

    def scored(m):
        seen.add(id(m))
        return evaluate(m)
    res = optimize(pool, scored, model=model, budget=7, popsize=6, log=lines.append)
    assert len(res.history) == 7 and seen == {id(model)}
    assert "replicas=1" in lines[0] and "cannot be deep-copied (TypeError: cannot pickle" in lines[0]
    with pytest.raises(InputError, match=r"^replicas=3: the model cannot be deep-copied \(TypeError: .*\); "
                                         r"pass replicas=1$"):
        optimize(pool, evaluate, model=model, budget=7, popsize=6, replicas=3, log=None)


def test_the_docs_say_evaluate_gets_copies_and_when_to_pass_replicas_1():
    """An evaluate that scores `model` through its own handle recorded other candidates' scores with the
    default replicas; the docs said nothing of the copies (a bug hunt)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for text in (optimize.__doc__, readme):
        flat = " ".join(text.split())
        assert "must score the model" in flat and "deep copies of `model`" in flat and "replicas=1" in flat


def test_a_state_resumed_with_another_base_or_objective_or_compressed_contents_is_refused(tmp_path):
    """The fingerprint held only whether there was a base, not the objective, and no sample of a compressed
    pool's contents: a resume on another base (or objective) replayed the old history and went on with
    other merges, best_* comparing the two (a bug hunt). A state without the base's sample still resumes."""
    g = torch.Generator().manual_seed(8)
    base = {"theta": torch.randn(256, generator=g)}
    other = {"theta": base["theta"] + 5}
    cks = [{"theta": base["theta"] + 0.1 * torch.randn(256, generator=g)} for _ in range(3)]
    evaluate = lambda m: float(m.theta.detach().mean())  # noqa: E731
    kw = dict(model=Vec(256), popsize=3, log=None, method="task_arithmetic", normalize=False)
    for compress in (None, "int8"):
        state = str(tmp_path / f"{compress}.json")
        optimize(CheckpointPool(cks, base=base, compress=compress), evaluate, budget=4, state_path=state, **kw)
        with pytest.raises(InputError, match=r"differs in pool \(base_sample"):
            optimize(CheckpointPool(cks, base=other, compress=compress), evaluate, budget=6, state_path=state, **kw)
        with pytest.raises(InputError, match=r"differs in objective\)"):
            optimize(CheckpointPool(cks, base=base, compress=compress), evaluate, budget=6, state_path=state,
                     objective=lambda s: 1000 * s["score"], **kw)
    # the default passed by name is the default; partials binding other values are other objectives
    from pymerge.search.optimize import macro_average
    state = str(tmp_path / "named.json")
    optimize(CheckpointPool(cks, base=base), evaluate, budget=3, state_path=state, **kw)
    assert len(optimize(CheckpointPool(cks, base=base), evaluate, budget=4, state_path=state,
                        objective=macro_average, **kw).history) == 4
    scaled = lambda scores, k: k * scores["score"]  # noqa: E731
    state = str(tmp_path / "partial.json")
    optimize(CheckpointPool(cks, base=base), evaluate, budget=3, state_path=state,
             objective=functools.partial(scaled, k=1), **kw)
    with pytest.raises(InputError, match=r"differs in objective\)"):
        optimize(CheckpointPool(cks, base=base), evaluate, budget=4, state_path=state,
                 objective=functools.partial(scaled, k=1000), **kw)
    with pytest.raises(InputError, match=r"differs in pool \(sample\)"):  # compressed, same base, other checkpoints
        optimize(CheckpointPool(cks[::-1], base=base, compress="int8"), evaluate, budget=6,
                 state_path=str(tmp_path / "int8.json"), **kw)
    state = str(tmp_path / "None.json")
    saved = json.load(open(state))  # written before the fingerprint held the base's sample: resumes, as then
    del saved["fingerprint"]["pool"]["base_sample"]
    saved["digest"] = optimize_module._digest({k: v for k, v in saved.items() if k != "digest"})
    json.dump(saved, open(state, "w"))
    assert len(optimize(CheckpointPool(cks, base=other), evaluate, budget=6, state_path=state, **kw).history) == 6
    saved = json.load(open(state))  # nor the objective: it resumed with any (an audit), refused
    del saved["fingerprint"]["objective"]
    saved["digest"] = optimize_module._digest({k: v for k, v in saved.items() if k != "digest"})
    json.dump(saved, open(state, "w"))
    with pytest.raises(InputError, match="older pymerge, which did not record the objective it searched"):
        optimize(CheckpointPool(cks, base=base), evaluate, budget=7, state_path=state, **kw)


def test_a_compressed_pools_state_resumes_whether_its_int4_codes_are_paired_or_not(tmp_path, monkeypatch):
    """The fingerprint hashed each checkpoint's bytes as held: a CPU of the AVX2 path pairs int4 checkpoints, and a
    tensor of an odd number of 64-element blocks then holds 34 bytes, not 66, so a state saved there was refused
    on an AVX-512 machine (or a GPU) as "a different search" (an audit)."""
    from pymerge.pool import compressed
    g = torch.Generator().manual_seed(9)
    base = {"theta": torch.randn(64 * 3, generator=g)}  # three blocks: an odd number
    cks = [{"theta": base["theta"] + 0.1 * torch.randn(64 * 3, generator=g)} for _ in range(2)]
    kw = dict(model=Vec(64 * 3), popsize=2, log=None, method="task_arithmetic", normalize=False)
    evaluate = lambda m: float(m.theta.detach().mean())  # noqa: E731
    state = str(tmp_path / "s.json")
    held = []
    for paired, budget in ((True, 2), (False, 4)):
        monkeypatch.setattr(compressed, "pairs_pay", lambda paired=paired: paired)
        pool = CheckpointPool(cks, base=base, compress="int4")
        held.append([r["bytes"] for r in pool.compression_report()])
        assert len(optimize(pool, evaluate, budget=budget, state_path=state, **kw).history) == budget
    assert held[0] != held[1]  # the layouts did differ


def test_a_second_search_on_one_state_path_or_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two searches sharing a state_path (or, in the CLI, an out folder) both ran and exited 0; one's state
    and results silently replaced the other's (a bug hunt). The second is refused in one line; the locks go
    with the search, whether it ends or fails."""
    pool, evaluate, _ = synthetic(n=3)
    path = str(tmp_path / "s.json")
    refused = []

    def nested(m):  # a second search started while the first runs
        if not refused:
            with pytest.raises(InputError, match=r"s.json: in use by another search \(it holds .*s.json.lock\)"):
                optimize(pool, evaluate, model=Vec(), budget=4, popsize=3, seed=1, state_path=path, log=None)
            refused.append(True)
        return evaluate(m)
    optimize(pool, nested, model=Vec(), budget=4, popsize=3, state_path=path, log=None)
    assert refused and os.path.exists(path + ".lock")

    def failing(m):
        raise RuntimeError("evaluate failed")
    with pytest.raises(RuntimeError):
        optimize(pool, failing, model=Vec(), budget=4, popsize=3, seed=2, state_path=str(tmp_path / "f.json"),
                 log=None)
    assert len(optimize(pool, evaluate, model=Vec(), budget=7, popsize=3, state_path=path, log=None).history) == 7
    cfg = _cli_setup(tmp_path, evaluate="nested_cli:evaluate")  # no state_path: the out folder's lock refuses it
    (tmp_path / "nested_cli.py").write_text(textwrap.dedent("""
        import os
        from pymerge.search import cli_main
        CODES = []
        def evaluate(m):
            if not CODES:  # a second search into the same out, while the first runs
                CODES.append(None)
                CODES[0] = cli_main([os.path.join(os.path.dirname(__file__), "s.yml")])
            return -float(m.theta.detach().norm())
    """))
    assert cli_main([str(cfg)]) == 0 and importlib.import_module("nested_cli").CODES == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"error: out .*out: in use by another pymerge search", err[0])


def test_a_forked_child_does_not_keep_the_state_lock(tmp_path):
    """An evaluate that forks a long-lived worker (a multiprocessing pool) left the child holding the state's
    lock, and the next search in the process was refused (a review of the lock's change)."""
    import multiprocessing
    pool, evaluate, _ = synthetic(n=3)
    path = str(tmp_path / "s.json")
    children = []

    def forking(m):
        if not children:  # a worker that outlives the search, forked while the lock is held
            children.append(multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True))
            children[0].start()
        return evaluate(m)
    try:
        optimize(pool, forking, model=Vec(), budget=4, popsize=3, state_path=path, log=None)
        assert children[0].is_alive()
        assert len(optimize(pool, evaluate, model=Vec(), budget=7, popsize=3, state_path=path, log=None).history) == 7
    finally:
        children[0].kill()


def test_a_child_yet_to_run_its_fork_hooks_does_not_keep_the_state_lock(tmp_path):
    """A forked child closes its copy of the lock's descriptor in a fork hook, once the kernel runs it: on a busy
    machine (CI's) the search ended first, and the next search in the process was refused. A child that never runs
    Python's hooks (forked here by libc, as native code would) stands for one not yet run: the lock is undone at the
    search's end, whatever copies live."""
    import ctypes
    import signal
    libc = ctypes.PyDLL(None)  # (PyDLL: the child calls libc holding the GIL, as the only thread it has)
    pool, evaluate, _ = synthetic(n=3)
    path = str(tmp_path / "s.json")
    pids = []

    def forking(m):
        if not pids:
            pid = libc.fork()
            if pid == 0:  # the child: asleep until killed, never back in Python's code
                libc.sleep(60)
                libc._exit(0)
            assert pid > 0
            pids.append(pid)
        return evaluate(m)
    try:
        optimize(pool, forking, model=Vec(), budget=4, popsize=3, state_path=path, log=None)
        assert pids and os.waitpid(pids[0], os.WNOHANG) == (0, 0)  # alive, its copy of the descriptor open
        assert len(optimize(pool, evaluate, model=Vec(), budget=7, popsize=3, state_path=path, log=None).history) == 7
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_child_forked_by_native_code_cannot_unlock_its_parents_lock(tmp_path):
    """Such a child keeps the parent's record of its locks (no fork hook ran): one that left a search through Python
    (an interrupt) undid the lock of the search its parent was still running (a review)."""
    import ctypes
    from pymerge.io import files
    libc = ctypes.PyDLL(None)
    path = str(tmp_path / "s.lock")
    fd = files.hold_lock(path, "busy")
    try:
        pid = libc.fork()
        if pid == 0:  # the child: releases what it believes it holds, then leaves at once
            try:
                files.release_lock(fd)
            finally:
                libc._exit(0)
        assert pid > 0 and os.waitpid(pid, 0)[1] == 0
        with pytest.raises(InputError, match="^busy$"):  # still the parent's
            files.hold_lock(path, "busy")
    finally:
        files.release_lock(fd)
    files.release_lock(files.hold_lock(path, "busy"))  # and free once the parent lets it go


def test_an_interrupt_as_a_lock_is_released_leaves_it_released(tmp_path, monkeypatch, ctrl_c):
    """A Ctrl-C inside release_lock left the descriptor open and locked, and the next search in the process was
    refused as busy (a review's signal storm); or its record, which a later descriptor of that number would have
    been unlocked by. Now the interrupt comes after the release is done."""
    from pymerge.io import files

    class Interrupting(dict):
        def pop(self, *args):  # a Ctrl-C arriving as the (first) release begins
            if not hasattr(self, "sent"):
                self.sent = ctrl_c()
            return super().pop(*args)
    monkeypatch.setattr(files, "_held_locks", Interrupting())
    path = str(tmp_path / "s.lock")
    fd = files.hold_lock(path, "busy")
    with pytest.raises(KeyboardInterrupt):
        files.release_lock(fd)
    assert fd not in files._held_locks
    files.release_lock(files.hold_lock(path, "busy"))


def test_a_finished_search_in_a_folder_without_write_access_is_read_back(tmp_path, monkeypatch):
    """Its state was read back before the lock; then the lock file could not be made there, and the search
    that only returns the saved result failed (a review of the lock's change). One that must go on fails
    where it saves, naming the file."""
    from pymerge.io import files
    pool, evaluate, _ = synthetic(n=3)
    done = str(tmp_path / "s.json")
    first = optimize(pool, evaluate, model=Vec(), budget=4, popsize=3, state_path=done, log=None)
    os.unlink(done + ".lock")
    real = files.os.open

    def no_write(path, flags, *a):  # as in a folder the user may read but not write (root writes anywhere)
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *a)
    monkeypatch.setattr(files.os, "open", no_write)
    again = optimize(pool, evaluate, model=Vec(), budget=4, popsize=3, state_path=done, log=None)
    assert again.best_objective == first.best_objective and len(again.history) == 4
    assert not os.path.exists(done + ".lock")


def test_another_users_lock_file_still_locks(tmp_path, monkeypatch):
    """STATE.lock made by another user (mode 0644) cannot be opened for writing: the search then ran without
    a lock while the other user's held it (a review). flock needs no write access: it is opened read-only."""
    from pymerge.io import files
    path = str(tmp_path / "s.json.lock")
    held = files.hold_lock(path, "busy")
    real = files.os.open

    def not_mine(p, flags, *a):
        if str(p) == path and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, flags, *a)
    monkeypatch.setattr(files.os, "open", not_mine)
    try:
        with pytest.raises(InputError, match="busy"):
            files.hold_lock(path, "busy", optional=True)
    finally:
        files.release_lock(held)
    mine = files.hold_lock(path, "busy", optional=True)  # free again: locked through the read-only descriptor
    assert mine is not None
    files.release_lock(mine)
    fifo = str(tmp_path / "fifo.lock")  # another user's FIFO there: the read-only open waited for a writer
    os.mkfifo(fifo)
    monkeypatch.setattr(files.os, "open", lambda p, flags, *a: not_mine(path if str(p) == fifo else p, flags, *a)
                        if flags & (os.O_RDWR | os.O_WRONLY) else real(p, flags, *a))
    assert files.hold_lock(fifo, "busy", optional=True) is None
    monkeypatch.setattr(files.os, "open", not_mine)

    def nfs(fd, op):  # NFS grants an exclusive flock only on a descriptor open for writing
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(files.fcntl, "flock", nfs)
    with pytest.raises(InputError, match="cannot lock it without write access"):
        files.hold_lock(path, "busy", optional=True)


class _FlockThenInterrupt:
    """fcntl whose first flock locks, then raises KeyboardInterrupt: a Ctrl-C landing as the lock was taken."""

    def __init__(self, real):
        self.real, self.armed = real, True
        self.LOCK_EX, self.LOCK_NB, self.LOCK_SH, self.LOCK_UN = real.LOCK_EX, real.LOCK_NB, real.LOCK_SH, real.LOCK_UN

    def flock(self, fd, op):
        self.real.flock(fd, op)
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def test_an_interrupt_as_a_lock_is_taken_leaves_it_free(tmp_path, monkeypatch):
    """A Ctrl-C as the state's lock was taken (before optimize's try) kept it, on a descriptor nobody held: every
    later search on that state_path in this process was refused as 'in use by another search'. One as a state's
    temporary file was locked kept that file and its descriptor (an audit)."""
    from pymerge.io import files
    pool, evaluate, _ = synthetic(n=2, d=8)
    state = str(tmp_path / "s.json")
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(files, "fcntl", _FlockThenInterrupt(files.fcntl))
    with pytest.raises(KeyboardInterrupt):
        optimize(pool, evaluate, model=Vec(8), budget=4, popsize=2, state_path=state, log=None)
    assert len(os.listdir("/proc/self/fd")) == fds
    monkeypatch.setattr(files, "fcntl", _FlockThenInterrupt(files.fcntl))
    with pytest.raises(KeyboardInterrupt):
        files.replace_file(state, lambda p: open(p, "w").write("{}"))
    assert sorted(os.listdir(tmp_path)) == ["s.json.lock"] and len(os.listdir("/proc/self/fd")) == fds
    monkeypatch.undo()
    result = optimize(pool, evaluate, model=Vec(8), budget=4, popsize=2, state_path=state, log=None)
    assert len(result.history) == 4 and len(os.listdir("/proc/self/fd")) == fds


def test_a_state_or_pool_file_that_cannot_be_looked_up_is_never_taken_for_none(tmp_path, monkeypatch):
    """Were an EIO read as 'no file' (os.path.exists), a search would start afresh and its first save replace the
    saved state (its whole history), and a compressed pool's save replace a file without overwrite=True."""
    pool, evaluate, _ = synthetic(n=2, d=8)
    state = str(tmp_path / "s.json")
    first = optimize(pool, evaluate, model=Vec(8), budget=4, popsize=2, state_path=state, log=None)
    saved = open(state, "rb").read()
    compressed = CheckpointPool([{"theta": torch.randn(8)} for _ in range(2)], base={"theta": torch.zeros(8)},
                                compress="int8")
    compressed.save(str(tmp_path / "pool.safetensors"))
    kept = open(tmp_path / "pool.safetensors", "rb").read()
    real_stat, real_lstat = os.stat, os.lstat

    def failing(real):
        def look(path, *a, **kw):
            if os.fspath(path) in (state, str(tmp_path / "pool.safetensors")):
                raise OSError(errno.EIO, "Input/output error", os.fspath(path))
            return real(path, *a, **kw)
        return look
    monkeypatch.setattr(os, "stat", failing(real_stat))
    monkeypatch.setattr(os, "lstat", failing(real_lstat))
    with pytest.raises(InputError, match=f"^{re.escape(state)}: cannot (look it up|access): Input/output error$"):
        optimize(pool, evaluate, model=Vec(8), budget=6, popsize=2, state_path=state, log=None)
    with pytest.raises(InputError, match="pool.safetensors: cannot (look it up|access): Input/output error$"):
        compressed.save(str(tmp_path / "pool.safetensors"))
    monkeypatch.undo()
    assert open(state, "rb").read() == saved and open(tmp_path / "pool.safetensors", "rb").read() == kept
    again = optimize(pool, evaluate, model=Vec(8), budget=4, popsize=2, state_path=state, log=None)
    assert again.best_objective == first.best_objective


def test_a_state_whose_candidates_score_other_tasks_is_refused_before_anything_is_written(tmp_path, capsys):
    """A state without a digest (as before digests) was never checked for every candidate scoring the same
    tasks: with a task deleted from one, the search resumed and the report's plot failed with a KeyError
    after history.json was written (a bug hunt)."""
    cfg = _cli_setup(tmp_path, state_path="state.json", out="new/out")
    assert cli_main([str(cfg)]) == 0
    state = json.loads((tmp_path / "state.json").read_text())
    del state["digest"], state["history"][3]["scores"]["a"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "new")
    capsys.readouterr()
    assert cli_main([str(cfg), "--budget", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state.json: not a valid search state: history[3].scores has tasks ['b'], candidate 0 " \
                             "['a', 'b']; every candidate must score the same tasks" in err[0]
    assert not (tmp_path / "new").exists()


def test_no_plot_extra_no_cma_warning_and_hints_name_the_extra(tmp_path):
    """Without matplotlib, cma's own "UserWarning: Could not import matplotlib.pyplot" was printed on every
    search and demo run, and the demo's hint said `pip install matplotlib` where the search names the extra
    (a docs bug hunt)."""
    import subprocess
    import sys
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = sys.modules["matplotlib.pyplot"] = None  # the plot extra is not installed
        import torch
        from pymerge.pool import CheckpointPool
        from pymerge.search import optimize
        pool = CheckpointPool([{"theta": torch.full((4,), float(i))} for i in range(3)])
        model = torch.nn.Module()
        model.theta = torch.nn.Parameter(torch.zeros(4))
        optimize(pool, lambda m: -float(m.theta.sum()), model=model, budget=4, seed=0, log=None)
        print("searched")
        """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0 and "searched" in r.stdout, r.stderr[-2000:]
    assert "matplotlib" not in r.stderr, r.stderr[-2000:]
    for path in ("pymerge/demo/run.py", "pymerge/search/cli.py"):
        with open(os.path.join(root, path)) as f:
            hints = [line for line in f if "matplotlib is not installed" in line]
        assert hints and all("pip install matplotlib" in h for h in hints), (path, hints)


# ---- a bug hunt of the search (2026-12-03) ---------------------------------------------------------
@pytest.mark.parametrize("result_file", ["history.json", "best_merge.yml"])
def test_a_state_path_that_is_a_result_file_is_refused_before_the_search(tmp_path, capsys, result_file):
    """state_path out/history.json: the report replaced the state (exit 0), and the resume failed on it;
    out/best_merge.yml: removed before the report was written. Refused before anything runs, the file kept."""
    cfg = _cli_setup(tmp_path, state_path=f"out/{result_file}")
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state_path" in err[0] and result_file in err[0], err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "link.json")  # links are resolved: a state in OUT by a link
    (tmp_path / "s2.yml").write_text(cfg.read_text().replace(f"out/{result_file}", "link.json"))
    os.replace(tmp_path / "elsewhere.json", tmp_path / "out" / result_file)
    os.unlink(tmp_path / "link.json")
    os.symlink(tmp_path / "out" / result_file, tmp_path / "link.json")
    assert cli_main([str(tmp_path / "s2.yml")]) == 2
    assert (tmp_path / "out" / result_file).read_text() == "{}"
    capsys.readouterr()


def test_seeds_are_taken_whole_and_counts_refuse_strings():
    """A seed past 2**53 (time.time_ns()) was refused as out of range through float; seeds 2**32 apart ran one
    search; budget='4' ran. Seeds 0..2**32-1 keep their streams (RandomState(seed): every search so far)."""
    pool, evaluate, _ = synthetic(n=3)
    runs = {seed: [r["x"] for r in optimize(pool, evaluate, model=Vec(), budget=5, popsize=2, seed=seed,
                                             log=None).history]
            for seed in (0, 2**32, 2**53 + 1, 2**63 - 1, -2**63)}
    assert len({json.dumps(x) for x in runs.values()}) == len(runs)  # every seed its own search
    assert np.array_equal(optimize_module._random_state(7).randn(5), np.random.RandomState(7).randn(5))
    assert np.array_equal(optimize_module._random_state(2**32 - 1).randn(5), np.random.RandomState(2**32 - 1).randn(5))
    for bad in ("4", b"4", True, 4.5, None):
        with pytest.raises(InputError, match="budget must be an integer"):
            optimize(pool, evaluate, model=Vec(), budget=bad, log=None)
    assert len(optimize(pool, evaluate, model=Vec(), budget=np.int64(3), log=None).history) == 3


def test_groups_without_tensors_are_not_searched_and_huge_tables_are_refused(tmp_path):
    """A pool of blocks 30-31 under "layer" has 33 rows: all 99 weights were searched, 93 of them changing
    nothing; group ids from a million asked CMA-ES for 65 TiB (MemoryError after 9 s)."""
    g = torch.Generator().manual_seed(2)
    sources = [{f"layers.{i}.w": torch.randn(8, generator=g) for i in (30, 31)} for _ in range(3)]
    pool = CheckpointPool(sources)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(32)])
    for i in (30, 31):
        model.layers[i].w = torch.nn.Parameter(torch.zeros(8))
    goal = {30: sources[0]["layers.30.w"], 31: sources[2]["layers.31.w"]}

    def evaluate(m):
        return -sum(float(((m.layers[i].w.detach() - v) ** 2).sum()) for i, v in goal.items())
    res = optimize(pool, evaluate, model=model, budget=200, groups="layer", seed=1, log=None)
    assert res.best_weights.shape == (33, 3) and all(len(r["x"]) == 6 for r in res.history)
    assert res.best_weights[31, 0] > 0.9 and res.best_weights[32, 2] > 0.9
    np.testing.assert_allclose(res.best_weights[:31], 1 / 3)  # rows that hold nothing: at their start
    path = str(tmp_path / "s.json")  # a resume replays it (its first candidate is the searched part of x0)
    kw = dict(model=model, groups="layer", seed=1, popsize=4, log=None, state_path=path)
    optimize(pool, evaluate, budget=6, **kw)
    resumed = optimize(pool, evaluate, budget=10, **kw)
    whole = optimize(pool, evaluate, budget=10, **{**kw, "state_path": None})
    assert [r["x"] for r in resumed.history] == [r["x"] for r in whole.history]
    ids = {f"layers.{i}.w": 10**6 + i for i in (30, 31)}
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="number the groups"):
        optimize(pool, evaluate, model=model, budget=4, groups=ids, log=None)
    assert time.perf_counter() - t0 < 5


def test_a_state_of_a_seed_whose_stream_changed_is_refused_as_another_search(tmp_path):
    """Seeds outside 0..2**32-1 drew seed % 2**32's stream before: such a state failed its replay as 'edited'."""
    pool, evaluate, _ = synthetic(n=3)
    path = str(tmp_path / "s.json")
    optimize(pool, evaluate, model=Vec(), budget=4, popsize=2, seed=-1, state_path=path, log=None)
    state = json.load(open(path))
    del state["fingerprint"]["seed_stream"], state["digest"]  # as written before the change
    json.dump(state, open(path, "w"))
    with pytest.raises(InputError, match="seed_stream"):
        optimize(pool, evaluate, model=Vec(), budget=6, popsize=2, seed=-1, state_path=path, log=None)


def test_replicas_are_made_only_for_the_candidates_left(monkeypatch):
    """budget=4 with popsize=20000 made 19,999 deep copies of the model; a finished search 499."""
    pool, evaluate, _ = synthetic(n=3)
    copies = [0]
    real = optimize_module.copy.deepcopy

    def counted(x, *a):
        copies[0] += 1
        return real(x, *a)
    monkeypatch.setattr(optimize_module.copy, "deepcopy", counted)
    assert len(optimize(pool, evaluate, model=Vec(), budget=4, popsize=500, log=None).history) == 4
    assert copies[0] <= 3


def test_a_state_folder_that_cannot_be_written_is_named_before_the_first_candidate():
    """It failed after evaluating candidate 0 (minutes on a real model), naming a temporary file."""
    pool, evaluate, _ = synthetic(n=3)
    path = "/sys/pymerge-test-search-state.json"  # sysfs: no new files, for root too (the lock is optional there)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL))
        os.unlink(path)
        pytest.skip("/sys takes new files here")
    except OSError:
        pass
    calls = []
    with pytest.raises(InputError) as e:
        optimize(pool, lambda m: calls.append(1) or evaluate(m), model=Vec(), budget=4, state_path=path, log=None)
    assert str(e.value).startswith(path + ": cannot write the search state") and calls == []


@pytest.mark.parametrize("second", ["c0.safetensors", "./c0.safetensors", "link.safetensors"])
def test_cli_refuses_one_checkpoint_listed_twice_before_the_search(tmp_path, capsys, second):
    """The search ran to the end and wrote a best_merge.yml listing the checkpoint twice, which `pymerge merge`
    then refused (an audit): now one line before any work, nothing written."""
    cfg = _cli_setup(tmp_path)
    os.symlink(tmp_path / "c0.safetensors", tmp_path / "link.safetensors")
    data = yaml.safe_load(cfg.read_text())
    data["sources"] = ["c0.safetensors", "c1.safetensors", second]
    cfg.write_text(yaml.safe_dump(data))
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pymerge search: error: {cfg}: sources[0] (c0.safetensors) and sources[2] ({second}) are the "
                   "same checkpoint; list it once"], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "linear"])
def test_cli_refuses_a_base_among_the_sources_for_a_method_that_takes_one(tmp_path, capsys, method):
    """base: c0 with c0 also a source: the pool weighed c0 as one more model, best_merge.yml listed it under
    models and `pymerge merge` (as mergekit) took it as the base alone, so a normalized method rebuilt another
    merge than the one scored, exit 0 (an audit). Refused in one line first; linear takes no base: searched."""
    params = {} if method == "linear" else {"normalize": True, **({"density": 0.9} if method == "dare_linear" else {})}
    cfg = _cli_setup(tmp_path, base="./c0.safetensors", method=method, method_params=params)
    rc = cli_main([str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    if method == "linear":
        assert rc == 0, err
        return
    assert rc == 2 and err == [f"pymerge search: error: {cfg}: base (./c0.safetensors) and sources[0] (c0.safetensors) "
                               f"are the same checkpoint; list it once; a {method} search takes the base as the base "
                               "alone (its task vector is zero): remove it from sources"], err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_unwritable_out_and_empty_paths_before_the_search(tmp_path, capsys, monkeypatch):
    """A read-only out was found when the results were written, after the whole budget (an audit); out: ""
    wrote the results into the config's folder, over a user's history.csv there. One line each, first."""
    import tempfile as tempfile_module
    cfg = _cli_setup(tmp_path)
    calls, real = [], tempfile_module.NamedTemporaryFile

    def read_only(*a, dir=None, **k):
        if dir is not None and os.path.abspath(dir) == str(tmp_path / "out"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile_module, "NamedTemporaryFile", read_only)
    monkeypatch.setattr("evalcli.evaluate", lambda m: calls.append(1) or 0.0, raising=False)
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"pymerge search: error: out {tmp_path / 'out'}: cannot write there (Read-only file system)", err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("history*"))
    monkeypatch.undo()
    (tmp_path / "history.csv").write_text("mine")
    for key in ("out", "base", "state_path"):
        data = yaml.safe_load(cfg.read_text())
        for k in ("out", "base", "state_path"):
            data.pop(k, None)
        data[key] = ""
        cfg.write_text(yaml.safe_dump(data))
        assert cli_main([str(cfg)]) == 2, key
        assert capsys.readouterr().err.strip().splitlines() == [f"pymerge search: error: {cfg}: {key} is an empty path"]
    assert (tmp_path / "history.csv").read_text() == "mine"


def test_cli_resume_refuses_another_evaluate_entry_point(tmp_path, capsys):
    """The config's evaluate: changed between a run and its resume: the history mixed two benchmarks' scores and
    picked its best across them (an audit). The entry point is in the state's fingerprint now."""
    cfg = _cli_setup(tmp_path, state_path="state.json")
    assert cli_main([str(cfg)]) == 0
    capsys.readouterr()
    data = yaml.safe_load(cfg.read_text())
    data["evaluate"] = "evalcli:evaluate_inf"
    cfg.write_text(yaml.safe_dump(data))
    assert cli_main([str(cfg), "--budget", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate" in err[0] and "state.json" in err[0], err
    assert len(json.load(open(tmp_path / "state.json"))["history"]) == 6
    data["evaluate"] = "evalcli:evaluate"  # the same one again resumes
    cfg.write_text(yaml.safe_dump(data))
    assert cli_main([str(cfg), "--budget", "9"]) == 0


def test_cli_a_module_beside_the_config_does_not_replace_the_search_libraries(tmp_path, capsys, monkeypatch):
    """A cma.py beside the config (as Python puts a script's folder first) replaced the cma package: a traceback
    (an audit). The libraries are imported first, and the config's folder leaves sys.path after the search."""
    import sys
    cfg = _cli_setup(tmp_path)
    (tmp_path / "cma.py").write_text("raise SystemExit('the user cma.py was imported')\n")
    monkeypatch.delitem(sys.modules, "cma", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli_main([str(cfg)]) == 0, capsys.readouterr().err
    assert str(tmp_path) not in sys.path


def test_result_save_into_a_file_is_one_line(tmp_path):
    pool = CheckpointPool([{"theta": torch.ones(3)}, {"theta": torch.zeros(3)}])

    class Vec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(3))
    result = optimize(pool, lambda m: float(m.theta.detach().sum()), model=Vec(), budget=2, popsize=2, log=None)
    (tmp_path / "f").write_text("mine")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'f'}: exists and is not a folder"):
        result.save(str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "mine"
    # a folder where one of its files goes: a raw IsADirectoryError, after the earlier search's json was removed
    out = tmp_path / "out"
    (out / "history.csv").mkdir(parents=True)
    (out / "history.json").write_text("earlier")
    with pytest.raises(InputError, match=rf"^{out / 'history.csv'}: is a folder, where the search writes a file"):
        result.save(str(out))
    assert (out / "history.json").read_text() == "earlier"


def test_replaced_files_are_on_disk_before_their_name(tmp_path, monkeypatch):
    """The search's state (rewritten every generation), its reports and compressed pools are written beside their
    path and renamed over it: the temporary file was never fsynced, so a power cut after the rename could leave
    an empty state file where the last generation's had been. Now: the file's data, then the rename, then the
    folder's entry."""
    from pymerge.io import files
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    path = str(tmp_path / "state.json")
    files.replace_file(path, lambda p: open(p, "w").write("{}"),
                       install=lambda a, b: events.append(("install", b)) or real_replace(a, b))
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "install", "fsync"], events
    real = os.path.realpath(path)  # what /proc/self/fd names, a link in the temporary folder's path resolved
    assert os.path.basename(events[0][1]).startswith(".state.json.pymerge-tmp-"), events
    assert os.path.dirname(events[0][1]) == events[2][1] == os.path.dirname(real), events
    assert open(path).read() == "{}"


def test_a_name_near_the_limit_is_replaced_and_a_long_error_keeps_its_cause(tmp_path):
    """A legal 250-byte state file could not be written: replace_file's temporary name (a dot, the name, a tag and
    8 characters) passed NAME_MAX; and the CLI cut an error past 1,000 characters at its end, which dropped the
    cause ("File name too long") after a long path (an audit)."""
    from pymerge.errors import exception_line
    from pymerge.io import files
    path = str(tmp_path / ("s" * 245 + ".json"))
    for text in ("{}", "[]"):
        files.replace_file(path, lambda p: open(p, "w").write(text))
        assert open(path).read() == text
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert files.replace_file_prefix("state.json") == ".state.json.pymerge-tmp-"  # short names as before
    line = exception_line(OSError(f"{'x/' * 2000}: File name too long"))
    assert len(line) <= MAX_ERROR_CHARS and line.startswith("x/x/") and line.endswith(": File name too long")


@pytest.mark.parametrize("where", ["made", "written"])
def test_a_ctrl_c_in_a_state_save_leaves_no_file_and_no_descriptor(tmp_path, monkeypatch, ctrl_c, where):
    """A SIGINT just as replace_file's temporary file was made (mkstemp returned, its caller's cleanup not yet
    entered) left the file beside the state and its descriptor open, one per interrupt (an audit's Ctrl-C storm);
    one as it was written is cleaned up as before. The old state stays."""
    import tempfile
    from pymerge.io import files
    path = str(tmp_path / "state.json")
    files.replace_file(path, lambda p: open(p, "w").write("old"))
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kw):
        made = real_mkstemp(*args, **kw)
        if where == "made":
            ctrl_c()
            time.sleep(0.01)  # (delivered here, between bytecodes, where nothing holds it)
        return made

    def write(tmp):
        open(tmp, "w").write("new")
        if where == "written":
            ctrl_c()
            time.sleep(0.01)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        files.replace_file(path, write)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["state.json"] and open(path).read() == "old"
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_nameless_write_error_names_the_file_being_written(tmp_path, capsys):
    """A full disk under a buffered write (a search's history.csv, its plot, a saved pool) raised OSError with
    no file name: the CLI said only "No space left on device" (an audit). replace_file names its file."""
    from pymerge import cli
    from pymerge.io import files
    path = str(tmp_path / "history.csv")

    def full(tmp):
        with open(tmp, "w") as fh:
            fh.write("eval,objective\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError) as err:
        files.replace_file(path, full)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, path)
    assert os.listdir(tmp_path) == []  # nothing half written, no temporary file
    cli._say_system_error(err.value)
    assert path in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [({"sigma0": "nan"}, "sigma0 must be a finite step size"),
                                          ({"budget": 0}, "budget must be an integer from 1"),
                                          ({"popsize": 1}, "popsize must be an integer from 2"),
                                          ({"replicas": 2.5}, "replicas must be an integer"),
                                          ({"seed": "x"}, "seed must be an integer")])
def test_cli_refuses_search_settings_before_building_the_pool(tmp_path, capsys, monkeypatch, bad, message):
    """A typo in search: was refused only after the pool was built (minutes for a large model) and the entry
    points imported: the pool's description came first, then the one-line error."""
    from pymerge import pool as pool_module
    cfg = _cli_setup(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["search"].update(bad)
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(pool_module, "CheckpointPool", lambda *a, **k: pytest.fail("the pool was built"))
    assert cli_main([str(cfg)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and message in out.err and len(out.err.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_out_that_would_write_over_or_into_an_input(tmp_path, capsys):
    """OUT's result files replaced the search's own config where it was named best_merge.yml and OUT was its
    folder, and --out naming a source model's folder wrote the results into it (an audit): refused in one line,
    nothing changed."""
    (tmp_path / "model").mkdir()
    save_file({"theta": torch.zeros(16)}, str(tmp_path / "model" / "model.safetensors"))
    cfg = _cli_setup(tmp_path, base="model", out=".")
    own = cfg.rename(tmp_path / "best_merge.yml")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [([str(own)], "its best_merge.yml would replace"),
             ([str(own), "--out", str(tmp_path / "model")], "is an input of the search"),
             ([str(own), "--out", str(tmp_path / "model" / "results")], "is an input of the search (inside")]
    for argv, message in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "model" / "results").exists()


def test_a_search_refused_by_another_s_lock_leaves_the_folder_it_found_missing(tmp_path, capsys, monkeypatch):
    """Two searches into a missing out: both saw it missing and both counted it as made; the one refused by the
    other's lock removed it as a failed search's empty folder, while the other searched on, and a third search
    then locked a new folder of that name and wrote its results beside the second's (a peers audit). The
    refused one removes nothing now: the folder is the other's."""
    from pymerge.search import cli as search_cli
    cfg = _cli_setup(tmp_path)

    def busy(path, message, *args, **kwargs):  # another search made the folder and holds it
        raise InputError(message)
    monkeypatch.setattr(search_cli, "hold_lock", busy)
    assert cli_main([str(cfg)]) == 2
    assert "in use by another pymerge search" in capsys.readouterr().err
    assert (tmp_path / "out").is_dir()
    monkeypatch.undo()
    (tmp_path / "out").rmdir()
    (tmp_path / "evalfail.py").write_text("def evaluate(m):\n    raise RuntimeError('evaluate failed')\n")
    cfg = _cli_setup(tmp_path, evaluate="evalfail:evaluate")
    with pytest.raises(RuntimeError, match="evaluate failed"):
        cli_main([str(cfg)])
    assert not (tmp_path / "out").exists()  # its own failed search's empty folder: removed, as before


def test_a_killed_writer_s_temporary_file_is_swept_by_the_next_write(tmp_path):
    """A search killed while saving its state (every generation), or a pool while saving, left its temporary
    file beside the target for good: 40 KB per killed search, and a compressed pool's hidden safetensors
    temporary as large as the pool (3.3 GB after 8 kills; a peers audit). The temporary file is flock-ed while
    its writer lives; the next write of that path removes the ones whose writer died, never a live one's."""
    import signal
    import subprocess
    import sys
    import textwrap
    path = tmp_path / "state.json"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pymerge.io.files import replace_file
        def write(tmp):
            open(tmp, "w").write("partial")
            print("writing", flush=True)
            time.sleep(60)
        replace_file({str(path)!r}, write)
    """)], stdout=subprocess.PIPE, text=True, cwd=str(tmp_path))
    assert child.stdout.readline() == "writing\n"
    live = [p.name for p in tmp_path.iterdir()]
    assert len(live) == 1 and live[0].startswith(".state.json.pymerge-tmp-"), live
    from pymerge.io.files import replace_file
    replace_file(str(path), lambda tmp: open(tmp, "w").write("{}"))  # the writer lives: its file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + ["state.json"])
    child.send_signal(signal.SIGKILL)
    child.wait()
    (tmp_path / ".other.json.pymerge-tmp-x").write_text("another file's")  # not this path's: kept
    replace_file(str(path), lambda tmp: open(tmp, "w").write("[]"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.pymerge-tmp-x", "state.json"]
    assert path.read_text() == "[]"


def test_a_temporary_file_swept_before_it_is_locked_is_made_again(tmp_path, monkeypatch):
    """Between mkstemp and flock another writer's sweep could take the new file for a dead writer's and remove
    it; the writer then wrote a new, unlocked file by that name and fsynced the removed one (a review)."""
    import tempfile
    from pymerge.io import files
    real, made = tempfile.mkstemp, []

    def mkstemp_then_swept(prefix, dir):
        fd, tmp = real(prefix=prefix, dir=dir)
        made.append(tmp)
        if len(made) == 1:
            files.sweep_unlocked(dir, prefix)  # another process's sweep, in the window
            assert not os.path.exists(tmp)
        return fd, tmp
    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_then_swept)
    path = tmp_path / "state.json"
    files.replace_file(str(path), lambda tmp: open(tmp, "w").write("{}"))
    assert len(made) == 2 and path.read_text() == "{}" and os.listdir(tmp_path) == ["state.json"]


def test_a_temporary_file_a_sweep_holds_is_made_again(tmp_path, monkeypatch):
    """A sweep holding the new file's lock at that moment (it then removes the file) was taken for a filesystem
    without locks: the writer kept the doomed file (a second review)."""
    import fcntl
    import tempfile
    from pymerge.io import files
    real, made, held = tempfile.mkstemp, [], []

    def mkstemp_held(prefix, dir):
        fd, tmp = real(prefix=prefix, dir=dir)
        made.append(tmp)
        if len(made) == 1:  # another process's sweep: locked it, and removes it once this writer moves on
            held.append(os.open(tmp, os.O_RDONLY))
            fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, tmp
    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_held)
    path = tmp_path / "state.json"

    def write(tmp):
        assert tmp == made[-1] and len(made) == 2  # the second file, not the one the sweep holds
        os.remove(made[0])
        os.close(held[0])
        open(tmp, "w").write("{}")
    files.replace_file(str(path), write)
    assert path.read_text() == "{}" and os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("how", ["renamed over", "rewritten", "removed"])
def test_a_checkpoint_replaced_during_the_search_writes_no_best_merge_yml(tmp_path, capsys, how):
    """A source replaced mid-search (a fresh download renamed over it) on the host tier, which holds copies: the
    search scored the old file's merges and exited 0 with a best_merge.yml naming the new one, which `pymerge
    merge` built into another model (an audit). Now one line, exit 2, the results kept, no best_merge.yml."""
    cfg = _cli_setup(tmp_path)
    target = tmp_path / "c1.safetensors"
    module = "evalchange_" + how.replace(" ", "_")  # (a module of its own: imported modules are cached by name)
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        import os
        from safetensors.torch import save_file
        import torch
        SEEN = [0]
        def evaluate(m):
            SEEN[0] += 1
            if SEEN[0] == 3:
                if {how!r} == "renamed over":
                    save_file({{"theta": torch.ones(16)}}, {str(target) + '.new'!r})
                    os.replace({str(target) + '.new'!r}, {str(target)!r})
                elif {how!r} == "rewritten":
                    os.utime({str(target)!r}, ns=(0, 0))  # (a rewrite moves the mtime as this does)
                else:
                    os.unlink({str(target)!r})
            return -float(m.theta.detach().norm())
    """))
    cfg.write_text(cfg.read_text().replace("evalcli:evaluate", f"{module}:evaluate"))
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "best_merge.yml" in err[0] and "not written" in err[0], err
    assert (tmp_path / "out" / "history.json").exists() and not (tmp_path / "out" / "best_merge.yml").exists()


def test_a_checkpoint_rewritten_with_its_time_put_back_is_warned_of(tmp_path, capsys):
    """A source rewritten in place mid-search with its modification time put back (touch -r, cp -p, an unzip
    keeping times): only the change time moved, as for a chmod, and the search wrote a best_merge.yml building
    another merge than the one scored, silently (an audit). Refusing it would refuse a chmod too (a review: hours
    of search ended with exit 2): best_merge.yml is written, with a warning naming the file."""
    cfg = _cli_setup(tmp_path)
    target = tmp_path / "c1.safetensors"
    (tmp_path / "evaltouched.py").write_text(textwrap.dedent(f"""
        import os
        from safetensors.torch import save
        import torch
        SEEN = [0]
        def evaluate(m):
            SEEN[0] += 1
            if SEEN[0] == 3:
                st = os.stat({str(target)!r})
                data = save({{"theta": torch.full((16,), 100.0)}})
                assert len(data) == st.st_size
                with open({str(target)!r}, "r+b") as fh:
                    fh.write(data)
                os.utime({str(target)!r}, ns=(st.st_atime_ns, st.st_mtime_ns))
            return -float(m.theta.detach().norm())
    """))
    cfg.write_text(cfg.read_text().replace("evalcli:evaluate", "evaltouched:evaluate"))
    assert cli_main([str(cfg)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and str(target) in warned[0] and "change time moved" in warned[0], warned
    assert (tmp_path / "out" / "best_merge.yml").exists()


def test_a_state_path_that_is_a_checkpoint_file_of_the_pool_is_refused(tmp_path):
    """Through the Python API (the CLI refused it already): the file was read as a broken state and the error
    advised deleting it, a model's weights (an audit)."""
    cfg = _cli_setup(tmp_path)
    pool = CheckpointPool([str(tmp_path / f"c{i}.safetensors") for i in range(3)])
    before = (tmp_path / "c1.safetensors").read_bytes()
    for given in (tmp_path / "c1.safetensors", tmp_path / "link.safetensors"):
        if given.name == "link.safetensors":
            os.symlink(tmp_path / "c1.safetensors", given)
        with pytest.raises(InputError, match=r"is the checkpoint file .*c1.safetensors, which the pool was built from; "
                                             r"choose another state_path"):
            optimize(pool, lambda m: 0.0, model=Vec(16), budget=3, state_path=str(given), log=None)
    assert (tmp_path / "c1.safetensors").read_bytes() == before and cfg.exists()
    assert not os.path.exists(str(tmp_path / "c1.safetensors") + ".lock")


def test_what_the_pool_was_built_from_is_known_and_a_chmod_is_no_change(tmp_path):
    """pool.changed_file() (what the search checks before best_merge.yml) and pool.read_file() (what saving must
    not write over): a chmod or a new hard link moves only the ctime and is no change (a review: hours of search
    ended with exit 2); a folder source's index and config are its files too (a review: save replaced an index)."""
    from safetensors.torch import save_file
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"theta": torch.zeros(16)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"theta": "model-00001-of-00001.safetensors"}}))
    (folder / "config.json").write_text("{}")
    save_file({"theta": torch.ones(16)}, str(tmp_path / "c.safetensors"))
    pool = CheckpointPool([str(folder), str(tmp_path / "c.safetensors")])
    assert pool.changed_file() is None
    os.chmod(tmp_path / "c.safetensors", 0o600)
    os.link(tmp_path / "c.safetensors", tmp_path / "hard.safetensors")
    assert pool.changed_file() is None
    assert pool.touched_file().startswith(f"{tmp_path / 'c.safetensors'}: its change time moved")  # a warning's
    assert pool.read_file(tmp_path / "hard.safetensors") == f"the checkpoint file {tmp_path / 'c.safetensors'}"
    for inside in ("model.safetensors.index.json", "config.json", "new.safetensors"):
        assert pool.read_file(folder / inside) == f"inside the model folder {folder}", inside
    assert pool.read_file(tmp_path / "elsewhere.json") is None and pool.read_file(None) is None
    os.utime(tmp_path / "c.safetensors", ns=(0, 0))
    assert pool.changed_file() == f"{tmp_path / 'c.safetensors'}: rewritten since the pool read it"
    assert CheckpointPool([{"theta": torch.ones(16)}]).changed_file() is None


def test_cli_names_a_source_whose_index_lists_no_file(tmp_path, capsys):
    """Two such folders were "the same checkpoint; list it once" (their empty file sets are equal)."""
    cfg = _cli_setup(tmp_path)
    for name in ("e1", "e2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    data = yaml.safe_load(cfg.read_text())
    data["sources"] = ["e1", "e2"]
    cfg.write_text(yaml.safe_dump(data))
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pymerge search: error: {cfg}: sources[0] (e1): holds no tensors (its index lists no file)"], err


@pytest.mark.parametrize("kw, words", [
    ({"evaluate": None}, "evaluate must be a function, got None"),  # failed after the first merge into model
    ({"objective": 5}, "objective must be a function, got 5"),
    ({"log": 5}, "log must be a function, got 5"),  # failed after the first generation
    ({"state_path": 3}, "state_path must be a path, got 3"),  # an int was taken for an open file descriptor
    ({"state_path": "s\0.json"}, "holds a NUL character"),
    ({"normalize": "no"}, "normalize must be a bool, got 'no'"),  # ran normalized
    ({"bounds": "01"}, "bounds must be two numbers"),  # was (0, 1)
    ({"bounds": (False, True)}, "bounds must be two numbers"),
    ({"x0": [True, False, True, False]}, "x0 must be 4 numbers"),
])
def test_search_arguments_are_checked_before_anything_is_written(tmp_path, kw, words):
    pool, evaluate, _ = synthetic(n=4)
    model = Vec()
    before = model.theta.detach().clone()
    args = {"evaluate": evaluate, "log": None, **kw}
    with pytest.raises(InputError, match=re.escape(words)):
        optimize(pool, args.pop("evaluate"), model=model, budget=4, popsize=2, **args)
    assert torch.equal(model.theta.detach(), before) and list(tmp_path.iterdir()) == []


def test_state_path_may_be_a_pathlib_path(tmp_path):
    """Path(...) + ".lock" raised TypeError after the state's folder was made."""
    pool, evaluate, _ = synthetic(n=3)
    path = tmp_path / "new" / "state.json"
    first = optimize(pool, evaluate, model=Vec(), budget=6, popsize=3, seed=1, state_path=path, log=None)
    assert path.is_file()
    again = optimize(pool, evaluate, model=Vec(), budget=6, popsize=3, seed=1, state_path=str(path), log=None)
    assert again.best_objective == first.best_objective and len(again.history) == len(first.history)


def test_an_x0_tensor_whose_storage_is_freed_is_refused_not_read():
    """np.asarray read heap memory past the freed storage: garbage as the search's start."""
    pool, evaluate, _ = synthetic(n=3)
    x0 = torch.full((3,), 1 / 3)
    x0.untyped_storage().resize_(0)
    with pytest.raises(InputError, match="x0: its storage holds 0 bytes"):
        optimize(pool, evaluate, model=Vec(), budget=4, popsize=2, x0=x0, log=None)
    with pytest.raises(InputError, match="x0 must have 3 values"):  # checked before the copy
        optimize(pool, evaluate, model=Vec(), budget=4, popsize=2, x0=torch.tensor([0.3]).expand(10**8), log=None)
    grad = torch.full((3,), 1 / 3, requires_grad=True)  # numpy's "Can't call numpy() on Tensor that requires grad"
    assert optimize(pool, evaluate, model=Vec(), budget=2, popsize=2, x0=grad, log=None).history


def test_pareto_front_and_macro_average_refuse_what_they_cannot_read_and_scale():
    from pymerge.search.report import macro_average, pareto_front
    with pytest.raises(InputError, match="scores must be a non-empty dict"):
        macro_average([1, 2])  # an IndexError
    with pytest.raises(InputError, match="scores must be a non-empty dict"):
        macro_average({})  # NaN with numpy's warning
    with pytest.raises(InputError, match=r"scores\['a'\] must be a number, got \[1, 2\]"):
        macro_average({"a": [1, 2], "b": 0.5})  # 1.5 from the list's mean, as if its items were tasks
    with pytest.raises(InputError, match=r"scores\['a'\] must be a number, got None"):
        macro_average({"a": None})
    assert macro_average({"a": 1, "b": np.float32(0.5)}) == 0.75
    with pytest.raises(InputError, match="points must be a list of score vectors"):
        pareto_front(None)
    x = np.linspace(0, 1, 4000)
    assert pareto_front(np.stack([x, 1 - x], 1)) == list(range(4000))  # every point on the front: 40 s before
    # an audit: inf for two finite scores, sorted's raw TypeError, a tensor's RuntimeError, complex's real part
    assert macro_average({"a": 1e308, "b": 1e308}) == 1e308
    assert macro_average({1: 0.5, "a": 0.25}) == 0.375
    for points in (torch.ones(3, 2, requires_grad=True), [[1 + 2j, 0.5]]):
        with pytest.raises(InputError, match="points must be a list of score vectors"):
            pareto_front(points)


def test_a_resume_into_another_model_is_refused(tmp_path):
    """The state's fingerprint names the model scored (its class, and its tensors' names, dtypes and shapes): a
    resume into a bfloat16 build of it mixed bfloat16 scores into the float32 history, exit 0 (an audit)."""
    pool, evaluate, _ = synthetic()
    path = str(tmp_path / "s.json")
    optimize(pool, evaluate, model=Vec(), budget=5, popsize=4, state_path=path, log=None)
    with pytest.raises(InputError, match="differs in model"):
        optimize(pool, evaluate, model=Vec().to(torch.bfloat16), budget=9, popsize=4, state_path=path, log=None)

    class Other(Vec):
        pass
    with pytest.raises(InputError, match="differs in model"):
        optimize(pool, evaluate, model=Other(), budget=9, popsize=4, state_path=path, log=None)
    # the same model again resumes; a state written before the fingerprint named the model was not compared, and
    # resumed into the bfloat16 build (an audit): refused
    optimize(pool, evaluate, model=Vec(), budget=9, popsize=4, state_path=path, log=None)
    state = json.loads(open(path).read())
    del state["fingerprint"]["model"]
    state.pop("digest")
    open(path, "w").write(json.dumps(state))
    with pytest.raises(InputError, match="older pymerge, which did not record the model it searched"):
        optimize(pool, evaluate, model=Vec().to(torch.bfloat16), budget=13, popsize=4, state_path=path, log=None)


def test_an_interrupt_keeps_every_finished_batch_of_a_generation(tmp_path, monkeypatch):
    """The state was written once per generation: a Ctrl-C after 6 of a generation's 8 candidates lost all 6
    (minutes each on a real model). A batch is saved once _SAVE_EVERY_S have passed (0 here: every batch), and
    the resumed search is the uninterrupted one."""
    monkeypatch.setattr(optimize_module, "_SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(optimize_module, "_SAVE_SHARE", float("inf"))
    pool, evaluate, _ = synthetic()
    full = optimize(pool, evaluate, model=Vec(), budget=25, popsize=8, seed=3, replicas=1, log=None)
    path = str(tmp_path / "s.json")
    with pytest.raises(KeyboardInterrupt):
        optimize(pool, _interrupting(evaluate, 7), model=Vec(), budget=25, popsize=8, seed=3, replicas=1,
                 state_path=path, log=None)
    assert len(json.loads(open(path).read())["history"]) == 7  # the start and 6 of generation 1
    calls = {"n": 0}

    def counted(m):
        calls["n"] += 1
        return evaluate(m)
    resumed = optimize(pool, counted, model=Vec(), budget=25, popsize=8, seed=3, replicas=1, state_path=path,
                       log=None)
    assert calls["n"] == 25 - 7
    assert [r["x"] for r in resumed.history] == [r["x"] for r in full.history]
    assert [r["objective"] for r in resumed.history] == [r["objective"] for r in full.history]


def test_a_fast_search_writes_its_state_once_due_not_every_generation(tmp_path, monkeypatch):
    """Each write holds the whole history, and one per generation made a long search quadratic (57 ms per candidate
    by 8,000 candidates of a 0.1 ms evaluate; an audit). A generation's end is saved once _SAVE_EVERY_S have
    passed, and the search's end always: the finished state resumes as the uninterrupted search."""
    writes = []
    real_save = optimize_module._save_state
    monkeypatch.setattr(optimize_module, "_save_state", lambda path, state, *a: (writes.append(len(state["history"])),
                                                                                real_save(path, state, *a)))
    pool, evaluate, _ = synthetic()
    path = str(tmp_path / "s.json")
    full = optimize(pool, evaluate, model=Vec(), budget=41, popsize=8, seed=3, state_path=path, log=None)
    assert writes == [1, 41]  # the start (candidate 0), then the end: no time had passed for another
    assert len(json.loads(open(path).read())["history"]) == 41
    again = optimize(pool, _interrupting(evaluate, 0), model=Vec(), budget=41, popsize=8, seed=3, state_path=path,
                     log=None)
    assert [r["x"] for r in again.history] == [r["x"] for r in full.history]
    writes.clear()
    monkeypatch.setattr(optimize_module, "_SAVE_EVERY_S", 0.0)  # a slow evaluate: every generation is due
    monkeypatch.setattr(optimize_module, "_SAVE_SHARE", float("inf"))
    optimize(pool, evaluate, model=Vec(), budget=41, popsize=8, seed=3, state_path=str(tmp_path / "t.json"), log=None)
    assert writes == [1, 9, 17, 25, 33, 41]


def test_writes_of_a_large_state_keep_to_a_tenth_of_the_search(tmp_path, monkeypatch):
    """A write takes longer as the history grows (41 s for 1,000 candidates of 5,000 weights): once it took longer
    than the 30 s between writes, the search was quadratic again, 41 % of a per-layer search's time spent writing
    (an audit). A write is due once ten times the last one's duration has passed too: on a clock of its own (1 s per
    evaluate, a write 0.05 s per saved candidate) the writes before the last keep under a fifth of the time, where
    one every 3 s took most of it; and the search is the one run without a state."""
    now = [0.0]
    monkeypatch.setattr(optimize_module, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], perf_counter=time.perf_counter, time_ns=time.time_ns))
    monkeypatch.setattr(optimize_module, "_SAVE_EVERY_S", 3.0)
    writes, real_save = [], optimize_module._save_state

    def slow_save(path, state, *a):
        now[0] += 0.05 * len(state["history"])
        writes.append((len(state["history"]), 0.05 * len(state["history"])))
        real_save(path, state, *a)
    monkeypatch.setattr(optimize_module, "_save_state", slow_save)
    pool, evaluate, _ = synthetic()

    def ticking(m):
        now[0] += 1.0
        return evaluate(m)
    path = str(tmp_path / "s.json")
    res = optimize(pool, ticking, model=Vec(), budget=200, popsize=8, seed=3, replicas=2, state_path=path, log=None)
    before_last = sum(cost for _, cost in writes[:-1])
    assert writes[-1][0] == 200 and len(writes) > 4
    assert before_last / (now[0] - writes[-1][1]) < 0.2, writes  # the history grows between writes: 0.1 + its growth
    # a resume's first write waits as long, its reading of the state taken as a write's duration (it came 30 s in,
    # whatever the state's size: a review)
    real_load = optimize_module._load_state

    def slow_load(path, fingerprint, shape):
        state = real_load(path, fingerprint, shape)
        now[0] += 0.05 * len(state["history"]) if state else 0.0
        return state
    monkeypatch.setattr(optimize_module, "_load_state", slow_load)
    writes.clear()
    more = optimize(pool, ticking, model=Vec(), budget=260, popsize=8, seed=3, replicas=2, state_path=path, log=None)
    assert writes == [(260, 13.0)]  # reading 200 candidates took 10 s: nothing due before 100 s more, the end first
    monkeypatch.undo()
    full = optimize(pool, evaluate, model=Vec(), budget=260, popsize=8, seed=3, replicas=2, log=None)
    assert [r["x"] for r in more.history] == [r["x"] for r in full.history]
    assert [r["x"] for r in res.history] == [r["x"] for r in full.history[:200]]


def test_a_converged_search_says_once_that_the_rest_of_its_budget_repeats_one_merge():
    """CMA-ES's own stop tests are off (the budget is the user's), so a converged search spent the rest of it on one
    merge without a word: 85 % of a 20,000-candidate search (an audit). The log says so once."""
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(64, generator=g) for _ in range(3)]
    target = sum(float(a) * t for a, t in zip(np.random.RandomState(100).dirichlet(np.ones(3)), thetas))
    pool = CheckpointPool([{"theta": t} for t in thetas])
    evaluate = lambda m: -float(((m.theta.detach() - target) ** 2).sum())  # noqa: E731
    lines = []
    res = optimize(pool, evaluate, model=Vec(64), budget=1200, popsize=6, seed=0, log=lines.append)
    said = [line for line in lines if "CMA-ES has converged" in line]
    assert len(said) == 1, said
    gen = int(re.search(r"generation (\d+) is the same merge", said[0]).group(1))
    last = np.array([r["weights"] for r in res.history if r["generation"] == gen], np.float32)
    assert (last == last[0]).all() and f"({1200 - 1 - 6 * gen} candidates)" in said[0]
    lines.clear()
    optimize(pool, evaluate, model=Vec(64), budget=60, popsize=6, seed=0, log=lines.append)
    assert lines and not any("converged" in line for line in lines)


def test_an_evaluate_that_only_returns_nan_stops_after_one_generation(tmp_path):
    """Before, the whole budget ran (CMA-ES learns nothing from NaN) and only then came the error."""
    pool, _, _ = synthetic()
    calls = {"n": 0}

    def nan(m):
        calls["n"] += 1
        return float("nan")
    with pytest.raises(InputError, match=r"every candidate so far \(5\) scored NaN or inf; check evaluate\(\)$"):
        optimize(pool, nan, model=Vec(), budget=200, popsize=4, log=None)
    assert calls["n"] == 5
    # one finite score among them and the search goes on
    calls["n"] = 0

    def mostly_nan(m):
        calls["n"] += 1
        return -1.0 if calls["n"] == 3 else float("nan")
    assert len(optimize(pool, mostly_nan, model=Vec(), budget=20, popsize=4, log=None).history) == 20


def test_mid_generation_saves_wait_for_the_interval(tmp_path, monkeypatch):
    """Each save writes the whole history: saved after every candidate, a long search spent more time saving than
    it could lose (a review). At the default interval a quick generation is not saved in its middle: the writes
    are the start's and the interrupt's."""
    pool, evaluate, _ = synthetic()
    path = str(tmp_path / "s.json")
    writes, real = [], optimize_module._save_state
    monkeypatch.setattr(optimize_module, "_save_state", lambda p, state, *a: writes.append(len(state["history"])) or
                        real(p, state, *a))
    with pytest.raises(KeyboardInterrupt):
        optimize(pool, _interrupting(evaluate, 7), model=Vec(), budget=25, popsize=8, seed=3, replicas=1,
                 state_path=path, log=None)
    assert writes == [1, 7]  # generation 1 took less than 30 s
    assert len(json.loads(open(path).read())["history"]) == 7


def test_one_checkpoint_per_group_with_normalize_is_refused():
    """One checkpoint, groups="layer": each row normalized to [1], every candidate the same merge, the whole budget
    spent on it (an audit). normalize=False searches the rows' scale."""
    sources, _, model = _two_group_pool()
    pool = CheckpointPool(sources[:1])
    with pytest.raises(InputError, match="one checkpoint with normalize=True.*pass normalize=False"):
        optimize(pool, lambda m: 0.0, model=model, budget=4, groups="layer", log=None)
    res = optimize(pool, lambda m: -float(m.embed.w.detach().abs().sum()), model=model, budget=6, popsize=3,
                   groups="layer", normalize=False, log=None)
    assert len({tuple(np.ravel(r["weights"])) for r in res.history}) > 1


def test_weights_stay_finite_and_sum_to_one_where_the_sum_overflows():
    """bounds near float's limit: each row's sum overflowed to inf and every weight became 0 (an audit)."""
    pool, evaluate, _ = synthetic(n=3)
    res = optimize(pool, evaluate, model=Vec(), budget=4, popsize=2, bounds=(0, 1e308), x0=[1e308] * 3, log=None)
    for r in res.history:
        w = np.asarray(r["weights"])
        assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    assert np.allclose(res.history[0]["weights"], 1 / 3)


def test_a_complex_score_is_no_number():
    """numpy's complex128(0.5+3j) was taken as 0.5 (float() keeps the real part, with a ComplexWarning; an audit)."""
    from pymerge.search.report import as_number, macro_average
    assert as_number(np.complex128(1 + 5j)) is None and as_number(np.array([1 + 0j])) is None
    assert as_number(torch.tensor(1 + 0j)) is None and as_number(torch.tensor(0.5)) == 0.5
    with pytest.raises(InputError, match=r"scores\['a'\] must be a number"):
        macro_average({"a": np.complex128(1 + 5j)})
    pool, _, _ = synthetic(n=3)
    with pytest.raises(InputError, match="evaluate must return a float"):
        optimize(pool, lambda m: np.complex128(0.5 + 3j), model=Vec(), budget=3, popsize=3, log=None)


def test_task_names_with_dollar_signs_are_plotted_verbatim(tmp_path):
    """'acc $k_5_shot$' is math to matplotlib: the plot raised after the whole search had run, and no best_merge.yml
    was written (an audit)."""
    pytest.importorskip("matplotlib")
    from pymerge.search.report import plot
    history = [{"eval": i, "objective": 0.1 * i, "scores": {"acc $k_5_shot$": 0.1 * i, "b$": 0.2}} for i in range(3)]
    plot(str(tmp_path / "s.png"), history, ["acc $k_5_shot$", "b$"], [0, 2], title="$x_1_2$",
         markers={"ck $a_b_c$": {"acc $k_5_shot$": 0.3, "b$": 0.1}})
    assert (tmp_path / "s.png").stat().st_size > 0


def test_the_plot_keeps_the_callers_matplotlib_backend(tmp_path):
    """SearchResult.save's plot switched pyplot's backend to Agg: a notebook's or a GUI's later plt.show() showed
    nothing (an audit). It draws on a Figure of its own now."""
    pytest.importorskip("matplotlib")
    script = ("import sys, matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt\n"
              "from pymerge.search.report import plot\n"
              "plot(sys.argv[1], [{'eval': i, 'objective': 0.1 * i, 'scores': {'a': 0.1 * i, 'b': 0.2}} for i in range(3)],"
              " ['a', 'b'], [0, 2])\n"
              "print(matplotlib.get_backend(), len(plt.get_fignums()))\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.png")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["svg", "0"]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_under_torchrun_is_refused_in_one_line_unless_told_to_run_alone(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank ran a search of its own, racing for out's lock: one failed "in use", another was
    killed by torchrun (an audit)."""
    cfg = _cli_setup(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs in one process, not under torchrun" in err[0] and "PYMERGE_NO_DIST=1" in err[0]
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("PYMERGE_NO_DIST", "1")
    assert cli_main([str(cfg)]) == 0 and (tmp_path / "out" / "best_merge.yml").exists()


def test_cli_in_a_job_of_one_rank_runs(tmp_path, monkeypatch):
    """RANK and WORLD_SIZE=1 (torchrun --nproc-per-node 1, a cluster's single worker): no race, so the search runs
    (a review of the torchrun refusal)."""
    cfg = _cli_setup(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli_main([str(cfg)]) == 0


def test_two_searches_in_two_threads_leave_the_callers_numpy_stream_as_it_was():
    """Each search swaps numpy's global RNG state for its own around cma's calls: two searches in two threads
    interleaved their swaps, one saved the other's state as the caller's and left it there (an audit: 3 of 3
    trials). The swaps take turns now; each search asks what it asks alone."""
    import threading
    torch.manual_seed(0)
    pool = CheckpointPool([{"w": torch.randn(8, 8)} for _ in range(6)], num_threads=1)

    def target():
        t = torch.nn.Module()
        t.w = torch.nn.Parameter(torch.zeros(8, 8), requires_grad=False)
        return t

    def search(seed, out):
        r = optimize(pool, lambda m: float(m.w.sum()), target(), budget=600, popsize=6, seed=seed, log=None,
                     replicas=1)
        out[seed] = [h["x"] for h in r.history]
    alone = {}
    search(3, alone)
    search(4, alone)
    for _ in range(2):
        np.random.seed(5)
        together = {}
        threads = [threading.Thread(target=search, args=(s, together)) for s in (3, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
        assert np.random.rand() == np.random.RandomState(5).rand()


def test_a_child_forked_while_a_search_swaps_the_rng_can_search():
    """The searches' RNG-swap lock held by another thread at a fork (a fork pool's workers that search) was held in
    the child for good: its first search hung (a review). The child gets a lock of its own."""
    import importlib
    opt = importlib.import_module("pymerge.search.optimize")  # (the package's `optimize` is the function)
    with opt._GLOBAL_RNG_SWAP:  # as another thread inside cma's tell at the fork
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not opt._GLOBAL_RNG_SWAP.locked() else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_resume_with_another_objective_of_the_same_name_is_refused(tmp_path):
    """objective= is fingerprinted by name, and every lambda's is "<lambda>": a search resumed with another mixed
    the two objectives' values in one history, its best picked among the old ones (an audit). Each saved objective
    must be this objective of its saved scores; the same rule written again resumes."""
    pool, evaluate, _ = synthetic()
    path = str(tmp_path / "s.json")
    kw = dict(model=Vec(), popsize=4, state_path=path, log=None)
    optimize(pool, evaluate, budget=5, objective=lambda s: s["score"], **kw)
    with pytest.raises(InputError, match=r"s.json: saved candidate 0 has objective .*, but this search's objective of "
                                         r"its scores is .*: the state is from a search with another objective="):
        optimize(pool, evaluate, budget=9, objective=lambda s: 100 * s["score"], **kw)
    with pytest.raises(InputError, match=r"s.json: this search's objective raised KeyError \(\"'other'\"\) on "
                                         r"saved candidate 0's scores: the state is from a search with another"):
        optimize(pool, evaluate, budget=9, objective=lambda s: s["other"], **kw)
    assert len(optimize(pool, evaluate, budget=9, objective=lambda s: s["score"], **kw).history) == 9


def test_a_report_is_never_written_over_a_search_state(tmp_path):
    """state_path="out/history.json", then result.save("out"): the report replaced the state, and the next resume
    failed on it (an audit; `pymerge search` refuses such a state_path). Refused, nothing removed."""
    pool, evaluate, _ = synthetic()
    out = tmp_path / "out"
    state = out / "history.json"
    res = optimize(pool, evaluate, model=Vec(), budget=5, popsize=4, state_path=str(state), log=None)
    (out / "history.csv").write_text("kept")
    before = state.read_bytes()
    with pytest.raises(InputError, match=r"history.json: is a search's saved state \(a state_path\), where the report"):
        res.save(str(out))
    assert state.read_bytes() == before and (out / "history.csv").read_text() == "kept"
    assert len(optimize(pool, evaluate, model=Vec(), budget=9, popsize=4, state_path=str(state),
                        log=None).history) == 9
    paths = res.save(str(tmp_path / "report"))  # elsewhere, and over an earlier report
    assert set(json.loads(open(paths["json"]).read())) >= {"best", "history"}
    assert res.save(str(tmp_path / "report"))["json"] == paths["json"]


def test_a_state_path_naming_a_loaded_pools_file_is_refused(tmp_path):
    """A loaded compressed pool kept no record of its file: a state_path naming it was read as a corrupt state,
    the error advising to delete it (hours of compression), and a lock file went beside it (an audit)."""
    g = torch.Generator().manual_seed(2)
    base = {"theta": torch.randn(64, generator=g)}
    cks = [{"theta": base["theta"] + 0.1 * torch.randn(64, generator=g)} for _ in range(3)]
    saved = tmp_path / "pool.safetensors"
    CheckpointPool(cks, base=base, compress="int8").save(str(saved))
    before = saved.read_bytes()
    loaded = CheckpointPool.load(str(saved))
    evaluate = lambda m: float(m.theta.detach().mean())  # noqa: E731
    for spelling in (str(saved), str(tmp_path / "." / "pool.safetensors")):
        with pytest.raises(InputError, match=rf"state_path {re.escape(spelling)}: is the saved pool {saved}, which the "
                                             r"pool was built from; choose another state_path"):
            optimize(loaded, evaluate, model=Vec(64), budget=4, popsize=3, state_path=spelling, log=None,
                     method="task_arithmetic")
    with pytest.raises(InputError, match=r"is the saved pool .*, which this pool was built from"):
        loaded.save(str(saved), overwrite=True)
    assert saved.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["pool.safetensors"]
    other = tmp_path / "other" / "model.safetensors"  # any safetensors file: not "delete it to start afresh"
    other.parent.mkdir()
    save_file({"theta": torch.zeros(64)}, str(other))
    with pytest.raises(InputError, match=r"model.safetensors: is a safetensors file \(a model's or a saved pool's\), "
                                         r"not a search state; choose another state_path"):
        optimize(loaded, evaluate, model=Vec(64), budget=4, popsize=3, state_path=str(other), log=None,
                 method="task_arithmetic")
    assert os.listdir(other.parent) == ["model.safetensors"]  # no lock file beside it


def test_out_removed_before_it_is_locked_is_refused_not_replaced_by_a_file(tmp_path, capsys, monkeypatch):
    """A search that fails removes the out folder it made; another search into the same out, between making sure of
    it and locking it, then made (and locked) an empty file there, ran its whole budget and lost its results to
    "exists and is not a folder" at the end, the file left behind (an audit). Now it is refused at once."""
    cfg = _cli_setup(tmp_path)
    real = search_cli.hold_lock

    def after_the_other_search_removed_out(path, *args, **kwargs):
        os.rmdir(path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(search_cli, "hold_lock", after_the_other_search_removed_out)
    assert cli_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out: was removed or replaced as this began" in err[0], err
    assert not os.path.lexists(tmp_path / "out")


def test_search_advice_names_what_a_search_config_can_set(tmp_path, capsys, monkeypatch):
    """A search's linear method_params were refused with the pool's Python advice (normalize=), and a search out of
    memory was told to lower --chunk-size, which pymerge search does not take (an audit: tests/test_advice.py)."""
    from pymerge import cli as pymerge_cli
    cfg = _cli_setup(tmp_path, method_params={"normalize": True})
    assert pymerge_cli.main(["search", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.normalize: true" in err[0], err
    cfg = _cli_setup(tmp_path)
    import pymerge.search

    def out_of_memory(argv):
        raise MemoryError()
    monkeypatch.setattr(pymerge.search, "cli_main", out_of_memory)
    assert pymerge_cli.main(["search", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "memory_budget" in err and "--chunk-size" not in err, err


def test_a_config_and_an_out_reached_through_a_link_and_dotdot(tmp_path, capsys, monkeypatch):
    """`pymerge search ln/../s.yml` (ln a link to real/deep) read real/s.yml but resolved its sources, entry points
    and out against the current folder (abspath's textual ".."): other models searched, exit 0; and `--out ln/../new`
    was refused after the search with the empty folder left, as tempfile made the folder absolute as text (an audit).
    Both are the kernel's paths now."""
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    (tmp_path / "ln").symlink_to(real / "deep", target_is_directory=True)
    _cli_setup(real)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["ln/../s.yml"]) == 0, capsys.readouterr().err
    best = yaml.safe_load((real / "out" / "best_merge.yml").read_text())
    assert [m["model"] for m in best["models"]] == [str(real / f"c{i}.safetensors") for i in range(3)]
    assert cli_main(["ln/../s.yml", "--out", "ln/../new/res"]) == 0, capsys.readouterr().err
    assert "history.json" in os.listdir(real / "new" / "res") and not (tmp_path / "new").exists()
    data = yaml.safe_load((real / "s.yml").read_text())  # a state_path through the link: the search state's folder
    data.update(state_path="ln/../st/state.json", out="res2", sources=[f"real/c{i}.safetensors" for i in range(3)])
    (tmp_path / "s2.yml").write_text(yaml.safe_dump(data))
    shutil.copy(real / "evalcli.py", tmp_path)
    assert cli_main(["s2.yml"]) == 0, capsys.readouterr().err
    assert (real / "st" / "state.json").is_file() and not (tmp_path / "st").exists()
    pool = CheckpointPool([str(real / f"c{i}.safetensors") for i in (1, 2)], base=str(real / "c0.safetensors"),
                          compress="int8")
    pool.save("ln/../pool.safetensors")  # a saved pool too
    assert (real / "pool.safetensors").is_file()


def test_a_state_keeps_each_candidates_scores_in_evaluates_order(tmp_path):
    """An objective that sums the scores in their order gives other bits in another (0.1 + 0.7 + 0.2 is 1.0; 0.7 +
    0.2 + 0.1 is 0.9999999999999999): a state written with sorted keys refused its own resume, the objective
    recomputed from the saved scores not being the saved one (a review)."""
    pool, _, _ = synthetic(n=3)
    path = str(tmp_path / "state.json")

    def run(budget):
        return optimize(pool, lambda m: {"z": 0.1, "a": 0.7, "m": 0.2}, model=Vec(), budget=budget, popsize=4,
                        state_path=path, objective=lambda s: sum(s.values()), log=None)
    run(5)
    assert list(json.loads(open(path).read())["history"][0]["scores"]) == ["z", "a", "m"]
    assert len(run(9).history) == 9


def test_a_search_never_writes_over_another_searchs_state_or_report(tmp_path, capsys):
    """One search's state_path inside another's out (an audit): the second search ran every evaluation and was
    refused only when it saved its report; run side by side, the first one's next state save replaced the second's
    report, silently. Now the out is refused before the search (its history.json a saved state, or its lock held),
    and a state save never replaces a file another program put at state_path meanwhile."""
    from pymerge.io.files import hold_lock, release_lock
    cfg = _cli_setup(tmp_path, state_path="shared/history.json")
    assert cli_main([str(cfg)]) == 0  # search A: its state in shared/
    state = (tmp_path / "shared" / "history.json").read_bytes()
    other = yaml.safe_load(cfg.read_text())
    del other["state_path"]
    other["out"] = "shared"  # search B: its results into shared/
    (tmp_path / "b.yml").write_text(yaml.safe_dump(other))
    capsys.readouterr()
    assert cli_main([str(tmp_path / "b.yml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its history.json is another search's saved state" in err[0], err
    assert sorted(os.listdir(tmp_path / "shared")) == ["history.json", "history.json.lock"]
    assert (tmp_path / "shared" / "history.json").read_bytes() == state
    os.unlink(tmp_path / "shared" / "history.json")  # A running, before its first save: its lock is held
    lock = hold_lock(str(tmp_path / "shared" / "history.json.lock"), "busy")
    try:
        assert cli_main([str(tmp_path / "b.yml")]) == 2
        assert "another search's saved state" in capsys.readouterr().err
    finally:
        release_lock(lock)
    assert cli_main([str(tmp_path / "b.yml")]) == 0  # a lock no search holds: a leftover, not a search
    # a file put at a running search's state_path (B's report saved there as A ran) is not replaced
    pool, evaluate, _ = synthetic()
    path = tmp_path / "run" / "state.json"
    calls = [0]

    def evaluate_then_another_writes(model):
        calls[0] += 1
        if calls[0] == 5:
            path.write_text('{"the other": "report"}')
        return evaluate(model)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: another program wrote this file while the "
                                         "search ran"):
        optimize(pool, evaluate_then_another_writes, model=Vec(), budget=12, popsize=4, seed=1, state_path=str(path),
                 log=None)
    assert path.read_text() == '{"the other": "report"}'
    path.unlink()  # deleted meanwhile: written again (nothing to lose)
    calls[0] = 0
    seen = optimize(pool, lambda m: (calls.__setitem__(0, calls[0] + 1), calls[0] == 5 and path.unlink(),
                                     evaluate(m))[2], model=Vec(), budget=12, popsize=4, seed=1, state_path=str(path),
                    log=None)
    assert len(json.loads(path.read_text())["history"]) == len(seen.history) == 12
