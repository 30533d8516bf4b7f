"""Exact sums rounded once (pymerge/ops/exact_sum.py, csrc/cpu/exact_sum.h): the one definition of the
L1 norms and whole-tensor dot products, checked against exact rational arithmetic."""
import math
from fractions import Fraction

import pytest
import torch

from pymerge import _native
from pymerge.ops import exact_sum, interp, philox
from pymerge.ops import task_vector_ops as tvo

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def wide(n, seed, dtype=torch.float32):
    """Values over a huge dynamic range, with exact cancellations: float sums in any order differ."""
    g = torch.Generator().manual_seed(seed)
    top = math.log2(torch.finfo(dtype).max) - 2
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, int(top), (n,), generator=g).float())
    if n > 4:
        x[0], x[1], x[2] = 2 ** top, -2 ** top, torch.finfo(dtype).tiny / 4  # cancellation, a subnormal
    return x.to(dtype)


def rounded(exact) -> float:
    return float(exact)  # Fraction -> float is correctly rounded


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 4099])
def test_parts_equal_fsum(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).double())
    if n > 3:
        x[0], x[1], x[2] = 1e300, -1e300, 5e-324  # cancellation and a subnormal
    assert exact_sum.total(exact_sum.parts(x)) == math.fsum(x.tolist())


def test_non_finite_and_split_anyhow():
    vals = [[1.0, float("inf")], [float("inf"), float("-inf")], [float("nan"), 1.0], [-float("inf")], [1e308, 1e308]]
    got = [exact_sum.total(exact_sum.parts(torch.tensor(v, dtype=torch.float64))) for v in vals]
    assert got[0] == float("inf") and math.isnan(got[1]) and math.isnan(got[2]) and got[3] == float("-inf")
    assert got[4] == float("inf")  # the exact sum overflows float64
    x = torch.randn(10007, dtype=torch.float64)
    split = sum(exact_sum.parts(p) for p in (x[:3], x[3:5000], x[5000:]))
    assert exact_sum.total(split) == exact_sum.total(exact_sum.parts(x.flip(0))) == math.fsum(x.tolist())
    assert exact_sum.total(torch.zeros(exact_sum.PARTS, dtype=torch.int64)) == 0.0


def test_native_layout_matches():
    assert _native.cpu.EXACT_PARTS == (exact_sum.LOW, exact_sum.BINS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 70001])
def test_whole_dots_exact_on_every_backend(dtype, n):
    xs = [wide(n, 1, dtype), wide(n, 2, dtype)]
    base = wide(n, 3, torch.float32)
    for sub in (False, True):
        vs = [(x.float() - base if sub else x.float()).tolist() for x in xs]
        want = [rounded(sum(Fraction(a) * Fraction(b) for a, b in zip(vs[i], vs[j]))) for i, j in ((0, 0), (0, 1), (1, 1))]
        for backend in ("cpu", "torch"):
            got = interp.group_dots(xs, base, sub, "whole", backend)[0]
            assert [float(got[0, 0]), float(got[0, 1]), float(got[1, 1])] == want, (backend, sub)
    if n > 10:  # NaN and inf propagate as in a float sum
        xs[0][5] = float("inf")
        g = interp.group_dots(xs, None, False, "whole", "cpu")[0]
        assert g[0, 0] == float("inf") and (math.isnan(g[0, 1]) or abs(g[0, 1]) == float("inf"))
        assert torch.allclose(g, interp.group_dots(xs, None, False, "whole", "torch")[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1024, 65537])
def test_l1_norms_exact_native_and_torch(dtype, n):
    x, base = wide(n, 4, dtype), wide(n, 5, dtype)
    d = (x.float() - base.float()).tolist()
    plan = tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.4), model=1)
    keep = tvo.keep_mask_torch(plan, x.float() - base.float(), 7, "w", 3).tolist()
    want = (rounded(sum(Fraction(abs(v)) for v in d)), rounded(sum(Fraction(abs(v)) for v, k in zip(d, keep) if k)))
    for cpu in (True, False):
        assert tvo.model_l1(x, base, plan, name="w", seed=3, offset=7, cpu=cpu) == want, cpu
    # the pieces of a split tensor add up to the whole tensor's parts
    cut = n // 3
    pieces = sum(tvo.model_l1_parts(x[a:b], base[a:b], plan, name="w", seed=3, offset=7 + a)
                 for a, b in ((0, cut), (cut, n)))
    assert exact_sum.totals(pieces) == list(want)


@pytest.mark.parametrize("block", [1000, 4096, 1 << 20])
def test_torch_l1_norms_do_not_depend_on_the_block(block, monkeypatch):
    """The torch path works block by block (4M elements on a GPU, 1M elsewhere: exact_sum.block_for): each
    block's keep mask is drawn at its own global offset and its parts add exactly, whatever the block."""
    n = 65537
    x, base = wide(n, 4, torch.bfloat16), wide(n, 5, torch.bfloat16)
    plan = tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.4), model=1)
    want = tvo.model_l1(x, base, plan, name="w", seed=3, offset=7, cpu=True)
    monkeypatch.setattr(exact_sum, "block_for", lambda device: block)
    assert tvo.model_l1(x, base, plan, name="w", seed=3, offset=7, cpu=False) == want
    assert exact_sum.totals(exact_sum.parts(x.float().double()))[0] == float(sum(Fraction(v) for v in x.float().tolist()))


def test_both_ways_of_counting_give_the_same_parts(monkeypatch):
    """A GPU counts with torch.bincount's float64 sums (exact: integers of at most 2^27 each, at most 2^25 per
    block), elsewhere and under deterministic algorithms with int64 index_add_; both fill the same parts, for
    values over the whole float64 range and in the worst case for the float64 sums: a GPU-sized block (4M)
    of values whose mantissas are all ones, in one bin (sums near 2^49)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50_000, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-60, 60, (50_000,), generator=g).double())
    x[:3] = torch.tensor([1e300, -1e300, 5e-324], dtype=torch.float64)
    top = -(1 - 2.0 ** -53) * 2.0 ** 40
    block = exact_sum.block_for(torch.device("cuda"))
    same = torch.full((block + 3,), top, dtype=torch.float64)
    monkeypatch.setattr(exact_sum, "block_for", lambda device: block)
    got = {}
    for by_bincount in (False, True):
        monkeypatch.setattr(exact_sum, "_bincount_is_faster", lambda device, b=by_bincount: b)
        got[by_bincount] = exact_sum.parts(x), exact_sum.parts(same)
    assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], got[True][1])
    assert exact_sum.total(got[True][0]) == math.fsum(x.tolist())
    assert exact_sum.total(got[True][1]) == float(Fraction(top) * (block + 3))


def test_native_parts_come_back_as_one_array(monkeypatch):
    """tv_l1, tv_della_mask and whole_dots returned ~4300 Python ints that torch.tensor() made a tensor of:
    ~1 ms per tensor and model (a DARE merge with a new seed spent 313 of 411 ms there; a bug hunt)."""
    import numpy as np
    seen = {}
    for fn in ("tv_l1", "tv_della_mask", "whole_dots"):
        real = getattr(_native.cpu, fn)
        monkeypatch.setattr(_native.cpu, fn, lambda *a, _r=real, _f=fn, **k: seen.setdefault(_f, _r(*a, **k)),
                            raising=False)
    x, base = wide(37 * 41, 6).view(37, 41), wide(37 * 41, 7).view(37, 41)
    plan = tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.4), model=1)
    tvo.model_l1(x, base, plan, name="w", seed=3, cpu=True)
    tvo._della_mask(x, base, tvo.Sparsifier("della_magprune", 0.5, epsilon=0.2, rescale="l1"), 0, "t", 1, 0, True, 0)
    interp.whole_dot_parts([x, base], None, sub=False)
    assert sorted(seen) == ["tv_della_mask", "tv_l1", "whole_dots"]
    for fn, parts in seen.items():
        assert isinstance(parts, np.ndarray) and parts.dtype == np.int64 and parts.size % exact_sum.PARTS == 0, fn


def test_della_norms_exact():
    x, base = wide(37 * 41, 6).view(37, 41), wide(37 * 41, 7).view(37, 41)
    sp = tvo.Sparsifier("della_magprune", 0.5, epsilon=0.2, rescale="l1")
    words, norms = tvo._della_mask(x, base, sp, 0, "t", 1, 0, True, 0)
    keep = tvo.della_keep_torch(x, base, sp, 0, "t", 1)
    d = (x - base).reshape(-1).tolist()
    want = (rounded(sum(Fraction(abs(v)) for v in d)),
            rounded(sum(Fraction(abs(v)) for v, k in zip(d, keep.tolist()) if k)))
    assert norms == want and torch.equal(words, tvo.pack_bits(keep))
    assert tvo._della_mask(x, base, sp, 0, "t", 1, 0, False, 0)[1] == want


def test_pool_caches_dots_until_its_tensors_change():
    """The pool keeps each tensor's dot products (they depend on the checkpoints only) and drops them
    when a tensor it holds changes in place."""
    import pymerge
    g = torch.Generator().manual_seed(3)
    sds = [{"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g)} for _ in range(3)]
    pool = pymerge.CheckpointPool(sds[:2], base=sds[2])
    out = {k: torch.empty_like(v) for k, v in sds[0].items()}
    for method, kw in (("slerp", dict(t=0.3)), ("model_stock", {}), ("nuslerp", {})):
        w = [1.0] if method == "slerp" else [0.4, 0.6]
        srcs = sds[:1] if method == "slerp" else sds[:2]
        pool = pymerge.CheckpointPool(srcs, base=sds[2])
        pool.materialize(w, into=out, method=method, **kw)
        first = {k: v.clone() for k, v in out.items()}
        pool.materialize(w, into=out, method=method, **kw)  # from the cache: the same bits
        assert all(torch.equal(first[k], out[k]) for k in out)
        pool.tensor(0, "w").mul_(-2)  # changed in place: the cached dots must go
        pool.materialize(w, into=out, method=method, **kw)
        changed = [dict(sd) for sd in srcs]
        changed[0]["w"] = srcs[0]["w"] * -2
        want = {k: torch.empty_like(v) for k, v in sds[0].items()}
        pymerge.CheckpointPool(changed, base=sds[2]).materialize(w, into=want, method=method, **kw)
        assert all(torch.equal(want[k], out[k]) for k in out), method


def _native_parts(xs, base):
    """The native kernels' parts: dots with and without a base, L1 norms, and DELLA's mask and norms."""
    plan = tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.4), model=1)
    dots = [interp.whole_dot_parts(xs, base, sub, "cpu") for sub in (False, True)]
    della = tvo.Sparsifier(method="della_magprune", density=0.4, epsilon=0.15)
    words, norms = tvo._della_mask(xs[0].reshape(2, -1), base.reshape(2, -1), della, 1, "w", 3, 0, True, 0)
    return torch.cat(dots + [tvo.model_l1_parts(xs[0], base, plan, name="w", seed=3, offset=7)]).tolist() + \
        words.tolist() + list(norms)


_SIMD_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_exact_sum import _native_parts
xs, base = torch.load({path!r})
print(_native_parts(xs, base) == torch.load({want!r}))
"""


def test_every_simd_build_gives_the_same_parts(tmp_path):
    """The AVX-512, AVX2 and portable builds (PYMERGE_SIMD) of the exact sums agree, on narrow data
    (everything in the extraction levels) and wide data (remainders added one by one), and the
    narrow data's dots match exact rational arithmetic."""
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(11)
    n = 3 * 1024 + 17
    narrow = [torch.randn(n, generator=g), torch.randn(n, generator=g)]
    xs = [torch.cat([a, wide(n, s)]) for a, s in zip(narrow, (12, 13))]
    base = torch.cat([torch.randn(n, generator=g), wide(n, 14)])
    want = [rounded(sum(Fraction(a) * Fraction(b) for a, b in zip(narrow[i].tolist(), narrow[j].tolist())))
            for i, j in ((0, 0), (0, 1), (1, 1))]
    assert exact_sum.totals(interp.whole_dot_parts(narrow, None, False, "cpu")) == want
    torch.save((xs, base), tmp_path / "in.pt")
    torch.save(_native_parts(xs, base), tmp_path / "want.pt")
    code = _SIMD_CHILD.format(tests=os.path.dirname(__file__), path=str(tmp_path / "in.pt"),
                              want=str(tmp_path / "want.pt"))
    for level in ("avx2", "scalar"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYMERGE_SIMD": level},
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "True", (level, out.stderr[-2000:])
