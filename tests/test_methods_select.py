"""Rank selection on big tensors (the sampled-bracket path of csrc/cpu/select.cpp, used from 2^17
elements): exact boundaries, equal to a stable sort's, whatever the sample guessed -- heavy ties
(bfloat16 deltas), distinct float32 magnitudes, all zeros, a tensor whose sample is unrepresentative,
ranks at the very ends, one thread and two."""
import pytest
import torch

from pymerge import _native
from pymerge.ops import select

pytestmark = pytest.mark.skipif(_native.cpu is None, reason="native CPU extension not built")
N = 300_007


def data(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "bf16":   # x - base of bfloat16 neighbours: few distinct |d|, runs of ties
        base = (torch.randn(N, generator=g) * 0.03).bfloat16()
        x = (base.float() + 3e-4 * torch.randn(N, generator=g)).bfloat16()
        return x, base
    if kind == "f32":
        return torch.randn(N, generator=g), torch.randn(N, generator=g)
    if kind == "zeros":
        return torch.zeros(N), None
    if kind == "skewed":  # the sampled runs see only small values; the rest is large
        x = torch.randn(N, generator=g) * 100
        for k in range(64):
            s = (N - 256) * k // 63
            x[s:s + 256] = torch.randn(256, generator=g) * 1e-3
        return x, None
    if kind == "two_values":
        x = torch.where(torch.rand(N, generator=g) < 0.3, torch.tensor(2.0), torch.tensor(1.0))
        return x, None
    raise ValueError(kind)


def expected_mask(x, base, r, descending):
    keys = select.magnitude_keys(x, base)
    order = torch.sort(keys, descending=descending, stable=True).indices
    m = torch.zeros(keys.numel(), dtype=torch.bool)
    m[order[:r]] = True
    return keys, m


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["bf16", "f32", "zeros", "skewed", "two_values"])
@pytest.mark.parametrize("descending", [True, False])
def test_big_tensor_ranks_match_stable_sort(kind, descending, threads):
    x, base = data(kind, seed=len(kind))
    ranks = [0, 1, 7, N // 10, N // 2, N - N // 3, N - 2, N - 1, N]
    bounds = select.select_ranks(x, base, ranks, descending, backend="cpu", num_threads=threads)
    assert bounds == select.select_ranks(x, base, ranks, descending, backend="torch")
    for r, b in zip(ranks[1::2], bounds[1::2]):
        keys, m = expected_mask(x, base, r, descending)
        assert torch.equal(select.before(keys, b, descending), m), (kind, r)
