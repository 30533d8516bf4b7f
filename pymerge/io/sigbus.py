"""Turns an input file truncated during a merge into a CheckpointError instead of a SIGBUS crash.

The kernels read the checkpoints' memory maps directly. While a merge runs, every mapped file is
registered with the native guard (csrc/cpu/sigbus.cpp): a read past the file's new end then sees
zeros instead of killing the process, and check(), called before each computed chunk is handed to
the writer, raises for it, so the merge aborts and its temporary folder goes, as on any error.
A CheckpointPool registers its files the same way while it copies them, and for its whole life on
the mmap tier, whose every materialize reads the maps (pymerge/pool/pool.py). A cut that stays inside
the last page faults nothing (the page reads zeros past the end): check(sizes=True) compares each
file's size with its mapping, after a merge's last read and after every pool materialize, and its
modification and status-change times with those it had when mapped (a rewrite in place, same size,
changes the bytes a map reads).

Without the C++ extension there is no guard (a truncated input still kills the process).
"""
import os
from typing import List, Optional, Tuple

from pymerge import _native
from pymerge.errors import CheckpointError
from pymerge.io.files import identity
from pymerge.stop_signals import held_signals


class MappingGuard:
    """Context manager over checkpoints' mapped files; check() raises if one shrank under us."""

    def __init__(self, checkpoints, doing: str = "being merged"):
        # each mapped file once, however many of the checkpoints (views, a model listed twice) share it
        self._files = list({id(s): s for ck in checkpoints for s in ck.shards if hasattr(s, "mapped_range")}.values())
        self._ext = _native.cpu if hasattr(_native.cpu, "sigbus_guard_add") else None
        self._reinstall = getattr(self._ext, "sigbus_guard_install", None)  # (an older build lacks it)
        self._ranges: List[Tuple[int, int, object, str, tuple]] = []  # (begin, end, file, abs path, (dev, inode))
        self._slots: List[int] = []
        self._hits: Optional[int] = None
        self._doing = doing  # "the file shrank while ...": what reads the mappings
        self._shrunk = None  # the file found shrunk: its mapping reads zeros from then on, so every check raises
        self._stamps: dict = {}  # id(file) -> its stamp() when mapped (None: unknown)
        self._rewritten = None  # the file found rewritten in place: its map reads the new bytes

    def start(self) -> "MappingGuard":
        if self._ext is None or self._slots:
            return self
        self._hits = self._ext.sigbus_guard_hits()[0]
        try:
            for f in self._files:
                mapped = f.mapped_range()
                if mapped is None:  # a file held in memory (a legacy .bin): nothing to guard
                    continue
                begin, length = mapped
                with held_signals(repeat_acts=False):  # a slot added is a slot kept (see stop)
                    self._slots.append(self._ext.sigbus_guard_add(begin, length))
                path = os.path.abspath(f.path)  # the size check below must not follow a later chdir
                ident = getattr(f, "mapped_identity", None) or identity(path)  # the file mapped, not the path's now
                self._ranges.append((begin, begin + length, f, path, ident))
                self._stamps[id(f)] = getattr(f, "mapped_stamp", None)
        except BaseException:
            self.stop()
            raise
        return self

    def check(self, then: str = "no output was written", sizes: bool = False) -> None:
        """Raises if a mapped file shrank. A fault says so at once; with sizes=True each file's size is
        looked at too (one stat each): a cut inside the last page reads zeros without any fault, so the
        merge calls this once its reads are done, the pool around every materialize."""
        if self._slots and self._reinstall is not None:
            # A handler installed since the guard started (a DataLoader worker's, faulthandler.enable(): a
            # pool's guard lives as long as the pool) took the signal in front of ours and killed the process
            # on a cut file (an audit): ours goes back in front before the next reads, forwarding to it.
            self._reinstall()
        if sizes and self._shrunk is None:
            for begin, end, f, path, ident in self._ranges:
                if _cut(f, path, ident, end - begin):
                    self._shrunk = f
                    break
                if self._rewritten is None:
                    how = _rewritten(path, ident, self._stamps.get(id(f)))
                    if how is not None:
                        self._rewritten = (f, how)
        if self._rewritten is not None and self._shrunk is None:
            f, how = self._rewritten
            raise CheckpointError(f"{f.path}: the file changed while {self._doing} ({how}); {then}")
        if self._shrunk is None and (self._hits is None or self._ext.sigbus_guard_hits()[0] == self._hits):
            return
        hits, address = self._ext.sigbus_guard_hits()
        for begin, end, f, path, ident in self._ranges:
            if f is self._shrunk or begin <= address < end or _cut(f, path, ident, end - begin):
                self._shrunk = f
                raise CheckpointError(f"{f.path}: the file shrank while {self._doing} (another program "
                                      f"truncated or rewrote it); {then}")
        # A fault in some other merge's file (another thread): not ours. Later checks start from here, so
        # they stay one counter read.
        self._hits = hits

    def stop(self) -> None:
        # All or none: a Ctrl-C between taking a slot and keeping it, or between two removals, left slots in the
        # native table for good, and its handler then turned a read past the end of a file that later reused the
        # address into zeros, exit 0, where the process would have died of SIGBUS (an audit).
        with held_signals(repeat_acts=False):
            slots, self._slots = self._slots, []
            for slot in slots:
                self._ext.sigbus_guard_remove(slot)

    def __enter__(self) -> "MappingGuard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cut(f, path: str, identity: Optional[tuple], length: int) -> bool:
    """Whether the mapped file is now shorter than its map: through the map's own descriptor where the file
    object has one (safetensors), else by path when the path still names the mapped file."""
    size = getattr(f, "mapped_size", None)
    try:
        now = size() if size is not None else None
    except (OSError, ValueError):  # closed meanwhile: nothing read through it any more
        return False
    return _shrank(path, identity, length) if now is None else now < length


def stamp(st: os.stat_result) -> tuple:
    """What a write to a file moves: its mtime, and its ctime, which a rewrite that sets the mtime back
    (touch -d, cp -p, a tool keeping timestamps) moves too. (A chmod moves the ctime as well: a false
    alarm that a rerun clears, where a missed rewrite merges a mix of two files silently.)"""
    return st.st_mtime_ns, st.st_ctime_ns


def _rewritten(path: str, identity: Optional[tuple], was: Optional[tuple]) -> Optional[str]:
    """How the mapped file (still at path) may have been written since it was mapped (a map reads the new
    bytes, mixed with whatever was computed from the old ones; same size: no cut to see), or None."""
    if was is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    now = stamp(st)
    if (st.st_dev, st.st_ino) != identity or now == was:
        return None
    if now[0] != was[0]:
        return "another program rewrote it in place: its modification time moved"
    return ("its status changed: a chmod, chown or hard link to it, or a rewrite that set its modification time "
            "back; if nothing rewrote it, run again")


def _shrank(path: str, identity: Optional[tuple], length: int) -> bool:
    """Whether the file mapped at `path` is now shorter than its mapping. A path that now names another
    file (replaced by a rename) or none says nothing: the mapped file itself may be intact."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity and st.st_size < length
