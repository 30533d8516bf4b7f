"""Sharded CheckpointPool on gloo: FSDP2 and tensor-parallel targets, 2 and 3 ranks (uneven shards).

One spawned group per rank count runs every check (the worker below) and returns what it saw;
the tests assert on it. Reference: the single-process pool on the same files, bit for bit.
"""
import json
import math
import os
import re
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dist_helpers

SHAPES = {"0.weight": (11, 13), "0.bias": (11,), "1.weight": (7, 11), "1.bias": (7,), "2.weight": (7,), "2.bias": (7,)}
W3 = [0.5, 0.3, 0.2]
# (label, sources, kwargs): methods x parameters the sharded pool must reproduce
CASES = [
    ("linear", 3, dict(method="linear")),
    ("task_arithmetic", 3, dict(method="task_arithmetic", **{"lambda": 0.9})),
    ("ties", 3, dict(method="ties", density=0.55)),
    ("ties_in_zeros", 3, dict(method="ties", density=0.97)),  # the boundary falls inside a run of zero deltas
    ("dare_ties", 3, dict(method="dare_ties", density=0.5, rescale=False)),
    ("dare_ties_l1", 3, dict(method="dare_ties", density=0.5)),  # L1 norms: exact sums, one definition
    ("dare_linear_inv", 3, dict(method="dare_linear", density=0.7, rescale="inverse_density")),
    ("breadcrumbs_ties", 3, dict(method="breadcrumbs_ties", density=0.6, gamma=0.1)),
    ("slerp", 1, dict(method="slerp", t=0.3)),  # dot products: exact sums, one definition
    ("nuslerp", 2, dict(method="nuslerp")),
    ("passthrough", 1, dict(method="passthrough", scale=0.7)),
    ("model_stock", 3, dict(method="model_stock")),
    ("model_stock_rows", 3, dict(method="model_stock", filter_wise=True)),  # per-row dots: rows must be local
    ("della", 3, dict(method="della", density=0.6, epsilon=0.1, rescale=False)),  # per-row ranks: rows local
    ("della_linear_l1", 3, dict(method="della_linear", density=0.5, epsilon=0.2)),
    ("ram", 3, dict(method="ram")),  # elementwise, as linear: chunks of the single-process kernel
    ("nearswap", 1, dict(method="nearswap", t=0.01)),
]
FSDP_ONLY = {"model_stock_rows", "della", "della_linear_l1"}  # TP splits 1.weight's rows: refused, see errors


def runs_on(label, layout):
    return layout == "fsdp" or label not in FSDP_ONLY


def build():
    return torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Linear(11, 7), torch.nn.LayerNorm(7))


def write_checkpoints(d, shapes=SHAPES, seed=7):
    """3 fine-tunes and a base of tensors `shapes`, as d/m0..m2.safetensors and d/base.safetensors."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    files = []
    for i in range(3):
        sd = {}
        for k, v in base.items():
            delta = 0.1 * torch.randn(v.shape, generator=g)
            if i == 0:  # a third of the deltas exactly zero: ties at the threshold
                delta = torch.where(torch.rand(v.shape, generator=g) < 0.35, torch.zeros_like(delta), delta)
            if i == 2:  # few distinct magnitudes: many equal keys
                delta = torch.round(delta * 20) / 20
            sd[k] = (v + delta).to(torch.bfloat16 if i == 1 else torch.float32)
        files.append(os.path.join(d, f"m{i}.safetensors"))
        save_file(sd, files[-1])
    files.append(os.path.join(d, "base.safetensors"))
    save_file(base, files[-1])
    return files


def save_in_order(tensors, path):
    """A safetensors file holding the tensors in the dict's order (save_file sorts them)."""
    header, offset, blobs = {}, 0, []
    for k, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype],
                     "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def layouts(world):
    """name -> (placement dim or None) for each layout, as torch lays them out (checked independently)."""
    fsdp = {k: 0 for k in SHAPES}
    tp = {"0.weight": 0, "0.bias": 0, "1.weight": 1, "1.bias": None, "2.weight": None, "2.bias": None}
    return {"fsdp": fsdp, "tp": tp}


def local_index(shape, dim, rank, world):
    """Global flat indices this rank holds: torch.chunk along dim (None: everything)."""
    idx = np.arange(math.prod(shape)).reshape(shape)
    if dim is None:
        return idx.reshape(-1)
    chunks = [c.numpy() for c in torch.arange(shape[dim]).chunk(world)]
    mine = chunks[rank] if rank < len(chunks) else np.array([], dtype=np.int64)
    return np.take(idx, mine, axis=dim).reshape(-1)


def worker(rank, world, d, files):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import pymerge
    from pymerge.dist import reads
    mesh = init_device_mesh("cpu", (world,))
    ckpts, base = files[:3], files[3]

    def sharded(layout):
        m = build()
        if layout == "fsdp":
            fully_shard(m, mesh=mesh)
        else:
            parallelize_module(m, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
        return m

    def full(m):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in m.named_parameters()}

    def local_ptrs(m):
        return {n: (p.to_local() if isinstance(p, DTensor) else p).data_ptr() for n, p in m.named_parameters()}

    out = {"cases": {}, "reads": {}, "nbytes": {}, "errors": {}}
    refs = {n: pymerge.CheckpointPool(ckpts[:n], base=base) for n in (1, 2, 3)}
    models = {layout: sharded(layout) for layout in ("fsdp", "tp")}
    pools = {}
    for layout, m in models.items():
        for n_src in (1, 2, 3):
            reads.touched = []
            pools[layout, n_src] = pymerge.CheckpointPool(ckpts[:n_src], base=base, shard_like=m)
            if n_src == 3:
                out["reads"][layout] = reads.touched
                out["nbytes"][layout] = (pools[layout, 3].nbytes, refs[3].nbytes, pools[layout, 3].whole_nbytes,
                                         pools[layout, 3].describe())
            reads.touched = None
    for layout, m in models.items():
        for label, n_src, kw in CASES:
            if not runs_on(label, layout):
                continue
            ref_model = build()
            w = W3[:n_src] if kw["method"] not in ("slerp", "passthrough") else [1.0]
            refs[n_src].materialize(w, into=ref_model, **kw)
            before = local_ptrs(m)
            pools[layout, n_src].materialize(w, into=m, **kw)
            got, want = full(m), dict(ref_model.named_parameters())
            out["cases"][layout, label] = {
                "ptrs": before == local_ptrs(m),
                "bits": all(torch.equal(got[n].view(torch.int32), want[n].detach().view(torch.int32)) for n in got),
                "full": got if rank == 0 else None}
    # two candidates at once, into two sharded models
    m2 = sharded("fsdp")
    pools["fsdp", 3].materialize_many([W3, [0.1, 0.1, 0.8]], into=[models["fsdp"], m2], method="ties", density=0.55)
    r0, r1 = build(), build()
    refs[3].materialize_many([W3, [0.1, 0.1, 0.8]], into=[r0, r1], method="ties", density=0.55)
    out["many"] = all(torch.equal(full(a)[n], dict(b.named_parameters())[n].detach())
                      for a, b in ((models["fsdp"], r0), (m2, r1)) for n in SHAPES)
    # state dicts of DTensors (sharing the model's storage) as shard_like and as the target
    sd = models["tp"].state_dict()
    pymerge.CheckpointPool(ckpts, base=base, shard_like=sd).materialize([0.2, 0.2, 0.6], into=sd, method="ties",
                                                                       density=0.55)
    refs[3].materialize([0.2, 0.2, 0.6], into=r0, method="ties", density=0.55)
    out["state_dict"] = all(torch.equal(full(models["tp"])[n], dict(r0.named_parameters())[n].detach())
                            for n in SHAPES)

    def error_of(fn):
        try:
            fn()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    fsdp_pool = pools["fsdp", 3]
    snapshot = full(models["tp"])
    out["errors"]["layout"] = error_of(lambda: fsdp_pool.materialize(W3, into=models["tp"]))
    out["errors"]["layout_ties"] = error_of(lambda: fsdp_pool.materialize(W3, into=models["tp"], method="ties",
                                                                            density=0.5))
    out["untouched"] = all(torch.equal(snapshot[n], v) for n, v in full(models["tp"]).items())
    wrong = torch.nn.Sequential(torch.nn.Linear(13, 12), torch.nn.Linear(12, 7), torch.nn.LayerNorm(7))
    fully_shard(wrong, mesh=mesh)
    out["errors"]["shape"] = error_of(lambda: fsdp_pool.materialize(W3, into=wrong))
    mine = list(ckpts)
    if rank == world - 1:
        mine[1] = os.path.join(d, "missing.safetensors")
    out["errors"]["missing_on_one_rank"] = error_of(
        lambda: pymerge.CheckpointPool(mine, base=base, shard_like=models["fsdp"]))
    # the same files in another order on one rank (an unsorted glob on another node), or another file with the
    # same tensors in one slot: each rank merged its own pairing of weights and checkpoints, silently (an audit)
    mine = list(ckpts)
    if rank == world - 1:
        mine[0], mine[2] = mine[2], mine[0]  # (model 1 is bfloat16: a swap with it shows in the dtypes)
    out["errors"]["permuted_on_one_rank"] = error_of(
        lambda: pymerge.CheckpointPool(mine, base=base, shard_like=models["fsdp"]))
    mine = list(ckpts)
    if rank == world - 1:
        mine[2] = base
    out["errors"]["other_file_on_one_rank"] = error_of(
        lambda: pymerge.CheckpointPool(mine, base=base, shard_like=models["fsdp"]))
    # a (dp, tp = 1) mesh, as a 2-D script with a tensor-parallel degree of 1 builds it: 1.weight carries
    # Shard(1) over the size-1 "tp" dimension, whole rows on every rank; DELLA was refused as split by columns
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    m = build()
    parallelize_module(m, mesh2["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()})
    fully_shard(m, mesh=mesh2["dp"])
    della = dict(method="della", density=0.5, epsilon=0.2)
    out["tp1_della"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=m).materialize(
        W3, into=m, **della))
    ref_model = build()
    refs[3].materialize(W3, into=ref_model, **della)
    out["tp1_della_bits"] = all(torch.equal(full(m)[n], p.detach()) for n, p in ref_model.named_parameters())
    mine = list(ckpts)
    if rank == 0:
        mine[2] = os.path.join(d, "truncated.safetensors")
    out["errors"]["corrupt_on_one_rank"] = error_of(
        lambda: pymerge.CheckpointPool(mine, base=base, shard_like=models["fsdp"]))
    weights = W3 if rank != 1 else [0.2, 0.3, 0.5]
    out["errors"]["different_weights"] = error_of(
        lambda: fsdp_pool.materialize(weights, into=models["fsdp"], method="ties", density=0.5))
    # elementwise methods agree on their arguments too: linear wrote a model mixed from both ranks' weights,
    # and linear on one rank against ties on another left the ties rank waiting (found by a review)
    out["errors"]["dtensor_sources"] = error_of(lambda: pymerge.CheckpointPool(
        [models["fsdp"].state_dict(), models["fsdp"].state_dict()], shard_like=models["fsdp"]))
    # a tensor on a mesh without some rank fails there only: every rank raises its error (rank 0 alone
    # went on to the agreement, which ended in a gloo error when the failing rank's program left)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    partial = dict(models["fsdp"].state_dict())
    partial["1.weight"] = distribute_tensor(torch.zeros(SHAPES["1.weight"]), DeviceMesh("cpu", [0]), [Shard(0)])
    out["errors"]["not_in_mesh"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=partial))
    # a tensor laid out otherwise on one rank (another sharding plan there): each rank checked its targets against
    # its own layout only, and merged from overlapping pieces or waited in other collectives (an audit)
    other = dict(models["fsdp"].state_dict())
    if rank == world - 1:
        other["0.weight"] = torch.zeros(SHAPES["0.weight"])  # whole on this rank
    out["errors"]["layout_on_one_rank"] = error_of(lambda: pymerge.CheckpointPool(ckpts, base=base, shard_like=other))
    out["errors"]["different_weights_linear"] = error_of(lambda: fsdp_pool.materialize(weights, into=models["fsdp"]))
    out["errors"]["different_methods"] = error_of(
        lambda: fsdp_pool.materialize(W3, into=models["fsdp"], **({"method": "ties", "density": 0.5} if rank == 1 else {})))
    # weights that are not a list on one rank: refused there before its agreement, so the other rank's call
    # was answered by the next call's agreement and the ranks went out of step (an audit: a gloo timeout)
    out["errors"]["not_a_list_on_one_rank"] = error_of(
        lambda: fsdp_pool.materialize_many([W3] if rank == 0 else 0.5, into=[models["fsdp"]]))
    out["after_not_a_list"] = error_of(lambda: fsdp_pool.materialize(W3, into=models["fsdp"]))
    from pymerge.methods.base import MergeMethod, register

    @register
    class WholeTensorOnly(MergeMethod):  # a method with whole-tensor needs the sharded pool does not know
        name = "test_whole_tensor_only"

    out["errors"]["unsupported"] = error_of(
        lambda: fsdp_pool.materialize(W3, into=models["fsdp"], method="test_whole_tensor_only"))
    out["errors"]["della_split"] = error_of(
        lambda: pools["tp", 3].materialize(W3, into=models["tp"], method="della", density=0.5))
    out["errors"]["rows_split"] = error_of(
        lambda: pools["tp", 3].materialize(W3, into=models["tp"], method="model_stock", filter_wise=True))
    # the single-process pool's magnitude checks (lambda 1e39 wrote NaN on a sharded pool)
    out["errors"]["huge_lambda"] = error_of(
        lambda: fsdp_pool.materialize(W3, into=models["fsdp"], method="breadcrumbs", density=0.5, **{"lambda": 1e39}))
    # equal arguments of other types agree (a second fingerprint compared their repr: 0.5 vs np.float64(0.5))
    density = np.float64(0.55) if rank == 1 else 0.55
    out["numpy_density"] = error_of(
        lambda: fsdp_pool.materialize(W3, into=models["fsdp"], method="ties", density=density))
    # a 0-d tensor (CLIP's logit_scale) beside a sharded one: read_box could not view it as bytes
    from torch.distributed.tensor import Shard, distribute_tensor
    sc = [os.path.join(d, "scalar", f) for f in ("m0.safetensors", "m1.safetensors", "m2.safetensors")]
    target = {"w": distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)]), "s": torch.zeros(())}
    ref = {"w": torch.zeros(6, 3), "s": torch.zeros(())}
    pymerge.CheckpointPool(sc).materialize(W3, into=ref)
    out["scalar"] = error_of(lambda: pymerge.CheckpointPool(sc, shard_like=target).materialize(W3, into=target))
    out["scalar_bits"] = torch.equal(target["s"], ref["s"]) and torch.equal(target["w"].full_tensor(), ref["w"])
    # a rank whose files hold the same tensors stored in another order (a copy re-saved by another tool):
    # the pool paired tensors by file position, so ties' statistics mixed tensors (found by a bug hunt)
    mine = [os.path.join(d, "reordered", os.path.basename(f)) if rank == world - 1 else f for f in files]
    m = sharded("fsdp")
    pymerge.CheckpointPool(mine[:3], base=mine[3], shard_like=m).materialize(W3, into=m, method="ties", density=0.55)
    ref_model = build()
    refs[3].materialize(W3, into=ref_model, method="ties", density=0.55)
    out["reordered_bits"] = all(torch.equal(full(m)[n], p.detach()) for n, p in ref_model.named_parameters())
    # a pool built after a forward pass: FSDP2 left the root's parameters gathered, the pool took them as
    # replicated, and every materialize into the model was refused (a bug hunt)
    m = sharded("fsdp")
    with torch.no_grad():
        m(torch.randn(2, 13))
    pymerge.CheckpointPool(ckpts, base=base, shard_like=m).materialize(W3, into=m, method="ties", density=0.55)
    out["after_forward"] = all(torch.equal(full(m)[n], p.detach()) for n, p in ref_model.named_parameters())
    # checkpoints named "model.<name>" with one more tensor than the model: names= and strict=False were
    # refused when the pool was built ("has no counterpart in shard_like"; a bug hunt)
    pf = [os.path.join(d, "prefixed", os.path.basename(f)) for f in files]
    m = sharded("fsdp")
    strip = lambda n: n[len("model."):]  # noqa: E731
    pymerge.CheckpointPool(pf[:3], base=pf[3], shard_like=m, names=strip).materialize(
        W3, into=m, method="ties", density=0.55, names=strip, strict=False)
    out["names_strict"] = all(torch.equal(full(m)[n], p.detach()) for n, p in ref_model.named_parameters())
    # without names= nearly nothing has a counterpart: refused before every rank held every checkpoint whole
    out["errors"]["forgot_names"] = error_of(lambda: pymerge.CheckpointPool(pf[:3], base=pf[3], shard_like=m))
    # a (replicas, shards) mesh: a rank failing before its first layout lookup agreed in its replica group
    # while the others agreed over the world (a hang; a review)
    hsdp = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicas", "shards"))
    replicated = build()
    fully_shard(replicated, mesh=hsdp)
    mine = list(ckpts)
    if rank == world - 1:
        mine[0] = os.path.join(d, "missing.safetensors")
    out["errors"]["missing_on_one_replica"] = error_of(
        lambda: pymerge.CheckpointPool(mine, base=base, shard_like=replicated))
    # a tied target whose checkpoints hold both names with the same values: written once, as the single-process
    # pool writes it; with other values refused alike on every rank (one merge would replace the other)
    class Tied(torch.nn.Module):
        def __init__(self, tie=True):
            super().__init__()
            self.wte, self.lm_head = torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(3, 4, bias=False)
            if tie:
                self.lm_head.weight = self.wte.weight

    tied = [os.path.join(d, "tied", f"m{i}.safetensors") for i in range(2)]
    tm, tref = Tied(), Tied()
    fully_shard(tm, mesh=mesh)
    pymerge.CheckpointPool(tied, shard_like=tm).materialize([0.5, 0.5], into=tm)
    pymerge.CheckpointPool(tied).materialize([0.5, 0.5], into=tref)
    out["tied_bits"] = torch.equal(tm.wte.weight.full_tensor(), tref.wte.weight.detach())
    differ = [os.path.join(d, "tied", f"differ{i}.safetensors") for i in range(2)]
    out["errors"]["tied_differ"] = error_of(lambda: pymerge.CheckpointPool(differ, shard_like=tm).materialize([0.5, 0.5], into=tm))
    # checkpoints storing no head (tied) into a model whose head is its own: the single-process pool writes the
    # merged embedding there; a sharded one refuses (the head may be laid out otherwise), strict=False leaves it
    um = Tied(tie=False)
    fully_shard(um, mesh=mesh)
    head = um.lm_head.weight.full_tensor()
    no_head = [os.path.join(d, "tied", f"nohead{i}.safetensors") for i in range(2)]
    out["errors"]["untied_head"] = error_of(lambda: pymerge.CheckpointPool(no_head, shard_like=um).materialize([0.5, 0.5], into=um))
    pymerge.CheckpointPool(no_head, shard_like=um).materialize([0.5, 0.5], into=um, strict=False)
    out["untied_head_left"] = torch.equal(um.lm_head.weight.full_tensor(), head)
    # ... or lack a tensor, or hold one in another dtype: one agreed error (linear wrote nothing there, ties hung)
    for kind in ("lacking", "retyped"):
        mine = [os.path.join(d, kind, os.path.basename(f)) if rank == world - 1 else f for f in files]
        out["errors"][kind] = error_of(lambda: pymerge.CheckpointPool(mine[:3], base=mine[3], shard_like=m))
    # every checkpoint's 0.weight one row taller than shard_like's: refused (comparing the number of dimensions
    # only, each rank read its rows of the first 11 of 12 and merged them silently; a mutation audit)
    tall = [os.path.join(d, "taller", os.path.basename(f)) for f in files]
    out["errors"]["taller"] = error_of(lambda: pymerge.CheckpointPool(tall[:3], base=tall[3], shard_like=m))
    # strict=False with one rank's target lacking a tensor: ties' collectives went out of step (gloo aborted)
    target = dict(m.state_dict())
    if rank == 1:
        del target["1.bias"]
    out["errors"]["strict_false"] = error_of(lambda: fsdp_pool.materialize(W3, into=target, method="ties",
                                                                              density=0.55, strict=False))
    # groups= functions of one name that group differently on each rank (a set's order, a hash seed): each rank
    # wrote its shard with other checkpoints' weights (a hunt); the agreement hashes each tensor's group now
    order = ["0", "1", "2"] if rank == 0 else ["1", "0", "2"]

    def layer_group(name):
        return min(order.index(name.split(".")[0]), 1)
    before = full(models["fsdp"])["0.weight"]
    out["errors"]["groups_differ"] = error_of(lambda: fsdp_pool.materialize(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], into=models["fsdp"], groups=layer_group))
    out["untouched_by_groups"] = torch.equal(full(models["fsdp"])["0.weight"], before)
    # the group is still in step after every failure
    fsdp_pool.materialize(W3, into=models["fsdp"], method="ties", density=0.55)
    again = full(models["fsdp"])["0.weight"]
    out["after_errors"] = rank != 0 or torch.equal(again, out["cases"]["fsdp", "ties"]["full"]["0.weight"])
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def group(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(f"dist{request.param}"))
    files = write_checkpoints(d)
    os.mkdir(os.path.join(d, "scalar"))
    write_checkpoints(os.path.join(d, "scalar"), shapes={"w": (6, 3), "s": ()})
    with open(files[2], "rb") as src, open(os.path.join(d, "truncated.safetensors"), "wb") as dst:
        dst.write(src.read()[:-10])
    from safetensors.torch import load_file
    os.mkdir(os.path.join(d, "tied"))
    for i in range(2):  # the files list lm_head.weight first (sorted), the module wte.weight
        save_file({"wte.weight": torch.full((4, 3), 1.0 + i), "lm_head.weight": torch.full((4, 3), 1.0 + i)},
                  os.path.join(d, "tied", f"m{i}.safetensors"))
        save_file({"wte.weight": torch.full((4, 3), 1.0 + i), "lm_head.weight": torch.full((4, 3), 10.0 + i)},
                  os.path.join(d, "tied", f"differ{i}.safetensors"))
        save_file({"wte.weight": torch.full((4, 3), 1.0 + i)}, os.path.join(d, "tied", f"nohead{i}.safetensors"))
    os.mkdir(os.path.join(d, "prefixed"))
    for f in files:
        sd = {"model." + k: v for k, v in load_file(f).items()}
        sd["model.extra"] = torch.ones(5)
        for i in range(8):  # more tensors than the model has, fewer elements: held whole, not refused
            sd[f"model.vision.{i}.weight"] = torch.full((3,), float(i))
        save_file(sd, os.path.join(d, "prefixed", os.path.basename(f)))
    for kind in ("reordered", "lacking", "retyped", "taller"):
        os.mkdir(os.path.join(d, kind))
        for i, f in enumerate(files):
            sd = load_file(f)
            sd = {k: sd[k] for k in reversed(sd)} if kind == "reordered" else sd
            if kind == "lacking":
                del sd["1.bias"]
            if kind == "retyped" and i == 0:
                sd["0.bias"] = sd["0.bias"].to(torch.float16)
            if kind == "taller":  # (12, 13): one row more than the model's
                sd["0.weight"] = torch.cat([sd["0.weight"], sd["0.weight"][:1]])
            save_in_order(sd, os.path.join(d, kind, os.path.basename(f)))
    return request.param, files, dist_helpers.run(worker, request.param, d, d, files)


@pytest.mark.parametrize("layout, label", [(layout, c[0]) for layout in ("fsdp", "tp") for c in CASES
                                           if runs_on(c[0], layout)])
def test_sharded_materialize_matches_single_process(group, layout, label):
    world, _, results = group
    for rank, res in enumerate(results):
        case = res["cases"][layout, label]
        assert case["ptrs"], f"rank {rank}: local shards were replaced, not written in place"
        assert case["bits"], f"rank {rank}: {layout} {label} differs from the single-process pool"


def test_a_pool_built_after_a_forward_pass_or_with_names_and_extras(group):
    world, _, results = group
    assert all(res["after_forward"] and res["names_strict"] for res in results)
    for res in results:
        assert "have no counterpart in shard_like, and each rank would hold them whole; pass names=" in res["errors"]["forgot_names"]
        assert res["errors"]["missing_on_one_replica"] == results[0]["errors"]["missing_on_one_replica"]
        assert f"rank {world - 1}: " in res["errors"]["missing_on_one_replica"]


def test_materialize_many_into_sharded_models(group):
    assert all(res["many"] for res in group[2])


def test_state_dict_as_layout_and_target(group):
    assert all(res["state_dict"] for res in group[2])


def test_rank_count_independent(tmp_path_factory, group):
    """Every method, exact L1 sums included, gives the same bits on 2 and 3 ranks (and both layouts)."""
    world, _, results = group
    seen = test_rank_count_independent.__dict__.setdefault("seen", {})
    seen[world] = {k: v["full"] for k, v in results[0]["cases"].items()}
    for label, *_ in CASES:
        if not runs_on(label, "tp"):
            continue
        fsdp, tp = seen[world]["fsdp", label], seen[world]["tp", label]
        assert all(torch.equal(fsdp[n], tp[n]) for n in SHAPES), label
    if len(seen) == 2:
        for key, tensors in seen[2].items():
            assert all(torch.equal(tensors[n], seen[3][key][n]) for n in SHAPES), key


def pymerge_fmt_bytes(n):
    from pymerge.sizes import format_size
    return format_size(n)


def test_each_rank_holds_its_share(group):
    world, files, results = group
    per_rank = []
    for rank, res in enumerate(results):
        held = res["nbytes"]["fsdp"][0]
        want = 0
        for f, itemsize in zip(files, (4, 2, 4, 4)):
            want += sum(len(local_index(s, 0, rank, world)) * itemsize for s in SHAPES.values())
        assert held == want
        per_rank.append(held)
    unsharded = sum(math.prod(s) * itemsize for s in SHAPES.values() for itemsize in (4, 2, 4, 4))
    assert sum(per_rank) == unsharded  # FSDP2 shards every tensor: nothing is held twice
    for res in results:  # describe() says whose the sizes are, and the whole (it gave this rank's as the pool's)
        _, single, whole, text = res["nbytes"]["fsdp"]
        assert whole == unsharded, (whole, unsharded)
        assert text.endswith(f"tensors split across ranks (the sizes above are this rank's share of "
                             f"{pymerge_fmt_bytes(unsharded)})"), text
    assert max(per_rank) <= unsharded / world * 1.5


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_each_rank_reads_only_its_bytes(group, layout):
    world, files, results = group
    for rank, res in enumerate(results):
        records = res["reads"][layout]
        assert len(records) == 4 * len(SHAPES)  # 3 checkpoints + base, every tensor once
        for label, name, runs in records:
            itemsize = 2 if label.endswith("m1.safetensors") else 4
            idx = np.sort(local_index(SHAPES[name], layouts(world)[layout][name], rank, world))
            want = set()
            for i in idx:
                want.update(range(i * itemsize, (i + 1) * itemsize))
            got = set()
            for a, b in runs:
                got.update(range(a, b))
            assert got == want, (rank, label, name)


def test_errors_are_agreed_without_a_hang(group):
    world, _, results = group
    e = dist_helpers.agreed_errors(results)
    assert e["layout"].startswith("InputError") and "the pool holds (Shard(dim=0))" in e["layout"]
    assert e["layout_ties"] == e["layout"]
    assert "has shape (12, 13), the pool's has (11, 13)" in e["shape"]
    shape = list(SHAPES["0.weight"])
    assert e["layout_on_one_rank"] == (f"InputError: tensor '0.weight' is laid out whole {shape} on rank {world - 1} "
                                       f"but {shape} as (Shard(dim=0)) on a cpu mesh of shape [{world}] on rank 0; "
                                       "every rank must build the pool from the same layout (shard_like: the same "
                                       "sharding plan on every rank)"), e["layout_on_one_rank"]
    assert e["missing_on_one_rank"].startswith(f"CheckpointError: rank {world - 1}: ") and "no such file" in e["missing_on_one_rank"]
    for key, slot in (("permuted_on_one_rank", 0), ("other_file_on_one_rank", 2)):
        assert e[key] == (f"InputError: rank {world - 1} read other checkpoints than rank 0: checkpoint {slot} holds "
                          f"other values on rank {world - 1} than on rank 0 (another file, or the checkpoints listed "
                          "in another order); every rank must read the same checkpoints (no pool was built)"), e[key]
    assert all(res["tp1_della"] is None and res["tp1_della_bits"] for res in results), \
        [res["tp1_della"] for res in results]
    assert e["corrupt_on_one_rank"].startswith("CheckpointError: rank 0: ") and "truncated.safetensors" in e["corrupt_on_one_rank"]
    assert "different arguments" in e["different_weights"]
    assert e["dtensor_sources"].startswith("InputError: source 0: tensor ") and "is a DTensor" in e["dtensor_sources"]
    assert "different arguments" in e["different_weights_linear"] and "different arguments" in e["different_methods"]
    assert "test_whole_tensor_only is not supported on a sharded pool" in e["unsupported"]
    assert "'float' object is not iterable" in e["not_a_list_on_one_rank"], e["not_a_list_on_one_rank"]
    assert all(res["after_not_a_list"] is None for res in results)
    assert e["not_in_mesh"] == ("InputError: rank 1: shard_like tensor '1.weight': this rank is not in the tensor's "
                                "mesh, so it holds no part of it"), e["not_in_mesh"]
    assert e["rows_split"].startswith("InputError: model_stock: tensor '1.weight' is split along the dimension")
    assert e["della_split"].startswith("InputError: della: tensor '1.weight' is split along dimension 1")
    assert all(res["untouched"] and res["after_errors"] for res in results)
    assert all(res["reordered_bits"] and res["tied_bits"] and res["untied_head_left"] for res in results)
    # (prefixed "rank 0: " where some rank holds empty shards of the tied tensor, so nothing to compare there)
    assert re.match(r"InputError: (rank 0: )?pool tensors 'lm_head.weight' and 'wte.weight' hold different values, "
                    "but the target ties them", e["tied_differ"]), e["tied_differ"]
    assert re.match(r"InputError: (rank 0: )?the target's 'lm_head.weight' gets no pool tensor: the checkpoints are "
                    r"tied \(they store 'wte.weight' and no output head\)", e["untied_head"]), e["untied_head"]
    last = world - 1
    assert e["lacking"] == (f"InputError: rank {last} read other checkpoints than rank 0: tensor '1.bias' is missing "
                            f"on rank {last} (1 in all); every rank must read the same checkpoints (no pool was built)")
    assert e["taller"].startswith("CheckpointError: ") and "tensor '0.weight' has shape [12, 13], shard_like's " in \
        e["taller"] and e["taller"].endswith(" tensor has [11, 13]"), e["taller"]
    assert e["retyped"].startswith(f"InputError: rank {last} read other checkpoints than rank 0: tensor '0.bias' has "
                                   "dtypes ['float16', 'bfloat16', 'float32', 'float32'] on rank")
    assert e["strict_false"].startswith("InputError: ranks planned different writes: their targets hold different "
                                        "tensors (strict=False")
    assert e["groups_differ"] == e["strict_false"] and "groups= or names= functions" in e["groups_differ"]
    assert all(res["untouched_by_groups"] for res in results)
    assert e["huge_lambda"].startswith("MergeConfigError: tensor ") and "parameter lambda is 1e+39" in e["huge_lambda"]
    assert all(res["numpy_density"] is None and res["scalar"] is None and res["scalar_bits"] for res in results), \
        [(res["numpy_density"], res["scalar"]) for res in results]


# ---- DELLA on empty shards of 3-D tensors, and errors inside the merge (a bug hunt) ----------------------
EMPTY_SHAPES = {"0.weight": (1, 4, 3), "0.bias": (1,), "1.weight": (5, 2), "1.bias": (5,)}  # dim 0 = 1: rank 1 has none


def empty_shard_worker(rank, world, files):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    from pymerge.ops import task_vector_ops as tvo

    def build_conv():
        return torch.nn.Sequential(torch.nn.Conv1d(4, 1, 3), torch.nn.Linear(2, 5))

    ckpts, base = files[:3], files[3]
    m = fully_shard(build_conv(), mesh=init_device_mesh("cpu", (world,)))
    pool, ref = pymerge.CheckpointPool(ckpts, base=base, shard_like=m), pymerge.CheckpointPool(ckpts, base=base)
    out = {"bits": {}, "errors": {}}
    # DELLA's ranks within rows on a rank holding no row: IndexError there, the other rank in a collective
    for kw in (dict(method="della", density=0.5, epsilon=0.1, rescale=False),
               dict(method="della_linear", density=0.5, epsilon=0.2)):  # L1 norms: a collective per tensor
        want = build_conv()
        ref.materialize(W3, into=want, **kw)
        pool.materialize(W3, into=m, **kw)
        out["bits"][kw["method"]] = all(torch.equal(p.full_tensor(), q.detach())
                                        for p, q in zip(m.parameters(), want.parameters()))
    # an error inside the merge on one rank (packing its second mask, after that model's L1 collective), the
    # other rank then in the next one's: every rank raises it, and none keeps statistics the other lacks
    # (the next call's collectives would pair one model's norms with another's)
    real, calls = tvo.pack_bits, []

    def failing(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    tvo.pack_bits = failing
    kw = dict(method="della_linear", density=0.4, epsilon=0.2)
    try:
        pool.materialize(W3, into=m, **kw)
    except Exception as exc:
        out["errors"]["in_merge"] = f"{type(exc).__name__}: {exc}"
    tvo.pack_bits = real
    # an elementwise merge runs no collective: a kernel's error on one rank after the agreement left the
    # others returning a merged model while it held a half-written one (its next collective then paired
    # with whatever they ran next). The kernel: the single-process pool's one native call over every local
    # shard (per tensor calls cost ~100 us each in checks)
    from pymerge.pool import grouped

    class FailingTable:
        def run(self, *args):
            raise RuntimeError("injected kernel failure")
    native_table = grouped.native_table
    if rank == 1:
        grouped.native_table = lambda *a: FailingTable()
    try:
        pool.materialize(W3, into=m)
    except Exception as exc:
        out["errors"]["in_linear"] = f"{type(exc).__name__}: {exc}"
    grouped.native_table = native_table
    # not the table whose call raised: made once for two candidates
    made = []
    grouped.native_table = lambda *a: made.append(1) or native_table(*a)
    for w in (W3, [0.2, 0.5, 0.3]):
        pool.materialize(w, into=m)
    grouped.native_table = native_table
    out["tables_made"] = len(made)
    # the grouped Triton launch over the local shards (in the interpreter here), rank 1's shard of the conv
    # weight empty: the single-process pool's bits, its table kept between candidates too
    from pymerge import kernels
    if kernels.triton_available():
        tpool, triton_table, made = pymerge.CheckpointPool(ckpts, base=base, shard_like=m, backend="triton"), \
            grouped.triton_table, []
        grouped.triton_table = lambda *a: made.append(1) or triton_table(*a)
        same = []
        for w in (W3, [0.2, 0.5, 0.3]):
            want = build_conv()
            ref.materialize(w, into=want)
            tpool.materialize(w, into=m)
            same.append(all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(), want.parameters())))
        grouped.triton_table = triton_table
        out["triton"] = (same, len(made))
    # no targets on one rank: it returned before the agreement the other waited in (until the timeout)
    rows = [] if rank == 0 else [W3]
    try:
        pool.materialize_many(rows, into=[m] * len(rows))
    except Exception as exc:
        out["errors"]["none_here"] = f"{type(exc).__name__}: {exc}"
    out["none_anywhere"] = pool.materialize_many([], into=[])
    out["after"] = []
    for kw in (kw, dict(method="ties", density=0.55), dict(method="linear")):  # still in step
        want = build_conv()
        ref.materialize(W3, into=want, **kw)
        pool.materialize(W3, into=m, **kw)
        out["after"].append(all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(),
                                                                                           want.parameters())))
    return out


def test_della_on_empty_3d_shards_and_errors_inside_the_merge(tmp_path):
    from datetime import timedelta
    files = write_checkpoints(str(tmp_path), shapes=EMPTY_SHAPES)
    results = dist_helpers.run(empty_shard_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=20), wall_s=90)
    assert all(res["bits"] == {"della": True, "della_linear": True} for res in results), [r["bits"] for r in results]
    assert dist_helpers.agreed_errors(results)["in_merge"] == "DistributedError: rank 1: injected failure (RuntimeError there)"
    assert dist_helpers.agreed_errors(results)["in_linear"] == "DistributedError: rank 1: injected kernel failure (RuntimeError there)"
    # a call that raised drops its plans and table on every rank (every rank raised): made again once, then kept
    # for the next candidate (the plans are reused only where every rank's are)
    assert [res["tables_made"] for res in results] == [1, 1]
    from pymerge import kernels
    if kernels.triton_available():
        assert [res["triton"] for res in results] == [([True, True], 1)] * 2, [res["triton"] for res in results]
    assert dist_helpers.agreed_errors(results)["none_here"].startswith("InputError: ranks called the sharded pool with")
    assert [res["none_anywhere"] for res in results] == [[], []]
    assert all(res["after"] == [True, True, True] for res in results), [res["after"] for res in results]


def silent_peer_worker(rank, world, files):
    """Rank 1 lives but never calls materialize: rank 0's agreement times out once, and that failure is not
    agreed again (gloo raises a plain RuntimeError; a second collective on the closed pair replaced the
    timeout's message with 'Application timeout caused pair closure', or on a live one waited again)."""
    import time

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    m = fully_shard(build(), mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    if rank == 1:
        time.sleep(6)
        return {}
    t0 = time.monotonic()
    try:
        pool.materialize(W3, into=m)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "seconds": time.monotonic() - t0}


def test_a_failed_agreement_is_not_agreed_again(tmp_path):
    from datetime import timedelta
    files = write_checkpoints(str(tmp_path))
    res = dist_helpers.run(silent_peer_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=3), wall_s=60)[0]
    assert res["error"] is not None and "Timed out" in res["error"], res
    assert res["seconds"] < 5, res  # one timeout (3 s), not two


def forward_inside_the_call_worker(rank, world, files):
    """Caller code run inside a call (a generator of weight rows, a groups= function) may run a forward, which
    leaves the FSDP2 root gathered after the call's first reshard: each target is resharded again as it is
    planned, so the merge still lands in the shards (a review of a refactor that dropped that)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import pymerge
    torch.manual_seed(0)
    m = fully_shard(build(), mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    want = build()
    pymerge.CheckpointPool(files[:3], base=files[3]).materialize(W3, into=want)

    def forward():
        with torch.no_grad():
            m(torch.randn(2, 13))

    def rows():
        forward()
        yield W3

    def groups(name):
        forward()
        return 0
    out = {}
    for label, call in (("rows", lambda: pool.materialize_many(rows(), [m])),
                        ("groups", lambda: pool.materialize(W3, into=m, groups=groups))):
        with torch.no_grad():
            for p in m.parameters():
                p.to_local().zero_()
        call()
        m.reshard()
        got = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in m.named_parameters()}
        out[label] = all(torch.equal(got[n], p.detach()) for n, p in want.named_parameters())
    return out


def test_a_forward_run_by_caller_code_inside_a_call_still_merges_into_the_shards(tmp_path):
    files = write_checkpoints(str(tmp_path))
    for res in dist_helpers.run(forward_inside_the_call_worker, 2, str(tmp_path), files):
        assert res == {"rows": True, "groups": True}, res


def failed_forward_worker(rank, world, files):
    """A forward that raised leaves FSDP2's root gathered, and reshard() does nothing then: the merge went
    into the gathered copy, which the next reshard dropped, and the old weights came back (exit 0, a hunt)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import pymerge

    def full(model):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in model.named_parameters()}
    torch.manual_seed(0)
    m = fully_shard(build(), mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    out = {}
    for when in ("materialize", "build"):
        try:
            m(torch.randn(2, 5))  # the wrong width: raises inside the forward, after the all-gather
        except RuntimeError:
            pass
        before = full(m)
        try:
            if when == "build":
                pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
            else:
                pool.materialize(W3, into=m)
            out[when] = None
        except Exception as exc:
            out[when] = f"{type(exc).__name__}: {exc}"
        out[f"{when}_untouched"] = all(torch.equal(v, full(m)[k]) for k, v in before.items())
        m.reset_iter_state()
    pool.materialize(W3, into=m)  # after the reset: merged into the shards, kept past the next iteration
    m(torch.randn(2, 13)).sum().backward()
    m.reshard()
    want = build()
    pymerge.CheckpointPool(files[:3], base=files[3]).materialize(W3, into=want)
    got = full(m)
    out["merged_after_reset"] = all(torch.equal(got[k], p.detach()) for k, p in want.named_parameters())
    return out


def test_a_module_left_mid_iteration_is_refused(tmp_path):
    files = write_checkpoints(str(tmp_path))
    results = dist_helpers.run(failed_forward_worker, 2, str(tmp_path), files)
    for res in results:
        for when in ("materialize", "build"):
            assert res[when] == ("InputError: FSDP module (the root) is in the middle of an iteration (a forward or "
                                 "backward that raised?), its parameters gathered: call reset_iter_state() on the "
                                 "root FSDP module first"), res
            assert res[f"{when}_untouched"], when
        assert res["merged_after_reset"]


def backward_after_merge_worker(rank, world, files, layout="fsdp"):
    """forward, materialize, backward: FSDP2 saved its gathered parameters for the backward and gathers the
    merged shards into them again before it, keeping their version counters, so the backward mixed the old
    activations with the new weights, silently (an audit: gradients off by up to 0.09), where a plain model raises
    torch's in-place error as the README says. Tensor parallel (layout="tp") saves the DTensor parameters, whose
    counters are not their local tensors' (the ones written): silent too (another audit: gradients off by 27)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import pymerge
    torch.manual_seed(0)
    m = build() if layout != "tp" else _build_even()
    if layout == "tp":
        parallelize_module(m, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    else:
        for sub in (m[0], m):
            fully_shard(sub, mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    out = {}
    y = m(torch.randn(4, 13))
    pool.materialize(W3, into=m)
    out["stale"] = _backward_error(y)
    if layout != "tp":
        m.reset_iter_state()
    m.zero_grad()
    m(torch.randn(4, 13)).sum().backward()  # a forward after the merge: its backward runs as usual
    out["fresh"] = all(p.grad is not None for p in m.parameters())
    # Refused calls write nothing, so the forward's backward still runs: refused before any write; at the plans'
    # agreement (no target tensor of those names); and on one rank only, before its plans (that rank had left
    # its root gathered where the other resharded, and the backward's all-gathers met on one rank only: gloo
    # aborted the process; a review)
    for key, weights, names in (("refused", [0.5, 0.5], None), ("refused_at_plans", W3, lambda n: "missing." + n),
                                ("refused_on_one", W3 if rank == 0 else [0.5, 0.5], lambda n: n)):
        m.zero_grad()
        y = m(torch.randn(4, 13))
        try:
            pool.materialize(weights, into=m, names=names)
        except Exception as exc:
            out[key] = type(exc).__name__
        y.sum().backward()
        out[f"{key}_then_backward"] = all(p.grad is not None for p in m.parameters())
    # a call planned afresh (names= a function: no cache entry) bumps them too (a review: it did not)
    y = m(torch.randn(4, 13))
    pool.materialize(W3, into=m, names=lambda n: n)
    out["stale_uncached"] = _backward_error(y)
    return out


def _backward_error(y) -> "str | None":
    """The error of a backward through y (a forward's output), or None where it ran."""
    try:
        y.sum().backward()
        return None
    except RuntimeError as exc:
        return str(exc)


def _build_even():  # every parameter a DTensor under TP (a plain one written raised anyway); 12 hidden features:
    return torch.nn.Sequential(torch.nn.Linear(13, 12), torch.nn.ReLU(), torch.nn.Linear(12, 7))  # (11: uneven, fails)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_a_backward_through_a_forward_from_before_a_merge_raises_under_fsdp_and_tp(tmp_path, layout):
    shapes = {n: tuple(p.shape) for n, p in (_build_even() if layout == "tp" else build()).state_dict().items()}
    files = write_checkpoints(str(tmp_path), shapes)
    for res in dist_helpers.run(backward_after_merge_worker, 2, str(tmp_path), files, layout):
        assert res["stale"] is not None and "modified by an inplace operation" in res["stale"], res
        assert res["stale_uncached"] is not None and "modified by an inplace operation" in res["stale_uncached"], res
        assert res["fresh"], res
        for key in ("refused", "refused_at_plans", "refused_on_one"):
            assert res[key] == "InputError" and res[f"{key}_then_backward"], (key, res)


def test_the_values_sample_reads_any_shape_and_tells_checkpoints_apart():
    """What ranks compare per checkpoint: the same for equal values in another memory layout or device-free
    copy, different for other values; a (0, 4) tensor (no first row) raised IndexError (a review)."""
    from pymerge.dist.pool import _values_sample
    from pymerge.pool.sources import DictSource
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(5, 7, generator=g), "empty": torch.zeros(0, 4), "s": torch.tensor(2.0),
         "e4": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn), "ids": torch.arange(3)}
    b = {k: v.clone() for k, v in a.items()}
    b["w"] = a["w"].t().contiguous().t()  # the same values, stored column-major
    assert _values_sample(DictSource(a, "a")) == _values_sample(DictSource(b, "b"))
    for k in ("w", "s", "e4"):
        c = {n: v.clone() for n, v in a.items()}
        c[k] = (c[k].float() + 1).to(c[k].dtype)
        assert _values_sample(DictSource(c, "c")) != _values_sample(DictSource(a, "a")), k
    c = {n: v.clone() for n, v in a.items()}
    c["w"][-1, -1] += 1  # the last row only (an embedding's added tokens): its first row alone missed it
    assert _values_sample(DictSource(c, "c")) != _values_sample(DictSource(a, "a"))


def kept_plans_worker(rank, world, files):
    """Plans kept between calls (they cost ~20 us a tensor per call), reused only where every rank's are."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    ckpts, base = files[:3], files[3]
    mesh = init_device_mesh("cpu", (world,))
    m = build()
    for layer in m:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    pool, ref = pymerge.CheckpointPool(ckpts, base=base, shard_like=m), pymerge.CheckpointPool(ckpts, base=base)
    planned, selected = [], []
    real = pool._agreed_plans
    pool._agreed_plans = lambda *a: planned.append(1) or real(*a)
    from pymerge.dist import methods as dist_methods
    real_select = dist_methods._select
    dist_methods._select = lambda *a: selected.append(1) or real_select(*a)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    out = {"bits": [], "planned": [], "selected": []}

    def check(w, **kw):
        want = build()
        ref.materialize(w, into=want, **kw)
        pool.materialize(w, into=m, **kw)
        out["bits"].append(all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(),
                                                                                        want.parameters())))
        out["planned"].append(len(planned))
        out["selected"].append(len(selected))

    def train_step():  # FSDP gathers and frees each layer's parameters, and leaves the root's gathered
        m(torch.randn(4, 13)).sum().backward()
        opt.step()
        opt.zero_grad()

    check(W3)
    check([0.1, 0.6, 0.3])  # kept
    train_step()
    check(W3)  # kept: the training step registered nothing, and the root was resharded in place
    check(W3, method="ties", density=0.55)  # the per-tensor methods keep theirs (another entry)
    check(W3, method="task_arithmetic", **{"lambda": 0.9})  # one native call, as linear's (a third entry)
    check([0.2, 0.3, 0.5], method="task_arithmetic", **{"lambda": 0.9})
    train_step()
    check([0.2, 0.2, 0.6], method="ties", density=0.55)
    # FSDP may put a new local tensor in a DTensor (reset_sharded_param): the kept plans wrote the old one, on
    # that rank alone; the other ranks' plans were valid, and had they kept them while this one planned again,
    # the ranks' agreements would be out of step (a hang)
    if rank == 1:
        w = m[0].weight
        w._local_tensor = w._local_tensor.clone()
    check(W3)
    check([0.3, 0.3, 0.4])
    if rank == 1:  # new memory under the same local tensor object (set_data): the kept plans wrote the old one
        w = m[1].weight
        w._local_tensor.data = w._local_tensor.data.clone()
    check([0.25, 0.5, 0.25])
    if rank == 0:  # a parameter registered on one rank's model: that rank's entry is stale
        m[2].register_buffer("extra", torch.zeros(1))
    check([0.5, 0.25, 0.25], method="ties", density=0.55)
    # each rank a kept entry for two target models; then each rank passes the other one (strict=False: a model
    # without the pool's last layer): the kept plans differ, so every rank plans again, and they refuse (a
    # review: ranks reusing their entries wrote two models (linear) or crashed gloo (ties))
    partial = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Linear(11, 7), torch.nn.Identity())
    for layer in list(partial)[:2]:
        fully_shard(layer, mesh=mesh)
    fully_shard(partial, mesh=mesh)
    out["mixed"] = []
    for kw in (dict(method="linear"), dict(method="ties", density=0.55), dict(method="ties", density=0.6)):
        for target in (m, partial):
            pool.materialize(W3, into=target, strict=False, **kw)
        try:
            pool.materialize(W3, into=m if rank == 0 else partial, strict=False, **kw)
            out["mixed"].append("returned")
        except Exception as exc:
            out["mixed"].append(f"{type(exc).__name__}: {str(exc)[:40]}")
    check(W3)  # still in step
    # a budget below the model's size chose the mmap tier and said so, but each rank copies its boxes out of the
    # files (an audit): what it holds is described
    out["describe"] = pymerge.CheckpointPool(ckpts, base=base, shard_like=m, memory_budget=1).describe()
    # the task-vector call's resolved arrays are kept while the statistics are: a new density resolves again, and
    # so does a checkpoint changed in place (its statistics dropped on every rank), with the new data's bits
    n = len(selected)
    check(W3, method="ties", density=0.55)
    check([0.1, 0.2, 0.7], method="ties", density=0.55)
    check(W3, method="ties", density=0.7)
    with torch.no_grad():
        pool._inputs["0.weight"][1].mul_(1.7)  # the pool's own copy, changed in place (its version counter moves)
        ref._inputs["0.weight"][1].mul_(1.7)
    check(W3, method="ties", density=0.7)
    out["selected_after"] = [x - n for x in out["selected"][-4:]]
    dist_methods._select = real_select
    return out


def test_plans_are_kept_while_every_rank_s_are_valid(tmp_path):
    files = write_checkpoints(str(tmp_path))
    from datetime import timedelta
    results = dist_helpers.run(kept_plans_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=30), wall_s=120)
    for res in results:
        assert res["bits"] == [True] * 16, res["bits"]
        assert res["mixed"] == ["InputError: ranks planned different writes: their ta"] * 3, res["mixed"]
        # linear plans once; ties once; task_arithmetic once; after rank 1's new local tensor both ranks plan
        # (linear), then keep them; after its new memory under the same one, again; after rank 0's
        # registration, ties again
        assert res["planned"][:11] == [1, 1, 1, 2, 3, 3, 3, 4, 4, 5, 6], res["planned"]
        assert "residency host (each rank copies its shards out of the files" in res["describe"], res["describe"]
        assert res["bits"][-4:] == [True] * 4 and res["selected_after"] == [1, 1, 2, 3], res["selected_after"]
        assert "mmap" not in res["describe"], res["describe"]


def two_threads_worker(rank, world, files):
    """Rank 0 merges in a thread that waits in an agreement (rank 1 comes late) while its main thread calls
    too: refused at once (it would have paired its collectives with rank 1's first call), and the pool works
    on after the first call returns."""
    import threading
    import time

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    m = fully_shard(build(), mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    refused, first = None, []
    if rank == 0:
        thread = threading.Thread(target=lambda: first.append(pool.materialize(W3, into=m) is m))
        thread.start()
        time.sleep(0.5)
        try:
            pool.materialize([0.2, 0.3, 0.5], into=m)
        except Exception as exc:
            refused = f"{type(exc).__name__}: {exc}"
        thread.join()
    else:
        time.sleep(2)
        first.append(pool.materialize(W3, into=m) is m)
    pool.materialize([0.2, 0.3, 0.5], into=m)
    return {"refused": refused, "first": first, "later": m[0].weight.to_local().clone()}


def test_a_second_thread_s_call_is_refused(tmp_path):
    from datetime import timedelta
    files = write_checkpoints(str(tmp_path))
    results = dist_helpers.run(two_threads_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=30), wall_s=120)
    assert results[0]["refused"] is not None and results[0]["refused"].startswith(
        "InputError: this sharded pool is already merging in another thread"), results[0]["refused"]
    assert results[1]["refused"] is None and all(res["first"] == [True] for res in results), results
    import pymerge
    want = pymerge.CheckpointPool(files[:3], base=files[3]).materialize([0.2, 0.3, 0.5], into=build())[0].weight
    assert torch.equal(torch.cat([res["later"] for res in results]), want.detach())


def test_input_versions_follow_in_place_changes_and_never_reuse_an_inference_tensor_s():
    """The sharded task-vector call's statistics are kept while these are unchanged: read each call (the plain
    counters, cached per tensor), and an inference tensor's (no counter) differ every time."""
    from pymerge.dist.pool import ShardedPool
    pool = ShardedPool.__new__(ShardedPool)
    pool._held, pool._plain_versions = {}, True
    a, b, base = torch.zeros(3), torch.ones(3), torch.ones(3)
    pool._inputs, pool._base = {"w": [a, b]}, {"w": base}
    first = pool.input_versions("w")
    assert pool.input_versions("w") == first and len(first) == 3
    base.add_(1)
    assert pool.input_versions("w") != first
    with torch.inference_mode():
        c = torch.zeros(3)
    pool._inputs["v"] = [a, c]
    assert pool.input_versions("v") != pool.input_versions("v")
    assert pool.input_versions("w") == pool.input_versions("w")


def ranks_differ_worker(rank, world, files):
    """Ranks passing other weights or checkpoints, or refusing an argument alone, where nothing compared them
    (audits): list(alpha) of a learnable tensor as weights (its digest failed, every rank's was 0: FSDP2's
    shards merged with each rank's weights), a model all Replicate() (no pool group: no agreement at all), and
    compress= refused on one rank before the agreement (the others waited out the group's timeout)."""
    import time

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    import pymerge
    mesh = init_device_mesh("cpu", (world,))

    def error_of(fn):
        t0 = time.monotonic()
        try:
            fn()
            return None, time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}", time.monotonic() - t0

    out = {}
    m = fully_shard(build(), mesh=mesh)
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=m)
    alpha = torch.tensor(W3 if rank == 0 else [0.2, 0.3, 0.5], requires_grad=True)
    out["grad_weights"] = error_of(lambda: pool.materialize(list(alpha), into=m))
    same = torch.tensor(W3, requires_grad=True)
    out["grad_weights_same"] = error_of(lambda: pool.materialize(list(same), into=m))

    rep = build()
    for name, p in list(rep.named_parameters()):
        mod, attr = rep.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(mod, attr, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()])))
    rpool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=rep)
    out["replicated_weights"] = error_of(lambda: rpool.materialize(W3 if rank == 0 else [0.2, 0.3, 0.5], into=rep))
    out["replicated_same"] = error_of(lambda: rpool.materialize(W3, into=rep))
    mine = files[:3] if rank == 0 else [files[0], files[2], files[1]]
    out["replicated_files"] = error_of(lambda: pymerge.CheckpointPool(mine, base=files[3], shard_like=rep))
    out["compress_one_rank"] = error_of(lambda: pymerge.CheckpointPool(
        files[:3], base=files[3], shard_like=m, **({"compress": "int8"} if rank == 1 else {})))

    # FSDP2 over TP with an empty TP shard: a (3, 1) weight's one column over tp = 2 leaves rank 1 a (0, 0) local
    # tensor where the layout says (3, 0), and every merge into the very model the pool was built from was refused
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
    from safetensors.torch import save_file
    small = [os.path.join(os.path.dirname(files[0]), f"small{i}.safetensors") for i in range(2)]
    if rank == 0:
        for i, f in enumerate(small):
            save_file({"0.weight": torch.full((3, 1), float(i + 1)), "0.bias": torch.full((3,), float(i))}, f)
    torch.distributed.barrier()
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    tp = torch.nn.Sequential(torch.nn.Linear(1, 3))
    parallelize_module(tp, mesh2["tp"], {"0": RowwiseParallel()})
    fully_shard(tp, mesh=mesh2["dp"])
    out["empty_shard"] = error_of(lambda: pymerge.CheckpointPool(small, shard_like=tp).materialize([0.25, 0.75],
                                                                                                 into=tp))
    w = tp[0].weight
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    out["empty_shard_local"] = (tuple(w.to_local().shape), tuple(shape), w.to_local().detach().reshape(-1).tolist())
    return out


def test_ranks_that_differ_are_refused_on_every_rank(tmp_path):
    from datetime import timedelta
    files = write_checkpoints(str(tmp_path))
    results = dist_helpers.run(ranks_differ_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=20), wall_s=120)
    for res in results:
        assert "crash" not in res, res
        for case in ("grad_weights", "replicated_weights"):
            assert "ranks called the sharded pool with different arguments" in (res[case][0] or ""), (case, res)
        assert "read other checkpoints than rank 0" in (res["replicated_files"][0] or ""), res
        error, seconds = res["compress_one_rank"]
        assert "compress= and shard_like= do not combine" in (error or "") and seconds < 10, res
        assert res["grad_weights_same"][0] is None and res["replicated_same"][0] is None, res
        assert res["empty_shard"][0] is None, res
    assert results[0]["empty_shard_local"] == ((3, 1), (3, 1), [1.75] * 3), results[0]
    assert results[1]["empty_shard_local"] == ((0, 0), (3, 0), []), results[1]  # (FSDP2's empty shard's shape)


def test_a_sharded_pools_copy_moved_by_the_callers_groups_rule_is_refused(tmp_path):
    """A groups rule (the caller's code) that moved a copy the sharded pool holds (pool.tensor() of a converted
    float64 source, resized) merged ties without a word once the single-process pool's second check had moved to
    paths the sharded pool's tensor-by-tensor merge does not take (a review). One rank, its own process."""
    import subprocess
    import sys
    code = """
import os, torch, torch.distributed as dist
from datetime import timedelta
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + os.getpid() % 20000))
dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
from pymerge.errors import InputError
from pymerge.pool.pool import CheckpointPool
g = torch.Generator().manual_seed(0)
src = [{"w": torch.randn(64, 64, generator=g, dtype=torch.float64)} for _ in range(3)]
target = {"w": torch.zeros(64, 64)}
pool = CheckpointPool(src, base={"w": torch.randn(64, 64, generator=g, dtype=torch.float64)}, residency="mmap",
                      shard_like=target)
pool.materialize([0.2, 0.3, 0.5], into=target, method="ties")
held = pool.tensor(1, "w")
def rule(name):
    held.untyped_storage().resize_(held.untyped_storage().nbytes() * 4)
    return 0
try:
    pool.materialize([0.2, 0.3, 0.5], into=target, method="ties", groups=rule)
    print("merged")
except InputError as exc:
    print("refused" if "the pool's copy of checkpoint source 1 was freed or moved" in str(exc) else str(exc))
dist.destroy_process_group()
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.returncode, r.stdout, r.stderr[-2000:])


def test_a_sharded_pool_under_the_meta_device_merges_as_without(tmp_path):
    """The default-device fix (pymerge/default_device.py) missed ShardedPool's own construction and merges: under
    torch.device("meta") its agreements' tensors had no data (a review). One rank, its own process."""
    import subprocess
    import sys
    code = """
import os, torch, torch.distributed as dist
from datetime import timedelta
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + os.getpid() % 20000))
dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
from pymerge.pool.pool import CheckpointPool
g = torch.Generator().manual_seed(0)
src = [{"w": torch.randn(64, 64, generator=g)} for _ in range(3)]
base = {"w": torch.randn(64, 64, generator=g)}
want = CheckpointPool(src, base=base).materialize([0.2, 0.3, 0.5], into={"w": torch.zeros(64, 64)}, method="ties")
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
target = {"w": distribute_tensor(torch.zeros(64, 64), init_device_mesh("cpu", (1,)), [Shard(0)])}
with torch.device("meta"):
    pool = CheckpointPool(src, base=base, shard_like=target)
    pool.materialize([0.2, 0.3, 0.5], into=target, method="ties")
print("same" if torch.equal(target["w"].full_tensor(), want["w"]) else "differs")
dist.destroy_process_group()
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "same", (r.returncode, r.stdout, r.stderr[-2000:])


def bounded_stats_worker(rank, world, files):
    """The statistics cache over many seeds and densities: bounded, and every result the single process's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    from pymerge.dist.pool import StatsCache
    ckpts, base = files[:3], files[3]
    mesh = init_device_mesh("cpu", (world,))
    m = build()
    fully_shard(m, mesh=mesh)
    pool, ref = pymerge.CheckpointPool(ckpts, base=base, shard_like=m), pymerge.CheckpointPool(ckpts, base=base)
    out = {"bits": [], "sizes": []}

    def check(**kw):
        want = build()
        ref.materialize(W3, into=want, **kw)
        pool.materialize(W3, into=m, **kw)
        out["bits"].append(all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(),
                                                                                        want.parameters())))
        out["sizes"].append(len(pool.stats_cache))
    for seed in range(12):  # one seed's masks per tensor and model are kept
        check(method="della", density=0.6, epsilon=0.1, rescale=False, seed=seed)
    for density in (0.5, 0.7, 0.6):  # one density's
        check(method="della", density=density, epsilon=0.1, rescale=False, seed=11)
    for seed in (3, 4):
        check(method="dare_ties", density=0.5, seed=seed)
    StatsCache.MAX_ENTRIES = 40  # past it (or the pool's room, 48 here) the cache starts again, alike on every rank
    for density in (0.3, 0.4, 0.5, 0.6, 0.7, 0.3):
        check(method="ties", density=density)
    out["room"] = pool.stats_cache.room
    return out


def alternating_densities_worker(rank, world, files):
    """TIES alternating two densities, the statistics cache's floor below what they need: (misses per call, bits)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    from pymerge.dist import methods
    from pymerge.dist.pool import StatsCache
    StatsCache.MAX_ENTRIES = 16  # two densities need 2 x 6 tensors x 3 checkpoints = 36 entries
    ckpts, base = files[:3], files[3]
    m = build()
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    pool, ref = pymerge.CheckpointPool(ckpts, base=base, shard_like=m), pymerge.CheckpointPool(ckpts, base=base)
    misses, resolve = [], methods._resolve

    def counted(*args, **kw):
        misses[-1] += 1
        return resolve(*args, **kw)
    methods._resolve = counted
    bits = []
    for density in (0.5, 0.6) * 3:
        misses.append(0)
        want = build()
        ref.materialize(W3, into=want, method="ties", density=density)
        pool.materialize(W3, into=m, method="ties", density=density)
        bits.append(all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(), want.parameters())))
    return misses, bits


def test_a_pool_alternating_two_densities_hits_its_statistics_cache(tmp_path):
    """The sharded pool's cache emptied itself at a fixed 65,536 entries: past that (tensors x checkpoints x 2), a
    search alternating two densities recomputed every statistic, collectives included, on every call (330x slower;
    a scaling audit). It now has room for every tensor and checkpoint under two settings, as the single pool."""
    files = write_checkpoints(str(tmp_path))
    from datetime import timedelta
    results = dist_helpers.run(alternating_densities_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=30),
                               wall_s=120)
    for misses, bits in results:
        assert all(bits), bits
        assert misses[:2] == [18, 18] and misses[2:] == [0] * 4, misses  # 6 tensors x 3 checkpoints, then hits


def first_call_collectives_worker(rank, world, files):
    """all_reduce and all_gather_object calls of each first (uncached) call, per method and path, and whether its bits
    are one process's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    from pymerge.dist import methods, pool as dpool
    ckpts, base = files[:3], files[3]
    m = build()
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    calls = [0]

    def counted(collective):
        def call(*args, **kw):
            calls[0] += 1
            return collective(*args, **kw)
        return call
    dist.all_reduce, dist.all_gather_object = counted(dist.all_reduce), counted(dist.all_gather_object)
    out = {}
    for path in ("grouped", "per tensor", "small batches", "unbatched"):
        if path == "per tensor":  # as a GPU pool's, or dtypes the native table lacks
            dpool.native_tv_table = lambda *a, **k: None
        if path == "unbatched":  # each statistic by itself, as where a cleared cache leaves one to resolve alone
            methods._find_bounds = methods._find_plans = lambda pool, wanted: None
        if path == "small batches":  # a batch flushed by its count of boundaries, or by its elements: by their
            # global count (the (11, 13) weight's 143), as rank 0's 78 + 78 and rank 1's 65 + 65 + 65 crossed 140 at
            # different keys (histograms of two shapes: gloo aborted; a review)
            methods._BATCH_BOUNDS, methods._BATCH_ELEMENTS, methods._BATCH_PLANS = 3, 140, 4
        for method, kw in (("ties", {"density": 0.4}), ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}),
                           ("dare_ties", {"density": 0.6}),  # an L1 rescale of random masks
                           ("ties", {"density": 0.4, "rescale": True}),  # of magnitude ranks: after their bounds
                           ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": "l1"}),
                           ("della", {"density": 0.5, "epsilon": 0.1}),  # masks: 1-D tensors' rows gathered
                           ("della_linear", {"density": 0.5, "epsilon": 0.1})):  # and an L1 rescale
            pool, ref = pymerge.CheckpointPool(ckpts, base=base, shard_like=m), pymerge.CheckpointPool(ckpts, base=base)
            want = build()
            ref.materialize(W3, into=want, method=method, **kw)
            calls[0] = 0
            pool.materialize(W3, into=m, method=method, **kw)
            same = all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(), want.parameters()))
            out[path, method, "rescale" in kw or method in ("dare_ties", "della_linear")] = (calls[0], same)
    return out


def test_a_first_call_finds_every_rank_boundary_in_a_few_collectives(tmp_path):
    """A sharded pool's first TIES or breadcrumbs call ran four all_reduces for each tensor and checkpoint (one to
    agree, three histogram rounds): 71 s for 10,000 tiny tensors over gloo (a scaling audit); an L1 rescale
    (DARE's default) two more. They are now found together, a few collectives per 256 boundaries or rescales, with
    the same bits."""
    files = write_checkpoints(str(tmp_path))
    from datetime import timedelta
    results = dist_helpers.run(first_call_collectives_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=30),
                               wall_s=240)
    assert results[0] == results[1]
    for (path, method, rescaled), (calls, same) in results[0].items():
        assert same, (path, method, rescaled)
        if path not in ("small batches", "unbatched"):
            # 6 tensors x 3 checkpoints: 84 (ties), 98 (breadcrumbs), 40 (dare_ties) before, 36 more with rescales;
            # della 40 and 12 all_gathers, della_linear 76 and 12
            assert calls <= 20, (path, method, rescaled, calls)
    assert results[0]["small batches", "ties", False][0] > 30  # several batches (one per 3 boundaries)
    assert results[0]["small batches", "dare_ties", True][0] > 10  # (one per 4 plans)
    assert results[0]["small batches", "della", False][0] > 10
    assert results[0]["unbatched", "della", False][0] > 40  # each mask by itself: 1-D rows gathered one at a time


def first_call_dots_worker(rank, world, files):
    """all_reduce calls of each first SLERP, NuSLERP and Model Stock call, and whether its bits are one process's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    from pymerge.dist import methods
    m = build()
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    calls, all_reduce = [0], dist.all_reduce

    def counted(*args, **kw):
        calls[0] += 1
        return all_reduce(*args, **kw)
    dist.all_reduce = counted
    out = {}
    for batch_rows in (512, 5):  # 5: a flush per one to two tensors' sums (3 or 6 each)
        methods._BATCH_ROWS = batch_rows
        for method, n, kw in (("slerp", 1, {"t": 0.3}), ("nuslerp", 2, {}), ("model_stock", 3, {})):
            w = W3[:n] if method != "slerp" else [1.0]
            pool, ref = (pymerge.CheckpointPool(files[:n], base=files[3], shard_like=m),
                         pymerge.CheckpointPool(files[:n], base=files[3]))
            want = build()
            ref.materialize(w, into=want, method=method, **kw)
            calls[0] = 0
            pool.materialize(w, into=m, method=method, **kw)
            same = all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(m.parameters(), want.parameters()))
            out[batch_rows, method] = (calls[0], same)
    return out


def test_a_first_call_finds_every_dot_product_in_a_few_collectives(tmp_path):
    """A sharded pool's first SLERP, NuSLERP or Model Stock call ran two all_reduces per tensor (one to agree, one
    to sum its dot products): 2,004 for a Model Stock call over 1,000 tiny tensors (2.8 s on gloo, 1.4 s now).
    They are summed together, one all_reduce per 512 sums, with the same bits."""
    files = write_checkpoints(str(tmp_path))
    from datetime import timedelta
    results = dist_helpers.run(first_call_dots_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=30),
                               wall_s=120)
    assert results[0] == results[1]
    for (batch_rows, method), (calls, same) in results[0].items():
        assert same, (batch_rows, method)
        if batch_rows == 512:
            assert calls <= 8, (method, calls)  # 6 tensors: 17 before
    assert results[0][5, "model_stock"][0] > 8  # a flush per tensor (6 sums each)


def test_the_statistics_cache_is_bounded_over_seeds_and_densities(tmp_path):
    """It grew by an entry per tensor and model with every new seed or density, DELLA's each holding a mask of the
    rank's shard (about 330 MB a call for a 7B model on 8 ranks, by arithmetic: an audit)."""
    files = write_checkpoints(str(tmp_path))
    from datetime import timedelta
    results = dist_helpers.run(bounded_stats_worker, 2, str(tmp_path), files, timeout=timedelta(seconds=30),
                               wall_s=120)
    for res in results:
        assert all(res["bits"]), res["bits"]
        della = res["sizes"][:15]
        assert della[1:] == [della[0]] * 14, della  # no growth with the seed or the density
        assert res["room"] == 2 * 6 * 4 and max(res["sizes"][17:]) <= 48, res  # 6 tensors, 3 checkpoints + base
    assert results[0]["sizes"] == results[1]["sizes"]


def state_dict_target_worker(rank, world, files):
    """An FSDP2 model's state_dict() as the layout and the target: a forward leaves the root gathered, and a merge
    into the state dict wrote the shards unseen by every later forward (each candidate scored as the model before
    the merge), and a backward through a pre-merge forward ran silently."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    torch.manual_seed(0)
    m = build()
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    sd = m.state_dict()
    pool = pymerge.CheckpointPool(files[:3], base=files[3], shard_like=sd)
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(0))
    out = {"forwards": []}
    for w in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]):
        with torch.no_grad():
            m(x)  # the root stays gathered
        pool.materialize(w, into=sd)
        with torch.no_grad():
            out["forwards"].append(m(x))
    y = m(x)
    pool.materialize(W3, into=sd)
    out["stale"] = _backward_error(y)
    return out


def test_a_state_dict_target_of_an_fsdp_model_is_seen_by_the_next_forward(tmp_path):
    from pymerge.pool.pool import CheckpointPool
    files = write_checkpoints(str(tmp_path))
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(0))
    want = []
    for w in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]):
        ref = build()
        CheckpointPool(files[:3], base=files[3]).materialize(w, into=ref)
        with torch.no_grad():
            want.append(ref(x))
    for res in dist_helpers.run(state_dict_target_worker, 2, str(tmp_path), files):
        for got, ref in zip(res["forwards"], want):
            torch.testing.assert_close(got, ref)
        assert res["stale"] is not None and "modified by an inplace operation" in res["stale"], res
