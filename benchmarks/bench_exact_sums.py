"""Cost of exact sums (pymerge/ops/exact_sum.py) in the single-process statistics: the kernels of
this tree against the float-partial-sum kernels of another build (a checkout before the change),
loaded side by side in one process and timed interleaved, so machine load hits both alike.

    python benchmarks/bench_exact_sums.py --old /path/to/old/checkout [--numel 4194304] [--rounds 7]
        [--before /path/to/another/exact/checkout]

--before adds a column for a third build with exact sums (an earlier version of them).

Statistics: whole-tensor dots of SLERP (2 tensors: 3 pairs) and Model Stock (3 offsets: 6 pairs),
the DARE L1 norms of one model (tv_l1, Philox keep-mask) and DELLA's mask with its norms; each at
1 thread and at the default thread count. Also the whole SLERP merge of one tensor (dots, then
the elementwise pass, which did not change). Writes benchmarks/results/cpu/exact_sums.{json,md}.
"""
import argparse
import importlib.util
import glob
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import positive_int, write_results  # noqa: E402

from pymerge import _native  # noqa: E402
from pymerge.bench import CPU_SETTLE_S  # noqa: E402
from pymerge.ops import exact_sum, interp, philox  # noqa: E402
from pymerge.ops import task_vector_ops as tvo  # noqa: E402


def load_old(checkout: str, package: str = "pymerge_old"):
    """The other checkout's C++ module, under another package name (same init symbol, PyInit__cpu)."""
    found = glob.glob(os.path.join(checkout, "pymerge", "_cpu*.so"))
    if not found:  # (an IndexError)
        raise SystemExit(f"bench_exact_sums: {checkout}: no pymerge/_cpu*.so there; build that checkout first")
    path = found[0]
    spec = importlib.util.spec_from_file_location(f"{package}._cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fns: dict, rounds: int) -> dict:
    """Median and spread (min..max) of seconds per call, rounds interleaved across fns."""
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            time.sleep(CPU_SETTLE_S)  # no call timed against another's still-spinning threads
            t = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="checkout whose pymerge/_cpu*.so has the float-partial kernels")
    ap.add_argument("--numel", type=positive_int, default=1 << 22)
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--before", help="checkout whose pymerge/_cpu*.so has an earlier version of the exact sums")
    args = ap.parse_args()
    old, new = load_old(args.old), _native.cpu
    builds = {"new": new, "before": load_old(args.before, "pymerge_before")} if args.before else {"new": new}
    n = args.numel
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g) for _ in range(4)]
    base = xs.pop()
    code = _native.DTYPE_CODES[torch.float32]
    ptrs = [x.data_ptr() for x in xs]
    out = torch.empty(n)
    plan = tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.3))
    spec = tvo._spec(xs[0], plan)
    h0, h1 = philox.name_hash("w")
    rows, cols = 1024, n // 1024
    thr = tvo.della_thresholds(0.5, 0.2, cols).tolist()
    thr32 = tvo.della_thresholds(0.5, 0.2, cols).to(torch.uint32)  # builds since 2026-12-02 take its address

    def della_thr(mod):
        return thr32.data_ptr() if mod is _native.cpu else thr
    words = torch.zeros((n + 63) // 64, dtype=torch.int64)
    dspec = tvo._spec(xs[0], tvo.ModelPlan(mode=tvo.BITS, model=0))
    dspec = dspec[:8] + (words.data_ptr(),) + dspec[9:]
    results = []
    for threads in (1, 0):
        def lincomb():
            interp.group_lincomb([base, xs[0]], None, False, "whole", torch.tensor([[0.4, 0.6, 0.0]]), out,
                                 "cpu", threads)
        def exact(new):  # the exact-sum statistics of one build
            return {
            "slerp dots (3 pairs)": (
                lambda: old.group_dots(ptrs[:1] + [base.data_ptr()], [code] * 2, 0, 0, False, 1, n, 0, threads),
                lambda: exact_sum.totals(torch.tensor(new.whole_dots(ptrs[:1] + [base.data_ptr()], [code] * 2, 0, 0,
                                                                     False, n, threads)).view(-1, exact_sum.PARTS))),
            "model_stock dots (6 pairs)": (
                lambda: old.group_dots(ptrs, [code] * 3, base.data_ptr(), code, True, 1, n, 0, threads),
                lambda: exact_sum.totals(torch.tensor(new.whole_dots(ptrs, [code] * 3, base.data_ptr(), code, True,
                                                                     n, threads)).view(-1, exact_sum.PARTS))),
            "dare l1 norms": (
                lambda: old.tv_l1(spec, base.data_ptr(), code, n, 0, 3, h0, h1, threads),
                lambda: exact_sum.totals(torch.tensor(new.tv_l1(spec, base.data_ptr(), code, n, 0, 3, h0, h1,
                                                                threads)).view(2, -1))),
            "della mask + norms": (
                lambda: old.tv_della_mask(dspec, base.data_ptr(), code, rows, cols, thr, words.data_ptr(), 3, h0, h1,
                                          threads),
                lambda: exact_sum.totals(torch.tensor(new.tv_della_mask(dspec, base.data_ptr(), code, rows, cols,
                                                                        della_thr(new),
                                                                        words.data_ptr(), 3, h0, h1,
                                                                        threads)).view(2, -1))),
            }
        cases = exact(new)
        fns = {}
        for name, (o, w) in cases.items():
            fns[name, "old"], fns[name, "new"] = o, w
        if args.before:
            for name, (_, w) in exact(builds["before"]).items():
                fns[name, "before"] = w
        fns["lincomb", "same"] = lincomb
        t = timed(fns, args.rounds)
        for name in cases:
            (mo, lo_o, hi_o), (mn, lo_n, hi_n) = t[name, "old"], t[name, "new"]
            row = {"statistic": name, "threads": threads or "default", "old ms": mo * 1e3,
                   "new ms": mn * 1e3, "new/old": mn / mo,
                   "spread old": f"{lo_o * 1e3:.1f}-{hi_o * 1e3:.1f}",
                   "spread new": f"{lo_n * 1e3:.1f}-{hi_n * 1e3:.1f}"}
            if args.before:
                mb, lo_b, hi_b = t[name, "before"]
                row.update({"before ms": mb * 1e3, "before/old": mb / mo, "spread before": f"{lo_b * 1e3:.1f}-{hi_b * 1e3:.1f}"})
            results.append(row)
        lin = t["lincomb", "same"][0]
        so, sn = t["slerp dots (3 pairs)", "old"][0], t["slerp dots (3 pairs)", "new"][0]
        row = {"statistic": "slerp merge (dots + elementwise pass)", "threads": threads or "default",
               "old ms": (so + lin) * 1e3, "new ms": (sn + lin) * 1e3, "new/old": (sn + lin) / (so + lin)}
        if args.before:
            sb = t["slerp dots (3 pairs)", "before"][0]
            row.update({"before ms": (sb + lin) * 1e3, "before/old": (sb + lin) / (so + lin)})
        results.append(row)
    load = os.getloadavg()
    title = (f"Exact sums vs float partial sums, {n} float32 elements per tensor, median of {args.rounds} "
             f"interleaved rounds; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (a shared, loaded machine)")
    columns = ["statistic", "threads", "old ms", "new ms", "new/old", "spread old", "spread new"]
    if args.before:
        title += "; before: the exact sums of an earlier build"
        columns[4:4] = ["before ms", "before/old"]
        columns.append("spread before")
    table = write_results("exact_sums", "cpu", results, columns, title)
    print(title)
    print(table)


if __name__ == "__main__":
    main()
