"""`pymerge merge` as one rank of a distributed run, with a fault injected on one rank (a test
helper, run by torchrun or by the tests themselves as a launcher):

    PYMERGE_TEST_FAULT=RANK:bad_read  reading any tensor's bytes raises the CheckpointError that
                                      unreadable bytes would (only that rank sees it)
    PYMERGE_TEST_FAULT=RANK:stall     once its part starts streaming, the rank writes the file
                                      $PYMERGE_TEST_MARK and sleeps, for the test to kill it
    PYMERGE_TEST_FAULT=RANK:die_at_install  the rank exits (code 9, as if killed) on reaching the last
                                      agreement, its part and every other on disk
    PYMERGE_TEST_FAULT=RANK:interrupt_at_install  the rank raises KeyboardInterrupt (torchrun's SIGTERM) on
                                      reaching the last agreement, its part and every other on disk
    PYMERGE_TEST_FAULT=RANK:replace_model  once every rank has opened the models and rank 0 has written
                                      the side files, the rank renames the folder $PYMERGE_TEST_MODEL
                                      aside and $PYMERGE_TEST_MODEL.new into its place (as another
                                      merge's --force install would), then streams
    PYMERGE_TEST_FAULT=RANK:other_values  the rank opens $PYMERGE_TEST_MODEL.other wherever the config names
                                      the folder $PYMERGE_TEST_MODEL (another node's stale copy at the same path)
    PYMERGE_TEST_FAULT=RANK:endless  the rank's streaming never ends by itself: it reports progress every 20 ms
                                      for up to 120 s, then fails ("never stopped")
    PYMERGE_TEST_FAULT=RANK:interrupt  the rank's streaming raises KeyboardInterrupt (a SIGTERM to that rank alone)
    RANK "*": every rank (each also writes $PYMERGE_TEST_MARK.<rank>)
"""
import os
import signal
import sys
import time
from pathlib import Path

from pymerge import cli, merge
from pymerge.dist import disk_merge
from pymerge.errors import CheckpointError
from pymerge.io import Checkpoint


def _bad_read(self, name):
    raise CheckpointError(f"{self.path}: tensor {name!r}: cannot read its bytes: Input/output error")


def _mark(path: str) -> None:
    """path holding this process's pid, whole once it exists (the test reads it as soon as it appears)."""
    Path(path + ".tmp" + str(os.getpid())).write_text(str(os.getpid()))
    os.replace(path + ".tmp" + str(os.getpid()), path)


def _stall(real):
    def stream_plan(*args, **kwargs):
        _mark(os.environ["PYMERGE_TEST_MARK"] + "." + os.environ["RANK"])
        _mark(os.environ["PYMERGE_TEST_MARK"])
        time.sleep(600)
        return real(*args, **kwargs)
    return stream_plan


def _replace_model(real):
    def stream_plan(*args, **kwargs):
        model = os.environ["PYMERGE_TEST_MODEL"]
        os.rename(model, model + ".old")
        os.rename(model + ".new", model)
        return real(*args, **kwargs)
    return stream_plan


def _other_values(real):
    def init(self, source):
        model = os.environ["PYMERGE_TEST_MODEL"]
        same = os.path.abspath(source) == os.path.abspath(model)
        real(self, model + ".other" if same else source)
        if same:
            self.path, self.folder = Path(source), Path(source)
    return init


def _endless(plan, writer, *, progress=None, **kwargs):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress.update(1)
        time.sleep(0.02)
    raise RuntimeError("never stopped")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _die_at_install(real, interrupt=False):
    calls = [0]

    def agree(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # prepare, fill, install: every rank's part is durable
            if interrupt:
                raise KeyboardInterrupt
            os._exit(9)
        return real(*args, **kwargs)
    return agree


if __name__ == "__main__":
    # a terminal's Ctrl-C, as the tests send it: a suite started in the background (a shell's `cmd &`) has SIGINT
    # ignored, which every process it starts inherits, and the interrupted rank slept on
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rank, _, kind = os.environ.get("PYMERGE_TEST_FAULT", "-1:").partition(":")
    if rank == "*" or int(rank) == int(os.environ["RANK"]):
        if kind == "bad_read":
            Checkpoint.array = Checkpoint.tensor = _bad_read
        elif kind == "stall":
            merge.stream_plan = _stall(merge.stream_plan)
        elif kind == "replace_model":
            merge.stream_plan = _replace_model(merge.stream_plan)
        elif kind == "other_values":
            Checkpoint.__init__ = _other_values(Checkpoint.__init__)
        elif kind == "endless":
            merge.stream_plan = _endless
        elif kind == "interrupt":
            merge.stream_plan = _interrupt
        elif kind in ("die_at_install", "interrupt_at_install"):
            disk_merge._agree = _die_at_install(disk_merge._agree, interrupt=kind == "interrupt_at_install")
        else:
            raise SystemExit(f"unknown fault {kind!r}")
    sys.exit(cli.main())
