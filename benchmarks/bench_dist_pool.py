"""Sharded CheckpointPool on this CPU: time per candidate and memory per rank for R = 1 and 2 (gloo).

    python benchmarks/bench_dist_pool.py [--layers 8] [--width 1024] [--checkpoints 4] [--rounds 5] [--name dist_pool]

The same pool (N checkpoints + base of an MLP of `layers` width x width float32 linears) is
materialized into an FSDP2 model over R ranks, one thread per rank (so R = 2 uses both cores),
with R = 1 at one and at two threads, and the single-process pool, as baselines. Per candidate: the slowest rank's best time
of `rounds` (barrier before and after each), and the median as the spread. Per rank: the bytes the pool holds, the model's
local bytes, and the bytes one candidate streams (inputs read + output written), the quantities
a scaling model predicts from. Writes results/cpu/dist_pool.{json,md}.
"""
import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import positive_int, write_results  # noqa: E402

METHODS = (("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.5}))


def build(layers, width):
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def worker(rank, world, port, files, args, threads, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    model = build(args.layers, args.width)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    pool = pymerge.CheckpointPool(files[:-1], base=files[-1], shard_like=model, num_threads=threads)
    n = pool.num_checkpoints
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    rows = []
    for method, kw in METHODS:
        weights = [1.0 / n] * n
        pool.materialize(weights, into=model, method=method, **kw)  # warm up (thresholds are cached)
        times = []
        for r in range(args.rounds):
            weights = [(i + r + 1) / (n * (n + 1) / 2 + n * r) for i in range(n)]
            dist.barrier()
            t = time.perf_counter()
            pool.materialize(weights, into=model, method=method, **kw)
            dist.barrier()
            times.append(time.perf_counter() - t)
        streamed = local * (n + (method != "linear")) + local  # inputs (and base) read, output written
        rows.append({"method": method, "seconds": min(times), "median": statistics.median(times), "pool_bytes": pool.nbytes, "model_bytes": local,
                     "streamed_bytes": streamed,
                     "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    torch.save(rows, os.path.join(out, f"r{world}_t{threads}_rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)


def single_process(files, args) -> list:
    """The same candidates from the single-process pool into a plain model (one thread): the overhead of sharding."""
    import pymerge
    torch.set_num_threads(1)
    model = build(args.layers, args.width)
    pool = pymerge.CheckpointPool(files[:-1], base=files[-1], num_threads=1)
    n, rows = pool.num_checkpoints, []
    for method, kw in METHODS:
        pool.materialize([1.0 / n] * n, into=model, method=method, **kw)
        times = []
        for r in range(args.rounds):
            weights = [(i + r + 1) / (n * (n + 1) / 2 + n * r) for i in range(n)]
            t = time.perf_counter()
            pool.materialize(weights, into=model, method=method, **kw)
            times.append(time.perf_counter() - t)
        local = sum(p.numel() * 4 for p in model.parameters())
        rows.append({"ranks": "plain", "threads_per_rank": 1, "method": method, "ms_per_candidate": 1e3 * min(times),
                     "ms_median": 1e3 * statistics.median(times), "pool_MB_per_rank": pool.nbytes / 1e6,
                     "model_MB_per_rank": local / 1e6,
                     "streamed_MB_per_rank": (local * (n + (method != "linear")) + local) / 1e6,
                     "peak_rss_MB_per_rank": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--layers", type=positive_int, default=8)
    ap.add_argument("--width", type=positive_int, default=1024)
    ap.add_argument("--checkpoints", type=positive_int, default=4)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--name", default="dist_pool", help="results file name under results/cpu/")
    args = ap.parse_args()
    import torch.multiprocessing as mp
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        base = build(args.layers, args.width).state_dict()
        files = []
        for i in range(args.checkpoints + 1):
            sd = base if i == args.checkpoints else {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                     for k, v in base.items()}
            files.append(os.path.join(d, f"m{i}.safetensors"))
            save_file(sd, files[-1])
        rows = single_process(files, args)
        for world, threads in ((1, 1), (1, 2), (2, 1)):
            mp.spawn(worker, args=(world, free_port(), files, args, threads, d), nprocs=world, join=True)
            per_rank = [torch.load(os.path.join(d, f"r{world}_t{threads}_rank{r}.pt")) for r in range(world)]
            for k, (method, _) in enumerate(METHODS):
                ranks = [p[k] for p in per_rank]
                rows.append({"ranks": world, "threads_per_rank": threads, "method": method,
                             "ms_per_candidate": 1e3 * max(r["seconds"] for r in ranks),
                             "ms_median": 1e3 * max(r["median"] for r in ranks),
                             "pool_MB_per_rank": max(r["pool_bytes"] for r in ranks) / 1e6,
                             "model_MB_per_rank": max(r["model_bytes"] for r in ranks) / 1e6,
                             "streamed_MB_per_rank": max(r["streamed_bytes"] for r in ranks) / 1e6,
                             "peak_rss_MB_per_rank": max(r["rss_mb"] for r in ranks)})
    for r in rows:
        one = next(b for b in rows if b["method"] == r["method"] and b["ranks"] == 1 and b["threads_per_rank"] == 1)
        plain = next(b for b in rows if b["method"] == r["method"] and b["ranks"] == "plain")
        r["x_plain_pool"] = r["ms_per_candidate"] / plain["ms_per_candidate"]
        r["speedup_vs_R1_1thread"] = one["ms_per_candidate"] / r["ms_per_candidate"]
    params = args.layers * (args.width * args.width + args.width)
    title = (f"Sharded pool (FSDP2, gloo): {args.checkpoints} checkpoints + base of {params / 1e6:.1f}M float32 "
             f"parameters in {2 * args.layers} tensors, best of {args.rounds} (ranks 'plain': the single-process pool, "
             "one thread)")
    print(write_results(args.name, "cpu", rows, ["ranks", "threads_per_rank", "method", "ms_per_candidate", "ms_median",
                                                 "speedup_vs_R1_1thread", "x_plain_pool", "pool_MB_per_rank", "model_MB_per_rank",
                                                   "streamed_MB_per_rank", "peak_rss_MB_per_rank"], title))


if __name__ == "__main__":
    main()
