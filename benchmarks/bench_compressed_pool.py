"""Delta-compressed CheckpointPools on the CPU: bytes held and time per candidate for bf16 (the
uncompressed pool), int8, int4 and auto, at N = 8 and 16 fine-tunes of one base; the merged model's
relative error per format; what a sparse top-k format would cost at int4's error.
(The search quality of compressed pools on the language-model demo: bench_compressed_pool_quality.py.)

    python benchmarks/bench_compressed_pool.py [--quick] [--params 40e6] [--n 8 16] [--rounds 5]
                                               [--device cuda]   (GPU rows: pools in GPU memory, Triton)
                                               [--backend cuda]  (the CUDA extension's kernel instead)

Fine-tunes: base ~ N(0, 0.02) in bfloat16; each checkpoint adds a Student-t (5 dof) task vector of
scale 1e-3 (heavy-ish tails, as real deltas), rounded to bfloat16; the embedding is left frozen in
every other checkpoint (stored as format "zero"). Checkpoints are .safetensors files read once.
Timings: materialize into a live bf16 model, best of --rounds on the CPU (median on CUDA), the pools
interleaved in one run with a copy of the bytes the bf16 pool moves (x copy: a row's GB/s over that copy's); the
speed-up over the bf16 pool also per round (the same round's bf16 time over the pool's), as spread.
Writes benchmarks/results/<machine>/bench_compressed_pool{,_error,_topk}.{json,md}.
"""
import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pool import Stack  # noqa: E402
from common import positive_int, time_interleaved, write_results  # noqa: E402

from pymerge.kernels import interpreted as kernels_interpreted  # noqa: E402
from pymerge.pool import CheckpointPool, compressed  # noqa: E402

MODES = [("bf16", None, None), ("int8", "int8", None), ("int4", "int4", None), ("auto 1e-2", "auto", 1e-2),
         ("auto 0.15", "auto", 0.15)]


def make_files(folder: str, n: int, params: int):
    """base.safetensors and n fine-tunes of it."""
    gen = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in Stack(params).state_dict().items()}
    base = {k: (0.02 * torch.randn(s, generator=gen)).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(base, os.path.join(folder, "base.safetensors"))
    t_dist = torch.distributions.StudentT(5.0)
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        ck = {}
        for k, b in base.items():
            frozen = k == "embed" and i % 2 == 1
            ck[k] = b.clone() if frozen else (b.float() + 1e-3 * t_dist.sample(b.shape)).to(torch.bfloat16)
        paths.append(os.path.join(folder, f"ft{i}.safetensors"))
        save_file(ck, paths[-1])
        del ck
    return os.path.join(folder, "base.safetensors"), paths


def merged_error(pool, ref_pool, w, params: int, device: str) -> dict:
    """The merged model's relative error against the uncompressed pool's merge (float32 outputs)."""
    a, b = Stack(params, dtype=torch.float32).to(device), Stack(params, dtype=torch.float32).to(device)
    pool.materialize(w, into=a)
    ref_pool.materialize(w, into=b)
    base = ref_pool._base
    num = den_w = den_d = 0.0
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        num += float((x.double() - y.double()).square().sum())
        den_w += float(y.double().square().sum())
        den_d += float((y.double() - sum(w) * base[name].double()).square().sum())
    return {"vs merged weights": math.sqrt(num / den_w), "vs merged delta": math.sqrt(num / den_d)}


def topk_cost(pool_int4, base_path, paths, name: str) -> dict:
    """Density a magnitude top-k of the delta needs to reach int4's error on one tensor, and its bits
    per element with 16-bit in-block indices and 8-bit values (value error ignored: a lower bound)."""
    from safetensors import safe_open
    with safe_open(base_path, "pt") as f:
        base = f.get_tensor(name).double().reshape(-1)
    with safe_open(paths[0], "pt") as f:
        d = f.get_tensor(name).double().reshape(-1) - base
    row = next(r for r in pool_int4.compression_report() if r["tensor"] == name and r["checkpoint"] == 0)
    e2 = d.square().sort(descending=True).values
    tail = e2.flip(0).cumsum(0).flip(0)  # tail[k] = energy dropped when the top k are kept
    allowed = (row["rel_error"] ** 2) * float(e2.sum())
    k = int((tail > allowed).sum())
    density = k / d.numel()
    return {"tensor": name, "int4 rel error": f"{row['rel_error']:.3g}", "top-k density for that error": density,
            "top-k bits/element (>=)": 24 * density, "int4 bits/element": 8 * row["bytes"] / d.numel()}


def speed(params: int, ns, rounds: int, tmp: str, device: str, backend: str):
    base_path, paths = make_files(tmp, max(ns), params)
    simd = os.environ.get("PYMERGE_SIMD", "")
    rows, errors, extra = [], [], {}
    model = Stack(params).to(device)
    for n in ns:
        pools, build_s = {}, {}
        modes = list(MODES)
        if device == "cpu" and compressed.pairs_pay() and backend in ("auto", "cpu"):
            modes.append(("int4 unpaired", "int4", None))  # the float path, for the pairing's own effect
        for label, mode, budget in modes:
            t = time.perf_counter()
            # unpaired: built as on a CPU without the AVX2 path (pool/compressed.py pairs_pay), then
            # merged on it like the others (PYMERGE_SIMD is read per kernel call)
            os.environ["PYMERGE_SIMD"] = "scalar" if label == "int4 unpaired" else simd
            try:
                pools[label] = CheckpointPool(paths[:n], base=base_path, compress=mode, error_budget=budget,
                                              device=device, backend=backend)
            finally:
                os.environ["PYMERGE_SIMD"] = simd
                if not simd:
                    del os.environ["PYMERGE_SIMD"]
            build_s[label] = time.perf_counter() - t
            print(f"N={n} {label}: {pools[label].describe()} (built in {build_s[label]:.1f} s)", flush=True)
        w = list(np.random.default_rng(n).dirichlet(np.ones(n)))
        moved = {label: _moved(p) for label, p in pools.items()}
        # the same-run bandwidth bar: a copy reading and writing as many bytes as the bf16 pool's materialize moves
        buf = torch.ones(2, moved["bf16"] // 2, dtype=torch.uint8, device=device)  # source and destination
        samples = {}
        times = time_interleaved({**{label: (lambda p=p: p.materialize(w, into=model)) for label, p in pools.items()},
                                  "copy": lambda: buf[1].copy_(buf[0])}, rounds, device, samples_out=samples)
        copy_gbs = buf.numel() / times["copy"] / 1e9  # read + written
        buf = None  # (up to a bf16 pool's size: freed before the next N's pools)
        if moved["bf16"] / times["bf16"] / 1e9 > 1.2 * copy_gbs:  # (torch's OpenMP copy stalls on busy cores)
            print(f"N={n}: the copy ran at {copy_gbs:.2f} GB/s, slower than the bf16 pool's merge: a busy machine, "
                  "whose x copy column does not hold", file=sys.stderr, flush=True)
        ref_bytes, ref_t = pools["bf16"].nbytes, times["bf16"]
        for label, p in pools.items():
            read = moved[label]
            per_round = sorted(b / x for b, x in zip(samples["bf16"], samples[label]))  # same round, same load
            rows.append({"N": n, "pool": label, "held MB": p.nbytes / 1e6, "x fewer bytes": ref_bytes / p.nbytes,
                         "ms per candidate": 1e3 * times[label], "x faster": ref_t / times[label],
                         "x faster per round (min / median / max)":
                             f"{per_round[0]:.2f} / {statistics.median(per_round):.2f} / {per_round[-1]:.2f}",
                         "MB read + written": read / 1e6,
                         "GB/s (read + write)": read / times[label] / 1e9,
                         "x copy": read / times[label] / 1e9 / copy_gbs, "copy GB/s": copy_gbs,
                         "build s": build_s[label], "formats": _mix(p)})
            if label != "bf16":
                err = merged_error(p, pools["bf16"], w, params, device)
                worst = max(p._compressed.checkpoint_errors())
                errors.append({"N": n, "pool": label, **{k: f"{v:.3g}" for k, v in
                                                         {"worst checkpoint delta error": worst, **err}.items()}})
        if n == max(ns):
            extra["topk"] = [topk_cost(pools["int4"], base_path, paths, nm) for nm in ("layers.0", "embed")]
        del pools
    return rows, errors, extra


def _moved(p) -> int:
    """What a linear materialize moves: the checkpoints (and, compressed, the base their deltas add to) read once,
    the output written once. An uncompressed pool holds its base but a linear merge never reads it: counting it
    overstated the bf16 rows' GB/s by 1/(N+1) (an audit)."""
    unread = sum(t.nbytes for t in p._base.values()) if p._compressed is None else 0
    return p.nbytes - unread + p.model_nbytes()


def _mix(pool) -> str:
    if pool._compressed is None:
        return "uncompressed"
    counts = {}
    for r in pool.compression_report():
        counts[r["format"]] = counts.get(r["format"], 0) + 1
    return " ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def speed_tables(args, params: int, rounds: int, suffix: str) -> None:
    tmp = tempfile.mkdtemp(prefix="bench_cpool_")
    try:
        rows, errors, extra = speed(params, args.n, rounds, tmp, args.device, args.backend)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    title = f"Delta-compressed pools, {params / 1e6:.0f}M-parameter bf16 fine-tunes, materialize into a live model"
    cols = ["N", "pool", "held MB", "x fewer bytes", "ms per candidate", "x faster",
            "x faster per round (min / median / max)", "MB read + written", "GB/s (read + write)", "x copy",
            "copy GB/s", "build s", "formats"]
    meta = {"n": args.n, "rounds": rounds, "statistic": "best round" if args.device == "cpu" else "median round",
            "backend": args.backend, "PYMERGE_SIMD": os.environ.get("PYMERGE_SIMD")}
    print(write_results("bench_compressed_pool" + suffix, args.device, rows, cols, title, meta=meta))
    print(write_results("bench_compressed_pool_error" + suffix, args.device, errors,
                        ["N", "pool", "worst checkpoint delta error", "vs merged delta", "vs merged weights"],
                        "Merged model's relative error against the uncompressed pool's merge (same weights)"))
    print(write_results("bench_compressed_pool_topk" + suffix, args.device, extra["topk"], list(extra["topk"][0]),
                        "A sparse top-k delta at int4's error (checkpoint 0): density needed and its cost"))


def _count(text: str) -> int:
    """--params: a number of parameters such as 4e6, at least 1 (0 silently ran the 40M default)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1e12:
        raise argparse.ArgumentTypeError(f"must be from 1 to 1e12, got {text}")
    return int(value)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4e6 parameters, 2 rounds (unless given)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: pools on the GPU, Triton kernels")
    ap.add_argument("--params", type=_count, default=None, help="default 40e6")
    ap.add_argument("--n", type=positive_int, nargs="+", default=[8, 16], help="pool sizes")
    ap.add_argument("--rounds", type=positive_int, default=None, help="default 5")
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "triton", "cuda"],
                    help="every pool's backend (auto: C++ on the CPU, Triton on CUDA)")
    args = ap.parse_args(argv)
    # refused here, as bench_pool's: they were tracebacks after the checkpoints were written (an audit)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available to this torch")
    if args.device == "cpu" and (args.backend == "cuda" or args.backend == "triton" and not kernels_interpreted()):
        ap.error(f"--backend {args.backend} runs on --device cuda (triton on the CPU: with TRITON_INTERPRET=1)")
    if args.device == "cuda" and args.backend == "cpu":
        ap.error("--backend cpu runs on --device cpu")
    # --quick picks the defaults only: an explicit --params/--rounds wins
    params = args.params or int(4e6 if args.quick else 40e6)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    torch.set_num_threads(2)
    speed_tables(args, params, rounds, ("_quick" if args.quick else "") + ("" if args.backend == "auto" else f"_{args.backend}"))

if __name__ == "__main__":
    main()
