"""nearswap and arcee_fusion (mergekit 0.1.5): a base model and exactly one other model, mixed
element by element.

nearswap:     w = clamp(t / max(|B - x|, 1e-6), 0, 1); out = w x + (1 - w) B. Elementwise: the
              engine streams it in chunks; one fused native pass (pymerge/ops/elementwise_mix.py).
arcee_fusion: importance = |x - B| * KL(softmax(x) || softmax(B)) (softmax and KL over the last
              dim, +1e-8 inside), threshold = median + 1.5 (q3 - q1) of the importance; out =
              B + (x - B) where importance >= threshold, else B. mergekit estimates the quantiles
              from a random sample of 10^6 elements for bigger tensors (the global RNG: results vary
              run to run); pymerge takes the exact quantiles, which that sample estimates.
              Native on the CPU: one pass of scores (softmax sums in float64), one selection for
              the three quantiles, one blend (pymerge/ops/consensus_ops.py).
Arithmetic in float32 (mergekit computes in the load dtype; equal for float32).
"""
import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, REQUIRED, TensorTask, register
from pymerge.methods.base import number_param
from pymerge.ops import consensus_ops, elementwise_mix


class _BaseAndOne(MergeMethod):
    base_model = "required"
    min_models = 1
    max_models = 1

    def validate(self, n_models: int, has_base: bool, base_among: bool = False) -> None:
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
        number_param(task.params.get("t"), "t", task.name)

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        t = number_param(task.params.get("t"), "t", task.name)
        self._pair(task)
        elementwise_mix.nearswap(task.base, task.inputs[0], t, out, task.backend, task.num_threads)


@register
class ArceeFusion(_BaseAndOne):
    name = "arcee_fusion"
    chunkable = False  # the threshold is a whole-tensor statistic

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        base, x = self._pair(task)
        consensus_ops.arcee_fusion(base, x, out, task.backend, task.num_threads)
