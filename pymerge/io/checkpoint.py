"""One model on disk, as a flat set of named tensors across its shards.

Accepts what Hugging Face writes: a folder with model.safetensors, or shards listed in
model.safetensors.index.json, or (fallback, for old checkpoints) pytorch_model.bin and its
index; or a single .safetensors (or .bin) file. The index and the shards must agree exactly:
every mismatch is a CheckpointError naming the file and the tensor.

torch is imported only where needed: for .bin files and for tensor(); info() and array() (the
tensor's bytes as a numpy view) of safetensors files need none.
"""
import errno
import mmap
import os
import pickle
import re
import stat
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pymerge import _native
from pymerge.errors import CheckpointError, short
from pymerge.io.files import (LFS_ADVICE, LFS_POINTER, check_file_or_folder, identity, kind_of, read_json,
                              present, regular_file, stays_inside, unencodable)
from pymerge.io.safetensors_file import MAX_DIMS, SafetensorsFile, TensorInfo, madvise
from pymerge.io.sigbus import stamp as _stamp
from pymerge.warning_filters import ignoring

_MAX_EXPANDED = 16 << 20  # bytes an expanded .bin tensor may claim (each read copies it out whole)
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class TorchFile:
    """A torch.save'd state dict (pytorch_model.bin), with SafetensorsFile's read interface.

    Loaded with mmap=True and weights_only=True: no arbitrary code runs and tensors stay on disk
    until touched. There is no per-tensor file offset, so TensorInfo.file_offset is -1.
    """

    def __init__(self, path):
        import torch
        self.path = Path(path)
        self.metadata = None
        with regular_file(self.path):  # a FIFO or a device: refused before torch opens it
            pass
        st = os.stat(self.path)
        # the file torch maps, as it was: pymerge/io/sigbus.py tells a cut or an in-place rewrite from these
        self.mapped_identity, self.mapped_stamp = (st.st_dev, st.st_ino), _stamp(st)
        mappable = _check_torch_format(self.path, st.st_size)
        try:
            state, mapped = _torch_load(self.path, mappable)
        except Exception as exc:  # torch.load raises OSError, RuntimeError, UnpicklingError, EOFError...
            raise CheckpointError(f"{self.path}: cannot load as a PyTorch checkpoint: {_load_problem(exc)}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: holds a {type(state).__name__}, not a state dict of tensors")
        from pymerge.io.safetensors_file import _encodable
        from pymerge.ops._memory import kind_problem, overlap_problem
        for name, t in state.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{self.path}: entry key {short(name)} is not a string (a tensor name)")
            if name == "__metadata__" or not _encodable(name):  # safetensors could not hold it in a merged file
                raise CheckpointError(f"{self.path}: tensor {short(name)}: the name is "
                                      + ("reserved by safetensors" if name == "__metadata__" else
                                         "not text (a lone surrogate): safetensors cannot store it"))
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            if (problem := kind_problem(t)) is not None:  # sparse, nested, quantized, meta
                raise CheckpointError(f"{self.path}: tensor {name!r} {problem}")
            if (dtype := _native.dtype_name(t.dtype)) not in _native.DTYPE_INFO:  # complex128, bits8, uint3...
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            if t.numel() * t.element_size() > _MAX_EXPANDED and overlap_problem(t) is not None:
                # an expanded tensor: a few stored bytes that would be copied out to all it claims (a 2 KB file
                # of "1 GiB"). Small ones (a buffer saved as arange(8).expand(4, 8)) load as torch loads them.
                raise CheckpointError(f"{self.path}: tensor {name!r}: shape {list(t.shape)} with strides "
                                      f"{list(t.stride())} puts several elements on one stored value (an expanded "
                                      f"tensor of {t.numel() * t.element_size()} bytes); a checkpoint stores each "
                                      f"element")
            if t.dim() > MAX_DIMS:
                raise CheckpointError(f"{self.path}: tensor {name!r}: shape has {t.dim()} dimensions; pymerge "
                                      f"supports at most {MAX_DIMS}")
        self._state: Optional[dict] = state
        self._range = _mapping_of(self.path, state, st) if mapped else None
        self.in_memory = not mapped  # read whole into RAM (the legacy format, a compressed zip): held as long as open

    def mapped_range(self) -> Optional[Tuple[int, int]]:
        """(address, length) of torch's memory map of the file (for pymerge/io/sigbus.py), or None where
        torch read the file whole (the legacy format) or the map cannot be located."""
        self._require_open()
        return self._range

    def names(self) -> List[str]:
        return list(self._require_open())

    def __contains__(self, name) -> bool:
        return name in self._require_open()

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name, _native.dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size(), -1)

    def tensor(self, name: str):
        # Same contract as safetensors: contiguous (a tied or transposed view gets copied once).
        return self._get(name).contiguous()

    def byte_view(self, name: str):
        """The tensor's bytes as a flat uint8 torch tensor (as SafetensorsFile.byte_view)."""
        import torch
        t = self.tensor(name)
        return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)

    def array(self, name: str) -> np.ndarray:
        """The tensor's bytes as a flat, read-only uint8 numpy array (as SafetensorsFile.array)."""
        import torch
        t = self.tensor(name)
        if t.numel() == 0:
            return np.frombuffer(b"", dtype=np.uint8)
        a = t.reshape(-1).view(torch.uint8).numpy()
        a.flags.writeable = False
        return a

    def prefetch(self, name: str) -> None:
        """As SafetensorsFile.prefetch, on torch's map of the file (MADV_WILLNEED over the tensor's storage)."""
        self._advise(name, getattr(mmap, "MADV_WILLNEED", None))

    def release(self, name: str) -> None:
        """As SafetensorsFile.release: the storage's pages leave the process (MADV_DONTNEED). Only where the
        storage lies in torch's map of the file, whose pages this process never writes: they read back from
        the file if touched again (a storage another tensor shares). Without it a merge of .bin checkpoints
        held every page it had read, the whole model (a bug hunt)."""
        self._advise(name, getattr(mmap, "MADV_DONTNEED", None))

    def _advise(self, name: str, option) -> None:
        storage = self._get(name).untyped_storage()
        if option is None or self._range is None or storage.nbytes() == 0:
            return
        base, length = self._range
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not base <= start < end <= base + length:  # not in the map (cannot be, as located): leave it alone
            return
        start -= (start - base) % mmap.PAGESIZE  # madvise wants page-aligned starts; the map starts on a page
        madvise(start, end - start, option)

    def _get(self, name: str):
        state = self._require_open()
        if name not in state:
            raise CheckpointError(f"{self.path}: tensor {name!r}: no such tensor in this file")
        return state[name]

    def _require_open(self) -> dict:
        if self._state is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._state

    def close(self) -> None:
        self._state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_torch_format(path: Path, size: int) -> bool:
    """A git-lfs pointer, a file neither of torch.save's formats starts like, or a zip whose directory is
    damaged, named as such (torch's own error advised loading with weights_only=False, which pymerge never
    does). Returns whether torch may map it: a zip whose records are stored (as torch.save writes them) in this
    machine's byte order. A compressed record (a re-packed zip) must be inflated, and within the memory
    available (a 500 KB file claimed 512 MiB); a file saved in the other byte order (torch.save on s390x) is
    swapped in the map's private pages, which releasing a tensor's pages (MADV_DONTNEED) turned back into
    the file's unswapped bytes: a merge of NaN, exit 0."""
    with open(path, "rb") as fh:
        head = fh.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise CheckpointError(f"{path}: {LFS_ADVICE}")
    if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):  # a zip; the legacy pickle
        what = "is empty" if size == 0 else "is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy one)"
        raise CheckpointError(f"{path}: {what}")
    if not head.startswith(b"PK"):
        return True  # the legacy format (_torch_load reads it whole)
    try:  # a zip cut short lost its directory, at the end: torch said "[Errno 22] Invalid argument"
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
            order = [i for i in infos if i.filename.rsplit("/", 1)[-1] == "byteorder" and i.file_size <= 16]
            # no record: little-endian, as torch.load takes it (torch.serialization's default load endianness)
            byteorder = zf.read(order[0]).decode("ascii", "replace").strip() if order else "little"
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{path}: is not a complete PyTorch checkpoint: its zip archive is damaged "
                              f"(truncated or corrupted: {exc})") from None
    if packed:
        from pymerge.sizes import host_available
        inflated, free = sum(i.file_size for i in packed), host_available()
        if inflated > free:
            raise CheckpointError(f"{path}: its compressed records inflate to {inflated} bytes, more than the "
                                  f"{free} bytes of memory available")
    return not packed and byteorder == sys.byteorder


def _load_problem(exc: BaseException) -> str:
    """The reason in torch.load's error, without its advice: torch wraps a refused pickle's reason in advice
    to load it with weights_only=False, which would run the file's code (and pymerge never does)."""
    text = str(exc)
    if "Weights only load failed" in text or "WeightsUnpickler error:" in text:
        # torch raises "from None" but keeps its unpickler's own error as the context; else pick it from the text
        inner = exc.__context__
        reason = str(inner) if isinstance(inner, pickle.UnpicklingError) else _unpickler_reason(text)
        reason = reason.split(". Please")[0].strip().rstrip(".")  # torch's advice does not apply here
        if "weights_only" in reason or not reason:
            reason = "a pickled object other than tensors"
        return f"it holds more than tensors, and pymerge loads only tensors (weights_only): {reason}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unpickler_reason(text: str) -> str:
    """The line of a wrapped weights_only error that is the unpickler's, not torch's advice around it."""
    lines = [line.strip() for line in text.splitlines()]
    marked = [line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line]
    for line in [m for m in marked if m] + lines:
        if line.startswith("Weights only load failed."):
            line = line[len("Weights only load failed."):].strip()
        if line and not any(w in line for w in ("weights_only", "WeightsUnpickler", "Check the documentation",
                                                "This file can still be loaded")):
            return line
    return ""


def _torch_load(path: Path, mappable: bool):
    """(state dict, whether torch memory-mapped the file); mappable: _check_torch_format's answer."""
    import torch
    with ignoring(module=r"(torch|pymerge)(\.|$)"):  # torch's deprecation notes (TypedStorage, quantized...) are not
        if not mappable:                              # the user's (nor is any other thread's warning silenced)
            # A zip re-packed with compression (DEFLATE): torch maps a record's compressed bytes as the tensor's
            # (garbage, or "Trying to resize storage that is not resizable"); read without a map, it inflates them.
            # (And a file in the other byte order: see _check_torch_format.)
            return torch.load(path, weights_only=True, map_location="cpu"), False
        try:
            return torch.load(path, mmap=True, weights_only=True, map_location="cpu"), True
        except RuntimeError as exc:
            # Files from torch < 1.6 (the legacy, non-zip format) cannot be mapped: read them whole.
            if "zipfile" not in str(exc) and "mmap" not in str(exc):
                raise
            return torch.load(path, weights_only=True, map_location="cpu"), False



def _mapping_of(path: Path, state: dict, loaded: os.stat_result) -> Optional[Tuple[int, int]]:
    """Where torch.load(mmap=True) mapped the file: it maps the whole file once and every storage is a
    slice of that map at its zip record's data offset, so the map starts at (a storage's address - its
    record's offset). Every storage must agree, and where /proc/self/maps exists the map found there must
    be this file's, from its first byte; otherwise None (no guard: nothing is assumed). A storage longer
    than its record is a CheckpointError: mapped, torch does not check, and the tensor read the records
    after it. So is a file changed since `loaded` (its stat before torch mapped it): a cut then left this
    unable to read the zip, None, and every later read of the map unguarded, a SIGBUS (an audit)."""
    def unchanged() -> None:
        try:
            now = path.stat()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read again ({exc.strerror or exc})") from None
        # (the mtime, not the ctime: a chmod or a new hard link meanwhile is no change to refuse here)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != \
                (loaded.st_dev, loaded.st_ino, loaded.st_size, loaded.st_mtime_ns):
            raise CheckpointError(f"{path}: changed while it was being read (cut, rewritten or replaced); "
                                  "read it again once it is complete")
    storages = {}  # address -> (bytes, a tensor's name)
    for name, t in state.items():
        if t.untyped_storage().nbytes() > 0:
            storages.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), name))
    if not storages:
        return None
    unchanged()
    st = loaded
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            records = {}  # data offset -> bytes (0: an empty storage, or one cut to nothing)
            for info in zf.infolist():
                if "/data/" not in info.filename:
                    continue
                fh.seek(info.header_offset)
                local = fh.read(30)  # the local header: its name and extra-field lengths end at byte 30
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    except (OSError, zipfile.BadZipFile, ValueError):
        unchanged()  # (a cut while the records were read)
        return None  # not a zip torch can map
    # The first storage is at one of the records' offsets (the first with data, unless a record was cut
    # to nothing): the one at which every storage lands on a record locates the map.
    for offset in sorted(records, key=lambda o: (records[o] == 0, o)):
        begin = min(storages) - offset
        if all(0 <= p - begin < st.st_size and p - begin in records for p in storages):
            break
    else:
        return None
    for p, (nbytes, name) in storages.items():
        if records[p - begin] < nbytes:
            raise CheckpointError(f"{path}: tensor {name!r}: its data record holds {records[p - begin]} bytes where "
                                  f"the file says {nbytes} (a truncated or corrupt file)")
    if not _maps_file_at(begin, st):
        return None
    unchanged()  # the range below is the file as torch mapped it: the guard then sees a later cut
    return begin, st.st_size


def _maps_file_at(begin: int, st: os.stat_result) -> bool:
    """Whether the mapping at `begin` maps this file (device, inode) from offset 0. Without
    /proc/self/maps (not Linux) the zip records' agreement above is all there is: True."""
    try:  # bytes: a mapped file's path is any bytes (one not ASCII failed to decode under LC_ALL=C)
        with open("/proc/self/maps", "rb") as fh:
            lines = fh.readlines()
    except OSError:
        return True
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        start, _, end = fields[0].partition(b"-")
        if int(start, 16) == begin:
            major, _, minor = fields[3].partition(b":")
            return (int(fields[2], 16) == 0 and int(fields[4]) == st.st_ino
                    and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev)
    return False


def open_tensor_file(path):
    """A SafetensorsFile for .safetensors, a TorchFile for .bin/.pt/.pth (any case, as transformers and mergekit
    read them: a shard named .BIN was read as safetensors, "header length exceeds the limit"); any other name by
    its first bytes (a zip: torch.save's; else safetensors, whose errors then say what is wrong)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in _TORCH_SUFFIXES:
        return TorchFile(path)
    with regular_file(path) as fd:  # a FIFO: refused, not waited on (a plain open blocked for a writer forever)
        try:
            zipped = os.read(fd, 4) == b"PK\x03\x04"
        except OSError:
            zipped = False  # (the reader's own open names the problem)
    return TorchFile(path) if zipped else SafetensorsFile(path)


def check_folder_unchanged(folder, taken) -> None:
    """CheckpointError where folder is no longer the one whose identity was `taken` (None: not taken)."""
    if taken is not None and identity(folder) != taken:
        raise CheckpointError(f"{folder} was replaced while it was being merged (another program wrote a model "
                              "there); run the merge again")


class FolderSnapshot:
    """A folder's identity and its files' as a merge opened it. The merge reads config.json, the tokenizer and other
    side files by path long after it opened the shards: save_pretrained, rsync or a download renaming new files
    over them meanwhile gave an output with one version's tensors and the other's config (an audit). check(paths)
    names the first of the files read that is not the one snapshotted (replaced, rewritten, gone or new).
    A folder that cannot be listed (a shared one of mode 711) or holds more than _SCAN_LIMIT entries (a single-file
    checkpoint in a busy folder) is not scanned: only the files note() stamped are compared then."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.identity = identity(self.folder)
        self.files = {}  # name -> (device, inode, size, mtime, ctime) of each regular file in it, links followed
        self.complete = False  # every file of the folder is in files (absent there: absent at the snapshot)
        try:
            with os.scandir(self.folder) as entries:
                for n, entry in enumerate(entries):
                    if n == _SCAN_LIMIT:
                        break
                    now = _file_stamp(entry.path)
                    if now is not None:
                        self.files[entry.name] = now
                else:
                    self.complete = True
        except OSError:
            pass
        if not self.complete:
            self.files = {}

    def had(self, path) -> bool:
        """Whether the file was there, stamped, when the folder was snapshotted."""
        return self.files.get(Path(path).name) is not None

    def note(self, path) -> None:
        """Stamps one file of the folder where it was not scanned (the shards, config.json: named, not listed)."""
        if not self.complete:
            self.files.setdefault(Path(path).name, _file_stamp(path))

    def check(self, paths: Sequence = ()) -> None:
        check_folder_unchanged(self.folder, self.identity)
        for p in paths:
            p = Path(p)
            if p.parent != self.folder:  # another folder's (a tokenizer source's), or a subfolder's
                continue
            if not self.complete and p.name not in self.files:  # never stamped: nothing to compare with
                continue
            if _file_stamp(p) != self.files.get(p.name):
                raise changed_while_merged(p)


def changed_while_merged(path) -> CheckpointError:
    return CheckpointError(f"{path}: was replaced or rewritten while it was being merged (another program wrote "
                           "there: a save_pretrained, a download, an rsync); run the merge again")


_SCAN_LIMIT = 4096  # entries a snapshot stamps: a model folder holds tens


def _file_stamp(path) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size) + _stamp(st) if stat.S_ISREG(st.st_mode) else None


def lora_hint(path: str) -> str:
    """For a missing path that is MODEL+LORA of two that exist (pymerge merge's reference, given where only
    checkpoints are read: "no such file or folder" alone left the user looking at two folders that exist)."""
    model, plus, adapter = path.rpartition("+")
    if plus and os.path.exists(model) and os.path.isdir(adapter):
        return ("; MODEL+LORA references are read by pymerge merge only: merge the adapter into a checkpoint "
                "first (pymerge merge with merge_method: passthrough and model: MODEL+LORA)")
    return ""


class Checkpoint:
    """A model's tensors across its shards. names() is the order a streaming merge should walk:
    shards in (sorted) file-name order, each in file order."""

    def __init__(self, source):
        self.path = Path(source)
        self._shards: list = []
        self._where: Dict[str, object] = {}
        self.side_reads: set = set()  # its files read by path after it was opened (note_read): config.json
        self.index_file: Optional[Path] = None  # the index the shards were listed by, where there is one
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder{lora_hint(str(source))}")
        check_file_or_folder(self.path)
        try:
            if self.path.is_dir():
                self.folder = self.path
                # a symlinked folder: the one it names. Kept: check_unchanged compares it once the merge has
                # read config.json and the tokenizer, which it reads by path after the shards are open
                self.snapshot = FolderSnapshot(self.path)
                self._open_folder()
                if identity(self.path) != self.snapshot.identity:  # shards opened by path: some from each folder
                    raise CheckpointError(f"{self.path}: the folder was replaced while its shards were being "
                                          "opened (another program wrote a model there); try again")
            else:
                self.folder = self.path.parent
                self.snapshot = FolderSnapshot(self.folder)  # its config.json and tokenizer are read from there
                shard = open_tensor_file(self.path)
                self._shards.append(shard)
                for name in shard.names():
                    self._where[name] = shard
        except BaseException:
            self.close()
            raise
        for f in [*self.files, self.index_file, self.folder / "config.json"]:
            if f is not None:
                self.snapshot.note(f)
        self._names = [n for s in self._shards for n in s.names()]
        refuse_quantized(str(self.path), self._names, lambda n: self.info(n).dtype_name, self.close)

    def _open_folder(self) -> None:
        # Hugging Face's own preference: safetensors over pickles, a single file over an index.
        unusable = None  # the first name present but not a file: why, where nothing else loads
        for name, index in ((SAFETENSORS_NAME, False), (SAFETENSORS_INDEX, True),
                            (BIN_NAME, False), (BIN_INDEX, True)):
            p = self.path / name
            if p.is_file():
                return self._open_index(p) if index else self._open_single(p)
            if unusable is None and os.path.lexists(p):
                unusable = p
        if unusable is not None:  # (a broken single file beside a good index loads the index)
            try:
                why = f"is {kind_of(os.stat(unusable).st_mode)}, not a regular file"
            except OSError as exc:  # an interrupted download leaves a snapshot's link to a blob never written
                why = (f"is a link that leads back to itself (through {os.readlink(unusable)})" if exc.errno == errno.ELOOP
                       else f"is a broken link to {os.readlink(unusable)} (an incomplete download?)")
            raise CheckpointError(f"{unusable}: {why}")
        raise CheckpointError(f"{self.path}: no {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {BIN_NAME} "
                              f"or {BIN_INDEX} in this folder")

    def _open_single(self, p: Path) -> None:
        shard = open_tensor_file(p)
        self._shards.append(shard)
        self._where = {n: shard for n in shard.names()}

    def _open_index(self, index_path: Path) -> None:
        self.index_file = index_path
        weight_map = _read_weight_map(index_path)
        by_shard: Dict[str, List[str]] = {}
        for name, fname in weight_map.items():
            by_shard.setdefault(fname, []).append(name)
        for fname in sorted(by_shard):
            p = self.path / fname
            why = unencodable(str(p))  # (lexists said False: "missing", a shard that is there under an ASCII locale)
            if why is not None:
                raise CheckpointError(f"{index_path}: shard {why}")
            if not present(p):  # a FIFO or a folder there: open_tensor_file says which
                # (a hub cache snapshot: a download stopped before that shard; its blob may be left .incomplete)
                hint = "; an incomplete download? download it again" if self.path.parent.name == "snapshots" else ""
                raise CheckpointError(f"{index_path}: shard {fname!r} (holding tensor {by_shard[fname][0]!r}) "
                                      f"is missing{hint}")
            shard = open_tensor_file(p)
            self._shards.append(shard)
            for name in shard.names():
                if name in self._where:
                    raise CheckpointError(f"{p}: tensor {name!r} is also in {self._where[name].path.name}")
                self._where[name] = shard
        for name, fname in weight_map.items():
            shard = self._where.get(name)
            if shard is None or shard.path.name != fname:
                raise CheckpointError(f"{self.path / fname}: tensor {name!r}: listed in {index_path.name} "
                                      f"but not in this shard")
        for name, shard in self._where.items():
            if name not in weight_map:
                raise CheckpointError(f"{shard.path}: tensor {name!r}: in this shard but not listed in "
                                      f"{index_path.name}")

    def check_unchanged(self, read: Sequence = ()) -> None:
        """Raises CheckpointError if the folder is no longer the one whose shards were opened, or if its shards,
        index, the files read by path (note_read: config.json) or the files in `read` (what the merge copied)
        changed since. The open shards keep reading the old files, but config.json, the tokenizer and remote code
        are read by path later: another merge replacing the folder (--force) or a save_pretrained over its files
        in between gave an output with one version's tensors and the other's side files. A merge calls this after
        reading them all."""
        check_folder_unchanged(self.folder, self.snapshot.identity)  # the folder first: what replaced it says more
        for shard in self._shards:  # the file opened, where the folder was not scanned before it was
            was = getattr(shard, "mapped_identity", None)
            if was is not None and identity(shard.path) != was:
                raise changed_while_merged(shard.path)
        index = [self.index_file] if self.index_file is not None else []
        # what was read only: a file the merge never read changing or appearing (a download adding
        # generation_config.json to a hub snapshot) refused merges whose output was whole (an audit)
        self.snapshot.check([*self.files, *index, *sorted(self.side_reads), *read])

    def note_read(self, path) -> None:
        """path, a file of this model read by path (config.json), is compared by check_unchanged."""
        self.side_reads.add(Path(path))

    # ---- access -----------------------------------------------------------------------------
    def names(self) -> List[str]:
        return list(self._names)

    def __contains__(self, name) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._names)

    def _shard(self, name: str):
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r}: not in this checkpoint") from None

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def tensor(self, name: str):
        """A read-only torch view of the tensor (imports torch)."""
        return self._shard(name).tensor(name)

    def byte_view(self, name: str):
        """The tensor's bytes as a flat, zero-copy torch uint8 view (see SafetensorsFile.byte_view)."""
        return self._shard(name).byte_view(name)

    def array(self, name: str) -> np.ndarray:
        """The tensor's bytes as a flat, read-only uint8 numpy view (no torch for safetensors)."""
        return self._shard(name).array(name)

    def head(self, name: str, n: int, at: int = 0) -> bytes:
        """The tensor's n bytes from byte `at`, without reading around them where the file allows (SafetensorsFile.head)."""
        return head_bytes(self._shard(name), name, n, at)

    def file_of(self, name: str) -> Path:
        return self._shard(name).path

    def prefetch(self, name: str) -> None:
        self._shard(name).prefetch(name)

    def release(self, name: str) -> None:
        self._shard(name).release(name)

    @property
    def shards(self) -> list:
        """The open tensor files (SafetensorsFile or TorchFile), in the order names() walks them."""
        return list(self._shards)

    @property
    def files(self) -> List[Path]:
        """The tensor files, in the order names() walks them."""
        return [s.path for s in self._shards]

    @property
    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._names)

    def close(self) -> None:
        for s in self._shards:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Checkpoint({str(self.path)!r}, {len(self._where)} tensors in {len(self._shards)} files)"


_SCALE_SUFFIXES = ("_scale_inv", "_scale", "_scale_2", ".absmax")  # DeepSeek-V3's; compressed-tensors' and
#                                                                    ModelOpt's; bitsandbytes 4-bit's (any dtype)
_PACKED_SUFFIXES = (".qweight", ".weight_packed", ".W_q")  # GPTQ's and AWQ's; compressed-tensors'; HQQ's


def refuse_quantized(label: str, names, dtype_of, cleanup=None) -> None:
    """A CheckpointError for a quantized checkpoint, whose stored values are not the weights: a float8 or integer
    tensor with its scales beside it (X.weight and X.weight_scale_inv: the weights are value x scale, per block;
    compressed-tensors' int8 X.weight_scale; bitsandbytes' X.weight.absmax or X.SCB) or packed integers (GPTQ's and
    AWQ's X.qweight, compressed-tensors' X.weight_packed, HQQ's X.W_q). Merged as they were, float8 ones gave a model
    off by up to 55 % once dequantized and integer ones half a merge (the scales merged, the integers left), exit 0
    (audits; mergekit crashes or does the same). Plain float8 tensors merge as any float, integer buffers as
    before."""
    have = set(names)
    for name in names:
        how = _quantized(name, have, dtype_of)
        if how is not None:
            if cleanup is not None:
                cleanup()
            raise CheckpointError(f"{label}: tensor {name!r} {how}: a quantized checkpoint, whose stored values "
                                  "are not the weights; dequantize it first")


def _quantized(name: str, have: set, dtype_of) -> Optional[str]:
    """How tensor `name` is stored quantized (refuse_quantized), or None."""
    dtype = _dtype_of(dtype_of, name)
    if dtype is None or (_native.is_floating(dtype) and not dtype.startswith("float8")):
        return None
    scales = [name + s for s in _SCALE_SUFFIXES] + ([name[:-len("weight")] + "SCB"] if name.endswith(".weight") else [])
    scale = next((s for s in scales if s in have), None)
    if scale is not None:
        return f"is {dtype} with its scales in {scale!r}"
    if not dtype.startswith("float8") and name.endswith(_PACKED_SUFFIXES):
        return f"is {dtype}, packed"
    return None


def _dtype_of(dtype_of, name: str) -> Optional[str]:
    try:
        return _native.dtype_name(dtype_of(name))
    except KeyError:  # a dtype the table does not know
        return None


def _read_weight_map(index_path: Path) -> Dict[str, str]:
    index = read_json(index_path, unique_keys=True)  # a tensor listed twice: the last entry won, silently
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    names = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{index_path}: tensor {name!r}: shard {short(fname)} is not a file name")
        p = Path(fname)  # "./x.safetensors" is x.safetensors, as transformers' and mergekit's os.path.join read it
        # Shards live in the folder itself; anything else is either corrupt or an attempt to escape it.
        if p.is_absolute() or len(p.parts) != 1 or p.name in (".", ".."):
            raise CheckpointError(f"{index_path}: tensor {name!r}: shard {short(fname)} is not a plain file name "
                                  f"in this folder")
        names[name] = p.name
    return names


def head_bytes(source, name: str, n: int, at: int = 0) -> bytes:
    """A tensor's n bytes from byte `at` (its first n by default) from any checkpoint-like source: its head() where
    it has one (read without reading around them: SafetensorsFile.head), else its array's."""
    head = getattr(source, "head", None)
    if head is not None:
        return head(name, n, at) if at else head(name, n)
    raw = np.ascontiguousarray(source.array(name)).reshape(-1).view(np.uint8)
    return bytes(raw[max(at, 0):max(at, 0) + max(n, 0)])


def _prefix_hint(name: str, have) -> str:
    """Where the other checkpoint holds the same tensor under a prefix more or less (GPT-2's own checkpoints
    say h.0.attn..., those transformers saves transformer.h.0.attn...), says so: the bare "missing tensor"
    left users guessing (an audit)."""
    for other in have:
        if other.endswith("." + name) or name.endswith("." + other):
            longer, shorter = (other, name) if len(other) > len(name) else (name, other)
            prefix = longer[:len(longer) - len(shorter)]
            return (f" (it names that tensor {other!r}: the two name their tensors with and without the prefix "
                    f"{prefix!r}, as GPT-2's original and transformers-saved checkpoints do; tensors merge by "
                    f"name, so save one of them again with the other's names)")
    return ""


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")
_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)(\.weight)?$")


def _layout_hint(name: str, have) -> str:
    """Where one checkpoint stores a mixture of experts per expert (experts.0.w1, what save_pretrained writes)
    and the other fused (experts.gate_up_proj, a state dict of transformers 5's module), says so: "missing
    tensor" named a tensor that is there, in another layout (an audit; mergekit converts, pymerge does not)."""
    mine, theirs = bool(_PER_EXPERT.search(name)), any(_FUSED_EXPERTS.search(n) for n in have)
    if not (mine and theirs) and not (_FUSED_EXPERTS.search(name) and any(_PER_EXPERT.search(n) for n in have)):
        return ""
    return (" (the two store their experts in different layouts, one per expert (experts.N.*) and one fused "
            "(experts.gate_up_proj, experts.down_proj); tensors merge by name: save one again in the other's "
            "layout, e.g. both through transformers' save_pretrained)")


def check_compatible(checkpoints: Sequence[Checkpoint], labels: Optional[Sequence[str]] = None,
                     names: Optional[Sequence[str]] = None, rows_may_differ=None) -> List[str]:
    """Checks the checkpoints can be merged tensor by tensor: same tensor names, same shapes
    (dtypes may differ). Returns the names in the first checkpoint's order. Tensors for which
    rows_may_differ(name) is true (a tokenizer merge's embeddings) may differ in their first axis.

    With ``names`` only those tensors are checked (each must be in every checkpoint; extra tensors
    elsewhere are ignored), and the result is ``names`` in the first checkpoint's order.
    """
    if not checkpoints:
        return []
    labels = [str(c.path) for c in checkpoints] if labels is None else list(labels)
    if len(labels) != len(checkpoints):
        raise ValueError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    first, first_label = checkpoints[0], labels[0]
    if names is None:
        wanted = first.names()
        for ck, label in zip(checkpoints[1:], labels[1:]):
            have = set(ck.names())
            missing = [n for n in wanted if n not in have]
            if missing:
                raise CheckpointError(f"{label}: missing tensor {missing[0]!r} that {first_label} has"
                                      + _and_more(missing) + (_prefix_hint(missing[0], have)
                                                              or _layout_hint(missing[0], have)))
            extra = [n for n in ck.names() if n not in first]
            if extra:
                raise CheckpointError(f"{label}: has tensor {extra[0]!r} that {first_label} lacks"
                                      + _and_more(extra))
    else:
        for ck, label in zip(checkpoints, labels):
            missing = [n for n in names if n not in ck]
            if missing:
                raise CheckpointError(f"{label}: missing tensor {missing[0]!r}" + _and_more(missing))
        asked = set(names)
        wanted = [n for n in first.names() if n in asked]
    for n in wanted:
        shape = first.info(n).shape
        for ck, label in zip(checkpoints[1:], labels[1:]):
            other = ck.info(n).shape
            if rows_may_differ is not None and rows_may_differ(n) and len(shape) and len(other) == len(shape):
                if other[1:] == shape[1:]:
                    continue
            if other != shape:
                raise CheckpointError(f"tensor {n!r}: shape {list(shape)} in {first_label}{_own_name(first, n)} "
                                      f"but {list(other)} in {label}{_own_name(ck, n)}")
    return wanted


def _own_name(ck, name: str) -> str:
    """Where a view renames its tensors (a slice's layer shifted into the output's numbering), the name the
    model's file gives it: the output's name alone pointed at the wrong layer of the model."""
    own = ck.source_name(name) if hasattr(ck, "source_name") else name
    return f" (its {own!r})" if own != name else ""


def _and_more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def read_model_config(ck: "Checkpoint") -> Optional[dict]:
    """The checkpoint's folder's config.json (read_config_json), noted as read where there is one (check_unchanged
    compares it then)."""
    cfg = read_config_json(ck.folder)
    note = getattr(ck, "note_read", None)
    if cfg is not None and note is not None:
        note(Path(ck.folder) / "config.json")
    return cfg


def read_config_json(folder) -> Optional[dict]:
    """A model folder's config.json as a dict, or None where there is none (one whose contents the output would
    carry: never a link out of the folder)."""
    path = Path(folder) / "config.json"
    if not present(path):
        return None
    if not stays_inside(folder, path):  # its contents go into the output: same rule as the tokenizer
        raise CheckpointError(f"{path}: is a link to a file outside the model folder; copy the file "
                              f"into the folder to use it")
    obj = read_json(path)  # refuses a FIFO or a device, and a link that leads nowhere
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: is not a JSON object")
    return obj
