"""Optional dependencies: each feature that needs one says, in one line, which package to install, by its own
name (this pymerge installs from a checkout or a wheel: `pip install -U 'pymerge[plot]'` fetched PyPI's
pymerge, another project)."""
import importlib

from pymerge.errors import InputError

# top-level module -> (package to install, pymerge extra that brings it)
EXTRAS = {"triton": ("triton", "triton"), "matplotlib": ("matplotlib", "plot")}


class MissingExtraError(InputError, ImportError):
    """An optional dependency is missing; the message names the extra (the CLI prints it, exit 2)."""


def require(module: str, feature: str):
    """Imports `module` for `feature`, or raises MissingExtraError naming `pip install <package>` (the extra's)."""
    root = module.split(".")[0]
    package, extra = EXTRAS[root]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != root:
            raise  # the package is there but something it needs is broken: show the real error
        raise MissingExtraError(f"{feature} needs {package}, which is not installed: "
                                f"pip install {package} (pymerge's [{extra}] extra)") from None
