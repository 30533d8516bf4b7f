"""Distributed `pymerge merge` (pymerge/dist/disk_merge.py): torchrun and a bare launcher (RANK,
WORLD_SIZE, MASTER_ADDR/PORT), gloo on this CPU. Equal to one process bit for bit; any failure on
any rank (bad input only it sees, a killed rank) fails every rank, leaves no OUT (an existing OUT
stays) and no temporary folder after the next run, unless every part was on disk already (OUT is then
installed, and rank 0 says so); nothing hangs (every wait has a timeout)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_factory as lf
from io_helpers import bits
from pymerge.dist.disk_merge import split_by_bytes
from pymerge.errors import InputError
from pymerge.io.writer import ShardedWriter
from pymerge.merge import run_merge
from test_cli import leftovers, write_cfg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LIMIT_S = 180  # per launch; a hang fails the test instead of the CI job


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base, fts = lf.make_family(root, n_finetunes=2, shards=2)
    return root, base, fts


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "PYMERGE_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", **extra})
    return env


def torchrun(ranks, argv, **env):
    """`torchrun --standalone -m pymerge ...` (or the fault-injecting worker with PYMERGE_TEST_FAULT)."""
    target = [str(WORKER)] if "PYMERGE_TEST_FAULT" in env else ["-m", "pymerge"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           f"--log-dir={os.devnull}", *target]  # no torchelastic_* folder left in the temp folder per launch
    return subprocess.Popen(cmd + [str(a) for a in argv], env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    """A port nothing listens on (for a moment: the OS gives it out again only after others)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks, argv, rank_env=None, **env):
    """Every rank started by hand, as a launcher other than torchrun would: one Popen per rank
    (argv, or argv(rank) for a command line of each rank's own; rank_env(rank): variables of its own)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), *map(str, argv(r) if callable(argv) else argv)], stderr=subprocess.PIPE, text=True,
                             env=_env(RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), **{**env, **(rank_env(r) if rank_env else {})}))
            for r in range(ranks)]


def finish(procs):
    """(exit codes, stderr lines that are pymerge's) of every process."""
    results = [p.communicate(timeout=LIMIT_S) for p in procs]
    return [p.returncode for p in procs], [[l for l in err.splitlines() if l.startswith("pymerge:")]
                                           for _, err in results]


def single(cfg, out, **kw):
    run_merge(cfg, out, device="cpu", quiet=True, **kw)
    return lf.load_folder(out)


def assert_same_tensors(a: Path, expected: dict):
    got = lf.load_folder(a)
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and bits(got[name]) == bits(t), name


def ties(base, fts):
    return {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": {"weight": w, "density": d}}
                       for m, w, d in zip(fts, (0.6, 0.4), (0.5, 0.3))], "parameters": {"normalize": True}}


def linear(fts):
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": w}}
                                                 for m, w in zip(fts, (0.3, 0.7))]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGXCPU])
def test_sigterm_keeps_its_default_action_while_a_rank_joins(monkeypatch, sig):
    """The rendezvous blocks in C++, where the CLI's Python SIGTERM handler never runs: torchrun's SIGTERM (a
    peer died while the others joined) was ignored until its SIGKILL 30 s later (an audit), and a SIGHUP, once
    the CLI took it too, for the whole timeout (a review). While a rank joins, both have their default action;
    the handler is back afterwards, whether the join failed or not."""
    import torch.distributed as dist
    from pymerge.dist import disk_merge
    from pymerge.errors import DistributedError
    seen = []

    def join(*args, **kwargs):
        seen.append(signal.getsignal(sig))
        raise RuntimeError("no peers")
    monkeypatch.setattr(dist, "init_process_group", join)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)
    from pymerge import cli
    user = lambda signum, frame: None  # noqa: E731
    previous = signal.getsignal(sig)
    try:
        for handler, during in ((cli._on_sigterm, signal.SIG_DFL), (user, user), (signal.SIG_IGN, signal.SIG_IGN)):
            signal.signal(sig, handler)
            seen.clear()
            with pytest.raises(DistributedError, match="cannot join the process group"):
                disk_merge._process_group("cpu", 1.0)
            # the CLI's handler only: a library caller's own (or SIG_IGN) is theirs to keep (a review)
            assert seen == [during] and signal.getsignal(sig) == handler, handler
    finally:
        signal.signal(sig, previous)


def test_split_by_bytes_is_contiguous_and_balanced():
    for costs, ranks in [([5] * 10, 2), ([1, 100, 1, 1, 1], 3), ([7] * 3, 5), ([0, 0], 2), ([], 4),
                         ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], 3)]:
        parts = split_by_bytes(costs, ranks)
        assert len(parts) == len(costs) and parts == sorted(parts) and all(0 <= p < ranks for p in parts)
        if costs and sum(costs):
            share = [sum(c for c, p in zip(costs, parts) if p == r) for r in range(ranks)]
            assert max(share) <= sum(costs) / ranks + max(costs)  # off by at most one item
    assert split_by_bytes([5] * 10, 2) == [0] * 5 + [1] * 5


def test_a_torch_distributed_being_imported_is_no_process_group(fam, tmp_path, monkeypatch):
    """Another thread importing torch leaves a half-initialized torch.distributed in sys.modules, without
    is_initialized yet: run_merge raised AttributeError instead of merging in this process."""
    import types

    from pymerge.dist import disk_merge
    for k in ("RANK", "WORLD_SIZE", disk_merge.OFF_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    assert disk_merge.launched() is False
    root, base, fts = fam
    run_merge(linear(fts), tmp_path / "out", device="cpu", quiet=True)
    assert (tmp_path / "out" / "config.json").is_file()


def test_writer_parts_share_one_folder(tmp_path):
    """The writer's side of it: parts never share a shard; part 0 installs what all parts wrote."""
    entries = [(f"t{i}", "float32", (i + 1, 3)) for i in range(7)]
    data = {n: torch.randn(s) for n, _, s in entries}
    parts = [0, 0, 1, 1, 1, 2, 2]
    out = tmp_path / "out"
    lead = ShardedWriter(out, entries, max_shard_bytes=40, parts=parts, part=0)
    others = [ShardedWriter(out, entries, max_shard_bytes=40, parts=parts, part=p, join=lead.tmp_dir) for p in (1, 2)]
    for w, p in zip([lead] + others, (0, 1, 2)):
        for (n, _, _), q in zip(entries, parts):
            if q == p:
                w.write(n, data[n])
            else:
                with pytest.raises(ValueError, match="another part"):
                    w.write(n, data[n])
    for w in others:
        w.commit()
    lead.commit()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    owners = {}
    for (n, _, _), p in zip(entries, parts):
        owners.setdefault(idx["weight_map"][n], set()).add(p)
    assert all(len(ps) == 1 for ps in owners.values()) and len(owners) >= 3
    got = lf.load_folder(out)
    assert all(torch.equal(got[n], data[n]) for n in data) and leftovers(out) == []
    with pytest.raises(Exception, match="cannot join"):
        ShardedWriter(tmp_path / "x", entries, parts=parts, part=1, join=tmp_path / "nowhere")


def test_a_part_that_wrote_into_another_folder_is_not_installed(tmp_path, monkeypatch):
    """A rank that joined a folder of the same name that rank 0 cannot see (a node-local disk holding a killed
    run's folder of the same pid) wrote its shards there, and rank 0 installed an index naming shards OUT lacks,
    exit 0 on every rank (an audit). Part 0 checks the other parts' shards (size and header) before installing."""
    import pymerge.io.writer as writer_mod
    monkeypatch.setattr(writer_mod, "PARTS_VISIBLE_S", 0.0)
    entries = [(f"t{i}", "float32", (i + 1, 3)) for i in range(4)]
    parts = [0, 0, 1, 1]
    out, elsewhere = tmp_path / "out", tmp_path / "node-local"
    elsewhere.mkdir()
    for how in ("missing", "another plan"):
        lead = ShardedWriter(out, entries, max_shard_bytes=40, parts=parts, part=0)
        other = ShardedWriter(out, entries if how == "missing" else entries[:3] + [("t3", "float32", (5, 3))],
                              max_shard_bytes=40, parts=parts, part=1,
                              join=elsewhere if how == "missing" else lead.tmp_dir)
        for (n, _, shape), p in zip(entries, parts):
            (lead if p == 0 else other).write(n, torch.ones(shape if n != "t3" or how == "missing" else (5, 3)))
        other.commit()
        want = ("is missing in the temporary folder.*another folder of the same name" if how == "missing" else
                "is not the one planned .another size or header. in the temporary folder.*planned another model")
        with pytest.raises(InputError, match=f"out: shard model-0000.-of-0000..safetensors of part 1 {want}.*"
                           "nothing installed"):
            lead.commit()
        assert not out.exists() and leftovers(out) == []
        for f in elsewhere.iterdir():
            f.unlink()


def test_torchrun_linear_equals_one_process(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    expected = single(cfg, tmp_path / "one")
    out = tmp_path / "out"
    p = torchrun(2, ["merge", cfg, out, "--out-shard-size", "30KB"])
    _, err = p.communicate(timeout=LIMIT_S)
    assert p.returncode == 0, err[-2000:]
    assert_same_tensors(out, expected)
    assert "x 2 ranks" in err and err.count("pymerge: merged") == 1  # rank 0 speaks for all
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and leftovers(out) == []


def test_three_ranks_ties_equals_one_process(fam, tmp_path):
    """A bare launcher (RANK, WORLD_SIZE, MASTER_*), 3 ranks: uneven parts of a whole-tensor method."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", ties(base, fts))
    expected = single(cfg, tmp_path / "one")
    out = tmp_path / "out"
    codes, lines = finish(launch(3, ["merge", cfg, out, "--out-shard-size", "20KB"]))
    assert codes == [0, 0, 0], lines
    assert_same_tensors(out, expected)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(expected)


def test_one_file_asked_of_two_ranks_is_a_warning(fam, tmp_path):
    """--out-shard-size 0 (one file, as mergekit) was ignored silently under a launcher: each rank writes shards
    of its own (an audit). Rank 0 now says so; the tensors are the one-process merge's."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", ties(base, fts))
    expected = single(cfg, tmp_path / "one", out_shard_size=0)
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", cfg, out, "--out-shard-size", "0", "--quiet"]))
    assert codes == [0, 0], lines
    assert_same_tensors(out, expected)
    shards = len(list(out.glob("model-*.safetensors")))
    assert shards >= 2 and lines[1] == [] and lines[0] == [
        f"pymerge: warning: one unsplit file (--out-shard-size 0) cannot hold under 2 ranks, each writing shards of "
        f"its own: OUT has {shards}; merge in one process for a single model.safetensors"], lines


def test_buffers_across_ranks_equal_one_process(fam, tmp_path):
    """A tensor that is not floating point (copied as the models hold it) is written by rank 0's part."""
    from safetensors.torch import save_file
    root, base, fts = fam
    models = []
    for i, f in enumerate(fts):
        d = Path(shutil.copytree(f, tmp_path / f"m{i}"))
        t = lf.load_folder(d)
        t["model.position_ids"] = torch.arange(8).view(1, 8)
        for old in d.glob("*.safetensors*"):  # the shards and their index
            old.unlink()
        save_file(t, str(d / "model.safetensors"))
        models.append(d)
    cfg = write_cfg(tmp_path / "c.yml", linear(models))
    expected = single(cfg, tmp_path / "one")
    assert expected["model.position_ids"].dtype == torch.int64
    out = tmp_path / "out"
    p = torchrun(2, ["merge", cfg, out, "--out-shard-size", "30KB"])
    _, err = p.communicate(timeout=LIMIT_S)
    assert p.returncode == 0, err[-2000:]
    assert_same_tensors(out, expected)


def _same_error_everywhere(codes, lines, code, words):
    assert codes == [code] * len(codes), (codes, lines)
    assert all(len(ls) == 1 for ls in lines) and len({ls[0] for ls in lines}) == 1, lines
    assert lines[0][0].startswith("pymerge: error: ") and all(w in lines[0][0] for w in words), lines


def test_corrupt_checkpoint_fails_every_rank(fam, tmp_path):
    root, base, fts = fam
    bad = tmp_path / "bad"
    shutil.copytree(fts[1], bad)
    shard = bad / "model-00002-of-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:24] = b"\x00garbage{{{{{{{{"
    shard.write_bytes(bytes(raw))
    cfg = write_cfg(tmp_path / "c.yml", linear([fts[0], bad]))
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", cfg, out]))
    _same_error_everywhere(codes, lines, 2, [str(shard), "header"])
    assert not out.exists() and leftovers(out) == []


def test_bad_bytes_seen_by_one_rank_fail_every_rank_and_keep_out(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", ties(base, fts))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    codes, lines = finish(launch(2, ["merge", cfg, out, "--force"], PYMERGE_TEST_FAULT="1:bad_read"))
    _same_error_everywhere(codes, lines, 2, ["cannot read its bytes", str(fts[0])])
    assert sorted(os.listdir(out)) == ["keep.txt"] and leftovers(out) == []


def test_a_model_replaced_while_it_is_merged_fails_every_rank(fam, tmp_path):
    """Another merge installing a model over an input (--force) while the ranks merge it: rank 0 had copied
    the side files of one version, the tensors came from whichever version each rank opened. Every rank
    checks its models once its part is streamed: the same one line everywhere, nothing installed."""
    root, base, fts = fam
    x = tmp_path / "X"
    shutil.copytree(fts[0], x)
    shutil.copytree(fts[1], tmp_path / "X.new")
    cfg = write_cfg(tmp_path / "c.yml", linear([x, fts[1]]))
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", cfg, out], PYMERGE_TEST_FAULT="0:replace_model",
                                 PYMERGE_TEST_MODEL=str(x)))
    _same_error_everywhere(codes, lines, 2, [f"{x} was replaced while it was being merged", "run the merge again"])
    assert not out.exists() and leftovers(out) == []


def _wait_for(mark: Path, procs) -> int:
    deadline = time.monotonic() + LIMIT_S
    while not mark.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the rank never started"
        time.sleep(0.05)
    time.sleep(0.1)
    return int(mark.read_text())


def test_killed_rank_fails_the_others_promptly(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out, mark = tmp_path / "out", tmp_path / "mark"
    procs = launch(2, ["merge", cfg, out], PYMERGE_TEST_FAULT="1:stall", PYMERGE_TEST_MARK=str(mark))
    _wait_for(mark, procs)
    t = time.monotonic()
    procs[1].send_signal(signal.SIGKILL)
    codes, lines = finish(procs)
    assert time.monotonic() - t < 30  # the dead rank's closed connection, not the 60 s timeout
    assert codes == [1, -signal.SIGKILL] and len(lines[0]) == 1 and "lost the other ranks" in lines[0][0], lines
    assert not out.exists() and leftovers(out) == []


def test_killed_leader_under_torchrun_leaves_nothing_after_the_next_run(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out, mark = tmp_path / "out", tmp_path / "mark"
    p = torchrun(2, ["merge", cfg, out], PYMERGE_TEST_FAULT="0:stall", PYMERGE_TEST_MARK=str(mark))
    os.kill(_wait_for(mark, [p]), signal.SIGKILL)  # rank 0, which made the temporary folder
    p.communicate(timeout=LIMIT_S)
    assert p.returncode != 0 and not out.exists()
    assert len(leftovers(out)) == 1  # what a SIGKILL leaves: the dead rank 0's folder...
    assert_same_tensors(out, single(cfg, out))  # ...which the next run clears
    assert leftovers(out) == []


def test_rank_lost_after_every_part_is_written_leaves_out_installed_and_says_so(fam, tmp_path):
    """Rank 0 installed a complete OUT, then said "nothing was written" and exited 1 (a retry then failed on
    the non-empty OUT): a rank lost after every part is on disk is now a warning on rank 0, exit 0; a rank
    that saw the loss cannot know whether rank 0 installed, and says so (a bug hunt)."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", ties(base, fts))
    expected = single(cfg, tmp_path / "one")
    out = tmp_path / "out"
    codes, lines = finish(launch(3, ["merge", cfg, out, "--quiet"], PYMERGE_TEST_FAULT="2:die_at_install"))
    assert codes == [0, 1, 9], (codes, lines)
    assert len(lines[0]) == 1 and lines[0][0].startswith("pymerge: warning: rank 0 lost the other ranks"), lines
    assert lines[0][0].endswith(f"after every rank's part was written: {out} is installed and complete"), lines
    assert len(lines[1]) == 1 and lines[1][0].startswith("pymerge: error: rank 1 lost the other ranks"), lines
    assert lines[1][0].endswith("every part was written, so rank 0 may have installed OUT (complete): check it "
                                "before a retry"), lines
    assert_same_tensors(out, expected)
    assert leftovers(out) == []


def test_a_rank_interrupted_while_rank_0_installs_does_not_say_nothing_was_written(fam, tmp_path):
    """torchrun's SIGTERM reaching rank 1 while rank 0 installed OUT: rank 1 said "interrupted; no output was
    written" while OUT was installed and complete (an audit; users deleted good models on such a line)."""
    root, base, fts = fam
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", write_cfg(tmp_path / "c.yml", linear(fts)), out, "--quiet"],
                                 PYMERGE_TEST_FAULT="1:interrupt_at_install"))
    assert codes[1] == 130, (codes, lines)
    assert lines[1] == [f"pymerge: interrupted after every part was written, so rank 0 may have installed {out} "
                        "(complete): check it before a retry"], lines
    assert leftovers(out) == []


def test_ranks_that_plan_different_merges_all_fail(fam, tmp_path):
    """E.g. nodes that hold different copies of a checkpoint: refused before anything is written."""
    root, base, fts = fam
    cfgs = [write_cfg(tmp_path / "a.yml", linear(fts)), write_cfg(tmp_path / "b.yml", linear(fts[::-1]))]
    out = tmp_path / "out"
    codes, lines = finish(launch(2, lambda r: ["merge", cfgs[r], out]))
    _same_error_everywhere(codes, lines, 2, ["rank 1 plans a different merge than rank 0"])
    assert not out.exists() and leftovers(out) == []
    # the same config but another shard size (each rank names its shard files from it) or seed (DARE's masks)
    for flag, values in (("--out-shard-size", ("100KB", "200KB")), ("--random-seed", ("1", "2"))):
        codes, lines = finish(launch(2, lambda r: ["merge", cfgs[0], out, flag, values[r]]))
        _same_error_everywhere(codes, lines, 2, ["rank 1 plans a different merge than rank 0"])
        assert not out.exists() and leftovers(out) == []
    # what rank 0 alone writes: a `chat_template:` on one rank only, or a side-file flag (rank 0's won, exit 0)
    templated = write_cfg(tmp_path / "t.yml", {**linear(fts), "chat_template": "chatml"})
    for argv in (lambda r: ["merge", [cfgs[0], templated][r], out],
                 lambda r: ["merge", cfgs[0], out] + (["--no-copy-tokenizer"] if r else [])):
        codes, lines = finish(launch(2, argv))
        _same_error_everywhere(codes, lines, 2, ["rank 1 plans a different merge than rank 0"])
        assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("changed", ["every value", "the last row only"])
def test_a_rank_reading_other_values_at_the_same_path_fails_every_rank(fam, tmp_path, changed):
    """Another file at the same path on one node (a stale copy): the same names, dtypes and shapes, so the same
    plan; that rank merged its share from its own file, exit 0 (an audit). Each checkpoint's sample of values
    is now part of what the ranks agree on: 64 bytes at the start, the middle and the end of each sampled tensor
    (the first 64 alone missed a copy that differed in its last rows, as an embedding's added tokens: an audit)."""
    root, base, fts = fam
    shutil.rmtree(str(fts[1]) + ".other", ignore_errors=True)  # the other parameter's (fam is the module's)
    other = shutil.copytree(fts[1], str(fts[1]) + ".other")
    shard = sorted(Path(other).glob("model-*.safetensors"))[-1]  # a shard the values sample reads a tensor of
    tensors = load_file(str(shard))
    if changed == "every value":
        tensors = {k: v + 1 for k, v in tensors.items()}
    else:
        tensors = {k: v.clone() for k, v in tensors.items()}
        for v in tensors.values():
            v.view(-1)[-(v.shape[-1] if v.dim() > 1 else 1):] += 1
            assert v.dim() < 2 or v.numel() * v.element_size() > 64 + v.shape[-1] * v.element_size()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", write_cfg(tmp_path / "c.yml", linear(fts)), out],
                                 PYMERGE_TEST_FAULT="1:other_values", PYMERGE_TEST_MODEL=str(fts[1])))
    _same_error_everywhere(codes, lines, 2, ["rank 1 plans a different merge than rank 0"])
    assert not out.exists() and leftovers(out) == []


def test_ranks_whose_configs_differ_in_compute_dtype_or_adapter_all_fail(tmp_path):
    """Configs differing only in `dtype:` (float16 models, float32 out: no cast recorded, one rank rounding its
    results to float16), naming one model with two LoRA adapters, or slices reading another layer under the
    same output names: each rank wrote its share of its own merge, exit 0 (bug hunts). Refused before
    anything is written."""
    dims = lf.LlamaDims(layers=2)
    models = [lf.make_llama(tmp_path / name, dims=dims, dtype=torch.float16, seed=0, perturb_seed=ord(name))
              for name in "ab"]
    halves = {**linear(models), "out_dtype": "float32"}
    adapters = [_adapter(tmp_path / f"lora{i}", dims, seed=i) for i in range(2)]
    with_adapter = lambda i: {"merge_method": "linear", "models": [  # noqa: E731
        {"model": f"{models[0]}+{adapters[i]}", "parameters": {"weight": 0.5}},
        {"model": str(models[1]), "parameters": {"weight": 0.5}}]}
    sliced = lambda i: {"merge_method": "passthrough", "slices": [  # noqa: E731  (another layer, same names)
        {"sources": [{"model": str(models[0]), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(models[1]), "layer_range": [i, i + 1]}]}]}
    out = tmp_path / "out"
    for name, pair in (("dtype", [{**halves, "dtype": "float32"}, halves]), ("adapter", [with_adapter(0), with_adapter(1)]),
                       ("slices", [sliced(0), sliced(1)])):
        cfgs = [write_cfg(tmp_path / f"{name}{r}.yml", c) for r, c in enumerate(pair)]
        one = [single(c, tmp_path / f"one_{name}{r}") for r, c in enumerate(cfgs)]
        assert any(bits(one[0][k]) != bits(one[1][k]) for k in one[0]), name  # two different merges
        codes, lines = finish(launch(2, lambda r: ["merge", cfgs[r], out, "--out-shard-size", "20KB"]))
        _same_error_everywhere(codes, lines, 2, ["rank 1 plans a different merge than rank 0"])
        assert not out.exists() and leftovers(out) == []


def _adapter(folder: Path, dims, seed: int) -> Path:
    """A PEFT LoRA adapter (r 4) on every layer's q_proj and o_proj."""
    from safetensors.torch import save_file
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj", "o_proj"]}))
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(dims.layers):
        for m in ("q_proj", "o_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}."
            t[p + "lora_A.weight"] = torch.randn(4, dims.hidden, generator=g) * 0.1
            t[p + "lora_B.weight"] = torch.randn(dims.hidden, 4, generator=g) * 0.1
    save_file(t, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_rank_refusing_its_arguments_fails_every_rank_at_once(fam, tmp_path):
    """A rank refused an argument (--threads 0) or PYMERGE_DIST_TIMEOUT before joining the process group, so
    the others waited in the rendezvous for the whole timeout, then said only that a rank had not joined (a
    bug hunt): every rank now joins, then fails with the refusing rank's one line."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    for argv, rank_env, words in (
            (lambda r: ["merge", cfg, out] + (["--threads", "0"] if r else []), None, ["--threads"]),
            (["merge", cfg, out], lambda r: {"PYMERGE_DIST_TIMEOUT": "abc"} if r else {}, ["PYMERGE_DIST_TIMEOUT"])):
        t0 = time.monotonic()
        codes, lines = finish(launch(2, argv, rank_env))
        _same_error_everywhere(codes, lines, 2, words)
        assert time.monotonic() - t0 < 50  # not the 60 s timeout the ranks were given
        assert not out.exists() and leftovers(out) == []


def test_a_rank_whose_command_line_is_refused_fails_every_rank_at_once(fam, tmp_path):
    """argparse refused one rank's options (another node's command line, a typo) before it could join: the
    others waited out the whole timeout. It joins now and fails the first agreement with its usage error."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    t0 = time.monotonic()
    procs = launch(2, lambda r: ["merge", cfg, out] + (["--threads", "abc"] if r else []))
    codes, lines = finish(procs)
    assert codes == [2, 2] and time.monotonic() - t0 < 50, (codes, lines)
    assert lines[0] == ["pymerge: error: rank 1 refused its command line: argument --threads: invalid int value: "
                        "'abc'"], lines
    assert not out.exists() and leftovers(out) == []
    codes, lines = finish(launch(2, lambda r: ["merge", cfg, out] + (["--no-safe-serialization"] if r else [])))
    assert codes == [2, 2] and lines[0][0].startswith("pymerge: error: rank 1 refused its command line: "), lines
    assert all(len(ls) == 1 and "--no-safe-serialization is not supported" in ls[0] for ls in lines), lines
    assert not out.exists() and leftovers(out) == []


def test_ranks_whose_tokenizers_differ_all_fail(tmp_path):
    """Configs differing only in the tokenizer source (two models ordering two tokens the other way): rank 0
    wrote lm_head in one token order and rank 1 embed_tokens in the other, exit 0 (a bug hunt)."""
    dims = lf.LlamaDims(vocab=1024, layers=1)  # the vocabulary tensors dominate: one per rank
    models = [lf.make_llama(tmp_path / name, dims=dims, seed=0, perturb_seed=ord(name)) for name in "ab"]
    tok = json.loads((models[1] / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[3:5]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (models[1] / "tokenizer.json").write_text(json.dumps(tok))
    cfgs = [write_cfg(tmp_path / f"{i}.yml", {**linear(models), "tokenizer": {"source": str(m)}})
            for i, m in enumerate(models)]
    out = tmp_path / "out"
    codes, lines = finish(launch(2, lambda r: ["merge", cfgs[r], out]))
    _same_error_everywhere(codes, lines, 2, ["rank 1 plans a different merge than rank 0"])
    assert not out.exists() and leftovers(out) == []


def test_a_failing_rank_stops_the_others_streaming(fam, tmp_path):
    """A rank failing on its first tensor: the others streamed their whole shares before the agreement said so (an
    audit; minutes on a large model). They now stop at their next chunk: rank 0 here never ends its share by itself
    (it would fail "never stopped" after 120 s), and every rank gives rank 1's error."""
    root, base, fts = fam
    out = tmp_path / "out"
    faults = {0: "0:endless", 1: "1:bad_read"}
    t0 = time.monotonic()
    codes, lines = finish(launch(2, ["merge", write_cfg(tmp_path / "c.yml", linear(fts)), out, "--quiet"],
                                 rank_env=lambda r: {"PYMERGE_TEST_FAULT": faults[r]}))
    assert codes == [2, 2], (codes, lines)
    assert all(len(ls) == 1 and "cannot read its bytes: Input/output error" in ls[0] for ls in lines), lines
    assert time.monotonic() - t0 < 100, "rank 0 streamed on"
    assert not out.exists() and leftovers(out) == []


def test_one_interrupted_rank_is_named_as_interrupted(fam, tmp_path):
    """A SIGTERM to one rank: the others said "rank 1 failed: KeyboardInterrupt: KeyboardInterrupt" (an audit)."""
    root, base, fts = fam
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", write_cfg(tmp_path / "c.yml", linear(fts)), out, "--quiet"],
                                 PYMERGE_TEST_FAULT="1:interrupt"))
    assert codes == [1, 130], (codes, lines)
    assert lines[0] == ["pymerge: error: rank 1 was interrupted (Ctrl-C, SIGTERM or SIGHUP)"], lines
    assert lines[1] == ["pymerge: interrupted; no output was written"], lines
    assert not out.exists() and leftovers(out) == []


def test_ctrl_c_on_every_rank_is_an_interrupt_on_every_rank(fam, tmp_path):
    """A terminal's Ctrl-C (or torchrun passing on SIGINT/SIGTERM) reaches every rank: the ranks that did
    not fail first said 'rank 0 failed: KeyboardInterrupt' and exited 1 (a bug hunt)."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out, mark = tmp_path / "out", tmp_path / "mark"
    procs = launch(2, ["merge", cfg, out], PYMERGE_TEST_FAULT="*:stall", PYMERGE_TEST_MARK=str(mark))
    for r in range(2):  # both inside their part: each fails in its own step, and the errors are gathered
        _wait_for(Path(f"{mark}.{r}"), procs)
    for p in procs:
        p.send_signal(signal.SIGINT)
    codes, lines = finish(procs)
    assert codes == [130, 130], (codes, lines)
    assert all(ls == ["pymerge: interrupted; no output was written"] for ls in lines), lines
    assert not out.exists() and leftovers(out) == []


def test_rank_variables_without_a_rendezvous_or_switched_off(fam, tmp_path, monkeypatch, capsys):
    """RANK and WORLD_SIZE alone: one line naming what is missing. PYMERGE_NO_DIST=1: one process."""
    from pymerge import cli
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["merge", str(cfg), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR, MASTER_PORT" in err[0] and "torchrun" in err[0], err
    assert not out.exists() and leftovers(out) == []
    monkeypatch.setenv("PYMERGE_NO_DIST", "1")
    assert cli.main(["merge", str(cfg), str(out), "--quiet"]) == 0
    assert_same_tensors(out, single(cfg, tmp_path / "one"))


def test_the_wait_for_rank_0_ends_at_its_timeout_or_when_rank_0_listens():
    """The check before the rendezvous: torch's store client retried to 2-3x the timeout (an audit)."""
    from pymerge.dist.disk_merge import _wait_for_master
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="no rank 0 listening there within 1.5 s"):
            _wait_for_master("127.0.0.1", str(port), 1.5)  # bound, not listening: refused
        assert 1.5 <= time.monotonic() - t0 < 4.0
        s.listen()
        t0 = time.monotonic()
        _wait_for_master("127.0.0.1", str(port), 30)
        assert time.monotonic() - t0 < 2.0


def test_a_rank_whose_rank_0_never_comes_gives_up_in_its_timeout_in_one_line(fam, tmp_path):
    """Rank 1 of a bare launcher with nothing at MASTER_PORT: torch's store client retried to 2-3x
    PYMERGE_DIST_TIMEOUT and wrote ~40 lines of C++ backtraces before pymerge's line (an audit)."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    port = _free_port()
    env = _env(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYMERGE_DIST_TIMEOUT="3")
    p = subprocess.run([sys.executable, "-m", "pymerge", "merge", str(cfg), str(out)], env=env, capture_output=True,
                       text=True, timeout=LIMIT_S)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith(f"pymerge: error: rank 1 of 2 cannot join the process group at 127.0.0.1:{port}: no rank "
                             f"0 listening there within 3 s"), err
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("variables, says", [
    ({"RANK": "5", "WORLD_SIZE": "1"}, "RANK=5 is not a rank of WORLD_SIZE=1 (0 to 0)"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc': must be an integer of at least 0"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE='abc': must be an integer"),
    # RANK=00 is rank 0, which hosts the rendezvous: it waited the whole timeout for a rank 0, itself (a review)
    ({"RANK": "00", "WORLD_SIZE": "2", "PYMERGE_DIST_TIMEOUT": "3"}, "rank 0 of 2 cannot join the process group"),
])
def test_a_launchers_bad_variables_are_refused_before_joining(fam, tmp_path, variables, says):
    """RANK=5 of WORLD_SIZE=1 waited the whole timeout (30 minutes by default) for a rank 0 that could not come;
    LOCAL_WORLD_SIZE=abc was a ValueError's traceback (an audit). One line each, at once."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    port = _free_port()
    env = _env(**{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYMERGE_DIST_TIMEOUT": "1800", **variables})
    p = subprocess.run([sys.executable, "-m", "pymerge", "merge", str(cfg), str(out)], env=env, capture_output=True,
                       text=True, timeout=LIMIT_S)
    err = p.stderr.strip().splitlines()
    assert p.returncode == (1 if "cannot join" in says else 2) and len(err) == 1 and says in err[0], p.stderr[-3000:]
    assert not out.exists()


def test_sliced_merge_across_ranks_equals_one_process(fam, tmp_path):
    """A `slices:` frankenmerge (several plans in one output) split over 2 ranks; mergekit-yaml's
    --no-copy-tokenizer / --write-model-card reach the rank that writes the side files."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(fts[1]), "layer_range": [1, 2]}]}]})
    expected = single(cfg, tmp_path / "one", copy_tokenizer=False)
    out = tmp_path / "out"
    codes, lines = finish(launch(2, ["merge", cfg, out, "--no-copy-tokenizer", "--write-model-card"]))
    assert codes == [0, 0], lines
    assert_same_tensors(out, expected)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert not (out / "tokenizer.json").exists() and (out / "README.md").is_file()


def test_ranks_compare_model_paths_as_the_same_path_however_spelt():
    """m1/ on one rank and m1 on the others was refused as "a different merge" (an audit); another model is not."""
    from pymerge.config import parse_config
    from pymerge.dist.disk_merge import _canonical

    def config(a, b, base):
        return parse_config({"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]})
    one = _canonical(config("/x/m1", "/x/m2", "/x/base"))
    assert one == _canonical(config("/x/m1/", "/x//m2", "/x/./base/"))
    assert one != _canonical(config("/x/m1", "/x/m3", "/x/base")) != _canonical(config("/x/m1", "/x/m2", "/x/b"))
    def sliced(path):
        return parse_config({"merge_method": "passthrough", "slices": [{"sources": [
            {"model": path, "layer_range": [0, 1]}]}]})
    assert _canonical(sliced("m1/")) == _canonical(sliced("m1")) != _canonical(sliced("m2"))


@pytest.mark.parametrize("text, expected", [("", 1800.0), ("3", 3.0), ("0.001", 0.001), ("1e9", 1e9), ("inf", 1e9),
                                            ("Infinity", 1e9), ("0", None), ("-1", None), ("nan", None),
                                            ("1e-7", None), ("9.3e9", None), ("1e400", 1e9), ("-inf", None),
                                            ("abc", None)])
def test_the_timeout_is_one_gloo_and_timedelta_take(monkeypatch, text, expected):
    """PYMERGE_DIST_TIMEOUT=inf (or 1e15) raised OverflowError from timedelta (a traceback), 1e13 was refused by gloo,
    9.3e9 overflowed torch's milliseconds and 1e-7 was 0 ms: every wait failed at once, with C++ backtraces (an
    audit). inf means the longest; the rest outside [1 ms, 1e9 s] is refused in one line."""
    from datetime import timedelta
    from pymerge.dist import disk_merge
    monkeypatch.setenv(disk_merge.TIMEOUT_ENV, text)
    if expected is None:
        with pytest.raises(InputError, match=r"PYMERGE_DIST_TIMEOUT=.*: must be a number of seconds from 0.001 to "):
            disk_merge._timeout_s()
    else:
        assert disk_merge._timeout_s() == expected
        assert timedelta(seconds=expected) // timedelta(milliseconds=1) >= 1  # (gloo's unit: never 0 ms)


_INTERRUPTED_JOIN = """
import os, signal, socket, sys, time
import torch.distributed as dist
from pymerge.merge import run_merge
signal.signal(signal.SIGINT, signal.default_int_handler)  # (an xdist worker's children ignore it)
real_init = dist.init_process_group
def init_then_ctrl_c(*a, **k):
    real_init(*a, **k)
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C as the rendezvous completes
    time.sleep(0.05)
dist.init_process_group = init_then_ctrl_c
models = [{"model": m, "parameters": {"weight": 0.5}} for m in sys.argv[1:3]]
try:
    run_merge({"merge_method": "linear", "models": models}, sys.argv[3], device="cpu", quiet=True)
except KeyboardInterrupt:
    print("interrupted")
dist.init_process_group = real_init
probe = socket.socket()
print("joined" if dist.is_initialized() else "left",
      "listening" if probe.connect_ex(("127.0.0.1", int(os.environ["MASTER_PORT"]))) == 0 else "closed")
probe.close()
dist.init_process_group("gloo")  # the caller's own group, later in the process
dist.destroy_process_group()
print("the caller's group joined")
sys.stdout.flush()
os._exit(0)
"""


def test_a_ctrl_c_as_the_rank_joins_leaves_no_process_group(fam, tmp_path):
    """A Ctrl-C as the rendezvous completed, before the try that leaves the group: the process group stayed joined
    and its store listening, and the caller's own init_process_group was refused ('initialize the default process
    group twice'; an audit)."""
    root, base, fts = fam
    p = subprocess.run([sys.executable, "-c", _INTERRUPTED_JOIN, str(fts[0]), str(fts[1]), str(tmp_path / "out")],
                       env=_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(_free_port())),
                       capture_output=True, text=True, timeout=LIMIT_S, cwd=tmp_path)
    assert p.stdout.split("\n")[:3] == ["interrupted", "left closed", "the caller's group joined"], p.stdout + p.stderr
    assert not (tmp_path / "out").exists()


def test_ranks_whose_config_files_differ_in_mode_or_key_order_plan_one_merge(tmp_path):
    """Each node reads its own copy of the config: the same merge written in another key order, or saved under
    another umask (0600 against 0644), was "a different merge" once the config's text and mode were kept for
    OUT's record (a review); a different merge still is."""
    from pymerge.config import load_config
    from pymerge.dist.disk_merge import _fingerprint
    from pymerge.merge import make_plan
    base, fts = lf.make_family(tmp_path, n_finetunes=2)
    lines = [f"merge_method: ties\nbase_model: {base}\n", "models:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for p in fts), "dtype: float32\n"]
    (tmp_path / "a.yml").write_text("".join(lines))
    (tmp_path / "b.yml").write_text("".join(reversed(lines)))
    (tmp_path / "c.yml").write_text("".join(lines).replace("density: 0.5", "density: 0.4"))
    os.chmod(tmp_path / "b.yml", 0o600)
    prints = [_fingerprint(make_plan(load_config(tmp_path / f"{n}.yml")), str(tmp_path / "out"), 1 << 30, None)
              for n in "abc"]
    assert prints[0] == prints[1] != prints[2]
