"""Argument checks shared by the fused ops: one clear message per mistake, before any work."""
import contextvars
import itertools
import math
import numbers
import operator
from collections.abc import Mapping, Set as AbstractSet
from decimal import Decimal
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from pymerge._native import INPUT_DTYPES, OUTPUT_DTYPES
from pymerge.errors import short
from pymerge.ops._memory import (DUAL, PLAIN, _wrapper, backing_problem, check_backed, check_readable, is_dual,
                                 layout_problem)

_FP8 = frozenset(d for d in INPUT_DTYPES if d.itemsize == 1)
# floating-point to is_floating_point(), but torch converts them to nothing else (copy_ is not implemented)
_PACKED = frozenset(d for d in (getattr(torch, "float4_e2m1fn_x2", None),) if d is not None)


def _dtype_names(dtypes):
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def check_out_dtype(out: torch.Tensor, what: str) -> None:
    """An output the kernels write: float32, float16 or bfloat16."""
    if out.dtype not in OUTPUT_DTYPES:
        raise TypeError(f"{what} has unsupported dtype {out.dtype}; supported: {_dtype_names(OUTPUT_DTYPES)}")


def check_inputs(tensors) -> List[torch.Tensor]:
    """Same shape, same device, supported float dtypes; returns the inputs as a list."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError("tensors must be a sequence of tensors, not a single tensor")
    if isinstance(tensors, Mapping):  # (its repr echoed every tensor, over many lines)
        raise TypeError(f"tensors must be a sequence of tensors, got a {type(tensors).__name__} of "
                        f"{len(tensors)} entries; pass list(d.values())")
    if isinstance(tensors, (str, bytes, AbstractSet)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"tensors must be a sequence of tensors, got {short(tensors)}")  # a dict: its keys
    tensors = list(tensors)
    if not tensors:
        raise ValueError("need at least one input tensor, got an empty list")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"input {i} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"input {i} has unsupported dtype {t.dtype}; supported: {_dtype_names(INPUT_DTYPES)}")
        check_layout(t, f"input {i}")
        if t.shape != first.shape:
            raise ValueError(f"input {i} has shape {tuple(t.shape)} but input 0 has shape {tuple(first.shape)}")
        if t.device != first.device:
            raise ValueError(f"input {i} is on {t.device} but input 0 is on {first.device}")
    return tensors


def check_layout(t: torch.Tensor, what: str) -> None:
    """A dense strided tensor: a sparse, nested or quantized one raised torch's own internal errors."""
    problem = layout_problem(t)
    if problem:
        raise ValueError(f"{what}: {problem}")


def check_weights(weights, n: int, what: str = "weights", compiling: Optional[bool] = None) -> List[float]:
    """A sequence or 1-D tensor of n finite numbers within float32's range (the kernels multiply in
    float32), returned as Python floats. Strings, mappings and booleans are refused, not parsed:
    "12" was read as [1, 2] and a dict as its keys. compiling: torch.compiler.is_compiling(), where the
    caller has read it."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if compiling and not isinstance(weights, torch.Tensor):
        weights = _traced_numpy(weights, what)
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.dtype == torch.bool or weights.is_complex():
            raise ValueError(f"{what} must be a 1-D tensor of real numbers, got {weights.dtype} of shape "
                             f"{tuple(weights.shape)}")
        if values_unknown(weights):  # the op gets the tensor itself, and its kernel checks the values
            if weights.shape[0] != n:
                raise ValueError(f"got {weights.shape[0]} {what} for {n} inputs")
            if not compiling and _wrapper(weights):
                check_backed(weights, what)  # a DTensor: the hint, not the dispatcher's mixed-types error
            return weights
        check_layout(weights, what)  # sparse: "Cannot access storage of SparseTensorImpl"
        check_values_readable(weights, what)
        if weights.shape[0] != n:  # before the copy (an expand()ed 10**8 weights took 4.6 GB to be refused)
            raise ValueError(f"got {weights.shape[0]} {what} for {n} inputs")
        weights = weights.detach().double().cpu().tolist()
    if type(weights) not in (list, tuple) and isinstance(weights, (str, bytes, Mapping, AbstractSet)):
        raise TypeError(f"{what} must be a sequence of numbers, got {short(weights)}")
    plain = type(weights) in (list, tuple) and set(map(type, weights)) <= {float, int}  # the usual case, in C
    unsized = not plain and not hasattr(weights, "__len__")
    if not plain:
        try:  # read once (a generator), and no further than one past n (itertools.count() never ended)
            weights = list(itertools.islice(weights, n + 1)) if unsized else list(weights)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be numbers, got {short(weights)}") from None
        refuse_tracked_items(weights, what, "one 1-D tensor")
    try:
        values = list(map(float, weights)) if plain else [_real(w) for w in weights]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be numbers, got {short(weights)}") from None
    except OverflowError:  # an integer past float's range (10**400)
        raise ValueError(f"{what} must be finite and within float32's range, got {short(weights)}") from None
    if len(values) != n:
        count = f"more than {n}" if unsized and len(values) > n else len(values)
        raise ValueError(f"got {count} {what} for {n} inputs")
    if compiling:
        return values  # floats may be symbolic (dynamic=True): the kernel checks the values it is given
    bad = first_out_of_range(values)
    if bad is not None:
        w = values[bad]
        if not math.isfinite(w):
            raise ValueError(f"{what}[{bad}] is {w}; weights must be finite")
        raise ValueError(f"{what}[{bad}] is {w:g}, beyond float32's range (the kernels multiply in float32)")
    return values


FLOAT32_MAX = 3.4028234663852886e38


def _traced_numpy(weights, what: str):
    """Numpy weights as one tensor while torch.compile traces: it traces an array, and every numpy scalar, as
    a (0-d) array, which neither float() nor the numbers ABCs take there (eager reads their values)."""
    if isinstance(weights, np.ndarray):
        return torch.as_tensor(weights)
    if type(weights) in (list, tuple) and any(isinstance(w, (np.ndarray, np.generic)) for w in weights):
        items = [torch.as_tensor(w) for w in weights]
        if any(t.dim() or t.dtype == torch.bool or t.is_complex() for t in items):
            raise TypeError(f"{what} must be real numbers")
        return torch.stack([t.to(torch.float64) for t in items])
    return weights


def values_unknown(weights: torch.Tensor) -> bool:
    """Whether a weight tensor must go to the op as a tensor, its values unread here: under torch.compile,
    a dispatch mode (make_fx, FakeTensorMode: tolist() recorded the trace-time values as a constant, or
    failed on a fake tensor), functionalize (its wrappers hold no storage to read) or
    for a subclass (a FakeTensor)."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or type(weights) not in PLAIN or torch._is_functional_tensor(weights))


def check_values_readable(t: torch.Tensor, what: str) -> None:
    """A tensor whose values are read here (tolist): with data (not meta), backed by its storage."""
    if t.device.type == "meta":
        raise ValueError(f"{what} are on the meta device and hold no values")
    if is_dual(t):  # tolist() drops the tangent
        raise ValueError(f"{what}: {DUAL}")
    check_backed(t, what)


def refuse_tracked_items(items, what: str, instead: str) -> None:
    """Tensors that want gradients, given as separate items, are read as numbers: their gradient would be
    silently dropped. Autograd reaches them only as one tensor."""
    if torch.is_grad_enabled() and any(isinstance(w, torch.Tensor) and w.requires_grad for w in items):
        raise ValueError(f"{what}: a tensor in the sequence requires grad, but autograd reaches weights only "
                         f"when they come as {instead} (torch.stack them)")


def first_out_of_range(values: Sequence[float]) -> Optional[int]:
    """The index of the first value that is not finite or beyond float32's range, else None (the usual
    answer, found by two passes in C)."""
    if math.isfinite(sum(map(abs, values))) and max(map(abs, values), default=0.0) <= FLOAT32_MAX:
        return None
    return next(i for i, w in enumerate(values) if not abs(w) <= FLOAT32_MAX)


def _real(w) -> float:
    """A real number (int, float, Fraction, Decimal, numpy) as a float; a string, a boolean or anything else
    raises TypeError."""
    if type(w) is float or type(w) is int:  # the common case, without the ABC checks below (~0.5 us each)
        return float(w)
    if isinstance(w, torch.Tensor) and w.numel() == 1 and w.dtype != torch.bool and not w.is_complex():
        if w.is_meta or layout_problem(w) or backing_problem(w):  # float() raised torch's own errors
            raise TypeError(f"a tensor holding no readable value: {short(w)}")
        return float(w)
    if isinstance(w, (torch.SymFloat, torch.SymInt)):
        return w  # traced by torch.compile(dynamic=True)
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, (numbers.Real, np.integer, np.floating, Decimal)):
        raise TypeError(f"not a real number: {short(w)}")
    value = float(w)  # a Decimal too, as a Fraction is (no numbers.Real: its arithmetic refuses floats)
    if math.isinf(value) and isinstance(w, Decimal) and w.is_finite():
        raise OverflowError(f"{w} is beyond float's range")  # float() said inf, as a Fraction's raises
    return value


def default_out_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The inputs' promoted dtype; float8 inputs count as bfloat16 (there is no float8 output)."""
    dtype = None
    for t in tensors:
        d = torch.bfloat16 if t.dtype in _FP8 else t.dtype
        dtype = d if dtype is None else torch.promote_types(dtype, d)
    return dtype


def resolve_out(tensors, out_dtype: Optional[torch.dtype], out: Optional[torch.Tensor],
                allow_alias: bool = True) -> torch.dtype:
    """Checks out= and out_dtype= against the inputs; returns the output dtype.

    allow_alias: out may be one of the inputs itself (safe for one output: every backend reads a
    block of all inputs before writing it). With several outputs it is not: a later output would
    read an input an earlier one already overwrote, so callers pass False then.
    """
    first = tensors[0]
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):  # "bfloat16" was "unsupported ... supported:
        raise TypeError("out_dtype must be a torch.dtype (torch.bfloat16, torch.float16 or torch.float32), got "
                        f"{short(out_dtype)}")  # bfloat16" (an audit)
    if out_dtype is not None and out_dtype not in OUTPUT_DTYPES:
        raise TypeError(f"unsupported out_dtype {out_dtype}; supported: {_dtype_names(OUTPUT_DTYPES)}")
    if out is None:
        return out_dtype or default_out_dtype(tensors)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_layout(out, "out")
    if out.shape != first.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but the inputs have shape {tuple(first.shape)}")
    if out.device != first.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {first.device}")
    check_out_dtype(out, "out")
    if out_dtype is not None and out_dtype != out.dtype:
        raise ValueError(f"out has dtype {out.dtype} but out_dtype={out_dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if addresses_unknown([out]):
        return out.dtype  # addresses are not known while tracing: the op checks overlaps when it runs
    for i, t in enumerate(tensors):
        if not allow_alias and _overlaps(out, t):
            raise ValueError(f"an output shares memory with input {i}; with several outputs, write to separate tensors")
        if _overlaps_partially(out, t):
            raise ValueError(f"out partially overlaps input {i}; use a separate output or exactly the same tensor")
    return out.dtype


def require_inputs(tensors, op: str) -> None:
    if isinstance(tensors, torch.Tensor):  # (its truth value raised torch's "ambiguous" error)
        raise TypeError(f"{op}: the inputs must be a sequence of tensors, not a single tensor (list(t) for its rows)")
    if not tensors:
        raise ValueError(f"{op}: needs at least one input")


# Set while a pool writes its targets: check_inference_out's rule is for the caller's out=, and the pool fills a
# model made under inference mode wherever it is called (its kernels write by address), whichever way its writes
# go (a public wrapper; a raw op, through torch.ops under a TorchFunctionMode).
FILLING_TARGETS = contextvars.ContextVar("pymerge_filling_targets", default=False)


def check_inference_out(out: torch.Tensor, op: str, compiling: Optional[bool] = None) -> None:
    """As torch's own out= ops: an inference tensor is written only inside inference mode (the kernels write
    by address, and wrote one anywhere). For the caller's out= (the public weighted sums, the raw ops)."""
    if torch.compiler.is_compiling() if compiling is None else compiling:  # (dynamo cannot trace is_inference();
        return                                                             # the op's own check runs when it does)
    if out.is_inference() and not torch.is_inference_mode_enabled() and not FILLING_TARGETS.get():
        raise RuntimeError(f"{op}: out is an inference tensor, which is written only inside torch.inference_mode(); "
                           "call it there, or pass a clone")


def check_merge_args(xs, base: Optional[torch.Tensor], out: Optional[torch.Tensor], op: str,
                     base_first: bool = False, probe_out: bool = True) -> tuple:
    """What an op over inputs and a base checks before it reads any: at least one input, every input of
    the base's shape (the native kernels see element counts only: (6, 4) beside (4, 6) was merged
    element by element), an output of as many elements (any shape), and every tensor backed by its
    storage (check_readable). Numbered as the kernels' checks number them: the base after the inputs,
    or first (base_first). Returns what check_readable returned for the inputs and base, and for the
    output (False without one): whether it checked them (not while tracing). A checked output over foreign
    memory is probed for writes (every path writes it), unless probe_out=False (a later call of the op does)."""
    require_inputs(xs, op)
    for i, t in enumerate(list(xs) + [base, out]):  # before .shape, which a nested tensor raised on
        if t is not None:
            check_layout(t, f"{op}: " + ("input" if i < len(xs) else "the base" if i == len(xs) else "output")
                         + (f" {i}" if i < len(xs) else ""))
    for i, t in enumerate(list(xs) + [base]):  # the torch paths would compute bools, or drop an imaginary part
        if t is not None and (not t.is_floating_point() or t.dtype in _PACKED):
            raise TypeError(f"{op}: " + (f"input {i}" if i < len(xs) else "the base") + f" is {t.dtype}; " +
                            ("a packed type torch converts to no other: unpack it first" if t.is_floating_point() else
                             "the inputs must be floating-point"))
    if out is not None:  # (the torch paths wrote ints, truncated)
        check_out_dtype(out, f"{op}: out")
        if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):  # (torch's copy_ error named nothing)
            raise ValueError(f"{op}: out has elements that share memory (an expanded view); pass a tensor of its own")
    ref, ref_name = (base, "the base") if base is not None else (xs[0], "input 0")
    for i, x in enumerate(xs):
        if x.shape != ref.shape:
            raise ValueError(f"{op}: input {i} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}")
    if out is not None and out.numel() != ref.numel():
        raise ValueError(f"{op}: output 0 has {out.numel()} elements, the op works on {ref.numel()}")
    for i, t in enumerate(list(xs) + [out]):  # (torch's own message named no input, or the copy)
        if t is not None and t.device != ref.device:
            what = f"input {i}" if i < len(xs) else "output 0"
            raise ValueError(f"{op}: {what} is on {t.device} but {ref_name} is on {ref.device}")
    compiling = torch.compiler.is_compiling()
    inputs = [base] + list(xs) if base_first else list(xs) + [base]  # numbered as the kernels number them
    read = check_readable(inputs, f"{op}: input", compiling=compiling)
    read_out = out is not None and check_readable([out], f"{op}: output", compiling=compiling, written=probe_out)
    if out is not None:  # the native kernels refuse it too; the torch paths (a GPU's, backend="torch") wrote
        # block by block over what a later block read: silently wrong (an audit). After the storage tests: freed
        # tensors' addresses (FSDP's resize_(0)) overlap, and the error was that, not the freed storage (a review)
        check_apart(inputs, [out], op)
    if out is not None and not compiling:  # (traced, the op's out= schema tells autograd)
        from pymerge.ops.library import no_grad_for_out
        # out is written by address or in place, recording no gradient: refused where one is wanted (the
        # ops bump its version where they write it by address: _versions.mark_written)
        no_grad_for_out(list(xs) + [base], None, [out], op)
        check_inference_out(out, op, compiling)  # (the CPU paths wrote one by address outside inference mode)
    return read, read_out


def check_separate(outs: Sequence[torch.Tensor]) -> None:
    """No two outputs share memory: each would overwrite what the other holds, in whatever order the
    threads write them."""
    if addresses_unknown(outs):
        return  # addresses are not known while tracing: the op checks when it runs
    spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * o.element_size(), k)
                   for k, o in enumerate(outs) if o.numel())
    for (_, end, j), (start, _, k) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"outs[{min(j, k)}] and outs[{max(j, k)}] share memory; give every output its own tensor")


def check_apart(inputs: Sequence[Optional[torch.Tensor]], outs: Sequence[torch.Tensor], op: str,
                exact_ok: bool = True) -> None:
    """Each output is apart from every input, or (exact_ok) exactly one of them: a kernel reads a block
    before it writes it, but an output a few elements ahead of an input overwrote what the next block then
    read. With several outputs a later one would read an input an earlier one overwrote: pass False. A
    non-contiguous input is copied before a kernel reads it."""
    if addresses_unknown(outs):
        return
    for k, o in enumerate(outs):
        for i, t in enumerate(inputs):
            if t is None or not t.is_contiguous():
                continue
            if not exact_ok and _overlaps(o, t):
                raise ValueError(f"{op}: output {k} shares memory with input {i}; write to a separate tensor "
                                 "(one output may be exactly one of the inputs)")
            if _overlaps_partially(o, t):
                raise ValueError(f"{op}: output {k} partially overlaps input {i}; use a separate output or "
                                 "exactly the same tensor")


def addresses_unknown(tensors: Sequence[torch.Tensor]) -> bool:
    """Under torch.compile, FakeTensorMode, make_fx or torch.func.functionalize tensors have no real addresses
    (data_ptr 0 or an error): overlaps are checked when the op runs on real tensors. Meta tensors have none
    either (every one is at 0: a meta out= was refused as overlapping its inputs), and nothing is written to them."""
    return torch.compiler.is_compiling() or any(
        t.is_meta or (is_fake(t) if type(t) not in PLAIN else torch._is_functional_tensor(t)) for t in tensors)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b share any bytes (by address range)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _overlaps_partially(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b share bytes but are not the very same elements (which would be unsafe)."""
    if not _overlaps(a, b):
        return False
    return not (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and b.is_contiguous())


MAX_THREADS = 1 << 16


def as_int(value) -> Optional[int]:
    """value as an int where it is one (Python or numpy integers; not bool, not float), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_flag(value, what: str) -> bool:
    """A flag as Python's bool, converted before the storage tests (its __bool__ is the caller's code): what
    pybind11 took (bool, numpy's bool, None, a number or 0-d tensor through __bool__ or __index__), never a
    string or a list, whose truth is their length ("False" would be True)."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return bool(value)
    kind = type(value)
    try:
        if getattr(kind, "__bool__", None) is not None and not isinstance(value, (str, bytes)):
            return bool(value)
        if getattr(kind, "__index__", None) is not None:  # (bool() would take its length or True, not its value)
            return operator.index(value) != 0
    except (TypeError, ValueError, RuntimeError) as exc:  # a tensor of many elements, a meta tensor
        raise TypeError(f"{what} must be a bool, got {short(value)}: {exc}") from None
    raise TypeError(f"{what} must be a bool, got {short(value)} ({kind.__name__})")


def not_nan(value, name: str, op: str) -> float:
    """A parameter as a float, refused when NaN (a NaN threshold or fraction computes a NaN or an empty
    selection without a word); infinities are the parameter's limits and stay."""
    if isinstance(value, (str, bytes)):  # float() parsed them: "0.5" was taken, None gave float()'s own words
        raise TypeError(f"{op}: {name} must be a number, got {short(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer past float's range
        raise ValueError(f"{op}: {name} is beyond float's range, got {short(value)}") from None
    except (TypeError, ValueError, RuntimeError):  # None, a list, a tensor of several elements or none
        raise TypeError(f"{op}: {name} must be a number, got {short(value)}") from None
    if value != value:
        raise ValueError(f"{op}: {name} is nan; give a number")
    return value


def float32_param(value, name: str, op: str, finite: bool = False) -> float:
    """not_nan, and within float32's range where the op computes with it in float32 (a finite 1e39 became
    inf there, or torch's overflow error); finite: infinities refused too."""
    value = not_nan(value, name, op)
    if (finite and not math.isfinite(value)) or (math.isfinite(value) and abs(value) > FLOAT32_MAX):
        raise ValueError(f"{op}: {name} is {value:g}; it must be {'finite and ' if finite else ''}within float32's "
                         "range (the op computes with it in float32)")
    return value


def check_threads(num_threads, what: str = "num_threads") -> int:
    """An integer 0..65536 (0: every core the process may use)."""
    n = as_int(num_threads)
    if n is None or not 0 <= n <= MAX_THREADS:
        raise ValueError(f"{what} must be an integer from 0 (all cores) to {MAX_THREADS}, got {short(num_threads)}")
    return n
