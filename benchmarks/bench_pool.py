"""CheckpointPool on the CPU: materialize into a live model vs same-run copy bandwidth, materialize_many
vs separate calls, and mergekit's way (re-read the safetensors and merge per candidate), one pool.

    python benchmarks/bench_pool.py [--quick] [--params 64e6] [--n 5] [--k 6]

Writes benchmarks/results/<machine>/bench_pool.{json,md} (bench_pool_quick.* with --quick); --device cuda keeps the pool in GPU memory. Bytes counted: materialize moves (N+1) model-sizes
(N read, 1 written); materialize_many moves (N+K). The copy baseline is torch's dst.copy_(src) over a
buffer of the same dtype, timed in the same run, interleaved (the machine's bandwidth drifts).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, charts, load_average, machine_description, machine_label, markdown_table, positive_int,  # noqa: E402
                    result_name, spread, time_interleaved, write_atomic)

from pymerge.ops.weighted_sum import sum_into  # noqa: E402
from pymerge.pool import CheckpointPool  # noqa: E402


class Stack(torch.nn.Module):
    """A model-shaped set of tensors: `layers` square matrices plus an embedding, about `params` in all."""

    def __init__(self, params: int, layers: int = 16, dtype=torch.bfloat16):
        super().__init__()
        d = int((params / (layers + 2)) ** 0.5) // 64 * 64
        self.embed = torch.nn.Parameter(torch.empty(2 * d, d, dtype=dtype))
        self.layers = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(d, d, dtype=dtype)) for _ in range(layers)])
        self.norm = torch.nn.Parameter(torch.empty(d, dtype=dtype))


def make_files(folder: str, n: int, params: int):
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        m = Stack(params)
        sd = {k: torch.randn(v.shape).to(v.dtype) for k, v in m.state_dict().items()}
        paths.append(os.path.join(folder, f"ckpt{i}.safetensors"))
        save_file(sd, paths[-1])
    return paths


def mergekit_way(paths, weights, model):
    """What a mergekit-based search does per candidate: open every file, read every tensor again, merge
    it with mergekit's linear arithmetic (float32 accumulator, addcmul per model, normalize, cast), load."""
    handles = [safe_open(p, framework="pt") for p in paths]
    merged = {}
    device = next(model.parameters()).device  # on cuda, the arithmetic there too, as mergekit --cuda does it
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    for name in handles[0].keys():
        tensors = [h.get_tensor(name).to(device) for h in handles]
        acc = torch.zeros_like(tensors[0], dtype=torch.float32)
        for t, c in zip(tensors, w):
            acc.addcmul_(t, c)
        acc.div_(w.sum())
        merged[name] = acc.to(tensors[0].dtype)
    model.load_state_dict(merged)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8e6 parameters, 2 rounds (unless given)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--params", type=float, default=None, help="parameters per checkpoint (bf16; default 64e6, 512e6 on cuda)")
    ap.add_argument("--n", type=positive_int, default=5)
    ap.add_argument("--k", type=positive_int, default=6)
    ap.add_argument("--rounds", type=positive_int, default=None, help="default 5")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available to this torch")
    if args.params is not None and not MIN_PARAMS <= args.params <= 1e12:  # (Stack's 64-wide matrices)
        ap.error(f"--params must be from {MIN_PARAMS} to 1e12, got {args.params:g}")
    # --quick picks the defaults only: an explicit --params/--rounds wins (it was overridden)
    params = int(args.params or (8e6 if args.quick else 512e6 if device == "cuda" else 64e6))
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    tmp = tempfile.mkdtemp(prefix="bench_pool_")
    try:  # the checkpoints go, whatever happens (a failed run left them in /tmp)
        run(args, device, params, rounds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MIN_PARAMS = 18 * 64 * 64  # the smallest Stack: 16 layers + a 2-row embedding of 64 x 64


def run(args, device, params, rounds, tmp):
    n, k = args.n, args.k
    paths = make_files(tmp, n, params)
    pool = CheckpointPool(paths, device=device)
    print(pool.describe())
    model_bytes = pool.model_nbytes()
    targets = [Stack(params).to(device) for _ in range(k)]
    w = [1.0 / n] * n
    rows = [[(i + j) % n + 1.0 for i in range(n)] for j in range(k)]
    # the copy baseline moves the same bytes as one materialize: (N+1)/2 model-sizes read, as many written
    copy_elems = (n + 1) * model_bytes // 2 // 2
    src = torch.randn(copy_elems, device=device).bfloat16()
    dst = torch.empty(copy_elems, dtype=torch.bfloat16, device=device)
    # the fused kernel alone on one flat tensor of the same bytes: materialize's own ceiling
    flat = [torch.randn(model_bytes // 2, device=device).bfloat16() for _ in range(n)]
    flat_out = torch.empty(model_bytes // 2, dtype=torch.bfloat16, device=device)
    # on a GPU the weights in device memory, as materialize keeps them: a list was copied from pageable host
    # memory on every call, which waits for the GPU's queue (the reference, not materialize, paid for it)
    flat_w = [w] if device == "cpu" else torch.tensor([w], dtype=torch.float32, device=device)

    fns = {
        "copy": lambda: dst.copy_(src),
        "fused": lambda: sum_into(flat, flat_w, [flat_out]),
        "materialize": lambda: pool.materialize(w, into=targets[0]),
        "materialize_many": lambda: pool.materialize_many(rows, into=targets),
        "separate": lambda: [pool.materialize(r, into=t) for r, t in zip(rows, targets)],
    }
    samples = {}
    t = time_interleaved(fns, rounds, device, samples_out=samples)
    t_mk = time_interleaved({"mergekit": lambda: mergekit_way(paths, w, targets[0])}, max(1, rounds // 2), device)["mergekit"]
    gb = 1e9
    copy_bw = (n + 1) * model_bytes / t["copy"] / gb
    mat_bw = (n + 1) * model_bytes / t["materialize"] / gb
    fused_bw = (n + 1) * model_bytes / t["fused"] / gb
    many_bw = (n + k) * model_bytes / t["materialize_many"] / gb

    def per_round(name, moved_models):
        """This row's rate over copy's in the same round, min-max over the rounds (a best-of hides the spread)."""
        r = spread([(moved_models / x) / ((n + 1) / c) for c, x in zip(samples["copy"], samples[name])])
        return {"vs copy per round": f"{r['min']:.2f}-{r['max']:.2f}", "ms per round": [1e3 * x for x in samples[name]]}

    rows_out = [
        {"what": "torch copy_ (same bytes)", "ms": 1e3 * t["copy"], "GB/s": copy_bw, "vs copy": 1.0,
         "ms per round": [1e3 * x for x in samples["copy"]]},
        {"what": "fused weighted_sum, one flat tensor (same bytes)", "ms": 1e3 * t["fused"], "GB/s": fused_bw,
         "vs copy": fused_bw / copy_bw, **per_round("fused", n + 1)},
        {"what": f"materialize, N={n}, K=1 (live model)", "ms": 1e3 * t["materialize"], "GB/s": mat_bw,
         "vs copy": mat_bw / copy_bw, **per_round("materialize", n + 1)},
        {"what": f"materialize_many, N={n}, K={k}", "ms": 1e3 * t["materialize_many"], "GB/s": many_bw,
         "vs copy": many_bw / copy_bw, "per candidate ms": 1e3 * t["materialize_many"] / k,
         **per_round("materialize_many", n + k)},
        {"what": f"{k} separate materialize calls", "ms": 1e3 * t["separate"],
         "GB/s": k * (n + 1) * model_bytes / t["separate"] / gb, "per candidate ms": 1e3 * t["separate"] / k},
        {"what": "mergekit's way (re-read safetensors, merge, load_state_dict)", "ms": 1e3 * t_mk,
         "per candidate ms": 1e3 * t_mk},
    ]
    summary = {
        "materialize_vs_copy": mat_bw / copy_bw,
        "materialize_vs_fused_kernel": mat_bw / fused_bw,
        "materialize_many_vs_copy": many_bw / copy_bw,
        "many_speedup_vs_separate": t["separate"] / t["materialize_many"],
        "per_candidate_speedup_vs_mergekit_way": t_mk / (t["materialize_many"] / k),
        "single_speedup_vs_mergekit_way": t_mk / t["materialize"],
    }
    cols = ["what", "ms", "GB/s", "vs copy", "vs copy per round", "per candidate ms"]
    title = (f"CheckpointPool on {device}: {n} checkpoints x {params / 1e6:.0f}M bf16 params "
             f"({model_bytes / 1e6:.0f} MB each), residency {pool.residency}")
    table = markdown_table(rows_out, cols)
    print(table)
    print(json.dumps({k2: round(v, 3) for k2, v in summary.items()}))
    out_dir = os.path.join(RESULTS, machine_label(device))
    os.makedirs(out_dir, exist_ok=True)
    meta = {"machine": machine_description(device), "date": time.strftime("%Y-%m-%d %H:%M"), "title": title,
            "threads": torch.get_num_threads(), "quick": args.quick, "rounds": rounds, **load_average()}
    name = result_name(out_dir, "bench_pool_quick" if args.quick else "bench_pool", meta["machine"])
    write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps({**meta, "rows": rows_out, "summary": summary},
                                                                    indent=1))
    write_atomic(os.path.join(out_dir, f"{name}.md"), f"### {title}\n{meta['machine']}, {meta['date']}\n\n{table}\n\n"
                 + "\n".join(f"- {k2}: {v:.2f}" for k2, v in summary.items()) + "\n")
    charts().plot_file(os.path.join(out_dir, f"{name}.json"))


if __name__ == "__main__":
    main()
