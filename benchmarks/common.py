"""Shared benchmark plumbing: timers, machine labels, option types and result files (JSON, markdown, PNG)."""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from pymerge.bench import CPU_SETTLE_S  # the idle before each timed CPU call (why: pymerge/bench.py)

# PYMERGE_BENCH_RESULTS redirects every table (gpu_check.sh collects a run's results in its own folder).
RESULTS = os.environ.get("PYMERGE_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_label(device: str) -> str:
    """Folder name for results: the GPU's name (e.g. 'nvidia-h200'), 'cpu' (a CPU with AVX-512, where
    the first tables were measured), or 'cpu-avx2' / 'cpu-scalar' (the CPU's own best SIMD path), with
    '-as-avx2' / '-as-scalar' where PYMERGE_SIMD forces a narrower one."""
    if device == "cuda":
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    from pymerge import _native
    if _native.cpu is None:
        return "cpu-scalar"
    level = _native.cpu.simd_level()  # the path taken (PYMERGE_SIMD may force a narrower one)
    forced = os.environ.pop("PYMERGE_SIMD", None)
    try:
        own = _native.cpu.simd_level()  # the CPU's own (the kernels read the variable per call)
    finally:
        if forced is not None:
            os.environ["PYMERGE_SIMD"] = forced
    folder = "cpu" if own == "avx512" else f"cpu-{own}"
    # a path forced narrower is not the CPU of that folder (an AVX-512 run as avx2 went into cpu-avx2/, the
    # AVX2-only machine's tables)
    return folder if level == own else f"{folder}-as-{level}"


def machine_description(device: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The GPU, or the CPU's model name, core count and (x86) family/model/stepping: a virtual machine's model
    name can be a bare "AMD EPYC" for a Zen 1 at 2 GHz and for a Zen 3, whose float32 work per cycle differs 2x."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    info = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or "cpu"
    ids = [f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if info.get(k)]
    family = f", {' '.join(ids).replace('cpu family', 'family')}" if ids else ""
    return f"{cpu}, {os.cpu_count()} cores{family}, torch {torch.__version__}"


def time_interleaved(fns: dict, rounds: int, device: str, calls_per_sample: int = 5, samples_out=None,
                     settle_s: float = CPU_SETTLE_S) -> dict:
    """Seconds per call for each function: median on the GPU (events), best on the noisy CPU; every
    round's sample goes into samples_out[name] when a dict is given (for per-round ratios).

    Rounds alternate between the functions so drifting machine load hits them all alike. On the
    GPU each sample spans several back-to-back calls, so host overhead between launches hides
    behind queued work the way it does in a real loop. On the CPU each call starts after settle_s
    of idle (see CPU_SETTLE_S), so no function is timed against another's spinning threads.
    """
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm up (compilation, page faults)
    for _ in range(rounds):
        for name, f in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls_per_sample):
                    f()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / calls_per_sample)
            else:
                time.sleep(settle_s)
                t = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t)
    if samples_out is not None:
        samples_out.update(samples)
    pick = statistics.median if device == "cuda" else min
    return {k: pick(v) for k, v in samples.items()}


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:  # missing, or installed but broken: no PNG either way, as before
        return False


def write_results(name: str, device: str, rows: list, columns: list, title: str, plot=None, meta=None,
                  per_machine: bool = True) -> str:
    """Writes <name>.json and <name>.md (and <name>.png via plot(path), or else the chart charts.py keeps for
    that kind of table, where matplotlib is installed) under results/<machine>/, each file whole or not at all;
    meta (rounds, quick...) goes into the JSON with the machine, date and load average. per_machine=False: the
    same on any machine (a compiler's output): one file, under results/cpu/, whichever machine wrote it (an AVX2
    machine wrote a second copy under cpu-avx2/)."""
    folder = os.path.join(RESULTS, machine_label(device) if per_machine else "cpu")
    os.makedirs(folder, exist_ok=True)
    machine = machine_description(device)
    name = result_name(folder, name, machine) if per_machine else name
    # the command line and the SIMD override: every script's options on record, whatever meta it passes
    meta = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "title": title, **load_average(),
            "argv": sys.argv[1:], "PYMERGE_SIMD": os.environ.get("PYMERGE_SIMD"), **(meta or {})}
    write_atomic(os.path.join(folder, f"{name}.json"), json.dumps({**meta, "rows": rows}, indent=1))
    table = markdown_table(rows, columns)
    write_atomic(os.path.join(folder, f"{name}.md"), f"### {title}\n{meta['machine']}, {meta['date']}\n\n{table}\n")
    if plot is None:
        chart = charts().chart_for(name)
        plot = chart and charts().drawing(chart, rows, f"{title}\n{machine}, {meta['date']}")
    png = os.path.join(folder, f"{name}.png")
    if plot is not None and has_matplotlib():
        write_plot(png, plot)
    else:
        if plot is not None:
            print(f"(matplotlib is not installed or does not import: no {name}.png; pip install matplotlib)",
                  file=sys.stderr)
        if os.path.exists(png):  # an earlier run's plot beside this run's table
            os.remove(png)
    return table


def charts():
    """benchmarks/charts.py, imported as the scripts import this module (benchmarks/ on sys.path) or as the
    tests do (benchmarks.charts)."""
    try:
        import charts as module
    except ImportError:
        from benchmarks import charts as module
    return module


def write_atomic(path: str, text: str) -> None:
    """The file whole or not at all (pymerge's replace_file): an interrupted run left a truncated JSON in place of
    the last good one."""
    from pymerge.io.files import replace_file

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    replace_file(path, write)


def write_plot(png: str, draw) -> None:
    """draw(path) into a temporary .png beside png (savefig takes the format from the suffix, so not
    replace_file's name), renamed over it; nothing where draw drew nothing (no matplotlib)."""
    tmp = os.path.join(os.path.dirname(png), f".{os.path.basename(png)}.{os.getpid()}.png")
    try:
        draw(tmp)
        if os.path.exists(tmp):
            os.replace(tmp, png)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _model_of(machine: str) -> str:
    """The CPU or GPU model in a machine description, less its core count, stepping and torch version: the
    family and model stay (a Zen 1 and a Zen 3 are both "AMD EPYC": a Zen 3 run replaced the Zen 1 table the
    README quotes; an audit)."""
    parts = machine.split(" (torch")[0].split(", ")
    family = [p.split(" stepping")[0] for p in parts[1:] if p.startswith("family ")]
    return ", ".join([parts[0].strip()] + family)


def result_name(folder: str, name: str, machine: str) -> str:
    """name, or name_<this machine's model> where folder's name.json was measured on another model of CPU or GPU:
    results/cpu/ holds tables of several machines that the README quotes, which a run elsewhere replaced."""
    try:
        with open(os.path.join(folder, f"{name}.json")) as f:
            old = json.load(f)
        recorded = old.get("machine") or old.get("meta", {}).get("cpu")
    except FileNotFoundError:
        return name
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and _model_of(recorded) == _model_of(machine):
        return name
    recorded = _model_of(recorded) if isinstance(recorded, str) else "a machine it does not record"  # (kept)
    slug = "".join(c if c.isalnum() else "-" for c in _model_of(machine).lower()).strip("-")
    slug = "-".join(filter(None, slug.split("-")))[:60] or "other"
    print(f"({folder}/{name}.json was measured on {recorded}: this machine's results go to "
          f"{name}_{slug}.*)", file=sys.stderr)
    return f"{name}_{slug}"


def load_average() -> dict:
    """The machine's load when the results were written (a busy machine's figures are not a quiet one's)."""
    try:
        return {"load_average": [round(x, 2) for x in os.getloadavg()]}
    except (OSError, AttributeError):
        return {}


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 rounds silently ran the default, -1 raised past argparse)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def spread(values) -> dict:
    """min, median and max of per-round figures: one best-of figure hides how much a loaded machine moved."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def markdown_table(rows, columns):
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
