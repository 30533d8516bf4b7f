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

Where the weighted unit vectors nearly cancel (their mean's norm below CANCELLING of its largest possible
value: nearly antipodal inputs with balancing weights), the coefficients grow as 1 / that norm and a
quadratic form in them cancels to rounding noise (float64 Gram included): the result matched neither
float64 nor mergekit (an audit). There the method runs on the vectors themselves, in float64 (mergekit's
formulas, cancelling elementwise before squaring), holding float64 copies of the inputs and temporaries
(about 30 bytes per element per model), one tensor at a time.
"""
import math
from typing import List, Optional

import torch

from pymerge.methods.base import MergeConfigError, MergeMethod, Param, REQUIRED, TensorTask, register
from pymerge.methods.base import flag_param, number_param
from pymerge.ops import interp
from pymerge.ops._checks import FLOAT32_MAX


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
    v = _vectors(xs, base)
    return (v @ v.T).cpu()


def _vectors(xs, base=None) -> torch.Tensor:
    """float64 [K, numel] of v_i = x_i - B (the float32 difference, as mergekit takes it) or x_i."""
    return torch.stack([x.reshape(-1).float() - (base.reshape(-1).float() if base is not None else 0.0)
                        for x in xs]).double()


CANCELLING = 1e-3  # see the module's docstring: past it, coefficient arithmetic loses the result's digits


def _norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v))


def _write(task: TensorTask, xs, base, coefs, base_coef: float, out: torch.Tensor) -> None:
    """out = B + sum_i c_i v_i; or, where coefs is the float64 result vector itself (the cancelling case),
    B + that, rounded once."""
    if isinstance(coefs, torch.Tensor):
        res = coefs + base.reshape(-1).double() if base is not None else coefs
        out.copy_(res.reshape(out.shape).to(device=out.device, dtype=out.dtype))
        return
    row = torch.tensor([coefs + [base_coef]], dtype=torch.float64, device="cpu")
    interp.group_lincomb(xs, base, base is not None, "whole", row, out, task.backend, task.num_threads)


def _in_range(coefs, method: str):
    """Coefficients the float32 kernels can multiply by, checked in prepare (before a pool writes any tensor):
    a finite one beyond float32's range (a near-zero task vector with eps 0, values near float32's limit) would
    be refused at the write, after other tensors were written. NaN and inf pass: a NaN checkpoint's propagate."""
    if isinstance(coefs, list):
        big = max((abs(c) for c in coefs if math.isfinite(c)), default=0.0)
        if big > FLOAT32_MAX:
            raise MergeConfigError(f"{method} needs a coefficient of {big:.3g}, beyond float32's "
                                   "range (a vector of nearly zero norm, or values near float32's limit)")
    return coefs


def _prepare(method, task: TensorTask) -> None:
    """multislerp's and karcher's prepare: the coefficients (method._coefs) computed now, so that their errors
    come before a pool writes any tensor; a cancelling tensor's float64 result vector is not kept (a pool
    prepares every tensor first: it would hold one per tensor), merge_tensor computes it again."""
    if len(task.inputs) > 1 and task.inputs[0].numel():
        coefs = method._coefs(task)
        task.prepared = None if isinstance(coefs, torch.Tensor) else coefs


def _normalized(w: List[float], normalize: bool) -> List[float]:
    if not normalize:
        return w
    total = sum(w)
    return [x / total for x in w]


_ANTIPODAL = ("multislerp: the weighted sum of the unit vectors is zero (antipodal inputs with balancing weights); "
              "use other weights")


def multislerp_coefs(g: torch.Tensor, w: List[float], normalize: bool, eps: float) -> Optional[List[float]]:
    """Coefficients c of the result sum_i c_i v_i from the Gram matrix g of the v_i; None where the weighted
    units nearly cancel (multislerp_vector's case)."""
    n = len(w)
    if not bool(torch.isfinite(g).all()):  # finite vectors whose products overflowed (_coefs took non-finite ones):
        return None  # the float64 vector form decides (1/inf made the units "cancel": a wrong average; an audit)
    w = _normalized(w, normalize)
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
    zero = next((i for i in range(n) if norms[i] + eps == 0), None)
    if zero is not None:
        raise MergeConfigError(f"multislerp: model {zero}'s task vector is zero and eps is 0, so it has no direction "
                               "(mergekit would write NaN here); set eps > 0")
    a = [w[i] / (norms[i] + eps) for i in range(n)]          # mean of units = sum a_i v_i
    mean_norm = math.sqrt(max(_quad(g, a), 0.0))
    if mean_norm < CANCELLING * sum(abs(a[i]) * norms[i] for i in range(n)):
        return None  # the units nearly cancel: too few digits left here (the vector form decides, eps included)
    if mean_norm < eps:
        if n == 2:
            return list(w)  # mergekit falls back to lerp
        raise MergeConfigError(_ANTIPODAL)
    m = [x / mean_norm for x in a]
    gm = [sum(float(g[i, j]) * m[j] for j in range(n)) for i in range(n)]
    s = sum(w[i] * gm[i] / (norms[i] + eps) for i in range(n))  # sum w_i <u_i, m>
    t = [a[i] - s * m[i] for i in range(n)]                      # tangent = mean_raw - s m
    tn = math.sqrt(max(_quad(g, t), 0.0)) + eps
    avg_norm = sum(norms[i] * w[i] for i in range(n))
    c, sc = math.cos(tn), (math.sin(tn) / tn if tn else 1.0)  # no tangent (eps 0): sin(x)/x's limit
    return [avg_norm * (m[i] * c + t[i] * sc) for i in range(n)]


def multislerp_vector(v: torch.Tensor, w: List[float], normalize: bool, eps: float) -> torch.Tensor:
    """mergekit's multislerp on the float64 vectors v [K, numel] (without the base): the cancelling case."""
    w = _normalized(w, normalize)
    wt = torch.tensor(w, dtype=torch.float64, device=v.device).view(-1, 1)
    norms = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    units = v / (norms + eps)
    mean = (units * wt).sum(0)
    mean_norm = _norm(mean)
    if mean_norm < eps:
        if len(w) == 2:
            return (v * wt).sum(0)  # mergekit falls back to lerp
        raise MergeConfigError(_ANTIPODAL)
    mean = mean / mean_norm
    tangent = ((units - (units @ mean).view(-1, 1) * mean) * wt).sum(0)
    tn = _norm(tangent) + eps
    c, sc = math.cos(tn), (math.sin(tn) / tn if tn else 1.0)
    return (mean * c + tangent * sc) * float((norms.view(-1) * wt.view(-1)).sum())


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
        w = [number_param(mp.get("weight"), f"model {i} weight", task.name) for i, mp in enumerate(task.model_params)]
        normalize = flag_param(task.params.get("normalize_weights", True), "normalize_weights")
        return w, normalize, number_param(task.params.get("eps", 1e-8), "eps", task.name)

    def check_params(self, task: TensorTask) -> None:
        w, normalize, _ = self._settings(task)
        if normalize and len(w) > 1 and sum(w) == 0:  # the weights alone say so: refused before any tensor is read
            raise MergeConfigError(f"tensor {task.name}: multislerp weights sum to 0 with normalize_weights: true "
                                   f"(weights {w}); mergekit would write NaN here")

    def prepare(self, task: TensorTask) -> None:
        """The coefficients: their errors (a zero task vector with eps 0, antipodal inputs) depend on the data."""
        _prepare(self, task)

    def _coefs(self, task: TensorTask):
        """The coefficients, or (the cancelling case) the float64 result vector without the base."""
        self.check_params(task)
        w, normalize, eps = self._settings(task)
        g = gram(task.inputs, task.base, task.backend, task.num_threads)
        if not bool(torch.isfinite(g).all()) and not all(bool(torch.isfinite(x).all()) for x in
                                                          [*task.inputs, *([task.base] if task.base is not None else [])]):
            # an inf or NaN in a task vector makes mergekit's units, so every element, NaN: NaN coefficients write
            # that in the one pass (the float64 vector form held ~36 bytes per element per model for it: a review)
            return [math.nan] * len(task.inputs)
        try:
            coefs = multislerp_coefs(g, w, normalize, eps)
            if coefs is not None:
                return _in_range(coefs, "multislerp")
            return multislerp_vector(_vectors(task.inputs, task.base), w, normalize, eps)
        except MergeConfigError as exc:
            raise MergeConfigError(f"tensor {task.name}: {exc}") from None

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if len(task.inputs) == 1 or out.numel() == 0:
            out.copy_(task.inputs[0])
            return
        coefs = task.prepared if task.prepared is not None else self._coefs(task)
        _write(task, task.inputs, task.base, coefs, 1.0 if task.base is not None else 0.0, out)


def karcher_coefs(g: torch.Tensor, max_iter: int, tol: float) -> Optional[List[float]]:
    """Coefficients c of the Karcher mean sum_i c_i x_i (uniform weights) from the Gram matrix; None where the
    units nearly cancel (karcher_vector's case)."""
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
    if mean_norm < CANCELLING:  # (sum_i na_i |u_i| = 1)
        return None
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


def karcher_vector(x: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's Karcher mean on the float64 vectors x [K, numel]: the cancelling case."""
    n = x.shape[0]
    norms = [_norm(x[i]) for i in range(n)]
    units = [x[i] / norms[i] if norms[i] else torch.zeros_like(x[i]) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(x[0])
    na = {i: 1.0 / len(valid) for i in valid}  # uniform alphas over the valid ones, normalized
    mean = sum(na[i] * units[i] for i in valid)
    mean_norm = _norm(mean)
    mean = units[valid[0]].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = max(-1.0, min(1.0, float(mean @ units[i])))
            theta = math.acos(dot)
            if theta < tol or theta == 0:
                continue
            step = units[i] - dot * mean
            if _norm(step) <= 1e-7:
                continue  # antipodal: no direction (mergekit divides by sin(pi) ~ 1e-16 here)
            tangent += na[i] * (theta / math.sin(theta)) * step
        tn = _norm(tangent)
        if tn < tol or tn == 0:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = _norm(mean)
        if un > tol:
            mean = mean / un
    return mean * sum(norms[i] / n for i in range(n))


@register
class Karcher(MergeMethod):
    name = "karcher"
    base_model = "none"  # mergekit ignores the base role: a base_model is one more input
    min_models = 1
    global_params = {
        "max_iter": Param(10, "maximum iterations of the mean", kind=int),
        "tol": Param(1e-5, "stop when the tangent norm is below this"),
    }
    chunkable = False

    def _settings(self, task: TensorTask):
        max_iter = number_param(task.params.get("max_iter", 10), "max_iter", task.name)
        if max_iter != int(max_iter):
            raise MergeConfigError(f"max_iter must be a whole number, got {max_iter} (tensor {task.name})")
        return int(max_iter), number_param(task.params.get("tol", 1e-5), "tol", task.name)

    def check_params(self, task: TensorTask) -> None:
        self._settings(task)

    def prepare(self, task: TensorTask) -> None:
        """The coefficients, as multislerp's: their range error depends on the data."""
        _prepare(self, task)

    def _coefs(self, task: TensorTask):
        max_iter, tol = self._settings(task)
        g = gram(task.inputs, None, task.backend, task.num_threads)
        coefs = karcher_coefs(g, max_iter, tol)
        if coefs is not None:
            try:
                return _in_range(coefs, "karcher")
            except MergeConfigError as exc:
                raise MergeConfigError(f"tensor {task.name}: {exc}") from None
        return karcher_vector(_vectors(task.inputs), max_iter, tol)  # the cancelling case, float64

    def merge_tensor(self, task: TensorTask, out: torch.Tensor) -> None:
        if len(task.inputs) == 1 or out.numel() == 0:
            out.copy_(task.inputs[0])
            return
        _write(task, task.inputs, None, task.prepared if task.prepared is not None else self._coefs(task), 0.0, out)
