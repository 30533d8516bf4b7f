"""pymerge's fused kernels as PyTorch custom ops (torch.library), as FlashAttention and torchao do.

Registered as single opaque nodes, they compose with torch.compile (fullgraph: no graph break
on a raw pointer), CUDA-graph capture and FakeTensor shape propagation. Every op has a fake
(shape-only) implementation and one kernel per device: C++ (pymerge._cpu) on the CPU; on CUDA
Triton or the CUDA extension, launched under a device guard on the current stream.

    pymerge::weighted_sum(tensors, weights[N], out_dtype) -> Tensor
    pymerge::weighted_sum_out(tensors, weights[N], out!)
    pymerge::weighted_sum_many(tensors, weights[K, N], out_dtype) -> Tensor[]
    pymerge::weighted_sum_many_out(tensors, weights[K, N], outs!, delta=False)   delta: tensors[0] is a base
    pymerge::tv_merge_out(inputs, base, plan..., out!)             the task-vector pass
    pymerge::select_ranks(x, base?, ranks, descending) -> [R, 2]   magnitude rank boundaries (key, index)
    pymerge::group_dots(xs, base?, sub, group) -> float64 [G, K(K+1)/2]
    pymerge::group_lincomb_out(xs, base?, sub, group, coef, out!)

Arguments are checked by the Python wrappers in pymerge.ops (which keep their signatures and
call these); the kernels assume contiguous inputs of one shape and device. Weights are float32
tensors: on the CPU they are read on the host, on CUDA from device memory (no host sync).
"""
import contextlib
import operator
from typing import List, Optional

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from pymerge import _native
from pymerge.errors import short
from pymerge.ops import philox
from pymerge.ops._checks import (FLOAT32_MAX, _overlaps, addresses_unknown, as_flag, check_apart, check_threads,
                                 check_inference_out, check_layout, first_out_of_range, require_inputs,
                                 values_unknown)
from pymerge.ops._memory import PLAIN, check_backed, check_native, check_readable, is_dual, trusted  # noqa: F401

_U64 = 1 << 64


def _check_native(inputs, outs, numel: int, op: str, device, inputs_backed: bool = False,
                  outs_backed: bool = False) -> None:
    """Before a kernel gets raw addresses (pymerge/ops/_memory.py): sizes, storage, dtype and device (the
    storage of tensors check_readable checked, *_backed, not twice)."""
    check_native(inputs, outs, numel, op, device, _native.DTYPE_CODES, inputs_backed, outs_backed)


def _same_shape(op: str, tensors) -> None:
    """Every input (a base too; None skipped) has input 0's shape: the kernels see element counts only, so a
    (3, 2) beside a (2, 3) was summed in memory order (torch's ops and the public wrappers refuse it)."""
    tensors = [t for t in tensors if t is not None]
    for i, t in enumerate(tensors[1:], 1):
        if t.shape != tensors[0].shape:
            raise ValueError(f"{op}: input {i} has shape {tuple(t.shape)} but input 0 has {tuple(tensors[0].shape)}")


def _weighted_args(tensors, weights: Tensor, dims: int, outs=None) -> None:
    """A raw weighted sum's inputs of one shape, and weights of real numbers, [N] (dims 1) or [K, N] (dims 2;
    K = len(outs) where given). A 0-d tensor raised IndexError, complex ones pybind11's "incompatible function
    arguments", [N, 1] passed forward only for its backward to fail, and a transposed [N, K] table for K outputs
    was read as [K, N] (wrong sums, no error)."""
    op = "weighted_sum"
    _same_shape(op, tensors)
    _require_real(weights, "weights", op)
    if weights.dim() != dims:
        raise ValueError(f"{op}: weights must be a {'[N]' if dims == 1 else '[K, N]'} tensor, got shape "
                         f"{tuple(weights.shape)}")
    if tensors and weights.shape[-1] != len(tensors):  # (no inputs: require_inputs says so)
        raise ValueError(f"{op}: weights of shape {tuple(weights.shape)} for {len(tensors)} inputs: "
                         f"{'[N]' if dims == 1 else '[K, N]'} needs N = {len(tensors)}")
    if dims == 2 and outs is not None and weights.shape[0] != len(outs):
        raise ValueError(f"{op}: weights of shape {tuple(weights.shape)} for {len(outs)} outputs: [K, N] needs "
                         f"K = {len(outs)}")


def _require_real(t: Tensor, what: str, op: str) -> None:
    """Weights or coefficients of real numbers (complex ones reached pybind11: a multi-line TypeError)."""
    if not isinstance(t, Tensor):  # None: "'NoneType' object has no attribute 'is_complex'"
        raise TypeError(f"{op}: {what} must be a tensor, got {short(t)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{op}: {what} must be real numbers, got a {t.dtype} tensor")
    check_layout(t, f"{op}: {what}")  # (sparse weights raised torch's "reshape is not implemented")


def _require_out_dtype(dtype: torch.dtype, op: str) -> None:
    """The dtypes the kernels write (an input's list, with float8, was the message for float64)."""
    if dtype not in _native.OUTPUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {dtype}")


def _require_out(out: Tensor, op: str) -> None:
    """The kernels write float32, float16 or bfloat16, contiguously."""
    if out.dtype not in _native.OUTPUT_DTYPES:
        raise ValueError(f"{op}: out must be a float32, float16 or bfloat16 tensor, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous, got strides {tuple(out.stride())} for shape {tuple(out.shape)}")


# What a public wrapper has checked of the tensors it hands `call`: check_readable ran on these very
# inputs ("inputs": the op's input tensors, its base too) or outputs ("outs"), and no code of the caller's
# has run since (_memory.trusted), so a kernel the eager fast path runs need not test their storage again.
# Whatever else a kernel gets (an output it makes, bitmasks, weights, coef) it checks in full, and so does
# every call through torch.ops (the raw ops, and any call the fast path does not take).
# "weights": the weights are lists of floats check_weights returned (finite, within float32's range).
INPUTS, OUTS, WEIGHTS = "inputs", "outs", "weights"


def _check_read(op: str, inputs, checked=(), **others) -> bool:
    """Before contiguous() or tolist() reads them (pymerge/ops/_memory.py: check_readable), unless the public
    wrapper did (`checked`); others by name (weights=, coef=: a tensor, or a list the eager path passes).
    Returns whether check_readable has checked the inputs (not while tracing): check_native need not test
    their storage again."""
    if INPUTS in checked:  # (only the eager fast path passes it: not traced)
        read = True
    else:
        read = check_readable(inputs, f"{op}: input")
    for name, t in others.items():
        if isinstance(t, Tensor):
            check_backed(t, f"{op}: {name}")
    return read


def _codes(ts) -> List[int]:
    return [_native.DTYPE_CODES[t.dtype] for t in ts]


def contiguous(ts, compiling: Optional[bool] = None) -> List[Tensor]:
    """Contiguous, the lazy negation of a view (x.conj().imag) applied: kernels read raw memory (traced,
    the op applies it when it runs: is_neg() has no graph form). compiling: torch.compiler.is_compiling(),
    where the caller has read it."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return [t.contiguous() for t in ts]
    copies = [t for t in ts if not t.is_contiguous() or t.is_neg()]
    if not copies:
        return list(ts)
    _check_copy_fits(copies)
    return [t if t.is_contiguous() and not t.is_neg() else t.resolve_neg().contiguous() for t in ts]


def _check_copy_fits(copies: List[Tensor]) -> None:
    """Host copies past the memory this machine has: an input expand()ed to 2**31 elements (no memory of its
    own) was copied whole, twice, and the kernel got the OOM killer's SIGKILL (an audit), not an error."""
    host = [t for t in copies if t.device.type == "cpu"]
    # and an output the kernel then fills (allocated, not yet touched: MemAvailable does not count it yet; where
    # the caller gave one, a margin near the limit)
    need = sum(t.numel() * t.element_size() for t in host) + max((t.numel() * 4 for t in host), default=0)
    if need < 1 << 30:  # (the usual case: /proc/meminfo is read only for copies of a GiB and more)
        return
    from pymerge.sizes import host_available
    available = host_available()
    if need > available:
        raise ValueError(f"the contiguous copies of {len(host)} non-contiguous input(s) and the output need "
                         f"{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB this machine has available; pass "
                         "contiguous tensors (an expand()ed one is copied whole)")


def _one_device(op: str, *groups, host_ok=()) -> None:
    """Every tensor on one device; those in host_ok (weights, coef: the kernels read or move them) may be
    elsewhere, but not on meta beside real tensors. The fake (shape) kernels run for any call holding a
    meta tensor: a CPU input beside a meta one got an uninitialised CPU result, an out= form returned
    without writing."""
    ts = [t for g in groups for t in (g if isinstance(g, (list, tuple)) else [g]) if t is not None]
    if not ts:
        return
    for t in ts + [t for t in host_ok if t.device.type == "meta"]:
        if t.device != ts[0].device:
            raise ValueError(f"{op}: tensors on {ts[0].device} and {t.device}; every tensor must be on one device")


_DEVICE_BACKENDS = {"cpu": ("auto", "cpu"), "cuda": ("auto", "triton", "cuda", "torch")}


def _require_backend(backend: str, op: str, device: str) -> None:
    """A raw op's backend names one that runs on its tensors' device (the wrappers pick one that does; a
    raw call's 'bogus' or 'cuda' on CPU tensors ran the CPU kernel as if it were 'auto')."""
    if backend not in _DEVICE_BACKENDS[device]:
        raise ValueError(f"{op}: backend {backend!r} does not run on {device} tensors; "
                         f"choose one of {', '.join(_DEVICE_BACKENDS[device])}")


def _fake_checks(op: str, inputs, outs=(), numel=None, backend=None, num_threads=None, weights=None) -> None:
    """What the real kernels refuse without reading data or addresses (input and output dtypes, output sizes
    and layout, the backend, the thread count; a weighted sum's weights where they can be read: CPU values
    beside meta inputs, not traced ones), for the fake kernels: a call on meta tensors, or traced, fails as the
    real call would instead of returning a result (an audit found 22 such calls)."""
    inputs = [t for t in inputs if t is not None]
    for i, t in enumerate(inputs):
        if t.dtype not in _native.DTYPE_CODES:  # (check_native's words)
            names = ", ".join(sorted(str(d).split(".")[-1] for d in _native.DTYPE_CODES))
            raise ValueError(f"{op}: input {i} is {t.dtype} on {t.device}; this kernel takes {names} on {t.device}")
    for k, o in enumerate(outs):
        _require_out(o, op)
        if numel is not None and o.numel() != numel:
            raise ValueError(f"{op}: output {k} has {o.numel()} elements, the op works on {numel}")
    if backend is not None and inputs:
        device = inputs[0].device.type
        allowed = _DEVICE_BACKENDS.get(device, tuple(dict.fromkeys(b for v in _DEVICE_BACKENDS.values() for b in v)))
        if backend not in allowed:
            raise ValueError(f"{op}: backend {backend!r} does not run on {device} tensors; choose one of "
                             f"{', '.join(allowed)}")
    if num_threads is not None and not (inputs and inputs[0].device.type == "cuda"):  # (the CUDA kernels ignore it)
        check_threads(num_threads)
    if weights is not None:
        _check_host_weights(weights)


def _check_host_weights(weights: Tensor) -> None:
    """A weights tensor's values where they can be read without a device sync (a CPU tensor, not traced)."""
    if weights.device.type == "cpu" and not values_unknown(weights):
        _check_weight_values(weights.detach().reshape(-1).tolist())


def _check_weight_values(flat: List[float]) -> None:
    """A weighted sum's weights as the kernels take them: finite, within float32's range."""
    bad = first_out_of_range(flat)
    if bad is not None:
        raise ValueError(f"weighted_sum: a weight is {flat[bad]}; weights must be finite and within float32's range")


def _cuda_backend(backend: str, entry: str, tensors=()) -> str:
    """On CUDA: Triton when available (or asked for), else the CUDA extension, else eager torch. Triton
    reads float8_e4m3fn only on GPUs of compute capability 8.9 and newer: a call with such an input
    (among `tensors`) on an older GPU (an A100) takes the CUDA extension, else torch, even when Triton
    was asked for."""
    from pymerge import kernels
    _require_backend(backend, entry, "cuda")
    if backend == "auto":
        backend = "triton" if kernels.triton_available() else "auto"
    if backend == "triton" and tensors and kernels.e4m3_unsupported(tensors[0].device, _codes(tensors)):
        backend = "auto"
    if backend == "auto":
        return "cuda" if _native.cuda is not None and hasattr(_native.cuda, entry) else "torch"
    return backend


_KERNELS = {}  # op name -> {device type: kernel}, for the eager fast path of `call`


def _kernel(name: str, device: str):
    """Registers fn as op `name`'s kernel for `device` and records it for `call`."""
    def wrap(fn):
        _KERNELS.setdefault(name, {})[device] = fn
        return fn
    return wrap


def tracing() -> bool:
    """Whether torch.jit.trace is recording: it sees only what passes through the dispatcher (a kernel run by
    address was missing from its trace, which returned uninitialized memory)."""
    return torch._C._get_tracing_state() is not None


def eager(t: Tensor) -> bool:
    """True when a call with t may skip the dispatcher (see `call`)."""
    return (type(t) in PLAIN and not torch.compiler.is_compiling() and not tracing()
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._len_torch_function_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None)  # functionalize: wrappers with no memory


def all_plain(args) -> bool:
    """Every tensor argument (also inside a list: inputs, outs, bits) of a plain type: a subclass elsewhere
    than first (a DTensor, TwoTensor) must reach its own dispatch, not a kernel that took its address 0."""
    for a in args:
        if type(a) is list or type(a) is tuple:
            for t in a:
                if type(t) not in PLAIN and isinstance(t, Tensor):
                    return False
        elif type(a) not in PLAIN and isinstance(a, Tensor):
            return False
    return True


_DIFFERENTIABLE = ("weighted_sum", "weighted_sum_many")  # autograd runs through the dispatcher


def wants_grad(tensors, weights) -> bool:
    """Whether autograd should record a weighted sum of these (grad mode on, an input or a weight tensor
    requiring grad)."""
    return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or isinstance(weights, Tensor) and weights.requires_grad)


def no_grad_for_out(tensors, weights, outs, op: str) -> None:
    """As torch's own out= ops: an output written in place records no gradient, so an input or an output
    that wants one is an error rather than a silently detached result (the functional forms record it).
    Written by address, an out in a graph kept its old grad_fn: backward ran through values it no
    longer held. The public wrappers check before they call, the raw out= ops in their autograd kernel."""
    if wants_grad([t for t in tensors if t is not None], weights) or wants_grad(outs, None):
        instead = {"weighted_sum": ", or leave out= out to get a result autograd tracks",
                   "weighted_sum_many": ", or leave out= out to get a result autograd tracks",
                   "weighted_sum_out": ", or call torch.ops.pymerge.weighted_sum to get a result autograd tracks",
                   "weighted_sum_many_out": ", or call torch.ops.pymerge.weighted_sum_many to get a result autograd "
                                            "tracks"}.get(op, "")
        raise RuntimeError(f"{op}(): out= does not record gradients, but an input or an output requires grad; "
                           f"call it under torch.no_grad(){instead}")


_WEIGHTED = ("weighted_sum", "weighted_sum_many", "weighted_sum_out", "weighted_sum_many_out")


def call(name: str, *args, checked=()):
    """Runs op pymerge::name. Plain tensors in eager mode go straight to the device's kernel: the
    dispatcher's Python round trip costs ~80 us a call, more than a small tensor's whole merge.
    Under torch.compile, a tensor subclass (FakeTensor, functional tensors) or a dispatch mode, the
    call goes through torch.ops, which is what makes the ops traceable.

    The weighted sums take their weights as a tensor, or (the eager kernels; a tensor is made for the
    op otherwise) as lists of floats. checked: what the public wrapper has checked (INPUTS, OUTS: its
    promise, see above), for the kernel the fast path runs."""
    if name.endswith("_out") and tracing():  # the tracer drops writes into a Tensor[] of outs: a stale trace
        raise RuntimeError(f"pymerge::{name}: torch.jit.trace does not record writes into out=; "
                           "trace the functional form (no out=), or use torch.compile or torch.export")
    first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
    if eager(first) and all_plain(args) and not (name in _DIFFERENTIABLE and wants_grad(args[0], args[1])):
        kernel = _KERNELS[name].get(first.device.type)
        if kernel is not None:
            return kernel(*args, checked=checked)
    if name in _WEIGHTED and not isinstance(args[1], Tensor):
        # on the CPU float64: a weight past float32's range (traced unchecked) reaches the kernel's one-line error,
        # not a float32 overflow inside the compiler; the CUDA kernels cannot check values without a sync, so
        # there the overflow stays the compiler's (loud) error rather than an inf merge
        wide = torch.float64 if first.device.type == "cpu" else torch.float32
        args = (args[0], torch.tensor(args[1], dtype=wide, device=first.device)) + args[2:]
    return getattr(torch.ops.pymerge, name)(*args)


# ---- weighted sum ---------------------------------------------------------------------------------
def _require_inputs_and_outs(tensors, outs) -> None:
    if not tensors or not outs:
        raise ValueError("weighted_sum: needs at least one input and one output")


def _check_outs(tensors, weights, outs, dims: int) -> None:
    """What the public wrappers check of the out= forms' arguments (pymerge/ops/_checks.py), for a call
    through torch.ops.pymerge: _weighted_args, and outputs contiguous, separate from each other, and an
    input only when it is exactly that input with one output (every block is read before it is written)."""
    from pymerge.ops._checks import check_separate
    op = "weighted_sum"
    _require_inputs_and_outs(tensors, outs)
    _weighted_args(tensors, weights, dims, outs)
    for o in outs:
        _require_out(o, op)
        check_inference_out(o, op)
    check_apart(tensors, outs, op, exact_ok=len(outs) == 1)
    check_separate(outs)


@custom_op("pymerge::weighted_sum_many_out", mutates_args=("outs",), device_types="cpu")
def weighted_sum_many_out(tensors: List[Tensor], weights: Tensor, outs: List[Tensor], backend: str = "auto",
                          num_threads: int = 0, delta: bool = False) -> None:
    """outs[k] = sum_i weights[k, i] * tensors[i] (float32 accumulation, rounded once). delta: tensors[0] is a
    base B, outs[k] = weights[k, 0] * B + sum_{i>=1} weights[k, i] * (tensors[i] - B) (task_arithmetic's form,
    csrc/cpu/weighted_sum.cpp)."""
    _check_outs(tensors, weights, outs, 2)
    _weighted_sum_many_out_cpu(tensors, weights, outs, backend, num_threads, delta)


@_kernel("weighted_sum_many_out", "cpu")
def _weighted_sum_many_out_cpu(tensors, weights, outs, backend="auto", num_threads=0, delta=False,
                               checked=()) -> None:
    """The kernel, its outputs checked by the caller (the public wrappers, or the op above). The eager
    fast path of `call` may pass weights as K lists of N floats (no tensor to build)."""
    _require_backend(backend, "weighted_sum", "cpu")
    numel = tensors[0].numel()
    # the caller's numbers first: an __index__ or __float__ of theirs runs before the storage tests, never after
    # (a weights tensor's own storage is tested first: tolist() reads it)
    num_threads, delta = check_threads(num_threads), as_flag(delta, "delta")
    flat = None if isinstance(weights, Tensor) else [float(w) for row in weights for w in row]
    read = _check_read("weighted_sum", tensors, checked, weights=weights)
    if flat is None:
        flat = weights.reshape(-1).tolist()
    tensors = contiguous(tensors, False if read else None)
    _check_native(tensors, outs, numel, "weighted_sum", "cpu", read, OUTS in checked)
    if len(flat) != len(outs) * len(tensors):
        raise ValueError(f"weighted_sum: {len(flat)} weights for {len(outs)} outputs x {len(tensors)} inputs")
    if WEIGHTS not in checked:  # a weight a traced call never saw
        _check_weight_values(flat)
    if numel == 0:  # (after the checks: an empty call with a wrong out or weights is as wrong as any)
        return
    _native.require_cpu().weighted_sum_many(
        [t.data_ptr() for t in tensors], _codes(tensors), numel, flat,
        [o.data_ptr() for o in outs], _codes(outs), num_threads, delta)


@weighted_sum_many_out.register_kernel("cuda")
def _weighted_sum_many_out_cuda_op(tensors, weights, outs, backend="auto", num_threads=0, delta=False):
    _check_outs(tensors, weights, outs, 2)
    _weighted_sum_many_out_cuda(tensors, weights, outs, backend, num_threads, delta)


@_kernel("weighted_sum_many_out", "cuda")
def _weighted_sum_many_out_cuda(tensors, weights, outs, backend="auto", num_threads=0, delta=False, checked=()):
    delta = as_flag(delta, "delta")  # the caller's __bool__ before the storage tests, as on the CPU
    if not isinstance(weights, Tensor):  # host numbers: checked as the CPU kernel checks them (no device sync)
        weights = [[float(w) for w in row] for row in weights]
        if WEIGHTS not in checked:
            _check_weight_values([w for row in weights for w in row])
    read = _check_read("weighted_sum", tensors, checked, weights=weights)  # (a weights tensor's storage too)
    if isinstance(weights, Tensor) and WEIGHTS not in checked:  # its values, as a list's
        _check_host_weights(weights)
    tensors = contiguous(tensors, False if read else None)
    _check_native(tensors, outs, tensors[0].numel(), "weighted_sum", tensors[0].device, read, OUTS in checked)
    device = tensors[0].device
    if not isinstance(weights, Tensor):  # on the inputs' device, whatever the default one (meta)
        # the inputs' device's stream (another device may be current; CPU tensors: the tests' faked capture)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            capturing = torch.cuda.is_current_stream_capturing()
        if capturing:  # a host copy would break the capture in torch's words
            raise ValueError("weighted_sum: inside a CUDA graph capture pass the weights as a CUDA tensor "
                             "(a list is copied to the device once, at capture, and never again)")
        from pymerge.kernels import to_device  # (a pageable copy waited for every merge_tensor's queued kernels)
        weights = to_device(weights, torch.float32, device)
    weights = weights.to(device=device, dtype=torch.float32).reshape(len(outs), len(tensors))
    if tensors[0].numel() == 0:  # (after the checks, as the CPU kernel's)
        return
    with torch.cuda.device(device):
        backend = _cuda_backend(backend, "weighted_sum_many", tensors)
        if backend == "triton":
            from pymerge.kernels import weighted_sum as triton_ws
            triton_ws.weighted_sum_many(tensors, weights, outs, delta=delta)
        elif backend == "cuda":
            _cuda_weighted_sum(tensors, weights, outs, delta)
        else:
            from pymerge.ops.weighted_sum import torch_weighted_sum
            torch_weighted_sum(tensors, weights.double().cpu().tolist(), outs, delta)


@register_fake("pymerge::weighted_sum_many_out")
def _(tensors, weights, outs, backend="auto", num_threads=0, delta=False):
    _require_inputs_and_outs(tensors, outs)
    _weighted_args(tensors, weights, 2, outs)
    _one_device("weighted_sum", tensors, outs, host_ok=[weights])
    _fake_checks("weighted_sum", tensors, outs, tensors[0].numel(), backend, num_threads, weights)


def _cuda_weighted_sum(tensors, weights, outs, delta=False):
    """The CUDA extension's launch: weights a float32 [K, N] device tensor, read on the device."""
    ext = _native.require_cuda()
    device = tensors[0].device
    numel = tensors[0].numel()
    stream = torch.cuda.current_stream(device).cuda_stream
    for start in range(0, len(outs), ext.MAX_OUTPUTS):  # populations larger than MAX_OUTPUTS go in groups
        group = outs[start:start + ext.MAX_OUTPUTS]
        rows = weights[start:start + ext.MAX_OUTPUTS].contiguous()
        scratch = None
        if len(tensors) - delta > ext.MAX_INPUTS:  # (a delta call's base is no term)
            scratch = torch.empty(len(group) * ext.scratch_stride(numel), dtype=torch.float32, device=device)
        ext.weighted_sum_many([t.data_ptr() for t in tensors], _codes(tensors), numel, [],
                              [o.data_ptr() for o in group], _codes(group),
                              scratch.data_ptr() if scratch is not None else 0, stream, rows.data_ptr(), delta)


@custom_op("pymerge::weighted_sum_out", mutates_args=("out",))
def weighted_sum_out(tensors: List[Tensor], weights: Tensor, out: Tensor, backend: str = "auto",
                     num_threads: int = 0) -> None:
    """out = sum_i weights[i] * tensors[i]; out may be one of the inputs (every block is read first)."""
    _check_outs(tensors, weights, [out], 1)
    _many_out(tensors, weights.reshape(1, -1), [out], backend, num_threads)


def _many_out(tensors, weights, outs, backend, num_threads, checked=()):
    """weighted_sum_many_out's kernel for the tensors' device (inside another op: no second dispatch)."""
    _KERNELS["weighted_sum_many_out"][tensors[0].device.type](tensors, weights, outs, backend, num_threads,
                                                              checked=checked)


def _inputs_only(checked) -> tuple:
    """What the wrapper checked, for a kernel that passes on outputs of its own making (checked in full)."""
    return tuple(c for c in checked if c != OUTS)


@register_fake("pymerge::weighted_sum_out")
def _(tensors, weights, out, backend="auto", num_threads=0):
    require_inputs(tensors, "weighted_sum")
    _weighted_args(tensors, weights, 1)
    _one_device("weighted_sum", tensors, out, host_ok=[weights])
    _fake_checks("weighted_sum", tensors, [out], tensors[0].numel(), backend, num_threads, weights)


@custom_op("pymerge::weighted_sum_many", mutates_args=())
def weighted_sum_many(tensors: List[Tensor], weights: Tensor, out_dtype: torch.dtype, backend: str = "auto",
                      num_threads: int = 0) -> List[Tensor]:
    _weighted_args(tensors, weights, 2)  # (the public wrappers check before the fast path's kernel)
    return _weighted_sum_many(tensors, weights, out_dtype, backend, num_threads)


@_kernel("weighted_sum_many", "cpu")
@_kernel("weighted_sum_many", "cuda")
def _weighted_sum_many(tensors, weights, out_dtype, backend="auto", num_threads=0, checked=()):
    """The op's kernel; weights a [K, N] tensor or (from `call`) K lists of N floats."""
    require_inputs(tensors, "weighted_sum")
    _require_out_dtype(out_dtype, "weighted_sum")
    k = weights.shape[0] if isinstance(weights, Tensor) else len(weights)
    outs = [torch.empty(tensors[0].shape, dtype=out_dtype, device=tensors[0].device) for _ in range(k)]
    _many_out(tensors, weights, outs, backend, num_threads, _inputs_only(checked))
    return outs


@register_fake("pymerge::weighted_sum_many")
def _(tensors, weights, out_dtype, backend="auto", num_threads=0):
    require_inputs(tensors, "weighted_sum")
    _require_out_dtype(out_dtype, "weighted_sum")
    _weighted_args(tensors, weights, 2)
    _one_device("weighted_sum", tensors, host_ok=[weights])
    _fake_checks("weighted_sum", tensors, (), None, backend, num_threads, weights)
    if weights.shape[0] == 0:
        raise ValueError("weighted_sum: need at least one input and one output")
    return [tensors[0].new_empty(tensors[0].shape, dtype=out_dtype) for _ in range(weights.shape[0])]


@custom_op("pymerge::weighted_sum", mutates_args=())
def weighted_sum(tensors: List[Tensor], weights: Tensor, out_dtype: torch.dtype, backend: str = "auto",
                 num_threads: int = 0) -> Tensor:
    _weighted_args(tensors, weights, 1)
    return _weighted_sum(tensors, weights, out_dtype, backend, num_threads)


@_kernel("weighted_sum", "cpu")
@_kernel("weighted_sum", "cuda")
def _weighted_sum(tensors, weights, out_dtype, backend="auto", num_threads=0, checked=()):
    """The op's kernel; weights an [N] tensor or (from `call`) a list of N floats."""
    require_inputs(tensors, "weighted_sum")
    _require_out_dtype(out_dtype, "weighted_sum")
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=tensors[0].device)
    rows = weights.reshape(1, -1) if isinstance(weights, Tensor) else [weights]
    _many_out(tensors, rows, [out], backend, num_threads, _inputs_only(checked))
    return out


@register_fake("pymerge::weighted_sum")
def _(tensors, weights, out_dtype, backend="auto", num_threads=0):
    require_inputs(tensors, "weighted_sum")
    _require_out_dtype(out_dtype, "weighted_sum")
    _weighted_args(tensors, weights, 1)
    _one_device("weighted_sum", tensors, host_ok=[weights])
    _fake_checks("weighted_sum", tensors, (), None, backend, num_threads, weights)
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype)


# Gradients of the functional forms (the out= forms write into the caller's tensors: none): the sums are
# linear, so d/dx_i = sum_k w[k, i] * g_k (in x_i's dtype) and d/dw[k, i] = <g_k, x_i> (float32 sums).
def _ws_setup(ctx, inputs, output) -> None:
    tensors, weights = inputs[0], inputs[1]
    ctx.dtypes = [t.dtype for t in tensors]
    # weights saved as given, not detached: a double backward differentiates d/dx through them too (it
    # took them for constants), and no op runs here (detach().float() returned an alias of an input)
    ctx.save_for_backward(weights, *(tensors if weights.requires_grad else ()))  # the tensors for d/dw only


def _rest(ctx) -> tuple:
    """None for the other arguments, as many as the op was called with (defaults left out are not)."""
    return (None,) * (len(ctx.needs_input_grad) - 2)


def _flat(needs):
    return needs if isinstance(needs, (list, tuple)) else [needs]


def _ws_grads(ctx, grads):
    """grads: one per output row of the [K, N] weights."""
    weights, *xs = ctx.saved_tensors
    w = weights.float().reshape(len(grads), -1)
    g = [x.float() if x is not None else None for x in grads]
    d_tensors = [None] * len(ctx.dtypes)
    if any(_flat(ctx.needs_input_grad[0])):
        d_tensors = []
        for i, dtype in enumerate(ctx.dtypes):
            acc = None
            for k, gk in enumerate(g):
                if gk is not None:
                    acc = gk * w[k, i] if acc is None else acc + gk * w[k, i]
            d_tensors.append(None if acc is None else acc.to(dtype))
    d_weights = None
    if ctx.needs_input_grad[1]:
        xs = [x.float() for x in xs]
        d_weights = torch.stack([torch.stack([(gk * x).sum() if gk is not None else x.new_zeros(()) for x in xs])
                                 for gk in g]).to(weights.device)
    return d_tensors, d_weights


def _ws_backward(ctx, grad):
    d_tensors, d_weights = _ws_grads(ctx, [grad])
    return (d_tensors, None if d_weights is None else d_weights.reshape(-1)) + _rest(ctx)


def _ws_many_backward(ctx, grads):
    d_tensors, d_weights = _ws_grads(ctx, list(grads))
    return (d_tensors, d_weights) + _rest(ctx)


weighted_sum.register_autograd(_ws_backward, setup_context=_ws_setup)
weighted_sum_many.register_autograd(_ws_many_backward, setup_context=_ws_setup)


# ---- the task-vector pass -------------------------------------------------------------------------
# A model's plan travels as one int64 row (mode, lo key, lo index, hi key, hi index, thr, model)
# and one float row (scale, weight); DELLA bitmasks as optional tensors.
@custom_op("pymerge::tv_merge_out", mutates_args=("out",), device_types="cpu")
def tv_merge_out(inputs: List[Tensor], base: Tensor, bits: List[Optional[Tensor]], plan_ints: List[int],
                 plan_floats: List[float], consensus: bool, normalize: bool, lam: float, divisor: float,
                 seed: int, h0: int, h1: int, offset: int, out: Tensor, backend: str = "auto",
                 num_threads: int = 0) -> None:
    """out = B + lam * combine(sparsified, weighted deltas); see pymerge/ops/task_vector_ops.py."""
    check_inference_out(out, "tv_merge")  # (a call through torch.ops: the pool's own writes may fill one)
    _tv_merge_out_cpu(inputs, base, bits, plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1,
                      offset, out, backend, num_threads)


def _tv_scalars(plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1, offset) -> tuple:
    """A task-vector pass's numbers and flags as Python's own: the caller's __index__, __float__ or __bool__
    run here, before the storage tests, never after them (in the kernel's argument conversion)."""
    return ([operator.index(v) for v in plan_ints], [float(v) for v in plan_floats], as_flag(consensus, "consensus"),
            as_flag(normalize, "normalize"), float(lam), float(divisor), operator.index(seed), operator.index(h0),
            operator.index(h1), operator.index(offset))


@_kernel("tv_merge_out", "cpu")
def _tv_merge_out_cpu(inputs, base, bits, plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1,
                      offset, out, backend="auto", num_threads=0, checked=()) -> None:
    _require_backend(backend, "tv_merge", "cpu")
    num_threads = check_threads(num_threads)  # (before the storage tests: an __index__ of the caller's)
    plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1, offset = _tv_scalars(
        plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1, offset)
    read = _check_read("tv_merge", list(inputs) + [base], checked)
    compiling = False if read else None
    inputs, (base,) = contiguous(inputs, compiling), contiguous([base], compiling)
    _check_tv(inputs, base, bits, plan_ints, plan_floats, offset, out, h0, h1, "cpu", read, OUTS in checked)
    if base.numel() == 0:  # (after the checks, as weighted_sum's)
        return
    _native.require_cpu().tv_merge(model_specs(inputs, bits, plan_ints, plan_floats), base.data_ptr(),
                                   _native.DTYPE_CODES[base.dtype], out.data_ptr(), _native.DTYPE_CODES[out.dtype],
                                   base.numel(), offset, consensus, normalize, lam, divisor, seed % _U64, h0, h1,
                                   num_threads)


@tv_merge_out.register_kernel("cuda")
def _tv_merge_out_cuda_op(inputs, base, bits, plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0,
                          h1, offset, out, backend="auto", num_threads=0):
    check_inference_out(out, "tv_merge")
    _tv_merge_out_cuda(inputs, base, bits, plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1,
                       offset, out, backend, num_threads)


@_kernel("tv_merge_out", "cuda")
def _tv_merge_out_cuda(inputs, base, bits, plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1,
                       offset, out, backend="auto", num_threads=0, checked=()):
    plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1, offset = _tv_scalars(
        plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1, offset)
    read = _check_read("tv_merge", list(inputs) + [base], checked)
    compiling = False if read else None
    inputs, (base,) = contiguous(inputs, compiling), contiguous([base], compiling)
    _check_tv(inputs, base, bits, plan_ints, plan_floats, offset, out, h0, h1, base.device, read, OUTS in checked)
    if base.numel() == 0:
        return
    with torch.cuda.device(base.device):
        chosen = _cuda_backend(backend, "tv_merge", list(inputs) + [base])
        if chosen == "triton":
            from pymerge.kernels import task_vectors as tk
            from pymerge.ops.task_vector_ops import plans_from_rows
            tk.tv_merge(inputs, base, plans_from_rows(bits, plan_ints, plan_floats), out, consensus=consensus,
                        normalize=normalize, lam=lam, divisor=divisor, seed=seed % _U64, h0=h0, h1=h1, offset=offset)
            return
        ext = _native.require_cuda() if chosen == "cuda" else None
        if ext is None or len(inputs) > ext.MAX_TV_MODELS:  # no kernel takes it: eager torch, any number
            from pymerge.ops.task_vector_ops import _merge_torch, plans_from_rows
            _merge_torch(inputs, base, plans_from_rows(bits, plan_ints, plan_floats), out, consensus, normalize, lam,
                         divisor, (h0, h1), seed % _U64, offset)
            return
        stream = torch.cuda.current_stream(base.device).cuda_stream
        ext.tv_merge(model_specs(inputs, bits, plan_ints, plan_floats), base.data_ptr(),
                     _native.DTYPE_CODES[base.dtype], out.data_ptr(), _native.DTYPE_CODES[out.dtype], base.numel(),
                     offset, consensus, normalize, lam, divisor, seed % _U64, h0, h1, stream)


@register_fake("pymerge::tv_merge_out")
def _(inputs, base, bits, plan_ints, plan_floats, consensus, normalize, lam, divisor, seed, h0, h1, offset, out,
      backend="auto", num_threads=0):
    _same_shape("tv_merge", list(inputs) + [base])
    _one_device("tv_merge", inputs, base, out, bits)
    _check_plan_lengths(len(inputs), bits, plan_ints, plan_floats)
    _fake_checks("tv_merge", list(inputs) + [base], [out], base.numel(), backend, num_threads)


PLAN_INTS, PLAN_FLOATS = 7, 2  # entries per model in plan_ints / plan_floats


def _check_plan_lengths(n: int, bits, plan_ints, plan_floats) -> None:
    """A task-vector pass's plan for n inputs: a bitmask entry, PLAN_INTS ints and PLAN_FLOATS floats each."""
    if len(bits) != n or len(plan_ints) != n * PLAN_INTS or len(plan_floats) != n * PLAN_FLOATS:
        raise ValueError(f"tv_merge: {n} inputs need {n} bitmask entries, {n * PLAN_INTS} plan ints and "
                         f"{n * PLAN_FLOATS} plan floats; got {len(bits)}, {len(plan_ints)}, {len(plan_floats)}")


def _check_tv(inputs, base, bits, plan_ints, plan_floats, offset, out, h0, h1, device, inputs_backed=False,
              out_backed=False) -> None:
    _check_plan_lengths(len(inputs), bits, plan_ints, plan_floats)
    _require_out(out, "tv_merge")
    _same_shape("tv_merge", list(inputs) + [base])
    # the C++ plan's types (pybind11 raised "incompatible function arguments" past them)
    if not (0 <= h0 < 1 << 32 and 0 <= h1 < 1 << 32):
        raise ValueError(f"tv_merge: h0 and h1 must be from 0 to 2**32 - 1, got {h0} and {h1}")
    modes = _native.SPARSIFIER_MODES
    for i in range(len(inputs)):
        mode, lo_key, _, hi_key, _, thr, _ = plan_ints[i * PLAN_INTS:(i + 1) * PLAN_INTS]
        if not (-(1 << 31) <= mode < 1 << 31 and thr >= 0):
            raise ValueError(f"tv_merge: model {i}'s plan has mode {mode} and threshold {thr}; a mode is a 32-bit "
                             "integer, a threshold >= 0")
        # the kernels compare 32-bit magnitude keys (pymerge/ops/select.py): a boundary past them was truncated
        if mode == modes["topk"] and not -1 <= hi_key < 1 << 31:
            raise ValueError(f"tv_merge: model {i}'s top-k boundary key is {hi_key}; keys are from -1 (keep "
                             "every element) to 2**31 - 1")
        if mode == modes["range"] and not (0 <= lo_key <= 1 << 31 and 0 <= hi_key <= 1 << 31):
            raise ValueError(f"tv_merge: model {i}'s range boundary keys are {lo_key} and {hi_key}; keys are "
                             "from 0 to 2**31")
    _check_native(list(inputs) + [base], [out], base.numel(), "tv_merge", device, inputs_backed, out_backed)
    check_apart(list(inputs) + [base], [out], "tv_merge")
    if not 0 <= offset <= philox.MAX_ELEMENTS - base.numel():  # the draws' 32-bit counter would wrap
        raise ValueError(f"tv_merge: offset {offset} and {base.numel()} elements pass the "
                         f"{philox.MAX_ELEMENTS} elements a tensor's draws and bits index")
    for i, b in enumerate(bits):
        if b is None:
            continue
        if b.dtype != torch.int64 or not b.is_contiguous() or b.device != base.device:
            raise ValueError(f"tv_merge: bitmask {i} must be a contiguous int64 tensor on {base.device}")
        if b.numel() * 64 < offset + base.numel():
            raise ValueError(f"tv_merge: bitmask {i} has {b.numel() * 64} bits, fewer than the "
                             f"{offset + base.numel()} that elements {offset}..{offset + base.numel() - 1} index")
        check_backed(b, f"tv_merge: bitmask {i}")
        if not addresses_unknown([out]) and _overlaps(out, b):  # read word by word as the output is written
            raise ValueError(f"tv_merge: bitmask {i} shares memory with the output; pass it in a tensor of its own")


def model_specs(inputs, bits, plan_ints, plan_floats) -> list:
    """The flat tuples csrc/cpu/task_vectors.cpp (and the CUDA extension) read, one per model."""
    specs = []
    for i, x in enumerate(inputs):
        mode, lo_key, lo_idx, hi_key, hi_idx, thr, model = plan_ints[i * PLAN_INTS:(i + 1) * PLAN_INTS]
        scale, weight = plan_floats[i * PLAN_FLOATS:(i + 1) * PLAN_FLOATS]
        b = bits[i]
        specs.append((x.data_ptr(), _native.DTYPE_CODES[x.dtype], mode, lo_key, lo_idx, hi_key, hi_idx, thr,
                      b.data_ptr() if b is not None else 0, scale, weight, model & 0xFFFFFFFF))
    return specs


# ---- magnitude rank selection (CPU kernel; other devices use the torch path in pymerge.ops.select) --
@custom_op("pymerge::select_ranks", mutates_args=(), device_types="cpu")
def select_ranks(x: Tensor, base: Optional[Tensor], ranks: List[int], descending: bool,
                 num_threads: int = 0) -> Tensor:
    """int64 [len(ranks), 2]: the (key, index) boundary of every rank (see pymerge/ops/select.py)."""
    _same_shape("select_ranks", [x, base])
    return _select_ranks(x, base, ranks, descending, num_threads)


@_kernel("select_ranks", "cpu")
def _select_ranks(x, base, ranks, descending, num_threads=0, checked=()) -> Tensor:
    num_threads = check_threads(num_threads)  # (before the storage tests: an __index__ of the caller's)
    ranks, descending = [operator.index(r) for r in ranks], as_flag(descending, "select_ranks: descending")
    read = _check_read("select_ranks", [x, base], checked)
    x = x.contiguous()
    base = base.contiguous() if base is not None else None
    _check_native([x, base], [], x.numel(), "select_ranks", "cpu", read)
    found = _native.require_cpu().select_ranks(
        x.data_ptr(), _native.DTYPE_CODES[x.dtype], base.data_ptr() if base is not None else 0,
        _native.DTYPE_CODES[base.dtype] if base is not None else 0, x.numel(), ranks, descending, num_threads)
    return torch.tensor(found, dtype=torch.int64).reshape(len(ranks), 2)


@register_fake("pymerge::select_ranks")
def _(x, base, ranks, descending, num_threads=0):
    _same_shape("select_ranks", [x, base])
    _one_device("select_ranks", x, base)
    _fake_checks("select_ranks", [x, base], num_threads=num_threads)
    if any(not 0 <= r <= x.numel() for r in ranks):
        raise ValueError("select: rank out of range")
    return x.new_empty((len(ranks), 2), dtype=torch.int64)


# ---- interpolation: per-group dot products and linear combinations (CPU kernels) -----------------
@custom_op("pymerge::group_dots", mutates_args=(), device_types="cpu")
def group_dots(xs: List[Tensor], base: Optional[Tensor], sub: bool, rows: int, cols: int, group: int,
               num_threads: int = 0) -> Tensor:
    """float64 [G, K(K+1)/2]: upper-triangle dot products of v_i = x_i - sub*B per group (the whole
    tensor: exact sums rounded once, pymerge/ops/exact_sum.py)."""
    return _group_dots(xs, base, sub, rows, cols, group, num_threads)


def _group_scalars(sub, rows, cols, group) -> tuple:
    """As _tv_scalars: the caller's __bool__ and __index__ before the storage tests."""
    return as_flag(sub, "sub"), operator.index(rows), operator.index(cols), operator.index(group)


@_kernel("group_dots", "cpu")
def _group_dots(xs, base, sub, rows, cols, group, num_threads=0, checked=()) -> Tensor:
    num_threads = check_threads(num_threads)  # (before the storage tests: an __index__ of the caller's)
    sub, rows, cols, group = _group_scalars(sub, rows, cols, group)
    read = _check_read("group_dots", list(xs) + [base], checked)
    xs = contiguous(xs, False if read else None)
    base = base.contiguous() if base is not None else None
    _check_groups(xs, base, rows, cols, group, [], "group_dots", read, sub=sub)
    k = len(xs)
    if not xs[0].numel():  # every dot is 0 (and an empty base has no address: the kernel took it for none)
        return torch.zeros((1, rows, cols)[group], k * (k + 1) // 2, dtype=torch.float64, device="cpu")
    if group == 0:
        from pymerge.ops import exact_sum, interp
        return torch.tensor([exact_sum.totals(interp.whole_dot_parts(xs, base, sub, "cpu", num_threads))],
                            dtype=torch.float64)
    flat = _native.require_cpu().group_dots(
        [x.data_ptr() for x in xs], _codes(xs), base.data_ptr() if base is not None else 0,
        _native.DTYPE_CODES[base.dtype] if base is not None else 0, sub, rows, cols, group, num_threads)
    return torch.tensor(flat, dtype=torch.float64).reshape(-1, k * (k + 1) // 2)


@register_fake("pymerge::group_dots")
def _(xs, base, sub, rows, cols, group, num_threads=0):
    _fake_groups(xs, base, sub, rows, cols, group, "group_dots", num_threads)
    k = len(xs)
    g = (1, rows, cols)[group]
    return xs[0].new_empty((g, k * (k + 1) // 2), dtype=torch.float64)


@custom_op("pymerge::group_lincomb_out", mutates_args=("out",), device_types="cpu")
def group_lincomb_out(xs: List[Tensor], base: Optional[Tensor], sub: bool, rows: int, cols: int, group: int,
                      coef: Tensor, out: Tensor, num_threads: int = 0) -> None:
    """out = coef[g, K] * B + sum_i coef[g, i] * (x_i - sub*B), coef float32 [G, K+1]."""
    check_inference_out(out, "group_lincomb")
    _group_lincomb_out(xs, base, sub, rows, cols, group, coef, out, num_threads)


@_kernel("group_lincomb_out", "cpu")
def _group_lincomb_out(xs, base, sub, rows, cols, group, coef, out, num_threads=0, checked=()) -> None:
    num_threads = check_threads(num_threads)  # (before the storage tests: an __index__ of the caller's)
    sub, rows, cols, group = _group_scalars(sub, rows, cols, group)
    read = _check_read("group_lincomb", list(xs) + [base], checked, coef=coef)
    xs = contiguous(xs, False if read else None)
    base = base.contiguous() if base is not None else None
    _check_groups(xs, base, rows, cols, group, [out], "group_lincomb", read, OUTS in checked, sub=sub)
    check_coef_size(coef, (1, rows, cols)[group], len(xs))
    _require_out(out, "group_lincomb")
    if not xs[0].numel():  # nothing to write (and an empty base has no address: the kernel took it for none)
        return
    _native.require_cpu().group_lincomb(
        [x.data_ptr() for x in xs], _codes(xs), base.data_ptr() if base is not None else 0,
        _native.DTYPE_CODES[base.dtype] if base is not None else 0, sub, rows, cols, group,
        coef.reshape(-1).tolist(), out.data_ptr(), _native.DTYPE_CODES[out.dtype], num_threads)


def check_coef_size(coef: Tensor, groups: int, k: int) -> None:
    """group_lincomb's coef: real numbers, one row of K + 1 per group."""
    _require_real(coef, "coef", "group_lincomb")
    if coef.numel() != groups * (k + 1):
        raise ValueError(f"group_lincomb: coef has {coef.numel()} entries; {groups} groups x {k + 1} need "
                         f"{groups * (k + 1)}")
    if coef.dtype == torch.float64 and coef.device.type == "cpu" and coef.numel() and not values_unknown(coef):
        # finite ones that float32 (the kernels') turns into inf: a model of inf and NaN, silently (NaN and inf
        # themselves pass, as a NaN checkpoint's dot products propagate them, as mergekit's do)
        largest = float(coef.detach().abs().max())  # (NaN where one is NaN)
        if not largest <= FLOAT32_MAX:  # rare: then only the finite ones count
            finite = coef.detach().reshape(-1)
            finite = finite[torch.isfinite(finite)].abs()
            if finite.numel() and float(finite.max()) > FLOAT32_MAX:
                raise ValueError(f"group_lincomb: a coefficient is {float(finite.max()):g}, beyond float32's range "
                                 "(the kernels multiply in float32)")


def _check_group_view(xs, base, rows, cols, group, op, sub) -> None:
    """The group ops' checks of their arguments alone (the real kernels' and the fakes')."""
    require_inputs(xs, op)
    _same_shape(op, list(xs) + [base])
    if group not in (0, 1, 2) or rows < 0 or cols < 0 or rows * cols != xs[0].numel():
        raise ValueError(f"{op}: a {rows} x {cols} view (group {group}) of {xs[0].numel()} elements is not valid")
    if sub and base is None:  # (the C++ kernel's "interp: sub needs a base" named no op)
        raise ValueError(f"{op}: sub needs a base")


def _check_groups(xs, base, rows, cols, group, outs, op, inputs_backed=False, outs_backed=False, sub=False) -> None:
    _check_group_view(xs, base, rows, cols, group, op, sub)
    _check_native(list(xs) + [base], outs, xs[0].numel(), op, "cpu", inputs_backed, outs_backed)
    check_apart(list(xs) + [base], outs, op)


@register_fake("pymerge::group_lincomb_out")
def _(xs, base, sub, rows, cols, group, coef, out, num_threads=0):
    _fake_groups(xs, base, sub, rows, cols, group, "group_lincomb", num_threads, out)
    _one_device("group_lincomb", xs, base, out, host_ok=[coef])
    check_coef_size(coef, (1, rows, cols)[group], len(xs))


def _fake_groups(xs, base, sub, rows, cols, group, op, num_threads, out=None) -> None:
    """The group ops' checks that read no data, for their fakes."""
    _check_group_view(xs, base, rows, cols, group, op, sub)
    _one_device(op, xs, base)
    _fake_checks(op, list(xs) + [base], [out] if out is not None else (), xs[0].numel(), None, num_threads)


# ---- autograd kernels: out= ops refuse tensors in a graph, no op runs under forward-mode AD -----------
# torch.library's autograd kernel for a mutating op runs it with no word when an input or an output
# requires grad (the op records nothing: an out kept its old grad_fn), and grad mode is off by the time
# the op's own kernel runs. And under torch.func.jvp / jacfwd (no input requires grad there) every op ran
# below autograd: a tangent of zeros, in silence. So each op gets an autograd kernel per device that
# checks first (a device's Autograd key takes precedence over the generic one torch.library registered),
# then runs torch.library's own autograd kernel (functional ops: their backward) or the op below autograd.
_AUTOGRAD_LIB = torch.library.Library("pymerge", "IMPL")


def _refuse_forward_mode(name: str, args) -> None:
    """Refuses an input carrying a tangent: a forward_ad dual, or one torch.func.jvp made (a dual at the
    autograd key, inside its wrapper). Inputs that do not depend on what jvp differentiates carry none:
    their zero tangent is right, as for torch's own ops."""
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, Tensor)]
    if any(is_dual(t) for t in tensors):
        raise RuntimeError(f"pymerge::{name} has no forward-mode derivative (torch.func.jvp, jacfwd); use "
                           "reverse mode (torch.autograd: backward) or plain torch ops")


def _autograd_kernel(name: str, opdef=None, tensors_of=None) -> None:
    """opdef: a functional op's CustomOpDef, whose generated autograd kernel runs after the checks;
    tensors_of(*args) -> (inputs, weights or coef, outs): an out= op's, checked for gradients."""
    op = getattr(torch.ops.pymerge, name).default
    generated = None
    if opdef is not None:
        from torch._library.autograd import make_autograd_impl
        generated = make_autograd_impl(op, opdef)

    def autograd_kernel(keyset, *args, **kwargs):
        _refuse_forward_mode(name, args)
        if tensors_of is not None and torch.is_grad_enabled():
            no_grad_for_out(*tensors_of(*args), name)
        if generated is not None:
            return generated(keyset, *args, **kwargs)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args, **kwargs)

    for key in ("AutogradCPU", "AutogradCUDA"):
        _AUTOGRAD_LIB.impl(name, autograd_kernel, key, with_keyset=True)


for _opdef in (weighted_sum, weighted_sum_many, select_ranks, group_dots):
    _autograd_kernel(_opdef._name, opdef=_opdef)
# (inputs, weights or coef, outs) of each
_autograd_kernel("weighted_sum_out", tensors_of=lambda tensors, weights, out, *_: (tensors, weights, [out]))
_autograd_kernel("weighted_sum_many_out", tensors_of=lambda tensors, weights, outs, *_: (tensors, weights, outs))
_autograd_kernel("tv_merge_out", tensors_of=lambda inputs, base, *rest: (list(inputs) + [base], None, [rest[11]]))
_autograd_kernel("group_lincomb_out", tensors_of=lambda xs, base, sub, rows, cols, group, coef, out, *_:
                 (list(xs) + [base], coef, [out]))
