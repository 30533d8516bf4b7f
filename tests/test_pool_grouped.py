"""The CPU pool's one-call path (pymerge/pool/grouped.py): bit-identical to one kernel call per tensor,
and a cached plan never writes into a tensor the target no longer holds."""
import gc
import os
import threading
import types
import weakref

import numpy as np
import pytest
import torch

from pymerge import _cpu
from pymerge.errors import InputError
from pymerge.ops.weighted_sum import weighted_sum_into, weighted_sum_many
from pymerge.pool import CheckpointPool, grouped
from test_pool import Tiny, assert_matches, make_models, reference


def per_tensor(pool, table, group_of, target_sd):
    """What the pool computed before: one weighted_sum_into per tensor."""
    out = {}
    for g, name in zip(group_of, pool.names):
        row = table[g if len(table) > 1 else 0]
        o = torch.empty_like(target_sd[name])
        weighted_sum_into([pool.tensor(i, name) for i in range(pool.num_checkpoints)], [list(row)], [o], backend="cpu")
        out[name] = o
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_is_bit_identical_to_per_tensor_calls(dtype):
    models = make_models(4, dtype, seed=1)
    pool = CheckpointPool([m.state_dict() for m in models])
    rows = np.random.default_rng(0).normal(size=(3, pool.num_groups(), 4))
    targets = [Tiny(dtype) for _ in range(3)]
    pool.materialize_many(list(rows), into=targets, groups="layer")
    group_of = [pool._plan_cache.group_of(pool.names, "layer")[i] for i in range(len(pool.names))]
    for k, t in enumerate(targets):
        want = per_tensor(pool, rows[k], group_of, t.state_dict())
        for name, w in want.items():
            assert torch.equal(t.state_dict()[name].view(torch.uint8), w.view(torch.uint8)), (k, name)


def test_native_plan_awkward_sizes_and_mixed_dtypes():
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 31, 32, 33, 4097, 65536 + 17, 200003]
    dts = [torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn]
    ins = [[torch.randn(n, generator=g).to(dts[(i + j) % 4]) for i in range(4)] for j, n in enumerate(sizes)]
    ins[2][1][5] = float("nan")
    ins[3][0][0] = float("inf")
    outs = [[torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.float32)] for n in sizes]
    groups = [j % 3 for j in range(len(sizes))]
    w = np.random.default_rng(1).normal(size=(3, 2, 4)).astype(np.float32)
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}
    plan = _cpu.GroupedPlan([[t.data_ptr() for t in x] for x in ins], [[codes[t.dtype] for t in x] for x in ins],
                            sizes, [[o.data_ptr() for o in os] for os in outs],
                            [[codes[o.dtype] for o in os] for os in outs], groups, 3)
    plan.run(w)
    for j, (x, os) in enumerate(zip(ins, outs)):
        for k, o in enumerate(os):
            ref = torch.empty_like(o)
            weighted_sum_into(x, [w[groups[j], k].tolist()], [ref], backend="cpu")
            assert torch.equal(o.view(torch.uint8), ref.view(torch.uint8)), (j, k)
            want = sum(float(w[groups[j], k, i]) * x[i].double() for i in range(4))
            assert torch.allclose(o.double(), want.to(o.dtype).double(), rtol=1e-2, atol=1e-2, equal_nan=True)
    with pytest.raises(ValueError, match="weights must have 3 x 2 x 4"):
        plan.run(np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="tensor 0: weight group out of range"):
        _cpu.GroupedPlan([[ins[0][0].data_ptr()]], [[2]], [0], [[outs[0][0].data_ptr()]], [[2]], [1], 1)
    with pytest.raises(ValueError, match="bad output dtype code"):
        _cpu.GroupedPlan([[ins[0][0].data_ptr()]], [[2]], [0], [[outs[0][0].data_ptr()]], [[3]], [0], 1)


def test_plans_are_built_once_per_set_of_targets(monkeypatch):
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    target = Tiny()
    calls = []
    real = pool._plan
    monkeypatch.setattr(pool, "_plan", lambda *a: calls.append(1) or real(*a))
    for w in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]):
        pool.materialize(w, into=target)
        assert_matches(target, reference(models, w), torch.float32)
    assert len(calls) == 1
    pool.materialize([0.1, 0.1, 0.8], into=Tiny())  # other targets: a new plan
    assert len(calls) == 2


def test_cached_plan_follows_replaced_and_moved_parameters():
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    target = Tiny()
    w = [0.2, 0.3, 0.5]
    pool.materialize(w, into=target)
    # a parameter registered anew (setattr), as weight tying does
    target.head.weight = torch.nn.Parameter(torch.zeros_like(target.head.weight))
    pool.materialize(w, into=target)
    assert_matches(target, reference(models, w), torch.float32)
    # storage swapped without any registration: param.data = ...
    target.layers[1].bias.data = torch.zeros_like(target.layers[1].bias)
    pool.materialize([1.0, 0.0, 0.0], into=target)
    assert_matches(target, reference(models, [1.0, 0.0, 0.0]), torch.float32)
    # the whole model converted (module._apply swaps every storage)
    target.to(torch.bfloat16)
    pool.materialize(w, into=target)
    assert_matches(target, reference(models, w), torch.bfloat16)


def test_cached_plan_survives_modules_built_outside_its_targets(monkeypatch):
    """Any registration in the process (a transformers forward slicing its layers into a new ModuleList, a
    loss module built between calls) dropped every cached plan: each call re-planned (22x slower). Only
    registrations on a target's own modules can change what it holds."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    target, other = Tiny(), Tiny()
    calls = []
    real = pool._plan
    monkeypatch.setattr(pool, "_plan", lambda *a: calls.append(1) or real(*a))
    w = [0.2, 0.3, 0.5]
    pool.materialize(w, into=target)
    for between in (lambda: target.layers[:2], lambda: torch.nn.CrossEntropyLoss(),
                    lambda: other.register_buffer("extra", torch.zeros(1)),
                    lambda: setattr(other.head, "weight", torch.nn.Parameter(torch.zeros(101, 29)))):
        between()
        pool.materialize(w, into=target)
    assert len(calls) == 1
    assert_matches(target, reference(models, w), torch.float32)


def test_cached_plan_follows_layers_replaced_and_parameters_added():
    """Registrations on a target's own modules, which no other check sees: a layer replaced (the entry holds
    the old layer's tensors, at their addresses), a parameter registered under a key the target lacked
    (strict=False), a parameter added to a layer attached after the entry was built."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    target = Tiny()
    w = [0.2, 0.3, 0.5]
    pool.materialize(w, into=target)
    target.layers[1] = torch.nn.Linear(29, 29)
    pool.materialize(w, into=target)
    assert_matches(target, reference(models, w), torch.float32)
    del target.head.bias
    pool.materialize(w, into=target, strict=False)
    target.head.bias = torch.nn.Parameter(torch.zeros(101))
    pool.materialize(w, into=target, strict=False)
    assert_matches(target, reference(models, w), torch.float32)
    layer = torch.nn.Linear(29, 29, bias=False)
    target.layers[2] = layer
    pool.materialize(w, into=target, strict=False)
    layer.bias = torch.nn.Parameter(torch.zeros(29))
    pool.materialize(w, into=target, strict=False)
    assert_matches(target, reference(models, w), torch.float32)


@pytest.mark.parametrize("prune", ["del", "insert", "delattr"])
def test_cached_plan_sees_submodules_deleted_or_renumbered(prune):
    """Deleting a layer from a ModuleList renumbers the rest and registers nothing: the cached plan wrote the
    pool's layers.1 into the model's new layers.0 (and layers.0 into the dropped layer) where a fresh pool
    refuses with strict=True; `del model.head` wrote into the detached head (a bug hunt)."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    w = [0.2, 0.3, 0.5]
    target = Tiny()
    pool.materialize(w, into=target)
    if prune == "del":
        del target.layers[0]
    elif prune == "insert":  # layers 0, new, 1 (2 dropped): the same names, other modules
        target.layers.insert(1, torch.nn.Linear(29, 29))
        del target.layers[3]
    else:
        del target.head
    if prune == "insert":  # every name still has its counterpart: the new names' tensors are written
        pool.materialize(w, into=target)
        assert_matches(target, reference(models, w), torch.float32)
        return
    with pytest.raises(InputError, match="have no counterpart"):
        pool.materialize(w, into=target)
    pool.materialize(w, into=target, strict=False)  # what the model still has gets its own names' merge
    want = reference(models, w)
    for name, t in target.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(t.double(), want[name], atol=1e-5), name

def test_cached_plan_follows_a_state_dict_target():
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    sd = {k: v.clone() for k, v in Tiny().state_dict().items()}
    pool.materialize([0.5, 0.5], into=sd)
    sd["head.weight"] = torch.zeros_like(sd["head.weight"])  # a new tensor under the same key
    pool.materialize([0.25, 0.75], into=sd)
    want = reference(models, [0.25, 0.75])
    assert torch.allclose(sd["head.weight"].double(), want["head.weight"], atol=1e-5)
    del sd["head.bias"]
    with pytest.raises(Exception, match="head.bias"):
        pool.materialize([0.25, 0.75], into=sd)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_cached_plan_sees_keys_added_to_a_state_dict_and_parameters_deleted(method):
    """With strict=False a key the dict gained later was never written; after `del module.w` (which
    registers nothing) strict=True wrote into the detached tensor instead of refusing."""
    models = make_models(3)
    for m in models:  # the same values under two names, so that a target may tie them (see below)
        m.layers[1].bias.data.copy_(m.layers[0].bias)
    pool = CheckpointPool([m.state_dict() for m in models], base=models[0].state_dict())
    w = [0.2, 0.3, 0.5]
    kw = {"density": 0.5} if method == "ties" else {}
    fresh = {k: v.clone() for k, v in Tiny().state_dict().items()}  # what an uncached pool writes
    CheckpointPool([m.state_dict() for m in models], base=models[0].state_dict()).materialize(
        w, into=fresh, method=method, **kw)
    sd = {k: v.clone() for k, v in Tiny().state_dict().items() if k != "head.bias"}
    pool.materialize(w, into=sd, strict=False, method=method, **kw)
    sd["head.bias"] = torch.full_like(fresh["head.bias"], 123.0)
    pool.materialize(w, into=sd, strict=False, method=method, **kw)
    assert torch.equal(sd["head.bias"], fresh["head.bias"])

    tied = {k: v.clone() for k, v in Tiny().state_dict().items()}  # two keys, one tensor...
    tied["layers.0.bias"] = tied["layers.1.bias"] = torch.zeros_like(fresh["layers.0.bias"])
    pool.materialize(w, into=tied, method=method, **kw)
    tied["layers.0.bias"] = torch.full_like(fresh["layers.0.bias"], 5.0)  # ...untied: both written again
    pool.materialize(w, into=tied, method=method, **kw)
    assert torch.equal(tied["layers.0.bias"], fresh["layers.0.bias"])
    assert torch.equal(tied["layers.1.bias"], fresh["layers.1.bias"])

    target = Tiny()
    pool.materialize(w, into=target, method=method, **kw)
    del target.head.bias
    with pytest.raises(InputError, match="pool tensor 'head.bias' has no counterpart"):
        pool.materialize(w, into=target, method=method, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_triton_zero_sums_keep_the_cpu_kernels_sign(dtype):
    """Sums of -0.0 products are -0.0, as the C++ kernel's: the grouped kernel's accumulator starts at -0.0
    (Triton 3.6 compiled tl.full(..., -0.0) as +0.0: the first H200 run found it in the other kernels)."""
    pytest.importorskip("triton")
    from pymerge.kernels.weighted_sum_grouped import GroupedTable
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [1, 1500, 2048]                                  # partial and full blocks
    ins = [[torch.zeros(n, dtype=dtype), torch.full((n,), -0.0, dtype=dtype)] for n in sizes]
    for x in ins:
        x[1][x[1].numel() // 2:] = 0.0                      # second half: one product is +0.0, the sum +0.0
    w = torch.tensor([[[-0.5, 0.25]], [[-2.0, 0.5]]])        # [G, K, N]: every product of the first half is -0.0
    groups = [0, 1, 0]
    outs = [[torch.full((n,), 7.0, dtype=dtype, device=device)] for n in sizes]
    table = GroupedTable([[x.to(device) for x in xs] for xs in ins], outs, groups, 2)
    table.run(w.to(device))
    for t, (xs, os) in enumerate(zip(ins, outs)):
        want = weighted_sum_many(xs, w[groups[t]], out_dtype=dtype, backend="cpu")[0]
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.signbit(want[: sizes[t] // 2]).all()
        assert torch.equal(os[0].cpu().view(bits), want.view(bits)), t


def test_no_triton_kernel_builds_negative_zero_with_tl_full():
    """tl.full(..., -0.0) is +0.0 under Triton 3.6 (any value == 0 becomes the null constant); the kernels
    build -0.0 from its bits (weighted_sum._neg_zeros). A source check, since Triton 3.9 compiles both alike."""
    import glob
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "kernels", "*.py")):
        src = open(path).read()
        assert not re.search(r"tl\.full\([^)]*-\s*0(\.0*)?\s*,", src), path


def test_grouped_triton_launch_matches_per_tensor_launches():
    pytest.importorskip("triton")
    from pymerge.kernels import weighted_sum as triton_ws
    from pymerge.kernels.weighted_sum_grouped import GroupedTable
    g = torch.Generator().manual_seed(3)
    # full blocks (launched apart, without a mask) and partial ones, one per tensor with a remainder
    sizes = [0, 1, 33, 1500, 2048, 3077]
    groups = [0, 1, 0, 1, 1, 0]
    dts = (torch.bfloat16, torch.float32, torch.float16)
    w = torch.randn(2, 2, 3, generator=g)
    # views one element into their buffers are 2- or 4-byte aligned: their full blocks load element by element
    for shifts in ([0] * 6, [1] * 6, [0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0]):
        ins = [[torch.randn(n + s, generator=g).to(d)[s:] for d in dts] for n, s in zip(sizes, shifts)]
        ins[2][0][4] = float("nan")
        outs = [[torch.full((n + s,), 7.0, dtype=torch.bfloat16)[s:] for _ in range(2)] for n, s in zip(sizes, shifts)]
        table = GroupedTable(ins, outs, groups, 2)
        full = [n // 1024 for n in sizes]
        aligned = sum(f for f, s in zip(full, shifts) if not s)
        want = [(0, aligned, True, True), (aligned, 6 - aligned, True, False), (6, 4, False, False)]
        assert table.launches == [launch for launch in want if launch[1]] and table.n_blocks == 10
        table.run(w)
        for t, (x, os) in enumerate(zip(ins, outs)):
            if not sizes[t]:
                continue
            want = [torch.empty_like(o) for o in os]
            triton_ws.weighted_sum_many(x, w[groups[t]], want)
            for o, r in zip(os, want):
                assert torch.equal(o.view(torch.int16), r.view(torch.int16)), (shifts, t)
            assert all(o._base[:shifts[t]].eq(7).all() for o in os)  # nothing written before a view
    with pytest.raises(ValueError, match="weights must have shape"):
        table.run(torch.zeros(1, 2, 3))


def test_extras_fail_in_one_line_naming_the_extra(monkeypatch):
    import sys
    from pymerge.extras import MissingExtraError, require
    from pymerge.ops.weighted_sum import pick_backend
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"^backend 'triton' needs triton, which is not installed: "
                                                r"pip install triton \(pymerge's \[triton\] extra\)$"):
        pick_backend(torch.device("cpu"), "triton")
    with pytest.raises(ImportError, match=r"pip install matplotlib \(pymerge's \[plot\] extra\)"):
        require("matplotlib", "plotting")
    assert pick_backend(torch.device("cpu"), "auto") == "cpu"  # auto never needs an extra on the CPU


def test_tied_target_written_once():
    """Checkpoints holding one tensor under two names (tied weights saved untied) into a model whose two names
    share one tensor: written once, never from two threads at once. Checkpoints whose two tensors differ are
    refused: writing both kept the later one's merge and silently dropped the other's."""
    g = torch.Generator().manual_seed(3)
    n = 300_000  # big enough to be split across threads
    sources = [{"a.weight": x, "b.weight": x.clone()} for x in (torch.randn(n, generator=g) for _ in range(3))]
    pool = CheckpointPool(sources)
    shared = torch.empty(n)
    for _ in range(3):
        pool.materialize([0.2, 0.3, 0.5], into={"a.weight": shared, "b.weight": shared})
        want = sum(w * s["b.weight"].double() for w, s in zip([0.2, 0.3, 0.5], sources))
        torch.testing.assert_close(shared.double(), want, rtol=1e-6, atol=1e-6)
    sources[1]["b.weight"][7] += 1  # one element of one checkpoint
    before = shared.clone()
    with pytest.raises(InputError, match="pool tensors 'a.weight' and 'b.weight' hold different values, but the "
                                         "target ties them.*nothing was written"):
        CheckpointPool(sources).materialize([0.2, 0.3, 0.5], into={"a.weight": shared, "b.weight": shared})
    assert torch.equal(shared, before)


# ---- one call for task_arithmetic and the task-vector family ---------------------------------------------
ONE_CALL = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
            "della_linear", "della"]
AWKWARD = [0, 1, 2, 3, 31, 1021, (7, 13), (33, 97), 16411]  # 16411 > 16K: several pieces of one tensor
PARAMS = {"task_arithmetic": {"lambda": 0.9}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.6},
          "dare_ties": {"density": 0.6}, "breadcrumbs": {"density": 0.7, "gamma": 0.05},
          "breadcrumbs_ties": {"density": 0.7}, "della_linear": {"density": 0.5, "epsilon": 0.1},
          "della": {"density": 0.6}}


def awkward_pool(n=3, sizes=AWKWARD, seed=0, nan=True):
    """n checkpoints and a base of layer-named tensors, dtypes mixed per tensor and per checkpoint."""
    g = torch.Generator().manual_seed(seed)
    dts = (torch.bfloat16, torch.float16, torch.float32)
    names = [f"model.layers.{j % 4}.t{j}" for j in range(len(sizes))]
    base = {nm: torch.randn(s, generator=g) for nm, s in zip(names, sizes)}
    sources = [{nm: (base[nm] + 0.1 * torch.randn(s, generator=g)).to(dts[(i + j) % 3])
                for j, (nm, s) in enumerate(zip(names, sizes))} for i in range(n)]
    if nan:
        sources[1][names[4]].view(-1)[3] = float("nan")
        sources[2][names[5]].view(-1)[0] = float("inf")
    return CheckpointPool(sources, base={k: v.to(torch.bfloat16) for k, v in base.items()}), sources, names


def targets(sizes, names, dtypes=(torch.float32, torch.bfloat16)):
    return [{nm: torch.full(s if isinstance(s, tuple) else (s,), 7.0, dtype=dt) for nm, s in zip(names, sizes)}
            for dt in dtypes]


@pytest.mark.parametrize("method", ONE_CALL)
def test_one_call_methods_are_bit_identical_to_per_tensor_calls(method):
    pool, _, names = awkward_pool()
    rows = [np.array([[0.5, 0.3, 0.4], [0.2, -0.6, 0.9], [1.0, 0.5, 0.25], [0.3, 0.3, 0.3], [0.7, 0.1, 0.2]]),
            np.array([[0.4, 0.4, 0.2]] * 5)]
    for seed in (0, 5):  # a second seed: a new draw for the random sparsifiers, never a stale selection
        one = targets(AWKWARD, names)
        per = targets(AWKWARD, names)
        pool.materialize_many(rows, into=one, method=method, groups="layer", seed=seed, **PARAMS[method])
        entry = next(reversed(pool._plan_cache._entries.values()))
        kind = "GroupedPlan" if method == "task_arithmetic" else "GroupedTVPlan"
        assert type(entry.native).__name__ == kind and entry.native.num_tensors == len(names)  # one native call
        # a callable name map is not cacheable: the per-tensor path, one kernel call per tensor
        pool.materialize_many(rows, into=per, method=method, groups="layer", seed=seed, names=lambda n: n,
                              **PARAMS[method])
        for k in range(2):
            for nm in names:
                assert torch.equal(one[k][nm].view(torch.uint8), per[k][nm].view(torch.uint8)), (method, k, nm)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della"])
def test_one_call_methods_match_the_float64_reference(method):
    from methods_reference import ref_task_vectors
    sizes = [1, 2, 31, 1021, (33, 97)]
    pool, sources, names = awkward_pool(sizes=sizes, nan=False)
    w = [0.5, -0.3, 0.8]
    params = dict(PARAMS[method])
    density = params.pop("density", 1.0)
    out = targets(sizes, names, (torch.float32,))[0]
    kw = {"density": density} if method != "task_arithmetic" else {}
    pool.materialize(w, into=out, method=method, seed=3, **kw, **params)
    for nm in names:
        base = pool._base[nm]
        xs = [s[nm] for s in sources]
        ref = ref_task_vectors(xs, base, w, [density] * 3, method if method != "task_arithmetic" else "task_arithmetic",
                               lam=params.get("lambda", 1.0), gamma=params.get("gamma", 0.01),
                               epsilon=params.get("epsilon", 0.15), seed=3, name=nm)
        torch.testing.assert_close(out[nm].double(), ref, rtol=2e-6, atol=2e-6, msg=f"{method} {nm}")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_thousands_of_tiny_tensors_in_one_call(method):
    sizes = [1 + (j * 7) % 13 for j in range(3000)]
    pool, _, names = awkward_pool(n=2, sizes=sizes, seed=1, nan=False)
    one, per = targets(sizes, names, (torch.bfloat16,)), targets(sizes, names, (torch.bfloat16,))
    for w in ([0.6, 0.4], [1.5, -0.5]):  # the second call reuses the cached entry and selection
        pool.materialize(w, into=one[0], method=method, **PARAMS[method])
        pool.materialize(w, into=per[0], method=method, names=lambda n: n, **PARAMS[method])
        assert all(torch.equal(one[0][nm].view(torch.uint8), per[0][nm].view(torch.uint8)) for nm in names)


def test_cached_selection_follows_changed_inputs():
    """Thresholds are kept across calls only while no pool tensor changed (version counters)."""
    pool, _, names = awkward_pool(sizes=[1021, 4099], nan=False)
    w = [0.5, 0.3, 0.4]
    one, per = targets([1021, 4099], names, (torch.float32,)), targets([1021, 4099], names, (torch.float32,))
    pool.materialize(w, into=one[0], method="ties", density=0.3)
    with torch.no_grad():
        pool.tensor(1, names[1]).mul_(-3)  # new data in the pool's own tensor: new thresholds
        pool._base[names[0]].add_(0.5)
    pool.materialize(w, into=one[0], method="ties", density=0.3)
    pool.materialize(w, into=per[0], method="ties", density=0.3, names=lambda n: n)
    for nm in names:
        assert torch.equal(one[0][nm], per[0][nm]), nm


def test_della_masks_are_kept_between_calls_while_nothing_changes(monkeypatch):
    """DELLA's masks (a row sort per tensor and checkpoint: 19 s a call for 4 x 100M elements) are drawn once for
    a search's calls: again only for a new seed, density or epsilon, or a pool tensor changed in place; the
    bits are the per-tensor path's every time. One set of targets at a time holds them (a bit per element and
    checkpoint), and one set is alive at a time, drawing included (the kept set lived through the next draw: a
    review)."""
    import weakref
    from pymerge.ops import task_vector_ops as tvo
    sizes = [1021, (33, 97), 16411]
    pool, _, names = awkward_pool(sizes=sizes, nan=False)
    every = len(names) * 3
    drawn, live = [], []
    real = tvo._della_mask

    def counting(*args, **kwargs):
        words, sums = real(*args, **kwargs)
        drawn.append(weakref.ref(words))
        live.append(sum(r() is not None for r in drawn))
        return words, sums
    monkeypatch.setattr(tvo, "_della_mask", counting)

    def as_module(state):
        root = torch.nn.Module()
        for name, t in state.items():
            *path, leaf = name.split(".")
            m = root
            for part in path:
                if not hasattr(m, part):
                    m.add_module(part, torch.nn.Module())
                m = getattr(m, part)
            m.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
        return root
    one, other = (as_module(targets(sizes, names, (torch.float32,))[0]) for _ in range(2))
    per = targets(sizes, names, (torch.float32,))[0]

    def check(w, draws, into=one, **params):
        before = len(drawn)
        pool.materialize(w, into=into, method="della", **params)
        assert len(drawn) - before == draws, params
        pool.materialize(w, into=per, method="della", names=lambda n: n, **params)  # per tensor: drawn each call
        got = dict(into.named_parameters())
        assert all(torch.equal(got[nm].view(torch.uint8), per[nm].view(torch.uint8)) for nm in names), params

    check([0.5, 0.3, 0.4], every, density=0.6, epsilon=0.1, seed=1)
    check([0.2, -0.6, 0.9], 0, density=0.6, epsilon=0.1, seed=1)  # new weights: the same masks
    check([0.2, -0.6, 0.9], every, density=0.6, epsilon=0.1, seed=2)
    check([0.2, -0.6, 0.9], every, density=0.5, epsilon=0.1, seed=2)
    check([0.2, -0.6, 0.9], every, density=0.5, epsilon=0.2, seed=2)
    with torch.no_grad():
        pool.tensor(2, names[1]).mul_(-3)
    check([0.2, -0.6, 0.9], every, density=0.5, epsilon=0.2, seed=2)
    check([1.0, 0.5, 0.25], 0, density=0.5, epsilon=0.2, seed=2)
    held = next(e for e in pool._plan_cache._entries.values() if e.targets[0]() is one)
    assert held.selection is not None and held.selection[6]
    pool.materialize([0.5, 0.3, 0.4], into=other, method="ties", density=0.5)
    assert held.selection[6] and held in pool._plan_cache._entries.values()  # masks taken by no TIES selection
    check([0.5, 0.3, 0.4], every, into=other, density=0.5, epsilon=0.2, seed=2)
    assert held.selection is None  # the other target's masks replace these
    check([1.0, 0.5, 0.25], every, density=0.5, epsilon=0.2, seed=2)
    check([1.0, 0.5, 0.25], 0, density=0.5, epsilon=0.2, seed=2)
    # (the per-tensor calls' masks go with each tensor: at most one set plus one tensor's alive at any draw)
    assert max(live) <= every + 3, max(live)


def test_grouped_tv_plan_rejects_bad_tables():
    x, b, o = torch.randn(10), torch.randn(10), torch.empty(10)
    plan = _cpu.GroupedTVPlan([[x.data_ptr()]], [[0]], [b.data_ptr()], [0], [10], [[o.data_ptr()]], [[0]],
                              [(1, 2)], [0], 1)
    ok = dict(ints=np.zeros((1, 1, 7), np.int64), scales=np.ones((1, 1), np.float32), bits=np.zeros((1, 1), np.uint64),
              weights=np.ones((1, 1, 1), np.float32), divisors=np.ones((1, 1), np.float32))
    plan.run(**ok, consensus=False, normalize=False, lam=1.0, seed=0)
    ref = torch.empty(10)
    _cpu.tv_merge([(x.data_ptr(), 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1.0, 0)], b.data_ptr(), 0, ref.data_ptr(), 0, 10, 0,
                  False, False, 1.0, 1.0, 0, 1, 2)
    assert torch.equal(o, ref) and torch.allclose(o, x, atol=1e-6)  # b + 1 * (x - b)
    with pytest.raises(ValueError, match="weights must have 1 entries, got 2"):
        plan.run(**dict(ok, weights=np.ones((1, 1, 2), np.float32)), consensus=False, normalize=False, lam=1.0, seed=0)
    with pytest.raises(ValueError, match="bits mode needs a bitmask"):
        ints = np.zeros((1, 1, 7), np.int64)
        ints[0, 0, 0] = 4
        plan.run(**dict(ok, ints=ints), consensus=False, normalize=False, lam=1.0, seed=0)
    with pytest.raises(ValueError, match="tensor 0: weight group out of range"):
        _cpu.GroupedTVPlan([[x.data_ptr()]], [[0]], [b.data_ptr()], [0], [10], [[o.data_ptr()]], [[0]], [(1, 2)], [1], 1)
    with pytest.raises(ValueError, match="bad dtype code"):
        _cpu.GroupedTVPlan([[x.data_ptr()]], [[0]], [b.data_ptr()], [0], [10], [[o.data_ptr()]], [[3]], [(1, 2)], [0], 1)


def test_all_bfloat16_strips_match_the_avx2_path_bit_for_bit(tmp_path):
    """The AVX-512 path reads all-bfloat16 inputs as even/odd halves (no widening shuffle): the same
    bits as the AVX2 path, NaN, inf, denormals and rounding ties included, for 1 to 9 outputs."""
    import subprocess
    import sys
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(4096 * 2 + 77, generator=g).bfloat16() for _ in range(3)]
    xs[0][5], xs[1][64], xs[2][100] = float("nan"), float("inf"), -float("inf")
    xs[0][200:264] = 3e-39  # denormal results
    xs[1][300:332] = 1 + 2 ** -7  # sums landing on rounding ties
    rows = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    rows[:, 0][rows[:, 0] == 0] = 1
    torch.save({"xs": xs, "rows": torch.from_numpy(rows)}, tmp_path / "in.pt")
    code = f"""
import torch
from pymerge import weighted_sum_many
d = torch.load({str(tmp_path / 'in.pt')!r})
torch.save([torch.stack(weighted_sum_many(d["xs"], d["rows"][:k].tolist())) for k in range(1, 10)], {str(tmp_path / 'out.pt')!r})
"""
    import os
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYMERGE_SIMD="avx2"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = torch.load(tmp_path / "out.pt")
    from pymerge import weighted_sum_many
    for k in range(1, 10):
        got = torch.stack(weighted_sum_many(xs, rows[:k].tolist()))
        assert torch.equal(got.view(torch.int16), want[k - 1].view(torch.int16)), k


@pytest.mark.parametrize("offset,nbytes", [(0, 0), (0, 1), (3, (2 << 20) - 1), (1, 6 << 20), (0, 8 << 20), (4097, 5 << 20)])
def test_memory_hints_change_no_value(offset, nbytes):
    """advise_huge_pages advises exactly the 2 MiB pages inside the range (or nothing, where the kernel has
    no huge pages); prefetch takes any address, mapped or not. Neither changes a byte."""
    buf = torch.randint(0, 256, (offset + nbytes + (4 << 20),), dtype=torch.uint8)
    before = buf.clone()
    start = buf.data_ptr() + offset
    inside = max(0, ((start + nbytes) & ~((2 << 20) - 1)) - ((start + (2 << 20) - 1) & ~((2 << 20) - 1)))
    assert _cpu.advise_huge_pages(start, nbytes) in (0, inside)
    if nbytes < 2 << 20:
        assert _cpu.advise_huge_pages(start, nbytes) == 0
    freed = torch.empty(1 << 20).data_ptr()  # returned to the allocator (maybe unmapped) by now
    _cpu.prefetch(np.array([0, 1, 2**64 - 1, 2**63, freed, start, buf.data_ptr() + buf.numel() - 1], dtype=np.uint64))
    _cpu.prefetch(np.array([], dtype=np.uint64))
    assert torch.equal(buf, before)


@pytest.mark.parametrize("residency", ["host", "mmap"])
def test_task_vector_methods_under_inference_mode(residency):
    """Inference tensors have no version counter (reading one raises): a pool built, or a caller's
    checkpoints made, inside torch.inference_mode() must still merge, with the same bits. The host
    tier's own copies keep counters; borrowed inference tensors (mmap tier: used as given) are never
    served from the selection caches."""
    def sources():
        g = torch.Generator().manual_seed(3)
        return [{"w": torch.randn(37, 11, generator=g), "b": torch.randn(11, generator=g)} for _ in range(4)]

    want = {}
    plain = CheckpointPool(sources()[:3], base=sources()[3], residency=residency)
    for method in ("ties", "dare_ties", "della"):
        want[method] = {k: torch.empty_like(v) for k, v in sources()[0].items()}
        plain.materialize([0.5, 0.3, 0.2], into=want[method], method=method, density=0.6, seed=1)
    with torch.inference_mode():
        srcs = sources()
        pool = CheckpointPool(srcs[:3], base=srcs[3], residency=residency)
        assert all(pool.tensor(0, n).is_inference() == (residency == "mmap") for n in ("w", "b"))
        for method in ("ties", "dare_ties", "della"):
            for _ in range(2):  # the second call: from the caches where they may serve
                out = {k: torch.empty_like(v) for k, v in srcs[0].items()}
                pool.materialize([0.5, 0.3, 0.2], into=out, method=method, density=0.6, seed=1)
                assert all(torch.equal(out[k], want[method][k]) for k in out), (method, residency)
        if residency == "mmap":  # changed in place inside inference mode: seen, never a stale selection
            srcs[0]["w"].mul_(-3)
            out = {k: torch.empty_like(v) for k, v in srcs[0].items()}
            pool.materialize([0.5, 0.3, 0.2], into=out, method="ties", density=0.6, seed=1)
    if residency == "mmap":
        changed = sources()
        changed[0]["w"] = changed[0]["w"] * -3
        ref = {k: torch.empty_like(v) for k, v in changed[0].items()}
        CheckpointPool(changed[:3], base=changed[3]).materialize([0.5, 0.3, 0.2], into=ref, method="ties", density=0.6,
                                                                 seed=1)
        assert all(torch.equal(out[k], ref[k]) for k in out)


def test_plan_cache_lookups_do_not_race_another_threads_eviction(monkeypatch):
    """Two threads materializing from one pool: one's LRU eviction popped the entry the other had just found
    valid, and its move_to_end raised KeyError (a bug hunt: 11 in 18,000 calls). Made deterministic here:
    thread A is held inside its validity check while thread B adds an entry that evicts A's."""
    import threading
    from pymerge.pool import grouped
    cache = grouped.PlanCache(max_entries=1)
    a, b = [torch.zeros(3)], [torch.zeros(3)]

    def entry(into):
        return cache.entry(("k",), into, lambda: [], lambda plans: [], lambda plans: None)
    entry(a)
    inside, proceed, errors = threading.Event(), threading.Event(), []
    real_valid = grouped._Entry.valid

    def held_valid(self):
        if threading.current_thread().name == "A":
            inside.set()
            proceed.wait(5)
        return real_valid(self)
    monkeypatch.setattr(grouped._Entry, "valid", held_valid)

    def run(into):
        try:
            entry(into)
        except Exception as exc:  # noqa: BLE001 - the race's KeyError is what is tested
            errors.append(exc)
    ta = threading.Thread(target=run, args=(a,), name="A")
    ta.start()
    assert inside.wait(5)
    tb = threading.Thread(target=run, args=(b,), name="B")
    tb.start()
    tb.join(0.3)  # with the lock B waits for A; without it B evicts A's entry now
    proceed.set()
    ta.join(5)
    tb.join(5)
    assert not errors and not ta.is_alive() and not tb.is_alive()


def test_a_dropped_target_is_freed_and_its_id_never_meets_its_entry(monkeypatch):
    """The cache held its last 8 targets alive (a fresh model per candidate: 8 models of 64 MB kept in the
    hunt's pipeline); it holds them weakly now, and a target's finalizer evicts its entry (and the tensors
    it held). A new model given a dead one's id gets plans of its own, also where the eviction is still
    pending (no finalizer here: valid() sees the dead reference)."""
    import builtins
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    w = [0.2, 0.3, 0.5]
    for finalized in (True, False):
        if not finalized:
            monkeypatch.setattr(grouped, "_finalizer", lambda *a: types.SimpleNamespace(detach=lambda: None))
        target = Tiny()
        pool.materialize([1.0, 0.0, 0.0], into=target)
        alive, weight, dead = weakref.ref(target), weakref.ref(target.head.weight), id(target)
        del target
        gc.collect()
        assert alive() is None
        assert (weight() is None and not pool._plan_cache._entries) == finalized
        new = Tiny()  # at the dead one's address, as CPython may place it (the cache's id() says so)
        monkeypatch.setattr(grouped, "id", lambda obj: dead if obj is new else builtins.id(obj), raising=False)
        pool.materialize(w, into=new)
        assert_matches(new, reference(models, w), torch.float32)
        assert len(pool._plan_cache._entries) == 1  # the stale entry was replaced, not kept beside it
        monkeypatch.delattr(grouped, "id")
        del new
        gc.collect()


def test_a_target_dying_inside_the_cache_is_evicted_without_waiting():
    """A finalizer runs wherever the last reference goes: inside the cache's locked region (a gc during a
    build, in the thread that holds the lock) or while another thread holds it. It must not wait for the
    lock (a deadlock in the first case) nor evict in the middle of the holder's work: it leaves the
    eviction to the holder, who does it before it lets go."""
    cache = grouped.PlanCache()
    inside, proceed = threading.Event(), threading.Event()

    def entry(into, build=list):
        return cache.entry(("k",), into, build, lambda plans: [], lambda plans: None)

    def dies_inside():
        doomed.clear()  # the last reference: the finalizer runs here, under the lock
        still.append((gone,) in [key[0] for key in cache._entries])  # left to the holder, not done here
        return []

    def waits_inside():
        inside.set()
        proceed.wait(10)
        return []
    doomed, other, still = [torch.nn.Module()], [torch.nn.Module()], []
    gone = id(doomed[0])
    entry(doomed)
    same_thread = threading.Thread(target=entry, args=(other, dies_inside), daemon=True)
    same_thread.start()
    same_thread.join(10)
    assert not same_thread.is_alive() and still == [True]
    assert [key[0] for key in cache._entries] == [(id(other[0]),)]

    doomed = [torch.nn.Module()]
    gone = id(doomed[0])
    entry(doomed)
    held = [torch.nn.Module()]
    holder = threading.Thread(target=entry, args=(held, waits_inside), daemon=True)
    holder.start()
    assert inside.wait(10)
    doomed.clear()  # the finalizer runs in this thread while the holder is inside: it must return at once
    assert holder.is_alive()
    proceed.set()
    holder.join(10)
    assert (gone,) not in [key[0] for key in cache._entries]


def test_cached_plan_of_contiguous_targets_follows_same_address_relayouts():
    """An entry whose targets were all contiguous compares is_contiguous() instead of strides: a view put in a
    tensor's place at the same address with the same shape and dtype (stride 0, a transposed square, a
    reinterpreting dtype view) is not contiguous or not the same dtype, and is re-planned, never reused."""
    g = torch.Generator().manual_seed(5)
    pool = CheckpointPool([{"a": torch.randn(4, 4, generator=g), "b": torch.randn(16, generator=g)} for _ in range(3)])
    w = [0.2, 0.3, 0.5]
    want = {k: sum(wi * pool.tensor(i, k) for i, wi in enumerate(w)) for k in ("a", "b")}
    sd = {"a": torch.zeros(4, 4), "b": torch.zeros(16)}
    pool.materialize(w, into=sd)
    entry = next(iter(pool._plan_cache._entries.values()))
    assert entry.strides is None  # every target contiguous
    sd["a"].t_()  # same address, same shape, transposed
    pool.materialize(w, into=sd)
    torch.testing.assert_close(sd["a"], want["a"])
    with torch.no_grad():
        sd["b"].as_strided_((16,), (0,))  # same address and shape, every element on one location: refused
    with pytest.raises(Exception, match="several elements on one memory location"):
        pool.materialize(w, into=sd)
    # a non-contiguous target: its entry compares strides
    strided = {"a": torch.zeros(4, 8)[:, ::2], "b": torch.zeros(16)}
    pool.materialize(w, into=strided)
    entry = pool._plan_cache._entries[next(reversed(pool._plan_cache._entries))]
    assert entry.strides is not None
    torch.testing.assert_close(strided["a"], want["a"])
    strided["a"].set_(strided["a"].untyped_storage(), 0, (4, 4), (1, 8))  # same address, other strides
    pool.materialize(w, into=strided)
    torch.testing.assert_close(strided["a"], want["a"])


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], (1, 0, 2), [0.5, 2, -1.5], [1e6, -1e6, 0.0], [0, 0, 0]])
@pytest.mark.parametrize("normalize", [False, True])
def test_weight_table_fast_path_matches_the_full_parse(weights, normalize):
    """Plain floats and ints skip the parse: the same table, and the same errors, as numpy-typed weights."""
    from pymerge.errors import InputError
    from pymerge.pool.weights import weight_table
    slow = [np.float64(v) for v in weights]  # not plain floats: the full path
    try:
        want = weight_table(slow, 3, normalize)
    except InputError as exc:
        with pytest.raises(InputError, match=str(exc).replace("[", r"\[").replace("]", r"\]")):
            weight_table(weights, 3, normalize)
        return
    got = weight_table(weights, 3, normalize)
    assert got.dtype == np.float64 and got.shape == (1, 3) and np.array_equal(got, want)


@pytest.mark.parametrize("weights", [[float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0], [1e7, 0.0, 0.0],
                                     [10 ** 400, 0, 0], [True, 0.5, 0.5], [0.5, 0.5], [0.2, 0.3, 0.5, 0.0]])
def test_weight_table_refuses_what_the_fast_path_passes_on(weights):
    from pymerge.errors import InputError
    from pymerge.pool.weights import weight_table
    with pytest.raises(InputError):
        weight_table(weights, 3)


def _fresh(srcs, w, target, **kw):
    """What a new pool writes into `target` (or the error it raises)."""
    try:
        CheckpointPool(srcs, **kw).materialize(w, into=target)
    except InputError as exc:
        return str(exc)
    return None


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 4, bias=False)


def test_cached_plan_sees_a_tie_undone_or_its_second_name_deleted():
    """Two names over one memory are written once, by the last plan, and only that plan's tensor was watched:
    untying the first (`.data =`, which registers nothing) left it unwritten, and deleting its submodule was
    not refused as a fresh pool refuses it (a bug hunt)."""
    torch.manual_seed(0)
    srcs = []
    for _ in range(3):
        x = torch.randn(4, 4)
        srcs.append({"a.weight": x, "b.weight": x.clone()})  # tied weights saved under both names
    w = [0.2, 0.3, 0.5]
    want = sum(wi * s["a.weight"] for wi, s in zip(w, srcs))
    model = _TwoLayers()
    model.b.weight = torch.nn.Parameter(model.a.weight.data)  # two Parameters, one memory
    pool = CheckpointPool(srcs)
    pool.materialize(w, into=model)
    model.a.weight.data = torch.zeros(4, 4)
    pool.materialize(w, into=model)
    torch.testing.assert_close(model.a.weight.data, want)
    torch.testing.assert_close(model.b.weight.data, want)

    model = _TwoLayers()
    model.b = model.a  # one Linear under two names
    pool.materialize(w, into=model)
    del model.a
    with pytest.raises(InputError, match="pool tensor 'a.weight' has no counterpart"):
        pool.materialize(w, into=model)


def test_cached_plan_rechecks_a_tie_when_a_borrowed_source_changes():
    """A pool reading the caller's tensors in place follows their changes; a tie allowed because both names held
    the same bits must be refused once they do not, as a fresh pool refuses it (the cached plan wrote one of the
    two merges into the tied tensor; a bug hunt)."""
    torch.manual_seed(0)
    srcs = [{"a.weight": x, "b.weight": x.clone()} for x in torch.randn(3, 8)]
    w = [0.2, 0.3, 0.5]
    pool = CheckpointPool(srcs, residency="mmap")
    shared = torch.zeros(8)
    target = {"a.weight": shared, "b.weight": shared}
    pool.materialize(w, into=target)
    pool.materialize(w, into=target)  # (a cache hit: nothing moved)
    srcs[1]["b.weight"].add_(1.0)
    fresh = torch.zeros(8)
    expected = _fresh(srcs, w, {"a.weight": fresh, "b.weight": fresh}, residency="mmap")
    assert expected is not None and "hold different values" in expected
    before = shared.clone()
    with pytest.raises(InputError, match="hold different values"):
        pool.materialize(w, into=target)
    assert torch.equal(shared, before)


def _tied_checkpoints(tmp_path) -> list:
    """Three checkpoint files of a tied model: an embedding (11 x 5) and a norm, no head."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"model.embed_tokens.weight": torch.randn(11, 5), "model.norm.weight": torch.randn(5)}, paths[-1])
    return paths


class _TiedLM(torch.nn.Module):
    """The model of _tied_checkpoints' files, with a head of its own (untied) or none."""

    def __init__(self, head: bool):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(11, 5)
        self.model.norm = torch.nn.LayerNorm(5, bias=False)
        if head:
            self.lm_head = torch.nn.Linear(5, 11, bias=False)


def test_cached_plan_fills_a_head_untied_or_added_later(tmp_path):
    """Tied checkpoint files (an embedding, no head) fill a target's untied head with the merged embedding. A head
    tied to its embedding at the first call, or absent from a state dict, had no plan and was not watched: untied
    or added later, the cached plan left it unwritten where a fresh pool fills it (a bug hunt)."""
    paths = _tied_checkpoints(tmp_path)
    w = [0.2, 0.3, 0.5]
    pool = CheckpointPool(paths)

    def merged_embedding():
        sd = {"model.embed_tokens.weight": torch.zeros(11, 5), "model.norm.weight": torch.zeros(5)}
        CheckpointPool(paths).materialize(w, into=sd)
        return sd["model.embed_tokens.weight"]

    emb = torch.zeros(11, 5)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.zeros(5)}
    pool.materialize(w, into=sd)
    sd["lm_head.weight"] = torch.zeros(11, 5)  # untied: a tensor of its own
    pool.materialize(w, into=sd)
    assert torch.equal(sd["lm_head.weight"], merged_embedding())

    sd = {"model.embed_tokens.weight": torch.zeros(11, 5), "model.norm.weight": torch.zeros(5)}
    pool.materialize(w, into=sd)
    sd["lm_head.weight"] = torch.zeros(11, 5)  # added
    pool.materialize(w, into=sd)
    assert torch.equal(sd["lm_head.weight"], merged_embedding())

    m = _TiedLM(head=True)
    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.data)  # tied (one memory)
    pool.materialize(w, into=m)
    m.lm_head.weight.data = torch.zeros(11, 5)  # untied, nothing registered
    pool.materialize(w, into=m)
    assert torch.equal(m.lm_head.weight.data, merged_embedding())


def test_cached_plan_fills_a_head_module_registered_later(tmp_path):
    """Tied checkpoint files (an embedding, no head) merged into a module without a head, then
    `m.lm_head = nn.Linear(...)`: registering a module bumps the generation the cached plan checks first; without
    that check the stale plan was reused and the new head stayed zero where a fresh pool fills it (a mutation
    audit)."""
    paths = _tied_checkpoints(tmp_path)
    w = [0.2, 0.3, 0.5]
    pool = CheckpointPool(paths)
    m = _TiedLM(head=False)
    pool.materialize(w, into=m)
    pool.materialize(w, into=m)  # (a cache hit)
    m.lm_head = torch.nn.Linear(5, 11, bias=False)  # registered later, its own memory
    torch.nn.init.zeros_(m.lm_head.weight)
    pool.materialize(w, into=m)
    fresh = _TiedLM(head=True)
    CheckpointPool(paths).materialize(w, into=fresh)
    assert torch.equal(fresh.lm_head.weight, fresh.model.embed_tokens.weight)  # what the cached call must do too
    assert torch.equal(m.lm_head.weight, fresh.lm_head.weight)
    assert torch.equal(m.model.embed_tokens.weight, fresh.model.embed_tokens.weight)


@pytest.mark.parametrize("embedding, head, names", [
    ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", None),
    ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight", None),
    ("model.embed_tokens.weight", "base.lm_head.weight", "base."),
])
def test_cached_plan_fills_a_head_of_any_name_added_to_a_state_dict(tmp_path, embedding, head, names):
    """Only the bare head names (lm_head.weight...) were watched in a state dict: a BERT-style or prefixed head
    added after the first call was left unwritten where a fresh pool fills it (a review)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({embedding: torch.randn(11, 5), "x.norm.weight": torch.randn(5)}, paths[-1])
    w = [0.2, 0.3, 0.5]
    prefix = names or ""

    def state():
        return {prefix + embedding: torch.zeros(11, 5), prefix + "x.norm.weight": torch.zeros(5)}

    pool = CheckpointPool(paths)
    sd = state()
    pool.materialize(w, into=sd, names=names)
    sd[head] = torch.zeros(11, 5)
    pool.materialize(w, into=sd, names=names)
    fresh = dict(state(), **{head: torch.zeros(11, 5)})
    CheckpointPool(paths).materialize(w, into=fresh, names=names)
    assert torch.equal(fresh[head], fresh[prefix + embedding])  # what the cached call must do too
    assert torch.equal(sd[head], fresh[head])


def test_cached_plan_refuses_what_a_fresh_pool_refuses_in_a_state_dict():
    """An entry added to a state dict registers nothing: a non-tensor one a fresh pool refuses was accepted (a
    review). Every key and the dict's length are watched."""
    srcs = [{"w": torch.randn(8)} for _ in range(2)]
    pool = CheckpointPool(srcs)
    sd = {"w": torch.zeros(8)}
    pool.materialize([0.5, 0.5], into=sd)
    sd["step"] = 5
    for p in (pool, CheckpointPool(srcs)):
        with pytest.raises(InputError, match="entry 'step' is a int, not a tensor"):
            p.materialize([0.5, 0.5], into=sd)


def test_cached_plan_writes_a_layer_inserted_at_the_end_with_strict_false():
    """ModuleList.insert(len(layers), m) sets _modules[str(len)] directly (no registration): with strict=False the
    pool's key for the new layer was not watched, and the cached plan left it unwritten (a review)."""
    torch.manual_seed(0)
    srcs = [{f"layers.{i}.weight": torch.randn(4, 4) for i in range(3)} for _ in range(2)]
    w = [0.25, 0.75]

    class M(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(n))

    pool = CheckpointPool(srcs)
    m = M(2)
    pool.materialize(w, into=m, strict=False)
    new = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        new.weight.zero_()
    m.layers.insert(2, new)
    pool.materialize(w, into=m, strict=False)
    fresh = M(3)
    CheckpointPool(srcs).materialize(w, into=fresh, strict=False)
    assert torch.equal(m.layers[2].weight.data, fresh.layers[2].weight.data)
    assert m.layers[2].weight.data.any()


@pytest.mark.parametrize("how", ["parameter", "buffer"])
def test_cached_plan_writes_a_tensor_put_straight_into_a_modules_dicts(how):
    """strict=False, a target without the pool's bias (Linear(bias=False)) or buffer: a tensor put straight into
    module._parameters / _buffers (accelerate's set_module_tensor_to_device does) registers nothing, and the
    cached plan kept skipping it, leaving its old value (an audit)."""
    torch.manual_seed(0)
    srcs = [{"weight": torch.randn(3, 4), "bias": torch.randn(3), "stat": torch.randn(3)} for _ in range(2)]
    w = [0.25, 0.75]
    pool = CheckpointPool(srcs)
    m = torch.nn.Linear(4, 3, bias=False)
    pool.materialize(w, into=m, strict=False)
    if how == "parameter":
        m._parameters["bias"] = torch.nn.Parameter(torch.zeros(3))
    else:
        m._buffers["stat"] = torch.zeros(3)
    pool.materialize(w, into=m, strict=False)
    key = "bias" if how == "parameter" else "stat"
    want = (0.25 * srcs[0][key].double() + 0.75 * srcs[1][key].double()).float()
    torch.testing.assert_close(getattr(m, key).data, want)


def test_cached_plan_writes_a_layer_put_in_place_of_one_without_the_tensor():
    """strict=False, the pool's layers.1.lin.weight, the target's layers[1] without `lin`: ModuleList.insert(1, m)
    puts a layer with it there, registering nothing. Only the missing link (layers[1]'s `lin`) was watched, not
    layers[1] itself: the cached plan left the new layer's weight unwritten (a review)."""
    class WithLin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4, bias=False)

    def model():
        m = torch.nn.Module()
        m.layers = torch.nn.ModuleList([WithLin(), torch.nn.Module()])
        return m

    torch.manual_seed(0)
    srcs = [{"layers.0.lin.weight": torch.randn(4, 4), "layers.1.lin.weight": torch.randn(4, 4)} for _ in range(2)]
    w = [0.25, 0.75]
    pool, m = CheckpointPool(srcs), model()
    pool.materialize(w, into=m, strict=False)
    new = WithLin()
    with torch.no_grad():
        new.lin.weight.zero_()
    m.layers.insert(1, new)
    pool.materialize(w, into=m, strict=False)
    fresh = model()
    fresh.layers.insert(1, WithLin())
    CheckpointPool(srcs).materialize(w, into=fresh, strict=False)
    assert torch.equal(m.layers[1].lin.weight.data, fresh.layers[1].lin.weight.data)
    assert m.layers[1].lin.weight.data.any()


def test_a_state_dicts_other_entries_are_neither_read_nor_a_reason_to_plan_again(monkeypatch):
    """Every tensor of a state dict was watched, the pool's or not: a sparse, nested or mkldnn one there (no
    address) made materialize raise, and replacing an unrelated entry (a step counter) planned every call (a
    review). Only its keys are watched besides the pool's tensors."""
    srcs = [{"w": torch.randn(8)} for _ in range(2)]
    want = 0.5 * srcs[0]["w"] + 0.5 * srcs[1]["w"]
    for extra in (torch.eye(3).to_sparse(), torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
                  torch.randn(4, 4).to_mkldnn() if torch.backends.mkldnn.is_available() else torch.ones(1)):
        sd = {"w": torch.zeros(8), "extra": extra}
        for _ in range(2):
            CheckpointPool(srcs).materialize([0.5, 0.5], into=sd)
            assert torch.equal(sd["w"], want)
    pool, sd = CheckpointPool(srcs), {"w": torch.zeros(8), "step": torch.tensor(0)}
    pool.materialize([0.5, 0.5], into=sd)
    builds = []
    real = CheckpointPool._checked_plans
    monkeypatch.setattr(CheckpointPool, "_checked_plans", lambda self, *a: builds.append(1) or real(self, *a))
    for i in range(3):
        sd["step"] = torch.tensor(i)
        pool.materialize([0.5, 0.5], into=sd)
    assert builds == [] and torch.equal(sd["w"], want)


@pytest.mark.parametrize("strict", [True, False])
def test_cached_plan_sees_a_layer_renumbered_into_an_index_the_pool_does_not_cover(strict):
    """ModuleList's __delitem__ renumbers by putting a new _modules dict in place: the watched (old) dict still
    held layers.1, so with a pool of layers.1 alone the cached plan wrote it into the layer renumbered to
    layers.0, where a fresh pool refuses (a review). A module's dicts are watched."""
    def model():
        m = torch.nn.Module()
        m.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False) for _ in range(2)])
        return m

    torch.manual_seed(0)
    srcs = [{"layers.1.weight": torch.randn(4, 4)} for _ in range(2)]
    pool, m = CheckpointPool(srcs), model()
    pool.materialize([0.25, 0.75], into=m, strict=strict)
    del m.layers[0]
    with torch.no_grad():
        m.layers[0].weight.zero_()
    match = "pool tensor 'layers.1.weight' has no counterpart" if strict else "the merge would write nothing"
    with pytest.raises(InputError, match=match):
        pool.materialize([0.25, 0.75], into=m, strict=strict)
    assert not m.layers[0].weight.data.any()


def test_cached_plan_sees_a_modules_parameter_dict_replaced_whole():
    """module._parameters = {...} (private, but what some wrappers do) registers nothing: the cached plan wrote
    the old parameter. Each module's dicts on a tensor's path are watched."""
    srcs = [{"lin.weight": torch.randn(4, 4)} for _ in range(2)]
    m = torch.nn.Module()
    m.lin = torch.nn.Linear(4, 4, bias=False)
    pool = CheckpointPool(srcs)
    pool.materialize([0.5, 0.5], into=m)
    new = torch.nn.Parameter(torch.zeros(4, 4))
    m.lin._parameters = {"weight": new}
    pool.materialize([0.5, 0.5], into=m)
    assert torch.equal(new.data, 0.5 * srcs[0]["lin.weight"] + 0.5 * srcs[1]["lin.weight"])


def test_a_state_dict_key_that_is_not_a_string_with_tied_checkpoint_files(tmp_path):
    """With tied checkpoint files the head search called endswith on every target key: an int key raised
    AttributeError (a review); a pool of state dicts took it."""
    from safetensors.torch import save_file
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"model.embed_tokens.weight": torch.randn(11, 5)}, paths[-1])
    sd = {"model.embed_tokens.weight": torch.zeros(11, 5), 7: torch.zeros(1)}
    CheckpointPool(paths).materialize([0.5, 0.5], into=sd)
    assert sd["model.embed_tokens.weight"].any() and not sd[7].any()


def test_cached_plan_refuses_a_storage_shrunk_at_the_same_address():
    """resize_(0) then resize_(fewer bytes) often gives the storage its old address back: the cached plan (same
    data_ptr, shape, dtype, strides) wrote the whole tensor past the storage's end, a heap overflow that aborted
    the process, where a fresh plan refuses it (a bug hunt)."""
    n = 16384
    torch.manual_seed(0)
    srcs = [{"w": torch.randn(n)} for _ in range(2)]
    pool = CheckpointPool(srcs)
    kept = []
    for _ in range(200):  # until the allocator hands the address back (most tries with glibc)
        p = torch.zeros(n)
        target = {"w": p}
        pool.materialize([0.5, 0.5], into=target)
        address = p.data_ptr()
        p.untyped_storage().resize_(0)
        p.untyped_storage().resize_(4 * n - 1024)
        if p.data_ptr() == address:
            break
        kept.append(p)  # (held, so that the next try cannot take this address either)
    else:
        pytest.skip("the allocator never returned a freed address: nothing to test here")
    with pytest.raises(InputError, match="storage holds 64512 bytes but the tensor spans 65536"):
        pool.materialize([0.5, 0.5], into=target)


def test_grouped_tv_plan_offsets_are_tv_merge_s():
    """A sharded pool's local tensors start at a global element (offsets): DARE's draws and a top-k boundary's
    index are those of the global elements, as tv_merge's offset gives them; a wrong-sized or negative offsets
    table is refused."""
    from pymerge.ops import philox
    from pymerge.ops import task_vector_ops as tvo
    from pymerge.ops import select
    g = torch.Generator().manual_seed(2)
    b = torch.randn(3000, generator=g)
    x = b + 0.5  # deltas of one magnitude: a top-k boundary among them is decided by the elements' indexes
    key = int(select.magnitude_keys(x, b)[0])
    o, ref, at0 = torch.empty(3000), torch.empty(3000), torch.empty(3000)
    plan = _cpu.GroupedTVPlan([[x.data_ptr()]], [[0]], [b.data_ptr()], [0], [3000], [[o.data_ptr()]], [[0]],
                              [(5, 6)], [0], 1)
    thr = philox.keep_threshold(0.5)
    for mode, row in ((tvo.RANDOM, (tvo.RANDOM, 0, 0, 0, 0, thr, 0)),
                      (tvo.TOPK, (tvo.TOPK, 0, 0, key, 5400, 0, 0))):  # global elements before 5400 kept
        ints = np.array(row, dtype=np.int64).reshape(1, 1, 7)
        args = dict(ints=ints, scales=np.ones((1, 1), np.float32), bits=np.zeros((1, 1), np.uint64),
                    weights=np.ones((1, 1, 1), np.float32), divisors=np.ones((1, 1), np.float32), consensus=False,
                    normalize=False, lam=1.0, seed=9)
        plan.run(**args, offsets=np.array([5000], np.int64))
        spec = [(x.data_ptr(), 0, row[0], row[1], row[2], row[3], row[4], row[5], 0, 1.0, 1.0, 0)]
        _cpu.tv_merge(spec, b.data_ptr(), 0, ref.data_ptr(), 0, 3000, 5000, False, False, 1.0, 1.0, 9, 5, 6)
        _cpu.tv_merge(spec, b.data_ptr(), 0, at0.data_ptr(), 0, 3000, 0, False, False, 1.0, 1.0, 9, 5, 6)
        assert torch.equal(o, ref) and not torch.equal(o, at0), mode
    with pytest.raises(ValueError, match="offsets must have 1 entries, got 2"):
        plan.run(**args, offsets=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="negative offset"):
        plan.run(**args, offsets=np.array([-1], np.int64))


def test_device_weights_normalize_to_the_host_rows_bits():
    """GPU weights were normalized in float32 on the device, host ones in float64 then rounded: a third of rows
    came out 1 ulp apart, so a merge's bits depended on where its weights lived (a Triton audit). _device_table
    is plain torch: checked here on CPU tensors."""
    from pymerge.pool.pool import _device_table
    from pymerge.pool.weights import weight_table
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 10))
        w = rng.random(n).astype(np.float32)
        host = weight_table(w.tolist(), n, normalize=True).astype(np.float32)
        dev = _device_table(torch.from_numpy(w), n, normalize=True)
        assert dev.dtype == torch.float32 and np.array_equal(dev.numpy(), host), (w, dev, host)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_triton_grouped_table_refuses_weights_it_would_misread(dtype):
    """GroupedTable.run checked the weights' shape only: bfloat16 weights were read as bfloat16 (0.3003 for 0.3),
    float64 ones would make tl.fma compute in float64 on a GPU (a Triton audit). Float32 on the tables' device."""
    from pymerge.kernels.weighted_sum_grouped import GroupedTable
    x = [torch.full((5,), 1.0), torch.full((5,), 2.0)]
    out = [[torch.empty(5)]]
    table = GroupedTable([x], out, [0], 1)
    with pytest.raises(ValueError, match=f"weights must be float32 on cpu, got {dtype} on cpu"):
        table.run(torch.tensor([[[0.1, 0.2]]], dtype=dtype))
    table.run(torch.tensor([[[0.1, 0.2]]]))
    assert torch.allclose(out[0][0], torch.full((5,), 0.5))


def test_task_arithmetic_coefficients_are_checked_alike_on_both_paths():
    """The size limit applies to the coefficients the kernels multiply by ([1] + c in the delta form). The
    per-tensor path also checked the base's -sum c of the one-pass form, which the one-call table no longer
    holds: a group's weights [6e5, 6e5] were refused tensor by tensor and accepted in one call (a review)."""
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.a", "model.layers.1.b"]
    base = {n: torch.randn(64, generator=g) for n in names}
    srcs = [{n: base[n] + 0.01 * torch.randn(64, generator=g) for n in names} for _ in range(2)]
    pool = CheckpointPool(srcs, base=base)
    for row, lam, ok in (([6e5, 6e5], 1.0, True), ([2e5, 0.5], 10.0, False)):  # c = lambda * w: 2e6 refused
        w = np.array([[0.5, 0.5], [0.5, 0.5], row])
        outcomes = []
        for kw in ({}, {"names": lambda n: n}):  # one call; per tensor (a names= function is not cached)
            out = {n: torch.empty(64) for n in names}
            try:
                pool.materialize(w, into=out, method="task_arithmetic", groups="layer", **kw, **{"lambda": lam})
                outcomes.append(out)
            except InputError as exc:
                assert "coefficient of" in str(exc) and "is 2e+06" in str(exc), exc
                outcomes.append(None)
        assert [o is not None for o in outcomes] == [ok, ok], row
        if ok:
            for n in names:
                assert torch.equal(outcomes[0][n], outcomes[1][n])


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_an_entry_that_fails_as_it_is_made_leaves_no_error_behind(monkeypatch, exc):
    """An entry whose __init__ failed first (a MemoryError or Ctrl-C) printed a second error when collected:
    'Exception ignored in _Entry.detach: AttributeError: finalizers' (an audit). The call raises the first one
    alone, and the next call merges."""
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    target = Tiny()
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    real = grouped._reference

    def failing(into):
        raise exc
    monkeypatch.setattr(grouped, "_reference", failing)
    with pytest.raises(exc):
        pool.materialize([0.25, 0.75], into=target)
    gc.collect()
    monkeypatch.setattr(grouped, "_reference", real)
    pool.materialize([0.25, 0.75], into=target)
    gc.collect()
    assert unraisable == []
    assert_matches(target, reference(models, [0.25, 0.75]), torch.float32)


def test_the_plan_cache_keeps_at_most_max_entries_live_targets():
    """Each live target has its own cached plan; past max_entries the oldest is evicted. Without the bound, 20
    live targets kept 20 entries (each holding its plan and finalizers) where the cache holds 8 (a mutation
    audit)."""
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    cache = pool._plan_cache
    assert cache.max_entries == 8
    targets = [Tiny() for _ in range(20)]  # all kept alive: none is evicted by its death
    for k, t in enumerate(targets):
        pool.materialize([0.5, 0.5], into=t)
        assert len(cache._entries) == min(k + 1, cache.max_entries), k
    for t in targets[:12] + targets[-1:]:  # evicted or not, each still merges right
        pool.materialize([0.25, 0.75], into=t)
        assert_matches(t, reference(models, [0.25, 0.75]), torch.float32)
    assert len(cache._entries) == cache.max_entries


def test_a_dict_groups_rule_merges_and_follows_in_place_edits():
    """groups= may be a dict (name -> group). A dict is not a value, so no plan is cached under it: an edit in
    place is honoured on the next call. Treated as cacheable, the one-call path raised TypeError: unhashable type:
    'dict' (a mutation audit)."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    names = list(models[0].state_dict())
    groups = {n: k % 2 for k, n in enumerate(names)}
    table = np.array([[0.2, 0.3, 0.5], [1.0, -0.5, 0.5]])
    target = Tiny()
    pool.materialize(table, into=target, groups=groups)
    assert_matches(target, reference(models, table, group_of=groups.get), torch.float32)
    groups.update({n: 1 - g for n, g in groups.items()})  # every tensor to the other row
    pool.materialize(table, into=target, groups=groups)
    assert_matches(target, reference(models, table, group_of=groups.get), torch.float32)
