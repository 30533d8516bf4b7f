"""The GPU streaming path (pinned staging, side-stream copies) against the CPU path. Needs CUDA."""
import pytest
import torch
import yaml

import llama_factory as lf
from pymerge.merge import run_merge

pytestmark = pytest.mark.gpu

DIMS = lf.LlamaDims(hidden=128, layers=3, intermediate=256, vocab=512, heads=4, kv_heads=2)


_load = lf.load_folder


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return (lf.make_family(root / "bf16", n_finetunes=3, dims=DIMS, dtype=torch.bfloat16, shards=2),
            lf.make_family(root / "fp32", n_finetunes=2, dims=DIMS, dtype=torch.float32, seed=3))


@pytest.mark.parametrize("case", ["linear_bf16", "ta_fp32_out", "ta_cast_bf16", "linear_fp16_out"])
@pytest.mark.parametrize("chunk", [1 << 20, 64 << 20])
def test_gpu_matches_cpu(family, tmp_path, case, chunk):
    (b16, f16), (b32, f32) = family
    cfgs = {
        "linear_bf16": {"merge_method": "linear", "models": [
            {"model": str(f), "parameters": {"weight": w}} for f, w in zip(f16, (0.2, [0.3, 0.9], 0.5))],
            "dtype": "float32", "out_dtype": "bfloat16"},
        "ta_fp32_out": {"merge_method": "task_arithmetic", "base_model": str(b16), "models": [
            {"model": str(f), "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}]}}
            for f in f16], "parameters": {"lambda": 0.7}, "dtype": "float32", "out_dtype": "float32"},
        "ta_cast_bf16": {"merge_method": "task_arithmetic", "base_model": str(b32), "models": [
            {"model": str(f), "parameters": {"weight": 0.6}} for f in f32], "dtype": "bfloat16",
            "out_dtype": "float32"},
        "linear_fp16_out": {"merge_method": "linear", "models": [
            {"model": str(f), "parameters": {"weight": 1.0}} for f in f32], "out_dtype": "float16"},
    }
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(cfgs[case]))
    run_merge(cfg, tmp_path / "cpu", device="cpu", quiet=True, chunk_bytes=chunk)
    report = run_merge(cfg, tmp_path / "gpu", device="cuda", quiet=True, chunk_bytes=chunk)
    assert report.device.startswith("cuda")
    a, b = _load(tmp_path / "gpu"), _load(tmp_path / "cpu")
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype
        x, y = a[k].double(), b[k].double()
        eps = torch.finfo(b[k].dtype).eps
        if cfgs[case]["dtype" if "dtype" in cfgs[case] else "out_dtype"] == "bfloat16":
            eps = torch.finfo(torch.bfloat16).eps
        # Same float32 arithmetic up to FMA contraction: at most one rounding step apart.
        assert bool(((x - y).abs() <= eps * y.abs() + 1e-6 * y.abs().max()).all()), (case, k)
