"""linear and task_arithmetic, as mergekit 0.1.5 defines them, each one fused weighted sum.

linear           out = sum_i w_i x_i / sum_i w_i   (normalize, default true)   or sum_i w_i x_i
task_arithmetic  out = base + lambda * sum_i w_i (x_i - base) / D,  D = sum_i w_i if normalize
                 (default false; D = 1 when |sum w| < 1e-8, as mergekit does) else 1

task_arithmetic runs in mergekit's delta form, in one pass and with no delta tensors: the weighted-sum
kernels' delta mode (csrc/cpu/weighted_sum.cpp) forms each x_i - base in float32 as it reads x_i and
sums c_i (x_i - base), c_i = lambda w_i / D, then adds the base. From 16-bit checkpoints every difference
is exact, so a result on a 16-bit halfway point rounds as mergekit's and the exact one do; the one-pass
rewrite (base - (sum c) base) + sum c x used before rounded 2.3 % of bfloat16 elements one step away from
mergekit at weights 0.7 / 0.5 (tests/test_merge_parity.py). Infinities and NaN come out as mergekit's
(the same differences, products and sums: an inf base with c_i > 0 gives NaN, with every c_i < 0 inf).
One bit differs where the result is zero: a -0.0 base whose sources are all zeros, with every c_i < 0, gives
-0.0 here (the sum of -0.0 terms) and +0.0 in mergekit (torch's sum starts from +0.0); -0.0 == +0.0.
Large lambda (1e3 and up) costs both ~1e-5 relative in float32.

Not mergekit's behaviour, on purpose: linear with normalize and weights summing to 0 is an error
here (mergekit divides by zero and writes a model of NaN/inf).

Both are WeightedSum methods: weights_for(task) says which sources are summed, in which order,
with which coefficients, and `delta` whether the first is a base the others are taken relative to.
merge_tensor (torch), the engine's torch-free CPU path (pymerge/streaming.py) and the pool's one-call
tables all use them, so the arithmetic has one source of truth and every path gives the same bits.
linear_weights() writes the same sum as plain coefficients of each source (compressed pools, whose
terms are deltas already). This module imports torch only when merge_tensor runs.
"""
from typing import List, Tuple

from pymerge.errors import MergeConfigError
from pymerge.methods.base import (MergeMethod, Param, REQUIRED, TensorTask, flag_param, linear_divisor, number_param,
                                  register)


class WeightedSum(MergeMethod):
    """A method whose result is sum_k c_k * source_k, accumulated in float32 in the order given; with
    delta, c_0 * s_0 + sum_{k>=1} c_k * (s_k - s_0) (ops.weighted_sum.delta_sum)."""
    chunkable = True
    delta = False

    def weights_for(self, task: TensorTask) -> Tuple[List[int], List[float]]:
        """(sources, coefficients) as the kernels sum them: source i < len(task.model_params) is input i,
        source len(task.model_params) is the base. Needs only task.model_params, params and name."""
        raise NotImplementedError

    def linear_weights(self, task: TensorTask) -> Tuple[List[int], List[float]]:
        """The same sum as sum_k c_k * source_k (a delta sum's base gets c_0 - sum_{k>=1} c_k as a second term)."""
        order, coef = self.weights_for(task)
        if not self.delta or len(order) == 1:
            return order, coef
        return [order[0]] + list(order), [coef[0], -sum(coef[1:])] + list(coef[1:])

    def merge_tensor(self, task: TensorTask, out) -> None:
        from pymerge.ops.weighted_sum import delta_sum, weighted_sum
        n = len(task.model_params)
        order, coef = self.weights_for(task)
        srcs = [task.inputs[i] if i < n else task.base for i in order]
        (delta_sum if self.delta else weighted_sum)(srcs, coef, out=out, backend=task.backend,
                                                    num_threads=task.num_threads)


def _weights(task: TensorTask) -> List[float]:
    return [p["weight"] for p in task.model_params]


@register
class Linear(WeightedSum):
    name = "linear"
    base_model = "none"  # mergekit ignores the base role: a base_model is just one more input
    min_models = 1
    model_params = {"weight": Param(REQUIRED, "relative weight of the model")}
    global_params = {"normalize": Param(True, "divide by the sum of the weights")}

    def coefficients(self, task: TensorTask) -> List[float]:
        w = _weights(task)
        if flag_param(task.params["normalize"], "normalize"):  # (a pool's "false" was true)
            total = sum(w)
            if total == 0:
                raise MergeConfigError(f"tensor {task.name}: linear weights sum to 0 with normalize: true "
                                       f"(weights {w}); mergekit would write NaN here")
            return [x / total for x in w]
        return w

    def check_params(self, task: TensorTask) -> None:
        self.coefficients(task)

    def weights_for(self, task: TensorTask) -> Tuple[List[int], List[float]]:
        return list(range(len(task.model_params))), self.coefficients(task)


@register
class TaskArithmetic(WeightedSum):
    name = "task_arithmetic"
    delta = True
    base_model = "required"
    min_models = 0  # mergekit returns the base unchanged when there is nothing else
    model_params = {
        "weight": Param(REQUIRED, "scale of the model's task vector"),
        "density": Param(1.0, "accepted for mergekit compatibility; task_arithmetic does not sparsify"),
    }
    global_params = {
        "lambda": Param(1.0, "scale of the summed task vectors"),
        "normalize": Param(False, "divide the summed task vectors by the sum of the weights"),
        "rescale": Param(False, "accepted for mergekit compatibility; no effect without sparsification"),
        "int8_mask": Param(False, "accepted for mergekit compatibility; no effect"),
    }

    def coefficients(self, task: TensorTask) -> List[float]:
        """[c_1, ..., c_n]: each task vector's scale."""
        w = _weights(task)
        scale = number_param(task.params["lambda"], "lambda", task.name)  # ("1" multiplied a string)
        if flag_param(task.params["normalize"], "normalize"):
            scale = scale / linear_divisor(w)  # mergekit's own guard: a tiny sum divides by 1
        return [scale * x for x in w]

    def weights_for(self, task: TensorTask) -> Tuple[List[int], List[float]]:
        n = len(task.model_params)
        return [n] + list(range(n)), [1.0] + self.coefficients(task)  # base + sum c_i (x_i - base)
