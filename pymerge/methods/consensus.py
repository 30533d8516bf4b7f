"""SCE and RAM (mergekit 0.1.5): task-vector merges that weigh each element by how the models agree.

With task vectors d_i = x_i - B (float32):
sce         `select_topk` < 1 keeps, for every model, only the elements with the k largest
            variances across the models (k = int(count of nonzero variances * select_topk));
            then TIES's sign election (the sign of sum_i d_i; zeros never agree); each model is
            weighted by its mean square w_i = mean(d_i^2) / sum_j mean(d_j^2) (uniform when that sum
            is below 1e-6); out = B + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6).
ram         an element moved by one model only (|d_i| > epsilon) takes that model's delta; an element
            moved by c > 1 models takes their mean. Elementwise: streamed in chunks, one fused native
            pass (pymerge/ops/elementwise_mix.py).
ramplus_tl  as ram, with each model's unique deltas scaled by 1 + r * clamp(rho_i, 0, alpha), rho_i =
            (its moved elements shared with others) / max(its unique moved elements, epsilon),
            counted over the whole tensor.
`int8_mask` only picks mergekit's mask dtype: accepted, no effect. sce and ramplus_tl run as fused
native passes on the CPU (pymerge/ops/consensus_ops.py); top-k ties keep the lowest indices.
"""
import torch

from pymerge.methods.base import MergeMethod, Param, TensorTask, register
from pymerge.methods.base import flag_param, number_param
from pymerge.ops import consensus_ops, elementwise_mix


class _TaskVectorConsensus(MergeMethod):
    base_model = "required"
    min_models = 0  # mergekit returns the base unchanged when there is nothing else


@register
class Sce(_TaskVectorConsensus):
    name = "sce"
    global_params = {
        "select_topk": Param(1.0, "fraction of elements kept, by variance across the models"),
        "int8_mask": Param(False, "accepted for mergekit compatibility; no effect on results"),
    }
    chunkable = False

    def check_params(self, task: TensorTask) -> None:
        number_param(task.params.get("select_topk", 1.0), "select_topk", task.name)
        flag_param(task.params.get("int8_mask", False), "int8_mask")

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if not task.inputs or out.numel() == 0:
            out.copy_(task.base)
            return
        topk = number_param(task.params.get("select_topk", 1.0), "select_topk", task.name)
        consensus_ops.sce(task.inputs, task.base, topk, out, task.backend, task.num_threads)


def _ram_eps(task):
    return number_param(task.params.get("epsilon", 1e-5), "epsilon", task.name)


@register
class Ram(_TaskVectorConsensus):
    name = "ram"
    global_params = {"epsilon": Param(1e-5, "a delta counts as a change when |delta| > epsilon")}
    chunkable = True

    def check_params(self, task: TensorTask) -> None:
        _ram_eps(task)

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if not task.inputs:
            out.copy_(task.base)
            return
        elementwise_mix.ram(task.inputs, task.base, _ram_eps(task), out, task.backend, task.num_threads)


@register
class RamPlusTl(_TaskVectorConsensus):
    name = "ramplus_tl"
    global_params = {
        "r": Param(0.1, "strength of the boost of unique deltas"),
        "alpha": Param(0.2, "cap of the shared / unique ratio"),
        "epsilon": Param(1e-5, "a delta counts as a change when |delta| > epsilon"),
    }
    chunkable = False  # the per-model ratios count over the whole tensor

    def check_params(self, task: TensorTask) -> None:
        for k in ("r", "alpha"):
            number_param(task.params.get(k, self.global_params[k].default), k, task.name)
        _ram_eps(task)

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if not task.inputs or out.numel() == 0:
            out.copy_(task.base)
            return
        r = number_param(task.params.get("r", 0.1), "r", task.name)
        alpha = number_param(task.params.get("alpha", 0.2), "alpha", task.name)
        consensus_ops.ramplus_tl(task.inputs, task.base, r, alpha, _ram_eps(task), out, task.backend,
                                 task.num_threads)
