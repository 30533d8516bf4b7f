"""Per-tensor timing of every merge method (mergekit 0.1.5's whole registry): pymerge's fused kernels vs mergekit 0.1.5's own
merge-method functions on the same tensors (default: three 4096x4096 float32 models + base).

    .venv/bin/python benchmarks/bench_methods.py [--size 4096] [--models 3] [--dtype float32] [--repeat 3]

Prints a table and writes benchmarks/results/cpu/methods_<size>_<dtype>.{json,md} (with --only, a file of its
own: methods_<size>_<dtype>_only-<names>). For TIES it also times a
"search step": the same tensors merged again with new weights, thresholds from a SelectionCache
the caller owns and passes in (as the pool does; no op caches anything by itself).
"""
import argparse
import json
import os
import sys
import time

import torch

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

import pymerge.methods.model_stock  # noqa: F401  (registers)
from pymerge.bench import CPU_SETTLE_S
import pymerge.methods.passthrough  # noqa: F401
import pymerge.methods.slerp  # noqa: F401
import pymerge.methods.task_vectors as tv
from pymerge.methods.base import TensorTask, get_method
from pymerge.ops import task_vector_ops as tvo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (RESULTS, charts, load_average, machine_description, machine_label, positive_int, result_name,  # noqa: E402
                    spread, write_atomic)


def best_interleaved(fns, repeat, samples=None):
    """Best time of each fn over `repeat` rounds, the fns taking turns within a round (after one untimed call
    each), so that a machine's load drifting over the run weighs on every tool alike. samples, a list: each
    fn's time in every round is appended to it (a list per fn), for per-round ratios."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(repeat):
        order = list(range(len(fns)))[::-1 if r % 2 else 1]  # who goes first alternates
        for i in order:
            time.sleep(CPU_SETTLE_S)  # torch's spinning OpenMP workers (after mergekit's ops) left to stop first
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    if samples is not None:
        samples.extend(times)
    return [min(t) for t in times]


RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}  # their masks come from other generators


def cases(n_models):
    w = [round(0.3 + 0.2 * i, 2) for i in range(n_models)]
    d = [0.5] * n_models
    tvp = {"weight": w, "density": d}
    return [
        ("ties", tvp, {}),
        ("dare_ties", tvp, {}),
        ("dare_linear", tvp, {}),
        ("breadcrumbs", tvp, {}),
        ("breadcrumbs_ties", tvp, {}),
        ("della", tvp, {}),
        ("della_linear", tvp, {}),
        ("slerp", {"t": 0.3}, {"models": 1}),
        ("nuslerp", {"weight": w[:2]}, {"models": 2}),
        ("model_stock", {}, {}),
        ("passthrough", {"scale": [0.5]}, {"models": 1, "base": False}),
        ("multislerp", {"weight": w}, {}),
        ("karcher", {}, {"base": False, "base_as_input": True}),
        ("nearswap", {"t": 0.01}, {"models": 1}),
        ("arcee_fusion", {}, {"models": 1}),
        ("sce", {"select_topk": 0.5}, {}),
        ("ram", {}, {}),
        ("ramplus_tl", {}, {}),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=positive_int, default=4096)
    ap.add_argument("--models", type=positive_int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--out", default=os.path.join(RESULTS, machine_label("cpu")))
    args = ap.parse_args()
    known = [name for name, _, _ in cases(args.models)]
    unknown = sorted(set(filter(None, args.only.split(","))) - set(known))
    if unknown:  # an unknown name wrote an empty table, exit 0
        ap.error(f"--only: unknown method {', '.join(unknown)}; known: {', '.join(known)}")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    shape = (args.size, args.size)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(args.models)]
    only = set(filter(None, args.only.split(",")))
    rows = []
    for name, params, opts in cases(args.models):
        if only and name not in only:
            continue
        n = opts.get("models", args.models)
        use_base = opts.get("base", True)
        inputs = xs[:n] + ([base] if opts.get("base_as_input") else [])
        n = len(inputs)
        mk = registry.get(name)
        group = TensorGroup.from_tensors(([base] if use_base else []) + inputs, base_index=0 if use_base else None)
        mk_params = dict(params)
        per_model = [{k: v[i] for k, v in params.items() if isinstance(v, list)} for i in range(n)]
        glob = {k: v for k, v in params.items() if not isinstance(v, list)}
        out = torch.empty(shape, dtype=dtype)
        task = TensorTask(inputs=inputs, base=base if use_base else None, model_params=per_model, params=glob,
                          name="bench.weight", seed=1)
        method = get_method(name)
        results = {}

        def run_mergekit():
            results["mergekit"] = mk([group], parameters=mk_params)

        rounds = []
        t_mk, t_pm = best_interleaved([run_mergekit, lambda: method.merge_tensor(task, out)], args.repeat, rounds)
        per_round = spread([m / p for m, p in zip(*rounds)])  # the two tools' times in the same round
        ref = results["mergekit"]
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).to(out.dtype).float()  # a tuple of one tensor
        close = torch.isclose(out.float(), ref, rtol=1e-3, atol=1e-5)  # the same merge, not another one faster
        row = {"method": name, "mergekit_s": t_mk, "pymerge_s": t_pm, "speedup": t_mk / t_pm,
               "speedup_per_round": per_round, "mergekit_s_per_round": rounds[0], "pymerge_s_per_round": rounds[1],
               "agree": float(close.double().mean()) if name not in RANDOM else None}
        if isinstance(method, tv.TaskVectorMethod) and name in ("ties", "breadcrumbs_ties", "dare_ties"):
            # A search step: the same tensors again with new weights, thresholds from the caller's cache.
            cache = tvo.SelectionCache()
            warm = TensorTask(inputs=inputs, base=base, model_params=per_model, params=glob, name="bench.weight",
                              seed=1, cache=cache)
            method.merge_tensor(warm, out)
            step = TensorTask(inputs=inputs, base=base, model_params=[dict(p, weight=p["weight"] * 1.1) for p in per_model],
                              params=glob, name="bench.weight", seed=1, cache=cache)
            row["pymerge_cached_s"] = best_interleaved([lambda: method.merge_tensor(step, out)], args.repeat)[0]
        rows.append(row)
        extra = f"  cached {row['pymerge_cached_s'] * 1e3:8.1f} ms" if "pymerge_cached_s" in row else ""
        agree = "random masks" if row["agree"] is None else f"{100 * row['agree']:.2f} % agree"
        print(f"{name:17s} mergekit {t_mk * 1e3:9.1f} ms  pymerge {t_pm * 1e3:8.1f} ms  x{t_mk / t_pm:6.1f}  "
              f"{agree}{extra}", flush=True)

    meta = {"shape": list(shape), "models": args.models, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "cpu": machine_description("cpu"), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "repeat": args.repeat, "only": sorted(only), **load_average()}
    os.makedirs(args.out, exist_ok=True)
    tag = f"methods_{args.size}_{args.dtype}" + ("_only-" + "-".join(sorted(only)) if only else "")  # not the whole table's
    tag = result_name(args.out, tag, meta["cpu"])
    write_atomic(os.path.join(args.out, f"{tag}.json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Per-tensor merge, {args.models} models + base, {shape[0]}x{shape[1]} {args.dtype}, "
             f"{meta['threads']} threads, {meta['cpu']}, {meta['date']}; best of {args.repeat} "
             "rounds, the tools taking turns after a warm-up call each; speedup per round: mergekit's time over "
             "pymerge's in the same round, min-max; agree: elements within rtol 1e-3 of "
             "mergekit's (DARE/DELLA draw other random masks)\n",
             "| method | mergekit 0.1.5 | pymerge | speedup | speedup per round | agree | pymerge, cached thresholds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r['pymerge_cached_s'] * 1e3:.1f} ms" if "pymerge_cached_s" in r else ""
        a = "-" if r["agree"] is None else f"{100 * r['agree']:.2f} %"
        lines.append(f"| {r['method']} | {r['mergekit_s'] * 1e3:.1f} ms | {r['pymerge_s'] * 1e3:.1f} ms | "
                     f"{r['speedup']:.1f}x | {r['speedup_per_round']['min']:.1f}-{r['speedup_per_round']['max']:.1f}x | "
                     f"{a} | {c} |")
    write_atomic(os.path.join(args.out, f"{tag}.md"), "\n".join(lines) + "\n")
    charts().plot_file(os.path.join(args.out, f"{tag}.json"))


if __name__ == "__main__":
    main()
