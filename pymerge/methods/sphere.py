"""multislerp and karcher (mergekit 0.1.5): means of several tensors on the hypersphere.

Both results are linear combinations of the input vectors v_i (x_i - B for multislerp with a
base, else x_i), and every quantity the methods need (norms, dot products, the norm of a tangent
vector) is a quadratic form in those coefficients. So one native reduction pass computes the Gram
matrix G_ij = <v_i, v_j> (see gram()), the spherical math runs on K x K numbers, and one native
elementwise pass (pymerge/ops/interp.py) writes out = B + sum_i c_i v_i: no float32 copy of the
models.

multislerp: weights w (normalized to sum 1 unless `normalize_weights: false`); u_i = v_i / (|v_i| + eps);
  m = normalize(sum w_i u_i); tangent T = sum w_i (u_i - <u_i, m> m); result
  (m cos|T| + T sin|T| / |T|) * sum_i w_i |v_i|, with |T| += eps. One model: that model unchanged;
  |sum w_i u_i| < eps: lerp with two models, an error with more (as mergekit).
karcher: the iterative weighted Karcher mean of the unit vectors (uniform weights over every model,
  the base included), `max_iter` steps, stopping when the tangent norm drops below `tol`; the
  result is scaled by the mean norm.
"""
import math
from typing import List

import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, REQUIRED, TensorTask, register
from pymerge.methods.task_vectors import _flag, _number
from pymerge.ops import interp


def _quad(g: torch.Tensor, a: List[float], b: List[float] = None) -> float:
    """a^T G b (b = a by default): a dot product of two combinations of the vectors."""
    b = a if b is None else b
    return sum(a[i] * float(g[i, j]) * b[j] for i in range(len(a)) for j in range(len(b)) if a[i] and b[j])


_EXACT_LIMIT = 1 << 16  # up to this many elements the Gram is computed in float64 throughout


def gram(xs, base=None, backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """float64 [K, K] matrix <v_i, v_j> of v_i = x_i - B (float32 difference, as mergekit takes it)
    or x_i. Big tensors: the native pass (float32 products per block of 1024, blocks summed in
    float64). Small ones (up to 65536 elements) in float64 throughout: they may be exactly collinear
    (a 1-element tensor always is), and the spherical math divides by sin(angle), which would blow
    up the last-bit errors of a float32 block sum; big weight tensors never are."""
    if xs[0].numel() > _EXACT_LIMIT:
        return interp.group_dots(xs, base, base is not None, "whole", backend, num_threads)[0]
    v = torch.stack([x.reshape(-1).float() - (base.reshape(-1).float() if base is not None else 0.0)
                     for x in xs]).double()
    return (v @ v.T).cpu()


def _write(task: TensorTask, xs, base, coefs: List[float], base_coef: float, out: torch.Tensor) -> None:
    row = torch.tensor([coefs + [base_coef]], dtype=torch.float64, device="cpu")
    interp.group_lincomb(xs, base, base is not None, "whole", row, out, task.backend, task.num_threads)


def multislerp_coefs(g: torch.Tensor, w: List[float], normalize: bool, eps: float) -> List[float]:
    """Coefficients c of the result sum_i c_i v_i from the Gram matrix g of the v_i."""
    n = len(w)
    if normalize:
        total = sum(w)
        w = [x / total for x in w]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
    zero = next((i for i in range(n) if norms[i] + eps == 0), None)
    if zero is not None:
        raise MergeConfigError(f"multislerp: model {zero}'s task vector is zero and eps is 0, so it has no direction "
                               "(mergekit would write NaN here); set eps > 0")
    a = [w[i] / (norms[i] + eps) for i in range(n)]          # mean of units = sum a_i v_i
    mean_norm = math.sqrt(max(_quad(g, a), 0.0))
    if mean_norm < eps:
        if n == 2:
            return list(w)  # mergekit falls back to lerp
        raise MergeConfigError("multislerp: the weighted sum of the unit vectors is zero (antipodal inputs with "
                               "balancing weights); use other weights")
    m = [x / mean_norm for x in a]
    gm = [sum(float(g[i, j]) * m[j] for j in range(n)) for i in range(n)]
    s = sum(w[i] * gm[i] / (norms[i] + eps) for i in range(n))  # sum w_i <u_i, m>
    t = [a[i] - s * m[i] for i in range(n)]                      # tangent = mean_raw - s m
    tn = math.sqrt(max(_quad(g, t), 0.0)) + eps
    avg_norm = sum(norms[i] * w[i] for i in range(n))
    c, sc = math.cos(tn), (math.sin(tn) / tn if tn else 1.0)  # no tangent (eps 0): sin(x)/x's limit
    return [avg_norm * (m[i] * c + t[i] * sc) for i in range(n)]


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    base_model = "optional"
    min_models = 1
    model_params = {"weight": Param(REQUIRED, "relative weight of the model")}
    global_params = {
        "normalize_weights": Param(True, "divide the weights by their sum"),
        "eps": Param(1e-8, "added to norms (numerical stability)"),
    }
    chunkable = False  # norms and angles are whole-tensor statistics

    def _settings(self, task: TensorTask):
        w = [_number(mp.get("weight"), f"model {i} weight", task.name) for i, mp in enumerate(task.model_params)]
        normalize = _flag(task.params.get("normalize_weights", True), "normalize_weights")
        return w, normalize, _number(task.params.get("eps", 1e-8), "eps", task.name)

    def check_params(self, task: TensorTask) -> None:
        w, normalize, _ = self._settings(task)
        if normalize and len(w) > 1 and sum(w) == 0:  # the weights alone say so: refused before any tensor is read
            raise MergeConfigError(f"tensor {task.name}: multislerp weights sum to 0 with normalize_weights: true "
                                   f"(weights {w}); mergekit would write NaN here")

    def prepare(self, task: TensorTask) -> None:
        """The coefficients: their errors (a zero task vector with eps 0, antipodal inputs) depend on the data."""
        if len(task.inputs) > 1 and task.inputs[0].numel():
            task.prepared = self._coefs(task)

    def _coefs(self, task: TensorTask) -> List[float]:
        self.check_params(task)
        w, normalize, eps = self._settings(task)
        g = gram(task.inputs, task.base, task.backend, task.num_threads)
        try:
            return multislerp_coefs(g, w, normalize, eps)
        except MergeConfigError as exc:
            raise MergeConfigError(f"tensor {task.name}: {exc}") from None

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if len(task.inputs) == 1 or out.numel() == 0:
            out.copy_(task.inputs[0])
            return
        coefs = task.prepared if task.prepared is not None else self._coefs(task)
        _write(task, task.inputs, task.base, coefs, 1.0 if task.base is not None else 0.0, out)


def karcher_coefs(g: torch.Tensor, max_iter: int, tol: float) -> List[float]:
    """Coefficients c of the Karcher mean sum_i c_i x_i (uniform weights) from the Gram matrix."""
    n = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    alpha = [1.0 / n] * n
    total = sum(alpha[i] for i in valid)
    na = {i: alpha[i] / total for i in valid}

    def unit(i):  # u_i as coefficients
        return [1.0 / norms[i] if j == i else 0.0 for j in range(n)]

    mean = [na[j] / norms[j] if j in na else 0.0 for j in range(n)]
    mean_norm = math.sqrt(max(_quad(g, mean), 0.0))
    mean = unit(valid[0]) if mean_norm < tol else [x / mean_norm for x in mean]
    for _ in range(max_iter):
        tangent = [0.0] * n
        gm = [sum(float(g[i, j]) * mean[j] for j in range(n)) for i in range(n)]
        for i in valid:
            dot = max(-1.0, min(1.0, gm[i] / norms[i]))
            theta = math.acos(dot)
            if theta < tol or theta == 0:  # with tol <= 0 too: at the mean, u_i adds nothing (limit of theta/sin)
                continue
            step = [(1.0 / norms[i] if j == i else 0.0) - dot * mean[j] for j in range(n)]  # u_i - dot m
            if _quad(g, step) <= 1e-14:
                continue  # antipodal: u_i - dot m is the zero vector (its coefficients only cancel)
            f = na[i] * theta / math.sin(theta)
            for j in range(n):
                tangent[j] += f * step[j]
        tn = math.sqrt(max(_quad(g, tangent), 0.0))
        if tn < tol or tn == 0:  # converged (tol <= 0 never stops on its own: mergekit's float noise did)
            break
        c, s = math.cos(tn), math.sin(tn) / tn
        mean = [c * mean[j] + s * tangent[j] for j in range(n)]
        un = math.sqrt(max(_quad(g, mean), 0.0))
        if un > tol:
            mean = [x / un for x in mean]
    scale = sum(alpha[i] * norms[i] for i in range(n))
    return [scale * x for x in mean]


@register
class Karcher(MergeMethod):
    name = "karcher"
    base_model = "none"  # mergekit ignores the base role: a base_model is one more input
    min_models = 1
    global_params = {
        "max_iter": Param(10, "maximum iterations of the mean"),
        "tol": Param(1e-5, "stop when the tangent norm is below this"),
    }
    chunkable = False

    def _settings(self, task: TensorTask):
        max_iter = _number(task.params.get("max_iter", 10), "max_iter", task.name)
        if max_iter != int(max_iter):
            raise MergeConfigError(f"max_iter must be a whole number, got {max_iter} (tensor {task.name})")
        return int(max_iter), _number(task.params.get("tol", 1e-5), "tol", task.name)

    def check_params(self, task: TensorTask) -> None:
        self._settings(task)

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if len(task.inputs) == 1 or out.numel() == 0:
            out.copy_(task.inputs[0])
            return
        max_iter, tol = self._settings(task)
        g = gram(task.inputs, None, task.backend, task.num_threads)
        _write(task, task.inputs, None, karcher_coefs(g, max_iter, tol), 0.0, out)
