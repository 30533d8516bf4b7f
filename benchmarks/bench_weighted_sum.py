"""Throughput of the fused weighted sum against the same-run ceilings and peers.

    python benchmarks/bench_weighted_sum.py [--device cpu|cuda] [--quick]

For each N (checkpoints) it times, on bf16 inputs with bf16 output and float32 accumulation:
copy (the ceiling: a device copy of the same bytes), PyTorch eager (buf.copy_(x); acc.add_(buf, alpha=w), the
float32 buffers allocated once),
torch.compile of the same loop (weights as a tensor), and pymerge's backends. GB/s counts bytes
read + written; ratios are to copy and to torch.compile from the same run. Writes JSON, a markdown
table and a PNG under benchmarks/results/<machine>/.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description, positive_int, spread, time_interleaved, write_results  # noqa: E402

import pymerge  # noqa: E402
from pymerge.ops.weighted_sum import sum_into  # noqa: E402

CASES = {  # (N, elements per checkpoint)
    "cpu": [(2, 32 << 20), (8, 32 << 20), (16, 8 << 20)],
    "cuda": [(2, 256 << 20), (8, 128 << 20), (16, 64 << 20)],
}


def eager(xs, w, out, acc, buf):
    """As a careful user writes it: a float32 accumulator and conversion buffer allocated once, each bf16 input
    converted into the buffer, then added. Allocating both per call made it 1.84x slower at 32M (an audit); a
    mixed-dtype acc.add_(x) is no faster than that (torch casts element by element: 2x slower than copy_ + add_,
    measured on the AVX2 EPYC, 2026-12-05)."""
    acc.zero_()
    for x, wi in zip(xs, w):
        buf.copy_(x)
        acc.add_(buf, alpha=wi)
    out.copy_(acc)


def _loop(xs, wt, out):
    """Into out, as every other peer: returning a new tensor made each call allocate (and, past glibc's 32 MB
    mmap threshold, page-fault) its output, which charged torch.compile ~2x at 32M elements (an audit)."""
    acc = xs[0].float() * wt[0]
    for i in range(1, len(xs)):
        acc = acc + xs[i].float() * wt[i]
    out.copy_(acc.to(torch.bfloat16))


def bench_case(n, numel, device, rounds, backends, threads=0):
    g = torch.Generator(device=device).manual_seed(n)
    xs = [torch.randn(numel, generator=g, device=device).bfloat16() for _ in range(n)]
    w = [1.0 / n] * n
    wt = torch.tensor(w, device=device)
    out = torch.empty(numel, dtype=torch.bfloat16, device=device)
    moved = (n + 1) * numel * 2
    src = torch.empty(moved // 4, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    compiled = torch.compile(_loop)
    acc, buf = (torch.empty(out.shape, dtype=torch.float32, device=device) for _ in range(2))
    fns = {
        "copy": lambda: dst.copy_(src),
        "eager": lambda: eager(xs, w, out, acc, buf),
        "torch.compile": lambda: compiled(xs, wt, out),
    }
    rows = [w] if device == "cpu" else wt.view(1, n)  # on the GPU: weights stay in device memory
    for b in backends:
        # threads: pymerge's own pool sizes itself from OMP_NUM_THREADS or the affinity mask, not from
        # torch.set_num_threads, so --threads must reach it too (else it alone ran on every core)
        fns[f"pymerge-{b}"] = (lambda b=b: sum_into(xs, rows, [out], backend=b, num_threads=threads))
    samples = {}
    secs = time_interleaved(fns, rounds, device, samples_out=samples)
    ref = torch.empty_like(out)
    compiled(xs, wt, ref)
    outs = {"eager": torch.empty_like(out)}
    eager(xs, w, outs["eager"], acc, buf)
    for b in backends:  # what was timed, each into its own output
        outs[f"pymerge-{b}"] = torch.empty_like(out)
        sum_into(xs, rows, [outs[f"pymerge-{b}"]], backend=b, num_threads=threads)
    for k, o in outs.items():  # float32 sums in other orders: within one bfloat16 rounding
        assert torch.allclose(o.float(), ref.float(), rtol=1e-2, atol=1e-2), f"{k} disagrees with torch.compile"
    gbs = {k: (2 * src.numel() * 2 if k == "copy" else moved) / s / 1e9 for k, s in secs.items()}
    rows = []
    copied = 2 * src.numel() * 2
    for k in fns:  # per round: this one's rate over copy's (torch.compile's) in the same round
        per_round = spread([(moved / t) / (copied / c) if k != "copy" else 1.0
                            for c, t in zip(samples["copy"], samples[k])])
        vs_compile = spread([tc / t for tc, t in zip(samples["torch.compile"], samples[k])])  # (the same bytes)
        rows.append({"N": n, "elements": numel, "impl": k, "ms": secs[k] * 1e3, "GB/s": gbs[k],
                     "x copy": gbs[k] / gbs["copy"], "x compile": gbs[k] / gbs["torch.compile"],
                     "x copy per round": f"{per_round['min']:.2f}-{per_round['max']:.2f}",
                     "x compile per round": f"{vs_compile['min']:.2f}-{vs_compile['max']:.2f}",
                     "ms per round": [1e3 * t for t in samples[k]]})
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ns = sorted({r["N"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ys = [next((r["GB/s"] for r in rows if r["N"] == n and r["impl"] == impl), 0) for n in ns]
        ax.bar([i + j * width for i in range(len(ns))], ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ns))], [f"N={n}" for n in ns])
    ax.set_ylabel("GB/s (read + written)")
    ax.set_title("weighted sum, bf16 in/out, fp32 accumulation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds (results: weighted_sum_quick.*)")
    ap.add_argument("--rounds", type=positive_int, default=None)
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads of torch and pymerge (default: all cores)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available to this torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    backends = ["cpu"] if device == "cpu" else ["triton", "cuda"]
    if device == "cuda" and pymerge._native.cuda is None:
        backends = ["triton"]
    cases = CASES[device]
    if args.quick:
        cases = [(n, p // 8) for n, p in cases]
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else (10 if device == "cpu" else 30))
    rows = []
    for n, numel in cases:
        rows += bench_case(n, numel, device, rounds, backends, threads=args.threads or 0)
    title = "Fused weighted sum (bf16 in/out, fp32 accumulation)"
    # the quick form's own name: it replaced the full table the README quotes (an audit)
    table = write_results("weighted_sum_quick" if args.quick else "weighted_sum", device, rows,
                          ["N", "elements", "impl", "ms", "GB/s", "x copy", "x copy per round", "x compile",
                           "x compile per round"],
                          title, plot=lambda p: plot(rows, p),
                          meta={"rounds": rounds, "quick": args.quick, "threads": args.threads or torch.get_num_threads(),
                                "statistic": "median" if device == "cuda" else "best"})
    print(f"{title} on {machine_description(device)}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
