"""`pymerge merge` across two "nodes" on this machine: two torchrun launches with --nnodes=2 and
--node-rank=0/1 meeting at a localhost rendezvous (torchrun's static one, as on a cluster without
a scheduler's rendezvous), OUT on the filesystem both see. Equal to one process byte for byte; a
failure on one node (bad bytes only it reads, or the whole node killed) fails the other node too,
promptly, with no OUT, and the next run clears what a killed node left.
"""
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
                              *target, *map(str, argv)],
                             env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for n in (0, 1)]


def finish(procs):
    """(exit codes, each node's pymerge lines) of the two launches."""
    outs = [p.communicate(timeout=LIMIT_S)[1] for p in procs]
    return [p.returncode for p in procs], [[l for l in err.splitlines() if l.startswith("pymerge:")] for err in outs]


def test_two_nodes_equal_one_process_byte_for_byte(fam, tmp_path):
    """2 nodes x 2 ranks: TIES (whole-tensor statistics) in uneven parts; every output file's bytes
    equal those of a one-process merge with the same shard size."""
    root, base, fts = fam
    cfg = write_cfg(tmp_path / "c.yml", ties(base, fts))
    single(cfg, tmp_path / "one", out_shard_size=20_000)
    out = tmp_path / "out"
    codes, lines = finish(nodes(["merge", cfg, out, "--out-shard-size", "20KB"], per_node=2))
    assert codes == [0, 0], lines
    assert lines[0] and "x 4 ranks" in lines[0][-1] and lines[1] == [], lines  # rank 0 speaks for all
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert len(files) >= 3 and files == sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".safetensors")
    for name in files + ["model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert leftovers(out) == []


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
    _wait_for(mark, procs)
    t = time.monotonic()
    os.killpg(procs[1].pid, signal.SIGKILL)  # node 1: its agent and its rank
    codes, lines = finish(procs)
    assert time.monotonic() - t < 45  # the lost connection, not PYMERGE_DIST_TIMEOUT (60 s)
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, (codes, lines)
    assert len(lines[0]) == 1 and "lost the other ranks" in lines[0][0], lines
    assert sorted(os.listdir(out)) == ["keep.txt"] and leftovers(out) == []
