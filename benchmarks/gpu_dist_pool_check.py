"""Sharded pools and distributed search on one device type, under torchrun (gpu_dist_check.sh runs it):

    torchrun --standalone --nproc-per-node=R benchmarks/gpu_dist_pool_check.py --device cuda   # NCCL, one GPU a rank
    torchrun --standalone --nproc-per-node=4 benchmarks/gpu_dist_pool_check.py --device cpu    # gloo: the rehearsal

The layouts of tests/test_dist_mesh.py on a (R/2, 2) mesh ("dp", "tp") -- (R, 1) for odd R, so
R = 1 on a single GPU still runs every path: DTensors, strided shards, collectives on the backend
-- plus FSDP2 over all R ranks. For each layout and method the gathered model must equal the
single-process pool on the same device, bit for bit (global statistics are exact sums); the search (tensor parallel forward inside evaluate, replica groups over "dp") must
propose the candidates of a single-process search. Then time per candidate for linear and TIES
on a larger FSDP2 model. One line per check, 'ok' or 'FAIL'; every rank exits 1 if any failed.
Every collective has the group's timeout (--timeout).
"""
import argparse
import os
import statistics
import sys
import time
from datetime import timedelta

import numpy as np
import torch

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
from test_dist_mesh import CASES, LAYOUTS, Block, full, shard, weights_of, write_checkpoints  # noqa: E402
from test_dist_mesh_search import SEARCH, SHAPES as EVEN_SHAPES, evaluate  # noqa: E402
from test_dist_mesh_search import Block as EvenBlock  # noqa: E402


def single_process(files, even_files, dev):
    """The references, made before the process group exists (so pymerge and its search run as one process)."""
    import pymerge
    pools = {n: pymerge.CheckpointPool(files[:n], base=files[3], device=dev) for n in (1, 3)}
    merged = {}
    for label, n_src, kw in CASES:
        m = Block().to(dev)
        pools[n_src].materialize(weights_of(kw, n_src), into=m, **kw)
        merged[label] = {n: p.detach().cpu() for n, p in m.named_parameters()}
    pool = pymerge.CheckpointPool(even_files[:3], base=even_files[3], device=dev)
    search = pymerge.search.optimize(pool, lambda m: evaluate(_on(m, dev)), model=EvenBlock().to(dev), **SEARCH)
    return merged, [(r["x"], r["scores"]) for r in search.history]


def _on(model, dev):
    """evaluate() of the tests feeds CPU inputs: run it on the model's device instead."""
    class OnDevice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x.to(dev)).cpu()
    return OnDevice()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--work", required=True, help="a folder every rank sees (the checkpoints go there)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--params", type=float, default=0, help="timing model size (0: 64M on cuda, 1M on cpu)")
    args = ap.parse_args()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pymerge
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(1)
    mine = os.path.join(args.work, f"rank{rank}")  # tiny checkpoints, the same bytes on every rank: no waiting
    os.makedirs(os.path.join(mine, "even"), exist_ok=True)
    files, even = write_checkpoints(mine), write_checkpoints(os.path.join(mine, "even"), EVEN_SHAPES)
    refs, ref_search = single_process(files, even, dev)
    backend = "nccl" if args.device == "cuda" else "gloo"
    kw = {"device_id": dev} if args.device == "cuda" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout), **kw)
    tp = 2 if world % 2 == 0 else 1
    mesh = init_device_mesh(args.device, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    flat = init_device_mesh(args.device, (world,))
    lines, failed = [], 0

    def report(ok, what):
        nonlocal failed
        failed += not ok
        lines.append(f"{'ok  ' if ok else 'FAIL'} {what}")

    models = {layout: shard(Block().to(dev), layout, mesh) for layout in LAYOUTS}
    models["fsdp"] = Block().to(dev)
    fully_shard(models["fsdp"], mesh=flat)
    for layout, m in models.items():
        pools = {n: pymerge.CheckpointPool(files[:n], base=files[3], device=dev, shard_like=m) for n in (1, 3)}
        for label, n_src, kw in CASES:
            try:
                pools[n_src].materialize(weights_of(kw, n_src), into=m, **kw)
                got = {n: t.cpu() for n, t in full(m).items()}
                bits = all(torch.equal(got[n].view(torch.int32), refs[label][n].view(torch.int32)) for n in got)
                close = all(torch.allclose(got[n], refs[label][n], rtol=1e-6, atol=1e-7) for n in got)
                ok = bits  # exact global statistics: every method gives the single-process bits
                report(ok, f"pool {layout:11s} {label:15s} {'bit-identical' if bits else 'allclose' if close else 'DIFFERENT'}"
                           f" to one process")
            except Exception as exc:
                report(False, f"pool {layout:11s} {label:15s} {type(exc).__name__}: {exc}")
    try:  # search: a TP forward inside evaluate, one replica group per "dp" row
        m = shard(EvenBlock().to(dev), "tp_replicas", mesh)
        pool = pymerge.CheckpointPool(even[:3], base=even[3], device=dev, shard_like=m)
        res = pymerge.search.optimize(pool, lambda model: evaluate(_on(model, dev)), model=m, **SEARCH)
        same_x = all(np.array_equal(r["x"], x) for r, (x, _) in zip(res.history, ref_search))
        close = all(np.isclose(r["scores"][k], s[k], rtol=1e-4) for r, (_, s) in zip(res.history, ref_search) for k in s)
        report(same_x and close and len(res.history) == len(ref_search),
               f"search tp_replicas: {'same' if same_x else 'DIFFERENT'} candidates, scores "
               f"{'close' if close else 'DIFFERENT'} ({len(res.history)} evaluations, {mesh.size(0)} replica groups)")
    except Exception as exc:
        report(False, f"search tp_replicas: {type(exc).__name__}: {exc}")
    lines += timing(args, dev, flat, rank)
    failures = torch.tensor([failed], dtype=torch.int64, device=dev)
    dist.all_reduce(failures)
    if rank == 0:
        print(f"sharded pool on {args.device} ({backend}), R={world}, mesh {tuple(mesh.shape)}:")
        print("\n".join(lines))
    dist.destroy_process_group()
    sys.exit(1 if int(failures) else 0)


def timing(args, dev, flat, rank):
    """ms per candidate (slowest rank, median of 5) for linear and TIES on an FSDP2 stack of linears."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    import pymerge
    params = args.params or (64e6 if args.device == "cuda" else 1e6)
    width = 1024 if params >= 16e6 else 256
    layers = max(1, int(params // (width * width)))
    folder = os.path.join(args.work, "timing")
    files = [os.path.join(folder, f"t{i}.safetensors") for i in range(4)]
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        g = torch.Generator().manual_seed(1)
        for f in files:
            save_file({f"{i}.weight": torch.randn(width, width, generator=g).to(torch.bfloat16)
                       for i in range(layers)}, f)
    dist.barrier()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(dev)
    model = model.to(torch.bfloat16)
    fully_shard(model, mesh=flat)
    pool = pymerge.CheckpointPool(files[:3], base=files[3], device=dev, shard_like=model)
    out = []
    for method, kw in (("linear", {}), ("ties", {"density": 0.5})):
        pool.materialize([0.5, 0.3, 0.2], into=model, method=method, **kw)  # warm-up: compiles, caches thresholds
        times = []
        for r in range(5):
            dist.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            pool.materialize([0.4 + 0.01 * r, 0.3, 0.3 - 0.01 * r], into=model, method=method, **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        slowest = torch.tensor(times, dtype=torch.float64, device=dev)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # per round, the slowest rank
        times = slowest.tolist()
        out.append(f"time {method:6s} {layers * width * width / 1e6:.0f}M bf16 params x 3 + base: "
                   f"{1e3 * statistics.median(times):.2f} ms per candidate (slowest rank, median of 5; "
                   f"best {1e3 * min(times):.2f}), pool {pool.nbytes / 2**20:.0f} MiB on rank {rank}")
    return out


if __name__ == "__main__":
    main()
