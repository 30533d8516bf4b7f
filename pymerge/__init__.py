"""pymerge: fast, trustworthy model merging.

    pymerge.weighted_sum(tensors, weights)          fused N-way weighted sum (CPU C++, Triton, CUDA)
    pymerge.weighted_sum_many(tensors, rows)        K candidates from one read of the inputs
    pymerge.CheckpointPool(sources).materialize(w, into=model)   the search loop's hot path
    pymerge.search.optimize(pool, evaluate, ...)    CMA-ES over merge weights
    pymerge.merge.run_merge(config, out_dir)        a mergekit-style merge from YAML
"""
import importlib

from pymerge.errors import CheckpointError, InputError, MergeConfigError

__version__ = "0.1.0"
__all__ = ["weighted_sum", "weighted_sum_many", "CheckpointPool", "run_merge", "search", "merge",
           "InputError", "CheckpointError", "MergeConfigError", "__version__"]

# Everything else loads on first use: `import pymerge` (and the CLI, and a CPU linear merge) stays
# free of torch, whose import alone costs more than such a merge.
_LAZY = {"weighted_sum": ("pymerge.ops", "weighted_sum"), "weighted_sum_many": ("pymerge.ops", "weighted_sum_many"),
         "CheckpointPool": ("pymerge.pool", "CheckpointPool"), "run_merge": ("pymerge.merge", "run_merge"),
         "search": ("pymerge.search", None), "merge": ("pymerge.merge", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pymerge' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # found directly from now on: pymerge.weighted_sum in a loop paid ~1-2 us a call here
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# torch.ops.pymerge.* is there once pymerge is imported where torch already is (`import torch, pymerge`);
# otherwise `import pymerge.ops` registers it (the first op or pool a program uses does).
if __import__("sys").modules.get("torch") is not None:  # None: a program that keeps torch out
    try:
        importlib.import_module("pymerge.ops.library")
    except ImportError:  # no built extension (a source checkout): the ops say why when used
        pass
