"""Every merge method against its float64 reference (tests/methods_reference.py): each backend
(C++ "cpu", blockwise "torch", Triton under its interpreter on tiny sizes), awkward sizes around
the kernels' 1024-element blocks, input/output dtypes, NaN/inf, per-tensor parameters."""
import math

import pytest
import torch

import pymerge.methods.model_stock  # noqa: F401  (registers the methods)
import pymerge.methods.passthrough  # noqa: F401
import pymerge.methods.slerp  # noqa: F401
import pymerge.methods.task_vectors  # noqa: F401
from pymerge.methods.base import TensorTask, get_method
from pymerge.ops import task_vector_ops as tvo
from conftest import TRITON_EXACT
from methods_reference import (M, ref_model_stock, ref_nuslerp, ref_slerp, ref_task_vectors, rel_err)

SHAPES = [(1,), (7,), (1023,), (1025,), (33, 65), (3, 2049)]
TINY = [(7,), (33, 65)]


def models(shape, n=3, dtype=torch.float32, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [(base + scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    return base.to(dtype), xs


def run(name, xs, base, model_params, params=None, out_dtype=torch.float32, backend="auto", seed=7, tname="t.w",
        cache=None):
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    task = TensorTask(inputs=xs, base=base, model_params=model_params, params=params or {}, name=tname,
                      seed=seed, backend=backend, cache=cache)
    m = get_method(name)
    m.check_params(task)
    m.merge_tensor(task, out)
    return out


def check(out, ref, tol=2e-6):
    ref = ref.double()
    if out.dtype == torch.float32:
        assert rel_err(out, ref) <= tol, rel_err(out, ref)
        bound = 1e-5 * ref.abs().max().clamp(min=1e-6)
    else:
        bound = ref.abs() * (2.0 ** -7 if out.dtype == torch.bfloat16 else 2.0 ** -10) + 1e-5 * ref.abs().max()
    assert ((out.double() - ref).abs() <= bound).all()


def tv_params(n, densities=None, weights=None):
    weights = weights or [0.6, -0.3, 0.9, 0.4][:n]
    densities = densities or [0.5, 0.3, 0.8, 0.7][:n]
    return weights, densities, [{"weight": w, "density": d} for w, d in zip(weights, densities)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", M)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_task_vector_methods(method, shape, backend):
    base, xs = models(shape, seed=len(shape) * 1000 + shape[-1])
    w, d, mp = tv_params(3)
    out = run(method, xs, base, mp, backend=backend)
    check(out, ref_task_vectors(xs, base, w, d, method, seed=7, name="t.w"))


@pytest.mark.triton_cpu
@pytest.mark.parametrize("shape", TINY)
@pytest.mark.parametrize("method", M)
def test_task_vector_methods_triton(method, shape):
    """The Triton pass against the float64 reference, and bit for bit against the C++ pass (no FMA
    contraction, correctly rounded division; lambda != 1 so the final multiply-add is exercised)."""
    pytest.importorskip("triton")
    base, xs = models(shape, seed=3)
    w, d, mp = tv_params(3)
    # One plan for both passes: the L1 rescale factor comes from a float64 reduction whose order differs
    # between the C++ and torch planners, so it may differ in its last float32 bit.
    plans = tvo.SelectionCache()
    out = run(method, xs, base, mp, params={"lambda": 0.7}, backend="triton", cache=plans)
    check(out, ref_task_vectors(xs, base, w, d, method, lam=0.7, seed=7, name="t.w"))
    assert torch.equal(out, run(method, xs, base, mp, params={"lambda": 0.7}, backend="cpu", cache=plans))


@pytest.mark.triton_cpu
@pytest.mark.skipif(not TRITON_EXACT, reason="this Triton's interpreter converts bfloat16 otherwise than a GPU "
                    "(tests/triton_exact.py could not give it a GPU's conversions)")
@pytest.mark.parametrize("method", M)
def test_task_vector_methods_triton_bfloat16_bits(method):
    """bfloat16 models (a bfloat16 base) into a bfloat16 output: the Triton pass bit for bit against the C++ pass,
    its bfloat16 loads and the store's rounding included, which the interpreter's own truncating conversions
    kept out of every bit test (tests/triton_exact.py gives it a GPU's)."""
    pytest.importorskip("triton")
    base, xs = models(TINY[-1], dtype=torch.bfloat16, seed=4)
    w, d, mp = tv_params(3)
    plans = tvo.SelectionCache()
    kw = dict(params={"lambda": 0.7}, out_dtype=torch.bfloat16, cache=plans)
    got, want = run(method, xs, base, mp, backend="triton", **kw), run(method, xs, base, mp, backend="cpu", **kw)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della"])
def test_dtypes(method, in_dtype, out_dtype):
    base, xs = models((17, 300), dtype=in_dtype, seed=11)
    xs[1] = xs[1].float()  # mixed input dtypes
    # Dyadic weights keep float32 products exact: quantized deltas cancel exactly in the sign
    # election, and float32 and float64 must then elect the same sign.
    w, d, mp = tv_params(3, weights=[0.5, -0.25, 0.75])
    out = run(method, xs, base, mp, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    check(out, ref_task_vectors(xs, base, w, d, method, seed=7, name="t.w"))


@pytest.mark.parametrize("method", M)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_options(method, backend):
    """normalize / rescale / lambda overrides and edge densities (0, 1) per model."""
    base, xs = models((40, 50), n=4, seed=5)
    w = [0.7, 0.2, -0.5, 1.1]
    d = [0.0, 1.0, 0.25, 0.6]
    mp = [{"weight": a, "density": b, "gamma": 0.05, "epsilon": 0.1} for a, b in zip(w, d)]
    for opts in ({"normalize": True, "rescale": False, "lambda": 0.7},
                 {"normalize": False, "rescale": True, "lambda": 1.3},
                 {"rescale": "inverse_density"}):
        out = run(method, xs, base, mp, opts, backend=backend)
        ref = ref_task_vectors(xs, base, w, d, method, normalize=opts.get("normalize"), rescale=opts.get("rescale"),
                               lam=opts.get("lambda", 1.0), gamma=0.05, epsilon=0.1, seed=7, name="t.w")
        check(out, ref)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nan_and_inf(method, backend):
    base, xs = models((9, 130), seed=2)
    xs[0].view(-1)[[3, 200]] = float("nan")
    xs[1].view(-1)[[5, 700]] = float("inf")
    xs[2].view(-1)[[7]] = -float("inf")
    w, d, mp = tv_params(3)
    out = run(method, xs, base, mp, {"rescale": False}, backend=backend)
    ref = ref_task_vectors(xs, base, w, d, method, rescale=False, seed=7, name="t.w")
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert torch.allclose(out[fin].double(), ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [[0.3, 0.3, 0.2], [-0.3, -0.2, -0.1], [0.5, -0.2, 0.4], [1.0, 0.0, 0.0],
                                     [0.5, 0.3, 0.2]])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_task_arithmetic_non_finite_as_the_delta_form(backend, weights):
    """mergekit computes base + sum c_i (x_i - base): an inf base gives NaN there (x - base = -inf, times c > 0,
    plus inf), or inf where every c < 0. The rewrite base * (1 - sum c) + sum c x gave inf (an audit,
    against mergekit-yaml). Every element class: inf/-inf/NaN in the base, in the inputs, in both, finite."""
    base, xs = models((9, 130), seed=3)
    base.view(-1)[[0, 1, 2, 3]] = torch.tensor([float("inf"), -float("inf"), float("nan"), float("inf")])
    xs[0].view(-1)[[3, 4, 5]] = torch.tensor([float("inf"), float("inf"), float("nan")])
    xs[1].view(-1)[[4, 6]] = -float("inf")
    params = {"lambda": 1.0, "normalize": False}
    out = run("task_arithmetic", xs, base, [{"weight": w} for w in weights], params, backend=backend)
    ref = base.double() + sum(w * (x.double() - base.double()) for w, x in zip(weights, xs))
    assert torch.equal(out.isnan(), ref.isnan()), (out.view(-1)[:8], ref.view(-1)[:8])
    assert torch.equal(out.isinf() & (out > 0), ref.isinf() & (ref > 0))
    fin = ref.isfinite()
    assert rel_err(out[fin], ref[fin]) <= 2e-6
    alone = torch.empty_like(base)  # no models: the base as it is, infinities and NaNs too
    get_method("task_arithmetic").merge_tensor(TensorTask(inputs=[], base=base, model_params=[], params=params,
                                                          name="t.w", backend=backend), alone)
    assert torch.equal(alone.view(torch.int32), base.view(torch.int32))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                    "della_linear"])
def test_only_the_base_gives_the_base(method):
    """A config whose only model is the base: mergekit writes the base, as task_arithmetic, sce and ram did; these
    exited 2, needing a model besides it (an audit, against mergekit-yaml)."""
    base, _ = models((5, 7))
    base.view(-1)[:2] = torch.tensor([float("inf"), float("nan")])
    m = get_method(method)
    m.validate(0, True)
    out = torch.empty_like(base)
    task = TensorTask(inputs=[], base=base, model_params=[], params={}, name="t.w")
    m.check_params(task)
    m.merge_tensor(task, out)
    assert torch.equal(out.view(torch.int32), base.view(torch.int32))


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"normalize": True, "lambda": 1.0}),
                                            ("dare_linear", {"normalize": True}),
                                            ("breadcrumbs", {"normalize": True}),
                                            ("della_linear", {"normalize": True})])
def test_one_normalize_divisor_for_every_linear_method(method, params):
    """mergekit's normalize divides by the weights' float32 sum, by 1 where it is under 1e-8. task_arithmetic summed
    in float64: [0.3, -0.1, -0.2] was a zero sum there (the task vectors added unscaled) and 1.5e-8 in mergekit
    and in pymerge's own sparsifying methods (every coefficient 2e7). Now one rule: that sum, whose coefficients
    are beyond 1e6, refused by every method; the sparsifying ones had no coefficient check (weights [1, -0.9999999]
    wrote deltas of 8e6: an audit). [1e-8, 0] is at float32's 1e-8, not under it: the first model, as mergekit."""
    from pymerge.methods.base import check_magnitudes
    from pymerge.errors import MergeConfigError
    base, xs = models((6, 5), n=3)
    extra = {} if method == "task_arithmetic" else {"density": 1.0}
    for weights in ([0.3, -0.1, -0.2], [1.0, -0.9999999, 0.0]):
        task = TensorTask(inputs=[], base=None, model_params=[{"weight": w, **extra} for w in weights], params=params,
                          name="t.w")
        get_method(method).check_params(task)
        with pytest.raises(MergeConfigError, match=r"tensor t.w: coefficient of model 0 is [0-9.]+e\+0[67]"):
            check_magnitudes(get_method(method), task)
    out = run(method, xs[:2], base, [{"weight": w, **extra} for w in (1e-8, 0.0)], params)
    assert torch.allclose(out, xs[0], rtol=0, atol=1e-6)
    # [0.1, 0.2, -0.3]: float32 sum 0 (divisor 1, as mergekit), float64 sum 5.6e-17 (a merge of deltas x 1.8e16):
    # the merge itself divides as the rule says (a mutation audit: only the rule was pinned)
    weights = (0.1, 0.2, -0.3)
    out = run(method, xs, base, [{"weight": w, **extra} for w in weights], params)
    ref = base.double() + sum(w * (x.double() - base.double()) for w, x in zip(weights, xs))
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)


def test_the_kernels_divisor_is_torchs_float32_sum_to_the_last_bit():
    """The task-vector kernels divide each element by D as mergekit does, so D's last bits count: a numpy sum in
    order differed from torch's (mergekit's) for a third of the weight lists of 5 or more (a review: 338 of
    4096 dare_linear elements off mergekit's formula)."""
    g = torch.Generator().manual_seed(5)
    for n in list(range(1, 40)) + [64, 257]:
        for _ in range(20):
            w = torch.rand(n, generator=g).tolist()
            assert tvo.linear_divisor(w) == float(torch.tensor(w, dtype=torch.float32).sum()), (n, w)
    assert tvo.linear_divisor([0.3, -0.1, -0.2]) == float(torch.tensor([0.3, -0.1, -0.2]).sum())  # 1.5e-8: kept
    assert tvo.linear_divisor([4e-9, 5e-9]) == 1.0  # under 1e-8: mergekit divides by 1


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_of_infinite_task_vectors_is_nan_as_mergekit(n, with_base):
    """An inf in every task vector: mergekit writes the tensor NaN (inf norms make NaN units). The coefficients from
    the Gram matrix divided by inf norms to 0: a plain average of the finite elements (two models) or a refusal
    blaming antipodal weights (three; an audit, against mergekit-yaml)."""
    import pymerge.methods.sphere  # noqa: F401  (registers multislerp)
    base, xs = models((6, 7), n=n)
    for i, x in enumerate(xs):
        x.view(-1)[i] = float("inf")
    out = run("multislerp", xs, base if with_base else None, [{"weight": 1.0 + i} for i in range(n)])
    assert out.isnan().all()


def test_model_is_the_base_gives_base():
    """A model identical to the base has a zero task vector: TIES of it alone returns the base."""
    base, xs = models((10, 10))
    out = run("ties", [base.clone()], base, [{"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_slerp(shape, t, backend):
    base, xs = models(shape, n=1, scale=1.0, seed=shape[-1])
    check(run("slerp", xs, base, [{}], {"t": t}, backend=backend), ref_slerp(t, base, xs[0]))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_slerp_colinear_and_zero(backend):
    base, _ = models((50, 20), n=0)
    check(run("slerp", [2 * base], base, [{}], {"t": 0.25}, backend=backend), ref_slerp(0.25, base, 2 * base))
    z = torch.zeros(5, 6)
    check(run("slerp", [base[:5, :6].contiguous()], z, [{}], {"t": 0.5}, backend=backend),
          ref_slerp(0.5, z, base[:5, :6]))


@pytest.mark.parametrize("shape", [(7,), (1025,), (33, 65), (4, 5, 6)])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("mode", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nuslerp(shape, with_base, mode, backend):
    base, xs = models(shape, n=2, scale=0.5, seed=9)
    flatten, row_wise = mode
    out = run("nuslerp", xs, base if with_base else None, [{"weight": 0.3}, {"weight": 1.1}],
              {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, backend=backend)
    check(out, ref_nuslerp(0.3, 1.1, xs[0], xs[1], base if with_base else None, flatten, row_wise))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nuslerp_long_antiparallel_rows(backend):
    """Rows of 1000 elements pointing exactly opposite ways (factor -0.7 is not exact in float32, so
    their deltas are only nearly so): float32 row dots erred by ~3e-7 in cos and sent some rows down the
    spherical branch, ~800x too large; the rows now lerp."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 1000, generator=g)
    v = torch.randn(512, 1000, generator=g)
    v[:, :500] *= 10
    xs = [base + v, base - 0.7 * v]
    out = run("nuslerp", xs, base, [{"weight": 0.3}, {"weight": 1.1}], {"nuslerp_flatten": False}, backend=backend)
    t = 1.1 / 1.4
    d0, d1 = (xs[0] - base).double(), (xs[1] - base).double()
    check(out, base.double() + (1 - t) * d0 + t * d1)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0)])
@pytest.mark.parametrize("mode", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nuslerp_empty_tensor_with_base(shape, mode, backend):
    """An empty tensor (or a rank's empty shard) merges to an empty tensor: its base has no address,
    which the C++ kernel took for a missing base ('interp: sub needs a base')."""
    base, xs = models(shape, n=2)
    flatten, row_wise = mode
    out = run("nuslerp", xs, base, [{"weight": 0.3}, {"weight": 1.1}],
              {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, backend=backend)
    assert out.shape == shape


@pytest.mark.parametrize("factor", [-1.0, -0.3, 2.0])
@pytest.mark.parametrize("mode", [(True, False), (False, False), (False, True)])
def test_nuslerp_colinear_rows(factor, mode):
    """Rows (or the whole tensor) whose two task vectors are exactly (anti)parallel are interpolated
    linearly, as mergekit's float32 colinear test decides, and never blow up."""
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-8, 9, (9, 31), generator=g).float() / 8
    v = torch.randint(-8, 9, (9, 31), generator=g).float() / 16
    v[v == 0] = -1 / 16
    xs = [base + v, base + factor * v]
    flatten, row_wise = mode
    out = run("nuslerp", xs, base, [{"weight": 0.3}, {"weight": 1.1}],
              {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise})
    ref = ref_nuslerp(0.3, 1.1, xs[0], xs[1], base, flatten, row_wise)
    check(out, ref)
    t = 1.1 / 1.4
    check(out, base.double() + (1 - t) * v.double() + t * factor * v.double())


@pytest.mark.parametrize("shape", [(7,), (1025,), (33, 65), (4, 5, 6)])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_model_stock(shape, n, filter_wise, backend):
    base, xs = models(shape, n=n, scale=0.3, seed=n)
    out = run("model_stock", xs, base, [{}] * n, {"filter_wise": filter_wise}, backend=backend)
    check(out, ref_model_stock(base, xs, filter_wise))


@pytest.mark.parametrize("scale", [None, 0.5, -2.0])
def test_passthrough(scale):
    _, xs = models((13, 77), n=1, dtype=torch.bfloat16)
    out = run("passthrough", xs, None, [{"scale": scale}], out_dtype=torch.bfloat16)
    ref = xs[0].double() * (1.0 if scale is None else scale)
    check(out, ref)
    if scale is None:
        assert torch.equal(out, xs[0])


def test_an_explicit_cache_hits_for_the_same_inputs():
    """A caller's cache serves a second merge of the same tensors (new weights); without one nothing is kept."""
    base, xs = models((64, 64), seed=4)
    cache = tvo.SelectionCache()
    w, d, mp = tv_params(3)
    m = get_method("ties")

    def merge(model_params, keys=None):
        out = torch.empty(base.shape)
        m.merge_tensor(TensorTask(inputs=xs, base=base, model_params=model_params, params={}, name="t.w",
                                  cache=cache, cache_keys=keys), out)
        return out
    merge(mp)
    assert cache.misses == 3 and cache.hits == 0
    mp2 = [dict(p, weight=p["weight"] * 2) for p in mp]
    out = merge(mp2)
    assert cache.hits == 3
    check(out, ref_task_vectors(xs, base, [x * 2 for x in w], d, "ties"))
    merge(mp2, keys=["a", "b", "c"])  # the owner's keys are part of the key
    assert cache.misses == 6
    run("ties", xs, base, mp2)  # no cache given: nothing read or written
    assert (cache.hits, cache.misses, len(cache)) == (3, 6, 6)


def test_pool_cache_is_its_own_and_sees_in_place_changes():
    """The pool caches thresholds per (tensor, checkpoint, parameters), and a borrowed source changed in
    place by torch (its version counter moves) is merged afresh."""
    from pymerge.pool import CheckpointPool
    base, xs = models((64, 64), seed=5)
    w, d, _ = tv_params(3)
    pool = CheckpointPool([{"t.w": x} for x in xs], base={"t.w": base}, residency="mmap")
    assert pool.borrowed and "in place" in pool.describe()
    out = {"t.w": torch.empty(64, 64)}
    pool.materialize(w, into=out, method="ties", density=d)
    assert pool._selection.misses == 3
    pool.materialize([x * 2 for x in w], into=out, method="ties", density=d)
    assert pool._selection.misses == 3  # thresholds reused (the one-call entry keeps the whole selection)
    check(out["t.w"], ref_task_vectors(xs, base, [x * 2 for x in w], d, "ties"))
    with torch.no_grad():
        xs[1].mul_(-3.0)  # same storage, new content, seen through the version counter
    pool.materialize(w, into=out, method="ties", density=d)
    assert pool._selection.misses == 4 and pool._selection.hits == 2  # only checkpoint 1 selected afresh
    check(out["t.w"], ref_task_vectors(xs, base, w, d, "ties"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("method", M)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_task_vector_methods_gpu(method, backend, dtype):
    """GPU backends against the float64 reference; masks must equal the CPU kernel's bit for bit."""
    base, xs = models((129, 1031), dtype=dtype, seed=21)
    w, d, mp = tv_params(3, weights=[0.5, -0.25, 0.75])
    cpu = run(method, xs, base, mp)
    task_out = torch.empty(base.shape, dtype=torch.float32, device="cuda")
    task = TensorTask([x.cuda() for x in xs], base.cuda(), mp, {}, name="t.w", seed=7, backend=backend)
    get_method(method).merge_tensor(task, task_out)
    out = task_out.cpu()
    check(out, ref_task_vectors(xs, base, w, d, method, seed=7, name="t.w"))
    assert torch.equal(out != base.float(), cpu != base.float())
    if backend != "torch":  # the fused GPU passes round exactly as the C++ one
        assert torch.equal(out, cpu.float())


_SIMD_CHILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from pymerge import _cpu
from test_methods_reference import _simd_outputs
torch.save((_cpu.simd_level(), _simd_outputs(torch.load({path!r}))), {out!r})
"""

# method: (per-model params, global params, models, with base)
_SIMD_CASES = {
    "ties": ({"density": 0.4}, {}, 3, True),
    "dare_ties": ({"density": 0.4}, {}, 3, True),
    "dare_linear": ({"density": 0.4}, {}, 3, True),
    "breadcrumbs": ({"density": 0.6, "gamma": 0.05}, {}, 3, True),
    "breadcrumbs_ties": ({"density": 0.6, "gamma": 0.05}, {}, 3, True),
    "della": ({"density": 0.4, "epsilon": 0.15}, {}, 3, True),
    "della_linear": ({"density": 0.4, "epsilon": 0.15}, {}, 3, True),
    "slerp": ({}, {"t": 0.3}, 1, True),
    "nuslerp": ({}, {}, 2, True),
    "multislerp": ({}, {}, 3, True),
    "karcher": ({}, {}, 3, False),
    "model_stock": ({}, {}, 3, True),
    "nearswap": ({}, {"t": 0.01}, 1, True),
    "sce": ({}, {"select_topk": 0.5}, 3, True),
    "ram": ({}, {}, 3, True),
    "ramplus_tl": ({}, {}, 3, True),
}


def _simd_inputs():
    """Awkward sizes (1, 63, 4097, the prime 10007, a 61x167 matrix, and 2^17 + 3, where TIES's selection
    brackets), float32 and bfloat16, each with and without NaN / +-inf; all with denormals and -0.0."""
    sets = []
    for shape in [(1,), (63,), (4097,), (10007,), (61, 167), (131075,)]:
        for dtype in (torch.float32, torch.bfloat16):
            if shape == (131075,) and dtype == torch.float32:
                continue
            for special in (False, True):
                base, xs = models(shape, n=3, seed=len(sets))
                xs = [x.float() for x in xs]
                base = base.float()
                n = base.numel()
                idx = lambda k: [i % n for i in range(k, n + k, 37)]  # noqa: E731
                xs[0].view(-1)[idx(1)] = 1e-40  # denormals
                base.view(-1)[idx(2)] = -0.0  # signed zeros, and deltas of zero
                xs[1].view(-1)[idx(3)] = 0.0
                if special and n > 1:
                    xs[0].view(-1)[idx(5)[::3]] = float("nan")
                    xs[1].view(-1)[idx(6)[::3]] = float("inf")
                    xs[2].view(-1)[idx(7)[::3]] = -float("inf")
                sets.append((base.to(dtype), [x.to(dtype) for x in xs]))
    return sets


def _simd_outputs(sets):
    outs = {}
    for s, (base, xs) in enumerate(sets):
        for name, (mp, glob, n, with_base) in _SIMD_CASES.items():
            inputs = xs[:n] + ([] if with_base else [base])
            w = [0.3 + 0.25 * i for i in range(len(inputs))]
            params = [dict(mp, weight=w[i]) for i in range(len(inputs))]
            out_dtype = torch.bfloat16 if s % 4 == 1 else torch.float32
            out = run(name, inputs, base if with_base else None, params, dict(glob), out_dtype=out_dtype,
                      backend="cpu")
            nan = out.isnan()
            out[nan] = float("nan")  # one NaN: see the test's docstring
            outs[f"{name}/{s}"] = (out.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32).clone(),
                                   int(nan.sum()))
    return outs


def test_every_simd_build_gives_the_same_bits(tmp_path):
    """The AVX-512, AVX2 and portable builds (PYMERGE_SIMD, each in a fresh process: the level is read
    once) of every method kernel give the same bits: task vectors (selection, DARE, DELLA, the fused
    pass), the slerp / model_stock dots and linear combinations, nearswap, sce and ram. A CPU without
    AVX-512 runs its best build for "avx512". NaNs are compared as NaN, at the same places: which
    of two NaNs an add returns (so the sign of NaN + NaN) depends on the operand order each
    build's vectorizer picks."""
    import os
    import subprocess
    import sys

    torch.save(_simd_inputs(), tmp_path / "in.pt")
    got = {}
    for level in ("avx512", "avx2", "scalar"):
        out = tmp_path / f"{level}.pt"
        code = _SIMD_CHILD.format(tests=os.path.dirname(__file__), path=str(tmp_path / "in.pt"), out=str(out))
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYMERGE_SIMD": level},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (level, r.stderr[-3000:])
        got[level] = torch.load(out)
    assert got["scalar"][0] == "scalar"
    assert got["avx2"][0] in ("avx2", "scalar")  # "scalar" only on a CPU without AVX2 + FMA + F16C + BMI2
    want = got["scalar"][1]
    assert len(want) > 300 and sum(n for _, n in want.values()) > 1000  # NaN and inf cases are in
    for level in ("avx512", "avx2"):
        outs = got[level][1]
        assert outs.keys() == want.keys()
        bad = [k for k in want if not torch.equal(outs[k][0], want[k][0])]
        assert not bad, (level, got[level][0], bad[:20])


@pytest.mark.parametrize("shape", [(3, 17, 40), (2, 5, 3, 7), (1, 1, 9)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("piece", [1, 1500, 1 << 20])
def test_della_ranks_a_tensor_of_three_or_more_dims_along_dim_1(shape, backend, piece, monkeypatch):
    """Ranked a run of dim 0's indices at a time now (the whole tensor's argsort took ~70 bytes per element
    of a fused MoE tensor): the mask is the whole-tensor ranking along dim 1's, as mergekit ranks."""
    from pymerge.ops import philox, select
    monkeypatch.setattr(tvo, "_DELLA_PIECE", piece)  # one index, runs of two with a shorter last, the whole
    base, xs = models(shape, seed=4)
    sp = tvo.Sparsifier("della_magprune", 0.4, epsilon=0.15)
    for i, x in enumerate(xs):
        d = x.float() - base.float()
        keys = select.magnitude_keys(d).reshape(d.shape)
        rank = torch.argsort(torch.argsort(keys, dim=1, stable=True), dim=1)
        thr = tvo.della_thresholds(0.4, 0.15, d.shape[1])
        want = (philox.random_bits(7, "t.w", i, 0, d.numel()).reshape(d.shape) < thr[rank]).reshape(-1)
        cpu = backend == "cpu"
        words, (before, after) = tvo._della_mask(x, base, sp, i, "t.w", 7, 0, cpu, 0)
        assert torch.equal(words, tvo.pack_bits(want)) and torch.equal(tvo.della_keep_torch(x, base, sp, i, "t.w", 7), want)
        a = d.abs().double().reshape(-1)
        assert (before, after) == (math.fsum(a.tolist()), math.fsum(a[want].tolist()))  # exact sums, rounded once


@pytest.mark.parametrize("cols", [1, 2, 63, 64, 65, 127, 1000, 4099, 70001])
@pytest.mark.parametrize("values", ["random", "ties", "mostly_zero", "equal", "specials", "low_bits"])
def test_native_della_ranks_are_torchs_stable_argsort(cols, values):
    """The native kernel ranks a row by one comparison sort (up to 64 columns) or an LSD radix sort of (key,
    column) pairs that skips a pass whose digit every key shares: its masks and L1 sums are the torch form's
    (a stable argsort) on rows each side of that length, many equal magnitudes (+0 and -0 alike: ties go by
    column), mostly zeros, one value for all (every pass skipped), NaN, inf and subnormals, and keys differing in their
    lowest digit only (the upper passes skipped)."""
    g = torch.Generator().manual_seed(cols)
    rows = max(1, min(40, 20000 // cols))
    n = rows * cols
    if values == "random":
        d = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g)]
    elif values == "ties":
        d = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, 0.5])[torch.randint(0, 6, (n,), generator=g)]
    elif values == "mostly_zero":  # a digit most keys share, not all (an untouched tensor's deltas, mostly)
        d = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1)
    elif values == "equal":
        d = torch.full((n,), -0.75)
    elif values == "specials":
        d = torch.randn(n, generator=g)
        picks = torch.randint(0, n, (min(n, 40),), generator=g)
        d[picks] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -3e-39, 1e38] * 5)[
            :picks.numel()]
    else:  # 1 + k * 2^-23: keys share all but their lowest 11 bits
        d = 1.0 + torch.randint(0, 2048, (n,), generator=g).float() * 2.0 ** -23
    x, base = d.reshape(rows, cols), torch.zeros(rows, cols)
    sp = tvo.Sparsifier("della_magprune", 0.45, epsilon=0.2)
    want_words, want_sums = tvo._della_mask(x, base, sp, 2, "t.w", 7, 0, False, 0)
    for threads in (1, 2):
        words, sums = tvo._della_mask(x, base, sp, 2, "t.w", 7, 0, True, threads)
        assert torch.equal(words, want_words), (cols, values, threads)
        assert repr(sums) == repr(want_sums), (cols, values, threads)


@pytest.mark.parametrize("shape", [(64, 3), (5000,)])
def test_della_native_and_torch_masks_agree_where_the_top_probability_rounds_to_one(shape):
    """(density - eps) + 2 eps rounds to 1.0 here while density + eps < 1: the top rank's threshold 2^32
    wrapped to 0 as the native kernel's uint32 (that rank never kept: 109 kept of 192, torch 173)."""
    density, epsilon = 0.8902508742160087, 0.10974912578399125
    assert density + epsilon < 1 and tvo.della_thresholds(density, epsilon, shape[-1])[-1] == (1 << 32) - 1
    base, xs = models(shape, seed=9)
    sp = tvo.Sparsifier("della_magprune", density, epsilon=epsilon)
    native = tvo._della_mask(xs[0], base, sp, 0, "t.w", 7, 0, True, 0)
    torch_path = tvo._della_mask(xs[0], base, sp, 0, "t.w", 7, 0, False, 0)
    assert torch.equal(native[0], torch_path[0]) and native[1] == torch_path[1]
