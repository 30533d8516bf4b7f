"""Sharded pools on 2-D meshes (4 gloo ranks, mesh (2, 2) named ("dp", "tp")) of a small Llama-like
block (attention and MLP, column- and row-parallel linears, RMSNorms):

  fsdp_tp      parallelize_module over "tp", then fully_shard over "dp": FSDP2 x TP, which gives
               strided shards (_StridedShard) for the column-parallel weights, 2-D Shard x Shard for
               the row-parallel ones, and 1-D "dp" meshes for the norms
  hsdp         fully_shard on the 2-D mesh: (Replicate, Shard(0))
  tp_replicas  parallelize_module over "tp" only: each "tp" pair holds a whole copy

One spawned group runs every check and returns what it saw. Reference: the single-process pool on
the same files (computed here, in the test process), bit for bit where the 1-D tests demand bits.
"""
import math
import os

import numpy as np
import pytest
import torch

import dist_helpers
import test_dist_pool

pytestmark = pytest.mark.slow

HIDDEN, INTER, HEADS = 10, 7, 2  # uneven everywhere: 10 rows over tp=2 then dp=2 is 3/2; 7 is 4/3 then 2/2, 2/1
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")
LAYOUTS = ("fsdp_tp", "hsdp", "tp_replicas")
W3 = [0.5, 0.3, 0.2]
CASES = [
    ("linear", 3, dict(method="linear")),
    ("task_arithmetic", 3, dict(method="task_arithmetic", **{"lambda": 0.9})),
    ("ties", 3, dict(method="ties", density=0.55)),
    ("dare_ties", 3, dict(method="dare_ties", density=0.5, rescale=False, seed=5)),
    ("dare_ties_l1", 3, dict(method="dare_ties", density=0.5, seed=5)),
    ("slerp", 1, dict(method="slerp", t=0.3)),
    ("model_stock", 3, dict(method="model_stock")),
]


class Block(torch.nn.Module):
    """Pre-norm attention and SwiGLU MLP, Llama's names; its forward runs unchanged under TP (heads split)."""

    def __init__(self, inter=INTER):
        super().__init__()
        self.attn_norm, self.mlp_norm = torch.nn.RMSNorm(HIDDEN), torch.nn.RMSNorm(HIDDEN)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(3))
        self.o_proj = torch.nn.Linear(HIDDEN, HIDDEN)  # a row-parallel bias: replicated over "tp"
        self.gate_proj, self.up_proj = (torch.nn.Linear(HIDDEN, inter, bias=False) for _ in range(2))
        self.down_proj = torch.nn.Linear(inter, HIDDEN)

    def forward(self, x):
        h = self.attn_norm(x)
        q, k, v = (p(h).unflatten(-1, (-1, HIDDEN // HEADS)).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).flatten(2))
        h = self.mlp_norm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


SHAPES = {n: tuple(p.shape) for n, p in Block().named_parameters()}


def write_checkpoints(d, shapes=SHAPES):
    """3 fine-tunes and a base of tensors `shapes`: a third of model 0's deltas zero (ties at the threshold), model 1 in
    bfloat16, model 2 with few distinct magnitudes (many equal keys)."""
    return test_dist_pool.write_checkpoints(d, shapes, seed=17)


def weights_of(kw, n_src):
    return W3[:n_src] if kw["method"] != "slerp" else [1.0]


def references(files):
    """label -> the single-process pool's merged parameters."""
    import pymerge
    pools = {n: pymerge.CheckpointPool(files[:n], base=files[3]) for n in (1, 3)}
    out = {}
    for label, n_src, kw in CASES:
        m = Block()
        pools[n_src].materialize(weights_of(kw, n_src), into=m, **kw)
        out[label] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return out


def local_index(layout, name, rank):
    """Global flat indices rank holds of tensor `name`, from the layouts' definitions (torch.chunk
    sizes), independent of pymerge and of DTensor's own arithmetic. Rank = 2 * dp + tp."""
    dp, tp = divmod(rank, 2)
    shape = SHAPES[name]
    idx = np.arange(math.prod(shape)).reshape(shape)
    module = name.split(".")[0]

    def take(a, axis, coord):
        rows = [c.numpy() for c in torch.arange(a.shape[axis]).chunk(2)]
        return np.take(a, rows[coord] if coord < len(rows) else np.array([], dtype=np.int64), axis=axis)

    if layout == "hsdp":
        return take(idx, 0, tp).reshape(-1)
    if module in COLWISE:
        idx = take(idx, 0, tp)               # TP's rows first...
        if layout == "fsdp_tp":
            idx = take(idx, 0, dp)           # ...then FSDP2's rows of those (the strided shard)
    elif module in ROWWISE and name.endswith("weight"):
        idx = take(idx, 1, tp)
        if layout == "fsdp_tp":
            idx = take(idx, 0, dp)
    elif layout == "fsdp_tp":                # norms and row-parallel biases: FSDP2 over "dp" only
        idx = take(idx, 0, dp)
    return idx.reshape(-1)


def shard(model, layout, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    if layout in ("fsdp_tp", "tp_replicas"):
        plan = {**{m: ColwiseParallel() for m in COLWISE}, **{m: RowwiseParallel() for m in ROWWISE}}
        parallelize_module(model, mesh["tp"], plan)
    if layout == "fsdp_tp":
        fully_shard(model, mesh=mesh["dp"])
    elif layout == "hsdp":
        fully_shard(model, mesh=mesh)
    return model


def full(m):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in m.named_parameters()}


def local_ptrs(m):
    from torch.distributed.tensor import DTensor
    return {n: (p.to_local() if isinstance(p, DTensor) else p).data_ptr() for n, p in m.named_parameters()}


def error_of(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def worker(rank, world, d, files, refs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    import pymerge
    from pymerge.dist import reads
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ckpts, base = files[:3], files[3]
    out = {"cases": {}, "reads": {}, "nbytes": {}, "placements": {}, "errors": {}}
    models = {layout: shard(Block(), layout, mesh) for layout in LAYOUTS}
    pools = {}
    for layout, m in models.items():
        out["placements"][layout] = {n: repr(getattr(p, "placements", None)) for n, p in m.named_parameters()}
        reads.touched = []
        pools[layout, 3] = pymerge.CheckpointPool(ckpts, base=base, shard_like=m)
        out["reads"][layout], reads.touched = reads.touched, None
        out["nbytes"][layout] = pools[layout, 3].nbytes
        pools[layout, 1] = pymerge.CheckpointPool(ckpts[:1], base=base, shard_like=m)
    for layout, m in models.items():
        for label, n_src, kw in CASES:
            before = local_ptrs(m)
            pools[layout, n_src].materialize(weights_of(kw, n_src), into=m, **kw)
            got, want = full(m), refs[label]
            out["cases"][layout, label] = {
                "ptrs": before == local_ptrs(m),
                "bits": all(torch.equal(got[n].view(torch.int32), want[n].view(torch.int32)) for n in got),
                "close": all(torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-7) for n in got),
                "full": got if rank == 0 else None}
    # layouts a pool cannot hold: one line, the same on every rank, before anything is written
    snapshot = {k: full(m) for k, m in models.items()}
    out["errors"]["wrong_layout"] = error_of(lambda: pools["fsdp_tp", 3].materialize(W3, into=models["hsdp"],
                                                                                      method="ties", density=0.5))
    t = torch.zeros(3, 4)
    partial = {"q_proj.weight": DTensor.from_local(t, mesh["tp"], [Partial()])}
    out["errors"]["partial"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=partial))
    # rows [0, 1, 4, 5] of 8 on "tp" rank 0: a strided shard without the TP shard that makes it one box
    scattered = {"q_proj.weight": DTensor.from_local(torch.zeros(4, 10), mesh["tp"], [_StridedShard(0, split_factor=2)],
                                                     shape=torch.Size((8, 10)), stride=(10, 1))}
    out["errors"]["scattered"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=scattered))
    from pymerge.dist import layout as box_layout  # torch before 2.10 lacks what reads strided shards as boxes
    real, box_layout._knows_strided_offsets = box_layout._knows_strided_offsets, lambda: False
    box_layout._BOXES.clear()  # (the boxes of the pools above)
    out["errors"]["old_torch"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base,
                                                                         shard_like=models["fsdp_tp"]))
    box_layout._knows_strided_offsets = real
    crossed = {n: DTensor.from_local(torch.zeros(5, s[1]), mesh[axis], [Shard(0)], shape=torch.Size(s),
                                     stride=(s[1], 1))
               for (n, s), axis in zip([(n, SHAPES[n]) for n in ("q_proj.weight", "k_proj.weight")], ("dp", "tp"))}
    crossed.update({n: torch.zeros(s) for n, s in SHAPES.items() if n not in crossed})
    out["errors"]["crossed"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=crossed))
    mine = list(ckpts)
    if rank == 3:  # one rank of one replica group cannot open a checkpoint: every replica stops
        mine[1] = os.path.join(d, "missing.safetensors")
    for layout in ("hsdp", "tp_replicas"):
        out["errors"]["missing_" + layout] = error_of(
            lambda: pymerge.CheckpointPool(mine, base=base, shard_like=models[layout]))
    out["untouched"] = all(torch.equal(snapshot[k][n], v) for k, m in models.items() for n, v in full(m).items())
    pools["fsdp_tp", 3].materialize(W3, into=models["fsdp_tp"], method="ties", density=0.55)  # still in step
    out["after_errors"] = torch.equal(full(models["fsdp_tp"])["q_proj.weight"], refs["ties"]["q_proj.weight"])
    # tp = 1 in a 2-D script: FSDP2 x TP on a (4, 1) mesh, the row-parallel weights Shard(1) on the size-1 "tp"
    m = shard(Block(), "fsdp_tp", init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp")))
    della, want = dict(method="della", density=0.5, epsilon=0.2), Block()
    pymerge.CheckpointPool(ckpts, base=base).materialize(W3, into=want, **della)
    out["tp1"] = {"placements": repr(m.down_proj.weight.placements), "error": error_of(
        lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=m).materialize(W3, into=m, **della))}
    out["tp1"]["bits"] = all(torch.equal(full(m)[n], p.detach()) for n, p in want.named_parameters())
    return out


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mesh"))
    files = write_checkpoints(d)
    refs = references(files)
    return files, refs, dist_helpers.run(worker, 4, d, d, files, refs)


def test_layouts_are_the_ones_meant(mesh_run):
    """FSDP2 x TP really gives strided shards and sub-meshes here (else the test checks less than it says)."""
    p = mesh_run[2][0]["placements"]
    assert p["fsdp_tp"]["q_proj.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert p["fsdp_tp"]["down_proj.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert p["fsdp_tp"]["o_proj.bias"] == "(Shard(dim=0), Replicate())"
    assert p["fsdp_tp"]["attn_norm.weight"] == "(Shard(dim=0),)"
    assert set(p["hsdp"].values()) == {"(Replicate(), Shard(dim=0))"}
    assert p["tp_replicas"]["up_proj.weight"] == "(Shard(dim=0),)" and p["tp_replicas"]["mlp_norm.weight"] == "None"


@pytest.mark.parametrize("layout, label", [(layout, c[0]) for layout in LAYOUTS for c in CASES])
def test_2d_materialize_matches_single_process(mesh_run, layout, label):
    for rank, res in enumerate(mesh_run[2]):
        case = res["cases"][layout, label]
        assert case["ptrs"], f"rank {rank}: local shards were replaced, not written in place"
        assert case["close"], f"rank {rank}: {layout} {label} is off the single-process result"
        assert case["bits"], f"rank {rank}: {layout} {label} differs from the single-process pool"


@pytest.mark.parametrize("label", [c[0] for c in CASES])
def test_every_layout_gives_the_same_bits(mesh_run, label):
    """Exact global statistics: the layout (and so which rank counts which copy) changes no bit."""
    got = [mesh_run[2][0]["cases"][layout, label]["full"] for layout in LAYOUTS]
    assert all(torch.equal(g[n], got[0][n]) for g in got[1:] for n in SHAPES)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_holds_and_reads_exactly_its_shards(mesh_run, layout):
    files, _, results = mesh_run
    itemsizes = {os.path.basename(f): (2 if i == 1 else 4) for i, f in enumerate(files)}
    for rank, res in enumerate(results):
        want_bytes = sum(len(local_index(layout, n, rank)) * size for n in SHAPES for size in itemsizes.values())
        assert res["nbytes"][layout] == want_bytes, (rank, layout)
        records = res["reads"][layout]
        assert len(records) == 4 * len(SHAPES)
        for label, name, runs in records:
            size = itemsizes[os.path.basename(label)]
            want = {b for i in local_index(layout, name, rank) for b in range(i * size, (i + 1) * size)}
            assert {b for a, e in runs for b in range(a, e)} == want, (rank, layout, label, name)
    unsharded = sum(math.prod(s) * size for s in SHAPES.values() for size in itemsizes.values())
    share = results[0]["nbytes"][layout] / unsharded
    assert {"fsdp_tp": 0.2 < share < 0.35, "hsdp": 0.45 < share < 0.55, "tp_replicas": 0.5 < share < 0.6}[layout], share


def test_layouts_the_pool_cannot_hold_fail_alike_everywhere(mesh_run):
    errors = [res["errors"] for res in mesh_run[2]]
    for key in errors[0]:
        msgs = {e[key] for e in errors}
        assert len(msgs) == 1, f"{key}: ranks disagree: {msgs}"
        assert msgs.pop().count("\n") == 0, key
    e = errors[0]
    assert e["wrong_layout"].startswith("InputError: tensor ") and "nothing was written" in e["wrong_layout"]
    assert "mesh of shape [2, 2] (dimensions ['dp', 'tp'])" in e["wrong_layout"]
    assert e["partial"].startswith("InputError: shard_like tensor 'q_proj.weight': placement Partial(sum)")
    assert e["scattered"].startswith("InputError: shard_like tensor 'q_proj.weight': placements") and \
        "not one contiguous range" in e["scattered"]
    assert e["old_torch"].startswith("InputError: shard_like tensor ") and \
        "(FSDP2 over tensor parallel) need torch 2.10 or newer" in e["old_torch"], e["old_torch"]
    for layout in ("hsdp", "tp_replicas"):
        assert e["missing_" + layout].startswith("CheckpointError: rank 3: ") and "no such file" in e["missing_" + layout]
    assert e["crossed"].startswith("InputError: shard_like: no tensor is split across all the ranks")
    assert all(res["untouched"] and res["after_errors"] for res in mesh_run[2])


def test_della_where_the_tp_dimension_has_size_1(mesh_run):
    """A mesh dimension of size 1 splits nothing: DELLA (ranks within rows) through a pool laid out as FSDP2 x TP
    with tp = 1 gives the single-process bits. Counting the size-1 "tp" dimension as a split refused it ("split
    along dimension 1"; a mutation audit)."""
    for rank, res in enumerate(mesh_run[2]):
        assert res["tp1"]["placements"] == "(Shard(dim=0), Shard(dim=1))", res["tp1"]  # what the test is about
        assert res["tp1"]["error"] is None and res["tp1"]["bits"], (rank, res["tp1"])


# ---- HSDP: errors and arguments agreed over both replicas (a bug hunt) ------------------------------------
def replicas_worker(rank, world, files):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))  # replicas over "dp", shards over "tp"
    m = fully_shard(torch.nn.Linear(6, 5), mesh=mesh)
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    before = [p.to_local().clone() for p in m.parameters()]
    errors = {}
    # rank 3 alone passes a NaN weight: its replica raised it, the other replica wrote and returned
    errors["nan_on_one_rank"] = error_of(lambda: pool.materialize(W3 if rank != 3 else [0.5, float("nan"), 0.2],
                                                                  into=m, method="ties", density=0.5))
    # the replicas pass different weights: each replica merged its own model, unnoticed
    errors["replicas_differ"] = error_of(lambda: pool.materialize(W3 if rank < 2 else [0.2, 0.3, 0.5], into=m))
    untouched = all(torch.equal(p.to_local(), b) for p, b in zip(m.parameters(), before))  # nothing written
    # a failure inside the merge (after the checks: some tensors are written) on one rank of one replica
    # (at a tensor's model plans, which the per-tensor path and the one native call both resolve, after the
    # first tensor's statistics: its collectives ran)
    from pymerge.dist import methods as dist_methods
    real, calls = dist_methods._model_plan, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return real(*a, **k)
    if rank == 3:
        dist_methods._model_plan = failing
    errors["in_merge"] = error_of(lambda: pool.materialize(W3, into=m, method="ties", density=0.5))
    dist_methods._model_plan = real
    # a search whose one candidate reaches replica 0 only: that replica alone cached the statistics of
    # density 0.55, and the whole-mesh materialize after it ran their collectives on two ranks of four (a hang)
    pymerge.search.optimize(pool, lambda model: 0.0, model=m, budget=1, popsize=4, method="ties", density=0.55,
                            log=None)
    pool.materialize(W3, into=m, method="ties", density=0.55)  # still in step
    return {"errors": errors, "untouched": untouched, "merged": {n: p.full_tensor() for n, p in m.named_parameters()}}


def test_hsdp_errors_and_weights_agree_across_replicas(tmp_path):
    from datetime import timedelta

    import pymerge
    files = write_checkpoints(str(tmp_path), {"weight": (5, 6), "bias": (5,)})
    want = torch.nn.Linear(6, 5)
    pymerge.CheckpointPool(files[:3], base=files[3]).materialize(W3, into=want, method="ties", density=0.55)
    results = dist_helpers.run(replicas_worker, 4, str(tmp_path), files, timeout=timedelta(seconds=30), wall_s=120)
    e = dist_helpers.agreed_errors(results)
    assert e["nan_on_one_rank"] == "InputError: rank 3: weights[1] is nan; weights must be finite"
    assert e["replicas_differ"].startswith("InputError: ranks called the sharded pool with different arguments")
    assert e["in_merge"] == "DistributedError: rank 3: injected failure (RuntimeError there)"
    for res in results:
        assert res["untouched"]
        assert all(torch.equal(res["merged"][n], p.detach()) for n, p in want.named_parameters())
