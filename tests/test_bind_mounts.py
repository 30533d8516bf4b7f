"""Outputs named through a bind mount never replace an input: one folder reached by two paths that no symlink explains
(a container's volume mounted twice) is compared by device and inode, not by realpath (an audit: `pymerge merge
--force` replaced an input model, or deleted the folder of inputs; CheckpointPool.save overwrote a source's
config.json; pymerge search replaced its own config). The bind mounts are made in a user and mount namespace of
their own (`unshare -rm`), where the machine allows one."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llama_factory import make_family
from pymerge.io.files import is_or_inside, same_entry, same_place

TESTS = Path(__file__).resolve().parent


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount --bind "$d" "$d"; r=$?; '
                               'umount "$d" 2>/dev/null; rmdir "$d"; exit $r'],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mounts = pytest.mark.skipif(not _namespaces_work(), reason="no unprivileged mount namespaces (unshare -rm) here")


def _bound(real: Path, view: Path, code: str, timeout: float = 300) -> dict:
    """Runs code (Python) with real bind-mounted at view, in a namespace of its own; returns what it prints (JSON)."""
    view.mkdir(parents=True, exist_ok=True)
    script = real.parent / "in_namespace.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount --bind "{real}" "{view}" && exec "{sys.executable}" '
                          f'"{script}"'], capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _family(root: Path) -> Path:
    base, fts = make_family(root, n_finetunes=2)
    cfg = root / "cfg.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                   + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for f in fts)
                   + "dtype: float32\n")
    return cfg


_MERGE = """
    import json, subprocess, sys
    r = subprocess.run([sys.executable, "-m", "pymerge", "merge", {cfg!r}, {out!r}, *{flags!r}, "--quiet"],
                       capture_output=True, text=True)
    print(json.dumps({{"rc": r.returncode, "err": r.stderr.strip()}}))
"""


@needs_mounts
@pytest.mark.parametrize("out, flags, says", [
    ("view/fam/ft1", ["--force"], "is or holds the model folder"),   # an input model, replaced
    ("view/fam", ["--force"], "is or holds the model folder"),       # the folder of every input, deleted
    ("view/fam/ft2/merged", [], "lies inside the model folder"),     # written inside an input
])
def test_merge_out_through_a_bind_mount_is_refused_before_anything_is_written(tmp_path, out, flags, says):
    real, view = tmp_path / "real", tmp_path / "view"
    cfg = _family(real / "fam")
    before = _snapshot(real)
    r = _bound(real, view, _MERGE.format(cfg=str(cfg), out=str(tmp_path / out), flags=flags))
    assert r["rc"] == 2 and says in r["err"] and "bind mount" in r["err"] and len(r["err"].splitlines()) == 1, r
    assert _snapshot(real) == before


@needs_mounts
def test_a_killed_runs_leftover_name_through_a_bind_mount_is_refused_not_swept(tmp_path):
    """An input named like a killed run's temporary folder beside OUT was deleted by the writer's sweep before the
    merge read it, when OUT named its folder through a bind mount."""
    real, view = tmp_path / "real", tmp_path / "view"
    cfg = _family(real / "fam")
    leftover = real / ".merged.pymerge-tmp-999999"
    (real / "fam" / "ft2").rename(leftover)
    cfg.write_text(cfg.read_text().replace(str(real / "fam" / "ft2"), str(leftover)))
    before = _snapshot(real)
    r = _bound(real, view, _MERGE.format(cfg=str(cfg), out=str(view / "merged"), flags=[]))
    assert r["rc"] == 2 and "named as a killed run's leftover" in r["err"], r
    assert _snapshot(real) == before and not (real / "merged").exists()


@needs_mounts
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_pool_save_through_a_bind_mount_never_overwrites_a_source(tmp_path, name):
    real, view = tmp_path / "real", tmp_path / "view"
    _family(real / "fam")
    before = _snapshot(real)
    r = _bound(real, view, f"""
        import json
        from pymerge.errors import InputError
        from pymerge.pool import CheckpointPool
        pool = CheckpointPool([{str(real / "fam" / "ft1")!r}, {str(real / "fam" / "ft2")!r}], compress="int8",
                              base={str(real / "fam" / "base")!r})
        try:
            pool.save({str(view / "fam" / "ft1" / name)!r}, overwrite=True)
            print(json.dumps({{"err": None}}))
        except InputError as e:
            print(json.dumps({{"err": str(e)}}))
    """)
    assert r["err"] is not None and ("inside the model folder" in r["err"] or "is the checkpoint file" in r["err"]), r
    assert _snapshot(real) == before


@needs_mounts
@pytest.mark.parametrize("case", ["out", "state_path"])
def test_search_outputs_through_a_bind_mount_never_replace_its_config_or_results(tmp_path, case):
    """out naming the config's folder through a bind mount replaced the config (named best_merge.yml) with the
    results; a state_path naming out's history.json through one had the results replace the state."""
    real, view = tmp_path / "real", tmp_path / "view"
    proj = real / "proj"
    proj.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        save_file({"theta": torch.randn(16, generator=g)}, str(proj / f"c{i}.safetensors"))
    (proj / "evalbind.py").write_text("import torch\ndef build():\n    m = torch.nn.Module()\n"
                                      "    m.theta = torch.nn.Parameter(torch.zeros(16))\n    return m\n"
                                      "def evaluate(m):\n    return -float(m.theta.detach().norm())\n")
    config = "best_merge.yml" if case == "out" else "search.yml"
    (proj / config).write_text("sources: [c0.safetensors, c1.safetensors, c2.safetensors]\n"
                                         "model: evalbind:build\nevaluate: evalbind:evaluate\n"
                                         "search: {budget: 6, popsize: 3, seed: 2}\nout: out\n"
                                         + (f"state_path: {view / 'proj' / 'out' / 'history.json'}\n"
                                            if case == "state_path" else ""))
    before = _snapshot(real)
    r = _bound(real, view, f"""
        import json, subprocess, sys
        r = subprocess.run([sys.executable, "-m", "pymerge", "search", {str(proj / config)!r},
                            *{["--out", str(view / "proj")] if case == "out" else []!r}],
                           capture_output=True, text=True)
        print(json.dumps({{"rc": r.returncode, "err": r.stderr.strip()}}))
    """)
    says = "its best_merge.yml would replace" if case == "out" else "where the search writes its results"
    assert r["rc"] == 2 and says in r["err"], r
    assert _snapshot(real) == before


def test_places_are_compared_by_device_and_inode(tmp_path):
    """is_or_inside and same_place without a mount: a hard link is the same file, a folder holds what lies under it
    (existing or not), a sibling with a common prefix is not inside."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "ab").mkdir()
    f = tmp_path / "a" / "b" / "f"
    f.write_text("x")
    os.link(f, tmp_path / "hard")
    assert same_place(tmp_path / "hard", f) and is_or_inside(tmp_path / "hard", f)
    assert is_or_inside(f, tmp_path / "a") and is_or_inside(tmp_path / "a" / "b" / "new" / "deeper", tmp_path / "a")
    assert not is_or_inside(tmp_path / "ab" / "x", tmp_path / "a") and not is_or_inside(tmp_path / "a", f)
    assert not same_place(tmp_path / "missing", tmp_path / "missing")
    assert not is_or_inside(tmp_path / "a", tmp_path / "missing")
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert same_entry(tmp_path / "link" / "b" / "new" / "x", tmp_path / "a" / "b" / "new" / "x")  # neither exists
    assert not same_entry(tmp_path / "link" / "b" / "new" / "x", tmp_path / "a" / "b" / "new" / "y")
    assert not same_entry(tmp_path / "ab" / "new", tmp_path / "a" / "new")


@needs_mounts
def test_a_merge_run_from_out_under_a_bind_mounts_path_says_the_folder_is_new(tmp_path):
    """A shell in OUT keeps looking at the old folder once the model is renamed onto OUT: the merge says so, where
    the working folder is OUT under a bind mount's other path too."""
    real, view = tmp_path / "real", tmp_path / "view"
    cfg = _family(tmp_path / "fam")
    (real / "out").mkdir(parents=True)
    r = _bound(real, view, f"""
        import json, os, subprocess, sys
        os.chdir({str(view / "out")!r})
        r = subprocess.run([sys.executable, "-m", "pymerge", "merge", {str(cfg)!r}, {str(real / "out")!r},
                            "--force"], capture_output=True, text=True)
        print(json.dumps({{"rc": r.returncode, "err": r.stderr.strip(), "out": r.stdout.strip()}}))
    """)
    assert r["rc"] == 0, r
    assert "still shows the old one, now deleted" in r["err"] + r["out"], r
    assert (real / "out" / "config.json").exists()
