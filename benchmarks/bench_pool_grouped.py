"""CheckpointPool.materialize on the CPU: one native call per candidate (the grouped task table) vs one
kernel call per tensor, against same-run copy bandwidth, across model sizes and tensor counts; the fixed
cost of a call; and the registered methods (task_arithmetic, ties, dare_ties) as one call vs per tensor.

    python benchmarks/bench_pool_grouped.py [--quick | --full | --sweep] [--n 5] [--rounds 15] [--no-methods]
                                            [--compressed]   (int8 / int4 pools: one call vs per tensor)

--full: 1M to 500M parameters, 100 and 1000 tensors each (about 14 GB of RAM at 500M, N = 5).
--sweep: where the time of a model of many small tensors goes: 5M parameters in 100 to 3000 tensors, the
native call alone (the cached entry's task table) vs the whole materialize vs copy, and the rest per tensor
(the entry's check and the version bumps, which read torch objects the call's streaming evicted).
Bytes counted: (N+1) model sizes per materialize (N read, 1 written). The copy baseline is torch's
dst.copy_(src) over the same bytes (at most 1 GB: beyond the caches the copy's rate no longer depends
on its size). Rounds interleave copy, per tensor and grouped, so a drifting machine load hits them all
alike; each row reports the best time of each, and the ratio grouped / copy per round (median and the
range over rounds), with the load average around the row. The machine is shared: read the ratios, and
rerun on a quiet machine for absolute figures. Writes benchmarks/results/cpu/bench_pool_grouped.{json,md}
(bench_pool_grouped_quick.* with --quick).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import positive_int, write_results  # noqa: E402

from pymerge.bench import CPU_SETTLE_S  # noqa: E402
from pymerge.pool import CheckpointPool  # noqa: E402

COPY_CAP = 1 << 30  # bytes moved per copy sample, at most


class Flat(torch.nn.Module):
    """`tensors` parameters of about params / tensors elements each (sizes vary by a few percent)."""

    def __init__(self, params: int, tensors: int, dtype=torch.bfloat16):
        super().__init__()
        each = max(1, params // tensors)
        sizes = [max(1, each + (i % 7 - 3) * each // 50) for i in range(tensors)]
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in sizes])


def sample(fns: dict, rounds: int) -> dict:
    """Seconds per call, one sample per function and round, rounds interleaved (after a warm-up call)."""
    for f in fns.values():
        f()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            time.sleep(CPU_SETTLE_S)  # torch's spinning OpenMP workers (after copy_) left to stop first
            t = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t)
    return out


def make_pool(params: int, tensors: int, n: int, base: bool = False):
    sources = []
    for i in range(n + base):
        torch.manual_seed(i)
        sources.append({k: torch.randn(v.shape).to(v.dtype) for k, v in Flat(params, tensors).state_dict().items()})
    return CheckpointPool(sources[:n], base=sources[n] if base else None, device="cpu")


def case(params: int, tensors: int, n: int, rounds: int) -> dict:
    load0 = os.getloadavg()[0]
    pool = make_pool(params, tensors, n)
    target, per_target = Flat(params, tensors), Flat(params, tensors)
    w = [1.0 / n] * n
    moved = (n + 1) * pool.model_nbytes()
    copy_bytes = min(moved, COPY_CAP)
    src = torch.randn(copy_bytes // 4).bfloat16()  # copy_bytes / 2 read, as many written
    dst = torch.empty_like(src)
    fns = {
        "copy": lambda: dst.copy_(src),
        # a name function is not cacheable: the per-tensor path (plans checked and one kernel call per tensor)
        "per_tensor": lambda: pool.materialize(w, into=per_target, names=lambda s: s),
        "grouped": lambda: pool.materialize(w, into=target),
    }
    t0 = time.perf_counter()
    fns["grouped"]()
    fns["copy"]()
    # small cases get more rounds (about 1 s of grouped calls), up to 200
    r = min(200, max(rounds, int(1.0 / max(time.perf_counter() - t0, 1e-6))))
    t = sample(fns, r)
    t["copy"] = [s * moved / copy_bytes for s in t["copy"]]  # as if the copy moved the same bytes
    ratio = sorted(c / g for c, g in zip(t["copy"], t["grouped"]))
    bw = {k: moved / min(v) / 1e9 for k, v in t.items()}
    return {"params": params, "tensors": tensors, "MB per model": pool.model_nbytes() / 1e6, "rounds": r,
            "copy GB/s": bw["copy"], "per-tensor GB/s": bw["per_tensor"], "grouped GB/s": bw["grouped"],
            "per-tensor / copy": bw["per_tensor"] / bw["copy"], "grouped / copy": bw["grouped"] / bw["copy"],
            "grouped / copy, median per round": statistics.median(ratio),
            "range": f"{ratio[0]:.2f}-{ratio[-1]:.2f}", "grouped ms": 1e3 * min(t["grouped"]),
            "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"}


def sweep(n: int, rounds: int, params: int = 5_000_000, counts=(100, 300, 1000, 3000)) -> list:
    """One model size in more and more tensors: copy, the native call alone, the whole materialize."""
    rows = []
    for tensors in counts:
        load0 = os.getloadavg()[0]
        pool = make_pool(params, tensors, n)
        target = Flat(params, tensors)
        w = [1.0 / n] * n
        pool.materialize(w, into=target)
        native = next(iter(pool._plan_cache._entries.values())).native  # the entry just built for target
        weights = torch.full((1, 1, n), 1.0 / n).numpy()
        moved = (n + 1) * pool.model_nbytes()
        src = torch.randn(moved // 4).bfloat16()
        dst = torch.empty_like(src)
        t = sample({"copy": lambda: dst.copy_(src), "native": lambda: native.run(weights, pool.num_threads),
                    "materialize": lambda: pool.materialize(w, into=target)}, rounds)
        best = {k: min(v) for k, v in t.items()}
        rows.append({"params": f"{params / 1e6:g}M", "tensors": tensors, "copy ms": 1e3 * best["copy"],
                     "native call ms": 1e3 * best["native"], "materialize ms": 1e3 * best["materialize"],
                     "native / copy": best["copy"] / best["native"],
                     "materialize / copy": best["copy"] / best["materialize"],
                     "materialize / copy, median per round": statistics.median(
                         c / m for c, m in zip(t["copy"], t["materialize"])),
                     "rest per tensor us (medians)": 1e6 * (statistics.median(t["materialize"])
                                                             - statistics.median(t["native"])) / tensors,
                     "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"})
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


def fixed_cost(n: int, rounds: int, tensors: int = 100, calls: int = 200) -> dict:
    """materialize of a model of `tensors` tensors of 64 elements: all overhead, no bandwidth."""
    load0 = os.getloadavg()[0]
    pool = make_pool(64 * tensors, tensors, n)
    target = Flat(64 * tensors, tensors)
    w = [1.0 / n] * n
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            pool.materialize(w, into=target)
        per_call.append((time.perf_counter() - t) / calls * 1e6)
    return {"tensors": tensors, "best us": min(per_call), "median us": statistics.median(per_call),
            "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"}


def methods(n: int, rounds: int, sizes) -> list:
    """Registered methods through the pool: one native call (cached entry) vs one kernel call per tensor."""
    rows = []
    cases = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5}}
    for params, tensors in sizes:
        pool = make_pool(params, tensors, n, base=True)
        target, per_target = Flat(params, tensors), Flat(params, tensors)
        w = [1.0 / n] * n
        for method, kw in cases.items():
            load0 = os.getloadavg()[0]
            t = sample({"per_tensor": lambda: pool.materialize(w, into=per_target, method=method,
                                                                names=lambda s: s, **kw),
                        "one_call": lambda: pool.materialize(w, into=target, method=method, **kw)}, rounds)
            best = {k: min(v) for k, v in t.items()}
            ratio = sorted(a / b for a, b in zip(t["per_tensor"], t["one_call"]))  # the same round's two calls
            rows.append({"params": f"{params / 1e6:g}M", "tensors": tensors, "method": method,
                         "per-tensor ms": 1e3 * best["per_tensor"], "one call ms": 1e3 * best["one_call"],
                         "speedup": best["per_tensor"] / best["one_call"],
                         "speedup, median per round": statistics.median(ratio), "range": f"{ratio[0]:.2f}-{ratio[-1]:.2f}",
                         "GB/s (N+2 model sizes)": (n + 2) * pool.model_nbytes() / best["one_call"] / 1e9,
                         "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"})
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


def compressed(n: int, rounds: int, sizes) -> list:
    """Delta-compressed pools (int8, int4) on the C++ backend: one native call per candidate (the cached
    LinearTable) vs one decode call per tensor (~100 us of Python each before 2026-12-06: the only path then),
    beside the bf16 pool's one call."""
    rows = []
    for params, tensors in sizes:
        torch.manual_seed(0)
        base = {k: (0.02 * torch.randn(v.shape)).to(v.dtype) for k, v in Flat(params, tensors).state_dict().items()}
        fts = [{k: (v.float() + 1e-3 * torch.randn(v.shape)).to(v.dtype) for k, v in base.items()} for _ in range(n)]
        plain = CheckpointPool(fts, base=base, device="cpu")
        for fmt in ("int8", "int4"):
            pool = CheckpointPool(fts, base=base, device="cpu", compress=fmt)
            targets = [Flat(params, tensors) for _ in range(3)]
            w = [1.0 / n] * n
            load0 = os.getloadavg()[0]
            t = sample({"per_tensor": lambda: pool.materialize(w, into=targets[0], names=lambda s: s),
                        "one_call": lambda: pool.materialize(w, into=targets[1]),
                        "bf16": lambda: plain.materialize(w, into=targets[2])}, rounds)
            best = {k: min(v) for k, v in t.items()}
            ratio = sorted(a / b for a, b in zip(t["per_tensor"], t["one_call"]))
            rows.append({"params": f"{params / 1e6:g}M", "tensors": tensors, "format": fmt,
                         "per-tensor ms": 1e3 * best["per_tensor"], "one call ms": 1e3 * best["one_call"],
                         "speedup": best["per_tensor"] / best["one_call"],
                         "speedup, median per round": statistics.median(ratio), "range": f"{ratio[0]:.2f}-{ratio[-1]:.2f}",
                         "bf16 pool ms": 1e3 * best["bf16"], "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"})
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two small models, 5 rounds (unless --rounds)")
    ap.add_argument("--full", action="store_true", help="1M to 500M parameters, 100 and 1000 tensors each")
    ap.add_argument("--sweep", action="store_true", help="5M parameters in 100 to 3000 tensors: native call vs materialize")
    ap.add_argument("--n", type=positive_int, default=5)
    ap.add_argument("--rounds", type=positive_int, default=None, help="default 15 (--sweep: at least 30)")
    ap.add_argument("--no-methods", action="store_true", help="skip the task_arithmetic / ties / dare_ties rows")
    ap.add_argument("--compressed", action="store_true",
                    help="only the int8 / int4 pools: one native call vs one decode call per tensor")
    args = ap.parse_args(argv)
    if sum((args.quick, args.full, args.sweep)) > 1:  # (--sweep --quick ran the whole sweep, --quick --full quick)
        ap.error("--quick, --full and --sweep are three different runs: give one")
    if args.sweep:
        rows = sweep(args.n, max(args.rounds or 15, 30))  # (--rounds is at least 1)
        cols = ["params", "tensors", "copy ms", "native call ms", "materialize ms", "native / copy",
                "materialize / copy", "materialize / copy, median per round", "rest per tensor us (medians)", "load"]
        print(write_results("bench_pool_grouped_sweep", "cpu", rows, cols,
                            f"CheckpointPool.materialize, N={args.n} bf16 checkpoints, CPU: the native call alone vs the "
                            "whole call, same bytes in more tensors (best of interleaved rounds)"))
        return
    if args.compressed:
        c_sizes = [(1e6, 100), (5e6, 1000)] if args.quick else [(0.3e6, 300), (5e6, 1000), (20e6, 100), (40e6, 18)]
        rows = compressed(args.n, args.rounds or (5 if args.quick else 15), [(int(p), t) for p, t in c_sizes])
        cols = ["params", "tensors", "format", "per-tensor ms", "one call ms", "speedup", "speedup, median per round",
                "range", "bf16 pool ms", "load"]
        print(write_results("bench_pool_grouped_compressed" + ("_quick" if args.quick else ""), "cpu", rows, cols,
                            f"Compressed CheckpointPools, N={args.n} bf16 fine-tunes + base, CPU: one native call per "
                            "candidate vs one decode call per tensor (best of interleaved rounds)"))
        return
    if args.quick:
        sizes = [(1e6, 100), (5e6, 1000)]
    elif args.full:
        sizes = [(p, t) for p in (1e6, 5e6, 20e6, 100e6, 500e6) for t in (100, 1000)]
    else:
        sizes = [(1e6, 100), (5e6, 100), (5e6, 1000), (20e6, 100), (20e6, 1000), (100e6, 300)]
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 15)  # an explicit --rounds wins over --quick
    rows = []
    for params, tensors in sizes:
        rows.append(case(int(params), tensors, args.n, rounds))
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    fc = fixed_cost(args.n, max(rounds, 7))
    print(f"fixed cost: {fc['best us']:.1f} us best, {fc['median us']:.1f} us median per materialize of a "
          f"{fc['tensors']}-tensor model (load {fc['load']})", flush=True)
    cols = ["params", "tensors", "MB per model", "copy GB/s", "per-tensor GB/s", "grouped GB/s", "per-tensor / copy",
            "grouped / copy", "grouped / copy, median per round", "range", "grouped ms", "rounds", "load"]
    title = (f"CheckpointPool.materialize, N={args.n} bf16 checkpoints, CPU: grouped (one native call) vs per tensor; "
             f"fixed cost {fc['best us']:.1f} us best, {fc['median us']:.1f} us median, {fc['tensors']} tensors "
             f"(load {fc['load']})")
    for r in rows:
        r["params"] = f"{r['params'] / 1e6:g}M"
    name = "bench_pool_grouped" + ("_quick" if args.quick else "_full" if args.full else "")
    print(write_results(name, "cpu", rows, cols, title))
    if not args.no_methods:
        m_sizes = [(1e6, 100), (5e6, 1000)] if args.quick else [(5e6, 1000), (20e6, 100)]
        mrows = methods(args.n, max(3, rounds // 3), [(int(p), t) for p, t in m_sizes])
        mcols = ["params", "tensors", "method", "per-tensor ms", "one call ms", "speedup", "speedup, median per round",
                 "range", "GB/s (N+2 model sizes)", "load"]
        print(write_results(name + "_methods", "cpu", mrows, mcols,
                            f"CheckpointPool.materialize of registered methods, N={args.n} bf16 checkpoints + base, "
                            "CPU: one native call vs one kernel call per tensor"))


if __name__ == "__main__":
    main()
