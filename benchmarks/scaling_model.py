"""A scaling model for merges across ranks: time per candidate and memory per rank, checked
against runs on this machine, then its prediction for the paper's setting on H200s.

    python benchmarks/scaling_model.py [--quick] [--no-measure]

The model (one candidate = one merge of N checkpoints of P parameters, b bytes each, on R ranks
that each hold 1/R of every tensor, as a sharded CheckpointPool or a `torchrun` disk merge):

    bytes per rank   B = (N + base + 1) * P * b / R      read every input shard once, write the output shard
                       + passes * (N + base) * P * b / R  methods with global statistics re-read the inputs
    time             t = B / min(eta * bw_rank, bw_node / r)   eta: fraction of its copy bandwidth a rank reaches
                       + rounds * (alpha_R + S / link)    statistics all-reduced (S bytes each round; ring)
                       + t_fixed                          launches, the candidate's weights, Python
    memory per rank  M = (N + base) * P * b / R + P * b_out / R   (the pool's shard + the model's shard)

bw_rank is the copy bandwidth one rank gets alone (HBM for a GPU; counting bytes read + written,
as B does). The r ranks on one host together reach at most the host's copy bandwidth bw_node (on
this 2-core CPU all ranks share one memory; 8 H200s have 8 HBMs, bw_node = 8 bw_rank). A
pool that does not fit in device memory is read from pinned host memory over PCIe each candidate
(the inputs only, (1 + passes) * pool bytes per rank), or, where the host's memory cannot hold the
shards of its ranks either, from local NVMe at the host's storage bandwidth shared by its ranks.

Checks here (one loaded 2-core machine, timings noisy): the single-process CheckpointPool (R = 1)
at several P and N, eta and t_fixed fitted on some points and the others predicted; the
`torchrun -m pymerge merge` disk merge at R = 1 and 2 on the same files, fitted at R = 1 and
predicted at R = 2. Writes benchmarks/results/cpu/scaling_model.{json,md} (and .png).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import (RESULTS, load_average, machine_description, machine_label, markdown_table,  # noqa: E402
                    result_name, time_interleaved, write_atomic, write_plot)

GB = 1e9


@dataclass(frozen=True)
class Method:
    name: str
    base: int = 0          # 1 when the method reads a base model too
    passes: int = 0        # extra full reads of the inputs for global statistics
    rounds: int = 0        # all-reduces per candidate (batched over every tensor)
    stat_bytes: float = 0  # bytes per all-reduce per (tensor, checkpoint)


# TIES/DARE-TIES thresholds: the exact global k-th magnitude of each task vector by radix select
# over float32 magnitudes, 4 rounds of 256-bin int64 histograms (each round re-reads the inputs),
# every tensor's histograms all-reduced together. Linear and task_arithmetic need no statistics. The
# thresholds depend on the checkpoints and the density, not the weights: a search's pool keeps them
# between candidates (the pool's statistics cache), so after its first candidate TIES moves what
# task_arithmetic moves ("ties, cached").
METHODS = {m.name: m for m in (Method("linear"), Method("task_arithmetic", base=1),
                               Method("ties", base=1, passes=4, rounds=4, stat_bytes=256 * 8),
                               Method("ties, cached", base=1))}


@dataclass(frozen=True)
class Setting:
    params: float             # P
    checkpoints: int          # N
    ranks: int                # R
    dtype_bytes: int          # b (inputs and output)
    bw_rank: float            # B/s one rank streams alone (copy bandwidth: read + written)
    bw_node: float            # B/s all ranks of one host share
    ranks_per_node: int
    eta: float                # fraction of the copy bandwidth a merge reaches
    link: float = 0.0         # B/s per rank for all-reduces (bus bandwidth)
    alpha: float = 0.0        # s per all-reduce step (latency)
    tensors: int = 0          # tensors in the model (each rank holds a shard of each)
    t_launch: float = 0.0     # s per tensor per candidate (kernel launch)
    t_fixed: float = 0.0      # s per candidate, whatever the size
    device_mem: float = math.inf   # B per rank where the pool should live
    spill_bw: float = 0.0     # B/s per rank when it does not fit there (pinned host over PCIe)
    host_mem: float = math.inf     # B of host memory per node for spilled pools
    storage_bw: float = 0.0   # B/s per node from local disks when the host cannot hold them either


def predict(s: Setting, method: Method) -> dict:
    """Seconds per candidate and bytes per rank, with the terms that make them up."""
    shard = s.params * s.dtype_bytes / s.ranks
    pool = (s.checkpoints + method.base) * shard
    memory = pool + shard  # the pool's shard and the live model's shard
    per_node = min(s.ranks, s.ranks_per_node)
    moved = (s.checkpoints + method.base + 1) * shard + method.passes * pool
    if memory <= s.device_mem:
        tier, t_mem = "device", moved / min(s.eta * s.bw_rank, s.bw_node / per_node)
    elif pool * per_node <= s.host_mem:
        tier, t_mem = "host RAM over PCIe", (1 + method.passes) * pool / s.spill_bw
    else:
        tier, t_mem = "NVMe", (1 + method.passes) * pool / (s.storage_bw / per_node)
    t_coll = 0.0
    if method.rounds and s.ranks > 1:
        payload = s.tensors * (s.checkpoints + method.base) * method.stat_bytes
        ring = 2 * (s.ranks - 1) / s.ranks
        t_coll = method.rounds * (2 * (s.ranks - 1) * s.alpha + ring * payload / s.link)
    t_fix = s.t_fixed + s.tensors * s.t_launch
    return {"seconds": t_mem + t_coll + t_fix, "t_memory": t_mem, "t_collectives": t_coll, "t_fixed": t_fix,
            "bytes_moved_per_rank": moved, "memory_per_rank": memory, "pool_per_rank": pool, "tier": tier}


def fit(points):
    """Least squares for t = moved / (eta * bw) + t_fixed over [(moved / bw, seconds)]: (eta, t_fixed)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else my / mx
    fixed = my - slope * mx
    if fixed < 0:  # no negative fixed cost: the best line through the origin (clamping kept the old slope, and
        #            every prediction came out high: an audit)
        slope, fixed = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
    return 1.0 / slope, fixed


# ---- measurements on this machine ------------------------------------------------------------
def copy_bandwidth(nbytes: int, threads: int, rounds: int) -> float:
    """torch copy_ bandwidth (bytes read + written per second) with `threads` threads, best of rounds."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src, dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8)
        t = time_interleaved({"copy": lambda: dst.copy_(src)}, rounds, "cpu")["copy"]
        return 2 * nbytes / t
    finally:
        torch.set_num_threads(old)


def pool_runs(sizes, ns, rounds):
    """Seconds per materialize of single-process CheckpointPools (linear, bf16, R = 1) at each N,
    and the copy bandwidth over 256 MB, timed round-robin in the same rounds for each size (the
    loaded machine drifts; best of rounds). Sizes well above the last-level cache."""
    from bench_pool import Stack
    from pymerge.pool import CheckpointPool
    src, dst = torch.ones(256 << 20, dtype=torch.uint8), torch.empty(256 << 20, dtype=torch.uint8)
    out, bws = [], []
    for params in sizes:
        model = Stack(int(params))
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        sources = [{k: torch.randn(v.shape).to(v.dtype) for k, v in sd.items()} for _ in range(max(ns))]
        p = sum(v.numel() for v in sd.values())
        pools = {n: CheckpointPool(sources[:n]) for n in ns}
        fns = {n: (lambda n=n: pools[n].materialize([1.0 / n] * n, into=model)) for n in ns}
        fns["copy"] = lambda: dst.copy_(src)
        t = time_interleaved(fns, rounds, "cpu")
        bws.append(2 * src.numel() / t.pop("copy"))
        out += [{"P": p, "N": n, "tensors": len(sd), "seconds": t[n]} for n in ns]
        del pools, sources, fns
    return out, max(bws)


def disk_runs(params: float, n: int, ranks_list, repeats: int, folder: str):
    """`torchrun -m pymerge merge` of n bf16 checkpoints (linear) at each R: the merge's own seconds
    (rank 0's report: process group, plan, stream, commit; not Python's start), best of repeats."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import llama_factory as lf
    import yaml
    hidden = int(math.sqrt(params / 20)) // 64 * 64
    dims = lf.LlamaDims(hidden=hidden, layers=4, intermediate=2 * hidden, vocab=2 * hidden, heads=4, kv_heads=4)
    models = [lf.make_llama(os.path.join(folder, f"m{i}"), dims=dims, dtype=torch.bfloat16, seed=i) for i in range(n)]
    cfg = os.path.join(folder, "linear.yml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0 / n}}
                                                             for m in models]}, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = []
    for ranks in ranks_list:
        best = math.inf
        for k in range(repeats):
            dest = os.path.join(folder, f"out{ranks}-{k}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   f"--log-dir={os.devnull}", "-m", "pymerge", "merge", cfg, dest, "--device", "cpu", "--threads", "1"]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            m = re.search(r"in ([0-9.]+) s on cpu", r.stderr)
            if r.returncode or not m:
                raise RuntimeError(f"torchrun merge failed: {r.stderr[-1500:]}")
            best = min(best, float(m.group(1)))
        out.append({"R": ranks, "P": dims.n_params(), "N": n, "seconds": best})
    return out


def check_here(quick: bool) -> dict:
    rounds = 3 if quick else 5
    bw1 = copy_bandwidth(256 << 20, 1, rounds)
    bw_node = copy_bandwidth(256 << 20, os.cpu_count() or 1, rounds)
    here = Setting(params=0, checkpoints=0, ranks=1, dtype_bytes=2, bw_rank=bw1, bw_node=bw_node,
                   ranks_per_node=os.cpu_count() or 1, eta=1.0)
    linear = METHODS["linear"]

    # Pool, R = 1 (bandwidth: a copy of the same bytes in the same run): fit eta and t_fixed on
    # N = 2 and 8, predict N = 4 (held out) at every size.
    sizes = [48e6, 96e6]
    runs, bw_pool = pool_runs(sizes, [2, 4, 8], 3 * rounds)
    pts = [((r["N"] + 1) * r["P"] * 2 / bw_pool, r["seconds"]) for r in runs if r["N"] != 4]
    eta, t_fixed = fit(pts)
    rows = []
    for r in runs:
        # the fit's own form, t = moved / (eta * bw_pool) + t_fixed: a node cap of bw_pool capped eta at 1 (the
        # fit found 1.12), and every row's model time was too high by that much (an audit)
        s = replace(here, params=r["P"], checkpoints=r["N"], bw_rank=bw_pool, bw_node=math.inf, eta=eta,
                    t_fixed=t_fixed)
        pred = predict(s, linear)["seconds"]
        rows.append({"check": "pool materialize, R=1", "P (M)": r["P"] / 1e6, "N": r["N"], "R": 1,
                     "measured ms": 1e3 * r["seconds"], "GB/s": (r["N"] + 1) * r["P"] * 2 / r["seconds"] / GB,
                     "model ms": 1e3 * pred,
                     "error %": 100 * (pred / r["seconds"] - 1), "fitted": "yes" if r["N"] != 4 else "no (held out)"})
    pool_fit = {"eta": eta, "t_fixed_s": t_fixed}

    # Disk merge under torchrun: fit eta at R = 1 (fixed costs from a second, smaller size), predict R = 2.
    with tempfile.TemporaryDirectory(prefix="pymerge-scaling-") as folder:
        big = disk_runs(80e6 if quick else 160e6, 4, [1, 2], 1 if quick else 2, os.path.join(folder, "big"))
        small = disk_runs(4e6, 4, [1], 1 if quick else 2, os.path.join(folder, "small"))
    one = [r for r in big if r["R"] == 1][0]
    # x = moved / bw_rank: predict() applies eta to bw_rank (a fit against min(bw1, bw_node) missed its own points)
    d_eta, d_fixed = fit([((r["N"] + 1) * r["P"] * 2 / bw1, r["seconds"]) for r in (one, small[0])])
    for r in small + big:
        s = replace(here, params=r["P"], checkpoints=r["N"], ranks=r["R"], eta=d_eta, t_fixed=d_fixed)
        pred = predict(s, linear)["seconds"]
        rows.append({"check": "torchrun disk merge", "P (M)": r["P"] / 1e6, "N": r["N"], "R": r["R"],
                     "measured ms": 1e3 * r["seconds"], "GB/s": (r["N"] + 1) * r["P"] * 2 / r["seconds"] / GB,
                     "model ms": 1e3 * pred,
                     "error %": 100 * (pred / r["seconds"] - 1), "fitted": "yes" if r["R"] == 1 else "no (held out)"})
    return {"copy_GBps_1_thread": bw1 / GB, "copy_GBps_all_cores": bw_node / GB, "pool_copy_GBps": bw_pool / GB,
            "pool_fit": pool_fit,
            "disk_fit": {"eta": d_eta, "t_fixed_s": d_fixed}, "rows": rows}


# ---- the paper's setting ---------------------------------------------------------------------
# H200 (../shared/BASELINES.md): device copy 4275 GB/s (read + written), 141 GB HBM, pinned host
# to device 55.6 GB/s. Assumed: 8 GPUs per node with 2 TB of host memory and ~25 GB/s of local
# NVMe reads (a DGX H200's 8 data drives); eta 0.85 (torch.compile's weighted sum reached 1.01x copy at N=2..16,
# a plain Triton kernel 0.76-0.90x in ../shared/BASELINES.md; pymerge has no GPU figure yet);
# NVLink/InfiniBand bus bandwidth 50 GB/s per GPU for all-reduces across nodes (400 Gb/s NICs), 20 us per ring step; 5 us per kernel launch with one launch per
# tensor; 1 ms per candidate for the weights' broadcast and Python; a 100B Llama has ~80 layers x 9
# tensors + 3 = 723 tensors.
H200 = Setting(params=100e9, checkpoints=16, ranks=64, dtype_bytes=2, bw_rank=4275 * GB, bw_node=8 * 4275 * GB,
               ranks_per_node=8, eta=0.85, link=50 * GB, alpha=20e-6, tensors=723, t_launch=5e-6, t_fixed=1e-3,
               device_mem=141 * GB * 0.9, spill_bw=55.6 * GB, host_mem=2e12, storage_bw=25 * GB)


def min_ranks_in_hbm(method: Method) -> int:
    """The fewest GPUs whose HBM (90% of it) holds the pool and the model."""
    need = (H200.checkpoints + method.base + 1) * H200.params * H200.dtype_bytes
    return math.ceil(need / H200.device_mem)


def paper_rows():
    rows = []
    for ranks in (8, 64):
        for method in METHODS.values():
            for eta in (0.85, 0.9):
                p = predict(replace(H200, ranks=ranks, eta=eta), method)
                rows.append({"GPUs": ranks, "method": method.name, "eta": eta, "tier": p["tier"],
                             "ms per candidate": 1e3 * p["seconds"], "memory ms": 1e3 * p["t_memory"],
                             "collectives ms": 1e3 * p["t_collectives"], "fixed ms": 1e3 * p["t_fixed"],
                             "GB per GPU": p["memory_per_rank"] / GB,
                             "goal < 100 ms": "yes" if p["seconds"] < 0.1 else "no"})
    return rows


def plot(path, paper):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    rs = [8, 16, 32, 64, 128, 256]
    for method in METHODS.values():
        ys = [1e3 * predict(replace(H200, ranks=r), method)["seconds"] for r in rs]
        ax.plot(rs, ys, marker="o", label=method.name)
    ax.axhline(100, color="gray", linestyle="--", label="goal: 100 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("H200 GPUs (R)")
    ax.set_ylabel("ms per candidate (model)")
    ax.set_title("100B params x 16 bf16 checkpoints, eta 0.85")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--no-measure", action="store_true", help="only the H200 prediction (no runs here)")
    args = ap.parse_args(argv)
    # runs here under the machine's own folder (an AVX2 machine's landed beside the AVX-512 ones); the H200
    # prediction alone depends on no machine
    folder = os.path.join(RESULTS, "cpu" if args.no_measure else machine_label("cpu"))
    os.makedirs(folder, exist_ok=True)
    result = {"machine": machine_description("cpu"), "date": time.strftime("%Y-%m-%d %H:%M"), **load_average(),
              "argv": sys.argv[1:] if argv is None else list(argv),  # as write_results records (an audit)
              "PYMERGE_SIMD": os.environ.get("PYMERGE_SIMD"),
              "model": __doc__.split("\n\n")[2], "methods": {k: asdict(m) for k, m in METHODS.items()},
              "h200_assumptions": asdict(H200)}
    text = []
    if not args.no_measure:
        here = check_here(args.quick)
        result["here"] = here
        cols = ["check", "P (M)", "N", "R", "measured ms", "GB/s", "model ms", "error %", "fitted"]
        load = result.get("load_average")  # as measured, never a fixed word (a file said "loaded" of a quiet run)
        where = f"load average {', '.join(map(str, load))}; " if load else ""
        text.append(f"### Scaling model vs runs on this machine ({where}copy {here['copy_GBps_1_thread']:.1f} GB/s "
                    f"on 1 thread, {here['copy_GBps_all_cores']:.1f} GB/s on all cores, {here['pool_copy_GBps']:.1f} GB/s timed with the pool runs; pool fit: eta "
                    f"{here['pool_fit']['eta']:.2f}, fixed {1e3 * here['pool_fit']['t_fixed_s']:.2f} ms; disk-merge "
                    f"fit: eta {here['disk_fit']['eta']:.2f}, fixed {here['disk_fit']['t_fixed_s']:.2f} s)\n\n"
                    + markdown_table(here["rows"], cols))
    paper = paper_rows()
    result["paper"] = paper
    cols = ["GPUs", "method", "eta", "tier", "ms per candidate", "memory ms", "collectives ms", "fixed ms",
            "GB per GPU", "goal < 100 ms"]
    fewest = {m: min_ranks_in_hbm(METHODS[m]) for m in METHODS}
    result["min_gpus_in_hbm"] = fewest
    text.append("### Prediction: 100B params x 16 bf16 checkpoints on H200s (sharded pool, one candidate)\n\n"
                + markdown_table(paper, cols) + "\n\nFewest H200s whose HBM holds pool + model: "
                + ", ".join(f"{m} {n}" for m, n in fewest.items()))
    out = "\n\n".join(text)
    print(out)
    # the quick form's own name: it replaced the full run's tables that the README quotes (an audit)
    name = "scaling_model_prediction" if args.no_measure else "scaling_model_quick" if args.quick else "scaling_model"
    name = result_name(folder, name, result["machine"])
    write_atomic(os.path.join(folder, f"{name}.json"), json.dumps(result, indent=1))
    write_atomic(os.path.join(folder, f"{name}.md"), f"{result['machine']}, {result['date']}\n\n{out}")
    # the H200 prediction alone: the same whichever run wrote it
    write_plot(os.path.join(folder, "scaling_model.png"), lambda path: plot(path, paper))


if __name__ == "__main__":
    main()
