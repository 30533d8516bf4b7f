"""Float64 reference for weighted sums and the error bound every backend must meet.

Bound per element: one unit in the last place of the output dtype (the final rounding) plus the
error float32 accumulation may add, (N + 2) * 2**-24 * sum_i |w_i x_i|.
"""
import torch

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
MIN_EXPONENT = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}
FP8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16] + FP8
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(tensors, weights):
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += float(w) * t.detach().cpu().double()
    return acc


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's numbers around |values| (float64)."""
    a = values.abs().clamp_min(torch.finfo(torch.float64).tiny)
    exponent = torch.floor(torch.log2(a)).clamp_min(MIN_EXPONENT[dtype])
    return torch.pow(2.0, exponent - MANTISSA_BITS[dtype])


def error_bound(out, tensors, weights):
    magnitude = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        magnitude += (float(w) * t.detach().cpu().double()).abs()
    ref = reference(tensors, weights)
    o = out.detach().cpu().double()
    scale = torch.maximum(ref.abs(), o.abs().nan_to_num(0.0, 0.0, 0.0))
    return ref, ulp(scale, out.dtype) + (len(tensors) + 2) * 2.0 ** -24 * magnitude


def check_close(out, tensors, weights):
    """Asserts out matches the float64 reference within the bound; NaN and inf must propagate."""
    ref, bound = error_bound(out, tensors, weights)
    o = out.detach().cpu().double()
    assert o.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(o), nan), "NaN did not propagate exactly where the reference has NaN"
    inf = torch.isinf(ref)
    assert torch.equal(o[inf], ref[inf]), "inf did not propagate"
    fin = ~(nan | inf)
    err = (o[fin] - ref[fin]).abs()
    ok = err <= bound[fin]
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        raise AssertionError(f"element {i}: got {o[fin][i].item()!r}, reference {ref[fin][i].item()!r}, "
                             f"error {err[i].item():.3g} > bound {bound[fin][i].item():.3g}")


def random_inputs(n, size, dtypes, seed=0, scale=1.0):
    """n tensors of `size` elements (int or shape), dtypes cycled through; float8 kept in range."""
    g = torch.Generator().manual_seed(seed)
    shape = (size,) if isinstance(size, int) else tuple(size)
    out = []
    for i in range(n):
        dtype = dtypes[i % len(dtypes)]
        x = torch.randn(shape, generator=g, dtype=torch.float32) * scale
        out.append(x.to(dtype))
    return out


def random_weights(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 0.7).tolist()
