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
