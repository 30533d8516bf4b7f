"""The device weight table of a GPU pool (pymerge/pool/cuda.py) belongs to one call: a materialize
on another stream, or a second call queued before the first one's kernels ran, cannot change the
weights the first one reads."""
import numpy as np
import pytest
import torch

import pymerge
from pymerge.pool.cuda import CudaRunner

HAS_CUDA = torch.cuda.is_available()


def test_each_call_gets_its_own_weight_table():
    """Checkable anywhere: two calls' tables never share memory, and each holds its call's weights."""
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    runner = CudaRunner({"w": [torch.zeros(3, device=device)] * 2}, device, "device", 2)
    a = runner.weights([np.array([[0.25, 0.75]], dtype=np.float32)])
    b = runner.weights([np.array([[0.5, 0.5]], dtype=np.float32)])
    assert a.data_ptr() != b.data_ptr()
    assert a.cpu().tolist() == [[[0.25, 0.75]]] and b.cpu().tolist() == [[[0.5, 0.5]]]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_materialize_on_two_streams_keeps_each_calls_weights(backend):
    g = torch.Generator().manual_seed(0)
    sds = [{"a": torch.randn(1 << 20, generator=g), "b": torch.randn(4099, generator=g)} for _ in range(3)]
    pool = pymerge.CheckpointPool(sds, device="cuda", backend=backend)
    weights = [[0.2, 0.3, 0.5], [0.7, 0.1, 0.2], [-1.0, 2.0, 0.5]]
    outs = [{k: torch.empty_like(v, device="cuda") for k, v in sds[0].items()} for _ in weights]
    streams = [torch.cuda.Stream() for _ in weights]
    for _ in range(3):  # the first calls build caches; the later ones race as a search loop would
        for s, w, out in zip(streams, weights, outs):
            with torch.cuda.stream(s):
                torch.cuda._sleep(20_000_000)  # the kernels below wait behind this on s only
                pool.materialize(w, into=out)
        torch.cuda.synchronize()
        for w, out in zip(weights, outs):
            for k in out:
                want = sum(wi * sd[k].double() for wi, sd in zip(w, sds)).float()
                torch.testing.assert_close(out[k].cpu(), want, rtol=1e-5, atol=1e-5)
    # a second call on the same stream before the first one's kernels ran
    s = streams[0]
    with torch.cuda.stream(s):
        torch.cuda._sleep(20_000_000)
        pool.materialize(weights[0], into=outs[0])
        pool.materialize(weights[1], into=outs[1])
    torch.cuda.synchronize()
    for w, out in zip(weights[:2], outs[:2]):
        want = sum(wi * sd["a"].double() for wi, sd in zip(w, sds)).float()
        torch.testing.assert_close(out["a"].cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_evicted_grouped_tables_outlive_a_launch_queued_on_another_stream():
    """The grouped kernel's address tables are made on the stream current when the plan was built; a launch on
    another stream, then the plan's eviction (past max_entries target sets) before that launch ran, handed their
    memory back to the first stream, where new tensors overwrote it under the queued kernel (a review)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    sds = [{"a": torch.randn(1 << 16, generator=g), "b": torch.randn(4099, generator=g)} for _ in range(2)]
    pool = pymerge.CheckpointPool(sds, device="cuda", backend="triton")
    w = [0.25, 0.75]
    want = {k: (w[0] * sds[0][k].double() + w[1] * sds[1][k].double()).float() for k in sds[0]}
    side = torch.cuda.Stream()
    targets = [{k: torch.empty_like(v, device="cuda") for k, v in sds[0].items()}
               for _ in range(pool._plan_cache.max_entries + 2)]
    pool.materialize(w, into=targets[0])  # its plan's tables made on the default stream
    torch.cuda.synchronize()
    for t in targets[0].values():
        t.fill_(float("nan"))
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # every launch below waits behind this on the side stream
        pool.materialize(w, into=targets[0])  # a cache hit: the default stream's tables, launched on side
        for out in targets[1:]:  # each new target set evicts the oldest plan: targets[0]'s goes first
            pool.materialize(w, into=out)
    assert not any(key[0] == (id(targets[0]),) for key in pool._plan_cache._entries)  # evicted, launch pending
    for _ in range(64):  # on the default stream, where its tables' memory went back: written at once
        torch.full((1 << 12,), -1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    for out in targets:
        for k in out:
            torch.testing.assert_close(out[k].cpu(), want[k], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_first_grouped_call_inside_a_capture_says_to_run_it_once_first():
    """A plan-cache miss under capture built the grouped kernel's tables by a host-to-device copy, which
    the capture refused with torch's error (a review); it says what to do, and a warmed call captures."""
    pytest.importorskip("triton")
    sds = [{"a": torch.randn(4099)} for _ in range(2)]
    pool = pymerge.CheckpointPool(sds, device="cuda", backend="triton")
    out, w = {"a": torch.empty(4099, device="cuda")}, torch.tensor([0.25, 0.75], device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), pytest.raises(pymerge.InputError, match="run it once with these targets"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pool.materialize(w, into=out)
    torch.cuda.synchronize()
    pool.materialize(w, into=out)  # warmed: the next capture holds the launch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pool.materialize(w, into=out)
    w.copy_(torch.tensor([1.0, 0.0], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out["a"].cpu(), sds[0]["a"])


def test_a_streamed_pool_holds_one_tensors_inputs_on_the_device_at_a_time(monkeypatch):
    """A method other than linear on the pinned or mmap tier copied every tensor of every checkpoint to the GPU
    before merging any (the memory the pool was streamed to save: out of memory; a review). The device is faked
    as meta: what the merge holds there is counted as it goes."""
    import pymerge.methods.base as methods_base
    g = torch.Generator().manual_seed(0)
    names = [f"layer{i}.w" for i in range(6)]
    sds = [{n: torch.randn(64, 64, generator=g) for n in names} for _ in range(4)]
    base = {n: torch.randn(64, 64, generator=g) for n in names}
    pool = pymerge.CheckpointPool(sds, base=base, residency="pinned", backend="torch")
    target = {n: torch.empty(64, 64) for n in names}
    plans = pool._method_plans("task_arithmetic", [target], [0] * len(names), None, True, None, True)
    seen, most = [], [0]

    def count(method, pairs, total):
        for task, _ in pairs:
            seen.append(task)
            on_device = {id(t) for s in seen for t in list(s.inputs) + [s.base] if t.device.type == "meta"}
            most[0] = max(most[0], len(on_device))
        assert len(seen) == total
    monkeypatch.setattr(methods_base, "merge_prepared", count)
    pool.device = torch.device("meta")  # stands for the GPU: the pool's tensors are on the host
    pool._run_method("task_arithmetic", plans, [np.full((1, 4), 0.25, dtype=np.float32)], 0, {})
    assert len(seen) == len(names) and most[0] == 5  # 4 checkpoints + the base, of one tensor


def test_one_call_at_a_time_on_a_runner(monkeypatch):
    """Two threads materializing from one GPU pool shared its staging sets, their events and the pinned weight
    slot (a review: 12 of 24 tensors wrong in a simulation): a runner takes one call at a time."""
    import threading
    import time
    from types import SimpleNamespace
    runner = CudaRunner({"w": [torch.randn(4096), torch.randn(4096)]}, torch.device("cpu"), "pinned", 2,
                        chunk_bytes=4096)
    spans, real = [], runner._copy_chunk

    def slow_copy(*args):
        start = time.perf_counter()
        time.sleep(0.002)
        out = real(*args)
        spans.append((threading.current_thread().name, start, time.perf_counter()))  # (idents are reused)
        return out
    monkeypatch.setattr(runner, "_copy_chunk", slow_copy)
    outs = [torch.empty(4096), torch.empty(4096)]
    both = threading.Barrier(2)  # the two calls at once

    def call(out):
        both.wait()
        runner.run_linear([SimpleNamespace(name="w", group=0, outs=[out])],
                          [np.array([[0.25, 0.75]], dtype=np.float32)], "torch")
    jobs = [threading.Thread(target=call, args=(o,), name=f"call{k}") for k, o in enumerate(outs)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    spans.sort(key=lambda s: s[1])
    assert len({s[0] for s in spans}) == 2 and all(a[2] <= b[1] for a, b in zip(spans, spans[1:])), spans
    want = 0.25 * runner.inputs["w"][0] + 0.75 * runner.inputs["w"][1]
    assert all(torch.allclose(o, want) for o in outs)
