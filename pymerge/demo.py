"""`pymerge demo`: a miniature of "If You Can't Use Them, Recycle Them" that runs on a laptop CPU.

Eight checkpoints of a small MLP, trained from one shared pretrained start, each on its own limited
shard of the data with its own mixture of two tasks and its own settings (pymerge/demo_data.py), are
loaded into a CheckpointPool from .safetensors files; CMA-ES searches the merge weights on the validation split; the held-out test split then scores every checkpoint, the
uniform merge, a greedy soup and the optimized merge. Nothing is downloaded (sklearn ships the data).

    pymerge demo [--quick] [--out demo_out] [--budget N] [--seed S] [--per-layer] [--json]
"""
import argparse
import json
import os
import re
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from safetensors.torch import save_file

from pymerge.demo_data import MLP, TASKS, accuracy, load_splits, runs, train_pool
from pymerge.pool import CheckpointPool
from pymerge.search import optimize
from pymerge.search.report import macro_average


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def greedy_soup(pool, model, names: List[str], val_score) -> List[float]:
    """Wortsman et al.'s greedy soup, on validation: add checkpoints best-first while the average improves."""
    n = len(names)
    singles = []
    for i in range(n):
        pool.materialize(np.eye(n)[i], into=model)
        singles.append(val_score(model))
    order = np.argsort(singles)[::-1]
    chosen, best = [int(order[0])], singles[order[0]]
    for i in order[1:]:
        w = np.zeros(n)
        w[chosen + [int(i)]] = 1.0
        pool.materialize(w, into=model, normalize=True)
        s = val_score(model)
        if s >= best:
            chosen.append(int(i))
            best = s
    w = np.zeros(n)
    w[chosen] = 1.0 / len(chosen)
    return w.tolist()


def run(out: str, quick: bool = False, seed: int = 0, budget: int = None, per_layer: bool = False,
        log=print) -> Dict:
    t_start = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(out, exist_ok=True)
    splits = load_splits(seed)
    scale = 1.0  # --quick trains the same pool (a few seconds) and searches less
    budget = budget or (60 if quick else 200)
    log(f"training the pool: a shared start, then {len(runs(scale))} runs (scale {scale}) ...")
    _, trained = train_pool(splits, scale=scale, seed=seed)
    t_train = time.perf_counter() - t_start
    ckpt_dir = os.path.join(out, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    names, paths = list(trained), []
    for i, (name, m) in enumerate(trained.items()):
        paths.append(os.path.join(ckpt_dir, f"{i}-{_safe(name)}.safetensors"))
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, paths[-1])
    pool = CheckpointPool(paths)
    log(pool.describe())
    model = MLP()

    def val_scores(m):
        return accuracy(m, splits["val"])

    def test_of(weights, normalize=False) -> Dict[str, float]:
        pool.materialize(weights, into=model, normalize=normalize, groups="layer" if np.ndim(weights) == 2 else None)
        return accuracy(model, splits["test"])

    n = len(paths)
    results = {"checkpoints": {}}
    for i, name in enumerate(names):
        results["checkpoints"][name] = {"val": val_scores(trained[name]), "test": test_of(np.eye(n)[i])}
    uniform = np.full(n, 1.0 / n)
    pool.materialize(uniform, into=model)
    results["uniform"] = {"val": val_scores(model), "test": test_of(uniform), "weights": uniform.tolist()}
    soup_w = greedy_soup(pool, model, names, lambda m: macro_average(val_scores(m)))
    pool.materialize(soup_w, into=model)
    results["greedy_soup"] = {"val": val_scores(model), "test": test_of(soup_w), "weights": soup_w}

    log(f"searching {n}{' x layer groups' if per_layer else ''} merge weights with CMA-ES on the validation "
        f"split, {budget} evaluations ...")
    t0 = time.perf_counter()
    res = optimize(pool, val_scores, model=model, budget=budget, seed=seed, groups="layer" if per_layer else None,
                   log=log)
    t_search = time.perf_counter() - t0
    best_w = np.asarray(res.best_weights)
    results["optimized"] = {"val": res.best_scores, "test": test_of(best_w), "weights": best_w.tolist()}
    res.save(os.path.join(out, "search"), title="CMA-ES on validation (macro-average accuracy)",
             markers={nm: r["val"] for nm, r in results["checkpoints"].items()})

    summary = _summary(results, names)
    summary.update(train_seconds=round(t_train, 1), search_seconds=round(t_search, 1),
                   seconds=round(time.perf_counter() - t_start, 1), evaluations=len(res.history),
                   per_candidate_ms={"materialize": round(1e3 * np.mean([r["materialize_s"] for r in res.history]), 3),
                                     "evaluate": round(1e3 * np.mean([r["evaluate_s"] for r in res.history]), 3)},
                   quick=quick, seed=seed, out=out)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"summary": summary, "details": results}, fh, indent=1)
    _plot(os.path.join(out, "demo.png"), results, names)
    _print_table(results, names, summary, log)
    return summary


def _summary(results, names) -> Dict:
    test = {k: macro_average(v["test"]) for k, v in results["checkpoints"].items()}
    val = {k: macro_average(v["val"]) for k, v in results["checkpoints"].items()}
    chosen = max(names, key=lambda k: val[k])  # the single checkpoint one would pick without the test split
    s = {
        "best_single": test[chosen],
        "best_single_name": chosen,
        "best_single_in_hindsight": max(test.values()),
        "uniform": macro_average(results["uniform"]["test"]),
        "greedy_soup": macro_average(results["greedy_soup"]["test"]),
        "optimized": macro_average(results["optimized"]["test"]),
        "optimized_val": macro_average(results["optimized"]["val"]),
        "optimized_weights": results["optimized"]["weights"],
        "nonzero_weights": int(np.sum(np.asarray(results["optimized"]["weights"]) > 0.01)),
    }
    s["beats_uniform"] = s["optimized"] > s["uniform"]
    s["beats_best_single"] = s["optimized"] > s["best_single"]
    s["matches_best_single"] = s["optimized"] >= s["best_single"]
    return s


def _print_table(results, names, summary, log) -> None:
    log("")
    log(f"{'held-out test accuracy':34s} {TASKS[0]:>8s} {TASKS[1]:>8s} {'macro':>8s}   (val macro)")
    rows = [(nm, results["checkpoints"][nm]) for nm in names]
    rows += [("uniform merge", results["uniform"]), ("greedy soup", results["greedy_soup"]),
             ("optimized merge (CMA-ES)", results["optimized"])]
    for label, r in rows:
        t = r["test"]
        log(f"{label:34s} {t[TASKS[0]]:8.4f} {t[TASKS[1]]:8.4f} {macro_average(t):8.4f}   ({macro_average(r['val']):.4f})")
    log("")
    log(f"best single (picked on val: {summary['best_single_name']}) {summary['best_single']:.4f}; uniform "
        f"{summary['uniform']:.4f}; optimized {summary['optimized']:.4f}. Optimized "
        f"{'beats' if summary['beats_uniform'] else 'does NOT beat'} uniform and "
        f"{'beats' if summary['beats_best_single'] else 'ties' if summary['matches_best_single'] else 'does NOT match'} "
        f"the best single checkpoint; "
        f"{summary['nonzero_weights']} of {len(names)} checkpoints get weight > 0.01. "
        f"({summary['seconds']:.0f} s in all)")


def _plot(path: str, results, names) -> None:
    from pymerge.extras import require
    require("matplotlib", "plotting the search").use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    labels = names + ["uniform", "greedy soup", "optimized"]
    entries = [results["checkpoints"][nm] for nm in names] + [results["uniform"], results["greedy_soup"],
                                                               results["optimized"]]
    macro = [macro_average(e["test"]) for e in entries]
    colors = ["C0"] * len(names) + ["C1", "C2", "C3"]
    a1.barh(range(len(labels)), macro, color=colors)
    a1.set_yticks(range(len(labels)), labels, fontsize=8)
    a1.invert_yaxis()
    lo = min(macro)
    a1.set_xlim(max(0.0, lo - 0.05), 1.0)
    a1.set_xlabel("held-out test accuracy (macro-average of the two tasks)")
    for i, v in enumerate(macro):
        a1.text(v, i, f" {v:.3f}", va="center", fontsize=7)
    for label, e, c in zip(labels, entries, colors):
        a2.scatter(e["test"][TASKS[0]], e["test"][TASKS[1]], color=c, s=60 if c != "C0" else 30)
        a2.annotate(label, (e["test"][TASKS[0]], e["test"][TASKS[1]]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    a2.set_xlabel(f"test accuracy: {TASKS[0]}")
    a2.set_ylabel(f"test accuracy: {TASKS[1]}")
    a2.set_title("the two tasks trade off; merges combine them")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pymerge demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same pool, a shorter search (CI; well under a minute)")
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out/)")
    ap.add_argument("--budget", type=int, help="search evaluations (default 200; 60 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-layer", action="store_true", help="a weight per checkpoint and layer group")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    args = ap.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    summary = run(args.out, quick=args.quick, seed=args.seed, budget=args.budget, per_layer=args.per_layer, log=log)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
