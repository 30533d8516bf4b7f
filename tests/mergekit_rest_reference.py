"""float64 references of the methods mergekit 0.1.5 added (sce, multislerp, karcher, nearswap,
arcee_fusion, ram, ramplus_tl), written from the math (pymerge/methods/{sphere,swap,consensus}.py
docstrings and mergekit's source), dense and direct: no Gram matrices, no chunking."""
import math

import torch


def multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return xs[0].double()
    v = torch.stack([x.double().reshape(-1) - (0 if base is None else base.double().reshape(-1)) for x in xs])
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = v.norm(dim=1)
    u = v / (norms[:, None] + eps)
    mean = (u * w[:, None]).sum(0)
    if mean.norm() < eps:
        assert len(xs) == 2
        res = w[0] * v[0] + w[1] * v[1]
    else:
        m = mean / mean.norm()
        tangent = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
        tn = tangent.norm() + eps
        res = (m * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms * w).sum()
    res = res.view(xs[0].shape)
    return res if base is None else res + base.double()


def karcher(xs, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0].double()
    v = [x.double().reshape(-1) for x in xs]
    norms = [float(x.norm()) for x in v]
    valid = [i for i in range(len(v)) if norms[i] > tol]
    if not valid:
        return torch.zeros(xs[0].shape, dtype=torch.float64)
    a = 1.0 / len(valid)
    units = {i: v[i] / norms[i] for i in valid}
    mean = sum(a * units[i] for i in valid)
    mean = units[valid[0]].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = float(torch.clamp(mean @ units[i], -1, 1))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * theta / math.sin(theta) * (units[i] - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(v) * mean).view(xs[0].shape)


def nearswap(base, x, t):
    a, b = base.double(), x.double()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def arcee_fusion(base, x):
    b, y = base.double(), x.double()
    p = torch.softmax(y, -1) + 1e-8
    q = torch.softmax(b, -1) + 1e-8
    imp = (y - b).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = imp.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    return b + (y - b) * (imp >= med + 1.5 * (q3 - q1))


def sce(base, xs, select_topk=1.0):
    d = torch.stack([x.double() - base.double() for x in xs])
    if select_topk < 1:
        var = d.var(dim=0, unbiased=False).reshape(-1).float()  # as mergekit stores it: float32
        k = int(int((var != 0).sum()) * select_topk)
        keep = torch.zeros_like(var, dtype=torch.float64)
        if k:  # equal variances at the cut: the elements torch.topk picks, which define mergekit's mask
            keep[var.topk(k).indices] = 1
        d = d * keep.view(d.shape[1:])
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
    agree = (d.sign() == sign).double()
    ms = (d ** 2).reshape(len(xs), -1).mean(1)
    w = ms / ms.sum() if abs(float(ms.sum())) >= 1e-6 else torch.full_like(ms, 1 / len(xs))
    w = w.view(-1, *[1] * (d.dim() - 1)) * agree
    return base.double() + (d * w).sum(0) / w.sum(0).clamp(min=1e-6)


def ram(base, xs, epsilon=1e-5, plus=None):
    """plus = (r, alpha) for ramplus_tl."""
    d = [x.double() - base.double() for x in xs]
    moved = [(x.float() - base.float()).abs() > epsilon for x in xs]  # decided on float32 deltas
    count = sum(m.long() for m in moved)
    out = base.double().clone()
    for di, mi in zip(d, moved):
        lam = 1.0
        if plus is not None:
            r, alpha = plus
            shared, unique = int((mi & (count > 1)).sum()), int((mi & (count == 1)).sum())
            lam = 1 + r * min(max(shared / max(unique, epsilon), 0), alpha)
        out += torch.where(mi & (count == 1), di * lam, 0.0)
        out += torch.where(mi & (count > 1), di / count.clamp(min=1), 0.0)
    return out
