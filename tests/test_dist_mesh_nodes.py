"""`pymerge merge` across two "nodes" on this machine: two torchrun launches with --nnodes=2 and
--node-rank=0/1 meeting at a localhost rendezvous (torchrun's static one, as on a cluster without
a scheduler's rendezvous), OUT on the filesystem both see. Equal to one process byte for byte; a
failure on one node (bad bytes only it reads, or the whole node killed) fails the other node too,
promptly, with no OUT, and the next run clears what a killed node left.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_cli import leftovers, write_cfg
from test_dist_merge import LIMIT_S, WORKER, _env, _wait_for, assert_same_tensors, fam, linear, single, ties  # noqa: F401

pytestmark = pytest.mark.slow


def nodes(argv, per_node=1, **env):
    """Node 0 and node 1 (each its own torchrun agent, in its own session so a test can kill a
    whole node), rendezvous at 127.0.0.1 on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = [str(WORKER)] if "PYMERGE_TEST_FAULT" in env else ["-m", "pymerge"]
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
                              f"--nproc-per-node={per_node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                              f"--log-dir={os.devnull}", *target, *map(str, argv)],
                             env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for n in (0, 1)]


def finish(procs):
    """(exit codes, each node's pymerge lines) of the two launches."""
    outs = [p.communicate(timeout=LIMIT_S)[1] for p in procs]
    return [p.returncode for p in procs], [[l for l in err.splitlines() if l.startswith("pymerge:")] for err in outs]


def test_two_nodes_equal_one_process_byte_for_byte(fam, tmp_path):
    """2 nodes x 2 ranks: TIES (whole-tensor statistics) in uneven parts. Every tensor's bytes, every
    side file and the index's tensor list equal a one-process merge's; only the shard files' cut
    differs (each rank writes shards of its own, so there are more of them)."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", ties(base, fts))
    one = tmp_path / "one"
    expected = single(cfg, one, out_shard_size=20_000)
    out = tmp_path / "out"
    codes, lines = finish(nodes(["merge", cfg, out, "--out-shard-size", "20KB"], per_node=2))
    assert codes == [0, 0], lines
    assert lines[0] and "x 4 ranks" in lines[0][-1] and lines[1] == [], lines  # rank 0 speaks for all
    assert_same_tensors(out, expected)
    side = sorted(p.name for p in one.iterdir() if not p.name.startswith("model"))
    assert "config.json" in side and side == sorted(p.name for p in out.iterdir() if not p.name.startswith("model"))
    assert all((out / n).read_bytes() == (one / n).read_bytes() for n in side)
    got, want = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (out, one))
    assert got["metadata"] == want["metadata"] and sorted(got["weight_map"]) == sorted(want["weight_map"])
    assert len(set(got["weight_map"].values())) >= 4 and leftovers(out) == []


def test_bad_bytes_on_one_node_fail_both(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out = tmp_path / "out"
    codes, lines = finish(nodes(["merge", cfg, out], PYMERGE_TEST_FAULT="1:bad_read"))
    assert codes[0] != 0 and codes[1] != 0, (codes, lines)
    assert [len(ls) for ls in lines] == [1, 1] and lines[0] == lines[1], lines
    assert lines[0][0].startswith("pymerge: error: ") and "cannot read its bytes" in lines[0][0]
    assert not out.exists() and leftovers(out) == []


def test_killed_node_fails_the_other_promptly(fam, tmp_path):
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out, mark = tmp_path / "out", tmp_path / "mark"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    procs = nodes(["merge", cfg, out, "--force"], PYMERGE_TEST_FAULT="1:stall", PYMERGE_TEST_MARK=str(mark))
    rank_pid = _wait_for(mark, procs)
    t = time.monotonic()
    os.killpg(procs[1].pid, signal.SIGKILL)  # node 1: its agent...
    os.kill(rank_pid, signal.SIGKILL)  # ...and its rank (torchrun starts each rank in a session of its own)
    codes, lines = finish(procs)
    assert time.monotonic() - t < 45  # the lost connection, not PYMERGE_DIST_TIMEOUT (60 s)
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, (codes, lines)
    assert len(lines[0]) == 1 and "lost the other ranks" in lines[0][0], lines
    assert sorted(os.listdir(out)) == ["keep.txt"] and leftovers(out) == []


def test_killed_first_node_fails_the_other_and_the_next_run_clears_up(fam, tmp_path):
    """Node 0 holds rank 0 (which made the temporary folder) and the rendezvous store: killing it
    must not leave node 1 waiting, and its half-made folder goes at the next run."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", linear(fts))
    out, mark = tmp_path / "out", tmp_path / "mark"
    procs = nodes(["merge", cfg, out], PYMERGE_TEST_FAULT="0:stall", PYMERGE_TEST_MARK=str(mark))
    rank_pid = _wait_for(mark, procs)
    t = time.monotonic()
    os.killpg(procs[0].pid, signal.SIGKILL)
    os.kill(rank_pid, signal.SIGKILL)
    codes, lines = finish(procs)
    assert time.monotonic() - t < 45
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, (codes, lines)
    assert len(lines[1]) == 1 and "lost the other ranks" in lines[1][0], lines
    assert not out.exists() and len(leftovers(out)) == 1
    assert_same_tensors(out, single(cfg, out))
    assert leftovers(out) == []
