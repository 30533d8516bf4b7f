"""Reads one .safetensors file: a strict header check, then zero-copy views over an mmap.

The checks follow the format's own library (header size limit, UTF-8 JSON, dtype x shape ==
byte span, offsets in bounds, contiguous, no overlap, no holes, no trailing bytes), so a file
we accept is a file `safetensors` accepts, and every failure is one line naming file and tensor.

Tensors handed out are read-only views of the mapping (writing into one crashes with SIGSEGV):
copy before modifying in place. They stay valid after close(): the mapping is unmapped only when
the last view is gone (torch.frombuffer keeps the mmap object alive).

Torch loads only for tensor() (and the torch-keyed tables): header checks, info() and array()
(a numpy view of the tensor's bytes) need none, so a CPU weighted-sum merge runs without it.
"""
import ctypes
import errno
import functools
import json
import math
import mmap
import os
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from pymerge import _native
from pymerge.errors import CheckpointError, InputError, short
from pymerge.io.files import (LFS_ADVICE, LFS_POINTER, fd_advice, more_open_files, open_regular, regular_file,
                              resource, retry_out_of_files)
from pymerge.io.sigbus import stamp as _stamp
from pymerge.stop_signals import held_signals
from pymerge.warning_filters import ignoring

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_DIMS = 64  # numpy's limit, and torch's reductions' (more raised "only tensors with up to 64 dims")


def _torch_tables():
    # safetensors dtype code -> torch dtype, and back. Float8/unsigned kinds only where this torch has them.
    import torch
    st = {code: getattr(torch, name) for code, name in _native.SAFETENSORS_TO_NAME.items() if hasattr(torch, name)}
    return {"SAFETENSORS_DTYPES": st, "TORCH_TO_SAFETENSORS": {v: k for k, v in st.items()}}


def __getattr__(name):
    # SAFETENSORS_DTYPES and TORCH_TO_SAFETENSORS: built, and torch imported, on first use.
    if name in ("SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS"):
        globals().update(_torch_tables())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Known to the format but not byte-addressable (sub-byte packing): named so the error is precise.
_UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")

_TENSOR_KEYS = frozenset(("dtype", "shape", "data_offsets"))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. file_offset is absolute in the file (-1 where there is no such offset).
    dtype_name is torch's name for the dtype ("bfloat16"); dtype, the torch dtype, imports torch."""
    name: str
    dtype_name: str
    shape: Tuple[int, ...]
    nbytes: int
    file_offset: int

    @property
    def dtype(self):
        return _native.torch_dtype(self.dtype_name)

    @property
    def safetensors_dtype(self) -> str:
        """The safetensors code ("BF16")."""
        return _native.DTYPE_INFO[self.dtype_name][2]

    @property
    def itemsize(self) -> int:
        return _native.DTYPE_INFO[self.dtype_name][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicate_keys(pairs):
    # json.loads would silently keep the last of two equal keys; a duplicated tensor name is corrupt.
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {short(k)}")
        out[k] = v
    return out


def _encodable(text: str) -> bool:
    """False for a string holding a lone surrogate ("\\ud800" in JSON decodes to one): not UTF-8 text."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class SafetensorsFile:
    """One validated .safetensors file. Use as a context manager or call close()."""

    def __init__(self, path):
        self.path = Path(path)
        self.metadata: Optional[Dict[str, str]] = None
        self._infos: Dict[str, TensorInfo] = {}
        self._names: List[str] = []
        self._mm = None  # an mmap.mmap, or a memoryview of a map that keeps no descriptor (then _address is its start)
        self._address: Optional[int] = None
        with regular_file(self.path) as fd:  # a FIFO or a device: refused, never read
            st = os.fstat(fd)
            size = st.st_size
            # the file mapped, as it was: pymerge/io/sigbus.py tells a cut or an in-place rewrite from these
            self.mapped_identity, self.mapped_stamp = (st.st_dev, st.st_ino), _stamp(st)
            self._parse(fd, size)
            self._mm = self._map(fd, size)  # a file of only a header still maps fine: it is at least 8 bytes long

    def _map(self, fd: int, size: int):
        """The file mapped read-only. Python's mmap keeps a descriptor of its own, which tells a cut file from its
        size (mapped_size); past half the open-file limit the maps keep none: every shard is mapped for the whole
        merge or pool, and 4 x 265 shards under a hard limit of 1024 were refused, where mergekit, which opens them
        lazily, merged them (an audit)."""
        with _KEPT_LOCK:  # the soft limit raised to the hard one first, where it can be
            keep = len(_KEPT) < _descriptor_budget() or (more_open_files() and len(_KEPT) < _descriptor_budget())
            if keep:
                try:  # EMFILE: the soft limit is raised once
                    mm = retry_out_of_files(lambda: mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
                except OSError as exc:
                    # EMFILE: the process's other files took the rest, mapped without one below; ENOMEM under an
                    # address-space limit: the error names no file
                    if exc.errno != errno.EMFILE:
                        raise self._error(f"cannot map the file into memory: {exc.strerror or exc}") from None
                else:
                    _KEPT.add(mm)
                    return mm
        return self._map_without_descriptor(fd, size)

    def _map_without_descriptor(self, fd: int, size: int) -> memoryview:
        """The file mapped by libc's mmap, read-only, as a memoryview that holds no descriptor: unmapped when the
        last view of it is gone."""
        try:
            libc = _libc()
        except OSError:  # no libc to load: a descriptor or nothing
            try:
                return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise self._error(f"cannot map the file into memory: {exc.strerror}{fd_advice(exc)}") from None
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            why = os.strerror(ctypes.get_errno())
            raise self._error(f"cannot map the file into memory: {why}") from None
        pages = (ctypes.c_ubyte * size).from_address(address)
        unmap = weakref.finalize(pages, libc.munmap, address, size)
        unmap.atexit = False  # at exit a daemon thread or an atexit handler may still read through a view
        self._address = address
        return memoryview(pages).cast("B").toreadonly()

    # ---- validation -------------------------------------------------------------------------
    def _error(self, problem: str, tensor: Optional[str] = None) -> CheckpointError:
        where = f"{self.path}: tensor {tensor!r}: " if tensor is not None else f"{self.path}: "
        return CheckpointError(where + problem)

    def _parse(self, fd: int, size: int) -> None:
        if size < 8:
            raise self._error(f"file is {size} bytes, too short for a safetensors header (needs 8)")
        first = os.pread(fd, len(LFS_POINTER), 0)
        if first == LFS_POINTER:
            raise self._error(LFS_ADVICE)
        n = int.from_bytes(first[:8], "little")
        # n comes from the file's first 8 bytes: never echoed, it would print a text file's contents.
        if n > MAX_HEADER_BYTES:
            raise self._error(f"not a safetensors file: the header length in its first 8 bytes exceeds "
                              f"the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise self._error(f"not a safetensors file (or truncated): the header length in its first 8 "
                              f"bytes runs past the end of the file ({size} bytes)")
        raw = os.pread(fd, n, 8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._error(f"header is not valid UTF-8 (byte {exc.start} of the header)") from None
        if not text.startswith("{"):
            raise self._error("header is not a JSON object (does not start with '{')")
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:  # JSONDecodeError and our duplicate-key check
            raise self._error(f"header is not valid JSON: {str(exc).splitlines()[0]}") from None
        except RecursionError:  # absurdly nested arrays: hostile, not a model
            raise self._error("header is not valid JSON: nested too deeply") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")

        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict):
                raise self._error(f"__metadata__ is a {type(meta).__name__}, not a map of strings")
            for k, v in meta.items():
                if not isinstance(v, str):
                    raise self._error(f"__metadata__ value of {short(k)} is a {type(v).__name__}, not a string")
                if not _encodable(k) or not _encodable(v):
                    raise self._error(f"__metadata__ entry {short(k)} holds a lone surrogate escape (not text)")
            self.metadata = meta

        data_size = size - 8 - n
        spans = []
        for name, entry in header.items():
            spans.append(self._check_entry(name, entry, data_size, 8 + n))
        self._check_layout(spans, data_size)

    def _check_entry(self, name: str, entry, data_size: int, data_start: int):
        if not _encodable(name):
            raise self._error("the tensor name holds a lone surrogate escape (not text; safetensors refuses it)", name)
        if not isinstance(entry, dict):
            raise self._error(f"entry is a {type(entry).__name__}, not an object", name)
        if set(entry) != _TENSOR_KEYS:
            missing, extra = sorted(_TENSOR_KEYS - set(entry)), sorted(set(entry) - _TENSOR_KEYS)
            what = "; ".join(filter(None, (missing and f"missing {missing}", extra and f"unexpected {extra}")))
            raise self._error(f"entry must have exactly dtype, shape, data_offsets ({what})", name)
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code in _UNSUPPORTED_DTYPES:
            raise self._error(f"dtype {code} (sub-byte) is not supported", name)
        if not isinstance(code, str) or code not in _native.SAFETENSORS_TO_NAME:
            raise self._error(f"unknown dtype {short(code)}", name)
        dtype = _native.SAFETENSORS_TO_NAME[code]
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
            raise self._error(f"shape {short(shape)} is not a list of non-negative integers below 2**63", name)
        if len(shape) > MAX_DIMS:
            raise self._error(f"shape has {len(shape)} dimensions; pymerge supports at most {MAX_DIMS}", name)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise self._error(f"data_offsets {short(offsets)} is not a pair of non-negative integers", name)
        begin, end = offsets
        if begin > end:
            raise self._error(f"data_offsets [{begin}, {end}] end before they begin", name)
        # multiplied left to right as safetensors does (checked usize products): [2**62, 2**62, 0] holds no bytes,
        # but the library refuses it, and so a file pymerge writes of it
        count = 1
        for d in shape:
            count *= d
            if count >= 2**64:
                break
        need = count * _native.DTYPE_INFO[dtype][0]
        if need >= 2**64:
            raise self._error(f"shape {_dims(shape)} overflows: the product of its sizes passes 2**64 (safetensors "
                              "refuses it, even where a later size is 0)", name)
        if end - begin != need:
            raise self._error(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but dtype {code} "
                       f"x shape {_dims(shape)} needs {need}", name)
        if end > data_size:
            raise self._error(f"data_offsets [{begin}, {end}] run past the end of the data region "
                       f"({data_size} bytes)", name)
        info = TensorInfo(name, dtype, tuple(shape), need, data_start + begin)
        return begin, end, info

    def _check_layout(self, spans, data_size: int) -> None:
        # Sorted by offset the tensors must tile [0, data_size) exactly. sort() is stable, so
        # zero-byte tensors sharing an offset keep header order.
        spans.sort(key=lambda s: (s[0], s[1]))
        pos, prev = 0, None
        for begin, end, info in spans:
            if begin < pos:
                raise self._error(f"data_offsets [{begin}, {end}] overlap tensor {prev!r}, which ends at {pos}",
                                  info.name)
            if begin > pos:
                after = f" after tensor {prev!r}" if prev is not None else ""
                raise self._error(f"data_offsets [{begin}, {end}] leave a hole of {begin - pos} bytes at {pos}{after}",
                                  info.name)
            pos, prev = end, info.name
            self._infos[info.name] = info
            self._names.append(info.name)
        if pos != data_size:
            last = f" after tensor {prev!r}" if prev is not None else ""
            raise self._error(f"{data_size - pos} trailing bytes{last} that no tensor covers")

    # ---- access -----------------------------------------------------------------------------
    def names(self) -> List[str]:
        """Tensor names in file (offset) order."""
        return list(self._names)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise self._error("no such tensor in this file", name) from None

    def tensor(self, name: str):
        """A read-only, zero-copy torch view of the tensor (a copy only where its offset is misaligned)."""
        import torch
        info = self.info(name)
        mm = self._require_open()
        if info.nbytes == 0:  # torch.frombuffer refuses count=0; there is nothing to share anyway. Reshaped:
            # torch.empty([0, 2**62, 2**62]) overflowed computing contiguous strides, a reshape does not
            return torch.empty(0, dtype=info.dtype).reshape(info.shape)
        raw = _frombuffer(mm, info.file_offset, info.nbytes)
        # The mapping is page-aligned, so the absolute offset decides alignment. safetensors pads the
        # header to 8 bytes but does not align offsets between tensors: a misaligned view would be
        # undefined behaviour for the kernels, so such a tensor is copied into aligned memory.
        if info.file_offset % info.itemsize:
            raw = raw.clone()
        return raw.view(info.dtype).reshape(info.shape)

    def byte_view(self, name: str):
        """The tensor's bytes as a flat, read-only, zero-copy torch uint8 view of the mapping, never
        copied (whatever the alignment): a sharded pool reads its slices from it, touching only their pages."""
        import torch
        info = self.info(name)
        mm = self._require_open()
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return _frombuffer(mm, info.file_offset, info.nbytes)

    def array(self, name: str) -> np.ndarray:
        """The tensor's bytes without torch: a read-only, zero-copy, flat uint8 numpy view of the
        mapping (an aligned copy where the offset is misaligned for the dtype, as tensor() does).
        The view keeps the mapping alive after close()."""
        info = self.info(name)
        mm = self._require_open()
        if info.nbytes == 0:
            return _empty_bytes()
        raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.file_offset)
        if info.file_offset % info.itemsize:
            raw = raw.copy()
            raw.flags.writeable = False
        return raw

    def head(self, name: str, n: int, at: int = 0) -> bytes:
        """The tensor's n bytes from byte `at` (its first n by default; fewer where it ends first), read with pread
        and no readahead: a page fault on the map reads the disk's whole readahead window around it (8 MiB on a
        machine an audit used), so the ranks' sample of 64 tensors per checkpoint read most of each file on every
        rank."""
        info = self.info(name)
        mm = self._require_open()
        at = min(max(at, 0), info.nbytes)
        n = min(n, info.nbytes - at)
        if n <= 0:
            return b""
        fd = None
        try:
            with held_signals(repeat_acts=False):  # (opened and kept, or neither)
                try:
                    fd = open_regular(self.path)
                except CheckpointError:  # deleted since, or no regular file there now (open_regular's OSError)
                    pass
            st = os.fstat(fd) if fd is not None else None
            if st is None or (st.st_dev, st.st_ino) != self.mapped_identity:
                return bytes(mm[info.file_offset + at:info.file_offset + at + n])  # the mapped file's, which a merge reads
            try:
                os.posix_fadvise(fd, info.file_offset + at, n, os.POSIX_FADV_RANDOM)
            except (AttributeError, OSError):  # advice only
                pass
            return os.pread(fd, n, info.file_offset + at)
        finally:
            if fd is not None:
                os.close(fd)

    def prefetch(self, name: str) -> None:
        """Asks the kernel to start reading the tensor's pages now (MADV_WILLNEED), so a streaming
        merge does not stall on page faults later. A no-op where madvise is unavailable."""
        self._advise(name, getattr(mmap, "MADV_WILLNEED", None))

    def release(self, name: str) -> None:
        """Drops the tensor's pages from this process (MADV_DONTNEED). Safe for a read-only shared
        file mapping: a later access reads them from the file (or page cache) again."""
        self._advise(name, getattr(mmap, "MADV_DONTNEED", None))

    def _advise(self, name: str, option) -> None:
        info = self.info(name)
        mm = self._require_open()
        if option is None or info.nbytes == 0:
            return
        start = info.file_offset - info.file_offset % mmap.PAGESIZE  # madvise wants page-aligned starts
        length = info.file_offset + info.nbytes - start
        if self._address is not None:
            madvise(self._address + start, length, option)
            return
        if not hasattr(mm, "madvise"):
            return
        try:
            mm.madvise(option, start, length)
        except OSError:
            pass

    def mapped_range(self) -> Tuple[int, int]:
        """(address, length) of the file's memory map (for pymerge/io/sigbus.py)."""
        mm = self._require_open()
        return np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0], len(mm)

    def mapped_size(self) -> Optional[int]:
        """The size of the mapped file now, through the map's own descriptor (a rename of the path to
        another file does not change it): smaller than the map when the file was cut (pymerge/io/sigbus.py).
        None where the map keeps no descriptor (more files than the open-file limit allows)."""
        mm = self._require_open()
        return None if self._address is not None else mm.size()

    def _require_open(self):
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._mm

    def close(self) -> None:
        # Drop our reference rather than mm.close(): mmap.close() succeeds even while torch views
        # exist, leaving them pointing at unmapped memory. The mapping goes when the last view does.
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SafetensorsFile({str(self.path)!r}, {len(self._names)} tensors)"

    def __reduce_ex__(self, protocol):  # (the mmap's own error named neither the object nor the file)
        raise TypeError(f"{self.path}: an open safetensors file (a Checkpoint's shard) cannot be copied or pickled; "
                        "open the path again where it is needed")


# The live maps that keep a descriptor of their own, counted by what lives: a counter drifted up with every Ctrl-C
# between its steps (and one inside its finalizer), until every map went without a descriptor (an audit).
_KEPT: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()
_KEPT_LOCK = threading.Lock()


def _renew_kept_lock() -> None:
    """In a forked child: a lock of its own (another thread of the parent may have held it at the fork)."""
    global _KEPT_LOCK
    _KEPT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_kept_lock)


def _descriptor_budget() -> int:
    """How many maps may keep a descriptor: half the soft open-file limit, the rest left to everything else."""
    if resource is None:
        return 512
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        return 512
    return (1 << 20) if soft == resource.RLIM_INFINITY else soft // 2


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    """libc's mmap, munmap and madvise, typed (OSError where there is no libc to load)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def madvise(address: int, length: int, option: int) -> None:
    """libc's madvise; advice only, so a refusal (or no libc) changes nothing."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return
    libc.madvise(address, length, option)


def _empty_bytes() -> np.ndarray:
    return np.frombuffer(b"", dtype=np.uint8)  # read-only, like the views


def _frombuffer(mm: mmap.mmap, offset: int, nbytes: int):
    import torch
    # torch warns that the buffer is not writable; read-only views are what we hand out, by design
    with ignoring(message="The given buffer is not writable"):
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)


def write_tensors(path, tensors, metadata: Optional[Dict[str, str]] = None, label=None) -> None:
    """Writes torch tensors as one safetensors file into the existing file at path, in place (safetensors'
    save_file renames a hidden temporary file of its own over path: a writer killed meanwhile left it behind,
    as large as the file, where nothing would sweep it). Tensors in the safetensors library's order (largest
    element size first, then by name: every tensor aligned to its element size). label: the file errors name
    (path, a temporary file, by default)."""
    import torch
    codes = _torch_tables()["TORCH_TO_SAFETENSORS"]
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:  # a file no reader (ours, the safetensors library's) would open: refused unwritten
        raise InputError(f"{label or path}: its header would be {len(raw)} bytes for {len(tensors)} tensors, more than "
                         f"the {MAX_HEADER_BYTES} bytes safetensors readers accept")
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            t = tensors[k].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
