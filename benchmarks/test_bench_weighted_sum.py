"""pytest-benchmark view of the weighted sum: `pytest benchmarks/ --benchmark-only`.

Each benchmark records GB/s (bytes read + written) in extra_info; the script
bench_weighted_sum.py prints the same comparison as a table with same-run ratios.
"""
import pytest
import torch

from pymerge.ops.weighted_sum import sum_into

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUMEL = (64 << 20) if DEVICE == "cuda" else (32 << 20)  # the size; note the 300 MB L3 here


def _inputs(n):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    xs = [torch.randn(NUMEL, generator=g, device=DEVICE).bfloat16() for _ in range(n)]
    return xs, [1.0 / n] * n, torch.empty(NUMEL, dtype=torch.bfloat16, device=DEVICE)


def _run(benchmark, fn, moved_bytes):
    def timed():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = moved_bytes / benchmark.stats.stats.min / 1e9


@pytest.mark.parametrize("n", [2, 8])
def test_copy_ceiling(benchmark, n):
    src = torch.empty((n + 1) * NUMEL // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), 2 * src.numel() * 2)


@pytest.mark.parametrize("backend", ["cpu"] if DEVICE == "cpu" else ["triton", "cuda"])
@pytest.mark.parametrize("n", [2, 8])
def test_pymerge(benchmark, n, backend):
    xs, w, out = _inputs(n)
    # on a GPU the weights in device memory, as torch.compile's are: a list is copied from the host every call
    rows = [w] if DEVICE == "cpu" else torch.tensor([w], dtype=torch.float32, device=DEVICE)
    _run(benchmark, lambda: sum_into(xs, rows, [out], backend=backend), (n + 1) * NUMEL * 2)


@pytest.mark.parametrize("n", [2, 8])
def test_torch_eager(benchmark, n):
    xs, w, out = _inputs(n)
    # float32 buffers allocated once, as a careful user would (a mixed-dtype acc.add_(x) casts element by element)
    acc, buf = (torch.empty(NUMEL, dtype=torch.float32, device=DEVICE) for _ in range(2))

    def eager():
        acc.zero_()
        for x, wi in zip(xs, w):
            buf.copy_(x)
            acc.add_(buf, alpha=wi)
        out.copy_(acc)
    _run(benchmark, eager, (n + 1) * NUMEL * 2)


@pytest.mark.parametrize("n", [2, 8])
def test_torch_compile(benchmark, n):
    xs, w, out = _inputs(n)
    wt = torch.tensor(w, device=DEVICE)

    @torch.compile
    def loop(xs, wt, out):  # into a preallocated output, as the others: a new one per call was page-faulted
        acc = xs[0].float() * wt[0]
        for i in range(1, len(xs)):
            acc = acc + xs[i].float() * wt[i]
        out.copy_(acc.to(torch.bfloat16))
    loop(xs, wt, out)
    _run(benchmark, lambda: loop(xs, wt, out), (n + 1) * NUMEL * 2)
