"""The pool's hot path: one native call (CPU) or one launch (GPU) per materialize[_many].

A model of many small tensors merged one kernel call per tensor pays a call, a thread wake-up
(or a launch) and a short loop per tensor. Instead, the validated write plans of a set of targets
are kept with a task table that runs the whole candidate at once: on the CPU pymerge._cpu.GroupedPlan
(split across the thread pool by bytes), on the GPU kernels/weighted_sum_grouped.py (one Triton
launch over a tensor table, for pools resident on the device). On the CPU the registered methods
that are one weighted sum (task_arithmetic: the base is one more source) take the same table, and
the task-vector family takes pymerge._cpu.GroupedTVPlan after a selection pass (TaskVectorCall).
An entry also keeps what every call needs besides the kernel: the tuple of tensors whose version
counters it bumps (one batched call) and the strided targets to copy back.

A cached entry is reused while its targets are provably the ones it was built for:
- the same target objects, alive: a module (or any target that can be) is held weakly, and its entry is
  evicted when it dies (a finalizer), so a model dropped by the caller is freed and a new one given
  its id never meets its entry; a dict, which cannot be, is held by its entry as before,
- no parameter, buffer or submodule registered since on a module of a target an entry was built for
  (a global registration hook counts them: `module.w = nn.Parameter(...)`, weight tying, a layer
  replaced). Modules of no target are not counted: a transformers forward slices its layers into a
  new ModuleList every call, and a loss module built between calls registers too; neither changes
  what a target holds, and counting them re-planned every call of an evaluation loop,
- every target tensor still at the same address (`param.data = ...`, `module.half()` and
  `module.to()` swap storage without registering anything, and a new storage has a new address
  while the entry holds the old one alive),
- the same tensor objects under the same keys (of a state dict, or of the owning module's parameters
  or buffers: `del module.w` registers nothing), and no key added to a state dict that the pool
  has and the target lacked (strict=False).
Anything else rebuilds the entry (the pool's full checks run again).
"""
import itertools
import threading
import weakref
from collections import OrderedDict
from operator import attrgetter, is_
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from pymerge import _native
from pymerge.forks import renew_after_fork
from pymerge.errors import InputError, MergeConfigError
from pymerge.ops._versions import versions_of
from pymerge.pool.weights import group_indices

_registrations = 0  # parameters, buffers and submodules registered on a watched module so far
# id -> module, for every module of every target an entry was built for (by id: a module may define __eq__)
_watched: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def _count(module, *_args):
    global _registrations
    if _watched.get(id(module)) is module:
        _registrations += 1


def _watch(into) -> None:
    """Counts registrations on the targets' modules from now on (a later rebuild adds new submodules)."""
    for m in into:
        if isinstance(m, torch.nn.Module):
            for sub in m.modules():
                _watched[id(sub)] = sub


torch.nn.modules.module.register_module_parameter_registration_hook(_count)
torch.nn.modules.module.register_module_buffer_registration_hook(_count)
torch.nn.modules.module.register_module_module_registration_hook(_count)


_data_ptr = torch.Tensor.data_ptr


def _is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass that wraps others (DTensor): its data_ptr is 0, its memory its inner tensors'."""
    return type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and is_traceable_wrapper_subclass(t)


class _Entry:
    """One set of targets' validated plans, their task table, and what a call needs besides the kernel."""
    __slots__ = ("targets", "generation", "held", "ptrs", "nbytes", "shapes", "dtypes", "strides", "objects",
                 "owners", "keys", "found", "dict_keys", "plans", "written", "wrappers", "recheck", "native", "fixups",
                 "selection", "finalizers", "__weakref__")

    def __init__(self, into, watched, plans, native):
        self.targets = list(map(_reference, into))  # weak where possible: the entry must not keep a model alive
        self.finalizers: list = []  # one per weakly held target: evicts the entry when the target dies
        self.generation = _registrations
        # The tensors the targets hold (not detached copies), per watched key and target (see pool._watched).
        # None: a key the target lacked; a module: a submodule on a tensor's path (checked where it is held).
        # A wrapper (a DTensor) has no memory of its own: its owner holds it (found), and the watcher lists the
        # tensor it wraps (a ShardedPool's) as one more held tensor.
        self.held = tuple(t for t, _, _ in watched if isinstance(t, torch.Tensor) and not _is_wrapper(t))
        self.ptrs = list(map(_data_ptr, self.held))
        # storage sizes: a storage freed (resize_(0)) and given fewer bytes can come back at the same address
        self.nbytes = list(map(_nbytes, map(_storage, self.held)))
        self.shapes, self.dtypes = list(map(_shape, self.held)), list(map(_dtype, self.held))
        # Strides, or None where every tensor is contiguous: then is_contiguous() (a bool, no tuple to build and
        # compare) with the same address, shape and dtype says every element is where it was
        self.strides = None if all(map(_contiguous, self.held)) else list(map(_stride, self.held))
        # What valid() and the version bump read of each (Python object, TensorImpl, StorageImpl):
        # prefetched at once, as the previous call's streaming evicted them (memory_hints.cpp).
        self.objects = np.array([a for t in self.held for a in (id(t), t._cdata, t.untyped_storage()._cdata)],
                                dtype=np.uint64)
        # Where each tensor (and submodule on its path) is held (a state dict, its module's _parameters /
        # _buffers, its parent's _modules) and under which key, and the keys a state dict lacked: deleting,
        # replacing or adding one there registers nothing.
        keyed = [(t, d, key) for t, d, key in watched if d is not None]
        self.owners, self.keys = [d for _, d, _ in keyed], [key for _, _, key in keyed]
        self.found = [t for t, _, _ in keyed]
        # a state dict's keys (in order: a list compares in C): one added or removed registers nothing
        self.dict_keys = [(d, list(d)) for d in into if isinstance(d, dict)]
        self.plans = plans
        # what a call writes, whose version counters it bumps: the held tensors over a plan's memory (a tied
        # name's too), not the others watched (an unplanned head, an integer buffer)
        written = set(map(_data_ptr, (t for p in plans for t in p.targets)))
        self.written = tuple(t for t in self.held if _data_ptr(t) in written)
        # and the wrappers (DTensors) over written memory: a tensor-parallel forward saves them, whose version
        # counters are their own (a ShardedPool bumps them too)
        self.wrappers = tuple(t for t, _, _ in watched if isinstance(t, torch.Tensor) and _is_wrapper(t)
                              and any(isinstance(x := getattr(t, a, None), torch.Tensor) and _data_ptr(x) in written
                                      for a in t.__tensor_flatten__()[0]))
        self.recheck = getattr(plans, "recheck", None)  # what else the plans depend on (see pool._Plans)
        self.native = native
        self.fixups = [f for p in plans for f in p.fixups]
        self.selection = None  # task-vector methods: the last selection pass (see TaskVectorCall)

    def valid(self) -> bool:
        prefetch = getattr(_native.cpu, "prefetch", None)  # a hint: a build without it skips it
        if prefetch is not None:
            prefetch(self.objects)
        # Storage swaps (param.data = ..., module.half(), .to()) always move data_ptr; a view of the same
        # memory put in its place (param.data = param.data.t(), entry.t_()) keeps it but not its layout.
        # One short-circuiting comparison per property (list == list: C loops), cheapest first.
        if self.generation != _registrations:
            return False
        for ref in self.targets:
            if ref() is None:
                return False
        held = self.held
        return (all(map(is_, map(dict.get, self.owners, self.keys), self.found))
                and all(list(d) == ks for d, ks in self.dict_keys)
                and list(map(_data_ptr, held)) == self.ptrs and list(map(_dtype, held)) == self.dtypes
                and list(map(_shape, held)) == self.shapes
                and (all(map(_contiguous, held)) if self.strides is None else list(map(_stride, held)) == self.strides)
                and list(map(_nbytes, map(_storage, held))) == self.nbytes
                and (self.recheck is None or self.recheck()))

    def detach(self) -> None:
        """No longer in a cache: its targets' deaths need not evict it."""
        for f in getattr(self, "finalizers", ()):  # none where __init__ failed first (an interrupt, MemoryError)
            f.detach()

    # gone with its cache (a pool dropped): each finalizer stayed registered on a model that outlived the pool, one
    # per pool a training loop built and dropped (an audit)
    __del__ = detach


def _holds_a_dict_but(entry: _Entry, ids: set) -> bool:
    """Whether the entry holds a state dict (strongly) whose id is not among ids."""
    return any(not isinstance(ref, weakref.ref) and id(ref()) not in ids for ref in entry.targets)


def _reference(target):
    """A weak reference to target, or a callable returning it where there can be none (a dict: held)."""
    try:
        return weakref.ref(target)
    except TypeError:
        return lambda: target


def _target_died(cache_ref, key, entry_ref) -> None:
    """A target's finalizer: its entry is evicted now, or by the lock's holder where the lock is taken (a
    gc inside the cache, in this thread or another: never waited for, never entered twice)."""
    cache = cache_ref()
    if cache is None:
        return
    cache._dead.append((key, entry_ref))
    cache._try_evict()


# What valid() reads of each tensor besides data_ptr: the getters (shape, dtype) skip the argument parsing of the
# methods (size(), stride()); a cached call's largest Python cost (~0.5 us a tensor on a loaded 2-core Xeon)
_shape, _dtype = attrgetter("shape"), attrgetter("dtype")
_stride, _contiguous = torch.Tensor.stride, torch.Tensor.is_contiguous
_storage, _nbytes = torch.Tensor.untyped_storage, torch.UntypedStorage.nbytes  # two maps: no Python frame per tensor


class PlanCache:
    """Validated write plans (and their native task tables) per set of targets; a few entries, LRU."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._groups: dict = {}
        # two threads materializing from one pool: the LRU's pop in one raced the other's move_to_end (KeyError).
        # Not reentrant: a target's finalizer run inside (gc) must find it taken and leave the eviction to the
        # end of entry()
        self._lock = threading.Lock()
        self._dead: list = []  # (key, weakref to its entry) whose target died while the lock was taken
        self._owner = None  # the thread holding the lock (_after_fork)
        self._masks = None  # a weak reference to the entry whose kept selection holds DELLA's masks (hold_masks)
        renew_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: a lock of its own (another thread may have held the parent's), no entries. Where
        the forking thread held it (a fork from a target's own code while the pool planned), so does the child's
        only thread: its `with` releases it (the copied lock, held)."""
        for entry in self._entries.values():
            entry.detach()
        self._entries, self._groups, self._dead, self._masks = OrderedDict(), {}, [], None
        if self._owner != threading.get_ident():
            self._lock = threading.Lock()
            self._owner = None

    def __reduce__(self):  # a copied pool starts with an empty cache (and a lock of its own)
        return PlanCache, (self.max_entries,)

    def hold_masks(self, entry: "_Entry") -> None:
        """entry is about to draw DELLA's masks, a bit per element and checkpoint, which its selection then keeps:
        the entry that held a set lets it go first, so that the pool holds one set at most, drawing included."""
        held = self._masks() if self._masks is not None else None
        if held is not None and held is not entry and held.selection is not None and held.selection[6]:
            held.selection = None
        self._masks = weakref.ref(entry)

    def entry(self, key: tuple, into: list, build: Callable[[], list], targets_of: Callable[[list], list],
              make_table: Callable[[list], object], agree: Callable[[object], bool] = None) -> _Entry:
        """The valid entry for `into` (and key), built when there is none: build() makes the plans,
        targets_of(plans) lists for every plan and target model (tensor as held, dict or None, key),
        make_table(plans) the table that runs them all in one call (None: not possible). agree(entry), where
        given, turns this process's finding (its valid entry, or None) into the one every process takes alike
        (a ShardedPool's ranks): whether to use it."""
        key = (tuple(map(id, into)),) + key
        self._refuse_reentry()
        try:
            with self._lock:  # the lock's own (C) enter and exit: a Ctrl-C in a Python-level __exit__, before its
                try:  # try, left it held and every later call waiting forever (an audit)
                    self._owner = threading.get_ident()
                    self._evict_dead()
                    return self._entry(key, into, build, targets_of, make_table, agree)
                finally:
                    self._owner = None
                    self._evict_dead()
        finally:
            if self._dead:  # a finalizer that found the lock taken after that eviction: its entry goes now
                self._try_evict()

    def _refuse_reentry(self) -> None:
        """A call from the thread holding the lock (a target's own code run while it plans or checks an entry, a
        torch mode) would wait for it forever."""
        if self._owner == threading.get_ident():
            raise InputError("the pool was called again while it planned a call (from a target's own code: its "
                             "items(), named_parameters() or a property, or a torch mode); nothing was written")

    def _entry(self, key, into, build, targets_of, make_table, agree) -> _Entry:
        """entry()'s work, under the lock."""
        entry = self._entries.get(key)
        hit = entry is not None and entry.valid()
        if agree is not None:
            hit = agree(entry if hit else None)
        if hit:
            self._entries.move_to_end(key)
            return entry
        plans = build()  # (the caller's code runs here, its calls of the pool refused: _refuse_reentry)
        _watch(into)  # before the entry takes its generation: a registration from now on is seen
        watched = targets_of(plans)
        entry = _Entry(into, watched, plans, make_table(plans))
        if not all(isinstance(d, dict) for _, d, _ in watched if d is not None):
            # a TorchScript module (torch.jit.trace/script, or one inside a target) keeps its tensors in
            # wrappers of its C++ object, which valid() cannot check (a traced target's second call raised
            # a TypeError): this call's entry only, planned again next call
            self._drop(key)  # an earlier entry for these targets is stale (a submodule became TorchScript)
            return entry
        self._drop(key)
        self._entries[key] = entry
        entry.finalizers = [_finalizer(t, weakref.ref(self), key, weakref.ref(entry))
                            for t, ref in zip(into, entry.targets) if isinstance(ref, weakref.ref)]
        if len(entry.finalizers) < len(into):  # a state dict, held (no weak reference to a dict): only those of this
            # call, or a fresh dict per candidate kept up to max_entries whole models alive after the caller dropped
            # them (an audit); other entries for these dicts (other methods) stay
            mine = set(map(id, into))
            for old in [k for k, e in self._entries.items() if _holds_a_dict_but(e, mine)]:
                self._drop(old)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))
        return entry

    def forget(self, targets) -> None:
        """Drops the entries written into any of targets (a search's replicas, once it is done with them)."""
        ids = set(map(id, targets))
        self._refuse_reentry()
        with self._lock:
            for key in [k for k in self._entries if ids.intersection(k[0])]:
                self._drop(key)
            self._evict_dead()
        if self._dead:  # a finalizer that found the lock taken after that eviction
            self._try_evict()

    def clear(self) -> None:
        self._refuse_reentry()
        with self._lock:
            for key in list(self._entries):
                self._drop(key)
            self._groups.clear()
            self._evict_dead()
        if self._dead:
            self._try_evict()

    def _try_evict(self) -> None:
        """Evicts the dead targets' entries if the lock is free, else leaves them to its holder (never waits: a
        finalizer may run in a thread holding another lock that the holder of this one waits for). (A plain
        acquire: an interrupt in the instant between it and the try would leave the lock held; a finalizer's
        path, rare, where entry()'s every call was the audit's hang.)"""
        if self._lock.acquire(blocking=False):
            try:
                self._evict_dead()
            finally:
                self._lock.release()

    def _evict_dead(self) -> None:
        """Under the lock. Evicting may free other targets (their finalizers append here): until none is left."""
        while self._dead:
            key, entry_ref = self._dead.pop()
            entry = entry_ref()
            if entry is not None and self._entries.get(key) is entry:
                self._drop(key)

    def _drop(self, key) -> None:
        """Under the lock: the entry under key (if any) leaves the cache, its finalizers with it."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.detach()

    def group_of(self, names: Sequence[str], rule) -> List[int]:
        """group_indices(names, rule), remembered for the named rules (None, "layer")."""
        if rule is not None and not isinstance(rule, str):
            return group_indices(names, rule)
        if rule not in self._groups:
            self._groups[rule] = group_indices(names, rule)
        return self._groups[rule]

    def num_groups(self, rule) -> int:
        """1 + the largest group index under a named rule whose group_of was asked for (cached)."""
        key = ("count", rule)
        if key not in self._groups:
            self._groups[key] = max(self._groups[rule], default=0) + 1
        return self._groups[key]


def _finalizer(target, cache_ref, key, entry_ref):
    """Evicts the entry when target dies (only weak references: the cache and entry may die first)."""
    f = weakref.finalize(target, _target_died, cache_ref, key, entry_ref)
    f.atexit = False  # nothing to free at exit
    return f


def triton_table(plans, inputs: dict, n_groups: int):
    """A grouped Triton launch for the plans (pool tensors resident on the device), or None where
    it does not apply (no plans, outputs of several dtypes, float8_e4m3fn inputs on a GPU older than
    sm_89, which Triton cannot read there: the per-tensor calls route them to a backend that can)."""
    if not plans or len({o.dtype for p in plans for o in p.outs}) != 1:
        return None
    from pymerge import kernels
    xs = [x for p in plans for x in inputs[p.name]]
    if kernels.e4m3_unsupported(xs[0].device, {_native.DTYPE_CODES[x.dtype] for x in xs}):
        return None
    if xs[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # (torch's error would invalidate the capture and name neither cause nor cure)
        raise InputError("materialize: run it once with these targets before capturing it in a CUDA graph (the "
                         "grouped kernel's address tables are made by a host-to-device copy, which a capture cannot hold)")
    from pymerge.kernels.weighted_sum_grouped import GroupedTable
    return GroupedTable([inputs[p.name] for p in plans], [p.outs for p in plans], [p.group for p in plans], n_groups)


def native_table(plans, inputs: dict, n_groups: int, delta: bool = False):
    """A GroupedPlan for the plans, or None where the C++ path does not apply (no plans, no build,
    a dtype the kernels do not read). delta: each tensor's first input is a base (WeightedSum.delta)."""
    cpu = _native.cpu
    if cpu is None or not plans:
        return None
    codes = _native.DTYPE_CODES
    try:
        in_codes = [[codes[t.dtype] for t in inputs[p.name]] for p in plans]
        out_codes = [[codes[o.dtype] for o in p.outs] for p in plans]
    except KeyError:
        return None
    return cpu.GroupedPlan([[t.data_ptr() for t in inputs[p.name]] for p in plans], in_codes,
                           [inputs[p.name][0].numel() for p in plans], [[o.data_ptr() for o in p.outs] for p in plans],
                           out_codes, [p.group for p in plans], n_groups, delta)


def weight_array(tables: Sequence[np.ndarray], n_groups: int, n: int, dtype=np.float32) -> np.ndarray:
    """[G, K, N] (float32 by default): candidate k's weights per group (a one-row table serves every group)."""
    w = np.empty((n_groups, len(tables), n), dtype=dtype)
    for k, t in enumerate(tables):
        w[:, k, :] = t[0] if t.shape[0] == 1 else t[:n_groups]
    return w


def method_coefficients(method, per_model: list, global_params: dict, tables: Sequence[np.ndarray], n_groups: int,
                        name_of: Callable[[int], str], seed: int):
    """(sources, float32 [G, K, S] coefficients) of a WeightedSum method (task_arithmetic: a delta sum) for every
    weight group and candidate: source i < N is checkpoint i, source N the base, in the method's order (the same
    for every group and candidate: the order depends on the method alone). Parameters are checked here
    exactly as the per-tensor path checks them, once per group and candidate instead of per tensor."""
    from pymerge.methods.base import MAX_MAGNITUDE, TensorTask, check_magnitudes
    order, rows = None, []
    for g in range(n_groups):
        for table in tables:
            w = table[g if table.shape[0] > 1 else 0]
            mp = [dict(per_model[i], weight=float(w[i])) for i in range(len(per_model))]
            task = TensorTask(inputs=[], base=None, model_params=mp, params=dict(global_params), name=name_of(g),
                              seed=seed)
            method.check_params(task)
            if order is None:
                check_magnitudes(method, task)  # the parameters (alike in every group) once
            src, coef = method.weights_for(task)
            if order is None:
                order = list(src)
            elif list(src) != order:  # not the case of any registered method; refused, not guessed
                raise ValueError(f"method {method.name}: sources differ between weight groups")
            rows.append(coef)
    table = np.asarray(rows, dtype=np.float64)
    if not np.all(np.abs(table) <= MAX_MAGNITUDE):  # every group's coefficients at once (NaN fails too)
        row, col = np.argwhere(~(np.abs(table) <= MAX_MAGNITUDE))[0]
        which = f"model {order[col]}" if order[col] < len(per_model) else "base_model"
        raise MergeConfigError(f"tensor {name_of(row // len(tables))}: coefficient of {which} is {table[row, col]:g}; "
                               f"values beyond {MAX_MAGNITUDE:g} make a non-finite or meaningless model")
    return order, table.astype(np.float32).reshape(n_groups, len(tables), len(order))


def native_tv_table(plans, inputs: dict, base: dict, n_groups: int):
    """A GroupedTVPlan (csrc/cpu/task_vectors.cpp) for the plans, or None where it does not apply."""
    from pymerge.ops.philox import name_hash
    cpu = _native.cpu
    if cpu is None or not plans or not hasattr(cpu, "GroupedTVPlan"):
        return None
    codes = _native.DTYPE_CODES
    try:
        in_codes = [[codes[t.dtype] for t in inputs[p.name]] for p in plans]
        base_codes = [codes[base[p.name].dtype] for p in plans]
        out_codes = [[codes[o.dtype] for o in p.outs] for p in plans]
    except KeyError:
        return None
    return cpu.GroupedTVPlan([[t.data_ptr() for t in inputs[p.name]] for p in plans], in_codes,
                             [base[p.name].data_ptr() for p in plans], base_codes,
                             [base[p.name].numel() for p in plans], [[o.data_ptr() for o in p.outs] for p in plans],
                             out_codes, [name_hash(p.name) for p in plans], [p.group for p in plans], n_groups)


_version = attrgetter("_version")


class TaskVectorCall:
    """One materialize of a task-vector method (ties, dare_*, breadcrumbs*, della*) as one native call.

    The per-tensor path resolves every tensor's sparsifiers (plan_model: rank boundaries, Philox
    thresholds, DELLA bitmasks, rescale factors) and runs tv_merge once per tensor and candidate. Here
    the same plan_model results (the pool's SelectionCache serves them) are gathered into arrays, kept
    on the entry while no input or base tensor changes (version counters; DELLA's masks too, a bit per element
    and checkpoint, which the pool lets one entry at a time hold), and one GroupedTVPlan.run merges every tensor
    into every candidate. Parameters are checked exactly as the per-tensor path checks them."""

    def __init__(self, method, per_model: list, global_params: dict, tables: Sequence[np.ndarray], n_groups: int,
                 name: str, seed: int, labels: Optional[List[str]] = None):
        """labels: the checkpoints' names in messages, as the per-tensor path's (the pool's labels)."""
        from pymerge.methods.base import MAX_MAGNITUDE, TensorTask, check_magnitudes
        from pymerge.methods.task_vectors import task_vector_args
        from pymerge.ops.task_vector_ops import SEEDED, linear_divisor
        n = len(per_model)
        self.seed = seed
        self.consensus = method.consensus
        self.weights = weight_array(tables, n_groups, n)

        def task_of(row) -> TensorTask:
            return TensorTask(inputs=[], base=torch.empty(0), params=dict(global_params), name=name, seed=seed,
                              model_params=[dict(per_model[i], weight=float(row[i])) for i in range(n)])
        # Sparsifiers, flags and lambda do not depend on the weights (finite already): checked once, on the first
        # candidate; the coefficients lambda * w / D on every candidate (below)
        task = task_of(tables[0][0])
        method.check_params(task)
        check_magnitudes(method, task, labels)
        self.normalize, rescale = method._settings(task)
        self.sparsifiers, _, self.lam = task_vector_args(task, method.sparsification, rescale)
        rows = [[tuple(map(float, t[g if t.shape[0] > 1 else 0])) for t in tables] for g in range(n_groups)]
        # float32 sums, as the per-tensor path's (the rows joined in one pass: sum(rows, []) was quadratic in groups)
        divisor = {r: linear_divisor(r) for r in set(itertools.chain.from_iterable(rows))}
        self.divisors = np.array([[divisor[r] for r in rs] for rs in rows], dtype=np.float32)
        # every candidate's at once, as method_coefficients' (the first one's alone let a later one write deltas
        # x5e5: a review), in float64 as task_vector_scales computes them; check_magnitudes words the refusal
        by = np.array([[divisor[r] if self.normalize and not self.consensus else 1.0 for r in rs] for rs in rows])
        scales = self.lam * np.asarray(rows, dtype=np.float64) / by[..., None]
        bad = np.argwhere(~(np.abs(scales) <= MAX_MAGNITUDE))
        if len(bad):
            check_magnitudes(method, task_of(rows[bad[0][0]][bad[0][1]]), labels)
        random = any(sp.method in SEEDED for sp in self.sparsifiers)
        self.key = (method.name, tuple(self.sparsifiers), int(seed) if random else 0)
        self.draws_masks = any(sp.method == "della_magprune" and 0 < sp.density < 1 for sp in self.sparsifiers)

    def run(self, entry, inputs: dict, base: dict, cache, num_threads: int,
            before_draw: Optional[Callable[["_Entry"], None]] = None) -> None:
        """before_draw(entry): called before new DELLA masks are drawn (the pool's PlanCache.hold_masks)."""
        sel = entry.selection
        if sel is None or sel[0] != self.key or list(map(_version, sel[1])) != sel[2]:
            # the stale selection's masks go before new ones are drawn, and any other entry's: one set alive at a
            # time (kept through the draw, two were: a review)
            entry.selection = sel = None
            if self.draws_masks and before_draw is not None:
                before_draw(entry)
            sel = self._select(entry.plans, inputs, base, cache, num_threads)
            # Kept while the versions say nothing changed; never with an inference tensor (no counter)
            entry.selection = sel if min(sel[2], default=0) >= 0 else None
        _, _, _, ints, scales, bits, _masks = sel
        entry.native.run(ints, scales, bits, self.weights, self.divisors, self.consensus, self.normalize,
                         float(self.lam), int(self.seed) & 0xFFFFFFFFFFFFFFFF, num_threads)

    def _select(self, plans, inputs: dict, base: dict, cache, num_threads: int):
        """(key, tensors watched, their versions, int64 [T, N, 7], float32 [T, N], uint64 [T, N], masks)."""
        from pymerge.ops.task_vector_ops import plan_model
        sel = Selection(len(plans), len(self.sparsifiers))
        watched = [t for p in plans for t in (*inputs[p.name], base[p.name])]
        # the versions before any data is read: a tensor changed in place meanwhile (another thread) has a newer
        # one, so the next call selects again (read after, they marked these thresholds as the new data's)
        versions = versions_of(watched)
        at = 0
        for t, p in enumerate(plans):
            xs, b = inputs[p.name], base[p.name]
            b_version = versions[at + len(xs)]
            for i, (x, sp) in enumerate(zip(xs, self.sparsifiers)):
                try:
                    mp = plan_model(x, b, sp, 1.0, i, name=p.name, seed=self.seed, cache=cache,
                                    cache_key=(versions[at + i], b_version), backend="cpu", num_threads=num_threads)
                except ValueError as exc:
                    raise MergeConfigError(f"tensor {p.name}: {exc}") from None
                sel.put(t, i, mp)
            at += len(xs) + 1
        return self.key, watched, versions, sel.ints, sel.scales, sel.bits, sel.masks


class Selection:
    """Every tensor's model plans as GroupedTVPlan.run takes them: int64 [T, N, 7] (mode, boundaries, threshold,
    model), float32 [T, N] rescale factors, uint64 [T, N] bitmask addresses, and the bitmasks, alive while it is."""

    def __init__(self, n_tensors: int, n_models: int):
        self.ints = np.zeros((n_tensors, n_models, 7), dtype=np.int64)
        self.scales = np.ones((n_tensors, n_models), dtype=np.float32)
        self.bits = np.zeros((n_tensors, n_models), dtype=np.uint64)
        self.masks: list = []

    def put(self, t: int, i: int, mp) -> None:
        """Model i's plan (task_vector_ops.ModelPlan) of tensor t."""
        self.ints[t, i] = (mp.mode, mp.lo.key, mp.lo.index, mp.hi.key, mp.hi.index, mp.thr, mp.model & 0xFFFFFFFF)
        self.scales[t, i] = mp.scale
        if mp.bits is not None:
            self.masks.append(mp.bits)
            self.bits[t, i] = mp.bits.data_ptr()
