"""pymerge's torch.library custom ops: opcheck on every op, torch.compile bit-exact against eager,
CUDA-graph capture (GPU), and the native codes agreeing with Python's."""
import os
import re

import pytest
import torch
from torch.library import opcheck

import pymerge
from pymerge import _native
from pymerge.ops import interp, library, select
from pymerge.ops import task_vector_ops as tvo

OPS = ("weighted_sum", "weighted_sum_out", "weighted_sum_many", "weighted_sum_many_out", "tv_merge_out",
       "select_ranks", "group_dots", "group_lincomb_out")


def rand(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype)


def test_every_op_is_registered_and_fake_shapes_are_right():
    assert all(hasattr(torch.ops.pymerge, name) for name in OPS)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        xs = [torch.empty(5, 3, dtype=torch.bfloat16), torch.empty(5, 3)]
        w = torch.empty(4, 2)
        one = torch.ops.pymerge.weighted_sum(xs, w[0], torch.float16)
        many = torch.ops.pymerge.weighted_sum_many(xs, w, torch.float32)
        ranks = torch.ops.pymerge.select_ranks(xs[0], None, [0, 1, 2], True)
        dots = torch.ops.pymerge.group_dots(xs, None, False, 5, 3, interp.GROUPS["rows"])
    assert (one.shape, one.dtype) == ((5, 3), torch.float16)
    assert len(many) == 4 and all(m.shape == (5, 3) and m.dtype == torch.float32 for m in many)
    assert ranks.shape == (3, 2) and ranks.dtype == torch.int64
    assert dots.shape == (5, 3) and dots.dtype == torch.float64


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 13), (4099,)])
def test_opcheck_weighted_sum_ops(shape):
    xs = [torch.randn(shape).to(d) for d in (torch.bfloat16, torch.float32, torch.float16)]
    w = torch.tensor([0.5, -1.25, 2.0])
    rows = torch.tensor([[0.5, -1.25, 2.0], [1.0, 0.0, 0.25]])
    opcheck(torch.ops.pymerge.weighted_sum, (xs, w, torch.float32))
    opcheck(torch.ops.pymerge.weighted_sum_many, (xs, rows, torch.bfloat16))
    opcheck(torch.ops.pymerge.weighted_sum_out, (xs, w, torch.empty(shape, dtype=torch.float16)))
    outs = [torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape)]
    opcheck(torch.ops.pymerge.weighted_sum_many_out, (xs, rows, outs), {"num_threads": 1})


def _tv_case(n, seed):
    base = rand(n, torch.float32, seed)
    xs = [base + 0.1 * rand(n, torch.bfloat16, seed + 1 + i).float() for i in range(3)]
    sps = [tvo.Sparsifier("magnitude", 0.5, rescale="l1"), tvo.Sparsifier("random", 0.3, rescale="inverse_density"),
           tvo.Sparsifier("della_magprune", 0.5, epsilon=0.1)]
    plans = [tvo.plan_model(x, base, sp, w, i, name="t", seed=7) for i, (x, sp, w) in enumerate(zip(xs, sps, (1.0, 0.5, 0.25)))]
    ints, floats = tvo.plan_rows(plans)
    return xs, base, [p.bits for p in plans], ints, floats


@pytest.mark.parametrize("n", [1, 97, 5000])
def test_opcheck_tv_merge_out(n):
    xs, base, bits, ints, floats = _tv_case(n, n)
    for consensus in (False, True):
        out = torch.empty(n, dtype=torch.bfloat16)
        seed = -5  # seeds >= 2^63 travel as negative int64s (2^64 - 5 here)
        opcheck(torch.ops.pymerge.tv_merge_out,
                (xs, base, bits, ints, floats, consensus, True, 0.7, 1.75, seed, 11, 13, 0, out))


def test_tv_merge_out_matches_the_torch_fallback():
    xs, base, bits, ints, floats = _tv_case(4099, 3)
    plans = tvo.plans_from_rows(bits, ints, floats)
    got = torch.empty(4099)
    want = torch.empty(4099)
    kw = dict(consensus=True, normalize=True, lam=0.9, divisor=1.75, name="t", seed=7)
    tvo.merge_planned(xs, base, plans, got, backend="cpu", **kw)
    tvo.merge_planned(xs, base, plans, want, backend="torch", **kw)
    assert torch.allclose(got, want, atol=1e-6, equal_nan=True)


def test_more_task_vectors_than_one_cuda_launch_holds_run_eagerly(monkeypatch):
    """A GPU install without Triton: the CUDA extension's launch holds MAX_TV_MODELS models, and a TIES merge
    of more failed in it (auto now picks eager torch there; an explicit backend="cuda" still says so)."""
    from types import SimpleNamespace
    monkeypatch.setattr(tvo, "pick_backend", lambda device, backend="auto": "cuda" if backend == "auto" else backend)
    monkeypatch.setattr(_native, "cuda", SimpleNamespace(MAX_TV_MODELS=4))
    n = 3001
    base = rand(n, torch.float32, 1)
    xs = [base + 0.1 * rand(n, torch.bfloat16, 2 + i).float() for i in range(5)]
    sps = [tvo.Sparsifier("magnitude", 0.5)] * 3 + [tvo.Sparsifier("random", 0.3, rescale="inverse_density")] * 2
    kw = dict(consensus=True, normalize=True, lam=0.9, name="t", seed=7)
    got, want = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    tvo.task_vector_merge(xs, base, got, sps, [1.0, 0.5, 0.25, 2.0, 1.0], **kw)
    tvo.task_vector_merge(xs, base, want, sps, [1.0, 0.5, 0.25, 2.0, 1.0], backend="torch", **kw)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    for args in ((xs[:4], sps[:4], [1.0] * 4, "auto"), (xs, sps, [1.0] * 5, "cuda")):  # the CUDA launch's to run
        with pytest.raises(ValueError, match="backend 'cuda' needs cuda tensors"):
            tvo.task_vector_merge(args[0], base, got, args[1], args[2], backend=args[3], **kw)


def test_opcheck_select_and_interp_ops():
    x, b = rand(1000, torch.bfloat16, 1), rand(1000, torch.float32, 2)
    opcheck(torch.ops.pymerge.select_ranks, (x, b, [0, 1, 500, 1000], True))
    opcheck(torch.ops.pymerge.select_ranks, (x, None, [3, 999], False))
    xs = [rand(12 * 7, torch.float32, 3).view(12, 7), rand(12 * 7, torch.bfloat16, 4).view(12, 7)]
    base = rand(12 * 7, torch.float32, 5).view(12, 7)
    for group, (rows, cols) in (("whole", (1, 84)), ("rows", (12, 7)), ("cols", (12, 7))):
        g = interp.GROUPS[group]
        opcheck(torch.ops.pymerge.group_dots, (xs, base, True, rows, cols, g))
        opcheck(torch.ops.pymerge.group_dots, (xs, None, False, rows, cols, g))
        n_groups = (1, rows, cols)[g]
        coef = torch.randn(n_groups, 3)
        opcheck(torch.ops.pymerge.group_lincomb_out, (xs, base, True, rows, cols, g, coef, torch.empty(12, 7)))


def test_select_op_agrees_with_the_torch_path():
    x, b = rand(5000, torch.float16, 9), rand(5000, torch.float32, 10)
    ranks = [0, 1, 2500, 4999, 5000]
    for desc in (True, False):
        assert select.select_ranks(x, b, ranks, desc, "cpu") == select.select_ranks(x, b, ranks, desc, "torch")


def test_compiled_fullgraph_matches_eager_bit_for_bit():
    xs = [rand(4099, torch.bfloat16, i) for i in range(4)]
    base = rand(4099, torch.float32, 9)

    def f(xs, base):
        y = pymerge.weighted_sum(xs, [0.25, 0.5, -0.75, 1.0], out_dtype=torch.float32)
        a, b = pymerge.weighted_sum_many(xs, [[1.0, 0.0, 0.5, 0.25], [0.1, 0.2, 0.3, 0.4]])
        out = torch.empty_like(base)
        torch.ops.pymerge.weighted_sum_out([y, base], torch.tensor([0.5, 0.5]), out)
        dots = torch.ops.pymerge.group_dots([y, out], base, True, 1, 4099, 0)
        return y * 2, a, b, out, dots

    eager = f(xs, base)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")(xs, base)
    for e, c in zip(eager, compiled):
        assert e.dtype == c.dtype and torch.equal(e.view(torch.uint8) if e.dtype != torch.float64 else e, c.view(torch.uint8) if c.dtype != torch.float64 else c)


def test_group_lincomb_wrapper_compiles_fullgraph():
    """Its coef storage test ran while tracing (the op tests it when it runs): a graph break (an audit)."""
    from pymerge.ops import interp
    g = torch.Generator().manual_seed(5)
    b, x, y = (torch.randn(5, 7, generator=g) for _ in range(3))
    coef = torch.randn(5, 3, generator=g)

    def f(b, x, y):
        return interp.group_lincomb([x, y], b, True, "rows", coef, torch.empty(5, 7)) * 1
    assert torch.equal(torch.compile(f, fullgraph=True)(b, x, y), f(b, x, y))


def test_raw_ops_name_the_output_dtypes_and_compiled_calls_the_weights_range():
    """torch.ops.pymerge.weighted_sum(xs, w, float64) listed float8 among the dtypes it takes, and float8 was then
    'bad output dtype code'; a weight past float32's range traced with dynamic=True failed inside Inductor
    (a float32 overflow while building the weights) instead of the one-line error eager gives (an audit)."""
    xs, w = [torch.ones(4), torch.ones(4)], torch.tensor([1.0, 2.0])
    for dtype in (torch.float64, torch.float8_e4m3fn, torch.int32):
        for call in (lambda: torch.ops.pymerge.weighted_sum(xs, w, dtype),
                     lambda: torch.ops.pymerge.weighted_sum_many(xs, w.view(1, 2), dtype)):
            with pytest.raises(ValueError, match=f"^weighted_sum: out_dtype must be float32, float16 or bfloat16, "
                                                 f"got {dtype}$"):
                call()
    compiled = torch.compile(lambda xs, a: pymerge.weighted_sum(xs, [a, 1.0]), fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(xs, 0.5), torch.full((4,), 1.5))
    with pytest.raises(ValueError, match="a weight is 1e\\+39; weights must be finite and within float32's range"):
        compiled(xs, 1e39)


def test_native_codes_agree_with_python():
    cpu = _native.require_cpu()
    assert cpu.DTYPE_CODES == {n: _native.CODES_BY_NAME[n] for n in _native.INPUT_DTYPE_NAMES}
    assert cpu.SPARSIFIER_MODES == _native.SPARSIFIER_MODES
    assert (tvo.NONE, tvo.TOPK, tvo.RANGE, tvo.RANDOM, tvo.BITS, tvo.ZERO) == tuple(range(6))

    class Stale:
        __name__ = "pymerge._cpu"
        DTYPE_CODES = dict(cpu.DTYPE_CODES, bfloat16=7)
        SPARSIFIER_MODES = cpu.SPARSIFIER_MODES

    with pytest.raises(ImportError, match="DTYPE_CODES.*stale"):
        _native.check_codes(Stale)
    Stale.DTYPE_CODES = cpu.DTYPE_CODES
    del Stale.SPARSIFIER_MODES
    with pytest.raises(ImportError, match="SPARSIFIER_MODES is None"):
        _native.check_codes(Stale)


def test_the_cuda_kernel_refuses_list_weights_inside_a_capture(monkeypatch):
    """A list is made a device tensor by a host copy, which a capture cannot hold: the op says to pass a CUDA
    tensor before torch's own error invalidates the capture (the kernel runs on CPU tensors here, the capture
    faked)."""
    from pymerge.ops import library
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    xs, out = [torch.randn(5), torch.randn(5)], [torch.empty(5)]
    with pytest.raises(ValueError, match="inside a CUDA graph capture pass the weights as a CUDA tensor"):
        library._weighted_sum_many_out_cuda(xs, [[0.5, 0.5]], out)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(Exception) as err:  # not capturing: the list passes the check (then fails on CPU tensors)
        library._weighted_sum_many_out_cuda(xs, [[0.5, 0.5]], out)
    assert "capture" not in str(err.value)


@pytest.mark.gpu
def test_gpu_ops_refuse_list_weights_inside_a_capture():
    xs = [torch.randn(1000, device="cuda") for _ in range(2)]
    out = torch.empty(1000, device="cuda")
    pymerge.weighted_sum(xs, [0.5, 0.5], out=out)  # warm-up outside the capture
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="CUDA tensor"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pymerge.weighted_sum(xs, [0.5, 0.5], out=out)


@pytest.mark.gpu
def test_gpu_ops_capture_in_a_cuda_graph():
    xs = [torch.randn(100003, device="cuda").to(d) for d in (torch.bfloat16, torch.float32, torch.bfloat16)]
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, -1.0, 0.0]], device="cuda")
    outs = [torch.empty(100003, device="cuda"), torch.empty(100003, device="cuda", dtype=torch.bfloat16)]
    torch.ops.pymerge.weighted_sum_many_out(xs, w, outs)  # warm-up: Triton compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.pymerge.weighted_sum_many_out(xs, w, outs)
    for rows in ([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [[0.1, 0.6, 0.3], [-2.0, 0.5, 0.25]]):
        w.copy_(torch.tensor(rows))
        graph.replay()
        eager = [torch.empty_like(o) for o in outs]
        torch.ops.pymerge.weighted_sum_many_out(xs, w, eager)
        torch.cuda.synchronize()
        for k, o in enumerate(outs):
            assert torch.equal(o, eager[k]), (rows, k)  # the replay read the new weights: the eager call's bits
            ref = sum(rows[k][i] * xs[i].double() for i in range(3))
            # bf16: half an ulp of |ref| (up to ~10 here) is 2**-9 to 2**-8 of it, more than a fixed atol of 1e-2
            tol = dict(rtol=2**-8, atol=1e-2) if o.dtype == torch.bfloat16 else dict(atol=1e-5)
            assert torch.allclose(o.double(), ref, **tol), (rows, k)


@pytest.mark.gpu
def test_gpu_compiled_matches_eager():
    xs = [torch.randn(4099, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    f = lambda xs: pymerge.weighted_sum(xs, [0.5, 0.25, 0.25])  # noqa: E731
    assert torch.equal(torch.compile(f, fullgraph=True)(xs), f(xs))


def test_ops_check_their_outputs_as_the_public_wrappers_do():
    """torch.ops.pymerge.weighted_sum_out / _many_out wrote a transposed out as if contiguous (error 2.6),
    into an out partly overlapping an input (error 1.0), and into one tensor given as two outputs."""
    P = torch.ops.pymerge
    x, y = rand(100, torch.float32, 1).view(5, 20), rand(100, torch.float32, 2).view(5, 20)
    w = torch.tensor([0.3, 0.7])
    with pytest.raises(ValueError, match=r"out must be contiguous, got strides \(1, 5\)"):
        P.weighted_sum_out([x, y], w, torch.zeros(20, 5).t())
    with pytest.raises(ValueError, match="out must be a float32, float16 or bfloat16 tensor"):
        P.weighted_sum_out([x, y], w, torch.zeros(5, 20, dtype=torch.float64))
    buf = rand(150, torch.float32, 3)
    keep = buf.clone()
    with pytest.raises(ValueError, match="output 0 partially overlaps input 0"):
        P.weighted_sum_out([buf[:100], rand(100, torch.float32, 4)], w, buf[50:150])
    assert torch.equal(buf, keep)
    a, b, o = rand(1000, torch.float32, 5), rand(1000, torch.float32, 6), torch.zeros(1000)
    rows = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"outs\[0\] and outs\[1\] share memory"):
        P.weighted_sum_many_out([a, b], rows, [o, o])
    with pytest.raises(ValueError, match="output 1 shares memory with input 0"):
        P.weighted_sum_many_out([a, b], rows, [o, a])  # with two outputs not even an exact alias
    assert not o.any()
    P.weighted_sum_out([a, b], w, a)  # one output, exactly an input: allowed, as in pymerge.weighted_sum
    torch.testing.assert_close(a, 0.3 * rand(1000, torch.float32, 5) + 0.7 * b)


def test_ops_refuse_a_meta_tensor_beside_real_ones():
    """A meta tensor among CPU ones sent the call to the fake (shape) kernel: uninitialised CPU results, an
    out= form that returned without writing."""
    P = torch.ops.pymerge
    x, m, w = torch.ones(8), torch.ones(8, device="meta"), torch.tensor([0.5, 0.5])
    for call in (lambda: P.weighted_sum([x, m], w, torch.float32), lambda: P.weighted_sum_many([x, m], w.view(1, 2), torch.float32),
                 lambda: P.weighted_sum_out([m, m], w, torch.zeros(8)),
                 lambda: P.weighted_sum_many_out([x, m], w.view(1, 2), [torch.zeros(8)])):
        with pytest.raises(ValueError, match="every tensor must be on one device"):
            call()


def test_method_ops_answer_an_all_meta_call_with_its_shape_or_one_line():
    """sce, ramplus_tl and the sparsified task-vector merge need data for their per-tensor numbers: an all-meta
    call raised torch's errors (Tensor.item() on meta, bincount has no meta kernel) where weighted_sum, ram and
    nearswap return the meta out. They return it too; the dot products, numbers on the host, refuse in one line."""
    from pymerge.ops import consensus_ops, interp, task_vector_ops as tv
    m = lambda: torch.empty(6, 5, device="meta")  # noqa: E731
    xs, base = [m(), m(), m()], m()
    for method in tv.SPARSIFIERS:
        out = m()
        assert tv.task_vector_merge(xs, base, out, [tv.Sparsifier(method, 0.5)] * 3, [1.0] * 3,
                                    consensus=True, normalize=True) is out
    out = m()
    assert consensus_ops.sce(xs, base, 0.5, out) is out
    assert consensus_ops.ramplus_tl(xs, base, 0.1, 0.2, 1e-8, out) is out
    with pytest.raises(ValueError, match="offset must be"):  # the arguments are still checked
        tv.task_vector_merge(xs, base, m(), [tv.Sparsifier()] * 3, [1.0] * 3, consensus=True, normalize=True,
                             offset=-1)
    with pytest.raises(ValueError, match="group_dots: dot products need data; got meta tensors"):
        interp.group_dots(xs, base, True, "whole")
    with pytest.raises(ValueError, match="whole_dots: dot products need data; got meta tensors"):
        interp.whole_dot_parts(xs, base, True)


def test_lazily_negated_views_are_read_as_their_values():
    """x.conj().imag is a contiguous view whose memory holds +2 for the value -2: the kernels read the
    memory (+2). Inputs are resolved; an output like it, or such an input to a raw op, is refused."""
    v = torch.tensor([1 + 2j]).conj().imag
    assert v.is_neg() and v.is_contiguous() and v.tolist() == [-2.0]
    assert pymerge.weighted_sum([v], [1.0]).tolist() == [-2.0]
    assert pymerge.weighted_sum_many([v, v], [[1.0, 1.0]])[0].tolist() == [-4.0]
    assert torch.ops.pymerge.weighted_sum([v], torch.tensor([1.0]), torch.float32).tolist() == [-2.0]
    with pytest.raises(ValueError, match="lazily negated view"):
        pymerge.weighted_sum([torch.ones(1)], [1.0], out=torch.tensor([1j]).conj().imag)
    from pymerge.ops import elementwise_mix
    with pytest.raises(ValueError, match="lazily negated view"):
        elementwise_mix.nearswap(torch.zeros(1), v, 0.5, torch.empty(1))
    pool = pymerge.CheckpointPool([{"w": v}, {"w": torch.zeros(1)}])
    target = {"w": torch.empty(1)}
    pool.materialize([1.0, 0.0], into=target)
    assert target["w"].tolist() == [-2.0]
    with pytest.raises(pymerge.errors.InputError, match="lazily negated view"):
        pool.materialize([1.0, 0.0], into={"w": torch.tensor([1j]).conj().imag})


@pytest.mark.parametrize("op", ["task_vector_merge", "group_lincomb", "nearswap", "ram"])
def test_every_native_op_refuses_an_output_partly_over_an_input(op):
    """Only weighted_sum checked: the others wrote a block that the next block then read (4 of 5000
    elements wrong for an out one element ahead of its input)."""
    from pymerge.ops import elementwise_mix as em
    run = {"task_vector_merge": lambda x, b, o: tvo.task_vector_merge([x], b, o, [tvo.Sparsifier()], [2.0],
                                                                      consensus=False, normalize=False),
           "group_lincomb": lambda x, b, o: interp.group_lincomb([x], None, False, "whole",
                                                                 torch.tensor([[2.0, 0.0]]), o),
           "nearswap": lambda x, b, o: em.nearswap(b, x, 0.5, o),
           "ram": lambda x, b, o: em.ram([x], b, 1e-3, o)}[op]
    n = 5000
    s = torch.randn(n + 1, generator=torch.Generator().manual_seed(0))
    keep, base = s.clone(), torch.zeros(n)
    with pytest.raises(ValueError, match="output 0 partially overlaps input"):
        run(s[:n], base, s[1:])
    assert torch.equal(s, keep)
    want = torch.empty(n)
    run(s[:n].clone(), base, want)
    run(s[:n], base, s[:n])  # exactly the input: every block is read before it is written
    assert torch.equal(s[:n], want)
    m = torch.randn(50, 100, generator=torch.Generator().manual_seed(1))  # a transposed input is copied first
    want = torch.empty(100, 50)
    run(m.t(), torch.zeros(100, 50), want)
    got = m.view(100, 50)
    run(m.t(), torch.zeros(100, 50), got)
    assert torch.equal(got, want)


def test_out_forms_trace_under_fake_tensors():
    """The overlap checks compared data_ptr()s, all 0 (or an error) for fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    with FakeTensorMode():
        xs = [torch.empty(7, 3), torch.empty(7, 3, dtype=torch.bfloat16)]
        assert pymerge.weighted_sum(xs, [1.0, 2.0], out=torch.empty(7, 3)).shape == (7, 3)
        outs = pymerge.weighted_sum_many(xs, [[1.0, 2.0]] * 2, outs=[torch.empty(7, 3), torch.empty(7, 3)])
        assert len(outs) == 2

    def fn(a, b, o):
        pymerge.weighted_sum([a, b], [1.0, 2.0], out=o)
        return o
    graph = make_fx(fn, tracing_mode="fake")(torch.randn(4), torch.randn(4), torch.empty(4))
    a, b = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(graph(a, b, torch.empty(4)), a + 2 * b)


def test_documented_argument_forms_compile_fullgraph():
    """out=, outs=, tensor weights and dynamic=True stopped torch.compile(fullgraph=True) in the Python checks
    (data_ptr arithmetic, Tensor.tolist(), math.isfinite of a symbolic float; found by a review). While
    tracing those checks are left to the op, which makes them when it runs."""
    xs = [rand(4099, torch.bfloat16, i) for i in range(3)]
    w = [0.25, -0.5, 1.25]

    def with_out(xs, o):
        pymerge.weighted_sum(xs, w, out=o)
        return o

    def with_outs(xs, a, b):
        return pymerge.weighted_sum_many(xs, [w, w[::-1]], outs=[a, b])

    def tensor_weights(xs, t):
        return pymerge.weighted_sum(xs, t), pymerge.weighted_sum_many(xs, torch.stack([t, t.flip(0)]))

    eager = [with_out(xs, torch.empty(4099)), with_outs(xs, torch.empty(4099), torch.empty(4099)),
             tensor_weights(xs, torch.tensor(w)), pymerge.weighted_sum(xs, w)]
    compiled = [torch.compile(with_out, fullgraph=True)(xs, torch.empty(4099)),
                torch.compile(with_outs, fullgraph=True)(xs, torch.empty(4099), torch.empty(4099)),
                torch.compile(tensor_weights, fullgraph=True)(xs, torch.tensor(w)),
                torch.compile(lambda xs, w: pymerge.weighted_sum(xs, w), fullgraph=True, dynamic=True)(xs, w)]
    flat = lambda r: list(r) if isinstance(r, (list, tuple)) else [r]  # noqa: E731
    for e, c in zip(eager, compiled):
        for a, b in zip(sum(map(flat, flat(e)), []), sum(map(flat, flat(c)), [])):
            assert torch.equal(a, b)
    bad = torch.compile(lambda xs, t: pymerge.weighted_sum(xs, t), fullgraph=True)
    with pytest.raises(ValueError, match="a weight is nan; weights must be finite"):
        bad(xs, torch.tensor([float("nan"), 0.5, 0.5]))  # checked when the op runs
    buf = torch.zeros(8000)
    with pytest.raises(ValueError, match="partially overlaps input 0"):
        torch.compile(lambda a, o: pymerge.weighted_sum([a], [1.0], out=o), fullgraph=True)(buf[:4000], buf[2000:6000])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_gradients_flow_through_the_functional_forms(dtypes):
    """Eager pymerge.weighted_sum returned a result cut from the graph while torch.ops.pymerge recorded a
    node whose backward raised (found by a review): now both record d/dx_i = sum_k w[k, i] g_k (in x_i's
    dtype) and d/dw[k, i] = <g_k, x_i>, eager, through torch.ops and compiled."""
    xs = [rand(1031, d, 20 + i).requires_grad_() for i, d in enumerate(dtypes)]
    g1, g2 = rand(1031, torch.float32, 30), rand(1031, torch.float32, 31)
    w = torch.tensor([0.25, -1.5], requires_grad=True)
    rows = torch.tensor([[1.0, 2.0], [3.0, -4.0]], requires_grad=True)

    def grads(fn):
        for t in xs + [w, rows]:
            t.grad = None
        out, (a, b) = fn()
        ((out.float() * g1).sum() + (a.float() * g1).sum() + (b.float() * g2).sum()).backward()
        return [t.grad.clone() for t in xs + [w, rows]]

    eager = grads(lambda: (pymerge.weighted_sum(xs, w), pymerge.weighted_sum_many(xs, rows)))
    xd = [x.detach().double() for x in xs]
    ref_x = [g1.double() * (w[i].item() + rows[0, i].item()) + g2.double() * rows[1, i].item() for i in range(2)]
    for got, ref, x in zip(eager[:2], ref_x, xs):
        assert got.dtype == x.dtype
        torch.testing.assert_close(got.double(), ref.to(x.dtype).double(), rtol=1e-2, atol=1e-2)
    ref_w = torch.stack([(g1.double() * x).sum() for x in xd])
    torch.testing.assert_close(eager[2].double(), ref_w, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(eager[3].double(), torch.stack([ref_w, torch.stack([(g2.double() * x).sum() for x in xd])]),
                               rtol=1e-5, atol=1e-3)
    via_ops = grads(lambda: (torch.ops.pymerge.weighted_sum(xs, w, torch.float32),
                             torch.ops.pymerge.weighted_sum_many(xs, rows, torch.float32)))
    compiled = grads(torch.compile(lambda: (pymerge.weighted_sum(xs, w, out_dtype=torch.float32),
                                            pymerge.weighted_sum_many(xs, rows, out_dtype=torch.float32)),
                                   fullgraph=True))
    for a, b, c in zip(eager, via_ops, compiled):  # inductor compiles the backward formula: its own rounding
        assert torch.equal(a, b) and c.dtype == a.dtype
        torch.testing.assert_close(c.double(), a.double(), rtol=1e-2 if a.dtype != torch.float32 else 1e-5, atol=1e-2)
    plain = pymerge.weighted_sum(xs, [0.5, 0.5])  # list weights: gradients for the tensors only
    assert plain.requires_grad and not pymerge.weighted_sum([x.detach() for x in xs], [0.5, 0.5]).requires_grad
    with torch.no_grad():
        assert not pymerge.weighted_sum(xs, w).requires_grad


def test_out_forms_refuse_inputs_that_want_gradients():
    """As torch's own out= ops: the result is written in place and records nothing."""
    x, y = rand(100, torch.float32, 40).requires_grad_(), rand(100, torch.float32, 41)
    o = torch.empty(100)
    with pytest.raises(RuntimeError, match=r"weighted_sum\(\): out= does not record gradients"):
        pymerge.weighted_sum([x, y], [0.5, 0.5], out=o)
    with pytest.raises(RuntimeError, match=r"weighted_sum_many\(\): out= does not record gradients"):
        pymerge.weighted_sum_many([y, y], torch.ones(1, 2, requires_grad=True), outs=[o])
    with torch.no_grad():
        pymerge.weighted_sum([x, y], [0.5, 0.5], out=o)
    torch.testing.assert_close(o, 0.5 * x.detach() + 0.5 * y)


def test_gradients_flow_on_the_eager_torch_backend_too():
    """backend='torch' (and Triton's interpreter on CPU tensors) ran outside the op registry and returned a
    result cut from the graph (found by a review): now the same gradients as the op's, same forward bits."""
    x, y = rand(257, torch.float32, 50).requires_grad_(), rand(257, torch.bfloat16, 51).requires_grad_()
    w = torch.tensor([0.5, -2.0], requires_grad=True)
    rows = torch.tensor([[1.0, 0.5], [0.25, 3.0]], requires_grad=True)
    g = rand(257, torch.float32, 52)
    got = {}
    for backend in ("cpu", "torch"):
        for t in (x, y, w, rows):
            t.grad = None
        one = pymerge.weighted_sum([x, y], w, out_dtype=torch.float32, backend=backend)
        a, b = pymerge.weighted_sum_many([x, y], rows, out_dtype=torch.float32, backend=backend)
        ((one * g).sum() + (a * g).sum() - b.sum()).backward()
        got[backend] = [one.detach(), a.detach(), b.detach()] + [t.grad.clone() for t in (x, y, w, rows)]
    for c, t in zip(got["cpu"], got["torch"]):  # y's gradient: autograd adds three bf16 parts, the op rounds once
        tol = 2e-2 if c.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(t.double(), c.double(), rtol=tol, atol=tol)


def test_ops_exist_once_pymerge_is_imported_after_torch():
    """torch.ops.pymerge.* raised AttributeError after `import torch, pymerge` until something touched
    pymerge.weighted_sum or CheckpointPool (the package loads lazily; a bug hunt). A fresh interpreter."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import torch, pymerge\n"
            "xs = [torch.ones(5), torch.full((5,), 3.0)]\n"
            "print(torch.ops.pymerge.weighted_sum(xs, torch.tensor([0.25, 0.75]), torch.float32).tolist())\n")
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[2.5, 2.5, 2.5, 2.5, 2.5]", out.stderr


def test_a_meta_weight_coef_or_bitmask_beside_real_tensors_is_refused():
    """The fake kernels looked at the inputs and outputs only: meta weights beside CPU inputs gave an
    uninitialised CPU result, and the out= forms (meta weights, coef or bitmask) returned without writing."""
    P = torch.ops.pymerge
    x, y, o = torch.ones(8), torch.full((8,), 3.0), torch.full((8,), -7.0)
    w = torch.tensor([0.25, 0.75], device="meta")
    bits = torch.full((1,), -1, dtype=torch.int64, device="meta")
    for call in (lambda: P.weighted_sum([x, y], w, torch.float32),
                 lambda: P.weighted_sum_many([x, y], w.view(1, 2), torch.float32),
                 lambda: P.weighted_sum_out([x, y], w, o),
                 lambda: P.weighted_sum_many_out([x, y], w.view(1, 2), [o]),
                 lambda: P.group_lincomb_out([y], x, True, 1, 8, 0, torch.ones(1, 2, device="meta"), o),
                 lambda: P.tv_merge_out([y], x, [bits], [tvo.BITS] + [0] * 6, [1.0, 1.0], False, False, 1.0, 1.0,
                                        0, 0, 0, 0, o)):
        with pytest.raises(ValueError, match="tensors on cpu and meta; every tensor must be on one device"):
            call()
    assert torch.equal(o, torch.full((8,), -7.0))
    with pytest.raises(ValueError, match="^weights are on the meta device and hold no values$"):
        pymerge.weighted_sum([x, y], w)
    m = P.weighted_sum([x.to("meta"), y.to("meta")], torch.ones(2), torch.float32)  # shapes on meta: as before
    assert m.device.type == "meta" and m.shape == (8,)


def test_a_meta_default_device_leaves_the_ops_on_their_tensors_device():
    """Helper tensors made without device= landed on the default device: under `with torch.device("meta")`
    pymerge.weighted_sum of CPU tensors returned garbage (meta weights: the fake kernel), out= stayed
    unwritten, interp.group_dots returned a meta tensor."""
    from pymerge.ops import consensus_ops as co
    x, y = torch.ones(8), torch.full((8,), 3.0)
    o, lin = torch.full((8,), -7.0), torch.full((8,), -7.0)
    with torch.device("meta"):
        got = pymerge.weighted_sum([x, y], [0.25, 0.75])
        pymerge.weighted_sum([x, y], [0.25, 0.75], out=o)
        many = pymerge.weighted_sum_many([x, y], [[0.25, 0.75]])
        dots = interp.group_dots([y], x, True, "whole")
        interp.group_lincomb([y], x, True, "whole", torch.tensor([[0.5, 1.0]], device="cpu"), lin)
        tv = tvo.task_vector_merge([y], x, torch.empty(8, device="cpu"), [tvo.Sparsifier("magnitude", 0.5, rescale="l1")],
                                   [1.0], consensus=True, normalize=True)
        sce = co.sce([y, x + 1], x, 0.5, torch.empty(8, device="cpu"))
    for t in (got, o, many[0]):
        assert t.device.type == "cpu" and t.tolist() == [2.5] * 8
    assert dots.device.type == "cpu" and dots.tolist() == [[[32.0]]]
    assert lin.tolist() == [2.0] * 8
    assert torch.equal(tv, tvo.task_vector_merge([y], x, torch.empty(8), [tvo.Sparsifier("magnitude", 0.5, rescale="l1")],
                                                 [1.0], consensus=True, normalize=True))
    assert torch.equal(sce, co.sce([y, x + 1], x, 0.5, torch.empty(8)))


@pytest.mark.parametrize("method, n, params", [("slerp", 1, {"t": 0.3}), ("nuslerp", 2, {}), ("karcher", 3, {}),
                                              ("model_stock", 3, {}), ("multislerp", 3, {})])
def test_interpolation_methods_under_a_meta_default_device(method, n, params):
    """Their coefficient tables were made without device=: under `with torch.device("meta")` a pool's slerp,
    nuslerp, karcher and model_stock raised "tensors on cpu and meta" (a review)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 12, generator=g) for _ in range(n)]
    base = torch.randn(16, 12, generator=g)
    uses_base = method in ("slerp", "nuslerp", "model_stock")
    pool = pymerge.CheckpointPool([{"w": x} for x in xs], base={"w": base} if uses_base else None)
    w = [1.0 / n] * n
    want = pool.materialize(w, into={"w": torch.empty(16, 12)}, method=method, **params)["w"]
    with torch.device("meta"):
        got = pool.materialize(w, into={"w": torch.empty(16, 12, device="cpu")}, method=method, **params)["w"]
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_second_order_gradients_match_torch():
    """The backward read the weights detached, so a double backward took them for constants: d/dw of a
    gradient missed the d/dx term's dependence on w (found by a bug hunt)."""
    x0, x1 = rand(5, torch.float32, 60), rand(5, torch.float32, 61)

    def hessian_row(f):
        w = torch.tensor([0.7, -0.4], requires_grad=True)
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad((f([x, x1], w) ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.sum(), w)[0]

    want = hessian_row(lambda xs, w: w[0] * xs[0] + w[1] * xs[1])
    torch.testing.assert_close(hessian_row(lambda xs, w: pymerge.weighted_sum(xs, w)), want)
    torch.testing.assert_close(hessian_row(lambda xs, w: pymerge.weighted_sum_many(xs, w.view(1, 2))[0]), want)


def test_opcheck_weighted_sum_ops_with_inputs_that_require_grad():
    """The autograd setup returned weights.detach().float(), an alias of float32 weights: test_schema
    refused the ops ("operators below autograd are not allowed to directly return inputs")."""
    xs = [torch.randn(5, requires_grad=True), torch.randn(5)]
    opcheck(torch.ops.pymerge.weighted_sum, (xs, torch.tensor([0.5, 2.0], requires_grad=True), torch.float32))
    opcheck(torch.ops.pymerge.weighted_sum_many, (xs, torch.tensor([[0.5, 2.0]]), torch.float32))


def test_out_forms_refuse_an_output_that_requires_grad():
    """As torch.add(out=...): an out that requires grad (a leaf, or a tensor in a graph, whose old
    grad_fn backward then ran through) was written in place without a word."""
    a, b = torch.ones(4), torch.full((4,), 2.0)
    leaf = torch.zeros(4, requires_grad=True)
    inner = torch.ones(4, requires_grad=True) * 2
    for out in (leaf, inner):
        with pytest.raises(RuntimeError, match=r"weighted_sum\(\): out= does not record gradients, but an input or "
                                               "an output requires grad"):
            pymerge.weighted_sum([a, b], [1.0, 1.0], out=out)
        with pytest.raises(RuntimeError, match=r"weighted_sum_many\(\): out= does not record gradients"):
            pymerge.weighted_sum_many([a, b], [[1.0, 1.0]], outs=[out])
    assert leaf.tolist() == [0.0] * 4 and inner.tolist() == [2.0] * 4
    with torch.no_grad():
        pymerge.weighted_sum([a, b], [1.0, 1.0], out=leaf)
    assert leaf.tolist() == [3.0] * 4


def test_weights_as_separate_tensors_that_require_grad_are_refused():
    """A list of 0-d weight tensors (or of rows) was read as numbers: their gradient silently dropped."""
    x = rand(5, torch.float32, 70)
    w0, w1 = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"^weights: a tensor in the sequence requires grad, but autograd reaches "
                                         r"weights only when they come as one 1-D tensor \(torch.stack them\)$"):
        pymerge.weighted_sum([x, x], [w0, w1])
    with pytest.raises(ValueError, match=r"^weight_rows: a tensor in the sequence requires grad.*one \[K, N\] tensor"):
        pymerge.weighted_sum_many([x, x], [torch.ones(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"^weights of row 0: a tensor in the sequence requires grad"):
        pymerge.weighted_sum_many([x, x], [[w0, w1]])
    with torch.no_grad():
        assert torch.equal(pymerge.weighted_sum([x, x], [w0, w1]), 2.5 * x)
    assert torch.equal(pymerge.weighted_sum([x, x], [torch.tensor(0.5), torch.tensor(2.0)]), 2.5 * x)


@pytest.mark.parametrize("sparsifier", [tvo.Sparsifier("random", 0.5, rescale="l1"),
                                        tvo.Sparsifier("della_magprune", 0.5, epsilon=0.1),
                                        tvo.Sparsifier("magnitude", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_task_vectors_refuse_a_dtype_the_kernels_do_not_read(sparsifier, dtype):
    """DARE with rescale="l1" and DELLA raised a bare KeyError: torch.float64 (their native passes checked
    sizes but not dtypes); magnitude already said which dtypes the kernel takes."""
    base = torch.arange(64).to(dtype)
    message = (f"input 0 is {dtype} on cpu; this kernel takes bfloat16, float16, float32" if dtype.is_floating_point
               else f"^tv_merge: input 0 is {dtype}; the inputs must be floating-point$")
    with pytest.raises((ValueError, TypeError), match=message):
        tvo.task_vector_merge([base + 1], base, torch.empty(64), [sparsifier], [1.0], consensus=False, normalize=False)


def test_raw_ops_on_empty_tensors_and_bad_thread_counts():
    """group_dots / group_lincomb_out with empty inputs and sub=True said "sub needs a base" (an empty base
    has address 0); weighted_sum([]) raised IndexError; select_ranks and group_* passed num_threads=2**40
    on to pybind11 (a multi-line TypeError)."""
    P, e = torch.ops.pymerge, torch.empty(0)
    o = torch.empty(0)
    P.group_lincomb_out([e], e, True, 1, 0, 0, torch.ones(1, 2), o)
    P.group_lincomb_out([e], e, True, 0, 0, 1, torch.ones(0, 2), o)
    assert P.group_dots([e, e], e, True, 1, 0, 0).tolist() == [[0.0] * 3]
    assert P.group_dots([e, e], e, True, 0, 5, 1).shape == (0, 3)
    assert P.group_dots([e, e], e, True, 0, 5, 2).tolist() == [[0.0] * 3] * 5
    for call in (lambda: P.weighted_sum([], torch.ones(0), torch.float32),
                 lambda: P.weighted_sum([], torch.ones(2), torch.float32),  # not "[N] needs N = 0"
                 lambda: P.weighted_sum_many([], torch.ones(1, 0), torch.float32)):
        with pytest.raises(ValueError, match="^weighted_sum: needs at least one input$"):
            call()
    x = torch.ones(12)
    for call in (lambda: P.select_ranks(x, None, [1], True, 2**40),
                 lambda: P.group_dots([x], None, False, 3, 4, 1, 2**40),
                 lambda: P.group_lincomb_out([x], None, False, 1, 12, 0, torch.ones(1, 2), torch.empty(12), 2**40),
                 lambda: interp.whole_dot_parts([x], None, False, num_threads=2**40)):
        with pytest.raises(ValueError, match="^num_threads must be an integer from 0"):
            call()


def test_the_torch_pass_draws_the_same_masks_from_a_name_or_its_hash():
    """The CUDA op falls back to the torch pass past MAX_TV_MODELS models, and the op carries the name's
    hash, not the name: both must key the same Philox draws."""
    from pymerge.ops import philox
    xs, base, bits, ints, floats = _tv_case(3001, 4)
    plans = tvo.plans_from_rows(bits, ints, floats)
    kw = dict(consensus=True, normalize=True, lam=0.9, divisor=1.75, seed=7, offset=0)
    by_name, by_hash = torch.empty(3001), torch.empty(3001)
    tvo._merge_torch(xs, base, plans, by_name, name="t", **kw)
    tvo._merge_torch(xs, base, plans, by_hash, name=philox.name_hash("t"), **kw)
    assert torch.equal(by_name, by_hash)
    assert torch.equal(philox.random_bits(3, "t", 1, 5, 100), philox.random_bits(3, philox.name_hash("t"), 1, 5, 100))


def test_fake_tensors_are_not_taken_for_wrapper_subclasses():
    """A FakeTensor's data_ptr() is 0, as a wrapper subclass's (DTensor, TwoTensor) is: the check that refuses
    those refused fake arguments too (group_lincomb's coef under FakeTensorMode: "whose data lives in tensors
    inside it")."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from pymerge.ops._memory import backing_problem
    from torch.testing._internal.two_tensor import TwoTensor
    with FakeTensorMode():
        fake = torch.empty(4)
        assert backing_problem(fake) is None
    assert "TwoTensor whose data lives" in backing_problem(TwoTensor(torch.ones(4), torch.ones(4)))


_WRAPPER_CASES = """
import torch, pymerge
from torch.testing._internal.two_tensor import TwoTensor
from torch._subclasses.fake_tensor import FakeTensorMode
from pymerge.ops import interp, library, select, elementwise_mix as E, task_vector_ops as T
c, c2 = torch.randn(6), torch.randn(6)
tt = TwoTensor(torch.randn(6), torch.randn(6))
o = TwoTensor(torch.empty(6), torch.empty(6))
cases = {
    "ws_input": lambda: pymerge.weighted_sum([c, tt], [1.0, 2.0]),
    "ws_many_input": lambda: pymerge.weighted_sum_many([c, tt], [[1.0, 2.0]]),
    "ws_out": lambda: pymerge.weighted_sum([c, c2], [1.0, 2.0], out=o),
    "ws_many_outs": lambda: pymerge.weighted_sum_many([c, c2], [[1.0, 2.0]], outs=[o]),
    "group_lincomb_out": lambda: interp.group_lincomb([c, c2], None, False, "whole", torch.ones(1, 3), o),
    "whole_dot_parts": lambda: interp.whole_dot_parts([c, tt], None, False),
    "nearswap": lambda: E.nearswap(c, tt, 0.5, torch.empty(6)),
    "tv_base": lambda: T.task_vector_merge([c, c2], tt, torch.empty(6), [T.Sparsifier("magnitude", 0.5)] * 2,
                                           [0.5, 0.5], consensus=True, normalize=False),
    "select_base": lambda: select.select_ranks(c, tt, [1, 3], True),
    "kernel_wrapper": lambda: library._KERNELS["weighted_sum_many_out"]["cpu"]([c, tt], [[1.0, 2.0]], [torch.empty(6)]),
    "kernel_fake": lambda: library._KERNELS["weighted_sum_many_out"]["cpu"](
        [c, FakeTensorMode().from_tensor(c2)], [[1.0, 2.0]], [torch.empty(6)]),
}
for name, fn in cases.items():
    try:
        fn()
        print(name, "returned", flush=True)
    except ValueError as e:
        print(name, "ValueError", str(e).replace("\\n", " "), flush=True)
"""


def test_a_wrapper_subclass_anywhere_is_refused_not_given_to_a_kernel_as_address_0():
    """A wrapper subclass (DTensor, TwoTensor; data_ptr() 0) placed anywhere but first, or as out=/base, took the
    eager fast path to a kernel: SIGSEGV, or (select_ranks' base) silently read as no base. Now one line, with
    the DTensor hint; the kernels themselves refuse a subclass without an address (a FakeTensor too)."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", _WRAPPER_CASES], capture_output=True, text=True,
                       env=env, timeout=300)
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert p.returncode == 0 and len(lines) == 11, (p.returncode, p.stdout, p.stderr[-2000:])
    for name, said in lines.items():
        if name == "kernel_fake":
            assert said.startswith("ValueError weighted_sum: input 1: is a FakeTensor"), said
        else:
            assert said.startswith("ValueError ") and "is a TwoTensor whose data lives in tensors inside it; " \
                "pass plain tensors" in said, (name, said)


def test_tensor_weights_stay_graph_inputs_under_make_fx_fake_tensors_and_aot():
    """Tensor weights were read with tolist() under a dispatch mode: make_fx recorded the trace-time values as
    a constant (a replay with new weights used the old ones), and fake/symbolic tracing, FakeTensorMode and
    aot_function failed on data-dependent values. Now the op gets the tensor and checks its values when it runs."""
    from functorch.compile import aot_function, nop
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    a, b = rand(7, torch.float32, 80), rand(7, torch.bfloat16, 81)
    one = lambda a, b, w: pymerge.weighted_sum([a, b], w)  # noqa: E731
    table = lambda a, b, w: pymerge.weighted_sum_many([a, b], torch.stack([w, w.flip(0)]))  # noqa: E731
    rows = lambda a, b, w: pymerge.weighted_sum_many([a, b], [w, w.flip(0)])  # noqa: E731
    w = torch.tensor([2.0, 5.0])
    ref = [a.double() * 2.0 + b.double() * 5.0, a.double() * 5.0 + b.double() * 2.0]
    for fn, n in ((one, 1), (table, 2), (rows, 2)):
        traced = [make_fx(fn, tracing_mode=m)(a, b, torch.tensor([0.3, -0.7])) for m in ("real", "fake", "symbolic")]
        assert all("_tensor_constant" not in g.code for g in traced)
        for got in [g(a, b, w) for g in traced] + [aot_function(fn, nop)(a, b, w)]:
            got = [got] if n == 1 else got
            for g, r in zip(got, ref[:n]):
                torch.testing.assert_close(g.double(), r, rtol=1e-6, atol=1e-5)
        with FakeTensorMode():
            out = fn(torch.empty(7), torch.empty(7), torch.empty(2))
        assert all(o.shape == (7,) for o in ([out] if n == 1 else out))
    with pytest.raises(ValueError, match="a weight is nan; weights must be finite"):
        make_fx(one)(a, b, torch.tensor([0.3, -0.7]))(a, b, torch.tensor([float("nan"), 1.0]))


def test_raw_out_ops_refuse_tensors_in_an_autograd_graph():
    """torch.library let the mutating ops write into an out in a graph (it kept its old grad_fn: backward ran
    through values it no longer held), into a Parameter, or from an input requiring grad (its gradient
    silently missing). Now each refuses with the wrappers' message, and runs under torch.no_grad()."""
    P = torch.ops.pymerge
    x, y = rand(6, torch.float32, 90), rand(6, torch.float32, 91)
    xg = x.clone().requires_grad_()
    xs, base, bits, ints, floats = _tv_case(97, 3)
    tv_args = lambda xs, base, out: (xs, base, bits, ints, floats, True, False, 1.0, 1.0, 7, 0, 0, 0, out)  # noqa
    calls = {
        "weighted_sum_out": [lambda o: P.weighted_sum_out([x, y], torch.tensor([1.0, 2.0]), o),
                             lambda o: P.weighted_sum_out([xg, y], torch.tensor([1.0, 2.0]), o)],
        "weighted_sum_many_out": [lambda o: P.weighted_sum_many_out([x, y], torch.tensor([[1.0, 2.0]]), [o]),
                                  lambda o: P.weighted_sum_many_out([x, y], torch.ones(1, 2, requires_grad=True), [o])],
        "group_lincomb_out": [lambda o: P.group_lincomb_out([x, y], None, False, 1, 6, 0, torch.ones(1, 3), o),
                              lambda o: P.group_lincomb_out([x, xg], None, False, 1, 6, 0, torch.ones(1, 3), o)],
    }
    for name, (to_out, from_input) in calls.items():
        for call, out in ((to_out, torch.zeros(6, requires_grad=True)), (to_out, torch.ones(6, requires_grad=True) * 2),
                          (to_out, torch.nn.Parameter(torch.zeros(6))), (from_input, torch.empty(6))):
            with pytest.raises(RuntimeError, match=rf"^{name}\(\): out= does not record gradients, but an input or "
                                                   "an output requires grad; call it under torch.no_grad()"):
                call(out)
    # the raw ops have no optional out=: the advice names the functional op instead
    with pytest.raises(RuntimeError, match=r"call torch.ops.pymerge.weighted_sum to get a result autograd tracks$"):
        calls["weighted_sum_out"][1](torch.empty(6))
    with pytest.raises(RuntimeError, match=r"call torch.ops.pymerge.weighted_sum_many to get a result"):
        calls["weighted_sum_many_out"][1](torch.empty(6))
    leaf = torch.zeros(97, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"^tv_merge_out\(\): out= does not record gradients"):
        P.tv_merge_out(*tv_args(xs, base, leaf))
    with pytest.raises(RuntimeError, match=r"^tv_merge_out\(\): out= does not record gradients"):
        P.tv_merge_out(*tv_args(xs, base.clone().requires_grad_(), torch.empty(97)))
    assert leaf.tolist() == [0.0] * 97
    p = torch.nn.Parameter(torch.zeros(6))
    with torch.no_grad():
        P.weighted_sum_out([xg, y], torch.tensor([1.0, 2.0]), p)
    torch.testing.assert_close(p.detach().double(), x.double() + 2 * y.double())


def test_torch_func_transforms_are_refused_in_one_line():
    """vmap, grad, jacrev and jvp over the public ops failed inside check_readable with torch's "Cannot access
    storage of BatchedTensorImpl / TensorWrapper"; now one line saying what to use instead."""
    from torch.func import grad, jacrev, jvp, vmap
    xs = [rand(5, torch.float32, 100 + i) for i in range(3)]
    msg = r"is inside a torch.func transform \(vmap, grad, jacrev, jvp\), which pymerge's ops do not support"
    calls = [lambda: vmap(lambda w: pymerge.weighted_sum(xs, w))(torch.randn(4, 3)),
             lambda: vmap(lambda a: pymerge.weighted_sum([a, xs[1]], [1.0, 2.0]))(torch.randn(4, 5)),
             lambda: vmap(lambda w: pymerge.weighted_sum_many(xs, w))(torch.randn(4, 2, 3)),
             lambda: grad(lambda w: pymerge.weighted_sum(xs, w).sum())(torch.ones(3)),
             lambda: jacrev(lambda a: pymerge.weighted_sum([a, xs[1]], [1.0, 2.0]))(xs[0]),
             lambda: jvp(lambda a: pymerge.weighted_sum([a, xs[1]], [1.0, 2.0]), (xs[0],), (torch.ones(5),)),
             lambda: vmap(lambda a: select.select_ranks(a, None, [1], True))(torch.randn(2, 5))]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()
    # functionalize is no such transform: make_fx(functionalize(f)) traces the op as one node, as before
    from torch.fx.experimental.proxy_tensor import make_fx
    f = lambda a, b: pymerge.weighted_sum([a, b], [0.25, 0.75]) * 2
    g = make_fx(torch.func.functionalize(f))(xs[0], xs[1])
    assert "pymerge.weighted_sum" in g.code
    torch.testing.assert_close(g(xs[1], xs[2]).double(), (0.5 * xs[1].double() + 1.5 * xs[2].double()))
    # eager functionalize goes through the dispatcher: its wrappers have no memory a kernel could read
    torch.testing.assert_close(torch.func.functionalize(f)(xs[1], xs[2]).double(),
                               0.5 * xs[1].double() + 1.5 * xs[2].double())
    ft = torch.func.functionalize(lambda a, b, w: pymerge.weighted_sum([a, b], w))  # tensor weights too
    torch.testing.assert_close(ft(xs[1], xs[2], torch.tensor([0.5, 1.5])).double(),
                               0.5 * xs[1].double() + 1.5 * xs[2].double())
    code = ("import torch, pymerge\nx = torch.randn(8)\ntry:\n    torch.func.functionalize(lambda a: "
            "pymerge.weighted_sum([a, a], [0.5, 0.5], out=torch.empty(8)))(x)\nexcept RuntimeError:\n    pass\n")
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])  # was SIGSEGV: address 0 written


def test_forward_mode_dual_tensors_are_refused_not_their_tangent_dropped():
    """torch.library ops drop a dual tensor's tangent without a word (the result had none); the public ops
    refuse one, as torch's own ops without a forward formula do. Plain tensors inside dual_level() still run."""
    import torch.autograd.forward_ad as fwAD
    xs = [rand(5, torch.float32, 110), rand(5, torch.float32, 111)]
    msg = r"is a forward-mode AD dual tensor \(torch.autograd.forward_ad\), which pymerge's ops do not support"
    with fwAD.dual_level():
        w = fwAD.make_dual(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
        a = fwAD.make_dual(xs[0], torch.ones(5))
        for call in (lambda: pymerge.weighted_sum(xs, w),
                     lambda: pymerge.weighted_sum([a, xs[1]], [3.0, 1.0]),
                     lambda: pymerge.weighted_sum_many([xs[1], a], [[3.0, 1.0]]),
                     lambda: pymerge.weighted_sum_many(xs, torch.stack([w, w])),
                     lambda: select.select_ranks(a, None, [1], True)):
            with pytest.raises(ValueError, match=msg):
                call()
        got = pymerge.weighted_sum(xs, [3.0, 1.0])
    torch.testing.assert_close(got.double(), 3 * xs[0].double() + xs[1].double())


def test_raw_ops_refuse_forward_mode_instead_of_a_zero_tangent():
    """torch.func.jvp / jacfwd through torch.ops.pymerge.* ran every op below autograd (no input requires
    grad there): a tangent of zeros, exit 0 (a hunt). The public ops refused already; the raw ops now say
    so too, and reverse mode and torch.compile are as before."""
    from torch.func import jacfwd, jvp
    P = torch.ops.pymerge
    a, b = rand(10, torch.float32, 120).view(2, 5), rand(10, torch.float32, 121).view(2, 5)
    w = torch.tensor([0.5, 2.0])
    zeros = lambda: torch.zeros(2, 5)  # noqa: E731
    fns = {
        "weighted_sum": lambda t: P.weighted_sum([t, b], w, torch.float32),
        "weighted_sum_many": lambda t: P.weighted_sum_many([t, b], w.view(1, 2), torch.float32)[0],
        "weighted_sum_out": lambda t: (lambda o: (P.weighted_sum_out([t, b], w, o), o)[1])(zeros()),
        "weighted_sum_many_out": lambda t: (lambda o: (P.weighted_sum_many_out([t, b], w.view(1, 2), [o]), o)[1])(
            zeros()),
        "tv_merge_out": lambda t: (lambda o: (P.tv_merge_out([t], b, [None], [0] * 7, [1.0, 1.0], False, False, 1.0,
                                                             1.0, 0, 0, 0, 0, o), o)[1])(zeros()),
        "group_dots": lambda t: P.group_dots([t], None, False, 2, 5, 1),
        "group_lincomb_out": lambda t: (lambda o: (P.group_lincomb_out([t], None, False, 2, 5, 1, torch.ones(2, 2), o),
                                                   o)[1])(zeros()),
        "select_ranks": lambda t: P.select_ranks(t, None, [1, 4], True).float(),
    }
    assert set(fns) == set(OPS)
    for name, f in fns.items():
        for transform in (lambda: jvp(f, (a,), (torch.ones(2, 5),)), lambda: jacfwd(f)(a)):
            with pytest.raises(RuntimeError, match=f"^pymerge::{name} has no forward-mode derivative"):
                transform()
        f(a)  # outside a transform: runs
        # inputs that do not depend on what jvp differentiates carry no tangent: their zero one is right
        _, tangent = jvp(lambda t: t.double().sum() * f(a).double().sum(), (a,), (torch.ones(2, 5),))
        assert float(tangent) == pytest.approx(10 * float(f(a).double().sum()), rel=1e-5), name
    x = a.clone().requires_grad_()
    P.weighted_sum([x, b], w, torch.float32).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 5), 0.5))


def test_raw_ops_refuse_what_the_public_ops_refuse_in_one_line():
    """Through torch.ops.pymerge: inputs of other shapes with as many elements were merged in memory order
    (a (3, 2) beside a (2, 3)); 0-d weights raised IndexError, complex ones pybind11's "incompatible function
    arguments", [N, 1] weights passed forward and failed in backward; a tv plan's h0 past 32 bits or a
    negative threshold got pybind11's error too (a hunt)."""
    P = torch.ops.pymerge
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(3, 2)
    w = torch.tensor([1.0, 1.0])
    shape = r"input 1 has shape \(3, 2\) but input 0 has \(2, 3\)"
    calls = [
        (lambda: P.weighted_sum([a, b], w, torch.float32), "weighted_sum: " + shape),
        (lambda: P.weighted_sum_many([a, b], w.view(1, 2), torch.float32), "weighted_sum: " + shape),
        (lambda: P.weighted_sum_out([a, b], w, torch.empty(6)), "weighted_sum: " + shape),
        (lambda: P.weighted_sum_many_out([a, b], w.view(1, 2), [torch.empty(6)]), "weighted_sum: " + shape),
        (lambda: P.tv_merge_out([a], b, [None], [0] * 7, [1.0, 1.0], False, False, 1.0, 1.0, 0, 0, 0, 0,
                                torch.empty(6)), "tv_merge: " + shape),
        (lambda: P.group_dots([a, b], None, False, 1, 6, 0), "group_dots: " + shape),
        (lambda: P.group_lincomb_out([a], b, True, 1, 6, 0, torch.ones(1, 2), torch.empty(6)),
         "group_lincomb: " + shape),
        (lambda: P.select_ranks(a, b, [1], True), "select_ranks: " + shape),
        (lambda: P.weighted_sum_many([a], torch.tensor(1.0), torch.float32),
         r"weighted_sum: weights must be a \[K, N\] tensor, got shape \(\)"),
        (lambda: P.weighted_sum([a, a], torch.tensor([1 + 1j, 2]), torch.float32),
         "weighted_sum: weights must be real numbers, got a torch.complex64 tensor"),
        (lambda: P.weighted_sum([a, a], w.view(2, 1), torch.float32),
         r"weighted_sum: weights must be a \[N\] tensor, got shape \(2, 1\)"),
        (lambda: P.tv_merge_out([a], a, [None], [0] * 7, [1.0, 1.0], False, False, 1.0, 1.0, 0, 2 ** 32, 0, 0,
                                torch.empty(6)), "tv_merge: h0 and h1 must be from 0 to 2\\*\\*32 - 1"),
        (lambda: P.tv_merge_out([a], a, [None], [3, 0, 0, 0, 0, -1, 0], [1.0, 1.0], False, False, 1.0, 1.0, 0, 0,
                                0, 0, torch.empty(6)), "tv_merge: model 0's plan has mode 3 and threshold -1"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=f"^{message}"):
            call()
    # and traced: the fake kernels refuse the same shapes
    with pytest.raises(Exception, match=shape):  # (dynamo wraps the fake kernel's ValueError)
        torch.compile(lambda x, y: P.weighted_sum([x, y], w, torch.float32), fullgraph=True)(a, b)


@pytest.mark.parametrize("backend", ["bogus", "cuda", "triton", "torch", ""])
def test_raw_ops_refuse_a_backend_that_does_not_run_on_their_tensors(backend):
    """The raw CPU kernels ran whatever backend string they were given ('bogus', 'cuda' on CPU tensors)
    as 'auto'; the public wrappers refuse both."""
    P = torch.ops.pymerge
    x, y, w = torch.randn(10), torch.randn(10), torch.tensor([1.0, 2.0])
    xs, base, bits, ints, floats = _tv_case(10, 10)
    calls = [("weighted_sum", lambda: P.weighted_sum([x, y], w, torch.float32, backend)),
             ("weighted_sum", lambda: P.weighted_sum_many([x, y], w.reshape(1, 2), torch.float32, backend)),
             ("weighted_sum", lambda: P.weighted_sum_out([x, y], w, torch.empty(10), backend)),
             ("weighted_sum", lambda: P.weighted_sum_many_out([x, y], w.reshape(1, 2), [torch.empty(10)], backend)),
             ("tv_merge", lambda: P.tv_merge_out(xs, base, bits, ints, floats, False, True, 1.0, 1.0, 3, 1, 2, 0,
                                                 torch.empty(10), backend))]
    for op, call in calls:
        with pytest.raises(ValueError, match=rf"^{op}: backend '{backend}' does not run on cpu tensors; "
                                             "choose one of auto, cpu$"):
            call()
    for ok in ("auto", "cpu"):
        assert torch.allclose(P.weighted_sum([x, y], w, torch.float32, ok), x + 2 * y)


def test_raw_task_vector_op_refuses_plans_the_kernels_would_truncate_and_a_bitmask_under_its_output():
    """The public wrappers make these plans; a call through torch.ops got none of their checks: a top-k key past
    32 bits kept every element (uint32 truncation), an offset past philox's range repeated offset 0's draws, and a
    bitmask sharing the output's memory was read as the output overwrote it (an audit)."""
    P = torch.ops.pymerge
    x, base, out = torch.arange(1.0, 65.0), torch.zeros(64), torch.empty(64)

    def run(ints, offset=0, bits=None, o=out):
        P.tv_merge_out([x], base, [bits], ints, [1.0, 1.0], False, False, 1.0, 1.0, 0, 0, 0, offset, o)
    run([tvo.TOPK, 0, 0, (1 << 31) - 1, 0, 0, 0])  # the largest key: keeps nothing, as the boundary says
    assert int((out != 0).sum()) == 0
    for key in (1 << 31, 1 << 32, 1 << 40, -2):
        with pytest.raises(ValueError, match="top-k boundary key"):
            run([tvo.TOPK, 0, 0, key, 0, 0, 0])
    run([tvo.RANGE, 0, 0, 1 << 31, 0, 0, 0])  # [0, 2**31): every key
    assert torch.equal(out, x)
    for lo, hi in ((-1, 5), (0, (1 << 31) + 1), (1 << 33, 1 << 33)):
        with pytest.raises(ValueError, match="range boundary keys"):
            run([tvo.RANGE, lo, 0, hi, 0, 0, 0])
    from pymerge.ops import philox
    run([tvo.RANDOM, 0, 0, 0, 0, 1 << 31, 0], offset=philox.MAX_ELEMENTS - 64)  # the last window: fine
    for offset in (philox.MAX_ELEMENTS - 63, philox.MAX_ELEMENTS, -1):
        with pytest.raises(ValueError, match="offset"):
            run([tvo.RANDOM, 0, 0, 0, 0, 1 << 31, 0], offset=offset)
    store = torch.zeros(64)
    bits = store.view(torch.int64)[:1]
    bits.fill_(-1)
    with pytest.raises(ValueError, match="bitmask 0 shares memory with the output"):
        run([tvo.BITS, 0, 0, 0, 0, 0, 0], bits=bits, o=store)
    run([tvo.BITS, 0, 0, 0, 0, 0, 0], bits=bits.clone())
    assert torch.equal(out, x)


def test_group_lincomb_refuses_coefficients_float32_cannot_hold():
    x, y = torch.randn(6, 7), torch.randn(6, 7)
    for big in (1e39, -4e38):
        coef = torch.full((6, 3), 0.5, dtype=torch.float64)
        coef[2, 1] = big
        with pytest.raises(ValueError, match="beyond float32's range"):
            interp.group_lincomb([x, y], None, False, "rows", coef, torch.empty(6, 7))
    coef = torch.full((1, 3), 0.5, dtype=torch.float64)
    coef[0, 0] = float("nan")  # NaN (a NaN checkpoint's dot product) propagates, as mergekit's does
    out = interp.group_lincomb([x, y], None, False, "whole", coef, torch.empty(6, 7))
    assert out.isnan().all()
    coef[0, 0] = 3e38  # within range
    out = interp.group_lincomb([x, y], None, False, "whole", coef, torch.empty(6, 7))
    assert torch.isfinite(out).any()


def test_out_forms_refuse_an_inference_tensor_outside_inference_mode_as_torch_s_do():
    P = torch.ops.pymerge
    a, b = torch.ones(8), torch.full((8,), 2.0)
    with torch.inference_mode():
        target = torch.zeros(8)
    with pytest.raises(RuntimeError):  # torch's own rule
        torch.add(a, b, out=target)
    with torch.inference_mode():
        target.zero_()  # (torch's add wrote it before it raised)
    calls = [lambda: pymerge.weighted_sum([a, b], [1.0, 1.0], out=target),
             lambda: pymerge.weighted_sum_many([a, b], [[1.0, 1.0]], outs=[target]),
             lambda: P.weighted_sum_out([a, b], torch.tensor([1.0, 1.0]), target),
             lambda: P.weighted_sum_many_out([a, b], torch.tensor([[1.0, 1.0]]), [target]),
             lambda: P.tv_merge_out([a], b, [None], [tvo.NONE] + [0] * 6, [1.0, 1.0], False, False, 1.0, 1.0,
                                    0, 0, 0, 0, target),
             lambda: P.group_lincomb_out([a], None, False, 1, 8, 0, torch.ones(1, 2), target)]
    # the public wrappers' CPU paths wrote it by address, silently (an audit)
    from pymerge.ops import elementwise_mix, interp
    calls += [lambda: interp.group_lincomb([a], b, True, "whole", torch.ones(1, 2, dtype=torch.float64), target,
                                           backend="cpu"),
              lambda: tvo.task_vector_merge([a, b], b, target, [tvo.Sparsifier("magnitude", 0.5)] * 2, [1, 1],
                                            consensus=True, normalize=False, backend="cpu"),
              lambda: elementwise_mix.ram([a, b], b, 1e-5, target, backend="cpu"),
              lambda: elementwise_mix.nearswap(b, a, 0.5, target, backend="cpu")]
    for k, call in enumerate(calls):
        with pytest.raises(RuntimeError, match="out is an inference tensor"):
            call()
        assert torch.equal(target, torch.zeros(8)), k
        with torch.inference_mode():
            call()
        assert not torch.equal(target, torch.zeros(8)), k
        with torch.inference_mode():
            target.zero_()


def test_copies_of_non_contiguous_inputs_past_the_available_memory_are_refused(monkeypatch):
    """An input expand()ed to 2**31 elements holds no memory of its own, but its contiguous copy does: two of them
    and the output were SIGKILLed by the OOM killer on a 24 GB machine (an audit), before any error."""
    import pymerge.sizes
    monkeypatch.setattr(pymerge.sizes, "host_available", lambda: 2 << 30)
    a = torch.ones(1).expand(1 << 28)  # 1 GiB as float32, once copied
    with pytest.raises(ValueError, match=r"copies of 2 non-contiguous input\(s\) and the output need 3.0 GiB, more "
                                         r"than the 2.0 GiB"):
        pymerge.weighted_sum([a, a], [0.5, 0.5])
    small = torch.ones(1).expand(1000)  # far below a GiB: copied as before
    assert torch.equal(pymerge.weighted_sum([small, small], [0.5, 0.5]), torch.ones(1000))


def test_torch_jit_trace_records_the_ops_or_refuses_out():
    """torch.jit.trace sees only what passes the dispatcher: the eager fast path (a kernel run by address) left
    only the output's torch.empty in the trace, which then returned uninitialized memory (an audit). Traced,
    the functional forms go through the dispatcher; out= forms (the tracer drops writes into a Tensor[]) are
    refused in one line; nearswap-like ops take their torch path."""
    import warnings
    from pymerge.ops import elementwise_mix
    a, b = torch.randn(37), torch.randn(37)
    x, y = torch.randn(37), torch.randn(37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own TracerWarnings
        one = torch.jit.trace(lambda a, b: pymerge.weighted_sum([a, b], [0.25, 0.75]), (a, b))
        many = torch.jit.trace(lambda a, b: pymerge.weighted_sum_many([a, b], [[0.5, 0.5], [1.0, -2.0]]), (a, b))

        def swap(a, b):
            o = torch.zeros(37)
            elementwise_mix.nearswap(a, b, 0.5, o)
            return o
        traced_swap = torch.jit.trace(swap, (a, b))

        def into(a, b):
            o = torch.zeros(37)
            pymerge.weighted_sum([a, b], [0.5, 0.5], out=o)
            return o
        with pytest.raises(RuntimeError, match="torch.jit.trace does not record writes into out=; trace the "
                                               "functional form"):
            torch.jit.trace(into, (a, b))
    assert torch.equal(one(x, y), pymerge.weighted_sum([x, y], [0.25, 0.75]))
    assert all(torch.equal(p, q) for p, q in zip(many(x, y), pymerge.weighted_sum_many([x, y], [[0.5, 0.5], [1.0, -2.0]])))
    assert torch.equal(traced_swap(x, y), swap(x, y))


_P = torch.ops.pymerge
_REFUSED_BY_METADATA = {  # calls every kernel refuses before reading data; dev: where the tensors are made
    "float64 inputs": lambda dev: _P.weighted_sum([torch.ones(4, dtype=torch.float64, device=dev)] * 2,
                                                  torch.tensor([1., 1.]), torch.float32),
    "backend bogus": lambda dev: _P.weighted_sum([torch.ones(4, device=dev)] * 2, torch.tensor([1., 1.]),
                                                 torch.float32, "bogus"),
    "num_threads -1": lambda dev: _P.weighted_sum_many([torch.ones(4, device=dev)] * 2, torch.ones(1, 2),
                                                       torch.float32, "auto", -1),
    "no outputs": lambda dev: _P.weighted_sum_many([torch.ones(4, device=dev)] * 2, torch.ones(0, 2), torch.float32),
    "out of 5 elements": lambda dev: _P.weighted_sum_out([torch.ones(4, device=dev)] * 2, torch.tensor([1., 1.]),
                                                         torch.empty(5, device=dev)),
    "int32 out": lambda dev: _P.weighted_sum_many_out([torch.ones(4, device=dev)] * 2, torch.ones(1, 2),
                                                      [torch.empty(4, dtype=torch.int32, device=dev)]),
    "non-contiguous out": lambda dev: _P.weighted_sum_out([torch.ones(4, 2, device=dev)] * 2, torch.ones(2),
                                                          torch.empty(2, 4, device=dev).t()),
    "rank past the elements": lambda dev: _P.select_ranks(torch.ones(4, device=dev), None, [5], True),
    "rows x cols not the elements": lambda dev: _P.group_dots([torch.ones(2, 3, device=dev)] * 2, None, False, 4, 3, 1),
    "group -1": lambda dev: _P.group_dots([torch.ones(2, 3, device=dev)] * 2, None, False, 2, 3, -1),
    "sub without a base": lambda dev: _P.group_lincomb_out([torch.ones(2, 3, device=dev)] * 2, None, True, 2, 3, 1,
                                                           torch.ones(2, 3), torch.empty(2, 3, device=dev)),
    "coef of the wrong size": lambda dev: _P.group_lincomb_out([torch.ones(2, 3, device=dev)] * 2, None, False, 2, 3,
                                                               1, torch.ones(5), torch.empty(2, 3, device=dev)),
    "plan of the wrong length": lambda dev: _P.tv_merge_out([torch.ones(4, device=dev)], torch.ones(4, device=dev),
                                                            [None], [0] * 3, [1.0, 1.0], False, False, 1.0, 1.0, 0, 0,
                                                            0, 0, torch.empty(4, device=dev)),
}


@pytest.mark.parametrize("case", sorted(_REFUSED_BY_METADATA))
def test_the_fake_kernels_refuse_what_the_real_ones_refuse(case):
    """The fake (shape) kernels run for meta tensors and under tracing: 22 calls the real kernels refuse got a
    result there (an output of the wrong size, a rank past the tensor, float64 inputs...; an audit). Each now
    fails with the real kernel's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    call = _REFUSED_BY_METADATA[case]
    with pytest.raises(ValueError) as real:
        call("cpu")
    with FakeTensorMode(), pytest.raises(ValueError, match=re.escape(str(real.value))):
        call("cpu")
    cpu_only = str(real.value).split(" does not run on")[0].split(" on cpu;")[0]  # (meta tensors: other device)
    with pytest.raises(ValueError, match=re.escape(cpu_only)):
        call("meta")
