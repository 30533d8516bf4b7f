"""Shared test setup; helpers in tests/ import.

Triton: without a GPU its kernels run in the interpreter (TRITON_INTERPRET=1, set here before any
kernel is defined). On a GPU host they compile for the GPU, and tests that hand Triton CPU tensors
(marked `triton_cpu`, or parametrized with backend="triton" without the gpu mark) are skipped:
the gpu-marked tests run the same kernels on the device there. `TRITON_INTERPRET=1 make test` on a
GPU host runs those in the interpreter instead (and skips the gpu-marked Triton cases, since the
interpreter cannot read device memory through raw addresses).
"""
import collections
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any Triton kernel is defined (decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

sys.path.insert(0, os.path.dirname(__file__))


def _import_installed_kernels() -> None:
    """The checkout's kernels/ folder (installed as pymerge.kernels) shadows Hugging Face's `kernels` package,
    which transformers >= 5.25 requires and imports, wherever the checkout's root is on sys.path (`python -m
    pytest` from it; a test importing benchmarks/): `from kernels import CUDAProperties` failed and every test
    importing transformers errored. The installed one, where there is one, is imported first from elsewhere;
    sys.modules then serves it to transformers."""
    import importlib
    import importlib.metadata
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except Exception:  # noqa: BLE001  (transformers then decides as it would)
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_import_installed_kernels()

# the interpreter with a GPU's float conversions (tests/triton_exact.py): where this holds, Triton's bfloat16 and
# float8 paths are compared with the C++ kernels bit for bit here too
import triton_exact  # noqa: E402

TRITON_EXACT = triton_exact.install()


def _backend(item):
    spec = getattr(item, "callspec", None)
    return spec.params.get("backend") if spec is not None else None


def _cuda_extension_missing() -> bool:
    from pymerge import _native
    return _native.cuda is None


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_cpu: runs Triton kernels on CPU tensors (needs the interpreter)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton_cpu = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1; "
                                              "the gpu-marked tests run Triton on this host's GPU")
    skip_interpreted = pytest.mark.skip(reason="the Triton interpreter cannot run on device memory")
    skip_no_ext = pytest.mark.skip(reason="pymerge._cuda is not built (nvcc was not found at install time)")
    for item in items:
        # the marker, not item.keywords: those hold every parent node's name too (a checkout in a folder named
        # gpu marked every test as one)
        gpu = item.get_closest_marker("gpu") is not None
        if gpu and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif gpu and _backend(item) == "triton" and TRITON_INTERPRETED:
            item.add_marker(skip_interpreted)
        elif gpu and _backend(item) == "cuda" and _cuda_extension_missing():
            # A GPU host without the CUDA extension skips its cases (with -x it would stop at the first).
            item.add_marker(skip_no_ext)
        if not gpu and not TRITON_INTERPRETED and (item.get_closest_marker("triton_cpu") is not None or _backend(item) == "triton"):
            item.add_marker(skip_triton_cpu)
    # The order pytest-xdist hands out files in (make test passes --no-loadscope-reorder): the longest first, then
    # the others by their number of tests, as xdist's own reorder does. By that count alone test_wheel.py (a
    # wheel, a fresh venv, the demo: ~5 min) came last and ran alone at the end while the other worker idled.
    counts = collections.Counter(item.path for item in items)
    first = {name: i for i, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: (first.get(item.path.name, len(first)), -counts[item.path]))  # stable: a file's own order kept


_LONGEST_FILES = ("test_wheel.py", "test_demo.py")  # in this order


@pytest.fixture(scope="session")
def quick_demo_checkpoints(tmp_path_factory):
    """The demo's --quick checkpoints (seed 0), trained once for the tests that run the demo or its benchmarks
    (training is most of a quick run): a copy of this folder as OUT/checkpoints is reused, as the demo reuses
    its own cache (same settings and code, files unchanged)."""
    import fcntl
    from pymerge.demo import run
    # under pytest-xdist, in the folder the workers' own temporary folders share, once for all of them
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / "quick_demo" / "checkpoints"
    folder.parent.mkdir(exist_ok=True)
    with open(root / "quick_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits for the first one's training, then reuses it
        run.build_checkpoints(str(folder), run.Settings.quick(), log=lambda m: None)
    return folder


@pytest.fixture
def ctrl_c():
    """A function that sends this process a real SIGINT, with Ctrl-C's handler set as a terminal has it (an xdist
    worker, or a shell's background job, starts with SIGINT ignored); the handler is put back after the test."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield lambda: os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
