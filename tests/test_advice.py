"""The advice an error gives, followed literally, must work (an audit followed each one: ten led nowhere, back to the
same error, to another program's option, or to deleting a user's own file)."""
import os
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pymerge
from pymerge import cli
from pymerge.errors import InputError, MergeConfigError
from pymerge.pool import CheckpointPool


def _models(root, n=2, extra=None):
    """n single-file folders m/<letter> under root, two 4x4 tensors (and `extra` tensors) each, with a config.json."""
    out = []
    for i in range(n):
        folder = root / "m" / "abcdef"[i]
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        tensors = {"x.weight": torch.randn(4, 4, generator=g), "y.weight": torch.randn(4, 4, generator=g)}
        tensors.update(extra(i) if extra else {})
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "llama"}')
        out.append(folder)
    return out


def _merge(cfg, root, capsys, *flags):
    (root / "c.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = cli.main(["merge", str(root / "c.yml"), str(root / "out"), "--quiet", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_a_revision_advice_followed_and_a_local_folder_spelled_as_an_id(tmp_path, capsys, monkeypatch):
    """A misplaced revision: advised model: {path: M, revision: R}, which is refused ('path' is not supported); and
    m/a@main, m/a a local folder, said "download it (hf download m/a ...) or give a local folder"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _models(tmp_path)
    local = "m/a is a local folder; a revision (@main) applies to Hugging Face model IDs only: drop it"
    cfg = {"merge_method": "linear", "models": [{"model": "m/a", "revision": "main", "parameters": {"weight": 0.5}},
                                                {"model": "m/b", "parameters": {"weight": 0.5}}]}
    rc, err = _merge(cfg, tmp_path, capsys)
    assert rc == 2 and "(model: {model: {path: M, revision: R}}, or M@R)" in err, err
    for model in ({"model": {"path": "m/a", "revision": "main"}}, "m/a@main"):  # the advice, both forms
        cfg["models"][0] = {"model": model, "parameters": {"weight": 0.5}}
        rc, err = _merge(cfg, tmp_path, capsys)
        assert rc == 2 and err.endswith(local) and "download" not in err, err
    cfg["models"][0] = {"model": "m/a", "parameters": {"weight": 0.5}}  # dropped, as told
    assert _merge(cfg, tmp_path, capsys)[0] == 0


def test_a_merge_wide_parameter_is_advised_where_it_is_read(tmp_path, capsys):
    """slerp without t advised "set it in the model's parameters or the top-level parameters": in a model's, it is
    ignored (a warning) and the same error comes back."""
    a, b = _models(tmp_path)
    cfg = {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}
    rc, err = _merge(cfg, tmp_path, capsys)
    assert rc == 2 and "(set it in the top-level parameters: it is the merge's, not a model's)" in err, err
    cfg["parameters"] = {"t": 0.5}
    assert _merge(cfg, tmp_path, capsys)[0] == 0


def test_differing_integer_buffers_are_advised_a_fix_that_applies(tmp_path, capsys):
    """Integer tensors that differ (BatchNorm's num_batches_tracked) were told to "dequantize quantized checkpoints
    first", which quantized checkpoints are refused before; giving every model one value is the fix."""
    a, b = _models(tmp_path, extra=lambda i: {"bn.num_batches_tracked": torch.tensor(10 + i)})
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                {"model": str(b), "parameters": {"weight": 0.5}}]}
    rc, err = _merge(cfg, tmp_path, capsys)
    assert rc == 2 and "num_batches_tracked: one model's value" in err and "dequantize" not in err, err
    from safetensors.torch import load_file
    tensors = load_file(str(b / "model.safetensors"))
    tensors["bn.num_batches_tracked"] = torch.tensor(10)
    save_file(tensors, str(b / "model.safetensors"))
    assert _merge(cfg, tmp_path, capsys)[0] == 0


def test_run_merge_names_its_own_keyword_for_force(tmp_path):
    """run_merge into a folder that is not empty advised the CLI's --force only."""
    a, b = _models(tmp_path)
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                {"model": str(b), "parameters": {"weight": 0.5}}]}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(InputError, match=r"pass --force \(force=True\) to replace it"):
        pymerge.run_merge(cfg, str(tmp_path / "out"), quiet=True)
    pymerge.run_merge(cfg, str(tmp_path / "out"), quiet=True, force=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_method_parameter_the_pool_takes_itself_is_advised_through_method_params():
    """ties' normalize given as the keyword normalize= is the pool's sum-to-one, so the typo's advice ("it takes:
    ... normalize ...") gave the default merge, silently: the list says where it goes."""
    torch.manual_seed(0)
    states = [{"w": torch.randn(64)} for _ in range(3)]
    pool = CheckpointPool(states[1:], base=states[0])
    target = {"w": torch.zeros(64)}
    with pytest.raises(MergeConfigError, match=r"normalize \(in method_params: normalize= is the pool's own\)"):
        pool.materialize([0.5, 0.3], into=target, method="ties", density=0.5, normalise=False)
    on = pool.materialize([0.5, 0.3], into={"w": torch.zeros(64)}, method="ties", density=0.5)["w"]
    off = pool.materialize([0.5, 0.3], into={"w": torch.zeros(64)}, method="ties", density=0.5,
                           method_params={"normalize": False})["w"]
    assert not torch.equal(on, off)


def test_locale_advice_names_the_variable_that_wins(tmp_path):
    """Under LC_ALL=C the advice "LANG=C.UTF-8" changed nothing: LC_ALL outranks LANG."""
    import subprocess
    (tmp_path / "caf\u00e9").mkdir()
    save_file({"w": torch.ones(3)}, str(tmp_path / "caf\u00e9" / "model.safetensors"))
    (tmp_path / "c.yml").write_text("merge_method: passthrough\nmodels:\n- model: caf\u00e9\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in ("LANG", "PYTHONUTF8")}
    for locale, rc in (("C", 2), ("C.UTF-8", 0)):  # the advice, followed
        run = subprocess.run([sys.executable, "-m", "pymerge", "merge", "c.yml", "o", "--quiet"], cwd=tmp_path,
                             env={**env, "LC_ALL": locale, "PYTHONUTF8": "0"}, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == rc and (rc == 0 or "(LC_ALL=C.UTF-8: LC_ALL outranks LANG)" in run.stderr), run.stderr
