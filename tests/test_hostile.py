"""A hostile or careless user (issue 8): inputs never deleted, no crash, no hang, no traceback,
no leak, no silently wrong merge. Each case is exit 2 with one line naming the problem."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_factory as lf
from pymerge import cli
from pymerge.errors import InputError
from pymerge.sizes import parse_size
from test_cli import ROOT, assert_rejected, leftovers, linear, run_cli, write_cfg


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base, fts = lf.make_family(root, n_finetunes=2)
    return root, base, fts


def _tree(path: Path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


# ---- one size parser -------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("5GB", 5 * 10**9), ("5B", 5 * 10**9), ("5 gb", 5 * 10**9),
                                         ("1.5GiB", 1610612736), ("512MiB", 512 << 20), ("2e9", 2 * 10**9),
                                         ("123", 123), (4096, 4096), (2.5e3, 2500), ("1_000k", 10**6)])
def test_sizes_mean_the_same_in_the_cli_and_the_pool(text, value):
    from pymerge.pool.weights import parse_bytes
    assert parse_size(text) == value
    assert cli.parse_size(text) == value
    assert parse_bytes(text) == value  # was 5 bytes for "5B" in the pool, 5e9 on the command line


@pytest.mark.parametrize("text", ["1e400", "1e30", "9" * 400, ".", "", "GB", "-1", "5 parsecs", "nan",
                                  float("inf"), float("nan"), 10**400, True, None, [1], "1e999999999"])
def test_bad_sizes_are_input_errors(text):
    with pytest.raises(InputError) as e:
        parse_size(text, "memory_budget")
    assert "memory_budget" in str(e.value) and len(str(e.value)) < 200


def test_pool_memory_budget_errors_are_input_errors():
    from pymerge.pool import CheckpointPool
    sds = [{"w": torch.ones(3)}, {"w": torch.zeros(3)}]
    for bad in (".", "1e400", float("inf"), -1):
        with pytest.raises(InputError, match="memory_budget"):
            CheckpointPool(sds, memory_budget=bad)


@pytest.mark.parametrize("flag, value, words", [("--chunk-size", "1e30", ["chunk-size", "1e30"]),
                                                ("--out-shard-size", "1e400", ["out-shard-size", "1e400"]),
                                                ("--chunk-size", ".", ["chunk-size"])])
def test_absurd_size_options_are_usage_errors(fam, tmp_path, capsys, flag, value, words):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", str(cfg), str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and all(w in err for w in words)


def test_a_huge_chunk_size_is_clamped_to_what_the_model_needs(fam, tmp_path, capsys):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--chunk-size", "1TB", "--quiet"], capsys)
    assert rc == 0, err  # was numpy's MemoryError: 3 buffers of 1 TB
    ref = run_cli(["merge", cfg, tmp_path / "ref", "--quiet"], capsys)
    assert ref[0] == 0
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_merge_api_sizes_are_input_errors(fam, tmp_path):
    from pymerge.merge import run_merge
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    for kw in ({"chunk_bytes": "1e400"}, {"chunk_bytes": 1e300}, {"out_shard_size": "."},
               {"out_shard_size": float("inf")}, {"threads": 1.5}):
        with pytest.raises(InputError):
            run_merge(cfg, tmp_path / "out", quiet=True, **kw)
    assert run_merge(cfg, tmp_path / "out", quiet=True, chunk_bytes="2MiB", out_shard_size="100KB").tensors


# ---- --force never deletes an input ------------------------------------------------------------
@pytest.fixture
def workdir(fam, tmp_path):
    """Models and config side by side in one folder, the way people keep them."""
    root, base, fts = fam
    work = tmp_path / "work"
    work.mkdir()
    for m in fts:
        shutil.copytree(m, work / m.name)
    cfg = write_cfg(work / "cfg.yml", linear([m.name for m in fts]))
    return work, cfg, [work / m.name for m in fts]


@pytest.mark.parametrize("out", [".", "ft1", "ft1/", "./ft1/merged", "cfg.yml", "..", "link_to_ft1",
                                 "ft1/model.safetensors"])
def test_force_refuses_an_out_that_is_holds_or_lies_in_an_input(workdir, capsys, monkeypatch, out):
    work, cfg, models = workdir
    os.symlink("ft1", work / "link_to_ft1")
    monkeypatch.chdir(work)
    before = _tree(work)
    rc, err = run_cli(["merge", "cfg.yml", out, "--force", "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "input" in err, err
    assert _tree(work) == before  # every model and the config still there, byte for byte
    assert leftovers(work / "ft1") == [] and not (work / "ft1" / "merged").exists()


def test_force_still_replaces_an_ordinary_out(workdir, capsys, monkeypatch):
    work, cfg, models = workdir
    monkeypatch.chdir(work)
    (work / "merged").mkdir()
    (work / "merged" / "old.txt").write_text("old")
    rc, err = run_cli(["merge", "cfg.yml", "merged", "--force", "--quiet"], capsys)
    assert rc == 0, err
    assert (work / "merged" / "model.safetensors").is_file() and not (work / "merged" / "old.txt").exists()
