"""Model Stock (mergekit 0.1.5): base + >= 2 models. cos = mean pairwise cosine of the offsets
x_i - B (norm products clamped at 1e-6), t = N cos / (1 + (N-1) cos) (0 when |denominator| < 1e-6),
result t * mean(x_i) + (1 - t) * B. `filter_wise` computes t per row (last-dim vectors) instead of
per tensor. One reduction pass for the Gram matrix of offsets, one elementwise pass.
"""
import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, TensorTask, register
from pymerge.methods.base import flag_param
from pymerge.ops import interp


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    base_model = "required"
    min_models = 2
    global_params = {"filter_wise": Param(False, "one interpolation factor per row instead of per tensor")}
    chunkable = False

    def validate(self, n_models: int, has_base: bool, base_among: bool = False) -> None:
        if not has_base or n_models < 2:
            raise MergeConfigError(f"merge_method model_stock needs a base_model and at least two other models; got "
                                   f"{n_models} other model(s){'' if has_base else ' and no base_model'}")

    def check_params(self, task: TensorTask) -> None:
        flag_param(task.params.get("filter_wise", False), "filter_wise")

    def dot_group(self, task: TensorTask) -> str:
        """The vectors the cosines are taken between (see interp.group_dots)."""
        filter_wise = flag_param(task.params.get("filter_wise", False), "filter_wise")
        return "rows" if filter_wise and task.base.dim() >= 2 else "whole"

    def dot_args(self, task: TensorTask) -> tuple:
        """(vectors, base, subtract the base) of the dot products (see interp.group_dots)."""
        if task.base is None or len(task.inputs) < 2:
            raise MergeConfigError(f"tensor {task.name}: model_stock needs a base_model and at least two other models")
        return task.inputs, task.base, True

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        group = self.dot_group(task)
        n = len(task.inputs)
        xs, base, sub = self.dot_args(task)
        gram = (task.dots or interp.group_dots)(xs, base, sub, group, task.backend, task.num_threads)
        coefs = []
        for g in gram:
            t = interp.model_stock_t(g)
            coefs.append([t / n] * n + [1.0 - t])
        interp.group_lincomb(task.inputs, task.base, False, group, torch.tensor(coefs, dtype=torch.float64, device="cpu"), out,
                             task.backend, task.num_threads)
