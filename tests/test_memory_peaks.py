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
b, x, y, z = (torch.empty(shape, dtype=torch.bfloat16) for _ in range(4))
for i in range(0, shape[0], 4):  # a few rows at a time: whole-tensor float32 temporaries here raised the
    rows = torch.randn((min(4, shape[0] - i),) + shape[1:], generator=g)  # high-water mark the op is measured
    b[i:i + 4], x[i:i + 4] = rows, rows + 0.02 * torch.randn(rows.shape, generator=g)  # against, hiding its own
    y[i:i + 4], z[i:i + 4] = (rows + 0.02 * torch.randn(rows.shape, generator=g) for _ in range(2))
out = torch.empty_like(b)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "della":
    tvo.task_vector_merge([x], b, out, [tvo.Sparsifier("della_magprune", 0.4, epsilon=0.15)], [1.0],
                          consensus=False, normalize=True, name="t")
elif sys.argv[1] == "sce":
    consensus_ops.sce([x, y, z], b, 0.5, out)
else:
    consensus_ops.arcee_fusion(b, x, out)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024 / b.numel())
"""


@pytest.mark.parametrize("method, shape, limit", [
    # ranked one slice of dim 0 at a time: the whole tensor's argsort held ~70 bytes per element
    ("della", "16x512x1024", 30),
    # float32 copies of base and model, the scores and the softmaxes: 16.2 bytes per element of bfloat16 inputs
    # (docs/mergekit-compat.md; the inputs, once made a whole float32 tensor at a time, hid half of it: 6.2)
    ("arcee_fusion", "4096x4096", 18),
    # the variances, the mask and torch.topk's (value, index) pairs: 21 bytes per element with pairs of
    # float64 and int64 as torch's, 13 of float32 and int32 (the same comparisons, so the same elements)
    ("sce", "4096x4096", 15)])
def test_whole_tensor_temporaries_stay_bounded(method, shape, limit):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PEAK, method, shape], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    per_element = float(r.stdout.split()[-1])
    assert per_element < limit, f"{method}: {per_element:.1f} bytes per element above the inputs and output"


LORA_PEAK = """
import json, os, resource, sys, torch
from safetensors.torch import save_file
root = sys.argv[1]
if sys.argv[2] == "make":
    os.makedirs(root + "/m"); os.makedirs(root + "/ad")
    g = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16384, 1024, generator=g).bfloat16()},
              root + "/m/model.safetensors")
    json.dump({"model_type": "llama"}, open(root + "/m/config.json", "w"))
    pre = "base_model.model.model.layers.0.self_attn.q_proj."
    save_file({pre + "lora_A.weight": torch.randn(16, 1024, generator=g).bfloat16(),
               pre + "lora_B.weight": torch.randn(16384, 16, generator=g).bfloat16()}, root + "/ad/adapter_model.safetensors")
    json.dump({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"], "fan_in_fan_out": False,
               "use_rslora": False, "bias": "none"}, open(root + "/ad/adapter_config.json", "w"))
    sys.exit(0)
from pymerge.lora import open_model
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open_model(root + "/m+" + root + "/ad") as ck:
    t = ck.tensor("model.layers.0.self_attn.q_proj.weight")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024 / t.numel())
"""


def test_a_lora_weight_holds_few_float32_copies(tmp_path):
    """W + scale * B @ A of a bfloat16 weight held float32 copies of W and of the scaled product besides
    B @ A: 14.5 bytes per element of the weight at the peak (the result and W's mapped pages included);
    computed in place in the product, 10.4."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for step in ("make", "measure"):  # the files are made by another process: its peak is not this one's
        r = subprocess.run([sys.executable, "-c", LORA_PEAK, str(tmp_path), step], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    per_element = float(r.stdout.split()[-1])
    assert per_element < 12, f"{per_element:.1f} bytes per element of the LoRA'd weight"
