"""The sharded pool gives the single-process pool's bits for every method it supports, and stays in
step when one rank fails or one rank's inputs change.

- Bits: 2 and 3 ranks (3: uneven shards), FSDP2 (Shard(0)) and tensor parallel (Shard(0) and
  Shard(1)), float32 and bfloat16 targets, checkpoints in float32 / bfloat16 / float16 whose deltas
  span ~48 binary orders with exact cancellations: float partial sums taken in another order
  round differently, so the L1 rescales and dot products must be one definition (exact sums).
- Errors on one rank only (a target of another dtype or shape, overlapping targets, its own
  arguments, bytes it cannot read) are raised on every rank with one message, nothing written,
  well inside the group's short timeout (a hang would fail with a timeout error instead).
- Statistics cached by the sharded pool are dropped on every rank when any rank's held tensors
  change in place (autograd version counters), so a later merge matches a fresh single process.
"""
import os
import time
from datetime import timedelta

import pytest
import torch
from safetensors.torch import load_file, save_file

import dist_helpers

SHAPES = {"0.weight": (251, 384), "0.bias": (251,), "1.weight": (97, 251), "1.bias": (97,), "2.weight": (97,),
          "2.bias": (97,)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of checkpoints 0, 1, 2 (the base: float32)
W3 = [0.45, 0.35, 0.2]
# (label, checkpoints, kwargs): every method the sharded pool merges
CASES = [
    ("linear", 3, dict(method="linear")),
    ("task_arithmetic", 3, dict(method="task_arithmetic")),
    ("ties", 3, dict(method="ties", density=0.4)),
    ("dare_ties", 3, dict(method="dare_ties", density=0.5)),
    ("dare_linear", 3, dict(method="dare_linear", density=0.6)),
    ("dare_linear_inv", 3, dict(method="dare_linear", density=0.6, rescale="inverse_density")),
    ("breadcrumbs", 3, dict(method="breadcrumbs", density=0.7, gamma=0.05)),
    ("breadcrumbs_ties", 3, dict(method="breadcrumbs_ties", density=0.7, gamma=0.05)),
    ("della", 3, dict(method="della", density=0.5, epsilon=0.2)),
    ("della_linear", 3, dict(method="della_linear", density=0.5, epsilon=0.2)),
    ("slerp", 1, dict(method="slerp", t=0.35)),
    ("nuslerp", 2, dict(method="nuslerp")),
    ("nuslerp_rows", 2, dict(method="nuslerp", nuslerp_flatten=False)),
    ("model_stock", 3, dict(method="model_stock")),
    ("model_stock_rows", 3, dict(method="model_stock", filter_wise=True)),
    ("passthrough", 1, dict(method="passthrough", scale=0.7)),
]
WHOLE_ROWS = {"della", "della_linear", "nuslerp_rows", "model_stock_rows"}  # need rows whole: Shard(0) only
BF16_TARGETS = {"dare_ties", "della_linear", "slerp", "nuslerp", "model_stock", "ties"}


def build(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(384, 251), torch.nn.Linear(251, 97), torch.nn.LayerNorm(97)).to(dtype)


def write_checkpoints(d):
    """Deltas over ~48 binary orders (float16: ~26), exact cancellations, many elements; and one small
    tensor whose L1 norm is rounded differently by float64 partial sums."""
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    sds = []
    for dtype in DTYPES:
        lo, hi = (-12, 12) if dtype == torch.float16 else (-24, 24)
        sd = {}
        for k, v in base.items():
            delta = torch.randn(v.shape, generator=g) * torch.exp2(torch.randint(lo, hi, v.shape, generator=g).float())
            flat = delta.view(-1)
            half = flat.numel() // 2
            flat[half:2 * half:7] = -flat[:half:7]  # cancellations: opposite deltas far apart
            sd[k] = v + delta
        sds.append(sd)
    # |d| summing to 1 + 2^-24 + 2^-52 exactly: above a float32 midpoint by what float64 partial sums drop
    base["2.weight"] = torch.zeros(97)
    sds[0]["2.weight"] = torch.cat([torch.full((32,), 2.0 ** -5), torch.tensor([2.0 ** -24]), torch.full((64,), 2.0 ** -58)])
    files = []
    for i, (sd, dtype) in enumerate(zip(sds, DTYPES)):
        files.append(os.path.join(d, f"m{i}.safetensors"))
        save_file({k: v.to(dtype) for k, v in sd.items()}, files[-1])
    files.append(os.path.join(d, "base.safetensors"))
    save_file(base, files[-1])
    return files


def _layouts(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))

    def sharded(layout, dtype=torch.float32):
        m = build(dtype)
        if layout == "fsdp":
            fully_shard(m, mesh=mesh)
        else:  # 0.weight, 0.bias: Shard(0); 1.weight: Shard(1); the rest replicated
            parallelize_module(m, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
        return m
    return mesh, sharded


def _full(m):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in m.named_parameters()}


def bits_worker(rank, world, d, files):
    import pymerge
    _, sharded = _layouts(world)
    ckpts, base = files[:3], files[3]
    refs = {n: pymerge.CheckpointPool(ckpts[:n], base=base) for n in (1, 2, 3)}
    out = {}
    for layout in ("fsdp", "tp"):
        for dtype in (torch.float32, torch.bfloat16):
            model = sharded(layout, dtype)
            pools = {n: pymerge.CheckpointPool(ckpts[:n], base=base, shard_like=model) for n in (1, 2, 3)}
            for label, n_src, kw in CASES:
                if (layout == "tp" and label in WHOLE_ROWS) or (dtype != torch.float32 and label not in BF16_TARGETS):
                    continue
                w = W3[:n_src] if kw["method"] not in ("slerp", "passthrough") else [1.0]
                ref = build(dtype)
                refs[n_src].materialize(w, into=ref, **kw)
                pools[n_src].materialize(w, into=model, **kw)
                got, want = _full(model), dict(ref.named_parameters())
                out[layout, str(dtype), label] = sorted(n for n in got if not torch.equal(got[n], want[n].detach()))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def bits(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(f"bits{request.param}"))
    return dist_helpers.run(bits_worker, request.param, d, d, write_checkpoints(d))


@pytest.mark.parametrize("label", [c[0] for c in CASES])
def test_sharded_bits_equal_single_process(bits, label):
    seen = 0
    for rank, res in enumerate(bits):
        for (layout, dtype, name), differ in res.items():
            if name == label:
                seen += 1
                assert not differ, f"rank {rank}: {layout} {dtype} {label}: {differ} differ from the single process"
    assert seen


# ---- one rank fails, or changes: every rank agrees -------------------------------------------------------
SHORT = timedelta(seconds=20)
CACHED = (("ties", dict(density=0.4)), ("dare_ties", dict(density=0.5)), ("della_linear", dict(density=0.5, epsilon=0.2)),
          ("model_stock", {}))  # methods whose statistics the sharded pool caches  # a rank left waiting in a collective fails within this, not the default minute


def agree_worker(rank, world, d, files):
    from torch.distributed.tensor import DTensor

    import pymerge
    from pymerge.dist import reads
    _, sharded = _layouts(world)
    ckpts, base = files[:3], files[3]
    model = sharded("fsdp")
    pool = pymerge.CheckpointPool(ckpts, base=base, shard_like=model)
    out = {"errors": {}, "seconds": {}, "untouched": {}}

    def local(sd):
        return {n: (t.to_local() if isinstance(t, DTensor) else t).clone() for n, t in sd.items()}

    def like(t, local_tensor, shape=None):  # a DTensor over another local tensor (no communication)
        shape = shape or tuple(t.shape)
        return DTensor.from_local(local_tensor, t.device_mesh, t.placements, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def attempt(key, sd, method, weights=W3, **kw):
        before = local(sd)
        t0 = time.monotonic()
        try:
            pool.materialize(weights, into=sd, method=method, **kw)
            out["errors"][key] = None
        except Exception as exc:
            out["errors"][key] = f"{type(exc).__name__}: {exc}"
        out["seconds"][key] = time.monotonic() - t0
        out["untouched"][key] = all(torch.equal(before[n], v) for n, v in local(sd).items())

    for method, kw in (("linear", {}), ("ties", dict(density=0.4)), ("dare_ties", dict(density=0.5))):
        sd = model.state_dict()
        if rank == 1:  # another dtype on one rank
            sd["1.weight"] = like(sd["1.weight"], sd["1.weight"].to_local().double())
        attempt(f"dtype_{method}", sd, method, **kw)
        sd = model.state_dict()
        if rank == world - 1:  # another global shape on one rank
            sd["0.bias"] = like(sd["0.bias"], torch.zeros(sd["0.bias"].to_local().shape[0] + 1), (252,))
        attempt(f"shape_{method}", sd, method, **kw)
        sd = model.state_dict()
        if rank == 0:  # two targets sharing memory, shifted by one element, on one rank
            n = sd["2.weight"].to_local().numel()
            buf = torch.zeros(n + 1)
            sd["2.weight"], sd["2.bias"] = like(sd["2.weight"], buf[:n]), like(sd["2.bias"], buf[1:])
        attempt(f"overlap_{method}", sd, method, **kw)
        attempt(f"weights_{method}", model.state_dict(), method, W3 if rank != 1 else W3[:2], **kw)

    real = reads.read_box

    def unreadable(raw, dtype, box):  # this rank's bytes of one tensor cannot be read
        if box.global_shape == SHAPES["1.weight"]:
            raise OSError("Input/output error")
        return real(raw, dtype, box)
    reads.read_box = unreadable if rank == 1 else real
    t0 = time.monotonic()
    try:
        pymerge.CheckpointPool(ckpts, base=base, shard_like=model)
        out["errors"]["unreadable"] = None
    except Exception as exc:
        out["errors"]["unreadable"] = f"{type(exc).__name__}: {exc}"
    out["seconds"]["unreadable"] = time.monotonic() - t0
    reads.read_box = real

    # the group is still in step: a merge after every failure is the single process's
    ref = build()
    single = pymerge.CheckpointPool(ckpts, base=base)
    single.materialize(W3, into=ref, method="dare_ties", density=0.5)
    pool.materialize(W3, into=model, method="dare_ties", density=0.5)
    out["in_step"] = all(torch.equal(v, ref.state_dict()[n]) for n, v in _full(model).items())

    # cached statistics follow the held tensors' version counters, agreed across ranks
    results = {}
    for step in ("cached", "all_changed", "one_changed"):
        if step == "all_changed":  # every rank doubles its shard of checkpoint 0's 0.weight in place
            pool.tensor(0, "0.weight").mul_(2)
        elif step == "one_changed" and rank == 1:  # one rank only: the global tensor changes there
            pool.tensor(0, "0.weight").mul_(-1)
        for method, kw in CACHED:
            pool.materialize(W3, into=model, method=method, **kw)
            results[step, method] = _full(model)
    out["cache"] = results
    return out


def expected_after_changes(files, world):
    """Single-process results for agree_worker's cache steps: checkpoint 0's 0.weight changed as the ranks did."""
    import pymerge
    sds = [load_file(f) for f in files[:3]]
    base = load_file(files[3])
    rows = torch.arange(SHAPES["0.weight"][0]).chunk(world)[1]  # rank 1's Shard(0) rows
    want = {}
    for step in ("cached", "all_changed", "one_changed"):
        if step == "all_changed":
            sds[0]["0.weight"] = sds[0]["0.weight"] * 2
        elif step == "one_changed":
            sds[0]["0.weight"][rows] *= -1
        pool = pymerge.CheckpointPool(sds, base=base)
        for method, kw in CACHED:
            m = build()
            pool.materialize(W3, into=m, method=method, **kw)
            want[step, method] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return want


@pytest.fixture(scope="module")
def agreed(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("agree"))
    files = write_checkpoints(d)
    return files, dist_helpers.run(agree_worker, 3, d, d, files, timeout=SHORT)


def test_one_rank_errors_are_every_ranks(agreed):
    _, results = agreed
    e = dist_helpers.agreed_errors(results)
    for key in e:
        assert all(res["seconds"][key] < SHORT.total_seconds() / 2 for res in results), key  # no rank waited out
        if key != "unreadable":
            assert all(res["untouched"][key] for res in results), f"{key}: a rank wrote before the error"
    for method in ("linear", "ties", "dare_ties"):
        assert e[f"dtype_{method}"].startswith("InputError: rank 1: ") and "torch.float64" in e[f"dtype_{method}"]
        assert e[f"shape_{method}"].startswith("InputError: rank 2: ") and "(252,)" in e[f"shape_{method}"]
        assert e[f"overlap_{method}"].startswith("InputError: rank 0: ") and "overlap" in e[f"overlap_{method}"]
        assert e[f"weights_{method}"].startswith("InputError: rank 1: ")
    assert e["unreadable"].startswith("CheckpointError: rank 1: ") and "cannot read this rank's bytes" in e["unreadable"]
    assert all(res["in_step"] for res in results)


def test_stats_cache_follows_versions_on_every_rank(agreed):
    files, results = agreed
    want = expected_after_changes(files, 3)
    for key, tensors in results[0]["cache"].items():
        differ = sorted(n for n, t in tensors.items() if not torch.equal(t, want[key][n]))
        assert not differ, f"{key}: {differ} differ from a single process on the changed checkpoints"
    assert not torch.equal(results[0]["cache"]["cached", "ties"]["0.weight"],
                           results[0]["cache"]["one_changed", "ties"]["0.weight"])


# ---- ranks that hold nothing of some tensors ------------------------------------------------------------
EMPTY_SHAPES = {"a.w": (4,), "b.w": (4, 1), "c.w": (7,), "d.w": (2, 5)}  # 3 ranks: a, b, d empty on rank 2
EMPTY_CASES = [("nuslerp", 2, dict(method="nuslerp"), True), ("nuslerp_nobase", 2, dict(method="nuslerp"), False),
               ("ties", 3, dict(method="ties", density=0.5), True), ("dare_ties", 3, dict(method="dare_ties", density=0.5), True),
               ("slerp", 1, dict(method="slerp", t=0.3), True), ("model_stock", 3, dict(method="model_stock"), True),
               ("della", 3, dict(method="della", density=0.5, epsilon=0.2), True), ("linear", 3, dict(method="linear"), False)]


class FourTensors(torch.nn.Module):
    """EMPTY_SHAPES' tensors, and e.w: a.w tied under a second name (one Parameter, as tied embeddings)."""
    def __init__(self):
        super().__init__()
        for name, shape in EMPTY_SHAPES.items():
            self.add_module(name[0], torch.nn.Module())
            getattr(self, name[0]).w = torch.nn.Parameter(torch.zeros(shape))
        self.e = torch.nn.Module()
        self.e.w = self.a.w


def empty_shards_worker(rank, world, files):
    import pymerge
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    out = {"local": None, "differ": {}, "seconds": {}}
    for label, n, kw, with_base in EMPTY_CASES:
        model = FourTensors()
        fully_shard(model, mesh=mesh)
        out["local"] = {n_: tuple(p.to_local().shape) for n_, p in model.named_parameters()}
        base = files[3] if with_base else None
        w = [0.5, 0.3, 0.2][:n] if label != "slerp" else [1.0]
        t0 = time.monotonic()
        pymerge.CheckpointPool(files[:n], base=base, shard_like=model).materialize(w, into=model, **kw)
        out["seconds"][label] = time.monotonic() - t0
        ref = FourTensors()
        pymerge.CheckpointPool(files[:n], base=base).materialize(w, into=ref, **kw)
        got = _full(model)
        assert model.e.w is model.a.w  # still tied after the merge
        out["differ"][label] = sorted(n_ for n_, p in ref.named_parameters() if not torch.equal(got[n_], p.detach()))
    return out


def test_ranks_holding_nothing_of_some_tensors_stay_in_step(tmp_path):
    """On 3 ranks rank 2 holds empty shards of three tensors (4 and 2 rows: 2, 2, 0). It used to count two
    of them as one tied tensor (both at data_ptr 0) and skip the other's collectives: a hang, or one
    tensor's statistics summed with another's; and nuslerp with a base failed there alone (its empty
    base has no address for the kernel) while the other ranks waited in the all_reduce. A truly tied
    parameter (a.w also as e.w, empty on rank 2 too) is written once on every rank."""
    d = str(tmp_path)
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in EMPTY_SHAPES.items()}
    files = []
    for i in range(3):
        files.append(os.path.join(d, f"m{i}.safetensors"))
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(dict(sd, **{"e.w": sd["a.w"].clone()}), files[-1])  # the tied tensor under both names
    files.append(os.path.join(d, "base.safetensors"))
    save_file(dict(base, **{"e.w": base["a.w"].clone()}), files[-1])
    results = dist_helpers.run(empty_shards_worker, 3, d, files, timeout=SHORT)
    assert results[2]["local"] == {"a.w": (0,), "b.w": (0, 1), "c.w": (1,), "d.w": (0, 5)}
    for label, *_ in EMPTY_CASES:
        assert results[0]["differ"][label] == [], f"{label}: differs from a single process"
        assert all(res["seconds"][label] < SHORT.total_seconds() / 2 for res in results), label
