"""A PNG beside every benchmark table: one chart per kind of result, drawn from the rows of its JSON.

Scripts that draw a figure of their own (bench_weighted_sum, bench_demo, bench_delta_decode, scaling_model)
keep it; every other table gets the chart CHARTS names for it (by the longest name prefix: weighted_sum_quick
is a weighted_sum), drawn when the script writes it (common.write_results, or plot_file after a script's own
JSON) and, for tables already on disk, by

    python benchmarks/charts.py                     # every results/*/*.json without a PNG
    python benchmarks/charts.py --force FILE.json   # redraw these
"""
import argparse
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

RESULTS = os.environ.get("PYMERGE_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Panel:
    """One axis: a bar per row for each column in `values` (grouped), on a log axis where `log`, with a line
    at `ref` (1.0 for a ratio to copy bandwidth or to a baseline)."""
    values: Tuple[str, ...]
    log: bool = False
    ref: Optional[float] = None


@dataclass(frozen=True)
class Chart:
    """Bars labelled by the `labels` columns of each row, one panel per Panel. rows(data) takes the rows out of
    a JSON that has no "rows" list (bench_merge's one dict per run)."""
    labels: Tuple[str, ...]
    panels: Tuple[Panel, ...]
    rows: Optional[Callable[[dict], List[dict]]] = None


def _merge_runs(data: dict) -> List[dict]:
    """bench_merge: every timed run of each tool (a best-of figure hides the spread); bench_merge_gpu: its input
    bandwidths beside the pinned host-to-device copy."""
    if isinstance(data.get("runs"), dict):
        return [{"tool": tool, "run": i + 1, **run} for tool, runs in data["runs"].items() for i, run in enumerate(runs)]
    return [{"tool": k, "GB/s": data[k]} for k in ("pinned_h2d_gbps", "safe_open_cuda_gbps", "pymerge_input_gbps")
            if k in data]


_SEEDS = Chart(("seed",), (Panel(("best_single", "uniform", "greedy_soup", "optimized")),))

CHARTS: Dict[str, Chart] = {
    "weighted_sum": Chart(("N", "elements", "impl"), (Panel(("x copy",), ref=1.0),)),
    "bench_pool": Chart(("what",), (Panel(("ms",), log=True),)),
    "bench_pool_grouped": Chart(("params", "tensors"), (Panel(("per-tensor / copy", "grouped / copy"), ref=1.0),)),
    "bench_pool_grouped_sweep": Chart(("params", "tensors"), (Panel(("native / copy", "materialize / copy"), ref=1.0),)),
    "bench_pool_grouped_methods": Chart(("params", "method"), (Panel(("per-tensor ms", "one call ms"), log=True),)),
    "bench_pool_grouped_quick_methods": Chart(("params", "method"), (Panel(("per-tensor ms", "one call ms"), log=True),)),
    "bench_pool_grouped_compressed": Chart(("params", "format"),
                                           (Panel(("per-tensor ms", "one call ms", "bf16 pool ms"), log=True),)),
    "bench_compressed_pool": Chart(("N", "pool"), (Panel(("x faster",), ref=1.0), Panel(("x fewer bytes",), ref=1.0),
                                                   Panel(("x copy",), ref=1.0))),
    "bench_compressed_pool_error": Chart(("N", "pool"), (Panel(("worst checkpoint delta error", "vs merged delta",
                                                                "vs merged weights"), log=True),)),
    "bench_compressed_pool_topk": Chart(("tensor",), (Panel(("top-k bits/element (>=)", "int4 bits/element")),)),
    "bench_compressed_pool_quality": Chart(("seed", "pool"), (Panel(("d test", "d @ref w")),)),
    "bench_compressed_pool_quality_diagnosis": Chart(("seed", "variant"), (Panel(("d @ref w",)),)),
    "bench_delta_decode": Chart(("elements", "threads", "path"), (Panel(("best ns",), log=True),)),
    "bench_tokenizer": Chart(("tool", "tokens"), (Panel(("wall_s", "cpu_s")), Panel(("peak_rss_mb", "peak_anon_mb")))),
    "demo_seeds": _SEEDS,
    "demo_selection_study": Chart(("seed",), (Panel(tuple(f"{k}.val" for k in ("soup", "best", "top3", "top5",
                                                                                "top10", "lastgen"))),)),
    "dist_pool": Chart(("ranks", "threads_per_rank", "method"), (Panel(("ms_per_candidate",)),
                                                                 Panel(("peak_rss_MB_per_rank",)))),
    "exact_sums": Chart(("statistic", "threads"), (Panel(("before ms", "old ms", "new ms"), log=True),)),
    "gpu_codegen": Chart(("kernel", "backend"), (Panel(("registers",)), Panel(("spill_bytes", "local_ops")))),
    "merge": Chart(("tool", "run"), (Panel(("wall_s",), log=True), Panel(("peak_rss_mb",)), Panel(("GB/s",))),
                   rows=_merge_runs),
    "methods": Chart(("method",), (Panel(("mergekit_s", "pymerge_s"), log=True),)),
    "methods_gpu": Chart(("method", "backend", "call"), (Panel(("x copy",), ref=1.0),)),
    "ab_weighted_sum": Chart(("N", "K", "elements"), (Panel(("other GB/s", "this GB/s", "copy GB/s")),)),
}


def chart_for(name: str) -> Optional[Chart]:
    """The chart of the longest CHARTS key that `name` is or starts with followed by '_'."""
    keys = [k for k in CHARTS if name == k or name.startswith(k + "_")]
    return CHARTS[max(keys, key=len)] if keys else None


def _value(row: dict, key: str) -> Optional[float]:
    """row[key] as a finite number ("a.b" looks into a nested dict); None for text such as '1.0-1.2'."""
    v = row.get(key)
    if v is None and "." in key:
        outer, inner = key.split(".", 1)
        v = row.get(outer, {}).get(inner) if isinstance(row.get(outer), dict) else None
    if isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _label(row: dict, key: str) -> str:
    """A row's label part: text as it is, a number with its column's name (N=8, seed=3)."""
    v = row[key]
    return v if isinstance(v, str) else f"{key}={v}"


def drawing(chart: Chart, rows: Sequence[dict], title: str) -> Optional[Callable[[str], None]]:
    """draw(path) for write_plot, or None where no panel has a number to draw."""
    rows = [r for r in rows if isinstance(r, dict)]
    panels = [p for p in chart.panels if any(_value(r, v) is not None for r in rows for v in p.values)]
    if not rows or not panels:
        return None

    def draw(path: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [" ".join(_label(r, k) for k in chart.labels if r.get(k) is not None) or str(i)
                  for i, r in enumerate(rows)]
        height = max(2.5, 0.28 * len(rows) * max(len(p.values) for p in panels) ** 0.5 + 1.2)
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), height), squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels):
            columns = [v for v in panel.values if any(_value(r, v) is not None for r in rows)]
            width = 0.8 / len(columns)
            for j, col in enumerate(columns):
                ys = [_value(r, col) for r in rows]
                pos = [i + (j - (len(columns) - 1) / 2) * width for i, y in enumerate(ys) if y is not None]
                vals = [y for y in ys if y is not None]
                if panel.log:  # a log axis has no place for 0 or below: such values are left out, not faked
                    kept = [(p, y) for p, y in zip(pos, vals) if y > 0]
                    pos, vals = [p for p, _ in kept], [y for _, y in kept]
                    # dots, not bars: a bar's length on a log axis depends on where the axis starts (1.24x apart
                    # was drawn 2.65x apart; a review)
                    ax.plot(vals, pos, "o", label=col)
                else:
                    ax.barh(pos, vals, width, label=col)
            if panel.log:
                ax.set_xscale("log")
                ax.grid(axis="x", which="both", lw=0.3)
            for x in [panel.ref] + ([0.0] if not panel.log and ax.get_xlim()[0] < 0 else []):
                if x is not None:
                    ax.axvline(x, color="k", lw=0.8, ls="--" if x == panel.ref else "-")
            ax.set_xlabel(", ".join(columns), fontsize=8)
            if len(columns) > 1:
                ax.legend(fontsize=7)
        axes[0][0].set_yticks(range(len(rows)), labels, fontsize=7)
        axes[0][0].invert_yaxis()  # the table's first row on top (the panels share the axis)
        fig.suptitle("\n".join(textwrap.fill(line, 110 * len(panels)) for line in title.splitlines()), fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=90, format="png", bbox_inches="tight")  # long row labels stay whole
        plt.close(fig)
    return draw


def plot_file(path: str) -> bool:
    """Draws <name>.png beside the result file <name>.json with the chart CHARTS has for name; False where there
    is none, the file holds no rows to draw or matplotlib is missing."""
    try:  # as the scripts import it (benchmarks/ on sys.path), or as a package module (tests)
        from common import has_matplotlib, write_plot
    except ImportError:
        from benchmarks.common import has_matplotlib, write_plot
    name = os.path.splitext(os.path.basename(path))[0]
    chart = chart_for(name)
    if chart is None:
        return False
    if not has_matplotlib():  # as write_results: an earlier run's plot beside this run's table is removed (an audit)
        png = os.path.splitext(path)[0] + ".png"
        print(f"(matplotlib is not installed or does not import: no {name}.png; pip install matplotlib)",
              file=sys.stderr)
        if os.path.exists(png):
            os.remove(png)
        return False
    with open(path) as f:
        data = json.load(f)
    rows = chart.rows(data) if chart.rows else data.get("rows", []) if isinstance(data, dict) else []
    meta = data.get("meta", {}) if isinstance(data, dict) and isinstance(data.get("meta"), dict) else {}
    info = data if isinstance(data, dict) else {}
    title = info.get("title") or meta.get("title") or (f"{name}: {info['models']} models, {info['dtype']} -> "
                                                        f"{info['out_dtype']}" if {"models", "dtype", "out_dtype"} <= set(info) else name)
    where = ", ".join(str(x) for x in (info.get("machine") or meta.get("machine") or meta.get("cpu"),
                                         info.get("date") or meta.get("date")) if x)
    draw = drawing(chart, rows, f"{title}\n{where}" if where else title)
    if draw is None:
        return False
    write_plot(os.path.splitext(path)[0] + ".png", draw)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draws the PNG of benchmark result files (JSON) that have none.")
    ap.add_argument("files", nargs="*", help="result JSON files (default: every one under benchmarks/results/)")
    ap.add_argument("--force", action="store_true", help="redraw PNGs that exist")
    args = ap.parse_args(argv)
    try:
        from common import has_matplotlib
    except ImportError:
        from benchmarks.common import has_matplotlib
    if not has_matplotlib():  # (plot_file would take every stored PNG for stale and remove it)
        ap.error("drawing needs matplotlib: pip install matplotlib")
    files = args.files or sorted(os.path.join(d, f) for d, _, fs in os.walk(RESULTS) for f in fs if f.endswith(".json"))
    drawn = 0
    for path in files:
        if not args.force and os.path.exists(os.path.splitext(path)[0] + ".png"):
            continue
        try:
            ok = plot_file(path)
        except (OSError, ValueError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 2
        drawn += ok
        print(f"{'drew' if ok else 'no chart for'} {path}")
    print(f"{drawn} PNG(s) drawn")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
