"""The Triton and CUDA backends against the float64 reference.

Triton runs everywhere: on the GPU when there is one, else in its interpreter on CPU tensors
(slow, so small sizes). The CUDA C++ kernel runs only on a GPU; here its sources must compile
(the build does it) and its module must import.
"""
import pytest
import torch

from pymerge import _native, kernels, weighted_sum, weighted_sum_many
from triton_fma import UNFUSED_REASON, interpreter_rounds_fma_once
from wsum_reference import FP8, IN_DTYPES, OUT_DTYPES, check_close, random_inputs, random_weights

# Only the Triton tests need triton: the CUDA extension's tests run (on a GPU) without it.
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="the triton package is not installed")
GPU_BACKENDS = ["cuda", pytest.param("triton", marks=needs_triton)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 1024 if DEVICE == "cpu" else 4096  # the launcher's block (smaller in the interpreter)
SMALL_SIZES = [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 5]


def _on(xs):
    return [x.to(DEVICE) for x in xs]


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("size", SMALL_SIZES)
@needs_triton
def test_triton_sizes(size, n):
    xs = _on(random_inputs(n, size, [torch.bfloat16], seed=size + n))
    w = random_weights(n)
    check_close(weighted_sum(xs, w, backend="triton"), xs, w)


@pytest.mark.parametrize("k", [1, 3, 5])
@needs_triton
def test_triton_float32_outputs_are_the_cpu_kernels_bits(k):
    """One fma per term, as the C++ kernel: `acc += w * x` relied on the compiler contracting it (the GPU
    does, the interpreter did not: 24 % of float32 outputs were 1 ulp off; found by a review)."""
    xs = _on(random_inputs(7, 2 * BLOCK + 5, [torch.float32, torch.float16], seed=k))
    if xs[0].device.type == "cpu" and not interpreter_rounds_fma_once():
        pytest.skip(UNFUSED_REASON)
    rows = [random_weights(7, seed=k + r) for r in range(k)]
    got = weighted_sum_many(xs, rows, out_dtype=torch.float32, backend="triton")
    want = weighted_sum_many([x.cpu() for x in xs], rows, out_dtype=torch.float32, backend="cpu")
    for g, w in zip(got, want):
        assert torch.equal(g.cpu().view(torch.int32), w.view(torch.int32))


@needs_triton
def test_triton_many_inputs():
    xs = _on(random_inputs(33, 1500, [torch.bfloat16, torch.float16], seed=33))
    w = random_weights(33)
    check_close(weighted_sum(xs, w, backend="triton"), xs, w)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
@needs_triton
def test_triton_dtype_pairs(in_dtype, out_dtype):
    xs = _on(random_inputs(3, 1029, [in_dtype], seed=1))
    w = [0.5, -1.5, 0.25]
    out = weighted_sum(xs, w, out_dtype=out_dtype, backend="triton")
    assert out.dtype == out_dtype
    check_close(out, xs, w)


@needs_triton
def test_triton_mixed_dtypes_nan_inf():
    xs = _on(random_inputs(5, 2051, IN_DTYPES, seed=2))
    xs[0][3] = float("nan")
    xs[1][9] = float("inf")
    xs[2][2050] = float("-inf")
    w = random_weights(5)
    check_close(weighted_sum(xs, w, out_dtype=torch.float32, backend="triton"), xs, w)


@pytest.mark.parametrize("k", [1, 4, 5])
@needs_triton
def test_triton_many_outputs(k):
    xs = _on(random_inputs(4, 1500, [torch.bfloat16], seed=k))
    rows = [random_weights(4, seed=j) for j in range(k)]
    outs = weighted_sum_many(xs, rows, backend="triton")
    for o, row in zip(outs, rows):
        check_close(o, xs, row)


@needs_triton
def test_triton_out_in_place():
    xs = _on(random_inputs(2, 3000, [torch.float16], seed=3))
    originals = [x.clone() for x in xs]
    out = weighted_sum(xs, [0.5, 0.5], out=xs[1], backend="triton")
    assert out.data_ptr() == xs[1].data_ptr()
    check_close(out, originals, [0.5, 0.5])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_zero_sums_keep_the_cpu_kernels_sign(backend, out_dtype):
    """Where every product is -0.0 the sum is -0.0, as the C++ kernel's (its accumulator starts at -0.0);
    where one is +0.0 it is +0.0. Triton 3.6 compiled tl.full(..., -0.0) as +0.0: on an H200 every
    such output came out +0.0 (found by the first GPU run)."""
    if backend == "cuda" and DEVICE == "cpu":
        pytest.skip("the CUDA kernel runs on a GPU only")
    size = 2 * BLOCK + 5
    pos, neg = torch.zeros(size, dtype=torch.bfloat16), torch.full((size,), -0.0, dtype=torch.bfloat16)
    xs = [pos, neg.clone(), pos.clone()]
    xs[1][size // 2:] = 0.0                   # second half: one product is +0.0 (+0.0 * 0.25), so the sum is +0.0
    rows = [[-0.5, 0.25, -1.0], [-2.0, 0.5, -0.0]]
    got = weighted_sum_many(_on(xs), rows, out_dtype=out_dtype, backend=backend)
    want = weighted_sum_many(xs, rows, out_dtype=out_dtype, backend="cpu")
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    for g, w in zip(got, want):
        assert torch.signbit(w[: size // 2]).all() and not torch.signbit(w[size // 2:]).any()
        assert torch.equal(g.cpu().view(bits), w.view(bits)), backend


def test_cuda_extension_builds_where_nvcc_is():
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the CUDA extension is not built")
    assert _native.cuda is not None, "nvcc is here but pymerge._cuda was not built"
    assert _native.cuda.MAX_INPUTS == 64 and _native.cuda.MAX_OUTPUTS == 4


# ---- on a GPU only ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 3, 16, 33, 65])
@pytest.mark.parametrize("size", [0, 1, 7, 4095, 4097, 65537, 1_000_003])
def test_gpu_sizes_and_counts(backend, n, size):
    if n == 65 and size > 65537:
        pytest.skip("covered at smaller sizes")
    xs = _on(random_inputs(n, size, [torch.bfloat16], seed=n * 31 + size))
    w = random_weights(n)
    check_close(weighted_sum(xs, w, backend=backend), xs, w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_gpu_dtype_pairs(backend, in_dtype, out_dtype):
    xs = _on(random_inputs(3, 100_003, [in_dtype], seed=7))
    xs[0][11] = float("nan")
    w = [0.5, -1.5, 0.25]
    check_close(weighted_sum(xs, w, out_dtype=out_dtype, backend=backend), xs, w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_misaligned_and_mixed(backend):
    base = _on(random_inputs(4, 70_001, IN_DTYPES[:3], seed=8))
    xs = [b[1:] for b in base]  # 2- or 4-byte offsets: the vector path must not be taken blindly
    w = random_weights(4)
    check_close(weighted_sum(xs, w, out_dtype=torch.bfloat16, backend=backend), xs, w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 8, 9])
def test_gpu_many_outputs(backend, k):
    xs = _on(random_inputs(70, 30_001, [torch.bfloat16], seed=k))
    rows = [random_weights(70, seed=j) for j in range(k)]
    for o, row in zip(weighted_sum_many(xs, rows, backend=backend), rows):
        check_close(o, xs, row)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [3, 70])
def test_gpu_weights_in_device_memory(backend, n):
    """Weights as a device tensor, updated in place between calls: no host round trip."""
    from pymerge.ops.weighted_sum import weighted_sum_into
    xs = _on(random_inputs(n, 100_001, [torch.bfloat16], seed=n))
    rows = torch.zeros(2, n, device=DEVICE)
    outs = [torch.empty(100_001, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    for trial in range(2):
        new = torch.randn(2, n, generator=torch.Generator().manual_seed(trial))
        rows.copy_(new)
        weighted_sum_into(xs, rows, outs, backend=backend)
        for o, row in zip(outs, new.tolist()):
            check_close(o, xs, row)


def _same_bits(got, want):
    """Equal bits, NaN for NaN (a GPU writes its canonical NaN, the CPU kernel keeps sign and payload)."""
    g, w = got.cpu(), want.cpu()
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(g), nan), "NaN in other places than the CPU kernel's"
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[w.dtype]
    same = g.view(bits) == w.view(bits)
    assert bool((same | nan).all()), f"{int((~(same | nan)).sum())} of {w.numel()} elements differ from the CPU kernel's bits"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtypes", ["bfloat16", "float16", "float32", "mixed"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 65, 70])
def test_gpu_outputs_are_the_cpu_kernels_bits(backend, dtypes, n):
    """Every backend's contract: float32 fmas in input order from -0.0, one rounding per output. The CUDA
    kernel loads several inputs per step (a partial step when n is not a multiple of it), one to four outputs
    per launch (five: two launches), more than 64 inputs through float32 partial sums, a scalar tail past the
    last 8-element vector, and the scalar path for a misaligned input: all must give the CPU kernel's bits.
    NaN, inf and signed zeros included."""
    kinds = [torch.bfloat16, torch.float32, torch.float16] + FP8 if dtypes == "mixed" else [getattr(torch, dtypes)]
    size = 8 * 4096 + 13
    xs = random_inputs(n, size, kinds, seed=n)
    xs[0][3], xs[-1][5], xs[n // 2][7] = float("nan"), float("inf"), -0.0
    rows = [random_weights(n, seed=n + r) for r in range(5)]
    for k in (1, 2, 3, 4, 5):
        for out_dtype in (torch.float32, torch.bfloat16):
            got = weighted_sum_many(_on(xs), rows[:k], out_dtype=out_dtype, backend=backend)
            want = weighted_sum_many(xs, rows[:k], out_dtype=out_dtype, backend="cpu")
            for g, w in zip(got, want):
                _same_bits(g, w)
    shifted = [torch.cat([x[:1], x]) for x in _on(xs)]  # storage offset of one element: the scalar path
    got = weighted_sum_many([s[1:] for s in shifted], rows[:2], out_dtype=torch.float16, backend=backend)
    for g, w in zip(got, weighted_sum_many(xs, rows[:2], out_dtype=torch.float16, backend="cpu")):
        _same_bits(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [3, 70])
def test_gpu_bits_past_the_first_grid_pass_and_with_device_weights(backend, n):
    """The CUDA kernel's grid stops at 16 blocks per SM (~4.3M elements on an H200) and loops over the rest:
    9M elements take a second pass. Weights in device memory (the search's graphs) take another load path, and
    past 64 inputs another offset into them. Both must give the CPU kernel's bits."""
    from pymerge.ops.weighted_sum import weighted_sum_into
    size = (9_000_017 if n == 3 else 100_003)
    xs = random_inputs(n, size, [torch.bfloat16], seed=n)
    rows = [random_weights(n, seed=n + r) for r in range(2)]
    want = weighted_sum_many(xs, rows, out_dtype=torch.bfloat16, backend="cpu")
    for g, w in zip(weighted_sum_many(_on(xs), rows, out_dtype=torch.bfloat16, backend=backend), want):
        _same_bits(g, w)
    outs = [torch.empty(size, dtype=torch.bfloat16, device=DEVICE) for _ in rows]
    weighted_sum_into(_on(xs), torch.tensor(rows, dtype=torch.float32, device=DEVICE), outs, backend=backend)
    for g, w in zip(outs, want):
        _same_bits(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtypes", ["bfloat16", "float32", "mixed"])
@pytest.mark.parametrize("n", [1, 2, 4, 9, 65, 66, 70])
@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_gpu_delta_sums_are_the_cpu_kernels_bits(backend, dtypes, n, k):
    """task_arithmetic's delta form (tensors[0] a base) on the GPU: the vector and scalar kernels, the CUDA
    extension's launches past 64 terms with partial sums in scratch, base weights read from device memory with a
    row stride, and more outputs than one launch holds, against the C++ kernel's bits (a review: only compiled
    until a GPU ran this)."""
    from pymerge.ops.weighted_sum import weighted_sum_into
    kinds = {"bfloat16": [torch.bfloat16], "float32": [torch.float32], "mixed": IN_DTYPES}[dtypes]
    size = 70_001 if n < 65 else 9_001
    cpu = random_inputs(n, size, kinds, seed=n * 7 + k)
    cpu[0][5] = float("inf")
    cpu[-1][9] = float("nan")
    rows = torch.randn(k, n, generator=torch.Generator().manual_seed(n + k))
    for out_dtype in (torch.float32, torch.bfloat16):
        want = [torch.empty(size, dtype=out_dtype) for _ in range(k)]
        weighted_sum_into(cpu, rows.tolist(), want, backend="cpu", delta=True)
        for weights in (rows.tolist(), rows.to(DEVICE)):  # host lists, and a device table read in place
            got = [torch.empty(size, dtype=out_dtype, device=DEVICE) for _ in range(k)]
            weighted_sum_into(_on(cpu), weights, got, backend=backend, delta=True)
            for g, w in zip(got, want):
                _same_bits(g, w)


@needs_triton
def test_the_interpreters_own_bfloat16_stores_round_to_nearest_even(tmp_path):
    """backend="triton" on CPU tensors under TRITON_INTERPRET=1, without tests/triton_exact.py's conversions (a
    user's process has none): weighted_sum, the grouped table and tv_merge stored bfloat16 with a float cast the
    interpreter truncates (half of all outputs one step toward zero; an audit). Bit for bit with the C++ kernels
    now, subnormals, infinities and NaNs (their quiet bits) included."""
    import os
    import subprocess
    import sys
    code = """
import torch
from pymerge.ops.weighted_sum import weighted_sum
from pymerge.ops.task_vector_ops import Sparsifier, task_vector_merge
from pymerge.kernels.weighted_sum_grouped import GroupedTable
g = torch.Generator().manual_seed(3)
x = torch.randn(1031, generator=g) * torch.exp2(torch.randint(-140, 100, (1031,), generator=g).float())
x[:6] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 1 + 3 * 2 ** -9])
bits = lambda t: t.view(torch.int16).tolist()
out = {}
for b in ("cpu", "triton"):
    ws = weighted_sum([x], [1.0], out_dtype=torch.bfloat16, backend=b)
    tv = torch.empty(x.shape, dtype=torch.bfloat16)
    task_vector_merge([x], torch.zeros_like(x), tv, [Sparsifier()], [1.0], consensus=False, normalize=False,
                      backend=b)
    out[b] = (bits(ws), bits(tv))
grouped = torch.empty(x.shape, dtype=torch.bfloat16)
GroupedTable([[x]], [[grouped]], [0], 1).run(torch.ones(1, 1, 1))
assert out["triton"][0] == out["cpu"][0], "weighted_sum"
assert out["triton"][1] == out["cpu"][1], "tv_merge"
assert bits(grouped) == out["cpu"][0], "grouped"
assert out["cpu"][0][5] == bits(torch.tensor([1.0078125], dtype=torch.bfloat16))[0]
print("same bits")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "same bits" in r.stdout, r.stderr[-3000:]
