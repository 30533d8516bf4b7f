"""weighted_sum: out = sum_i w_i * x_i, one pass, float32 accumulation, several backends.

Backends share one contract (see tests/test_weighted_sum.py for the float64 reference):
- "cpu":    C++ (own thread pool, AVX-512/AVX2/scalar chosen at run time), CPU tensors.
- "triton": kernels/weighted_sum.py, CUDA tensors (or CPU under TRITON_INTERPRET=1).
- "cuda":   csrc/cuda/weighted_sum.cu, CUDA tensors.
- "torch":  eager PyTorch, any device; the slow but dependable fallback.
"auto" picks "cpu" for CPU tensors and "triton" (else "cuda", else "torch") for CUDA tensors.
The native backends run as the custom ops pymerge::weighted_sum[_many][_out] (pymerge/ops/library.py),
so these wrappers compile (torch.compile, fullgraph) and capture (CUDA graphs) as single nodes.
"""
from collections.abc import Mapping, Set as AbstractSet
from typing import List, Optional, Sequence

import torch

from pymerge import _native, extras
from pymerge.errors import short
from pymerge.ops import library
from pymerge.ops._checks import (as_flag, check_apart, check_inference_out, check_inputs, check_layout, check_separate,
                                 check_values_readable, check_weights, refuse_tracked_items, resolve_out,
                                 values_unknown)
from pymerge.ops._memory import check_readable
from pymerge.ops._versions import mark_written

BACKENDS = ("auto", "cpu", "triton", "cuda", "torch")


def weighted_sum(tensors: Sequence[torch.Tensor], weights, *, out_dtype: Optional[torch.dtype] = None,
                 out: Optional[torch.Tensor] = None, backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """Returns sum_i weights[i] * tensors[i], accumulated in float32 in input order.

    Inputs: N >= 1 tensors of one shape and device, float32/float16/bfloat16/float8 in any mix.
    Non-contiguous inputs are copied to contiguous memory first (correct, but an extra pass).
    The result is rounded once (nearest even) to out_dtype (default: the inputs' promoted dtype; float8
    inputs count as bfloat16: there is no float8 output).
    ``out=`` receives the result in place and may be one of the inputs itself.
    """
    return _weighted_sum(tensors, weights, out_dtype, out, backend, num_threads, delta=False)


def delta_sum(tensors: Sequence[torch.Tensor], weights, *, out: torch.Tensor, backend: str = "auto",
              num_threads: int = 0) -> torch.Tensor:
    """weighted_sum's out= form with tensors[0] a base B that the others are taken relative to:
    out = weights[0] * B + sum_{i>=1} weights[i] * (tensors[i] - B), each difference formed in float32, the
    sum in input order, B's own term last (task_arithmetic as mergekit computes it: from 16-bit checkpoints
    every difference is exact, and a result on a halfway point of the output dtype rounds as the exact one)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"delta_sum: out must be a tensor, got {short(out)}")
    return _weighted_sum(tensors, weights, None, out, backend, num_threads, delta=True)


def _weighted_sum(tensors, weights, out_dtype, out, backend, num_threads, delta: bool) -> torch.Tensor:
    tensors = check_inputs(tensors)
    compiling = torch.compiler.is_compiling()
    read = check_readable(tensors, "weighted_sum: input", compiling=compiling, dense=True)
    w = check_weights(weights, len(tensors), compiling=compiling)  # a tensor only traced (_checks.values_unknown)
    # the kernel need not test the inputs' storage again, unless what was read since may have run code of the
    # caller's (a number type's __float__: library.trusted)
    checked = ()
    if read and library.trusted(weights, out, out_dtype, backend, num_threads):
        checked = (library.INPUTS,) if isinstance(w, torch.Tensor) else (library.INPUTS, library.WEIGHTS)
    # out's storage before resolve_out's overlap test: a view past its shrunk storage was reported as an overlap
    # wherever the allocator put the storage's new block next to an input
    out_read = False
    if isinstance(out, torch.Tensor):
        check_layout(out, "out")  # (check_readable's dense test would name a sparse out otherwise)
        check_inference_out(out, "weighted_sum", compiling)
        out_read = check_readable([out], "weighted_sum: output", compiling=compiling, dense=True, written=True)
    dtype = resolve_out(tensors, out_dtype, out)
    if out_read and checked:
        checked += (library.OUTS,)
    if out is None:
        op_backend = _op_backend(tensors[0], backend)
        if op_backend:
            return library.call("weighted_sum", library.contiguous(tensors, compiling),
                                _op_weights(_learnt(weights, w)), dtype, op_backend, num_threads, checked=checked)
    given = out is not None
    if given:
        library.no_grad_for_out(tensors, weights, [out], "delta_sum" if delta else "weighted_sum")
    elif library.wants_grad(tensors, weights):  # outside the op registry (eager torch, Triton's interpreter)
        return _tracked_sum(tensors, _learnt(weights, w), dtype)
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    rows = _weight_tensor(w, tensors[0].device).reshape(1, -1) if isinstance(w, torch.Tensor) else [w]
    sum_into(tensors, rows, [out], backend, num_threads, delta, checked if given else ())
    if given and not compiling:  # traced, the op's mutates_args tells autograd
        mark_written([out])  # written by address: tell autograd, as a torch out= op would
    return out


def _tracked_sum(tensors, w, dtype) -> torch.Tensor:
    """The eager backend's arithmetic (float32 accumulation in input order, rounded once) as torch ops that
    autograd records: where no registered op runs, gradients still flow as they do through the op. torch
    has no float32 fused multiply-add, so each step rounds twice: about an ulp off the kernels' bits."""
    acc = tensors[0].float() * w[0]
    for t, wi in zip(tensors[1:], w[1:]):
        acc = acc + t.float() * wi
    return acc.to(dtype)


def _learnt(given, checked):
    """The caller's weight tensor itself where autograd should reach it (its values checked), else the
    checked values."""
    return given if isinstance(given, torch.Tensor) and library.wants_grad((), given) else checked


def _weight_tensor(w, device: torch.device) -> torch.Tensor:
    """On the inputs' device, not the default one (`with torch.device("meta")` sent the op to its fake kernel)."""
    return w.to(torch.float32) if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.float32, device=device)


def _op_weights(w):
    """A weight tensor in float32; checked floats as they are (library.call makes the op's tensor, on the inputs'
    device, only where the call goes through the dispatcher: the eager kernels take lists)."""
    return w.to(torch.float32) if isinstance(w, torch.Tensor) else w


def weighted_sum_many(tensors: Sequence[torch.Tensor], weight_rows, *, outs: Optional[List[torch.Tensor]] = None,
                      out_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                      num_threads: int = 0) -> List[torch.Tensor]:
    """K weighted sums of the same N inputs in one pass: outs[k] = sum_i weight_rows[k][i] * tensors[i].

    Every input is read once for all K outputs (the search loop's population step).
    """
    tensors = check_inputs(tensors)
    compiling = torch.compiler.is_compiling()
    read = check_readable(tensors, "weighted_sum: input", compiling=compiling, dense=True)
    # (as in weighted_sum: arguments whose reading may run code of the caller's leave the kernel its own test)
    trust = read and library.trusted(weight_rows, outs, out_dtype, backend, num_threads)
    checked = (library.INPUTS,) if trust else ()  # (and WEIGHTS below: rows of checked floats)
    if isinstance(weight_rows, torch.Tensor) and weight_rows.dim() != 2:
        raise ValueError(f"weight_rows must be a [K, N] table, got shape {tuple(weight_rows.shape)}")
    traced = isinstance(weight_rows, torch.Tensor) and values_unknown(weight_rows)  # checked by the kernel
    if isinstance(weight_rows, torch.Tensor) and not traced:
        check_layout(weight_rows, "weight_rows")
        check_values_readable(weight_rows, "weight_rows")
        if weight_rows.shape[1] != len(tensors):  # before the copy (an expand()ed table)
            raise ValueError(f"weight_rows must be a [K, {len(tensors)}] table, got shape {tuple(weight_rows.shape)}")
    elif isinstance(weight_rows, (list, tuple)):
        refuse_tracked_items(weight_rows, "weight_rows", "one [K, N] tensor")
    elif isinstance(weight_rows, (str, bytes, Mapping, AbstractSet)) or not hasattr(weight_rows, "__iter__"):
        raise TypeError(f"weight_rows must be a [K, N] table of weights, got {short(weight_rows)}")  # a dict: its keys
    rows = weight_rows if traced else weight_rows.tolist() if isinstance(weight_rows, torch.Tensor) else list(weight_rows)
    if not len(rows):
        raise ValueError("need at least one row of weights")
    if traced:
        if rows.shape[1] != len(tensors):
            raise ValueError(f"got {rows.shape[1]} weights of row 0 for {len(tensors)} inputs")
        rows = rows.to(torch.float32)
    else:
        rows = [check_weights(r, len(tensors), what=f"weights of row {k}", compiling=compiling)
                for k, r in enumerate(rows)]
        dev = next((r.device for r in rows if isinstance(r, torch.Tensor)), None)
        if dev is not None:  # a tensor row traced (values_unknown): one [K, N] table (torch.tensor took no tensors)
            rows = torch.stack([r.to(torch.float32) if isinstance(r, torch.Tensor) else
                                torch.tensor(r, dtype=torch.float32, device=dev) for r in rows])
        elif checked:
            checked += (library.WEIGHTS,)
    if outs is None:
        dtype = resolve_out(tensors, out_dtype, None)
        op_backend = _op_backend(tensors[0], backend)
        if op_backend:
            return library.call("weighted_sum_many", library.contiguous(tensors, compiling),
                                _op_weights(_learnt(weight_rows, rows)), dtype, op_backend, num_threads,
                                checked=checked)
        if library.wants_grad(tensors, weight_rows):  # outside the op registry (eager torch, Triton's interpreter)
            table = _learnt(weight_rows, rows)
            return [_tracked_sum(tensors, table[k], dtype) for k in range(len(rows))]
        outs = [torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device) for _ in rows]
    else:
        outs = list(outs)
        if len(outs) != len(rows):
            raise ValueError(f"got {len(outs)} outputs for {len(rows)} rows of weights")
        for k, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"outs[{k}] is a {type(o).__name__}, not a torch.Tensor")
            check_layout(o, "out")
            check_inference_out(o, "weighted_sum_many", compiling)
        outs_read = check_readable(outs, "weighted_sum: output", compiling=compiling, dense=True,
                                   written=True)  # as weighted_sum's
        for o in outs:
            resolve_out(tensors, out_dtype, o, allow_alias=len(outs) == 1)
        check_separate(outs)
        if outs_read and checked:
            checked += (library.OUTS,)
        library.no_grad_for_out(tensors, weight_rows, outs, "weighted_sum_many")
    sum_into(tensors, rows, outs, backend, num_threads, checked=checked)
    if not compiling:  # traced, the op's mutates_args tells autograd
        mark_written(outs)
    return outs


def pick_backend(device: torch.device, backend: str = "auto", cuda_entry: str = "weighted_sum_many") -> str:
    """The backend an op runs on: `backend` itself when given, else by device. Every op shares
    this rule: C++ on the CPU; on a GPU Triton first, then the CUDA extension if it has the op's
    entry point (`cuda_entry`), else eager torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        extras.require("triton", "backend 'triton'")
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


def _op_backend(t: torch.Tensor, backend: str) -> Optional[str]:
    """The backend argument of the custom op that runs `backend` on t's device, or None when it
    runs outside the op registry (eager torch; Triton on CPU tensors, i.e. the interpreter)."""
    if backend == "auto" and t.is_cpu and _native.cpu is not None:  # the usual case, as pick_backend decides it
        return "auto"
    chosen = pick_backend(t.device, backend)
    if chosen == "torch":
        return None
    _require_device(t, {"cpu": "cpu", "cuda": "cuda"}.get(chosen, t.device.type), chosen)
    if t.device.type == "cpu":
        return "auto" if chosen == "cpu" else None
    return chosen if t.device.type == "cuda" else None


def weighted_sum_into(tensors: List[torch.Tensor], rows, outs: List[torch.Tensor],
                      backend: str = "auto", num_threads: int = 0, delta: bool = False) -> None:
    """outs[k] = sum_i rows[k][i] * tensors[i] (delta: delta_sum's form, tensors[0] a base), for callers that
    validated their inputs, weights and outputs (weighted_sum_many(outs=) is the checked form). Checked here:
    only what would corrupt memory or the result unseen (the kernels check shapes and dtypes): delta is a bool,
    and no output overlaps an input other than exactly (a partial overlap overwrote what the next block read).

    rows: K lists of N floats, or a float32 [K, N] tensor on the inputs' device. A device tensor
    keeps the GPU backends free of host round trips (the search loop updates it in place, and a
    CUDA graph can capture the call).
    """
    delta = as_flag(delta, "delta")  # (its __bool__ is the caller's code: before any pointer is taken)
    check_apart(tensors, outs, "weighted_sum", exact_ok=len(outs) == 1)
    sum_into(tensors, rows, outs, backend, num_threads, delta)


def sum_into(tensors, rows, outs, backend="auto", num_threads=0, delta: bool = False, checked=()) -> None:
    """weighted_sum_into without its checks, for the pool and the merge engine, whose targets are checked apart
    from their sources once (check_apart costs ~70 us a call: a third of a small tensor's merge), and for the
    public wrappers; checked: what such a wrapper checked (library.call)."""
    op_backend = _op_backend(tensors[0], backend)
    if op_backend is not None:  # the op's kernel checks the tensors (and, compiled, the weights), empty ones too
        library.call("weighted_sum_many_out", tensors, rows, outs, op_backend, num_threads, delta, checked=checked)
        return
    if tensors[0].numel() == 0:
        return
    tensors = library.contiguous(tensors)
    if pick_backend(tensors[0].device, backend) == "torch":
        torch_weighted_sum(tensors, rows, outs, delta)
    else:  # Triton on CPU tensors: the interpreter (tests)
        from pymerge.kernels import weighted_sum as triton_ws
        triton_ws.weighted_sum_many(tensors, rows, outs, delta=delta)


def _require_device(t: torch.Tensor, kind: str, backend: str):
    if t.device.type != kind:
        raise ValueError(f"backend {backend!r} needs {kind} tensors, got tensors on {t.device}")


def torch_weighted_sum(tensors, rows, outs, delta: bool = False):
    """The eager fallback (any device): float32 accumulation in input order (delta: delta_sum's form)."""
    for row, out in zip(rows, outs):
        out.copy_(_delta_sum_torch(tensors, row) if delta else _tracked_sum(tensors, row, torch.float32))


def _delta_sum_torch(tensors, w) -> torch.Tensor:
    """delta_sum's order in torch ops (each step rounds twice: no float32 fma, as _tracked_sum)."""
    b = tensors[0].float()
    if len(tensors) == 1:
        return b * w[0]
    acc = (tensors[1].float() - b) * w[1]
    for t, wi in zip(tensors[2:], w[2:]):
        acc = acc + (t.float() - b) * wi
    return acc + b * w[0]
