"""Distributed search on a (replicas, shards) = (2, 2) mesh, 4 gloo ranks: each replica group (a
"shards" pair) materializes its half of every generation into its own sharded model and runs
evaluate(model) on both its ranks, a forward pass with collectives inside (tensor parallel: the
row-parallel linears all-reduce; HSDP: FSDP2 all-gathers the shards). Same candidates, same best
and the same scores up to the sharded forward's rounding as one process with the same seed; resume
from the state file continues the same run.
"""
import os

import numpy as np
import pytest
import torch

import dist_helpers
from test_dist_mesh import HIDDEN, shard, write_checkpoints
from test_dist_mesh import Block as UnevenBlock

pytestmark = pytest.mark.slow

SEARCH = dict(budget=8, popsize=4, seed=4, sigma0=0.3, method="ties", density=0.6, log=None)
SHAPES = {n: tuple(p.shape) for n, p in UnevenBlock(inter=8).named_parameters()}
LAYOUTS = {"tp_replicas": "tensor parallel over 'shards', a copy per replica", "hsdp": "FSDP2 (Replicate, Shard)"}


def Block():
    """A TP forward needs the activations it splits (heads, the MLP's width) even across ranks."""
    return UnevenBlock(inter=8)


def batch():
    g = torch.Generator().manual_seed(23)
    return torch.randn(2, 3, HIDDEN, generator=g), torch.randn(2, 3, HIDDEN, generator=g, dtype=torch.float64)


def evaluate(model):
    x, target = batch()
    with torch.no_grad():
        out = model(x)  # tensor parallel: a plain tensor, all-reduced over "shards"
    out = out.double()
    return {"fit": -float(((out - target) ** 2).mean()), "size": float(out.abs().mean())}


def history(result):
    return [(r["x"], r["scores"]) for r in result.history], result.best_index


def worker(rank, world, d, files):
    from torch.distributed.device_mesh import init_device_mesh

    import pymerge
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicas", "shards"))
    calls = [0]

    def counted(model):
        calls[0] += 1
        return evaluate(model)

    out = {}
    for layout in LAYOUTS:
        # shard() takes TP's mesh as mesh["tp"]; HSDP shards on the whole mesh
        m = shard(Block(), layout, {"tp": mesh["shards"]} if layout == "tp_replicas" else mesh)
        pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
        calls[0] = 0
        out[layout] = history(pymerge.search.optimize(pool, counted, model=m, **SEARCH)), calls[0]
    m = shard(Block(), "tp_replicas", {"tp": mesh["shards"]})
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    state = os.path.join(d, "state.json") if rank == 0 else None
    # stopped after x0 and generation 1 (a generation cut short is not told to CMA-ES, so a run resumed
    # from there would ask a new generation, not finish the old one), then resumed to the full budget
    pymerge.search.optimize(pool, evaluate, model=m, **{**SEARCH, "budget": 1 + SEARCH["popsize"]}, state_path=state)
    out["resumed"] = history(pymerge.search.optimize(pool, evaluate, model=m, **SEARCH, state_path=state)), None
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import pymerge
    d = str(tmp_path_factory.mktemp("mesh_search"))
    files = write_checkpoints(d, SHAPES)
    ref = pymerge.search.optimize(pymerge.CheckpointPool(files[:3], base=files[3]), evaluate, model=Block(), **SEARCH)
    return history(ref), dist_helpers.run(worker, 4, d, d, files)


@pytest.mark.parametrize("label", ["tp_replicas", "hsdp", "resumed"])
def test_search_on_a_2d_mesh_equals_one_process(runs, label):
    (ref_history, ref_best), results = runs
    assert len(ref_history) == SEARCH["budget"]
    for rank, res in enumerate(results):
        (hist, best), _ = res[label]
        assert best == ref_best and len(hist) == len(ref_history), (rank, label)
        for (x, scores), (rx, rscores) in zip(hist, ref_history):
            assert np.array_equal(x, rx), (rank, label)  # the same candidates, in the same order
            assert scores.keys() == rscores.keys()
            assert all(np.isclose(scores[k], rscores[k], rtol=1e-5, atol=1e-7) for k in scores), (rank, label)


@pytest.mark.parametrize("label", ["tp_replicas", "hsdp"])
def test_each_replica_group_evaluates_half_of_every_generation(runs, label):
    """Both ranks of a replica group run evaluate (their collectives pair up), once per candidate of
    theirs: candidate c of a batch goes to replica group c mod 2; the batches are x0 alone, then
    generations of 4 and 3 (budget 8), so group 0 (ranks 0, 1) evaluates 1 + 2 + 2, group 1 0 + 2 + 1."""
    calls = [res[label][1] for res in runs[1]]
    assert calls == [5, 5, 3, 3], calls
