"""Opening what a user names, safely: regular files only (a FIFO would block forever, a device
never end), bounded reads of small files, JSON without RecursionError.

Every failure is a CheckpointError (or the caller's error class) naming the path.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type

from pymerge.errors import CheckpointError, InputError, short
from pymerge.stop_signals import held_signals

try:  # imported now: once descriptors have run out, importing a module (opening its file) fails too
    import resource
except ImportError:  # not POSIX
    resource = None

MAX_SMALL_FILE = 100_000_000  # config.json, index, YAML: bigger is not a config, and would be read whole


def repeated_model(labelled_files, noun: str = "model") -> Optional[str]:
    """Why a list of (label, files read) cannot be merged as given, or None: one model listed twice under other
    spellings (./x, x/, a link to x, x/model.safetensors: the same files, links resolved) would silently count
    twice, and an index listing no file holds no tensors (two such were "the same")."""
    seen: Dict[frozenset, str] = {}
    for label, files in labelled_files:
        key = frozenset(os.path.realpath(f) for f in files)
        if not key:
            return f"{label}: holds no tensors (its index lists no file)"
        if key in seen:
            return f"{seen[key]} and {label} are the same {noun}; list it once"
        seen[key] = label
    return None


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def unencodable(path) -> Optional[str]:
    """Why path can name no file in this process (é where the locale's filesystem encoding is ASCII: LC_ALL=C
    without Python's UTF-8 mode), else None."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return (f"{path!r} cannot name a file under this locale (filesystem encoding {sys.getfilesystemencoding()}); "
                "use a UTF-8 locale (LC_ALL=C.UTF-8: LC_ALL outranks LANG) or PYTHONUTF8=1")
    except TypeError:  # not a path at all: the caller's own check says so
        return None
    return None


def text_path(path) -> Optional[str]:
    """path as the text a UTF-8 file (a YAML config) can hold, or None where its bytes are not UTF-8. Python decodes
    a path's bytes that its filesystem encoding cannot (any non-ASCII byte under LC_ALL=C without its UTF-8 mode;
    \\xff under any locale) to lone surrogates, which PyYAML writes as escapes its own loader refuses (an audit)."""
    try:
        path = os.fspath(path)
        if isinstance(path, str):
            path.encode("utf-8")  # text already, unless it holds lone surrogates
            return path
        return path.decode("utf-8")
    except TypeError:
        return None
    except UnicodeEncodeError:  # the surrogates stand for the bytes Python could not decode: are those UTF-8?
        pass
    except UnicodeDecodeError:
        return None
    try:
        return os.fsencode(path).decode("utf-8")
    except UnicodeError:
        return None


def present(path, error: Type[InputError] = CheckpointError) -> bool:
    """os.path.lexists, but only a name that is not there is absent: any other failure to look (EIO, EACCES) is an
    error naming the path. lexists said False: a donor's config.json or tokenizer on a failing disk was left out
    of the merge, exit 0 (an audit)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # no file has such a name
            return False
        raise error(f"{path}: cannot look it up: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the name: no file has it
        return False
    return True


def check_file_or_folder(path, error: Type[InputError] = CheckpointError) -> None:
    """A model path must be a regular file or a folder (symlinks followed); never a FIFO or device."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise error(f"{path}: cannot access: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise error(f"{path}: is {kind_of(mode)}, not a model file or folder")


def more_open_files() -> bool:
    """Raises this process's soft open-file limit to its hard one; whether it rose. A checkpoint is read
    with one descriptor per shard (an mmap keeps its own), held for the whole merge or pool, so a model
    of more shards than the soft limit (1024 is common) that pymerge itself wrote could not be read back."""
    if resource is None:
        return False
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft >= target:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return True
    except (ValueError, OSError):
        return False


def retry_out_of_files(fn):
    """fn(), once more after raising the open-file limit where it failed for want of descriptors."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno != errno.EMFILE or not more_open_files():
            raise
    return fn()


def fd_advice(exc: OSError) -> str:
    return " (raise the open-file limit: ulimit -n)" if exc.errno == errno.EMFILE else ""


def open_regular(path, error: Type[InputError] = CheckpointError) -> int:
    """A read-only fd of a regular file. O_NONBLOCK: opening a FIFO returns at once instead of
    waiting for a writer; fstat then refuses it (and any device) before a byte is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = retry_out_of_files(lambda: os.open(path, flags))
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):  # a hub snapshot's link to a blob never written
            cached = os.sep + "snapshots" + os.sep in os.path.abspath(path)
            raise error(f"{path}: is a broken link to {os.readlink(path)}"
                        f"{' (an incomplete download? download the model again)' if cached else ''}") from None
        raise error(f"{path}: cannot open: {exc.strerror or exc}{fd_advice(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: is {kind_of(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def regular_file(path, error: Type[InputError] = CheckpointError):
    """open_regular's descriptor for a with block, closed after it. Opened and kept as one step: a Ctrl-C as the
    open returned, before the caller's try, leaked the descriptor (an audit's Ctrl-C storm: a source's config.json,
    a tokenizer file copied, one per interrupt)."""
    fd = None
    try:
        with held_signals(repeat_acts=False):
            fd = open_regular(path, error)
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def kernel_folder(path) -> str:
    """The folder path is in, as the kernel finds it: "link/../x" is in the link target's parent, where
    os.path.abspath's textual ".." (and tempfile, which applies it to dir=) named another folder (an audit)."""
    return os.path.realpath(os.path.dirname(os.fspath(path)) or os.curdir)


def identity(path) -> Optional[tuple]:
    """(device, inode) of the file or folder at path (a link followed), or None where there is nothing (or a path
    no stat takes)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _identities_up(path) -> set:
    """(device, inode) of path where it exists and of every folder above it, symlinks resolved."""
    p, ids = os.path.realpath(path), set()
    while True:
        ident = identity(p)
        if ident is not None:
            ids.add(ident)
        parent = os.path.dirname(p)
        if parent == p:
            return ids
        p = parent


def same_place(a, b) -> bool:
    """Whether a and b name one existing file or folder (by device and inode: a bind mount's two paths too)."""
    ident = identity(a)
    return ident is not None and ident == identity(b)


def _anchored(path) -> tuple:
    """(device, inode) of the nearest existing folder at or above path, and the names below it."""
    p, below = os.path.realpath(path), []
    while True:
        ident = identity(p)
        parent = os.path.dirname(p)
        if ident is not None or parent == p:
            return ident, tuple(reversed(below))
        below.append(os.path.basename(p))
        p = parent


def same_entry(a, b) -> bool:
    """Whether paths a and b, existing or not, name one entry: the same names below one existing folder however it
    is reached (symlinks resolved; a bind mount's two paths alike)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    (ident, below), other = _anchored(a), _anchored(b)
    return ident is not None and (ident, below) == other


def is_or_inside(path, other) -> bool:
    """Whether path is the file or folder other, or lies inside it, as the kernel finds them: compared by device and
    inode, so a folder reached by two paths that no symlink explains (a bind mount, a container's volume mounted
    twice) is one folder. realpath strings alone let --force replace an input named through a bind mount, and
    delete the folder of inputs holding it (an audit). path need not exist; other must."""
    ident = identity(other)
    return ident is not None and ident in _identities_up(path)


def out_location(path) -> Path:
    """The folder an output path names, as the kernel finds it ("link/.." is the parent of the link's
    target, not the folder holding the link: abspath's textual ".." got that wrong). A last component
    that is a symlink to an empty folder is that folder (the model goes where the link points, as
    mergekit writes it; the link stays); any other link stays the link, so that --force replaces the
    link only (following it replaced whatever the folder held: `out -> .` emptied the user's folder)."""
    p = os.fspath(path)
    head, tail = os.path.split(p.rstrip(os.sep) or os.sep)
    if tail in ("", ".", ".."):
        return Path(os.path.realpath(p))
    where = Path(os.path.realpath(head or os.curdir)) / tail
    return Path(os.path.realpath(where)) if os.path.islink(where) and _empty_folder(where) else where


def _empty_folder(path) -> bool:
    try:
        with os.scandir(path) as entries:  # (a link followed)
            return next(entries, None) is None
    except OSError:  # not a folder, dangling, unreadable
        return False


def new_file_mode() -> int:
    """The mode open() gives a new file (0666 less the umask). Read from /proc: setting the umask to read
    it made, for that instant, every file another thread created world-writable."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # no /proc: the only other way, briefly 077 (never looser than a user's)
    os.umask(umask)
    return 0o666 & ~umask


def missing_folders(path: str) -> List[str]:
    """path and those of its parents that do not exist, deepest first: what os.makedirs(path) would make."""
    made, folder = [], os.path.realpath(path)  # ("link/..": the folders os.makedirs makes, as the kernel reads it)
    while not os.path.lexists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    return made


def remove_empty_folders(folders: Iterable) -> None:
    """Removes folders in the order given (deepest first) while each is empty: those a failed run made, without
    whatever was written there meanwhile."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def remove_by_name(folder, names: Iterable[str]) -> bool:
    """Removes the named files of folder, then folder, with no descriptor to list it with (rmtree needs two: a
    process out of descriptors left its temporary folders behind; audits). Whether folder went (not: a file of
    another name is there, or one could not be removed)."""
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        except OSError:
            return False
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True


_TMP_MARK = ".pymerge-tmp-"  # .<name>.pymerge-tmp-<random>: replace_file's temporary file for <name>


def fitted_name(name: str, room: int) -> str:
    """name, or, where it and `room` more bytes would pass NAME_MAX (255 bytes), its first 64 bytes and a hash of
    it: the base of the hidden names made beside a file or folder."""
    raw = os.fsencode(name)
    if len(raw) + room > 255:
        raw = raw[:64] + b"-" + hashlib.sha256(raw).hexdigest()[:16].encode()
    return os.fsdecode(raw)


def replace_file_prefix(name: str) -> str:
    """How the temporary files of replace_file(<folder>/name) begin (one a killed writer left is one of these). A
    name near NAME_MAX is cut and hashed, so that the prefix and mkstemp's 8 characters still fit in one name (a
    legal 250-byte state file could not be written: an audit)."""
    return f".{fitted_name(name, 1 + len(_TMP_MARK) + 8)}{_TMP_MARK}"


def replace_file(path: str, write: Callable[[str], None], install: Callable[[str, str], None] = os.replace) -> None:
    """write(tmp) into a temporary file beside path, then install(tmp, path) (a rename over it): a symlink at
    path is replaced, never written through (opening it for writing overwrote the user file it points to).
    write must fill tmp in place. The temporary file is flock-ed while it lives, so the next replace_file of
    path removes one a killed writer left (a search killed while saving its state, a pool while saving)."""
    check_replaceable(path)  # a FIFO or device would be replaced
    # (kernel_folder: tempfile makes a folder absolute as text; messages still name the path as given)
    folder, name = kernel_folder(path), os.path.basename(path)
    sweep_unlocked(folder, replace_file_prefix(name))
    fd = tmp = None
    try:
        # the file made and its descriptor kept, or neither: a Ctrl-C between the two left both (an audit)
        with held_signals(repeat_acts=False):
            try:
                fd, tmp = _locked_temporary(folder, replace_file_prefix(name))
            except OSError as exc:  # (it named the temporary file, which the user never chose)
                if exc.errno in (errno.EMFILE, errno.ENFILE):  # not the folder's fault
                    raise InputError(f"{path}: cannot open a file to write it: {exc.strerror}{fd_advice(exc)}") \
                        from None
                raise InputError(f"{path}: cannot create a file in {os.path.dirname(path) or os.curdir}: "
                                 f"{exc.strerror or exc}") from None
        write(tmp)
        # as open() would make it: mkstemp's 0600 would stay on the result
        os.chmod(tmp, new_file_mode())
        # the bytes on disk before the name points at them: after a crash, the old file or the new, never an
        # empty one (a search's state is rewritten every generation; ext4 and xfs may keep data in memory)
        os.fsync(fd)
        install(tmp, path)
        fsync_dir(folder)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            # a buffered write's or fsync's error names no file ("No space left on device"): the file being
            # written (its type and traceback kept)
            exc.filename = path
        raise
    finally:
        if fd is not None:
            with held_signals(repeat_acts=False):  # (removed and closed, or neither)
                try:
                    if os.path.lexists(tmp):  # an install by a hard link leaves tmp as a second name
                        os.remove(tmp)
                finally:
                    os.close(fd)


def _locked_temporary(folder: str, prefix: str):
    """A new file (descriptor, path) flock-ed by this process. Between mkstemp and flock another process's sweep
    may take it for a dead writer's and remove it: then another one."""
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return fd, tmp  # a filesystem without locks: nothing sweeps it there either (sweep_unlocked)
                # a sweep holds it this moment, and removes it: another one
            else:
                try:
                    if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                        return fd, tmp
                except OSError:  # (fstat cannot fail on an open fd; lstat's ENOENT: swept)
                    pass
        except BaseException:  # a Ctrl-C as it locked: the file, kept locked, was never swept in this process
            _remove_own(fd, tmp)
            raise
        os.close(fd)  # swept meanwhile
    raise InputError(f"{folder}: cannot keep a temporary file there (removed as soon as made)")


def _remove_own(fd: int, tmp: str) -> None:
    """Removes a temporary file this process made (still the file fd names), then closes fd."""
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
            os.remove(tmp)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_unlocked(folder: str, prefix: str, folders: bool = False, min_age_s: float = 0.0) -> None:
    """Removes what processes that died left in folder under prefix: replace_file's temporary files, or with
    folders=True, hidden folders (SearchResult.save's), whose flock is free. A locked one is a live writer's, in
    this process or another (any PID namespace or host the lock reaches); min_age_s spares one made a moment ago
    and not locked yet, where its maker does not check it afterwards as _locked_temporary does."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return
    for n in names:
        p = os.path.join(folder, n)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not (stat.S_ISDIR if folders else stat.S_ISREG)(st.st_mode) or (
                    min_age_s and abs(time.time() - st.st_mtime) < min_age_s):  # (ahead of now: clock skew)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises where a live writer holds it
            if os.path.samestat(os.fstat(fd), os.lstat(p)):  # (not one made at that name since)
                shutil.rmtree(p, ignore_errors=True) if folders else os.remove(p)
        except OSError:
            pass  # held, gone meanwhile, or no locks here: left alone
        finally:
            os.close(fd)


def fsync_dir(path) -> None:
    """A rename or a new file is durable only once its folder's entry is on disk too."""
    with held_signals(repeat_acts=False):  # (opened and closed, or neither: a Ctrl-C between leaked it; an audit)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on folders; nothing more we can do
        finally:
            os.close(fd)


_held_locks: dict = {}  # descriptors hold_lock returned and release_lock has not closed: the pid that locked each


def _close_held_in_child() -> None:
    """A forked child (a multiprocessing pool an evaluate() starts) shares its parent's locked descriptors:
    a child outliving the search kept the lock, and the next search in the parent was refused. Closing the
    child's copies leaves the lock to the parent alone."""
    for fd in list(_held_locks):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def lock_held(path) -> bool:
    """Whether another open file holds a flock on the regular file at path (hold_lock's), now; never made, never
    waited on, never followed through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # (the shared lock with it)


def hold_lock(path, busy: str, error: Type[InputError] = InputError, optional: bool = False,
              folder: bool = False) -> Optional[int]:
    """path (a folder, or a file made if absent, never through a link) opened and flock-ed exclusively without
    waiting: its descriptor, locked until release_lock(fd) or the process ends, however it ends (a forked
    child's copy is closed at the fork). error(busy) where another holder has it. None on a filesystem without
    locks (nothing is locked there, as before), and with optional=True where the lock file cannot be made
    (a read-only folder: whoever could write there could not lock it either). folder=True: path must be a folder
    (one removed since the caller made it is an error, never a file made in its place)."""
    flags = os.O_RDONLY | os.O_DIRECTORY if folder or os.path.isdir(path) else os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if folder and exc.errno in (errno.ENOENT, errno.ENOTDIR):  # (a failed search removes the folder it made)
            raise error(f"{path}: was removed or replaced as this began (by another program, or another pymerge "
                        "that failed); run it again") from None
        fd = None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not os.path.isdir(path):
            try:  # another user's lock file, or a read-only folder: flock needs no write access
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    fd = None
            except OSError:
                pass
        if fd is None:
            if optional and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise error(f"{path}: cannot open it to lock it: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _held_locks[fd] = os.getpid()
        return fd
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise error(busy) from None
        if exc.errno == errno.EBADF:  # NFS locks only a descriptor open for writing: not "no locks here"
            raise error(f"{path}: cannot lock it without write access on this filesystem; ask its owner, or "
                        "choose another path") from None
        return None  # ENOLCK, EOPNOTSUPP...
    except BaseException:  # a Ctrl-C as it locked: a lock kept by nobody refused every later user in this process
        _held_locks.pop(fd, None)
        os.close(fd)
        raise


def release_lock(fd: Optional[int]) -> None:
    """Closes a descriptor hold_lock returned (None: nothing was locked), releasing its lock. Unlocked first: a
    forked child shares the lock until it closes its copy, which its fork hook does only once the kernel runs it
    (on a busy machine the next search in the parent was refused), and one forked by native code never does.
    Only by the process that locked it: such a child, leaving a search, would have unlocked its parent's."""
    if fd is None:
        return
    with held_signals(repeat_acts=False):  # (unlocked and closed, or neither: a Ctrl-C between kept it locked)
        try:
            if _held_locks.pop(fd, None) == os.getpid():
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:  # (the close still releases this process's share)
            pass
        finally:
            os.close(fd)


def check_replaceable(path, error: Type[InputError] = InputError) -> None:
    """A path we are about to replace (write a temporary file, then rename it over the path) must be
    absent or a regular file: renaming over a FIFO or a device (/dev/null, as root) would replace it. A path
    ending in a separator names a folder (the temporary file beside it went into that folder, or failed there
    naming itself)."""
    if str(path).endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        raise error(f"{path}: ends in {os.sep!r}, a folder's name; name a file")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"{path}: cannot access: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {kind_of(mode)}, not a regular file; refusing to replace it")


def read_small(path, error: Type[InputError] = CheckpointError, limit: int = MAX_SMALL_FILE) -> bytes:
    """The whole of a small regular file (a config, an index): refuses FIFOs, devices, huge files."""
    return read_small_with_mode(path, error, limit)[0]


def read_small_with_mode(path, error: Type[InputError] = CheckpointError,
                         limit: int = MAX_SMALL_FILE) -> Tuple[bytes, int]:
    """read_small's bytes and the permission bits of the file they were read from (one open: a file replaced
    meanwhile gives the new one's bytes and mode, never one's bytes with the other's mode)."""
    with regular_file(path, error) as fd:
        try:
            st = os.fstat(fd)
            size, mode = st.st_size, stat.S_IMODE(st.st_mode)
            if size > limit:
                raise error(f"{path}: is {size} bytes; more than the {limit}-byte limit for this kind of file")
            chunks, total = [], 0
            with os.fdopen(fd, "rb", closefd=False) as f:
                # in pieces: read(limit + 1) would allocate the whole limit up front, for a file of any size
                while chunk := f.read(min(1 << 24, limit + 1 - total)):
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > limit:  # grew while we read
                        raise error(f"{path}: more than the {limit}-byte limit for this kind of file")
            return b"".join(chunks), mode
        except OSError as exc:
            raise error(f"{path}: cannot read: {exc.strerror or exc}") from None


class _TwiceInOneObject(Exception):
    pass


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _TwiceInOneObject(k)
        out[k] = v
    return out


class _NotJSON(Exception):
    pass


def _refuse_constant(name: str):
    raise _NotJSON(name)


def read_json(path, error: Type[InputError] = CheckpointError, unique_keys: bool = False, standard: bool = False):
    """A small JSON file, parsed; every problem (I/O, not UTF-8, not JSON, nested too deeply) is one line.
    unique_keys: a key given twice in one object is one too (json keeps the last, silently). standard: NaN,
    Infinity and -Infinity, which Python's json takes and strict parsers (the tokenizers library) refuse, too."""
    data = read_small(path, error)
    if data.startswith(LFS_POINTER):  # a clone without `git lfs pull` (an index.json can be stored in LFS too)
        raise error(f"{path}: is a git-lfs pointer (a small text file standing in for this one): run "
                    f"`git lfs pull` where the model was cloned")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys if unique_keys else None,
                          parse_constant=_refuse_constant if standard else None)
    except _NotJSON as exc:
        raise error(f"{path}: holds {exc.args[0]}, which is not JSON (strict readers refuse the file)") from None
    except _TwiceInOneObject as exc:
        raise error(f"{path}: key {short(exc.args[0])} appears twice in one object") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise error(f"{path}: cannot read as JSON: {str(exc).splitlines()[0][:200]}") from None
    except RecursionError:
        raise error(f"{path}: cannot read as JSON: nested too deeply") from None


_HASH_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def stays_inside(folder, path) -> bool:
    """True when ``path`` (a file in the model folder), symlinks resolved, is still inside the folder, or is a
    blob of a Hugging Face cache: the folder's own repository's where the folder is a snapshot or inside one
    (models--org--name/snapshots/<rev>[/sub]/f -> .../blobs/<hash>), any cached model's where it is not (an older
    `huggingface-cli download --local-dir` linked its large files, tokenizer.json too, into the cache).
    A link leaving the folder could copy any file the user can read (~/.ssh/...) into a shared merge."""
    root, target = Path(os.path.realpath(folder)), Path(os.path.realpath(path))  # a link loop: no RuntimeError
    if target == root or root in target.parents:
        return True
    for up in (root, *root.parents):  # a repository's snapshots/ (a folder named snapshots elsewhere is not one)
        if up.parent.name == "snapshots" and up.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
            return up.parent.parent / "blobs" in target.parents
    # a blob is named by its content's hash (git's sha1 or LFS's sha256): another model's file, never ~/.ssh's
    return (target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
            and _HASH_NAME.fullmatch(target.name) is not None)


LFS_POINTER = b"version https://git-lfs.github.com/spec/"
LFS_ADVICE = ("is a git-lfs pointer (a small text file standing in for the weights), not the checkpoint: "
              "run `git lfs pull` where the model was cloned")
