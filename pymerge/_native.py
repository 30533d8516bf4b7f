"""Loads the native extensions and maps torch dtypes to the dtype codes they take."""
import torch

DTYPE_CODES = {  # keep in sync with csrc/cpu/common.h and csrc/cuda/weighted_sum.cu
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
}
for _name, _code in (("float8_e4m3fn", 3), ("float8_e5m2", 4)):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code

INPUT_DTYPES = frozenset(DTYPE_CODES)
OUTPUT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))

try:
    from pymerge import _cpu as cpu
except ImportError as exc:  # pragma: no cover - only when the build is missing
    cpu = None
    CPU_IMPORT_ERROR = exc

try:
    from pymerge import _cuda as cuda
except ImportError:  # built only where nvcc was found
    cuda = None


def require_cpu():
    if cpu is None:
        raise RuntimeError(f"pymerge's C++ extension is not built ({CPU_IMPORT_ERROR}); reinstall with `pip install -e .`")
    return cpu


def require_cuda():
    if cuda is None:
        raise RuntimeError("pymerge's CUDA extension is not built (nvcc was not found at install time)")
    return cuda
