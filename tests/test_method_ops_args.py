"""The method ops' arguments (task-vector pass, sce, ramplus_tl, ram, nearswap, arcee_fusion, group_lincomb):
each wrong kind or value is one line naming the argument, never torch's or pybind11's words from deep
inside, and never a silently wrong result (an API fuzzer's findings)."""
import math

import pytest
import torch

from pymerge.ops import consensus_ops as co
from pymerge.ops import elementwise_mix as em
from pymerge.ops import interp
from pymerge.ops import task_vector_ops as tv


def _tv(inputs, base, out, **kw):
    a = dict(sparsifiers=[tv.Sparsifier()] * len(inputs), weights=[0.5] * len(inputs), consensus=False,
             normalize=False)
    a.update(kw)
    return tv.task_vector_merge(inputs, base, out, a.pop("sparsifiers"), a.pop("weights"), **a)


def _fresh(seed=0, shape=(11, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_transposed_inputs_into_a_flat_out_of_as_many_elements(dtype, backend):
    """Any out of as many elements is taken; on the torch path (float64 inputs, or backend="torch") a transposed
    input made the result's final .view(out.shape) raise torch's "view size is not compatible"."""
    x, y, b = (t.t() for t in _fresh(1, dtype=dtype))  # (6, 11), transposed
    calls = {"nearswap": lambda o: em.nearswap(b, x, 0.3, o, backend),
             "ram": lambda o: em.ram([x, y], b, 1e-5, o, backend),
             "sce": lambda o: co.sce([x, y], b, 0.5, o, backend),
             "ramplus_tl": lambda o: co.ramplus_tl([x, y], b, 0.5, 0.3, 1e-5, o, backend),
             "arcee_fusion": lambda o: co.arcee_fusion(b, x, o, backend)}
    for name, call in calls.items():
        same = torch.empty(6, 11)
        call(same)
        flat = torch.full((66,), float("nan"))
        assert call(flat) is flat, name
        assert torch.equal(flat.view(6, 11), same), name


def test_an_expanded_out_is_refused_in_one_line():
    x, y, b = _fresh(2, shape=(4, 5))
    expanded = lambda: torch.zeros(1).expand(4, 5)  # noqa: E731
    for name, call in {"nearswap": lambda: em.nearswap(b, x, 0.3, expanded()),
                       "ram": lambda: em.ram([x, y], b, 1e-5, expanded()),
                       "sce": lambda: co.sce([x, y], b, 0.5, expanded()),
                       "arcee_fusion": lambda: co.arcee_fusion(b, x, expanded()),
                       "tv_merge": lambda: _tv([x, y], b, expanded()),
                       "group_lincomb": lambda: interp.group_lincomb([x, y], b, True, "whole", torch.ones(1, 3),
                                                                     expanded())}.items():
        with pytest.raises(ValueError, match=f"^{name}: out has elements that share memory"):
            call()


def test_a_stacked_tensor_for_the_inputs_is_named():
    x, y, b = _fresh(3, shape=(4, 5))
    stacked, out = torch.stack([x, y]), torch.empty(4, 5)
    for name, call in {"ram": lambda: em.ram(stacked, b, 1e-5, out), "sce": lambda: co.sce(stacked, b, 0.5, out),
                       "ramplus_tl": lambda: co.ramplus_tl(stacked, b, 0.5, 0.3, 1e-5, out),
                       "group_dots": lambda: interp.group_dots(stacked, b, True, "whole"),
                       "group_lincomb": lambda: interp.group_lincomb(stacked, b, True, "whole", torch.ones(1, 3), out),
                       "tv_merge": lambda: _tv(stacked, b, out)}.items():
        with pytest.raises(TypeError, match=f"^{name}: the inputs must be a sequence of tensors, not a single"):
            call()


@pytest.mark.parametrize("kw, match", [
    (dict(weights=[1e39, 0.0]), r"weights\[0\] is 1e\+39, beyond float32's range"),
    (dict(weights=[float("nan"), 1.0]), r"weights\[0\] is nan; weights must be finite"),
    (dict(weights=[1.0, float("inf")]), r"weights\[1\] is inf; weights must be finite"),
    (dict(weights=[True, False]), "weights must be numbers"),
    (dict(weights=["0.5", "0.5"]), "weights must be numbers"),
    (dict(weights=[0.5]), "got 1 weights for 2 inputs"),
    (dict(lam=1e39), "lam is 1e\\+39; it must be finite and within float32's range"),
    (dict(lam=float("inf")), "lam is inf; it must be finite"),
    (dict(lam=float("nan")), "lam is nan"),
    (dict(lam=None), "lam must be a number, got None"),
    (dict(lam="2"), "lam must be a number"),
])
def test_task_vector_weights_and_lambda_are_checked(kw, match):
    """A weight or lambda of 1e39 became inf in the float32 kernels (the float64 result, 1e39 * 1e-20, is an
    ordinary number) and NaN/inf ones merged in silence: weighted_sum and the pool refused them all."""
    b, x, y = torch.zeros(4), torch.full((4,), 1e-20), torch.zeros(4)
    out = torch.full((4,), 7.0)
    with pytest.raises((TypeError, ValueError), match=match):
        _tv([x, y], b, out, **kw)
    assert out.eq(7.0).all()  # nothing written


def test_task_vector_merge_names_each_wrong_argument():
    x, y, b = _fresh(4, shape=(8,))
    out, sp = torch.empty(8), tv.Sparsifier("magnitude", 0.5)
    cases = [(dict(name=5), TypeError, "name must be a string"),
             (dict(sparsifiers=["magnitude"] * 2), TypeError, "input 0: a sparsifier must be a Sparsifier, got 'magnitude'"),
             (dict(sparsifiers="mm"), ValueError, "need one sparsifier per input"),
             (dict(sparsifiers=[tv.Sparsifier("magnitude", "0.5")] * 2), TypeError,
              "input 0: the sparsifier's density must be a number, got '0.5'"),
             (dict(sparsifiers=[tv.Sparsifier("magnitude_outliers", 0.5, gamma=None)] * 2), TypeError,
              "gamma must be a number"),
             (dict(sparsifiers=[sp] * 2, cache=5), TypeError, "cache must be a SelectionCache or None, got 5")]
    for kw, kind, match in cases:
        with pytest.raises(kind, match=match):
            _tv([x, y], b, out, **kw)
    # and the good call still merges: B + lam * sum_i w_i * (x_i - B), no sparsifier
    _tv([x, y], b, out, weights=[0.25, 0.75], lam=2.0)
    want = b.double() + 2.0 * (0.25 * (x.double() - b.double()) + 0.75 * (y.double() - b.double()))
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param", ["r", "alpha", "eps"])
def test_ramplus_tl_parameters_beyond_float32_are_named(param):
    """mergekit's arithmetic here is float32: a finite 1e39 raised torch's "cannot be converted to type float
    without overflow", naming nothing. Infinity is a limit (alpha=inf: no clamp) and stays."""
    x, y, b = _fresh(5, shape=(30,))
    args = dict(r=0.5, alpha=0.3, eps=1e-5)
    with pytest.raises(ValueError, match=f"ramplus_tl: {param} is 1e\\+39; it must be within float32's range"):
        co.ramplus_tl([x, y], b, **{**args, param: 1e39}, out=torch.empty(30))
    with pytest.raises(TypeError, match=f"ramplus_tl: {param} must be a number, got '0.1'"):
        co.ramplus_tl([x, y], b, **{**args, param: "0.1"}, out=torch.empty(30))
    unclamped = torch.empty(30)
    co.ramplus_tl([x, y], b, 0.5, math.inf, 1e-5, unclamped)
    assert torch.isfinite(unclamped).all()


def test_group_lincomb_coef_kinds_and_gradients():
    """A list coef raised pybind11's four-line TypeError, a meta or sparse one torch's internal errors, and a
    coef requiring grad lost its gradient in silence (the raw op group_lincomb_out refused it)."""
    x, y, b = _fresh(6, shape=(4, 5))
    out = torch.empty(4, 5)
    with pytest.raises(TypeError, match=r"group_lincomb: coef must be a float tensor \[G, K\+1\], got \[\["):
        interp.group_lincomb([x, y], b, True, "whole", [[1.0, 1.0, 1.0]], out)
    with pytest.raises(ValueError, match="group_lincomb: coef is a meta tensor"):
        interp.group_lincomb([x, y], b, True, "whole", torch.ones(1, 3, device="meta"), out)
    with pytest.raises(ValueError, match="group_lincomb: coef: is a sparse_coo tensor"):
        interp.group_lincomb([x, y], b, True, "whole", torch.ones(1, 3).to_sparse(), out)
    coef = torch.tensor([[0.25, 0.75, 1.0]], requires_grad=True)
    for backend in ("auto", "torch"):
        with pytest.raises(RuntimeError, match=r"group_lincomb\(\): out= does not record gradients"):
            interp.group_lincomb([x, y], b, True, "whole", coef, out, backend)
    with torch.no_grad():
        interp.group_lincomb([x, y], b, True, "whole", coef, out)
    want = b.double() + 0.25 * (x.double() - b.double()) + 0.75 * (y.double() - b.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_raw_weighted_sum_names_sparse_weights():
    x, y = _fresh(7, shape=(4, 5))[:2]
    with pytest.raises(ValueError, match="weighted_sum: weights: is a sparse_coo tensor"):
        torch.ops.pymerge.weighted_sum([x, y], torch.ones(2).to_sparse(), torch.float32)


def test_task_vector_weights_as_real_tensors_under_a_mode_or_subclass_and_tensor_densities():
    """check_weights leaves a tensor it cannot read here (a dispatch mode, a subclass) to the op: the new meta
    refusal took those for meta (a review); and a 0-d tensor density, which merged before, is a number."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass
    x, y, b = _fresh(8, shape=(16,))
    want = b.double() + 0.5 * (x.double() - b.double()) + 0.5 * (y.double() - b.double())
    for weights in (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]).as_subclass(Sub)):
        out = torch.empty(16)
        with Passing():
            _tv([x, y], b, out, weights=weights)
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    out = torch.empty(16)
    _tv([x, y], b, out, sparsifiers=[tv.Sparsifier("magnitude", torch.tensor(1.0))] * 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_group_ops_refuse_none_and_packed_types_and_read_a_base_over_out_before_writing():
    """An API fuzzer's findings: group=None was a bare KeyError; a float4 input (floating-point to torch, which
    converts it to nothing) died in torch's copy_ naming neither op nor input; and the torch path of
    group_lincomb read a transposed base over out's own memory again block by block, after earlier blocks had
    written it (wrong from element 2**20 on)."""
    x, y, b = _fresh(2)
    for call in (lambda: interp.group_dots([x, y], b, True, None),
                 lambda: interp.group_lincomb([x, y], b, True, None, torch.ones(1, 3), torch.empty_like(x))):
        with pytest.raises(ValueError, match=r"group must be one of whole, rows, cols, got None$"):
            call()
    packed = getattr(torch, "float4_e2m1fn_x2", None)
    if packed is not None:
        x4 = torch.zeros(11, 6, dtype=torch.uint8).view(packed)
        calls = {"nearswap": lambda: em.nearswap(b, x4, 0.5, torch.empty_like(x)),
                 "ram": lambda: em.ram([x4, y], b, 0.1, torch.empty_like(x)),
                 "sce": lambda: co.sce([x4, y], b, 0.5, torch.empty_like(x)),
                 "arcee_fusion": lambda: co.arcee_fusion(b, x4, torch.empty_like(x)),
                 "tv_merge": lambda: _tv([x4, y], b, torch.empty_like(x)),
                 "group_dots": lambda: interp.group_dots([x4, y], b, True, "whole")}
        for name, call in calls.items():
            with pytest.raises(TypeError, match=rf"^{name}: (input \d|the base) is torch.float4_e2m1fn_x2; a packed "
                                                "type torch converts to no other: unpack it first$"):
                call()
    n = 1100  # 1.21M elements: two of the torch path's blocks
    g = torch.Generator().manual_seed(3)
    for backend in ("torch", "auto"):
        out, x = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        base = out.t()  # out's own memory, transposed
        want = x.double() + 2 * base.double()  # (x - B) + 3 B
        interp.group_lincomb([x], base, True, "whole", torch.tensor([[1.0, 3.0]]), out, backend=backend)
        assert (out.double() - want).abs().max() < 1e-4, backend


def test_functionalized_tensors_have_no_addresses_to_compare():
    """Under torch.func.functionalize every tensor's data_ptr() is 0: out= was refused as 'partially overlaps
    input 1' where nothing overlaps (torch itself then says it cannot functionalize the op)."""
    from pymerge.ops._checks import addresses_unknown
    seen = []

    def f(a):
        seen.append(addresses_unknown([a]))
        return a + 1
    torch.func.functionalize(f)(torch.zeros(3))
    assert seen == [True] and not addresses_unknown([torch.zeros(3)])
