"""CheckpointPool.materialize on the CPU: one native call per candidate (the grouped task table) vs one
kernel call per tensor, against same-run copy bandwidth, across model sizes and tensor counts.

    python benchmarks/bench_pool_grouped.py [--quick | --full] [--n 5] [--rounds 7]

Bytes counted: (N+1) model sizes per materialize (N read, 1 written). The copy baseline is torch's
dst.copy_(src) over the same bytes; rounds are interleaved and the best of each is kept (the machine
is shared and its bandwidth drifts; small cases get more rounds, up to 200). "fixed cost" is materialize of a 100-tensor model of 64 elements
per tensor: all overhead, no bandwidth. Writes benchmarks/results/cpu/bench_pool_grouped.{json,md}.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_interleaved, write_results  # noqa: E402

from pymerge.pool import CheckpointPool  # noqa: E402


class Flat(torch.nn.Module):
    """`tensors` parameters of about params / tensors elements each (sizes vary by a few percent)."""

    def __init__(self, params: int, tensors: int, dtype=torch.bfloat16):
        super().__init__()
        each = max(1, params // tensors)
        sizes = [max(1, each + (i % 7 - 3) * each // 50) for i in range(tensors)]
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in sizes])


def case(params: int, tensors: int, n: int, rounds: int) -> dict:
    sources = []
    for i in range(n):
        torch.manual_seed(i)
        sources.append({k: torch.randn(v.shape).to(v.dtype) for k, v in Flat(params, tensors).state_dict().items()})
    pool = CheckpointPool(sources, device="cpu")
    target = Flat(params, tensors)
    w = [1.0 / n] * n
    model_bytes = pool.model_nbytes()
    copy_elems = (n + 1) * model_bytes // 2 // 2  # (N+1)/2 model sizes read, as many written
    src = torch.randn(copy_elems).bfloat16()
    dst = torch.empty_like(src)
    pool.materialize(w, into=target)
    plans = pool._plan([target], [0] * len(pool.names), None, True)
    table = [np.asarray([w], dtype=np.float64)]
    fns = {
        "copy": lambda: dst.copy_(src),
        "per_tensor": lambda: pool._run_linear(plans, table),  # one kernel call per tensor (the old path)
        "grouped": lambda: pool.materialize(w, into=target),
    }
    t0 = time.perf_counter()
    fns["grouped"]()
    # a shared, loaded machine: enough rounds that each function gets some quiet ones (about 2 s a case)
    t = time_interleaved(fns, min(200, max(rounds, int(0.5 / max(time.perf_counter() - t0, 1e-6)))), "cpu")
    bw = {k: (n + 1) * model_bytes / v / 1e9 for k, v in t.items()}
    return {"params": params, "tensors": tensors, "MB per model": model_bytes / 1e6,
            "copy GB/s": bw["copy"], "per-tensor GB/s": bw["per_tensor"], "grouped GB/s": bw["grouped"],
            "per-tensor / copy": bw["per_tensor"] / bw["copy"], "grouped / copy": bw["grouped"] / bw["copy"],
            "grouped ms": 1e3 * t["grouped"]}


def fixed_cost(n: int, rounds: int, tensors: int = 100, calls: int = 200) -> dict:
    sources = [{k: torch.randn(v.shape).to(v.dtype) for k, v in Flat(64 * tensors, tensors).state_dict().items()}
               for _ in range(n)]
    pool = CheckpointPool(sources, device="cpu")
    target = Flat(64 * tensors, tensors)
    w = [1.0 / n] * n
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            pool.materialize(w, into=target)
        best = min(best, (time.perf_counter() - t) / calls)
    return {"tensors": tensors, "us per materialize": best * 1e6}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two small models, 3 rounds")
    ap.add_argument("--full", action="store_true", help="up to 500M parameters (about 6 GB of RAM at N=5)")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    sizes = [(1e6, 100), (5e6, 100)] if args.quick else [(1e6, 100), (5e6, 100), (5e6, 1000), (20e6, 100),
                                                         (20e6, 1000), (100e6, 300)]
    if args.full:
        sizes += [(500e6, 300)]
    rounds = 3 if args.quick else args.rounds
    rows = []
    for params, tensors in sizes:
        rows.append(case(int(params), tensors, args.n, rounds))
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    fc = fixed_cost(args.n, rounds)
    print(f"fixed cost: {fc['us per materialize']:.1f} us per materialize of a {fc['tensors']}-tensor model")
    cols = ["params", "tensors", "MB per model", "copy GB/s", "per-tensor GB/s", "grouped GB/s", "per-tensor / copy",
            "grouped / copy", "grouped ms"]
    title = (f"CheckpointPool.materialize, N={args.n} bf16 checkpoints, CPU: grouped (one native call) vs per tensor; "
             f"fixed cost {fc['us per materialize']:.1f} us for {fc['tensors']} tensors")
    for r in rows:
        r["params"] = f"{r['params'] / 1e6:g}M"
    print(write_results("bench_pool_grouped" + ("_quick" if args.quick else ""), "cpu", rows, cols, title))


if __name__ == "__main__":
    main()
