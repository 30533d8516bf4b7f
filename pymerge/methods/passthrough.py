"""Passthrough (mergekit 0.1.5): one model's tensor, optionally multiplied by its `scale`."""
import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, TensorTask, register
from pymerge.methods.base import number_param
from pymerge.ops.weighted_sum import sum_into


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    base_model = "none"
    min_models = 1
    max_models = 1
    model_params = {"scale": Param(None, "multiply the tensor by this factor (none: copy as is)")}
    chunkable = True  # elementwise

    def check_params(self, task: TensorTask) -> None:
        scale = task.model_params[0].get("scale") if task.model_params else None
        if scale is not None:
            number_param(scale, "scale", task.name)

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if len(task.inputs) != 1:
            raise MergeConfigError(f"tensor {task.name}: passthrough takes exactly one model, got {len(task.inputs)}")
        scale = task.model_params[0].get("scale") if task.model_params else None
        w = 1.0 if scale is None else number_param(scale, "scale", task.name)  # 1 * x is exact: a plain copy
        sum_into([task.inputs[0]], [[w]], [out], backend=task.backend, num_threads=task.num_threads)
