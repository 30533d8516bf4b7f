"""The delta-compressed pool's C++ kernel alone: int4 terms on the float path against the same
terms paired (the AVX2 integer path, pool/compressed.py), per 64-element block.

    python benchmarks/bench_delta_decode.py [--quick] [--rounds 9]

N = 16 int4 task vectors of random codes and scales plus a bfloat16 base, merged into a bfloat16
output by `_cpu.delta_accumulate` (no pool, no Python per tensor): 1M elements (8 MB of codes: the
L3 cache) and 16M (DRAM), one and two threads. Each case is called 10 times per round, rounds
interleaved; the table gives the best and the median round (a call's best of 10) in nanoseconds per
64 elements and thread, and the paired path's speed-up in the same rounds (the machine is noisy).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import positive_int, write_results  # noqa: E402

from pymerge import _native  # noqa: E402
from pymerge.pool import compressed as cp  # noqa: E402

N = 16


def make_terms(n: int, seed: int = 0):
    """The same N int4 deltas and base as (float-path terms, paired terms)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    codes, scales = [], []
    for _ in range(N):
        c, s = cp.quantize(torch.randn(n, generator=gen) * 1e-3, torch.zeros(n), "int4")[:2]
        codes.append(c)
        scales.append(s)
    bf16 = _native.DTYPE_CODES[torch.bfloat16]
    flat = ([base] + codes, [None] + scales, [bf16] + [cp.KIND_Q4] * N)
    tensors, kinds = [base], [bf16]
    for p in range(N // 2):
        buf = cp.pair_int4(codes[2 * p], codes[2 * p + 1], n)
        tensors += [buf, buf]
        kinds += [cp.KIND_Q4_FIRST, cp.KIND_Q4_SECOND]
    return {"float": flat, "paired": (tensors, [None] + scales, kinds)}


def measure(n: int, threads: int, rounds: int, calls: int = 10) -> list:
    cases = make_terms(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    w = np.random.default_rng(0).dirichlet(np.ones(N + 1)).astype(np.float32)[None, :]
    samples = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (t, s, k) in cases.items():
            best = float("inf")
            for _ in range(calls):
                t0 = time.perf_counter()
                cp.run_terms(t, s, k, n, w, [out], "cpu", threads)
                best = min(best, time.perf_counter() - t0)
            samples[name].append(best * 1e9 * threads / (n / 64))  # ns per 64 elements and thread
    ratio = [f / p for f, p in zip(samples["float"], samples["paired"])]
    rows = []
    for name, v in samples.items():
        rows.append({"elements": n, "threads": threads, "path": name, "best ns": min(v),
                     "median ns": statistics.median(v),
                     "paired speed-up (per round: min / median / max)":
                         "" if name == "float" else f"{min(ratio):.2f} / {statistics.median(ratio):.2f} / {max(ratio):.2f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                 epilog="Needs the C++ extension on its AVX2 path: on an AVX-512 CPU, run it with "
                                        "PYMERGE_SIMD=avx2.")
    ap.add_argument("--quick", action="store_true", help="64K and 1M elements, 3 rounds (unless --rounds)")
    ap.add_argument("--rounds", type=positive_int, default=None, help="default 9")
    args = ap.parse_args()
    if _native.cpu is None or _native.cpu.simd_level() != "avx2":
        sys.exit("bench_delta_decode: needs the C++ extension on its AVX2 path (the paired kernel's); "
                 f"this CPU takes {'no extension' if _native.cpu is None else _native.cpu.simd_level()}"
                 + ("; run it with PYMERGE_SIMD=avx2" if _native.cpu is not None and _native.cpu.simd_level() == "avx512"
                    else ""))
    sizes = (1 << 16, 1 << 20) if args.quick else (1 << 20, 1 << 24)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 9)  # an explicit --rounds wins over --quick
    rows = []
    for n in sizes:
        for threads in (1, 2):
            rows += measure(n, threads, rounds)
            for r in rows[-2:]:
                print(r, flush=True)
    columns = ["elements", "threads", "path", "best ns", "median ns", "paired speed-up (per round: min / median / max)"]
    title = (f"Delta decode kernel, N = {N} int4 terms + a bf16 base -> bf16, ns per 64 elements and thread "
             f"(best / median of {rounds} interleaved rounds)")

    def plot(path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = sorted({(r["elements"], r["threads"]) for r in rows})
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, path_name in enumerate(("float", "paired")):
            vals = [next(r["best ns"] for r in rows if (r["elements"], r["threads"]) == lab and r["path"] == path_name)
                    for lab in labels]
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=f"int4 {path_name}")
        ax.set_xticks(x, [f"{e >> 20 or e >> 10}{'M' if e >= 1 << 20 else 'K'}, {t} thr" for e, t in labels])
        ax.set_ylabel("ns per 64 elements and thread (best)")
        ax.set_title(f"N = {N} int4 terms + bf16 base")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    print(write_results("bench_delta_decode" + ("_quick" if args.quick else ""), "cpu", rows, columns, title, plot))


if __name__ == "__main__":
    main()
