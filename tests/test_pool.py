"""CheckpointPool against a float64 reference: every backend that runs here, in place, errors before writes."""
import copy
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pymerge
from pymerge.errors import CheckpointError, InputError, MergeConfigError
from pymerge.pool import CheckpointPool

HAS_CUDA = torch.cuda.is_available()


class Tiny(torch.nn.Module):
    """Awkward sizes, a block list (for per-layer weights), a float buffer and an integer buffer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(37, 29)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(29, 29) for _ in range(3)])
        self.norm = torch.nn.LayerNorm(29)
        self.head = torch.nn.Linear(29, 101)  # 2929 + 101 elements: more than one 1024-element block
        self.register_buffer("scale", torch.randn(7))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.to(dtype)


def make_models(n, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    models = [Tiny(dtype) for _ in range(n)]
    for m in models:
        for p in m.parameters():
            torch.nn.init.normal_(p)
    return models


def reference(models, table, group_of=None):
    """float64 sum_i w_i theta_i per tensor; table is [G, N] (G = 1: one row for all)."""
    table = np.atleast_2d(np.asarray(table, dtype=np.float64))
    out = {}
    for name, t in models[0].state_dict().items():
        if not t.is_floating_point():
            continue
        g = group_of(name) if (group_of and table.shape[0] > 1) else 0
        out[name] = sum(float(w) * m.state_dict()[name].double() for w, m in zip(table[g], models))
    return out


def assert_matches(model, ref, dtype):
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    state = model.state_dict()
    for name, r in ref.items():
        got = state[name].double()
        assert torch.allclose(got, r, rtol=tol, atol=tol * r.abs().max().item()), name


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def ptrs(model):
    return {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}


BACKENDS = ["cpu", "torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialize_matches_float64_in_place(backend, dtype):
    models = make_models(4, dtype)
    pool = CheckpointPool([m.state_dict() for m in models], backend=backend)
    target = Tiny(dtype)
    before, steps = ptrs(target), target.steps.clone()
    w = [0.4, -0.25, 0.6, 0.3]
    out = pool.materialize(w, into=target)
    assert out is target
    assert ptrs(target) == before
    assert_matches(target, reference(models, w), dtype)
    assert torch.equal(target.steps, steps)  # integer buffers are not pool tensors
    assert pool.skipped == ["steps"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_materialize_many_matches_separate_references(backend):
    models = make_models(5)
    pool = CheckpointPool([m.state_dict() for m in models], backend=backend)
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(6, 5))
    targets = [Tiny() for _ in range(6)]
    before = [ptrs(t) for t in targets]
    pool.materialize_many(rows, into=targets)
    for k, t in enumerate(targets):
        assert ptrs(t) == before[k]
        assert_matches(t, reference(models, rows[k]), torch.float32)


@pytest.mark.triton_cpu
def test_streamed_tier_chunks_match(monkeypatch):
    """The GPU streaming code (staging sets, chunk offsets) run on the CPU through the Triton interpreter."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], backend="triton", residency="pinned", chunk_bytes=4096)
    pool._cuda.chunk = 1024  # force several chunks per tensor (head.weight has 2929 elements)
    targets = [Tiny() for _ in range(5)]
    rows = np.random.default_rng(2).normal(size=(5, 3))
    pool.materialize_many(rows, into=targets)
    for k, t in enumerate(targets):
        assert_matches(t, reference(models, rows[k]), torch.float32)


@pytest.mark.triton_cpu
def test_streamed_tier_stages_no_more_than_the_largest_tensor():
    """chunk_bytes is a cap: a huge one (up to 2**40 passes the check) allocated staging buffers of that size, and
    failed with the allocator's out-of-memory error on a GPU; the chunk is now at most the largest tensor's."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], backend="triton", residency="pinned", chunk_bytes=1 << 40)
    largest = max(t.numel() for t in models[0].state_dict().values())
    assert pool._cuda.chunk == -(-largest // 4096) * 4096
    assert all(b.numel() == pool._cuda.chunk * 4 for stage in pool._cuda.stage for b in stage)
    target, row = Tiny(), [0.2, -0.5, 1.25]
    pool.materialize(row, into=target)
    assert_matches(target, reference(models, row), torch.float32)


@pytest.mark.triton_cpu
def test_plan_entry_a_graph_captured_outlives_the_plan_cache(monkeypatch):
    """The grouped kernel's device address tables (and temporaries) belong to the pool's 8-entry plan cache:
    materializing into 8 other targets freed the ones a CUDA graph had captured, and its replays would have
    read freed memory. A capture is simulated here (the interpreter runs the same Python path on the CPU)."""
    import gc
    import weakref
    from pymerge.pool import pool as pool_mod
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], backend="triton")
    target = Tiny()
    monkeypatch.setattr(pool_mod, "_capturing", lambda device: True, raising=False)
    pool.materialize([0.2, 0.3, 0.5], into=target)  # the call a graph captures
    monkeypatch.setattr(pool_mod, "_capturing", lambda device: False, raising=False)
    captured = [weakref.ref(e.native) for e in pool._plan_cache._entries.values()]
    assert len(captured) == 1 and captured[0]() is not None
    for seed in range(pool._plan_cache.max_entries + 1):  # a search loop writing other candidates
        pool.materialize([0.1, 0.1, 0.8], into=Tiny())
    gc.collect()
    assert captured[0]() is not None
    pool.materialize([0.1, 0.6, 0.3], into=target)  # still the same entry, still right
    assert_matches(target, reference(models, [0.1, 0.6, 0.3]), torch.float32)


def test_per_layer_weights_and_normalize():
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    assert pool.num_groups() == 4  # group 0: embed/norm/head/scale; groups 1..3: layers.0..2
    table = np.array([[1, 1, 2], [3, 0, 1], [0, 1, 0], [2, 2, 0]], dtype=float)
    target = Tiny()
    pool.materialize(table, into=target, normalize=True)
    norm = table / table.sum(1, keepdims=True)

    def group_of(name):
        return int(name.split(".")[1]) + 1 if name.startswith("layers.") else 0
    assert_matches(target, reference(models, norm, group_of), torch.float32)
    custom = Tiny()
    pool.materialize(table[:2], into=custom, groups=lambda n: 1 if "head" in n else 0)
    assert_matches(custom, reference(models, table[:2], lambda n: 1 if "head" in n else 0), torch.float32)


def test_name_mapping_prefix_and_function():
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    wrapper = torch.nn.Module()
    wrapper.inner = Tiny()
    pool.materialize([0.5, 0.5], into=wrapper, names="inner.")
    assert_matches(wrapper.inner, reference(models, [0.5, 0.5]), torch.float32)
    # a function may also drop tensors (None): they stay untouched
    t = Tiny()
    head = t.head.weight.clone()
    pool.materialize([1.0, 0.0], into=t, names=lambda n: None if n.startswith("head") else n)
    assert torch.equal(t.head.weight, head)
    assert torch.equal(t.layers[0].weight, models[0].layers[0].weight)


def test_untouched_buffers_and_parameters_outside_the_pool():
    models = make_models(2)
    state = {k: v for k, v in models[0].state_dict().items() if not k.startswith("norm")}
    pool = CheckpointPool([state, {k: models[1].state_dict()[k] for k in state}])
    t = Tiny()
    t.register_buffer("extra", torch.randn(3))
    keep = {k: v.clone() for k, v in t.state_dict().items() if k.startswith("norm") or k in ("extra", "steps")}
    pool.materialize([0.3, 0.7], into=t)
    for k, v in keep.items():
        assert torch.equal(t.state_dict()[k], v), k


def test_sources_from_safetensors_files_and_folder(tmp_path):
    models = make_models(3, torch.bfloat16)
    paths = []
    for i, m in enumerate(models):
        d = tmp_path / f"ckpt{i}"
        d.mkdir()
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        if i == 0:
            save_file(sd, str(d / "model.safetensors"))
            paths.append(str(d))  # a folder
        else:
            save_file(sd, str(d / "weights.safetensors"))
            paths.append(str(d / "weights.safetensors"))  # a file
    for residency in ("host", "mmap"):
        pool = CheckpointPool(paths, residency=residency)
        t = Tiny(torch.bfloat16)
        pool.materialize([0.2, 0.3, 0.5], into=t)
        assert_matches(t, reference(models, [0.2, 0.3, 0.5]), torch.bfloat16)
    # fp32 storage of bf16 files, merged into an fp32 model
    pool = CheckpointPool(paths, dtype=torch.float32)
    t = Tiny(torch.float32)
    pool.materialize([0.2, 0.3, 0.5], into=t)
    assert_matches(t, reference(models, [0.2, 0.3, 0.5]), torch.bfloat16)


def test_memory_budget_picks_the_memory_map():
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models], memory_budget="1KB")
    assert pool.residency == "mmap" and "budget" in pool.describe()
    pool = CheckpointPool([m.state_dict() for m in models], memory_budget="1GiB")
    assert pool.residency == "host"
    # forcing copies beyond the budget asks for two things at once: refused (it held them in silence)
    with pytest.raises(InputError, match=r"residency='host' holds a copy of every checkpoint, .* beyond memory_budget"):
        CheckpointPool([m.state_dict() for m in models], memory_budget="1KB", residency="host")
    assert CheckpointPool([m.state_dict() for m in models], memory_budget="1KB", residency="mmap").residency == "mmap"


def test_pool_never_aliases_a_source_model():
    """Merging into a model whose state dict is a source must not change the pool."""
    models = make_models(2)
    pool = CheckpointPool([models[0].state_dict(), models[1].state_dict()])
    frozen = [snapshot(m) for m in models]
    pool.materialize([0.0, 1.0], into=models[0])
    ref = reference([type("M", (), {"state_dict": lambda self, s=s: s})() for s in frozen], [0.5, 0.5])
    t = Tiny()
    pool.materialize([0.5, 0.5], into=t)
    assert_matches(t, ref, torch.float32)


def test_into_a_state_dict():
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    sd = {k: torch.zeros_like(v) for k, v in models[0].state_dict().items()}
    pool.materialize([1.0, 1.0], into=sd)
    assert_matches_dict = reference(models, [1.0, 1.0])
    for k, r in assert_matches_dict.items():
        assert torch.allclose(sd[k].double(), r, atol=1e-5)


# ---- errors leave the model unchanged ---------------------------------------------------------------
@pytest.mark.parametrize("groups,match", [
    ("layers", "groups must be 'layer'"),
    ({"embed.weight": 0}, "no group given for tensor"),
    (lambda n: -1, "groups are integers >= 0"),
])
def test_a_bad_group_rule_is_refused_with_flat_weights_too(groups, match):
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    t = Tiny()
    before = snapshot(t)
    for w in ([0.5, 0.5], [[0.5, 0.5]] * pool.num_groups()):  # flat weights once ignored the rule
        with pytest.raises(InputError, match=match):
            pool.materialize(w, into=t, groups=groups)
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("weights,match", [
    ([0.5, 0.5], "got 2 weights for 3 checkpoints"),
    ([torch.tensor([0.2]), torch.tensor([0.3]), torch.tensor([0.5])],
     "a table of 3 rows .* of 1, for 3 checkpoints; one weight per checkpoint is 3 numbers, not one-element"),
    ([[0.5, 0.5]] * 3, r"a table of 3 rows \(one per weight group\) of 2, for 3 checkpoints$"),
    ([0.5, float("nan"), 0.5], r"weights\[1\] is nan"),
    ([0.5, 0.5, float("inf")], r"weights\[2\] is inf"),
    ([[0.5, 0.5, 0.0]] * 2, "layers.1.weight.* is in group 2 but the weights table has 2 rows"),
    ([0.0, 0.0, 0.0], None),
])
def test_bad_weights_raise_before_writing(weights, match):
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models])
    t = Tiny()
    before = snapshot(t)
    if match is None:  # normalizing an all-zero row
        with pytest.raises(InputError, match="sums to 0"):
            pool.materialize(weights, into=t, normalize=True)
    else:
        with pytest.raises(InputError, match=match):
            pool.materialize(weights, into=t)
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_mismatches_name_the_tensor_and_write_nothing():
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])

    class Wider(Tiny):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(29, 100)
    for model, match in ((Wider(), r"'head.weight' has shape \(100, 29\)"),
                         (torch.nn.Linear(3, 3), "pool tensors 'scale', 'embed.weight', .* have no counterpart"),
                         (Tiny().double(), "'embed.weight' has dtype torch.float64")):
        before = snapshot(model)
        with pytest.raises(InputError, match=match) as err:
            pool.materialize([0.5, 0.5], into=model)
        assert "nothing was written" in str(err.value)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    # strict=False: pool tensors without a counterpart are skipped
    lin = torch.nn.Linear(29, 101)
    pool.materialize([1.0, 0.0], into=lin, names=lambda n: n[5:] if n.startswith("head.") else n, strict=False)
    assert torch.equal(lin.weight, models[0].head.weight)
    # ... and a rule or prefix that matches nothing is refused, not a call that writes nothing
    for names, strict, match in ((lambda n: None, True, "maps every pool tensor to None"),
                                 ("model.", False, "no target has any pool tensor .*'model.scale'")):
        before = snapshot(lin)
        with pytest.raises(InputError, match=match):
            pool.materialize([0.0, 1.0], into=lin, names=names, strict=strict)
        for k, v in lin.state_dict().items():
            assert torch.equal(v, before[k]), k
    # ... but candidates that disagree on a tensor are refused: skipping it everywhere would leave
    # stale values in the candidates that have it
    full, part = Tiny(), torch.nn.Linear(29, 101)
    before = snapshot(full)
    with pytest.raises(InputError, match="every candidate must have the same tensors"):
        pool.materialize_many([[1.0, 0.0], [0.0, 1.0]], into=[full, part],
                              names=lambda n: n[5:] if n.startswith("head.") else n, strict=False)
    for k, v in full.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_many_checks_every_target_first():
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models])
    good, bad = Tiny(), Tiny()
    bad.head = torch.nn.Linear(29, 3)
    before = snapshot(good)
    with pytest.raises(InputError, match="in model 1"):
        pool.materialize_many([[1, 0], [0, 1]], into=[good, bad])
    for k, v in good.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(InputError, match="same model appears twice"):
        pool.materialize_many([[1, 0], [0, 1]], into=[good, good])
    with pytest.raises(InputError, match="2 weight rows for 1 target"):
        pool.materialize_many([[1, 0], [0, 1]], into=[good])


def test_inconsistent_sources_are_named():
    a, b = make_models(2)
    sb = b.state_dict()
    sb.pop("head.bias")
    with pytest.raises(CheckpointError, match="'head.bias' is missing"):
        CheckpointPool([a.state_dict(), sb])
    sb = dict(b.state_dict(), **{"head.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"'head.bias' has shape \[5\]"):
        CheckpointPool([a.state_dict(), sb])
    sb = dict(b.state_dict(), extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="'extra' is not in"):
        CheckpointPool([a.state_dict(), sb])
    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointPool([a.state_dict(), "/nonexistent/model.safetensors"])


# ---- methods through the registry --------------------------------------------------------------------
def test_task_arithmetic_through_the_registry():
    base, *models = make_models(4)
    pool = CheckpointPool([m.state_dict() for m in models], base=base.state_dict())
    t = Tiny()
    w = [0.5, 0.3, 0.7]
    pool.materialize(w, into=t, method="task_arithmetic")
    ref = reference(models, w)
    b = base.state_dict()
    for name in ref:  # base + sum_i w_i (theta_i - base)
        ref[name] = ref[name] + (1 - sum(w)) * b[name].double()
    assert_matches(t, ref, torch.float32)


def test_registry_dispatch_passes_weights_and_params():
    """A method registered here (the contract, not any particular method): sees weights, params, base."""
    from pymerge.methods import base as mb

    @mb.register
    class _ScaledBaseDelta(mb.MergeMethod):
        name = "_test_scaled_delta"
        base_model = "required"
        model_params = {"weight": mb.Param(1.0)}
        global_params = {"scale": mb.Param(mb.REQUIRED)}

        def merge_tensor(self, task, out):
            acc = task.base.double().clone()
            for x, mp in zip(task.inputs, task.model_params):
                acc += task.params["scale"] * mp["weight"] * (x.double() - task.base.double())
            out.copy_(acc)

    base, *models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], base=base.state_dict())
    t = Tiny()
    before = snapshot(t)
    with pytest.raises(MergeConfigError, match="needs parameter 'scale'"):
        pool.materialize([1, 1], into=t, method="_test_scaled_delta")
    with pytest.raises(MergeConfigError, match="no parameter 'density'"):
        pool.materialize([1, 1], into=t, method="_test_scaled_delta", scale=1.0, density=0.5)
    with pytest.raises(MergeConfigError, match="unknown merge_method"):
        pool.materialize([1, 1], into=t, method="no_such_method")
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())
    no_base = CheckpointPool([m.state_dict() for m in models])
    with pytest.raises(MergeConfigError, match="needs a base_model"):
        no_base.materialize([1, 1], into=t, method="_test_scaled_delta", scale=1.0)
    pool.materialize([0.25, 0.5], into=t, method="_test_scaled_delta", scale=2.0)
    b = base.state_dict()
    for name, r in reference(models, [0.5, 1.0]).items():
        assert torch.allclose(t.state_dict()[name].double(), r + (1 - 1.5) * b[name].double(), atol=1e-5), name
    mb._REGISTRY.pop("_test_scaled_delta")



def _antipodal_last(base, models):
    """Checkpoints 0 and 1 move head.weight (the last tensor in name order) in exactly opposite directions."""
    sds = [m.state_dict() for m in models]
    base["head.weight"] = torch.zeros_like(base["head.weight"])  # so that x - base is exact
    delta = torch.randn_like(base["head.weight"])
    sds[0]["head.weight"], sds[1]["head.weight"] = delta, -delta
    return sds


@pytest.mark.parametrize("case", ["zero task vector, eps 0", "antipodal", "group weights sum to 0", "candidate 1"])
def test_a_method_error_found_in_a_later_tensor_writes_nothing(case):
    """multislerp refused head.weight (its task vector zero with eps 0, antipodal inputs, a weight row summing to
    0) after earlier tensors were written: the live model was left half merged. Every tensor's coefficients
    and weights are checked before the first write."""
    base_m, *models = make_models(4)
    base = base_m.state_dict()
    sds = [m.state_dict() for m in models]
    kw, weights, match = {}, [[0.5, 0.3, 0.2]], "task vector is zero and eps is 0"
    if case.startswith("zero") or case == "candidate 1":
        sds[1]["head.weight"] = base["head.weight"].clone()
        kw["eps"] = 0.0
    if case == "antipodal":
        sds, weights, match = _antipodal_last(base, models), [[1.0, 1.0, 0.0]], "weighted sum of the unit vectors is zero"
    if case == "group weights sum to 0":
        kw["groups"] = lambda n: 1 if n.startswith("head.") else 0
        weights, match = [[[0.5, 0.3, 0.2], [1.0, -1.0, 0.0]]], "weights sum to 0 with normalize_weights"
    if case == "candidate 1":
        weights = [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]
    pool = CheckpointPool(sds, base=base)
    targets = [Tiny() for _ in weights]
    before = [snapshot(t) for t in targets]
    with pytest.raises(MergeConfigError, match=f"tensor head.weight: multislerp.*{match}"):
        pool.materialize_many(weights, into=targets, method="multislerp", **kw)
    for t, b in zip(targets, before):
        assert all(torch.equal(v, b[k]) for k, v in t.state_dict().items())
    pool.materialize_many([[0.5, 0.3, 0.2]] * len(targets), into=targets, method="multislerp")  # the pool still merges
    assert not torch.equal(targets[0].embed.weight, before[0]["embed.weight"])


@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_a_coefficient_beyond_float32_found_in_a_later_tensor_writes_nothing(method):
    """A task vector of 1e-44 with eps 0 (multislerp) or tol 0 (karcher) needs a coefficient of ~1e43, which
    the float32 kernels refused at the write, after earlier tensors were written, as a bare ValueError naming
    no tensor (an audit): the coefficients' range is checked when they are prepared."""
    base_m, *models = make_models(3)
    base, sds = base_m.state_dict(), [m.state_dict() for m in models]
    base["head.weight"] = torch.zeros_like(base["head.weight"])
    tiny = torch.zeros_like(base["head.weight"])
    tiny.view(-1)[0] = 1e-44  # a float32 subnormal: its norm's inverse is far beyond float32
    sds[1]["head.weight"] = tiny
    kw = {"eps": 0.0} if method == "multislerp" else {"tol": 0.0}
    pool = CheckpointPool(sds, base=base) if method == "multislerp" else CheckpointPool(sds)
    target = Tiny()
    before = snapshot(target)
    with pytest.raises(MergeConfigError, match=f"^tensor head.weight: {method} needs a coefficient of .*e\\+4.*float32"):
        pool.materialize([0.5, 0.5], into=target, method=method, **kw)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    pool.materialize([0.5, 0.5], into=target, method=method)  # the defaults merge it
    assert all(torch.isfinite(v).all() for v in target.state_dict().values())


def test_an_error_no_check_foresaw_says_the_targets_hold_a_partial_merge(monkeypatch):
    """Should a method's merge_tensor still raise after earlier tensors were written (a check prepare lacks),
    the error says the live model is partly merged rather than leaving it silently half written."""
    from pymerge.methods import sphere
    base_m, *models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], base=base_m.state_dict())
    real = sphere.MultiSlerp.merge_tensor

    def failing(self, task, out):
        if task.name == "head.weight":
            raise ValueError("group_lincomb: something no check foresaw")
        real(self, task, out)
    monkeypatch.setattr(sphere.MultiSlerp, "merge_tensor", failing)
    with pytest.raises(MergeConfigError, match=r"something no check foresaw; \d+ of \d+ tensors were written "
                                                r"before it: the targets hold a partial merge"):
        pool.materialize([0.5, 0.5], into=Tiny(), method="multislerp")

    def failing_on_input(self, task, out):  # an InputError keeps its kind, the note in its message
        if task.name == "head.weight":
            raise CheckpointError("a.safetensors: was cut short")
        real(self, task, out)
    monkeypatch.setattr(sphere.MultiSlerp, "merge_tensor", failing_on_input)
    with pytest.raises(CheckpointError, match=r"^a.safetensors: was cut short; \d+ of \d+ tensors were written "):
        pool.materialize([0.5, 0.5], into=Tiny(), method="multislerp")


def failing_at_call(real, n: int, error, calls: list):
    """real, except that its n-th call (counted in calls) raises error: a failure after some writes."""
    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error("no memory left (a test)")
        return real(*args, **kwargs)
    return call


@pytest.mark.triton_cpu
def test_an_error_after_some_streamed_chunks_says_so(monkeypatch):
    """The streamed tiers (pinned host memory, chunk by chunk) were missed when every other write pass learnt to say
    that an error after some writes left the model partly merged (a review)."""
    from pymerge.pool import cuda as cuda_mod
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], backend="triton", residency="pinned", chunk_bytes=4096)
    pool._cuda.chunk = 1024
    monkeypatch.setattr(cuda_mod, "sum_into", failing_at_call(cuda_mod.sum_into, 3, RuntimeError, []))
    with pytest.raises(RuntimeError) as caught:
        pool.materialize([0.5, 0.3, 0.2], into=Tiny())
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and " tensors were written before it: the targets hold a partial merge" in notes[0], notes


@pytest.mark.parametrize("backend, method", [("auto", "linear"), ("torch", "linear"), ("auto", "ties")])
def test_an_interrupt_as_transposed_targets_are_copied_back_says_so(monkeypatch, backend, method):
    """A transposed (non-contiguous) target is merged into a temporary and copied back after the write pass: a
    Ctrl-C among those copies left the contiguous targets merged and the rest as they were, with no note (an audit;
    the note is the README's promise for any error after some writes)."""
    base_m, *models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], base=base_m.state_dict(), backend=backend)
    floats = {k: v for k, v in models[0].state_dict().items() if v.is_floating_point()}
    target = {k: (torch.zeros(v.shape[::-1]).t() if v.dim() == 2 else torch.zeros(v.shape)) for k, v in floats.items()}
    transposed = sum(1 for v in target.values() if not v.is_contiguous())
    real_copy, calls = torch.Tensor.copy_, []

    def copy_(self, src, *args, **kwargs):
        if not self.is_contiguous():
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    with pytest.raises(KeyboardInterrupt) as caught:
        pool.materialize([0.5, 0.3], into=target, method=method, **({"method_params": {"density": 0.5}}
                                                                     if method == "ties" else {}))
    monkeypatch.undo()
    written = sum(1 for v in target.values() if v.abs().sum() > 0)
    assert 0 < written < len(target) and transposed > 2
    assert getattr(caught.value, "__notes__", []) == [
        f"{written} of {len(target)} tensors were written before it: the targets hold a partial merge"]


@pytest.mark.parametrize("path", ["linear-torch", "multislerp", "compressed-linear"])
@pytest.mark.parametrize("error", [RuntimeError, MemoryError, KeyboardInterrupt])
def test_any_error_after_some_writes_says_so_and_the_next_merge_is_right(monkeypatch, path, error):
    """torch running out of memory (a RuntimeError), a MemoryError or an interrupt after earlier tensors were written
    left the live model half merged, unsaid: only a ValueError got the note (an audit). Now every error keeps its
    type and says how many were written; the pool's next merge into the same model is the float64 reference's."""
    from pymerge.methods import sphere
    from pymerge.pool import compressed as compressed_mod, pool as pool_mod
    base_m, *models = make_models(3)
    kw = {"compress": "int8"} if path == "compressed-linear" else {}
    pool = CheckpointPool([m.state_dict() for m in models], base=base_m.state_dict(),
                          backend="torch" if path == "linear-torch" else "auto", **kw)
    calls = []

    def fail_second(real):
        return failing_at_call(real, 2, error, calls)
    if path == "linear-torch":
        monkeypatch.setattr(pool_mod, "sum_into", fail_second(pool_mod.sum_into))
    elif path == "multislerp":  # merge_tensor per tensor, as every method without a fused path
        monkeypatch.setattr(sphere.MultiSlerp, "merge_tensor", fail_second(sphere.MultiSlerp.merge_tensor))
    else:
        monkeypatch.setattr(compressed_mod.CompressedStore, "accumulate",
                            fail_second(compressed_mod.CompressedStore.accumulate))
        pool.backend = "torch"  # the per-tensor path (the C++ backend's one native call fails before any write)
    target = Tiny()
    before = snapshot(target)
    method = "multislerp" if path == "multislerp" else "linear"
    with pytest.raises(error) as caught:
        pool.materialize([0.5, 0.3], into=target, method=method)
    assert len(calls) == 2
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("1 of ") and notes[0].endswith(
        " tensors were written before it: the targets hold a partial merge"), notes
    changed = [k for k, v in target.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == 1, changed  # what the note says: one written, the rest as they were
    monkeypatch.undo()
    pool.materialize([0.5, 0.3], into=target, method=method)
    again = Tiny()
    pool.materialize([0.5, 0.3], into=again, method=method)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in target.state_dict().items())
    if path == "linear-torch":
        assert_matches(target, reference(models, [0.5, 0.3]), torch.float32)


@pytest.mark.parametrize("error", [RuntimeError, MemoryError, KeyboardInterrupt, torch.OutOfMemoryError])
def test_without_notes_python_3_10_still_says_an_error_came_after_some_writes(monkeypatch, error):
    """Python 3.10 has no add_note and shows no notes: the partial merge went unsaid there (an audit). The note is
    kept in __notes__ and told in the message itself, on a line of its own."""
    from pymerge import errors
    from pymerge.pool import pool as pool_mod
    models = make_models(2)
    pool = CheckpointPool([m.state_dict() for m in models], backend="torch")
    monkeypatch.setattr(errors, "_HAS_NOTES", False)
    monkeypatch.setattr(pool_mod, "sum_into", failing_at_call(pool_mod.sum_into, 2, error, []))
    with pytest.raises(error) as caught:
        pool.materialize([0.5, 0.5], into=Tiny())
    floats = sum(v.is_floating_point() for v in Tiny().state_dict().values())
    note = f"1 of {floats} tensors were written before it: the targets hold a partial merge"
    assert caught.value.__notes__ == [note]
    assert str(caught.value) == f"no memory left (a test)\n{note}" and caught.value.args == (str(caught.value),)


def test_without_notes_an_error_that_words_itself_keeps_its_message_and_gets_the_note(monkeypatch):
    """An OSError's message is not its arguments: they stay as they were (its errno and file still read right), the
    note goes to __notes__ after any the error had; an interrupt without a message gets the note as its message."""
    from pymerge import errors
    monkeypatch.setattr(errors, "_HAS_NOTES", False)
    exc = FileNotFoundError(2, "No such file or directory", "/x")
    exc.__notes__ = ["first"]
    errors.add_note(exc, "second")
    assert exc.__notes__ == ["first", "second"] and exc.args == (2, "No such file or directory")
    assert exc.filename == "/x" and str(exc) == "[Errno 2] No such file or directory: '/x'"
    bare = KeyboardInterrupt()
    errors.add_note(bare, "a note")
    assert bare.args == ("a note",) and bare.__notes__ == ["a note"]
    two = RuntimeError("a", "b")  # (not one message: left as it is)
    errors.add_note(two, "a note")
    assert two.args == ("a", "b") and two.__notes__ == ["a note"]
    monkeypatch.setattr(errors, "_HAS_NOTES", True)  # 3.11 on: the language's own
    own = RuntimeError("m")
    errors.add_note(own, "n")
    assert own.args == ("m",) and own.__notes__ == ["n"]



# ---- tied weights: the pool's checkpoints and the target tie differently ------------------------------
class LM(torch.nn.Module):
    """Hugging Face's names for an input embedding and an output head, tied or not."""

    def __init__(self, tie: bool):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(11, 6)
        self.model.norm = torch.nn.LayerNorm(6)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight


def lm_states(n, tie: bool, seed=0):
    """n checkpoints as saved: a tied one stores no lm_head.weight (as transformers saves it)."""
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        sd = {k: torch.randn_like(v) for k, v in LM(False).state_dict().items()}
        if tie:
            del sd["lm_head.weight"]
        out.append(sd)
    return out


def merged(states, w, name):
    return sum(wi * s[name].double() for wi, s in zip(w, states))


def test_untied_checkpoints_into_a_tied_model_are_refused():
    """Checkpoints holding lm_head.weight and embed_tokens.weight apart, merged into a model that ties them:
    both merges targeted one tensor and the last silently replaced the other."""
    states, w = lm_states(2, tie=False), [0.3, 0.7]
    for target in (LM(True), {k: v.clone() for k, v in LM(True).state_dict().items()}):
        if isinstance(target, dict):
            target["lm_head.weight"] = target["model.embed_tokens.weight"]  # a state dict of a tied model
        before = {k: v.clone() for k, v in target.items()} if isinstance(target, dict) else snapshot(target)
        for method, kw in (("linear", {}), ("multislerp", {})):
            with pytest.raises(InputError, match=r"^pool tensors 'model.embed_tokens.weight' and 'lm_head.weight' "
                                                 r"hold different values, but the target ties them \(one tensor\).*"
                                                 r"names=.*nothing was written$"):
                CheckpointPool(states).materialize(w, into=target, method=method, **kw)
        after = target if isinstance(target, dict) else target.state_dict()
        assert all(torch.equal(v, before[k]) for k, v in after.items())
    # what the message offers: leave one out, or untie the model
    tied = LM(True)
    CheckpointPool(states).materialize(w, into=tied, names=lambda n: None if n == "lm_head.weight" else n)
    assert torch.allclose(tied.lm_head.weight.double(), merged(states, w, "model.embed_tokens.weight"), atol=1e-6)
    untied = LM(False)
    CheckpointPool(states).materialize(w, into=untied)
    assert torch.allclose(untied.lm_head.weight.double(), merged(states, w, "lm_head.weight"), atol=1e-6)


def test_a_tie_across_weight_groups_is_refused():
    """Two pool tensors with the same bits, which the target ties (layers sharing a weight), put in different
    weight groups by groups=: the check compared the data only, and the last group's merge replaced the other."""
    g = torch.Generator().manual_seed(0)
    srcs = []
    for _ in range(2):
        w = torch.randn(64, generator=g)
        srcs.append({"model.layers.0.mlp.weight": w, "model.layers.1.mlp.weight": w.clone()})
    shared = torch.zeros(64)
    target = {"model.layers.0.mlp.weight": shared, "model.layers.1.mlp.weight": shared}
    with pytest.raises(InputError, match=r"ties pool tensors 'model.layers.0.mlp.weight' and "
                                         r"'model.layers.1.mlp.weight' .* different weight groups.*nothing was written$"):
        CheckpointPool(srcs).materialize([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], into=target, groups="layer")
    assert not shared.any()
    CheckpointPool(srcs).materialize([0.25, 0.75], into=target)  # one group: one merge, written once
    assert torch.allclose(shared.double(), merged(srcs, [0.25, 0.75], "model.layers.0.mlp.weight"), atol=1e-6)


def test_tied_checkpoints_saved_with_both_names_into_a_tied_model():
    """The same bits under both names in every checkpoint and the base (a tied model's state_dict()): one
    merge, written once, on every path (the grouped call, a method, a compressed pool, several candidates)."""
    states = lm_states(3, tie=True)
    for s in states:
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()
    base, states = states[0], states[1:]
    for pool, method, kw in ((CheckpointPool(states), "linear", {}), (CheckpointPool(states, base=base), "ties",
                             {"density": 0.5}), (CheckpointPool(states, base=base, compress="int8"), "multislerp", {})):
        untied = LM(False)  # what each name gets on its own
        pool.materialize([0.4, 0.6], into=untied, method=method, **kw)
        assert torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
        targets = [LM(True), LM(True)]
        pool.materialize_many([[0.4, 0.6]] * 2, into=targets, method=method, **kw)
        assert all(torch.equal(t.lm_head.weight, untied.lm_head.weight) for t in targets), method
    # a tied source module's state dict holds both names (one tensor): the same
    modules = [LM(True) for _ in range(2)]
    target = LM(True)
    CheckpointPool(modules).materialize([0.5, 0.5], into=target)
    want = merged([m.state_dict() for m in modules], [0.5, 0.5], "lm_head.weight")
    assert torch.allclose(target.model.embed_tokens.weight.double(), want, atol=1e-6)


def saved(states, d):
    """Each state dict as a .safetensors file under d (what transformers saves for a tied model: no head)."""
    paths = []
    for i, st in enumerate(states):
        paths.append(os.path.join(d, f"s{i}.safetensors"))
        save_file({k: v.contiguous() for k, v in st.items()}, paths[-1])
    return paths


@pytest.mark.parametrize("method,kw", [("linear", {}), ("ties", {"density": 0.5}), ("multislerp", {})])
def test_tied_checkpoints_fill_an_untied_head(method, kw, tmp_path):
    """Checkpoint files that store no lm_head.weight (tied) into a model whose head is its own: strict=True
    checked only pool -> model, and the head kept its random init (or an earlier candidate's head). It now
    gets the merged embedding, as the checkpoints' own models compute with it; strict=False leaves it. A pool
    over state dicts without a head is a pool over part of a model: the head is left as it is."""
    states = lm_states(4, tie=True)
    model = LM(False)
    head = model.lm_head.weight.detach().clone()
    CheckpointPool(states[1:], base=states[0]).materialize([0.2, 0.3, 0.5], into=model, method=method, **kw)
    assert torch.equal(model.lm_head.weight, head)
    base, *states = saved(states, str(tmp_path))
    pool = CheckpointPool(states, base=base)
    for w in ([0.2, 0.3, 0.5], [0.6, 0.1, 0.3]):  # the second from the cached plans
        model = LM(False)
        pool.materialize(w, into=model, method=method, **kw)
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    models = [LM(False), LM(False)]
    pool.materialize_many([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], into=models, method=method, **kw)
    assert all(torch.equal(m.lm_head.weight, m.model.embed_tokens.weight) for m in models)
    sd = {k: torch.zeros_like(v) for k, v in LM(False).state_dict().items()}  # a state dict, its head replaced
    pool.materialize([0.2, 0.3, 0.5], into=sd, method=method, **kw)
    sd["lm_head.weight"] = torch.zeros_like(sd["lm_head.weight"])
    pool.materialize([0.2, 0.3, 0.5], into=sd, method=method, **kw)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    model = LM(False)
    head = model.lm_head.weight.detach().clone()
    pool.materialize([0.2, 0.3, 0.5], into=model, method=method, strict=False, **kw)
    assert torch.equal(model.lm_head.weight, head)
    # a tied model needs nothing more: its head is the embedding just written
    tied = LM(True)
    pool.materialize([0.2, 0.3, 0.5], into=tied, method=method, **kw)
    assert torch.equal(tied.model.embed_tokens.weight, models[0].model.embed_tokens.weight)


@pytest.mark.parametrize("wrap", ["prune", "weight_norm", "old weight_norm", "LoRA layer"])
def test_tied_checkpoints_into_a_head_held_computed_are_refused(wrap, tmp_path):
    """A head pruned, parametrized or wrapped by a LoRA layer is held under another name (lm_head.weight_orig,
    lm_head.parametrizations.weight.original0, lm_head.base_layer.weight): the tied checkpoints' merged embedding
    never reached it and it kept its random init, silently (an audit). Refused now, as such a body tensor is,
    in one line naming how the target holds it; nothing written."""
    states = lm_states(3, tie=True)
    pool = CheckpointPool(saved(states, str(tmp_path)))
    model = LM(False)
    if wrap == "prune":
        import torch.nn.utils.prune as prune
        prune.l1_unstructured(model.lm_head, "weight", amount=0)
        held = "lm_head.weight_orig"
    elif wrap == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model.lm_head)
        held = "lm_head.parametrizations.weight.original"
    elif wrap == "old weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model.lm_head)
        held = "lm_head.weight_g"
    else:
        class LoraLayer(torch.nn.Module):  # peft's layout: the wrapped Linear as base_layer
            def __init__(self, base):
                super().__init__()
                self.base_layer = base
                self.lora_A = torch.nn.Linear(6, 2, bias=False)
        model.lm_head = LoraLayer(model.lm_head)
        held = "lm_head.base_layer.weight"
    before = snapshot(model)
    with pytest.raises(InputError, match=rf"^tensor 'lm_head.weight' \(an untied output head, which gets the tied "
                                         rf"checkpoints' 'model.embed_tokens.weight'\): the target holds it as "
                                         rf"'{re.escape(held)}'.*nothing was written$") as refused:
        pool.materialize([0.2, 0.3, 0.5], into=model)
    assert "names=" not in str(refused.value)  # no pool tensor of the head's name to map there (a review)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pool.materialize([0.2, 0.3, 0.5], into=model, strict=False)  # strict=False leaves an untied head as it is
    assert torch.allclose(model.model.embed_tokens.weight.double(), merged(states, [0.2, 0.3, 0.5],
                                                                         "model.embed_tokens.weight"), atol=1e-6)


@pytest.mark.parametrize("config", [{"tie_word_embeddings": False}, {"text_config": {"tie_word_embeddings": False}},
                                    {"tie_word_embeddings": True}, None])
def test_backbone_folders_saved_without_their_head_leave_the_targets_head(config, tmp_path):
    """Folders of a backbone saved without its head (AutoModel / LlamaModel: config.json says
    tie_word_embeddings: false) merged into a model with its own trained head: the tied rule overwrote that
    head with the merged embedding (an audit). A config that says the model is untied now keeps the rule off;
    one that says tied, or none, keeps it on."""
    states = lm_states(3, tie=True)
    folders = []
    for i, st in enumerate(states):
        folders.append(tmp_path / f"m{i}")
        folders[-1].mkdir()
        save_file({k: v.contiguous() for k, v in st.items()}, str(folders[-1] / "model.safetensors"))
        if config is not None:
            (folders[-1] / "config.json").write_text(json.dumps(config))
    untied = config is not None and False in (config.get("tie_word_embeddings"),
                                              config.get("text_config", {}).get("tie_word_embeddings"))
    for sources in (folders, [f / "model.safetensors" for f in folders]):  # the folders, or their files
        model = LM(False)
        head = model.lm_head.weight.detach().clone()
        CheckpointPool(sources).materialize([0.2, 0.3, 0.5], into=model)
        assert torch.equal(model.lm_head.weight, head if untied else model.model.embed_tokens.weight)


def test_an_untied_head_every_candidate_must_have_and_per_layer_weights(tmp_path):
    states = lm_states(2, tie=True)
    pool = CheckpointPool(saved(states, str(tmp_path)))
    no_head = {k: torch.zeros_like(v) for k, v in LM(False).state_dict().items() if k != "lm_head.weight"}
    model = LM(False)
    before = snapshot(model)
    with pytest.raises(InputError, match=r"every candidate must have the same tensors: 'lm_head.weight' \(an untied "
                                         r"head, which gets the tied checkpoints' 'model.embed_tokens.weight'\) is "
                                         r"in model\(s\) \[0\] but not in the others; nothing was written"):
        pool.materialize_many([[0.5, 0.5]] * 2, into=[model, no_head])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    group = lambda n: 0 if "embed" in n else 1  # noqa: E731  (the head takes its embedding's weights)
    pool.materialize([[0.9, 0.1], [0.1, 0.9]], into=model, groups=group)
    assert torch.allclose(model.lm_head.weight.double(), merged(states, [0.9, 0.1], "model.embed_tokens.weight"),
                          atol=1e-6)


# ---- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("residency", ["device", "pinned", "mmap"])
def test_gpu_tiers_match_and_stay_in_place(residency):
    models = make_models(5, torch.bfloat16)
    pool = CheckpointPool([m.state_dict() for m in models], device="cuda", residency=residency, chunk_bytes=8192)
    targets = [Tiny(torch.bfloat16).cuda() for _ in range(6)]
    before = [ptrs(t) for t in targets]
    rows = np.random.default_rng(3).normal(size=(6, 5))
    pool.materialize_many(rows, into=targets)
    torch.cuda.synchronize()
    for k, t in enumerate(targets):
        assert ptrs(t) == before[k]
        assert_matches(t.cpu(), reference(models, rows[k]), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_materialize_captured_in_a_cuda_graph():
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], device="cuda")
    target = Tiny().cuda()
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    pool.materialize(w, into=target)  # warm-up (Triton compiles outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pool.materialize(w, into=target)
    for row in ([1.0, 0.0, 0.0], [0.1, 0.6, 0.3]):
        w.copy_(torch.tensor(row))
        graph.replay()
        torch.cuda.synchronize()
        # a copy: Module.cpu() moves target itself, and the next replay writes the captured CUDA tensors
        assert_matches(copy.deepcopy(target).cpu(), reference(models, row), torch.float32)


@pytest.mark.gpu
def test_gpu_capture_refuses_host_weights():
    """A captured graph would read a pinned ring slot that later eager calls overwrite."""
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], device="cuda")
    target = Tiny().cuda()
    pool.materialize([0.2, 0.3, 0.5], into=target)
    torch.cuda.synchronize()
    with pytest.raises(InputError, match="CUDA tensor"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pool.materialize([0.2, 0.3, 0.5], into=target)


@pytest.mark.gpu
def test_gpu_refuses_weights_on_another_gpu_and_capture_of_a_streamed_tier():
    """Weights on cuda:1 went to a kernel on cuda:0 unchecked; a pinned pool under capture failed inside CUDA."""
    models = make_models(3)
    target = Tiny().cuda()
    if torch.cuda.device_count() > 1:
        pool = CheckpointPool([m.state_dict() for m in models], device="cuda:0")
        with pytest.raises(InputError, match="weights on cuda:1, the pool is on cuda:0"):
            pool.materialize(torch.tensor([0.2, 0.3, 0.5], device="cuda:1"), into=target)
    pool = CheckpointPool([m.state_dict() for m in models], device="cuda", residency="pinned")
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    pool.materialize(w, into=target)
    torch.cuda.synchronize()
    with pytest.raises(InputError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pool.materialize(w, into=target)


@pytest.mark.gpu
def test_gpu_graph_survives_address_table_eviction(monkeypatch):
    """Tables a graph captured stay alive however many other input sets the eager calls bring."""
    from pymerge.kernels import weighted_sum as ws
    monkeypatch.setattr(ws, "_TABLES_MAX", 2)
    models = make_models(3)
    pool = CheckpointPool([m.state_dict() for m in models], device="cuda", backend="triton")
    target = Tiny().cuda()
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    pool.materialize(w, into=target)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pool.materialize(w, into=target)
    for seed in range(9):  # other input sets and targets push every uncaptured table and plan out
        xs = [torch.randn(1000 + seed, device="cuda") for _ in range(2)]
        pymerge.weighted_sum(xs, [0.5, 0.5], backend="triton")
        pool.materialize(w, into=Tiny().cuda())
        torch.cuda.empty_cache()
    w.copy_(torch.tensor([0.1, 0.6, 0.3]))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(target.cpu(), reference(models, [0.1, 0.6, 0.3]), torch.float32)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_host_tier_holds_each_checkpoint_in_one_buffer_in_name_order(dtype):
    """The host tier's copies are 64-byte-aligned views of one buffer per source, in name order (what the
    grouped call reads as forward streams), bit for bit the source's values (NaN, inf, -0 included)."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (0,), "b": (1,), "c": (), "d": (13, 3), "e": (1021,), "f": (2, 0, 5), "g": (97,)}
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32, torch.bfloat16,
              torch.float16]
    if dtype is not None:
        dtypes = [torch.float32 if d == torch.float8_e4m3fn else d for d in dtypes]  # fp8 is read-only: no conversion
    sources = []
    for s in range(3):
        sd = {}
        for (name, shape), dt in zip(shapes.items(), dtypes):
            x = torch.randn(shape, generator=g) * 100
            if x.numel() > 2:
                x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
            sd[name] = x.to(dt)
        sd["steps"] = torch.tensor(s)  # not merged: no room in the buffer
        sources.append(sd)
    pool = CheckpointPool(sources[:2], base=sources[2], residency="host", dtype=dtype, device="cpu")
    assert pool.names == list(shapes)
    for held, src in [({n: pool.tensor(i, n) for n in pool.names}, sources[i]) for i in range(2)] + \
                     [(pool._base, sources[2])]:
        (start,) = {t.untyped_storage().data_ptr() for t in held.values()}  # one buffer per source
        filled = [n for n in pool.names if held[n].numel()]  # an empty tensor has no address (data_ptr 0)
        offsets = [held[n].data_ptr() - start for n in filled]
        sizes = [held[n].nbytes for n in filled]
        assert offsets == sorted(offsets) and all(o % 64 == 0 for o in offsets)
        assert all(a + s <= b for a, b, s in zip(offsets, offsets[1:], sizes))  # no two tensors share bytes
        for n in pool.names:
            want = src[n].to(dtype or src[n].dtype)
            assert held[n].dtype == want.dtype and held[n].shape == want.shape and held[n].is_contiguous()
            assert torch.equal(held[n].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), n
            assert held[n].numel() == 0 or held[n].data_ptr() != src[n].data_ptr()


@pytest.mark.parametrize("how", ["free", "grow", "shrink"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_pool_buffer_cannot_be_freed_or_moved_through_pool_tensor(how, method):
    """pool.tensor() is a view of the pool's own memory: resize_(0) on its storage (as FSDP frees) or a larger
    resize_ (a move) left the cached native table on freed memory, and the next materialize crashed (SIGSEGV;
    a bug hunt). The host tier's buffers cannot be resized; the pool's other own copies (here the mmap tier's
    contiguous copy of a transposed source) are checked at every call: a one-line error, nothing written."""
    g = torch.Generator().manual_seed(0)
    srcs = [{"a": torch.randn(4099, generator=g).to(dt), "b": torch.randn(7, 5, generator=g).t()}
            for dt in (torch.float32, torch.bfloat16, torch.float16)]
    kw = {"density": 0.5} if method == "ties" else {}

    def resize(storage):
        if how == "shrink":  # freed, then smaller: the allocator may hand back the same address (a review)
            size = storage.nbytes()
            storage.resize_(0)
            storage.resize_(size // 4)
        else:
            storage.resize_(0 if how == "free" else storage.nbytes() * 4)

    host = CheckpointPool(srcs[:2], base=srcs[2], residency="host")
    target = {"a": torch.zeros(4099), "b": torch.zeros(5, 7)}
    want = {k: v.clone() for k, v in host.materialize([0.4, 0.6], into=target, method=method, **kw).items()}
    with pytest.raises(RuntimeError, match="not resizable"):
        resize(host.tensor(1, "a").untyped_storage())
    assert all(torch.equal(v, want[k]) for k, v in host.materialize([0.4, 0.6], into=target, method=method,
                                                                   **kw).items())
    mmap = CheckpointPool(srcs[:2], base=srcs[2], residency="mmap")
    mmap.materialize([0.4, 0.6], into=target, method=method, **kw)  # a cached plan
    handle = mmap.tensor(1, "b")
    assert handle.data_ptr() != srcs[1]["b"].data_ptr() and handle.untyped_storage().resizable()  # the pool's copy
    resize(handle.untyped_storage())
    if how == "shrink":
        mmap._owned = {k: (label, st, st.data_ptr(), nbytes, resizable)  # as if it came back there: the size tells
                       for k, (label, st, _, nbytes, resizable) in mmap._owned.items()}
    before = {k: v.clone() for k, v in target.items()}
    for _ in range(2):
        with pytest.raises(InputError, match=r"the pool's copy of checkpoint source 1 was freed or moved"):
            mmap.materialize([0.4, 0.6], into=target, method=method, **kw)
    assert all(torch.equal(before[k], target[k]) for k in target)


def test_a_copied_pool_merges_as_the_original(tmp_path):
    """A deepcopy or a pickle round trip holds the tensors at other addresses, in storages that can be
    resized: the freed-buffer check took them for freed, and its overlap check still watched the original's
    memory (a target that is the copy's own tensor was merged into; reviews). Noted again when the copy is
    made; a pool reading memory maps is not copied."""
    import copy
    import pickle
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    srcs = [{"a": torch.randn(33, generator=g)} for _ in range(3)]
    pool = CheckpointPool(srcs, residency="host")
    want = pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(33)})["a"]
    for other in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert torch.equal(other.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(33)})["a"], want)
        own = other.tensor(0, "a")
        with pytest.raises(InputError, match="overlaps|shares memory|pool"):
            other.materialize([0.2, 0.3, 0.5], into={"a": own})
        assert torch.equal(own, srcs[0]["a"])
        own.untyped_storage().resize_(0)
        with pytest.raises(InputError, match="the pool's copy of checkpoint source 0 was freed or moved"):
            other.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(33)})
    save_file(srcs[0], tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="a pool on the mmap tier cannot be copied or pickled"):
        copy.deepcopy(CheckpointPool([str(tmp_path / "m.safetensors")] * 2, residency="mmap"))


@pytest.mark.parametrize("compress", [None, "int8", "int4"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_pool_sent_to_another_process_still_merges_here(compress, method):
    """torch.multiprocessing's pickler (a spawned Process's arguments, a Queue, mp.spawn) moves each tensor it
    sends into shared memory, in place: the sender's pool kept native plans and overlap spans on the freed memory
    and merged garbage (off by 1e34), crashed, or refused a fresh target as overlapping it (an audit). Here the
    pool's memory, wherever it is now, is changed after the pickling: a merge reading the old memory misses it."""
    import copy
    from multiprocessing.reduction import ForkingPickler
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(257, 33, generator=g), "b": torch.randn(1031, generator=g)}
    srcs = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    kw = {} if method == "linear" else {"density": 0.5}

    def merged(pool):
        return pool.materialize([0.2, 0.3, 0.5], into={k: torch.empty_like(v) for k, v in base.items()},
                                method=method, **kw)
    pool = CheckpointPool(srcs, base=base, **({"residency": "host"} if compress is None else {"compress": compress}))
    want = merged(pool)  # (planned and cached)
    held = [t for ts in pool._inputs.values() for t in ts] if compress is None else list(pool._base.values())
    at = [t.data_ptr() for t in held]
    ForkingPickler.dumps(pool)
    assert [t.data_ptr() for t in held] != at  # moved, as the pickler does
    if compress is None:
        pool.tensor(0, "a").add_(1.0)  # (a view of the pool's memory: "writing it would change the pool")
    else:
        pool._base["b"].add_(1.0)  # (held exact; tensor() decodes a copy)
    changed = merged(copy.deepcopy(pool))  # a copy plans anew, from memory of its own
    assert not all(torch.equal(changed[k], want[k]) for k in want)
    for _ in range(2):
        got = merged(pool)
        assert all(torch.equal(got[k], changed[k]) for k in want)


_SEND_WHILE_MERGING = """
import sys, threading, torch
from multiprocessing.reduction import ForkingPickler
from pymerge.pool import CheckpointPool
g = torch.Generator().manual_seed(0)
base = {"a": torch.randn(1 << 20, generator=g), "b": torch.randn(1021, 37, generator=g)}
srcs = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
method, kw = sys.argv[1], ({} if sys.argv[1] == "linear" else {"density": 0.5})
for _ in range(6):
    pool = CheckpointPool(srcs, base=base, residency="host")
    into = {k: torch.empty_like(v) for k, v in base.items()}
    want = {k: v.clone() for k, v in pool.materialize([0.2, 0.5, 0.3], into=into, method=method, **kw).items()}
    sender = threading.Thread(target=ForkingPickler.dumps, args=(pool,))
    sender.start()
    while sender.is_alive():
        got = pool.materialize([0.2, 0.5, 0.3], into=into, method=method, **kw)
        assert all(torch.equal(got[k], want[k]) for k in want), "wrong merge"
    sender.join()
print("ok")
"""


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_pool_pickled_for_another_process_while_it_merges_is_not_read_freed(tmp_path, method):
    """A pool sent to another process from a background thread (a Queue's feeder, ProcessPoolExecutor.submit):
    torch's pickler moved its tensors into shared memory while the caller's next merge read them natively, a
    use-after-free (a segfault at the first try; an audit). The pickling waits for the merge, and the next merge
    for the pickling. In a process of its own: the old code crashed it."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _SEND_WHILE_MERGING, method], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_child_forked_while_another_thread_merges_can_merge():
    """The lock a merge holds against a pickling (above) was inherited held by a child forked meanwhile: the
    child's first merge waited for good. A weight whose __float__ waits holds a thread inside a merge here."""
    import signal
    import threading
    g = torch.Generator().manual_seed(0)
    srcs = [{"a": torch.randn(4099, generator=g)} for _ in range(3)]
    pool = CheckpointPool(srcs, residency="host")
    want = pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})["a"]
    inside, release = threading.Event(), threading.Event()

    class Slow(float):
        def __float__(self):
            inside.set()
            release.wait(60)
            return 0.2
    merging = threading.Thread(target=pool.materialize, args=([Slow(0.2), 0.3, 0.5], {"a": torch.empty(4099)}))
    merging.start()
    try:
        assert inside.wait(60)
        pid = os.fork()
        if pid == 0:  # the child: a merge, or SIGALRM after 20 s
            try:
                signal.alarm(20)
                got = pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})["a"]
                os._exit(0 if torch.equal(got, want) else 3)
            finally:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        merging.join(60)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})["a"], want)


class _PoolWithAHook(CheckpointPool):
    """A user's subclass: a bound method of its own in its state (a cycle back to the pool)."""

    def score(self):
        return 1.0


class _PoolByPaths(CheckpointPool):
    """A user's subclass that pickles itself by its sources, so that a pool on the mmap tier can be sent."""

    def __init__(self, paths, residency):
        super().__init__(paths, residency=residency)
        self.paths = list(paths)

    def __reduce__(self):
        return _PoolByPaths, (self.paths, self.residency)


def test_a_pool_sent_to_another_process_keeps_its_cycles_and_a_subclass_its_own_pickling(tmp_path):
    """Pools sent to processes are pickled by a reducer of pymerge's (above): its first form pickled the state again
    in a pickling of its own, which met a pool whose state refers back to it again (a bound method of its own, a
    registry holding it) and refused it as a call from inside a call; and it took the place of a subclass's own
    __reduce__ (a review). Both pickle as pickle.dumps does."""
    from multiprocessing.reduction import ForkingPickler
    g = torch.Generator().manual_seed(0)
    srcs = [{"a": torch.randn(65, generator=g)} for _ in range(3)]
    pool = _PoolWithAHook(srcs, residency="host")
    pool.evaluate, pool.registry = pool.score, {}
    pool.registry["me"] = pool
    want = pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(65)})["a"].clone()
    back = ForkingPickler.loads(ForkingPickler.dumps(pool))
    assert type(back) is _PoolWithAHook and back.registry["me"] is back and back.evaluate() == 1.0
    assert torch.equal(back.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(65)})["a"], want)
    assert torch.equal(pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(65)})["a"], want)
    paths = []
    for i, sd in enumerate(srcs):
        save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    mapped = _PoolByPaths(paths, residency="mmap")
    back = ForkingPickler.loads(ForkingPickler.dumps(mapped))
    assert type(back) is _PoolByPaths and back.residency == "mmap"
    assert torch.equal(back.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(65)})["a"], want)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_sending_a_pool_holding_a_connection_leaks_no_descriptor():
    """The pass that moves a pool's tensors into shared memory before it is sent ran the other objects' reducers
    too: a multiprocessing connection in the state shared a descriptor each time that no process ever took (one
    leaked per send; a review)."""
    from multiprocessing import Pipe
    from multiprocessing.reduction import ForkingPickler
    pool = _PoolWithAHook([{"a": torch.ones(65) * i} for i in range(3)], residency="host")
    ours, pool.conn = Pipe()

    def round_trip():
        ForkingPickler.loads(ForkingPickler.dumps(pool)).conn.close()
    round_trip()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        round_trip()
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    ours.close()
    pool.conn.close()


def test_a_tensor_handed_out_and_sent_to_another_process_on_its_own_is_followed():
    """pool.tensor() on the host tier is a view of a checkpoint's buffer; sent to another process on its own (a
    Queue, a spawned process's arguments), torch's pickler moved that whole buffer into shared memory, unseen by
    the pool: its next merges read the freed memory (20 of 20 wrong; a review). A host buffer cannot be resized,
    so only the pickler moves it: the next call notes the tensors again."""
    from multiprocessing.reduction import ForkingPickler
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(1 << 16, generator=g), "b": torch.randn(1021, 37, generator=g)}
    srcs = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for method, kw in (("linear", {}), ("ties", {"density": 0.5})):
        pool = CheckpointPool(srcs, base=base, residency="host")
        into = {k: torch.empty_like(v) for k, v in base.items()}
        want = {k: v.clone() for k, v in pool.materialize([0.2, 0.5, 0.3], into=into, method=method, **kw).items()}
        handed = pool.tensor(0, "a")
        ForkingPickler.dumps(handed)
        assert handed.untyped_storage().is_shared()  # (moved, as the pickler does)
        handed.add_(1.0)  # the pool's memory, wherever it is now: a merge reading the old memory misses it
        for _ in range(2):
            got = pool.materialize([0.2, 0.5, 0.3], into=into, method=method, **kw)
            assert not torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


@pytest.mark.parametrize("how", ["pickle", "forking pickler", "deepcopy"])
def test_a_tensor_handed_out_stays_watched_after_the_pool_is_pickled(how):
    """A pickling made the pool note its tensors again, and that forgot the ones tensor() had handed out: one freed
    since (FSDP's resize_(0)) was no longer refused, and the next merge crashed (a review)."""
    import copy
    import pickle
    from multiprocessing.reduction import ForkingPickler
    g = torch.Generator().manual_seed(0)
    srcs = [{"a": torch.randn(4099, generator=g)} for _ in range(3)]
    pool = copy.deepcopy(CheckpointPool(srcs, residency="host"))  # a copy's storages can be resized
    want = pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})["a"].clone()
    own = pool.tensor(0, "a")
    {"pickle": pickle.dumps, "forking pickler": ForkingPickler.dumps, "deepcopy": copy.deepcopy}[how](pool)
    assert torch.equal(pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})["a"], want)
    own.untyped_storage().resize_(0)
    with pytest.raises(InputError, match=r"the pool's copy of checkpoint source 0 was freed or moved"):
        pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})


def test_a_tensor_freed_and_given_new_memory_before_a_pickling_is_still_refused():
    """A storage freed and given new memory (uninitialised) and then moved into shared memory by the pickler looked
    like one the pickler had moved: the pool merged the garbage, off by 1.1 (a review). A pool is checked before it
    is pickled, so a move found after is the pickler's."""
    import copy
    from multiprocessing.reduction import ForkingPickler
    g = torch.Generator().manual_seed(0)
    pool = copy.deepcopy(CheckpointPool([{"a": torch.randn(4099, generator=g)} for _ in range(3)], residency="host"))
    pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})
    storage = pool.tensor(0, "a").untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    blocker = torch.empty(4099)  # (the old memory taken)
    storage.resize_(nbytes)
    with pytest.raises(InputError, match=r"the pool's copy of checkpoint source 0 was freed or moved"):
        ForkingPickler.dumps(pool)
    with pytest.raises(InputError, match=r"the pool's copy of checkpoint source 0 was freed or moved"):
        pool.materialize([0.2, 0.3, 0.5], into={"a": torch.empty(4099)})
    del blocker


def test_a_source_giving_another_shape_than_it_lists_is_named(monkeypatch):
    from pymerge.pool.sources import DictSource
    models = make_models(2)
    monkeypatch.setattr(DictSource, "tensor", lambda self, name: self._state[name].reshape(-1)[:1])
    with pytest.raises(CheckpointError, match=r"^source 0: tensor 'scale' has shape \[1\], listed as \[7\]$"):
        CheckpointPool([m.state_dict() for m in models])


@pytest.mark.parametrize("residency", [None, "mmap"])
@pytest.mark.parametrize("dtype, held", [(torch.float64, torch.float32), (torch.float8_e4m3fnuz, torch.bfloat16)])
def test_floats_the_kernels_do_not_read_are_held_converted(residency, dtype, held):
    """Was a bare KeyError at materialize: float64 (and float8 variants the kernels lack) are held as float32
    (or bfloat16, exactly), on every tier; merged against float64."""
    g = torch.Generator().manual_seed(3)
    sources = [{"w": torch.randn(5, 7, generator=g, dtype=torch.float64).to(dtype), "b": torch.randn(3, generator=g).to(dtype)}
               for _ in range(3)]
    pool = CheckpointPool(sources, residency=residency)
    assert pool.tensor(0, "w").dtype == held
    out = {"w": torch.empty(5, 7), "b": torch.empty(3)}
    pool.materialize([0.25, 0.5, 0.25], into=out)
    for name in out:
        ref = sum(c * s[name].to(held).double() for c, s in zip((0.25, 0.5, 0.25), sources))
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-6, atol=1e-6)


def test_tensor_checks_its_index_and_name():
    """Were an IndexError, a KeyError, or (index -1) the last checkpoint without a word."""
    pool = CheckpointPool([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    assert torch.equal(pool.tensor(1, "w"), torch.zeros(2))
    for bad in (2, -1, 1.0, True, "0"):
        with pytest.raises(InputError, match=r"checkpoint index must be an integer in 0\.\.1"):
            pool.tensor(bad, "w")
    with pytest.raises(InputError, match="no tensor 'v' in this pool"):
        pool.tensor(0, "v")


@pytest.mark.parametrize("bad", [-1, 2.5, None, "4", True, 1 << 40])
def test_num_threads_is_checked(bad):
    """Were pybind11's "incompatible function arguments" (listing raw addresses) at the first merge."""
    with pytest.raises(InputError, match=r"num_threads must be an integer from 0 \(all cores\) to 65536"):
        CheckpointPool([{"w": torch.ones(2)}], num_threads=bad)
    with pytest.raises(ValueError, match="num_threads must be an integer"):
        pymerge.weighted_sum([torch.ones(3)], [1.0], num_threads=bad)
    assert CheckpointPool([{"w": torch.ones(2)}], num_threads=np.int64(2)).num_threads == 2


@pytest.mark.parametrize("bad", ["abc", 1.5, -5, 0, None, True, 1 << 41])
def test_chunk_bytes_is_checked(bad):
    """Read only on a GPU's streamed tiers, so a string, a float or a negative size was accepted on every other
    pool (and a string raised a bare TypeError where it was read; a fuzzing audit)."""
    with pytest.raises(InputError, match=r"chunk_bytes must be a whole number of bytes from 1 to 2\*\*40"):
        CheckpointPool([{"w": torch.ones(2)}], chunk_bytes=bad)
    assert CheckpointPool([{"w": torch.ones(2)}], chunk_bytes=np.int64(4096)).num_checkpoints == 1


def test_materialize_many_with_no_candidates_does_nothing():
    """Was "grouped plan: need at least one input and one output", an IndexError with a method, and "need at
    least one array to stack" on a compressed pool."""
    pool = CheckpointPool([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    assert pool.materialize_many([], []) == []
    assert pool.materialize_many([], [], method="ties", density=0.5) == []
    base = {"w": torch.full((2,), 0.5)}
    packed = CheckpointPool([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], base=base, compress="int8")
    assert packed.materialize_many([], []) == []


def test_method_params_reach_a_methods_own_normalize():
    """materialize's normalize= normalizes the weights, so task_arithmetic's (or ties') own `normalize`
    was out of reach from a pool: method_params= passes it, checked like any keyword parameter."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(37, generator=g)}
    sources = [{"w": torch.randn(37, generator=g)} for _ in range(3)]
    pool = CheckpointPool(sources, base=base)
    w = [0.5, 1.0, 1.5]
    deltas = sum(c * (s["w"].double() - base["w"].double()) for c, s in zip(w, sources))
    for own_normalize, divide in ((True, sum(w)), (False, 1.0)):
        out = {"w": torch.empty(37)}
        pool.materialize(w, into=out, method="task_arithmetic", method_params={"normalize": own_normalize,
                                                                                "lambda": 0.5})
        torch.testing.assert_close(out["w"].double(), base["w"].double() + 0.5 * deltas / divide,
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="method parameter 'lambda' is given twice"):
        pool.materialize(w, into={"w": torch.empty(37)}, method="task_arithmetic",
                         method_params={"lambda": 0.5}, **{"lambda": 0.7})
    for bad in ([("normalize", True)], {1: True}, "normalize"):
        with pytest.raises(InputError, match="method_params must map parameter names to values"):
            pool.materialize(w, into={"w": torch.empty(37)}, method="task_arithmetic", method_params=bad)
    with pytest.raises(MergeConfigError, match="has no parameter 'epsilon'"):
        pool.materialize(w, into={"w": torch.empty(37)}, method="task_arithmetic", method_params={"epsilon": 0.5})


@pytest.mark.parametrize("weights", ["12", ["0.25", "0.75"], {0: 0.5, 1: 0.5}, [True, False], torch.tensor([True, False]),
                                     [[0.5, "0.5"]], [True, 0.5], [[0.5, np.bool_(True)]]])
def test_weights_that_are_not_numbers_are_refused_not_parsed(weights):
    """Strings were parsed ("0.25"), a dict taken as an object array, booleans as 1 and 0 (found by a review)."""
    pool = CheckpointPool([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    target = {"w": torch.full((2,), 7.0)}
    with pytest.raises(InputError, match="weights must be (real )?numbers"):
        pool.materialize(weights, into=target)
    assert bool((target["w"] == 7.0).all())
    pool.materialize(np.array([0.25, 0.75], dtype=np.float32), into=target)  # numeric arrays of any width still go
    torch.testing.assert_close(target["w"], torch.full((2,), 0.25))


def test_names_at_construction_is_for_sharded_pools_only():
    with pytest.raises(InputError, match="names= at construction finds each tensor's counterpart in shard_like="):
        CheckpointPool([{"w": torch.ones(2)}], names=lambda n: n)


def test_weights_past_float_range_on_meta_or_as_decimals():
    """10**400 raised OverflowError and meta-device weights NotImplementedError (not InputErrors); Decimals,
    numbers as the code said, were refused (a bug hunt)."""
    from decimal import Decimal
    pool = CheckpointPool([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    target = {"w": torch.full((2,), 7.0)}
    with pytest.raises(InputError, match="weights hold .*; weights beyond 1e\\+06"):
        pool.materialize([10**400, 0], into=target)
    with pytest.raises(InputError, match="weights are a tensor on the meta device"):
        pool.materialize(torch.tensor([0.5, 0.5], device="meta"), into=target)
    assert bool((target["w"] == 7.0).all())
    pool.materialize([Decimal("0.25"), Decimal("0.75")], into=target)
    torch.testing.assert_close(target["w"], torch.full((2,), 0.25))


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 1.5, "1", None, True, torch.tensor(3.0), torch.tensor([1, 2])])
def test_seeds_outside_64_bits_or_not_integers_are_refused(seed):
    """2**64 wrapped to seed 0's masks, 1.5 to 1's; None and strings were a TypeError / ValueError (bug hunt)."""
    pool = CheckpointPool([{"w": torch.randn(64)}, {"w": torch.randn(64)}], base={"w": torch.zeros(64)})
    target = {"w": torch.full((64,), 7.0)}
    with pytest.raises(InputError, match="seed must be an integer from -9223372036854775808 to 18446744073709551615"):
        pool.materialize([0.5, 0.5], into=target, method="dare_ties", density=0.5, seed=seed)
    assert bool((target["w"] == 7.0).all())
    masks = {}
    for s in (-1, 2**64 - 1, 0, np.int64(0), -2**63, 2**63):  # a negative seed wraps like a uint64, as torch's
        masks[int(s)] = pool.materialize([0.5, 0.5], into={"w": torch.empty(64)}, method="dare_ties", density=0.5,
                                         seed=s)["w"]
    assert torch.equal(masks[-1], masks[2**64 - 1]) and torch.equal(masks[-2**63], masks[2**63])
    assert not torch.equal(masks[0], masks[-1])


def test_a_backend_that_cannot_run_is_refused_when_the_pool_is_built(monkeypatch):
    """backend='triton' on a CPU pool failed at the first materialize with 'RuntimeError: 0 active drivers'
    (or a ValueError on a compressed pool; found by a review)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton")
    base = {"w": torch.zeros(3)}
    for compress in (None, "int8"):
        with pytest.raises(InputError, match="backend 'triton' runs on CUDA tensors"):
            CheckpointPool([{"w": torch.ones(3)}], base=base, backend="triton", compress=compress)
    with pytest.raises(InputError, match="unknown backend 'gpu'"):
        CheckpointPool([{"w": torch.ones(3)}], backend="gpu")


def test_the_mmap_tier_counts_the_copies_it_must_hold(tmp_path):
    """The kernels read no float64: the mmap tier held such tensors as float32 copies in RAM while describe()
    said it read the files in place, so memory_budget="1MB" held 201 MB (an audit). The copies now count
    against the budget: past it the pool is refused (naming the cure); within it describe() says so."""
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        save_file({"big": torch.randn(4096, generator=g).to(torch.bfloat16),
                   "small": torch.randn(64, generator=g, dtype=torch.float64)}, str(tmp_path / f"c{i}.safetensors"))
    files = [str(tmp_path / f"c{i}.safetensors") for i in range(2)]
    with pytest.raises(InputError, match=r"mmap tier.*but 512 bytes would be held in RAM \(512 bytes of tensors in "
                                         r"dtypes the kernels do not read \(float64, ...\), converted\), beyond "
                                         r"memory_budget \(100 bytes\); convert the checkpoints to safetensors in "
                                         r"float32 or bfloat16, or raise memory_budget$"):
        CheckpointPool(files, memory_budget=100)
    pool = CheckpointPool(files, memory_budget=4000)  # the 2 x 64 float32 copies fit, the 2 x 8 KB do not
    assert pool.residency == "mmap" and "512 bytes held in RAM (512 bytes of tensors in dtypes" in pool.describe()
    host = CheckpointPool(files, residency="host")
    a, b = {"big": torch.empty(4096), "small": torch.empty(64)}, {"big": torch.empty(4096), "small": torch.empty(64)}
    pool.materialize([0.3, 0.7], into=a)
    host.materialize([0.3, 0.7], into=b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="held in RAM"):  # a pool of float64 only: mmap would hold it all
        CheckpointPool(_f64_files(tmp_path), memory_budget="1KB")
    # forced, with no budget: the copies need only fit the memory (a review: they were held to the bfloat16 first
    # checkpoint's size, and refused)
    for i in range(2):
        save_file({"big": torch.randn(4096, generator=g, dtype=torch.float64),
                   "small": torch.randn(64, generator=g, dtype=torch.float64)}, str(tmp_path / f"e{i}.safetensors"))
    forced = CheckpointPool([files[0]] + [str(tmp_path / f"e{i}.safetensors") for i in range(2)], residency="mmap")
    assert "held in RAM" in forced.describe()


def test_the_mmap_tier_counts_bin_files_torch_reads_whole(tmp_path):
    """A legacy .bin (torch < 1.6's format) cannot be mapped: torch reads it whole, so a pool under memory_budget
    held the whole model in RAM while describe() said it read the memory map (an audit). Counted now."""
    g = torch.Generator().manual_seed(6)
    (tmp_path / "old").mkdir()
    w = torch.randn(4096, generator=g)  # and a second name for the same storage (a tied head): counted once
    torch.save({"w": w, "v": w[:2048]}, tmp_path / "old" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    save_file({"w": torch.randn(4096, generator=g), "v": torch.randn(2048, generator=g)},
              str(tmp_path / "new.safetensors"))
    sources = [str(tmp_path / "old"), str(tmp_path / "new.safetensors")]
    with pytest.raises(InputError, match=r"but 16.38 KB would be held in RAM \(16.38 KB of .bin files torch cannot "
                                         r"map \(the legacy format, or compressed\), whole\), beyond memory_budget"):
        CheckpointPool(sources, memory_budget="10KB")
    pool = CheckpointPool(sources, memory_budget="20KB")  # the mmap tier: the safetensors file is read in place
    assert pool.residency == "mmap" and "16.38 KB held in RAM" in pool.describe(), pool.describe()
    out = {"w": torch.empty(4096), "v": torch.empty(2048)}
    pool.materialize([0.5, 0.5], into=out)
    from safetensors.torch import load_file
    old, new = torch.load(tmp_path / "old" / "pytorch_model.bin"), load_file(sources[1])
    for k in out:
        torch.testing.assert_close(out[k], 0.5 * old[k] + 0.5 * new[k])


def _f64_files(tmp_path):
    paths = []
    for i in range(2):
        save_file({"w": torch.randn(1000, dtype=torch.float64)}, str(tmp_path / f"d{i}.safetensors"))
        paths.append(str(tmp_path / f"d{i}.safetensors"))
    return paths


def test_dtype_on_the_mmap_tier_is_refused_not_ignored(tmp_path):
    """The mmap tier read the files as they are and ignored dtype=, so one pool merged other bits depending
    on the memory it found (75 of 75 tensors differed from the host tier; found by a review)."""
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        save_file({"w": torch.randn(1000, generator=g)}, str(tmp_path / f"c{i}.safetensors"))
    files = [str(tmp_path / f"c{i}.safetensors") for i in range(2)]
    with pytest.raises(InputError, match=r"dtype=torch.bfloat16 rounds .*c0.safetensors's 'w' \(torch.float32\).*mmap tier"):
        CheckpointPool(files, dtype=torch.bfloat16, memory_budget="1KB")
    with pytest.raises(InputError, match="mmap tier"):
        CheckpointPool(files, dtype=torch.bfloat16, residency="mmap")
    same = CheckpointPool(files, dtype=torch.float32, residency="mmap")  # the files' own dtype: nothing to round
    host = CheckpointPool(files, dtype=torch.float32, residency="host")
    a, b = {"w": torch.empty(1000)}, {"w": torch.empty(1000)}
    same.materialize([0.3, 0.7], into=a)
    host.materialize([0.3, 0.7], into=b)
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize("kw", [{}, {"residency": "mmap"}, {"compress": "int8"}])
def test_an_empty_tensor_with_huge_other_dims_is_held(tmp_path, kw):
    """Was torch's 'Stride calculation overflowed' traceback: the reader built [0, 2**62, 2**62] with
    torch.empty, whose contiguous strides overflow int64 (the safetensors library writes and reads it)."""
    shape = (0, 2**62, 2**62)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"w": torch.full((3,), float(i + 1)), "z": torch.empty(0).reshape(shape)}, paths[-1])
    pool = CheckpointPool(paths, base=paths[0] if "compress" in kw else None, **kw)
    into = {"w": torch.empty(3), "z": torch.empty(0).reshape(shape)}
    pool.materialize([0.5, 0.5], into=into)
    assert torch.allclose(into["w"], torch.full((3,), 1.5), atol=1e-2)
    assert pool.tensor(1, "z").shape == shape


def test_a_weight_just_past_the_limit_is_shown_as_given():
    """1e6 + 1 was reported as "is 1e+06" (%g's six digits): the refused weight must read as what was given."""
    pool = CheckpointPool([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    with pytest.raises(InputError, match=r"weights\[1\] is 1000001\.0; weights beyond 1e\+06"):
        pool.materialize([0.0, 1e6 + 1], into={"w": torch.empty(2)})


def test_weights_as_a_list_of_tensors_that_require_grad():
    """list(alpha) of a learnable weight vector: numpy refused its 0-d elements with torch's "Can't call
    numpy() on Tensor that requires grad" (the same values as one tensor were taken; a hunt)."""
    g = torch.Generator().manual_seed(4)
    sds = [{"w": torch.randn(8, generator=g)} for _ in range(3)]
    pool = CheckpointPool(sds)
    alpha = torch.nn.Parameter(torch.tensor([0.2, 0.5, 0.3]))
    want = sum(a * sd["w"].double() for a, sd in zip([0.2, 0.5, 0.3], sds))
    for weights in (list(alpha), [list(alpha)], tuple(alpha)):
        target = {"w": torch.zeros(8)}
        pool.materialize(weights, into=target)
        assert (target["w"].double() - want).abs().max() < 1e-6


def test_a_backend_for_another_device_is_refused_when_the_pool_is_built():
    """backend="cuda" on a CPU pool was accepted, then every materialize failed ("needs cuda tensors")."""
    with pytest.raises(InputError, match="^backend 'cuda' runs on cuda tensors; the pool is on cpu$"):
        CheckpointPool([{"w": torch.ones(2)}], backend="cuda")
    CheckpointPool([{"w": torch.ones(2)}], backend="cpu").materialize([1.0], into={"w": torch.zeros(2)})


@pytest.mark.parametrize("residency", ["host", "pinned"])
def test_a_narrower_dtype_refuses_values_past_its_range(residency):
    """dtype=float16 rounded finite checkpoint values past 65504 to inf, and every merge of them was inf or NaN,
    silently (a pool audit; the compressed pool refused them already). Values in range, and infs the file holds
    itself, still load."""
    big = [{"w": torch.full((4,), 1.0e5), "b": torch.ones(3)}, {"w": torch.full((4,), -1.0e5), "b": torch.ones(3)}]
    with pytest.raises(CheckpointError, match=r"source 0: tensor 'w' holds values up to 1e\+05, past float16's "
                                              r"range \(largest finite 65504\)"):
        CheckpointPool(big, dtype=torch.float16, residency=residency)
    ok = [{"w": torch.tensor([65519.0, float("inf"), -1.0, 0.0]), "b": torch.ones(3)} for _ in range(2)]
    pool = CheckpointPool(ok, dtype=torch.float16, residency=residency)
    target = {"w": torch.empty(4), "b": torch.empty(3)}
    pool.materialize([0.5, 0.5], into=target)
    assert target["w"].tolist() == [65504.0, float("inf"), -1.0, 0.0]
    assert CheckpointPool(big, dtype=torch.bfloat16, residency=residency).num_checkpoints == 2


def test_mmap_tier_tensor_is_a_copy_a_torch_op_may_write(tmp_path):
    """pool.tensor() on the mmap tier was a view of the read-only file map: t.add_(1) (any torch op writing it)
    killed the process with SIGSEGV (a pool audit). It is a copy now; writing it changes neither the file nor
    the pool's merges. A borrowed tensor is still the caller's own."""
    from safetensors.torch import save_file
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({"w": torch.full((64, 64), float(i + 1))}, paths[-1])
    pool = CheckpointPool(paths, residency="mmap")
    assert pool.residency == "mmap"
    t = pool.tensor(0, "w")
    t.add_(1)
    assert float(pool.tensor(0, "w")[0, 0]) == 1.0
    out = {"w": torch.empty(64, 64)}
    pool.materialize([0.5, 0.5], into=out)
    assert torch.equal(out["w"], torch.full((64, 64), 1.5))
    mine = {"w": torch.ones(3)}
    lent = CheckpointPool([mine, {"w": torch.ones(3)}], residency="mmap")
    assert lent.tensor(0, "w") is mine["w"] or lent.tensor(0, "w").data_ptr() == mine["w"].data_ptr()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_pool_task_arithmetic_keeps_the_delta_forms_infinities(backend):
    """An inf in the base: mergekit's base + sum c (x - base) is NaN (sum c > 0) or inf (every c < 0); the pool's
    one-call table gave inf for both (base * (1 - sum c) + sum c x)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1000, generator=g)}
    base["w"][:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    xs = [{"w": base["w"] + 0.1 * torch.randn(1000, generator=g)} for _ in range(3)]
    for x in xs:
        x["w"][:3] = torch.tensor([1.0, 2.0, 3.0])
    pool = CheckpointPool(xs, base=base, backend=backend)
    target = torch.nn.Module()
    target.w = torch.nn.Parameter(torch.empty(1000), requires_grad=False)
    for w in ([0.3, 0.3, 0.2], [-0.3, -0.2, -0.1]):
        pool.materialize(w, into=target, method="task_arithmetic")
        b = base["w"].double()
        ref = b + sum(c * (x["w"].double() - b) for c, x in zip(w, xs))
        out = target.w.detach().double()
        assert torch.equal(out.isnan(), ref.isnan()), (w, out[:3], ref[:3])
        assert torch.equal(out[:3].nan_to_num(0.0), ref[:3].nan_to_num(0.0))  # inf where the delta form has inf
        assert (out[3:] - ref[3:]).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["trace", "script", "nested_script", "nested_trace"])
def test_torchscript_targets_are_filled_on_every_call(kind):
    """A traced model's second call raised TypeError (the plan cache read its parameter wrapper as a dict), a
    scripted model's first a RuntimeError (get_submodule); so did a plain model holding a scripted or traced
    submodule (a review): targets holding TorchScript modules are planned per call."""
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ms = [net() for _ in range(3)]
    pool = CheckpointPool([m.state_dict() for m in ms[1:]], base=ms[0].state_dict())
    x = torch.randn(5, 8)
    n = net()
    target = {"trace": lambda: torch.jit.trace(n, x), "script": lambda: torch.jit.script(n),
              "nested_script": lambda: torch.nn.Sequential(torch.jit.script(n[0]), n[1], torch.jit.script(n[2])),
              "nested_trace": lambda: torch.nn.Sequential(torch.jit.trace(n[0], x), n[1], n[2])}[kind]()
    for method, w, kw in (("linear", [0.3, 0.7], {}), ("linear", [1.0, 0.0], {}),
                          ("task_arithmetic", [0.5, 0.2], {}), ("ties", [0.5, 0.5], {"density": 0.5})):
        pool.materialize(w, into=target, method=method, **kw)
        ref = net()
        pool.materialize(w, into=ref, method=method, **kw)
        assert torch.equal(target(x), ref(x)), (method, w)
        for name, p in ref.state_dict().items():
            assert torch.equal(target.state_dict()[name], p), name
    # a pool key the target lacks (strict=False): the watch of what is absent raised AttributeError ('get')
    extra = CheckpointPool([{**m.state_dict(), "extra.weight": torch.ones(2)} for m in ms[1:]])
    extra.materialize([0.5, 0.5], into=target, strict=False)
    extra.materialize([0.5, 0.5], into=target, strict=False)
    ref = net()
    extra.materialize([0.5, 0.5], into=ref, strict=False)
    assert torch.equal(target(x), ref(x))


def test_what_a_method_leaves_out_is_warned_about():
    """karcher (no per-model weight, no base role) merged [0.9, 0.1] as [1, 1] and left the pool's base out, where
    `pymerge merge` takes a base_model as one more input: silently (an audit). Warned, from the caller's line;
    equal weights, or a method that uses what it is given, warn nothing."""
    import warnings
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g)}
    src = [{"w": base["w"] + 0.3 * torch.randn(64, generator=g)} for _ in range(2)]
    pool, out = CheckpointPool(src, base=base), {"w": torch.empty(64)}
    with pytest.warns(UserWarning) as got:
        pool.materialize([0.9, 0.1], into=out, method="karcher")
    messages = sorted(str(w.message) for w in got)
    assert len(messages) == 2 and "karcher has no base role" in messages[0] and "no per-model weight" in messages[1]
    assert all(w.filename == __file__ for w in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckpointPool(src).materialize([1.0, 1.0], into=out, method="karcher")
        pool.materialize([0.9, 0.1], into=out, method="task_arithmetic")
        pool.materialize([0.9, 0.1], into=out)  # linear: documented to ignore the base
    with pytest.warns(UserWarning, match="model_stock takes no per-model weight"):
        pool.materialize([0.2, 0.8], into=out, method="model_stock")


def test_a_per_model_parameter_may_be_a_cpu_tensor():
    """density=torch.tensor([0.5, 0.7]) was refused ("model 0 density must be a number") where a list or a numpy
    array is one value per checkpoint (an audit)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g)}
    src = [{"w": base["w"] + 0.1 * torch.randn(64, generator=g)} for _ in range(2)]
    pool = CheckpointPool(src, base=base)
    outs = [{"w": torch.empty(64)} for _ in range(3)]
    for out, density in zip(outs, (torch.tensor([0.5, 0.7]), [0.5, 0.7], np.array([0.5, 0.7]))):
        pool.materialize([0.5, 0.5], into=out, method="ties", density=density)
    assert torch.equal(outs[0]["w"], outs[1]["w"]) and torch.equal(outs[1]["w"], outs[2]["w"])


def test_a_module_source_with_extra_state_merges_its_weights():
    """A module whose get_extra_state() returns an object (TransformerEngine's modules) was refused outright
    ("entry '0._extra_state' is a dict, not a tensor"; an audit): its weights merge, the object is no weight."""
    class WithExtra(torch.nn.Linear):
        def get_extra_state(self):
            return {"fp8": "meta"}

        def set_extra_state(self, state):
            pass
    torch.manual_seed(0)
    src = [torch.nn.Sequential(WithExtra(3, 2)) for _ in range(2)]
    target = torch.nn.Sequential(WithExtra(3, 2))
    CheckpointPool(src).materialize([0.5, 0.5], into=target)
    want = (src[0][0].weight + src[1][0].weight) / 2
    torch.testing.assert_close(target[0].weight.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match="entry '0._extra_state' is a dict, not a tensor"):
        CheckpointPool([dict(s.state_dict()) for s in src])  # a state dict given as such: every entry is the caller's


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"])
def test_every_candidates_coefficients_are_checked_whatever_its_place(method):
    """Weights [1, -0.9999999] with normalize need coefficients of 8e6, refused; the one native call of the
    sparsifying methods checked the first candidate's only, so that pair merged (deltas x5e5) as the second of
    a population and was refused as the first (a review). Refused in either place now, nothing written."""
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 64)}
    pool = CheckpointPool([{"w": base["w"] + 0.01 * torch.randn(64, 64)} for _ in range(2)], base=base)
    ok, bad = [0.5, 0.5], [1.0, -0.9999999]
    extra = {} if method == "task_arithmetic" else {"density": 1.0}
    for order in ([ok, bad], [bad, ok]):
        into = [{"w": torch.zeros(64, 64)}, {"w": torch.zeros(64, 64)}]
        with pytest.raises(MergeConfigError, match=r"^tensor w: coefficient of .* is 8\.38861e\+06"):
            pool.materialize_many(order, into=into, method=method, method_params={"normalize": True, **extra})
        assert all(not t["w"].any() for t in into)
    into = [{"w": torch.zeros(64, 64)}]
    pool.materialize_many([ok], into=into, method=method, method_params={"normalize": True, **extra})  # still merges
    assert into[0]["w"].any()


def test_a_source_freed_by_the_callers_weight_is_refused_not_read(tmp_path):
    """The borrowed sources were checked before the weights were read: a weight's __float__ (the caller's code)
    that freed a source (FSDP's resize_(0)) sent the linear hot path into freed memory, a segfault (an audit).
    Checked again after; run in a process of its own (the failure mode is a crash)."""
    import subprocess
    import sys
    code = """
import torch
from fractions import Fraction
from pymerge.errors import InputError
from pymerge.pool import CheckpointPool
s = [{"w": torch.ones(64)}, {"w": torch.full((64,), 2.0)}]
pool = CheckpointPool(s, residency="mmap")
assert pool.borrowed == ["source 0", "source 1"], pool.borrowed
class W(Fraction):
    def __float__(self):
        s[0]["w"].untyped_storage().resize_(0)
        return 0.5
out = {"w": torch.zeros(64)}
try:
    pool.materialize([W(1, 2), 0.5], into=out)
except InputError as exc:
    assert "source 0: tensor 'w', which the pool reads in place" in str(exc), exc
    assert not out["w"].any()
    print("refused")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.returncode, r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("method, kw", [("slerp", dict(t=[0.5] * 10**5)), ("ties", dict(density=torch.ones(40, 40))),
                                        ("ties", dict(method_params={"rescale": "x" * 10**5}))])
def test_a_hostile_parameter_is_echoed_short_on_one_line(method, kw):
    """A parameter's error echoed its whole repr: a 500,000-character message for t=[0.5]*10**5, seven lines for a
    40x40 density tensor (an audit). errors.short's length, one line."""
    pool = CheckpointPool([{"w": torch.randn(3, 4)}], base={"w": torch.randn(3, 4)})
    with pytest.raises(MergeConfigError) as info:
        pool.materialize([1.0], into={"w": torch.zeros(3, 4)}, method=method, **kw)
    message = str(info.value)
    assert len(message) < 400 and "\n" not in message, message


def test_a_source_freed_by_a_methods_parameter_is_the_pools_one_line():
    """The same through a method's parameter, read after the pool's checks (slerp's t whose __float__ frees the
    base): the kernel's own storage error, not the pool's "nothing was written" (a review)."""
    from fractions import Fraction
    s = [{"w": torch.ones(1 << 12)}, {"w": torch.full((1 << 12,), 2.0)}]
    pool = CheckpointPool(s[1:], base=s[0], residency="mmap")
    assert pool.borrowed == ["source 0", "base"]

    class T(Fraction):
        def __float__(self):
            s[0]["w"].untyped_storage().resize_(0)
            return 0.5
    out = {"w": torch.zeros(1 << 12)}
    with pytest.raises(InputError, match="^base: tensor 'w', which the pool reads in place: .*nothing was written"):
        pool.materialize([1.0], into=out, method="slerp", t=T(1, 2))
    assert not out["w"].any()


def test_an_interrupt_at_any_moment_never_leaves_the_plan_cache_locked(tmp_path):
    """A Ctrl-C landing at the first instruction of the cache's Python-level __exit__ (or just after its acquire)
    left the lock held: every later materialize waited forever (an audit: held after 14-37 interrupts). Now the
    lock's own `with`. 4,000 calls into new targets, each interrupted at a random moment by a timer; half of them
    ties, which needs the pool's base (without one every ties call was refused before it merged: an audit)."""
    import subprocess
    import sys
    code = """
import random, signal, torch
from pymerge.pool import CheckpointPool
torch.manual_seed(0)
pool = CheckpointPool([{"w": torch.randn(64), "v": torch.randn(64)} for _ in range(2)],
                      base={"w": torch.randn(64), "v": torch.randn(64)}, num_threads=1)
signal.signal(signal.SIGALRM, signal.default_int_handler)
random.seed(1)
interrupts = ties_done = 0
for i in range(4000):
    t = {"w": torch.empty(64), "v": torch.empty(64)}
    try:
        signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, 5e-3 if i % 2 else 300e-6))  # ties takes longer
        pool.materialize([0.5, 0.5], t, method="ties" if i % 2 else "linear", **({"density": 0.5} if i % 2 else {}))
        signal.setitimer(signal.ITIMER_REAL, 0)
        ties_done += i % 2
    except KeyboardInterrupt:
        interrupts += 1
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        interrupts += 1
    assert not pool._plan_cache._lock.locked(), (i, interrupts)
signal.signal(signal.SIGALRM, signal.SIG_IGN)
out = {"w": torch.empty(64), "v": torch.empty(64)}
pool.materialize([0.5, 0.5], out)
print("interrupts", interrupts, ties_done)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("interrupts "), (r.returncode, r.stdout, r.stderr[-3000:])
    assert int(r.stdout.split()[1]) > 100 and int(r.stdout.split()[2]) > 0, r.stdout  # interrupted, and merged


def test_a_tensor_left_out_as_integers_must_be_integers_in_every_source(tmp_path):
    """The pool left out what the first source held as integers without looking at the others: a float head
    in the second source (a corrupt header's I32 in the first, same bytes) went unmerged and the live model
    kept its old head (an audit). Refused in either order, as `pymerge merge` refuses it."""
    good = {"w": torch.randn(4, 2), "head": torch.randn(4, 2)}
    bad = {"w": torch.randn(4, 2), "head": torch.randint(0, 9, (4, 2), dtype=torch.int32)}
    wide = {"w": torch.randn(4, 2), "head": torch.randint(0, 9, (8,), dtype=torch.int32)}
    for sources in ([bad, good], [good, bad]):
        with pytest.raises(CheckpointError, match="tensor 'head' has dtype torch"):
            CheckpointPool(sources)
    with pytest.raises(CheckpointError, match=r"tensor 'head' has dtype torch.int32 and shape \[8\]"):
        CheckpointPool([bad, wide])
    CheckpointPool([bad, {k: v.clone() for k, v in bad.items()}])  # integers everywhere: left out, as before


def test_a_float_target_of_a_tensor_held_as_integers_is_refused_under_strict():
    """One source holding as integers what the live model holds as floats: the model's tensor kept its old
    values without a word under strict=True (an audit). Refused there; strict=False leaves it alone."""
    src = {"w": torch.randn(4, 2), "head": torch.randint(0, 9, (4, 2), dtype=torch.int32),
           "steps": torch.tensor(3)}
    pool = CheckpointPool([src])
    assert pool.skipped == ["head", "steps"]
    target = {"w": torch.zeros(4, 2), "head": torch.full((4, 2), 7.0), "steps": torch.tensor(0)}
    with pytest.raises(InputError, match="tensor 'head' is torch.float32, but the checkpoints hold it as integers"):
        pool.materialize([1.0], into=target)
    assert target["w"].abs().sum() == 0
    pool.materialize([1.0], into=target, strict=False)
    assert torch.equal(target["w"], src["w"]) and (target["head"] == 7).all() and target["steps"] == 0
    plain = {"w": torch.zeros(4, 2), "steps": torch.tensor(0)}  # an integer buffer in the model: as before
    pool.materialize([1.0], into=plain)
    assert torch.equal(plain["w"], src["w"])


def test_a_names_function_is_not_needed_for_the_integer_tensors_left_out():
    """The strict check of targets' float tensors against the integer ones left out called names= on those too:
    a mapping built from pool.names raised its KeyError (a review)."""
    src = {"w": torch.randn(3), "steps": torch.tensor(3)}
    pool = CheckpointPool([src])
    mapping = {n: "model." + n for n in pool.names}
    target = {"model.w": torch.zeros(3), "model.steps": torch.tensor(0)}
    pool.materialize([1.0], into=target, names=mapping.__getitem__)
    assert torch.equal(target["model.w"], src["w"])


def test_a_dropped_pool_leaves_nothing_on_the_model_it_wrote_into():
    """Each pool's plan cache put a finalizer on the model it merged into (to evict its entry when the model
    dies); a pool dropped first left it registered, one per pool, for as long as the model lived: a training loop
    that builds a pool every few steps grew without bound (an audit)."""
    import gc
    import weakref
    model = torch.nn.Linear(4, 3)
    sds = [{"weight": torch.randn(3, 4), "bias": torch.randn(3)} for _ in range(2)]

    def once():
        pool = CheckpointPool(sds)
        with torch.no_grad():
            pool.materialize([0.3, 0.7], into=model)
        return weakref.ref(pool)
    once()
    gc.collect()
    before = len(weakref.finalize._registry)
    pools = [once() for _ in range(40)]
    gc.collect()
    assert all(p() is None for p in pools)
    assert len(weakref.finalize._registry) - before <= 1
    torch.testing.assert_close(model.weight.detach(), 0.3 * sds[0]["weight"] + 0.7 * sds[1]["weight"])


def test_state_dicts_written_into_are_not_kept_alive_by_the_pool():
    """A dict cannot be weakly referenced, so the plan cache held each state dict it wrote into: a fresh dict per
    candidate (to save each) kept up to 8 whole models alive after the caller dropped them (an audit). The last one
    only now; one dict written again and again keeps its plans."""
    import gc
    import weakref
    sds = [{"w": torch.randn(1000), "b": torch.randn(3)} for _ in range(2)]
    pool = CheckpointPool(sds)
    refs = []
    for _ in range(6):
        target = {"w": torch.empty(1000), "b": torch.empty(3)}
        pool.materialize([0.5, 0.5], into=target)
        refs.append(weakref.ref(target["w"]))
        del target
    gc.collect()
    assert sum(r() is not None for r in refs) <= 1
    kept = {"w": torch.empty(1000), "b": torch.empty(3)}
    pool.materialize([0.5, 0.5], into=kept)
    entry = next(iter(pool._plan_cache._entries.values()))
    pool.materialize([0.2, 0.8], into=kept)
    assert next(iter(pool._plan_cache._entries.values())) is entry  # the same plans, reused
    torch.testing.assert_close(kept["w"], 0.2 * sds[0]["w"] + 0.8 * sds[1]["w"])
    entries = len(pool._plan_cache._entries)
    pool.materialize([0.5, 0.5], into=kept, strict=False)  # another entry for the same dict: both kept
    pool.materialize([0.2, 0.8], into=kept)
    assert len(pool._plan_cache._entries) == entries + 1 and entry in pool._plan_cache._entries.values()


def test_della_on_the_mmap_tier_holds_one_tensors_masks_at_a_time(tmp_path, monkeypatch):
    """The one native call drew DELLA's masks (a bit per element and checkpoint) for every tensor first: N/16 of
    a bfloat16 model held during each call, in a pool whose memory_budget kept the model out of RAM (an audit).
    Past MAX_MASK_BYTES the mmap tier merges DELLA tensor by tensor; the bits are the host tier's (the one call's),
    into a model made under inference mode too (a review: the per-tensor path's writes were refused there)."""
    from pymerge.pool import grouped, pool as pool_mod
    g = torch.Generator().manual_seed(7)
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({f"t{k}": torch.randn(257, generator=g) for k in range(5)}, files[-1])
    kw = dict(method="della", density=0.5, epsilon=0.1, seed=3)
    host = CheckpointPool(files[1:], base=files[0], residency="host")
    want = {f"t{k}": torch.empty(257) for k in range(5)}
    host.materialize([0.2, 0.3, 0.5], into=want, **kw)
    mmap = CheckpointPool(files[1:], base=files[0], residency="mmap")
    calls = []
    real_run = grouped.TaskVectorCall.run
    monkeypatch.setattr(grouped.TaskVectorCall, "run", lambda *a: calls.append(1) or real_run(*a))
    small = {f"t{k}": torch.empty(257) for k in range(5)}
    mmap.materialize([0.2, 0.3, 0.5], into=small, **kw)  # masks under the cap: the one call
    assert calls == [1] and all(torch.equal(small[k], want[k]) for k in want)
    monkeypatch.setattr(pool_mod, "MAX_MASK_BYTES", 0)
    for inference in (False, True):
        with torch.inference_mode(inference):
            got = {f"t{k}": torch.empty(257) for k in range(5)}
        mmap.materialize([0.2, 0.3, 0.5], into=got, **kw)
        assert calls == [1] and all(torch.equal(got[k], want[k]) for k in want)
    mmap.materialize([0.2, 0.3, 0.5], into=got, method="ties", density=0.5)  # no masks held: the one call
    assert calls == [1, 1]


def test_a_target_whose_parameter_names_are_no_module_paths_is_merged_every_call():
    """checkpoint_wrapper (activation checkpointing) at a model's root, and FSDP1 inside summon_full_params, name their
    parameters without the wrapped module's name: the plan cache's watcher walked those names as submodule paths
    and raised a bare KeyError (an audit). Such a target's plans now serve one call each: every call is right."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    states = [make().state_dict() for _ in range(3)]
    pool = CheckpointPool(states)
    model = checkpoint_wrapper(make())
    assert [n for n, _ in model.named_parameters()][0] == "0.weight"  # (no such submodule path)
    for w in ([0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]):
        if w[0] == 0.1:  # a parameter replaced between calls: the next call writes the new one
            model._checkpoint_wrapped_module[0].weight = torch.nn.Parameter(torch.zeros(6, 8))
        pool.materialize(w, into=model)
        for name, p in model.named_parameters():
            assert torch.allclose(p.double(), merged(states, w, name), atol=1e-6), (w, name)


def test_candidates_inside_a_parametrize_cached_block_are_each_scored():
    """torch.nn.utils.parametrize.cached() keeps the weights a parametrized model (weight_norm) computes from its
    originals for the whole block: a search's second candidate, merged into the originals, was scored with the
    first's weights (an audit). A materialize drops that cache, as it drops autocast's."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)

    def make():
        m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
        weight_norm(m[0])
        return m
    states = [{k: torch.randn_like(v) for k, v in make().state_dict().items()} for _ in range(3)]
    pool = CheckpointPool(states)
    x = torch.randn(4, 8)

    def expected(w):
        ref = make().double()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.copy_(merged(states, w, name))
        return ref(x.double())
    model = make()
    with parametrize.cached():
        for w in ([0.2, 0.5, 0.3], [0.7, 0.2, 0.1]):
            pool.materialize(w, into=model)
            assert torch.allclose(model(x).double(), expected(w), atol=1e-5), w


@pytest.mark.parametrize("many", [False, True])
def test_a_compiled_step_that_merges_then_scores_runs_the_merge_eagerly(many):
    """A user's torch.compile'd step that materializes a candidate and then runs the model died in Dynamo's fake
    tensors (traced into the pool: a TorchRuntimeError, then an InternalTorchDynamoError; an audit). The merge
    now runs eagerly inside the compiled step, and the step's output is the merged model's."""
    torch.manual_seed(0)
    srcs = [torch.nn.Linear(8, 4) for _ in range(2)]
    pool = CheckpointPool(srcs)
    target, x = torch.nn.Linear(8, 4), torch.randn(3, 8)

    @torch.compile(backend="eager")
    def step(w):
        if many:
            pool.materialize_many([w], [target])
        else:
            pool.materialize(w, into=target)
        return target(x)

    for w in ([0.5, 0.5], [1.0, 0.0], [0.25, 0.75]):
        weight = sum(wi * s.weight.detach().double() for wi, s in zip(w, srcs))
        bias = sum(wi * s.bias.detach().double() for wi, s in zip(w, srcs))
        got = step(w)
        assert torch.allclose(target.weight.detach().double(), weight, atol=1e-6)
        assert torch.allclose(got.double(), torch.nn.functional.linear(x.double(), weight, bias), atol=1e-5)


def test_a_pool_warning_names_the_callers_line_through_the_compile_wrapper():
    """materialize runs under torch.compiler.disable, whose wrapper is a frame of torch's: the warning that a
    method ignores the weights named torch's file, and two calls from two lines warned once (a review)."""
    torch.manual_seed(0)
    pool = CheckpointPool([torch.nn.Linear(4, 3).state_dict() for _ in range(3)],
                          base=torch.nn.Linear(4, 3).state_dict())
    target = torch.nn.Linear(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool.materialize([0.5, 0.3, 0.2], into=target, method="model_stock")
        pool.materialize_many([[0.5, 0.3, 0.2]], [target], method="model_stock")
    assert [os.path.abspath(w.filename) for w in caught] == [os.path.abspath(__file__)] * 2, caught


def test_importing_the_pool_does_not_load_torchs_compiler():
    """Decorating the merge calls with torch.compiler.disable loaded torch._dynamo: 1.3 s more for every `import
    pymerge` (a review). It is used only where whoever compiles has loaded it."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sys, pymerge, pymerge.pool, pymerge.dist; "
                          "print('torch._dynamo' in sys.modules)"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr[-2000:]
