"""CheckpointPool: N checkpoints held once, merged many times straight into a live model's storage.

The search loop's hot path. The pool reads every source once at construction, keeps the tensors
where they fit (GPU memory, else pinned host memory streamed in chunks, else the memory map; on
the CPU: RAM, else the memory map), and `materialize` writes sum_i w_i * theta_i into the model's
own parameters: same data_ptrs, nothing allocated per call, every check done before any write.
A target whose memory overlaps what the pool reads (or another candidate's target) is refused, and
every tensor written has its autograd version counter bumped, as a torch in-place op would.
"""
import contextlib
import functools
import os
import re
import sys
import threading
from threading import get_ident
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pymerge import _native
from pymerge._native import INPUT_DTYPES, OUTPUT_DTYPES
from pymerge.config import check_seed
from pymerge.errors import CheckpointError, InputError, MergeConfigError, short
from pymerge.default_device import factories_on_cpu
from pymerge.eager import eager_when_compiled
from pymerge.forks import renew_after_fork
from pymerge.io.files import identity, is_or_inside
from pymerge.io.sigbus import MappingGuard, stamp
from pymerge.ops._checks import FILLING_TARGETS, as_flag, as_int, check_threads
from pymerge.ops._memory import (address_problem, backing_problem, kind_problem, negated_problem, overlap_problem,
                                 return_freed_heap, write_problem)
from pymerge.ops._versions import mark_written, versions_of
from pymerge.ops.task_vector_ops import SelectionCache
from pymerge.sizes import format_size, host_available
from pymerge.ops.weighted_sum import pick_backend, sum_into
from pymerge.pool import compressed, grouped
from pymerge.pool.sources import check_range, open_source
from pymerge.pool.weights import GroupRule, check_groups, group_indices, parse_bytes, weight_table

RESIDENCIES = ("device", "pinned", "host", "mmap")
# DELLA's masks of every tensor, drawn before one native call: past this the mmap tier merges tensor by tensor
MAX_MASK_BYTES = 64 << 20
NameMap = Union[None, str, Callable[[str], Optional[str]]]


@dataclass
class _Plan:
    """One validated write: pool tensor `name` (weight group `group`) into one target per candidate."""
    name: str
    group: int
    outs: List[torch.Tensor]      # contiguous views of the targets' storage (or temporaries, see fixups)
    targets: List[torch.Tensor]   # the caller's tensors, one per candidate
    fixups: List[Tuple[torch.Tensor, torch.Tensor]]  # (temporary, non-contiguous target) to copy back
    target: str = ""              # the targets' name for it (a tied checkpoint's embedding also fills the head)


def _guard_mapped(sources) -> MappingGuard:
    """A started MappingGuard over the sources' mapped files (pymerge/io/sigbus.py): a file truncated while
    the pool reads it is a CheckpointError, not a SIGBUS. Unguarded, as before, when the native table is
    full (65536 files at once, more than Linux maps by default): the pool still works."""
    guard = MappingGuard([s for s in sources if s.mapped], doing="the pool was reading it")
    try:
        return guard.start()
    except RuntimeError:  # table full; start() has released what it took
        return MappingGuard(())


_INCOMPLETE = "the models merged into are incomplete, and this pool cannot merge again: build a new one"


def _checking_mapped_files(pool: "CheckpointPool", merge, args: tuple, kwargs: dict):
    """merge(pool, *args, **kwargs), and before and after it (or its failure) raises if a mapped checkpoint shrank,
    since a merge then reads zeros past its new end, or was rewritten in place (the mmap tier reads the maps on every
    call). Before too, with a stat of each file: a file changed between two calls is refused unwritten."""
    pool._guard.check(then="nothing was merged, and this pool cannot merge again: build a new one", sizes=True)
    try:
        out = merge(pool, *args, **kwargs)
    except Exception:  # a KeyboardInterrupt passes as it is
        pool._guard.check(then=_INCOMPLETE, sizes=True)
        raise
    pool._guard.check(then=_INCOMPLETE, sizes=True)
    return out


class _Calls:
    """One call of a pool at a time, and none while it is pickled for another process (_reduce_for_processes);
    the holding thread known, so that a call from inside a call (a weight's __float__, a names= function, a torch
    mode) is refused rather than waited for (or let in, mixing two merges in one model; an audit)."""

    def __init__(self):
        self.lock, self.owner = threading.Lock(), None
        renew_after_fork(self)

    def _after_fork(self) -> None:  # another thread may have held it at the fork (the child's first merge hung)
        if self.owner != get_ident():
            self.lock, self.owner = threading.Lock(), None


def _exclusive(call, merges: bool = False):
    """A call that reads the pool's tensors: one at a time (_Calls); a merge (merges=True) checks the mapped files
    too. Inline, as lean as it can be: it is on the hot path (a context manager, or one more wrapper taking the
    call's arguments again, cost 2-5 us of its 65)."""
    @functools.wraps(call)
    def exclusive(pool, *args, **kwargs):
        calls, me = pool.__dict__.get("_calls_lock") or pool._calls, get_ident()
        if calls.owner == me:
            raise InputError("the pool was called again while it merged (from a weight or parameter, a names= or "
                             "groups= function, a target's own code or a torch mode); the inner call did nothing")
        with calls.lock:  # (the lock's own C enter and exit: an interrupt cannot leave it held)
            try:
                calls.owner = me
                return _checking_mapped_files(pool, call, args, kwargs) if merges else call(pool, *args, **kwargs)
            finally:
                calls.owner = None
    return exclusive


class _Sharing(ForkingPickler):
    """Pickles into nothing, moving each CPU tensor it meets into shared memory as torch's reducers do (the
    pickling that follows finds them there and moves nothing), the pool itself not entered again."""

    def __init__(self, pool: "CheckpointPool"):
        super().__init__(_Discard())
        self.pool = pool

    def persistent_id(self, obj):
        return 0 if obj is self.pool else None

    def reducer_override(self, obj):
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            if obj.device.type == "cpu":
                obj.share_memory_()
            return tuple, ()
        if type(obj) in ForkingPickler._extra_reducers:  # a connection, a socket: theirs share a descriptor (a leak)
            return tuple, ()
        return NotImplemented


class _Discard:
    def write(self, data) -> None:
        pass


@_exclusive
def _shared_state(pool: "CheckpointPool") -> dict:
    state = pool.__getstate__()
    _Sharing(pool).dump(state)
    return state


def _reduce_for_processes(pool: "CheckpointPool"):
    """A pool sent to another process (a Queue, an executor's submit, a spawned Process's arguments): torch's
    reducers move each tensor sent into shared memory, in place, and a Queue's or an executor's background thread
    runs them, so the caller's next materialize, already running, read the freed memory (a segfault; an audit).
    Its tensors are moved here, while no call of the pool runs; the next call notes them."""
    return _new_pool, (type(pool),), _shared_state(pool)


def _new_pool(cls) -> "CheckpointPool":
    return cls.__new__(cls)  # (as pickle's default does; then __setstate__)


_PICKLE_HOOKS = ("__reduce__", "__reduce_ex__", "__getnewargs__", "__getnewargs_ex__")


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside pymerge (the caller's line, whichever path led here),
    and outside torch.compiler.disable's wrapper of the merge calls (a review: warnings named torch's file)."""
    package, level, frame = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 2, sys._getframe(2)
    dynamo = sys.modules.get("torch._dynamo")
    skipped = (package + os.sep,) + ((os.path.dirname(os.path.abspath(dynamo.__file__)) + os.sep,)
                                     if getattr(dynamo, "__file__", None) else ())
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


def _warn_ignored(m, tables: List[np.ndarray], has_base: bool) -> None:
    """A warning where a method leaves out what the caller gave (once per place, as Python's warnings go):
    weights that differ, for a method that takes no per-model weight (karcher, slerp, model_stock...: every
    such merge was the same, silently; `pymerge merge` warns so too), and the pool's base for a method without a
    base role but linear's (karcher: `pymerge merge` takes a base_model as one more input; an audit)."""
    if "weight" not in m.model_params and any(np.ptp(t, axis=1).max(initial=0.0) > 0 for t in tables):
        warnings.warn(f"method {m.name} takes no per-model weight: the weights given are ignored (the merge is "
                      "the same for any weights)", UserWarning, stacklevel=_caller_level())
    if has_base and m.base_model == "none" and m.name != "linear":
        warnings.warn(f"method {m.name} has no base role: the pool's base is not one of its inputs (pymerge merge "
                      "takes a base_model as one more input; to merge it, make it one of the pool's sources)",
                      UserWarning, stacklevel=_caller_level())


class CheckpointPool:
    """A fixed set of checkpoints (and an optional base) to merge into live models, fast and in place.

    sources        HF folders, .safetensors files, state dicts or modules (all with the same tensors)
    base           optional base checkpoint (methods such as task_arithmetic need it; linear ignores it, and
                   karcher and passthrough, which have no base role, leave it out with a warning)
    device         where merges are computed: "cpu" or "cuda[:i]"; targets must live there
    dtype          storage dtype of the resident copies (None keeps each file's dtype where the kernels read
                   it: float64 is held as float32, a float8 variant they lack as bfloat16)
    memory_budget  cap on the bytes the pool itself holds resident (int, or "8GB"); over it, the
                   pool falls to the next tier. `pool.residency` and `pool.describe()` say which.
    residency      force a tier ("device", "pinned", "host", "mmap") instead of choosing one; a tier of
                   copies must fit memory_budget where one is given
    backend        weighted_sum backend ("auto": C++ on the CPU, Triton on CUDA)
    num_threads    the CPU kernels' threads (0: every core this process may use)
    chunk_bytes    staging size when a GPU pool streams its checkpoints from pinned host memory (64 MiB)
    compress       "int8", "int4" or "auto": hold each checkpoint as its quantized delta from `base`
                   (pymerge/pool/compressed.py); error_budget caps each tensor's relative delta error
    shard_like     under torch.distributed: a module or state dict of DTensors (FSDP2, tensor parallel);
                   each rank then holds only its shards and merges into its local shards (pymerge/dist/);
                   with names= (materialize's mapping) where its names differ from the checkpoints'. A
                   tensor it lacks (strict=False's extras) is held whole on every rank
    """
    _guard = MappingGuard(())  # none: only the mmap tier reads the files after construction
    _lent: tuple = ()  # none (a loaded or sharded pool): see __init__ and _check_borrowed
    _sent = False  # pickled since the tensors were noted (__getstate__): see _note_sent
    _files: list = []  # none (a loaded pool, state dicts): (path, (device, inode), stamp) of each file read
    _folders: list = []  # the model folders among its sources (their index and config are theirs too)
    _saved_file: tuple = ()  # a loaded pool's: (path, (device, inode)) of the file it was loaded from
    _lent_ids: frozenset = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if all(getattr(cls, hook, None) is getattr(CheckpointPool, hook, None) for hook in _PICKLE_HOOKS):
            ForkingPickler.register(cls, _reduce_for_processes)  # (else its own; the table matches exact types only)

    @property
    def _calls(self) -> _Calls:
        calls = self.__dict__.get("_calls_lock")
        return calls if calls is not None else self.__dict__.setdefault("_calls_lock", _Calls())  # (one if two race)

    def __new__(cls, *args, shard_like=None, **kwargs):
        if shard_like is None and "names" in kwargs:
            raise InputError("names= at construction finds each tensor's counterpart in shard_like=; without it, "
                             "pass names= to materialize")
        if shard_like is not None and cls is CheckpointPool:
            from pymerge.dist.pool import ShardedPool
            return super().__new__(ShardedPool)
        return super().__new__(cls)

    @factories_on_cpu
    def __init__(self, sources, base=None, device="cpu", dtype: Optional[torch.dtype] = None,
                 memory_budget=None, residency: Optional[str] = None, backend: str = "auto",
                 num_threads: int = 0, chunk_bytes: int = 64 << 20, shard_like=None, compress: Optional[str] = None,
                 error_budget: Optional[float] = None):
        if isinstance(sources, (str, os.PathLike, dict, torch.nn.Module)) or not hasattr(sources, "__iter__"):
            raise InputError("sources must be a list of checkpoints (paths, state dicts or modules)")
        sources = list(sources)
        if not sources:
            raise InputError("a CheckpointPool needs at least one source")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in OUTPUT_DTYPES):
            raise InputError(f"dtype {dtype} is not a storage dtype the kernels read; use float32, float16 or bfloat16")
        self.device = _resolve_device(device)
        self.dtype = dtype
        self.backend = _pool_backend(self.device, backend)
        if compress is None and error_budget is not None:
            raise InputError("error_budget applies to compressed pools only: pass compress= too, or drop it")
        if compress is not None:  # every option checked before anything is read or compressed
            if memory_budget is not None:
                raise InputError("a compressed pool is held resident; memory_budget= does not apply (drop it)")
            error_budget = compressed.check_options(compress, error_budget, base is not None, residency)
            compressed.check_backend(self.backend, self.device)
        self.num_threads = _threads(num_threads)
        chunk = as_int(chunk_bytes)
        if chunk is None or not 1 <= chunk <= 1 << 40:  # read on a GPU's streamed tiers only: checked for every pool
            raise InputError(f"chunk_bytes must be a whole number of bytes from 1 to 2**40, got {short(chunk_bytes)}")
        chunk_bytes = chunk
        self.memory_budget = parse_bytes(memory_budget)
        opened = [self._open(s, _label(s, f"source {i}")) for i, s in enumerate(sources)]
        base_src = self._open(base, _label(base, "base")) if base is not None else None
        self._from_files = all(s.mapped for s in opened)  # checkpoint files (tied.py's rule applies to them)
        self._files = _files_read(opened + ([base_src] if base_src else []))
        self._folders = [os.path.abspath(s) for s in list(sources) + [base]
                         if isinstance(s, (str, os.PathLike)) and os.path.isdir(s)]
        guard = _guard_mapped(opened + ([base_src] if base_src else []))  # every tier copies from the maps
        try:
            self.names, self.shapes, self.skipped = _catalog(opened, base_src)
            self._check_catalog()
            self.num_checkpoints = len(opened)
            self.labels = [s.label for s in opened]
            self.has_base = base_src is not None
            self._lent: List[tuple] = []  # (label, name, tensor) of each caller's tensor read in place
            self._compressed = None
            if compress is not None:
                self._adopt(compressed.CompressedStore.build(opened, base_src, self.names, self.shapes, compress,
                                                             error_budget, dtype, self.skipped, self.num_threads))
            else:
                self.residency, self.reason = self._choose(opened, base_src, residency)
                if self.residency == "mmap" and dtype is not None:
                    _check_mmap_dtype(opened + ([base_src] if base_src else []), self.names, dtype, self.reason)
                held = [self._hold_all(s) for s in opened]
                self._inputs = {n: [h[n] for h in held] for n in self.names}
                self._base = self._hold_all(base_src) if base_src else {}
            guard.check(then="no pool was built", sizes=True)
            if self.residency == "mmap" and self._reads_maps():  # every merge reads them: guarded while the pool lives
                weakref.finalize(self, guard.stop)  # the native table's slots are few (4096); set first, so
                self._guard = guard                 # a guard kept is always released
        finally:
            if self._guard is not guard:
                guard.stop()
            if getattr(self, "residency", None) != "mmap":
                for s in opened + ([base_src] if base_src else []):
                    if s.mapped:
                        s.close()  # views handed out stay valid; copies were made
        self._finish(chunk_bytes)

    def _reads_maps(self) -> bool:
        """Whether the held tensors are views of the sources' memory maps (the mmap tier's are)."""
        return True

    def _check_catalog(self) -> None:
        """A subclass's check of the tensors found, before any is held (ShardedPool's)."""

    _owned: dict = {}  # a pool made without _finish (__new__) has handed out nothing

    def _note_held(self) -> None:
        """Where the held tensors are: their spans (targets must not overlap them), and for _check_borrowed
        the caller's tensors read in place. Nothing handed out yet (see tensor())."""
        self._spans = _Spans([(t, f"{self.labels[i]}'s {n!r}") for n, ts in self._inputs.items() for i, t in enumerate(ts)]
                             + [(t, f"the base's {n!r}") for n, t in self._base.items()], self.device)
        # address and storage size: a storage freed (resize_(0)) and given fewer bytes may keep its address
        self._lent_at = _addresses_and_sizes([t for _, _, t in self._lent])
        self._lent_ids = {id(t) for _, _, t in self._lent}
        self._owned = {}  # storage address -> (label, storage, address, bytes, resizable) of the pool's own, handed out

    def _watch(self, t: torch.Tensor, label: str) -> None:
        """A tensor of the pool's own handed out by tensor(): from now on every call checks it is where it was, at
        its size. resize_ on it (FSDP's resize_(0); a larger size moves it, a smaller one may keep the address)
        left the cached native tables on freed memory; a host tier's buffer, which cannot be resized, is moved only
        by torch's pickler, into shared memory (the tensor sent to another process on its own: _check_borrowed).
        Only handed-out ones: nothing else reaches them."""
        storage = t.untyped_storage()
        if t.numel() and id(t) not in self._lent_ids and storage.data_ptr() not in self._owned:
            self._owned[storage.data_ptr()] = (label, storage, storage.data_ptr(), storage.nbytes(),
                                               storage.resizable())

    def __getstate__(self) -> dict:
        """Copied without its caches (native plans are not picklable; a copy plans again). A pool that reads
        memory maps or holds GPU copies is not copied: build another from the same sources."""
        if self.residency == "mmap" or getattr(self, "_cuda", None) is not None:
            raise InputError(f"a pool on the {self.residency} tier{' on ' + str(self.device) if self._cuda else ''} "
                             "cannot be copied or pickled; build another from the same sources")
        self._check_borrowed()  # a copy freed or moved before: refused now, so any move from here on is the pickler's
        state = dict(self.__dict__, _sent=False)
        state.pop("_calls_lock", None)  # (a copy takes a lock of its own)
        if "_plan_cache" in state:
            state["_plan_cache"], state["_selection"] = grouped.PlanCache(), self._selection_cache()
        self._sent = True  # torch's pickler may now move the tensors in state: _check_borrowed looks again
        return state

    def _selection_cache(self) -> SelectionCache:
        """Room for every tensor of every checkpoint (and base) under 2 parameter settings: an LRU smaller than
        a search's cycle never hits (one alternating two densities over 50,000 tensors recomputed every
        threshold, 10 s per candidate). Entries are a few numbers each (~0.5 KB with their keys)."""
        return SelectionCache(max(65536, 2 * len(self.names) * (self.num_checkpoints + 1)))

    def __setstate__(self, state) -> None:
        """A copied pool (copy.deepcopy, pickle) holds its tensors at other addresses: noted again."""
        self.__dict__.update(state)
        if "_inputs" in state:
            self._note_held()

    def _finish(self, chunk_bytes: int) -> None:
        """Lookups, overlap spans, caches and GPU runner over the held tensors."""
        self._note_held()
        self._plan_cache = grouped.PlanCache()
        # Plan entries a CUDA graph captured (their device address tables and temporaries): a replay may come
        # at any time, so the cache's LRU must not free them. Kept while the pool lives.
        self._captured: dict = {}
        # Per-tensor selection statistics (TIES/breadcrumbs thresholds, L1 norms, dot products) of the methods path,
        # keyed by tensor name, checkpoint and parameters plus the inputs' version counters (a borrowed
        # tensor changed in place by torch is seen as new data).
        self._selection = self._selection_cache()
        self._cuda = None
        if self._compressed is None and (self.device.type == "cuda" or self.backend == "triton"):
            from pymerge.pool.cuda import CudaRunner
            self._cuda = CudaRunner(self._inputs, self.device, self.residency, self.num_checkpoints,
                                    chunk_bytes=chunk_bytes)

    def _open(self, src, label: str):
        return open_source(src, label)

    # ---- compressed pools (pymerge/pool/compressed.py) -----------------------------------------------
    def _adopt(self, store: "compressed.CompressedStore") -> None:
        """Holds a compressed store: the base exact, each checkpoint as its encoded delta, all resident."""
        compressed.check_backend(self.backend, self.device)
        self._compressed = store.to(self.device)
        if self.backend == "cpu" and compressed.pairs_pay():  # the AVX2 integer path for int4
            self._compressed.pair_int4()
        elif self.backend == "cpu":  # the float path: int4 checkpoints in one stream per tensor
            self._compressed.interleave_int4()
        if self.backend == "cpu":  # the codes the re-layout replaced, freed but still the process's
            return_freed_heap()
        self.residency = "device" if self.device.type == "cuda" else "host"
        self.reason = store.describe()
        self.nbytes = self._compressed.nbytes
        self._inputs, self._base = {}, self._compressed.base

    def compression_report(self) -> List[dict]:
        """Per tensor and checkpoint: format, bytes held, measured relative error of the delta."""
        return self._require_compressed().report()

    @_exclusive
    def save(self, path, overwrite: bool = False) -> None:
        """Writes a compressed pool to one .safetensors file; CheckpointPool.load(path) restores it."""
        store = self._require_compressed()
        store.tied_embedding = self._tied_embedding()  # kept by load(): the loaded pool merges as this one
        path = compressed._path(path, "save")  # bytes and NUL characters too, before read_file compares it
        read = self.read_file(path)
        if read is not None:  # overwrite=True replaced a fine-tune (or the base, or its index) with the pool
            raise InputError(f"{path}: is {read}, which this pool was built from; choose another path")
        store.save(path, overwrite)

    def read_file(self, path) -> Optional[str]:
        """What `path` is of the checkpoints this pool was built from ("the checkpoint file F": the same file or a
        link to it; "inside the model folder D": a folder source's index, config or anything beside them), else
        None: what must not be written over (a saved pool, a search's state)."""
        try:
            path = os.fspath(path)
        except TypeError:
            return None
        same, real = identity(path), os.path.realpath(path)
        # where a writer puts the file: a link is replaced, not followed (a hub snapshot's config.json, a link into
        # blobs/, was replaced by the pool: its realpath lies outside the snapshot; an audit)
        spot = os.path.join(os.path.realpath(os.path.dirname(path) or os.curdir), os.path.basename(path))
        for p, ident, _ in self._files:
            if ident == same or os.path.realpath(p) in (real, spot):
                return f"the checkpoint file {p}"
        # a loaded pool's own file: a state_path naming it was read as a corrupt state, whose error advised
        # deleting it (hours of compression; an audit)
        if self._saved_file and (self._saved_file[1] == same or os.path.realpath(self._saved_file[0]) in (real, spot)):
            return f"the saved pool {self._saved_file[0]}"
        for folder in self._folders:
            inside = os.path.realpath(folder)
            if any(os.path.commonpath([where, inside]) == inside or is_or_inside(where, folder)
                   for where in (real, spot)):
                return f"inside the model folder {folder}"
        return None

    def changed_file(self) -> Optional[str]:
        """A line naming the first checkpoint file removed, replaced (renamed over: a fresh download) or rewritten
        (its mtime moved) since this pool read it, else None: a result that names the files (a search's best_merge.yml) would then
        not rebuild what the pool merged (the host tiers hold copies, and the mmap tier's guard sees only
        writes into the file it maps)."""
        for p, ident, was, st in self._files_now():
            if st is None:
                return f"{p}: removed since the pool read it"
            if (st.st_dev, st.st_ino) != ident:
                return f"{p}: replaced by another file since the pool read it"
            if was is not None and stamp(st)[0] != was[0]:  # the mtime: a chmod or a new hard link moves the ctime
                return f"{p}: rewritten since the pool read it"
        return None

    def touched_file(self) -> Optional[str]:
        """A line naming the first checkpoint file whose change time alone moved since this pool read it, else None:
        a chmod or a new hard link (no change: refusing it ended hours of search with exit 2, a review), or a
        rewrite that put the modification time back (touch -r, cp -p, an unzip keeping times), which changed_file
        cannot tell from them and which made a search's best_merge.yml build another merge than the one scored,
        silently (an audit). Worth a warning, not a refusal."""
        for p, ident, was, st in self._files_now():
            if st is not None and (st.st_dev, st.st_ino) == ident and was is not None and stamp(st)[1:] != was[1:]:
                return (f"{p}: its change time moved since the pool read it (a chmod or a new link; or a rewrite "
                        f"that put its modification time back, and then what names it builds another merge)")
        return None

    def _files_now(self):
        """(path, (device, inode) and stamp when read, os.stat now or None where it is gone) of each file read."""
        for p, ident, was in self._files:
            try:
                st = os.stat(p)
            except OSError:
                st = None
            yield p, ident, was, st

    @classmethod
    @factories_on_cpu
    def load(cls, path, device="cpu", backend: str = "auto", num_threads: int = 0) -> "CheckpointPool":
        """A compressed pool saved with save(), checked as strictly as any checkpoint; nothing re-compressed."""
        store = compressed.CompressedStore.load(path)
        saved_file = (os.path.abspath(path), identity(path))
        if cls is not CheckpointPool:
            from pymerge.dist.pool import ShardedPool
            cls = CheckpointPool if issubclass(cls, ShardedPool) else cls  # a plain pool: whole tensors, no shards
        pool = object.__new__(cls)
        pool.device = _resolve_device(device)
        pool.dtype, pool.memory_budget, pool.num_threads = None, None, _threads(num_threads)
        pool.backend = _pool_backend(pool.device, backend)
        pool.names, pool.shapes, pool.skipped = store.names, store.shapes, store.skipped
        pool.num_checkpoints, pool.labels, pool.has_base = len(store.labels), store.labels, True
        pool._from_files = False  # where the checkpoints came from is not saved; their tied-head rule is
        pool._tied_emb = store.tied_embedding  # (a search resumed on the loaded pool merged the head otherwise)
        pool._saved_file = saved_file
        pool._adopt(store)
        pool._finish(0)
        return pool

    def _require_compressed(self) -> "compressed.CompressedStore":
        if self._compressed is None:
            raise InputError("this pool is not compressed (build it with compress='int8', 'int4' or 'auto')")
        return self._compressed

    # ---- residency ---------------------------------------------------------------------------------
    def _storage_dtype(self, t: torch.Tensor) -> torch.dtype:
        return compressed.held_dtype(t.dtype, self.dtype, INPUT_DTYPES)

    def _choose(self, opened, base_src, forced: Optional[str]) -> Tuple[str, str]:
        """The residency tier and why. The mmap tier reads the files in place, except tensors of dtypes the kernels
        do not read (float64, some float8s): those it holds converted in RAM, which must fit the budget too."""
        residency, reason = self._pick(opened, base_src, forced)
        if residency == "mmap" and self._reads_maps():  # (a sharded pool copies its shards anyway)
            sources = list(opened) + ([base_src] if base_src else [])
            copied = sum(_mmap_copy_bytes(src, n, self.dtype) for src in sources for n in self.names)
            # and .bin files torch read whole (the legacy format, a compressed zip): held whatever the tier (a pool
            # under a budget of 100 MB held 326 MB of them, saying it read the memory map: an audit)
            whole = sum(map(_read_whole_bytes, sources))
            half = host_available() // 2
            by_budget = self.memory_budget is not None and self.memory_budget < half
            cap = self.memory_budget if by_budget else half
            if copied + whole > cap:
                limit, cure = ("memory_budget", "raise memory_budget") if by_budget else \
                    ("half of the available memory", "free memory")
                raise InputError(f"this pool reads its files in place (mmap tier: {reason}), but "
                                 f"{format_size(copied + whole)} would be held in RAM ({_held_in_ram(copied, whole)}), "
                                 f"beyond {limit} ({format_size(cap)}); convert the checkpoints to safetensors in "
                                 f"float32 or bfloat16, or {cure}")
            if copied or whole:
                reason += f"; {format_size(copied + whole)} held in RAM ({_held_in_ram(copied, whole)})"
        return residency, reason

    def _pick(self, opened, base_src, forced: Optional[str]) -> Tuple[str, str]:
        # every source's own dtypes (the first's, times the count, understated a bfloat16 first beside float32 ones:
        # a pool held 235 MB under a budget of 150 MB, an audit)
        need = sum(int(np.prod(self.shapes[n], dtype=np.int64))
                   * compressed.held_dtype(_first_dtype(src, n), self.dtype, INPUT_DTYPES).itemsize
                   for src in [*opened, *([base_src] if base_src else [])] for n in self.names)
        self.nbytes = need
        host_avail = host_available()
        host_cap = min(self.memory_budget if self.memory_budget is not None else need, host_avail // 2)
        if forced is not None:
            if forced not in RESIDENCIES:
                raise InputError(f"residency must be one of {', '.join(RESIDENCIES)}, got {forced!r}")
            if forced == "device" and self.device.type != "cuda":
                raise InputError("residency 'device' needs device='cuda' (on the CPU, use 'host')")
            if forced == "host" and self.device.type == "cuda":
                raise InputError("residency 'host' is for device='cpu'; on CUDA use 'device', 'pinned' or 'mmap'")
            if forced == "pinned" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise InputError("residency 'pinned' streams host memory to a GPU: it needs device='cuda'")
            if forced != "mmap" and self.memory_budget is not None and need > self.memory_budget:
                # both asked for: holding copies and holding no more than the budget (it held them in silence)
                raise InputError(f"residency={forced!r} holds a copy of every checkpoint, {format_size(need)}, "
                                 f"beyond memory_budget ({format_size(self.memory_budget)}); raise memory_budget, "
                                 "or use residency='mmap' (or no residency) to read the files in place")
            return forced, "forced by residency="
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            dev_cap = min(self.memory_budget if self.memory_budget is not None else need, int(free * 0.9))
            if need <= dev_cap:
                return "device", f"{format_size(need)} fits in GPU memory ({format_size(free)} free)"
            if need <= host_cap:
                return "pinned", f"{format_size(need)} exceeds the GPU budget; pinned host memory, streamed in chunks"
            return "mmap", f"{format_size(need)} exceeds the GPU and host budgets; streamed from the memory map"
        if need <= host_cap:
            return "host", f"{format_size(need)} fits in RAM ({format_size(host_avail)} available)"
        return "mmap", f"{format_size(need)} exceeds the host budget; read from the memory map (page cache)"

    @torch.inference_mode(False)  # the pool's own copies keep version counters (its caches read them)
    def _hold_all(self, src) -> Dict[str, torch.Tensor]:
        """Every tensor of one source as the chosen tier keeps it (_hold). The host tier's copies share one
        buffer per source, in name order, each tensor 64-byte aligned: a grouped call then reads each
        checkpoint as one forward stream, which the hardware prefetchers follow across tensor boundaries
        (1000 separately allocated tensors ran at about 0.7 of copy bandwidth, bench_pool_grouped.py).
        Pinned memory stays per tensor: its allocator rounds every block up to a power of two."""
        if self.residency != "host":
            return {n: self._hold(src.tensor(n), src, n) for n in self.names}
        layout, size = [], 0
        for n in self.names:
            dtype, shape = src.info(n)
            dtype = compressed.held_dtype(dtype, self.dtype, INPUT_DTYPES)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            layout.append((n, dtype, shape, size, nbytes))
            size += -(-nbytes // 64) * 64
        # numpy's memory under torch: a storage that cannot be resized, so a tensor from pool.tensor() (a view
        # of this buffer) cannot free or move it under the cached native tables (FSDP's resize_(0) did: a
        # SIGSEGV at the next materialize); 64-byte aligned as torch.empty's was.
        raw = np.empty(size + 64, dtype=np.uint8)
        start = -raw.ctypes.data % 64
        buf = torch.from_numpy(raw[start:start + size])
        advise = getattr(_native.cpu, "advise_huge_pages", None)  # a hint: a build without it skips it
        if advise is not None:  # read front to back on every call: 2 MiB pages (memory_hints.cpp)
            advise(buf.data_ptr(), size)
        held = {}
        for n, dtype, shape, at, nbytes in layout:
            t = src.tensor(n).detach()
            if tuple(t.shape) != tuple(shape):  # copy_ would broadcast: a source must give what it lists
                raise CheckpointError(f"{src.label}: tensor {short(n)} has shape {list(t.shape)}, "
                                      f"listed as {list(shape)}")
            held[n] = buf[at:at + nbytes].view(dtype).view(shape).copy_(t)
            check_range(held[n], t, src.label, n)
        return held

    @torch.inference_mode(False)  # the pool's own copies keep version counters (its caches read them)
    def _hold(self, t: torch.Tensor, src, name: str) -> torch.Tensor:
        """The tensor as the chosen tier keeps it: an owned copy, except the mmap tier (views as given)."""
        t = t.detach()
        if self.residency == "mmap" and t.dtype in INPUT_DTYPES:
            held = t.contiguous()  # a zero-copy view of the file (a caller's state dict: used as given)
            if not src.mapped and held.data_ptr() == t.data_ptr():
                self._lent.append((src.label, name, held))
            return held
        dtype = self._storage_dtype(t)
        if self.residency == "device":
            held = t.to(self.device, dtype)
        else:
            held = t.to("cpu", dtype)
            if self.residency == "pinned" and torch.cuda.is_available():
                held = held.pin_memory()
        check_range(held, t, src.label, name)
        if held.data_ptr() == t.data_ptr() or not held.is_contiguous():
            # Never alias a caller's tensor or a file view: a model merged into must not change the pool.
            held = held.clone(memory_format=torch.contiguous_format)
            if self.residency == "pinned" and torch.cuda.is_available():
                held = held.pin_memory()
        return held

    @property
    def borrowed(self) -> List[str]:
        """Labels of the in-memory sources (or base) whose tensors the pool reads in place."""
        return list(dict.fromkeys(label for label, _, _ in self._lent))

    def describe(self) -> str:
        borrowed = ""
        if self.borrowed:
            borrowed = (f"; reads the caller's tensors of {', '.join(self.borrowed)} in place (no copy): "
                        "changing them with torch ops changes later merges (not through .data or numpy, "
                        "which cached statistics do not see)")
        return (f"CheckpointPool: {self.num_checkpoints} checkpoints{' + base' if self.has_base else ''}, "
                f"{len(self.names)} tensors, {format_size(self.nbytes)}; residency {self._residency_text()}; "
                f"backend {self.backend} on {self.device}{borrowed}")

    __repr__ = describe

    def _residency_text(self) -> str:
        return f"{self.residency} ({self.reason})"

    def model_nbytes(self) -> int:
        """Bytes of one checkpoint as the pool stores it (what one materialize writes, at the same dtype)."""
        if self._compressed is not None:
            return self._compressed.model_nbytes()
        return sum(self._inputs[n][0].numel() * self._inputs[n][0].element_size() for n in self.names)

    def num_groups(self, groups: GroupRule = "layer") -> int:
        """How many rows a per-group weight table needs under a grouping rule."""
        return max(group_indices(self.names, groups), default=0) + 1

    def groups_used(self, groups: GroupRule = "layer") -> List[int]:
        """The rows of such a table that some tensor of the pool reads, ascending (the others change nothing)."""
        return sorted(set(group_indices(self.names, groups)))

    def tensor(self, i: int, name: str) -> torch.Tensor:
        """Checkpoint i's resident tensor `name`, for reading only: on the host tier a view into the
        checkpoint's one buffer (holding it keeps that whole buffer alive; writing it would change the pool,
        and its storage cannot be resized; a device copy resized is refused at the next materialize); on the
        mmap tier a copy of a file's tensor (the map is read-only: a torch op writing a view of it killed the
        process), and a borrowed tensor as given (or the pool's contiguous copy of a strided one). A compressed pool decodes it, float32."""
        if (k := as_int(i)) is None or not 0 <= k < self.num_checkpoints:
            raise InputError(f"checkpoint index must be an integer in 0..{self.num_checkpoints - 1}, got {i!r}")
        if not isinstance(name, str) or name not in self.shapes:
            raise InputError(f"no tensor {short(name)} in this pool")
        if self._compressed is not None:
            return self._compressed.decoded(k, name)
        held = self._inputs[name][k]
        if self.residency == "mmap" and id(held) not in self._lent_ids and not held.untyped_storage().resizable():
            copy = held.clone()  # a file's map: one cut or rewritten meanwhile gave zeros or new bytes, silently
            self._guard.check(then="the tensor returned would not be the checkpoint's", sizes=True)  # (an audit)
            return copy
        self._watch(held, f"checkpoint {self.labels[k]}")
        return held

    # ---- merging -----------------------------------------------------------------------------------
    @eager_when_compiled  # a compiled function that merges, then scores: the merge runs eagerly (a graph break)
    def materialize(self, weights, into, method: str = "linear", *, groups: GroupRule = None,
                    normalize: bool = False, names: NameMap = None, strict: bool = True, seed: int = 0,
                    method_params: Optional[Mapping] = None, **params):
        """Writes the merge with `weights` (N floats, or a [G, N] table with `groups`) into `into`; returns it.
        A method's parameters go as keywords, or in method_params where a name is taken here (ties'
        own `normalize`, for one: normalize= normalizes the weights)."""
        return self.materialize_many([weights], [into], method, groups=groups, normalize=normalize, names=names,
                                     strict=strict, seed=seed, method_params=method_params, **params)[0]

    @eager_when_compiled
    @factories_on_cpu
    @functools.partial(_exclusive, merges=True)
    def materialize_many(self, weight_rows, into: Sequence, method: str = "linear", *, groups: GroupRule = None,
                         normalize: bool = False, names: NameMap = None, strict: bool = True, seed: int = 0,
                         method_params: Optional[Mapping] = None, **params) -> list:
        """K candidates from one pass over the checkpoints: into[k] receives the merge with weight_rows[k]."""
        params = method_params_of(method_params, params)
        seed = check_seed(seed)
        try:  # "False" was read as true (normalized); a tensor of two values raised torch's error
            normalize, strict = as_flag(normalize, "normalize"), as_flag(strict, "strict")
        except TypeError as exc:
            raise InputError(str(exc)) from None
        # a generator of models is several targets (it was taken for one: "2 weight rows for 1 target models")
        into = list(into) if isinstance(into, (list, tuple, Iterator)) else [into]
        if isinstance(weight_rows, (str, bytes, Mapping)) or not hasattr(weight_rows, "__iter__"):
            raise InputError(f"weight_rows must be a list of weight rows, one per model, got {short(weight_rows)}")
        weight_rows = list(weight_rows)
        if len(weight_rows) != len(into):
            raise InputError(f"got {len(weight_rows)} weight rows for {len(into)} target models")
        if not into:
            return []  # no candidates: nothing to read or write
        if len({id(m) for m in into}) != len(into):
            raise InputError("the same model appears twice in into=; each candidate needs its own model")
        n = self.num_checkpoints
        self._check_borrowed()
        if self._graph_weights(weight_rows, method):
            tables = [_device_table(w, n, normalize) for w in weight_rows]
        else:
            tables = [weight_table(w, n, normalize, what="weights" if len(into) == 1 else f"weights of candidate {k}")
                      for k, w in enumerate(weight_rows)]
        flat = not any(t.shape[0] > 1 for t in tables)
        if groups is not None or not flat:  # resolved (a bad rule refused) even where flat weights ignore it
            group_of = self._plan_cache.group_of(self.names, groups)
        if flat:
            group_of = [0] * len(self.names)
        for k, t in enumerate(tables):
            check_groups(group_of, self.names, t.shape[0], what="weights" if len(into) == 1 else f"candidate {k}'s weights")
        if method == "linear" and params:
            raise MergeConfigError(f"method linear takes no parameters here, got {', '.join(sorted(params))} "
                                   "(use normalize= for sum-to-one)")
        kind = self._grouped_kind() if _cacheable(groups, names) else None
        if method == "linear" and kind:
            # the hot path: plans checked once per set of targets, then one call per candidate
            n_groups = 1 if flat else self._plan_cache.num_groups(groups)
            if kind == "compressed":
                make = lambda ps: compressed.LinearTable(self._compressed, ps, n_groups, n)  # noqa: E731
            else:
                table_of = grouped.native_table if kind == "cpu" else grouped.triton_table
                make = lambda ps: table_of(ps, self._inputs, n_groups)  # noqa: E731
            entry = self._plan_entry(("flat" if flat else groups, names, strict, n_groups), into, names,
                                     lambda: self._checked_plans(into, group_of, names, strict), make)
            # again: a weight's __float__, a groups rule, the targets' checks are the caller's code, which may have
            # freed a source since (the hot path then read freed memory: a segfault; an audit)
            self._check_borrowed()
            plans, table = entry.plans, entry.native
            # A backward through the old weights now raises. Bumped before the call: the entry's check has
            # just brought the targets' tensor objects into cache, which the call's streaming then evicts.
            mark_written(entry.written)
            if table is None:
                with _pool_writes():
                    self._run_linear(plans, tables)
            elif kind == "compressed":  # float64: the per-tensor path's sums, bit for bit
                table.run(grouped.weight_array(tables, n_groups, n, np.float64), self.num_threads)
            elif self._cuda is None:
                table.run(grouped.weight_array(tables, n_groups, self.num_checkpoints), self.num_threads)
            else:
                with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                    w = self._cuda.weights(tables)  # [G, K, N] on the device
                    table.run(w[:n_groups] if w.shape[0] > 1 else w.expand(n_groups, *w.shape[1:]))
            if self.device.type == "cuda" and _capturing(self.device):  # a graph now reads its tables: kept alive
                self._captured[id(entry)] = entry  # (after the launch: a refused capture pinned them for good)
            _copy_back(entry.fixups, entry.plans)
            return into
        if kind == "cpu" and method != "linear":
            entry = self._one_call_method(method, tables, group_of, flat, groups, names, strict, into, seed, params)
            if entry is not None:
                _copy_back(entry.fixups, entry.plans)
                mark_written(entry.written)
                return into
        plans = self._method_plans(method, into, group_of, names, strict, groups, flat)
        with _torch_writes(self, plans):
            if method == "linear":
                self._check_borrowed()  # again, as the hot path's
                self._run_linear(plans, tables)
            else:
                self._run_method(method, plans, tables, seed, params)
        _copy_back([f for p in plans for f in p.fixups], plans)
        mark_written(t for p in plans for t in p.targets)  # a backward through the old weights now raises
        return into

    def _method_plans(self, method: str, into: list, group_of: List[int], names: NameMap, strict: bool, groups,
                      flat: bool):
        """Checked plans for a call that merges tensor by tensor (a ShardedPool keeps them)."""
        return self._checked_plans(into, group_of, names, strict)

    def _one_call_method(self, method, tables, group_of, flat, groups, names, strict, into, seed, params):
        """A registered method as one native call over every tensor and candidate (pool/grouped.py):
        task_arithmetic (a weighted sum whose sources include the base) and the task-vector family
        (a selection pass, then one fused apply). The entry written, or None for other methods."""
        from pymerge.methods.base import get_method
        from pymerge.methods.linear import WeightedSum
        from pymerge.methods.task_vectors import TaskVectorMethod
        m = get_method(method)
        if not isinstance(m, (WeightedSum, TaskVectorMethod)):
            return None
        m.validate(self.num_checkpoints, self.has_base)
        per_model, global_params = _split_params(m, params, self.num_checkpoints)
        n_groups = 1 if flat else self._plan_cache.num_groups(groups)
        key = ("flat" if flat else groups, names, strict, n_groups, method)
        if isinstance(m, WeightedSum):
            first = _first_names(self.names, group_of, n_groups)  # (messages)
            order, coef = grouped.method_coefficients(m, per_model, global_params, tables, n_groups, first, seed)
            sources = lambda: {n: [self._inputs[n][i] if i < self.num_checkpoints else self._base[n]  # noqa: E731
                                   for i in order] for n in self.names}
            make = lambda ps: grouped.native_table(ps, sources(), n_groups, m.delta)  # noqa: E731
        else:
            call = grouped.TaskVectorCall(m, per_model, global_params, tables, n_groups, self.names[0], seed,
                                          self.labels)
            make = lambda ps: grouped.native_tv_table(ps, self._inputs, self._base, n_groups)  # noqa: E731
        entry = self._plan_entry(key, into, names, lambda: self._checked_plans(into, group_of, names, strict), make)
        # again: the method's parameters were read since the first check, and a number-like one whose __float__
        # freed a source the pool reads in place (as FSDP's resize_(0)) left the kernel reading freed memory
        self._check_borrowed()
        if entry.native is None:
            self._run_method(method, entry.plans, tables, seed, params)
        elif isinstance(m, WeightedSum):
            entry.native.run(coef, self.num_threads)
        elif call.draws_masks and self.residency == "mmap" and self._mask_bytes() > MAX_MASK_BYTES:
            # DELLA's masks, a bit per element and checkpoint, are drawn for every tensor before the one call: N/16
            # of a bfloat16 model, in a pool whose budget keeps the model out of RAM (an audit). Tensor by tensor
            # (the same bits), one tensor's masks at a time (drawn again per candidate: slower)
            with _torch_writes(self, entry.plans):
                self._run_method(method, entry.plans, tables, seed, params)
        else:
            # DELLA's masks kept for the next call (a search redrew them every time), one entry's at a time
            call.run(entry, self._inputs, self._base, self._selection, self.num_threads, self._plan_cache.hold_masks)
        return entry

    def _mask_bytes(self) -> int:
        """DELLA's masks for every tensor at once: a bit per element and checkpoint."""
        return self.num_checkpoints * sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes.values()) // 8

    def _check_borrowed(self) -> None:
        """The caller's tensors the pool reads in place, and the pool's own it handed out (_watch), must still
        be where they were: freed (FSDP's resize_(0)) or moved (resized back), the pool and its cached native
        tables would read freed memory."""
        if self._owned and not self._sent and any(storage.data_ptr() != at and not resizable and storage.is_shared()
                                  for _, storage, at, _, resizable in self._owned.values()):
            self._sent = True  # a host buffer moved, by torch's pickler only: a tensor handed out was sent on its own
        if self._sent:
            self._note_sent()
        for label, storage, at, nbytes, _ in self._owned.values():
            if storage.data_ptr() != at or storage.nbytes() != nbytes:
                raise InputError(f"the pool's copy of {label} was freed or moved (resize_ on the storage of a "
                                 "tensor from pool.tensor()); nothing was written. Build a new pool")
        if not self._lent:
            return
        now = _addresses_and_sizes([t for _, _, t in self._lent])
        moved = np.flatnonzero((now != self._lent_at).any(axis=0))
        if moved.size:
            label, name, t = self._lent[int(moved[0])]
            why = backing_problem(t) or "its storage was reallocated (resize_)"
            raise InputError(f"{label}: tensor {short(name)}, which the pool reads in place: {why}; nothing was "
                             "written. Build a new pool from the tensors as they are now")

    def _note_sent(self) -> None:
        """torch.multiprocessing's pickler (a spawned Process's arguments, a Queue, mp.spawn) moves each tensor it
        sends into shared memory, in place, so the pool's cached native plans and overlap spans pointed at freed
        memory (a segfault, merges off by 1e34, or a false overlap refusal: an audit). The first call after a
        pickling notes the tensors again and plans anew. (Only pools of their own copies pickle: none reads a
        caller's tensors in place.) The tensors tensor() handed out stay watched: one moved into shared memory at
        its size is where it is now; one freed meanwhile is still refused (forgotten, it crashed: a review)."""
        owned = {}
        for label, storage, at, nbytes, resizable in self._owned.values():
            if storage.data_ptr() != at and storage.is_shared() and storage.nbytes() == nbytes:
                at = storage.data_ptr()
            owned[at] = (label, storage, at, nbytes, resizable)
        self._note_held()
        self._owned = owned
        self._plan_cache = grouped.PlanCache()
        self._sent = False

    def _watcher(self, into: list, names: NameMap) -> Callable[[list], list]:
        """What a plan cache entry watches of the targets (_watched), worked out only when it is built."""
        return lambda plans: _watched(plans, into, names, self.names, self._tied_embedding() is not None)

    def _checked_plans(self, into: list, group_of: List[int], names: NameMap, strict: bool) -> List[_Plan]:
        plans = self._plan(into, group_of, names, strict)
        self._check_overlaps(plans, len(into))
        keys = [self._tie_key(p) for p in plans]
        pairs = _tie_pairs(plans, keys)
        tied = {(a.name, b.name) for _, a, b in pairs if a.name != b.name}
        # allowed for the sources' values now: a caller's tensor the pool reads in place may change (the pool's
        # own copies and files do not); their versions before the check reads them (a write meanwhile: checked
        # again next call)
        held = [t for a, b in sorted(tied) for t in self._tie_sources(a, b) if id(t) in self._lent_ids]
        at = versions_of(held)
        self._check_ties(pairs, len(into))
        once = _Plans(_last_of_tied(plans, keys))
        if held:
            once.recheck = lambda: versions_of(held) == at
        return once

    def _check_ties(self, pairs: list, k: int) -> None:
        """Two pool tensors that a target ties (one tensor under two names: embedding and head, layers sharing
        a weight; pairs: _tie_pairs') get one merge: refused unless they hold the same bits in every checkpoint
        and the base (tied checkpoints saved under both names). Writing both kept whichever came last, silently."""
        for c, other, p in pairs:
            where = f" (model {c})" if k > 1 else ""
            if other.name != p.name and other.group != p.group:  # the same data, weighted otherwise
                raise InputError(f"the target{where} ties pool tensors {other.name!r} and {p.name!r} (one "
                                 "tensor), which groups= puts in different weight groups: one merge would "
                                 "silently replace the other. Untie the target's weights, or skip one with "
                                 "names=; nothing was written")
            if other.name != p.name and not self._same_data(other.name, p.name):
                raise InputError(f"pool tensors {other.name!r} and {p.name!r} hold different values, but the "
                                 f"target{where} ties them (one tensor): one merge would silently replace the "
                                 "other. Untie the target's weights, or (from Python) skip one with names= (a "
                                 f"function returning None for {p.name!r}); nothing was written")

    def _same_data(self, a: str, b: str) -> bool:
        """Whether pool tensors a and b hold the same bits in every checkpoint and the base; kept in the
        selection cache while no held tensor's version counter moves (a compressed pool's never do)."""
        if self._compressed is not None:
            st = self._compressed
            key = ("same", a, b)
            pairs = lambda: [(st.decoded(i, a), st.decoded(i, b)) for i in range(self.num_checkpoints)] + [  # noqa: E731
                (st.base[a], st.base[b])]
        else:
            key = ("same", a, b, tuple(versions_of(self._tie_sources(a, b))))
            pairs = lambda: list(zip(self._inputs[a], self._inputs[b])) + (  # noqa: E731
                [(self._base[a], self._base[b])] if self._base else [])
        same = self._selection.get(key)
        if same is None:
            same = all(_same_bits(x, y) for x, y in pairs())
            self._selection.put(key, same)
        return same

    def _tie_sources(self, a: str, b: str) -> list:
        """The held tensors whose values _same_data compares (a compressed pool's never change: none)."""
        if self._compressed is not None:
            return []
        return self._inputs[a] + self._inputs[b] + ([self._base[a], self._base[b]] if self._base else [])

    def _tie_key(self, plan: _Plan):
        """What makes two plans write one tensor (tied weights, written once): the same memory, per candidate."""
        return tuple((t.data_ptr(), t.nbytes) for t in plan.targets)

    def _plan_entry(self, key: tuple, into: list, names, build: Callable[[], list], make: Callable[[list], object]):
        """The linear hot path's plans and task table for these targets: cached, and checked on every call
        against what the targets hold (a ShardedPool plans, and agrees, on every call instead)."""
        return self._plan_cache.entry(key, into, build, self._watcher(into, names), make)

    def _grouped_kind(self) -> Optional[str]:
        """Which one-call path linear merges take: "cpu" (C++ task table), "triton" (one launch over
        tensors resident on the device), "compressed" (a compressed pool's C++ DeltaPlan: compressed.LinearTable),
        or None (per tensor: streamed tiers, the eager backend, a compressed pool on a GPU)."""
        if self._compressed is not None:  # decoded inside their own kernel: one native call on the C++ backend
            return "compressed" if self.backend == "cpu" else None
        if self._cuda is None:
            return "cpu" if self.backend == "cpu" else None
        return "triton" if self.backend == "triton" and not self._cuda.streamed else None

    def _graph_weights(self, weight_rows, method: str) -> bool:
        """CUDA-tensor weights on the pool's device: used where they are, values unchecked (no host sync),
        so a CUDA graph can capture materialize and replay it after the caller updates them in place."""
        if self.device.type != "cuda" or method != "linear" or self._compressed is not None:
            return False
        if not all(isinstance(w, torch.Tensor) and w.device.type == "cuda" for w in weight_rows):
            return False
        elsewhere = [w.device for w in weight_rows if w.device != self.device]
        if elsewhere:
            # a kernel on the pool's GPU would dereference another GPU's memory (an illegal address, or slow
            # peer reads); copying them is a transfer a graph capture cannot hold, so they are refused
            raise InputError(f"weights on {elsewhere[0]}, the pool is on {self.device}; put them on the pool's device")
        if _capturing(self.device) and self._cuda is not None and self._cuda.streamed:
            # the streamed tiers copy from host memory through events recorded outside the capture
            raise InputError(f"a pool on the {self.residency} tier streams from host memory and cannot be captured "
                             "in a CUDA graph; use residency='device'")
        return True

    def _plan(self, into: list, group_of: List[int], names: NameMap, strict: bool) -> List[_Plan]:
        """Resolves and checks every target before anything is written."""
        mapped = [_map_name(n, names) for n in self.names]
        if names is not None:
            first = {}
            for name, model_name in zip(self.names, mapped):
                if model_name is not None and first.setdefault(model_name, name) != name:
                    raise InputError(f"names= maps pool tensors {short(first[model_name])} and {short(name)} to "
                                     f"one target tensor {short(model_name)}; map each to its own name, or one to None "
                                     "to skip it (nothing was written)")
        targets = [_tensors_of(m) for m in into]
        plans = []
        problems = []
        missing = []  # (pool name, target name, candidate) without a counterpart: said once, with a hint
        for idx, (name, model_name) in enumerate(zip(self.names, mapped)):
            if model_name is None:
                continue
            outs, fixups, dests = [], [], []
            for k, tmap in enumerate(targets):
                where = f" in model {k}" if len(into) > 1 else ""
                t = tmap.get(model_name)
                if t is None:
                    if strict:
                        missing.append((name, model_name, k))
                    continue
                problem, out = self._checked_target(t, model_name, self.shapes[name], where)
                if problem is not None:
                    problems.append(problem)
                    continue
                _take(out, outs, dests, fixups)
            if problems and len(problems) >= 5:
                break
            if len(outs) == len(into):
                plans.append(_Plan(name, group_of[idx], outs, dests, fixups, model_name))
            elif outs and not strict and not problems:
                # Skipping it for every candidate would leave stale values in those that have it.
                have = [k for k, tmap in enumerate(targets) if model_name in tmap]
                problems.append(f"with strict=False every candidate must have the same tensors: {model_name!r} is in "
                                f"model(s) {have} but not in the others")
        if strict and not problems:
            plans += self._tied_head_plans(targets, mapped, group_of, problems)
            problems += self._float_targets_of_skipped(targets, names)
        if missing:
            problems[:0] = _missing_problems(missing, targets, self.shapes, set(mapped))
        if problems:
            more = "" if len(problems) < 5 else " (and possibly more)"
            raise InputError("; ".join(problems[:5]) + more + "; nothing was written")
        if not plans and self.names:  # a names= rule or strict=False that matched nothing: a silent no-op before
            named = [m for m in mapped if m is not None]
            why = ("names= maps every pool tensor to None" if not named else
                   f"no target has any pool tensor under the names given (the first is {named[0]!r}), and "
                   "strict=False skips the missing ones")
            raise InputError(f"the merge would write nothing: {why}")
        return plans

    def _float_targets_of_skipped(self, targets: List[dict], names: NameMap) -> List[str]:
        """strict=True: a target's float tensor that the checkpoints hold as integers (left out of the pool, as
        step counters are) would keep its old values silently (an audit: a corrupt header's I32 lm_head)."""
        problems = []
        for name in self.skipped:
            try:
                model_name = _map_name(name, names)
            except LookupError:  # a names= function made for the merged tensors only (a KeyError from a dict
                continue  # of pool.names: a review): the integer tensors are never written anyway
            for k, tmap in enumerate(targets):
                t = tmap.get(model_name) if model_name is not None else None
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    where = f" in model {k}" if len(targets) > 1 else ""
                    problems.append(f"tensor {model_name!r}{where} is {t.dtype}, but the checkpoints hold it as "
                                    "integers, which are not merged (strict=False leaves it as it is)")
                    break
        return problems

    def _checked_target(self, t: torch.Tensor, model_name: str, shape: tuple, where: str):
        """(problem, None), or (None, (out, target[, (temporary, target)])): whether a merge of `shape` can be
        written into target tensor t, and where (t itself, or a temporary copied back after every check)."""
        if (kind := kind_problem(t)) is not None:  # before shape and dtype: a nested tensor has no sizes
            return f"tensor {model_name!r}{where} {kind}", None
        t = t.detach()
        if tuple(t.shape) != shape:
            return f"tensor {model_name!r}{where} has shape {tuple(t.shape)}, the pool's has {shape}", None
        if t.dtype not in OUTPUT_DTYPES:
            return (f"tensor {model_name!r}{where} has dtype {t.dtype}; merges are written as float32, float16 or "
                    "bfloat16"), None
        if t.device.type != self.device.type or (self.device.index is not None and t.device.index != self.device.index):
            return f"tensor {model_name!r}{where} is on {t.device}, the pool computes on {self.device}", None
        if (unusable := _unusable_target(t)) is not None:
            return f"tensor {model_name!r}{where}: {unusable}", None
        if t.is_contiguous():
            return None, (t, t)
        with torch.inference_mode(False):  # rare (a transposed view); never an inference tensor, as plans are kept
            tmp = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return None, (tmp, t, (tmp, t))

    def _tied_head_plans(self, targets: List[dict], mapped: list, group_of: List[int], problems: list) -> List[_Plan]:
        """Tied checkpoints (an input embedding and no output head: tied.py's rule, as `pymerge merge` reads
        them) into targets whose untied head no pool tensor writes: the head gets the merged embedding, what
        the checkpoints' own models compute with (left alone it kept its random init, or an earlier
        candidate's head). Under strict=True only: strict=False leaves it as it is."""
        plans = []
        for head, emb in _untied_heads(self.names, self._tied_embedding(), targets, mapped, self.shapes):
            outs, dests, fixups = [], [], []
            for k, tmap in enumerate(targets):
                if head not in tmap:
                    have = [k for k, tmap in enumerate(targets) if head in tmap]
                    problems.append(f"every candidate must have the same tensors: {head!r} (an untied head, which "
                                    f"gets the tied checkpoints' {emb!r}) is in model(s) {have} but not in the others")
                    break
                problem, out = self._checked_target(tmap[head], head, self.shapes[emb],
                                                    f" in model {k}" if len(targets) > 1 else "")
                if problem is not None:
                    problems.append(problem)
                    break
                _take(out, outs, dests, fixups)
            if len(outs) == len(targets):
                plans.append(_Plan(emb, group_of[self.names.index(emb)], outs, dests, fixups, head))
        for head, emb, hint in _computed_heads(self.names, self._tied_embedding(), targets, mapped):
            problems.append(f"tensor {head!r} (an untied output head, which gets the tied checkpoints' {emb!r}): "
                            f"{hint}")
        return plans

    def _tied_embedding(self) -> Optional[str]:
        """The pool's input embedding when its checkpoints are files that store no output head (tied), else
        None; once. Not for state dicts or modules: one without a head is a pool over part of a model, whose
        target tensors the pool lacks are left as they are (a module's state dict names tied weights twice); nor
        for a folder whose config.json says the model is untied (AutoModel's backbone, saved without its head:
        the target's own head stays as it is)."""
        if hasattr(self, "_tied_emb"):  # (a loaded pool's is the saved one's)
            return self._tied_emb
        if not self._from_files:
            return None
        from pymerge.tied import tied_embedding
        # a backbone saved without its head: the folders given, or those holding the files given
        folders = dict.fromkeys(self._folders + [os.path.dirname(p) for p, _, _ in self._files])
        untied = any(_config_says_untied(f) for f in folders)
        self._tied_emb = None if untied else tied_embedding(self.names, self.shapes.__getitem__)
        return self._tied_emb

    def _check_overlaps(self, plans: List[_Plan], k: int) -> None:
        """Refuses, before any write, targets that share memory with what the pool reads (a source model
        it reads in place, a tensor from pool.tensor()) or with another candidate's target."""
        targets = [t for p in plans for t in p.targets]
        if any(p.fixups for p in plans):  # strided targets (rare): their whole extent
            spans = np.array(list(map(_span, targets)), dtype=np.int64).reshape(-1, 2)
        else:  # contiguous: [data_ptr, data_ptr + nbytes), gathered without a Python tuple per tensor
            starts = np.fromiter((t.data_ptr() for t in targets), np.int64, len(targets))
            spans = np.stack([starts, starts + np.fromiter((t.nbytes for t in targets), np.int64, len(targets))], 1)
        named = lambda i: (plans[i // k].name, i % k)  # noqa: E731  (targets are plan-major, k per plan)
        hit = self._spans.overlap(spans)
        if hit is not None:
            (name, c), what = named(hit[0]), hit[1]
            where = f" of candidate {c}" if k > 1 else ""
            raise InputError(f"into: the target of {short(name)}{where} shares memory with {what}, which the "
                             "pool reads in place; merging into it would change later merges. Merge into a separate "
                             "model (nothing was written)")
        clash = _target_overlap(spans, k, lambda i, j: _view(targets[i]) == _view(targets[j]),
                                lambda i, j: _shared_elements(targets[i], targets[j]) is not False)
        if clash is not None:
            (a, ca), (b, cb) = named(clash[0]), named(clash[1])
            if ca != cb:
                raise InputError(f"into: candidates {min(ca, cb)} and {max(ca, cb)} share the memory of {b!r}; "
                                 "each candidate needs its own model (nothing was written)")
            where = f" of candidate {ca}" if k > 1 else ""
            if _shared_elements(targets[clash[0]], targets[clash[1]]) is None:
                raise InputError(f"into: the targets of {a!r} and {b!r}{where} may overlap: views of one memory "
                                 "too large (or too unlike) to check element by element (nothing was written)")
            raise InputError(f"into: the targets of {a!r} and {b!r}{where} overlap without being the same tensor "
                             "(nothing was written)")

    def _run_linear(self, plans: List[_Plan], tables: List[np.ndarray]) -> None:
        if self._compressed is not None:
            with _on_device(self.device):
                return compressed.run_linear(self._compressed, plans, tables, self.backend, self.num_threads)
        if self._cuda is not None:
            self._cuda.run_linear(plans, tables, self.backend)
            return
        n_groups = max(t.shape[0] for t in tables)
        rows = [[t[g if t.shape[0] > 1 else 0].tolist() for t in tables] for g in range(n_groups)]
        from pymerge.methods.base import WritePass
        with WritePass(sum(len(p.outs) for p in plans)) as writes:
            for p in plans:
                sum_into(self._inputs[p.name], rows[p.group], p.outs, backend=self.backend,
                         num_threads=self.num_threads)
                writes.written += len(p.outs)

    def _run_method(self, method: str, plans: List[_Plan], tables: List[np.ndarray], seed: int, params) -> None:
        """Any registered method: one merge_tensor per tensor and candidate (no fused multi-output path), after
        every tensor and candidate is checked and prepared (MergeMethod.prepare): an error writes nothing."""
        from pymerge.methods.base import MergeMethod, TensorTask, check_magnitudes, get_method, merge_prepared
        m = get_method(method)
        m.validate(self.num_checkpoints, self.has_base)
        _warn_ignored(m, tables, self.has_base)
        per_model, global_params = _split_params(m, params, self.num_checkpoints)
        if self._compressed is not None:
            with _on_device(self.device):
                return compressed.run_method(self._compressed, m, per_model, global_params, plans, tables, seed,
                                             self.backend, self.num_threads)
        groups = []  # per plan: its tasks and outputs
        for p in plans:
            inputs = self._inputs[p.name]
            base = self._base.get(p.name)
            base_version = versions_of([base])[0] if base is not None else 0
            keys = [(v, base_version) for v in versions_of(inputs)]  # checkpoint i's data as of now (see _selection)
            tasks = []
            for k, table in enumerate(tables):
                w = table[p.group if table.shape[0] > 1 else 0]
                mp = [dict(per_model[i], weight=float(w[i])) for i in range(self.num_checkpoints)]
                task = TensorTask(inputs=inputs, base=base, model_params=mp, params=dict(global_params),
                                  name=p.name, seed=seed, backend=self.backend, num_threads=self.num_threads,
                                  cache=self._selection, cache_keys=keys)
                if hasattr(m, "dot_group"):  # slerp, nuslerp, model_stock: their dots depend on the checkpoints only
                    task.dots = _cached_dots(self._selection, (m.name, p.name, tuple(keys)))
                m.check_params(task)
                check_magnitudes(m, task, self.labels)
                tasks.append((task, p.outs[k]))
            groups.append(tasks)
        self._check_borrowed()  # the parameters' number-likes (the caller's code) were read since: as above

        def on_device(tasks):  # streamed tiers: the method gets whole tensors on the device, one tensor's at a time
            host = tasks[0][0] if tasks else None
            if host is None or host.inputs[0].device == self.device:
                return contextlib.nullcontext()
            inputs = [t.to(self.device, non_blocking=True) for t in host.inputs]
            base = host.base.to(self.device, non_blocking=True) if host.base is not None else None
            return _swapped(tasks, inputs, base)

        def pairs():
            for tasks in groups:
                with on_device(tasks):
                    yield from tasks
        with _on_device(self.device):  # kernels, copies and events on the pool's GPU, not the current one
            if type(m).prepare is not MergeMethod.prepare:  # (multislerp, karcher: a streamed tier copies twice)
                for tasks in groups:  # every tensor's data-dependent checks (multislerp's coefficients) first
                    with on_device(tasks):
                        for task, _ in tasks:
                            m.prepare(task)
            # (all of a streamed pool's tensors on the device at once needed the GPU memory it was streamed for;
            # closed on the way out: an error's traceback kept the generator, and one tensor's copies, alive)
            with contextlib.closing(pairs()) as each:
                merge_prepared(m, each, sum(len(tasks) for tasks in groups))


ForkingPickler.register(CheckpointPool, _reduce_for_processes)  # (subclasses: __init_subclass__)


@contextlib.contextmanager
def _swapped(tasks, inputs, base):
    """The tasks' inputs and base replaced by (device copies) inputs and base in the block, then the host ones
    again, so the copies go as the block ends (the caching allocator reuses them in stream order)."""
    host_inputs, host_base = tasks[0][0].inputs, tasks[0][0].base
    for task, _ in tasks:
        task.inputs, task.base = inputs, base
    try:
        yield
    finally:
        for task, _ in tasks:
            task.inputs, task.base = host_inputs, host_base


def _cached_dots(cache: SelectionCache, key: tuple) -> Callable:
    """interp.group_dots, kept in the pool's cache under (method, tensor, the inputs' version counters):
    a search pays for a tensor's dot products once, not once per candidate."""
    def dots(xs, base, sub, group, backend="auto", num_threads=0):
        from pymerge.ops import interp
        full = ("dots",) + key + (group, sub)
        hit = cache.get(full)
        if hit is None:
            hit = interp.group_dots(xs, base, sub, group, backend, num_threads)
            cache.put(full, hit)
        return hit
    return dots


def _resolve_device(device) -> torch.device:
    """"cpu" or "cuda[:i]" as a torch.device; CUDA with a fixed index, so later changes of the current
    device do not move the pool."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {short(device)}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if resolved.type == "cuda":
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        resolved = torch.device("cuda", index)
    return torch.device("cpu") if resolved.type == "cpu" else resolved  # "cpu:0": CPU tensors carry no index


def _on_device(device: torch.device):
    """Makes `device` the current CUDA device for a block (streams, events, launches); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last + 1) byte addresses a tensor's elements occupy (strided views: the whole extent)."""
    a = t.data_ptr()
    if t.is_contiguous():
        return a, a + t.nbytes
    if t.numel() == 0:
        return a, a
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return a, a + extent * t.element_size()


class _Spans:
    """The byte ranges of the pool's resident tensors on its compute device, sorted, for overlap tests
    of many targets at once (built once: a materialize pays one searchsorted)."""

    def __init__(self, labeled: List[Tuple[torch.Tensor, str]], device: torch.device):
        on = sorted((_span(t), what) for t, what in labeled if t.device.type == device.type and t.numel())
        self._what = [what for _, what in on]
        self.starts = np.array([a for (a, _), _ in on], dtype=np.int64)
        self.ends = np.array([b for (_, b), _ in on], dtype=np.int64)
        self.reach = np.maximum.accumulate(self.ends) if len(on) else self.ends  # max end so far

    def overlap(self, spans: np.ndarray):
        """(row of the first [start, end) span sharing bytes with a pool tensor, which one), or None."""
        if not len(self.starts) or not len(spans):
            return None
        last = np.searchsorted(self.starts, spans[:, 1], side="left") - 1  # last pool tensor starting before the end
        hits = np.flatnonzero((last >= 0) & (self.reach[np.maximum(last, 0)] > spans[:, 0]) & (spans[:, 1] > spans[:, 0]))
        if not len(hits):
            return None
        a, b = spans[hits[0]]
        return int(hits[0]), next(w for w, s, e in zip(self._what, self.starts, self.ends) if s < b and a < e)


def _pool_backend(device: torch.device, backend: str) -> str:
    """pick_backend's choice, refused here rather than at the first materialize where it cannot run."""
    try:
        chosen = pick_backend(device, backend)
    except ValueError as exc:  # an unknown name: the pool's own error class
        raise InputError(str(exc)) from None
    if chosen == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(f"backend 'triton' runs on CUDA tensors (on the CPU only in Triton's interpreter, "
                         f"TRITON_INTERPRET=1); the pool is on {device}")
    if chosen in ("cuda", "cpu") and device.type != chosen:  # (every materialize said "needs cuda tensors")
        raise InputError(f"backend {chosen!r} runs on {chosen} tensors; the pool is on {device}")
    return chosen


def _first_names(names: List[str], group_of: List[int], n_groups: int) -> Callable[[int], str]:
    """group -> the name of its first tensor ("" for none), as messages name a group: one pass over the names
    (a scan per group and candidate cost groups x candidates x tensors: 7.7 s a call at 16,000 layer groups)."""
    if n_groups == 1:  # (flat weights: group 0's first tensor, found in a step or two)
        return lambda g: next((name for name, h in zip(names, group_of) if h == g), "")
    first: dict = {}
    for name, g in zip(names, group_of):
        first.setdefault(g, name)
    return lambda g: first.get(g, "")


def _target_overlap(spans: np.ndarray, k: int, same_view: Callable[[int, int], bool],
                    share: Callable[[int, int], bool]):
    """(row i, row j) of two targets sharing bytes (rows are plan-major, k candidates per plan), or None.
    The same view twice inside one candidate is allowed: tied weights (embeddings and head) written twice.
    Two views of one span (X and X.t(), or another dtype) are not ties: each would need its own merge.
    Strided targets whose extents overlap may still share no element (column slices of a fused weight,
    interleaved rows): share(i, j) decides."""
    cand = np.arange(len(spans)) % k
    keep = np.flatnonzero(spans[:, 1] > spans[:, 0])
    order = keep[np.argsort(spans[keep, 0], kind="stable")]
    s = spans[order]
    reach = np.maximum.accumulate(s[:, 1]) if len(s) else s[:, 1]
    for j in np.flatnonzero(s[1:, 0] < reach[:-1]) + 1:  # usually none, or only ties: checked one by one
        # from the first span that reaches j's start (reach only grows): each tie scanned every earlier target,
        # tensors x candidates^2 (6.5 s for 128 tied candidates of 1,000 tensors)
        for i in range(int(np.searchsorted(reach[:j], s[j, 0], side="right")), j):
            tie = (cand[order[i]] == cand[order[j]] and s[i, 0] == s[j, 0] and s[i, 1] == s[j, 1]
                   and same_view(int(order[i]), int(order[j])))
            if s[i, 1] > s[j, 0] and not tie and share(int(order[i]), int(order[j])):
                return int(order[i]), int(order[j])
    return None


_MARKED_MAX = 1 << 28  # elements of a shared extent share() marks (a bool each); beyond, overlapping extents clash


def _shared_elements(a: torch.Tensor, b: torch.Tensor) -> Optional[bool]:
    """Whether two tensors whose extents overlap hold a common element: contiguous ones do; strided views of one
    element size are compared element by element (a flag per element of their joint extent: paid once per plan,
    ~70 ms for two column slices of a 4096 x 12288 bfloat16 weight); None where that cannot tell (views of other
    element sizes or misaligned, an extent past _MARKED_MAX)."""
    es = a.element_size()
    if a.is_contiguous() and b.is_contiguous():
        return True
    lo = min(a.data_ptr(), b.data_ptr())
    hi = max(_span(a)[1], _span(b)[1])
    if b.element_size() != es or (a.data_ptr() - lo) % es or (b.data_ptr() - lo) % es or (hi - lo) // es > _MARKED_MAX:
        return None
    mark = torch.zeros((hi - lo + es - 1) // es, dtype=torch.bool, device=a.device)
    mark.as_strided(a.shape, a.stride(), (a.data_ptr() - lo) // es).fill_(True)
    return bool(mark.as_strided(b.shape, b.stride(), (b.data_ptr() - lo) // es).any())


def _view(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset(), t.dtype


def _files_read(sources) -> list:
    """(absolute path, (device, inode), stamp) of each checkpoint file the sources mapped, once each."""
    out, seen = [], set()
    for src in sources:
        for f in getattr(getattr(src, "_inner", src), "shards", ()):  # (a sharded pool's sources wrap the files')
            ident = getattr(f, "mapped_identity", None)
            if ident is not None and ident not in seen:
                seen.add(ident)
                out.append((os.path.abspath(f.path), ident, getattr(f, "mapped_stamp", None)))
    return out


@contextlib.contextmanager
def _pool_writes():
    """While the pool writes its targets (not while a caller's groups= or names= function runs): the out= rule for
    inference tensors (ops/_checks.py) is the caller's, and the pool fills a model made under inference mode
    wherever it is called, whichever way its writes reach the ops (a wrapper; torch.ops under a TorchFunctionMode)."""
    token = FILLING_TARGETS.set(True)
    try:
        yield
    finally:
        FILLING_TARGETS.reset(token)


@contextlib.contextmanager
def _torch_writes(pool, plans):
    """_pool_writes; and where backend='torch' writes a model made under inference mode (torch's in-place ops,
    which torch allows only inside it; the kernels write by address): on the CPU inside inference mode (what the
    pool keeps of such a call: numbers, and dot products it only reads), elsewhere refused before any write (it
    raised partway)."""
    inference = pool.backend == "torch" and not torch.is_inference_mode_enabled() and any(
        t.is_inference() for p in plans for t in p.targets)
    if inference and pool.device.type != "cpu":
        raise InputError("the model merged into was made under torch.inference_mode(), and backend='torch' writes "
                         "it with torch's in-place ops, which torch allows only there: call materialize inside "
                         "torch.inference_mode() (nothing was written)")
    with _pool_writes(), torch.inference_mode() if inference else contextlib.nullcontext():
        yield


def _copy_back(fixups: list, plans) -> None:
    """Each (temporary, transposed target) of the plans: the merge written into the target (an inference tensor's
    inside inference mode, where torch lets it be written: the pool fills such a model wherever it is called). The
    other targets hold the merge already: an error or a Ctrl-C part way says how many do (a WritePass note; an
    interrupt here left a partial merge unsaid: an audit)."""
    if not fixups:
        return
    from pymerge.methods.base import WritePass
    total = sum(len(p.outs) for p in plans)
    with WritePass(total) as writes:
        writes.written = total - len(fixups)
        for tmp, target in fixups:
            if target.is_inference() and not torch.is_inference_mode_enabled():
                with torch.inference_mode():
                    target.copy_(tmp)
            else:
                target.copy_(tmp)
            writes.written += 1


def _take(out: tuple, outs: list, dests: list, fixups: list) -> None:
    """Adds one candidate's checked target (_checked_target's (out, target[, fixup])) to a plan's lists."""
    outs.append(out[0])
    dests.append(out[1])
    fixups.extend(out[2:])


def _addresses_and_sizes(ts: list) -> np.ndarray:
    """uint64 [2, len(ts)]: data_ptr and storage bytes of each tensor (C-level maps: no Python frame per tensor)."""
    n = len(ts)
    return np.stack([np.fromiter(map(grouped._data_ptr, ts), np.uint64, n),
                     np.fromiter(map(grouped._nbytes, map(grouped._storage, ts)), np.uint64, n)])


class _Plans(list):
    """Checked plans, and what else they depend on: recheck() is False once a cached entry of them may no longer
    be used (tied pool tensors whose values no longer agree: the check that allowed the tie fails now)."""
    recheck: Optional[Callable[[], bool]] = None


def _tie_pairs(plans: List[_Plan], keys: list) -> list:
    """(candidate, first plan, later plan) for every later plan writing one memory with an earlier one in
    that candidate (keys: _tie_key's). Empty targets are skipped: nothing to write, and they may share an address."""
    out = []
    for c in range(len(keys[0]) if keys else 0):
        if len({key[c] for key in keys}) == len(keys):
            continue  # no tie in this candidate (the usual case)
        first: dict = {}
        for p, key in zip(plans, keys):
            if p.targets[c].numel():
                other = first.setdefault(key[c], p)
                if other is not p:
                    out.append((c, other, p))
    return out


def _last_of_tied(plans: List[_Plan], keys: list) -> List[_Plan]:
    """Tied weights (one tensor under two names, as embeddings and head; _check_ties has checked they get
    the same merge) are written once, by the last plan: the grouped native call never writes one memory
    from two threads at once."""
    last = {key: i for i, key in enumerate(keys)}
    return plans if len(last) == len(plans) else [p for i, p in enumerate(plans) if last[keys[i]] == i]


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two held tensors are bit for bit the same (NaN payloads and signed zeros included)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
        return True
    return torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))


_HEAD_ENDS = ("lm_head.weight", "decoder.weight", "vocab_projector.weight", "output.weight")  # tied.is_head's, prefiltered


def _untied_heads(pool_names: Sequence[str], emb: Optional[str], targets: List[dict], mapped: list,
                  shapes: dict) -> List[Tuple[str, str]]:
    """(target head, pool embedding emb) for each output head some target holds untied (not its embedding's
    memory), of the embedding's shape, that no pool tensor writes; none unless the checkpoints are tied."""
    emb_target = mapped[pool_names.index(emb)] if emb is not None else None
    if emb_target is None:
        return []
    from pymerge.tied import is_head
    written = set(mapped)
    heads = dict.fromkeys(n for tmap in targets for n in tmap  # (a state dict's keys need not be strings)
                          if isinstance(n, str) and n.endswith(_HEAD_ENDS) and n not in written and is_head(n))
    return [(head, emb) for head in heads
            if any(head in tmap and _untied(tmap[head], tmap.get(emb_target), shapes[emb]) for tmap in targets)]


# a tensor's name as a wrapper or a computation holds it: pruned (weight_orig), parametrized, the older weight_norm,
# a PEFT LoRA layer (base_layer)
_COMPUTED_FORMS = re.compile(r"^(.*?)(?:\.parametrizations\.(\w+)\.original[01]?|_orig|_g|_v|\.base_layer\.(\w+))$")


def _computed_heads(pool_names: Sequence[str], emb: Optional[str], targets: List[dict],
                    mapped: list) -> List[Tuple[str, str, str]]:
    """(head, emb, why) for each output head a target holds computed or wrapped (pruned, parametrized, a LoRA layer)
    where the checkpoints are tied: the merged embedding never reached it, silently (an audit), as _untied_heads
    looks for the head's own name."""
    if emb is None or mapped[pool_names.index(emb)] is None:
        return []
    from pymerge.tied import is_head
    written, found = set(mapped), {}
    for tmap in targets:
        for n in tmap:
            m = _COMPUTED_FORMS.match(n) if isinstance(n, str) else None
            if m is None:
                continue
            prefix, param, layer_leaf = m.groups()
            head = (f"{prefix}.{param}" if param else f"{prefix}.{layer_leaf}" if layer_leaf else prefix)
            if head.endswith(_HEAD_ENDS) and is_head(head) and head not in written and head not in tmap:
                hint = _wrapped_hint(head, tmap, mappable=False)  # (no pool tensor of its name to map: a review)
                if hint:
                    found.setdefault(head, hint)
    return [(head, emb, hint) for head, hint in found.items()]


def _untied(head: torch.Tensor, emb: Optional[torch.Tensor], shape: tuple) -> bool:
    """Whether a target's head of the embedding's shape is a tensor of its own, not its embedding (one that
    cannot be written, a meta one for instance, counts: its plan reports it)."""
    if kind_problem(head) is not None:
        return True
    if tuple(head.shape) != shape:
        return False
    if emb is None or kind_problem(emb) is not None:
        return True
    return head is not emb and _memory(head) != _memory(emb)


def _memory(t: torch.Tensor) -> tuple:
    """Where t's elements are (a DTensor's: its local shard's; the wrapper has no address of its own)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.data_ptr(), t.stride()


def _cacheable(groups: GroupRule, names: NameMap) -> bool:
    """Plans can be cached only under rules that are values (a function or dict may change)."""
    return (groups is None or isinstance(groups, str)) and (names is None or isinstance(names, str))


def _missing_problems(missing: list, targets: List[dict], shapes: dict, written: set) -> List[str]:
    """One problem per target lacking pool tensors, naming a few, with one hint: a wrapper's prefix or a
    computed tensor (_wrapped_hint), else what the target holds instead of the first (_renamed_hint)."""
    out = []
    for k in dict.fromkeys(k for _, _, k in missing):
        mine = [(name, model_name) for name, model_name, kk in missing if kk == k]
        where = f" in model {k}" if len(targets) > 1 else ""
        looked = [m for n, m in mine if m != n]
        what = (f"pool tensor {mine[0][0]!r} has no counterpart" if len(mine) == 1 else
                f"pool tensors {_some([n for n, _ in mine])} have no counterpart")
        what += f" (looked up as {_some(looked)})" if looked else ""
        tmap = targets[k]
        hints = dict.fromkeys(h for _, m in mine if (h := _wrapped_hint(m, tmap)))
        plain = [n for n, m in mine if not _wrapped_hint(m, tmap)]
        if plain:
            hints[_renamed_hint(plain[0], tmap, shapes, written)] = None
        out.append(f"{what}{where} ({'; '.join(hints)})")
    return out


def _wrapped_hint(model_name: str, tensors: dict, mappable: bool = True) -> str:
    """Why a target lacks a name it seems to hold: wrapped (torch.compile, DataParallel/DDP), parametrized or
    pruned; "" when none of these."""
    if "_orig_mod." + model_name in tensors:
        return "the target is a torch.compile'd module: pass names=\"_orig_mod.\" or merge into its _orig_mod"
    if "module." + model_name in tensors:
        return ("the target is wrapped in DataParallel or DistributedDataParallel: pass names=\"module.\" or merge "
                "into its .module")
    head, _, leaf = model_name.rpartition(".")
    original = f"{head + '.' if head else ''}parametrizations.{leaf}.original"
    if original in tensors or original + "0" in tensors:
        return (f"the target holds it as {original!r}: a parametrized tensor (weight_norm, parametrize) is "
                "computed from others; merge before parametrizing")
    if model_name + "_g" in tensors and model_name + "_v" in tensors:  # (its _v has the weight's shape: a trap)
        return (f"the target holds it as {model_name + '_g'!r} and {model_name + '_v'!r}: the older "
                "torch.nn.utils.weight_norm computes it from them (weight = g * v / |v|); merge before applying it, "
                "or remove it first (torch.nn.utils.remove_weight_norm)")
    wrapped = f"{head + '.' if head else ''}base_layer.{leaf}"
    if wrapped in tensors:
        return (f"the target holds it as {wrapped!r}: a PEFT LoRA layer wraps it; merge before wrapping (or after "
                "merge_and_unload)" + (", or pass names= mapping it there" if mappable else ""))
    if model_name + "_orig" in tensors:
        return (f"the target holds it as {model_name + '_orig'!r}: a pruned tensor (torch.nn.utils.prune; the older "
                "spectral_norm too) is computed from it by a hook; merge before pruning, or make it permanent first "
                "(prune.remove)")
    return ""


def _renamed_hint(name: str, tmap: dict, shapes: dict, written: set) -> str:
    """What the target holds instead of pool tensor `name` (its unwritten tensors of that shape, else a few of
    them), and the two ways to pair the names."""
    unwritten = [n for n, t in tmap.items() if n not in written and t.is_floating_point()]
    alike = [n for n in unwritten if _shape_of(tmap[n]) == shapes[name]]
    if alike:
        held = f"the target holds {_some(alike)}, of the shape of {short(name)}, which no pool tensor writes"
    else:
        held = f"the target has no unwritten tensor of the shape of {short(name)}" + (
            f"; its unwritten ones are {_some(unwritten)}" if unwritten else "")
    return (held + ": pass names= (a prefix, or a function giving the target's name), or build the pool from "
            "the loaded models' state_dict()s (transformers renames some tensors as it loads them, GPT-NeoX's "
            "embed_out as lm_head, and fuses MoE experts into one tensor)")


def _some(names: list) -> str:
    return ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _shape_of(t: torch.Tensor) -> Optional[tuple]:
    try:
        return tuple(t.shape)
    except (RuntimeError, ValueError):  # an uninitialized lazy parameter, a nested tensor
        return None


def _unusable_target(t: torch.Tensor) -> Optional[str]:
    """Why a kernel may not write into t (no memory of its own: a FakeTensor or a wrapper, whose address 0 the
    native tables wrote to, a segfault: an audit; its storage freed, read-only memory, elements sharing memory), or
    None."""
    return address_problem(t) or backing_problem(t) or overlap_problem(t) or negated_problem(t) or write_problem(t)


def _watched(plans: List[_Plan], into: list, names: NameMap, pool_names: Sequence[str], heads: bool) -> list:
    """(tensor as the target holds it, where it is held, its key) for every plan and target: what a cached
    plan checks is unchanged before it is reused. A module's tensor is held by its submodule's _parameters
    or _buffers (replacing one registers, and so is seen anyway), and each submodule on its path by its
    parent's _modules, as (submodule, _modules, name): deleting or renumbering submodules (del model[2],
    ModuleList's __delitem__ and insert) registers nothing, and the plan would write the old names' tensors
    into the new ones. Every key the pool has, planned or not (the second of two tied names, whose plan was
    dropped: untying them must be seen); one a module lacks (strict=False) as (None, the _modules of its
    deepest submodule there, the next name): ModuleList.insert at the end registers nothing either. With tied
    checkpoint files (heads: True) every output head too, planned or not: a head tied to its embedding may be
    untied later and must then get the embedding's merge (_tied_head_plans). A state dict registers nothing:
    every pool key it lacks (None) is watched, with heads every head it holds, and its keys (grouped._Entry:
    one added, a head of any name or an entry a fresh pool refuses, must be seen). Its other values are
    neither read nor written: not watched (a sparse tensor there has no address to compare)."""
    keys = dict.fromkeys([_map_name(n, names) for n in pool_names] + [p.target for p in plans])
    keys.pop(None, None)
    out = []
    for m in into:
        if isinstance(m, dict):
            extra = [k for k in m if isinstance(k, str) and k.endswith(_HEAD_ENDS)] if heads else []
            out.extend((m.get(key), m, key) for key in dict.fromkeys(list(keys) + extra))
            continue
        held = _tensors_of(m)
        mine = dict.fromkeys([k for k in keys if k in held]
                             + ([k for k in held if k.endswith(_HEAD_ENDS)] if heads else []))
        out.extend((held[key],) + _owner(m, key) for key in mine)
        out.extend(_links(m, {key.rpartition(".")[0] for key in mine}))
        out.extend(_absent(m, [k for k in keys if k not in held]))
    return out


def _links(module: torch.nn.Module, paths) -> list:
    """(submodule, its parent's _modules, its name there) for every submodule on the paths ("a.b.c": a, a.b
    and a.b.c), each once, and the dicts of each of them and of the root (_own_dicts)."""
    seen, out = set(), _own_dicts(module)  # (a module under two names: a link per name, its dicts once)
    for path in paths:
        parent, prefix = module, ""
        for part in path.split(".") if path else []:
            if part not in parent._modules:  # (_NOT_A_PATH: that call's plans are not kept)
                break
            sub, prefix = parent._modules[part], f"{prefix}.{part}"
            if prefix not in seen:
                seen.add(prefix)
                out.append((sub, parent._modules, part))
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.extend(_own_dicts(sub))
            parent = sub
    return out


def _own_dicts(module: torch.nn.Module) -> list:
    """(dict, module.__dict__, name) for its _modules, _parameters and _buffers: ModuleList's and Sequential's
    __delitem__ renumber by putting a new _modules dict in place, registering nothing (the old one, watched,
    still held the old names)."""
    d = module.__dict__
    return [(d.get(name), d, name) for name in ("_modules", "_parameters", "_buffers")]


def _absent(module: torch.nn.Module, keys) -> list:
    """For each key the module lacks ("a.b.c.weight" without a.b): (None, a's _modules, "b") for its first missing
    submodule, and (submodule, _modules, name) for those before it (a) with their dicts (_own_dicts):
    ModuleList.insert replacing one registers nothing either. Where only the tensor is missing, (None, the
    submodule's _parameters or _buffers, its name): registering one is seen, but a tensor put straight into
    those dicts (module._parameters["bias"] = p, as accelerate does) registers nothing. Each once."""
    out = {}
    for key in keys:
        *parts, leaf = key.split(".")
        sub = module
        for part in parts:
            nxt = sub._modules[part] if part in sub._modules else None  # (a TorchScript module's has no get)
            out[(id(sub._modules), part)] = (nxt, sub._modules, part)
            if nxt is None:
                break
            for d in _own_dicts(nxt):
                out[(id(d[1]), d[2])] = d
            sub = nxt
        else:
            for d in (sub._parameters, sub._buffers):
                out[(id(d), leaf)] = (None, d, leaf)
    return list(out.values())


# where a module's named_parameters() names no submodule path (checkpoint_wrapper, FSDP1's summon_full_params drop
# their wrapped module's name): no dict to watch, so the plans serve that call only (a KeyError there: an audit)
_NOT_A_PATH = ("a name no submodule path gives",)


def _owner(module: torch.nn.Module, key: str):
    """The dict that holds module's tensor `key` (a submodule's _parameters or _buffers), and its name there."""
    path, _, leaf = key.rpartition(".")
    sub = module
    for part in path.split(".") if path else ():  # not get_submodule: a TorchScript module has none
        if part not in sub._modules:
            return _NOT_A_PATH, key
        sub = sub._modules[part]
    return (sub._parameters if leaf in sub._parameters else sub._buffers), leaf


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is capturing on the current stream (never on the CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_table(w: torch.Tensor, n: int, normalize: bool) -> torch.Tensor:
    """A CUDA weight tensor as [G, N] float32 (a view where it already is one); shapes checked, values not."""
    if w.dim() not in (1, 2) or w.shape[-1] != n:
        raise InputError(f"weights on the GPU must have shape [{n}] or [G, {n}], got {list(w.shape)}")
    w = w.view(1, n) if w.dim() == 1 else w
    if normalize:  # in float64, then rounded once, as the host's rows (_normalized): in float32 a third of rows
        w = w.double()  # came out 1 ulp apart, and a merge's bits depended on where its weights lived (an audit)
        return (w / w.sum(dim=1, keepdim=True)).float()
    return w if w.dtype == torch.float32 and w.is_contiguous() else w.float().contiguous()


def _label(src, default: str) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else default


def _threads(num_threads) -> int:
    try:
        return check_threads(num_threads)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_mmap_dtype(sources, names, dtype: torch.dtype, reason: str) -> None:
    """The mmap tier reads the files as they are: dtype= (which the other tiers apply as they copy) would be
    ignored there, and the same pool would merge other bits depending on the memory it found."""
    for src in sources:
        for n in names:
            have = src.info(n)[0]
            if have in INPUT_DTYPES and have != dtype:
                raise InputError(f"dtype={dtype} rounds {src.label}'s {short(n)} ({have}) as the pool copies it, "
                                 f"but this pool reads its files in place (mmap tier: {reason}); drop dtype= (merges "
                                 "compute in float32 anyway), or hold copies: residency='host' where the memory is "
                                 "there")


def _config_says_untied(folder: str) -> bool:
    """Whether the folder's config.json says tie_word_embeddings: false (at the top or in its text_config); an
    unreadable or missing one says nothing."""
    from pymerge.io.checkpoint import read_config_json
    try:
        cfg = read_config_json(folder)
    except InputError:
        return False
    if cfg is None:
        return False
    text = cfg.get("text_config")
    return cfg.get("tie_word_embeddings") is False or (isinstance(text, dict) and text.get("tie_word_embeddings") is False)


def _mmap_copy_bytes(src, name: str, forced: Optional[torch.dtype]) -> int:
    """Bytes the mmap tier holds in RAM for one source's tensor: a converted copy where the kernels cannot read
    its dtype (_hold), nothing where it is read in place."""
    dtype, shape = src.info(name)
    if dtype in INPUT_DTYPES:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * compressed.held_dtype(dtype, forced, INPUT_DTYPES).itemsize


def _read_whole_bytes(src) -> int:
    """Bytes of a source's files that torch read whole into RAM (a legacy or compressed .bin): held in every tier.
    Each storage once (a tied head shares the embedding's; a view holds all of its storage)."""
    shards = getattr(getattr(src, "_ckpt", None), "shards", None) or []
    held = {}
    for f in shards:
        if getattr(f, "in_memory", False):
            for n in f.names():
                storage = f.tensor(n).untyped_storage()
                held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values())


def _held_in_ram(copied: int, whole: int) -> str:
    return "; ".join(filter(None, (
        copied and f"{format_size(copied)} of tensors in dtypes the kernels do not read (float64, ...), converted",
        whole and f"{format_size(whole)} of .bin files torch cannot map (the legacy format, or compressed), whole")))


def _first_dtype(src, name: str) -> torch.dtype:
    return src.info(name)[0]


def _catalog(opened, base_src):
    """Names (first source's order), shapes, and the non-float tensors left out; every source must agree."""
    first = opened[0]
    names, shapes, skipped = [], {}, {}
    first_names = first.names()
    for name in first_names:
        dtype, shape = first.info(name)
        if not _is_float(dtype):
            skipped[name] = dtype, shape  # integer buffers (step counters, position ids) are not merged
            continue
        names.append(name)
        shapes[name] = shape
    ref = set(first_names)
    for src in opened[1:] + ([base_src] if base_src else []):
        have = set(src.names())
        missing = [n for n in first_names if n not in have]
        if missing:
            raise CheckpointError(f"{src.label}: tensor {missing[0]!r} is missing (it is in {first.label}); "
                                  f"{len(missing)} missing in all")
        extra = sorted(have - ref)
        if extra:
            raise CheckpointError(f"{src.label}: tensor {short(extra[0])} is not in {first.label}; "
                                  f"{len(extra)} extra in all")
        for name in names:
            dtype, shape = src.info(name)
            if shape != shapes[name]:
                raise CheckpointError(f"{src.label}: tensor {short(name)} has shape {list(shape)}, "
                                      f"{first.label} has {list(shapes[name])}")
            if not _is_float(dtype):
                raise CheckpointError(f"{src.label}: tensor {short(name)} has dtype {dtype}, {first.label} has a float")
        for name, (first_dtype, first_shape) in skipped.items():  # left out by the first source's dtype: a float
            dtype, shape = src.info(name)  # elsewhere went unmerged (an audit)
            if _is_float(dtype) or shape != first_shape:
                raise CheckpointError(f"{src.label}: tensor {short(name)} has dtype {dtype} and shape {list(shape)}, "
                                      f"{first.label} has {first_dtype} and {list(first_shape)}")
    if not names:
        raise CheckpointError(f"{first.label}: no floating-point tensors to merge")
    return names, shapes, list(skipped)


def _is_float(dtype) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _map_name(name: str, names: NameMap) -> Optional[str]:
    if names is None:
        return name
    if isinstance(names, str):
        return names + name
    if callable(names):
        mapped = names(name)
        if mapped is not None and not isinstance(mapped, str):  # a list: "unhashable type", bytes: a concat error
            raise InputError(f"names= mapped tensor {short(name)} to {short(mapped)}; it must give a name (str) "
                             "or None")
        return mapped
    raise InputError(f"names must be a prefix string or a function, got {type(names).__name__}")


def _tensors_of(target) -> Dict[str, torch.Tensor]:
    """Name -> tensor for a module (parameters and buffers, tied names included) or a state dict."""
    if isinstance(target, torch.nn.Module):
        out = dict(target.named_parameters(remove_duplicate=False))
        out.update(target.named_buffers(remove_duplicate=False))
        return out
    if isinstance(target, dict):
        for k, v in target.items():
            if not isinstance(v, torch.Tensor):
                raise InputError(f"into: entry {k!r} is a {type(v).__name__}, not a tensor")
        return target
    raise InputError(f"into must be an nn.Module or a state dict, got {type(target).__name__}")


def method_params_of(explicit, keywords: dict) -> dict:
    """method_params= and the method's keyword arguments as one dict; a name given both ways is an error."""
    if explicit is None:
        return keywords
    if not isinstance(explicit, Mapping) or not all(isinstance(k, str) for k in explicit):
        raise InputError(f"method_params must map parameter names to values, got {short(explicit)}")
    twice = sorted(set(explicit) & set(keywords))
    if twice:
        raise InputError(f"method parameter {twice[0]!r} is given twice: in method_params and as a keyword")
    return {**explicit, **keywords}


_POOL_KEYWORDS = ("weights", "weight_rows", "into", "method", "groups", "normalize", "names", "strict", "seed",
                  "method_params")  # materialize's own: a method's parameter of such a name goes in method_params


def _split_params(method, params: dict, n: int):
    """Per-model and global parameters for a registered method: declared names only, required ones given."""
    declared_model = dict(method.model_params)
    declared_model.pop("weight", None)  # the weight table supplies it
    unknown = sorted(set(params) - set(declared_model) - set(method.global_params))
    if unknown:
        known = sorted(set(declared_model) | set(method.global_params))
        # a name materialize takes itself goes in method_params: ties' normalize= given as a keyword was the
        # pool's sum-to-one, silently not ties' own (an audit)
        known = [f"{k} (in method_params: {k}= is the pool's own)" if k in _POOL_KEYWORDS else k for k in known]
        raise MergeConfigError(f"method {method.name} has no parameter {unknown[0]!r}; it takes: {', '.join(known) or 'none'}")
    per_model = [{} for _ in range(n)]
    for key, spec in declared_model.items():
        value = params.get(key, spec.default)
        if value is spec.default and spec.required:
            raise MergeConfigError(f"method {method.name} needs parameter {key!r}")
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.device.type == "cpu":
            value = value.detach().tolist()  # one per checkpoint, as a list or numpy array (it was refused: an audit)
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * n
        if len(values) != n:
            raise MergeConfigError(f"parameter {key!r}: got {len(values)} values for {n} checkpoints")
        for i in range(n):
            per_model[i][key] = values[i]
    global_params = {}
    for key, spec in method.global_params.items():
        value = params.get(key, spec.default)
        if value is spec.default and spec.required:
            raise MergeConfigError(f"method {method.name} needs parameter {key!r}")
        global_params[key] = value
    return per_model, global_params
