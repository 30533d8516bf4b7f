"""The CPU pool's one-call path (pymerge/pool/grouped.py): bit-identical to one kernel call per tensor,
and a cached plan never writes into a tensor the target no longer holds."""
import numpy as np
import pytest
import torch

from pymerge import _cpu
from pymerge.ops.weighted_sum import weighted_sum_into
from pymerge.pool import CheckpointPool
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


def test_grouped_triton_launch_matches_per_tensor_launches():
    pytest.importorskip("triton")
    from pymerge.kernels import weighted_sum as triton_ws
    from pymerge.kernels.weighted_sum_grouped import GroupedTable
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 33, 1500]
    dts = (torch.bfloat16, torch.float32, torch.float16)
    ins = [[torch.randn(n, generator=g).to(d) for d in dts] for n in sizes]
    ins[2][0][4] = float("nan")
    outs = [[torch.empty(n, dtype=torch.bfloat16) for _ in range(2)] for n in sizes]
    groups = [0, 1, 0, 1]
    table = GroupedTable(ins, outs, groups, 2)
    w = torch.randn(2, 2, 3, generator=g)
    table.run(w)
    for t, (x, os) in enumerate(zip(ins, outs)):
        if not sizes[t]:
            continue
        want = [torch.empty_like(o) for o in os]
        triton_ws.weighted_sum_many(x, w[groups[t]], want)
        for o, r in zip(os, want):
            assert torch.equal(o.view(torch.int16), r.view(torch.int16)), t
    with pytest.raises(ValueError, match="weights must have shape"):
        table.run(torch.zeros(1, 2, 3))


def test_extras_fail_in_one_line_naming_the_extra(monkeypatch):
    import sys
    from pymerge.extras import MissingExtraError, require
    from pymerge.ops.weighted_sum import pick_backend
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"^backend 'triton' needs triton, which is not installed: "
                                                r"pip install 'pymerge\[triton\]'$"):
        pick_backend(torch.device("cpu"), "triton")
    with pytest.raises(ImportError, match=r"pip install 'pymerge\[plot\]'"):
        require("matplotlib", "plotting")
    assert pick_backend(torch.device("cpu"), "auto") == "cpu"  # auto never needs an extra on the CPU


def test_tied_target_written_once_by_the_last_tensor():
    """Untied checkpoints into a model whose two names share one tensor: the later pool tensor is what
    the target holds (as writing in order left it), never a mix written from two threads."""
    g = torch.Generator().manual_seed(3)
    n = 300_000  # big enough to be split across threads
    sources = [{"a.weight": torch.randn(n, generator=g), "b.weight": torch.randn(n, generator=g)} for _ in range(3)]
    pool = CheckpointPool(sources)
    shared = torch.empty(n)
    for _ in range(3):
        pool.materialize([0.2, 0.3, 0.5], into={"a.weight": shared, "b.weight": shared})
        want = sum(w * s["b.weight"].double() for w, s in zip([0.2, 0.3, 0.5], sources))
        torch.testing.assert_close(shared.double(), want, rtol=1e-6, atol=1e-6)
