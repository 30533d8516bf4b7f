"""pymerge's API under a caller's default device (torch.set_default_device, a `with torch.device(...)` block): its
working buffers are its own, for the CPU. On meta they had no memory: a compressed pool's quantizer wrote through a
null pointer (a segfault), a TIES merge said "output 0 is on meta" about a correct config, a search and a pool's
arcee_fusion raised torch's "Cannot copy out of meta tensor" (an audit)."""
import pytest
import torch
from safetensors.torch import save_file

import pymerge
import pymerge.search
from pymerge.pool import CheckpointPool


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(257, generator=g), "m": torch.randn(9, 13, generator=g)}
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[-1])
    save_file(base, str(tmp_path / "base.safetensors"))
    return paths, str(tmp_path / "base.safetensors")


def _targets(pool):
    return {n: torch.zeros(s, device="cpu") for n, s in pool.shapes.items()}


@pytest.mark.parametrize("compress,method,params", [
    (c, m, p) for c in (None, "int8", "int4") for m, p in (("linear", {}), ("ties", {"density": 0.5}))]
    + [(None, "arcee_fusion", {})])
def test_a_pool_under_the_meta_device_merges_as_without(files, compress, method, params):
    paths, base = files
    weights = [1.0] if method == "arcee_fusion" else [0.2, 0.3, 0.5]
    sources = paths[:len(weights)]
    kw = {"compress": compress} if compress else {}
    want = CheckpointPool(sources, base=base, **kw).materialize(weights, into=_targets(
        CheckpointPool(sources, base=base, **kw)), method=method, **params)
    with torch.device("meta"):
        pool = CheckpointPool(sources, base=base, **kw)
        got = pool.materialize(weights, into=_targets(pool), method=method, **params)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "model_stock"])
def test_a_merge_under_the_meta_device_writes_what_it_writes_without(files, tmp_path, method):
    from safetensors.torch import load_file
    paths, base = files
    folders = []
    for i, p in enumerate([base] + paths[:2]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file(load_file(p), str(folder / "model.safetensors"))
        folders.append(str(folder))
    models = [{"model": f, "parameters": {"weight": 0.5, **({"density": 0.5} if method == "ties" else {})}}
              for f in folders[1:]]
    if method == "linear":
        cfg = {"merge_method": "linear", "models": models}
    elif method == "slerp":
        cfg = {"merge_method": "slerp", "base_model": folders[1], "parameters": {"t": 0.3},
               "models": [{"model": f} for f in folders[1:]]}
    else:
        cfg = {"merge_method": method, "base_model": folders[0], "models": models}
    pymerge.run_merge(cfg, tmp_path / "plain", quiet=True)
    with torch.device("meta"):
        pymerge.run_merge(cfg, tmp_path / "meta", quiet=True)
    plain, meta = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "meta" / "model.safetensors")
    assert plain.keys() == meta.keys() and all(torch.equal(plain[k], meta[k]) for k in plain)


def test_a_search_under_the_meta_device_runs(files):
    paths, _ = files
    pool = CheckpointPool(paths)
    model = torch.nn.Module()
    model.w, model.m = torch.nn.Parameter(torch.zeros(257)), torch.nn.Parameter(torch.zeros(9, 13))

    def evaluate(m):
        return -float(m.w.detach().pow(2).sum())
    plain = pymerge.search.optimize(pool, evaluate, model=model, budget=6, popsize=3, seed=1, log=None)
    with torch.device("meta"):
        meta = pymerge.search.optimize(pool, evaluate, model=model, budget=6, popsize=3, seed=1, log=None)
    assert meta.best_objective == plain.best_objective


def test_a_list_of_bfloat16_weights_is_read(files):
    """README: weights may be "tensors (one that requires grad too, or list(alpha) of one)"; list(alpha) of a
    bfloat16 alpha was refused as "must be numbers" (numpy reads no bfloat16 0-d tensor; an audit)."""
    paths, _ = files
    pool = CheckpointPool(paths)
    alpha = torch.tensor([0.25, 0.25, 0.5], dtype=torch.bfloat16, requires_grad=True)
    got = pool.materialize(list(alpha), into=_targets(pool))
    want = pool.materialize([0.25, 0.25, 0.5], into=_targets(pool))
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_call_while_another_thread_imports_torch_sees_no_half_made_module():
    """A pipeline's threads calling run_merge while one of them imported torch for the first time: the default-device
    check (and an error message's tensor check) took the half-initialized module from sys.modules and failed with
    "partially initialized module 'torch' has no attribute '_C'" (an audit)."""
    import subprocess
    import sys
    code = (
        "import sys, threading\n"
        "from pymerge.default_device import factories_on_cpu\n"
        "from pymerge.errors import short\n"
        "t = threading.Thread(target=lambda: __import__('torch'))\n"
        "t.start()\n"
        "half = 0\n"
        "while t.is_alive():\n"
        "    m = sys.modules.get('torch')\n"
        "    half += m is not None and not hasattr(m, 'Tensor')\n"
        "    factories_on_cpu(lambda: None)()\n"
        "    short(3)\n"
        "t.join()\n"
        "print(half)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) > 0  # the calls did run while torch was half made
