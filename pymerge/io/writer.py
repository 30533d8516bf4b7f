"""Writes a merged model as safetensors shards: atomically, in any order, in pieces, in bounded memory.

The whole plan (names, dtypes, shapes) is known before any data, so every shard's header is
written up front (all but its 8-byte length, written once the shard's data is: a killed run's shard is
no safetensors file a reader accepts, not a model of zeros) and its file pre-sized; tensors then land
at fixed offsets with os.pwrite, from
any thread, a chunk at a time. Everything goes to a temporary folder beside OUT which is renamed
into place at commit, so OUT holds either the previous contents or the complete new model.

Files produced: model.safetensors (one shard) or model-0000i-of-0000n.safetensors plus
model.safetensors.index.json (several shards; like Hugging Face's save_pretrained, no index for a
single shard), and whatever write_json()/copy_file() added (config.json, tokenizer files).

Chunks are torch tensors or any contiguous buffer (numpy arrays): no torch is needed to write.

Several processes can write one model (pymerge/dist/disk_merge.py): ``parts`` gives each tensor a
part, parts never share a shard file, the writer of part 0 makes the temporary folder and commits,
and the writers of the other parts ``join`` that folder and only fill their own shards.
Writeback of each chunk starts as it is written (sync_file_range, where Linux has it), so the
fsync at commit, which still comes before the rename, finds little left to flush.
"""
import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pymerge import _native
from pymerge.errors import InputError, short
from pymerge.io.files import (fitted_name, fsync_dir, is_or_inside, kind_of, out_location, regular_file,
                              remove_by_name, remove_empty_folders)
from pymerge.io.safetensors_file import MAX_HEADER_BYTES
from pymerge.sizes import format_size
from pymerge.stop_signals import held_signals

INDEX_NAME = "model.safetensors.index.json"
_TMP_TAG = ".pymerge-tmp-"  # .<outname>.pymerge-tmp-<pid>: the folder being written
_OLD_TAG = ".pymerge-old-"  # .<outname>.pymerge-old-<pid>: a replaced OUT, only where renameat2 is missing
_DEL_TAG = ".pymerge-del-"  # .<outname>.pymerge-del-<pid>-<random>: garbage (a replaced OUT, a stale temp)
_LOCK_NAME = ".pymerge-writing"  # in a temp folder: flock-held by its writer, so a peer that cannot see
#                                  the writer's pid (another PID namespace or host) never takes it for stale
_MAX_PWRITE = 1 << 30  # Linux writes at most ~2 GiB per call; smaller pieces keep the loop honest


@dataclass
class _Slot:
    name: str
    dtype: str  # torch's name for it ("bfloat16")
    shape: Tuple[int, ...]
    numel: int
    itemsize: int
    shard: int = 0
    file_offset: int = 0  # absolute, in its shard file
    written: List[Tuple[int, int]] = field(default_factory=list)  # element ranges [begin, end)


_RECORDS: Dict[int, List[Path]] = {}  # recording_installs()'s lists, open now, by id (two may be equal)


@contextlib.contextmanager
def recording_installs():
    """A list of every OUT a writer of this process installs while the block runs (what an interrupt reports:
    the CLI). Only while recording: a module-level list kept every OUT of a long-lived process (an audit)."""
    done: List[Path] = []
    _RECORDS[id(done)] = done
    try:
        yield done
    finally:
        del _RECORDS[id(done)]


def _record_install(out: Path) -> None:
    for done in list(_RECORDS.values()):  # (one C call: another thread's recording may begin or end meanwhile)
        done.append(out)


class ShardedWriter:
    """Writes ``entries`` = [(name, dtype, shape), ...] (output order) into the folder ``out_dir``.
    A dtype is a torch dtype or its name ("bfloat16", or the safetensors code "BF16").

    Use as a context manager (commits on success, aborts on any exception, KeyboardInterrupt
    included) or call commit()/abort() yourself.

    One part of a model written by several processes: ``parts`` holds each entry's part (a new
    shard starts wherever it changes), ``part`` is the one this writer writes (None: all) and
    ``join`` is the temporary folder that part 0's writer made (its ``tmp_dir``). A joining
    writer's commit() only makes its shards durable; part 0's commit() installs the model (the
    caller first makes sure every part was written) and its abort() removes the folder.
    """

    def __init__(self, out_dir, entries: Iterable[Sequence], *, max_shard_bytes: int = 5_000_000_000,
                 force: bool = False, metadata: Optional[Dict[str, str]] = None,
                 parts: Optional[Sequence[int]] = None, part: Optional[int] = None, join=None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self._pid = os.getpid()  # a forked child's copy removes nothing of the parent's (see abort)
        # What abort needs, first: an error or a Ctrl-C anywhere below is cleaned up by it (one just after the
        # temporary folder was made left it listed as this process's: every later writer to OUT refused; an audit).
        self._cond = threading.Condition()
        self._state = "open"  # open -> committing -> committed | aborting -> aborted
        self._inflight = 0
        self._fds: Dict[int, int] = {}
        self._joined = join is not None
        self._made_parents: List[Path] = []
        self.not_removed: Optional[str] = None  # a note where the replaced OUT could not be deleted
        self.sources: List[Path] = []  # the files copy_file copied: a merge checks they did not change meanwhile
        self.out_dir = out_location(out_dir)  # not resolve(): "link/.." as the kernel finds it; a link kept
        self.force = force
        try:
            self._metadata = {"format": "pt", **_check_metadata(metadata)}  # transformers insists on "format"
            self._slots: Dict[str, _Slot] = {}
            self._order: List[str] = []
            self._plan(entries, max_shard_bytes, parts)
            self._own = {i for i, p in enumerate(self._parts) if part is None or p == part}  # shards written here
            if self._joined:
                self.tmp_dir = Path(join)
                if part in (None, 0) or not self.tmp_dir.is_dir():
                    raise InputError(f"{self.out_dir}: part {part} cannot join the temporary folder {self.tmp_dir} "
                                     f"(missing, or not on a filesystem this process shares)")
            else:
                if part not in (None, 0):
                    raise ValueError(f"part {part}: only part 0 makes the temporary folder; the others join it")
                _make_parents(self.out_dir, out_dir, self._made_parents)
                self._open_tmp(force)
                _LIVE.add(self)
            # Shard index -> fd, open only while a shard is being written: a model of more shards than the
            # open-file limit (1024 is common) can be written. A shard is fsynced and closed once every byte
            # of its data has been written once (a later write reopens it); commit fsyncs the rest.
            self._users: Dict[int, int] = {}  # shard -> writes in flight through its fd
            self._unsynced: set = set()  # shards whose completing fsync failed: commit fsyncs them again
            self._left = {i: self._sizes[i] - len(self._headers[i]) for i in self._own}  # data bytes not yet written
            self._headed = {i for i in self._own if not self._left[i]}  # shards whose header length is written
            self._names_in: Dict[int, List[str]] = {i: [] for i in self._own}  # shard -> its tensors, in order
            for name in self._order:
                self._names_in.get(self._slots[name].shard, []).append(name)
            self._dirs = {self.tmp_dir}  # folders to fsync at commit
            for i in sorted(self._own):
                with held_signals(repeat_acts=False):  # (a Ctrl-C between the open and the close leaked the fd)
                    fd = self._create_shard(i)
                    try:
                        if not self._left[i]:  # no data to come (empty tensors only): durable now
                            os.fsync(fd)
                    finally:
                        os.close(fd)
        except BaseException as exc:  # out of descriptors, the abort's own error replaced this one (an audit)
            self._abort_after(exc)
            raise

    # ---- planning ---------------------------------------------------------------------------
    def _plan(self, entries, max_shard_bytes: int, parts: Optional[Sequence[int]]) -> None:
        entries = list(entries)
        if parts is not None and len(parts) != len(entries):
            raise ValueError(f"parts has {len(parts)} values for {len(entries)} tensors")
        shards: List[List[_Slot]] = [[]]
        self._parts = [parts[0] if parts else 0]  # part of each shard
        size = 0
        for k, entry in enumerate(entries):
            name, dtype, shape = entry
            if not isinstance(name, str) or name in self._slots or name == "__metadata__":
                raise InputError(f"tensor name {short(name)} is not a string, is reserved or appears twice")
            try:
                dname = _native.dtype_name(dtype)
            except KeyError:
                dname = None
            if dname not in _native.DTYPE_INFO:
                raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors equivalent")
            shape = tuple(shape)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: shape {list(shape)} is not a list of non-negative integers")
            slot = _Slot(name, dname, shape, math.prod(shape), _native.itemsize(dname))
            nbytes = slot.numel * slot.itemsize
            # A new shard when this tensor would overflow the current one (a bigger tensor alone)
            # or belongs to another part.
            p = parts[k] if parts is not None else 0
            if shards[-1] and (p != self._parts[-1] or size + nbytes > max_shard_bytes):
                shards.append([])
                self._parts.append(p)
                size = 0
            shards[-1].append(slot)
            size += nbytes
            self._slots[name] = slot
            self._order.append(name)
        n = len(shards)
        self.shard_names = (["model.safetensors"] if n == 1 else
                            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._headers: List[bytes] = []
        self._sizes: List[int] = []
        for i, slots in enumerate(shards):
            # Widest dtype first: with the header padded to 8 bytes every tensor is then aligned,
            # so readers get zero-copy views. Stable sort: same-width tensors keep output order.
            slots = sorted(slots, key=lambda s: -s.itemsize)
            header: Dict[str, object] = {"__metadata__": self._metadata}
            pos = 0
            for s in slots:
                end = pos + s.numel * s.itemsize
                header[s.name] = {"dtype": _native.DTYPE_INFO[s.dtype][2], "shape": list(s.shape),
                                  "data_offsets": [pos, end]}
                s.shard, s.file_offset = i, pos  # made absolute below, once the header size is known
                pos = end
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # the padding safetensors itself uses
            if len(raw) > MAX_HEADER_BYTES:  # readers would refuse the file: fail before writing it
                raise InputError(f"{self.out_dir}: shard {self.shard_names[i]}: its header would be {len(raw)} "
                                 f"bytes, past the {MAX_HEADER_BYTES}-byte safetensors limit (too many or too "
                                 "long tensor names for one shard: try a smaller --out-shard-size)")
            for s in slots:
                s.file_offset += 8 + len(raw)
            self._headers.append(len(raw).to_bytes(8, "little") + raw)
            self._sizes.append(8 + len(raw) + pos)

    def _check_space(self) -> None:
        try:
            st = os.statvfs(self.out_dir.parent)
        except (OSError, AttributeError):
            return
        free, need = st.f_bavail * st.f_frsize, sum(self._sizes)
        if 0 < free < need:  # 0: some filesystems don't report; don't block on them
            raise InputError(f"{self.out_dir}: the merged model needs {format_size(need)} but only "
                             f"{format_size(free)} are free on {self.out_dir.parent}")

    def _create_shard(self, i: int) -> int:
        path = self.tmp_dir / self.shard_names[i]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:  # too many open files, say: name OUT's shard, not the hidden temporary folder
            raise self._shard_error(exc, i) from None
        head = self._headers[i] if i in self._headed else bytes(8) + self._headers[i][8:]  # length: _head_shard
        try:
            _pwrite_all(fd, memoryview(head), 0)
            os.ftruncate(fd, self._sizes[i])  # sparse: no disk blocks until the data is written
        except OSError as exc:
            os.close(fd)
            raise self._shard_error(exc, i) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _head_shard(self, fd: int, i: int) -> None:
        """Writes shard i's header length, once all its data is written (before its completing fsync)."""
        try:
            _pwrite_all(fd, memoryview(self._headers[i][:8]), 0)
        except OSError as exc:
            raise self._shard_error(exc, i) from None
        self._headed.add(i)

    def _head_the_rest(self) -> None:
        """At commit (no write in flight): the header lengths of shards whose last write found the writer
        committing, which leaves the fd open for commit's fsync."""
        for i in sorted(self._own - self._headed):
            fd = self._fds.get(i)
            if fd is not None:
                self._head_shard(fd, i)
                continue
            with held_signals(repeat_acts=False):  # (opened and closed, or neither)
                fd = self._open_shard(i)
                try:
                    self._head_shard(fd, i)
                    os.fsync(fd)
                except OSError as exc:
                    raise self._shard_error(exc, i) from None
                finally:
                    os.close(fd)

    def _shard_error(self, exc: OSError, i: int) -> OSError:
        """exc naming OUT's shard i, not the hidden temporary folder (or no file: "No space left on device")."""
        return OSError(exc.errno, exc.strerror, str(self.out_dir / self.shard_names[i]))

    def _sync_failed(self) -> None:
        """The shards whose completing fsync failed (a caller may have caught that): synced now, or raise."""
        for shard in sorted(self._unsynced):
            with held_signals(repeat_acts=False):  # (opened and closed, or neither)
                fd = self._open_shard(shard)
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise self._shard_error(exc, shard) from None
                finally:
                    os.close(fd)
        self._unsynced.clear()

    def _open_shard(self, i: int) -> int:
        try:
            return os.open(self.tmp_dir / self.shard_names[i], os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise self._shard_error(exc, i) from None

    # ---- writing ----------------------------------------------------------------------------
    def shard_of(self, name: str) -> str:
        """The file name of the shard that holds ``name``."""
        return self.shard_names[self._slot(name).shard]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (the index's total_size)."""
        return sum(s.numel * s.itemsize for s in self._slots.values())

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise ValueError(f"tensor {name!r} is not in this writer's plan") from None

    def write(self, name: str, tensor, offset: int = 0) -> None:
        """Writes ``tensor``'s elements at element ``offset`` of the output tensor ``name``.

        ``tensor`` is a contiguous CPU tensor of the planned dtype, any shape (a chunk is usually a
        flat run or a block of rows), or any contiguous buffer (a numpy array) holding the raw bytes
        of whole elements of the planned dtype (a numpy float array must be of that very dtype).
        Thread-safe for different tensors, and for disjoint chunks of one tensor.
        """
        slot = self._slot(name)
        if slot.shard not in self._own:
            raise ValueError(f"tensor {name!r} belongs to another part of the model; this writer does not write it")
        # torch only if something imported it: another thread may be importing it right now, and a
        # half-initialized module has no Tensor yet (a chunk that is a tensor means the import is done).
        tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
        if tensor_type is not None and isinstance(tensor, tensor_type):
            torch = sys.modules["torch"]
            planned = _native.torch_dtype(slot.dtype)
            if tensor.dtype != planned:
                raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} but the plan says {planned}")
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError(f"tensor {name!r}: chunk must be a contiguous CPU tensor "
                                 f"(got device {tensor.device}, contiguous={tensor.is_contiguous()})")
            n = tensor.numel()
            data = tensor.detach().reshape(-1).view(torch.uint8).numpy() if n else None
        else:
            n, data = self._buffer(name, slot, tensor)
        if not isinstance(offset, int) or offset < 0 or offset + n > slot.numel:
            raise ValueError(f"tensor {name!r}: elements [{offset}, {offset + n}) do not fit in its "
                             f"{slot.numel} elements")
        shard, counted, used = slot.shard, False, False
        try:
            # counted and recorded together: a Ctrl-C between the count and the try that takes it back left commit
            # and abort waiting for this write for ever, and one between opening a shard and keeping its fd leaked it
            with held_signals(repeat_acts=False):
                with self._cond:
                    if self._state != "open":
                        raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot write {name!r}")
                    self._inflight += 1  # commit/abort wait for us, so the fd cannot be closed under us
                    counted = True
                    if n:
                        fd = self._fds.get(shard)
                        if fd is None:
                            fd = self._fds[shard] = self._open_shard(shard)
                        self._users[shard] = self._users.get(shard, 0) + 1
                        used = True
            if n:
                pos = slot.file_offset + offset * slot.itemsize
                try:
                    _pwrite_all(fd, memoryview(data), pos)
                except OSError as exc:  # name the shard (was "output: No space left on device")
                    if exc.filename is None:
                        raise self._shard_error(exc, shard) from None
                    raise
                _start_writeback(fd, pos, n * slot.itemsize)
            with self._cond:
                if slot.written and slot.written[-1][1] == offset:
                    slot.written[-1] = (slot.written[-1][0], offset + n)  # sequential chunks: one range
                else:
                    slot.written.append((offset, offset + n))
                self._left[shard] -= n * slot.itemsize
        finally:
            if counted:
                self._done_writing(shard, used)

    def _done_writing(self, shard: int, used: bool) -> None:
        """write()'s last step, whatever happened: the shard's fd made durable and closed once every byte of it is
        written, then the write no longer counted (commit and abort wait for it)."""
        done = None
        with held_signals(repeat_acts=False):  # (taken out of _fds and closed, counted and uncounted, together)
            try:
                with self._cond:
                    if used:
                        self._users[shard] -= 1
                        if self._left[shard] <= 0 and not self._users[shard] and self._state == "open":
                            done = self._fds.pop(shard, None)  # every byte written: durable now, fd freed
                if done is not None:
                    try:
                        with self._cond:  # by ranges, not bytes: a chunk written twice counts twice (a review)
                            whole = not self._missing(shard)
                        if whole:  # else commit heads it, once _missing finds nothing
                            self._head_shard(done, shard)
                        os.fsync(done)
                    except OSError as exc:
                        with self._cond:
                            self._unsynced.add(shard)
                        raise self._shard_error(exc, shard) from None
                    finally:
                        os.close(done)
            finally:
                with self._cond:  # only now: commit waits for this shard's fsync too
                    self._inflight -= 1
                    self._cond.notify_all()

    @staticmethod
    def _buffer(name: str, slot: _Slot, obj):
        """(elements, bytes) of a buffer-protocol chunk, checked against the plan."""
        try:
            mv = memoryview(obj)
        except TypeError:
            raise ValueError(f"tensor {name!r}: expected a torch.Tensor or a buffer such as a numpy array, "
                             f"got {type(obj).__name__}") from None
        if not mv.c_contiguous:
            raise ValueError(f"tensor {name!r}: chunk must be a contiguous CPU buffer")
        kind = getattr(getattr(obj, "dtype", None), "kind", None)
        if kind is not None and str(getattr(obj.dtype, "str", ""))[:1] == ">":  # safetensors is little-endian
            raise ValueError(f"tensor {name!r}: a big-endian {obj.dtype.name} array; give it in little-endian order "
                             "(numpy: .astype(a.dtype.newbyteorder('<')))")
        if kind == "f" and obj.dtype.name != slot.dtype:
            raise ValueError(f"tensor {name!r}: dtype {obj.dtype.name} but the plan says {slot.dtype}")
        if mv.nbytes % slot.itemsize:
            raise ValueError(f"tensor {name!r}: a chunk of {mv.nbytes} bytes is not a whole number of "
                             f"{slot.dtype} elements")
        return mv.nbytes // slot.itemsize, (mv.cast("B") if mv.nbytes else None)

    def write_json(self, relname: str, obj) -> Path:
        """Adds a JSON file (config.json, generation_config.json...) to the output."""
        path = self._extra_path(relname)
        try:
            _dump_json(path, obj)
        except OSError as exc:  # "File too large" alone named no file (an audit)
            raise self._file_error(exc, relname) from None
        return path

    def write_text(self, relname: str, text: str, mode: Optional[int] = None) -> Path:
        """Adds a UTF-8 text file (a model card) to the output; mode: the permission bits of the file the text
        came from (a copy no more readable than it, never executable), or None for the umask's default."""
        path = self._extra_path(relname)
        perm = 0o666 if mode is None else mode & 0o666  # (the umask applies on top, as to any new file)
        try:
            with open(path, "w", encoding="utf-8", opener=lambda p, flags: os.open(p, flags, perm)) as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise self._file_error(exc, relname) from None
        return path

    def _file_error(self, exc: OSError, relname: str) -> OSError:
        """exc naming OUT's file, not the hidden temporary folder's."""
        return OSError(exc.errno, exc.strerror, str(self.out_dir / relname))

    def copy_file(self, src, relname: Optional[str] = None) -> Path:
        """Adds a copy of ``src`` (a tokenizer file, say) to the output as ``relname``."""
        src = Path(src)
        relname = relname if relname is not None else src.name
        path = self._extra_path(relname)
        self.sources.append(src)
        with regular_file(src, InputError) as fd:  # a FIFO or a device: refused, never read
            try:
                # The copy is no more readable than the source (a 0600 file stays 0600), never executable.
                mode = os.fstat(fd).st_mode & 0o666
                flags, f_out = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), None
                try:  # opened and kept, closed by this finally (a raw fd leaked: an audit; one closed only with the
                    with held_signals(repeat_acts=False):  # interrupt's traceback, a review)
                        f_out = os.fdopen(os.open(path, flags, mode), "wb")
                    with os.fdopen(fd, "rb", closefd=False) as f_in:
                        shutil.copyfileobj(f_in, f_out, 1 << 20)
                        f_out.flush()
                        os.fsync(f_out.fileno())
                finally:
                    if f_out is not None:
                        f_out.close()
            except OSError as exc:
                # both named: the source's read or the output's disk (full, say) may have failed
                raise InputError(f"{src}: cannot copy it to {self.out_dir / relname}: {exc.strerror or exc}") \
                    from None
        return path

    def _extra_path(self, relname: str) -> Path:
        rel = Path(relname)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts:
            raise ValueError(f"{relname!r} is not a relative path inside the output folder")
        if str(rel) in self.shard_names or str(rel) == INDEX_NAME:
            raise ValueError(f"{relname!r} would overwrite one of the model files")
        with self._cond:
            if self._state != "open":
                raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot add {relname!r}")
        path = self.tmp_dir / rel
        for parent in reversed(rel.parents[:-1]):  # subfolders, outermost first
            os.makedirs(self.tmp_dir / parent, exist_ok=True)
            self._dirs.add(self.tmp_dir / parent)
        return path

    # ---- finishing --------------------------------------------------------------------------
    def _missing(self, shard: Optional[int] = None) -> List[str]:
        """The tensors (of shard, or of every shard this writer owns) not yet written whole."""
        out = []
        for name in self._order if shard is None else self._names_in[shard]:
            slot = self._slots[name]
            if slot.shard not in self._own:
                continue  # another process's part: the caller agrees with it on success
            pos = 0
            for begin, end in sorted(slot.written):
                if begin > pos:
                    break
                pos = max(pos, end)
            if pos < slot.numel:
                out.append(f"{name!r} was not fully written (element {pos} of {slot.numel} is missing)")
        return out

    def commit(self) -> Path:
        """Checks every tensor was fully written, makes it durable and moves it to OUT. Returns OUT.

        A tensor left unwritten raises RuntimeError and leaves the writer open (write it, retry).
        """
        with self._cond:
            if self._state != "open":
                raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot commit")
            self._state = "committing"
            while self._inflight:
                self._cond.wait()
            missing = self._missing()
            if missing:
                self._state = "open"
                more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
                raise RuntimeError(f"{self.out_dir}: tensor {missing[0]}{more}; not committing")
        try:
            self._head_the_rest()
            if self._joined:  # another process installs the folder: make this part durable
                for fd in self._fds.values():
                    os.fsync(fd)
                self._close_fds()
                self._sync_failed()
                with self._cond:
                    self._state = "committed"
                return self.out_dir
            self._check_other_parts()
            if len(self.shard_names) > 1:
                try:
                    _dump_json(self.tmp_dir / INDEX_NAME, {
                        "metadata": {"total_size": self.total_bytes},
                        "weight_map": {n: self.shard_of(n) for n in self._order}})
                except OSError as exc:
                    raise self._file_error(exc, INDEX_NAME) from None
            for fd in self._fds.values():
                os.fsync(fd)
            self._close_fds()
            self._sync_failed()
            for d in sorted(self._dirs, key=lambda p: -len(p.parts)):
                fsync_dir(d)
            self._install()
        except BaseException:
            self.abort()  # a no-op once _install put OUT in place
            raise
        with self._cond:
            self._state = "committed"
        return self.out_dir

    def _check_other_parts(self) -> None:
        """The other parts' shards are in this folder, as planned (their size and header): a part that joined a
        folder of the same name that this process cannot see (a node-local disk holding a killed run's folder
        of the same pid) wrote its shards there, and an index naming shards OUT lacks was installed, exit 0
        (an audit). Looked up again for a few seconds: a network filesystem may show another node's new file
        late."""
        others = [i for i in range(len(self.shard_names)) if i not in self._own]
        deadline = time.monotonic() + PARTS_VISIBLE_S
        while others:
            bad = [(i, why) for i in others for why in [self._shard_differs(i)] if why]
            if not bad:
                return
            if time.monotonic() > deadline:
                i, why = bad[0]
                hint = ("that part wrote into another folder of the same name (is OUT's parent folder one "
                        "filesystem that every process shares?)" if why == "is missing" else
                        "that part planned another model, or another run wrote there")
                raise InputError(f"{self.out_dir}: shard {self.shard_names[i]} of part {self._parts[i]} {why} in "
                                 f"the temporary folder {self.tmp_dir}: {hint}; nothing installed")
            time.sleep(0.2)

    def _shard_differs(self, i: int) -> Optional[str]:
        path = self.tmp_dir / self.shard_names[i]
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(len(self._headers[i]))
        except FileNotFoundError:
            return "is missing"
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
        if size != self._sizes[i] or head != self._headers[i]:
            return "is not the one planned (another size or header)"
        return None

    def _install(self) -> None:
        out, tmp, parent = self.out_dir, self.tmp_dir, self.out_dir.parent
        ours, aside = _identity(tmp), None
        if ours is None or ours != self._made:  # another program's folder now: installing it would mix runs
            raise InputError(f"{tmp}: the temporary folder was removed or replaced by another program; "
                             "nothing installed")
        try:
            if (not os.path.lexists(out) or _is_empty_dir(out)) and _rename_onto_empty(tmp, out):
                pass
            elif not out.is_dir():
                raise InputError(f"{out}: exists and is not a folder")
            elif not self.force:
                raise InputError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
            else:
                _keep_access(out, tmp)
                if not _exchange(tmp, out):  # renameat2: one atomic step, after which tmp holds the old OUT
                    # No renameat2 here: the old OUT steps aside first. A crash between the two renames leaves
                    # it at .<out>.pymerge-old-<pid>, which the next writer for OUT puts back (_remove_stale).
                    aside = parent / f"{_beside(out, _OLD_TAG)}{os.getpid()}"
                    _OWNED.add(os.path.abspath(aside))
                    os.rename(out, aside)
                    os.rename(tmp, out)
            self._installed()
        except BaseException as exc:
            if _identity(out) != ours:  # OUT is not the new model: the old one goes back, abort cleans up
                if aside is not None and not os.path.lexists(out) and os.path.lexists(aside):
                    os.rename(aside, out)
                if aside is not None and not os.path.lexists(aside):
                    _OWNED.discard(os.path.abspath(aside))
                if isinstance(exc, OSError) and exc.errno == errno.EBUSY:  # a mount point that ismount cannot
                    raise InputError(_mount_point(out)) from None        # see (a bind mount within one disk)
                raise
            if self._state != "committed":  # interrupted just after the swap: OUT is the new model, complete
                self._installed()
            self._release_lock(out)
            self._drop_replaced(aside if aside is not None else tmp)
            raise
        # Held until OUT is in place (a peer that cannot see this pid would take a lock-less folder for a
        # killed run's), then removed from OUT: it was there for an instant.
        try:
            self._release_lock(out)
            fsync_dir(parent)
        finally:  # a Ctrl-C in either left the whole replaced model beside OUT (until a merge into OUT again)
            self._drop_replaced(aside if aside is not None else tmp)

    def _drop_replaced(self, old: Path) -> None:
        """Discards the replaced model at old (nothing there after a plain rename), then unlists this writer's
        folders whatever happens: one still listed after an interrupt refused every later writer to OUT in this
        process, and a folder left unlisted is a stale one the next writer for OUT removes."""
        # as one step, finished where an interrupt lands (most of the old model stayed: an audit; one between the
        # rename and the removal left all of it beside OUT: another); the interrupt is raised after
        with held_signals(repeat_acts=False):
            try:
                if os.path.lexists(old):
                    self._discard(old)
            finally:
                _OWNED.difference_update({os.path.abspath(self.tmp_dir), os.path.abspath(old)})

    def _discard(self, old: Path) -> None:
        """Removes the replaced model once OUT is installed: renamed to a name that only ever means
        garbage (the next writer for OUT removes it, whatever its pid; it is never put back as OUT),
        then deleted, wholly. An interrupt still propagates after (the CLI says OUT is complete); an OSError leaves
        the rest for the next writer: the merge itself is done."""
        gone = _garbage_name(self.out_dir)
        why = "it holds a mount point"  # _remove_tree leaves such a folder, whole
        try:
            os.rename(old, gone)
            _remove_whole(gone)  # (finished where an interrupt lands inside, outside the main thread's held ones)
        except OSError as exc:  # said: a folder the user cannot delete stayed beside OUT for good, silently (an audit)
            why = exc.strerror or str(exc)
        left = gone if os.path.lexists(gone) else old
        if os.path.lexists(left):
            self.not_removed = f"the model OUT held before could not be deleted ({why}): it is left at {left}; " \
                               "delete it yourself"

    def _installed(self) -> None:
        """The point of no return: OUT is the new model. An interrupt from here on must neither delete
        it (abort would take the old model's folder for its own) nor be reported as 'no output'."""
        with self._cond:
            self._state = "committed"
        _record_install(self.out_dir)

    def _open_tmp(self, force: bool) -> None:
        """Part 0's temporary folder beside OUT (OUT's name checked, a killed run's leftovers swept)."""
        _check_name(self.out_dir)
        with _OWNED_LOCK:  # another thread's writer must not take this folder for a killed run's
            _remove_stale(self.out_dir)  # first: it may put back an OUT that a crash left aside
            _check_out(self.out_dir, force)
            tmp_dir = self.out_dir.parent / f"{_beside(self.out_dir, _TMP_TAG)}{os.getpid()}"
            self._check_space()
            # made, listed, known and its lock file open, or none of these: abort undoes each (a Ctrl-C between
            # two of them left the folder, or listed it as this process's, refusing every later writer to OUT)
            with held_signals(repeat_acts=False):
                try:
                    os.mkdir(tmp_dir)
                except FileExistsError:  # a live writer's (a stale one was swept above)
                    who = "this process" if os.path.abspath(tmp_dir) in _OWNED else "another process"
                    raise InputError(f"{self.out_dir}: another writer in {who} is writing it "
                                     f"({tmp_dir} exists)") from None
                except OSError as exc:  # a read-only or foreign parent folder
                    raise InputError(f"{self.out_dir}: cannot create the output in {self.out_dir.parent}: "
                                     f"{exc.strerror or exc}") from None
                self.tmp_dir = tmp_dir  # (set once it is this writer's: abort unlists it)
                _OWNED.add(os.path.abspath(tmp_dir))
                try:
                    self._made = _identity(tmp_dir)  # install checks it is still this folder
                    self._lock_fd, locked = _lock_file(tmp_dir)
                except BaseException:  # (abort knows the folder by _made): removed and unlisted here
                    try:
                        self._remove_tmp()
                    except OSError:  # left unlisted: the next writer for OUT sweeps it; the first error is raised
                        pass
                    finally:
                        self._release_lock()
                        _OWNED.discard(os.path.abspath(tmp_dir))
                    raise
            if not locked:  # a sweep probing the new file holds it for an instant: wait for it, where a Ctrl-C
                try:        # stops the wait (held, one held by a stopped process could not be: a review)
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                except OSError:  # no locks on this filesystem after all
                    self._release_lock(tmp_dir)

    def abort(self) -> None:
        """Discards everything written so far. A no-op after commit or a previous abort."""
        with self._cond:
            if self._state in ("committed", "aborted", "aborting"):
                return
            self._state = "aborting"
            while self._inflight:
                self._cond.wait()
        try:
            self._close_fds()
            if not self._joined and os.getpid() == self._pid:  # the folder is part 0's to remove, in its process
                try:
                    if self._tmp_now() is not None:  # never another program's folder of that name
                        self._remove_tmp()
                finally:
                    self._release_lock()
                    if hasattr(self, "tmp_dir"):  # (made: an error or an interrupt before that left none)
                        _OWNED.discard(os.path.abspath(self.tmp_dir))
                    _remove_empty(self._made_parents)
        finally:
            with self._cond:
                self._state = "aborted"

    def _tmp_now(self) -> Optional[Path]:
        """Where this writer's temporary folder is: tmp_dir, or where a rename of a folder above it took it (the
        lock's descriptor knows: a model-sized folder was left in the renamed parent; an audit); None where it is
        gone, moved under another name, or tmp_dir is another folder."""
        made, fd = getattr(self, "_made", None), getattr(self, "_lock_fd", None)
        if made is None or _identity(self.tmp_dir) == made:
            return self.tmp_dir if made is not None else None
        if fd is None:
            return None
        try:
            moved = Path(os.readlink(f"/proc/self/fd/{fd}")).parent
        except OSError:  # no /proc
            return None
        # (under its own name only: a folder renamed itself was moved away by someone, and is theirs to keep)
        return moved if moved.name == self.tmp_dir.name and _identity(moved) == made else None

    def _remove_tmp(self) -> None:
        """Removes the temporary folder, wholly; out of descriptors, the lock's is given up for the removal's own."""
        folder = self._tmp_now() or self.tmp_dir
        try:
            _remove_whole(folder)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._release_lock()
            try:
                _remove_whole(folder)
            except OSError as again:  # none left for rmtree's two: what this writer made goes by name (an audit:
                # the lock file and the shards, where that was all, as for a merge out of descriptors as it opened)
                if again.errno not in (errno.EMFILE, errno.ENFILE) or not remove_by_name(folder, (_LOCK_NAME,
                                                                                                  *self.shard_names)):
                    raise

    def _release_lock(self, folder: Optional[Path] = None) -> None:
        """Unlocks; with folder, also removes the lock file from it if it is this writer's (OUT's now)."""
        with held_signals(repeat_acts=False):  # a Ctrl-C inside left the lock file in the installed OUT (an audit)
            fd, self._lock_fd = getattr(self, "_lock_fd", None), None
            if fd is None:
                return
            try:
                if folder is not None:
                    st = os.fstat(fd)
                    if _identity(folder / _LOCK_NAME) == (st.st_dev, st.st_ino):
                        os.unlink(folder / _LOCK_NAME)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException as first:
                self._abort_after(first)
                raise
            self.abort()  # after a commit: a no-op
        else:  # any exception, KeyboardInterrupt too: clean up
            self._abort_after(exc)
        return False

    def _abort_after(self, first: BaseException) -> None:
        """abort() after the error `first`, which stays the error raised: a failed removal of the temporary folder
        (out of descriptors, as the merge was) replaced it, naming the hidden folder (an audit). The folder left,
        unlisted (the next writer for OUT removes it), is said in an InputError's message, else in the error's
        `not_removed` attribute (the CLI says it after an interrupt's or a system error's line)."""
        try:
            self.abort()
        except OSError as err:
            left = f"its temporary folder {self.tmp_dir} could not be removed ({err.strerror or err}): delete it"
            self.not_removed = left
            if isinstance(first, InputError):
                try:
                    raise type(first)(f"{first}; {left}") from None
                except TypeError:  # a subclass of other arguments: its own message alone
                    pass
            try:
                first.not_removed = left
            except AttributeError:  # (an exception type without a __dict__)
                pass

    def __del__(self):
        # A writer dropped without commit/abort must not leave its temp folder behind.
        if getattr(self, "_state", None) == "open":
            try:
                self.abort()
            except Exception:
                pass

    def __reduce_ex__(self, protocol):
        # A copy's __del__ aborted the original's folder, or closed descriptor numbers the caller had reused since
        # (an audit): a writer is one folder's and one process's.
        raise TypeError(f"a ShardedWriter (writing {self.out_dir}) cannot be copied or pickled: it owns a temporary "
                        "folder and open files; write through this one")

    def __repr__(self):
        return (f"ShardedWriter({str(self.out_dir)!r}, {len(self._order)} tensors in "
                f"{len(self.shard_names)} shards)")


# ---- helpers -------------------------------------------------------------------------------
def _check_metadata(metadata) -> Dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ValueError("safetensors metadata must be a dict of str -> str")
    return dict(metadata)


def _check_out(out: Path, force: bool) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if os.path.ismount(out):  # rename(2) onto it fails (EBUSY), after the whole merge was written
        raise InputError(_mount_point(out))
    if not force and out.is_symlink():  # (out_location follows a link to an empty folder only)
        raise InputError(f"{out}: is a link to a folder that is not empty ({os.path.realpath(out)}); pass --force "
                         "(force=True) to replace the link (that folder is kept)")
    if not force and not _is_empty_dir(out):
        raise InputError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    if force and not out.is_symlink():  # (a link alone is replaced; the folder it names is kept)
        inside = mounts_within(out)
        if inside and inside[0] == os.path.realpath(out):  # a bind mount within one disk: ismount cannot see it
            raise InputError(_mount_point(out))
        if inside:
            raise InputError(f"{out}: {inside[0]} inside it is a mount point, and --force deletes the old OUT "
                             "with everything in it, the mounted files too; unmount it or choose another OUT")


def _mount_point(out: Path) -> str:
    return (f"{out}: is a mount point, and the model is installed by renaming a finished folder onto OUT, which "
            f"a mount point refuses; choose a folder inside it (e.g. {out / 'model'})")


def _make_parents(out: Path, given, made: List[Path]) -> None:
    """Makes OUT's missing parent folders, as mergekit does (os.makedirs): lists those made in `made`, outermost
    first, each as it is made (returned, a Ctrl-C before the caller kept them left them; an audit), which the
    writer's abort removes again if they are still empty. A file where a folder should be is refused,
    and so is a link to nothing on the way as the user wrote it (out_location resolved it: an unmounted disk's
    link would have had the model written onto the filesystem below)."""
    missing, p = [], out.parent
    while not p.is_dir():
        if os.path.lexists(p) or p.parent == p:  # a file, a folder that cannot be reached...
            raise InputError(f"{out}: parent folder {p} {_not_a_folder(p)}")
        missing.append(p)
        p = p.parent
    if missing:
        for q in Path(os.path.abspath(os.fspath(given))).parents:
            if os.path.islink(q) and not os.path.exists(q):
                raise InputError(f"{given}: {q} is a link to {os.readlink(q)}, which does not exist")
    for p in reversed(missing):
        with held_signals(repeat_acts=False):  # made and listed, or neither
            try:
                os.mkdir(p)
            except FileExistsError:
                if not p.is_dir():
                    raise InputError(f"{out}: parent folder {p} {_not_a_folder(p)}") from None
                continue  # another process made it: not ours to remove
            except OSError as exc:
                raise InputError(f"{out}: cannot create its parent folder {p}: {exc.strerror or exc}") from None
            made.append(p)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Removes the folders _make_parents made, innermost first, while they are empty."""
    remove_empty_folders(reversed(folders))


def _not_a_folder(path: Path) -> str:
    """Why OUT's parent is no folder to write in: missing, or a file (say) standing where it should be."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:  # ENOTDIR: a file stands where a folder above it should be
        return f"cannot be used: {exc.strerror or exc}"
    return "is a file, not a folder" if stat.S_ISREG(mode) else f"is {kind_of(mode)}, not a folder"


def _check_name(out: Path) -> None:
    try:
        name_max = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if len(os.fsencode(out.name)) > name_max:
        raise InputError(f"{short(out.name)}: the output folder's name is longer than the {name_max} "
                         f"bytes this filesystem allows")


def _beside(out: Path, tag: str) -> str:
    """'.<OUT's name><tag>', the prefix of the folders written beside OUT (a pid follows). A name
    near NAME_MAX is cut and hashed so that the prefix and the pid still fit in one name."""
    return f".{fitted_name(out.name, 1 + len(tag) + 30)}{tag}"  # a pid, or a pid, "-" and 8 hex digits


def _is_empty_dir(path: Path) -> bool:
    # A symlink counts as occupied: renaming a folder onto it fails, and replacing it needs --force.
    if path.is_symlink() or not path.is_dir():
        return False
    with os.scandir(path) as it:
        return next(it, None) is None


def _dump_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in a config.json): kept as the escape it was read from
        data = json.dumps(obj, indent=2).encode("ascii")
    with open(path, "wb") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())


# Temporary (and stepped-aside) folders this process's writers hold. Another folder named with this
# process's pid is stale: pids are reused (a container's merge is pid 1 every run), and one left by a
# killed run blocked every later run to the same OUT.
_OWNED: set = set()
_OWNED_LOCK = threading.Lock()  # held from a writer's stale-folder sweep until its own folder is listed
_LIVE: "weakref.WeakSet[ShardedWriter]" = weakref.WeakSet()  # part 0's writers: any still open at exit is aborted


@atexit.register
def _abort_live() -> None:
    """A writer still open as the interpreter exits (a script's top-level one whose write raised) was left to
    __del__ in the teardown, where builtins such as open are gone: the removal failed and the temporary folder,
    a model's size, stayed (an audit)."""
    for writer in list(_LIVE):
        try:
            writer.abort()  # (committed: a no-op; a forked child's copy: removes nothing)
        except Exception:  # noqa: BLE001  (exiting: the next writer for OUT sweeps what is left)
            pass


def _in_use(path: str, pid: int) -> bool:
    if _lock_held(path):  # a live writer, whose pid this process may not see (another namespace or host)
        return True
    # no lock held: a killed writer's, or one between creating its lock file and locking it (the pid says,
    # unless that lock file is older than any such moment: a process that took the dead writer's pid)
    return os.path.abspath(path) in _OWNED if pid == os.getpid() else _pid_alive(pid) and not _abandoned(path)


_LOCK_GRACE_S = 60.0  # a writer locks the file it made at once: unlocked for longer, it died


def _abandoned(folder: str) -> bool:
    """Whether folder's lock file exists, unlocked (checked first), and was made over _LOCK_GRACE_S ago."""
    try:
        made = os.stat(os.path.join(folder, _LOCK_NAME)).st_mtime
    except OSError:  # none: no locks on that filesystem, or a folder stepped aside
        return False
    # (a time ahead of now is clock skew, an NFS server's or a clock stepped back: one an hour ahead kept a killed
    # run's folder for that hour, one years ahead for good; an audit)
    return abs(time.time() - made) > _LOCK_GRACE_S


def _lock_file(tmp_dir: Path) -> Tuple[Optional[int], bool]:
    """Creates tmp_dir's lock file and tries to lock it without waiting: (its fd, whether locked), the fd held
    while the writer lives (the kernel releases the lock when the process dies, however it dies). Not locked: a
    sweep probing the new file holds it for an instant, and the caller waits. (None, True) where the filesystem has
    no locks: the file is removed, and peers judge the folder by its pid as before."""
    path = tmp_dir / _LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:
        return None, True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, True
    except BlockingIOError:
        return fd, False
    except OSError:  # no locks on this filesystem (ENOLCK, EOPNOTSUPP...)
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None, True


def _lock_held(folder: str) -> bool:
    """Whether a live writer holds folder's lock file (no file, or no locks on this filesystem: False)."""
    try:
        fd = os.open(os.path.join(folder, _LOCK_NAME), os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the close below
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _rename_onto_empty(tmp: Path, out: Path) -> bool:
    """Renames tmp to OUT, found missing or an empty folder (POSIX rename replaces an empty folder
    atomically). False where another writer filled OUT after that check (two merges into one empty
    folder): the caller goes on as for an OUT found full, so the error names OUT, not the temporary
    folder, and --force replaces it."""
    _keep_access(out, tmp)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):  # ENOTDIR: a file or link made there
            return False
        raise
    return True


def _keep_access(out: Path, tmp: Path) -> None:
    """A folder the user made for OUT (empty, or replaced with --force) keeps its group and its permission
    bits for group and others: the renamed temp folder had the umask's, which made a group-private OUT
    world-readable. The owner keeps rwx, so this writer can take its lock file out and a later --force
    can replace the model."""
    try:
        st = os.stat(out)  # a symlinked OUT: the folder it names
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    _copy_xattrs(out, tmp)  # first: a POSIX ACL carries the mode bits, which the chmod below then sets
    try:
        os.chown(tmp, -1, st.st_gid)
    except OSError:
        pass  # not a member of that group: the bits below still keep others out
    try:
        os.chmod(tmp, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    except OSError:
        pass


def _copy_xattrs(src: Path, dst: Path) -> None:
    """The folder's extended attributes too: a POSIX default ACL that shares a team's outputs (stored as
    system.posix_acl_default) was lost with the swapped folder, and so were user.* labels (an audit). Best
    effort: an attribute this user may not set (security.*) or a filesystem without them is skipped."""
    try:
        names = os.listxattr(src)
    except (OSError, AttributeError):  # none here, or no xattrs on this platform
        return
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError:
            pass


def _garbage_name(out: Path) -> Path:
    """A name beside OUT that only ever means garbage (the next writer for OUT removes it), this process's own."""
    return out.parent / f"{_beside(out, _DEL_TAG)}{os.getpid()}-{secrets.token_hex(4)}"


def _claim(path: str, out: Path) -> Optional[Path]:
    """Renames a stale folder to a garbage name of this process's own: None if another run took it first."""
    gone = _garbage_name(out)
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        return None
    return gone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True  # unsure: keep the folder
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed writer whose parent died too stays a zombie until init reaps it, and some
    container inits never do: it still answers kill(0) but writes nothing more. (A process whose
    main thread alone has exited also shows Z: it is alive while it has other threads.)"""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        state, threads = fields[b"State"].split()[0], int(fields[b"Threads"])
    except (OSError, KeyError, IndexError, ValueError):
        return False  # unsure: keep the folder
    return state in (b"Z", b"X") and threads <= 1


def _remove_stale(out: Path) -> None:
    """Clears what writers killed mid-run left beside OUT (their pid is gone): half-written temp
    folders go; an old OUT stranded aside by a crash mid-replace goes back if OUT is missing."""
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    prefixes = _leftover_prefixes(out)
    for e in entries:
        kind = _leftover(prefixes, e.name)
        if kind is None:
            continue
        tag, pid = kind
        if tag == _DEL_TAG:  # whoever left it
            _remove_tree(Path(e.path), ignore_errors=True)  # another run may be deleting it too
        elif _in_use(e.path, pid):
            continue
        elif tag == _OLD_TAG and not os.path.lexists(out):
            try:
                os.rename(e.path, out)
            except FileNotFoundError:  # another run put it back first
                pass
        elif os.path.islink(e.path):
            try:
                os.unlink(e.path)
            except FileNotFoundError:  # another run's sweep took it
                pass
        else:  # claimed first: two runs sweeping one folder both deleted it (ENOENT)
            gone = _claim(e.path, out)
            if gone is not None:
                _remove_tree(gone, ignore_errors=True)


def _leftover_prefixes(out: Path) -> List[Tuple[str, str]]:
    return [(tag, _beside(out, tag)) for tag in (_DEL_TAG, _OLD_TAG, _TMP_TAG)]


def _leftover(prefixes: List[Tuple[str, str]], name: str) -> Optional[Tuple[str, Optional[int]]]:
    """(tag, pid) of an entry beside OUT named as a writer's leftover (pid None for garbage, whoever left it), or
    None. prefixes: _leftover_prefixes(OUT)."""
    for tag, prefix in prefixes:
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if tag == _DEL_TAG:
                return (tag, None) if _garbage_suffix(suffix) else None
            if _is_pid(suffix):
                return tag, int(suffix)
    return None


def swept_name(out: Path, name: str) -> bool:
    """Whether a writer for OUT sweeps an entry of that name beside OUT as a run's leftover (removes it, or puts it
    back as OUT; a live writer's it leaves alone, but it is no one else's either): an input there would be deleted
    before the merge read it."""
    return _leftover(_leftover_prefixes(out), name) is not None


def _is_pid(text: str) -> bool:
    """ASCII digits only: str.isdigit takes "²", which int() refuses (a stray folder beside OUT named so was a
    traceback on every merge into that folder; an audit)."""
    return text.isascii() and text.isdigit()


def _garbage_suffix(suffix: str) -> bool:
    pid, _, token = suffix.partition("-")
    return _is_pid(pid) and (not token or all(c in "0123456789abcdef" for c in token))


def _identity(path: Path):
    """(device, inode) of path itself (a link is not followed), or None where there is nothing."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Deletes a replaced or stale folder, never into a filesystem mounted inside it (a bind mount of a
    user's models in a container): such a folder is left where it is, garbage-named, for its owner."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.lexists(path) and not mounts_within(path):
        if ignore_errors:
            shutil.rmtree(path, ignore_errors=True)
        elif sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda func, p, exc: _unless_gone(exc))
        else:
            shutil.rmtree(path, onerror=lambda func, p, info: _unless_gone(info[1]))


def _unless_gone(exc: BaseException) -> None:
    """rmtree's error, except for an entry already gone: another run's sweep of a garbage-named folder may be
    deleting it too (this run then said it could not delete a folder that was gone a moment later; an audit)."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _remove_whole(path: Path) -> None:
    """_remove_tree, finished even where an interrupt lands inside it (torchrun's SIGTERM to a rank already
    aborting left 16,733 of 20,001 files behind, and a second abort did nothing); the interrupt is raised after."""
    interrupted = None
    while True:
        try:
            _remove_tree(path)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def working_folder_within(out) -> Optional[str]:
    """OUT's absolute path where this process's working folder is OUT, an existing folder, or lies inside it,
    else None. Read before the install: it renames a new folder onto that path, so a shell started there (`cd out
    && pymerge merge ../c.yml .`) still looks at the old one, deleted, and sees nothing (an audit), and the
    working folder's path cannot be read once it is deleted. The merge says so (working_folder_note); filling
    OUT in place instead would leave half a model there if the process were killed midway."""
    try:
        cwd, where = os.path.realpath(os.getcwd()), os.path.realpath(out)
    except OSError:
        return None
    inside = os.path.isdir(where) and (cwd == where or cwd.startswith(where.rstrip(os.sep) + os.sep)
                                       or is_or_inside(cwd, where))  # (a bind mount's other path)
    return os.path.abspath(out) if inside else None


def working_folder_note(out) -> str:
    return (f"{out} is a new folder holding the model: a shell whose working folder was {out} (or one inside it) "
            f"still shows the old one, now deleted; `cd {out}` there to see the model")


MOUNTINFO = "/proc/self/mountinfo"
PARTS_VISIBLE_S = 5.0  # how long part 0 looks for the other parts' shards (a network filesystem shows them late)


def mounts_within(path) -> List[str]:
    """Mount points at or below path: from /proc/self/mountinfo where there is one (a bind mount within one
    disk has the same st_dev as its parent folder, which os.path.ismount cannot see), else by walking."""
    root = os.path.realpath(path)
    below = root.rstrip("/") + "/"
    try:
        with open(MOUNTINFO, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = None
    if lines is not None:
        found = []
        for line in lines:
            fields = line.split(b" ")
            if len(fields) > 4:  # the 5th field is the mount point, with space, tab, newline and backslash as octal escapes
                point = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4]))
                if point == root or point.startswith(below):
                    found.append(point)
        return found
    found = [root] if os.path.ismount(root) else []
    for folder, dirs, _ in os.walk(root):
        mounted = [d for d in dirs if os.path.ismount(os.path.join(folder, d))]
        found += [os.path.join(folder, d) for d in mounted]
        dirs[:] = [d for d in dirs if d not in mounted]  # (not into a mounted network share)
    return found


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    data = data.cast("B")
    while len(data):
        n = os.pwrite(fd, data[:_MAX_PWRITE], pos)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data, pos = data[n:], pos + n


def _load_sync_file_range():
    fn = getattr(os, "sync_file_range", None)
    if fn is not None:
        return fn
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = getattr(os, "SYNC_FILE_RANGE_WRITE", 2)


def _start_writeback(fd: int, pos: int, nbytes: int) -> None:
    """Starts writing the range to disk without waiting for it (Linux sync_file_range), so the
    fsync at commit has little left to do. Only a hint: durability still comes from that fsync."""
    if _SYNC_FILE_RANGE is None:
        return
    try:
        _SYNC_FILE_RANGE(fd, pos, nbytes, _SYNC_FILE_RANGE_WRITE)  # ctypes: an error is a -1, ignored
    except OSError:
        pass


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2). False where the OS or filesystem can't."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
