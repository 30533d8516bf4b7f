"""`pymerge search CONFIG.yml`: a merge-weight search from a YAML file.

    sources: [ckpt_a/, ckpt_b.safetensors, ...]   # HF folders or .safetensors files
    base: null                                    # optional base checkpoint
    model: mypkg.evalmod:build_model              # entry point: () -> the nn.Module merged into
    evaluate: mypkg.evalmod:evaluate              # entry point: (model) -> float | {task: score}
    device: cpu                                   # or cuda
    dtype: null                                   # storage dtype of the pool (float32, bfloat16, ...)
    memory_budget: null                           # e.g. 8GB
    names: null                                   # prefix added to pool names to find model tensors
    method: linear
    search: {budget: 200, popsize: null, sigma0: 0.2, seed: 0, groups: null, normalize: true}
    state_path: search_state.json                 # resumable; relative paths are relative to the config
    out: search_out                               # history.json/.csv, search.png, best_merge.yml

Entry points are imported with the config's folder on sys.path. Errors a user can cause exit 2.
"""
import argparse
import importlib
import os
import sys

import torch
import yaml

from pymerge.config import read_yaml
from pymerge.errors import InputError, short

_TOP = {"sources", "base", "model", "evaluate", "device", "dtype", "memory_budget", "names", "method",
        "method_params", "search", "state_path", "out"}
_SEARCH = {"budget", "popsize", "sigma0", "seed", "groups", "normalize", "replicas"}


def load_entry_point(spec: str, what: str):
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"{what}: expected 'module:function', got {short(spec)}")
    mod, _, fn = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as exc:
        raise InputError(f"{what}: cannot import module {short(mod)} ({exc})") from None
    for part in fn.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{what}: module {short(mod)} has no attribute {short(fn)}")
        obj = getattr(obj, part)
    return obj


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
    bad = sorted(set(cfg.get("search") or {}) - _SEARCH)
    if bad:
        raise InputError(f"{path}: unknown search key {short(bad[0])}; known: {', '.join(sorted(_SEARCH))}")
    return cfg


def _dtype(name):
    if name is None:
        return None
    d = getattr(torch, str(name), None)
    if not isinstance(d, torch.dtype):
        raise InputError(f"dtype {short(name)} is not a torch dtype")
    return d


def _best_yaml(path: str, sources, weights, method: str) -> None:
    """The best flat weights as a mergekit-style linear config (per-group tables stay in history.json)."""
    models = [{"model": str(s), "parameters": {"weight": float(w)}} for s, w in zip(sources, weights)]
    with open(path, "w") as fh:
        yaml.safe_dump({"merge_method": method, "models": models, "parameters": {"normalize": False}}, fh,
                       sort_keys=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pymerge search", description="CMA-ES search over merge weights")
    ap.add_argument("config", help="YAML config (see `pydoc pymerge.search.cli`)")
    ap.add_argument("--out", help="output folder (overrides the config's out)")
    ap.add_argument("--budget", type=int, help="evaluations (overrides search.budget)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        print(f"pymerge search: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from pymerge.pool import CheckpointPool
    from pymerge.search.optimize import optimize
    cfg = _load_config(args.config)
    here = os.path.dirname(os.path.abspath(args.config))
    sys.path.insert(0, here)

    def rel(p):
        return p if p is None or os.path.isabs(str(p)) else os.path.join(here, str(p))
    sources = [rel(s) for s in cfg["sources"]]
    build = load_entry_point(cfg["model"], "model")
    evaluate = load_entry_point(cfg["evaluate"], "evaluate")
    pool = CheckpointPool(sources, base=rel(cfg.get("base")), device=cfg.get("device", "cpu"),
                          dtype=_dtype(cfg.get("dtype")), memory_budget=cfg.get("memory_budget"))
    print(pool.describe())
    model = build()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model: {cfg['model']} returned a {type(model).__name__}, not an nn.Module")
    s = dict(cfg.get("search") or {})
    if args.budget is not None:
        s["budget"] = args.budget
    out = args.out or rel(cfg.get("out", "search_out"))
    result = optimize(pool, evaluate, model=model, budget=int(s.get("budget", 200)), popsize=s.get("popsize"),
                      sigma0=float(s.get("sigma0", 0.2)), seed=int(s.get("seed", 0)),
                      state_path=rel(cfg.get("state_path")), groups=s.get("groups"),
                      normalize=bool(s.get("normalize", True)), replicas=s.get("replicas"),
                      method=cfg.get("method", "linear"), names=cfg.get("names"), method_params=cfg.get("method_params") or {})
    paths = result.save(out)
    if result.best_weights.ndim == 1:
        _best_yaml(os.path.join(out, "best_merge.yml"), cfg["sources"], result.best_weights, cfg.get("method", "linear"))
    print(f"best objective {result.best_objective:.4f} {result.best_scores} after {len(result.history)} evaluations; "
          f"Pareto front: {len(result.pareto)} candidates; wrote {', '.join(paths.values())}")
    return 0
