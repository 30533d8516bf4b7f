"""Peak memory of the methods that hold whole-tensor temporaries (measured in a fresh process: ru_maxrss).

A 256k x 12288 embedding is 3.1e9 elements: each byte per element of temporaries is 3 GB more."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEAK = """
import resource, sys, torch
from pymerge.ops import consensus_ops, task_vector_ops as tvo
shape = tuple(int(s) for s in sys.argv[2].split("x"))
g = torch.Generator().manual_seed(0)
b = torch.randn(shape, generator=g).to(torch.bfloat16)
x = (b.float() + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
out = torch.empty_like(b)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "della":
    tvo.task_vector_merge([x], b, out, [tvo.Sparsifier("della_magprune", 0.4, epsilon=0.15)], [1.0],
                          consensus=False, normalize=True, name="t")
else:
    consensus_ops.arcee_fusion(b, x, out)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024 / b.numel())
"""


@pytest.mark.parametrize("method, shape, limit", [
    # ranked one slice of dim 0 at a time: the whole tensor's argsort held ~70 bytes per element
    ("della", "16x512x1024", 30),
    # the softmax quotient overwrites q: 9.8 bytes per element above the output before
    ("arcee_fusion", "4096x4096", 8)])
def test_whole_tensor_temporaries_stay_bounded(method, shape, limit):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PEAK, method, shape], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    per_element = float(r.stdout.split()[-1])
    assert per_element < limit, f"{method}: {per_element:.1f} bytes per element above the inputs and output"
