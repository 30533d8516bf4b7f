"""The pymerge command: bad inputs exit 2 with one line and no output; crashes leave nothing behind."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import llama_factory as lf
from pymerge import cli

ROOT = Path(__file__).resolve().parent.parent
# A merge big enough to interrupt: ~6 MB per model, streamed in 1 MiB chunks.
SLOW_DIMS = lf.LlamaDims(hidden=256, layers=4, intermediate=512, vocab=1024, heads=4, kv_heads=4)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base, fts = lf.make_family(root, n_finetunes=2)
    return root, base, fts


def write_cfg(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def linear(models, **extra):
    cfg = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    cfg.update(extra)
    return cfg


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_rejected(result, words, out: Path):
    """Exit 2, one `pymerge: error:` line holding every word, and nothing left at or beside OUT."""
    rc, err = result
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymerge: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and leftovers(out) == []


def leftovers(out: Path):
    if not out.parent.is_dir():  # (a folder the merge made for OUT and removed again)
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.pymerge-"))


# ---- corrupt checkpoints -------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_header(path: Path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def make_broken(kind: str, base: Path, where: Path) -> Path:
    m = _copy(base, where / kind)
    st = m / "model.safetensors"
    if kind == "truncated":
        os.truncate(st, st.stat().st_size - 100)
    elif kind == "corrupt_header":
        raw = bytearray(st.read_bytes())
        raw[8:24] = b"\x00garbage{{{{{{{{"
        st.write_bytes(bytes(raw))
    elif kind == "overlapping_offsets":
        def overlap(h):
            names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            a, b = h[names[0]], h[names[1]]
            size = b["data_offsets"][1] - b["data_offsets"][0]
            b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
        _rewrite_header(st, overlap)
    elif kind == "missing_tensor":
        t = load_file(str(st))
        t.pop("model.layers.1.mlp.up_proj.weight")
        save_file(t, str(st), metadata={"format": "pt"})
    elif kind == "mismatched_shape":
        shutil.rmtree(m)
        lf.make_llama(m, dims=lf.LlamaDims(intermediate=lf.TINY.intermediate + 8), perturb_seed=5)
    elif kind == "no_weights":
        st.unlink()
    else:
        raise AssertionError(kind)
    return m


@pytest.mark.parametrize("kind, words", [
    ("truncated", ["model.safetensors"]),
    ("corrupt_header", ["model.safetensors", "header"]),
    ("overlapping_offsets", ["model.safetensors", "overlap"]),
    ("missing_tensor", ["model.layers.1.mlp.up_proj.weight"]),
    ("mismatched_shape", ["model.layers.0.mlp", "96]", "104]", "mismatched_shape"]),
    ("no_weights", ["no model.safetensors"]),
])
def test_bad_checkpoints_exit_2_with_one_line(fam, tmp_path, capsys, kind, words):
    root, base, fts = fam
    bad = make_broken(kind, fts[1], tmp_path)
    cfg = write_cfg(tmp_path / "c.yml", linear([fts[0], bad]))
    out = tmp_path / "out"
    assert_rejected(run_cli(["merge", cfg, out], capsys), words, out)


@pytest.mark.parametrize("case, words", [
    ("unknown_key", ["c.yml", "unknown key 'merge_methd'"]),
    ("unknown_method", ["unknown merge_method 'lineer'"]),
    ("missing_path", ["model path not found", "nowhere"]),
    ("nan_weight", ["weight", "nan is not a finite number"]),
    ("missing_weight", ["no value of required parameter 'weight' for model "]),
    ("missing_weight_slices", ["no value of required parameter 'weight' for model "]),  # was "for input 1"
    ("passthrough_with_a_base", ["passthrough takes at most 1 model(s) in all (its base_model among them), got 2"]),
    ("zero_sum", ["weights sum to 0"]),
    ("slices", ["slices[0]", "goes past", "layers"]),
    ("ta_without_base", ["task_arithmetic needs a base_model"]),
    ("bad_yaml", ["not valid YAML"]),
    ("no_config", ["config file not found"]),
    ("unknown_param", ["unknown parameter 'wieght'"]),
])
def test_bad_configs_exit_2_with_one_line(fam, tmp_path, capsys, case, words):
    root, base, fts = fam
    a, b = str(fts[0]), str(fts[1])
    cfgs = {
        "unknown_key": {"merge_methd": "linear", "models": [a]},
        "unknown_method": linear([a, b], merge_method="lineer"),
        "missing_path": linear([a, str(tmp_path / "nowhere")]),
        "nan_weight": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: .nan}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 1}}\n",
        "missing_weight": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}},
                                                               {"model": b}]},
        "missing_weight_slices": {"merge_method": "linear", "slices": [{"sources": [
            {"model": a, "layer_range": [0, 1], "parameters": {"weight": 1}}, {"model": b, "layer_range": [0, 1]}]}]},
        "passthrough_with_a_base": {"merge_method": "passthrough", "base_model": a, "models": [b]},
        "zero_sum": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}},
                                                         {"model": b, "parameters": {"weight": -1}}]},
        "slices": {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 99]}]}]},
        "ta_without_base": {"merge_method": "task_arithmetic", "models": [a, b], "parameters": {"weight": 1}},
        "bad_yaml": "merge_method: linear\nmodels: [\n",
        "unknown_param": linear([a, b], parameters={"wieght": 2}),
    }
    cfg = tmp_path / "c.yml"
    if case != "no_config":
        write_cfg(cfg, cfgs[case])
    out = tmp_path / "out"
    assert_rejected(run_cli(["merge", cfg, out], capsys), words, out)


@pytest.mark.parametrize("flags, words", [
    (["-j", "0"], ["-j/--num-threads must be an integer from 1 to"]),  # named --threads, a flag not typed
    (["--num-threads", "5000"], ["-j/--num-threads must be an integer from 1 to 4096, got 5000"]),
    (["--threads", "0"], ["--threads must be an integer from 1 to"]),
    (["--threads", "2", "-j", "0"], ["-j/--num-threads must be an integer from 1 to"]),  # (beside --threads: unread)
    (["--threads", "1", "-j", "2"], ["--threads 1 and -j/--num-threads 2 disagree"]),  # (-j was dropped silently)
])
def test_thread_flags_are_named_as_given(fam, tmp_path, capsys, flags, words):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    rc, err = run_cli(["merge", cfg, out] + flags, capsys)
    assert_rejected((rc, err), words, out)
    assert "-j" in err if "-j" in flags or "--num-threads" in flags else "-j" not in err


@pytest.mark.parametrize("command, flag", [("merge", "--write-model"), ("merge", "--no-copy"), ("merge", "--rand"),
                                           ("search", "--bud"), ("bench", "--round")])
def test_an_abbreviated_option_is_refused(fam, tmp_path, capsys, command, flag):
    """argparse took an unambiguous prefix for the option (`--write-model` wrote a model card, `--rand 3` set
    the seed), where mergekit-yaml refuses it: a script ran under one tool and failed under the other."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    args = {"merge": [cfg, out, flag, "3"], "search": [cfg, flag, "3"], "bench": [flag, "1"]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main([command] + [str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("fault", ["interrupt", "disk"])
def test_a_temporary_folder_left_after_an_error_is_said(fam, tmp_path, capsys, monkeypatch, fault):
    """A merge interrupted (or failing on a full disk) whose temporary folder then could not be removed (EIO) said
    "no output was written" and nothing of the model-sized folder left beside OUT (a review)."""
    import errno
    import pymerge.io.writer as writer_mod
    import pymerge.merge as merge_mod
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"

    def side_files(*a, **k):
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "config.json"))

    def no_removal(path):
        raise OSError(errno.EIO, "Input/output error", str(path))
    monkeypatch.setattr(merge_mod, "write_side_files", side_files)
    monkeypatch.setattr(writer_mod, "_remove_tree", no_removal)
    rc, err = run_cli(["merge", cfg, out, "--quiet"], capsys)
    [left] = leftovers(out)
    lines = err.strip().splitlines()
    assert rc == (130 if fault == "interrupt" else 2) and len(lines) == 1, err
    assert lines[0].startswith("pymerge: interrupted; no output was written (" if fault == "interrupt" else
                               f"pymerge: error: {out / 'config.json'}: No space left on device; "), lines
    assert lines[0].endswith(f"its temporary folder {out.parent / left} could not be removed (Input/output error): "
                             "delete it" + (")" if fault == "interrupt" else "")), lines
    monkeypatch.undo()
    assert run_cli(["merge", cfg, out, "--quiet"], capsys)[0] == 0 and leftovers(out) == []  # the next one removes it


def test_existing_out_needs_force_and_is_kept(fam, tmp_path, capsys):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = run_cli(["merge", cfg, out, "--quiet"], capsys)
    assert rc == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"
    rc, err = run_cli(["merge", cfg, out, "--quiet", "--force"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_cli(["merge", cfg, empty, "--quiet"], capsys)  # an empty folder is fine without --force
    assert rc == 0 and (empty / "config.json").is_file()


def test_a_model_replaced_while_it_is_merged_is_refused(fam, tmp_path, capsys, monkeypatch):
    """Another merge installing a model over an input (`pymerge merge ... X --force`) after this one opened
    X's shards: the shards still read the old X, config.json and the tokenizer files were read from the new
    one, and the output mixed them without a word. Now: exit 2, one line naming X, no OUT."""
    import pymerge.merge
    root, base, fts = fam
    x, other = _copy(fts[0], tmp_path / "X"), _copy(fts[1], tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=999)))
    real = pymerge.merge.write_side_files

    def replace_x_then_write(*args, **kwargs):  # as an installing merge's rename would, between open and copy
        os.rename(x, tmp_path / "old-X")
        os.rename(other, x)
        return real(*args, **kwargs)
    monkeypatch.setattr(pymerge.merge, "write_side_files", replace_x_then_write)
    out = tmp_path / "out"
    assert_rejected(run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([x, fts[1]])), out, "--quiet"], capsys),
                    [f"{x} was replaced while it was being merged", "run the merge again"], out)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_a_file_renamed_over_an_input_while_it_is_merged_is_refused(fam, tmp_path, capsys, monkeypatch, name):
    """save_pretrained, rsync and downloads rename each new file over the old one, the folder staying, which the
    folder's identity did not see: OUT had the old tensors with the new config.json (vocab_size 48 over a
    [32, 16] embedding, which transformers cannot load) or tokenizer files, exit 0 (an audit). Now: exit 2, one
    line naming the file, no OUT."""
    import pymerge.merge
    root, base, fts = fam
    x = _copy(fts[0], tmp_path / "X")
    new = tmp_path / "new"
    if name == "model.safetensors":
        shutil.copy(fts[1] / name, new)
    else:
        new.write_text(json.dumps(dict(json.loads((x / name).read_text()), edited=True)))
    real = pymerge.merge.write_side_files

    def rename_over_then_write(*args, **kwargs):  # between the shards' open and the side files' read
        os.replace(new, x / name)
        return real(*args, **kwargs)
    monkeypatch.setattr(pymerge.merge, "write_side_files", rename_over_then_write)
    out = tmp_path / "out"
    assert_rejected(run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([x, fts[1]])), out, "--quiet"], capsys),
                    [f"{x / name}: was replaced or rewritten while it was being merged", "run the merge again"], out)


def test_out_under_missing_folders_is_made_and_a_failed_merge_removes_them(fam, tmp_path, capsys, monkeypatch):
    """`mergekit-yaml cfg runs/x/out` makes runs/x; pymerge said "parent folder ... does not exist". It makes
    them now, and removes them again when the merge fails (here: an input replaced mid-merge)."""
    import pymerge.merge
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "runs" / "x" / "out"
    rc, err = run_cli(["merge", cfg, out, "--quiet"], capsys)
    assert rc == 0, err
    assert list(out.glob("*.safetensors"))

    def fail(*args, **kwargs):
        raise pymerge.merge.InputError("stop here")
    monkeypatch.setattr(pymerge.merge, "write_side_files", fail)
    out2 = tmp_path / "more" / "y" / "out"
    assert_rejected(run_cli(["merge", cfg, out2, "--quiet"], capsys), ["stop here"], out2)
    assert not (tmp_path / "more").exists()


def test_a_donor_without_a_tokenizer_is_warned_of(fam, tmp_path, capsys):
    """The output's side files come from the base, else the first model: one without tokenizer files gave an
    output without a tokenizer, silently (mergekit logs "Failed to copy tokenizer")."""
    root, base, fts = fam
    bare = _copy(fts[0], tmp_path / "bare")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([bare, fts[1]])), tmp_path / "out"], capsys)
    assert rc == 0 and "no tokenizer" in err and str(bare) in err, err
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    rc, err = run_cli(["merge", write_cfg(tmp_path / "d.yml", linear([fts[1], bare])), tmp_path / "out2"], capsys)
    assert rc == 0 and "no tokenizer" not in err, err


def test_a_system_error_without_a_file_name_blames_no_file(fam, tmp_path, capsys, monkeypatch):
    """An OSError with no file name (an input's mmap, say) read 'output: Cannot allocate memory'."""
    import errno
    import pymerge.merge

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    monkeypatch.setattr(pymerge.merge, "run_merge", no_room)
    root, base, fts = fam
    out = tmp_path / "out"
    assert_rejected(run_cli(["merge", write_cfg(tmp_path / "c.yml", linear(fts)), out], capsys),
                    ["pymerge: error: Cannot allocate memory"], out)


def test_merge_with_progress_bar_and_sizes(fam, tmp_path, capsys):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                         "models": [str(f) for f in fts], "parameters": {"weight": 0.5},
                                         "dtype": "float32", "out_dtype": "bfloat16"})
    out = tmp_path / "out"
    rc, err = run_cli(["merge", cfg, out, "--out-shard-size", "100KB", "--threads", "1"], capsys)
    assert rc == 0, err
    assert "merging" in err and "B/s" in err and "pymerge: merged" in err
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_config_json_names_the_dtype_every_tensor_is_written_in(tmp_path, capsys):
    """A bfloat16 model merged with a float32 one (no dtype, no out_dtype) is written in float32; the
    config.json kept the donor's "bfloat16"."""
    a = lf.make_llama(tmp_path / "a", dtype=torch.bfloat16, seed=0)
    b = lf.make_llama(tmp_path / "b", dtype=torch.float32, seed=0, perturb_seed=1)
    out = tmp_path / "out"
    rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([a, b])), out, "--quiet"], capsys)
    assert rc == 0, err
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    config = json.loads((a / "config.json").read_text())  # as transformers >= 4.56 writes it: "dtype" only
    config["dtype"] = config.pop("torch_dtype")
    (a / "config.json").write_text(json.dumps(config))
    rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([a, b])), tmp_path / "new", "--quiet"], capsys)
    assert rc == 0 and json.loads((tmp_path / "new" / "config.json").read_text())["dtype"] == "float32", err
    c = lf.make_llama(tmp_path / "c", dtype=torch.bfloat16, seed=0, perturb_seed=2)
    rc, err = run_cli(["merge", write_cfg(tmp_path / "d.yml", linear([a, c])), tmp_path / "same", "--quiet"], capsys)
    assert rc == 0 and json.loads((tmp_path / "same" / "config.json").read_text())["dtype"] == "bfloat16"  # a's


@pytest.mark.parametrize("text, value", [("5GB", 5_000_000_000), ("500MB", 500_000_000), ("1.5GiB", 1610612736),
                                         ("123", 123), ("5B", 5_000_000_000), ("2e9", 2_000_000_000),
                                         ("64kib", 65536)])
def test_parse_size(text, value):
    assert cli.parse_size(text) == value


def test_an_interrupt_before_a_command_starts_is_one_line(monkeypatch, capsys):
    """Ctrl-C while pymerge imported its modules (before the command's own handling) printed a traceback and died
    by the signal (an audit): it is one line and exit 130, as an interrupted command's."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["merge", "c.yml", "out"]) == 130
    assert capsys.readouterr().err == "pymerge: interrupted\n"


@pytest.mark.parametrize("exc, words", [
    (MemoryError(), "out of memory"), (RuntimeError("can't start new thread"), "cannot start a thread"),
    # torch's CPU allocator (a whole-tensor method's buffer under ulimit -v: a 32-line traceback, exit 1; an audit)
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 65536 bytes. Error code 12"),
     "out of memory"),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory")])
def test_running_out_of_memory_or_threads_is_one_line(monkeypatch, capsys, exc, words):
    """Under `ulimit -v` a merge died with a 30-line traceback and exit 1 (a MemoryError, or threading's
    "can't start new thread"; an audit): the machine's limits are the user's to raise, in one line, exit 2."""
    def short_of(args):
        raise exc
    monkeypatch.setattr(cli, "_dispatch", short_of)
    assert cli.main(["merge", "c.yml", "out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pymerge: error: {words}")
    monkeypatch.setattr(cli, "_dispatch", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError stays a bug's traceback
        cli.main(["merge", "c.yml", "out"])


@pytest.mark.parametrize("nbytes, text", [(0, "0 bytes"), (1, "1 byte"), (999, "999 bytes"), (1000, "1.00 KB"),
                                           (400_100, "400.10 KB"), (999_950, "1.00 MB"), (45_000_000, "45.00 MB"),
                                           (1_049_000_000, "1.05 GB"), (2e13, "20.00 TB")])
def test_format_size(nbytes, text):
    """One format for every message that states a size (the writer's free space, the pool, bench)."""
    from pymerge.sizes import format_size, parse_size
    assert format_size(nbytes) == text
    if nbytes >= 1000:  # reads back ("999 B" would not: a bare B is a billion, as in mergekit)
        assert abs(parse_size(text.replace(" ", "")) - nbytes) <= 0.05 * nbytes


@pytest.mark.parametrize("text", ["", "GB", "5 parsecs", "-1", "0"])
def test_parse_size_rejects(text):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):  # argparse turns it into exit 2 with one line
        cli.parse_size(text)


def test_chunk_size_floor_is_stated_once(fam, tmp_path, capsys):
    """--chunk-size 0 said the minimum was 1 byte, then 1 was refused for a minimum of 1048576 (a bug hunt):
    the command line refuses below the floor run_merge applies, with that floor in the message."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    for size in ("0", "1", "1MB"):
        with pytest.raises(SystemExit) as e:
            cli.main(["merge", str(cfg), str(tmp_path / "out"), "--chunk-size", size])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "--chunk-size" in err[-1] and "minimum of 1048576" in err[-1], err
    assert not (tmp_path / "out").exists()
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--chunk-size", "1MiB", "--quiet"], capsys)
    assert rc == 0, err


# ---- real processes: exit codes, Ctrl-C, SIGKILL -------------------------------------------
def test_python_m_pymerge_exit_codes(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear([fts[0], tmp_path / "nowhere"]))
    p = subprocess.run([sys.executable, "-m", "pymerge", "merge", str(cfg), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "nowhere" in p.stderr
    cfg = write_cfg(tmp_path / "ok.yml", linear(fts))
    p = subprocess.run([sys.executable, "-m", "pymerge", "merge", str(cfg), str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("stderr", ["reader gone", "full", "closed"])
def test_a_merge_whose_stderr_cannot_be_written_still_merges(fam, tmp_path, stderr):
    """A progress bar or report line that cannot be written (`2>&1 | head -c 1`: the reader went away; a
    full or closed stderr) failed a merge that was otherwise complete (exit 1, no model), and a write failing
    in the writer thread left tqdm's lock held: the merge hung forever (a bug hunt)."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "ok.yml", linear(fts))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pymerge", "merge", str(cfg), str(out), "--chunk-size", "1MiB"]
    if stderr == "closed":  # and its lines do not go to stdout instead (print(file=None) writes there)
        p = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "bash", *cmd], cwd=ROOT, timeout=300,
                           stdout=subprocess.PIPE)
        assert p.stdout == b""
    elif stderr == "full":
        with open("/dev/full", "w") as full:
            p = subprocess.run(cmd, cwd=ROOT, stderr=full, timeout=300)
    else:
        r, w = os.pipe()
        os.close(r)  # every write to w fails with EPIPE, as after `| head -c 1` has read its byte
        try:
            p = subprocess.run(cmd, cwd=ROOT, stderr=w, timeout=300)
        finally:
            os.close(w)
    assert p.returncode == 0
    assert (out / "model.safetensors").is_file() and not leftovers(out)


@pytest.mark.parametrize("command", [["doctor"], ["--version"], ["bench", "--elements", "4096", "--rounds", "1"]])
def test_a_stdout_reader_gone_away_ends_quietly(command):
    """`pymerge doctor | head -1` exited 2 with "pymerge: error: Broken pipe", and `pymerge --version | head -0`
    printed a traceback (a docs bug hunt): now no word on stderr and 141, as a tool that SIGPIPE stops."""
    r, w = os.pipe()
    os.close(r)  # every write to w fails with EPIPE: the reader has gone away
    try:
        p = subprocess.run([sys.executable, "-m", "pymerge", *command], cwd=ROOT, stdout=w, stderr=subprocess.PIPE,
                           text=True, timeout=300)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", (p.returncode, p.stderr[-2000:])


def test_doctor_with_stdout_closed():
    """`pymerge doctor >&-` ended in an AttributeError traceback (doctor flushed a None sys.stdout)."""
    p = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", sys.executable, "-m", "pymerge", "doctor"], cwd=ROOT,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])


# The merge, slowed down inside the child process only (each chunk sleeps), so a signal lands midway.
_SLOW_DRIVER = """
import signal, sys, time
# Ctrl-C as in a terminal: a suite started in the background (bash '&' without job control) passes its
# children SIGINT ignored, which Python then keeps ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
import pymerge.streaming as s
_orig = s._Sink.put
def slow(*a, **k):  # every chunk, on either CPU executor (torch, or torch-free for linear)
    time.sleep(0.1)  # the whole merge takes seconds: a signal sent 0.3 s into it always lands mid-stream
    return _orig(*a, **k)
s._Sink.put = slow
from pymerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def slow_fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow")
    return lf.make_family(root, n_finetunes=2, dims=SLOW_DIMS)


def _start_slow(cfg, out, *extra):
    return subprocess.Popen([sys.executable, "-c", _SLOW_DRIVER, "merge", str(cfg), str(out), "--quiet",
                             "--chunk-size", "1MiB", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_temp(proc, out: Path, timeout=120):
    """Returns once the child has started writing (its temp folder holds shard files)."""
    tmp = out.parent / f".{out.name}.pymerge-tmp-{proc.pid}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if tmp.is_dir() and any(tmp.glob("*.safetensors")):
            time.sleep(0.3)  # well into the stream
            return tmp
        if proc.poll() is not None:
            raise AssertionError(f"merge ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("merge never started writing")


# A KeyboardInterrupt delivered inside queue.Queue.put just after it took its mutex (the window CPython leaves
# between a with-statement's acquire and its block, bpo-29988), forced on the third chunk handed to the writer.
_HELD_LOCK_DRIVER = """
import queue, sys, threading
orig_put, calls = queue.Queue.put, [0]
def put(self, item, block=True, timeout=None):
    if threading.current_thread() is threading.main_thread() and isinstance(item, tuple) and len(item) == 6:
        calls[0] += 1
        if calls[0] == 3:
            self.mutex.acquire()
            raise KeyboardInterrupt
    return orig_put(self, item, block, timeout)
queue.Queue.put = put
from pymerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_interrupt_inside_a_queue_put_never_hangs_the_merge(slow_fam, tmp_path):
    """One Ctrl-C in about 100 froze `pymerge merge` for good (an audit): landing inside Queue.put after it took
    its lock, it left the lock held, and the cleanup's put(None) on that queue waited forever. The writer's
    queues take no Python lock (SimpleQueue)."""
    base, fts = slow_fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _HELD_LOCK_DRIVER, "merge", str(cfg), str(out), "--quiet",
                           "--chunk-size", "1MiB"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 130), proc.stderr[-2000:]  # (0: no Queue.put was reached at all)
    assert proc.returncode == 0 or (not out.exists() and leftovers(out) == [])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_starting_is_130_and_one_line(sig, tmp_path):
    """The SIGTERM handler came with the command (_run), after the imports and the parsing: a SIGTERM while
    starting ended the process without a word (status -15, an audit); and a Ctrl-C inside numpy's import came
    out as its ImportError (a 40-line traceback, exit 1). Both are the interrupt they were, from main's start."""
    driver = ("import signal, sys, numpy.random\n"  # numpy's import, interrupted as start-up could be
              "import pymerge.cli as cli\n"
              "real = cli._main\n"
              "def starting(argv):\n"
              "    try:\n"
              "        signal.raise_signal(signal.%s)\n"
              "    except KeyboardInterrupt:  # as numpy's C import turned it\n"
              "        raise ImportError('PyCapsule_Import could not import module \"datetime\"')\n"
              "cli._main = starting\n"
              "sys.exit(cli.main())\n") % sig.name
    proc = subprocess.run([sys.executable, "-c", driver, "merge", "c.yml", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    assert proc.returncode == 130 and proc.stderr == "pymerge: interrupted\n", (proc.returncode, proc.stderr[-2000:])


def test_an_interrupted_start_ends_the_scripts_process_with_130(tmp_path):
    """CPython 3.11 marks a KeyboardInterrupt raised inside eval() of a string (namedtuple's, while a module
    imports) as unhandled even once caught: `python -m pymerge` then killed itself with SIGINT at exit (-2, not
    130) for 3 of 120 SIGTERMs at start-up (an audit). The script's process now ends in main with 130; a library
    caller's main() returns it."""
    driver = ("import pymerge.cli as cli\n"
              "cli._main = lambda argv: eval('(_ for _ in ()).throw(KeyboardInterrupt())')\n"
              "cli.main()\n"
              "print('main returned')\n")
    proc = subprocess.run([sys.executable, "-c", driver, "merge", "c.yml", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stdout == "" and proc.stderr == "pymerge: interrupted\n", \
        (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_an_interrupt_in_a_library_callers_main_is_returned(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(["merge", "c.yml", "out"]) == 130
    assert capsys.readouterr().err == "pymerge: interrupted\n"


@pytest.mark.parametrize("limited", [False, True])
def test_an_import_error_without_an_interrupt_stays_a_traceback(monkeypatch, limited):
    """(With a memory limit set too: a module missing is not the limit's doing.)"""
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (400 << 20 if limited else resource.RLIM_INFINITY,
                                                              resource.RLIM_INFINITY))
    monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(ImportError("no module named x")))
    with pytest.raises(ImportError, match="no module named x"):
        cli.main(["merge", "c.yml", "out"])


@pytest.mark.parametrize("limit", ["RLIMIT_AS", "RLIMIT_DATA"])
def test_a_library_that_cannot_load_under_a_memory_limit_is_one_line(monkeypatch, capsys, limit):
    """`ulimit -v`: torch's libraries could not be mapped, and its ImportError was a 54-line traceback, exit 1,
    where the README promises one line for the machine's limits (an audit)."""
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (400 << 20, resource.RLIM_INFINITY)
                        if which == getattr(resource, limit) else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    failed = ImportError("libtorch_cpu.so: failed to map segment from shared object")
    monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(failed))
    assert cli.main(["merge", "c.yml", "out"]) == 2
    flag = "ulimit -v" if limit == "RLIMIT_AS" else "ulimit -d"
    assert capsys.readouterr().err == ("pymerge: error: a library did not load: libtorch_cpu.so: failed to map "
                                       f"segment from shared object (this process's memory limit, {flag}: 419.43 MB, "
                                       "may be too low)\n")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130), (signal.SIGHUP, 130),
                                       (signal.SIGXCPU, 130)])
def test_interrupt_leaves_nothing_and_keeps_old_out(slow_fam, tmp_path, sig, code):
    """SIGHUP (a closed terminal or ssh session) and SIGXCPU (a soft CPU-time limit's warning) left the temporary
    folder, a model's size, until the next merge into OUT (audits): they interrupt as SIGTERM does."""
    base, fts = slow_fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old model")
    proc = _start_slow(cfg, out, "--force")
    _wait_for_temp(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "old model" and sorted(os.listdir(out)) == ["keep.txt"]
    assert leftovers(out) == []


@pytest.mark.parametrize("step", ["_release_lock", "fsync_dir"])
def test_an_interrupt_just_after_the_swap_removes_the_replaced_model(fam, tmp_path, capsys, monkeypatch, step):
    """A Ctrl-C while the lock was released or the parent fsynced, OUT already the new model, left the whole
    replaced model (the user's extra files included) beside OUT until a merge into OUT again (an audit)."""
    import pymerge.io.writer as writer
    root, base, fts = fam
    out = tmp_path / "out"
    assert run_cli(["merge", write_cfg(tmp_path / "a.yml", linear(fts[:1])), out, "--quiet"], capsys)[0] == 0
    (out / "note.txt").write_text("old model")
    owner = writer.ShardedWriter if step == "_release_lock" else writer
    real = getattr(owner, step)

    def then_interrupted(*args):
        real(*args)
        if step == "_release_lock" or os.path.abspath(args[0]) == str(tmp_path):
            raise KeyboardInterrupt
    monkeypatch.setattr(owner, step, then_interrupted)
    rc, err = run_cli(["merge", write_cfg(tmp_path / "b.yml", linear(fts)), out, "--quiet", "--force"], capsys)
    assert rc == 130 and err == f"pymerge: interrupted after writing {out} (complete)\n", err
    assert not (out / "note.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(out) == [] and sorted(os.listdir(tmp_path)) == ["a.yml", "b.yml", "out"]


def test_sigkill_midway_then_next_run_cleans_up(slow_fam, tmp_path, capsys):
    base, fts = slow_fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    proc = _start_slow(cfg, out)
    tmp = _wait_for_temp(proc, out)
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists()          # no partial model where the user looks
    assert tmp.exists()              # only the dead process's temp folder...
    rc, err = run_cli(["merge", cfg, out, "--quiet"], capsys)
    assert rc == 0, err
    assert leftovers(out) == []      # ...which the next run removes
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("command, option", [("demo", "--quick"), ("search", "--budget"), ("bench", "--quick")])
def test_subcommands_take_their_own_options(command, option, capsys):
    """`pymerge demo --quick ...`: leading options reach the subcommand's own parser."""
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert option in capsys.readouterr().out


def test_demo_options_pass_through(monkeypatch):
    seen = {}
    import pymerge.demo as demo
    monkeypatch.setattr(demo, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["demo", "--quick", "--out", "x", "--json"]) == 0
    assert seen["argv"] == ["--quick", "--out", "x", "--json"]


def test_a_double_dash_ends_the_subcommands_options(monkeypatch, tmp_path, capsys):
    """`pymerge search -- -c.yml` said "the following arguments are required: config": every "--" was dropped
    before the subcommand's parser, which then took the config named -c.yml for an option (an audit)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["search", "--", "-c.yml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pymerge search: error: -c.yml: config file not found"], err
    assert cli.main(["search", "--budget", "2", "--", "-c.yml"]) == 2
    assert "-c.yml: config file not found" in capsys.readouterr().err
    seen = {}
    import pymerge.demo as demo
    monkeypatch.setattr(demo, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["demo", "--", "--quick"]) == 0 and seen["argv"] == ["--quick"]  # no operands: dropped
    assert cli.main(["doctor", "--"]) == 0


@pytest.mark.parametrize("cmd", [["search", "nowhere.yml"], ["bench", "--elements", str(1 << 32)], ["merge"],
                                 ["bench", "--rounds", "0"]])
def test_other_commands_errors_never_reach_stdout_with_stderr_closed(tmp_path, cmd):
    """With stderr closed (2>&-) Python sets sys.stderr to None, and print(file=None) writes to stdout:
    `pymerge search`'s and `pymerge bench`'s error lines (and `pymerge demo --json`'s progress) went there, and
    argparse's usage of any command's usage error."""
    p = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "bash", sys.executable, "-m", "pymerge", *cmd],
                       cwd=tmp_path, timeout=300, stdout=subprocess.PIPE,
                       env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert p.returncode == 2 and p.stdout == b"", p.stdout


def test_a_library_callers_missing_stderr_stays_missing(tmp_path, monkeypatch, capsys):
    """cli.main in-process with sys.stderr None (a pythonw or daemon caller) stands /dev/null in for its own lines,
    and left it there, a descriptor open for good (an audit)."""
    monkeypatch.setattr(sys, "stderr", None)
    assert cli.main(["merge", str(tmp_path / "nowhere.yml"), str(tmp_path / "out")]) == 2  # its line: the stand-in's
    assert sys.stderr is None and capsys.readouterr().out == ""


@pytest.mark.parametrize("rc", [0, 2])
def test_an_interrupt_taken_inside_a_finalizer_is_one_line_and_130(monkeypatch, capsys, rc):
    """A SIGTERM or Ctrl-C as `pymerge search` returned landed in a pool's __del__ or a weakref callback: Python
    printed "Exception ignored in ..." and a traceback, and the search ended 0 (an audit). A command that failed
    keeps its status and its own error line."""
    class Dropped:
        def __del__(self):
            cli._on_sigterm(signal.SIGTERM, None)  # the handler, run where the signal landed

    def command(args):
        Dropped()  # collected at once: its __del__ raises the interrupt there
        return rc
    monkeypatch.setattr(cli, "_dispatch", command)
    assert cli.main(["doctor"]) == (130 if rc == 0 else rc)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == (["pymerge: doctor interrupted; it ran to its end, so what it wrote is complete"] if rc == 0
                   else []), err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_after_the_last_line_never_kills_the_command(sig):
    """SIGTERM or SIGHUP as `pymerge doctor`, bench, search or demo printed its last line: the handlers were given
    back and the interpreter's teardown (~0.6 s) ran, so the signal killed the process (-15, -1), where the README
    promises 130. The script's teardown now runs under a handler that exits 130 at once."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "-m", "pymerge", "doctor"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
        for line in p.stdout:
            if line.startswith("backend auto"):
                break
        p.send_signal(sig)
        p.stdout.read()
        assert p.wait(timeout=60) in (0, 130)


def test_python_m_pymerge_run_in_process_gives_its_caller_back_ctrl_c():
    """runpy.run_module("pymerge") (IPython's %run -m): the teardown's handler stayed installed, and the caller's
    next Ctrl-C ended its process with 130 instead of raising KeyboardInterrupt there (a review)."""
    script = ("import os, runpy, signal, sys, time\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # (an xdist worker's children ignore it)
              "sys.argv = ['pymerge', '--version']\n"
              "try:\n    runpy.run_module('pymerge', run_name='__main__')\nexcept SystemExit:\n    pass\n"
              "try:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
              "except KeyboardInterrupt:\n    print('the caller goes on')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "the caller goes on", (r.returncode, r.stderr[-2000:])


_SCRIPT_ONCE = """
import sys
from pymerge import cli
def run_the_script_once():  # `pymerge --version`, as the script runs main, in this process
    sys.argv = ["pymerge", "--version"]
    try:
        cli.main()
    except SystemExit:
        pass
"""

_SECOND_MAIN = _SCRIPT_ONCE + """
import os, signal, time
run_the_script_once()
def command(args):
    print("handler", signal.getsignal(signal.SIGHUP).__name__, flush=True)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
    finally:
        print("cleanup ran", flush=True)
    return 0
cli._dispatch = command
print("rc", cli.main(["doctor"]), flush=True)
"""


def test_a_second_main_in_one_process_still_cleans_up_on_sighup():
    """The first main() of the script left SIGHUP at its after-command handler, which ends the process at once; a
    second main() in that process (an embedding, a test) took it for the caller's own and kept it, so a SIGHUP in
    its command skipped every cleanup (a review)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _SECOND_MAIN], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.splitlines()[-3:] == ["handler _on_sigterm", "cleanup ran", "rc 130"], (r.stdout, r.stderr[-2000:])


_CHILD_AT_EXIT = _SCRIPT_ONCE + """
import multiprocessing as mp, time
if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=time.sleep, args=(60,))  # not a daemon: joined at exit
    child.start()
    print(child.pid, flush=True)
    run_the_script_once()
"""


def test_a_teardown_joining_a_child_still_ends_on_sigterm(tmp_path):
    """The after-command exit handler ignored SIGTERM for the whole teardown, where multiprocessing joins children
    that are not daemons (one a search's user code left running): the process could not be stopped, and exited 0
    once the child ended (a review). It still ends with 130."""
    (tmp_path / "child_at_exit.py").write_text(_CHILD_AT_EXIT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, str(tmp_path / "child_at_exit.py")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    child = int(p.stdout.readline())
    try:
        assert p.stdout.readline().startswith("pymerge ")  # the --version line: the teardown begins
        time.sleep(1.0)  # (multiprocessing's exit handler joining the child)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 130
    finally:
        try:
            os.kill(child, signal.SIGKILL)  # first: it holds the pipes open
        except ProcessLookupError:
            pass
        p.kill()
        p.communicate()


def test_bench_refuses_elements_past_the_memory_before_allocating(monkeypatch, capsys):
    """`pymerge bench --elements 4294967296` was killed by the OOM killer (exit 137 after 30 s at 24 GB): Linux
    grants the allocations torch asks for and kills the process when it touches them, so the MemoryError the
    bench caught never came. The peak is computed and compared with what the machine has first."""
    from pymerge import bench

    def never(*a):
        raise AssertionError("allocated")
    monkeypatch.setattr(bench, "run", never)
    monkeypatch.setattr(bench, "_available", lambda device: 10**9)
    assert bench.peak_bytes(1 << 20) < 10**9 < bench.peak_bytes(1 << 24)
    assert bench.main(["--elements", str(1 << 24), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "does not fit in memory (needs 1.28 GB, 1.00 GB available on cpu)" in err


def test_an_ignored_weight_is_warned_of_once(fam, tmp_path, capsys):
    """A weight for a method that takes none is ignored (as mergekit does) with a warning: one line for the whole
    config, not one per model plus one for the global parameters (a review of the warning's first form)."""
    root, base, fts = fam
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.3, "weight": 1.0},
           "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (base, fts[0])]}
    rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", cfg), tmp_path / "out"], capsys)
    assert rc == 0, err
    lines = [x for x in err.splitlines() if "takes no weight" in x]
    assert lines == ["pymerge: warning: parameters and 2 more: merge_method slerp takes no weight; it is ignored, "
                     "as in mergekit"], err


def test_a_line_on_stderr_is_one_write(monkeypatch):
    """print() wrote a line and its newline in two writes: under torchrun (python -u, one shared stderr) two
    ranks' lines ran together, "...was writtenpymerge: ..." (an audit)."""
    from pymerge.progress import say

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return len(text)

        def flush(self):
            pass
    rec = Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    say("pymerge: error: one line")
    assert rec.writes == ["pymerge: error: one line\n"]


def test_a_merge_into_the_working_folder_says_out_is_a_new_folder(fam, tmp_path, capsys, monkeypatch):
    """`cd out && pymerge merge ../c.yml .` left the shell in the replaced folder, deleted, where `ls` showed
    nothing, exit 0 and not a word (an audit). The model is there, and the merge says to cd into it again."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    rc, err = run_cli(["merge", cfg, ".", "--quiet"], capsys)
    assert rc == 0 and f"{out} is a new folder holding the model" in err and f"`cd {out}` there" in err, err
    assert (out / "config.json").exists()
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(["merge", cfg, tmp_path / "out2", "--quiet"], capsys)
    assert rc == 0 and "new folder" not in err, err


# ---- messages a terminal shows as they are ------------------------------------------------------
def test_one_line_escapes_what_a_terminal_would_act_on():
    from pymerge.errors import MAX_ERROR_CHARS, one_line
    assert one_line("a\n  b\tc\r\nd\u2028e") == "a b c d e"  # a library's line breaks: one space
    assert one_line("x\x1b[2Jy\x9b1mz\x07") == "x\\x1b[2Jy\\x9b1mz\\x07"  # ESC, CSI (C1), BEL: shown, not run
    assert one_line("ab\u202ecba\u2066") == "ab\\u202ecba\\u2066"  # bidi overrides would reorder what is shown
    assert one_line("caf\u00e9 \u6a21\u578b \U0001f600") == "caf\u00e9 \u6a21\u578b \U0001f600"  # text stays text
    long = one_line("x/" * 2000 + ": File name too long")
    assert len(long) <= MAX_ERROR_CHARS and long.endswith(": File name too long")


def test_usage_search_and_system_errors_are_one_line_with_controls_escaped(fam, tmp_path, capsys):
    """An argument, a config name or a path holding a line break or an escape sequence was echoed raw: usage errors,
    `pymerge search` errors and system errors spanned two lines, and ESC reached the terminal (an audit)."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear([base, fts[0]]))
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge", str(cfg), str(tmp_path / "o"), "--bo\ngus\x1b[2J"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "--bo gus\\x1b[2J" in err, err
    rc, err = run_cli(["search", tmp_path / "bad\ncfg\x1b[31m.yml"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "\x1b" not in err and "cfg\\x1b[31m.yml" in err, err
    afile = tmp_path / "afile\x1b[31m"
    afile.write_text("mine")
    assert_rejected(run_cli(["merge", cfg, afile / "out"], capsys), ["afile\\x1b[31m", "is a file"], afile / "out")
    long = tmp_path / ("q\n" + "n" * 300) / "out"
    rc, err = run_cli(["merge", cfg, long], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.rstrip().endswith("File name too long"), err
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile\x1b[31m", "c.yml"]


def test_main_in_a_thread_leaves_the_process_unraisablehook_alone(monkeypatch):
    """cli.main() saved sys.unraisablehook, installed its own and put the saved one back: called from a pipeline's
    worker threads it left its wrapper installed after overlapping calls, and dropped a hook the application set
    meanwhile (an audit). The hook (for signals, the main thread's) is now installed by a main-thread call only,
    and put back only where it is still pymerge's."""
    import threading
    started, release = threading.Event(), threading.Event()

    def waiting(argv):
        started.set()
        release.wait(60)
        return 0
    monkeypatch.setattr(cli, "_main", waiting)
    original = sys.unraisablehook

    def mine(unraisable):
        pass
    try:
        worker = threading.Thread(target=cli.main, args=(["doctor"],))
        worker.start()
        assert started.wait(60)
        assert sys.unraisablehook is original  # nothing installed by the worker's call
        sys.unraisablehook = mine
        release.set()
        worker.join(60)
        assert sys.unraisablehook is mine
        sys.unraisablehook = original

        def replacing(argv):  # the application (another thread) sets its hook while a main-thread call runs
            assert sys.unraisablehook is not original  # the call's own is installed
            sys.unraisablehook = mine
            return 0
        monkeypatch.setattr(cli, "_main", replacing)
        assert cli.main(["doctor"]) == 0
        assert sys.unraisablehook is mine
    finally:
        sys.unraisablehook = original


@pytest.mark.parametrize("case", ["a file appears in the donor", "an uncopied tokenizer is edited",
                                  "a config appears beside a single file", "a tokenizer file appears after the copy"])
def test_a_file_the_merge_never_read_may_change_meanwhile(fam, tmp_path, capsys, monkeypatch, case):
    """Every tokenizer file name of the donor and every model's config.json were compared at the end, read or not:
    a download adding a file to a hub snapshot, an edit of a tokenizer --no-copy-tokenizer left alone, a
    config.json appearing beside a single-file model whose config no merge reads, refused merges whose output was
    whole (an audit). What was read is compared; these merge."""
    import pymerge.merge
    root, base, fts = fam
    x = _copy(fts[0], tmp_path / "X")
    (x / "generation_config.json").unlink()
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(fts[1] / "model.safetensors", single / "m.safetensors")
    real = pymerge.merge.write_side_files

    def change_then_write(*args, **kwargs):  # between the shards' open and the end
        if case == "a file appears in the donor":
            (x / "generation_config.json").write_text("{}")
        elif case == "an uncopied tokenizer is edited":
            (x / "tokenizer.json").write_text('{"version": "2.0"}')
        elif case == "a config appears beside a single file":
            (single / "config.json").write_text("{}")
        result = real(*args, **kwargs)
        if case == "a tokenizer file appears after the copy":
            (x / "generation_config.json").write_text("{}")
        return result
    monkeypatch.setattr(pymerge.merge, "write_side_files", change_then_write)
    out = tmp_path / "out"
    uncopied = ("a file appears in the donor", "an uncopied tokenizer is edited")
    flags = ["--no-copy-tokenizer"] if case in uncopied else []
    rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([x, single / "m.safetensors"])), out, "--quiet",
                       *flags], capsys)
    assert rc == 0, err
    assert ("tokenizer.json" in os.listdir(out)) != bool(flags) and "generation_config.json" not in os.listdir(out)


def test_a_signal_an_earlier_main_thread_call_took_is_no_workers(monkeypatch, capsys):
    """A main-thread main() interrupted by SIGTERM leaves the signal recorded; main() in a worker thread (which no
    longer clears that record, being no signal's) then ended its successful doctor "interrupted", 130 (a review)."""
    import threading
    monkeypatch.setattr(cli, "_SIGNALLED", [signal.SIGTERM])
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("rc", cli.main(["doctor"])))
    worker.start()
    worker.join(120)
    assert out["rc"] == 0 and "interrupted" not in capsys.readouterr().err


def test_a_base_model_named_by_its_file_is_its_models_entry(fam, tmp_path, capsys):
    """docs/mergekit-compat.md: a base_model spelled otherwise than its models: entry is that entry, the files read
    compared (x/model.safetensors is x). Named by its file, it was refused as "the same model; list it once" (an
    audit); it now merges as the folder's spelling does."""
    root, base, fts = fam
    outs = []
    for spelling in (f"{base}/", f"{base}/model.safetensors"):
        cfg = {"merge_method": "task_arithmetic", "base_model": spelling, "models": [
            {"model": str(base), "parameters": {"weight": 1.0}}, {"model": str(fts[0]), "parameters": {"weight": 0.5}}]}
        outs.append(tmp_path / f"out{len(outs)}")
        rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", cfg), outs[-1], "--quiet"], capsys)
        assert rc == 0, err
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_a_warning_naming_a_path_with_controls_is_escaped(fam, tmp_path, capsys):
    """Errors escaped the controls a path holds, warnings did not: a donor folder named with ESC and no config.json
    put a raw escape sequence on the terminal (a review)."""
    root, base, fts = fam
    donor = tmp_path / "m\x1b[2Jx"
    donor.mkdir()
    shutil.copy(fts[0] / "model.safetensors", donor)
    rc, err = run_cli(["merge", write_cfg(tmp_path / "c.yml", linear([donor, fts[1]])), tmp_path / "out"], capsys)
    assert rc == 0 and "\x1b" not in err and "m\\x1b[2Jx: no config.json" in err, err


def test_a_ctrl_c_as_main_installs_its_handlers_leaves_the_callers(monkeypatch, ctrl_c, capsys):
    """main() stored each handler it replaced from signal.signal's return: a Ctrl-C as that call returned skipped
    the store, and main's own handler stayed installed after it returned (a caller's later SIGTERM raised
    KeyboardInterrupt instead of ending the process; an audit). Each is recorded before it is replaced."""
    from pymerge import cli
    real_signal = signal.signal
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def then_ctrl_c(sig, handler):
        old = real_signal(sig, handler)
        if sig == signal.SIGTERM and handler is cli._on_sigterm:
            ctrl_c()
            time.sleep(0.01)  # (delivered here, before main could store what it replaced)
        return old

    monkeypatch.setattr(signal, "signal", then_ctrl_c)
    assert cli.main(["doctor"]) == 130
    monkeypatch.undo()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert "interrupted" in capsys.readouterr().err


_SIGTERM_IN_TORCH_IMPORT = """
import os, runpy, signal, sys, types
signal.signal(signal.SIGINT, signal.default_int_handler)  # (an xdist worker's children ignore it)
assert "torch" not in sys.modules
inside, sent = [], []
def prof(frame, event, arg):  # SIGTERM as torch's C++ start-up (torch._C._c10d_init) runs Python code
    if event == "c_call" and type(arg) is types.BuiltinFunctionType and arg.__name__ == "_c10d_init":
        inside.append(1)
    elif event == "call" and inside:
        sys.setprofile(None)
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # twice: a second one acting at once aborted too (a review)
sys.setprofile(prof)
sys.argv = ["pymerge", "merge", sys.argv[1], sys.argv[2]]
try:
    runpy.run_module("pymerge", run_name="__main__")
finally:
    print("sent" if sent else "not sent", flush=True)
"""


def test_a_sigterm_while_the_merge_imports_torch_exits_130_and_leaves_nothing(fam, tmp_path):
    """A SIGTERM (or Ctrl-C) landing while torch's C++ start-up ran Python code, which the merge reaches lazily
    after its temporary folder exists, went through C++: std::terminate, exit -6, the folder left beside OUT (an
    audit). torch is imported with the signals held: exit 130, nothing left."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    env = {**os.environ, "PYMERGE_FORCE_TORCH": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", _SIGTERM_IN_TORCH_IMPORT, str(cfg), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if "not sent" in p.stdout:
        pytest.skip("this torch's import calls no _c10d_init: the moment cannot be reached")
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    assert "interrupted" in p.stderr and sorted(os.listdir(tmp_path)) == ["c.yml"]
