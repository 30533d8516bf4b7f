"""Loads the native extensions and maps dtypes to the dtype codes they take.

Torch-free at import: dtypes are known by name (torch's names, "bfloat16"; safetensors' codes,
"BF16", are accepted too), so the CPU merge of weighted-sum methods never imports torch. The
torch-keyed tables (DTYPE_CODES, INPUT_DTYPES, OUTPUT_DTYPES) are built on first use.
"""
import importlib
import os
import warnings
from typing import Dict, Optional

# name -> (itemsize, is floating point, safetensors code); torch's own dtype names.
DTYPE_INFO: Dict[str, tuple] = {
    "float64": (8, True, "F64"), "float32": (4, True, "F32"), "float16": (2, True, "F16"),
    "bfloat16": (2, True, "BF16"), "int64": (8, False, "I64"), "int32": (4, False, "I32"),
    "int16": (2, False, "I16"), "int8": (1, False, "I8"), "uint8": (1, False, "U8"), "bool": (1, False, "BOOL"),
    "complex64": (8, False, "C64"), "float8_e4m3fn": (1, True, "F8_E4M3"), "float8_e5m2": (1, True, "F8_E5M2"),
    "float8_e4m3fnuz": (1, True, "F8_E4M3FNUZ"), "float8_e5m2fnuz": (1, True, "F8_E5M2FNUZ"),
    "float8_e8m0fnu": (1, True, "F8_E8M0"), "uint16": (2, False, "U16"), "uint32": (4, False, "U32"),
    "uint64": (8, False, "U64"),
}
SAFETENSORS_TO_NAME: Dict[str, str] = {v[2]: k for k, v in DTYPE_INFO.items()}

# The codes the kernels take: defined in csrc/codes.h, exported by each extension, checked at import.
_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float8_e4m3fn": 3, "float8_e5m2": 4}
SPARSIFIER_MODES: Dict[str, int] = {"none": 0, "topk": 1, "range": 2, "random": 3, "bits": 4, "zero": 5}
CODES_BY_NAME: Dict[str, int] = {**_CODES, **{DTYPE_INFO[n][2]: c for n, c in _CODES.items()}}
INPUT_DTYPE_NAMES = frozenset(_CODES)
OUTPUT_DTYPE_NAMES = frozenset(("float32", "float16", "bfloat16"))


def dtype_name(dtype) -> str:
    """The torch-style name of a dtype given as a torch dtype, a name or a safetensors code."""
    if isinstance(dtype, str):
        name = SAFETENSORS_TO_NAME.get(dtype, dtype)
        if name not in DTYPE_INFO:
            raise KeyError(dtype)
        return name
    return str(dtype).replace("torch.", "")  # a torch.dtype (str() works without importing torch)


def itemsize(dtype) -> int:
    return DTYPE_INFO[dtype_name(dtype)][0]


def is_floating(dtype) -> bool:
    """Whether dtype is floating point; False for one this table does not know (complex128, say)."""
    try:
        return DTYPE_INFO.get(dtype_name(dtype), (0, False))[1]
    except KeyError:
        return False


def torch_dtype(dtype):
    """The torch dtype for a name (imports torch)."""
    import torch
    return getattr(torch, dtype_name(dtype))


def _torch_tables():
    import torch
    codes = {getattr(torch, n): c for n, c in _CODES.items() if hasattr(torch, n)}
    return {"DTYPE_CODES": codes, "INPUT_DTYPES": frozenset(codes),
            "OUTPUT_DTYPES": frozenset(getattr(torch, n) for n in ("float32", "float16", "bfloat16"))}


def __getattr__(name):
    # DTYPE_CODES (torch dtype -> code), INPUT_DTYPES, OUTPUT_DTYPES: built, and torch imported, on first use.
    if name in ("DTYPE_CODES", "INPUT_DTYPES", "OUTPUT_DTYPES"):
        globals().update(_torch_tables())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_codes(ext) -> None:
    """Raises ImportError unless the extension `ext` numbers dtypes and sparsifier modes as Python does."""
    for table, ours in (("DTYPE_CODES", _CODES), ("SPARSIFIER_MODES", SPARSIFIER_MODES)):
        theirs = getattr(ext, table, None)
        if theirs != ours:
            raise ImportError(f"{ext.__name__}.{table} is {theirs}, pymerge expects {ours}: the native build is stale; "
                              "rebuild it (pip install --no-build-isolation -e .)")


def _not_built(exc: Optional[ImportError]) -> bool:
    """True when the extension module is simply absent (not compiled), not present but failing to load."""
    return isinstance(exc, ModuleNotFoundError) and exc.name in ("pymerge._cpu", "pymerge._cuda")


def source_checkout() -> Optional[str]:
    """The source checkout pymerge was imported from (`python -m pymerge` run in it after `pip install .` imports
    the checkout's copy, uncompiled), or None for an installed copy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))
    return root if checkout else None


def not_built_reason() -> str:
    """Why an absent extension is absent, as far as can be told: imported from the source checkout (an audit: the
    reinstall the message advised changed nothing), else no compiler when it was installed."""
    root = source_checkout()
    if root is not None:
        return (f"not built in this source checkout ({root}): run from outside it to use an installed pymerge, or "
                "build it here with `pip install --no-build-isolation -e .` (a C++17 compiler needed)")
    return "not built (no C++17 compiler at install time?)"


CPU_IMPORT_ERROR: Optional[ImportError] = None
CUDA_IMPORT_ERROR: Optional[ImportError] = None
try:  # import_module, not `from pymerge import`: an absent module must raise ModuleNotFoundError (see _not_built)
    cpu = importlib.import_module("pymerge._cpu")
    check_codes(cpu)  # a stale build would misread dtypes: treated as not loading
except ImportError as exc:
    cpu = None
    CPU_IMPORT_ERROR = exc
    # Never silent: every CPU op would run on eager torch instead (slower, other rounding in places).
    what = f"was {not_built_reason()}" if _not_built(exc) else f"did not load ({exc})"
    warnings.warn(f"pymerge's C++ extension {what}; CPU ops fall back to eager torch, which is "
                  "slower. `pymerge doctor` shows every backend.", RuntimeWarning, stacklevel=2)

# The C++ side (simd_level) takes "avx2" or "scalar" and ignores anything else: say so rather than run
# the default path silently (PYMERGE_SIMD=AVX2 ran AVX-512).
SIMD_CHOICES = ("avx2", "scalar")
_simd = os.environ.get("PYMERGE_SIMD")
_simd_problem = None
if _simd and _simd not in SIMD_CHOICES:
    _simd_problem = (f"PYMERGE_SIMD={_simd!r} is ignored: it takes {' or '.join(SIMD_CHOICES)} "
                     "(unset: the best path this CPU has)")
elif _simd == "avx2" and cpu is not None and cpu.simd_level() != "avx2":
    _simd_problem = f"PYMERGE_SIMD=avx2 is ignored: this CPU lacks AVX2, FMA, F16C or BMI2 (running {cpu.simd_level()})"
if _simd_problem:  # one line: no importer's source line under it (line 0 has none)
    warnings.warn_explicit(_simd_problem, RuntimeWarning, "pymerge", 0, module=__name__)

try:
    cuda = importlib.import_module("pymerge._cuda")
    check_codes(cuda)
except ImportError as exc:
    cuda = None
    CUDA_IMPORT_ERROR = exc
    if not _not_built(exc):  # built, but it does not load
        warnings.warn(f"pymerge's CUDA extension did not load ({exc}); GPU ops use Triton or eager torch. "
                      "`pymerge doctor` shows every backend.", RuntimeWarning, stacklevel=2)


def require_cpu():
    if cpu is None:
        raise RuntimeError(f"pymerge's C++ extension is not built ({CPU_IMPORT_ERROR}); reinstall pymerge where a C++17 "
                           "compiler is found (`pip install -e .` in a checkout); `pymerge doctor` says which copy "
                           "is imported")
    return cpu


def require_cuda():
    if cuda is None:
        why = ("nvcc was not found or failed, or PYMERGE_NO_CUDA=1, at install time" if _not_built(CUDA_IMPORT_ERROR)
               else str(CUDA_IMPORT_ERROR))
        raise RuntimeError(f"pymerge's CUDA extension is not available ({why})")
    return cuda
