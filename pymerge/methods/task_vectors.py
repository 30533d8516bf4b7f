"""TIES, DARE, Model Breadcrumbs and DELLA: mergekit's generalized task arithmetic family.

Each method is the fused op of pymerge/ops/task_vector_ops.py with a fixed sparsifier and
consensus, and mergekit 0.1.5's parameters and defaults:
  per model: weight (required), density (1.0), gamma (0.01, breadcrumbs), epsilon (0.15, della)
  global:    normalize (per method), rescale (per method), lambda (1.0), int8_mask (false)

| method           | sparsify           | consensus | normalize | rescale |
| ties             | magnitude          | sum       | true      | false   |
| dare_linear      | random             | -         | false     | true    |
| dare_ties        | random             | sum       | false     | true    |
| breadcrumbs      | magnitude_outliers | -         | false     | false   |
| breadcrumbs_ties | magnitude_outliers | sum       | false     | false   |
| della_linear     | della_magprune     | -         | false     | true    |
| della            | della_magprune     | sum       | true      | true    |

`rescale` takes mergekit's booleans (true = L1 norm matching) and also "l1" or
"inverse_density" (DARE's paper rule, 1/density). `int8_mask` only picks mergekit's mask dtype;
it never changes a result, so it is accepted and ignored. task_arithmetic lives in linear.py and
may call merge_task_vectors() with no sparsifier.
"""
from typing import Any, Optional

import torch

from pymerge.config import FlagOrName
from pymerge.errors import short
from pymerge.methods.base import (MergeConfigError, MergeMethod, Param, REQUIRED, TensorTask, flag_param, number_param,
                                  register)
from pymerge.ops import task_vector_ops as tvo


def parse_rescale(value: Any) -> Optional[str]:
    """mergekit's bool, or a rule name: None (off), "l1" or "inverse_density"."""
    if value is None or value is False:
        return None
    if value is True:
        return "l1"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "l1"):
            return "l1"
        if v in ("false", "none", ""):
            return None
        if v == "inverse_density":
            return "inverse_density"
    raise MergeConfigError(f"rescale must be true, false, l1 or inverse_density; got {short(value)}")


def merge_task_vectors(task: TensorTask, out: torch.Tensor, *, sparsification: Optional[str], consensus: bool,
                       normalize: bool, rescale: Optional[str]) -> None:
    """Shared body: resolves per-model sparsifiers from task.model_params and runs the fused op."""
    sparsifiers, weights, lam = task_vector_args(task, sparsification, rescale)
    try:
        tvo.task_vector_merge(task.inputs, task.base, out, sparsifiers, weights, consensus=consensus,
                              normalize=normalize, lam=lam, name=task.name, seed=task.seed, offset=task.offset,
                              cache=task.cache, cache_keys=task.cache_keys, backend=task.backend,
                              num_threads=task.num_threads)
    except ValueError as exc:
        raise MergeConfigError(f"tensor {task.name}: {exc}") from None


def task_vector_args(task: TensorTask, sparsification: Optional[str], rescale: Optional[str]):
    """(per-model Sparsifiers, weights, lambda) of one tensor, checked (a sharded pool reuses this)."""
    if task.base is None:
        raise MergeConfigError(f"tensor {task.name}: this merge method needs a base_model")
    sparsifiers, weights = [], []
    for i, mp in enumerate(task.model_params):
        what = f"model {i}"
        if mp.get("weight") is None:
            raise MergeConfigError(f"{what} has no weight for tensor {task.name}")
        weights.append(number_param(mp["weight"], f"{what} weight", task.name))
        sp = tvo.Sparsifier(
            method=sparsification,
            density=number_param(mp.get("density", 1.0), f"{what} density", task.name),
            gamma=number_param(mp.get("gamma", 0.01), f"{what} gamma", task.name),
            epsilon=number_param(mp.get("epsilon", 0.15), f"{what} epsilon", task.name),
            rescale=rescale)
        try:
            tvo.check_sparsifier(sp, what)
        except ValueError as exc:
            raise MergeConfigError(f"{exc} (tensor {task.name})") from None
        sparsifiers.append(sp)
    return sparsifiers, weights, number_param(task.params.get("lambda", 1.0), "lambda", task.name)


class TaskVectorMethod(MergeMethod):
    """A generalized task-arithmetic method; subclasses pick sparsification and consensus."""
    base_model = "required"
    min_models = 0  # mergekit returns the base unchanged when there is nothing else (these exited 2: an audit)
    sparsification: Optional[str] = None
    consensus: bool = False
    default_normalize = False
    default_rescale = False
    # Thresholds and L1 norms are whole-tensor statistics: the engine must hand over whole tensors.
    chunkable = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        mp = {"weight": Param(REQUIRED, "scale of this model's task vector"),
              "density": Param(1.0, "fraction of the task vector kept, in [0, 1]")}
        if cls.sparsification == "magnitude_outliers":
            mp["gamma"] = Param(0.01, "fraction of the largest magnitudes dropped as outliers")
        if cls.sparsification == "della_magprune":
            mp["epsilon"] = Param(0.15, "keep probability spread around density by magnitude rank")
        cls.model_params = mp
        cls.global_params = {
            "normalize": Param(cls.default_normalize, "divide by the sum of (agreeing) weights"),
            "rescale": Param(cls.default_rescale, "true/l1: match the L1 norm after sparsifying; "
                                                  "inverse_density: multiply by 1/density",
                             FlagOrName("l1", "inverse_density")),
            "lambda": Param(1.0, "scale of the merged task vector"),
            "int8_mask": Param(False, "accepted for mergekit compatibility; no effect on results"),
        }

    def _settings(self, task: TensorTask):
        normalize = flag_param(task.params.get("normalize", self.default_normalize), "normalize")
        rescale = parse_rescale(task.params.get("rescale", self.default_rescale))
        flag_param(task.params.get("int8_mask", False), "int8_mask")
        return normalize, rescale

    def check_params(self, task: TensorTask) -> None:
        self._settings(task)
        for i, mp in enumerate(task.model_params):
            sp = tvo.Sparsifier(self.sparsification, number_param(mp.get("density", 1.0), f"model {i} density", task.name),
                                number_param(mp.get("gamma", 0.01), f"model {i} gamma", task.name),
                                number_param(mp.get("epsilon", 0.15), f"model {i} epsilon", task.name))
            try:
                tvo.check_sparsifier(sp, f"model {i}")
            except ValueError as exc:
                raise MergeConfigError(f"{exc} (tensor {task.name})") from None

    def task_vector_scales(self, task: TensorTask) -> list:
        """lambda * w_i / divisor: what each (sparsified) task vector is multiplied by, for check_magnitudes (weights
        [1, -0.9999999] with normalize wrote |out - base| ~ 8e6 at density 1 where task_arithmetic refused them:
        an audit). Under sign consensus the divisor is per element (the agreeing weights' sum): 1 here."""
        normalize, _ = self._settings(task)
        if any(mp.get("weight") is None for mp in task.model_params):
            return []  # the merge names the missing weight
        w = [number_param(mp["weight"], f"model {i} weight", task.name) for i, mp in enumerate(task.model_params)]
        lam = number_param(task.params.get("lambda", 1.0), "lambda", task.name)
        divisor = tvo.linear_divisor(w) if normalize and not self.consensus else 1.0
        return [lam * x / divisor for x in w]

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        normalize, rescale = self._settings(task)
        if not task.inputs and task.base is not None:  # only the base: as mergekit, the base unchanged
            out.copy_(task.base)
            return
        merge_task_vectors(task, out, sparsification=self.sparsification, consensus=self.consensus,
                           normalize=normalize, rescale=rescale)


@register
class Ties(TaskVectorMethod):
    name = "ties"
    sparsification = "magnitude"
    consensus = True
    default_normalize = True


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    sparsification = "random"
    default_rescale = True


@register
class DareTies(TaskVectorMethod):
    name = "dare_ties"
    sparsification = "random"
    consensus = True
    default_rescale = True


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    sparsification = "magnitude_outliers"


@register
class BreadcrumbsTies(TaskVectorMethod):
    name = "breadcrumbs_ties"
    sparsification = "magnitude_outliers"
    consensus = True


@register
class DellaLinear(TaskVectorMethod):
    name = "della_linear"
    sparsification = "della_magprune"
    default_rescale = True


@register
class Della(TaskVectorMethod):
    name = "della"
    sparsification = "della_magprune"
    consensus = True
    default_normalize = True
    default_rescale = True
