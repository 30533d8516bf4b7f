"""ShardedWriter: sharding, chunked writes, bit-exact output, atomic commit, abort and crash cleanup."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import threading
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors
import safetensors.torch
import torch

import pymerge.io.writer as writer_mod
from pymerge.errors import InputError
from pymerge.io import SAFETENSORS_DTYPES, Checkpoint, SafetensorsFile, ShardedWriter
from io_helpers import bits, random_tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def plan(tensors):
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def write_all(out, tensors, **kw):
    with ShardedWriter(out, plan(tensors), **kw) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return w


def load_all(folder):
    """Every tensor of every .safetensors file in folder, via the safetensors library."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            part = safetensors.torch.load_file(str(folder / f))
            assert not set(part) & set(out)
            out.update(part)
    return out


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".pymerge-" in n)


# ---- output format ------------------------------------------------------------------------------
def test_every_dtype_round_trips_bit_exactly(tmp_path):
    tensors = {}
    for i, (code, dtype) in enumerate(sorted(SAFETENSORS_DTYPES.items())):
        tensors[f"t.{code}"] = random_tensor(dtype, (3, 5), seed=i)  # odd sizes: the layout must realign
        tensors[f"s.{code}"] = random_tensor(dtype, (), seed=50 + i)
        tensors[f"z.{code}"] = torch.empty((2, 0), dtype=dtype)
    out = tmp_path / "out"
    write_all(out, tensors, metadata={"merged_by": "pymerge"})
    assert sorted(os.listdir(out)) == ["model.safetensors"]  # one shard: no index, like save_pretrained
    loaded = load_all(out)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and bits(loaded[k]) == bits(v), k
    with safetensors.safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "merged_by": "pymerge"}
    with SafetensorsFile(out / "model.safetensors") as f:  # every tensor aligned, so zero-copy views
        for k in f.names():
            assert f.info(k).file_offset % f.info(k).dtype.itemsize == 0, k
        assert f.names() == sorted(tensors, key=lambda k: -tensors[k].dtype.itemsize)


def test_default_metadata_and_empty_plan(tmp_path):
    write_all(tmp_path / "out", {})
    with safetensors.safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == []


def test_sharding_boundaries_and_index(tmp_path):
    t = {"a": torch.randn(10), "b": torch.randn(10), "c": torch.randn(10),  # 40 bytes each
         "big": torch.randn(50),  # 200 bytes: more than a shard, alone
         "d": torch.randn(5), "e": torch.empty(0)}
    out = tmp_path / "out"
    w = write_all(out, t, max_shard_bytes=80)
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert w.shard_names == names
    expect = {"a": 0, "b": 0, "c": 1, "big": 2, "d": 3, "e": 3}
    assert {k: w.shard_of(k) for k in t} == {k: names[i] for k, i in expect.items()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in t.values()) == w.total_bytes
    assert index["weight_map"] == {k: names[i] for k, i in expect.items()}
    assert list(index["weight_map"]) == list(t)  # output order
    assert sorted(os.listdir(out)) == sorted(names + ["model.safetensors.index.json"])
    loaded = load_all(out)
    assert all(bits(loaded[k]) == bits(v) for k, v in t.items())
    with Checkpoint(out) as ck:  # our reader agrees, and walks the output order
        assert ck.names() == list(t)
        assert all(torch.equal(ck.tensor(k), v) for k, v in t.items())


def test_exact_fit_stays_in_one_shard(tmp_path):
    t = {"a": torch.randn(10), "b": torch.randn(10)}
    w = write_all(tmp_path / "out", t, max_shard_bytes=80)
    assert w.shard_names == ["model.safetensors"]


def test_chunked_writes_in_any_order_from_threads(tmp_path):
    t = {f"w{i}": torch.randn(37, 13).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}
    out = tmp_path / "out"
    with ShardedWriter(out, plan(t), max_shard_bytes=3000) as w:
        jobs = []
        for k, v in t.items():
            flat = v.reshape(-1)
            for start in range(0, flat.numel(), 100):
                jobs.append((k, flat[start:start + 100], start))
        jobs.reverse()  # last chunks first
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda j: w.write(*j), jobs))
        rows = t["w0"][5:9]  # a block of rows at its element offset, written again: idempotent
        w.write("w0", rows, offset=5 * 13)
    loaded = load_all(out)
    assert all(bits(loaded[k]) == bits(v) for k, v in t.items())


def test_write_rejects_bad_chunks(tmp_path):
    with ShardedWriter(tmp_path / "out", [("w", torch.float16, (4, 4))]) as w:
        with pytest.raises(ValueError, match="dtype"):
            w.write("w", torch.zeros(16))
        with pytest.raises(ValueError, match="do not fit"):
            w.write("w", torch.zeros(4, dtype=torch.float16), offset=13)
        with pytest.raises(ValueError, match="do not fit"):
            w.write("w", torch.zeros(4, dtype=torch.float16), offset=-1)
        with pytest.raises(ValueError, match="contiguous"):
            w.write("w", torch.zeros(4, 4, dtype=torch.float16).t()[:2])
        with pytest.raises(ValueError, match="plan"):
            w.write("nope", torch.zeros(1, dtype=torch.float16))
        w.write("w", torch.ones(4, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError):
        w.write("w", torch.ones(4, 4, dtype=torch.float16))  # after commit


def test_bad_plans(tmp_path):
    with pytest.raises(ValueError):
        ShardedWriter(tmp_path / "o", [("a", torch.float32, (2,)), ("a", torch.float32, (2,))])
    with pytest.raises(ValueError):
        ShardedWriter(tmp_path / "o", [("a", torch.float32, (-1,))])
    with pytest.raises(ValueError):
        ShardedWriter(tmp_path / "o", [("a", torch.float32, (2,))], metadata={"step": 3})
    assert os.listdir(tmp_path) == []


def test_commit_refuses_unwritten_tensor_then_succeeds(tmp_path):
    out = tmp_path / "out"
    w = ShardedWriter(out, [("a", torch.float32, (8,)), ("b", torch.float32, (8,))])
    w.write("a", torch.ones(8))
    w.write("b", torch.ones(4), offset=4)
    with pytest.raises(RuntimeError, match=r"'b' was not fully written \(element 0 of 8"):
        w.commit()
    assert not out.exists()
    w.write("b", torch.zeros(4))
    w.commit()
    assert torch.equal(load_all(out)["b"], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_with_block_aborts_when_a_tensor_is_missing(tmp_path):
    with pytest.raises(RuntimeError, match="'a'"):
        with ShardedWriter(tmp_path / "out", [("a", torch.float32, (2,))]):
            pass
    assert os.listdir(tmp_path) == []


def test_extra_files(tmp_path):
    src = tmp_path / "tokenizer.json"
    src.write_text('{"v": 1}')
    out = tmp_path / "out"
    with ShardedWriter(out, [("a", torch.float32, (1,))]) as w:
        w.write("a", torch.ones(1))
        w.write_json("config.json", {"model_type": "llama", "name": "ü"})
        w.copy_file(src)
        w.copy_file(src, "sub/tok.json")
        for bad in ("../x.json", "/abs.json", "model.safetensors"):
            with pytest.raises(ValueError):
                w.write_json(bad, {})
        with pytest.raises(InputError):
            w.copy_file(tmp_path / "missing.txt")
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama", "name": "ü"}
    assert (out / "tokenizer.json").read_text() == '{"v": 1}' == (out / "sub" / "tok.json").read_text()


def test_a_side_file_that_cannot_be_copied_names_both_files(tmp_path, monkeypatch):
    """A full disk while copying tokenizer.json said "<input>/tokenizer.json: cannot copy into the output: No
    space left on device", as if the input were at fault (an audit): the output's file is named too."""
    src = tmp_path / "tokenizer.json"
    src.write_text('{"v": 1}')
    out = tmp_path / "out"

    def full(f_in, f_out, length=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(shutil, "copyfileobj", full)
    with ShardedWriter(out, [("a", torch.float32, (1,))]) as w:
        w.write("a", torch.ones(1))
        with pytest.raises(InputError, match=f"^{src}: cannot copy it to {out}/tokenizer.json: No space left on "
                                             "device$"):
            w.copy_file(src)


# ---- atomicity ----------------------------------------------------------------------------------
def test_nothing_at_out_until_commit(tmp_path):
    out = tmp_path / "out"
    w = ShardedWriter(out, [("a", torch.float32, (4,))])
    assert not out.exists()
    assert leftovers(tmp_path) == [f".out.pymerge-tmp-{os.getpid()}"] and w.tmp_dir.parent == tmp_path
    w.write("a", torch.ones(4))
    assert not out.exists()
    w.commit()
    assert os.listdir(tmp_path) == ["out"]
    w.abort()  # after commit: a no-op
    assert os.listdir(out) == ["model.safetensors"]


def test_abort_leaves_nothing(tmp_path):
    w = ShardedWriter(tmp_path / "out", [("a", torch.float32, (4,))], max_shard_bytes=1)
    w.write("a", torch.ones(4))
    w.write_json("config.json", {})
    w.abort()
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        w.commit()


def test_an_interrupt_inside_abort_still_removes_the_whole_folder(tmp_path, monkeypatch):
    """torchrun's SIGTERM reaching a rank already aborting (after a lost peer) landed inside the delete: the
    temporary folder stayed, 16,733 of 20,001 files in it, and a second abort did nothing (an audit). The
    delete finishes, then the interrupt is raised."""
    w = ShardedWriter(tmp_path / "out", [("a", torch.float32, (4,))])
    w.write("a", torch.ones(4))
    real, calls = writer_mod._remove_tree, []

    def interrupted_once(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            os.unlink(next(p for p in Path(path).iterdir() if p.name.endswith(".safetensors")))  # part done
            raise KeyboardInterrupt
        return real(path, *a, **k)
    monkeypatch.setattr(writer_mod, "_remove_tree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        w.abort()
    assert len(calls) == 2 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_exception_inside_with_leaves_no_out_and_no_temp(tmp_path, exc):
    with pytest.raises(exc):
        with ShardedWriter(tmp_path / "out", [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]) as w:
            w.write("a", torch.ones(4))
            raise exc()
    assert os.listdir(tmp_path) == []


def test_existing_non_empty_out_refused_and_preserved(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="exists and is not empty; pass --force"):
        ShardedWriter(out, [("a", torch.float32, (1,))])
    assert os.listdir(tmp_path) == ["out"] and (out / "keep.txt").read_text() == "precious"


def test_existing_empty_out_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    write_all(tmp_path / "out", {"a": torch.ones(2)})
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]


@pytest.mark.parametrize("force", [False, True])
def test_an_empty_out_filled_by_another_writer_before_the_rename(tmp_path, monkeypatch, force):
    """Two merges into one empty OUT: the other one installed between this one's 'OUT is empty' check and
    its rename. The error named the hidden temporary folder ('.out.pymerge-tmp-PID: Directory not
    empty'), with --force too; now it is the usual line about OUT, and --force replaces it."""
    out, real = tmp_path / "out", writer_mod._keep_access
    out.mkdir()

    def fill_then_keep(o, tmp):
        if not (out / "theirs.txt").exists():
            (out / "theirs.txt").write_text("the other merge's")
        real(o, tmp)
    monkeypatch.setattr(writer_mod, "_keep_access", fill_then_keep)
    t = {"a": torch.randn(3)}
    if force:
        write_all(out, t, force=True)
        assert os.listdir(out) == ["model.safetensors"] and torch.equal(load_all(out)["a"], t["a"])
    else:
        with pytest.raises(InputError,
                           match=rf"^{out} exists and is not empty; pass --force \(force=True\) to replace it$"):
            write_all(out, t)
        assert os.listdir(out) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


def test_a_missing_out_made_a_file_before_the_rename(tmp_path, monkeypatch):
    """The same race, where the other program made OUT a file: the error named the temporary folder
    ('Not a directory'); now the usual line about OUT, and the file is kept."""
    out, real = tmp_path / "out", writer_mod._keep_access

    def make_file_then_keep(o, tmp):
        out.write_text("theirs")
        real(o, tmp)
    monkeypatch.setattr(writer_mod, "_keep_access", make_file_then_keep)
    with pytest.raises(InputError, match=rf"^{out}: exists and is not a folder$"):
        write_all(out, {"a": torch.randn(3)})
    assert out.read_text() == "theirs" and leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename_aside"])
def test_force_replaces(tmp_path, monkeypatch, exchange):
    calls, real = [], writer_mod._exchange

    def spy(a, b):
        calls.append(real(a, b) if exchange else False)
        return calls[-1]

    monkeypatch.setattr(writer_mod, "_exchange", spy)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    t = {"a": torch.randn(3)}
    write_all(out, t, force=True)
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(out) == ["model.safetensors"]
    assert torch.equal(load_all(out)["a"], t["a"])
    assert calls == [exchange]  # Linux: the one-step swap was really used


def test_force_interrupted_keeps_old_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(out, [("a", torch.float32, (1,))], force=True):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]


@pytest.mark.parametrize("when", ["after the swap", "between the renames", "while removing the old OUT",
                                  "before the old OUT is named garbage"])
def test_an_interrupt_during_install_leaves_one_whole_model_and_says_which(tmp_path, monkeypatch, when):
    """Ctrl-C just after OUT was swapped in ran abort(), which removed the temporary folder, by then the old
    model's, and the CLI said 'no output was written' (found by a review). Now: interrupted after the swap,
    OUT is the new model and recording_installs says so; between the two renames of the fallback, the old OUT goes
    back at once; while removing the old OUT, the merge is done and the removal finishes before the interrupt
    goes on (most of the old model stayed beside OUT, hidden, until a merge into OUT again: an audit). Before the
    old OUT was renamed to garbage, it stayed listed as this process's: every later writer to OUT in this process
    was refused as 'another writer in this process' (an audit); now the next one removes it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_exchange, real_rename, real_remove = writer_mod._exchange, os.rename, writer_mod._remove_tree

    def exchange(a, b):
        if when == "between the renames":
            return False
        done = real_exchange(a, b)
        if when == "after the swap":
            raise KeyboardInterrupt
        return done

    def rename(a, b):
        real_rename(a, b)
        if when == "between the renames" and ".pymerge-old-" in str(b):
            raise KeyboardInterrupt

    interrupted = []

    def remove(path):
        if when == "while removing the old OUT" and (path / "old.txt").exists() and not interrupted:
            interrupted.append(path)
            (path / "old.txt").unlink()  # part of it removed, then the interrupt
            raise KeyboardInterrupt
        real_remove(path)

    def garbage_name(out):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "_exchange", exchange)
    monkeypatch.setattr(writer_mod.os, "rename", rename)
    monkeypatch.setattr(writer_mod, "_remove_tree", remove)
    if when == "before the old OUT is named garbage":
        monkeypatch.setattr(writer_mod, "_garbage_name", garbage_name)
    t = {"a": torch.randn(3)}
    with writer_mod.recording_installs() as installed:  # what the CLI reads
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C is never swallowed
            write_all(out, t, force=True)
    if when == "between the renames":
        assert os.listdir(out) == ["old.txt"] and leftovers(tmp_path) == [] and installed == []
    else:
        assert os.listdir(out) == ["model.safetensors"] and torch.equal(load_all(out)["a"], t["a"])
        assert installed == [out]
        if when == "while removing the old OUT":
            assert interrupted and leftovers(tmp_path) == []
        if when == "before the old OUT is named garbage":  # left beside OUT, no longer this process's
            [old] = leftovers(tmp_path)
            assert os.listdir(tmp_path / old) == ["old.txt"]
            assert os.path.abspath(tmp_path / old) not in writer_mod._OWNED
        monkeypatch.undo()
        write_all(out, t, force=True)  # the next writer for OUT, even in this process, cleans up and succeeds
        assert leftovers(tmp_path) == [] and torch.equal(load_all(out)["a"], t["a"])


@pytest.mark.parametrize("where", ["_hold_lock", "_identity", "_LIVE"])
def test_an_interrupt_while_the_temporary_folder_is_locked_leaves_nothing(tmp_path, monkeypatch, where):
    """Ctrl-C while the writer waited for its folder's lock file (a peer's sweep probing it) left the folder and
    an open descriptor, and the folder listed as this process's: every later writer to OUT in this process was
    refused as 'another writer in this process' (an audit)."""
    out = tmp_path / "out"
    real_flock, real_identity = writer_mod.fcntl.flock, writer_mod._identity
    calls = []

    class Fcntl:
        LOCK_EX, LOCK_NB = writer_mod.fcntl.LOCK_EX, writer_mod.fcntl.LOCK_NB

        @staticmethod
        def flock(fd, op):
            calls.append(op)
            if len(calls) == 1:
                raise BlockingIOError(errno.EAGAIN, "a sweep probing the new lock file")
            if len(calls) == 2:
                raise KeyboardInterrupt  # while it waited
            return real_flock(fd, op)

    def identity(path):
        if ".pymerge-tmp-" in str(path):
            raise KeyboardInterrupt
        return real_identity(path)

    class Interrupting:  # _LIVE: the first step after _open_tmp, before the try that aborted (the folder and its
        @staticmethod    # lock stayed, listed as this process's: an audit's Ctrl-C storm)
        def add(writer):
            raise KeyboardInterrupt

    if where == "_hold_lock":
        monkeypatch.setattr(writer_mod, "fcntl", Fcntl)
    elif where == "_LIVE":
        monkeypatch.setattr(writer_mod, "_LIVE", Interrupting)
    else:
        monkeypatch.setattr(writer_mod, "_identity", identity)
    fds = len(os.listdir("/proc/self/fd"))
    t = {"a": torch.randn(3)}
    with pytest.raises(KeyboardInterrupt):
        write_all(out, t)
    assert os.listdir(tmp_path) == [] and len(os.listdir("/proc/self/fd")) == fds
    assert not any(str(tmp_path) in p for p in writer_mod._OWNED)
    monkeypatch.undo()
    write_all(out, t)
    assert os.listdir(tmp_path) == ["out"] and torch.equal(load_all(out)["a"], t["a"])


def test_a_ctrl_c_as_the_temporary_folder_is_made_waits_until_it_is_this_writers(tmp_path, monkeypatch, ctrl_c):
    """A real SIGINT just as mkdir returned raised before the folder was recorded as this writer's: abort could not
    know it, and a model-sized leftover stayed beside OUT (an audit's Ctrl-C storm). The signal now waits the few
    system calls until the folder is made, listed and locked; the abort then removes it."""
    out, real_mkdir = tmp_path / "out", os.mkdir

    def mkdir(path, *args, **kw):
        real_mkdir(path, *args, **kw)
        if ".pymerge-tmp-" in str(path):
            ctrl_c()
            time.sleep(0.01)  # (delivered here, between bytecodes, where nothing holds it)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(KeyboardInterrupt):
        write_all(out, {"a": torch.randn(3)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [] and not any(str(tmp_path) in p for p in writer_mod._OWNED)


@pytest.mark.parametrize("where", ["_create_shard", "_open_shard"])
def test_a_ctrl_c_as_a_shard_is_opened_leaks_no_descriptor(tmp_path, monkeypatch, ctrl_c, where):
    """A SIGINT just as a shard's descriptor was opened (at the constructor, or by a write that reopens it) and
    before it was kept: the descriptor stayed open after the abort removed the folder, a deleted shard's disk space
    held until the process ended, one per interrupt (an audit). The write's count of writes in flight is taken with
    it, so the abort never waits for a write that an interrupt ended."""
    out = tmp_path / "out"
    real = getattr(ShardedWriter, where)

    def opened(self, i):
        fd = real(self, i)
        ctrl_c()
        time.sleep(0.01)  # (delivered here, between bytecodes, before the caller kept fd)
        return fd

    t = {"a": torch.randn(5), "b": torch.randn(3)}
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(ShardedWriter, where, opened)
    with pytest.raises(KeyboardInterrupt):
        write_all(out, t, max_shard_bytes=20)  # two shards; every write opens its shard (a closed one reopened)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [] and len(os.listdir("/proc/self/fd")) == fds
    write_all(out, t, max_shard_bytes=20)
    assert {k: v.tolist() for k, v in load_all(out).items()} == {k: v.tolist() for k, v in t.items()}


def test_a_ctrl_c_as_a_side_file_is_copied_leaks_no_descriptor(tmp_path, monkeypatch, ctrl_c):
    """A SIGINT just as copy_file's output was opened (a raw descriptor, before the with that closes it): after the
    abort removed the folder, the descriptor of the deleted tokenizer.json stayed open (an audit)."""
    src = tmp_path / "tokenizer.json"
    src.write_text("{}")
    real_open = os.open

    def opened(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith("tokenizer.json") and flags & os.O_EXCL:
            ctrl_c()
            time.sleep(0.01)
        return fd

    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt) as caught:  # (its traceback kept, as a notebook keeps the last one: the
        with ShardedWriter(tmp_path / "out", []) as w:  # file object in its frames held the descriptor; a review)
            monkeypatch.setattr(os, "open", opened)
            w.copy_file(src)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json"] and len(os.listdir("/proc/self/fd")) == fds
    assert caught.value.__traceback__ is not None


@pytest.mark.parametrize("parent", ["a", "b"])
def test_a_ctrl_c_as_a_parent_folder_is_made_leaves_none(tmp_path, monkeypatch, ctrl_c, parent):
    """OUT's missing parents were listed for removal only after mkdir returned: a SIGINT as it returned left them
    behind, empty (an audit's Ctrl-C storm)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kw):
        real_mkdir(path, *args, **kw)
        if os.path.basename(path) == parent:
            ctrl_c()
            time.sleep(0.01)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(KeyboardInterrupt):
        write_all(tmp_path / "a" / "b" / "out", {"x": torch.ones(2)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_a_ctrl_c_as_the_replaced_model_is_renamed_leaves_none_of_it(tmp_path, monkeypatch, ctrl_c):
    """force=True over OUT: the old model, swapped out, is renamed to a garbage name and deleted; a SIGINT between
    the rename and the deletion left all of it beside OUT until the next merge into OUT (an audit). OUT is the new
    model and the interrupt still reaches the caller."""
    out = tmp_path / "out"
    write_all(out, {"x": torch.zeros(1000)})
    real_rename = os.rename

    def rename(src, dst, *args, **kw):
        real_rename(src, dst, *args, **kw)
        if ".pymerge-del-" in str(dst):
            ctrl_c()
            time.sleep(0.01)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_all(out, {"x": torch.ones(1000)}, force=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"] and torch.equal(load_all(out)["x"], torch.ones(1000))


def test_a_ctrl_c_as_the_lock_is_released_leaves_no_lock_file_in_out(tmp_path, monkeypatch, ctrl_c):
    """A SIGINT as the installed OUT's lock file was being removed left .pymerge-writing in the model (an audit).
    The release waits for it; OUT is complete and the interrupt still reaches the caller."""
    out, real_identity = tmp_path / "out", writer_mod._identity

    def identity(path):
        if Path(path).name == writer_mod._LOCK_NAME:
            ctrl_c()
            time.sleep(0.01)
        return real_identity(path)

    monkeypatch.setattr(writer_mod, "_identity", identity)
    t = {"a": torch.randn(3)}
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        write_all(out, t)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(out)) == ["model.safetensors"]
    assert torch.equal(load_all(out)["a"], t["a"]) and len(os.listdir("/proc/self/fd")) == fds


def test_a_ctrl_c_stops_the_wait_for_the_new_lock_file(tmp_path, monkeypatch, ctrl_c):
    """Another process probing the new lock file holds it, and the writer waits: that wait was held with the
    signals (a review), so a Ctrl-C or SIGTERM could not stop a wait whose length a stopped process decided. It
    stops it now, and the folder goes."""
    real_flock, holder = writer_mod.fcntl.flock, []

    class Fcntl:
        LOCK_EX, LOCK_NB = writer_mod.fcntl.LOCK_EX, writer_mod.fcntl.LOCK_NB

        @staticmethod
        def flock(fd, op):
            if op & writer_mod.fcntl.LOCK_NB and not holder:  # a probe takes the new file first, and keeps it
                holder.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
                real_flock(holder[0], writer_mod.fcntl.LOCK_EX)
            return real_flock(fd, op)

    monkeypatch.setattr(writer_mod, "fcntl", Fcntl)
    timer = threading.Timer(0.3, ctrl_c)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ShardedWriter(tmp_path / "out", [("a", torch.float32, (1,))])
        assert time.monotonic() - t0 < 5
    finally:
        timer.cancel()
        for fd in holder:
            os.close(fd)
    assert os.listdir(tmp_path) == [] and not any(str(tmp_path) in p for p in writer_mod._OWNED)


@pytest.mark.parametrize("fails, side_file", [(1, False), (2, False), (2, True)])
def test_a_cleanup_out_of_descriptors_never_hides_the_error(tmp_path, monkeypatch, fails, side_file):
    """Out of descriptors (ulimit -n), a merge's error (a file it could not copy) started the abort, whose removal
    of the temporary folder needs descriptors too: its EMFILE replaced the error, naming the hidden folder, which
    stayed (an audit). The lock's descriptor is given up and the removal tried again; where it still fails, what
    the writer made goes by name; where other files are there too (a config.json), the first error is raised,
    saying the folder left, and the next writer for OUT removes it."""
    out = tmp_path / "out"
    real = writer_mod._remove_tree
    calls = []

    def remove(path):
        calls.append(path)
        if len(calls) <= fails:
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        real(path)
    monkeypatch.setattr(writer_mod, "_remove_tree", remove)
    t = {"a": torch.randn(3)}
    with pytest.raises(InputError, match="^the merge's own error") as raised:
        with ShardedWriter(out, plan(t)) as w:
            w.write("a", t["a"])
            if side_file:
                w.write_json("config.json", {})
            raise InputError("the merge's own error")
    assert len(calls) == 2 and not out.exists()
    # the folder left is said (a review: it stayed silently, a model's size)
    assert ("could not be removed (Too many open files): delete it" in str(raised.value)) == side_file
    assert leftovers(tmp_path) == ([calls[0].name] if side_file else [])
    monkeypatch.undo()
    write_all(out, t)
    assert os.listdir(tmp_path) == ["out"] and torch.equal(load_all(out)["a"], t["a"])


def test_out_under_a_file_is_refused(tmp_path):
    """OUT f/x under a regular file f said f 'does not exist'."""
    (tmp_path / "f").write_text("x")
    for bad, says in ((tmp_path / "f", "exists and is not a folder"),
                      (tmp_path / "f" / "x", "parent folder " + str(tmp_path / "f") + " is a file, not a folder"),
                      (tmp_path / "f" / "x" / "y", "parent folder " + str(tmp_path / "f") + " is a file, not a folder")):
        for force in (False, True):
            with pytest.raises(InputError) as excinfo:
                ShardedWriter(bad, [("a", torch.float32, (1,))], force=force)
            assert str(bad) in str(excinfo.value) and says in str(excinfo.value), str(excinfo.value)
    assert os.listdir(tmp_path) == ["f"]


def test_missing_parent_folders_are_made_and_removed_again_on_abort(tmp_path, monkeypatch):
    """mergekit makes OUT's missing parents (os.makedirs); pymerge refused them. It makes them now, and an
    aborted write (or one refused before it began) removes those it made, never a folder that was there."""
    t = {"a": torch.randn(3)}
    out = tmp_path / "runs" / "x" / "out"
    write_all(out, t)
    assert torch.equal(load_all(out)["a"], t["a"])
    w = ShardedWriter(tmp_path / "more" / "deep" / "out", [("a", torch.float32, (3,))])
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["runs"]
    (tmp_path / "kept").mkdir()
    w = ShardedWriter(tmp_path / "kept" / "new" / "out", [("a", torch.float32, (3,))])
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["kept", "runs"] and os.listdir(tmp_path / "kept") == []
    class Tiny:
        f_bavail, f_frsize = 1, 4096
    monkeypatch.setattr(writer_mod.os, "statvfs", lambda p: Tiny())
    with pytest.raises(InputError, match="needs 400.10 KB but only 4.10 KB are free"):
        ShardedWriter(tmp_path / "full" / "out", [("a", torch.float32, (100_000,))])
    assert sorted(os.listdir(tmp_path)) == ["kept", "runs"]


def test_a_link_to_nothing_above_out_is_refused_and_an_interrupt_leaves_no_folders(tmp_path, monkeypatch):
    """A dangling link on OUT's path was resolved and its target made (an unmounted disk's link: the model
    written onto the filesystem below); an interrupt while the parents were made left them behind."""
    os.symlink(tmp_path / "missing" / "deep", tmp_path / "dl")
    with pytest.raises(InputError, match="is a link to .*which does not exist"):
        ShardedWriter(tmp_path / "dl" / "sub" / "out", [("a", torch.float32, (1,))])
    assert sorted(os.listdir(tmp_path)) == ["dl"]
    real, calls = os.mkdir, []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)
    monkeypatch.setattr(writer_mod.os, "mkdir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ShardedWriter(tmp_path / "a" / "b" / "c" / "out", [("a", torch.float32, (1,))])
    assert sorted(os.listdir(tmp_path)) == ["dl"]


def test_not_enough_disk_space(tmp_path, monkeypatch):
    class Tiny:
        f_bavail, f_frsize = 1, 4096
    monkeypatch.setattr(writer_mod.os, "statvfs", lambda p: Tiny())
    with pytest.raises(InputError, match="needs 400.10 KB but only 4.10 KB are free"):
        ShardedWriter(tmp_path / "out", [("a", torch.float32, (100_000,))])
    assert os.listdir(tmp_path) == []


def test_writer_dropped_without_commit_cleans_up(tmp_path):
    w = ShardedWriter(tmp_path / "out", [("a", torch.float32, (1,))])
    del w
    assert os.listdir(tmp_path) == []


# ---- crash recovery -----------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    from pymerge.io import ShardedWriter
    w = ShardedWriter(sys.argv[1], [("a", torch.float32, (1000,)), ("b", torch.float32, (1000,))],
                      max_shard_bytes=4000)
    w.write("a", torch.ones(1000))
    w.write_json("config.json", {})
    print(w.tmp_dir, flush=True)
    time.sleep(60)
""")


def test_stale_temp_of_killed_run_is_removed(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        tmp = proc.stdout.readline().strip()
        assert tmp.endswith(f".out.pymerge-tmp-{proc.pid}") and os.path.isdir(tmp)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()  # reaped: a zombie would still look alive
        proc.stdout.close()
    assert leftovers(tmp_path) == [os.path.basename(tmp)] and not out.exists()
    write_all(out, {"a": torch.ones(2)})
    assert os.listdir(tmp_path) == ["out"]


def test_a_writer_cannot_be_copied_and_a_forked_childs_copy_removes_nothing(tmp_path):
    """A copy's __del__ aborted the original: its folder went, and the next write failed naming a path that never
    existed; after a commit it closed descriptor numbers the caller had reused. A forked child dropping its copy
    removed the parent's folder (an audit). Copies are refused; a child's copy closes its own descriptors only."""
    import copy
    import pickle
    out = tmp_path / "out"
    w = ShardedWriter(out, [("a", torch.float32, (4,))])
    for how in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=rf"a ShardedWriter \(writing {out}\) cannot be copied or pickled"):
            how(w)
    pid = os.fork()
    if pid == 0:  # the child: drops its copy, as a collected reference or an exiting worker would
        try:
            w.abort()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert w.tmp_dir.is_dir()
    w.write("a", torch.ones(4))
    w.commit()
    assert torch.equal(load_all(out)["a"], torch.ones(4)) and leftovers(tmp_path) == []


def test_a_writer_left_open_at_a_scripts_exit_leaves_no_folder(tmp_path):
    """A script's top-level writer whose write raised: __del__ ran in the interpreter's teardown, where open is gone,
    and the temporary folder (the output's size) stayed (an audit). Writers still open are aborted at exit."""
    script = ("import sys, torch\nfrom pymerge.io import ShardedWriter\n"
              "w = ShardedWriter(sys.argv[1], [('a', torch.float32, (1024, 1024))])\n"
              "w.write('a', torch.ones(1024, 1024, dtype=torch.float16))\n")  # a ValueError: the script ends
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 1 and "ValueError" in run.stderr
    assert os.listdir(tmp_path) == []


def test_stale_temp_of_a_killed_run_nobody_reaped_is_removed(tmp_path):
    """A writer killed along with its parent stays a zombie where init never reaps (some container
    inits): kill(pid, 0) still succeeds, yet it writes nothing more and its folder must go."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        tmp = proc.stdout.readline().strip()
        os.kill(proc.pid, signal.SIGKILL)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, but left unreaped: a zombie
        os.kill(proc.pid, 0)  # ...which still looks alive to kill(0)
        write_all(out, {"a": torch.ones(2)})
        assert os.listdir(tmp_path) == ["out"] and not os.path.exists(tmp)
    finally:
        proc.wait()
        proc.stdout.close()


def test_a_writer_whose_main_thread_exited_is_still_alive(tmp_path):
    """Linux shows Z for a process whose main thread called pthread_exit while others still run:
    that writer is alive, and its folder must stay."""
    script = ("import ctypes, sys, threading, time\n"
              "threading.Thread(target=time.sleep, args=(30,)).start()\n"
              "print('ready', flush=True)\n"
              "ctypes.CDLL(None).pthread_exit(None)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while b"Z" not in open(f"/proc/{proc.pid}/stat", "rb").read().rsplit(b")", 1)[1][:3]:
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.01)
        live = tmp_path / f".out.pymerge-tmp-{proc.pid}"
        live.mkdir()
        write_all(tmp_path / "out", {"a": torch.ones(2)})
        assert live.is_dir()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_stale_temp_left_under_this_process_pid_is_removed(tmp_path):
    """Pids repeat (a container's merge is pid 1 every run): a folder named with this process's pid that
    no writer of this process made is a killed run's, and blocked every later run to OUT. One a live
    writer of this process holds stays (a second writer for OUT is refused)."""
    out = tmp_path / "out"
    stale = tmp_path / f".out.pymerge-tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    aside = tmp_path / f".other.pymerge-old-{os.getpid()}"  # a replaced OUT a crash left aside: put back
    aside.mkdir()
    write_all(out, {"a": torch.ones(2)})
    write_all(tmp_path / "other", {"a": torch.ones(2)}, force=True)
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]
    w = ShardedWriter(tmp_path / "again", [("a", torch.float32, (1,))])
    with pytest.raises(InputError, match="another writer in this process is writing it"):
        ShardedWriter(tmp_path / "again", [("a", torch.float32, (1,))])
    w.write("a", torch.ones(1))
    w.commit()
    assert (tmp_path / "again").is_dir() and sorted(os.listdir(tmp_path)) == ["again", "other", "out"]


def test_stray_folders_beside_out_named_with_unicode_digits_are_left_alone(tmp_path):
    """'.out.pymerge-tmp-²' passed str.isdigit, and int() raised: every write to OUT was a traceback (an audit)."""
    strays = [tmp_path / f".out.pymerge-{tag}-²" for tag in ("tmp", "old")] + [tmp_path / ".out.pymerge-del-²"]
    for p in strays:
        p.mkdir()
    write_all(tmp_path / "out", {"a": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + [p.name for p in strays])


def test_a_second_writer_thread_never_takes_the_firsts_folder_for_stale(tmp_path, monkeypatch):
    """Between one writer's mkdir and its listing as this process's, another thread's writer for the same
    OUT took the new folder for a killed run's and deleted it (a review): the sweep and the mkdir are one step."""
    import threading
    from pymerge.io import writer as writer_module
    real_mkdir, results = os.mkdir, {}

    def slow_mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if threading.current_thread().name == "first":
            time.sleep(0.5)  # the window a second writer's sweep fell into

    monkeypatch.setattr(writer_module.os, "mkdir", slow_mkdir)
    out = tmp_path / "out"

    def open_writer(name):
        try:
            results[name] = ShardedWriter(out, [("a", torch.float32, (2,))])
        except Exception as exc:  # noqa: BLE001
            results[name] = exc

    first = threading.Thread(target=open_writer, args=("first",), name="first")
    first.start()
    time.sleep(0.2)
    open_writer("second")
    first.join()
    assert isinstance(results["second"], InputError) and "another writer in this process" in str(results["second"])
    results["first"].write("a", torch.ones(2))
    results["first"].commit()
    assert os.listdir(tmp_path) == ["out"]


def test_stale_temps_of_live_processes_and_other_outputs_are_kept(tmp_path):
    mine = tmp_path / f".out.pymerge-tmp-{os.getppid()}"  # a live process (our parent)
    other = tmp_path / f".other.pymerge-tmp-{dead_pid()}"  # another output's business
    odd = tmp_path / ".out.pymerge-tmp-notapid"
    for d in (mine, other, odd):
        d.mkdir()
    write_all(tmp_path / "out", {"a": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(["out", mine.name, other.name, odd.name])


def test_a_live_writer_whose_pid_this_process_cannot_see_keeps_its_folder(tmp_path, monkeypatch):
    """Another PID namespace (a container) or another host on a shared filesystem: kill(pid, 0) says
    the pid is gone, yet its writer is alive. Its folder was deleted under it; the lock it holds says
    it is alive, and once that writer dies its folder is swept."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        tmp = proc.stdout.readline().strip()
        monkeypatch.setattr(writer_mod, "_pid_alive", lambda pid: False)  # as if in another namespace
        write_all(tmp_path / "out", {"a": torch.ones(2)})
        assert os.path.isdir(tmp) and leftovers(tmp_path) == [os.path.basename(tmp)]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    write_all(tmp_path / "out", {"a": torch.ones(2)}, force=True)
    assert leftovers(tmp_path) == [] and os.listdir(out) == ["model.safetensors"]


def test_a_lock_file_not_locked_yet_leaves_the_pid_to_judge(tmp_path, monkeypatch):
    """Between a writer's creating its lock file and locking it, a sweep found the file unlocked and took the
    live folder for a killed run's; and a sweep's probe holding the lock at that moment made the writer give
    up its lock for good."""
    live = tmp_path / f".out.pymerge-tmp-{os.getppid()}"  # a live process's (our parent)
    live.mkdir()
    (live / writer_mod._LOCK_NAME).touch()  # created, not locked yet
    write_all(tmp_path / "out", {"a": torch.ones(2)})
    assert live.is_dir()
    # ...but a lock file unlocked for longer than a writer takes to lock it is a killed writer's whose pid
    # another process took (pids repeat from run to run in a container): swept (it was kept for good)
    made = time.time() - writer_mod._LOCK_GRACE_S - 5
    os.utime(live / writer_mod._LOCK_NAME, (made, made))
    (live / "model.safetensors").write_text("half")
    write_all(tmp_path / "out", {"a": torch.ones(2)}, force=True)
    assert not live.exists() and os.listdir(tmp_path) == ["out"]
    # one whose time is ahead of the clock by more than that (an NFS server's clock ahead, a clock stepped back):
    # as old; it was kept for as long as the skew, for good where years (an audit)
    for ahead in (writer_mod._LOCK_GRACE_S + 5, 10 * 365 * 86400):
        live.mkdir()
        (live / writer_mod._LOCK_NAME).touch()
        os.utime(live / writer_mod._LOCK_NAME, (time.time() + ahead,) * 2)
        write_all(tmp_path / "out", {"a": torch.ones(2)}, force=True)
        assert not live.exists() and os.listdir(tmp_path) == ["out"], ahead
    real, calls = writer_mod.fcntl.flock, []

    def probed_once(fd, op):  # the first try meets a probe's lock
        calls.append(op)
        if len(calls) == 1:
            raise BlockingIOError(errno.EWOULDBLOCK, "busy")
        return real(fd, op)

    monkeypatch.setattr(writer_mod.fcntl, "flock", probed_once)
    w = ShardedWriter(tmp_path / "again", [("a", torch.float32, (1,))])
    monkeypatch.setattr(writer_mod.fcntl, "flock", real)
    assert w._lock_fd is not None and writer_mod._lock_held(str(w.tmp_dir))
    w.write("a", torch.ones(1))
    w.commit()
    assert os.listdir(tmp_path / "again") == ["model.safetensors"]


def test_two_writers_with_one_pid_never_share_a_folder(tmp_path):
    """Two containers' merges are both pid 1: the second took the first's live folder for stale, deleted
    it and made its own of the same name, and the first installed a mix of both runs, exit 0."""
    out = tmp_path / "out"
    first = ShardedWriter(out, [("a", torch.float32, (4,))])
    writer_mod._OWNED.discard(os.path.abspath(first.tmp_dir))  # as another namespace's pid 1 would look
    try:
        with pytest.raises(InputError, match="another writer in another process is writing it"):
            ShardedWriter(out, [("b", torch.float32, (4,))])
        first.write("a", torch.ones(4))
        first.commit()
    finally:
        writer_mod._OWNED.add(os.path.abspath(first.tmp_dir))
        first.abort()
    assert load_all(out).keys() == {"a"} and leftovers(tmp_path) == []


def test_a_temp_folder_replaced_under_a_writer_is_never_installed(tmp_path):
    out = tmp_path / "out"
    w = ShardedWriter(out, [("a", torch.float32, (4,))])
    w.write("a", torch.ones(4))
    os.rename(w.tmp_dir, tmp_path / "moved")
    os.mkdir(w.tmp_dir)  # another program's folder of the same name
    (w.tmp_dir / "theirs.txt").write_text("x")
    with pytest.raises(InputError, match="removed or replaced by another program; nothing installed"):
        w.commit()
    assert not out.exists() and (w.tmp_dir / "theirs.txt").read_text() == "x"  # and not deleted by the abort


def test_a_writer_out_of_descriptors_as_it_opens_keeps_its_error_and_leaves_nothing(tmp_path, monkeypatch):
    """ulimit -n reached as the shards were made: the abort's rmtree failed too (it needs two descriptors), its
    error replaced the merge's, and the temporary folder stayed (an audit). The first error is raised, and what the
    writer made goes by name."""
    real = ShardedWriter._create_shard

    def second_fails(self, i):
        if i == 1:
            raise OSError(errno.EMFILE, "Too many open files", str(self.out_dir / self.shard_names[i]))
        return real(self, i)

    def rmtree_without_descriptors(path, *a, **k):
        raise OSError(errno.EMFILE, "Too many open files", str(path))
    monkeypatch.setattr(ShardedWriter, "_create_shard", second_fails)
    monkeypatch.setattr(writer_mod.shutil, "rmtree", rmtree_without_descriptors)
    out = tmp_path / "out"
    with pytest.raises(OSError) as raised:
        ShardedWriter(out, [("a", torch.float32, (64,)), ("b", torch.float32, (64,))], max_shard_bytes=256)
    assert raised.value.filename == str(out / "model-00002-of-00002.safetensors")
    assert leftovers(tmp_path) == [] and not out.exists()


def test_a_writer_whose_parent_folder_was_renamed_removes_its_folder_there(tmp_path):
    """OUT's parent renamed mid-merge: the install failed as it should, and the abort, finding nothing at the old
    path, left the model-sized temporary folder in the renamed parent (an audit)."""
    w = ShardedWriter(tmp_path / "p" / "out", [("a", torch.float32, (1024,))])
    w.write("a", torch.ones(1024))
    os.rename(tmp_path / "p", tmp_path / "moved")
    with pytest.raises(InputError, match="removed or replaced by another program; nothing installed"):
        w.commit()
    assert os.listdir(tmp_path) == ["moved"] and os.listdir(tmp_path / "moved") == []


def test_two_runs_sweeping_one_stale_folder_both_succeed(tmp_path):
    """Both deleted the same killed run's folder, and the one that lost the race failed with
    "pymerge: error: 15263: No such file or directory"."""
    stale = tmp_path / f".out.pymerge-tmp-{dead_pid()}"
    stale.mkdir()
    for i in range(20000):
        (stale / str(i)).touch()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = ("import sys, time; from pathlib import Path; from pymerge.io.writer import _remove_stale\n"
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); _remove_stale(Path(sys.argv[1]))")
    start = str(time.time() + 1.0)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), start], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert leftovers(tmp_path) == []


def test_a_prepared_out_keeps_its_permissions_and_group(tmp_path):
    """A group-private OUT (mkdir -m 2770, chgrp) became the temp folder's 0755 and the user's group."""
    out = tmp_path / "out"
    out.mkdir()
    groups = [g for g in os.getgroups() if g != os.stat(out).st_gid] or [os.stat(out).st_gid]
    os.chown(out, -1, groups[0])
    os.chmod(out, 0o2770)
    write_all(out, {"a": torch.ones(2)})
    st = os.stat(out)
    assert (oct(st.st_mode & 0o7777), st.st_gid) == (oct(0o2770), groups[0])
    os.chmod(out, 0o550)  # replacing a model keeps them too; the owner keeps rwx (a later --force replaces it)
    write_all(out, {"a": torch.ones(2)}, force=True)
    assert oct(os.stat(out).st_mode & 0o7777) == oct(0o750) and os.listdir(out) == ["model.safetensors"]


def test_old_out_stranded_by_a_crash_mid_replace_is_put_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f".out.pymerge-old-{dead_pid()}"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    # A crash between "old OUT aside" and "new OUT in": OUT is missing, the old one is restored...
    with pytest.raises(InputError, match="not empty"):
        ShardedWriter(out, [("a", torch.float32, (1,))])
    assert os.listdir(tmp_path) == ["out"] and (out / "old.txt").read_text() == "old"
    # ...and when the new OUT made it in, the stranded old one is deleted.
    aside.mkdir()
    write_all(out, {"a": torch.ones(1)}, force=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["model.safetensors"]


def test_concurrent_writes_to_one_tensor_and_commit_wait(tmp_path):
    # commit() waits for in-flight writes; many small writers hammer one big tensor.
    n = 1 << 16
    src = torch.randn(n)
    out = tmp_path / "out"
    w = ShardedWriter(out, [("a", torch.float32, (n,))])
    barrier = threading.Barrier(4)

    def worker(i):
        barrier.wait()
        for start in range(i * 1024, n, 4 * 1024):
            w.write("a", src[start:start + 1024], offset=start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.commit()
    assert bits(load_all(out)["a"]) == bits(src)


def test_commit_waits_for_a_write_in_flight(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real = writer_mod._pwrite_all

    def slow_pwrite(fd, data, pos):
        if pos > 8:  # the tensor data, not the header
            started.set()
            assert release.wait(10)
        real(fd, data, pos)

    monkeypatch.setattr(writer_mod, "_pwrite_all", slow_pwrite)
    out = tmp_path / "out"
    w = ShardedWriter(out, [("a", torch.float32, (4,))])
    writer = threading.Thread(target=w.write, args=("a", torch.arange(4.0)))
    writer.start()
    assert started.wait(10)
    committer = threading.Thread(target=w.commit)
    committer.start()
    committer.join(0.3)
    assert committer.is_alive() and not out.exists()  # the fd must not be closed under the write
    release.set()
    writer.join()
    committer.join()
    assert torch.equal(load_all(out)["a"], torch.arange(4.0))


def test_a_failed_write_names_the_shard(tmp_path, monkeypatch):
    """Was 'pymerge: error: output: No space left on device' (the OSError carried no file name)."""
    import errno

    def full(fd, data, pos):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as got:
        with ShardedWriter(tmp_path / "out", plan({"a": torch.ones(4)})) as w:
            monkeypatch.setattr(writer_mod, "_pwrite_all", full)
            w.write("a", torch.ones(4))
    assert got.value.errno == errno.ENOSPC and got.value.filename == str(tmp_path / "out" / "model.safetensors")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_header_past_the_format_limit_is_an_input_error(tmp_path, monkeypatch):
    """Was a ValueError (a traceback from the CLI): names long or many enough for a header over 100 MB come
    from valid inputs (raw UTF-8 names, escaped here as \\uXXXX)."""
    import pymerge.io.writer as writer_module
    from pymerge.errors import InputError
    monkeypatch.setattr(writer_module, "MAX_HEADER_BYTES", 2000)
    entries = [("t" * 100 + str(i), "float32", (2,)) for i in range(30)]
    with pytest.raises(InputError, match=r"shard model.safetensors: its header would be \d+ bytes, past the 2000"):
        writer_module.ShardedWriter(tmp_path / "out", entries)
    assert os.listdir(tmp_path) == []


def test_a_shard_that_cannot_be_created_is_named_in_out(tmp_path, monkeypatch):
    """EMFILE (more shards than open files allowed) named the hidden temporary folder."""
    import errno
    import pymerge.io.writer as writer_module
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if str(path).endswith("model-00003-of-00004.safetensors"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(writer_module.os, "open", failing_open)
    with pytest.raises(OSError) as excinfo:
        writer_module.ShardedWriter(tmp_path / "out", [(f"t{i}", "float32", (4,)) for i in range(4)], max_shard_bytes=16)
    assert excinfo.value.filename == str(tmp_path / "out" / "model-00003-of-00004.safetensors")
    assert os.listdir(tmp_path) == []


def test_more_shards_than_open_files_allowed(tmp_path):
    """Every shard's fd was open from the start: 1100 shards failed under the common 1024-file limit.
    A shard's fd now lives while it is written (fsynced and closed once every byte is in)."""
    code = textwrap.dedent(f"""
        import resource, torch
        from safetensors.torch import load_file
        from pymerge.io.writer import ShardedWriter
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        entries = [(f"t{{i}}", "float32", (4,)) for i in range(200)]
        with ShardedWriter({str(tmp_path / "out")!r}, entries, max_shard_bytes=16) as w:
            for i in range(200):
                w.write(f"t{{i}}", torch.full((4,), float(i)))
            w.write("t7", torch.full((4,), 70.0))  # a finished shard written again: reopened
        shard = load_file({str(tmp_path / "out" / "model-00008-of-00200.safetensors")!r})
        print(len(w.shard_names), shard["t7"].tolist())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["200", "[70.0,", "70.0,", "70.0,", "70.0]"]


def test_a_shard_whose_completing_fsync_failed_is_synced_at_commit(tmp_path, monkeypatch):
    """A shard is fsynced and closed once its bytes are in; a caller that caught that fsync's error and
    committed anyway installed a shard never made durable."""
    import errno
    import pymerge.io.writer as writer_module
    real_fsync, calls = os.fsync, []  # (inode, succeeded)

    def flaky_fsync(fd):
        failed = not calls
        calls.append((os.fstat(fd).st_ino, not failed))
        if failed:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)
    w = writer_module.ShardedWriter(tmp_path / "out", [("a", "float32", (4,)), ("b", "float32", (4,))],
                                    max_shard_bytes=16)
    monkeypatch.setattr(writer_module.os, "fsync", flaky_fsync)
    import numpy as np
    with pytest.raises(OSError, match="model-00001-of-00002.safetensors"):
        w.write("a", np.ones(4, dtype=np.float32))
    w.write("b", np.ones(4, dtype=np.float32))
    w.commit()
    shard = (tmp_path / "out" / "model-00001-of-00002.safetensors").stat().st_ino
    assert calls[0] == (shard, False) and (shard, True) in calls[1:]


def test_an_out_that_links_to_an_empty_folder_writes_there_and_keeps_the_link(tmp_path):
    """OUT a symlink to an empty folder (on a bigger disk): "exists and is not empty", and --force replaced the
    user's link with a folder on the link's filesystem (a bug hunt). The model goes where the link points, as
    mergekit writes it. A link to a folder that holds anything stays a link that --force replaces, the folder
    kept: following it made --force empty that folder (`out -> .`: the user's own; a review). A link to no
    folder is refused."""
    (tmp_path / "disk" / "merged").mkdir(parents=True)
    link = tmp_path / "out"
    os.symlink(tmp_path / "disk" / "merged", link)
    write_all(link, {"a": torch.ones(2)})
    assert link.is_symlink() and os.listdir(tmp_path / "disk" / "merged") == ["model.safetensors"]
    with pytest.raises(InputError, match=r"out: is a link to a folder that is not empty \(.*disk/merged\); pass "
                                         r"--force \(force=True\) to replace the link \(that folder is kept\)"):
        write_all(link, {"a": torch.zeros(2)})
    write_all(link, {"b": torch.zeros(3)}, force=True)
    assert not link.is_symlink() and set(load_all(link)) == {"b"} and leftovers(tmp_path) == []
    assert os.listdir(tmp_path / "disk" / "merged") == ["model.safetensors"]  # kept
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    os.symlink(".", work / "here")  # a link to the folder that holds it
    write_all(work / "here", {"c": torch.ones(1)}, force=True)
    assert (work / "notes.txt").read_text() == "mine" and set(load_all(work / "here")) == {"c"}
    for target in ("nowhere", "file"):
        (tmp_path / "file").write_text("mine")
        other = tmp_path / f"to_{target}"
        os.symlink(tmp_path / target, other)
        with pytest.raises(InputError, match="exists and is not a folder"):
            write_all(other, {"a": torch.ones(2)}, force=True)
        assert other.is_symlink() and (tmp_path / "file").read_text() == "mine"


def test_an_out_that_is_a_mount_point_is_refused_before_writing(tmp_path, monkeypatch):
    """rename(2) onto a mount point (a container's /output volume) fails with EBUSY: the whole merge was written,
    then refused naming the hidden temporary folder (a bug hunt). Refused first, naming OUT and what to do."""
    out = tmp_path / "volume"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(writer_mod.os.path, "ismount", lambda p: os.fspath(p) == str(out) or real(p))
    with pytest.raises(InputError, match=r"volume: is a mount point.*choose a folder inside it \(e.g. .*volume/model\)"):
        ShardedWriter(out, [("a", torch.float32, (2,))])
    assert os.listdir(tmp_path) == ["volume"] and os.listdir(out) == []
    write_all(out / "model", {"a": torch.ones(2)})
    assert os.listdir(out / "model") == ["model.safetensors"]


@pytest.mark.parametrize("force", [False, True])
def test_a_mount_point_ismount_cannot_see_is_named_at_install(tmp_path, monkeypatch, force):
    """A bind mount within one filesystem passes os.path.ismount: the rename onto it failed with EBUSY, a raw
    OSError naming the temporary folder (a review). One line naming OUT, nothing left beside it, OUT as it was."""
    out = tmp_path / "out"
    out.mkdir()
    if force:
        (out / "old.txt").write_text("old")
    real_rename = os.rename

    def busy(src, dst, *a, **k):
        if os.fspath(dst) == str(out) or os.fspath(src) == str(out):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_rename(src, dst, *a, **k)
    monkeypatch.setattr(writer_mod.os, "rename", busy)
    monkeypatch.setattr(writer_mod, "_exchange", lambda a, b: False)
    with pytest.raises(InputError, match=r"out: is a mount point.*choose a folder inside it"):
        write_all(out, {"a": torch.ones(2)}, force=force)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == (["old.txt"] if force else [])


def _fake_mountinfo(tmp_path, monkeypatch, *points):
    """A mountinfo listing the real root and the given mount points, escaped as the kernel writes them."""
    def escape(p):
        return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in str(p))
    lines = ["22 1 254:0 / / rw,relatime - ext4 /dev/vda rw"]
    lines += [f"{40 + i} 22 254:0 /x {escape(p)} rw,relatime - ext4 /dev/vda rw" for i, p in enumerate(points)]
    info = tmp_path / "mountinfo"
    info.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(writer_mod, "MOUNTINFO", str(info))


def test_force_refuses_an_out_holding_a_mount_point(tmp_path, monkeypatch):
    """--force deleted the old OUT with everything in it: a bind mount of the user's models inside OUT (a container
    volume) lost the models themselves, exit 0 (an audit). Refused before writing; nothing deleted."""
    out = tmp_path / "out"
    (out / "my models" / "A").mkdir(parents=True)
    (out / "my models" / "A" / "model.safetensors").write_text("precious")
    _fake_mountinfo(tmp_path, monkeypatch, out / "my models")
    with pytest.raises(InputError, match=r"out: .*my models inside it is a mount point.*unmount it or choose another"):
        write_all(out, {"a": torch.ones(2)}, force=True)
    assert (out / "my models" / "A" / "model.safetensors").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["mountinfo", "out"]
    _fake_mountinfo(tmp_path, monkeypatch, tmp_path / "elsewhere", tmp_path / "outside")  # (not below OUT)
    write_all(out, {"a": torch.ones(2)}, force=True)
    assert os.listdir(out) == ["model.safetensors"]


def test_a_folder_holding_a_mount_point_is_never_deleted(tmp_path, monkeypatch):
    """A mount made inside OUT during the merge, or inside a killed run's leftovers: the replaced folder is left
    garbage-named, its mounted files untouched, where it would have been deleted through the mount."""
    gone = tmp_path / "old"
    (gone / "mnt").mkdir(parents=True)
    (gone / "mnt" / "f").write_text("kept")
    _fake_mountinfo(tmp_path, monkeypatch, gone / "mnt")
    writer_mod._remove_tree(gone)
    assert (gone / "mnt" / "f").read_text() == "kept"
    _fake_mountinfo(tmp_path, monkeypatch)
    writer_mod._remove_tree(gone)
    assert not gone.exists()
    monkeypatch.setattr(writer_mod, "MOUNTINFO", str(tmp_path / "no-proc"))  # no /proc: found by walking
    (gone / "mnt").mkdir(parents=True)
    real = os.path.ismount
    monkeypatch.setattr(writer_mod.os.path, "ismount", lambda p: os.fspath(p) == str(gone / "mnt") or real(p))
    assert writer_mod.mounts_within(gone) == [str(gone / "mnt")]
    writer_mod._remove_tree(gone)
    assert (gone / "mnt").is_dir()


def test_force_with_a_real_bind_mount_inside_out(tmp_path):
    """The same with a real bind mount, where this machine lets the tests mount (root in a container)."""
    models, out = tmp_path / "models", tmp_path / "out"
    (models / "A").mkdir(parents=True)
    (models / "A" / "model.safetensors").write_text("precious")
    (out / "models").mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(models), str(out / "models")], capture_output=True).returncode:
        pytest.skip("mount --bind is not permitted here (the fake-mountinfo tests above cover the logic)")
    try:
        with pytest.raises(InputError, match="inside it is a mount point"):
            write_all(out, {"a": torch.ones(2)}, force=True)
        assert (models / "A" / "model.safetensors").read_text() == "precious"
    finally:
        subprocess.run(["umount", str(out / "models")], check=True)


def test_a_side_file_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """A config.json, model card or index that hit 'File too large' or a full disk said only that, naming no file
    (an audit): named as OUT's file, nothing left."""
    out = tmp_path / "out"
    real_open = open

    def full(path, *a, **k):
        if os.fspath(path).endswith(("config.json", "README.md", "model.safetensors.index.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", full)
    for add in (lambda w: w.write_json("config.json", {"a": 1}), lambda w: w.write_text("README.md", "card")):
        w = ShardedWriter(out, [("a", torch.float32, (2,))])
        with pytest.raises(OSError, match="No space left on device") as info:
            add(w)
        assert info.value.filename == str(out / os.path.basename(info.value.filename))
        assert os.path.basename(info.value.filename) in ("config.json", "README.md")
        w.abort()
        assert os.listdir(tmp_path) == []
    w = ShardedWriter(out, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))], max_shard_bytes=8)
    w.write("a", torch.ones(2))
    w.write("b", torch.ones(2))
    with pytest.raises(OSError) as info:
        w.commit()
    assert info.value.filename == str(out / "model.safetensors.index.json")
    assert os.listdir(tmp_path) == []


def test_an_out_folder_keeps_its_extended_attributes(tmp_path):
    """The model is installed by renaming a new folder onto OUT: a user.* label or a POSIX default ACL (stored as
    an extended attribute) on the folder the user made for OUT was lost (an audit)."""
    for force in (False, True):
        out = tmp_path / f"out{force}"
        out.mkdir()
        if force:
            (out / "old.txt").write_text("old")
        try:
            os.setxattr(out, "user.project", b"llm-merges")
        except OSError as exc:
            pytest.skip(f"this filesystem takes no user extended attributes ({exc.strerror})")
        write_all(out, {"a": torch.ones(2)}, force=force)
        assert os.listdir(out) == ["model.safetensors"]
        assert os.getxattr(out, "user.project") == b"llm-merges"


def test_an_out_with_a_posix_acl_keeps_it_and_its_owner_keeps_rwx(tmp_path):
    """The ACL (system.posix_acl_access carries the mode bits) was copied after the chmod that gives the owner
    rwx, undoing it: an OUT of mode 0570 stayed so, and the writer could not take its lock file out of the
    installed model (found by review). Copied first; the named entry stays, the owner gets rwx."""
    import struct
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o570)
    # version 2; user::r-x, user 12345:rwx, group::rwx, mask::rwx, other::---
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in (
        (0x01, 5, 0xFFFFFFFF), (0x02, 7, 12345), (0x04, 7, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
    try:
        os.setxattr(out, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"this filesystem takes no POSIX ACLs ({exc.strerror})")
    write_all(out, {"a": torch.ones(2)})
    assert os.listdir(out) == ["model.safetensors"]
    assert os.stat(out).st_mode & 0o700 == 0o700
    kept = os.getxattr(out, "system.posix_acl_access")
    entries = [struct.unpack("<HHI", kept[i:i + 8]) for i in range(4, len(kept), 8)]
    assert (0x02, 7, 12345) in entries and (0x01, 7, 0xFFFFFFFF) in entries


def test_a_bind_mounted_out_is_named_as_a_mount_point(tmp_path, monkeypatch):
    """OUT itself a bind mount within one disk (ismount cannot see it) read "OUT: OUT inside it is a mount point"."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _fake_mountinfo(tmp_path, monkeypatch, out)
    with pytest.raises(InputError, match=r"out: is a mount point.*choose a folder inside it"):
        write_all(out, {"a": torch.ones(2)}, force=True)
    assert os.listdir(out) == ["old.txt"]


def test_a_merge_run_from_inside_out_says_out_is_a_new_folder(tmp_path, monkeypatch, capsys):
    """`cd out && pymerge merge ../c.yml .`: the finished model is renamed onto OUT, so the shell that ran it
    still looks at the old folder, deleted, and `ls` shows nothing (an audit). Filling OUT in place instead
    would leave half a model behind a kill; the merge says what happened and what to do."""
    from pymerge.io.writer import working_folder_within
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    monkeypatch.chdir(out / "sub")
    assert working_folder_within(".") and working_folder_within(out) and working_folder_within(out / "sub")
    assert not working_folder_within(tmp_path / "x") and not working_folder_within(out / "sub" / "missing")
    monkeypatch.chdir(tmp_path)
    assert not working_folder_within(out)


def test_a_shard_is_a_safetensors_file_only_once_its_data_is_written(tmp_path):
    """A merge killed mid-write (SIGKILL, the OOM killer) left a hidden folder whose model.safetensors loaded
    without error, 23 of 24 tensors zeros (an audit): the header's length now comes last, after the data."""
    entries = [("a", torch.float32, (4,)), ("b", torch.float32, (3,)), ("empty", torch.float32, (0,)),
               ("c", torch.float32, (2,))]
    w = ShardedWriter(tmp_path / "out", entries, max_shard_bytes=20)
    shards = {name: w.tmp_dir / w.shard_of(name) for name, _, _ in entries}
    assert len(set(shards.values())) >= 2 and shards["a"] != shards["b"]

    def loads(path):
        try:
            safetensors.torch.load_file(str(path))
            return True
        except Exception:  # noqa: BLE001  (safetensors' own error kinds)
            return False

    def whole(names):  # the shards holding only tensors in names (and empty ones) load; the others do not
        for name in ("a", "b", "c"):
            done = all(n in names or n == "empty" for n, _, _ in entries if shards[n] == shards[name])
            assert loads(shards[name]) == done, (name, names)
            assert done or shards[name].read_bytes()[:8] == bytes(8)
    whole(set())
    w.write("a", torch.ones(4))
    w.write("b", torch.ones(2))  # two of b's three elements
    whole({"a"})
    w.write("b", torch.ones(1), offset=2)
    w.write("c", torch.full((2,), 2.0))
    whole({"a", "b", "c"})
    w.commit()
    assert safetensors.torch.load_file(str(tmp_path / "out" / w.shard_of("c")))["c"].tolist() == [2.0, 2.0]
    # by ranges, not bytes: a chunk written twice counted twice, and a shard missing 'b' got its header (a review)
    w = ShardedWriter(tmp_path / "again", [("a", torch.float32, (3,)), ("b", torch.float32, (3,))])
    shard = w.tmp_dir / w.shard_of("a")
    w.write("a", torch.ones(3))
    w.write("a", torch.ones(3))
    assert not loads(shard) and shard.read_bytes()[:8] == bytes(8)
    w.write("b", torch.ones(3))
    assert loads(shard)
    w.commit()


@pytest.mark.parametrize("dtype", [">f4", ">i2", ">u8"])
def test_a_big_endian_numpy_chunk_is_refused_not_written_unswapped(tmp_path, dtype):
    """A big-endian numpy array whose dtype's name matches the plan was written as its bytes: safetensors is
    little-endian, so 1.5 read back as 6.9e-41 (a coverage audit). Refused in one line; little-endian is taken."""
    import numpy as np
    from safetensors.numpy import load_file
    name = np.dtype(dtype).name
    w = ShardedWriter(tmp_path / "out", [("a", name, (2,))])
    with pytest.raises(ValueError, match=rf"^tensor 'a': a big-endian {name} array; give it in little-endian order"):
        w.write("a", np.array([1.5 if name == "float32" else 3, 2], dtype=dtype))
    w.write("a", np.array([1.5 if name == "float32" else 3, 2], dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")))
    w.commit()
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["a"].tolist() == [1.5 if name == "float32" else 3, 2]


def test_replacing_out_while_another_run_deletes_the_old_one_says_nothing_was_left(tmp_path, monkeypatch):
    """Another writer for OUT sweeps a garbage-named old OUT as this run deletes it (both do, whoever left it):
    entries already gone are not errors. This run said 'could not be deleted (No such file or directory): it is
    left at ...; delete it yourself' about a folder gone a moment later (an audit)."""
    out = tmp_path / "out"
    write_all(out, {"a": torch.ones(2)})
    for i in range(4):
        (out / f"extra{i}.txt").write_text("x")
    real_unlink, raced = os.unlink, []

    def unlink(path, *a, **k):  # the other run removes each file first
        if str(path).startswith("extra") and not raced.count(path):
            raced.append(path)
            real_unlink(path, *a, **k)
        return real_unlink(path, *a, **k)
    monkeypatch.setattr(os, "unlink", unlink)
    w = write_all(out, {"a": torch.zeros(2)}, force=True)
    monkeypatch.undo()
    assert len(raced) == 4 and w.not_removed is None, w.not_removed
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["model.safetensors"]
    gone = tmp_path / "gone"
    (gone / "sub").mkdir(parents=True)
    (gone / "sub" / "f").write_text("x")
    os.chmod(gone / "sub", 0o500)  # an error other than a missing entry is still raised
    try:
        if os.access(gone / "sub", os.W_OK):
            return  # (root: nothing is refused)
        with pytest.raises(PermissionError):
            writer_mod._remove_tree(gone)
    finally:
        os.chmod(gone / "sub", 0o700)
