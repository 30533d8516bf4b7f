"""The demo's experiment, built on the public API: HF folders -> CheckpointPool -> live model ->
exact match -> CMA-ES on validation -> baselines and the best merge, scored on test.

    import pymerge.search
    from pymerge.demo import run
    s = run.Settings(seed=1)
    paths = run.build_checkpoints("out/checkpoints", s)          # trains, or reuses a matching cache
    pool, model, evaluate = run.evaluation(paths, run.eval_sets(s, "val"))
    result = pymerge.search.optimize(pool, evaluate, model=model, budget=100)
"""
import contextlib
import errno
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from pymerge.demo import model as model_mod, tasks as tasks_mod, train as train_mod
from pymerge.demo.model import TinyLlama, save_hf
from pymerge.demo.tasks import (TASKS, Batch, generate, hits, make_batch, paired_standard_error, score, split_seed,
                                standard_error)
from pymerge.demo.train import default_config, pool_runs, pretraining, train_pool
from pymerge.errors import InputError
from pymerge.io.files import (kernel_folder, missing_folders, new_file_mode, remove_empty_folders, replace_file,
                              replace_file_prefix)
from pymerge.pool import CheckpointPool
from pymerge.search import macro_average, optimize, pareto_front
from pymerge.stop_signals import held_signals


def default_eval_dtype() -> torch.dtype:
    """The live model's dtype: bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX: 2-3x
    faster than float32 there), float32 elsewhere (an AVX2 CPU emulates bfloat16 matmuls: 5x slower
    than float32 on a Zen 3 EPYC, which took the default demo from under 5 minutes to 7.7)."""
    native = any(getattr(torch.cpu, probe, lambda: False)()
                 for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


SEARCH_STEP = 0.05  # CMA-ES's initial step (sigma0) around the soup: demo_diagnosis.md §11-§12


@dataclass(frozen=True)
class Settings:
    """Everything that decides the checkpoints and the evaluation sets."""
    seed: int = 0
    pretrain_steps: int = 500
    run_steps: int = 150
    val_size: int = 1000    # examples per task
    test_size: int = 3000   # examples per task
    pool: str = "stages"    # train.POOLS

    @classmethod
    def quick(cls, seed: int = 0, pool: str = "stages") -> "Settings":
        return cls(seed=seed, pretrain_steps=80, run_steps=16, val_size=100, test_size=200, pool=pool)


def eval_examples(s: Settings, split: str) -> Dict[str, List[Tuple[str, str]]]:
    n = s.val_size if split == "val" else s.test_size
    return {t: generate(t, n, split_seed(s.seed, split, t)) for t in TASKS}


def eval_sets(s: Settings, split: str) -> Dict[str, Batch]:
    return batches(eval_examples(s, split))


def batches(examples: Dict[str, List[Tuple[str, str]]]) -> Dict[str, Batch]:
    return {t: make_batch(e) for t, e in examples.items()}


def unseen_in_validation(val: Dict[str, List[Tuple[str, str]]], test: Dict[str, List[Tuple[str, str]]]
                         ) -> Dict[str, torch.Tensor]:
    """Per task, which test examples (eval_examples) have a prompt that no validation example has ([test_size]
    bool). Validation and test are independent draws, so on small prompt spaces they share prompts (about half
    of addition's and subtraction's test set at the default sizes): scores on the rest show what the search,
    which saw validation, does on prompts it never scored."""
    seen = {t: {prompt for prompt, _ in examples} for t, examples in val.items()}
    return {t: torch.tensor([prompt not in seen[t] for prompt, _ in examples], dtype=torch.bool)
            for t, examples in test.items()}


MARKER = ".pymerge-demo"  # in an output folder the demo made: what it may replace there
_OWN = {MARKER, "checkpoints", "merged", "results.json", "demo.png"}


def _merge_tmp_prefix(folder: str) -> str:
    """The temporary folders _write_merge makes beside `folder` (and sweeps at its next run)."""
    return f".{os.path.basename(folder)}.pymerge-demo-tmp-"


# what a killed run leaves in OUT: _write_merge's folders (and an older demo's merged.tmp*), replace_file's
# results.json / demo.png temporaries (a claimed folder holding them is still the demo's)
_LEFTOVERS = (_merge_tmp_prefix("merged"), "merged.tmp", "results.json.tmp", "demo.png.tmp",
              *(replace_file_prefix(n) for n in ("results.json", "demo.png")))


def claim_out(out: str) -> int:
    """Makes `out` the demo's, or raises InputError: an output folder must be absent, empty or one the
    demo wrote (its marker; or, from before the marker, its results.json or checkpoint manifest), and
    what it replaces there must be its own (checkpoints/ with its manifest, merged/ with its weights).
    Returns the marker's descriptor, holding an exclusive lock on it: another demo into `out` is
    refused until it is closed (experiment() holds it for the whole run)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"{out}: exists and is not a folder; choose another --out")
    marker = os.path.join(out, MARKER)
    # a running demo's folder is mid-write: refuse it as in use before judging what it holds
    lock = _lock(marker) if os.path.lexists(marker) else None
    try:
        _check_out(out)
        os.makedirs(out, exist_ok=True)
        lock = lock if lock is not None else _lock(marker)
        try:  # a folder made read-only failed only at the merge's write, after the whole search
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            raise InputError(f"{out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
        os.ftruncate(lock, 0)
        os.write(lock, b"written by pymerge demo: it replaces checkpoints/, merged/, results.json and demo.png here\n")
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return lock


def _some(names: List[str]) -> str:
    """The first three of names, for an error line."""
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _lock(marker: str) -> int:
    """The marker, opened (created if absent; never through a link) and locked, or InputError."""
    try:
        fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # the folder (or the marker) is not writable
            where = (f"{marker}: cannot be opened for writing" if os.path.lexists(marker) else
                     f"{os.path.dirname(marker)}: cannot write there")
            raise InputError(f"{where} ({exc.strerror}); choose another --out") from None
        why = "a link" if exc.errno == errno.ELOOP else exc.strerror
        raise InputError(f"{marker}: is not a file the demo wrote ({why}); move it or choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when fd closes, or the process ends
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InputError(f"{os.path.dirname(marker)}: is in use by another pymerge demo; wait for it to "
                             "finish or choose another --out") from None
        raise
    return fd


def _check_out(out: str) -> None:
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    ours = not entries or MARKER in entries or _is_ours(os.path.join(out, "results.json"), _RESULTS) \
        or _is_ours(os.path.join(out, "checkpoints", "manifest.json"), _MANIFEST)
    extra = {e for e in entries - _OWN if not e.startswith(_LEFTOVERS)}  # a killed run's temporaries
    if not ours or extra:
        strange = sorted(extra) or sorted(entries)
        raise InputError(f"{out}: holds {_some(strange)}, which the demo "
                         "did not write; choose an empty or new --out (the demo replaces what is in its folder)")
    for sub, own_file in (("checkpoints", "manifest.json"), ("merged", "merge_weights.json")):
        path = os.path.join(out, sub)
        # under the marker, checkpoints/ without its manifest is a save that was interrupted, and merged/ without
        # its weights a removal that was (refused, every later demo into OUT failed: an audit); still ours
        # (_check_merged still refuses any file in merged/ that the demo does not write)
        interrupted = MARKER in entries
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)
                                      or (os.listdir(path) and not interrupted
                                          and not os.path.isfile(os.path.join(path, own_file)))):
            raise InputError(f"{path}: is not a folder the demo wrote (no {own_file}); move it or choose another --out")
    _check_merged(os.path.join(out, "merged"))
    for name in ("results.json", "demo.png"):
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isfile(path) or os.path.islink(path):
            raise InputError(f"{path}: is not a file the demo wrote; move it or choose another --out")


def _check_merged(merged: str) -> None:
    """merged/ holds only what the demo writes there: it replaces the whole folder, and a README or tokenizer put
    beside it was deleted. At the start and again just before it is replaced or removed (a file put there during
    the minutes of training or search was deleted, exit 0: an audit)."""
    strange = sorted(set(os.listdir(merged)) - _MERGED_FILES) if os.path.isdir(merged) and \
        not os.path.islink(merged) else []
    if strange:
        raise InputError(f"{merged}: holds {_some(strange)}, which the "
                         "demo did not write (it replaces this folder); move them or choose another --out")


# What a demo from before the marker wrote, and no one else's JSON is likely to hold: a user's
# results.json with a "summary" key alone was taken for the demo's, and overwritten.
_RESULTS = {"summary": dict, "details": dict, "search": list}
_SUMMARY = ("best_single", "best_single_name", "optimized", "optimized_weights", "per_task", "settings")
_MANIFEST = {"fingerprint": str, "settings": dict, "checkpoints": list}
_MERGED_FILES = {"config.json", "model.safetensors", "merge_weights.json"}  # what _write_merge's save_hf writes
_CHECKPOINT_FILES = {"config.json", "model.safetensors", "training_run.json"}  # what build_checkpoints' save_hf writes


def _is_ours(path: str, fields: Dict[str, type]) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not all(isinstance(data.get(k), t) for k, t in fields.items()):
        return False
    return fields is not _RESULTS or all(k in data["summary"] for k in _SUMMARY)


def _fingerprint(s: Settings) -> str:
    """Settings, the runs, the model config, the code that trains and torch's version: a cache key."""
    key = {"settings": asdict(s), "pretrain": asdict(pretraining(s.pretrain_steps)),
           "runs": [asdict(r) for r in pool_runs(s.run_steps, s.pool)], "config": asdict(default_config()),
           "torch": torch.__version__,
           "code": [hashlib.sha256(inspect.getsource(m).encode()).hexdigest() for m in (model_mod, tasks_mod, train_mod)]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def build_checkpoints(folder: str, s: Settings, progress: Optional[Callable[[int], None]] = None,
                      log=print, replacing: Callable[[], None] = lambda: None) -> List[str]:
    """Trains the pool and writes one HF folder per run under `folder` (the pretrained model under
    folder/pretrained); a folder written by the same settings and code is reused as it is. replacing() is
    called just before an old cache is removed (what was made from it stops describing the checkpoints)."""
    runs = pool_runs(s.run_steps, s.pool)
    paths = [os.path.join(folder, f"{i:02d}-{r.name.replace(':', '-').replace('>', '-')}") for i, r in enumerate(runs)]
    manifest = os.path.join(folder, "manifest.json")
    fp = _fingerprint(s)
    # the config too: a changed rope_theta was reused as "the same settings" (other scores), a broken one a traceback
    files = [os.path.join(p, f) for p in [os.path.join(folder, "pretrained")] + paths
             for f in ("model.safetensors", "config.json")]

    def digests() -> Dict[str, str]:
        return {os.path.relpath(f, folder): _sha256(f) for f in files}
    try:
        with open(manifest, encoding="utf-8") as fh:
            saved = json.load(fh)
        if saved.get("fingerprint") == fp:
            # by content too: a checkpoint changed in place (same size) was reused, and every score with it
            now = digests()
            if saved.get("sha256") == now:
                log(f"reusing the checkpoints in {folder} (same settings and code)")
                return paths
            recorded = saved.get("sha256")  # a manifest of fewer files (no config.json's), or edited by hand
            older = not isinstance(recorded, dict) or set(recorded) != set(now)
            log(f"the checkpoints in {folder} " + ("were written by an older pymerge demo" if older else
                "changed since they were written") + ": training them again")
    except (OSError, ValueError, AttributeError):
        pass
    _remove_stale(folder, manifest, paths, remove=False)  # a folder not ours is refused before minutes of training
    trained = train_pool(default_config(), pretraining(s.pretrain_steps), runs, seed=s.seed, progress=progress)
    # removed once the new ones are trained (in memory): an interrupted training kept the old cache; checked
    # again first (a file put there during training), so that a refusal leaves the results beside their checkpoints
    _remove_stale(folder, manifest, paths, remove=False)
    replacing()
    _remove_stale(folder, manifest, paths)
    try:
        save_hf(trained.pretrained, os.path.join(folder, "pretrained"))
        for path, run in zip(paths, runs):
            save_hf(trained.models[run.name], path, extra_files={"training_run.json": asdict(run)})
        with open(manifest, "w", encoding="utf-8") as fh:
            json.dump({"fingerprint": fp, "settings": asdict(s), "checkpoints": paths,
                       "sha256": digests()}, fh, indent=1)
    except BaseException:
        # a save cut short (a full disk, Ctrl-C): the checkpoints written so far and a truncated file stayed,
        # the disk still full (an audit); the next run retrained anyway
        with contextlib.suppress(Exception):
            _remove_stale(folder, manifest, paths)
        raise
    return paths


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove_stale(folder: str, manifest: str, paths: List[str], remove: bool = True) -> None:
    """A stale cache (or a save that was interrupted before its manifest): removes what this function
    writes there (the pretrained model, the runs' folders, those its manifest lists), nothing else;
    remove=False: only the checks, which refuse a folder that holds what the demo did not write."""
    if not os.path.isdir(folder):
        return
    try:
        with open(manifest, encoding="utf-8") as fh:
            listed = json.load(fh).get("checkpoints", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    if not isinstance(listed, list):  # a manifest edited by hand ("checkpoints": null) was a TypeError traceback
        listed = []
    claimed = os.path.isfile(os.path.join(kernel_folder(folder), MARKER))
    if os.listdir(folder) and not os.path.isfile(manifest) and not claimed:  # build_checkpoints called directly
        raise InputError(f"{folder}: is not a folder the demo wrote (no manifest.json); move it or choose another")
    names = ["pretrained"] + [os.path.basename(str(p)) for p in list(listed) + list(paths)]
    folders = [os.path.join(folder, n) for n in names if n not in ("", ".", "..")]  # "x/", "..": not ours
    for path in folders:  # all checked before any is removed: a README put in one was deleted with it
        strange = sorted(set(os.listdir(path)) - _CHECKPOINT_FILES) if os.path.isdir(path) and \
            not os.path.islink(path) else []
        if strange:
            raise InputError(f"{path}: holds {_some(strange)}, which the "
                             "demo did not write (it retrains and replaces this folder); move them or choose another "
                             "--out")
        if os.path.lexists(path) and not os.path.islink(path) and not os.path.isdir(path):
            raise InputError(f"{path}: is not a folder the demo wrote; move it or choose another --out")
    if not remove:
        return
    for path in folders:
        if os.path.islink(path):  # the link only: saving through it overwrote the folder it points to
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    if os.path.lexists(manifest):  # a link too (writing through it would replace its target)
        os.remove(manifest)


def evaluation(paths: List[str], sets: Dict[str, Batch], dtype: Optional[torch.dtype] = None
               ) -> Tuple[CheckpointPool, TinyLlama, Callable[[torch.nn.Module], Dict[str, float]]]:
    """The pool over the checkpoints, a live model (dtype: default_eval_dtype()) to materialize merges
    into, and evaluate(model): exact-match accuracy per task on `sets` (greedy decoding)."""
    dtype = dtype or default_eval_dtype()
    pool = CheckpointPool(paths)
    with open(os.path.join(paths[0], "config.json"), encoding="utf-8") as fh:
        config = model_mod.LlamaConfig.from_hf(json.load(fh))
    live = TinyLlama(config).to(dtype).eval()
    return pool, live, lambda m: score(m, sets)


def greedy_soup(pool, model, evaluate, singles: List[float]) -> np.ndarray:
    """Wortsman et al.'s greedy soup (their Algorithm 1) on validation: checkpoints best-first (equal scores: the
    later one first), each kept if the uniform average with it scores at least as well; one that does not is
    left out and the next is tried."""
    n = pool.num_checkpoints
    order = np.argsort(singles, kind="stable")[::-1]
    chosen, best = [int(order[0])], singles[order[0]]
    for i in order[1:]:
        w = np.zeros(n)
        w[chosen + [int(i)]] = 1.0 / (len(chosen) + 1)
        pool.materialize(w, into=model)
        s = macro_average(evaluate(model))
        if s >= best:
            chosen.append(int(i))
            best = s
    w = np.zeros(n)
    w[chosen] = 1.0 / len(chosen)
    return w


def experiment(out: str, s: Settings, budget: int, per_layer: bool = False, log=print,
               eval_dtype: Optional[torch.dtype] = None) -> Dict:
    """The whole demo; writes under `out` and returns the summary."""
    eval_dtype = eval_dtype or default_eval_dtype()
    t0, cpu0 = time.perf_counter(), time.process_time()  # CPU time too: wall time means little on a shared machine
    made = missing_folders(out)  # the folders claim_out makes (OUT and its parents)
    lock = None
    try:
        # before any training: a folder of someone else's is refused, not emptied. The lock taken and kept, or
        # neither: a Ctrl-C as it was taken leaked it, and every later demo into OUT in this process was refused
        # as 'in use by another pymerge demo' (an audit).
        with held_signals(repeat_acts=False):
            lock = claim_out(out)
        return _experiment(out, s, budget, per_layer, log, eval_dtype, t0, cpu0)
    except BaseException:
        if lock is not None:
            _remove_if_only_marker(out)
        remove_empty_folders(made)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # on every way out (an error, Ctrl-C): the next demo may have the folder


def _remove_results(out: str) -> None:
    """merged/, results.json and demo.png of an earlier run, before the checkpoints they describe are replaced:
    a run stopped after that left them beside the new checkpoints (merge_weights.json naming ../checkpoints/*,
    which no longer summed to the merged model). claim_out checked that they are the demo's."""
    stashes = [n for n in os.listdir(out) if n.startswith(_merge_tmp_prefix("merged"))]  # a killed _write_merge's
    _check_merged(os.path.join(out, "merged"))
    for name in ["results.json", "demo.png", "merged"] + stashes:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _remove_if_only_marker(out: str) -> None:
    """A run stopped before any checkpoint was written (or whose save failed and removed them) leaves no marker
    in a folder holding nothing else (experiment then removes the folder if the run made it), not an
    empty-looking folder to puzzle over."""
    try:
        with contextlib.suppress(OSError):  # the checkpoints' folder, where empty
            os.rmdir(os.path.join(out, "checkpoints"))
        if os.listdir(out) == [MARKER]:
            os.remove(os.path.join(out, MARKER))  # still locked by us: no other demo holds it
    except OSError:
        pass  # best effort: the next demo accepts the folder as the demo's anyway


def _experiment(out, s, budget, per_layer, log, eval_dtype, t0, cpu0) -> Dict:
    from tqdm import tqdm

    from pymerge.progress import SafeStream
    runs = pool_runs(s.run_steps, s.pool)
    total = pretraining(s.pretrain_steps).steps + sum(r.steps for r in runs)
    log(f"training: a shared pretraining run, then {len(runs)} runs ({total} steps in all)")
    with tqdm(total=total, desc="training", unit="step", disable=None, file=SafeStream()) as bar:
        paths = build_checkpoints(os.path.join(out, "checkpoints"), s, progress=bar.update, log=log,
                                  replacing=lambda: _remove_results(out))
    t_train = time.perf_counter() - t0
    val_examples, test_examples = eval_examples(s, "val"), eval_examples(s, "test")
    val, test = batches(val_examples), batches(test_examples)
    unseen = unseen_in_validation(val_examples, test_examples)
    pool, model, evaluate = evaluation(paths, val, eval_dtype)
    log(pool.describe())
    names = [r.name for r in runs]
    n = len(names)

    def merge(w) -> None:
        pool.materialize(w, into=model, groups="layer" if np.ndim(w) == 2 else None)

    def on_val(w) -> Dict[str, float]:
        merge(w)
        return score(model, val)

    def on_test(w) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, torch.Tensor]]:
        """Scores on the whole test set and on its examples whose prompts validation lacks, and the
        per-example exact matches (for paired standard errors)."""
        merge(w)
        per_example = hits(model, test)
        return ({t: float(h.float().mean()) for t, h in per_example.items()},
                {t: float(h[unseen[t]].float().mean()) if unseen[t].any() else None
                 for t, h in per_example.items()}, per_example)

    rows: Dict[str, Dict] = {}
    for i, name in enumerate(names):
        rows[name] = {"val": on_val(np.eye(n)[i]), "weights": np.eye(n)[i]}
    singles = [macro_average(rows[nm]["val"]) for nm in names]
    uniform = np.full(n, 1.0 / n)
    rows["uniform merge"] = {"val": on_val(uniform), "weights": uniform}
    soup = greedy_soup(pool, model, evaluate, singles)
    rows["greedy soup"] = {"val": on_val(soup), "weights": soup}

    groups = pool.num_groups("layer") if per_layer else 1
    log(f"searching {n}{f' x {groups} layer groups' if per_layer else ''} merge weights with CMA-ES on validation "
        f"({budget} candidates), starting from the greedy soup")
    # The start: the greedy soup's checkpoints at 0.5, the rest at 0 (weights are normalized to sum to
    # one, so only ratios count). Starting from the uniform merge drags in the poor runs, and 120
    # candidates in 9+ dimensions do not climb out of there as far as the soup already is. A local step
    # (SEARCH_STEP): the gains past the soup are a tenth to a quarter of a specialist's weight, and a step
    # of 0.2 mostly sampled candidates giving specialists so much that they forget the other tasks.
    x0 = np.tile(np.where(soup > 0, 0.5, 0.0), groups)
    t1 = time.perf_counter()
    with tqdm(total=budget, desc="search", unit="merge", disable=None, file=SafeStream()) as bar:
        def counted(m):
            bar.update(1)
            return evaluate(m)
        res = optimize(pool, counted, model=model, budget=budget, seed=s.seed, groups="layer" if per_layer else None,
                       x0=x0, sigma0=SEARCH_STEP, log=None)
    t_search = time.perf_counter() - t1
    rows["optimized merge"] = {"val": res.best_scores, "weights": res.best_weights}
    for r in rows.values():
        r["test"], r["test_unseen"], r["test_hits"] = on_test(r["weights"])
    best_single = names[int(np.argmax(singles))]  # picked on validation, as one would without a test set

    merged = os.path.join(out, "merged")
    with held_signals():  # merged/, results.json and demo.png of one run: a Ctrl-C between them mixed two runs'
        _write_merge(pool, model.config, res.best_weights, merged)
        summary = _summary(rows, names, best_single, {t: s.test_size for t in TASKS}, unseen)
        summary.update(train_seconds=round(t_train, 1), search_seconds=round(t_search, 1),
                       seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(time.process_time() - cpu0, 1),
                       evaluations=len(res.history), per_layer=per_layer, eval_dtype=str(eval_dtype).split(".")[-1],
                       seed=s.seed, settings=asdict(s), merged=merged, out=out)
        details = {k: {"val": v["val"], "test": v["test"], "test_unseen": v["test_unseen"],
                       "weights": np.asarray(v["weights"]).tolist()}
                   for k, v in rows.items()}

        def write(tmp):  # replaced whole: written in place, a kill left it truncated
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"summary": summary, "details": details, "search": [
                    {"scores": h["scores"], "weights": h["weights"]} for h in res.history]}, fh, indent=1)
        # the old plot goes first: a plot that failed (a full disk) or was not drawn (no matplotlib) left the last
        # run's beside this run's results (an audit)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "demo.png"))
        replace_file(os.path.join(out, "results.json"), write)
        plotted = _plot(os.path.join(out, "demo.png"), rows, names, best_single, res.history)
    _print_table(rows, names, best_single, summary, log)
    if not plotted:
        log("(matplotlib is not installed: no demo.png; pip install matplotlib)")
    return summary


def _write_merge(pool, config, weights, folder: str) -> None:
    """The best merge as an HF folder, materialized in float32 from the same pool."""
    from pymerge.io.writer import _exchange
    merged = TinyLlama(config)
    pool.materialize(weights, into=merged, groups="layer" if np.ndim(weights) == 2 else None)
    parent = os.path.dirname(folder) or "."
    prefix = _merge_tmp_prefix(folder)  # a name no user picks: swept below
    for stale in sorted(os.listdir(parent)):  # a killed demo's (one demo per folder at a time: claim_out's lock)
        path = os.path.join(parent, stale)
        if not (stale.startswith(prefix) and os.path.isdir(path)):
            continue
        if stale.endswith("-old") and not os.path.lexists(folder):  # killed between its two renames below
            os.rename(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)
    _check_merged(folder)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)  # a new name
    mode = new_file_mode()  # mkdtemp's 0700 would stay on the merged folder; 0755 ignored a umask of 077
    os.chmod(tmp, mode | (mode & 0o444) >> 2)  # a folder's x where its r is
    old = tmp + "-old"
    try:
        # the checkpoints relative to this folder (as given they were relative to where the demo ran: read
        # from elsewhere, they named nothing); ../checkpoints/<run> stays right when the demo folder moves
        checkpoints = [os.path.relpath(label, folder) for label in pool.labels]
        try:
            save_hf(merged, tmp, extra_files={"merge_weights.json": {"weights": np.asarray(weights).tolist(),
                                                                     "checkpoints": checkpoints}})
        except OSError as exc:  # named the hidden temporary folder, which the user never chose (an audit)
            if exc.filename is not None and os.path.dirname(exc.filename) == tmp:
                exc.filename = os.path.join(folder, os.path.basename(exc.filename))
            raise
        # the demo's own folder (claim_out checked it), swapped for the new one in one step where the system
        # can; else moved aside first. Deleted first, a kill before the rename left no merged model at all.
        if not (os.path.isdir(folder) and not os.path.islink(folder) and _exchange(Path(tmp), Path(folder))):
            if os.path.isdir(folder) and not os.path.islink(folder):
                os.rename(folder, old)
            os.replace(tmp, folder)
    except BaseException:
        if os.path.isdir(old) and not os.path.lexists(folder):  # interrupted between the two renames
            os.rename(old, folder)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old model
        if os.path.lexists(folder):  # a second interrupt during the put-back above: the stash stays (swept back)
            shutil.rmtree(old, ignore_errors=True)


BASELINES = ("best_single", "uniform", "greedy_soup")


def _summary(rows, names, best_single, sizes, unseen) -> Dict:
    """unseen: per task, the test examples whose prompts validation lacks (a bool mask)."""
    row_of = {"best_single": best_single, "uniform": "uniform merge", "greedy_soup": "greedy soup",
              "optimized": "optimized merge"}
    unseen_sizes = {t: int(m.sum()) for t, m in unseen.items()}

    def paired(mask=None):  # the standard error of each margin, on the test examples mask keeps (or all)
        def hits_of(row):
            return {t: h if mask is None else h[mask[t]] for t, h in rows[row]["test_hits"].items()}
        return {k: paired_standard_error(hits_of("optimized merge"), hits_of(row_of[k])) for k in BASELINES}
    test = {k: v["test"] for k, v in rows.items()}
    unseen_scores = {k: v["test_unseen"] for k, v in rows.items()}
    w = np.asarray(rows["optimized merge"]["weights"])
    groups = w.reshape(-1, len(names))  # one row per layer group (one row without --per-layer)
    s = {
        "best_single": macro_average(test[best_single]), "best_single_name": best_single,
        "best_single_in_hindsight": max(macro_average(test[nm]) for nm in names),
        "uniform": macro_average(test["uniform merge"]), "greedy_soup": macro_average(test["greedy soup"]),
        "optimized": macro_average(test["optimized merge"]),
        "optimized_val": macro_average(rows["optimized merge"]["val"]),
        "per_task": {k: test[k] for k in (best_single, "uniform merge", "greedy soup", "optimized merge")},
        "test_standard_error": standard_error(test["optimized merge"], sizes),
        "optimized_weights": w.tolist(),
        # a checkpoint counts where its weight is positive (the second count: over 0.01) in any layer group
        "nonzero_weights": int(np.sum((groups > 0).any(axis=0))),
        "weights_over_0_01": int(np.sum((groups > 0.01).any(axis=0))),
        "checkpoints": len(names),
    }
    for k in BASELINES:
        s[f"margin_over_{k}"] = s["optimized"] - s[k]
    # each margin's own standard error: both merges are scored on the same examples, so the noise in their
    # difference is that of the examples on which they disagree
    s["paired_standard_errors"] = paired()
    # the same on the test examples whose prompts validation lacks (unseen_in_validation); None where a
    # task has none (tiny sets)
    s["test_unseen"] = None if not all(unseen_sizes.values()) else {
        "sizes": unseen_sizes, "standard_error": standard_error(unseen_scores["optimized merge"], unseen_sizes),
        "paired_standard_errors": paired(unseen),
        **{k: macro_average(unseen_scores[row]) for k, row in row_of.items()}}
    return s


def _print_table(rows, names, best_single, summary, log) -> None:
    tasks = list(TASKS)
    log("")
    log(f"{'exact match on test':30s}" + "".join(f"{t:>9s}" for t in tasks) + f"{'macro':>9s}   (val macro)")
    for label, r in rows.items():
        mark = " *" if label == best_single else ""
        log(f"{(label + mark)[:30]:30s}" + "".join(f"{r['test'][t]:9.3f}" for t in tasks)
            + f"{macro_average(r['test']):9.3f}   ({macro_average(r['val']):.3f})")
    se = summary["test_standard_error"]
    log("")
    log(f"* best single checkpoint on validation. Optimized merge {summary['optimized']:.3f} vs best single "
        f"{summary['best_single']:.3f}, uniform {summary['uniform']:.3f}, greedy soup {summary['greedy_soup']:.3f} "
        f"(test standard error {se:.3f}); {summary['nonzero_weights']} of {len(names)} checkpoints "
        f"{'weighs' if summary['nonzero_weights'] == 1 else 'weigh'} > 0, "
        f"{summary['weights_over_0_01']} > 0.01. "
        f"({summary['seconds']:.0f} s in all; merged model: {summary['merged']})")
    margins = lambda s, paired: ", ".join(  # noqa: E731  (rounded first: no "-0.000" for equal scores)
        f"{round(s['optimized'] - s[k], 3) + 0.0:+.3f} over {k.replace('_', ' ')} ({paired[k]:.3f})" for k in BASELINES)
    log("Margins of the optimized merge (paired standard error: the noise in the difference of two models scored "
        f"on the same examples): {margins(summary, summary['paired_standard_errors'])}.")
    u = summary["test_unseen"]
    if u:
        log(f"On the {sum(u['sizes'].values())} test examples whose prompts validation lacks: optimized "
            f"{u['optimized']:.3f} vs best single {u['best_single']:.3f}, uniform {u['uniform']:.3f}, greedy soup "
            f"{u['greedy_soup']:.3f} (standard error {u['standard_error']:.3f}); margins "
            f"{margins(u, u['paired_standard_errors'])}.")


def _plot(path: str, rows, names, best_single, history) -> bool:
    """Scores per task (test) and, for the two tasks that trade off most, the search's Pareto front (val)."""
    try:
        import matplotlib.figure  # not pyplot: its backend is the caller's (matplotlib itself first: a
        # `from matplotlib.figure import` found the cached submodule where matplotlib was made unimportable)
    except ImportError:  # (an earlier run's plot is gone: experiment() removes it first)
        return False
    tasks = list(TASKS)
    fig = matplotlib.figure.Figure(figsize=(13, 4.8))
    a1, a2 = fig.subplots(1, 2)
    shown = [(f"best single ({best_single})", rows[best_single]), ("uniform merge", rows["uniform merge"]),
             ("greedy soup", rows["greedy soup"]), ("optimized merge", rows["optimized merge"])]
    x = np.arange(len(tasks) + 1)
    for k, (label, r) in enumerate(shown):
        vals = [r["test"][t] for t in tasks] + [macro_average(r["test"])]
        a1.bar(x + (k - 1.5) * 0.2, vals, 0.2, label=label)
    a1.set_xticks(x, tasks + ["macro"])
    a1.set_ylabel("exact match (test)")
    a1.set_title("scores per task, held-out test")
    a1.legend(fontsize=7)
    single_val = np.array([[rows[nm]["val"][t] for t in tasks] for nm in names])
    with np.errstate(invalid="ignore", divide="ignore"):  # a task every checkpoint scores alike: no correlation,
        corr = np.nan_to_num(np.corrcoef(single_val.T), nan=1.0)  # and no trade-off to plot (0 was picked over > 0)
    i, j = np.unravel_index(np.argmin(corr + 2 * np.eye(len(tasks))), corr.shape)
    a, b = tasks[i], tasks[j]
    pts = [[h["scores"][a], h["scores"][b]] for h in history]
    a2.scatter(*zip(*pts), s=10, alpha=0.35, label="search candidates")
    front = sorted(pareto_front(pts), key=lambda k: pts[k][0])
    a2.plot([pts[k][0] for k in front], [pts[k][1] for k in front], "o-", color="C3", label="Pareto front")
    a2.scatter(single_val[:, i], single_val[:, j], marker="*", s=80, color="k", label="checkpoints")
    for nm, (u, v) in zip(names, single_val[:, [i, j]]):
        a2.annotate(nm, (u, v), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for label, key, c in (("uniform", "uniform merge", "C1"), ("greedy soup", "greedy soup", "C2"),
                          ("optimized", "optimized merge", "C4")):
        a2.scatter([rows[key]["val"][a]], [rows[key]["val"][b]], marker="D", s=50, color=c, label=label, zorder=3)
    a2.set_xlabel(f"{a} (validation)")
    a2.set_ylabel(f"{b} (validation)")
    a2.set_title(f"trade-off {a} vs {b}: the search's Pareto front")
    a2.legend(fontsize=7)
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return True
