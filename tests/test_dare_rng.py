"""Philox masks for DARE/DELLA: known-answer vectors, C++ == torch == Triton bit for bit, kept
fractions within 4 sigma, L1 norm preserved by the rescale, seeds and chunk offsets."""
import math

import pytest
import torch

import pymerge.methods.task_vectors  # noqa: F401
from conftest import TRITON_INTERPRETED
from pymerge import _native
from pymerge.methods.base import MergeConfigError, TensorTask, get_method
from pymerge.ops import exact_sum, philox
from pymerge.ops import task_vector_ops as tvo


def test_philox_known_answers():
    """Random123's Philox4x32-10 test vectors."""
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in philox.philox4x32(z, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    c = torch.tensor([0x243F6A88])
    out = philox.philox4x32(c, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(w) for w in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("offset,n", [(0, 1), (0, 4099), (3, 17), (1 << 33, 9)])
def test_cpu_draws_equal_torch(offset, n):
    h0, h1 = philox.name_hash("model.layers.3.mlp.up_proj.weight")
    a = torch.tensor(_native.cpu.philox_draws(2**40 + 5, 3, h0, h1, offset, n), dtype=torch.int64)
    b = philox.random_bits(2**40 + 5, "model.layers.3.mlp.up_proj.weight", 3, offset, n)
    assert torch.equal(a, b)


@pytest.mark.parametrize("model", [0, 1, 2])  # 1 once made Triton turn the argument into a constant
@pytest.mark.parametrize("offset,grouped", [(5, False), (0, True), (0, False), (1 << 33, True), (4100, True)])
@pytest.mark.parametrize("seed", [12345, 2**63 + 7])
@pytest.mark.parametrize("hashed", [False, True])
def test_triton_draws_equal_torch(model, offset, grouped, seed, hashed):
    """Both Triton paths (one Philox call per element, one per 4 elements) give the reference draws, for a
    tensor named or given by its name_hash() (what the custom ops carry)."""
    pytest.importorskip("triton")
    from pymerge.kernels import task_vectors as tk
    name = philox.name_hash("a.b") if hashed else "a.b"
    got = tk.philox_draws(seed, name, model, offset, 300, grouped=grouped)
    assert torch.equal(got.cpu(), philox.random_bits(seed, "a.b", model, offset, 300))


@pytest.mark.gpu
def test_draws_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: the draws of tensors on cuda:1 ran on GPU 0 (an illegal address,
    or unordered against cuda:1's stream) until the launcher took the tensors' device."""
    pytest.importorskip("triton")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from pymerge.kernels import task_vectors as tk
    assert philox._kernel_draws("cuda:1")  # philox.draws takes the kernel (not the torch form) there
    with torch.cuda.device(0):
        got = tk.philox_draws(7, "a.b", 3, 4, 100_003, device="cuda:1")
        assert got.device == torch.device("cuda:1")
        assert torch.equal(got.cpu(), philox.random_bits(7, "a.b", 3, 4, 100_003))


@pytest.mark.parametrize("offset", [0, 6])
def test_masks_from_the_triton_draws_equal_the_cpu_kernels(offset, monkeypatch):
    """On a GPU the DARE / DELLA masks of the torch paths (L1 norms, DELLA ranks) take their draws from the
    Triton kernel (philox.draws), one launch instead of ~250 torch ops; here the interpreter stands in for the
    GPU: the L1 norms equal the C++ kernel's and the DELLA mask the torch form's (and the C++ kernel's for a
    whole tensor), at a grouped and an ungrouped offset."""
    pytest.importorskip("triton")
    if not TRITON_INTERPRETED:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    from pymerge.kernels import task_vectors as tk
    g = torch.Generator().manual_seed(offset)
    x, base = torch.randn(3001, generator=g).bfloat16(), torch.randn(3001, generator=g).bfloat16()
    plan = tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.3), model=2)
    x2, base2 = x[:3000].view(30, 100), base[:3000].view(30, 100)
    sp = tvo.Sparsifier("della_magprune", 0.4, epsilon=0.15)
    want_l1 = tvo.model_l1(x, base, plan, name="m.w", seed=9, offset=offset, cpu=True)
    want_della = tvo.della_keep_torch(x2, base2, sp, 1, "m.w", 9, offset)  # the torch form's draws
    if offset == 0:  # the C++ DELLA mask is of a whole tensor
        assert torch.equal(tvo.pack_bits(want_della), tvo._della_mask(x2, base2, sp, 1, "m.w", 9, 0, True, 0)[0])
    calls = []
    real = tk.philox_draws
    monkeypatch.setattr(philox, "_kernel_draws", lambda device: True)
    monkeypatch.setattr(tk, "philox_draws", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert tvo.model_l1(x, base, plan, name="m.w", seed=9, offset=offset, cpu=False) == want_l1
    assert torch.equal(tvo.della_keep_torch(x2, base2, sp, 1, "m.w", 9, offset), want_della)
    assert len(calls) >= 2, "the torch paths did not take the kernel's draws"


def merge(name, xs, base, mp, params=None, seed=1, backend="auto", offset=0):
    out = torch.empty(base.shape, dtype=torch.float32)
    get_method(name).merge_tensor(TensorTask(xs, base, mp, params or {}, name="w", seed=seed, backend=backend,
                                             offset=offset), out)
    return out


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9])
def test_dare_kept_fraction(rho):
    n = 200_000
    base = torch.zeros(n)
    x = torch.randn(n)
    out = merge("dare_linear", [x], base, [{"weight": 1.0, "density": rho}], {"rescale": False})
    kept = (out != 0).double().mean().item()
    assert abs(kept - rho) <= 4 * math.sqrt(rho * (1 - rho) / n)


def test_della_kept_fraction_follows_rank():
    rows, cols, rho, eps = 400, 500, 0.5, 0.3
    x = torch.randn(rows, cols)
    out = merge("della_linear", [x], torch.zeros(rows, cols), [{"weight": 1.0, "density": rho, "epsilon": eps}],
                {"rescale": False})
    kept = out != 0
    rank = x.abs().argsort(dim=1).argsort(dim=1)
    for lo, hi in ((0, 50), (225, 275), (450, 500)):  # bottom, middle, top of each row's ranks
        sel = (rank >= lo) & (rank < hi)
        p = (rho - eps) + 2 * eps * ((lo + hi - 1) / 2) / (cols - 1)
        frac = kept[sel].double().mean().item()
        assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / sel.sum().item()) + 2 * eps * 25 / cols
    assert abs(kept.double().mean().item() - rho) <= 4 * math.sqrt(rho * (1 - rho) / (rows * cols))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_l1_rescale_preserves_norm(method, backend):
    base = torch.randn(300, 301)
    x = base + torch.randn(300, 301)
    out = merge(method, [x], base, [{"weight": 1.0, "density": 0.3}], backend=backend)
    d, merged = (x - base).abs().sum().item(), (out - base).abs().sum().item()
    assert abs(merged - d) / d < 1e-4


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_same_seed_same_output_on_every_backend(method):
    base = torch.randn(33, 65)
    xs = [base + torch.randn(33, 65) for _ in range(2)]
    mp = [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    outs = [merge(method, xs, base, mp, seed=99, backend=b) for b in ("cpu", "torch")]
    if TRITON_INTERPRETED:  # Triton on these CPU tensors (on a GPU host the gpu-marked tests cover it)
        outs.append(merge(method, xs, base, mp, seed=99, backend="triton"))
    for o in outs[1:]:
        assert torch.equal((o - base) != 0, (outs[0] - base) != 0)
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(merge(method, xs, base, mp, seed=99), outs[0])
    other = merge(method, xs, base, mp, seed=100)
    assert not torch.equal((other - base) != 0, (outs[0] - base) != 0)


@pytest.mark.parametrize("method", ["random", "della_magprune"])
def test_strided_inputs_give_the_contiguous_result(method):
    """The L1 rescale's norms (and DELLA's mask) read contiguous copies of strided inputs: the copies
    must outlive the native call (a temporary freed before it read gave other values, or a segfault)."""
    torch.manual_seed(0)
    base = torch.randn(64, 64)
    xs = [base + 0.01 * torch.randn(64, 64) for _ in range(2)]
    sp = [tvo.Sparsifier(method, 0.5, epsilon=0.1, rescale="l1")] * 2
    want, got = torch.empty(64, 64), torch.empty(64, 64)
    tvo.task_vector_merge(xs, base, want, sp, [0.5, 0.5], consensus=False, normalize=False, seed=1)
    strided = [x.t().contiguous().t() for x in xs]  # the same values, transposed memory
    tvo.task_vector_merge(strided, base.t().contiguous().t(), got, sp, [0.5, 0.5], consensus=False,
                          normalize=False, seed=1)
    assert torch.equal(got, want)
    total, kept = tvo.model_l1(strided[0], base.t().contiguous().t(), tvo.ModelPlan(), name="w")
    assert total == pytest.approx((xs[0] - base).abs().double().sum().item(), rel=1e-6) and kept == total


def test_della_mask_of_a_tensor_without_rows():
    """A sharded pool's rank may hold no row of a 3-D tensor (dim 0 smaller than the ranks): an empty mask
    (x[0] raised IndexError there, while the other ranks waited in a collective)."""
    x = torch.zeros(0, 4, 3)
    keep = tvo.della_keep_torch(x, x, tvo.Sparsifier("della_magprune", 0.5, epsilon=0.1), 0, "w", 1, offset=12)
    assert keep.shape == (0,) and keep.dtype == torch.bool


@pytest.mark.parametrize("rows,cols,r0,r1", [(30, 101, 7, 19), (5, 1, 2, 5), (4, 3, 4, 4), (64, 97, 0, 64)])
def test_the_native_della_mask_of_rows_at_an_offset_is_the_whole_tensors(rows, cols, r0, r1):
    """A sharded pool's rank holds rows r0 .. r1 of a tensor; the native DELLA kernel draws them at their global
    offset: its mask and L1 parts equal the torch form's of those rows (the form it used before), and the mask is
    the whole tensor's, rows r0 .. r1."""
    g = torch.Generator().manual_seed(rows * cols + r0)
    x, base = torch.randn(rows, cols, generator=g).bfloat16(), torch.randn(rows, cols, generator=g)
    x[0, 0] = float("nan")
    sp = tvo.Sparsifier("della_magprune", 0.45, epsilon=0.2)
    whole = tvo.della_keep_torch(x, base, sp, 3, "m.w", -5)
    words, parts = tvo.della_native(x[r0:r1], base[r0:r1], sp, 3, "m.w", -5, r0 * cols, 0)
    keep, want = tvo.della_keep_torch(x[r0:r1], base[r0:r1], sp, 3, "m.w", -5, r0 * cols, norms=True)
    assert torch.equal(keep, whole[r0 * cols:r1 * cols])
    assert torch.equal(words, tvo.pack_bits(keep))
    want = want if isinstance(want, torch.Tensor) else torch.zeros_like(parts)  # (0 where no row)
    assert repr(exact_sum.totals(parts)) == repr(exact_sum.totals(want))  # the same sums (parts: carried apart)


def test_masks_do_not_depend_on_chunking():
    """The mask of element j is keyed by its global index: two chunks with offsets == one call."""
    base = torch.randn(64, 100)
    x = base + torch.randn(64, 100)
    mp = [{"weight": 1.0, "density": 0.5}]
    whole = merge("dare_linear", [x], base, mp, {"rescale": False})
    top = merge("dare_linear", [x[:20].contiguous()], base[:20].contiguous(), mp, {"rescale": False})
    bottom = merge("dare_linear", [x[20:].contiguous()], base[20:].contiguous(), mp, {"rescale": False},
                   offset=20 * 100)
    assert torch.equal(torch.cat([top, bottom]), whole)


def test_models_get_independent_masks():
    base = torch.zeros(10_000)
    x = torch.ones(10_000)
    a = tvo.keep_mask_torch(tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.5), model=0), x, 0, "w", 1)
    b = tvo.keep_mask_torch(tvo.ModelPlan(mode=tvo.RANDOM, thr=philox.keep_threshold(0.5), model=1), x, 0, "w", 1)
    assert 0.4 < (a == b).double().mean().item() < 0.6
    del base


@pytest.mark.parametrize("rho,eps", [(0.1, 0.1), (0.9, 0.15), (0.5, 0.6)])
def test_della_epsilon_out_of_range(rho, eps):
    task = TensorTask([torch.ones(4)], torch.zeros(4), [{"weight": 1.0, "density": rho, "epsilon": eps}], {}, name="w")
    with pytest.raises(MergeConfigError, match="epsilon"):
        get_method("della").check_params(task)
