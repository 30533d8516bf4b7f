"""End-to-end merge benchmark: `mergekit-yaml` 0.1.5 vs `pymerge merge` on the same files.

Generates (once, cached under --workdir) a base + 4 fine-tunes of a ~297M-parameter Llama in bf16,
2 shards each (~2.9 GB), writes one mergekit config (linear by default; --method ties etc. for
the other methods), runs each tool --repeats times on a warm page cache and records, per run:
wall time, peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled every 10 ms; mapped
checkpoint pages are file-backed and do not count). Prints a table and writes JSON + markdown
under benchmarks/results/<machine>/ (--results).

    .venv/bin/python benchmarks/bench_merge.py                 # linear
    .venv/bin/python benchmarks/bench_merge.py --method ties --param density=0.5
    .venv/bin/python benchmarks/bench_merge.py --method slerp       # base + ft1, t = 0.5
    .venv/bin/python benchmarks/bench_merge.py --method sce --param select_topk=0.5  # sce/karcher/ram*: global --param
    .venv/bin/python benchmarks/bench_merge.py --tools pymerge --repeats 3
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

N_FINETUNES = 4
BASE_METHODS = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher",
                "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
PAIR_METHODS = {"slerp": {"t": 0.5}, "nearswap": {"t": 1e-4}, "arcee_fusion": {}}  # base + ft1; global params
UNWEIGHTED = {"sce", "model_stock", "karcher", "ram", "ramplus_tl"}  # no per-model weight


def ensure_models(workdir: Path):
    """The base and fine-tunes, generated once; a marker file says the set is complete."""
    import torch
    import llama_factory as lf
    family = workdir / "models"
    marker = family / "COMPLETE"
    base, fts = family / "base", [family / f"ft{i}" for i in range(1, N_FINETUNES + 1)]
    if not marker.exists():
        shutil.rmtree(family, ignore_errors=True)
        print(f"generating base + {N_FINETUNES} fine-tunes of a {lf.BENCH_290M.n_params() / 1e6:.0f}M-parameter "
              f"Llama (bf16, 2 shards) under {family} ...", flush=True)
        t0 = time.perf_counter()
        lf.make_family(family, n_finetunes=N_FINETUNES, dims=lf.BENCH_290M, dtype=torch.bfloat16, shards=2)
        marker.write_text("ok\n")
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return base, fts


def write_config(path: Path, method: str, base: Path, fts, params: dict, dtype: str, out_dtype: str):
    import yaml
    if method in PAIR_METHODS:  # the base and one fine-tune
        cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(fts[0])}],
               "parameters": {**PAIR_METHODS[method], **params}, "dtype": dtype, "out_dtype": out_dtype}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return cfg
    n = len(fts)
    models = []
    for i, ft in enumerate(fts):
        p = {} if method in UNWEIGHTED else {"weight": round(1.0 / n + 0.05 * (i - (n - 1) / 2), 4), **params}
        models.append({"model": str(ft), "parameters": p} if p else {"model": str(ft)})
    cfg = {"merge_method": method, "models": models, "dtype": dtype, "out_dtype": out_dtype}
    if method in UNWEIGHTED and params:  # their parameters are global
        cfg["parameters"] = params
    if method in BASE_METHODS:
        cfg["base_model"] = str(base)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


class PeakSampler(threading.Thread):
    """Polls /proc/<pid>/status for VmHWM and the largest RssAnon seen (children included)."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_anon_kb = 0
        self.hwm_kb = 0
        self.stop = threading.Event()

    def _pids(self):
        pids = [self.pid]
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                kids = Path(f"/proc/{self.pid}/task/{tid}/children").read_text().split()
                pids += [int(k) for k in kids]
        except OSError:
            pass
        return pids

    def run(self):
        while not self.stop.is_set():
            anon = 0
            for pid in self._pids():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            anon += int(line.split()[1])
                        elif line.startswith("VmHWM:"):
                            self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
                except OSError:
                    pass
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            time.sleep(self.interval)


def run_tool(cmd, out: Path):
    shutil.rmtree(out, ignore_errors=True)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # MiB: /proc reports KiB (the keys keep their names, which the stored results use)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 2), "peak_rss_mb": round(sampler.hwm_kb / 1024, 1),
            "peak_anon_mb": round(sampler.peak_anon_kb / 1024, 1)}


def warm(paths):
    """Reads every file once so both tools start from a warm page cache."""
    for p in paths:
        for f in Path(p).iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def compare_outputs(a: Path, b: Path) -> dict:
    """Max relative difference (max|a-b| / max|b| per tensor) between the two outputs, in float32."""
    from safetensors import safe_open
    import torch

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = (str(f), k)
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return {"same_names": False}
    worst, flips, total, max_ulps = 0.0, 0, 0, 0.0
    for k in ta:
        with safe_open(ta[k][0], "pt") as ha, safe_open(tb[k][0], "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.dtype != y.dtype:
            return {"same_names": True, "same_dtypes": False, "tensor": k}
        eps = torch.finfo(y.dtype).eps
        x, y = x.double(), y.double()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item())
        # differences in units of the output format's rounding step at each value, over values
        # not lost to cancellation (|y| >= 1e-3 of the tensor's largest)
        big = y.abs() >= 1e-3 * y.abs().max()
        if bool(big.any()):
            max_ulps = max(max_ulps, ((x - y).abs()[big] / (eps * y.abs()[big])).max().item())
        flips += int((x != y).sum())
        total += y.numel()
    return {"same_names": True, "same_dtypes": True, "max_rel_diff_of_tensor_max": worst,
            "max_diff_in_rounding_steps": round(max_ulps, 3), "fraction_differing": flips / max(total, 1)}


def tools_option(ap: argparse.ArgumentParser, text: str) -> list:
    """--tools (this script's and bench_tokenizer's): comma-separated names, each mergekit or pymerge; an unknown
    one is a usage error (it was a KeyError after the models were made)."""
    tools = text.split(",")
    unknown = set(tools) - {"mergekit", "pymerge"}
    if unknown:
        ap.error(f"--tools: unknown tool {', '.join(sorted(unknown))}; known: mergekit, pymerge")
    return tools


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/pymerge-bench", type=Path)
    ap.add_argument("--method", default="linear")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="extra per-model parameter, e.g. density=0.5 (repeatable)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out-dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tools", default="mergekit,pymerge")
    ap.add_argument("--threads", type=int, default=None, help="pymerge --threads")
    ap.add_argument("--results", default=None, type=Path,
                    help="folder for the JSON and markdown (default: benchmarks/results/<this machine>/)")
    args = ap.parse_args(argv)
    if args.repeats < 1:  # 0 was a ValueError after the models were made
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    tools = tools_option(ap, args.tools)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")

    params = {}
    for kv in args.param:
        k, _, v = kv.partition("=")
        params[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v

    args.workdir.mkdir(parents=True, exist_ok=True)
    base, fts = ensure_models(args.workdir)
    cfg_path = args.workdir / f"{args.method}.yml"
    write_config(cfg_path, args.method, base, fts, params, args.dtype, args.out_dtype)
    inputs = ([base] if args.method in BASE_METHODS else []) + (fts[:1] if args.method in PAIR_METHODS else fts)
    input_bytes = sum(f.stat().st_size for p in inputs for f in p.glob("*.safetensors"))

    bin_dir = Path(sys.executable).parent
    cmds = {
        "mergekit": lambda out: [str(bin_dir / "mergekit-yaml"), str(cfg_path), str(out), "--quiet"],
        "pymerge": lambda out: [sys.executable, "-m", "pymerge", "merge", str(cfg_path), str(out), "--quiet",
                                "--force"] + (["--threads", str(args.threads)] if args.threads else []),
    }
    runs = {t: [] for t in tools}
    warm(inputs)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for rep in range(args.repeats):
        for tool in tools:
            r = run_tool(cmds[tool](args.workdir / f"out-{tool}"), args.workdir / f"out-{tool}")
            r["input_gb_per_s"] = round(input_bytes / r["wall_s"] / 1e9, 2)
            runs[tool].append(r)
            print(f"{tool:9s} run {rep + 1}: {r['wall_s']:7.2f} s (cpu {r['cpu_s']:6.2f} s)  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MiB  "
                  f"peak anon {r['peak_anon_mb']:7.0f} MiB  ({r['input_gb_per_s']} GB/s of input)", flush=True)

    best = {t: min(rs, key=lambda r: r["wall_s"]) for t, rs in runs.items()}
    from common import RESULTS, charts, machine_description, machine_label, result_name, write_atomic  # imports torch: after the timed runs
    machine = machine_description("cpu")
    if args.results is None:  # this machine's folder, as every other script's (it was cpu/ on any machine)
        args.results = Path(RESULTS) / machine_label("cpu")
    summary = {
        "method": args.method, "params": params, "dtype": args.dtype, "out_dtype": args.out_dtype,
        "models": len(inputs), "input_bytes": input_bytes, "machine": machine, "date": time.strftime("%Y-%m-%d"),
        "load_average_before": load_before, "runs": runs, "best": best,
    }
    if "mergekit" in best and "pymerge" in best:
        summary["speedup"] = round(best["mergekit"]["wall_s"] / best["pymerge"]["wall_s"], 2)
        summary["outputs"] = compare_outputs(args.workdir / "out-pymerge", args.workdir / "out-mergekit")

    what = (f"base + {len(inputs) - 1}" if args.method in BASE_METHODS else str(len(inputs))) + " fine-tune(s)"
    lines = [f"# {args.method}: {what}, 297M-param Llama, bf16, 2 shards "
             f"({input_bytes / 1e9:.2f} GB read); dtype {args.dtype}, out_dtype {args.out_dtype}",
             f"{machine}, {summary['date']}", "",
             "| tool | best wall (s) | its CPU time (s) | walls of all runs (s) | peak RSS (MiB) | peak anon (MiB) "
             "| GB/s of input |", "|---|---|---|---|---|---|---|"]
    for t, r in best.items():
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in runs[t])
        lines.append(f"| {t} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {walls} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_anon_mb']:.0f} | {r['input_gb_per_s']} |")
    if "speedup" in summary:
        how = "runs interleaved" if args.repeats > 1 else "one run each"
        lines += ["", f"pymerge is {summary['speedup']}x faster (best wall of {args.repeats}, {how}); "
                  f"load average before the runs: {load_before}; outputs: {json.dumps(summary['outputs'])}"]
    table = "\n".join(lines)
    print("\n" + table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = result_name(str(args.results), f"merge_{args.method}", machine)
    write_atomic(str(args.results / f"{stem}.json"), json.dumps(summary, indent=2))
    write_atomic(str(args.results / f"{stem}.md"), table)
    charts().plot_file(str(args.results / f"{stem}.json"))


if __name__ == "__main__":
    main()
