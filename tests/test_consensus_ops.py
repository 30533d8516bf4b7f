"""The native passes of sce, ramplus_tl and arcee_fusion (csrc/cpu/consensus.cpp, pymerge/ops/consensus_ops.py):
float64 references (tests/mergekit_rest_reference.py) on awkward sizes (empty, 1, primes, around the
1024-element block and the selection's 2^17 bracket threshold), float32/bfloat16 inputs and outputs;
NaN and inf placed as the torch path (mergekit's own ops) places them; ties; thread-count independence.
"""
import pytest
import torch

import mergekit_rest_reference as ref
from pymerge import _native
from pymerge.ops import consensus_ops as co, elementwise_mix as em, interp, task_vector_ops as tvo

pytestmark = pytest.mark.skipif(_native.cpu is None or not hasattr(_native.cpu, "sce_merge"),
                                reason="the C++ extension is not built")

SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (13, 317), (401, 331)]  # the last: > 2^17 elements


def data(shape, n, seed, dtype=torch.float32, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + scale * torch.randn(shape, generator=g) * (i + 1) for i in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def run(op, *args, out_dtype=torch.float32, shape, **kw):
    out = torch.empty(shape, dtype=out_dtype)
    op(*args, out, **kw)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.05, 0.0])
def test_sce_matches_float64(shape, dtype, topk):
    base, xs = data(shape, 3, 1, dtype)
    got = run(co.sce, xs, base, topk, shape=shape)
    want = ref.sce(base, xs, topk)
    assert rel(got, want) <= 1e-6, rel(got, want)
    if topk not in (1.0, 0.0) and got.numel() > 1:  # the mask is the k largest variances, exactly
        var = torch.stack([x.double() - base.double() for x in xs]).var(0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * topk)
        kept = (got.reshape(-1) != base.float().reshape(-1)).sum()
        assert int(kept) <= k


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ramplus_tl_matches_float64(shape, dtype):
    base, xs = data(shape, 4, 2, dtype)
    xs[1] = base.clone()  # a model that moves nothing: its ratio is 0 / eps
    xs[2].reshape(-1)[::3] = base.reshape(-1)[::3]  # unique and shared elements both present
    got = run(co.ramplus_tl, xs, base, 0.3, 0.5, 1e-5, shape=shape)
    assert rel(got, ref.ram(base, xs, 1e-5, plus=(0.3, 0.5))) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arcee_fusion_matches_float64(shape, dtype):
    base, xs = data(shape, 1, 3, dtype, scale=0.3)
    got = run(co.arcee_fusion, base, xs[0], shape=shape)
    if got.numel():  # (the reference's quantiles need an element)
        assert rel(got, ref.arcee_fusion(base, xs[0])) <= 1e-6


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rounded_outputs(out_dtype):
    shape = (37, 101)
    base, xs = data(shape, 3, 4)
    for got, want in ((run(co.sce, xs, base, 0.3, shape=shape, out_dtype=out_dtype), ref.sce(base, xs, 0.3)),
                      (run(co.ramplus_tl, xs, base, 0.1, 0.2, 1e-5, shape=shape, out_dtype=out_dtype),
                       ref.ram(base, xs, 1e-5, plus=(0.1, 0.2))),
                      (run(co.arcee_fusion, base, xs[0], shape=shape, out_dtype=out_dtype),
                       ref.arcee_fusion(base, xs[0]))):
        assert got.dtype == out_dtype
        assert torch.equal(got, want.to(out_dtype)) or rel(got, want) <= 2 ** -8


@pytest.mark.parametrize("n, topk", [(3001, 0.7), (3001, 0.01), (200_003, 0.5), (200_003, 0.01)])
def test_sce_ties_pick_torch_topk_elements(n, topk):
    # few distinct variances: the cut falls inside a long run of ties (k * 64 <= n: partial_sort, else nth_element)
    g = torch.Generator().manual_seed(n)
    base = torch.zeros(n)
    xs = [torch.randint(-2, 3, (n,), generator=g).float() * 0.25 for _ in range(3)]
    out = run(co.sce, xs, base, topk, shape=(n,))
    var = torch.stack(xs).var(0, unbiased=False)
    k = int(torch.count_nonzero(var) * topk)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[var.abs().topk(k).indices] = True
    assert int((var == var[var.abs().topk(k).indices[-1]]).sum()) > 1  # there are ties at the cut
    assert torch.equal(out != 0, (run(co.sce, xs, base, topk, shape=(n,), backend="torch") != 0))
    assert not bool((out[~mask] != 0).any())  # only the picked elements move
    assert rel(out, ref.sce(base, xs, topk)) <= 1e-6


NAN2 = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)[0]  # a NaN with another payload


@pytest.mark.parametrize("case", ["distinct", "ties above the cut", "ties below the cut", "cut in ties",
                                  "nan above the cut", "nans at the cut", "zero variances"])
@pytest.mark.parametrize("n", [5, 1031, 200_003])
def test_sce_mask_is_torch_topk(case, n):
    """torch.topk's elements, whether the cut splits a run of equal variances or NaNs of two payloads or not
    (the pairs hold a float32 and an int32 where torch's hold a float64 and an int64)."""
    g = torch.Generator().manual_seed(n)
    v = torch.rand(n, generator=g) + 0.5  # models v and -v: variance v^2, every element nonzero
    topk = 0.6
    k = int(n * topk)
    order = v.argsort(descending=True)
    if case == "ties above the cut":
        v[order[:k // 2]] = 2.0
    elif case == "ties below the cut":
        v[order[k:]] = 0.25
    elif case == "cut in ties":
        v[order[max(k - 2, 0):k + 2]] = float(v[order[k]])
    elif case == "nan above the cut":
        v[order[:2]] = float("nan")
    elif case == "nans at the cut":
        v[order[:k + 2]] = torch.where(torch.arange(k + 2) % 2 == 0, float("nan"), NAN2)  # NaNs rank first
    elif case == "zero variances":
        v[::2] = 0  # not counted in k
    xs, base = [v, -v], torch.zeros(n)
    got = run(co.sce, xs, base, topk, shape=(n,))
    want = run(co.sce, xs, base, topk, shape=(n,), backend="torch")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def nan_inf_case(shape, n, seed):
    base, xs = data(shape, n, seed)
    flat = [x.view(-1) for x in xs]
    flat[0][3] = float("nan")
    flat[-1][5] = float("inf")
    flat[0][7] = float("-inf")
    base.view(-1)[11] = float("nan")
    return base, xs


@pytest.mark.parametrize("shape", [(29, 41), (401, 331)])
def test_nan_and_inf_as_the_torch_path(shape):
    base, xs = nan_inf_case(shape, 3, 5)
    cases = [
        (lambda be: run(co.sce, xs, base, 0.5, shape=shape, backend=be)),
        (lambda be: run(co.sce, xs, base, 1.0, shape=shape, backend=be)),
        (lambda be: run(co.ramplus_tl, xs, base, 0.1, 0.2, 1e-5, shape=shape, backend=be)),
        (lambda be: run(co.arcee_fusion, base, xs[1], shape=shape, backend=be)),
    ]
    for i, case in enumerate(cases):
        native, torch_path = case("auto"), case("torch")
        assert torch.equal(native.isnan(), torch_path.isnan()), i
        assert torch.equal(native.isinf(), torch_path.isinf()), i
        fin = native.isfinite()
        assert rel(native[fin], torch_path[fin]) <= 1e-6, i


def test_native_matches_the_torch_path_and_any_thread_count():
    shape = (263, 509)
    base, xs = data(shape, 3, 6)
    for op, args in ((co.sce, (xs, base, 0.4)), (co.ramplus_tl, (xs, base, 0.2, 0.3, 1e-5)),
                     (co.arcee_fusion, (base, xs[2]))):
        one = run(op, *args, shape=shape, num_threads=1)
        two = run(op, *args, shape=shape, num_threads=2)
        assert torch.equal(one, two), op.__name__
        assert rel(one, run(op, *args, shape=shape, backend="torch")) <= 1e-6, op.__name__
    # ramplus_tl's counts and arcee_fusion's scores are exact: the torch path agrees bit for bit
    for op, args in ((co.ramplus_tl, (xs, base, 0.2, 0.3, 1e-5)), (co.arcee_fusion, (base, xs[2]))):
        assert torch.equal(run(op, *args, shape=shape), run(op, *args, shape=shape, backend="torch"))


def test_arcee_fusion_negative_scores_fall_back_to_value_order():
    # x == B on a row gives KL 0 there; float32 rounding can make a row's KL slightly negative
    g = torch.Generator().manual_seed(7)
    base = torch.randn(64, 33, generator=g)
    x = base + 1e-7 * torch.randn(64, 33, generator=g)
    x[::2] = base[::2] + 0.5 * torch.randn(32, 33, generator=g)
    assert rel(run(co.arcee_fusion, base, x, shape=x.shape), ref.arcee_fusion(base, x)) <= 1e-6
    assert bool((co.importance(x, base) < 0).any())  # the case this test is for (the assert above checks it)


def test_many_models():
    """65 and 130 models (the native kernels once stopped at 64): the float64 references still hold."""
    for n in (65, 130):
        base, xs = data((7, 5), n, 4)
        xs[3] = base.clone()  # a model that moves nothing
        assert rel(run(co.sce, xs, base, 0.5, shape=(7, 5)), ref.sce(base, xs, 0.5)) <= 1e-6
        assert rel(run(co.ramplus_tl, xs, base, 0.3, 0.5, 1e-5, shape=(7, 5)), ref.ram(base, xs, 1e-5, plus=(0.3, 0.5))) <= 1e-6


def test_kernels_refuse_bad_arguments():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="sce_merge: one weight per input"):
        _native.cpu.sce_merge([x.data_ptr()], [0], x.data_ptr(), 0, 4, 0, [1.0, 2.0], x.data_ptr(), 0)
    with pytest.raises(ValueError, match="sce_topk_mask: need 1 <= k <= n"):
        _native.cpu.sce_topk_mask(x.data_ptr(), 4, 5, x.data_ptr())
    with pytest.raises(ValueError, match="ram_counts: bad dtype code"):
        _native.cpu.ram_counts([x.data_ptr()], [9], x.data_ptr(), 0, 4, 1e-5)
    with pytest.raises(ValueError, match="fusion_blend: bad output dtype"):
        _native.cpu.fusion_blend(x.data_ptr(), 0, x.data_ptr(), 0, 4, x.data_ptr(), 0.0, x.data_ptr(), 3)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_inputs_of_another_shape_are_refused_on_every_backend(backend):
    """The native kernels see element counts only: a (6, 4) input over a (4, 6) base was merged element by
    element (backend="torch" raised a broadcasting error), and group_dots / group_lincomb took it on both."""
    b, x, out = torch.randn(4, 6), torch.randn(6, 4), torch.empty(4, 6)
    calls = {
        "nearswap": lambda: em.nearswap(b, x, 0.1, out, backend=backend),
        "ram": lambda: em.ram([x.reshape(-1)], b, 1e-3, out, backend=backend),
        "sce": lambda: co.sce([x, x], b, 0.5, out, backend=backend),
        "ramplus_tl": lambda: co.ramplus_tl([x, x], b, 0.5, 0.2, 1e-3, out, backend=backend),
        "arcee_fusion": lambda: co.arcee_fusion(b, x, out, backend=backend),
        "group_lincomb": lambda: interp.group_lincomb([x], b, True, "rows", torch.randn(6, 2), out, backend=backend),
    }
    for op, call in calls.items():
        shape = r"\(24,\)" if op == "ram" else r"\(6, 4\)"
        with pytest.raises(ValueError, match=rf"^{op}: input 0 has shape {shape} but the base has \(4, 6\)$"):
            call()
    with pytest.raises(ValueError, match=r"^group_dots: input 1 has shape \(4, 6\) but input 0 has \(6, 4\)$"):
        interp.group_dots([x, b], None, False, "rows", backend=backend)
    with pytest.raises(ValueError, match="^sce: output 0 has 5 elements, the op works on 24$"):
        co.sce([b, b], b, 0.5, torch.empty(5), backend=backend)  # the torch path: a broadcasting error
    with pytest.raises(ValueError, match="^ram: needs at least one input$"):
        em.ram([], b, 1e-3, out, backend=backend)
    em.nearswap(b, b + 1, 0.5, out.view(24), backend=backend)  # any output shape of as many elements, as before


OUT_OPS = {  # every op that writes an out= it is given (task_vector_merge: tests/test_library_ops.py's too)
    "nearswap": lambda b, xs, out, backend: em.nearswap(b, xs[0], 0.3, out, backend=backend),
    "ram": lambda b, xs, out, backend: em.ram(xs, b, 1e-5, out, backend=backend),
    "sce": lambda b, xs, out, backend: co.sce(xs, b, 1.0, out, backend=backend),
    "ramplus_tl": lambda b, xs, out, backend: co.ramplus_tl(xs, b, 0.5, 1.5, 1e-5, out, backend=backend),
    "arcee_fusion": lambda b, xs, out, backend: co.arcee_fusion(b, xs[0], out, backend=backend),
    "group_lincomb": lambda b, xs, out, backend: interp.group_lincomb(
        xs, b, True, "whole", torch.tensor([[0.5, 0.5, 1.0]]), out, backend=backend),
    "task_vector_merge": lambda b, xs, out, backend: tvo.task_vector_merge(
        xs, b, out, [tvo.Sparsifier()] * 2, [1.0, 1.0], consensus=False, normalize=False, backend=backend),
}


@pytest.mark.parametrize("op", sorted(OUT_OPS))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_written_out_is_seen_by_autograd(op, backend):
    """The native kernels write by address: a graph that had saved out backpropagated its new values in
    silence (only weighted_sum bumped the version), and an input or out requiring grad gave a detached
    result or a leaf written in place. Now: torch's "modified by an inplace operation" error, and out=
    refused where a gradient is wanted, as torch's own out= ops and weighted_sum do."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(6, generator=g)
    xs = [b + torch.randn(6, generator=g) for _ in range(2)]
    p, out = torch.ones(6, requires_grad=True), torch.zeros(6)
    loss = (p * out).sum()  # saves out (zeros) for d loss / d p
    with torch.no_grad():
        OUT_OPS[op](b, xs, out, backend)
    assert out.abs().sum() > 0  # written
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    for wanting in ("input", "out"):
        xs_g = [x.clone().requires_grad_(wanting == "input") for x in xs]
        out_g = torch.zeros(6, requires_grad=wanting == "out")
        version = out_g._version
        with pytest.raises(RuntimeError, match="out= does not record gradients"):
            OUT_OPS[op](b, xs_g, out_g, backend)
        assert not out_g.detach().any() and out_g._version == version  # refused before it wrote
        with torch.no_grad():
            OUT_OPS[op](b, xs_g, out_g, backend)  # as torch: fine without grad mode


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_group_lincomb_writes_a_non_contiguous_out(backend):
    """backend="torch" wrote the whole-tensor combination into reshape's copy of a transposed out, which
    stayed all zeros."""
    g = torch.Generator().manual_seed(1)
    xs, base = [torch.randn(4, 6, generator=g) for _ in range(2)], torch.randn(4, 6, generator=g)
    coef = torch.tensor([[0.25, 0.5, 1.0]])
    want = base.double() + 0.25 * (xs[0].double() - base.double()) + 0.5 * (xs[1].double() - base.double())
    for group in ("whole", "rows", "cols"):
        rows = {"whole": 1, "rows": 4, "cols": 6}[group]
        out = torch.zeros(6, 4).t()
        interp.group_lincomb(xs, base, True, group, coef.expand(rows, 3).contiguous(), out, backend=backend)
        assert (out.double() - want).abs().max() < 1e-6, group


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_group_dots_of_empty_rows_give_a_group_each(backend):
    """A (5, 0) tensor has 5 empty rows (torch's per-row sum gives 5 zeros); group_dots gave 0 groups."""
    assert interp.view_2d((5, 0), "rows") == (5, 0) and interp.view_2d((0, 5), "cols") == (0, 5)
    assert interp.view_2d((2, 0, 3), "rows") == (0, 3) and interp.view_2d((2, 0, 3), "cols") == (2, 0)
    assert interp.view_2d((), "rows") == (1, 1) and interp.view_2d((7,), "cols") == (7, 1)
    for shape, group in (((5, 0), "rows"), ((0, 5), "cols")):
        g = interp.group_dots([torch.ones(shape)] * 2, None, False, group, backend=backend)
        assert g.shape == (5, 2, 2) and not g.any()


@pytest.mark.parametrize("op", ["sce", "arcee_fusion"])
def test_any_out_of_as_many_elements_on_the_torch_path_too(op):
    """The cpu backend takes an out of another shape with as many elements; the torch path raised a size
    mismatch from copy_."""
    b, xs = data((4, 6), 2, 5)
    outs = []
    for backend in ("cpu", "torch"):
        out = torch.empty(24)
        OUT_OPS[op](b, xs, out, backend)
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_group_ops_check_their_arguments_on_every_backend(backend):
    """The torch path took a misspelt group as the whole tensor, wrote an int or float64 out (truncated),
    used row 0 of a coef with too many rows, and raised AttributeError for sub without a base; the cpu path
    raised KeyError for the group name."""
    xs, base = [torch.randn(4, 6), torch.randn(4, 6)], torch.randn(4, 6)
    calls = [
        (lambda: interp.group_dots(xs, None, False, "bogus", backend=backend),
         "group_dots: group must be one of whole, rows, cols, got 'bogus'"),
        (lambda: interp.group_dots(xs, None, True, "rows", backend=backend), "group_dots: sub needs a base"),
        (lambda: interp.whole_dot_parts(xs, None, True, backend=backend), "whole_dots: sub needs a base"),
        (lambda: interp.group_lincomb(xs, None, True, "rows", torch.randn(4, 3), torch.empty(4, 6), backend=backend),
         "group_lincomb: sub needs a base"),
        (lambda: interp.group_lincomb(xs, base, True, "whole", torch.randn(2, 3), torch.empty(4, 6), backend=backend),
         "group_lincomb: coef has 6 entries; 1 groups x 3 need 3"),
        (lambda: interp.group_lincomb(xs, base, True, "rows", torch.randn(6, 3), torch.empty(4, 6), backend=backend),
         "group_lincomb: coef has 18 entries; 4 groups x 3 need 12"),
    ] + [(lambda dtype=dtype: interp.group_lincomb(xs, base, True, "whole", torch.randn(1, 3),
                                                   torch.empty(4, 6, dtype=dtype), backend=backend),
          f"group_lincomb: out has unsupported dtype {dtype}; supported: bfloat16, float16, float32")
         for dtype in (torch.float64, torch.int32)]
    for call, message in calls:
        with pytest.raises((ValueError, TypeError), match=f"^{message}$"):
            call()


@pytest.mark.parametrize("op", sorted(OUT_OPS))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bad", ["int32 out", "int64 out", "float64 out", "complex input", "bool input"])
def test_an_out_or_input_no_kernel_computes_in_is_refused(op, backend, bad):
    """The torch paths (taken wherever the native kernel declined: an int out, a complex or bool input) wrote
    ints, truncated, into an int out, dropped an imaginary part and computed bools as 0/1, with no error."""
    b, xs = data((4, 6), 2, 3)
    out = torch.full((4, 6), 7.0)  # (not empty: uninitialized NaNs would fail the equality below)
    if bad.endswith("out"):
        out = torch.full((4, 6), 7, dtype=getattr(torch, bad.split()[0]))
        message = rf"^{op.replace('task_vector_merge', 'tv_merge')}: out has unsupported dtype {out.dtype}"
    else:
        xs = [x.to(torch.complex64) + 1j if bad == "complex input" else x > 0 for x in xs]
        message = r"input \d is torch\.(complex64|bool); the inputs must be floating-point$"
    before = out.clone()
    with pytest.raises(TypeError, match=message):
        OUT_OPS[op](b, xs, out, backend)
    assert torch.equal(out, before)


@pytest.mark.parametrize("call", [
    lambda b, x, out: co.sce([x, x], b, float("nan"), out),
    lambda b, x, out: co.ramplus_tl([x, x], b, float("nan"), 0.2, 1e-3, out),
    lambda b, x, out: co.ramplus_tl([x, x], b, 0.5, float("nan"), 1e-3, out),
    lambda b, x, out: co.ramplus_tl([x, x], b, 0.5, 0.2, float("nan"), out),
    lambda b, x, out: em.nearswap(b, x, float("nan"), out),
    lambda b, x, out: em.ram([x], b, float("nan"), out),
])
def test_a_nan_parameter_is_refused_by_name(call):
    """select_topk=nan raised 'cannot convert float NaN to integer'; a NaN t or eps computed NaNs or the base
    without a word. (A NaN boost stays: ramplus_tl derives one from 0/0 with epsilon 0, a NaN tensor as mergekit's.)"""
    b, (x,) = data((4, 6), 1, 4)
    with pytest.raises(ValueError, match=r"^(sce|ramplus_tl|nearswap|ram): (select_topk|r|alpha|eps|t) "
                                         r"is nan; give a number$"):
        call(b, x, torch.empty(4, 6))


def test_a_refused_call_leaves_the_version_of_out():
    """A call refused after the common checks (a coef of the wrong size, boosts of the wrong length) bumped
    out's version though it wrote nothing: a graph that had saved it then raised on backward (a review)."""
    b = torch.randn(6)
    xs, out = [b + 1, b - 1], torch.zeros(6)
    for call in (lambda: interp.group_lincomb(xs, b, True, "whole", torch.ones(5), out),
                 lambda: em.ram(xs, b, 1e-5, out, boosts=[1.0])):
        with pytest.raises(ValueError):
            call()
        assert out._version == 0


def test_ramplus_tl_with_epsilon_0_and_an_unmoved_model_gives_mergekit_nans():
    """epsilon 0 and a model whose delta is zero over a whole tensor: rho = 0 / 0, NaN there as in mergekit
    (a review: the NaN boost this derives was refused by ram's parameter check, a traceback mid-merge)."""
    base = torch.zeros(4)
    for backend in ("cpu", "torch"):
        out = torch.empty(4)
        co.ramplus_tl([base.clone(), torch.ones(4)], base, 0.1, 0.2, 0.0, out, backend=backend)
        assert torch.isnan(out).all(), (backend, out)


@pytest.mark.parametrize("case", ["random", "ties", "edges at the quartiles", "all nan", "one", "zeros and denormals"])
def test_fusion_quartiles_by_histogram_are_kthvalues(case):
    """On a GPU arcee_fusion's three quartiles come from two histograms of the values' bits (torch.kthvalue runs
    one thread block on a CUDA tensor): the values kthvalue gives, for non-negative float32 with ties, -0.0,
    denormals, inf and NaN of either sign at the quartile ranks themselves."""
    g = torch.Generator().manual_seed(len(case))
    n = {"one": 1}.get(case, 65537)
    flat = torch.randn(n, generator=g).abs()
    if case == "ties":
        flat[: 3 * n // 4] = flat[0]
    elif case == "edges at the quartiles":               # q1 -0.0 / +0.0, median inf, q3 NaN (both signs)
        q = n // 4
        flat[:q + 2] = torch.tensor([-0.0, 0.0]).repeat(q // 2 + 1)[:q + 2]
        flat[q + 2: 2 * q + 2] = float("inf")
        nan = torch.tensor([float("nan")]).view(torch.int32)
        flat[2 * q + 2:] = torch.cat([nan, nan | torch.tensor([-2**31], dtype=torch.int32)]).view(torch.float32).repeat(n)[: n - 2 * q - 2]
    elif case == "all nan":
        flat[:] = float("nan")
    elif case == "zeros and denormals":
        flat[: n // 2] = 0.0
        flat[n // 2: 3 * n // 4] = torch.tensor([1, 2, 0x7FFFFF], dtype=torch.int32).view(torch.float32).repeat(n)[: 3 * n // 4 - n // 2]
    assert not bool((flat < 0).any())
    pos = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    got = co._floats(co.quartile_keys(flat, pos), flat.device)
    want = [torch.kthvalue(flat, p + 1).values for p in pos]
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.dim() == 0
        assert (a.isnan() and b.isnan()) or (a == b and not a.isnan()), (case, a, b)
    if case == "edges at the quartiles":
        assert got[1].isinf() and got[2].isnan()  # the quartiles do land on the edge values


def _method_calls(x, base, out):
    """Each method op over inputs [x, x], the base and out (as the pool calls them)."""
    return {
        "nearswap": lambda **k: em.nearswap(base, x, 0.5, out, **k),
        "ram": lambda **k: em.ram([x, x], base, 0.0, out, **k),
        "sce": lambda **k: co.sce([x, x], base, 1.0, out, **k),
        "ramplus_tl": lambda **k: co.ramplus_tl([x, x], base, 0.1, 0.2, 0.0, out, **k),
        "arcee_fusion": lambda **k: co.arcee_fusion(base, x, out, **k),
        "group_lincomb": lambda **k: interp.group_lincomb([x, x], base, True, "whole", torch.ones(1, 3), out, **k),
        "group_dots": lambda **k: interp.group_dots([x, x], base, True, "whole", **k),
    }


@pytest.mark.parametrize("op", sorted(_method_calls(None, None, None)))
def test_method_ops_name_a_tensor_on_another_device_and_refuse_unknown_backends(op):
    """A meta input beside CPU ones raised torch's own error (naming no input, or a copy); an unknown backend
    name ran the torch path in silence (an audit). Both one-line ValueErrors now, before any write."""
    x, base, out = torch.ones(8), torch.zeros(8), torch.full((8,), 7.0)
    meta = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="is on meta but .* is on cpu"):
        _method_calls(meta, base, out)[op]()
    if op != "group_dots":
        with pytest.raises(ValueError, match="output 0 is on meta but .* is on cpu"):
            _method_calls(x, base, torch.empty(8, device="meta"))[op]()
    with pytest.raises(ValueError, match="backend must be one of .*got 'bogus'"):
        _method_calls(x, base, out)[op](backend="bogus")
    assert torch.equal(out, torch.full((8,), 7.0))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_group_dots_refuses_inputs_that_want_a_gradient(backend):
    """Its kernel's result was silently detached (the torch path tracked some groups): refused in one line."""
    x = torch.randn(4, 5, requires_grad=True)
    base = torch.zeros(4, 5)
    for group in ("whole", "rows"):
        with pytest.raises(RuntimeError, match="group_dots\\(\\): records no gradient"):
            interp.group_dots([x, x.detach()], base, True, group, backend=backend)
    with torch.no_grad():
        g = interp.group_dots([x, x], base, True, "whole", backend=backend)
    assert torch.allclose(g[0, 0, 0], (x.detach().double() ** 2).sum())
