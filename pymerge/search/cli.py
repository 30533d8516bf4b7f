"""`pymerge search CONFIG.yml`: a merge-weight search from a YAML file.

    sources: [ckpt_a/, ckpt_b.safetensors, ...]   # HF folders or .safetensors files (mergekit: folders only)
    base: null                                    # optional base checkpoint
    model: mypkg.evalmod:build_model              # entry point: () -> the nn.Module merged into
    evaluate: mypkg.evalmod:evaluate              # entry point: (model) -> float | {task: score}, higher is better
    device: cpu                                   # or cuda
    dtype: null                                   # storage dtype of the pool (float32, bfloat16, ...)
    memory_budget: null                           # e.g. 8GB
    names: null                                   # prefix added to pool names to find model tensors
    method: linear
    method_params: {}                             # the method's parameters, e.g. {density: 0.5} for ties
    search: {budget: 200, popsize: null, sigma0: 0.2, seed: 0, groups: null, normalize: true,
             replicas: null}                      # replicas: models filled at once (default: what memory allows)
    state_path: null                              # e.g. search_state.json: resumable (relative to the config)
    out: search_out                               # history.json/.csv, search.png, best_merge.yml (flat weights)

best_merge.yml is a merge config (method, base_model, method_params, the best weights, dtype float32 and
the model's dtype as out_dtype) that `pymerge merge` or mergekit (folders only) turns into the best merge. A
per-group search (search.groups) writes none, and removes one an earlier search left in `out`: its best
weights, one row per group, are in history.json ("best"). Those four files in `out` are replaced as a whole,
once all are written (a failed or interrupted save leaves the earlier search's; a link there is replaced, not
written through); `out` is checked before the search starts, and locked while it runs: a second search into
it is refused, as one onto the same state_path (its lock file, state_path.lock, stays).

Entry points are imported with the config's folder on sys.path. Errors a user can cause exit 2.
"""
import functools
import importlib
import os
import sys
import tempfile
from typing import List, Optional

import torch
import yaml

from pymerge.argparser import ArgumentParser
from pymerge.config import read_yaml
from pymerge.errors import InputError, one_line, short
from pymerge.io.files import (hold_lock, is_or_inside, kernel_folder, missing_folders, release_lock,
                              remove_empty_folders, repeated_model, same_entry, text_path, unencodable)
from pymerge.progress import say
from pymerge.stop_signals import held_signals

_TOP = {"sources", "base", "model", "evaluate", "device", "dtype", "memory_budget", "names", "method",
        "method_params", "search", "state_path", "out"}
_SEARCH = {"budget", "popsize", "sigma0", "seed", "groups", "normalize", "replicas"}


def load_entry_point(spec: str, what: str):
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"{what}: expected 'module:function', got {short(spec)}")
    mod, _, fn = spec.partition(":")
    # an empty or relative module name raised ValueError or TypeError from importlib: a traceback (an audit)
    if not mod or mod.startswith(".") or not fn or any(not part for part in fn.split(".")):
        raise InputError(f"{what}: expected 'module:function' (an absolute module name), got {short(spec)}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as exc:  # (an error of the module's own code keeps its traceback)
        raise InputError(f"{what}: cannot import module {short(mod)} ({exc})") from None
    for part in fn.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{what}: module {short(mod)} has no attribute {short(fn)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{what}: {short(spec)} is a {type(obj).__name__}, not a function")
    return obj


def _module_file(spec: str) -> Optional[str]:
    """The file of an imported entry point's module ('module:function'), if it has one."""
    return getattr(sys.modules.get(spec.partition(":")[0]), "__file__", None)


def _load_config(path: str) -> dict:
    cfg = read_yaml(path, InputError)  # bounded: no FIFO, no billion laughs
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: the config must be a mapping")
    unknown = sorted(set(cfg) - _TOP)
    if unknown:
        raise InputError(f"{path}: unknown key {short(unknown[0])}; known: {', '.join(sorted(_TOP))}")
    for key in ("sources", "model", "evaluate"):
        if key not in cfg:
            raise InputError(f"{path}: missing key {key!r}")
    for key in ("search", "method_params"):  # absent or empty: none (a list or a 0 was taken for none, an audit)
        if cfg.get(key) is None:
            cfg[key] = {}
        elif not isinstance(cfg[key], dict):
            raise InputError(f"{path}: {key} must be a mapping, got {short(cfg[key])}")
    bad = sorted(set(cfg["search"]) - _SEARCH)
    if bad:
        raise InputError(f"{path}: unknown search key {short(bad[0])}; known: {', '.join(sorted(_SEARCH))}")
    sources = cfg["sources"]
    if not isinstance(sources, list) or not sources or not all(isinstance(x, str) for x in sources):
        raise InputError(f"{path}: sources must be a list of paths, got {short(sources)}")
    for key in ("base", "state_path", "names", "device", "dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise InputError(f"{path}: {key} must be a string, got {short(cfg[key])}")
    for key in ("model", "evaluate", "method", "out"):
        if key in cfg and not isinstance(cfg[key], str):
            raise InputError(f"{path}: {key} must be a string, got {short(cfg[key])}")
    for key in ("base", "state_path", "out"):  # "" is the config's own folder: out: "" wrote the results there
        if cfg.get(key) == "":
            raise InputError(f"{path}: {key} is an empty path")
    normalize = cfg["search"].get("normalize", True)
    if not isinstance(normalize, bool):
        raise InputError(f"{path}: search.normalize must be true or false, got {short(normalize)}")
    return cfg


def _check_distinct(config: str, written: list, sources: list, base: Optional[str] = None,
                    written_base: Optional[str] = None, method: str = "linear") -> None:
    """One checkpoint listed twice (under any spelling: ./x, x/, a link, x/model.safetensors) is refused before
    the search, as `pymerge merge` refuses the best_merge.yml that would list it twice. So is a base among the
    sources for a method that takes one: the pool weighs it as one more model (a zero task vector), while
    best_merge.yml, as mergekit, takes a base listed under models as the base only, so a normalized method's
    rebuilt merge was another one (task_arithmetic with normalize: true, dare_linear, della_linear...)."""
    from pymerge.io import Checkpoint
    from pymerge.methods.base import get_method
    labelled = []
    for i, path in enumerate(sources):
        with Checkpoint(path) as ck:
            labelled.append((f"sources[{i}] ({written[i]})", ck.files))
    problem = repeated_model(labelled, noun="checkpoint")
    if problem:
        raise InputError(f"{config}: {problem}")
    try:
        takes_base = get_method(method).base_model != "none"
    except Exception:  # an unknown method: check_searchable names it
        return
    if base is None or not takes_base:
        return
    with Checkpoint(base) as ck:
        problem = repeated_model([(f"base ({written_base})", ck.files), *labelled], noun="checkpoint")
    if problem:
        raise InputError(f"{config}: {problem}; a {method} search takes the base as the base alone (its task "
                         "vector is zero): remove it from sources")


def _dtype(name):
    if name is None:
        return None
    d = getattr(torch, str(name), None)
    if not isinstance(d, torch.dtype):
        raise InputError(f"dtype {short(name)} is not a torch dtype")
    return d


def _best_yaml(path: str, sources, base, weights, method: str, method_params: dict, model=None,
               pool_dtype=None, merged=None, tied_note: str = "") -> None:
    """The best flat weights as a mergekit config that `pymerge merge` (or mergekit) turns into the same
    merge: the method, its base and its parameters (per-group tables stay in history.json), computed in
    float32 (or the pool's dtype=) as the pool does, written in the dtype of the model searched when its
    tensors share one (bfloat16 checkpoints merged into a float32 model were merged and written in bfloat16).
    Bit for bit the merge scored, except with the pool's dtype= below float32: the pool reads its checkpoints
    in that dtype and sums them in float32, mergekit's `dtype:` also rounds the sum to it (said in the file)."""
    from pymerge.search.report import replace_file
    from pymerge.methods.base import get_method
    m = get_method(method)
    models = [{"model": text_path(s), "parameters": {"weight": float(w)}} for s, w in zip(sources, weights)]
    params = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in method_params.items()}
    for key in [k for k, v in params.items() if k in m.model_params and isinstance(v, (list, tuple))]:
        values = params.pop(key)  # one per checkpoint in the pool; a top-level list would be a layer gradient
        for entry, value in zip(models, values):
            entry["parameters"][key] = value
    if method == "linear":
        params.setdefault("normalize", False)  # the weights as searched (normalized there when asked)
    uses_base = base and m.base_model != "none"  # linear would take a base as one more model
    cfg = {"merge_method": method, **({"base_model": text_path(base)} if uses_base else {}), "models": models}
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = str(pool_dtype or torch.float32).replace("torch.", "")
    # merged: the model's tensors the pool wrote (buffers too, not a buffer it skips); else its parameters
    tensors = merged if merged is not None else list(model.parameters()) if model is not None else []
    kinds = {t.dtype for t in tensors if t.is_floating_point()}
    if len(kinds) == 1:
        cfg["out_dtype"] = str(kinds.pop()).replace("torch.", "")

    note = ""
    if pool_dtype is not None and torch.finfo(pool_dtype).bits < 32:
        note = (f"# The search's pool held its checkpoints in {cfg['dtype']} and summed them in float32; this merge\n"
                f"# also rounds each merged tensor to {cfg['dtype']} (dtype: means that in mergekit), so it is within\n"
                "# one such rounding of the merge the search scored, not bit for bit the same.\n")
    if len(kinds) > 1:  # one out_dtype for every tensor: the merge is written as the sum came out
        names = ", ".join(sorted(str(k).replace("torch.", "") for k in kinds))
        note += (f"# The model searched holds tensors of several dtypes ({names}): the search scored each one rounded\n"
                 f"# to its tensor's dtype, while this merge writes them all in {cfg['dtype']}; round them as the model\n"
                 "# does (load the merge into it) to get the merge the search scored.\n")
    note += tied_note
    if any(os.path.isfile(s) for s in [*sources, *([base] if base else [])]):  # (mergekit: a traceback)
        note += ("# It names .safetensors files, which pymerge merge reads; mergekit 0.1.5 reads model folders only\n"
                 "# (their config.json).\n")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(note)
            yaml.safe_dump(cfg, fh, sort_keys=False)
    replace_file(path, write)


def _tied_head_note(pool, model, names, method: str, method_params: dict) -> str:
    """best_merge.yml's note where it cannot rebuild the model scored at its head: a model that ties its head to its
    embedding, searched with DARE's or DELLA's masks over checkpoints that store the head too (a copy). The search
    scored one merge for both (one tensor), where `pymerge merge` draws each one's masks of its own, per tensor
    name, and unties them (pymerge/tied.py): the head differed by up to 0.28, unsaid (an audit)."""
    from pymerge.methods.base import get_method
    from pymerge.ops.task_vector_ops import SEEDED
    from pymerge.pool.pool import _map_name, _tensors_of
    from pymerge.tied import embedding_of, is_head
    if getattr(get_method(method), "sparsification", None) not in SEEDED:
        return ""
    density = method_params.get("density", 1.0)  # one, or one per checkpoint
    flat = [float(d) for d in (density if isinstance(density, (list, tuple)) else [density])
            if isinstance(d, (int, float))]
    head = next((n for n in pool.names if is_head(n)), None)
    embedding = embedding_of(pool.names, pool.shapes.__getitem__)
    if not flat or min(flat) >= 1 or head is None or embedding is None:
        return ""
    tensors = _tensors_of(model)
    h, e = tensors.get(_map_name(head, names)), tensors.get(_map_name(embedding, names))
    if h is None or e is None or h.untyped_storage().data_ptr() != e.untyped_storage().data_ptr():
        return ""
    # the pool writes a tied pair once, as the later of the two names merges it (pool.py's _last_of_tied): BERT's
    # head comes after its embedding (the embedding is not always the one scored: a review)
    scored, other = sorted((head, embedding), key=pool.names.index, reverse=True)
    return (f"# The model searched ties {head} to {embedding}, which the checkpoints store too: the search scored\n"
            f"# one merge for both, {scored}'s, while this merge draws each one's masks of its own ({method}'s,\n"
            f"# per tensor name) and unties them. Its {scored} is the one scored: for the model scored, copy it\n"
            f"# into {other}.\n")


def _merged_tensors(pool, model, names) -> list:
    """The model's tensors the pool writes (through names=): the dtypes best_merge.yml must write."""
    from pymerge.pool.pool import _map_name, _tensors_of
    tensors = _tensors_of(model)
    return [tensors[m] for n in pool.names if (m := _map_name(n, names)) is not None and m in tensors]


OUT_FILES = ("history.json", "history.csv", "search.png", "best_merge.yml")  # what a search writes into OUT


def _check_out(out: str) -> None:
    """What _prepare_out refuses of an OUT (not a folder; a folder it cannot write in, or whose result files
    cannot be replaced), without making anything."""
    from pymerge.io.files import check_replaceable, lock_held
    from pymerge.search.optimize import _is_search_state
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"out {out}: exists and is not a folder")
    if os.path.isdir(out):
        _probe_writable(out)
        for name in OUT_FILES:
            path = os.path.join(out, name)
            check_replaceable(path)
            # another search's state_path: refused after this search's every evaluation, or, were that search
            # running, its next save replaced this one's report (an audit)
            if _is_search_state(path) or lock_held(path + ".lock"):
                raise InputError(f"out {out}: its {name} is another search's saved state (a state_path); choose "
                                 "another out")
        return
    # a missing OUT is made after the pool is built: one it cannot make was found then (minutes in)
    folder = kernel_folder(out)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise InputError(f"out {out}: cannot create it: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"out {out}: cannot create it: {folder} is not writable")


def _probe_writable(out: str) -> None:
    try:  # a read-only folder was found when the results were written, after the whole search
        # (tempfile makes dir absolute as text: "link/.." named another folder than the kernel's; an audit)
        with tempfile.NamedTemporaryFile(dir=os.path.realpath(out), prefix=".pymerge-search-", suffix=".probe"):
            pass
    except OSError as exc:
        raise InputError(f"out {out}: cannot write there ({exc.strerror or exc})") from None


def _prepare_out(out: str) -> List[str]:
    """Before the search, not after it: OUT is a folder (made if missing) whose result files, where they
    exist, are regular files or links (links are replaced, never written through). Returns the folders
    it made, deepest first: a search that fails removes them again (remove_empty_folders)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"out {out}: exists and is not a folder")
    made = missing_folders(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise InputError(f"out {out}: cannot create it: {exc.strerror or exc}") from None
    try:
        _check_out(out)
    except InputError:
        remove_empty_folders(made)
        raise
    return made


def _check_nameable(cfg: dict, sources: List[str], base: Optional[str]) -> None:
    """Before a flat search: the paths best_merge.yml will name are text (a path whose bytes are not UTF-8 has no
    YAML form: PyYAML wrote escapes its own loader refuses; an audit). A search with groups may write none (one row
    per group): it runs, and _unnameable's warning says why there is none where it came to one group."""
    why = _unnameable(cfg, sources, base) if cfg["search"].get("groups") is None else None
    if why is not None:
        raise InputError(f"{why}; rename it")


def _unnameable(cfg: dict, sources: List[str], base: Optional[str]) -> Optional[str]:
    """Why best_merge.yml cannot name one of its paths (a base its method does not take is not named), or None."""
    from pymerge.methods.base import get_method
    takes_base = get_method(cfg.get("method", "linear")).base_model != "none"
    for path in [*sources, *([base] if base and takes_base else [])]:
        if text_path(path) is None:
            return f"{path!r}: this path's bytes are not UTF-8, so best_merge.yml (text) could not name it"
    return None


def _check_method(method: str, params: dict, n_sources: int, has_base: bool) -> None:
    """The method's name, its base and its parameters' names, before the pool is built (minutes for a large
    model): an unknown method, a missing base or a misspelt parameter was refused only after it (an audit)."""
    from pymerge.methods.base import get_method
    from pymerge.pool.pool import _split_params
    m = get_method(method)  # (MergeConfigError, an InputError, names the method)
    m.validate(n_sources, has_base)
    _split_params(m, params, n_sources)
    if method == "linear" and params:  # (the pool's refusal advised its Python keyword normalize=: an audit)
        raise InputError(f"method linear takes no method_params in a search, got {', '.join(map(str, params))}: "
                         "the weights are the search's (search.normalize: true, the default, makes them sum to one)")


def _check_state_apart(state_path: Optional[str], out: str, inputs: List[str]) -> None:
    """state_path must not be one of the result files written into OUT (links resolved): the report replaced
    the state (or best_merge.yml's removal deleted it), and the resume failed on it. Nor an input (the config,
    a source or the base, or a file in one): the error for it, not a state, advised deleting it. Nor a folder
    (refused before the pool is built, not after)."""
    if not state_path:
        return
    if os.path.isdir(state_path):
        raise InputError(f"state_path {state_path}: is a folder, not a file; name a file for the search state")
    state = os.path.realpath(state_path)
    if any(same_entry(state_path, os.path.join(out, f)) for f in OUT_FILES):
        raise InputError(f"state_path {state_path}: is {state}, where the search writes its "
                         f"results ({', '.join(OUT_FILES)} in {out}); choose another state_path")
    for p in map(os.path.realpath, inputs):
        if _within(state, p):
            raise InputError(f"state_path {state_path}: is an input of the search{'' if state == p else f' (inside {p})'}; "
                             "choose another state_path")


def _check_out_apart(out: str, inputs: List[str]) -> None:
    """OUT must be neither an input folder nor inside one (the results went into a source model's folder),
    and none of its result files an input (a config named best_merge.yml in OUT was replaced by the results)."""
    where = os.path.realpath(out)
    for p in map(os.path.realpath, inputs):
        if os.path.isdir(p) and _within(where, p):
            raise InputError(f"out {out}: is an input of the search{'' if where == p else f' (inside {p})'}; "
                             "choose another out")
        for f in OUT_FILES:
            if same_entry(os.path.join(out, f), p):
                raise InputError(f"out {out}: its {f} would replace {p}, an input of the search; choose another out")


def _within(path: str, p: str) -> bool:
    """Whether the resolved path is p or lies inside it (by device and inode too: a bind mount's other path)."""
    return path == p or path.startswith(p.rstrip(os.sep) + os.sep) or is_or_inside(path, p)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="pymerge search", description="CMA-ES search over merge weights")
    ap.add_argument("config", help="YAML config (see `python -m pydoc pymerge.search.cli`)")
    ap.add_argument("--out", help="output folder (overrides the config's out)")
    ap.add_argument("--budget", type=int, help="evaluations (overrides search.budget)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        say(f"pymerge search: error: {one_line(str(exc))}")
        return 2


def _run(args) -> int:
    from pymerge.dist.disk_merge import OFF_ENV
    if _several_ranks():  # every rank ran a search of its own, racing for out's lock (an audit)
        raise InputError("pymerge search runs in one process, not under torchrun (each rank ran a search of its own); "
                         "for a search across ranks, call pymerge.search.optimize on every rank of your own script "
                         f"(README: Across processes and machines), or set {OFF_ENV}=1 to run this one alone")
    cfg = _load_config(args.config)
    # the folder the config was read from: "link/../s.yml" is read from the link target's parent, whose models
    # these are (abspath's textual ".." took the current folder's: other models searched; an audit)
    here = kernel_folder(args.config)
    _import_search_libraries()  # first: a cma.py beside the config must not stand in for them
    sys.path.insert(0, here)  # the entry points' modules, as Python finds a script's (taken out when done)
    try:
        return _search(args, cfg, here)
    finally:
        if here in sys.path:
            sys.path.remove(here)


def _several_ranks() -> bool:
    """Under torchrun (or a launcher's RANK and WORLD_SIZE, or a process group) of more than one rank, unless
    PYMERGE_NO_DIST=1: a job of one rank (torchrun --nproc-per-node 1, a cluster's single worker) runs the search."""
    from pymerge.dist.disk_merge import launched
    if not launched():
        return False
    try:
        if int(os.environ.get("WORLD_SIZE", "0")) > 1:
            return True
    except ValueError:
        pass
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _import_search_libraries() -> None:
    """Imports the libraries the search imports later (cma; matplotlib for the plot, where installed)."""
    from pymerge.search.optimize import import_cma
    import_cma()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        pass


def _search(args, cfg: dict, here: str) -> int:
    from pymerge.pool import CheckpointPool
    from pymerge.search.optimize import NamedEvaluate, check_searchable, optimize, search_settings

    def rel(p):
        return p if p is None or os.path.isabs(str(p)) else os.path.join(here, str(p))
    sources = [rel(s) for s in cfg["sources"]]
    if args.out is not None and not args.out:  # "" was ignored: the results went to the config's out
        raise InputError("--out: an empty path")
    out = args.out if args.out is not None else rel(cfg.get("out", "search_out"))
    state_path = rel(cfg.get("state_path"))
    inputs = [args.config, *sources] + ([rel(cfg["base"])] if cfg.get("base") else [])
    for path in [out, state_path, *inputs]:  # first: os.path calls raised UnicodeEncodeError (a traceback)
        why = unencodable(path) if path is not None else None
        if why is not None:
            raise InputError(why)
    _check_nameable(cfg, sources, rel(cfg.get("base")))
    _check_state_apart(state_path, out, inputs)
    _check_out_apart(out, inputs)
    _check_distinct(args.config, cfg["sources"], sources, rel(cfg.get("base")), cfg.get("base"),
                    cfg.get("method", "linear"))
    s = dict(cfg["search"])
    if args.budget is not None:
        s["budget"] = args.budget
    # before the pool is built (minutes for a large model) and the entry points imported: a typo in the search
    # settings is refused at once (a method's own arguments are checked once the pool knows its checkpoints)
    search_settings(s.get("budget", 200), s.get("popsize"), s.get("sigma0", 0.2), s.get("seed", 0), s.get("replicas"))
    check_searchable(cfg.get("method", "linear"))
    _check_method(cfg.get("method", "linear"), cfg["method_params"], len(sources), bool(cfg.get("base")))
    _check_out(out)  # before the pool is built (minutes for a large model): a file there was found after it
    build = load_entry_point(cfg["model"], "model")
    evaluate = NamedEvaluate(load_entry_point(cfg["evaluate"], "evaluate"), cfg["evaluate"])
    # the entry points' own files are inputs too (known once imported): a state_path naming one was read as a
    # corrupt state, the error advising to delete it (an audit)
    _check_state_apart(state_path, out, [f for f in (_module_file(cfg["model"]), _module_file(cfg["evaluate"])) if f])
    pool = CheckpointPool(sources, base=rel(cfg.get("base")), device=cfg.get("device", "cpu"),
                          dtype=_dtype(cfg.get("dtype")), memory_budget=cfg.get("memory_budget"))
    print(pool.describe())
    model = build()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model: {cfg['model']} returned a {type(model).__name__}, not an nn.Module")
    made = _prepare_out(out)
    method, method_params = cfg.get("method", "linear"), cfg["method_params"]
    lock, locked = None, False  # (None also where the filesystem has no locks: the search goes on unlocked)
    busy = f"out {out}: in use by another pymerge search; wait for it to finish or choose another out"
    try:
        # another search into OUT (as onto state_path, which optimize locks) is refused: one's results were lost
        with held_signals(repeat_acts=False):  # (taken and kept: a Ctrl-C between leaked the descriptor; an audit)
            lock = hold_lock(out, busy, folder=True)  # (a failing search may remove it meanwhile: an empty file
        # was made and locked in its place, and this search's results lost at its end; an audit)
        locked = True
        result = optimize(pool, evaluate, model=model, budget=s.get("budget", 200), popsize=s.get("popsize"),
                          sigma0=s.get("sigma0", 0.2), seed=s.get("seed", 0),
                          state_path=state_path, groups=s.get("groups"),
                          normalize=s.get("normalize", True), replicas=s.get("replicas"),
                          method=method, names=cfg.get("names"), method_params=method_params)
        # best_merge.yml is saved with the rest, or an earlier search's is removed with the rest: left beside this
        # search's history, `pymerge merge` of it built the old winner. A per-group search writes none (its
        # weights are in history.json), nor one whose checkpoint was replaced during the search (a fresh download
        # renamed over it): naming the files, it would build another merge than the one scored (an audit).
        changed = pool.changed_file() if result.best_weights.ndim == 1 else None
        touched = pool.touched_file() if result.best_weights.ndim == 1 and changed is None else None
        best, tied_note = None, ""
        unnameable = _unnameable(cfg, sources, rel(cfg.get("base"))) if result.best_weights.ndim == 1 else None
        if unnameable is not None:  # (groups: that came to one group; a flat search was refused before it began)
            say(f"pymerge search: warning: no best_merge.yml: {one_line(unnameable)}")
        elif result.best_weights.ndim == 1 and changed is None:
            tied_note = _tied_head_note(pool, model, cfg.get("names"), method, method_params)
            best = functools.partial(_best_yaml, sources=sources, base=rel(cfg.get("base")),
                                     weights=result.best_weights, method=method, method_params=method_params,
                                     model=model, pool_dtype=_dtype(cfg.get("dtype")),
                                     merged=_merged_tensors(pool, model, cfg.get("names")), tied_note=tied_note)
        paths = result.save(out, extra={"best_merge.yml": best})
        if best is not None and touched is not None:
            say("pymerge search: warning: " + one_line(f"{os.path.join(out, 'best_merge.yml')}: {touched}"))
        if tied_note:
            say("pymerge search: warning: " + one_line(f"{os.path.join(out, 'best_merge.yml')}: "
                                                        + " ".join(line[2:] for line in tied_note.splitlines())))
        if changed is not None:
            raise InputError(f"{changed}: best_merge.yml, which names the checkpoint files, would not rebuild "
                             f"the merge the search scored, so it was not written (the search's results are "
                             f"in {out})")
    except BaseException as exc:
        if locked or str(exc) != busy:  # not a folder another search made at the same moment and holds
            remove_empty_folders(made)  # a failed search leaves no new empty folder (a bad state file is read after)
        raise
    finally:
        release_lock(lock)
    if "png" not in paths:
        print("(matplotlib is not installed: no search.png; pip install matplotlib)")
    print(f"best objective {result.best_objective:.4f} {result.best_scores} after {len(result.history)} evaluations; "
          f"Pareto front: {len(result.pareto)} candidate{'s' if len(result.pareto) != 1 else ''}; wrote {', '.join(paths.values())}")
    if result.best_weights.ndim > 1:  # mergekit's layer gradients would not reproduce the table bit for bit
        print("no best_merge.yml: a per-group search's best weights (one row per group) are in history.json")
    return 0
