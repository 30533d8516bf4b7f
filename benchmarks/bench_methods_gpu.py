"""TIES and DARE-TIES on the GPU against the same-run device copy bandwidth.

    python benchmarks/bench_methods_gpu.py [--numel 64e6] [--models 3]

Bytes counted are those of the fused pass (N models + base read, one output written); the
first call also selects thresholds (extra passes over the inputs), later calls reuse them from
the SelectionCache as a search loop would. Writes results/<gpu>/methods_gpu.{json,md}.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import positive_int, time_interleaved, write_results  # noqa: E402

from pymerge.ops.task_vector_ops import SelectionCache, Sparsifier, task_vector_merge  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--numel", type=float, default=64e6)
    ap.add_argument("--models", type=positive_int, default=3)
    ap.add_argument("--rounds", type=positive_int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    dev, n, numel = "cuda", args.models, int(args.numel)
    g = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(numel, generator=g, device=dev).bfloat16()
    xs = [(base.float() + 0.01 * torch.randn(numel, generator=g, device=dev)).bfloat16() for _ in range(n)]
    out = torch.empty_like(base)
    src = torch.empty((n + 2) * numel // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    moved = (n + 2) * numel * 2
    configs = {"ties": (Sparsifier("magnitude", 0.5), True, True),
               "dare_ties": (Sparsifier("random", 0.5, rescale="l1"), True, False)}
    rows = []
    for backend in ("triton", "cuda"):
        for method, (sp, consensus, normalize) in configs.items():
            cache = SelectionCache()

            def run(cache=cache, sp=sp, consensus=consensus, normalize=normalize, backend=backend):
                task_vector_merge(xs, base, out, [sp] * n, [1.0] * n, consensus=consensus, normalize=normalize,
                                  name="w", cache=cache, backend=backend)

            def first(sp=sp, consensus=consensus, normalize=normalize, backend=backend):
                task_vector_merge(xs, base, out, [sp] * n, [1.0] * n, consensus=consensus, normalize=normalize,
                                  name="w", cache=SelectionCache(), backend=backend)
            try:
                t = time_interleaved({"copy": lambda: dst.copy_(src), "cached": run, "first": first},
                                     args.rounds, dev, calls_per_sample=2)
            except Exception as exc:  # report and go on: one backend failing must not hide the other
                rows.append({"method": method, "backend": backend, "error": repr(exc)[:120]})
                continue
            copy_bw = 2 * src.numel() * 2 / t["copy"] / 1e9
            for kind in ("first", "cached"):
                bw = moved / t[kind] / 1e9
                rows.append({"method": method, "backend": backend, "call": kind, "ms": t[kind] * 1e3,
                             "GB/s": bw, "x copy": bw / copy_bw, "copy GB/s": copy_bw})
    table = write_results("methods_gpu", dev, rows, ["method", "backend", "call", "ms", "GB/s", "x copy", "copy GB/s",
                                                      "error"],
                          f"TIES / DARE-TIES, {n} models + base, {numel / 1e6:.0f}M bf16 elements")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
