"""The weighted sums' delta form (task_arithmetic's arithmetic): tensors[0] is a base B and
out = w_0 * B + sum_{i>=1} w_i * (x_i - B), each difference formed in float32, B's own term last.

Every backend against a float64 reference (sizes around the kernels' blocks and strips, every dtype,
one to many inputs and outputs, NaN and inf), the C++ kernel's SIMD builds and the Triton kernel
bit for bit against each other, and the reason the form exists: from bfloat16 checkpoints a result on
a bfloat16 halfway point rounds as the exact result does (the one-pass rewrite it replaced did not).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pymerge.ops.weighted_sum import delta_sum, weighted_sum, weighted_sum_into
from conftest import TRITON_EXACT
from wsum_reference import FP8, IN_DTYPES, OUT_DTYPES, random_inputs, random_weights, ulp

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on CPU tensors (conftest.py sets it)
# the interpreter's own bfloat16 conversions truncate (conftest installs a GPU's where it can: triton_exact.py)
BF16_TRUNCATED = INTERPRETED and not TRITON_EXACT
SIZES = [0, 1, 2, 7, 15, 16, 17, 31, 33, 4095, 4097, 16384 + 33, 65537]
COUNTS = [1, 2, 3, 9, 14]  # the base alone; up to 13 models (AVX-512 sweeps more than 8 inputs in passes)


def reference(xs, w):
    b = xs[0].double()
    acc = float(w[0]) * b
    for x, wi in zip(xs[1:], w[1:]):
        acc = acc + float(wi) * (x.double() - b)
    return acc


def check_delta_close(out, xs, w):
    """Within one output ulp plus float32's error on the terms' magnitudes; NaN and inf where the reference has them."""
    ref = reference(xs, w)
    b = xs[0].double()
    magnitude = (float(w[0]) * b).abs() + sum((float(wi) * (x.double() - b)).abs() + abs(float(wi)) * (x.double().abs() + b.abs()) * 2.0 ** -24
                                              for x, wi in zip(xs[1:], w[1:]))
    o = out.double()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(o), nan), "NaN did not come out exactly where the reference has NaN"
    inf = torch.isinf(ref)
    assert torch.equal(o[inf], ref[inf]), "inf did not come out where the reference has it"
    fin = ~(nan | inf)
    scale = torch.maximum(ref.abs(), o.abs().nan_to_num(0.0, 0.0, 0.0))
    bound = ulp(scale, out.dtype) + (len(xs) + 2) * 2.0 ** -24 * magnitude
    err = (o - ref).abs()
    bad = fin & ~(err <= bound)
    assert not bool(bad.any()), (f"element {int(bad.nonzero()[0])}: got {o[bad][0].item()!r}, "
                                 f"reference {ref[bad][0].item()!r}")


def _call(xs, w, out_dtype, backend):
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    return delta_sum(xs, w, out=out, backend=backend)


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("size", SIZES)
def test_cpu_matches_reference(size, n):
    xs = random_inputs(n, size, [torch.bfloat16], seed=size * 7 + n)
    w = random_weights(n, seed=n)
    check_delta_close(_call(xs, w, torch.bfloat16, "cpu"), xs, w)
    check_delta_close(_call(xs, w, torch.float32, "cpu"), xs, w)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_every_dtype_pair(in_dtype, out_dtype, backend):
    xs = random_inputs(4, 4096 + 77, [in_dtype], seed=3)
    w = random_weights(4, seed=5)
    check_delta_close(_call(xs, w, out_dtype, backend), xs, w)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_mixed_dtypes_and_many_outputs(backend):
    xs = random_inputs(6, 1031, IN_DTYPES, seed=9)
    rows = np.random.default_rng(4).normal(size=(7, 6)).tolist()
    outs = [torch.empty(1031, dtype=OUT_DTYPES[k % 3]) for k in range(7)]
    weighted_sum_into(xs, rows, outs, backend=backend, delta=True)
    for row, o in zip(rows, outs):
        check_delta_close(o, xs, row)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_nan_and_inf(backend):
    xs = random_inputs(3, 100, [torch.float32], seed=1)
    xs[0][3] = float("inf")    # an inf base: x - B is -inf, times w, plus B
    xs[1][5] = float("nan")
    xs[2][7] = float("-inf")
    xs[0][9] = float("nan")
    for w in ([1.0, 0.5, 0.25], [1.0, -0.5, -0.25], [2.0, 0.0, 0.3]):
        out = _call(xs, w, torch.float32, backend)
        check_delta_close(out, xs, w)
    assert torch.isnan(_call(xs, [1.0, 0.5, 0.25], torch.float32, backend)[3])   # -inf + inf
    assert _call(xs, [1.0, -0.5, -0.25], torch.float32, backend)[3] == float("inf")  # +inf + inf


def test_base_alone_is_scaled_base():
    x = random_inputs(1, 33, [torch.bfloat16], seed=2)[0]
    x[4] = -0.0
    for backend in ("cpu", "torch"):
        out = _call([x], [1.0], torch.bfloat16, backend)
        assert torch.equal(out.view(torch.int16), x.view(torch.int16)), backend  # -0.0 kept, bits and all
        assert torch.equal(_call([x], [0.5], torch.float32, backend), x.float() * 0.5)


def _halfway_inputs(size=50_000, seed=0):
    """bfloat16 base and two models whose delta-form results all lie on a bfloat16 value or halfway between
    two: x1 = B and x2 one bfloat16 step from B (or B), so with weights 0.7 and 0.5 the exact result is
    B or B +- half a step, every intermediate of the delta form exact in float32."""
    g = torch.Generator().manual_seed(seed)
    b = (torch.randn(size, generator=g) * 0.05).to(torch.bfloat16)
    bits = b.view(torch.int16)
    step = torch.randint(-1, 2, (size,), generator=g, dtype=torch.int16)
    step[b == 0] = 0  # (0x0000 - 1 and 0x8000 - 1 are NaN patterns)
    x2 = (bits + step).view(torch.bfloat16)  # the neighbour in the direction of |b| (or the next binade)
    return [b, b.clone(), x2], [1.0, 0.7, 0.5]


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_halfway_points_round_as_the_exact_result(backend):
    """mergekit's task_arithmetic (dtype float32, out bfloat16) rounds these as the float64 result does; the
    one-pass rewrite (B - (sum c) B) + sum c x carried float32 rounding relative to B and rounded about half of
    the halfway points the other way (2.3 % of a real merge's elements at these weights)."""
    xs, w = _halfway_inputs()
    exact = reference(xs, w).float()  # every result is a float32 number
    if backend == "triton" and BF16_TRUNCATED:  # the interpreter truncates to bfloat16: the float32 sums, exactly
        assert torch.equal(_call(xs, w, torch.float32, backend), exact)
    else:
        want = exact.to(torch.bfloat16)  # rounded once, to nearest even
        got = _call(xs, w, torch.bfloat16, backend)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # the test can fail: the one-pass form of the same merge misses many of these points
    one_pass = weighted_sum([xs[0], xs[0], xs[1], xs[2]], [1.0, -1.2, 0.7, 0.5], out_dtype=torch.bfloat16,
                            backend="cpu")
    assert (one_pass.view(torch.int16) != exact.to(torch.bfloat16).view(torch.int16)).double().mean() > 0.05


def test_outputs_sharing_a_call_equal_single_calls_bitwise():
    xs = random_inputs(9, 70001, [torch.bfloat16, torch.float32], seed=4)
    rows = np.random.default_rng(7).normal(size=(9, 9)).astype(np.float32).tolist()
    outs = [torch.empty(70001, dtype=torch.bfloat16) for _ in rows]
    weighted_sum_into(xs, rows, outs, backend="cpu", delta=True)
    for row, o in zip(rows, outs):
        one = _call(xs, row, torch.bfloat16, "cpu")
        assert torch.equal(one.view(torch.int16), o.view(torch.int16))


def _cases():
    """(inputs, rows, out dtype) covering every strip, tail and pass of the C++ kernel."""
    cases = []
    for size in (1, 15, 16, 17, 31, 4096 + 77, 16384 + 45, 70001, (1 << 22) + 37):
        for dtypes, n in ((IN_DTYPES, 7), ([torch.bfloat16], 3), (IN_DTYPES, 14), ([torch.bfloat16], 13),
                          ([torch.bfloat16], 1)):
            if size > 10 ** 6 and n < 13:
                continue
            xs = random_inputs(n, size, dtypes, seed=size + n)
            xs[0].view(-1)[0] = float("nan")
            xs[-1].view(-1)[-1] = float("inf")
            if size > 40 and n > 2:
                xs[2].view(-1)[3:9] = 3e-39
                xs[-1].view(-1)[20:36] = 1 + 2 ** -7
            rows = np.random.default_rng(size).normal(size=(9, n)).astype(np.float32)
            for k in ((1, 3, 7, 9) if size < 10 ** 6 else (1, 7)):
                for out_dtype in (OUT_DTYPES if dtypes != [torch.bfloat16] else [torch.bfloat16, torch.float32]):
                    cases.append((xs, rows[:k].tolist(), out_dtype))
    return cases


def _outputs(backend="cpu"):
    outs = []
    for xs, rows, out_dtype in _cases():
        o = [torch.empty(xs[0].shape, dtype=out_dtype) for _ in rows]
        weighted_sum_into(xs, rows, o, backend=backend, delta=True)
        outs.append(torch.stack(o))
    return outs


def _outputs_under(simd: str, tmp_path) -> list:
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from pymerge import _native
from test_delta_sum import _outputs
torch.save([_native.cpu.simd_level(), _outputs()], {str(tmp_path / (simd + '.pt'))!r})
"""
    env = dict(os.environ, PYMERGE_SIMD=simd)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / f"{simd}.pt")


def _same_bits(got, want, label):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        bits = torch.int32 if g.dtype == torch.float32 else torch.int16
        assert torch.equal(g.view(bits), w.view(bits)), (label, i, g.dtype)


def test_every_simd_path_gives_the_same_bits(tmp_path):
    """AVX-512, AVX2 and scalar builds of the delta form: the same float32 operations in the same order
    (a CPU without AVX-512 runs the AVX2 build under both names)."""
    runs = {simd: _outputs_under(simd, tmp_path) for simd in ("avx512", "avx2", "scalar")}
    assert runs["scalar"][0] == "scalar"
    for simd in ("avx512", "avx2"):
        _same_bits(runs[simd][1], runs["scalar"][1], simd)


@pytest.mark.triton_cpu
def test_triton_gives_the_cpu_bits():
    """The Triton kernel's delta form (the interpreter here) against the C++ kernel, bit for bit, on the
    cases small enough for the interpreter; NaN payloads aside (the GPU kernels' documented exception), and
    bfloat16 outputs where the interpreter has a GPU's conversions (tests/triton_exact.py)."""
    small = [(xs, rows, dt) for xs, rows, dt in _cases() if xs[0].numel() < 5000 and len(rows) <= 3
             and not (dt == torch.bfloat16 and BF16_TRUNCATED)]  # (every body and tail launch; 43 s at < 20000)
    for xs, rows, out_dtype in small:
        want = [torch.empty(xs[0].shape, dtype=out_dtype) for _ in rows]
        got = [torch.empty(xs[0].shape, dtype=out_dtype) for _ in rows]
        weighted_sum_into(xs, rows, want, backend="cpu", delta=True)
        weighted_sum_into(xs, rows, got, backend="triton", delta=True)
        for g, w in zip(got, want):
            nan = torch.isnan(w)
            assert torch.equal(torch.isnan(g), nan)
            bits = torch.int32 if g.dtype == torch.float32 else torch.int16
            assert torch.equal(g[~nan].view(bits), w[~nan].view(bits)), (xs[0].numel(), len(xs), out_dtype)


def test_fp8_inputs_are_read_exactly():
    if not FP8:
        pytest.skip("this torch has no float8 dtypes")
    xs = random_inputs(3, 257, FP8 + [torch.bfloat16], seed=6)
    check_delta_close(_call(xs, [1.0, 0.3, -0.6], torch.float32, "cpu"), xs, [1.0, 0.3, -0.6])


def test_delta_sum_needs_an_out():
    xs = random_inputs(2, 8, [torch.float32])
    with pytest.raises(TypeError, match="out must be a tensor"):
        delta_sum(xs, [1.0, 0.5], out=None)


def test_inputs_that_want_gradients_are_refused_in_delta_sums_words():
    xs = random_inputs(2, 8, [torch.float32])
    xs[1].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"^delta_sum\(\): out= does not record gradients.*torch.no_grad\(\)$"):
        delta_sum(xs, [1.0, 0.5], out=torch.empty(8))


def test_weighted_sum_into_refuses_an_output_partly_over_an_input():
    """Its eager path skipped the overlap test that the op (and torch.compile) make: an output a few elements
    ahead of an input overwrote what the next block read (max error 2.4, an audit). Exactly an input is fine."""
    buf, other = torch.randn(4100), torch.randn(4000)
    for delta in (False, True):
        with pytest.raises(ValueError, match="output 0 partially overlaps input 0"):
            weighted_sum_into([buf[:4000], other], [[0.5, 0.5]], [buf[7:4007]], delta=delta)
    for delta, k in ((False, 0), (True, 0), (False, 1), (True, 1)):
        xs = [torch.randn(4000), torch.randn(4000)]
        want = (0.5 * xs[0].double() + 0.25 * (xs[1].double() - (xs[0].double() if delta else 0))).float()
        weighted_sum_into(xs, [[0.5, 0.25]], [xs[k]], delta=delta)
        assert torch.allclose(xs[k], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="delta must be a bool"):
        weighted_sum_into([other, other], [[0.5, 0.5]], [torch.empty(4000)], delta="False")


def test_cuda_entry_checks_host_weights_as_the_cpu_kernel_does():
    """The CUDA op took a host list of NaN, inf or past-float32 weights (a NaN or inf merge on a GPU, an
    error on the CPU; a review): refused before any tensor is read, so CPU tensors show it here."""
    from pymerge.ops import library
    xs, outs = [torch.randn(8), torch.randn(8)], [torch.empty(8)]
    for bad in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match="weighted_sum: a weight is"):
            library._weighted_sum_many_out_cuda(xs, [[0.5, bad]], outs, delta=True)
    with pytest.raises(TypeError, match="delta must be a bool"):
        library._weighted_sum_many_out_cuda(xs, [[0.5, 0.5]], outs, delta="no")


def test_compiled_empty_out_call_checks_its_weights():
    """Compiled, the value checks of the weights are the op's; an empty out= call returned before the op, so a
    NaN weight passed under torch.compile and was refused eagerly (an audit)."""
    xs, out = [torch.empty(0), torch.empty(0)], torch.empty(0)

    def call(xs, out):
        delta_sum(xs, [1.0, float("nan")], out=out)
        return out
    with pytest.raises(ValueError, match="nan"):
        call(xs, out)
    with pytest.raises(Exception, match="nan"):
        torch.compile(call, fullgraph=True, backend="eager")(xs, out)


def test_cuda_entry_refuses_bad_dtype_codes_before_any_launch():
    """The raw CUDA weighted sum took any output code: a float8 code was stored as bfloat16, past the buffer
    (a review). Its checks run before any CUDA call, so the built extension shows them without a GPU."""
    from pymerge import _native
    if _native.cuda is None:
        pytest.skip("the CUDA extension is not built (no nvcc)")
    for ins, outs, what in (([99], [0], "input"), ([-2], [0], "input"), ([0], [3], "output"), ([0], [-1], "output")):
        with pytest.raises(ValueError, match=f"weighted_sum: bad {what} dtype code"):
            _native.cuda.weighted_sum_many([16], ins, 8, [1.0], [16], outs, 0, 0, 0, False)


def test_cuda_entry_checks_a_host_weight_tensor_too():
    """A CPU tensor of weights for CUDA inputs skipped the value check that lists got (no sync needed)."""
    from pymerge.ops import library
    xs, outs = [torch.randn(8), torch.randn(8)], [torch.empty(8)]
    for bad in (float("nan"), 1e39):
        with pytest.raises(ValueError, match="weighted_sum: a weight is"):
            library._weighted_sum_many_out_cuda(xs, torch.tensor([[0.5, bad]], dtype=torch.float64), outs)


def test_cuda_entry_tests_a_weight_tensors_storage_before_reading_it():
    """The value check read a CPU weight tensor (tolist) before its storage was tested: a freed one raised
    torch's own error instead of the project's line (a review)."""
    from pymerge.ops import library
    xs, outs = [torch.randn(8), torch.randn(8)], [torch.empty(8)]
    weights = torch.tensor([[0.5, 0.5]])
    weights.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="weights: its storage holds 0 bytes"):
        library._weighted_sum_many_out_cuda(xs, weights, outs)
