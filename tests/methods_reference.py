"""float64 references of every merge method, written from the math in GitHub issue 4 (and
mergekit 0.1.5's source), independent of the kernels: stable sorts instead of radix select, dense
masks instead of boundaries, float64 arithmetic throughout.

Masks are decided on the float32 deltas d = float32(x) - float32(B) (the op's contract: that is
the value every backend ranks and keeps), then everything is float64.
"""
import math

import torch

from pymerge.ops import philox

M = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della_linear", "della")
SPEC = {  # method: (sparsifier, consensus, normalize default, rescale default)
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della_linear": ("della_magprune", False, False, True),
    "della": ("della_magprune", True, True, True),
}


def ref_keep(d32: torch.Tensor, method, density, gamma=0.01, epsilon=0.15, *, seed=0, name="", model=0):
    """Flat bool keep-mask of one model's float32 delta (any shape)."""
    flat = d32.reshape(-1)
    n = flat.numel()
    mag = flat.abs().double()
    if method is None or density >= 1:
        return torch.ones(n, dtype=torch.bool)
    if method == "magnitude":
        if density <= 0:
            return torch.zeros(n, dtype=torch.bool)
        k = max(1, int(density * n))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(mag, descending=True, stable=True).indices[:k]] = True
        return keep
    if method == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(mag, stable=True).indices[n_bot:n_bot + target]] = True
        return keep
    draws = philox.random_bits(seed, name, model, 0, n)
    if method == "random":
        return draws < math.floor(density * 2 ** 32) if density > 0 else torch.zeros(n, dtype=torch.bool)
    assert method == "della_magprune"
    if density <= 0:
        return torch.zeros(n, dtype=torch.bool)
    m = mag.reshape(1, -1) if d32.dim() < 2 else mag.reshape(d32.shape[0], -1)
    cols = m.shape[1]
    rank = torch.sort(m, dim=1, stable=True).indices.argsort(dim=1).double()
    p = torch.full_like(rank, density) if cols == 1 else (density - epsilon) + 2 * epsilon * rank / (cols - 1)
    thr = torch.floor(p * 2 ** 32)
    return (draws.reshape(m.shape).double() < thr).reshape(-1)


def ref_task_vectors(xs, base, weights, densities, method, *, normalize=None, rescale=None, lam=1.0,
                     gamma=0.01, epsilon=0.15, seed=0, name=""):
    """float64 result of a task-vector method (rescale: None -> method default; True == "l1")."""
    sparsifier, consensus, norm_default, rescale_default = SPEC[method]
    normalize = norm_default if normalize is None else normalize
    rescale = rescale_default if rescale is None else rescale
    rescale = "l1" if rescale is True else (None if rescale is False else rescale)
    b64 = base.double().reshape(-1)
    vs = []
    for i, (x, w, rho) in enumerate(zip(xs, weights, densities)):
        d32 = x.float() - base.float()
        keep = ref_keep(d32, sparsifier, rho, gamma, epsilon, seed=seed, name=name, model=i)
        d = d32.double().reshape(-1)
        r = 1.0
        if sparsifier is not None and rho < 1:
            if rescale == "l1":
                before, after = d.abs().sum().item(), (d * keep).abs().sum().item()
                r = 1.0 if before < 1e-7 or after < 1e-7 else before / after
            elif rescale == "inverse_density" and rho > 0:
                r = 1.0 / rho
        vs.append(torch.where(keep, d * r * w, d * 0))
    v = torch.stack(vs)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1)
    if consensus:
        s = v.sum(0)
        agree = torch.where(s >= 0, v > 0, v < 0).double()
        mixed = (v * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = v.sum(0)
        div = w.sum()
        div = torch.tensor(1.0, dtype=torch.float64) if abs(div) < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return (b64 + mixed * lam).reshape(base.shape)


def _slerp64(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = float((a / na) @ (b / nb))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    th = math.acos(dot)
    return ((math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)).reshape(v0.shape)


def ref_slerp(t, base, x):
    return _slerp64(t, base, x)


def _nuslerp_vecs(t, v0, v1):
    """Rows of v0/v1 are the vectors (float64)."""
    n0 = v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos ** 2) <= 2.0 ** -21  # mergekit's 1e-16 in float32, widened to cos's rounding
    th = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sph = (torch.sin((1 - t) * th) * v0 + torch.sin(t * th) * v1) / torch.sin(th)
    return torch.where(colinear, (1 - t) * v0 + t * v1, sph)


def ref_nuslerp(w1, w2, x1, x2, base=None, flatten=True, row_wise=False):
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    v0, v1 = x1.double(), x2.double()
    if base is not None:
        v0, v1 = v0 - base.double(), v1 - base.double()
    shape = v0.shape
    if flatten or v0.dim() < 2:
        r = _nuslerp_vecs(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(shape)
    elif row_wise:
        r = _nuslerp_vecs(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        r = _nuslerp_vecs(t, v0, v1)
    return r if base is None else base.double() + r


def ref_model_stock(base, xs, filter_wise=False):
    w0 = base.double()
    ws = [x.double() for x in xs]
    shape = w0.shape
    if filter_wise:
        w0 = w0.reshape(1, -1) if w0.dim() < 2 else w0
        ws = [w.reshape(w0.shape) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            prod = (offs[i].norm(dim=-1) * offs[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((offs[i] * offs[j]).sum(-1) / prod).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(c), n * c / torch.where(den.abs() < 1e-6, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    diff = (out.double() - ref).norm()
    return float(diff / ref.norm().clamp(min=1e-30))
