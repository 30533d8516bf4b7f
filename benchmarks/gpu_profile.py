"""Where the time goes in the two GPU paths the first H200 run found slow; one call on a GPU machine.

1. `run_merge(device="cuda")` of bench_merge_gpu's models (a warm page cache): the whole merge, the
   reader threads' page-cache -> pinned copies alone (the same 8 threads and 8 MB pieces), and a
   cProfile of the merge (the main thread's waits show which stage holds it up). The first H200 run
   measured 5.7 GB/s of input against 55 GB/s pinned host-to-device.
2. TIES / DARE-TIES on one 16M-element tensor with a fresh selection cache (threshold selection and
   L1 norms every call: what a one-shot merge pays per tensor): torch.profiler's top operators.
   The first run measured 676-682 ms (TIES) and 249-322 ms (DARE-TIES) per call, 0.45-0.63 ms once cached.
3. arcee_fusion's threshold (three quartiles of 16M non-negative float32 scores): the histogram
   selection it uses on a GPU against three torch.kthvalue calls, time and peak memory above the scores.

    python benchmarks/gpu_profile.py [--workdir /tmp/pymerge-bench] [--out-root /dev/shm /tmp] [--skip-merge]
"""
import argparse
import cProfile
import ctypes
import io
import pstats
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def pinned_copy_gbps(files, threads=8, piece=8 << 20) -> float:
    """Page cache -> one pinned buffer, as the merge's reader threads copy (ctypes.memmove drops the GIL)."""
    import numpy as np
    maps = [np.memmap(f, dtype=np.uint8, mode="r") for f in files]
    dst = torch.empty(max(m.size for m in maps), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    total, t = 0, time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for m in maps:
            base = m.ctypes.data
            futures = [pool.submit(ctypes.memmove, dst.data_ptr() + p, base + p, min(piece, m.size - p))
                       for p in range(0, m.size, piece)]
            for fu in futures:
                fu.result()
            total += m.size
    return total / (time.perf_counter() - t) / 1e9


def profile_merge(args) -> None:
    import bench_merge as bm
    from pymerge.merge import run_merge
    base, fts = bm.ensure_models(args.workdir)
    cfg = args.workdir / "gpu_linear.yml"
    bm.write_config(cfg, "linear", base, fts, {}, "float32", "bfloat16")
    files = [f for p in fts for f in sorted(p.glob("*.safetensors"))]
    bm.warm(fts)
    for threads in (8, 16):
        print(f"page cache -> pinned, {threads} threads: {pinned_copy_gbps(files, threads):.1f} GB/s")
    for root in args.out_root:  # tmpfs and a disk: what the output's writing costs
        out = root / "pymerge-gpu-profile"
        for i in range(3):  # the first run compiles the Triton kernels
            shutil.rmtree(out, ignore_errors=True)
            r = run_merge(cfg, out, device="cuda", quiet=True, force=True)
            print(f"merge into {root}, run {i}: {r.input_gb_per_s:.1f} GB/s of input "
                  f"({r.input_bytes / 1e9:.2f} GB in {r.seconds:.3f} s)")
        shutil.rmtree(out, ignore_errors=True)
    out = args.out_root[0] / "pymerge-gpu-profile"
    prof = cProfile.Profile()
    prof.enable()
    r = run_merge(cfg, out, device="cuda", quiet=True, force=True)
    prof.disable()
    shutil.rmtree(out, ignore_errors=True)
    print(f"profiled merge: {r.input_gb_per_s:.1f} GB/s of input, {r.seconds:.3f} s")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    print("\n".join(line[:160] for line in s.getvalue().splitlines() if line.strip()))


def profile_ties(numel=16_000_000, n=3) -> None:
    from pymerge.ops.task_vector_ops import SelectionCache, Sparsifier, task_vector_merge
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(numel, generator=g, device="cuda").bfloat16()
    xs = [(base.float() + 0.01 * torch.randn(numel, generator=g, device="cuda")).bfloat16() for _ in range(n)]
    out = torch.empty_like(base)
    for method, sp, consensus, normalize in (("ties", Sparsifier("magnitude", 0.5), True, True),
                                             ("dare_ties", Sparsifier("random", 0.5, rescale="l1"), True, False)):
        def call():
            task_vector_merge(xs, base, out, [sp] * n, [1.0] * n, consensus=consensus, normalize=normalize,
                              name="w", cache=SelectionCache(), backend="triton")
        call()
        torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        torch.cuda.synchronize()
        print(f"{method}: {1e3 * (time.perf_counter() - t):.1f} ms per uncached call")
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as p:
            call()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=50))
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=50))


def profile_quartiles(numel=16_000_000) -> None:
    from pymerge.ops.consensus_ops import fusion_threshold
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(numel, generator=g, device="cuda").square_()
    pos = (torch.tensor([0.25, 0.5, 0.75]) * (numel - 1)).long().tolist()

    def kth():
        q1, med, q3 = (torch.kthvalue(scores, p + 1).values for p in pos)
        return med + 1.5 * (q3 - q1)

    for name, fn in (("histograms (fusion_threshold)", lambda: fusion_threshold(scores)), ("3 x kthvalue", kth)):
        value = fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        t = time.perf_counter()
        for _ in range(3):
            value = fn()
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t) / 3
        peak = (torch.cuda.max_memory_allocated() - held) / scores.nbytes
        print(f"arcee threshold, {name}: {ms:.1f} ms, peak {peak:.2f} x the scores' bytes, value {float(value):.6g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/pymerge-bench", type=Path)
    ap.add_argument("--out-root", default=[Path("/dev/shm"), Path("/tmp")], type=Path, nargs="+",
                    help="folders to write the merged model in (the first is profiled)")
    ap.add_argument("--skip-merge", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile: no CUDA device")
    if not args.skip_merge:
        profile_merge(args)
    profile_ties()
    profile_quartiles()
    return 0


if __name__ == "__main__":
    sys.exit(main())
