"""`pymerge doctor`: which backends this installation can use, and why not where it cannot.

    $ pymerge doctor
    pymerge 0.1.0 at /site-packages/pymerge (Python 3.11.7)
    cpu extension    yes  C++ kernels, SIMD avx2, up to 16 threads
    cuda extension   no   not built (nvcc was not found or failed, or PYMERGE_NO_CUDA=1, at install time; ...)
    ...
"""
import os
import platform
from typing import List, Tuple

from pymerge.argparser import ArgumentParser
from pymerge.errors import first_line

Row = Tuple[str, bool, str]


def _cpu_row(native) -> Row:
    if native.cpu is None and native._not_built(native.CPU_IMPORT_ERROR):
        fix = "" if native.source_checkout() else "; install g++ and reinstall pymerge"
        return "cpu extension", False, f"{native.not_built_reason()}: ops use eager torch, slower{fix}"
    if native.cpu is None:
        return "cpu extension", False, f"did not load: {first_line(native.CPU_IMPORT_ERROR)} (ops use eager torch)"
    return "cpu extension", True, (f"C++ kernels, SIMD {native.cpu.simd_level()}, "
                                   f"up to {native.cpu.max_threads()} threads")


def _cuda_row(native) -> Row:
    if native.cuda is not None:
        return "cuda extension", True, f"CUDA C++ kernels (up to {native.cuda.MAX_INPUTS} inputs per launch)"
    if native._not_built(native.CUDA_IMPORT_ERROR):
        return "cuda extension", False, ("not built (nvcc was not found or failed, or PYMERGE_NO_CUDA=1, at install "
                                         "time; pip install -v says which)")
    return "cuda extension", False, f"did not load: {first_line(native.CUDA_IMPORT_ERROR)}"


def _triton_row() -> Row:
    try:
        import triton
    except Exception as exc:  # noqa: BLE001  (a broken install raises more than ImportError)
        return "triton", False, f"does not import: {first_line(exc)}"
    mode = ("its CPU interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1"
            else "kernels for CUDA tensors")
    return "triton", True, f"{triton.__version__}, {mode}"


def _torch_rows() -> List[Row]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return [("torch", False, f"does not import: {first_line(exc)} (CPU merges of linear methods still run)")]
    built = torch.version.cuda or getattr(torch.version, "hip", None)
    rows = [("torch", True, f"{torch.__version__} ({'CUDA ' + built if built else 'CPU-only build'})")]
    if not built:
        rows.append(("CUDA devices", False, "this torch was built without CUDA"))
    elif not torch.cuda.is_available():
        rows.append(("CUDA devices", False, "torch finds no usable GPU (driver missing or no device visible)"))
    else:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", True, f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"))
    from pymerge.ops.weighted_sum import pick_backend
    picks = [f"cpu -> {pick_backend(torch.device('cpu'))}"]
    if torch.cuda.is_available():
        picks.append(f"cuda -> {pick_backend(torch.device('cuda'))}")
    rows.append(("backend auto", True, ", ".join(picks)))
    return rows


def report() -> List[Row]:
    """(component, available, detail) for every backend, in the order the ops consider them."""
    from pymerge import _native
    return [_cpu_row(_native), _cuda_row(_native), _triton_row()] + _torch_rows()


def main(argv=None) -> int:
    ArgumentParser(prog="pymerge doctor", description=(__doc__ or "").partition("\n")[0]).parse_args(argv)
    import pymerge
    print(f"pymerge {pymerge.__version__} at {os.path.dirname(pymerge.__file__)} (Python {platform.python_version()})")
    for name, ok, detail in report():
        print(f"{name:16s} {'yes' if ok else 'no ':3s}  {detail}")
    return 0  # stdout is flushed by cli.main, which ends a reader gone away quietly


if __name__ == "__main__":  # python -m pymerge.doctor (did nothing)
    import sys
    sys.exit(main())
