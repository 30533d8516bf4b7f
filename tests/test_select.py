"""Exact rank selection (pymerge/ops/select.py, csrc/cpu/select.cpp) against torch's stable sort,
on random data with many ties (bfloat16, small integer sets), both orders, with and without a base."""
import pytest
import torch

from pymerge.ops import select


def data(n, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "bf16":
        return torch.randn(n, generator=g).bfloat16()
    if kind == "ties":  # a handful of magnitudes, both signs, zeros
        return (torch.randint(-4, 5, (n,), generator=g).float() * 0.5).bfloat16()
    if kind == "f32":
        return torch.randn(n, generator=g)
    if kind == "zeros":
        return torch.zeros(n, dtype=torch.bfloat16)
    raise ValueError(kind)


def check_boundary(x, base, r, descending, b):
    keys = select.magnitude_keys(x, base)
    order = torch.sort(keys, descending=descending, stable=True).indices
    expected = torch.zeros(keys.numel(), dtype=torch.bool)
    expected[order[:r]] = True
    assert torch.equal(select.before(keys, b, descending), expected)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", ["bf16", "ties", "f32", "zeros"])
@pytest.mark.parametrize("n", [1, 2, 1023, 1025, 4096, 4097, 70001])  # <= 4096: nth_element; above, radix
@pytest.mark.parametrize("descending", [True, False])
def test_ranks_match_stable_sort(backend, kind, n, descending):
    x = data(n, kind, seed=n)
    base = data(n, kind, seed=n + 1) if kind != "zeros" else None
    ranks = sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
    bounds = select.select_ranks(x, base, ranks, descending, backend=backend)
    for r, b in zip(ranks, bounds):
        check_boundary(x, base, r, descending, b)


def test_topk_matches_torch_topk_values():
    """Keeping the k largest gives exactly torch.topk's multiset of magnitudes."""
    x = data(100_003, "bf16", seed=5)
    for k in (1, 17, 50_000, 100_003):
        b = select.select_ranks(x, None, [k], True)[0]
        keys = select.magnitude_keys(x)
        kept = keys[select.before(keys, b, True)]
        assert kept.numel() == k
        assert torch.equal(torch.sort(kept).values, torch.sort(torch.topk(keys, k).values).values)


@pytest.mark.parametrize("n", [3000, 5000])
def test_cpu_and_torch_backends_agree_with_nan_and_inf(n):
    x = data(n, "bf16", seed=2).float()
    x[[10, 20]] = float("nan")
    x[[30]] = float("inf")
    for desc in (True, False):
        ranks = [0, 1, 2, 3, n // 2, n - 1, n]
        assert select.select_ranks(x, None, ranks, desc, "cpu") == select.select_ranks(x, None, ranks, desc, "torch")
    b = select.select_ranks(x, None, [3], True)[0]  # NaNs rank above inf
    keys = select.magnitude_keys(x)
    assert select.before(keys, b, True).nonzero().flatten().tolist() == [10, 20, 30]


def test_bad_rank():
    with pytest.raises(ValueError):
        select.select_ranks(torch.zeros(3), None, [4], True)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "ties", "f32"])
def test_gpu_ranks_select_the_cpu_kernels_elements(kind):
    """The torch backend on CUDA tensors (the GPU's TIES thresholds) selects the C++ kernel's elements, ties and
    NaN included. The boundaries' keys can differ where a NaN is at the boundary: the GPU's x - base is its
    canonical NaN 0x7FFFFFFF, the CPU's keeps the input's payload (0x7FC00000), as the first H200 run showed;
    each device's kernels compare keys computed on that device."""
    n = 3_000_017
    x, base = data(n, kind, seed=7), data(n, kind, seed=8)
    x[[5, 99]] = float("nan")
    ranks = [0, 1, 2, n // 7, n // 2, n - 1, n]
    xg, bg = x.cuda(), base.cuda()
    keys, keys_gpu = select.magnitude_keys(x, base), select.magnitude_keys(xg, bg)
    for desc in (True, False):
        want = select.select_ranks(x, base, ranks, desc, "cpu")
        got = select.select_ranks(xg, bg, ranks, desc)
        for r, b, g in zip(ranks, want, got):
            assert torch.equal(select.before(keys_gpu, g, desc).cpu(), select.before(keys, b, desc)), (desc, r)
