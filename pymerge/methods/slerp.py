"""SLERP and NuSLERP (mergekit 0.1.5 semantics): one reduction pass for the dot products and
norms, a few scalars of spherical math, then one elementwise pass (pymerge/ops/interp.py).

slerp:   base_model plus exactly one other model; `t` (required) runs from the base (t = 0) to the
         other model (t = 1). Whole-tensor: norms <= 1e-8 count as 1, |cos| > 0.9995 -> lerp.
nuslerp: exactly two models; t = w2 / (w1 + w2) (0.5 when |w1 + w2| < 1e-6). With a base model it
         interpolates the task vectors, B + nuslerp(t, x1 - B, x2 - B). `nuslerp_flatten` (default
         true) treats the tensor as one vector; otherwise `nuslerp_row_wise` picks vectors along
         dim 0 (true) or the last dim (false), as mergekit's dim=0 / dim=-1.
"""

import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, REQUIRED, TensorTask, register
from pymerge.methods.base import flag_param, number_param
from pymerge.ops import interp


@register
class Slerp(MergeMethod):
    name = "slerp"
    base_model = "required"
    min_models = 1
    max_models = 1
    global_params = {"t": Param(REQUIRED, "interpolation factor: 0 = base_model, 1 = the other model")}
    chunkable = False  # the angle is a whole-tensor statistic

    def validate(self, n_models: int, has_base: bool, base_among: bool = False) -> None:
        if not has_base or n_models != 1:
            total = n_models + int(has_base)
            raise MergeConfigError(f"merge_method slerp takes exactly two models, the base_model (t = 0) and one "
                                   f"other (t = 1); got {total} model(s){'' if has_base else ' and no base_model'}")

    def check_params(self, task: TensorTask) -> None:
        number_param(task.params.get("t"), "t", task.name)

    def dot_group(self, task: TensorTask) -> str:
        """The vectors the angle is measured between (see interp.group_dots): the whole tensor."""
        return "whole"

    def dot_args(self, task: TensorTask) -> tuple:
        """(vectors, base, subtract the base) of the dot products (see interp.group_dots)."""
        if task.base is None or len(task.inputs) != 1:
            raise MergeConfigError(f"tensor {task.name}: slerp needs the base_model and exactly one other model")
        return [task.base, task.inputs[0]], None, False

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        xs, base, sub = self.dot_args(task)
        t = number_param(task.params.get("t"), "t", task.name)
        g = (task.dots or interp.group_dots)(xs, base, sub, self.dot_group(task), task.backend, task.num_threads)[0]
        ca, cb = interp.slerp_coefs(t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1]))
        interp.group_lincomb(xs, None, False, "whole", torch.tensor([[ca, cb, 0.0]], device="cpu"), out,
                             task.backend, task.num_threads)


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    base_model = "optional"
    min_models = 2
    max_models = 2
    model_params = {"weight": Param(REQUIRED, "relative weight; t = w2 / (w1 + w2)")}
    global_params = {
        "nuslerp_flatten": Param(True, "treat each tensor as one flat vector"),
        "nuslerp_row_wise": Param(False, "when not flattened: vectors along dim 0 instead of the last dim"),
    }
    chunkable = False

    def validate(self, n_models: int, has_base: bool, base_among: bool = False) -> None:
        if n_models != 2:
            raise MergeConfigError(f"merge_method nuslerp takes exactly two models besides the base_model, "
                                   f"got {n_models}")

    def check_params(self, task: TensorTask) -> None:
        for i, mp in enumerate(task.model_params):
            number_param(mp.get("weight"), f"model {i} weight", task.name)
        flag_param(task.params.get("nuslerp_flatten", True), "nuslerp_flatten")
        flag_param(task.params.get("nuslerp_row_wise", False), "nuslerp_row_wise")

    def dot_group(self, task: TensorTask) -> str:
        """The vectors interpolated between (see interp.group_dots)."""
        flatten = flag_param(task.params.get("nuslerp_flatten", True), "nuslerp_flatten")
        row_wise = flag_param(task.params.get("nuslerp_row_wise", False), "nuslerp_row_wise")
        if flatten or task.inputs[0].dim() < 2:
            return "whole"  # a 1-D tensor is one vector along either dim
        return "cols" if row_wise else "rows"

    def dot_args(self, task: TensorTask) -> tuple:
        """(vectors, base, subtract the base) of the dot products (see interp.group_dots)."""
        if len(task.inputs) != 2:
            raise MergeConfigError(f"tensor {task.name}: nuslerp needs exactly two models besides the base")
        return task.inputs, task.base, task.base is not None

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        xs, base, sub = self.dot_args(task)
        w = [number_param(mp.get("weight"), f"model {i} weight", task.name) for i, mp in enumerate(task.model_params)]
        total = w[0] + w[1]
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        group = self.dot_group(task)
        gram = (task.dots or interp.group_dots)(xs, base, sub, group, task.backend, task.num_threads)
        coefs = []
        for g in gram:
            c0, c1 = interp.nuslerp_coefs(t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1]))
            coefs.append([c0, c1, 1.0 if sub else 0.0])
        interp.group_lincomb(task.inputs, base, sub, group, torch.tensor(coefs, dtype=torch.float64, device="cpu"), out,
                             task.backend, task.num_threads)
