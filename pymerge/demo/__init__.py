"""`pymerge demo`: a miniature of "If You Can't Use Them, Recycle Them" on small language models.

A small Llama-layout decoder (model.py) is pretrained once on a mixture of four generative tasks
(tasks.py: addition, subtraction, string reversal, sorting; exact-match answers), then trained
further in runs that differ as the paper's do (train.py): by default nine runs, a generalist and seven
runs continued from it (four specialists, two hotter ones, a too-hot one) plus a too-hot run from the
pretrained model; `--pool mixtures` trains eleven runs of different data mixtures, objectives and hyperparameters
instead, two of them second stages. Each run is saved as a Hugging Face folder;
a CheckpointPool materializes candidate merges into a live model, greedy decoding scores them
(exact match), CMA-ES searches sum-to-one merge weights on the validation macro-average (from the greedy soup), and the
held-out test set scores every checkpoint, the uniform merge, the greedy soup and the optimized
merge (run.py). Nothing is downloaded; it needs only pymerge's own dependencies.

    pymerge demo [--quick] [--out demo_out] [--budget N] [--seed S] [--pool stages|mixtures] [--per-layer] [--threads N]
                 [--eval-dtype auto|bfloat16|float32] [--json]
"""
import json
import os

from pymerge.argparser import ArgumentParser
from pymerge.progress import say

__all__ = ["main"]


def main(argv=None) -> int:
    import torch
    from pymerge.demo.run import Settings, experiment
    from pymerge.demo.train import POOLS
    ap = ArgumentParser(prog="pymerge demo", description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter training, smaller evaluation sets and search (the CI form: its checkpoints barely "
                    "train; about a minute on 2 cores)")
    ap.add_argument("--out", default="demo_out", help="output folder, made with its parents if missing (default: demo_out/); "
                    "checkpoints there are reused when settings and code match")
    ap.add_argument("--budget", type=int, help="search candidates (default 120; 16 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help=f"the data, training and search seed, 0 to {2**28 - 1} "
                    "(default 0)")
    ap.add_argument("--per-layer", action="store_true", help="a weight per checkpoint and layer group")
    ap.add_argument("--pool", choices=sorted(POOLS), default="stages",
                    help="the checkpoints: stages (default: a generalist and runs continued from it) or mixtures "
                    "(runs of different data mixtures and hyperparameters from the pretrained model)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch threads (default: up to 2; use 1 on a busy machine)")
    ap.add_argument("--eval-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="the live model's dtype (auto: bfloat16 where the CPU multiplies it natively, else float32)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    args = ap.parse_args(argv)
    if args.budget is not None and not 1 <= args.budget <= 10**9:  # the search's bounds, checked before training
        ap.error(f"--budget must be from 1 to {10**9}, got {args.budget}")
    if not args.out:
        ap.error("--out must name a folder, got ''")
    # before training, not after it; below 2**28: the data streams are drawn from seed * 1000 + k modulo 2**31,
    # so seed s + 2**28 trained on the same examples as s (and s + 2**31 also scored on them)
    if not 0 <= args.seed <= 2**28 - 1:
        ap.error(f"--seed must be from 0 to {2**28 - 1}, got {args.seed}")
    if args.threads is not None and not 0 <= args.threads <= 1024:
        ap.error(f"--threads must be from 0 (the default) to 1024, got {args.threads}")
    threads = torch.get_num_threads()  # given back on every way out: a caller's own torch work (cli.main from
    try:                               # Python, a notebook) ran on --threads after the demo (an audit)
        torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
        log = say if args.json else print
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if args.threads and args.threads > cores:  # (99 on 2 cores ran 7x slower, without a word: an audit)
            say(f"pymerge demo: note: --threads {args.threads} is more than the {cores} cores this process may use: "
                "the threads share them and the run is slower (results differ with the thread count)")
        settings = Settings.quick(args.seed, args.pool) if args.quick else Settings(seed=args.seed, pool=args.pool)
        budget = args.budget or (16 if args.quick else 120)
        eval_dtype = None if args.eval_dtype == "auto" else getattr(torch, args.eval_dtype)
        summary = experiment(args.out, settings, budget=budget, per_layer=args.per_layer, log=log,
                             eval_dtype=eval_dtype)
        summary["quick"] = args.quick
        if args.json:
            print(json.dumps(summary))
        return 0
    finally:
        torch.set_num_threads(threads)
