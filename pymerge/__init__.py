"""pymerge: fast, trustworthy model merging.

    pymerge.weighted_sum(tensors, weights)          fused N-way weighted sum (CPU C++, Triton, CUDA)
    pymerge.weighted_sum_many(tensors, rows)        K candidates from one read of the inputs
    pymerge.CheckpointPool(sources).materialize(w, into=model)   the search loop's hot path
    pymerge.search.optimize(pool, evaluate, ...)    CMA-ES over merge weights
    pymerge.merge.run_merge(config, out_dir)        a mergekit-style merge from YAML
"""
import importlib

from pymerge.errors import CheckpointError, InputError, MergeConfigError
from pymerge.ops import weighted_sum, weighted_sum_many

__version__ = "0.1.0"
__all__ = ["weighted_sum", "weighted_sum_many", "CheckpointPool", "run_merge", "search", "merge",
           "InputError", "CheckpointError", "MergeConfigError", "__version__"]

# Heavier pieces load on first use, so `import pymerge` stays cheap for code that only needs the ops.
_LAZY = {"CheckpointPool": ("pymerge.pool", "CheckpointPool"), "run_merge": ("pymerge.merge", "run_merge"),
         "search": ("pymerge.search", None), "merge": ("pymerge.merge", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pymerge' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
