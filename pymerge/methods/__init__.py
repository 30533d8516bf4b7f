"""Built-in merge methods: importing a module registers its methods (see base.register).

linear and task_arithmetic register with the package and import no torch until they compute (the
CPU merge engine runs them without torch at all); the other modules import torch, so they load
on the first lookup of a name not registered yet (base.get_method, base.method_names).
"""
import importlib

import pymerge.methods.linear  # noqa: F401  linear, task_arithmetic

_TORCH_MODULES = (
    "pymerge.methods.model_stock",
    "pymerge.methods.passthrough",
    "pymerge.methods.slerp",         # slerp, nuslerp
    "pymerge.methods.task_vectors",  # ties, dare_*, breadcrumbs*, della*
    "pymerge.methods.sphere",        # multislerp, karcher
    "pymerge.methods.swap",          # nearswap, arcee_fusion
    "pymerge.methods.consensus",     # sce, ram, ramplus_tl
)


def load_all() -> None:
    """Registers every built-in method."""
    for module in _TORCH_MODULES:
        importlib.import_module(module)
