"""weighted_sum: out = sum_i w_i * x_i, one pass, float32 accumulation, several backends.

Backends share one contract (see tests/test_weighted_sum.py for the float64 reference):
- "cpu":    C++ (OpenMP, AVX-512/AVX2/scalar chosen at run time), CPU tensors.
- "triton": kernels/weighted_sum.py, CUDA tensors (or CPU under TRITON_INTERPRET=1).
- "cuda":   csrc/cuda/weighted_sum.cu, CUDA tensors.
- "torch":  eager PyTorch, any device; the slow but dependable fallback.
"auto" picks "cpu" for CPU tensors and "triton" (else "cuda", else "torch") for CUDA tensors.
"""
from typing import List, Optional, Sequence

import torch

from pymerge import _native
from pymerge.ops._checks import check_inputs, check_weights, resolve_out
from pymerge.ops._versions import mark_written

BACKENDS = ("auto", "cpu", "triton", "cuda", "torch")


def weighted_sum(tensors: Sequence[torch.Tensor], weights, *, out_dtype: Optional[torch.dtype] = None,
                 out: Optional[torch.Tensor] = None, backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """Returns sum_i weights[i] * tensors[i], accumulated in float32 in input order.

    Inputs: N >= 1 tensors of one shape and device, float32/float16/bfloat16/float8 in any mix.
    Non-contiguous inputs are copied to contiguous memory first (correct, but an extra pass).
    The result is rounded once (nearest even) to out_dtype (default: the inputs' promoted dtype).
    ``out=`` receives the result in place and may be one of the inputs itself.
    """
    tensors = check_inputs(tensors)
    w = check_weights(weights, len(tensors))
    dtype = resolve_out(tensors, out_dtype, out)
    given = out is not None
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    weighted_sum_into(tensors, [w], [out], backend=backend, num_threads=num_threads)
    if given:
        mark_written([out])  # written by address: tell autograd, as a torch out= op would
    return out


def weighted_sum_many(tensors: Sequence[torch.Tensor], weight_rows, *, outs: Optional[List[torch.Tensor]] = None,
                      out_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                      num_threads: int = 0) -> List[torch.Tensor]:
    """K weighted sums of the same N inputs in one pass: outs[k] = sum_i weight_rows[k][i] * tensors[i].

    Every input is read once for all K outputs (the search loop's population step).
    """
    tensors = check_inputs(tensors)
    rows = weight_rows.tolist() if isinstance(weight_rows, torch.Tensor) else list(weight_rows)
    if not rows:
        raise ValueError("need at least one row of weights")
    rows = [check_weights(r, len(tensors), what=f"weights of row {k}") for k, r in enumerate(rows)]
    if outs is None:
        dtype = resolve_out(tensors, out_dtype, None)
        outs = [torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device) for _ in rows]
    else:
        if len(outs) != len(rows):
            raise ValueError(f"got {len(outs)} outputs for {len(rows)} rows of weights")
        for o in outs:
            resolve_out(tensors, out_dtype, o, allow_alias=len(outs) == 1)
    weighted_sum_into(tensors, rows, outs, backend=backend, num_threads=num_threads)
    mark_written(outs)
    return outs


def pick_backend(device: torch.device, backend: str = "auto", cuda_entry: str = "weighted_sum_many") -> str:
    """The backend an op runs on: `backend` itself when given, else by device. Every op shares
    this rule: C++ on the CPU; on a GPU Triton first, then the CUDA extension if it has the op's
    entry point (`cuda_entry`), else eager torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cpu":
        return "cpu" if _native.cpu is not None else "torch"
    if device.type == "cuda":
        from pymerge import kernels
        if kernels.triton_available():
            return "triton"
        return "cuda" if _native.cuda is not None and hasattr(_native.cuda, cuda_entry) else "torch"
    return "torch"


def weighted_sum_into(tensors: List[torch.Tensor], rows, outs: List[torch.Tensor],
                      backend: str = "auto", num_threads: int = 0) -> None:
    """The unchecked core: inputs, weights and outputs already validated (pool and merge call it).

    rows: K lists of N floats, or a float32 [K, N] tensor on the inputs' device. A device tensor
    keeps the GPU backends free of host round trips (the search loop updates it in place, and a
    CUDA graph can capture the call).
    """
    numel = tensors[0].numel()
    if numel == 0:
        return
    backend = pick_backend(tensors[0].device, backend)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    if isinstance(rows, torch.Tensor) and backend in ("cpu",):
        rows = rows.tolist()
    if backend == "torch":
        return _torch_weighted_sum(tensors, rows, outs)
    if backend == "cpu":
        _require_device(tensors[0], "cpu", backend)
        _native.require_cpu().weighted_sum_many(
            [t.data_ptr() for t in tensors], [_native.DTYPE_CODES[t.dtype] for t in tensors], numel,
            [w for row in rows for w in row], [o.data_ptr() for o in outs],
            [_native.DTYPE_CODES[o.dtype] for o in outs], num_threads)
        return
    if backend == "triton":
        from pymerge.kernels import weighted_sum as triton_ws
        return triton_ws.weighted_sum_many(tensors, rows, outs)
    if backend == "cuda":
        _require_device(tensors[0], "cuda", backend)
        return _cuda_weighted_sum(tensors, rows, outs)
    raise AssertionError(backend)


def _require_device(t: torch.Tensor, kind: str, backend: str):
    if t.device.type != kind:
        raise ValueError(f"backend {backend!r} needs {kind} tensors, got tensors on {t.device}")


def _cuda_weighted_sum(tensors, rows, outs):
    ext = _native.require_cuda()
    device = tensors[0].device
    numel = tensors[0].numel()
    on_device = isinstance(rows, torch.Tensor)
    if on_device:
        rows = rows.to(device=device, dtype=torch.float32).contiguous()
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        for start in range(0, len(outs), ext.MAX_OUTPUTS):  # populations larger than MAX_OUTPUTS go in groups
            group = outs[start:start + ext.MAX_OUTPUTS]
            grows = rows[start:start + ext.MAX_OUTPUTS]
            scratch = None
            if len(tensors) > ext.MAX_INPUTS:
                scratch = torch.empty(len(group) * ext.scratch_stride(numel), dtype=torch.float32, device=device)
            ext.weighted_sum_many(
                [t.data_ptr() for t in tensors], [_native.DTYPE_CODES[t.dtype] for t in tensors], numel,
                [] if on_device else [w for row in grows for w in row], [o.data_ptr() for o in group],
                [_native.DTYPE_CODES[o.dtype] for o in group], scratch.data_ptr() if scratch is not None else 0,
                stream, grows.data_ptr() if on_device else 0)


def _torch_weighted_sum(tensors, rows, outs):
    for row, out in zip(rows, outs):
        acc = tensors[0].float() * row[0]
        for t, w in zip(tensors[1:], row[1:]):
            acc.add_(t.float() * w)
        out.copy_(acc)
