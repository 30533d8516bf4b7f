"""The demo over several seeds: does the optimized merge beat the best single checkpoint (picked on
validation), the uniform merge and the greedy soup on test by more than the test set's standard error?

    python benchmarks/bench_demo.py [--seeds 0 1 2 3 4] [--pool stages|mixtures] [--quick] [--threads 1] [--jobs 2]
        [--out bench_demo_out] [--name demo_seeds_fresh]

Writes results/<machine>/demo_seeds{,_mixtures}{,_quick}.json and .md (or --name's) after every seed (a long run
that is stopped keeps the seeds it finished); over_0.01: checkpoints weighing more than 0.01 (the "nonzero" column
of tables written before 2026-12-05).
"""
import argparse
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import write_results  # noqa: E402
from pymerge.demo.run import BASELINES, Settings, experiment  # noqa: E402
from pymerge.demo.train import POOLS  # noqa: E402

COLUMNS = ["seed", "best_single", "uniform", "greedy_soup", "optimized", "se", "beats_all_by_se", "paired_se",
           "beats_all_by_paired_se", "over_0.01",
           "unseen_margin", "unseen_se", "unseen_beats_all_by_se", "train_seconds", "seconds", "cpu_seconds"]

TITLE = ("pymerge demo over seeds: macro exact match on test, % (se: standard error of the optimized "
         "merge's macro-average; paired_se: standard error of its margin over the strongest baseline, from the "
         "per-example differences; beats_all_by_paired_se: the margin over each baseline above that margin's "
         "paired standard error)")


def one_seed(job) -> dict:
    seed, quick, budget, threads, out, pool = job
    torch.set_num_threads(threads or min(2, torch.get_num_threads()))
    s = Settings.quick(seed, pool) if quick else Settings(seed=seed, pool=pool)
    budget = (16 if quick else 120) if budget is None else budget  # 0 became 120 (`budget or 120`)
    r = experiment(os.path.join(out, f"seed{seed}"), s, budget=budget,
                   log=lambda m: print(f"[seed {seed}] {m}", file=sys.stderr, flush=True))
    return row(seed, r)


def row(seed: int, r: dict) -> dict:
    """One table row from experiment()'s summary (train_seconds is ~0 where cached checkpoints were reused).
    se is the standard error of the optimized merge's macro-average (the issue's bar); paired_se that of its
    margin over the strongest baseline (the one it beats by least), from the per-example differences."""
    se, unseen = r["test_standard_error"], r["test_unseen"]
    margin = lambda s: min(s["optimized"] - s[k] for k in BASELINES)  # noqa: E731
    strongest = min(BASELINES, key=lambda k: r["optimized"] - r[k])
    pct = lambda x: round(100 * x, 2)  # noqa: E731  (percentage points: the table prints two decimals)
    paired = r["paired_standard_errors"]
    return {"seed": seed, "best_single": pct(r["best_single"]), "uniform": pct(r["uniform"]),
            "greedy_soup": pct(r["greedy_soup"]), "optimized": pct(r["optimized"]), "se": pct(se),
            "margin": pct(margin(r)), "beats_all_by_se": bool(margin(r) > se),
            "paired_se": pct(paired[strongest]),
            "beats_all_by_paired_se": all(r["optimized"] - r[k] > paired[k] for k in BASELINES),
            # on the test examples whose prompts validation lacks (run.unseen_in_validation)
            "unseen_margin": pct(margin(unseen)) if unseen else None,
            "unseen_se": pct(unseen["standard_error"]) if unseen else None,
            "unseen_beats_all_by_se": bool(margin(unseen) > unseen["standard_error"]) if unseen else None,
            "over_0.01": f"{r['weights_over_0_01']}/{r['checkpoints']}", "train_seconds": r["train_seconds"],
            "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "per_task": r["per_task"],
            "optimized_val": r["optimized_val"]}


def plot(rows, path) -> None:
    """Per seed, the margin over the strongest baseline with two error bars: the optimized merge's standard
    error (the issue's bar) and the margin's paired one (where the row has it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, m = np.arange(len(rows)), [r["margin"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4))
    ax.bar(x, m, 0.6, color=["C2" if r["beats_all_by_se"] else "C7" for r in rows])
    ax.errorbar(x - 0.1, m, yerr=[r["se"] for r in rows], fmt="none", ecolor="k", capsize=3,
                label="± se of the optimized merge's macro-average (green: margin above it)")
    paired = [i for i, r in enumerate(rows) if r.get("paired_se") is not None]
    if paired:
        ax.errorbar(x[paired] + 0.1, [m[i] for i in paired], yerr=[rows[i]["paired_se"] for i in paired], fmt="none",
                    ecolor="C3", capsize=3, label="± paired se of the margin")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [str(r["seed"]) for r in rows])
    ax.set_xlabel("seed")
    ax.set_ylabel("optimized - strongest baseline (points, test)")
    ax.set_title("pymerge demo: the optimized merge over its strongest baseline", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--quick", action="store_true", help="the --quick demo (plumbing only: tiny pool)")
    ap.add_argument("--pool", choices=sorted(POOLS), default="stages", help="the demo's --pool")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per seed")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    ap.add_argument("--out", default="bench_demo_out")
    ap.add_argument("--name", default=None, help="results file name (default demo_seeds[_POOL][_quick])")
    args = ap.parse_args(argv)
    # the demo's own bounds (pymerge/demo/__init__.py), checked here: a worker's error was a traceback, and a
    # seed out of range ran (the demo refuses it: its data streams would repeat another seed's)
    if args.budget is not None and not 1 <= args.budget <= 10**9:
        ap.error(f"--budget must be from 1 to {10**9}, got {args.budget}")
    if args.threads is not None and not 0 <= args.threads <= 1024:
        ap.error(f"--threads must be from 0 (the demo's default) to 1024, got {args.threads}")
    bad = [s for s in args.seeds if not 0 <= s <= 2**28 - 1]
    if bad:
        ap.error(f"--seeds must be from 0 to {2**28 - 1}, got {bad[0]}")
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:  # two workers would share one output folder (the second refused mid-run) and one row
        ap.error(f"--seeds names seed {repeated[0]} more than once")
    jobs = [(seed, args.quick, args.budget, args.threads, os.path.join(args.out, args.pool), args.pool)
            for seed in args.seeds]
    rows = []
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as workers:  # no idle workers
        for row in workers.imap(one_seed, jobs):
            rows.append(row)
            name = args.name or (
                "demo_seeds" + ("" if args.pool == "stages" else f"_{args.pool}") + ("_quick" if args.quick else ""))
            table = write_results(name, "cpu", rows, COLUMNS, title=TITLE, plot=lambda path: plot(rows, path))
            print(table, flush=True)
    wins = sum(r["beats_all_by_se"] for r in rows)
    print(f"optimized beats best single, uniform and greedy soup by > 1 s.e. on {wins} of {len(rows)} seeds; "
          f"mean margin over the strongest baseline {np.mean([r['margin'] for r in rows]):.2f} points; by more than "
          f"each margin's paired s.e. on {sum(r['beats_all_by_paired_se'] for r in rows)} of {len(rows)}")
    unseen = [r for r in rows if r["unseen_margin"] is not None]
    if unseen:
        print(f"on test prompts validation lacks: by > 1 s.e. on {sum(r['unseen_beats_all_by_se'] for r in unseen)} "
              f"of {len(unseen)} seeds; mean margin {np.mean([r['unseen_margin'] for r in unseen]):.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
