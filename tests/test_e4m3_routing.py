"""float8_e4m3fn on GPUs older than sm_89 (an A100 is sm_80): Triton has no tl.float8e4nv there and
refuses to compile a kernel that holds it. The kernels build that load only when an input is e4m3
(a constexpr flag: tests/test_gpu_codegen.py compiles every other variant for sm_80), and the ops route
a call with an e4m3 input on such a GPU to the CUDA extension (its conversion runs on every GPU), else
to torch. Here the GPU's compute capability is faked; the gpu-marked test runs the routes on a real GPU.
"""
import types

import pytest
import torch

from pymerge import _native, kernels
from pymerge.ops import library

E4M3 = getattr(torch, "float8_e4m3fn", None)
needs_e4m3 = pytest.mark.skipif(E4M3 is None, reason="this torch has no float8_e4m3fn")
CUDA0 = torch.device("cuda", 0)


def _capability(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)


def _fake(dtype, device=CUDA0):  # what the routing reads of a tensor: its dtype and device
    return types.SimpleNamespace(dtype=dtype, device=device)


@pytest.mark.parametrize("cap, codes, want", [
    ((8, 0), [2, 3], True), ((8, 6), [3], True), ((8, 9), [3], False), ((9, 0), [0, 3], False),
    ((8, 0), [0, 1, 2, 4], False)])
def test_e4m3_unsupported_below_sm89(monkeypatch, cap, codes, want):
    _capability(monkeypatch, cap)
    assert kernels.e4m3_unsupported(CUDA0, codes) is want
    assert kernels.e4m3_unsupported(torch.device("cpu"), codes) is False  # the interpreter reads it anywhere


def test_no_e4m3_input_asks_no_capability(monkeypatch):
    def boom(device=None):
        raise AssertionError("asked the GPU's capability for a call without float8_e4m3fn inputs")
    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    assert not kernels.e4m3_unsupported(CUDA0, [0, 1, 2, 4])


def test_triton_launchers_refuse_e4m3_in_one_line(monkeypatch):
    _capability(monkeypatch, (8, 0))
    with pytest.raises(RuntimeError, match=r"weighted_sum: Triton cannot read float8_e4m3fn on this GPU "
                                           r"\(compute capability 8\.0; it needs 8\.9 or newer\)"):
        kernels.refuse_e4m3(CUDA0, [2, 3], "weighted_sum")
    kernels.refuse_e4m3(CUDA0, [2, 4], "weighted_sum")


@needs_e4m3
@pytest.mark.parametrize("entry", ["weighted_sum_many", "tv_merge"])
@pytest.mark.parametrize("asked", ["auto", "triton"])
def test_ops_route_e4m3_off_triton_below_sm89(monkeypatch, entry, asked):
    """Before: Triton was chosen on every GPU, and an A100 failed to compile the kernel at the first call."""
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    ext = types.SimpleNamespace(**{entry: None})
    monkeypatch.setattr(_native, "cuda", ext)
    e4m3_in = [_fake(torch.bfloat16), _fake(E4M3)]
    mixed = [_fake(torch.bfloat16), _fake(torch.float32), _fake(torch.float8_e5m2)]
    _capability(monkeypatch, (8, 0))
    assert library._cuda_backend(asked, entry, e4m3_in) == "cuda"
    assert library._cuda_backend(asked, entry, mixed) == "triton"  # compiles on sm_80 (no e4m3 load built)
    assert library._cuda_backend("torch", entry, e4m3_in) == "torch"
    monkeypatch.setattr(_native, "cuda", None)  # no CUDA extension: eager torch reads it
    assert library._cuda_backend(asked, entry, e4m3_in) == "torch"
    _capability(monkeypatch, (9, 0))
    assert library._cuda_backend(asked, entry, e4m3_in) == "triton"


@needs_e4m3
def test_pool_grouped_launch_steps_aside_for_e4m3_below_sm89(monkeypatch):
    """The pool's one-launch path: no grouped table (its per-tensor calls route as above)."""
    from pymerge.pool import grouped
    plans = [types.SimpleNamespace(name="w", outs=[_fake(torch.bfloat16)], group=0)]
    inputs = {"w": [_fake(torch.bfloat16), _fake(E4M3)]}
    _capability(monkeypatch, (8, 0))
    assert grouped.triton_table(plans, inputs, 1) is None


@needs_e4m3
def test_compressed_decode_routes_e4m3_terms_below_sm89(monkeypatch):
    """The delta-decode kernel's dense terms: a float8_e4m3fn term on such a GPU decodes elsewhere."""
    import numpy as np
    from pymerge.kernels import delta_decode
    from pymerge.pool import compressed
    monkeypatch.setattr(kernels, "e4m3_unsupported", lambda device, codes: 3 in codes)  # a CPU tensor as an sm_80 one
    monkeypatch.setattr(_native, "cuda", None)

    def triton(*a, **k):
        raise AssertionError("the Triton decode kernel got a float8_e4m3fn term on a GPU that cannot read it")
    monkeypatch.setattr(delta_decode, "delta_accumulate", triton)
    xs = [torch.randn(100).to(E4M3), torch.randn(100, dtype=torch.bfloat16)]
    w = np.array([[0.5, 2.0]], dtype=np.float32)
    got, want = torch.empty(100), torch.empty(100)
    compressed.run_terms(xs, [None, None], [3, 2], 100, w, [got], "triton")
    compressed.run_terms(xs, [None, None], [3, 2], 100, w, [want], "torch")
    assert torch.equal(got, want)


@needs_e4m3
@pytest.mark.gpu
def test_e4m3_on_a_gpu_reported_as_sm80_takes_a_backend_that_reads_it(monkeypatch):
    """On a real GPU with its capability faked to 8.0: every route runs and gives the CPU's result (the
    Triton launchers would refuse e4m3 there, so reaching them fails this test)."""
    import pymerge
    from pymerge.ops import task_vector_ops as tvo
    from wsum_reference import check_close, random_inputs
    if kernels.triton_available():  # Triton's driver keeps the capability function it found first: the real one
        import triton
        triton.runtime.driver.active.get_current_target()
    _capability(monkeypatch, (8, 0))
    xs = random_inputs(3, 5000, [E4M3, torch.bfloat16, torch.float32], seed=7)
    w = [0.5, -0.25, 1.5]
    for backend in ("auto", "triton"):
        check_close(pymerge.weighted_sum([x.cuda() for x in xs], w, out_dtype=torch.float32, backend=backend), xs, w)
    # the task-vector pass (e4m3 base and inputs) against the CPU kernel
    base = xs[0]
    plans = [tvo.plan_model(x, base, tvo.Sparsifier(), 0.5, i) for i, x in enumerate(xs[1:])]
    want = torch.empty(5000)
    tvo.merge_planned(xs[1:], base, plans, want, consensus=False, normalize=False, backend="cpu")
    got = torch.empty(5000, device="cuda")
    tvo.merge_planned([x.cuda() for x in xs[1:]], base.cuda(), [tvo.plan_model(x.cuda(), base.cuda(), tvo.Sparsifier(),
                      0.5, i) for i, x in enumerate(xs[1:])], got, consensus=False, normalize=False, backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    # a pool of e4m3 checkpoints: the grouped launch steps aside, the per-tensor calls route
    sds = [{"a": x.to(E4M3).reshape(50, 100), "b": x[:64].to(E4M3)} for x in xs]
    pool = pymerge.CheckpointPool(sds, device="cuda", backend="triton")
    into = {"a": torch.empty(50, 100, device="cuda"), "b": torch.empty(64, device="cuda")}
    pool.materialize(w, into)
    for name, t in into.items():
        check_close(t.view(-1), [sd[name].reshape(-1) for sd in sds], w)
