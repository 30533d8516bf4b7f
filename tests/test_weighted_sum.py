"""weighted_sum / weighted_sum_many on the CPU: C++ kernel (every SIMD path) and the torch fallback,
against the float64 reference of tests/wsum_reference.py, plus every bad input."""
import itertools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pymerge import weighted_sum, weighted_sum_many
from wsum_reference import FP8, IN_DTYPES, OUT_DTYPES, check_close, random_inputs, random_weights

CPU_BLOCK = 4096  # csrc/cpu/weighted_sum.cpp kBlock
PASS_BLOCK = 16384  # kPassBlock: the block when more than 8 inputs are swept in passes (AVX-512)
SIZES = [0, 1, 2, 7, 31, CPU_BLOCK - 1, CPU_BLOCK, CPU_BLOCK + 1, PASS_BLOCK - 1, PASS_BLOCK + 33, 65537]
COUNTS = [1, 2, 3, 5, 16, 33]


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("size", SIZES)
def test_cpu_sizes_and_counts(size, n):
    xs = random_inputs(n, size, [torch.bfloat16], seed=size * 7 + n)
    w = random_weights(n, seed=n)
    check_close(weighted_sum(xs, w, backend="cpu"), xs, w)


@pytest.mark.parametrize("n", [2, 33])
def test_cpu_a_million_elements(n):
    xs = random_inputs(n, 1_000_003, [torch.bfloat16], seed=n)
    w = random_weights(n)
    check_close(weighted_sum(xs, w), xs, w)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_every_dtype_pair(in_dtype, out_dtype, backend):
    xs = random_inputs(3, 2 * CPU_BLOCK + 17, [in_dtype], seed=3)
    w = [0.5, -1.25, 2.0]
    out = weighted_sum(xs, w, out_dtype=out_dtype, backend=backend)
    assert out.dtype == out_dtype
    check_close(out, xs, w)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("n", [5, 16])
def test_mixed_input_dtypes(n, out_dtype):
    xs = random_inputs(n, 5003, IN_DTYPES, seed=n)
    w = random_weights(n)
    check_close(weighted_sum(xs, w, out_dtype=out_dtype), xs, w)


def test_default_out_dtype_is_promoted():
    a, b = torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float16)
    assert weighted_sum([a, a], [1, 1]).dtype == torch.bfloat16
    assert weighted_sum([a, b], [1, 1]).dtype == torch.float32
    assert weighted_sum([a, a.float()], [1, 1]).dtype == torch.float32
    if FP8:
        f8 = torch.ones(3).to(FP8[0])
        assert weighted_sum([f8, f8], [1, 1]).dtype == torch.bfloat16


def test_zero_negative_and_large_weights():
    xs = random_inputs(4, 9999, [torch.float32], seed=4)
    for w in ([0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1e6, -3.5], [1e-30, 1.0, -1e-30, 0.0]):
        check_close(weighted_sum(xs, w), xs, w)
    assert torch.count_nonzero(weighted_sum(xs, [0.0] * 4)) == 0


@pytest.mark.parametrize("weights", [
    [0.25, 0.75], (0.25, 0.75), torch.tensor([0.25, 0.75]), np.array([0.25, 0.75]), torch.tensor([0.25, 0.75]).double(),
])
def test_weight_containers(weights):
    xs = random_inputs(2, 100, [torch.bfloat16])
    check_close(weighted_sum(xs, weights), xs, [0.25, 0.75])


def test_decimal_weights_are_read_as_fractions_are():
    """A Decimal is no numbers.Real, so it was refused ("weights must be numbers") where a Fraction is read."""
    from decimal import Decimal
    from fractions import Fraction
    xs = random_inputs(2, 100, [torch.float32], seed=4)
    check_close(weighted_sum(xs, [Decimal("0.1"), Decimal("-2.5")]), xs, [0.1, -2.5])
    check_close(weighted_sum_many(xs, [[Decimal(3), Fraction(1, 4)]])[0], xs, [3.0, 0.25])
    with pytest.raises(ValueError, match=r"^weights\[0\] is nan; weights must be finite$"):
        weighted_sum(xs, [Decimal("NaN"), 1.0])
    with pytest.raises(ValueError, match=r"^weights must be finite and within float32's range"):
        weighted_sum(xs, [Decimal("1e400"), 1.0])  # float() says inf: not "is inf"


@pytest.mark.parametrize("fullgraph", [True, False])
def test_numpy_weights_compile_as_in_eager(fullgraph):
    """torch.compile traces numpy arrays and scalars as (0-d) arrays, which the numbers ABCs and float() do
    not take there: fullgraph stopped in dynamo ("repr() on tensor"), and with graph breaks the valid weights
    were refused ("weights must be numbers"). Now they become one traced tensor."""
    xs = random_inputs(2, 100, [torch.bfloat16, torch.float32], seed=3)
    torch._dynamo.reset()
    one = torch.compile(lambda xs, w: weighted_sum(xs, w), fullgraph=fullgraph)
    many = torch.compile(lambda xs, w: weighted_sum_many(xs, w), fullgraph=fullgraph)
    for w in (np.array([0.25, -2.0]), [np.float64(0.25), np.float32(-2.0)], (0.25, np.int64(-2))):
        check_close(one(xs, w), xs, [0.25, -2.0])
    for got, row in zip(many(xs, np.array([[0.25, -2.0], [3.0, 0.5]])), ([0.25, -2.0], [3.0, 0.5])):
        check_close(got, xs, row)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_propagate(dtype, backend):
    xs = random_inputs(3, 4100, [dtype], seed=9)
    xs[0][5] = float("nan")
    xs[1][17] = float("inf")
    xs[2][17] = float("inf")     # inf + inf stays inf
    xs[1][40] = float("inf")
    xs[2][40] = float("-inf")    # inf - inf is NaN
    xs[2][4099] = float("-inf")  # the tail past the last full vector
    w = [0.5, 1.0, 1.0]
    out = weighted_sum(xs, w, backend=backend)
    assert math.isnan(out[5]) and out[17] == float("inf") and math.isnan(out[40]) and out[4099] == float("-inf")
    check_close(out, xs, w)


def test_denormal_outputs_are_rounded_not_flushed():
    # VCVTNEPS2BF16 would flush these to zero; round-to-nearest-even keeps them.
    x = torch.full((64,), 3e-39, dtype=torch.float32)
    for out_dtype in (torch.bfloat16, torch.float32):
        out = weighted_sum([x], [1.0], out_dtype=out_dtype)
        assert bool((out != 0).all())
        check_close(out, [x], [1.0])


def test_round_to_nearest_even():
    # 1 + 2**-8 lies exactly between two bfloat16 numbers: ties go to the even one (1.0);
    # 1 + 3 * 2**-8 goes up to 1 + 2**-6.
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)] * 11, dtype=torch.float32)
    out = weighted_sum([x], [1.0], out_dtype=torch.bfloat16).float()
    assert out[:3].tolist() == [1.0, 1 + 2 ** -6, -1.0]
    assert torch.equal(out, x.to(torch.bfloat16).float())


def test_out_in_place_and_aliasing_an_input():
    xs = random_inputs(3, 7777, [torch.bfloat16], seed=1)
    w = [0.2, 0.3, 0.5]
    expected = weighted_sum(xs, w)
    out = torch.empty_like(xs[0])
    res = weighted_sum(xs, w, out=out)
    assert res is out and torch.equal(out, expected)
    ptr = xs[0].data_ptr()
    originals = [x.clone() for x in xs]
    res = weighted_sum(xs, w, out=xs[0])  # x0 <- 0.2 x0 + 0.3 x1 + 0.5 x2
    assert res.data_ptr() == ptr
    check_close(res, originals, w)


def test_scalar_and_multidimensional_inputs():
    xs = [torch.tensor(2.0), torch.tensor(3.0)]
    out = weighted_sum(xs, [0.5, 2.0])
    assert out.shape == () and out.item() == 7.0
    ys = random_inputs(2, (3, 5, 7), [torch.float16])
    out = weighted_sum(ys, [1.0, -1.0])
    assert out.shape == (3, 5, 7)
    check_close(out, ys, [1.0, -1.0])


def test_non_contiguous_inputs_give_the_right_answer():
    xs = random_inputs(3, (64, 33), [torch.bfloat16], seed=2)
    ts = [x.t() for x in xs]
    w = [1.0, 2.0, -0.5]
    out = weighted_sum(ts, w)
    assert out.shape == (33, 64)
    check_close(out, ts, w)


def test_threads_do_not_change_the_result():
    xs = random_inputs(5, 300_001, [torch.bfloat16], seed=5)
    w = random_weights(5)
    one = weighted_sum(xs, w, num_threads=1)
    two = weighted_sum(xs, w, num_threads=2)
    assert torch.equal(one, two)


@pytest.mark.parametrize("simd", ["avx2", "scalar"])
def test_other_simd_paths(simd):
    """The AVX2 and scalar paths (chosen at import) meet the same bound, in a fresh process."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from pymerge import _native, weighted_sum, weighted_sum_many
from wsum_reference import IN_DTYPES, OUT_DTYPES, check_close, random_inputs, random_weights
assert _native.cpu.simd_level() in ({simd!r}, "scalar"), _native.cpu.simd_level()
for size in (0, 1, 15, 4095, 4097, 70001):
    for out_dtype in OUT_DTYPES:
        xs = random_inputs(5, size, IN_DTYPES, seed=size)
        w = random_weights(5)
        check_close(weighted_sum(xs, w, out_dtype=out_dtype), xs, w)
        for o in weighted_sum_many(xs, [w, w[::-1]], out_dtype=out_dtype):
            pass
        check_close(o, xs, w[::-1])
print("ok")
"""
    env = dict(os.environ, PYMERGE_SIMD=simd)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _outputs_under(simd: str, tmp_path) -> list:
    """weighted_sum_many over mixed and all-bfloat16 inputs (NaN, inf, denormals, rounding ties, every
    input dtype; a few inputs and more than 8), sizes with every tail length, 1 to 9 outputs of every dtype, in a fresh process on
    the given SIMD path (chosen at import)."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from pymerge import _native, weighted_sum_many
from wsum_reference import IN_DTYPES, OUT_DTYPES, random_inputs
import numpy as np
outs = []
for size in (1, 15, 16, 17, 31, 4096 + 77, 16384 + 45, 70001, (1 << 22) + 37):  # the last one streams its stores
    for dtypes, n in ((IN_DTYPES, 7), ([torch.bfloat16], 3), (IN_DTYPES, 14), ([torch.bfloat16], 13)):
        # 13 and 14 inputs: AVX-512 sweeps them in passes of 4, partial sums kept between passes
        if size > 10 ** 6 and n < 13:  # the streaming stores of both kernels (mixed, all-bfloat16): half the time
            continue
        xs = random_inputs(n, size, dtypes, seed=size)
        xs[0].view(-1)[0] = float("nan")
        xs[1].view(-1)[-1] = float("inf")
        if size > 40:
            xs[2].view(-1)[3:9] = 3e-39      # denormal results
            xs[-1].view(-1)[20:36] = 1 + 2 ** -7  # sums near rounding ties
        rows = np.random.default_rng(size).normal(size=(9, len(xs))).astype(np.float32)
        for k in (1, 3, 6, 7, 9) if size < 10 ** 6 else (1, 7):
            for out_dtype in OUT_DTYPES if dtypes != [torch.bfloat16] else [torch.bfloat16, torch.float32]:
                outs.append(torch.stack(weighted_sum_many(xs, rows[:k].tolist(), out_dtype=out_dtype)))
torch.save([_native.cpu.simd_level(), outs], {str(tmp_path / (simd + '.pt'))!r})
"""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYMERGE_SIMD=simd), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return torch.load(tmp_path / f"{simd}.pt")


def test_every_simd_path_gives_the_same_bits(tmp_path):
    """AVX-512, AVX2 and scalar builds compute the same float32 operations in the same order: equal
    bits on every input, not just the same error bound (a CPU without AVX-512 runs the AVX2 path
    under both of its names)."""
    runs = {simd: _outputs_under(simd, tmp_path) for simd in ("avx512", "avx2", "scalar")}
    assert runs["scalar"][0] == "scalar" and runs["avx2"][0] in ("avx2", "scalar")
    want = runs["scalar"][1]
    for simd in ("avx512", "avx2"):
        got = runs[simd][1]
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            bits = torch.int32 if g.dtype == torch.float32 else torch.int16
            assert torch.equal(g.view(bits), w.view(bits)), (simd, i, g.dtype)


def test_float32_accumulation_is_required():
    """The bound is tight enough that accumulating in bfloat16 would fail it."""
    xs = random_inputs(16, 50_000, [torch.bfloat16], seed=11)
    w = [1.0 / 16] * 16
    acc = torch.zeros_like(xs[0])
    for x, wi in zip(xs, w):
        acc = acc + x * wi  # bfloat16 arithmetic
    with pytest.raises(AssertionError):
        check_close(acc, xs, w)
    check_close(weighted_sum(xs, w), xs, w)


# ---- weighted_sum_many ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 6, 9])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_many_matches_reference(k, backend):
    xs = random_inputs(5, 2 * CPU_BLOCK + 3, [torch.bfloat16, torch.float32], seed=k)
    rows = [random_weights(5, seed=100 + j) for j in range(k)]
    outs = weighted_sum_many(xs, rows, out_dtype=torch.bfloat16, backend=backend)
    assert len(outs) == k
    for o, row in zip(outs, rows):
        check_close(o, xs, row)


@pytest.mark.parametrize("n, k", [(13, 65), (9, 2), (17, 4)])
def test_many_inputs_and_outputs_equal_single_calls_bitwise(n, k):
    """AVX-512 sweeps more than 8 inputs in passes for one output (65 = 64 + 1: the last group of outputs
    too), the others in one pass: the same operations in the same order, so the same bits."""
    xs = random_inputs(n, PASS_BLOCK * 2 + 45, [torch.bfloat16, torch.float32], seed=n)
    rows = torch.randn(k, n, generator=torch.Generator().manual_seed(k))
    for o, row in zip(weighted_sum_many(xs, rows, out_dtype=torch.float32), rows):
        assert torch.equal(o, weighted_sum(xs, row, out_dtype=torch.float32))


def test_many_equals_single_calls_bitwise():
    xs = random_inputs(5, 100_003, [torch.bfloat16], seed=3)
    rows = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    outs = [torch.empty_like(xs[0]) for _ in range(6)]
    res = weighted_sum_many(xs, rows, outs=outs)
    assert all(a is b for a, b in zip(res, outs))
    for o, row in zip(outs, rows):
        assert torch.equal(o, weighted_sum(xs, row))


# ---- bad input ------------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape or (4,), dtype=dtype)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: weighted_sum([], []), ValueError, "at least one input"),
    (lambda: weighted_sum(_x(), [1.0]), TypeError, "sequence of tensors"),
    (lambda: weighted_sum([_x(), [1, 2, 3, 4]], [1, 1]), TypeError, "input 1 is a list"),
    (lambda: weighted_sum([_x(), _x(5)], [1, 1]), ValueError, r"input 1 has shape \(5,\) but input 0 has shape \(4,\)"),
    (lambda: weighted_sum([_x(), _x(dtype=torch.int32)], [1, 1]), TypeError, "input 1 has unsupported dtype torch.int32"),
    (lambda: weighted_sum([_x(), _x(dtype=torch.float64)], [1, 1]), TypeError, "unsupported dtype torch.float64"),
    (lambda: weighted_sum([_x(), _x()], [1.0]), ValueError, "got 1 weights for 2 inputs"),
    (lambda: weighted_sum([_x(), _x()], [1.0, float("nan")]), ValueError, r"weights\[1\] is nan"),
    (lambda: weighted_sum([_x(), _x()], [float("inf"), 1.0]), ValueError, r"weights\[0\] is inf"),
    (lambda: weighted_sum([_x()], ["a"]), TypeError, "weights must be numbers"),
    (lambda: weighted_sum([_x()], torch.ones(1, 1)), ValueError, "must be a 1-D tensor of real numbers"),
    # were parsed or taken: "12" as [1, 2], a dict as its keys, booleans as 1 and 0 (found by a review)
    (lambda: weighted_sum([_x(), _x()], "12"), TypeError, "weights must be a sequence of numbers, got '12'"),
    (lambda: weighted_sum([_x(), _x()], {0: 0.9, 1: 0.1}), TypeError, "weights must be a sequence of numbers"),
    (lambda: weighted_sum([_x(), _x()], [True, False]), TypeError, "weights must be numbers"),
    (lambda: weighted_sum([_x(), _x()], ["0.5", 0.5]), TypeError, "weights must be numbers"),
    (lambda: weighted_sum([_x(), _x()], torch.tensor([True, False])), ValueError, "1-D tensor of real numbers"),
    (lambda: weighted_sum_many([_x(), _x()], [["0.2", "0.8"]]), TypeError, "weights of row 0 must be numbers"),
    # an API fuzz: a mapping's keys were taken as the rows (and merged) or as the inputs; None said "'NoneType'
    # object is not iterable"; an endless generator of weights grew memory without bound
    (lambda: weighted_sum_many([_x(), _x()], {(0.2, 0.8): "A"}), TypeError, "weight_rows must be a .K, N. table"),
    (lambda: weighted_sum_many([_x(), _x()], None), TypeError, "weight_rows must be a .K, N. table of weights, got None"),
    (lambda: weighted_sum({"a": _x()}, [1.0]), TypeError, r"tensors must be a sequence of tensors, got a dict of 1 "
                                                          r"entries; pass list\(d.values\(\)\)$"),
    (lambda: weighted_sum(None, [1.0]), TypeError, "tensors must be a sequence of tensors, got None"),
    (lambda: weighted_sum([_x(), _x()], itertools.count()), ValueError, "got more than 2 weights for 2 inputs"),
    # finite in float64, inf in the float32 kernels (1e39 * 0 gave NaN)
    (lambda: weighted_sum([_x(), _x()], [1e39, 1.0]), ValueError, r"weights\[0\] is 1e\+39, beyond float32's range"),
    (lambda: weighted_sum([_x(), _x()], [10**400, 1]), ValueError, r"weights must be finite and within float32's range"),
    (lambda: weighted_sum([_x()], [1.0], out=_x(5)), ValueError, r"out has shape \(5,\)"),
    (lambda: weighted_sum([_x()], [1.0], out=_x(dtype=torch.int64)), TypeError, "out has unsupported dtype"),
    (lambda: weighted_sum([_x()], [1.0], out=_x(), out_dtype=torch.bfloat16), ValueError, "out has dtype torch.float32 but out_dtype"),
    (lambda: weighted_sum([_x()], [1.0], out_dtype=torch.int8), TypeError, "unsupported out_dtype"),
    # a name was "unsupported out_dtype bfloat16; supported: bfloat16, ..." (an audit)
    (lambda: weighted_sum([_x()], [1.0], out_dtype="bfloat16"), TypeError,
     r"^out_dtype must be a torch.dtype \(torch.bfloat16, torch.float16 or torch.float32\), got 'bfloat16'$"),
    (lambda: weighted_sum([_x(4, 4)], [1.0], out=_x(4, 4).t()), ValueError, "out must be contiguous"),
    (lambda: weighted_sum([_x()], [1.0], backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (lambda: weighted_sum([_x()], [1.0], out="x"), TypeError, "out must be a torch.Tensor"),
    (lambda: weighted_sum_many([_x()], []), ValueError, "at least one row"),
    (lambda: weighted_sum_many([_x(), _x()], [[1, 2], [1]]), ValueError, "got 1 weights of row 1 for 2 inputs"),
    (lambda: weighted_sum_many([_x()], [[1]], outs=[_x(), _x()]), ValueError, "got 2 outputs for 1 rows"),
])
def test_bad_input_is_rejected_clearly(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_partial_overlap_of_out_and_input_is_rejected():
    buf = torch.zeros(10)
    with pytest.raises(ValueError, match="partially overlaps input 0"):
        weighted_sum([buf[:8]], [1.0], out=buf[2:])


def test_device_mismatch_is_rejected():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="input 1 is on meta but input 0 is on cpu"):
        weighted_sum([_x(), meta], [1.0, 1.0])


def test_meta_outputs_are_shapes_not_overlaps():
    """Every meta tensor is at address 0: a meta out= was refused as overlapping its inputs (an audit), where
    the functional forms and the raw ops give shapes."""
    from pymerge import weighted_sum_many
    m = lambda dt=torch.float32: torch.empty(5, 7, device="meta", dtype=dt)  # noqa: E731
    out = m(torch.bfloat16)
    assert weighted_sum([m(), m(torch.float16)], [0.5, 0.5], out=out) is out
    outs = [m(), m()]
    assert all(a is b for a, b in zip(weighted_sum_many([m(), m()], [[0.5, 0.5]] * 2, outs=outs), outs))


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="backend 'cpu' needs cpu tensors"):
        weighted_sum([torch.zeros(4, device="meta")], [1.0], backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_core_takes_weights_as_a_tensor(backend):
    from pymerge.ops.weighted_sum import weighted_sum_into
    xs = random_inputs(5, 3001, [torch.bfloat16, torch.float16], seed=12)
    rows = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    outs = [torch.empty(3001, dtype=torch.bfloat16) for _ in range(3)]
    weighted_sum_into(xs, rows, outs, backend=backend)
    for o, row in zip(outs, rows.tolist()):
        check_close(o, xs, row)


def test_several_outputs_may_not_alias_an_input():
    xs = random_inputs(3, 100, [torch.float32])
    with pytest.raises(ValueError, match="shares memory with input 1"):
        weighted_sum_many(xs, [[1, 0, 0], [0, 1, 0]], outs=[torch.empty(100), xs[1]])
    one = weighted_sum_many(xs, [[0.5, 0.5, 0]], outs=[xs[0]])  # one output in place is fine
    assert one[0] is xs[0]


def test_concurrent_calls_from_several_threads():
    """The kernel releases the GIL and shares one worker pool: concurrent callers take turns."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(random_inputs(3, 600_001, [torch.bfloat16], seed=s), random_weights(3, seed=s)) for s in range(4)]
    expected = [weighted_sum(xs, w, num_threads=1) for xs, w in jobs]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            got = list(ex.map(lambda job: weighted_sum(*job), jobs))
            assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_weighted_sum_many_refuses_shared_outputs_and_malformed_arguments():
    """Were a silent race (outputs sharing memory), an AttributeError (outs=[None]) and "'float' object is
    not iterable" (a 0-d weight table)."""
    from pymerge.ops.weighted_sum import weighted_sum_many
    x = [torch.ones(3), torch.ones(3)]
    buf = torch.empty(5)
    with pytest.raises(ValueError, match=r"outs\[0\] and outs\[1\] share memory"):
        weighted_sum_many(x, [[1.0, 1.0], [2.0, 2.0]], outs=[buf[:3], buf[1:4]])
    with pytest.raises(ValueError, match=r"outs\[0\] and outs\[2\] share memory"):
        weighted_sum_many(x, [[1.0, 1.0]] * 3, outs=[buf[:3], torch.empty(3), buf[2:5]])
    with pytest.raises(TypeError, match=r"outs\[0\] is a NoneType, not a torch.Tensor"):
        weighted_sum_many(x, [[1.0, 1.0]], outs=[None])
    with pytest.raises(ValueError, match=r"weight_rows must be a \[K, N\] table, got shape \(\)"):
        weighted_sum_many(x, torch.tensor(1.0))
    a, b = torch.empty(3), torch.empty(3)
    weighted_sum_many(x, [[1.0, 1.0], [2.0, 2.0]], outs=[a, b])  # separate outputs: fine
    assert a.tolist() == [2.0] * 3 and b.tolist() == [4.0] * 3


def test_weights_that_cannot_be_read_are_refused_before_any_copy():
    """An API audit: an expand()ed weight tensor of 10**8 was copied (4.6 GB) before its length was refused; a
    sparse one, a meta or a freed 0-d tensor among the weights raised torch's own errors (the freed one's repr in
    the message read past its storage: a segfault)."""
    xs = [torch.ones(4)] * 3
    with pytest.raises(ValueError, match="got 100000000 weights for 3 inputs"):
        weighted_sum(xs, torch.tensor([0.5]).expand(10**8))
    with pytest.raises(ValueError, match=r"weight_rows must be a \[K, 3\] table"):
        weighted_sum_many(xs, torch.tensor([[0.5]]).expand(10**7, 2))
    with pytest.raises(ValueError, match="sparse"):
        weighted_sum(xs, torch.tensor([0.2, 0.3, 0.5]).to_sparse())
    freed = torch.tensor(0.5)
    freed.untyped_storage().resize_(0)
    for bad, words in ((torch.tensor(0.5, device="meta"), "device='meta'"), (freed, "whose storage is freed")):
        with pytest.raises(TypeError, match=re.escape(words)):
            weighted_sum(xs, [bad, 0.2, 0.3])
