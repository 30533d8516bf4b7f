"""The demo's search on delta-compressed pools (issue 11's quality figure): held-out scores against the
uncompressed search, and the merged model's relative error per format.

Per seed, the demo's checkpoints are trained once (cached under --cache; the demo reuses a folder
while its settings and code match) and held in an uncompressed pool and in int8, int4 and auto pools
(base: the demo's shared pretrained checkpoint). The demo's settings are those the README's table was
measured with (`--pool mixtures`, 400 validation and 1500 test examples per task, sigma0 0.2: the demo's
defaults until 2026-12-03). On each pool the demo's search runs as `pymerge demo` ran it then: every
checkpoint and the greedy soup scored on validation, CMA-ES from the soup with the same
seed and budget; its best merge is scored on the held-out test set. Two columns isolate compression
from the search's trajectory (which diverges at the first candidate that scores differently): the
uncompressed search's best weights scored on every pool, and the float32 merge of those weights on
every pool against the uncompressed one (relative error of the merged weights and of the merged delta,
merge - base). An auto pool that chose exactly what an earlier pool holds is that pool (not searched
again). Per pool, the tensors that carry most of the merged model's error are kept in the JSON.

The diagnosis table, at the uncompressed search's weights on test: the uncompressed merge in a float32
live model (what the demo's bfloat16 live model's rounding alone moves), auto pools at tighter budgets
(--sweep), and int4 with one kind of tensor (q_proj, mlp.up_proj, ... over all layers) kept exact.

    python benchmarks/bench_compressed_pool_quality.py [--seeds 0 1 2] [--jobs 3] [--budget 120]
        [--auto-budgets 0.01 0.15] [--sweep 0.12 0.1 0.05] [--quick] [--cache /tmp/pymerge_compressed_quality]

Scores are macro exact match in percent; "se" is the test standard error of the uncompressed search's
macro score (a paired difference on the same test set is far less noisy). Writes
results/cpu/bench_compressed_pool_quality{,_quick}{,_diagnosis}.{json,md} after every seed; the demo
is used only through pymerge.demo.run's public functions.
"""
import argparse
import math
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from pymerge.demo.run import Settings, build_checkpoints, eval_sets, evaluation, greedy_soup  # noqa: E402
from pymerge.demo.tasks import score  # noqa: E402
from pymerge.pool import CheckpointPool  # noqa: E402
from pymerge.search import macro_average, optimize  # noqa: E402

TOLERANCE = 0.2  # points of held-out macro score: the goal for int4 and auto
COLUMNS = ["seed", "pool", "held KB", "formats", "val", "test", "d test", "test @ref w", "d @ref w",
           "err merged delta", "err merged w", "se"]
DIAGNOSIS_COLUMNS = ["seed", "variant", "held KB", "d @ref w", "err merged delta", "err merged w"]


def pct(x: float) -> float:
    """Percentage points, two decimals (+ 0.0: no "-0.00" in the tables)."""
    return round(100 * x, 2) + 0.0


def pool_kinds(auto_budgets: List[float]):
    """(label, compress, error_budget) per pool; the uncompressed pool comes first (the reference)."""
    return ([("uncompressed", None, None), ("int8", "int8", None), ("int4", "int4", None)]
            + [(f"auto {b:g}", "auto", b) for b in auto_budgets])


def demo_search(pool, model, evaluate, budget: int, seed: int):
    """`pymerge demo`'s search: the greedy soup from the single checkpoints' validation scores, then
    CMA-ES started at the soup's checkpoints (0.5 each, the rest 0), as pymerge.demo.run.experiment does."""
    n = pool.num_checkpoints
    singles = []
    for i in range(n):
        pool.materialize(np.eye(n)[i], into=model)
        singles.append(macro_average(evaluate(model)))
    soup = greedy_soup(pool, model, evaluate, singles)
    return optimize(pool, evaluate, model=model, budget=budget, seed=seed, x0=np.where(soup > 0, 0.5, 0.0), log=None)


def standard_error(scores: Dict[str, float], sizes: Dict[str, int]) -> float:
    """Of a macro-average of per-task accuracies (independent binomial tasks)."""
    return math.sqrt(sum(p * (1 - p) / sizes[t] for t, p in scores.items())) / len(scores)


def formats_of(pool) -> str:
    counts: Dict[str, int] = {}
    for r in pool.compression_report():
        counts[r["format"]] = counts.get(r["format"], 0) + 1
    return " ".join(f"{c} {f}" for f, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def merged_error(state: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor]) -> dict:
    """The merge's relative error against the uncompressed merge (float64 sums), of the weights and of
    the merged delta (ref - base; the weights sum to one), and each tensor's share of the squared error."""
    err2 = {k: float((state[k].double() - ref[k].double()).square().sum()) for k in ref}
    w2 = sum(float(ref[k].double().square().sum()) for k in ref)
    d2 = {k: float((ref[k].double() - base[k].double()).square().sum()) for k in ref}
    total = sum(err2.values())
    worst = sorted(ref, key=lambda k: -err2[k])[:5]
    return {"vs_weights": math.sqrt(total / w2), "vs_delta": math.sqrt(total / sum(d2.values())),
            "worst_tensors": [{"tensor": k, "share_of_error2": err2[k] / total if total else 0.0,
                               "rel_error_of_delta": math.sqrt(err2[k] / d2[k]) if d2[k] else 0.0} for k in worst]}


def one_seed(seed: int, args):
    """This seed's rows (one per pool) and its diagnosis rows."""
    # The demo's settings when the README's table was measured (before 2026-12-03: the "mixtures" pool,
    # validation 400 and test 1500 examples per task, CMA-ES's default step), so that it reproduces; --quick:
    # the demo's own --quick (a cache of `pymerge demo --quick`'s checkpoints is reused)
    s = Settings.quick(seed) if args.quick else Settings(seed=seed, val_size=400, test_size=1500, pool="mixtures")
    budget = args.budget or (6 if args.quick else 120)
    folder = os.path.join(args.cache, ("quick-" if args.quick else "") + f"seed{seed}")
    log = lambda m: print(f"[seed {seed}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    paths = build_checkpoints(folder, s, log=log)
    log(f"checkpoints ready ({len(paths)})")
    base_path = os.path.join(folder, "pretrained")
    val, test = eval_sets(s, "val"), eval_sets(s, "test")
    # the live model in bfloat16 on every CPU (the demo picks float32 where bf16 is emulated): the
    # last table measures what that rounding alone moves
    ref_pool, model, on_val = evaluation(paths, val, dtype=torch.bfloat16)
    on_test = lambda m: score(m, test)  # noqa: E731
    sizes = {t: len(b) for t, b in test.items()}

    # float32 merges for the error columns; the base through a one-checkpoint pool
    f32_ref, f32 = (evaluation([base_path], {}, dtype=torch.float32)[1] for _ in range(2))
    CheckpointPool([base_path]).materialize([1.0], into=f32_ref)
    base = {k: v.clone() for k, v in f32_ref.state_dict().items()}

    rows, ref, searched, merges = [], None, {}, {}
    for label, compress, budget_err in pool_kinds(args.auto_budgets):
        t0 = time.perf_counter()
        pool = ref_pool if compress is None else CheckpointPool(paths, base=base_path, compress=compress,
                                                                 error_budget=budget_err)
        choice = None if compress is None else tuple(r["format"] for r in pool.compression_report())
        same = searched.get(choice) if choice is not None else None
        if same is not None:  # auto chose what an earlier pool holds (same codes): the same search, not rerun
            rows.append({**same, "pool": label, "compress": compress, "error_budget": budget_err,
                         "same as": same["pool"]})
            log(f"{label}: the same formats as {same['pool']} everywhere (not searched again)")
            continue
        res = demo_search(pool, model, on_val, budget, seed)
        pool.materialize(res.best_weights, into=model)
        test_scores = on_test(model)
        if ref is None:  # the uncompressed search: its weights and merge are the reference
            ref = {"weights": res.best_weights, "test": macro_average(test_scores),
                   "se": standard_error(test_scores, sizes)}
            ref_pool.materialize(ref["weights"], into=f32_ref)
            ref["state"] = {k: v.clone() for k, v in f32_ref.state_dict().items()}
        pool.materialize(ref["weights"], into=model)
        at_ref = macro_average(on_test(model))
        pool.materialize(ref["weights"], into=f32)
        merges[label] = {k: v.clone() for k, v in f32.state_dict().items()}
        err = merged_error(merges[label], ref["state"], base)
        row = {"seed": seed, "pool": label, "compress": compress, "error_budget": budget_err,
               "held KB": round(pool.nbytes / 1e3, 1), "formats": "-" if compress is None else formats_of(pool),
               "val": pct(res.best_objective), "test": pct(macro_average(test_scores)),
               "d test": pct(macro_average(test_scores) - ref["test"]), "test @ref w": pct(at_ref),
               "d @ref w": pct(at_ref - ref["test"]), "err merged delta": f"{err['vs_delta']:.2e}",
               "err merged w": f"{err['vs_weights']:.2e}", "se": pct(ref["se"]),
               "test_per_task": test_scores, "best_weights": np.asarray(res.best_weights).tolist(),
               "worst_tensors": err["worst_tensors"], "evaluations": len(res.history),
               "seconds": round(time.perf_counter() - t0, 1)}
        searched[choice] = row
        log(f"{label}: test {row['test']} ({row['d test']:+.2f}), at the uncompressed weights {row['test @ref w']} "
            f"({row['d @ref w']:+.2f}), merged delta error {row['err merged delta']} ({row['seconds']} s)")
        rows.append(row)
    diagnosis = diagnose(seed, paths, base_path, ref, base, merges["int4"], model, f32, on_test, args.sweep)
    return rows, diagnosis


def kind_of(name: str) -> str:
    """A tensor's kind across layers: 'model.layers.3.mlp.up_proj.weight' -> 'mlp.up_proj'."""
    parts = [p for p in name.split(".") if not p.isdigit() and p not in ("model", "layers", "weight", "bias")]
    return ".".join(parts) or name


def diagnose(seed, paths, base_path, ref, base, int4_merge, model, f32, on_test, sweep) -> List[dict]:
    """At the uncompressed search's weights, on test: what bfloat16 rounding of the live model alone does
    (a perturbation the demo accepts), auto pools at tighter budgets, and int4 with one kind of tensor
    kept exact (simulated: that kind's merge taken from the uncompressed pool; bytes: the pool's
    exact format, the checkpoint's tensor as held, instead of int4)."""
    def scored(state) -> float:
        model.load_state_dict(state)  # rounds to the live model's bfloat16, as materialize does
        return macro_average(on_test(model))

    live = next(model.parameters()).dtype
    exact = scored(ref["state"])
    out = []
    f32.load_state_dict(ref["state"])
    rows = [("uncompressed, float32 live model (bf16 rounding's own effect)", None, macro_average(on_test(f32)),
             merged_error({k: v.to(live).float() for k, v in ref["state"].items()}, ref["state"], base))]
    for b in sweep:
        pool = CheckpointPool(paths, base=base_path, compress="auto", error_budget=b)
        pool.materialize(ref["weights"], into=f32)
        state = {k: v.clone() for k, v in f32.state_dict().items()}
        rows.append((f"auto {b:g} ({formats_of(pool)})", pool.nbytes, scored(state),
                     merged_error(state, ref["state"], base)))
    int4 = CheckpointPool(paths, base=base_path, compress="int4")
    report = int4.compression_report()
    rows.append(("int4", int4.nbytes, scored(int4_merge), merged_error(int4_merge, ref["state"], base)))
    for kind in dict.fromkeys(kind_of(k) for k in ref["state"]):
        state = {k: (ref["state"][k] if kind_of(k) == kind else v) for k, v in int4_merge.items()}
        extra = sum(r["numel"] * ref["state"][r["tensor"]].element_size() - r["bytes"] for r in report
                    if kind_of(r["tensor"]) == kind and r["format"] == "int4")
        rows.append((f"int4, {kind} exact", int4.nbytes + extra, scored(state),
                     merged_error(state, ref["state"], base)))
    for label, nbytes, score, err in rows:
        out.append({"seed": seed, "variant": label, "held KB": "-" if nbytes is None else round(nbytes / 1e3, 1),
                    "d @ref w": pct(score - exact), "err merged delta": f"{err['vs_delta']:.2e}",
                    "err merged w": f"{err['vs_weights']:.2e}"})
    return out


def means(rows: List[dict]) -> List[dict]:
    """Per pool over seeds: mean and worst differences, and whether every seed is within TOLERANCE."""
    mean2 = lambda xs: round(float(np.mean(xs)), 2) + 0.0  # noqa: E731
    out = []
    for label in dict.fromkeys(r["pool"] for r in rows):
        rs = [r for r in rows if r["pool"] == label]
        d, d_ref = [r["d test"] for r in rs], [r["d @ref w"] for r in rs]
        out.append({"seed": f"mean of {len(rs)}", "pool": label, "held KB": rs[0]["held KB"],
                    "formats": rs[0]["formats"] if len({r["formats"] for r in rs}) == 1 else "varies",
                    "val": mean2([r["val"] for r in rs]),
                    "test": mean2([r["test"] for r in rs]), "d test": mean2(d),
                    "test @ref w": mean2([r["test @ref w"] for r in rs]),
                    "d @ref w": mean2(d_ref),
                    "err merged delta": f"{np.mean([float(r['err merged delta']) for r in rs]):.2e}",
                    "err merged w": f"{np.mean([float(r['err merged w']) for r in rs]):.2e}",
                    "se": mean2([r["se"] for r in rs]),
                    "worst |d test|": max(abs(x) for x in d), "worst |d @ref w|": max(abs(x) for x in d_ref),
                    "search within tolerance": all(abs(x) <= TOLERANCE for x in d),
                    "weights within tolerance": all(abs(x) <= TOLERANCE for x in d_ref)})
    return out


def run_seed(job):
    seed, args = job
    torch.set_num_threads(args.threads)
    return one_seed(seed, args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=None,
                    help="search candidates (default 120, as the demo; 6 with --quick)")
    ap.add_argument("--auto-budgets", type=float, nargs="+", default=[1e-2, 0.15],
                    help="error_budget of each auto pool searched (default: 0.01, the pool's default, and 0.15)")
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.12, 0.1, 0.05],
                    help="error_budgets of auto pools scored at the uncompressed search's weights (diagnosis)")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick settings, first seed only (CI plumbing)")
    ap.add_argument("--cache", default=os.path.join("/tmp", "pymerge_compressed_quality"),
                    help="trained checkpoints per seed (reused while the demo's settings and code match)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per seed (default 1: the machine is shared)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    args = ap.parse_args(argv)
    if args.budget is not None and args.budget < 1:
        ap.error("--budget must be at least 1")
    if any(not b > 0 for b in args.auto_budgets + args.sweep):
        ap.error("error budgets must be > 0")
    name = "bench_compressed_pool_quality" + ("_quick" if args.quick else "")
    title = (f"The demo's search on compressed pools: macro exact match on test, % (d: minus the uncompressed "
             f"search's; @ref w: the uncompressed search's best weights on this pool; goal |d| <= {TOLERANCE})")
    seeds = args.seeds[:1] if args.quick else args.seeds
    rows, diagnosis = [], []
    jobs = [(seed, args) for seed in seeds]
    if args.jobs > 1:
        import multiprocessing
        workers = multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs)))
        results = workers.imap(run_seed, jobs)
    else:
        workers, results = None, map(run_seed, jobs)
    try:
        for seed_rows, seed_diagnosis in results:  # results written after every seed
            rows += seed_rows
            diagnosis += seed_diagnosis
            table = write_results(name, "cpu", rows + means(rows), COLUMNS, title=title)
            diag = write_results(name + "_diagnosis", "cpu", diagnosis, DIAGNOSIS_COLUMNS,
                                 title="At the uncompressed search's weights: test macro % minus the uncompressed "
                                       "merge's, tighter auto budgets and int4 with one kind of tensor exact")
    finally:
        if workers is not None:
            workers.close()
    print(table)
    print(diag)
    for m in means(rows)[1:]:
        print(f"{m['pool']}: search within {TOLERANCE} points on every seed: {m['search within tolerance']} "
              f"(worst {m['worst |d test|']:.2f}); uncompressed weights within: {m['weights within tolerance']} "
              f"(worst {m['worst |d @ref w|']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
