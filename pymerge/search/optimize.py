"""CMA-ES over merge weights: ask a population, materialize it into live models, evaluate, tell.

    result = pymerge.search.optimize(pool, evaluate, model=model, budget=200, seed=0, state_path="s.json")

The search vector x lives in [0, 1]^(G*N) (G = 1 unless per-group weights are asked for); the merge
weights are x reshaped to [G, N], each row divided by its sum when normalize=True (the default,
a weighted average as in the recycling paper). Candidate 0 is x0 (the uniform merge by default).
The objective is maximized; evaluate(model) returns a float or {task: score} (macro-averaged).
State is saved as JSON after a generation or a batch of candidates where _SAVE_EVERY_S (or ten times the last
save's duration) have passed since the last save, at the end, and as an interrupt or an error stops the search: the
settings and every evaluated candidate (a killed process loses at most the candidates since the last save). A re-run
with the same state_path rebuilds CMA-ES by replaying that history (the search's RNG is its own and
seeded, so the replay asks for the very candidates recorded, which is checked) and ends where an
uninterrupted run ends. Nothing is unpickled: a state file is data, validated field by field. While a
search runs it holds an exclusive lock on state_path + ".lock" (which stays): a second search on the same
state_path is refused (both ran, and one's state overwrote the other's).
"""
import contextlib
import copy
import functools
import hashlib
import json
import math
import operator
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from pymerge.errors import InputError, short
from pymerge.extras import MissingExtraError
from pymerge.pool.pool import _map_name, method_params_of
from pymerge.io.files import (check_replaceable, fsync_dir, hold_lock, kernel_folder, read_small, release_lock,
                              remove_by_name, same_place, sweep_unlocked)
from pymerge.ops._checks import as_flag
from pymerge.pool.weights import _has_bool, check_readable_values, group_indices
from pymerge.stop_signals import held_signals
from pymerge.search.report import as_number, macro_average, pareto_front, plot, replace_file, write_csv, write_json
from pymerge.warning_filters import ignoring

STATE_VERSION = 2  # 1 was a pickle
_SAVE_EVERY_S = 30.0  # the state is saved after a batch or a generation once this long has passed
_SAVE_SHARE = 0.1  # and once the last save's duration is at most this share of the time since it
MAX_WEIGHTS = 5000  # in a search's weight table: CMA-ES's d x d matrices are 200 MB each there
_ENTRY_KEYS = {"eval", "generation", "objective", "scores", "weights", "x", "materialize_s", "evaluate_s"}


@dataclass
class SearchResult:
    """Every candidate's scores, the best merge's weights and the Pareto front over tasks."""
    best_weights: np.ndarray
    best_objective: float
    best_scores: Dict[str, float]
    history: List[dict]
    tasks: List[str]
    pareto: List[int] = field(default_factory=list)  # indices into history
    generations: int = 0

    @property
    def best_index(self) -> int:
        return _best_index([r["objective"] for r in self.history])

    def pareto_candidates(self) -> List[dict]:
        return [self.history[i] for i in self.pareto]

    def save(self, out_dir: str, title: str = "merge search", markers=None,
             extra: Optional[Dict[str, Optional[Callable[[str], None]]]] = None) -> Dict[str, str]:
        """history.json, history.csv and search.png under out_dir, and extra's files (a name -> a function writing
        that file at the path it is given, or None: an earlier one is removed); returns their paths. Without
        matplotlib (the `plot` extra) there is no search.png (an earlier one is removed: it would show another
        search). They are written into a hidden folder in out_dir, then moved into place together once all are
        written: a write that fails (a full disk, a file size limit) or an interrupt before leaves the earlier
        search's files as they were (an audit: deleted first, a failing write lost them all), and one during the
        moves waits for them to finish (only a kill then leaves a mix of two searches' files)."""
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:  # a file of that name: FileExistsError's traceback
            what = "exists and is not a folder" if os.path.lexists(out_dir) else "cannot create it"
            raise InputError(f"{out_dir}: {what} ({exc.strerror or exc})") from None
        names = {"json": "history.json", "csv": "history.csv", "png": "search.png", **{n: n for n in extra or {}}}
        paths = {k: os.path.join(out_dir, n) for k, n in names.items()}
        for path in paths.values():  # checked before anything is written: a raw IsADirectoryError after some were
            if os.path.isdir(path) and not os.path.islink(path):
                raise InputError(f"{path}: is a folder, where the search writes a file (move it away)")
            if _is_search_state(path):  # state_path="out/history.json", then save("out"): the report replaced the
                # state, and the resume failed on it (an audit; `pymerge search` refuses such a state_path)
                raise InputError(f"{path}: is a search's saved state (a state_path), where the report writes; save "
                                 "the report into another folder")
        sweep_unlocked(out_dir, _STAGE_PREFIX, folders=True, min_age_s=_STAGE_GRACE_S)  # a killed save's
        stage = lock = None
        try:
            with held_signals(repeat_acts=False):  # made and known, or neither (an audit's Ctrl-C storm)
                try:
                    stage = tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=out_dir)
                except OSError as exc:
                    raise InputError(f"{out_dir}: cannot write the search's results there "
                                     f"({exc.strerror or exc})") from None
            staged = {k: os.path.join(stage, n) for k, n in names.items()}
            try:
                with held_signals(repeat_acts=False):  # (taken and kept)
                    lock = hold_lock(stage, f"{stage}: in use", optional=True)  # a live save's: no sweep takes it
                write_json(staged["json"], {
                    "best": {"index": self.best_index, "objective": self.best_objective, "scores": self.best_scores,
                             "weights": self.best_weights},
                    "tasks": self.tasks, "pareto": self.pareto, "generations": self.generations,
                    "history": self.history})
                write_csv(staged["csv"], self.history, self.tasks)
                try:
                    plot(staged["png"], self.history, self.tasks, self.pareto, title=title, markers=markers)
                except MissingExtraError:
                    pass
                for name, write in (extra or {}).items():
                    if write is not None:
                        write(staged[name])
            except (InputError, OSError) as exc:
                raise _named_in(exc, stage, out_dir) from None
            _install_together(staged, paths, stage, out_dir)
            fsync_dir(out_dir)
        finally:
            try:
                if stage is not None:
                    shutil.rmtree(stage, ignore_errors=True)
                # out of descriptors, which rmtree needs two of: the lock's is given up and the staged files go by
                # name (the folder and its files stayed in out after the error; an audit)
                if stage is not None and os.path.lexists(stage):
                    release_lock(lock)
                    lock = None
                    remove_by_name(stage, names.values())
            finally:
                release_lock(lock)
        return paths


_STAGE_PREFIX = ".pymerge-results-"  # SearchResult.save's hidden folder in out, gone once its files are in place
_STAGE_GRACE_S = 60.0  # a save locks the folder it made at once: unlocked for longer, its process died


def _named_in(exc, stage: str, out_dir: str):
    """exc naming the file it was writing as the one in out_dir (the hidden folder is gone once it is read)."""
    inside = stage + os.sep
    if isinstance(exc, OSError):
        for attr in ("filename", "filename2"):
            name = getattr(exc, attr)
            if isinstance(name, str) and (name == stage or name.startswith(inside)):
                setattr(exc, attr, out_dir + name[len(stage):])
    elif isinstance(exc, InputError) and stage in str(exc):
        try:
            return type(exc)(str(exc).replace(inside, out_dir + os.sep).replace(stage, out_dir))
        except TypeError:  # a subclass of other arguments: as it is
            pass
    return exc


def _install_together(staged: Dict[str, str], paths: Dict[str, str], stage: str, out_dir: str) -> None:
    """Moves each staged file onto its path, or removes the path's earlier file where none was staged (dropping it
    from paths). An interrupt landing inside waits for the rest, then is raised: a mix of two searches' files (a new
    history beside an old best_merge.yml) is worse than a moment's delay (a review). A move that fails removes the
    earlier file at its path too, the others go on, and its error is raised after (an interrupt first)."""
    made = {k: os.path.lexists(staged[k]) for k in paths}
    todo, interrupted, failed = list(paths), None, None
    while True:  # each step may run again after an interrupt: every one is idempotent
        try:
            while todo:
                k = todo[0]
                try:
                    if made[k] and os.path.lexists(staged[k]):
                        os.replace(staged[k], paths[k])  # a link at the path is replaced, never its target
                    elif os.path.lexists(paths[k]) and not made[k]:  # an earlier search's: it would pass for this one's
                        os.unlink(paths[k])
                except OSError as exc:
                    failed = failed or exc
                    with contextlib.suppress(OSError):
                        if os.path.lexists(staged[k]) and os.path.lexists(paths[k]):
                            os.unlink(paths[k])  # not beside this search's others
                todo.pop(0)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    for k in [k for k in paths if not made[k]]:
        del paths[k]
    if interrupted is not None:
        raise interrupted
    if failed is not None:
        raise _named_in(failed, stage, out_dir)


def import_cma():
    """The cma package, imported without its own "Could not import matplotlib.pyplot" warning (pymerge names the
    extra itself where a plot is skipped, and never calls cma's plotting); one line where it cannot be imported
    (under python -OO it reads the docstrings -OO strips: a traceback)."""
    with ignoring(message="Could not import matplotlib", category=UserWarning):
        try:
            import cma
        except Exception as exc:  # noqa: BLE001  (whatever the library raises as it loads)
            hint = ("; run Python without -OO (and PYTHONOPTIMIZE unset), whose stripped docstrings cma reads"
                    if sys.flags.optimize >= 2 else "")
            raise InputError(f"the search's CMA-ES library (cma) cannot be imported: {type(exc).__name__}: "
                             f"{exc}{hint}") from None
    return cma


def _head(path: str, n: int) -> bytes:
    """The first n bytes of a regular file at path, else b"" (a FIFO would block the open)."""
    try:
        if not os.path.isfile(path):
            return b""
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _is_search_state(path: str) -> bool:
    """Whether path is a file that begins as _save_state writes one."""
    head = _head(path, 40)
    return head.startswith(b'{"version": ') and b', "fingerprint": ' in head


def _random_state(seed: int) -> np.random.RandomState:
    """numpy's RandomState for a seed: seeds 0..2**32-1 as RandomState(seed) (the streams of every search so
    far); any other integer from its whole value (taken modulo 2**32, seeds 2**32 apart ran the same search)."""
    if 0 <= seed < 2**32:
        return np.random.RandomState(seed)
    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence([seed % 2**64, 1])))


_GLOBAL_RNG_SWAP = threading.Lock()  # one search's swap at a time (see _OwnRNG)


def _renew_swap_lock() -> None:  # a forked child's own: another thread may have held the parent's (a review)
    global _GLOBAL_RNG_SWAP
    _GLOBAL_RNG_SWAP = threading.Lock()


os.register_at_fork(after_in_child=_renew_swap_lock)


class _OwnRNG:
    """Keeps cma's uses of numpy's global RNG (its seeding, any draws besides randn) off the caller's stream
    and on a state of our own, saved with the search state. The swaps of searches in several threads take turns:
    interleaved, one saved another's state as the caller's and left it there (an audit). A thread drawing from
    numpy's global RNG while a search is inside cma (ask, tell) still draws from the search's state."""

    def __init__(self, seed: int):
        self.state = _random_state(seed).get_state()  # as np.random.seed(seed) sets it, for seeds below 2**32

    def run(self, fn):
        """fn() on this search's state of numpy's global RNG. The lock's own `with`: a Ctrl-C between a Python-level
        acquire and its try would leave it held, and every later search waiting."""
        with _GLOBAL_RNG_SWAP:
            saved = np.random.get_state()
            try:
                np.random.set_state(self.state)
                return fn()
            finally:
                self.state = np.random.get_state()
                np.random.set_state(saved)


_number = as_number  # (report.py: torch-free)


def _scores(value, index: int) -> Dict[str, float]:
    if isinstance(value, dict):
        if not value:
            raise InputError(f"evaluate returned an empty dict for candidate {index}")
        out, keys = {}, {}
        for k, v in value.items():
            if keys.setdefault(str(k), k) is not k:
                raise InputError(f"evaluate returned keys {short(keys[str(k)])} and {short(k)} for candidate {index}, "
                                 f"one task name {str(k)!r}; name each task once")
            out[str(k)] = _number(v)
            if out[str(k)] is None:
                raise InputError(f"evaluate returned {short(v)} for task {str(k)!r} of candidate {index}; "
                                 "scores must be numbers within float's range")
        return out
    score = _number(value)
    if score is None:
        raise InputError(f"evaluate must return a float or a dict of floats, got {short(value)}")
    return {"score": score}


def _replica_count(pool, model, popsize: int, replicas: Optional[int]) -> int:
    """How many model copies materialize_many may fill at once: popsize where it fits in a quarter of free memory."""
    if replicas is not None:
        return max(1, min(int(replicas), popsize))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    from pymerge.sizes import free_memory
    free = free_memory(pool.device)
    return max(1, min(popsize, int(free * 0.25 // max(size, 1)) + 1))


def check_searchable(method) -> None:
    """A method that takes no per-model weight (karcher, model_stock, sce, slerp...) merges every candidate
    alike: the whole budget went on one merge, exit 0, and best_merge.yml carried weights it ignores (an
    audit). An unknown name is left to the merge's own error."""
    from pymerge.errors import MergeConfigError
    from pymerge.methods.base import get_method
    try:
        m = get_method(method)
    except MergeConfigError:
        return
    if "weight" not in m.model_params:
        raise InputError(f"method {method}: takes no per-model weight, so every candidate would be the same merge "
                         "and there is nothing to search; use a weighted method (linear, task_arithmetic, ties, "
                         "dare_ties, della...)")


def search_settings(budget, popsize, sigma0, seed, replicas) -> tuple:
    """optimize's scalar settings checked (InputError) and made numbers: (budget, popsize, sigma0, seed,
    replicas). `pymerge search` checks them before it builds the pool, which can take minutes."""
    budget = _count(budget, "budget", 1, 10**9)
    popsize = None if popsize is None else _count(popsize, "popsize", 2, 10**5)
    given = sigma0
    try:
        sigma0 = float(sigma0) if not isinstance(sigma0, (str, bool)) else math.nan
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float's range (10**400)
        sigma0 = math.nan
    if not 1e-12 <= sigma0 <= 1e6:  # NaN too: cma asserts on it, divides by zero at 0
        raise InputError(f"sigma0 must be a finite step size from 1e-12 to 1e6, got {short(given)}{_yaml_hint(given)}")
    seed = _count(seed, "seed", -2**63, 2**63 - 1)  # any integer, as before (cma gets a 32-bit one below)
    replicas = None if replicas is None else _count(replicas, "replicas", 1, 10**6)
    return budget, popsize, sigma0, seed, replicas


def optimize(pool, evaluate: Callable, model, budget: int = 200, popsize: Optional[int] = None,
             sigma0: float = 0.2, seed: int = 0, state_path: Optional[str] = None, *, groups=None,
             normalize: bool = True, x0=None, bounds=(0.0, 1.0), method: str = "linear",
             objective: Optional[Callable[[Dict[str, float]], float]] = None, replicas: Optional[int] = None,
             names=None, log: Optional[Callable[[str], None]] = print, method_params: Optional[Dict] = None,
             distributed: Optional[bool] = None, **more_method_params) -> SearchResult:
    """CMA-ES (cma package, ask/tell) over the pool's merge weights; returns a SearchResult.

    groups      None: N weights; "layer" or a function/dict: a [G, N] table (see CheckpointPool.materialize)
    objective   scores dict -> float to maximize (default: the macro-average over tasks)
    replicas    model copies filled per materialize_many call (default: the population, memory allowing;
                1 where the model cannot be deep-copied, which is logged)

    evaluate(m) must score the model m it is given: with replicas > 1 (the default) most candidates are
    written into deep copies of `model`, not into `model` itself (one read of the pool fills them all,
    several times faster than one candidate at a time). An evaluate bound to one model (a torch.compile
    wrapper built once, an eval harness or pipeline holding `model`, a CUDA graph of its parameters)
    scores `model` whatever it is given, so the history pairs weights with another candidate's score:
    pass replicas=1 for it. On return `model` holds the last candidate written into it, not the best
    (pool.materialize(result.best_weights, into=model, method=..., ...) puts the best there).
    Under an initialized torch.distributed group of several ranks, call it on every rank: see
    pymerge/dist/search.py (CMA-ES and state_path on rank 0, candidates split across replica groups).
    distributed=False runs this process's search alone there (a plain pool only: a sharded pool's every
    merge is a collective); None (the default) decides by the process group.
    """
    # what the search calls and where it saves, checked before anything is written (evaluate=None failed after
    # the first merge into model; state_path=Path(...) after its folders were made)
    if not callable(getattr(pool, "materialize_many", None)):  # None: "'NoneType' object has no attribute ..."
        raise InputError(f"pool must be a CheckpointPool, got {short(pool)}")
    refused = None  # under torch.distributed, raised on every rank by the ranks' first agreement: a rank refusing
    try:            # its own log= alone left the others waiting in it until the group's timeout (an audit)
        for what, fn in (("evaluate", evaluate), ("objective", objective), ("log", log)):
            if not callable(fn) and (fn is not None or what == "evaluate"):
                raise InputError(f"{what} must be a function, got {short(fn)}")
        try:
            normalize = as_flag(normalize, "normalize")
        except TypeError as exc:
            raise InputError(str(exc)) from None
        state_path = _state_path(state_path)
    except InputError as exc:
        refused = exc
    from pymerge.dist.search import across_ranks
    spread = across_ranks(pool, distributed)
    if spread is not None:  # under torch.distributed: CMA-ES on rank 0, candidates on every replica group
        return spread(optimize, pool, evaluate, model, budget=budget, popsize=popsize, sigma0=sigma0, seed=seed,
                      state_path=state_path, groups=groups, normalize=normalize, x0=x0, bounds=bounds,
                      method=method, objective=objective, replicas=replicas, names=names, log=log,
                      method_params=method_params, refused=refused, **more_method_params)
    if refused is not None:
        raise refused
    check_searchable(method)  # (after the ranks' agreement on the arguments: a rank alone must not refuse)
    cma = import_cma()

    n = pool.num_checkpoints
    g = 1 if groups is None else pool.num_groups(groups)
    # Only the rows of groups holding a tensor are searched (the others change nothing: a pool of blocks 30-31
    # under "layer" has 33 rows, and searching all of them spent 93 of 99 coordinates on nothing)
    used = list(range(g)) if groups is None else pool.groups_used(groups)
    dim = len(used) * n
    if dim < 2:
        raise InputError("CMA-ES needs at least two weights to search (one checkpoint, no groups)")
    if normalize and n < 2:  # each group's one weight normalized to 1: every candidate the same merge (an audit)
        raise InputError("one checkpoint with normalize=True: each group's weights sum to one, so every candidate "
                         "would be the same merge; pass normalize=False to search the scale of its weights")
    if g * n > MAX_WEIGHTS:  # CMA-ES keeps d x d matrices (group ids from a million asked for 65 TiB), and
        # every candidate's table is kept in the history
        raise InputError(f"groups: ids up to {g - 1} make a table of {g} x {n} checkpoints = {g * n} weights; at most "
                         f"{MAX_WEIGHTS}: number the groups 0, 1, 2... or use fewer")
    budget, popsize, sigma0, seed, replicas = search_settings(budget, popsize, sigma0, seed, replicas)
    if not isinstance(model, torch.nn.Module):  # evaluate() runs it; replicas are deep copies of it
        raise InputError(f"model must be the live torch.nn.Module candidates are written into, "
                         f"got {type(model).__name__}")
    try:
        if isinstance(bounds, (str, bytes, dict)) or any(isinstance(b, (bool, np.bool_, str, bytes)) for b in bounds):
            raise TypeError  # "01" was (0, 1), a dict its keys, (False, True) and ("0", "1") numbers
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"bounds must be two numbers (low, high), got {short(bounds)}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"bounds must be finite with low < high, got ({lo}, {hi})")
    if hi - lo < 1e-12:  # as sigma0's floor: cma's bound transform divides by the width (5e-324: an AssertionError)
        raise InputError(f"bounds ({lo}, {hi}) are narrower than 1e-12: nothing to search between them")
    if normalize and lo < 0:  # a sum near 0 blew weights up to 1e8 or (at 0) stood in the uniform merge
        raise InputError(f"bounds ({lo}, {hi}) reach below 0, where normalize=True would divide candidates by sums "
                         "near or at 0; use normalize=False with negative weights")
    try:
        start = 1.0 / n if not normalize and lo <= 1.0 / n <= hi else (lo + hi) / 2
        x0 = np.full(g * n, start) if x0 is None else _x0_values(x0, g * n)
    except InputError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"x0 must be {g * n} numbers (groups x checkpoints), got {short(x0)}") from None
    if x0.shape != (g * n,):
        raise InputError(f"x0 must have {g * n} values (groups x checkpoints), got {x0.size}")
    outside = np.flatnonzero(~((x0 >= lo) & (x0 <= hi)))  # NaN too
    if len(outside):
        raise InputError(f"x0[{outside[0]}] is {x0[outside[0]]}, outside bounds [{lo}, {hi}]")
    fingerprint = {"n": n, "groups": g, "seed": int(seed), "sigma0": float(sigma0),
                   **({"used_groups": used} if len(used) < g else {}),
                   # seeds outside 0..2**32-1 drew seed % 2**32's stream before 2026-12-03: such a state is another search
                   **({"seed_stream": 2} if not 0 <= seed < 2**32 else {}),
                   "popsize": int(popsize) if popsize else popsize, "normalize": bool(normalize),
                   "bounds": [lo, hi], "x0": x0.tolist(), "method": str(method),
                   # by name, as groups=: another one mixed two objectives' values (the default's name is None)
                   "objective": None if objective is macro_average else _rule(objective)}
    # which scores, where evaluate is named (NamedEvaluate); the distributed leader's stands for the user's
    named = getattr(pool, "evaluate_name", None) or getattr(evaluate, "evaluate_name", None)
    if named is not None:
        fingerprint["evaluate"] = named
    objective = objective or macro_average
    merge_params = method_params_of(method_params, more_method_params)
    fingerprint["method_params"] = json.loads(json.dumps(merge_params, sort_keys=True, default=_plain))
    # which checkpoints, in which order, and how tensors map to groups and targets: a resume with the
    # sources reordered paired the saved weights with other checkpoints. Labels as given (no filesystem
    # look-up: a saved compressed pool keeps them after its files are gone); the base as present or not
    # (a saved compressed pool does not keep its label)
    # which model scores the candidates: its class and its tensors' names, dtypes and shapes (a resume into a
    # bfloat16 build of the model mixed its scores with the float32 ones, exit 0: an audit)
    fingerprint["model"] = getattr(pool, "model_signature", None) or _model_signature(model)  # (distributed: rank 0's)
    fingerprint["pool"] = {"sources": [os.path.normpath(label) for label in pool.labels], "base": bool(pool.has_base),
                           "groups": _rule(groups), "names": _rule(names), **_resolved_rules(pool, groups, names),
                           **_pool_contents(pool)}

    start_table = x0.reshape(g, n)  # the rows of groups without tensors stay at their start
    x0 = start_table[used].ravel()

    def to_weights(x):
        w = np.array(start_table, float)
        w[used] = np.asarray(x, float).reshape(len(used), n)
        w = np.clip(w, lo, hi)
        if normalize:
            with np.errstate(over="ignore"):
                s = w.sum(axis=1, keepdims=True)
            if not np.isfinite(s).all():  # bounds near float's limit: the sum overflowed (all-zero weights)
                with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero row: 0/0, made uniform below
                    w = w / w.max(axis=1, keepdims=True)
                w = np.nan_to_num(w, nan=0.0)
                s = w.sum(axis=1, keepdims=True)
            w = np.where(s > 1e-12, w / np.where(s > 1e-12, s, 1.0), 1.0 / n)  # an all-zero row: uniform
        return w[0] if g == 1 else w

    rng = _OwnRNG(seed)
    # cma samples through opts["randn"]: a generator of our own, seeded, so a replay asks the same candidates.
    opts = {"seed": seed % (2**32 - 1) + 1, "randn": _random_state(seed).randn, "bounds": [lo, hi], "verbose": -9,
            "verb_disp": 0, "verb_log": 0, "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9, "tolstagnation": 10**9}
    if popsize:
        opts["popsize"] = int(popsize)
    es = rng.run(lambda: cma.CMAEvolutionStrategy(x0.tolist(), sigma0, opts))
    read = pool.read_file(state_path) if state_path and hasattr(pool, "read_file") else None
    if read is not None:  # (its error, not a state's, advised deleting it; its lock files went beside it)
        raise InputError(f"state_path {state_path}: is {read}, which the pool was built from; choose another "
                         "state_path")
    if state_path and _head(state_path, 10)[8:] == b'{"':  # not "truncated or not JSON; delete it", nor a lock beside
        raise InputError(f"state_path {state_path}: is a safetensors file (a model's or a saved pool's), not a search "
                         "state; choose another state_path")
    lock, models = None, []
    try:
        with held_signals(repeat_acts=False):  # (taken and kept: a Ctrl-C between leaked the descriptor; an audit)
            lock = _lock_state(state_path)  # before the state is read; held until the search ends (an interrupt too)
        began = time.monotonic()
        stamp = [_stamp(state_path)]  # the file this search last read or wrote: the only one a save may replace
        state = _load_state(state_path, fingerprint, (g, n, dim))
        read_s = time.monotonic() - began  # a resume's first write waits as if it had written the state (save_due)
        pending = None  # (candidates, objectives so far) of a generation an earlier budget cut short
        if state is None:
            state = {"version": STATE_VERSION, "fingerprint": fingerprint, "history": [], "generation": 0,
                     "x0_done": False}
        else:
            _check_objectives(state["history"], objective, state_path)
            pending = _replay(es, rng, state, state_path, x0)
            if any(not np.allclose(to_weights(r["x"]), r["weights"], rtol=1e-9, atol=1e-12)
                   for r in state["history"]):
                raise InputError(f"{state_path}: saved search state has weights that do not follow from its "
                                 "candidates; use another state_path or delete it")
        history = state["history"]
        if hasattr(pool, "resumed_from"):  # the distributed search's stand-in: its ranks number candidates as here
            pool.resumed_from(len(history))
        left = budget - len(history)
        if left > 0:
            _check_writable(state_path)  # before the first candidate (minutes on a real model), not after it
        # copies for at most the candidates left to run: popsize=20000 with budget=4 made 19,999
        n_rep = _replica_count(pool, model, max(1, min(es.popsize, left)), replicas)
        models = [model]
        try:
            models += [copy.deepcopy(model) for _ in range(n_rep - 1)]
        except Exception as exc:  # a lock, an open file, a CUDA stream... in the model: deepcopy refuses them
            why = (str(exc).strip().splitlines() or [""])[0][:200]
            why = f"{type(exc).__name__}: {why}" if why else type(exc).__name__
            if replicas is not None:
                raise InputError(f"replicas={replicas}: the model cannot be deep-copied ({why}); "
                                 "pass replicas=1") from None
            if log:
                log(f"evaluating one candidate at a time (replicas=1): the model cannot be deep-copied ({why})")
        n_rep = len(models)
        kw = dict(method=method, groups=groups, names=names, method_params=merge_params)

        # when the state was last written (or read), how long that took, and the candidates it holds
        saved = [time.monotonic(), read_s, len(history)]
        converged = [False]  # said once
        best = [None, 0]  # the best finite objective, and how many candidates it was taken over

        def best_so_far() -> float:
            """The result's best objective by now (_best_index's), over the candidates since the last call only:
            over the whole history for each generation's log line, a long search's logging was quadratic."""
            for r in history[best[1]:]:
                if math.isfinite(r["objective"]) and (best[0] is None or r["objective"] > best[0]):
                    best[0] = r["objective"]
            best[1] = len(history)
            return best[0] if best[0] is not None else history[0]["objective"]  # (none finite: the first)

        def save_due() -> bool:
            # each write holds the whole history: one taking longer than the interval (a large per-layer search:
            # 41 s for 1,000 candidates of 5,000 weights) made the search quadratic again (an audit), so a write
            # also waits until the last one took at most _SAVE_SHARE of the time since
            since = time.monotonic() - saved[0]
            return since >= _SAVE_EVERY_S and saved[1] / _SAVE_SHARE <= since

        def write_state() -> None:
            began = time.monotonic()
            _save_state(state_path, state, stamp)
            saved[0] = time.monotonic()
            saved[1] = saved[0] - began
            saved[2] = len(history)

        def write_progress() -> None:
            """The candidates evaluated since the last write, as a write in mid-generation saves them (a resume
            replays them): on an interrupt or an error, which lost up to _SAVE_EVERY_S of them."""
            if not state_path or len(history) == saved[2]:
                return
            state["x0_done"] = True  # history[0] is the start
            state["generation"] = max(state["generation"], history[-1]["generation"])
            with contextlib.suppress(Exception):  # (the error under way is the one to raise)
                write_state()

        def run(xs, generation, save=False):
            """Materializes and evaluates candidates xs in batches of n_rep models; returns their objectives.
            save: the state after a batch, where a save is due (save_due: _SAVE_EVERY_S and _SAVE_SHARE; an interrupt
            loses the candidates of those seconds and one batch, not the generation; each save writes the whole
            history, so a save per candidate of a long search cost more than it kept: a review)."""
            out = []
            for start in range(0, len(xs), n_rep):
                batch = xs[start:start + n_rep]
                weights = [to_weights(x) for x in batch]
                t0 = time.perf_counter()
                pool.materialize_many(weights, into=models[:len(batch)], **kw)
                if pool.device.type == "cuda":
                    torch.cuda.synchronize(pool.device)
                t_mat = (time.perf_counter() - t0) / len(batch)
                for x, w, m in zip(batch, weights, models):
                    t1 = time.perf_counter()
                    scores = _scores(evaluate(m), len(history))
                    if history and scores.keys() != history[0]["scores"].keys():  # objectives would not compare
                        raise InputError(f"evaluate returned tasks {sorted(scores)} for candidate {len(history)} but "
                                         f"{sorted(history[0]['scores'])} for candidate 0; every candidate must score "
                                         "the same tasks")
                    t_eval = time.perf_counter() - t1
                    obj = _number(raw := objective(scores))
                    if obj is None:
                        raise InputError(f"objective returned {short(raw)} for candidate {len(history)}; it must "
                                         "return a number")
                    history.append({"eval": len(history), "generation": generation, "objective": obj, "scores": scores,
                                    "weights": np.asarray(w).tolist(), "x": np.asarray(x).tolist(),
                                    "materialize_s": t_mat, "evaluate_s": t_eval})
                    out.append(obj)
                if save and start + n_rep < len(xs) and save_due():
                    state["generation"] = generation  # a part of it, which a resume finishes (_replay)
                    write_state()  # (at the generation's end, after tell, if due)
            return out

        try:
            if not state["x0_done"]:  # candidate 0: the starting point (uniform merge by default), a baseline
                run([x0], 0)
                state["x0_done"] = True
                write_state()
            t_start = time.perf_counter()
            if log and len(history) > budget:  # the result holds every saved candidate, more than this budget
                log(f"the saved state already holds {len(history)} candidates, more than budget={budget}: nothing to "
                    "run, the result is the saved search")
            while len(history) < budget:
                if pending is not None:  # a larger budget finishes that generation, as an uninterrupted run would
                    (xs, objs), pending = pending, None
                    gen = state["generation"]
                else:
                    xs = rng.run(es.ask)
                    objs, gen = [], state["generation"] + 1
                left = budget - len(history)
                objs = objs + run(xs[len(objs):len(objs) + left], gen, save=True)
                if len(objs) == len(xs):  # a partial last generation is evaluated but not told
                    rng.run(lambda: es.tell(xs, [_fitness(o) for o in objs]))
                state["generation"] = gen
                hopeless = len(objs) == len(xs) and all(not math.isfinite(r["objective"]) for r in history)
                # Every save writes the whole history: one per generation made a long search quadratic (70 ms per
                # candidate at 10,000 candidates, 70x a 1 ms evaluate; an audit). Saved when due (save_due) and at the
                # end; and as an interrupt or an error stops the search (write_progress).
                if hopeless or len(history) >= budget or save_due():
                    write_state()
                if hopeless:
                    # CMA-ES learns nothing from them: the rest of the budget went on a random walk (an audit)
                    raise InputError(f"every candidate so far ({len(history)}) scored NaN or inf; check evaluate()"
                                     + (f" (the search state is saved in {state_path})" if state_path else ""))
                if log:
                    recent = history[-len(objs):]
                    if not converged[0] and len(recent) > 1 and len(history) < budget:
                        w32 = np.asarray([r["weights"] for r in recent], np.float32)  # the merges, as the pool weighs
                        if (w32 == w32[0]).all():  # (CMA-ES's own stop tests are off: the budget is the user's)
                            converged[0] = True
                            log(f"every candidate of generation {gen} is the same merge: CMA-ES has converged, and the "
                                f"rest of the budget ({budget - len(history)} candidates) evaluates it again; stop the "
                                "search, or run another seed or sigma0")
                    log(f"gen {gen:3d}  evals {len(history):4d}  best {best_so_far():.4f}  mean {np.mean(objs):.4f}  "
                        f"per candidate: {1e3 * np.mean([r['materialize_s'] for r in recent]):.2f} ms materialize + "
                        f"{1e3 * np.mean([r['evaluate_s'] for r in recent]):.2f} ms evaluate  "
                        f"({time.perf_counter() - t_start:.1f} s)")
            return _result(history, state["generation"])
        except BaseException:
            write_progress()
            raise
    finally:
        release_lock(lock)
        _forget_replicas(pool, models[1:])


def _model_signature(model) -> dict:
    """The model's class and a digest of its tensors' names, dtypes and shapes (its values change every
    candidate; DTensors give their global shapes). The class as the user wrote it: fully_shard's subclass
    (FSDP<name>, torch.distributed's) would refuse a single process's state on the ranks."""
    cls = next((c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed.")), type(model))
    items = []
    for kind, named in (("p", "named_parameters"), ("b", "named_buffers")):
        for name, t in getattr(model, named, lambda: ())():
            items.append(f"{kind} {name} {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "tensors": hashlib.sha256("\n".join(items).encode()).hexdigest()[:32]}


def _forget_replicas(pool, replicas: list) -> None:
    """The pool's cached plans for the deep copies hold their tensors: dropped with the search, even where
    evaluate kept a copy (a pool without a plan cache, the distributed leader's, has none to drop)."""
    forget = getattr(getattr(pool, "_plan_cache", None), "forget", None)
    if forget is not None and replicas:
        forget(replicas)


def _best_index(objectives) -> int:
    """The best finite objective's index: as CMA-ES ranks them, NaN and inf are last."""
    return int(np.argmax([o if math.isfinite(o) else -np.inf for o in objectives]))


def _result(history: List[dict], generations: int) -> SearchResult:
    objs = [r["objective"] for r in history]
    if all(not math.isfinite(o) for o in objs):
        raise InputError("every candidate scored NaN or inf; check evaluate()")
    best = _best_index(objs)
    tasks = sorted(history[0]["scores"])
    front = pareto_front([[r["scores"].get(t, np.nan) for t in tasks] for r in history])
    return SearchResult(best_weights=np.asarray(history[best]["weights"]), best_objective=objs[best],
                        best_scores=dict(history[best]["scores"]), history=history, tasks=tasks, pareto=front,
                        generations=generations)


def _fitness(objective: float) -> float:
    """What CMA-ES minimizes: the negated objective; NaN or inf candidates rank last."""
    return -objective if math.isfinite(objective) else 1e300


def _replay(es, rng, state: dict, path: str, x0) -> Optional[Tuple[list, List[float]]]:
    """Brings a fresh CMA-ES to where the saved run stopped: ask, check the recorded candidates, tell.
    Returns the last generation's candidates and objectives if the budget ended it part-way (else None).
    x0: the start searched (the fingerprint's, less the rows of groups without tensors)."""
    history = state["history"]
    if history and not np.allclose(history[0]["x"], x0, rtol=1e-9, atol=1e-12):
        raise InputError(f"{path}: saved search state's first candidate is not x0; use another state_path or delete it")
    rows_of: Dict[int, List[dict]] = {}
    for r in history[1:]:
        rows_of.setdefault(r["generation"], []).append(r)
    last = state["generation"]
    for gen in range(1, last + 1):
        rows = rows_of.get(gen, [])
        xs = rng.run(es.ask)
        partial_ok = gen == last  # a budget's end, or a save in mid-generation, leaves the last one in part
        if not rows or len(rows) > len(xs) or (len(rows) < len(xs) and not partial_ok) or not np.allclose(
                [r["x"] for r in rows], np.asarray(xs[:len(rows)]), rtol=1e-9, atol=1e-12):
            raise InputError(f"{path}: saved search state does not replay at generation {gen} (edited, or written "
                             "by other versions of cma/numpy); use another state_path or delete it")
        if len(rows) == len(xs):
            rng.run(lambda: es.tell(xs, [_fitness(r["objective"]) for r in rows]))
        elif gen == last:
            return xs, [r["objective"] for r in rows]
    return None


def _count(value, what: str, least: int, most: int) -> int:
    """An integer least..most (a numpy integer, or a float with an integral value, is accepted; a str or bool
    is not). Integers are taken as they are: through float, 2**53 + 1 (a time.time_ns() seed) was refused."""
    n = None
    if not isinstance(value, (bool, str, bytes)):
        try:
            n = operator.index(value)
        except TypeError:
            try:
                n = int(value) if float(value) == int(value) else None
            except (TypeError, ValueError, OverflowError):
                n = None
    if n is None or not least <= n <= most:
        raise InputError(f"{what} must be an integer from {least} to {most}, got {short(value)}{_yaml_hint(value)}")
    return n


def _yaml_hint(value) -> str:
    """YAML 1.1 (PyYAML) reads 1e3 and 1e-3 as text: a config's number refused as a string said only that."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string: YAML reads 1e3 or 1e-3 as text; write 1000 or 1.0e-3)"
    return ""


def _rule(value):
    """groups= or names= as the fingerprint compares it: a name, a mapping's items, a function's name."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return sorted((str(k), str(v)) for k, v in value.items())
    if isinstance(value, functools.partial):  # its name is "partial" whatever it binds
        return [_rule(value.func), repr(value.args), sorted((k, repr(v)) for k, v in value.keywords.items())]
    return getattr(value, "__qualname__", type(value).__name__)


def _resolved_rules(pool, groups, names) -> dict:
    """What a groups= or names= function does to the pool's tensors: its name alone ("<lambda>" for every
    lambda, the same for an edited function) let a resume pair the saved weight rows with other groups or
    targets, its best's score from another merge (an audit)."""
    rules = {}  # by tensor name (the pool's order is the first checkpoint's, or rank 0's)
    if callable(groups):
        rules["group_of"] = sorted(zip(pool.names, group_indices(pool.names, groups)))
    if callable(names):
        rules["target_of"] = sorted((n, _map_name(n, names)) for n in pool.names)
    return rules


class NamedEvaluate:
    """evaluate= under a name the state's fingerprint records (`pymerge search`'s `evaluate:` entry point): a
    resume with another entry point mixed two benchmarks' scores in one history (an audit). A plain function is
    recorded by no name, so a wrapper around the same one (a timer, a retry) resumes its search."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.evaluate_name = fn, name

    def __call__(self, model):
        return self.fn(model)


def _plain(value):
    """A method parameter as JSON for the fingerprint: arrays as lists, anything else as its repr."""
    return value.tolist() if hasattr(value, "tolist") else repr(value)


# pool fingerprint entries not every search records (_pool_contents)
_OPTIONAL = ("dtype", "sample", "compressed", "base_sample", "spread", "tied", "group_of", "target_of")


def _pool_contents(pool) -> dict:
    """The pool's dtype= and a digest of the first bytes of 64 of each checkpoint's tensors (spread over the
    model: fine-tunes often share frozen embeddings): in-memory sources are labelled by position only, so
    [A, B, C] resumed as [C, B, A] (or a dtype= added) was accepted and the saved weights paired with other
    checkpoints. Each is compared only where both searches recorded it: a compressed pool records no dtype
    (a saved one forgets its dtype=) and samples its checkpoints otherwise (below); a distributed search's
    leader records its real pool's facts, less the samples where its ranks hold shards, so a state moves
    between one process and many as before. Whether the pool is compressed, and each
    tensor's format, is recorded by every CheckpointPool (a saved one keeps them): a search resumed on an
    int4 pool was accepted and its history mixed the scores of two merges. The base is sampled as the
    checkpoints are (base_sample), and a compressed pool's checkpoints by their
    formats, sizes as held unpaired, delta norms, errors and first scales (layout-free: a saved and loaded
    pool, or one on a CPU of the AVX2 path, holds its int4 codes otherwise): a search resumed on another base
    replayed merges of another model. Whether the pool writes its merged embedding into a target's own head
    (tied checkpoint files) is recorded too."""
    recorded = getattr(pool, "pool_contents", None)  # the distributed leader's stand-in: its real pool's
    if recorded is not None:
        return dict(recorded)
    store = getattr(pool, "_compressed", False)  # False: not a CheckpointPool
    base = getattr(pool, "_base", None)  # a compressed pool's is its store's
    out = {"base_sample": _sample([base[name] for name in sorted(base)])} if base else {}
    if hasattr(pool, "_tied_embedding"):  # whether the merged embedding is written into a target's own head: a
        out["tied"] = pool._tied_embedding()  # pool of files resumed as one of state dicts (or a saved pool) merged the head otherwise
    if store:
        h = hashlib.sha256()
        for name in store.names:
            h.update(repr((name, [(e.fmt, e.unpaired_nbytes) for e in store.entries[name]])).encode())
        sample = []
        for i in range(pool.num_checkpoints):
            es = [store.entries[name][i] for name in sorted(store.entries)]
            sample.append(_sample([t for e in es for t in (e.scales, e.exact) if t is not None],
                                  repr([(e.fmt, e.rel_error, e.delta_norm) for e in es]).encode()))
        return {"compressed": h.hexdigest()[:16], "sample": sample, **out}
    out["dtype"] = str(getattr(pool, "dtype", None))
    if store is None:
        out["compressed"] = None
    inputs = getattr(pool, "_inputs", None)
    if inputs:
        names = sorted(inputs)
        out["sample"] = [_sample([inputs[name][i] for name in names]) for i in range(pool.num_checkpoints)]
        # and values spread through each tensor: a checkpoint rewritten between a search and its resume with its
        # first values kept (another fine-tune of a frozen head, an edited file) mixed two models' scores in one
        # history, exit 0 (an audit). Old states lack it: compared only where both record it.
        out["spread"] = [_sample([inputs[name][i] for name in names], spread=True)
                         for i in range(pool.num_checkpoints)]
    return out


def _sample(tensors, extra: bytes = b"", spread: bool = False) -> str:
    """A digest of the first 16 values of at most 64 of tensors, spread over them (and of extra); spread=True:
    of 64 values spread evenly through each of them instead (a page each, where the pool maps its files)."""
    h = hashlib.sha256(extra)
    for t in tensors[::-(-len(tensors) // 64) or 1]:
        flat = t.detach().reshape(-1)
        if spread and flat.numel() > 64:
            flat = flat[torch.linspace(0, flat.numel() - 1, 64, dtype=torch.float64, device=flat.device).long()]
        h.update(flat[:16 if not spread else 64].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _state_path(path) -> Optional[str]:
    """state_path as a str (a pathlib.Path too; it failed after making the folders), or None for none."""
    if path is None:
        return None
    if not isinstance(path, (str, bytes, os.PathLike)):  # an int was taken for an open file descriptor
        raise InputError(f"state_path must be a path, got {short(path)}")
    path = os.fsdecode(os.fspath(path))
    if "\0" in path:
        raise InputError(f"state_path {short(path)}: holds a NUL character")
    return path or None


def _x0_values(x0, size: int) -> np.ndarray:
    """x0's numbers, flat; a tensor's checked first (a freed storage was read as heap garbage; a requires_grad
    one raised numpy's error) and its size before it is copied; booleans are not numbers."""
    if isinstance(x0, torch.Tensor):
        check_readable_values(x0, "x0")
        if x0.numel() != size:
            raise InputError(f"x0 must have {size} values (groups x checkpoints), got {x0.numel()}")
        if x0.dtype == torch.bool or x0.is_complex():
            raise TypeError
        x0 = x0.detach().cpu().double().numpy()
    if _has_bool(x0):  # numpy reads [True, 0.5] as [1.0, 0.5]
        raise TypeError
    values = np.asarray(x0)
    if values.dtype.kind not in "iuf" and values.dtype != object:
        raise TypeError
    if values.dtype == object and any(isinstance(v, (bool, np.bool_)) for v in values.reshape(-1)):
        raise TypeError
    return np.ravel(values.astype(float))


def _lock_state(path: Optional[str]) -> Optional[int]:
    """An exclusive lock on path + ".lock", or a one-line InputError: two searches sharing a state_path both
    ran, each rewriting the state, and one's work was silently lost. The lock file stays (removed, a third
    search could lock a new file while a second held the old one)."""
    if not path:
        return None
    check_replaceable(path)  # before a lock file is made beside it
    folder = kernel_folder(path)
    try:
        os.makedirs(folder, exist_ok=True)  # as _save_state would
    except OSError as exc:
        if not os.path.isdir(folder):  # (the lock file's "No such file or directory" named neither file nor cause)
            raise InputError(f"{path}: cannot create its folder {folder}: {exc.strerror or exc}; choose another "
                             "state_path") from None
        # there (made meanwhile, or a link to a folder): hold_lock names any other problem
    # optional: a finished search's state in a read-only folder is still read back (its result); one that
    # must go on fails where it saves, naming the file
    return hold_lock(path + ".lock", f"{path}: in use by another search (it holds {path}.lock); wait for it "
                                     "to finish or use another state_path", optional=True)


def _load_state(path: Optional[str], fingerprint: dict, shape) -> Optional[dict]:
    """The saved state, checked field by field (InputError naming the file otherwise), or None."""
    if not path or not os.path.exists(path):
        return None
    # a regular file only (a FIFO would block, /dev/zero never end); a long per-group search's state is big
    data = read_small(path, InputError, limit=1 << 33)
    try:
        state = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        # the advice names both cases: the file may be the user's own (notes, a torch.save checkpoint), which
        # "delete it" alone would have had deleted (an audit)
        if data[:1] == b"\x80":  # a pickle's first byte (protocol 2 on): what pymerge wrote before version 2, or any
            raise InputError(f"{path}: cannot read it as a search state: not JSON but a pickle (a torch.save "
                             "file, or an older pymerge's state); choose another state_path, or delete it if it is "
                             "an old search state") from None
        # most likely a write cut short (a full disk, a copy that stopped): not a pickle, as this said
        where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{path}: cannot read it as a search state: truncated or not JSON{where}; choose another "
                         "state_path, or delete it if it is this search's state (a write cut short) to start "
                         "afresh") from None
    digest = state.pop("digest", None) if isinstance(state, dict) else None  # absent in files before 2026-12-02
    if digest is not None and digest != _digest(state):
        raise InputError(f"{path}: saved search state was edited (its digest does not match its contents); "
                         "use another state_path or delete it")
    try:
        _check_header(state)
        saved, expected = state["fingerprint"], json.loads(json.dumps(fingerprint))  # as it reads back from disk
        if "method_params" not in saved and digest is not None:  # written without any (a digest says since
            saved = {**saved, "method_params": {}}  # 2026-12-02): none may be added on resume
        # an older pymerge's state lacks what it did not record: not compared, it resumed on other checkpoints or
        # into a bfloat16 build of the model, and was saved back unchecked, on every later resume too (an audit)
        unrecorded = [key for key in ("method_params", "objective", "model", "pool") if key not in saved]
        if unrecorded:
            raise InputError(f"{path}: saved search state was written by an older pymerge, which did not record the "
                             f"{', '.join(unrecorded)} it searched: it cannot be checked against this search; "
                             "use another state_path or delete it")
        if "evaluate" not in saved or "evaluate" not in expected:  # named in both searches, or not compared
            saved = {k: v for k, v in saved.items() if k != "evaluate"}
            expected.pop("evaluate", None)
        if isinstance(saved["pool"], dict):  # dtype and sample: compared where both searches recorded them
            both = set(saved["pool"]) & set(expected["pool"])
            saved = {**saved, "pool": {k: v for k, v in saved["pool"].items() if k in both or k not in _OPTIONAL}}
            expected["pool"] = {k: v for k, v in expected["pool"].items() if k in both or k not in _OPTIONAL}
            if _same_files(saved["pool"].get("sources"), expected["pool"].get("sources")):
                saved = {**saved, "pool": {**saved["pool"], "sources": expected["pool"]["sources"]}}
                # kept as now spelled: the saved spelling's link may go (it was refused once its link was removed)
                state["fingerprint"]["pool"]["sources"] = expected["pool"]["sources"]
        if saved != expected:
            diff, hint = sorted(k for k in set(expected) | set(saved) if saved.get(k) != expected.get(k)), ""
            if "pool" in diff and isinstance(saved.get("pool"), dict):  # which part: "pool" alone left users guessing
                sub = sorted(k for k in set(saved["pool"]) | set(expected["pool"])
                             if saved["pool"].get(k) != expected["pool"].get(k))
                diff[diff.index("pool")] = f"pool ({', '.join(sub)})"
                if "sources" in sub and any(os.sep in str(x) for x in saved["pool"].get("sources") or ()):
                    hint = (" (sources are compared by their paths, which pymerge search makes absolute: a copied or "
                            "moved project is another search)")
            raise InputError(f"{path}: saved search state is from a different search (differs in {', '.join(diff)})"
                             f"{hint}; use another state_path or delete it")
        _check_history(state, shape)
    except InputError:
        raise  # already names the file
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a valid search state: {exc}") from None
    return state


def _same_files(saved, expected) -> bool:
    """Whether two lists of source labels name the same files, each pair spelled alike or found to be one file on
    disk: a path through a symlink and its target (pymerge search resolved a config's folder by abspath until
    2026-12-07, by realpath since, so an upgrade refused a search named through a symlinked folder; an audit)."""
    if not isinstance(saved, list) or not isinstance(expected, list) or len(saved) != len(expected):
        return False
    # (a label that is no file, a saved pool's, is the same only as spelled)
    return all(a == b or (isinstance(a, str) and isinstance(b, str) and same_place(a, b))
               for a, b in zip(saved, expected))


def _check_objectives(history: List[dict], objective, path: str) -> None:
    """Each saved objective must be objective(its saved scores): objective= is fingerprinted by name, every lambda's
    is "<lambda>", and a resume with another one mixed two objectives' values in one history (an audit)."""
    for r in history:
        try:
            again = _number(objective(dict(r["scores"])))
        except Exception as exc:  # (a KeyError: another objective's tasks; a review)
            raise InputError(f"{path}: this search's objective raised {type(exc).__name__} ({short(str(exc))}) on "
                             f"saved candidate {r['eval']}'s scores: the state is from a search with another "
                             "objective=; use another state_path or delete it") from None
        if again is None or not (again == r["objective"] or (math.isnan(again) and math.isnan(r["objective"]))):
            raise InputError(f"{path}: saved candidate {r['eval']} has objective {r['objective']!r}, but this "
                             f"search's objective of its scores is {short(again)}: the state is from a search with "
                             "another objective=; use another state_path or delete it")


def _digest(state: dict) -> str:
    """What catches an edit of a saved state that replaying cannot (the last generation's objectives)."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _check_header(state) -> None:
    """The top level: the keys, the version, a fingerprint object; raises ValueError saying what is wrong."""
    if not isinstance(state, dict) or set(state) != {"version", "fingerprint", "history", "generation", "x0_done"}:
        raise ValueError("expected an object with version, fingerprint, history, generation and x0_done")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"version {state['version']!r}; this pymerge reads version {STATE_VERSION}"[:200])
    if not isinstance(state["fingerprint"], dict):
        raise ValueError("fingerprint must be an object")


def _check_history(state, shape) -> None:
    """Types, shapes and ranges of every other field; raises ValueError saying which."""
    def number(v, what, finite=True):
        # an int past float's range (JSON has no limit) failed later, in numpy, with a TypeError
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, int) and abs(v) >= 2**1023)
                or (finite and not math.isfinite(v))):
            raise ValueError(f"{what} must be a{' finite' if finite else ''} number, got {short(v)}"[:200])
        return v

    def integer(v, what, lo=0):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}"[:200])
        return v

    def array(v, want, what):
        if not isinstance(v, list):
            raise ValueError(f"{what} must be a list of numbers")
        rows = v if len(want) == 2 else [v]
        if len(want) == 2 and len(rows) != want[0]:
            raise ValueError(f"{what} must have {want[0]} rows")
        for row in rows:
            if not isinstance(row, list) or len(row) != want[-1]:
                raise ValueError(f"{what} must have shape {list(want)}")
            row[:] = [float(number(x, what)) for x in row]  # ints past 2**64 made numpy object arrays

    g, n, dim = shape
    generation = integer(state["generation"], "generation")
    if not isinstance(state["x0_done"], bool):
        raise ValueError("x0_done must be true or false")
    history = state["history"]
    if not isinstance(history, list) or (generation and not state["x0_done"]) or (state["x0_done"] != bool(history)):
        raise ValueError("history does not fit generation and x0_done")
    previous = 0
    for i, r in enumerate(history):
        what = f"history[{i}]"
        if not isinstance(r, dict) or set(r) != _ENTRY_KEYS:
            raise ValueError(f"{what} must be an object with {', '.join(sorted(_ENTRY_KEYS))}")
        if integer(r["eval"], f"{what}.eval") != i:
            raise ValueError(f"{what}.eval is {r['eval']}, expected {i}")
        gen = integer(r["generation"], f"{what}.generation")
        if gen < previous or gen > generation or (gen == 0) != (i == 0):
            raise ValueError(f"{what}.generation {gen} is out of order")
        previous = gen
        number(r["objective"], f"{what}.objective", finite=False)  # evaluate may return NaN or inf
        if not isinstance(r["scores"], dict) or not r["scores"]:
            raise ValueError(f"{what}.scores must be a non-empty object")
        for k, v in r["scores"].items():
            number(v, f"{what}.scores[{k!r}]", finite=False)
        if r["scores"].keys() != history[0]["scores"].keys():  # as optimize requires of new candidates (a state
            # without a digest was not checked: the report then failed with a KeyError after history.json)
            raise ValueError(f"{what}.scores has tasks {short(sorted(r['scores']))}, candidate 0 "
                             f"{short(sorted(history[0]['scores']))}; every candidate must score the same tasks")
        array(r["weights"], (n,) if g == 1 else (g, n), f"{what}.weights")
        array(r["x"], (dim,), f"{what}.x")
        for key in ("materialize_s", "evaluate_s"):
            if number(r[key], f"{what}.{key}") < 0:
                raise ValueError(f"{what}.{key} is negative")


def _check_writable(path: Optional[str]) -> None:
    """InputError naming the state file where its folder cannot take it (made if missing, as _save_state makes it)."""
    if not path:
        return
    folder = kernel_folder(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with held_signals(repeat_acts=False):  # made and removed, or neither (a Ctrl-C inside left it; an audit)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".", suffix=".probe"):
                pass
    except OSError as exc:
        raise InputError(f"{path}: cannot write the search state there ({exc.strerror or exc})") from None


def _stamp(path: Optional[str]) -> Optional[tuple]:
    """What tells one file at path from another (a link itself, as replace_file replaces it), or None: nothing."""
    try:
        st = os.lstat(path) if path else None
    except (OSError, ValueError):
        return None
    return st and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _save_state(path: Optional[str], state: dict, stamp: Optional[list] = None) -> None:
    """stamp: [the _stamp of the file this search last read or wrote at path], checked first and updated: a file
    that another program put there meanwhile (another search's report saved into that folder) is not replaced
    (it was, silently; an audit)."""
    if not path:
        return
    # the digest is of the state as it reads back (_digest); the file is the text that read it, in the state's own
    # order (an objective summing the scores in order gives other bits in another: a review), the digest appended:
    # one encoding fewer (a save of 20,000 candidates took 2.5 s)
    text = json.dumps(state)  # "{...}": the state's five keys (json.dump's encoder is Python's: 3x slower)
    text = f'{text[:-1]}, "digest": "{_digest(json.loads(text))}"}}'

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:  # NaN scores are written as NaN, which json reads back
            fh.write(text)
    now = _stamp(path)
    if stamp is not None and now is not None and now != stamp[0]:  # (one deleted meanwhile: nothing to lose)
        raise InputError(f"{path}: another program wrote this file while the search ran (another search's "
                         "results?); it is not overwritten, and this search's state is not saved. Give each search a "
                         "state_path of its own, outside any search's out")
    try:
        os.makedirs(kernel_folder(path), exist_ok=True)
        replace_file(path, write)  # a crash mid-write leaves the previous generation's state
    except OSError as exc:  # it named replace_file's temporary file
        raise InputError(f"{path}: cannot write the search state ({exc.strerror or exc})") from None
    if stamp is not None:
        stamp[0] = _stamp(path)
