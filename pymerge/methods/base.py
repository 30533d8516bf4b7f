"""The contract every merge method follows, and the registry the config and engine look them up in.

A method is a small registered class: it declares its parameters (per model and global, with
mergekit 0.1.5's names and defaults), how many models it takes, whether it needs a base model,
and one function that merges one tensor into a preallocated output.

The engine (pymerge/merge.py) and the pool (pymerge/pool/pool.py) resolve parameters per tensor
(gradients over layers, filters by name) before calling ``merge_tensor``, so methods only ever
see plain numbers.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional

import numpy as np

if TYPE_CHECKING:  # torch loads with the methods that compute with it, not with this module
    import torch

# (MergeConfigError re-exported for method modules)
from pymerge.errors import InputError, MergeConfigError, add_note, first_line, short  # noqa: F401

_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A parameter a method accepts. default=REQUIRED means the user must give it. kind: the values a config may
    give (pymerge.config.kind_of), where the default's type does not say it."""
    default: Any = _REQUIRED
    doc: str = ""
    kind: Any = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


REQUIRED = _REQUIRED


@dataclass
class TensorTask:
    """Everything a method needs to merge one tensor (or one row-chunk of it).

    inputs       the models' tensors, in config order, base model excluded (zero-copy views)
    base         the base model's tensor, or None
    model_params one dict per input with that model's resolved parameters for this tensor
    params       the method's resolved global parameters for this tensor
    name         the tensor's name (errors and RNG keys use it)
    offset       element offset of this chunk inside the full tensor (0 for whole tensors)
    seed         the merge's random seed (DARE/DELLA masks are keyed by seed, name and element)
    cache        a SelectionCache the caller owns, to reuse per-tensor statistics across merges of
                 the same inputs (None: nothing is kept); cache_keys, one per input, name what
                 the inputs hold when their position alone does not (see task_vector_ops.plan_model)
    """
    inputs: List[torch.Tensor]
    base: Optional[torch.Tensor]
    model_params: List[Dict[str, Any]]
    params: Dict[str, Any]
    name: str = ""
    offset: int = 0
    seed: int = 0
    backend: str = "auto"
    num_threads: int = 0
    cache: Any = None
    cache_keys: Optional[List[Any]] = None
    # Replaces pymerge.ops.interp.group_dots for methods that reduce (a sharded pool sums across ranks).
    dots: Optional[Callable] = None
    # What MergeMethod.prepare computed for merge_tensor (a few numbers), or None.
    prepared: Any = None


class MergeMethod:
    """Base class: subclasses set the class attributes and implement merge_tensor."""
    name: ClassVar[str]
    base_model: ClassVar[str] = "none"        # "none" | "optional" | "required"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[Optional[int]] = None
    model_params: ClassVar[Dict[str, Param]] = {}
    global_params: ClassVar[Dict[str, Param]] = {}
    # True when out[j] depends only on element j of the inputs (and per-tensor constants known
    # up front), so the engine may stream a big tensor in row chunks with bounded memory.
    chunkable: ClassVar[bool] = False

    def validate(self, n_models: int, has_base: bool, base_among: bool = False) -> None:
        """Raises MergeConfigError when the model count or base model does not fit the method. base_among: the
        count includes a base_model (a config's, for a method without a base role, which takes it as an input)."""
        if self.base_model == "required" and not has_base:
            raise MergeConfigError(f"merge_method {self.name} needs a base_model")
        counted = "in all (its base_model among them)" if base_among else "besides the base"
        if n_models < self.min_models:
            raise MergeConfigError(f"merge_method {self.name} needs at least {self.min_models} model(s) "
                                   f"{counted}, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise MergeConfigError(f"merge_method {self.name} takes at most {self.max_models} model(s) "
                                   f"{counted}, got {n_models}")

    def check_params(self, task: TensorTask) -> None:
        """Per-tensor parameter checks (ranges); raise MergeConfigError naming the tensor."""

    def prepare(self, task: TensorTask) -> None:
        """Work on the tensor's data whose outcome can refuse the merge (multislerp's coefficients), kept in
        task.prepared (a few numbers). A pool prepares every tensor before it writes any, so such an error
        leaves the models merged into as they were; merge_tensor computes it itself when not prepared."""

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        """Writes the merged tensor into ``out`` (contiguous, output dtype, inputs' shape)."""
        raise NotImplementedError


# No merge needs a parameter or a coefficient this large, and beyond it float32 arithmetic turns
# ordinary (finite) weights into inf, NaN or noise: a weight, lambda or t of 1e300 is a typo.
MAX_MAGNITUDE = 1e6


class WritePass:
    """Counts the targets a pool's write pass (every check made) has written. An error raised after the first says
    so: the models merged into are not as they were. One prepare did not foresee becomes a MergeConfigError; any
    other (torch out of memory, an interrupt) keeps its type, with a note (an audit: a half-merged model, unsaid)."""

    def __init__(self, total: int):
        self.total, self.written = total, 0

    def __enter__(self) -> "WritePass":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not self.written:
            return False
        note = f"{self.written} of {self.total} tensors were written before it: the targets hold a partial merge"
        if isinstance(exc, ValueError):  # said in the message (a CheckpointError stays one)
            said = None
            if isinstance(exc, InputError):
                try:
                    said = type(exc)(f"{first_line(exc)}; {note}")
                except TypeError:  # a subclass of other arguments
                    pass
            raise (said or MergeConfigError(f"{first_line(exc)}; {note}")) from exc
        add_note(exc, note)
        return False


def merge_prepared(method: MergeMethod, pairs, total: int) -> None:
    """merge_tensor for each (task, out) of a pool's write, every task checked and prepared already."""
    with WritePass(total) as writes:
        for task, out in pairs:
            method.merge_tensor(task, out)
            writes.written += 1


def check_magnitudes(method: MergeMethod, task: TensorTask, labels: Optional[List[str]] = None) -> None:
    """Every resolved number (parameters and, for weighted sums, the computed coefficients) of one
    tensor is at most MAX_MAGNITUDE in size; else a MergeConfigError naming parameter and tensor."""
    labels = labels or [f"model {i}" for i in range(len(task.model_params))]
    found = [(f"parameter {k}", v) for k, v in task.params.items()]
    found += [(f"{label}: parameter {k}", v) for label, mp in zip(labels, task.model_params) for k, v in mp.items()]
    _check_sizes(task.name, found)  # first: the coefficients are computed from them
    weights_for = getattr(method, "weights_for", None)  # the coefficients the kernels multiply by
    if callable(weights_for):
        order, coef = weights_for(task)
        names = labels + ["base_model"]
        _check_sizes(task.name, [(f"coefficient of {names[i] if i < len(names) else i}", c) for i, c in zip(order, coef)])
    scales = getattr(method, "task_vector_scales", None)  # the sparsifying methods': no weights_for
    if callable(scales):
        _check_sizes(task.name, [(f"coefficient of {label}", c) for label, c in zip(labels, scales(task))])


def _check_sizes(tensor: str, found: list) -> None:
    for what, v in found:
        # ints too: lambda 10**7 passed where 1e7 was refused, karcher's max_iter 10**12 never ended
        # int(): abs of numpy's most negative int64 overflows back to itself
        size = abs(int(v)) if isinstance(v, numbers.Integral) else abs(v) if isinstance(v, numbers.Real) else 0
        if not isinstance(v, bool) and not size <= MAX_MAGNITUDE:  # NaN fails too
            shown = f"{v:g}" if isinstance(v, float) else short(int(v) if isinstance(v, numbers.Integral) else v)
            raise MergeConfigError(f"tensor {tensor}: {what} is {shown}; values beyond {MAX_MAGNITUDE:g} "
                                   f"make a non-finite or meaningless model")


_REGISTRY: Dict[str, MergeMethod] = {}


def linear_divisor(weights, total: Optional[float] = None) -> float:
    """mergekit's non-consensus normalize divisor: the weights' float32 sum `total`, 1 where it is under 1e-8 in size
    (compared in float32, as mergekit compares). Without `total`, the float32 sum in order, without torch (the
    engine's torch-free path computes task_arithmetic's coefficients): torch's own sum, which the task-vector
    kernels divide by as mergekit does (ops.task_vector_ops.linear_divisor), adds 5 or more numbers in another
    order, so their last bits may differ; the test near 1e-8 is the same rule. task_arithmetic's float64 sum took
    [0.3, -0.1, -0.2] for zero where both and mergekit do not (an audit)."""
    if total is None:
        total = np.float32(0)
        for w in weights:
            total = np.float32(total + np.float32(w))
    return 1.0 if abs(np.float32(total)) < np.float32(1e-8) else float(total)


def register(cls):
    """Class decorator: makes a method available under cls.name."""
    _REGISTRY[cls.name] = cls()
    return cls


def number_param(value: Any, what: str, name: str) -> float:
    try:
        x = float(value)
    except OverflowError:  # an int past float's range (10**400)
        x = math.inf
    except (TypeError, ValueError):
        raise MergeConfigError(f"{what} must be a number, got {short(value)} (tensor {name})") from None
    if not math.isfinite(x):
        raise MergeConfigError(f"{what} is {x} for tensor {name}; it must be finite")
    return x


def flag_param(value: Any, what: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, numbers.Real) and value in (0, 1):  # numpy's integers and floats too
        return bool(value)
    raise MergeConfigError(f"{what} must be true or false, got {short(value)}")


def get_method(name: str) -> MergeMethod:
    import pymerge.methods  # registers linear and task_arithmetic
    if not isinstance(name, str):  # (a list raised "unhashable type")
        raise MergeConfigError(f"merge_method must be a method's name, got {short(name)}")
    if name not in _REGISTRY:
        pymerge.methods.load_all()  # the rest (they import torch)
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MergeConfigError(f"unknown merge_method {name!r}; known: {known}") from None


def method_names() -> List[str]:
    import pymerge.methods
    pymerge.methods.load_all()
    return sorted(_REGISTRY)
