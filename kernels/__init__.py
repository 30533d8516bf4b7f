"""Triton kernels, one file per op (installed as ``pymerge.kernels``)."""
import os


def triton_available() -> bool:
    """True when the triton package imports (it is optional on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
