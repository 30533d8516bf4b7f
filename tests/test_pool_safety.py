"""The pool never corrupts itself and autograd sees its writes (issue 8, items 3 and 11).

- A pool that reads a caller's tensors in place (the mmap tier over state dicts or modules, which a
  small memory_budget picks) refuses a target that shares their memory, before any write; so does
  any pool for a target made of its own resident tensors, and materialize_many for two candidates
  sharing memory. describe() says when the pool reads caller memory.
- materialize writes through raw pointers, so it bumps each written tensor's version counter:
  a backward through weights saved before a materialize raises torch's in-place error.
"""
import contextlib
import os
import re
import pytest
import numpy as np
import torch

import pymerge
import pymerge.ops._versions as versions
from pymerge.errors import CheckpointError, InputError, MergeConfigError
from pymerge.pool import CheckpointPool

W = [0.5, 0.3, 0.2]


def linears(n=3, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Linear(13, 7) for _ in range(n)]


def reference(models, w):
    return {k: sum(wi * m.state_dict()[k].double() for wi, m in zip(w, models)) for k in models[0].state_dict()}


def assert_is(model, ref):
    for k, v in model.state_dict().items():
        assert torch.allclose(v.double(), ref[k], atol=1e-6), k


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- item 3: targets that overlap what the pool reads -----------------------------------------------------
@pytest.mark.parametrize("how", [dict(residency="mmap"), dict(memory_budget=0)])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_borrowed_source_is_refused_as_a_target(how, method):
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models[1:]], base=models[0].state_dict(), **how)
    assert pool.residency == "mmap" and len(pool.borrowed) == 3
    assert "in place" in pool.describe() and "changing them with torch ops changes later merges" in pool.describe()
    params = {"density": 0.5} if method == "ties" else {}
    for victim in models:  # every source, the base included
        before = snapshot(victim)
        with pytest.raises(InputError, match="shares memory with .*(source|base).*which the pool reads in place.*nothing was written"):
            pool.materialize(W[:2], into=victim, method=method, **params)
        assert unchanged(victim, before)
    fresh = torch.nn.Linear(13, 7)
    pool.materialize(W[:2], into=fresh)
    assert_is(fresh, reference(models[1:], W[:2]))  # the pool is intact


def test_copies_are_not_borrowed_and_may_be_merged_into():
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    assert pool.residency == "host" and not pool.borrowed and "in place" not in pool.describe()
    ref = reference(models, W)
    pool.materialize(W, into=models[0])  # the pool holds copies: the source model is just a target
    assert_is(models[0], ref)
    pool.materialize(W, into=models[1])
    assert_is(models[1], ref)


def test_the_pools_own_tensors_and_partial_overlaps_are_refused():
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    own = {"weight": pool.tensor(1, "weight"), "bias": torch.zeros(7)}
    with pytest.raises(InputError, match="'weight'.*shares memory"):
        pool.materialize(W, into=own)
    buf = torch.randn(300)
    borrowed = CheckpointPool([{"w": buf[0:100]}, {"w": buf[100:200]}], residency="mmap")
    target = {"w": buf[150:250]}  # half inside source 1
    before = buf.clone()
    with pytest.raises(InputError, match="shares memory"):
        borrowed.materialize([1.0, 1.0], into=target)
    assert torch.equal(buf, before)
    transposed = {"w": buf[200:300].view(10, 10).t()}  # strided, overlapping nothing
    CheckpointPool([{"w": torch.ones(10, 10)}], residency="mmap").materialize([2.0], into=transposed)
    assert torch.equal(buf[200:300], torch.full((100,), 2.0))
    square = CheckpointPool([{"w": buf[100:200].view(10, 10)}, {"w": torch.ones(10, 10)}], residency="mmap")
    before = buf.clone()
    with pytest.raises(InputError, match="shares memory"):  # strided, over source 0
        square.materialize([1.0, 1.0], into={"w": buf[100:200].view(10, 10).t()})
    assert torch.equal(buf, before)


def test_candidates_sharing_memory_are_refused():
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    a, b = torch.nn.Linear(13, 7), torch.nn.Linear(13, 7)
    b.weight = a.weight  # two models sharing one parameter
    before = snapshot(a)
    with pytest.raises(InputError, match="candidates 0 and 1 share the memory of 'weight'"):
        pool.materialize_many([W, [0.2, 0.3, 0.5]], into=[a, b])
    assert unchanged(a, before)
    # ties inside one candidate (two names, one tensor) stay allowed, as for tied embeddings
    t = torch.empty(7)
    pool2 = CheckpointPool([{"x": torch.ones(7), "y": torch.ones(7)}])
    pool2.materialize([3.0], into={"x": t, "y": t})
    assert torch.equal(t, torch.full((7,), 3.0))
    buf = torch.zeros(10)
    with pytest.raises(InputError, match="targets of 'x' and 'y' overlap without being the same tensor"):
        pool2.materialize([3.0], into={"x": buf[0:7], "y": buf[3:10]})
    assert torch.equal(buf, torch.zeros(10))
    c, d = torch.nn.Linear(13, 7), torch.nn.Linear(13, 7)
    pool.materialize_many([W, W[::-1]], into=[c, d])
    assert_is(c, reference(models, W)) and assert_is(d, reference(models, W[::-1]))


def test_strided_targets_that_share_no_element_are_written():
    """Column slices of one fused weight (q = qkv[:, :4], k = qkv[:, 4:]) and interleaved rows have overlapping
    extents but no common element: they were refused as overlapping (an audit). A partial overlap still is."""
    g = torch.Generator().manual_seed(3)
    srcs = [{"q": torch.randn(6, 4, generator=g), "k": torch.randn(6, 4, generator=g)} for _ in range(3)]
    pool = CheckpointPool(srcs)
    want = {n: sum(w * s[n].double() for w, s in zip(W, srcs)) for n in ("q", "k")}
    fused, rows = torch.zeros(6, 8), torch.zeros(12, 4)
    for into in ({"q": fused[:, :4], "k": fused[:, 4:]}, {"q": rows[0::2], "k": rows[1::2]}):
        pool.materialize(W, into=into)
        for n in into:
            torch.testing.assert_close(into[n].double(), want[n], rtol=1e-6, atol=1e-6)
    a, b = torch.zeros(6, 8), torch.zeros(6, 8)  # two candidates, each in its own columns of one buffer
    pool.materialize_many([W, W[::-1]], into=[{"q": a[:, :4], "k": b[:, :4]}, {"q": a[:, 4:], "k": b[:, 4:]}])
    torch.testing.assert_close(a[:, 4:].double(), sum(w * s["q"].double() for w, s in zip(W[::-1], srcs)),
                               rtol=1e-6, atol=1e-6)
    wide = torch.zeros(6, 9)
    with pytest.raises(InputError, match="targets of 'q' and 'k' overlap without being the same tensor"):
        pool.materialize(W, into={"q": wide[:, :4], "k": wide[:, 3:7]})  # column 3 in both
    assert not wide.any()
    # views of other element sizes are not compared element by element: refused, saying it may be so
    halves = CheckpointPool([{"q": s["q"], "k": s["k"].half()} for s in srcs])
    mixed = torch.zeros(6, 8)
    with pytest.raises(InputError, match="targets of 'q' and 'k' may overlap: views of one memory too large .or too "
                                         "unlike. to check"):
        halves.materialize(W, into={"q": mixed[:, :4], "k": mixed.view(torch.float16)[:, 8:12]})
    assert not mixed.any()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_a_target_whose_elements_share_memory_is_refused_before_any_write(method):
    """An expanded view (stride 0) passed every check; the other tensors were written, then the copy back
    into it raised torch's multi-line error: a half-written model."""
    g = torch.Generator().manual_seed(1)
    sources = [{"a": torch.randn(16, 4, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
    pool = CheckpointPool(sources, base={"a": torch.zeros(16, 4), "b": torch.zeros(7)})
    overlapping = [torch.zeros(4).expand(16, 4), torch.zeros(64).as_strided((16, 4), (2, 1))]
    for a in overlapping:
        target = {"a": a, "b": torch.full((7,), 5.0)}
        with pytest.raises(InputError, match=r"tensor .a.: its strides .* put several elements on one memory location"):
            pool.materialize(W, into=target, method=method)
        assert torch.equal(target["b"], torch.full((7,), 5.0)) and not a.any()
    fine = torch.zeros(4, 16).t()  # strided but one element per address: merged through a temporary
    target = {"a": fine, "b": torch.empty(7)}
    pool.materialize(W, into=target, method="linear")
    torch.testing.assert_close(fine, sum(w * s["a"] for w, s in zip(W, sources)))


# ---- item 11: autograd sees the writes ----------------------------------------------------------------------
@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_backward_after_materialize_raises(grad_mode, method):
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models[1:]], base=models[0].state_dict())
    params = {"density": 0.5} if method == "ties" else {}
    net = torch.nn.Linear(13, 7)
    loss = (net(torch.randn(5, 13, requires_grad=True)) ** 2).sum()  # saves net.weight for backward
    with torch.set_grad_enabled(grad_mode):
        pool.materialize(W[:2], into=net, method=method, **params)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = (net(torch.randn(5, 13)) ** 2).sum()  # a forward after the materialize is fine
    loss.backward()
    assert net.weight.grad is not None


@pytest.mark.parametrize("way", ["batched", "setter", "ops"])
def test_every_written_tensor_gets_a_new_version(monkeypatch, way):
    if way != "batched":  # torch whose increment_version takes one tensor: the private setter
        monkeypatch.setattr(versions, "_increment", None)
    if way == "ops":  # torch without the private setter either: an in-place op on an empty view does it
        monkeypatch.setattr(versions, "_set_versions", None)
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    a, b = torch.nn.Linear(13, 7), torch.nn.Linear(13, 7)
    sd = {"weight": torch.empty(13, 7).t(), "bias": torch.empty(7)}  # a strided target too
    seen = [t._version for t in (a.weight, a.bias, b.weight, b.bias, sd["weight"], sd["bias"])]
    pool.materialize_many([W, W], into=[a, b])
    pool.materialize(W, into=sd)
    now = [t._version for t in (a.weight, a.bias, b.weight, b.bias, sd["weight"], sd["bias"])]
    assert all(n > s for n, s in zip(now, seen))
    assert_is(a, reference(models, W))
    with torch.inference_mode():  # inference tensors have no version counter: nothing to bump, no error
        c = torch.nn.Linear(13, 7)
    pool.materialize(W, into=c)
    assert_is(c, reference(models, W))


@pytest.mark.parametrize("method, kw, n", [("slerp", {"t": 0.3}, 1), ("ties", {"density": 0.6}, 2),
                                          ("nearswap", {"t": 0.5}, 1), ("task_arithmetic", {}, 2),
                                          ("della", {"density": 0.6, "epsilon": 0.1}, 2), ("model_stock", {}, 2)])
@pytest.mark.parametrize("way", ["plain", "torch backend", "dict groups", "default device"])
def test_a_model_made_under_inference_mode_is_filled_by_every_method_path(method, kw, n, way):
    """The out= forms refuse an inference tensor outside inference mode (torch's rule for the caller's out=);
    the pool fills a model made there wherever it is called, by every path its kernels write: native, grouped,
    per tensor through the public wrappers (a dict of groups), and through torch.ops (a TorchFunctionMode such
    as set_default_device takes every call there); the per-tensor ones were refused in a first form (a review).
    backend='torch' writes with torch's in-place ops: there the pool writes inside inference mode (it raised
    partway through the merge before)."""
    models = linears(n + 1)
    pool = CheckpointPool([m.state_dict() for m in models[1:]], base=models[0].state_dict(),
                          backend="torch" if way == "torch backend" else "auto")
    extra = {"groups": {"weight": 0, "bias": 0}} if way == "dict groups" else {}
    want = torch.nn.Linear(13, 7)
    pool.materialize([1.0] * n, into=want, method=method, seed=3, **kw, **extra)
    with torch.inference_mode():
        c = torch.nn.Linear(13, 7)
    with torch.device("cpu") if way == "default device" else contextlib.nullcontext():
        pool.materialize([1.0] * n, into=c, method=method, seed=3, **kw, **extra)
    assert all(torch.equal(c.state_dict()[k], v) for k, v in want.state_dict().items())


# ---- item 10: GPU work runs on the pool's device, not the current one --------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("residency", ["device", "pinned"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_pool_on_the_second_gpu_works_while_the_first_is_current(residency, method):
    models = linears()
    torch.cuda.set_device(0)
    pool = CheckpointPool([m.state_dict() for m in models], device="cuda:1", residency=residency)
    net = torch.nn.Linear(13, 7).to("cuda:1")
    params = {"density": 1.0} if method == "ties" else {}
    w = torch.tensor(W, device="cuda:1") if method == "linear" else W  # device weights: the graph-ready path
    pool.materialize(w, into=net, method=method, **params)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    ref = reference(models, W) if method == "linear" else None
    if ref is not None:
        assert_is(net.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_merge_on_the_second_gpu_leaves_the_current_device(tmp_path):
    from safetensors.torch import save_file
    from pymerge.merge import run_merge
    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        save_file({"w": torch.randn(1000, 33)}, str(tmp_path / f"m{i}" / "model.safetensors"))
    torch.cuda.set_device(0)
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 0.5}}
                                                for i in range(2)]}
    run_merge(cfg, tmp_path / "out", device="cuda:1", quiet=True)
    assert torch.cuda.current_device() == 0


def test_ops_writing_into_a_callers_tensor_bump_its_version():
    """The public ops' out= writes by address too: a backward through the old values raises."""
    from pymerge import weighted_sum, weighted_sum_many
    xs = [torch.randn(50), torch.randn(50)]
    p = torch.nn.Parameter(torch.randn(50))
    loss = (p ** 2).sum()  # saves p
    with torch.no_grad():
        weighted_sum(xs, [0.5, 0.5], out=p, backend="cpu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    outs = [torch.empty(50), torch.empty(50)]
    before = [o._version for o in outs]
    weighted_sum_many(xs, [[1.0, 0.0], [0.0, 1.0]], outs=outs)
    assert all(o._version > b for o, b in zip(outs, before))
    assert torch.equal(outs[1], xs[1])


# ---- found by a review (2026-12-02): each was a silent wrong merge ----------------------------------
def test_a_cached_plan_is_not_reused_for_a_view_of_the_same_memory():
    """The cached plan checked data_ptr only: param.data = param.data.t() (or an entry's t_()) keeps it,
    and the next merge was written in the old layout (error 0.34); a shrunk parameter was not refused."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    ref = reference(models, W)
    m = torch.nn.Linear(13, 7)
    pool.materialize(W, into=m)
    m.weight.data = m.weight.data.t().contiguous().t()  # same shape, other strides: a fresh storage...
    m.weight.data = m.weight.data.view(7, 13)             # ...then a view of it; both must merge right
    pool.materialize(W, into=m)
    assert_is(m, ref)
    sq = [torch.nn.Linear(5, 5, bias=False) for _ in range(3)]
    sq_pool = CheckpointPool([s.state_dict() for s in sq])
    target = torch.nn.Linear(5, 5, bias=False)
    sq_pool.materialize(W, into=target)
    target.weight.data = target.weight.data.t()  # same memory, transposed
    sq_pool.materialize(W, into=target)
    assert_is(target, reference(sq, W))
    sd = {k: v.clone() for k, v in sq[0].state_dict().items()}
    sq_pool.materialize(W, into=sd)
    sd["weight"].t_()
    sq_pool.materialize(W, into=sd)
    torch.testing.assert_close(sd["weight"].double(), reference(sq, W)["weight"], rtol=1e-6, atol=1e-6)
    pool.materialize(W, into=m)
    m.weight.data = m.weight.data[:5]
    with pytest.raises(InputError, match=r"has shape \(5, 13\), the pool's has \(7, 13\)"):
        pool.materialize(W, into=m)


def test_two_views_of_one_memory_are_not_tied_weights():
    """Targets {"a": X, "b": X.t()} (or a dtype view) passed as ties: only one was written, the other held
    its merge transposed or reinterpreted. Tied weights are one tensor under two names."""
    g = torch.Generator().manual_seed(1)
    pool = CheckpointPool([{"a": torch.randn(4, 4, generator=g), "b": torch.randn(4, 4, generator=g)} for _ in range(3)])
    x = torch.zeros(4, 4)
    for into in ({"a": x, "b": x.t()}, {"a": x, "b": x.view(torch.int32).view(torch.float32).view(16).view(4, 4).t()}):
        with pytest.raises(InputError, match="overlap without being the same tensor"):
            pool.materialize(W, into=into)
    y = torch.zeros(4, 4)
    halves = CheckpointPool([{"a": torch.randn(8, generator=g), "b": torch.randn(16, generator=g).half()}
                             for _ in range(3)])
    with pytest.raises(InputError, match="overlap without being the same tensor"):
        halves.materialize(W, into={"a": y.view(-1)[:8], "b": y.view(-1)[:8].view(torch.float16)})
    assert not x.any() and not y.any()
    tied = {"a": x, "b": x}  # a real tie of tensors that differ: refused (one merge would replace the other)...
    with pytest.raises(InputError, match="hold different values, but the target ties them"):
        pool.materialize(W, into=tied)
    same = CheckpointPool([{"a": t, "b": t.clone()} for t in (pool.tensor(i, "b") for i in range(3))])
    same.materialize(W, into=tied)  # ...and of equal ones written once
    torch.testing.assert_close(x, sum(w * pool.tensor(i, "b") for i, w in enumerate(W)))


def test_names_mapping_two_pool_tensors_to_one_target_is_refused():
    g = torch.Generator().manual_seed(2)
    pool = CheckpointPool([{"enc.weight": torch.randn(3, generator=g), "dec.weight": torch.randn(3, generator=g)}
                           for _ in range(3)])
    target = {"weight": torch.zeros(3)}
    with pytest.raises(InputError, match="names= maps pool tensors 'enc.weight' and 'dec.weight' to one target "
                                         "tensor 'weight'"):
        pool.materialize(W, into=target, names=lambda n: n.split(".")[-1])
    assert not target["weight"].any()
    pool.materialize(W, into=target, names=lambda n: "weight" if n == "dec.weight" else None)
    torch.testing.assert_close(target["weight"], sum(w * pool.tensor(i, "dec.weight") for i, w in enumerate(W)))


@pytest.mark.parametrize("path", ["one call", "per tensor", "int8"])
@pytest.mark.parametrize("lam", [float("inf"), float("nan"), 1e30, 1e3, 10**7, 10**400, np.int64(10**7)])
def test_task_arithmetic_lambda_is_checked_before_anything_is_written(path, lam):
    """lambda was never checked on a pool: inf/nan gave an all-NaN model, 1e30 a meaningless one, and on
    the per-tensor path a huge lambda in one group raised after other tensors had been written."""
    g = torch.Generator().manual_seed(3)
    names = ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w"]
    sources = [{n: torch.randn(6, generator=g) for n in names} for _ in range(3)]
    base = {n: torch.randn(6, generator=g) for n in names}
    pool = CheckpointPool(sources, base=base, compress="int8" if path == "int8" else None)
    target = {n: torch.full((6,), 7.0) for n in names}
    # 1e3: fine in the first groups, the last group's coefficients lambda * w are 2e6 (beyond 1e6)
    table = [[0.5, 0.3, 0.2]] * (pool.num_groups("layer") - 1) + [[2e3, 2e3, 2e3]]
    kw = {"names": (lambda n: n)} if path == "per tensor" else {}
    with pytest.raises(MergeConfigError, match=r"parameter lambda is|coefficient of"):
        pool.materialize(table, into=target, method="task_arithmetic", groups="layer", **kw, **{"lambda": lam})
    assert all(bool((t == 7.0).all()) for t in target.values())


def test_integer_parameters_past_the_magnitude_limit_are_refused():
    """Only floats were checked: lambda 10**7 wrote values ~1e5 where 1e7 was refused, karcher's
    max_iter 10**12 with tol 0 never returned (a bug hunt)."""
    pool = CheckpointPool([{"w": torch.randn(8)} for _ in range(2)], base={"w": torch.randn(8)})
    target = {"w": torch.full((8,), 7.0)}
    with pytest.raises(MergeConfigError, match="parameter lambda is 10000000; values beyond"):
        pool.materialize([0.5, 0.5], into=target, method="ties", density=0.5, **{"lambda": 10**7})
    with pytest.raises(MergeConfigError, match="parameter max_iter is 1000000000000; values beyond"):
        pool.materialize([0.5, 0.5], into=target, method="karcher", max_iter=10**12, tol=0.0)
    # abs() of numpy's most negative int64 is itself, negative, so it passed the check
    with pytest.raises(MergeConfigError, match="parameter lambda is -9223372036854775808; values beyond"):
        pool.materialize([0.5, 0.5], into=target, method="ties", density=0.5, **{"lambda": np.int64(-2**63)})
    assert bool((target["w"] == 7.0).all())


def test_a_weight_table_longer_than_the_groups_is_refused():
    pool = CheckpointPool([{"model.embed_tokens.weight": torch.ones(3), "model.layers.0.w": torch.ones(3)}] * 2)
    assert pool.num_groups("layer") == 2
    target = {"model.embed_tokens.weight": torch.zeros(3), "model.layers.0.w": torch.zeros(3)}
    for rows in (3, 9):
        with pytest.raises(InputError, match=f"the weights table has {rows} rows but the pool's tensors fall in 2 groups"):
            pool.materialize([[0.5, 0.5]] * rows, into=target, groups="layer")
    pool.materialize([[0.5, 0.5]] * 2, into=target, groups="layer")
    assert bool((target["model.layers.0.w"] == 1).all())


WRAPPER = """
import torch
from torch.testing._internal.two_tensor import TwoTensor
from pymerge.errors import InputError
from pymerge.pool import CheckpointPool
pool = CheckpointPool([{"a": torch.randn(4, 4)}, {"a": torch.randn(4, 4)}], base={"a": torch.zeros(4, 4)})
for method, kw in (("linear", {}), ("ties", {"density": 0.5})):
    try:
        pool.materialize([0.5, 0.5], into={"a": TwoTensor(torch.zeros(4, 4), torch.zeros(4, 4))}, method=method, **kw)
    except InputError as exc:
        print(exc)
try:
    CheckpointPool([{"a": TwoTensor(torch.ones(4), torch.ones(4))}, {"a": torch.ones(4)}], residency="mmap")
except InputError as exc:
    print(exc)
"""


def test_a_wrapper_subclass_target_or_source_is_refused_not_written_at_address_0():
    """A wrapper tensor subclass (a DTensor given to a pool built without shard_like=, torch's TwoTensor) has a
    placeholder storage and data_ptr() 0: the native kernels wrote to address 0 (SIGSEGV; in a child here)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", WRAPPER], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all("is a TwoTensor whose data lives in tensors inside it" in x for x in lines)
    assert lines[0].startswith("tensor 'a': ") and lines[2].startswith("source 0: tensor 'a': "), lines


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "nested"])
def test_a_sparse_or_nested_target_is_refused_naming_it(layout):
    """They reached torch internals first: "Cannot access storage of SparseTensorImpl", naming no tensor."""
    pool = CheckpointPool([{"a": torch.randn(2, 3)}, {"a": torch.randn(2, 3)}])
    dense = torch.zeros(2, 3)
    target = {"sparse_coo": dense.to_sparse(), "sparse_csr": dense.to_sparse_csr(),
              "nested": torch.nested.nested_tensor([torch.zeros(3), torch.zeros(3)])}[layout]
    with pytest.raises(InputError, match=rf"tensor 'a' is a {layout.split('_')[0] if layout == 'nested' else layout} "
                                         r"tensor; merges read dense tensors only; nothing was written"):
        pool.materialize([0.5, 0.5], into={"a": target})


def test_a_compiled_or_parametrized_target_says_why_a_name_is_missing():
    """"pool tensor 'weight' has no counterpart 'weight'" for a module that plainly has a weight."""
    import warnings
    from torch.nn.utils import parametrize
    pool = CheckpointPool([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    compiled = torch.nn.Module()
    compiled._orig_mod = torch.nn.Linear(4, 4)  # what torch.compile's OptimizedModule holds, without compiling
    with pytest.raises(InputError, match=r"no counterpart \(the target is a torch.compile'd module: "
                                         r"pass names=\"_orig_mod.\""):
        pool.materialize([0.5, 0.5], into=compiled)
    pool.materialize([0.5, 0.5], into=compiled, names="_orig_mod.")
    m = torch.nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parametrize.register_parametrization(m, "weight", torch.nn.Identity())
    with pytest.raises(InputError, match=r"holds it as 'parametrizations.weight.original': a parametrized tensor"):
        pool.materialize([0.5, 0.5], into=m)
    # the older weight_norm: the hint said the target held it as 'weight_v' (same shape), and names= pointing
    # there wrote the merge into v, a wrong model (weight = g * v / |v|; an audit)
    old = torch.nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (deprecated for the parametrization)
        torch.nn.utils.weight_norm(old)
    with pytest.raises(InputError, match=r"holds it as 'weight_g' and 'weight_v': the older torch.nn.utils.weight_norm "
                                         r"computes it from them"):
        pool.materialize([0.5, 0.5], into=old)



def test_missing_counterparts_say_what_the_target_holds_once():
    """"pool tensor 'X' has no counterpart 'X'" repeated the name without a hint (transformers 5 renames
    GPT-NeoX's embed_out to lm_head on load), the torch.compile hint came once per tensor, DataParallel's and
    a pruned module's prefixes got none, and a lazy parameter leaked torch's own multi-line ValueError."""
    import torch.nn.utils.prune as prune
    seq = lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))  # noqa: E731
    pool = CheckpointPool([seq(), seq()])

    def error(target, **kw):
        before = {k: v.clone() for k, v in target.state_dict().items() if ".1." not in f".{k}"}  # (lazy: no data)
        with pytest.raises(InputError) as err:
            pool.materialize([0.5, 0.5], into=target, **kw)
        msg = str(err.value)
        assert "\n" not in msg and msg.endswith("; nothing was written"), msg
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
        return msg

    compiled = torch.nn.Module()
    compiled._orig_mod = seq()  # what torch.compile's OptimizedModule holds, without compiling
    msg = error(compiled)
    assert msg.startswith("pool tensors '0.weight', '0.bias', '1.weight' and 1 more have no counterpart (the target "
                          "is a torch.compile'd module"), msg
    assert msg.count("torch.compile") == 1
    assert "pass names=\"module.\"" in error(torch.nn.DataParallel(seq()))
    pruned = seq()
    prune.l1_unstructured(pruned[1], "weight", 0.5)
    assert error(pruned) == ("pool tensor '1.weight' has no counterpart (the target holds it as '1.weight_orig': a "
                             "pruned tensor (torch.nn.utils.prune; the older spectral_norm too) is computed from it by "
                             "a hook; merge before pruning, or make it permanent first (prune.remove)); nothing was "
                             "written")
    renamed = torch.nn.Module()
    renamed.first, renamed.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    msg = error(renamed, names=lambda n: n.replace("0.", "first."))
    assert msg.startswith("pool tensors '1.weight', '1.bias' have no counterpart (the target holds 'head.weight', of "
                          "the shape of '1.weight', which no pool tensor writes: pass names= "), msg
    assert "build the pool from the loaded models' state_dict()s" in msg
    fused = torch.nn.Module()
    fused.first, fused.experts = torch.nn.Linear(4, 4), torch.nn.Linear(4, 6)
    msg = error(fused, names=lambda n: n.replace("0.", "first.").replace("1.", "mlp."))
    assert msg.startswith("pool tensors '1.weight', '1.bias' have no counterpart (looked up as 'mlp.weight', "
                          "'mlp.bias') (the target has no unwritten tensor of the shape of '1.weight'; its unwritten "
                          "ones are 'experts.weight', 'experts.bias': pass names="), msg
    lazy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LazyLinear(3))
    assert error(lazy).startswith("tensor '1.weight' is an uninitialized lazy parameter (LazyLinear and the like): "
                                  "run a forward pass first; tensor '1.bias' is")
    with pytest.raises(InputError, match="^source 0: tensor '1.weight' is an uninitialized lazy parameter"):
        CheckpointPool([lazy, lazy])


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0)])
def test_a_cpu_device_with_an_index_is_the_cpu(device):
    """device="cpu:0" was accepted, then every materialize refused: "tensor 't' is on cpu, the pool computes
    on cpu:0" (CPU tensors carry no index; a bug hunt)."""
    pool = CheckpointPool([{"t": torch.ones(4)}, {"t": torch.zeros(4)}], device=device)
    target = {"t": torch.empty(4)}
    pool.materialize([0.25, 0.75], into=target)
    assert pool.device == torch.device("cpu") and torch.equal(target["t"], torch.full((4,), 0.25))


def test_a_forward_inside_one_autocast_region_sees_each_merge():
    """autocast caches its bfloat16 copies of parameters that require grad until the outermost region exits:
    a search (or eval loop) run inside one region scored every candidate with the first one's weights."""
    import pymerge
    torch.manual_seed(0)
    srcs = [torch.nn.Linear(16, 16).state_dict() for _ in range(2)]
    pool = pymerge.CheckpointPool(srcs)
    model, x = torch.nn.Linear(16, 16), torch.randn(4, 16)
    outs = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        for w in ([1.0, 0.0], [0.0, 1.0]):
            pool.materialize(w, into=model)
            outs.append(model(x))
        for name in ("weight", "bias"):  # the raw op's out= writes by address too
            pymerge.weighted_sum([srcs[0][name], srcs[1][name]], [0.5, 0.5], out=getattr(model, name))
        outs.append(model(x))
    for w, got in zip(([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]), outs):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # a fresh region: no cache
            pool.materialize(w, into=model)
            assert torch.equal(got, model(x)), w


def test_a_caller_s_function_run_by_the_pool_keeps_the_out_rule():
    """The pool's own writes are exempt from the out= rule for inference tensors; a groups= function of the
    caller's, which the pool calls, is not (the exemption covered the whole call in a first form: a review)."""
    models = linears(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    with torch.inference_mode():
        victim = torch.zeros(3)
    seen = []

    def groups(name):
        try:
            pymerge.weighted_sum([torch.ones(3), torch.ones(3)], [1.0, 1.0], out=victim)
            seen.append("written")
        except RuntimeError as exc:
            seen.append(str(exc))
        return 0
    pool.materialize([[0.5, 0.5]], into=torch.nn.Linear(13, 7), groups=groups)
    assert seen and all("out is an inference tensor" in s for s in seen), seen
    assert torch.equal(victim, torch.zeros(3))


def _freed(values):
    t = torch.tensor(values)
    t.untyped_storage().resize_(0)
    return t


@pytest.mark.parametrize("method, param", [("task_arithmetic", "lambda"), ("ties", "density")])
def test_a_parameter_that_frees_a_borrowed_source_is_refused_before_the_kernel(method, param):
    """A pool reading the caller's tensors in place checked them when materialize began, then read the method's
    parameters (caller code: a number-like object's __float__) and ran the kernel on a source that code had
    freed: SIGSEGV (an API audit; TIES on its second, cached call). Checked again just before the kernel."""
    g = torch.Generator().manual_seed(0)
    src = [{"w": torch.randn(64, 64, generator=g)} for _ in range(3)]
    pool = CheckpointPool(src, base={"w": torch.randn(64, 64, generator=g)}, residency="mmap")
    target = {"w": torch.zeros(64, 64)}
    value = 1.0 if param == "lambda" else 0.5
    pool.materialize([0.2, 0.3, 0.5], into=target, method=method, **{param: value})  # the plan cached

    class FreesOnRead:
        def __float__(self):
            src[1]["w"].untyped_storage().resize_(0)  # as FSDP frees a sharded parameter's storage
            return value
    with pytest.raises(InputError, match=r"source 1: tensor 'w', which the pool reads in place: its storage holds 0"):
        pool.materialize([0.2, 0.3, 0.5], into=target, method=method, **{param: FreesOnRead()})


@pytest.mark.parametrize("weights, words", [
    (lambda: _freed([0.2, 0.3, 0.5]), "storage holds 0 bytes"),  # torch's own conversion segfaulted
    (lambda: torch.tensor([0.5]).expand(10**8), "got a tensor of shape [100000000]"),  # 1.5 GB before the error
    (lambda: torch.tensor([0.2, 0.3, 0.5]).to_sparse(), "sparse"),  # a raw TypeError
    (lambda: "0.5", "must be"),
])
def test_weights_that_cannot_be_read_are_one_line_before_any_copy(weights, words):
    """An API audit: each of these crashed, blew up memory or raised a raw error."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    target = linears(1, seed=9)[0]
    before = snapshot(target)
    with pytest.raises(InputError, match=re.escape(words)):
        pool.materialize(weights(), into=target)
    assert unchanged(target, before)


@pytest.mark.parametrize("kw, words", [
    ({"normalize": "False"}, "normalize must be a bool, got 'False'"),  # was read as true: normalized
    ({"strict": torch.tensor([1, 0])}, "strict must be a bool"),
    ({"method": ["linear"]}, "merge_method must be a method's name"),
    ({"names": lambda n: [n]}, "it must give a name (str) or None"),
    ({"method": "task_arithmetic", "lambda": "x"}, "lambda must be a number, got 'x'"),  # multiplied a str
])
def test_flags_and_names_of_the_wrong_type_are_refused(kw, words):
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models[1:]], base=models[0].state_dict())
    target = linears(1, seed=9)[0]
    before = snapshot(target)
    with pytest.raises((InputError, MergeConfigError), match=re.escape(words)):
        pool.materialize([0.5, 0.5], into=target, **kw)
    assert unchanged(target, before)


def test_task_arithmetic_normalize_given_as_a_string_is_refused_not_read_as_true():
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models[1:]], base=models[0].state_dict())
    with pytest.raises(MergeConfigError, match="normalize must be true or false, got 'no'"):
        pool.materialize([0.5, 0.25], into=linears(1, seed=9)[0], method="task_arithmetic",
                         method_params={"normalize": "no"})


def test_a_target_that_calls_the_pool_while_it_is_planned_is_refused_not_deadlocked():
    """A dict subclass whose items() called materialize waited forever for the plan cache's lock."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])

    class Calling(dict):
        def items(self):
            pool.materialize([0.2, 0.3, 0.5], into=linears(1, seed=3)[0])
            return super().items()
    target = Calling({k: torch.empty_like(v) for k, v in models[0].state_dict().items()})
    with pytest.raises(InputError, match="the pool was called again while it (merged|planned a call)"):
        pool.materialize([0.2, 0.3, 0.5], into=target)
    pool.materialize([0.2, 0.3, 0.5], into=linears(1, seed=4)[0])  # the pool still works


def _finished(call, seconds=60):
    """call() in a daemon thread: what it raised (None if nothing), or a failure if it is still waiting."""
    import threading
    raised = []

    def run():
        try:
            call()
            raised.append(None)
        except Exception as exc:  # noqa: BLE001 - what it raised is what is tested
            raised.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "waited for good"
    return raised[0]


def _mode_calling(at, then):
    """A TorchFunctionMode whose handler runs then() once, at the first torch function named `at`."""
    from torch.overrides import TorchFunctionMode
    fired = []

    class Calling(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if at in str(func) and not fired:
                fired.append(func)
                then()
            return func(*args, **(kwargs or {}))
    return Calling(), fired


@pytest.mark.parametrize("warm", [False, True])
def test_a_torch_mode_calling_the_pool_while_it_merges_is_refused_not_deadlocked(warm):
    """A torch mode (or a target's parameter's __torch_function__) calling the pool again from inside a call: where
    the targets' plans were cached, the cache checked them under its lock and the inner call waited for it for
    good (an audit; cold, it was refused)."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    target = linears(1, seed=3)[0]
    if warm:
        pool.materialize([0.2, 0.3, 0.5], into=target)
    mode, fired = _mode_calling("data_ptr", lambda: pool.materialize([0.5, 0.3, 0.2], into=linears(1, seed=4)[0]))

    def call():
        with mode:
            pool.materialize([0.2, 0.3, 0.5], into=target)
    exc = _finished(call)
    assert fired and isinstance(exc, InputError) and "the pool was called again while it" in str(exc)
    pool.materialize([0.2, 0.3, 0.5], into=target)  # the pool still works
    assert_is(target, reference(models, [0.2, 0.3, 0.5]))


def test_a_search_run_from_inside_a_call_of_its_pool_is_refused_not_deadlocked():
    """A search started from a torch mode while the pool planned a call: its merge was refused, then its clean-up
    (the plan cache's forget) waited for the lock this thread held, for good (an audit)."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    mode, fired = _mode_calling("data_ptr", lambda: pymerge.search.optimize(pool, lambda m: 0.0, linears(1, seed=5)[0],
                                                                            budget=4, popsize=2, log=None))

    def call():
        with mode:
            pool.materialize([0.2, 0.3, 0.5], into=linears(1, seed=3)[0])
    exc = _finished(call)
    assert fired and isinstance(exc, InputError) and "the pool was called again while it" in str(exc)


def test_a_torch_mode_merging_into_the_same_model_between_tensors_is_refused():
    """Under a torch mode the pool's writes go through torch.ops one tensor at a time, and a handler that merged
    other weights into the same model between them was let in: the call returned normally with some tensors
    holding the handler's merge (an audit). The inner call is refused, and the outer says what it wrote."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models])
    target = linears(1, seed=3)[0]
    mode, fired = _mode_calling("pymerge", lambda: pool.materialize([0.8, 0.1, 0.1], into=target))
    with mode, pytest.raises(InputError, match="the pool was called again while it merged"):
        pool.materialize([0.2, 0.3, 0.5], into=target, names=lambda n: n)  # (a function: tensor by tensor)
    assert fired
    pool.materialize([0.2, 0.3, 0.5], into=target)
    assert_is(target, reference(models, [0.2, 0.3, 0.5]))


def test_task_arithmetic_normalize_may_be_a_numpy_bool():
    """The parameter check took bool, int and float only: np.bool_ (what a numpy comparison gives) was refused."""
    models = linears()
    pool = CheckpointPool([m.state_dict() for m in models[1:]], base=models[0].state_dict())
    a, b = linears(1, seed=9)[0], linears(1, seed=9)[0]
    pool.materialize([0.5, 0.25], into=a, method="task_arithmetic", method_params={"normalize": np.bool_(True)})
    pool.materialize([0.5, 0.25], into=b, method="task_arithmetic", method_params={"normalize": True})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_one_line_errors_an_api_fuzz_found(tmp_path):
    """Each of these was a traceback from inside pymerge or a misleading message (an API fuzz): a generator of
    target models taken for one model; optimize(None); a raw op's weights=None; run_merge(progress=5) after the
    output folder was made; a float64 value past float32's range told to choose a wider pool dtype= (none is)."""
    from pymerge.search import optimize
    g = torch.Generator().manual_seed(1)
    src = [{"w": torch.randn(4, generator=g)} for _ in range(2)]
    pool = CheckpointPool(src)
    gen = pool.materialize_many([[0.5, 0.5], [0.2, 0.8]], ({"w": torch.zeros(4)} for _ in range(2)))
    lst = pool.materialize_many([[0.5, 0.5], [0.2, 0.8]], [{"w": torch.zeros(4)} for _ in range(2)])
    assert all(torch.equal(a["w"], b["w"]) for a, b in zip(gen, lst)) and not torch.equal(gen[0]["w"], gen[1]["w"])
    with pytest.raises(InputError, match="^pool must be a CheckpointPool, got None$"):
        optimize(None, lambda m: 0.0, model=None)
    with pytest.raises(TypeError, match="^weighted_sum: weights must be a tensor, got None$"):
        torch.ops.pymerge.weighted_sum_out([torch.ones(2)], None, torch.empty(2))
    with pytest.raises(InputError, match=r"^progress must be a progress bar with update\(n\) \(tqdm's\), got 5$"):
        pymerge.run_merge({"merge_method": "linear", "models": []}, tmp_path / "out", progress=5)
    assert os.listdir(tmp_path) == []
    big = [{"w": torch.tensor([1e300, 1.0], dtype=torch.float64)}, {"w": torch.ones(2, dtype=torch.float64)}]
    with pytest.raises(CheckpointError, match="in which the kernels hold a float64 checkpoint; no pool dtype holds them"):
        CheckpointPool(big)


@pytest.mark.parametrize("residency", ["host", "mmap"])
def test_a_bin_checkpoint_cut_while_the_pool_opens_it_is_an_error_not_a_sigbus(tmp_path, monkeypatch, residency):
    """pytorch_model.bin cut by another program just after torch.load mapped it: pymerge could no longer read the
    zip to locate the map, took it for an unmappable file and guarded nothing: SIGBUS while the pool copied it
    (host) or at the first materialize (mmap; an audit). The file's stat before the load is compared."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import os, torch
        import pymerge, pymerge.io.checkpoint as ck
        d = {str(tmp_path)!r}
        for i in range(2):
            os.makedirs(f"{{d}}/m{{i}}")
            torch.save({{"w": torch.randn(256, 256)}}, f"{{d}}/m{{i}}/pytorch_model.bin")
        victim, real = f"{{d}}/m1/pytorch_model.bin", ck._torch_load
        def load_then_cut(path, mappable):
            out = real(path, mappable)
            if str(path) == victim:
                os.truncate(victim, os.path.getsize(victim) // 2)
            return out
        ck._torch_load = load_then_cut
        try:
            pool = pymerge.CheckpointPool([f"{{d}}/m0", f"{{d}}/m1"], residency={residency!r})
            pool.materialize([0.5, 0.5], into={{"w": torch.zeros(256, 256)}})
            print("no error")
        except pymerge.errors.CheckpointError as e:
            print("error:", e)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("pytorch_model.bin: changed while it was being read (cut, rewritten or "
                                       "replaced); read it again once it is complete"), run.stdout


@pytest.mark.parametrize("bf16_first", [True, False])
def test_the_memory_budget_counts_every_checkpoint_in_its_own_dtype(tmp_path, bf16_first):
    """The pool sized every checkpoint as the first one: a bfloat16 first beside float32 ones held 235 MB under a
    150 MB budget, and one listed last fell to the memory map under a budget it fit (an audit)."""
    from safetensors.torch import save_file
    paths = []
    for i in range(4):
        t = torch.randn(1 << 20, generator=torch.Generator().manual_seed(i))
        save_file({"w": t.bfloat16() if i == 0 else t}, str(tmp_path / f"c{i}.safetensors"))
        paths.append(str(tmp_path / f"c{i}.safetensors"))
    if not bf16_first:
        paths = paths[1:] + paths[:1]
    need = (1 << 20) * (2 + 3 * 4)
    over = CheckpointPool(paths, memory_budget=need - 1)
    fits = CheckpointPool(paths, memory_budget=need)
    assert over.nbytes == fits.nbytes == need
    assert over.residency == "mmap" and fits.residency == "host"


def test_pool_tensor_from_a_cut_file_is_an_error_not_zeros(tmp_path):
    """pool.tensor() on the mmap tier copied the map: a file cut meanwhile gave a tensor of zeros, silently,
    though the comment said the guard made it an error (an audit). It checks the files after the copy."""
    from safetensors.torch import save_file
    paths = []
    for i in range(2):
        save_file({"a": torch.ones(4096), "b": torch.randn(1 << 16)}, str(tmp_path / f"c{i}.safetensors"))
        paths.append(str(tmp_path / f"c{i}.safetensors"))
    pool = CheckpointPool(paths, residency="mmap")
    assert torch.equal(pool.tensor(1, "a"), torch.ones(4096))
    os.truncate(paths[1], os.path.getsize(paths[1]) // 2)
    with pytest.raises(CheckpointError, match="c1.safetensors: the file shrank .* the tensor returned would not be"):
        pool.tensor(1, "b")


class _Wrapper(torch.Tensor):
    """A wrapper subclass without memory of its own (data_ptr() 0) and without __tensor_flatten__."""
    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                device=elem.device)
        r.elem = elem
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map
        out = func(*tree_map(lambda x: x.elem if isinstance(x, _Wrapper) else x, args),
                   **tree_map(lambda x: x.elem if isinstance(x, _Wrapper) else x, kwargs or {}))
        return tree_map(lambda x: _Wrapper(x) if isinstance(x, torch.Tensor) else x, out)


@pytest.mark.parametrize("kind", ["fake", "wrapper"])
@pytest.mark.parametrize("residency", ["host", "mmap"])
def test_tensors_without_memory_are_refused_as_targets_and_sources(kind, residency):
    """A FakeTensor or a wrapper subclass (data_ptr() 0) passed every pool check, and the native tables wrote or
    read address 0: a segfault, where the ops refuse them in one line (an audit)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    g = torch.Generator().manual_seed(1)
    a, b = {"weight": torch.randn(4, 6, generator=g)}, {"weight": torch.randn(4, 6, generator=g)}
    empty = (lambda t: mode.from_tensor(t)) if kind == "fake" else _Wrapper
    pool = CheckpointPool([a, b], residency=residency)
    for method in ("linear", "ties"):
        with pytest.raises(InputError, match="tensor 'weight': is a .*(shape without data|without memory of its own)"
                                             ".*nothing was written"):
            if method == "linear":
                pool.materialize([0.3, 0.7], into={"weight": empty(torch.zeros(4, 6))})
            else:
                CheckpointPool([a, b], base={"weight": torch.zeros(4, 6)}, residency=residency).materialize(
                    [0.3, 0.7], into={"weight": empty(torch.zeros(4, 6))}, method="ties", density=0.5)
    with pytest.raises(InputError, match="source 0: tensor 'weight': is a .*(shape without data|without memory)"):
        CheckpointPool([{"weight": empty(a["weight"].clone())}, b], residency=residency)
    out = {"weight": torch.empty(4, 6)}
    pool.materialize([0.3, 0.7], into=out)  # real targets as before
    torch.testing.assert_close(out["weight"], 0.3 * a["weight"] + 0.7 * b["weight"])


def test_a_cached_plan_is_not_reused_for_a_dtype_view_of_the_same_memory():
    """A float16 parameter re-viewed in place as bfloat16 (`p.data = p.data.view(torch.bfloat16)`) keeps its
    address, shape and strides; only the dtype tells the cached plan apart. Without that check the next merge was
    written as float16 bits into a bfloat16 tensor (error 1.32 against float64, not 0.0035; a mutation audit)."""
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(4, 8, generator=g)} for _ in range(2)]
    pool = CheckpointPool(sds)
    ref = 0.5 * sds[0]["w"].double() + 0.5 * sds[1]["w"].double()
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float16), requires_grad=False)
    pool.materialize([0.5, 0.5], into={"w": m.w})  # a state dict's entry over the same memory too
    pool.materialize([0.5, 0.5], into=m)
    torch.testing.assert_close(m.w.double(), ref, rtol=0, atol=5e-3)
    ptr = m.w.data_ptr()
    m.w.data = m.w.data.view(torch.bfloat16)  # same memory, other dtype
    assert m.w.data_ptr() == ptr
    pool.materialize([0.5, 0.5], into=m)
    assert m.w.dtype == torch.bfloat16
    torch.testing.assert_close(m.w.double(), ref, rtol=0, atol=2e-2)


def _overlap_by_every_pair(spans, k, same_view, share):
    """_target_overlap's answer by its definition: every earlier span against each later one, in start order."""
    cand = np.arange(len(spans)) % k
    keep = np.flatnonzero(spans[:, 1] > spans[:, 0])
    order = keep[np.argsort(spans[keep, 0], kind="stable")]
    s = spans[order]
    for j in range(1, len(s)):
        for i in range(j):
            tie = (cand[order[i]] == cand[order[j]] and s[i, 0] == s[j, 0] and s[i, 1] == s[j, 1]
                   and same_view(int(order[i]), int(order[j])))
            if s[i, 1] > s[j, 0] and not tie and share(int(order[i]), int(order[j])):
                return int(order[i]), int(order[j])
    return None


@pytest.mark.parametrize("seed", range(40))
def test_target_overlap_finds_the_pair_every_pair_check_finds(seed):
    """_target_overlap scans back only to the first span reaching a later one's start (each tie scanned every
    earlier target: 6.5 s for 128 tied candidates of 1,000 tensors, a scaling audit): the same pair, or None,
    as checking every pair, with ties (allowed or not), long spans reaching far, empty spans and strided
    views that share nothing."""
    from pymerge.pool.pool import _target_overlap
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 60)), int(rng.integers(1, 5))
    starts = np.sort(rng.choice(10 * n, size=n)) * 8
    spans = np.stack([starts, starts + 8 * rng.integers(0, 3, size=n)], axis=1).astype(np.int64)
    for _ in range(int(rng.integers(0, 4))):  # copies of a span (ties, when same_view says so) and far reachers
        a, b = rng.integers(0, n, size=2)
        spans[b] = spans[a] if rng.random() < 0.7 else (spans[a][0], spans[a][0] + 8 * int(rng.integers(1, 10 * n)))
    views = rng.integers(0, 2, size=(n, n)).astype(bool)
    shares = rng.random((n, n)) < 0.8
    same_view, share = (lambda i, j: bool(views[i, j])), (lambda i, j: bool(shares[i, j]))
    assert _target_overlap(spans, k, same_view, share) == _overlap_by_every_pair(spans, k, same_view, share)


def test_messages_name_each_weight_groups_first_tensor():
    """task_arithmetic's coefficients are checked per weight group, the error naming the group's first tensor
    (found once per call now: a scan per group and candidate cost 7.7 s a call at 16,000 groups)."""
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}.weight" for i in range(3) for p in ("a", "b")]
    g = torch.Generator().manual_seed(0)
    pool = CheckpointPool([{n: torch.randn(3, generator=g) for n in names} for _ in range(3)],
                          base={n: torch.randn(3, generator=g) for n in names})
    into = {n: torch.empty(3) for n in names}
    table = np.full((pool.num_groups("layer"), 3), 0.3)
    for group, first in ((2, "model.layers.1.a.weight"), (0, "model.embed_tokens.weight")):
        bad = table.copy()
        bad[group, 1] = 5e5  # x lambda 10: past the coefficients' bound of 1e6
        with pytest.raises(MergeConfigError, match=re.escape(f"tensor {first}: coefficient of model 1")):
            pool.materialize(bad, into=into, method="task_arithmetic", groups="layer", **{"lambda": 10})
