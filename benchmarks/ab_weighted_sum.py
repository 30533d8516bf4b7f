"""Two builds of the CPU extension, timed in one process: the fused weighted sum of this checkout
against another build's (for a kernel change, where run-to-run noise hides 20 %).

    python benchmarks/ab_weighted_sum.py OTHER/_cpu.cpython-*.so [--rounds 10] [--threads 0]

Each round runs the other build, this one and a copy of the same bytes, in alternating order (the
first call of a round pays for the previous one's cache state). Prints GB/s (best round) and the
per-round ratio this/other: median [min, max]. A case whose code did not change reads ~1.00: the
noise floor. Writes the table as JSON (every round's times) and markdown under benchmarks/results/<machine>/
(--name, default ab_weighted_sum).
"""
import argparse
import importlib.util
import os
import sys
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CPU_SETTLE_S, charts, positive_int, write_results  # noqa: E402

from pymerge import _native  # noqa: E402

CASES = [(16, 8 << 20, 1), (12, 8 << 20, 1), (32, 4 << 20, 1), (9, 8 << 20, 1), (8, 16 << 20, 1),
         (4, 32 << 20, 1), (2, 32 << 20, 1), (16, 6 << 20, 2), (16, 4 << 20, 3), (16, 4 << 20, 4),
         (16, 2 << 20, 8)]  # (inputs N, elements, outputs K): bfloat16 in and out


def load_other(path: str):
    spec = importlib.util.spec_from_file_location("_cpu", path)  # PyInit__cpu: the name must be _cpu
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("other", help="the other build's _cpu extension (.so)")
    ap.add_argument("--rounds", type=positive_int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="0: the extension's default")
    ap.add_argument("--name", default="ab_weighted_sum", help="results file name")
    args = ap.parse_args()
    try:  # a missing or foreign file was a 13-line traceback (an audit)
        other = load_other(args.other)
    except (ImportError, OSError, AttributeError) as exc:
        ap.error(f"{args.other}: not a loadable _cpu extension ({str(exc).splitlines()[0] if str(exc) else exc})")
    builds = {"other": other, "this": _native.require_cpu()}
    code = _native.DTYPE_CODES[torch.bfloat16]
    rows = []
    for n, numel, k in CASES:
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(n)]
        outs = [torch.empty(numel, dtype=torch.bfloat16) for _ in range(k)]
        # copy: the same bytes read + written, from written memory (a never-written one reads the zero page)
        src = torch.empty((n + k) * numel // 2, dtype=torch.bfloat16).normal_()
        dst = torch.empty_like(src)
        call = ([x.data_ptr() for x in xs], [code] * n, numel, [1.0 / n] * (n * k), [o.data_ptr() for o in outs],
                [code] * k, args.threads)
        fns = [(name, (lambda m=m: m.weighted_sum_many(*call))) for name, m in builds.items()]
        fns.append(("copy", lambda: dst.copy_(src)))
        secs = {name: [] for name, _ in fns}
        for _, fn in fns:  # untimed: the outputs' first-touch page faults and the thread pools' start-up
            fn()
        for r in range(args.rounds):
            for name, fn in (fns if r % 2 else fns[::-1]):
                time.sleep(CPU_SETTLE_S)  # copy_'s OpenMP workers spin after it: not on the next build's time
                t = time.perf_counter()
                fn()
                secs[name].append(time.perf_counter() - t)
        gbs = {name: (n + k) * numel * 2 / min(s) / 1e9 for name, s in secs.items()}
        ratios = [o / t for o, t in zip(secs["other"], secs["this"])]
        print(f"N={n:2d} K={k} {numel >> 20:2d}M  other {gbs['other']:5.1f}  this {gbs['this']:5.1f}  "
              f"copy {gbs['copy']:5.1f} GB/s  this/other median {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}]", flush=True)
        rows.append({"N": n, "K": k, "elements": numel, **{f"{name} GB/s": v for name, v in gbs.items()},
                     "this/other median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                     "ms per round": {name: [1e3 * x for x in s] for name, s in secs.items()}})
    title = "Two builds of the fused weighted sum in one process (bf16 in and out; per-round ratio this/other)"
    draw = charts().drawing(charts().CHARTS["ab_weighted_sum"], rows, title)  # its own chart, whatever --name says
    write_results(args.name, "cpu", rows, ["N", "K", "elements", "other GB/s", "this GB/s", "copy GB/s",
                                           "this/other median", "min", "max"], title, plot=draw,
                  meta={"other": os.path.abspath(args.other), "rounds": args.rounds, "threads": args.threads})


if __name__ == "__main__":
    main()
