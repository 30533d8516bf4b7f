"""What a merge search leaves behind: the Pareto front over tasks, history as JSON/CSV, a PNG plot."""
import csv
import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from pymerge.errors import InputError, short
from pymerge.io.files import replace_file


def as_number(value) -> Optional[float]:
    """value as a float where it is a real number (Python, numpy, a one-element tensor), else None:
    a string ("0.5") or a bool was parsed as a score, which the pool refuses as a weight."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or str(getattr(value, "dtype", "")) in ("torch.bool", "bool"):
        return None
    dtype = getattr(value, "dtype", None)
    if getattr(dtype, "kind", "") == "c" or getattr(dtype, "is_complex", False):  # float() kept the real part
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # OverflowError: an int past float's range
        return None


def macro_average(scores: Dict[str, float]) -> float:
    """The mean of a dict of task scores (the search's default objective)."""
    if not isinstance(scores, dict) or not scores:  # a list raised IndexError, {} gave NaN with numpy's warning
        raise InputError(f"scores must be a non-empty dict task -> score, got {short(scores)}")
    values = []
    try:
        keys = sorted(scores)
    except TypeError:  # keys of several types ({1: .5, "a": .3}): sorted's raw TypeError
        keys = sorted(scores, key=lambda k: (type(k).__name__, repr(k)))
    for k in keys:  # a list's mean was taken as if its items were tasks; a str raised numpy's error
        v = as_number(scores[k])
        if v is None:
            raise InputError(f"scores[{short(k)}] must be a number, got {short(scores[k])}")
        values.append(v)
    with np.errstate(over="ignore"):  # (handled below)
        mean = float(np.mean(values))
    if math.isinf(mean) and all(math.isfinite(v) for v in values):  # the sum overflowed: 1e308 twice gave inf
        mean = math.fsum(v / len(values) for v in values)
    return mean


def pareto_front(points: Sequence[Sequence[float]]) -> List[int]:
    """Indices of the non-dominated points (every coordinate maximized); of equal points the first stays.
    Points with a NaN or infinite coordinate (a failed evaluation) are neither on the front nor dominate."""
    try:
        pts = np.asarray(points)
        if pts.dtype.kind == "c":  # float64 kept the real part with numpy's warning only (as_number refuses it)
            raise TypeError
        pts = pts.astype(np.float64)
        if not len(pts):
            return []
        pts = pts.reshape(len(pts), -1)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor that requires grad
        raise InputError(f"points must be a list of score vectors, got {short(points)}") from None
    idx = np.flatnonzero(np.isfinite(pts).all(axis=1))
    # In descending lexicographic order (equal points by index) whatever dominates a point comes before it, and
    # so does a point of the front that dominates that (>= is transitive): each point is compared with the front
    # found so far only (against every point, 10,000 candidates took 5-8 s and 50,000 three to four minutes)
    order = idx[np.lexsort((idx, *(-pts[idx, j] for j in reversed(range(pts.shape[1])))))]
    if pts.shape[1] == 2:  # those before a point have its first score or more: dominated by a second one as high
        second = pts[order, 1]
        highest = np.maximum.accumulate(second)
        return sorted(int(i) for i in order[np.r_[True, second[1:] > highest[:-1]]]) if len(order) else []
    front, kept = np.empty_like(pts), []
    for i in order:
        p = pts[i]
        if not (front[:len(kept)] >= p).all(axis=1).any():
            front[len(kept)] = p
            kept.append(int(i))
    return sorted(kept)


def write_json(path: str, payload) -> None:
    """Standard JSON: a NaN or infinite score is null (json's bare NaN broke strict parsers, jq, JavaScript)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(_finite(payload), fh, indent=1, default=_jsonable, allow_nan=False)
    replace_file(path, write)


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_csv(path: str, history: List[dict], tasks: List[str]) -> None:
    """One row per candidate: ids, objective, per-task scores, timings, then the flat weights."""
    n_w = max((len(np.ravel(r["weights"])) for r in history), default=0)
    header = (["eval", "generation", "objective"] + [f"task:{t}" for t in tasks]
              + ["materialize_s", "evaluate_s"] + [f"w{i}" for i in range(n_w)])
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in history:
                w.writerow([r["eval"], r["generation"], r["objective"]] + [r["scores"].get(t, "") for t in tasks]
                           + [r["materialize_s"], r["evaluate_s"]] + list(np.ravel(r["weights"])))
    replace_file(path, write)


def plot(path: str, history: List[dict], tasks: List[str], front: List[int], title: str = "merge search",
         markers: Dict[str, Dict[str, float]] = None) -> None:
    """Objective vs evaluations (with best so far); for two tasks, the scores plane and its Pareto front.

    markers: named reference points (e.g. single checkpoints) drawn on the task plane.
    """
    from pymerge.extras import require
    require("matplotlib", "plotting the search")
    from matplotlib.figure import Figure  # not pyplot: its backend is the caller's (a notebook's; an audit)
    two = len(tasks) == 2
    title, markers = _plain(title), {_plain(k): v for k, v in (markers or {}).items()}
    fig = Figure(figsize=(11 if two else 6, 4.2))
    axes = fig.subplots(1, 2 if two else 1)
    ax = axes[0] if two else axes
    ev = [r["eval"] for r in history]
    obj = [r["objective"] for r in history]
    ax.scatter(ev, obj, s=10, alpha=0.5, label="candidate")
    best = np.maximum.accumulate([o if math.isfinite(o) else -np.inf for o in obj]) if obj else []
    ax.plot(ev, best, color="C3", label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("objective (macro-average)" if len(tasks) > 1 else "score")
    ax.set_title(title)
    ax.legend(loc="lower right")
    if two:
        ax = axes[1]
        a, b = tasks
        ax.scatter([r["scores"][a] for r in history], [r["scores"][b] for r in history], s=10, alpha=0.35,
                   label="candidates")
        fr = sorted(front, key=lambda i: history[i]["scores"][a])
        ax.plot([history[i]["scores"][a] for i in fr], [history[i]["scores"][b] for i in fr], "o-", color="C3",
                label="Pareto front")
        for i, (name, s) in enumerate(markers.items()):
            ax.scatter([s[a]], [s[b]], marker="*", s=90, color=f"C{(i % 7) + 4}", label=name, zorder=3)
        ax.set_xlabel(_plain(a))
        ax.set_ylabel(_plain(b))
        ax.set_title("scores per task")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _plain(text: str) -> str:
    """A task or marker name as matplotlib draws it verbatim: a "$" pair is math to it, and "acc $k_5_shot$" raised
    once the whole search had run (an audit)."""
    return str(text).replace("$", r"\$")
