"""nearswap and arcee_fusion (mergekit 0.1.5): a base model and exactly one other model, mixed
element by element.

nearswap:     w = clamp(t / max(|B - x|, 1e-6), 0, 1); out = w x + (1 - w) B. Elementwise: the
              engine streams it in chunks; one fused native pass (pymerge/ops/elementwise_mix.py).
arcee_fusion: importance = |x - B| * KL(softmax(x) || softmax(B)) (softmax and KL over the last
              dim, +1e-8 inside), threshold = median + 1.5 (q3 - q1) of the importance; out =
              B + (x - B) where importance >= threshold, else B. mergekit estimates the quantiles
              from a random sample of 10^6 elements for bigger tensors (the global RNG: results vary
              run to run); pymerge takes the exact quantiles, which that sample estimates.
Arithmetic in float32 (mergekit computes in the load dtype; equal for float32).
"""
import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, REQUIRED, TensorTask, register
from pymerge.methods.task_vectors import _number
from pymerge.ops import elementwise_mix


class _BaseAndOne(MergeMethod):
    base_model = "required"
    min_models = 1
    max_models = 1

    def validate(self, n_models: int, has_base: bool) -> None:
        if not has_base or n_models != 1:
            raise MergeConfigError(f"merge_method {self.name} takes exactly two models, the base_model and one other; "
                                   f"got {n_models + int(has_base)} model(s){'' if has_base else ' and no base_model'}")

    def _pair(self, task: TensorTask):
        if task.base is None or len(task.inputs) != 1:
            raise MergeConfigError(f"tensor {task.name}: {self.name} needs the base_model and exactly one other model")
        return task.base, task.inputs[0]


@register
class NearSwap(_BaseAndOne):
    name = "nearswap"
    global_params = {"t": Param(REQUIRED, "distance below which the other model's value is taken")}
    chunkable = True

    def check_params(self, task: TensorTask) -> None:
        _number(task.params.get("t"), "t", task.name)

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        t = _number(task.params.get("t"), "t", task.name)
        self._pair(task)
        elementwise_mix.nearswap(task.base, task.inputs[0], t, out, task.backend, task.num_threads)


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - B| times the KL divergence of the softmaxes along the last dim (float32)."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - base).abs() * kl


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), quantile q taken as the element at floor(q (n - 1)) in sorted order."""
    flat = scores.reshape(-1)
    n = flat.numel()
    pos = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()  # float32 positions, as mergekit
    q1, med, q3 = (torch.kthvalue(flat, p + 1).values for p in pos)
    return med + 1.5 * (q3 - q1)


@register
class ArceeFusion(_BaseAndOne):
    name = "arcee_fusion"
    chunkable = False  # the threshold is a whole-tensor statistic

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        base, x = (t.float() for t in self._pair(task))
        if base.numel() == 0:
            return
        scores = importance(x, base)
        keep = scores >= fusion_threshold(scores)
        out.copy_(base + (x - base) * keep)
