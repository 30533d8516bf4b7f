"""Shared benchmark plumbing: timers, machine labels and result files (JSON, markdown, PNG)."""
import json
import os
import platform
import statistics
import sys
import time

import torch

# PYMERGE_BENCH_RESULTS redirects every table (gpu_check.sh collects a run's results in its own folder).
RESULTS = os.environ.get("PYMERGE_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_label(device: str) -> str:
    """Folder name for results: the GPU's name (e.g. 'nvidia-h200'), 'cpu' (a CPU with AVX-512, where
    the first tables were measured), or 'cpu-avx2' / 'cpu-scalar' (the SIMD path pymerge takes here)."""
    if device == "cuda":
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    from pymerge import _native
    level = _native.cpu.simd_level() if _native.cpu is not None else "scalar"
    return "cpu" if level == "avx512" else f"cpu-{level}"


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def time_interleaved(fns: dict, rounds: int, device: str, calls_per_sample: int = 5, samples_out=None) -> dict:
    """Seconds per call for each function: median on the GPU (events), best on the noisy CPU; every
    round's sample goes into samples_out[name] when a dict is given (for per-round ratios).

    Rounds alternate between the functions so drifting machine load hits them all alike. On the
    GPU each sample spans several back-to-back calls, so host overhead between launches hides
    behind queued work the way it does in a real loop.
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


def write_results(name: str, device: str, rows: list, columns: list, title: str, plot=None) -> str:
    """Writes <name>.json and <name>.md (and <name>.png via plot(path), where matplotlib is installed) under
    results/<machine>/."""
    folder = os.path.join(RESULTS, machine_label(device))
    os.makedirs(folder, exist_ok=True)
    meta = {"machine": machine_description(device), "date": time.strftime("%Y-%m-%d"), "title": title}
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    table = markdown_table(rows, columns)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(f"### {title}\n{meta['machine']}, {meta['date']}\n\n{table}\n")
    if plot is not None and not has_matplotlib():
        print(f"(matplotlib is not installed or does not import: no {name}.png; pip install matplotlib)", file=sys.stderr)
    elif plot is not None:
        plot(os.path.join(folder, f"{name}.png"))
    return table


def markdown_table(rows, columns):
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
