"""`pymerge bench`: the fused weighted sum against copy bandwidth on this machine (installed; no checkout).

    pymerge bench [--quick] [--device cpu|cuda] [--elements N] [--rounds 5] [--json]

For N = 2, 8 and 16 bf16 inputs (bf16 output, float32 accumulation) it times `dst.copy_(src)` over the
same bytes (the ceiling), eager PyTorch and pymerge, interleaved, best of `rounds` (median on the GPU).
GB/s counts bytes read + written; the ratio to copy is also given round by round (min-max), and a note
says when the copy's own times varied so much that the machine is too busy for the figures to hold. The full benchmark, with torch.compile and plots, is
benchmarks/bench_weighted_sum.py in the source tree.
"""
import argparse
import json
import statistics
import time

from pymerge.argparser import ArgumentParser
from pymerge.errors import first_line
from pymerge.progress import say
from pymerge.sizes import format_size


# Idle before each timed CPU call (here and in benchmarks/common.py): torch's OpenMP workers spin after a parallel
# region (libgomp: 300,000 iterations unless OMP_WAIT_POLICY says otherwise, milliseconds), and on a small machine
# they take the cores from whatever is timed next: pymerge's weighted sum right after torch.compile on 2 cores,
# 20.7 ms instead of 18.0 (N = 8 x 32M bfloat16), which read as 0.90x torch.compile.
CPU_SETTLE_S = 0.05


def _time(fns: dict, rounds: int, cuda: bool) -> tuple:
    """(seconds per function: best, median on the GPU; every round's seconds per function)."""
    import torch
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            if cuda:
                torch.cuda.synchronize()
            else:
                time.sleep(CPU_SETTLE_S)
            t = time.perf_counter()
            f()
            if cuda:
                torch.cuda.synchronize()
            samples[k].append(time.perf_counter() - t)
    pick = statistics.median if cuda else min
    return {k: pick(v) for k, v in samples.items()}, samples


def run(device: str, numel: int, rounds: int) -> list:
    import torch
    import pymerge
    rows = []
    for n in (2, 8, 16):
        xs = [torch.randn(numel, device=device).bfloat16() for _ in range(n)]
        w = [1.0 / n] * n
        out = torch.empty(numel, dtype=torch.bfloat16, device=device)
        # written: a never-written source reads the kernel's shared zero page, which overstated copy (an audit)
        src = torch.empty((n + 1) * numel // 2, dtype=torch.bfloat16, device=device).normal_()  # (no fp32 copy)
        dst = torch.empty_like(src)

        acc = torch.empty(numel, device=device)  # float32 buffers allocated once, as benchmarks/bench_weighted_sum.py's
        buf = torch.empty(numel, device=device)  # eager: allocating them per call made eager 4x slower (an audit)

        def eager():
            acc.zero_()
            for x, wi in zip(xs, w):
                buf.copy_(x)
                acc.add_(buf, alpha=wi)
            out.copy_(acc)

        secs, samples = _time({"copy": lambda: dst.copy_(src), "eager": eager,
                               "pymerge": lambda: pymerge.weighted_sum(xs, w, out=out)}, rounds, device == "cuda")
        moved = (n + 1) * numel * 2
        # the copy's own bytes: its (n + 1) * numel / 2 elements round down for an odd product
        gbs = {k: (2 * src.nbytes if k == "copy" else moved) / s / 1e9 for k, s in secs.items()}
        per_round = [(moved / p) / (2 * src.nbytes / c) for p, c in zip(samples["pymerge"], samples["copy"])]
        rows.append({"N": n, "elements": numel, **{f"{k} GB/s": v for k, v in gbs.items()},
                     "pymerge / copy": gbs["pymerge"] / gbs["copy"],
                     "per round": [min(per_round), max(per_round)],
                     "copy spread": max(samples["copy"]) / min(samples["copy"])})
        del xs, out, src, dst, acc, buf  # before the next N's inputs: one N's tensors at a time
    return rows


def peak_bytes(numel: int) -> int:
    """Memory run() holds at its peak (N = 16): the bf16 inputs and output, the copy's source and
    destination, eager's float32 accumulator and conversion buffer."""
    n = 16
    return numel * (2 * n + 2 + 2 * (n + 1) + 8)


def _available(device: str) -> int:
    from pymerge.sizes import free_memory
    return free_memory(device)


def _elements(text: str) -> int:
    """A count of elements, as 3e7 or 30000000 ('inf' raised OverflowError past argparse)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1 << 32:
        raise argparse.ArgumentTypeError(f"must be from 1 to {1 << 32}, got {text!r}")
    if value != int(value):  # 1.5 was taken as 1
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    return int(value)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="pymerge bench", description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--elements", type=_elements, default=None, metavar="N",
                    help="elements per input (default 8388608; 3e7 works)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5")
    ap.add_argument("--quick", action="store_true",
                    help="1M elements, 3 rounds (seconds); --elements or --rounds given win")
    ap.add_argument("--json", action="store_true",
                    help="print the rows as one JSON object, the only line on stdout (the table goes to stderr)")
    args = ap.parse_args(argv)
    quick = args.quick  # the defaults it changes; options given on the command line stay
    args.elements = args.elements if args.elements is not None else (1 << 20 if quick else 8 << 20)
    args.rounds = args.rounds if args.rounds is not None else (3 if quick else 5)
    if not 1 <= args.rounds <= 10**6:  # (99999999999 ran until killed)
        ap.error(f"--rounds must be from 1 to 1000000, got {args.rounds}")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():  # torch's AssertionError traceback before
        ap.error("--device cuda: CUDA is not available to this torch")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    need, free = peak_bytes(args.elements), _available(device)
    if need > free:  # Linux grants the allocations and kills the process when it touches them (a bug hunt)
        say(f"pymerge bench: error: --elements {args.elements} does not fit in memory (needs {format_size(need)}, "
            f"{format_size(free)} available on {device}); use fewer")
        return 2
    try:
        rows = run(device, args.elements, args.rounds)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # the inputs did not fit (--elements 1e9: 16 x 2 GB)
        if not isinstance(exc, torch.OutOfMemoryError) and "alloc" not in str(exc):
            raise
        first = first_line(exc)
        say(f"pymerge bench: error: --elements {args.elements} does not fit in memory ({first[:200]}); use fewer")
        return 2
    log = say if args.json else print  # --json: stdout holds the JSON alone (`| jq .` failed on the table)
    cols = [c for c in rows[0] if c != "copy spread"]
    pick = "median" if device == "cuda" else "best"
    rounds = f"{args.rounds} round{'s' if args.rounds != 1 else ''}"
    log(f"pymerge weighted sum on {device} (bf16 in/out, float32 accumulation, {pick} of {rounds}; "
        "per round: the ratio to copy in each round, lowest-highest)")
    log(" | ".join(cols))
    for r in rows:
        log(" | ".join("-".join(f"{v:.2f}" for v in r[c]) if isinstance(r[c], list) else
                       f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    busy = max(r.get("copy spread", 1.0) for r in rows)
    if busy > 1.5:  # torch's copy on OpenMP threads stalls when a core is taken: ratios of 0.1 or 19 (an audit)
        log(f"note: the copy's own time varied {busy:.2f}x between rounds: this machine is busy, and the ratios "
            "to copy do not hold; rerun on a quiet machine or with more --rounds")
    if args.json:
        print(json.dumps({"device": device, "rows": rows}))
    return 0


if __name__ == "__main__":  # python -m pymerge.bench (did nothing)
    import sys
    sys.exit(main())
