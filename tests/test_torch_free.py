"""A CPU merge with linear or task_arithmetic never imports torch (its import costs more than the
merge), and writes the very bytes the torch executor writes (PYMERGE_FORCE_TORCH=1)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import llama_factory as lf
from pymerge import merge, streaming
from pymerge.io import Checkpoint, SafetensorsFile, ShardedWriter
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI in a fresh interpreter, then fails unless torch stayed out of it.
_DRIVER = """
import sys
from pymerge.cli import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, f"torch was imported: {loaded[:5]}"
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchfree")
    base, fts = lf.make_family(root / "bf16", n_finetunes=3, dtype=torch.bfloat16, shards=2)
    mixed = lf.make_llama(root / "f32", dtype=torch.float32, seed=0, perturb_seed=7)
    return root, base, fts, mixed


def _config(root: Path, name: str, cfg: dict) -> Path:
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _configs(root, base, fts, mixed):
    models = [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (0.3, 0.9, -0.2))]
    return {
        "linear_f32_to_bf16": {"merge_method": "linear", "models": models, "base_model": str(base),
                               "parameters": {"weight": 0.5}, "dtype": "float32", "out_dtype": "bfloat16"},
        "linear_plain": {"merge_method": "linear", "models": models, "parameters": {"normalize": False}},
        "linear_mixed_promoted": {"merge_method": "linear",
                                  "models": models[:1] + [{"model": str(mixed), "parameters": {"weight": 2}}],
                                  "out_dtype": "float16"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "models": models, "base_model": str(base),
                            "parameters": {"lambda": 0.7, "normalize": True}, "dtype": "float32",
                            "out_dtype": "bfloat16"},
        "task_arithmetic_bf16_gradient": {
            "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(f), "parameters": {"weight": [0.1, 0.5, 1.0]}} for f in fts[:2]]},
    }


def _run(argv, env_extra=None, driver=True):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable] + (["-c", _DRIVER] if driver else ["-m", "pymerge"]) + [str(a) for a in argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _files(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", ["linear_f32_to_bf16", "linear_plain", "linear_mixed_promoted",
                                  "task_arithmetic", "task_arithmetic_bf16_gradient"])
def test_cpu_weighted_sum_merge_imports_no_torch_and_matches_torch_path(fam, tmp_path, case):
    root, base, fts, mixed = fam
    cfg = _config(tmp_path, case, _configs(root, base, fts, mixed)[case])
    plan = merge.make_plan(cfg)
    try:
        assert streaming.torch_free(plan, "cpu")
        assert not streaming.torch_free(plan, "cuda")
    finally:
        plan.close()
    # --device auto decides without torch where no GPU driver exists; elsewhere name the CPU.
    device = [] if not merge._gpu_possible() else ["--device", "cpu"]
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    p = _run(["merge", cfg, fast, "--quiet", "--chunk-size", "1MiB", *device], {"PYMERGE_FORCE_TORCH": ""})
    assert p.returncode == 0, p.stderr
    p = _run(["merge", cfg, slow, "--quiet", "--chunk-size", "1MiB", "--device", "cpu"],
             {"PYMERGE_FORCE_TORCH": "1"}, driver=False)
    assert p.returncode == 0, p.stderr
    a, b = _files(fast), _files(slow)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "mergekit_config.yml":
            assert a[name] == b[name], name  # bit-identical shards, index, config.json


def test_torch_free_errors_are_unchanged(fam, tmp_path):
    """A user error on the torch-free path: exit 2, one line, no torch."""
    root, base, fts, _ = fam
    cfg = _config(tmp_path, "zero", {"merge_method": "linear", "models": [
        {"model": str(fts[0]), "parameters": {"weight": 1.0}}, {"model": str(fts[1]), "parameters": {"weight": -1.0}}]})
    p = _run(["merge", cfg, tmp_path / "out", "--device", "cpu"])
    assert p.returncode == 2, p.stderr
    assert "linear weights sum to 0 with normalize: true" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_rounding_to_dtype_uses_the_torch_path(fam, tmp_path):
    root, base, fts, mixed = fam
    models = [{"model": str(fts[0]), "parameters": {"weight": 1}}, {"model": str(mixed), "parameters": {"weight": 1}}]
    for extra in ({"dtype": "bfloat16"},                                # float32 input rounded to bfloat16
                  {"dtype": "bfloat16", "out_dtype": "float16"}):       # result rounded twice
        plan = merge.make_plan(_config(tmp_path, "r", {"merge_method": "linear", "models": models, **extra}))
        try:
            assert not streaming.torch_free(plan, "cpu")
        finally:
            plan.close()
    plan = merge.make_plan(_config(tmp_path, "t", {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(f), "parameters": {"weight": 1, "density": 0.5}} for f in fts[:2]]}))
    try:
        assert not streaming.torch_free(plan, "cpu")  # not a weighted sum
    finally:
        plan.close()


def test_imports_stay_torch_free():
    code = ("import sys, pymerge, pymerge.cli, pymerge.io, pymerge.merge, pymerge.streaming, pymerge._native\n"
            "from pymerge.methods.base import get_method\n"
            "get_method('linear'); get_method('task_arithmetic')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "from pymerge import weighted_sum\n"
            "assert 'torch' in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_lazy_torch_tables_keep_their_names():
    from pymerge import _native, io
    assert _native.DTYPE_CODES[torch.bfloat16] == _native.CODES_BY_NAME["bfloat16"] == _native.CODES_BY_NAME["BF16"]
    assert torch.float32 in _native.INPUT_DTYPES and torch.float8_e4m3fn in _native.INPUT_DTYPES
    assert _native.OUTPUT_DTYPES == {torch.float32, torch.float16, torch.bfloat16}
    assert io.SAFETENSORS_DTYPES["BF16"] is torch.bfloat16 and io.TORCH_TO_SAFETENSORS[torch.float16] == "F16"


def test_array_is_the_tensor_bytes(tmp_path):
    path = tmp_path / "m.safetensors"
    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "u": torch.ones(1, dtype=torch.uint8),
         "f": torch.randn(7), "z": torch.empty(0, 4)}
    save_file(t, str(path))  # "f" after a 1-byte tensor: possibly misaligned, array() must copy it
    with SafetensorsFile(path) as f:
        for k, v in t.items():
            arr = f.array(k)
            assert arr.dtype == np.uint8 and arr.ndim == 1 and not arr.flags.writeable
            assert arr.tobytes() == v.contiguous().view(torch.uint8).numpy().tobytes(), k
            assert f.info(k).dtype_name == str(v.dtype).replace("torch.", "")
            assert f.info(k).dtype == v.dtype
        assert f.info("a").safetensors_dtype == "BF16"
    with Checkpoint(path) as ck:
        assert ck.array("f").tobytes() == t["f"].numpy().tobytes()
    # A float32 tensor at an odd offset: array() hands out an aligned copy, as tensor() does.
    import json
    header = json.dumps({"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}).encode()
    header += b" " * (-len(header) % 8)
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(header).to_bytes(8, "little") + header + bytes([1, 2, 3]) + np.float32([1.5, -2]).tobytes())
    with SafetensorsFile(odd) as f:
        assert f.info("f").file_offset % 4 == 3
        arr = f.array("f")
        assert arr.__array_interface__["data"][0] % 4 == 0 and not arr.flags.writeable
        assert arr.view(np.float32).tolist() == [1.5, -2.0]


def test_writer_takes_numpy_chunks_and_dtype_names(tmp_path):
    x = torch.randn(6, 4).to(torch.bfloat16)
    y = np.arange(10, dtype=np.float32)
    out = tmp_path / "out"
    with ShardedWriter(out, [("x", "bfloat16", (6, 4)), ("y", "F32", (10,)), ("z", torch.float16, (2,))]) as w:
        raw = x.view(torch.uint8).numpy()
        w.write("x", raw[:40], 0)          # raw bytes of the first 20 elements
        w.write("x", raw[40:].copy(), 20)
        w.write("y", y)
        w.write("z", np.array([1.5, -2], dtype=np.float16))
        with pytest.raises(ValueError, match="dtype"):
            w.write("y", np.zeros(10, dtype=np.float64))
        with pytest.raises(ValueError, match="whole number"):
            w.write("y", np.zeros(3, dtype=np.uint8))
        with pytest.raises(ValueError, match="contiguous"):
            w.write("y", y.reshape(2, 5).T)
        with pytest.raises(ValueError, match="buffer"):
            w.write("y", [1.0] * 10)
    loaded = load_file(str(out / "model.safetensors"))
    assert torch.equal(loaded["x"], x) and torch.equal(loaded["y"], torch.from_numpy(y))
    assert loaded["z"].tolist() == [1.5, -2.0]
