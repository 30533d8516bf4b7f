"""ShardedPool: a CheckpointPool that holds, on each rank, only this rank's shards of every checkpoint.

    pool = CheckpointPool(sources, base=base, shard_like=model)   # model: FSDP2 or tensor parallel
    pool.materialize(weights, into=model)                          # writes each rank's local shards

The layout comes from shard_like's DTensors (pymerge/dist/layout.py); each rank reads only its
boxes' bytes (reads.py). Merging then runs the single-process pool's code on local tensors: the
targets' local tensors (same data_ptrs) are the outputs. Every materialize agrees on its checks
with one small all_reduce (collectives.agree) over the model's whole mesh (self.agreeing: HSDP's
replicas too) before any write: targets are checked per rank
(local dtypes, devices, memory overlaps can differ between ranks), so one rank's error is raised
on every rank with the same message and no rank waits in a collective the others never reach.
Linear and task_arithmetic need nothing else: out[j] depends on element j alone (one last all_reduce
makes an error while writing every rank's too). An FSDP2 model
left gathered by a forward pass is resharded first (no communication). Methods with whole-tensor
statistics (methods.py) agree on their own checks and arguments with one more all_reduce, then
compute the statistics with collectives (collectives.py).
"""
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Dict, List, Optional

import numpy as np
import torch

from pymerge.default_device import factories_on_cpu
from pymerge.dist import collectives
from pymerge.dist.layout import Box, agreement_group, box_of, boxes_of, describe, layout_key, reduce_group
from pymerge.dist.reads import ShardedSource
from pymerge.dist.sample import values_sample
from pymerge.eager import eager_when_compiled
from pymerge.errors import InputError
from pymerge.ops._versions import mark_written, versions_of
from pymerge.pool.grouped import native_tv_table
from pymerge.pool.pool import CheckpointPool, _cacheable, _map_name, _tensors_of, _untied_heads, _warn_ignored
from pymerge.pool.weights import _detached
from pymerge.sizes import format_size


class ShardedPool(CheckpointPool):
    """See the module docstring; built by CheckpointPool(..., shard_like=...)."""

    @factories_on_cpu
    def __init__(self, sources, base=None, *args, shard_like=None, names=None, **kwargs):
        import torch.distributed as dist
        absent: list = []  # a tensor on a mesh without this rank, a module mid-iteration: this rank's error, agreed
        if kwargs.get("compress") is not None:  # (refused on one rank alone, the others waited: agreed too)
            absent.append(InputError("compress= and shard_like= do not combine yet: a compressed pool holds whole "
                                     "tensors"))
        if not dist.is_available() or not dist.is_initialized():  # no ranks to agree with
            raise absent[0] if absent else InputError("shard_like needs an initialized torch.distributed process "
                                                      "group (torchrun, or dist.init_process_group)")
        try:
            _reshard(shard_like)  # a forward pass left FSDP2's root gathered: the pool took it as replicated
        except InputError as exc:
            absent.append(exc)
        model_boxes = boxes_of(shard_like, absent)
        self.group = reduce_group(list(model_boxes.values()))
        self.boxes: Dict[str, Box] = _Counterparts(model_boxes, names)  # by checkpoint name
        self.stats_cache = StatsCache()  # (tensor, model, sparsifier...) -> thresholds, scales, masks
        self.kept_selection = None  # the task-vector call's last resolved arrays (dist/methods.py)
        self.found_bounds: dict = {}  # a call's rank boundaries found together (dist/methods.py, _find_bounds)
        self.stats_versions: dict = {}  # tensor -> input_versions() when its cached statistics were agreed
        self._samples: List[int] = []  # per source (then the base) as opened: a digest of a few of its values
        self._held: dict = {}  # tensor -> the checkpoints' and base's as this rank holds them (input_versions)
        self._plain_versions = True  # none of those is an inference tensor (which has no version counter)
        self._one_call = threading.Lock()  # materialize_many's per-call state, and its collectives' order
        error = absent[0] if absent else None
        if error is None:
            try:
                super().__init__(sources, base, *args, **kwargs)
            except Exception as exc:  # agreed below: every rank raises the first failing rank's error
                error = exc
        # from shard_like's whole layout: a rank failing before its first lookup agreed in another group (a hang)
        agreeing = agreement_group(model_boxes.values(), self.group)
        # materialize agrees over it too: replicas return or raise together, and pass the same weights
        # (the distributed search narrows it to one replica group while each merges its own candidates)
        self.agreeing = agreeing
        collectives.agree(error, agreeing)
        # Collectives pair tensors by their place in self.names: a rank whose files lack a tensor, or hold
        # it in another dtype, must not build a pool, and one whose files list them in another order (a
        # copy re-saved by another tool) takes the first rank's order (ties' statistics mixed tensors).
        dtype = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
        # and each checkpoint's values: a rank given the list in another order (an unsorted glob on another
        # node) or another file in one slot merged its own pairing of weights and checkpoints, silently
        collectives.agree_catalog([self.num_checkpoints, self.has_base, self._samples] + [
            (n, tuple(map(dtype, self._held_of(n)))) for n in self.names], agreeing)
        self.names = collectives.agreed_order(self.names, agreeing)
        # room for every tensor and checkpoint under 2 settings, as the single pool's selection cache: emptied
        # at a fixed 65,536, a search alternating two densities over more recomputed every statistic, with
        # collectives, on every call (330x slower; a scaling audit). Alike on every rank: agreed catalog.
        self.stats_cache.room = 2 * len(self.names) * (self.num_checkpoints + 1)
        self._not_in_layout = self.boxes.missing
        self.boxes = {n: self.boxes[n] for n in self.names}
        collectives.agree_layouts([(n, layout_key(self.boxes[n])) for n in self.names], agreeing)
        held = [t for ts in self._inputs.values() for t in ts] + list(self._base.values())
        self.nbytes = sum(t.numel() * t.element_size() for t in held)  # exactly what this rank holds
        self.whole_nbytes = sum(math.prod(self.boxes[n].global_shape) * t.element_size()  # every rank's together
                                for n in self.names for t in self._held_of(n))

    def _check_catalog(self) -> None:
        """Before any tensor is held: checkpoints whose names shard_like mostly lacks (names= forgotten) were
        held whole on every rank (out of memory on a large model) before materialize could say so."""
        size = {n: max(1, math.prod(self.boxes.get(n).global_shape)) for n in self.names}  # not this rank's part
        missing = [n for n in self.names if n in self.boxes.missing]
        # by size: a few extras (strict=False: a vision tower beside a text model) are fine held whole
        if self.group is not None and 2 * sum(size[n] for n in missing) > sum(size.values()):
            raise InputError(f"{len(missing)} of the checkpoints' {len(self.names)} tensors (e.g. {missing[0]!r}), "
                             "most of their elements, have no counterpart in shard_like, and each rank would hold "
                             "them whole; pass names= mapping the checkpoints' names to its names")

    def _held_of(self, name: str) -> tuple:
        """The checkpoints' and base's tensor `name` as this rank holds them (fixed once the pool is built)."""
        held = self._held.get(name)
        if held is None:
            base = self._base.get(name)
            held = self._held[name] = tuple(self._inputs[name] + ([base] if base is not None else []))
            self._plain_versions &= not any(t.is_inference() for t in held)  # (fixed for a tensor's life)
        return held

    def input_versions(self, name: str) -> tuple:
        """Autograd version counters of the checkpoints' and base's tensor `name` as this rank holds them."""
        held = self._held_of(name)
        # a search's every call reads them all (512 tensors: 1 ms of is_inference() calls at R = 1)
        return tuple(t._version for t in held) if self._plain_versions else tuple(versions_of(held))

    def _open(self, src, label: str):
        inner = super()._open(src, label)
        self._samples.append(_values_sample(inner))
        return ShardedSource(inner, self.boxes)

    def _reads_maps(self) -> bool:
        return False  # ShardedSource copies each rank's boxes out of the maps while the pool is built

    def describe(self) -> str:
        sharded = sum(b.signature[0] == "sharded" for b in self.boxes.values())
        return super().describe() + (f"; sharded: {sharded} of {len(self.names)} tensors split across ranks (the "
                                     f"sizes above are this rank's share of {format_size(self.whole_nbytes)})")

    def _residency_text(self) -> str:
        if self.residency == "mmap":  # (chosen by the whole model's size) no rank reads the maps when it merges
            return ("host (each rank copies its shards out of the files when the pool is built: memory_budget "
                    "does not apply)")
        return super()._residency_text()

    __repr__ = describe

    @eager_when_compiled  # run eagerly from a compiled function, as CheckpointPool's
    @factories_on_cpu
    def materialize_many(self, weight_rows, into, method: str = "linear", **kwargs) -> list:
        """CheckpointPool.materialize_many, with every check agreed across ranks before any write: an
        error on one rank only (its targets' dtypes or memory, its arguments) is raised on every rank.
        So is one after the writes began (a kernel's, a file that shrank under this rank): the ranks return
        or raise together, never some with a merged model while another holds a half-written one.
        One call at a time: the ranks pair their collectives by their order, so a second thread's call is
        refused before it reaches one (waiting instead could pair it with another rank's first call)."""
        if not self._one_call.acquire(blocking=False):
            raise InputError("this sharded pool is already merging in another thread: its ranks pair their "
                             "collectives by order, so it makes one call at a time (a pool per thread, each "
                             "with a process group of its own, for more)")
        try:
            return self._materialize_many(weight_rows, into, method, **kwargs)
        finally:
            self._one_call.release()

    def _materialize_many(self, weight_rows, into, method: str, **kwargs) -> list:
        self._agreed = False  # whether this rank reached _checked_plans's agreement
        self._planned = False  # whether the ranks agreed on plans this call writes with (past it, writes may begin)
        self._tv_table = None  # this call's task-vector table (_method_plans), if any
        self._owners_now = {}  # id(target) -> its FSDP2 modules (_fsdp_modules), found once a call
        self._entry_now = None  # the plan cache entry this call writes with
        self._wrapped_before = None  # without one: (DTensor, its local tensor's version) of the targets
        # as the single-process pool takes them (a generator read once, here: it is needed again below)
        targets = list(into) if isinstance(into, (list, tuple, Iterator)) else [into]
        try:  # (weights that are not a list: refused here too, in step with the others' agreement)
            # FSDP2 roots a forward left gathered go back to their shards, on every rank first thing: the merge must
            # land in the shards the next forward gathers (gathered, it went into a copy FSDP drops); and a rank
            # refusing its weights before its plans had left its root gathered where the others resharded, so
            # the backward's all-gathers met on one rank only (gloo aborted the process; a review)
            for target in targets:
                _reshard(target, self._fsdp_of(target))
            weight_rows = list(weight_rows)
            self._arguments = _digest(method, weight_rows, kwargs)
            # a call planned afresh (names= or groups= a function) has no cache entry to say which DTensors it writes
            self._wrapped_before = None if _cacheable(kwargs.get("groups"), kwargs.get("names")) else \
                _wrapper_versions(targets)
            try:
                result = super().materialize_many(weight_rows, targets, method, **kwargs)
            except BaseException:
                if self._planned:  # past the plans' agreement the writes may have begun; a refusal wrote nothing
                    self._mark_stale(targets)
                raise
            self._mark_stale(targets)
            self._tv_table = None  # (its entry keeps it)
        except Exception as exc:
            self._tv_table = self.kept_selection = None
            # every rank raises: every rank drops these targets' entries (after the last agreement below, too)
            self._plan_cache.forget(targets)
            if collectives.settled(exc):
                raise
            if self._agreed:  # this rank's alone, past the agreement: the others wait in the last one below
                collectives.agree(exc, self.agreeing)
            else:  # before it: they wait in _checked_plans's (two values compared)
                collectives.agree(exc, self.agreeing, (0, 0), differs=_DIFFER)
            raise
        try:
            if self._agreed:
                collectives.agree(None, self.agreeing)
            else:  # no targets, so no plans: a rank given some waits in _checked_plans's agreement
                collectives.agree(None, self.agreeing, (self._arguments, collectives.fingerprint([])), differs=_DIFFER)
        except Exception:
            self._plan_cache.forget(targets)
            raise
        return result

    def _agreed_plans(self, into: list, group_of: List[int], names, strict: bool):
        """Plans on every rank, then agrees: one rank's failure (a target of another dtype, memory
        that overlaps) is every rank's, before anything is written."""
        error, plans = None, []
        try:
            plans = super()._checked_plans(into, group_of, names, strict)
        except Exception as exc:
            error = exc
        self._agreed = True
        # Over the whole mesh (self.agreeing), not the shard group: on HSDP a rank's error was raised in its
        # replica only, while the other replica wrote and returned (a bug hunt).
        # With the arguments' digest: ranks passing different weights or methods wrote a model mixed from
        # both (linear), or one returned while another waited for a method's statistics (a hang); replicas
        # passing different weights held different models after the call.
        # And the tensors planned: with strict=False, targets lacking a tensor on some ranks only put the
        # methods' per-tensor collectives out of step (gloo aborted a rank). As resolved, each with its weight
        # group and target: groups= or names= functions of the same name that resolve differently (a set's
        # order, a hash seed) wrote one checkpoint's rows on one rank and another's on the next.
        planned = collectives.fingerprint([(p.name, p.group, p.target) for p in plans])
        collectives.agree(error, self.agreeing, (getattr(self, "_arguments", 0), planned), differs=_DIFFER)
        self._planned = True
        plans.planned = planned  # (a _Plans list) compared again where the plans are reused (_plan_entry)
        return plans

    def _plan(self, into: list, group_of: List[int], names, strict: bool):
        """Checks each target's layout against the pool's, then plans on the local tensors."""
        problems = []
        local = []
        self._param_of = {}  # pool tensor -> id of the targets' (global) tensors, one per model: _tie_key
        self._global_targets = []  # for _tied_head_plans
        for k, target in enumerate(into):
            where = f" in model {k}" if len(into) > 1 else ""
            _reshard(target, self._fsdp_of(target))  # again: caller code since the call's first reshard (names=,
            # groups=) may run a forward
            tensors = _tensors_of(target)
            self._global_targets.append(tensors)
            for name in self.names:
                model_name = _map_name(name, names)
                t = tensors.get(model_name) if model_name is not None else None
                self._param_of.setdefault(name, []).append(id(t))  # alive while planned
                if t is None:
                    continue  # the base plan reports missing tensors
                want = self.boxes[name]
                if tuple(t.shape) != want.global_shape:  # global shapes: local ones may agree on some ranks only
                    problems.append(f"tensor {model_name!r}{where} has shape {tuple(t.shape)}, "
                                    f"the pool's has {want.global_shape}")
                    continue
                have = box_of(t, f"tensor {model_name!r}{where}")
                if have.signature != want.signature:
                    hint = (" (shard_like had no tensor of that name: give the pool the names= given here)"
                            if name in self._not_in_layout else "")
                    problems.append(f"tensor {model_name!r}{where} is {describe(have)}, the pool holds "
                                    f"{describe(want)}{hint}")
            by_model_name = {_map_name(n, names): self.boxes[n] for n in self.names}
            with torch.no_grad():  # to_local() then skips its autograd Function (a no-grad view at most)
                local.append({n: _local(t, by_model_name.get(n)) for n, t in tensors.items()})
        if problems:
            raise InputError("; ".join(problems[:3]) + (" (and more)" if len(problems) > 3 else "")
                             + "; the pool holds shard_like's layout; nothing was written")
        return super()._plan(local, group_of, names, strict)

    def _tied_head_plans(self, targets, mapped, group_of, problems) -> list:
        """A sharded target's untied head is not filled from tied checkpoints' embedding (the two may be laid out
        differently across ranks): refused in one line, where the single-process pool writes it."""
        shapes = {n: b.global_shape for n, b in self.boxes.items()}
        for head, emb in _untied_heads(self.names, self._tied_embedding(), self._global_targets, mapped, shapes):
            problems.append(f"the target's {head!r} gets no pool tensor: the checkpoints are tied (they store {emb!r} "
                            "and no output head), and a sharded pool does not write one into the other's layout; tie "
                            "the target's head to its embedding, or pass strict=False to leave it as it is")
        return []

    def _tie_key(self, plan):
        """Tied weights are one parameter, decided alike on every rank. Memory cannot say it here: a rank
        whose shards of two tensors are both empty sees two data_ptr 0s, and writing only one of them
        there put that rank's collectives out of step with the other ranks' (a hang, or one tensor's
        statistics reduced with another's)."""
        return tuple(self._param_of[plan.name])

    def _plan_entry(self, key, into, names, build, make):
        """The single-process pool's cached plans and table (one native call or grouped launch over the local
        shards), reused only where every rank's are valid and the ones agreed: the ranks decide that with the
        call's arguments and the kept plans' fingerprint, and where one rank's entry is missing, stale (a target
        changed, an eviction) or different, every rank plans again and agrees on the plans (_checked_plans).
        (This agreement meets _agreed_plans's only on ranks whose arguments differ: its first value raises on
        both alike; the fingerprint's None message, only here, makes a difference a replan, not an error.)
        Planned per call, a candidate of 512 small tensors took 10 ms at R = 1 on a 2-core CPU against 0.4 ms
        for the single-process pool (layouts, checks, to_local)."""
        for target in into:  # before the entry's check: a forward pass leaves the root's gathered tensors registered
            _reshard(target, self._fsdp_of(target))

        def agree(valid) -> bool:
            # With each rank's plans as agreed when they were made: ranks whose entries differ (another target
            # model each, strict=False) all plan again, and the plans' agreement then says how they differ
            planned = getattr(valid.plans, "planned", 0) if valid is not None else 0
            stale = collectives.agree(None, self.agreeing, (self._arguments, planned), differs=(_DIFFER[0], None),
                                      flag=valid is None)
            self._agreed = not stale  # past the agreement; a stale entry's plans agree in _checked_plans
            self._planned = not stale  # the kept plans, agreed: the writes follow
            return not stale

        self._entry_now = self._plan_cache.entry(key, into, build, self._watcher(into, names), make, agree=agree)
        return self._entry_now

    def _fsdp_of(self, target) -> list:
        """_fsdp_modules(target), found once per call (a state dict's owners are searched for)."""
        got = self._owners_now.get(id(target))
        if got is None:
            got = self._owners_now[id(target)] = _fsdp_modules(target)
        return got

    def _mark_stale(self, targets: list) -> None:
        """After writes (or a failure once they may have begun): the version counters autograd reads that the
        kernels' writes did not bump, FSDP2's gathered parameters (_mark_gathered_stale) and the DTensors over
        the written local tensors (a tensor-parallel forward saves those: a backward through a forward from
        before the merge ran with the new weights and the old activations, silently; an audit)."""
        _mark_gathered_stale([params for target in targets for _, _, params in self._fsdp_of(target)])
        if self._entry_now is not None and self._entry_now.wrappers:
            mark_written(self._entry_now.wrappers)
        elif self._wrapped_before:  # (a review: they went unbumped)
            mark_written([t for t, v in self._wrapped_before if t._local_tensor._version != v])

    def _method_plans(self, method: str, into: list, group_of: List[int], names, strict: bool, groups, flat: bool):
        """Plans kept as linear's are; with them, for the task-vector family on a CPU pool, its one native table
        over the local shards (dist/methods.py runs it, once the statistics are global)."""
        from pymerge.methods.base import get_method
        from pymerge.methods.task_vectors import TaskVectorMethod
        build = lambda: self._checked_plans(into, group_of, names, strict)  # noqa: E731
        if not _cacheable(groups, names):
            return build()
        n_groups = 1 if flat else self._plan_cache.num_groups(groups)
        tv = isinstance(get_method(method), TaskVectorMethod) and self.has_base and self._grouped_kind() == "cpu"
        entry = self._plan_entry(("per tensor", "flat" if flat else groups, names, strict, n_groups, tv), into,
                                 names, build, lambda plans: native_tv_table(plans, self._inputs, self._base, n_groups)
                                 if tv else None)
        self._tv_table = (entry.native, n_groups) if entry.native is not None else None
        return entry.plans

    def _watcher(self, into: list, names):
        """The single-process pool's watch list, plus each target DTensor's local tensor: its memory is what the
        plans write (the DTensor has none of its own)."""
        watched = super()._watcher(into, names)

        def with_locals(plans) -> list:
            items = watched(plans)
            return items + [(t._local_tensor, None, None) for t, _, _ in items if _is_dtensor(t)]
        return with_locals

    def _checked_plans(self, into: list, group_of: List[int], names, strict: bool):
        plans = self._agreed_plans(into, group_of, names, strict)
        # A cached entry's plans write views of each DTensor's local tensor as it was: one put in its place (FSDP's
        # reset_sharded_param), or a new layout, must be seen (the entry watches the old tensor's memory)
        wrapped = [(t, t._local_tensor, t._spec) for ts in self._global_targets for t in ts.values() if _is_dtensor(t)]
        before = plans.recheck
        plans.recheck = lambda: (all(t._local_tensor is lt and t._spec is spec for t, lt, spec in wrapped)
                                 and (before is None or before()))
        return plans

    def _one_call_method(self, method, *args):
        """task_arithmetic (elementwise: one weighted sum with the base) as the single-process pool's one native
        call over the local shards; the task-vector family's statistics are global, so it runs through
        _method_plans and dist/methods.py (one native call on a CPU pool, after them)."""
        from pymerge.methods.base import get_method
        from pymerge.methods.linear import WeightedSum
        if isinstance(get_method(method), WeightedSum):
            return super()._one_call_method(method, *args)
        return None

    def _run_method(self, method: str, plans, tables, seed: int, params) -> None:
        from pymerge.dist.methods import run_sharded
        from pymerge.methods.base import get_method
        m = get_method(method)
        if m.chunkable:  # elementwise (linear, task_arithmetic, passthrough): the local shards are all it needs
            return super()._run_method(method, plans, tables, seed, params)
        _warn_ignored(m, tables, self.has_base)  # (as the single-process pool's _run_method does)
        run_sharded(self, m, plans, tables, seed, params)


# What _checked_plans's agreement compares (the same call shape on every rank, materialize_many's too)
_DIFFER = (collectives.ARGUMENTS_DIFFER, "ranks planned different writes: their targets hold different tensors "
           "(strict=False skips a tensor a target lacks; it must be missing on every rank's targets or none), or "
           "their groups= or names= functions map the tensors differently; nothing was written")
_DEFAULTS = {"groups": None, "normalize": False, "names": None, "strict": True, "seed": 0}


def _digest(method, weight_rows, kwargs) -> int:
    """A fingerprint of one materialize's arguments, alike on every rank that passes equal ones: weights
    by value (device tensors by shape: reading them would sync a graph capture), numbers as floats (0.5
    and np.float64(0.5), True and 1 agree), defaults filled in, method_params= merged with the keywords,
    functions (groups=, names=) by name. 0 where they cannot be read (the call then fails alike)."""
    try:
        rows = [("device", tuple(w.shape)) if isinstance(w, torch.Tensor) and w.device.type != "cpu"
                else np.asarray(_detached(w), dtype=np.float64).tolist()  # (list(alpha) of a learnable tensor: its
                for w in weight_rows]                                       # 0-d elements too; 0 left it uncompared)
        args = {**_DEFAULTS, **kwargs}
        params = {**(args.pop("method_params", None) or {}), **{k: args.pop(k) for k in list(args)
                                                                if k not in _DEFAULTS}}
        args["groups"] = "layer" if args["groups"] is None else args["groups"]  # the same rule
        return collectives.fingerprint(str(method), rows, _plain(args), _plain(params))
    except Exception:  # noqa: BLE001  (bad weights: materialize_many refuses them on every rank)
        return 0


def _plain(value):
    """A picklable value that compares equal across ranks for equal arguments."""
    if isinstance(value, dict):
        return sorted((str(k), _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.device.type not in ("cpu", "meta"):
        # a GPU tensor (np.asarray raised on it, and the ranks' parameters went uncompared): a small one by value
        # (one copy to the host), a large one by shape
        small = value.numel() <= 1024 and not torch.cuda.is_current_stream_capturing()  # (a copy would break it)
        return _plain(value.detach().to("cpu", torch.float64)) if small else ["device", list(value.shape)]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value.detach() if isinstance(value, torch.Tensor) else value, dtype=np.float64).tolist()
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        as_float = float(value)  # 0.5 and np.float64(0.5), True and 1, 1 and 1.0 agree...
        return as_float if as_float == value else int(value)  # ...seeds past 2**53 stay exact
    if callable(value):
        return getattr(value, "__qualname__", type(value).__name__)
    return repr(value)


class StatsCache(dict):
    """A sharded pool's global statistics. `generation` moves with every change (each of dict's ways to make one:
    they bypass each other): what was derived from them is current while it and the cache object stay.

    Bounded (it grew by an entry per tensor and model with every new seed or density, and DELLA's entries hold a
    mask of the local shard: an audit): past MAX_ENTRIES, or the pool's `room` where larger, it starts again empty,
    and `seeded` keeps one mask (one seed's, one density's) per tensor, model and sparsifier. Both follow the
    sequence of misses alone, which every rank runs alike (a miss runs collectives), so the ranks keep the same
    entries."""
    generation = 0
    MAX_ENTRIES = 1 << 16
    room = 0  # set by the pool: its tensors x (checkpoints + 1) x 2 settings

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seeded: dict = {}  # family (tensor, model, sparsifier) -> the key put_seeded put last

    def __reduce__(self):  # (a dict's pickle and copy set the items, through __setitem__, before the attributes)
        return StatsCache, (dict(self),), {**self.__dict__, "seeded": dict(self.seeded)}

    def _bump(self) -> None:
        self.generation += 1

    def __setitem__(self, key, value):
        self._bump()
        if key not in self and len(self) >= max(self.MAX_ENTRIES, self.room):
            self.clear()
        super().__setitem__(key, value)

    def put_seeded(self, key, family, value) -> None:
        """key -> value, replacing the entry put last for the same family (a tensor, model and sparsifier)."""
        old = self.seeded.get(family)
        if old is not None and old != key:
            self.pop(old, None)
        self[key] = value
        self.seeded[family] = key

    def __delitem__(self, key):
        self._bump()
        super().__delitem__(key)

    def __ior__(self, other):
        self._bump()
        return super().__ior__(other)

    def clear(self):
        self._bump()
        self.seeded.clear()
        super().clear()

    def update(self, *args, **kwargs):
        self._bump()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._bump()
        return super().setdefault(key, default)

    def pop(self, *args):
        self._bump()
        return super().pop(*args)

    def popitem(self):
        self._bump()
        return super().popitem()


class _Counterparts(dict):
    """shard_like's boxes looked up by checkpoint name through names= (materialize's mapping); a tensor
    shard_like lacks (an extra that strict=False skips, or one names= maps to None) is held whole."""

    def __init__(self, boxes: Dict[str, Box], names):
        super().__init__()
        self._boxes, self._names = boxes, names
        self.missing = set()  # checkpoint names mapped to a name shard_like lacks (not those mapped to None)

    def get(self, name, default=None):
        if name not in self:
            model_name = _map_name(name, self._names)
            self[name] = self._boxes.get(model_name) if model_name is not None else None
            if model_name is not None and self[name] is None:
                self.missing.add(name)
        return self[name] if self[name] is not None else default


def _reshard(target, modules: Optional[list] = None) -> None:
    """FSDP2 keeps the root module's parameters gathered after a forward pass: put its shards back
    (local, no communication), so the merge lands in the shards the next forward gathers. A module whose
    forward or backward raised stays gathered (reshard() does nothing mid-iteration): the merge went into
    the gathered copy, which FSDP dropped at its next reshard, and the old weights came back in silence."""
    for which, module, params in _fsdp_modules(target) if modules is None else modules:
        if _gathered(params) or not params:  # (torch's internals unknown: as if gathered)
            module.reshard()
        if _gathered(params):
            raise InputError(f"FSDP module {which} is in the middle of an iteration (a forward or backward "
                             "that raised?), its parameters gathered: call reset_iter_state() on the root "
                             "FSDP module first")


def _fsdp_modules(target) -> list:
    """(a name for messages, module, its FSDPParams) of the FSDP2 modules a target's tensors belong to: a module's
    own, or, for a state dict (model.state_dict(): DTensors over the shards' memory), the modules whose shards it
    holds. A forward left those gathered too, and a merge into the state dict went unseen by every later forward
    (an audit: every candidate of a search scored alike)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(target, torch.nn.Module):
        return [(repr(name) if name else "(the root)", m, _fsdp_params(m)) for name, m in target.named_modules()
                if isinstance(m, FSDPModule)]
    held = frozenset(_storage_at(t) for t in _tensors_of(target).values() if _is_dtensor(t)) - {0}
    if not held:
        return []
    if _OWNERS.get("held") == held:  # the last search's answer (every FSDP2 module in the process: ~16 us each)
        kept = [(which, ref()) for which, ref in _OWNERS["owners"]]
        if all(m is not None for _, m in kept):
            return [(which, m, _fsdp_params(m)) for which, m in kept]
    from torch.distributed import _composable_state  # torch's internals: no module found where they differ
    owners = []
    for m in list(getattr(_composable_state, "_module_state_mapping", {}).keys()):
        params = _fsdp_params(m) if isinstance(m, FSDPModule) else []
        if any(_storage_at(getattr(p, "sharded_param", None)) in held for p in params):
            owners.append((f"{type(m).__name__} (whose shards the state dict holds)", m, params))
    _OWNERS.update(held=held, owners=[(which, weakref.ref(m)) for which, m, _ in owners])
    return owners


_OWNERS: dict = {}  # _fsdp_modules' last search: the storages it was for, and the modules found (weakly)


def _storage_at(t) -> int:
    """The address of a DTensor's local storage (0: none, or not a DTensor)."""
    local = getattr(t, "_local_tensor", None)
    return local.untyped_storage().data_ptr() if isinstance(local, torch.Tensor) else 0


def _mark_gathered_stale(modules: list) -> None:
    """Bumps the version counter of FSDP2's gathered (unsharded) parameters (modules: each module's FSDPParams,
    _fsdp_params'): a forward saved those for its backward, and the merge wrote the shards, which FSDP gathers
    again before the backward while keeping the counters. A backward through a forward from before the merge then raises torch's
    in-place error, as for every other pool, where it mixed the old activations with the new weights in
    silence (an audit: gradients off by up to 0.09). Torch's internals: nothing where they differ."""
    stale = [u for params in modules for p in params
             if isinstance(u := getattr(p, "_unsharded_param", None), torch.Tensor)]
    if stale:
        mark_written(stale)


def _wrapper_versions(targets: list) -> list:
    """(DTensor, its local tensor's version counter) of the targets' DTensors (the local tensors are written)."""
    out = []
    for target in targets:
        for t in _tensors_of(target).values():
            local = getattr(t, "_local_tensor", None) if _is_dtensor(t) else None
            if isinstance(local, torch.Tensor) and not local.is_inference():
                out.append((t, local._version))
    return out


def _fsdp_params(module) -> list:
    """An FSDP2 module's FSDPParams (torch's internals: none where they differ from torch 2.13's)."""
    state = getattr(module, "_get_fsdp_state", lambda: None)()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        single = getattr(state, "_fsdp_param_group", None)
        groups = [single] if single is not None else []
    return [p for g in groups for p in getattr(g, "fsdp_params", ())]


def _gathered(params: list) -> bool:
    """Whether any of an FSDP2 module's parameters (its _fsdp_params) is not in its sharded state (torch's
    internals: False where they differ from torch 2.13's, as before this check)."""
    return any(getattr(getattr(p, "sharded_state", None), "name", "SHARDED") != "SHARDED" for p in params)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local(t: torch.Tensor, box: Optional[Box] = None) -> torch.Tensor:
    """A DTensor's local tensor (a plain tensor itself); an empty one in its box's shape: FSDP2 over TP holds an
    empty TP shard as (0, 0) where the layout says (3, 0), and every merge into the model the pool was built
    from was refused (an audit). It holds no data to write."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, DTensor):
        return t
    local = t.to_local()
    if box is not None and local.numel() == 0 and box.numel == 0 and tuple(local.shape) != box.shape:
        return local.reshape(box.shape)
    return local


def _values_sample(source) -> int:
    """values_sample (dist/sample.py) of a source's floating-point tensors: the first 16 values of each one's first
    row and the last 16 of its last row (views: no copy of a non-contiguous tensor), with its dtype. (The first
    row alone missed a copy that differed in its last rows, as an embedding's added tokens: an audit of the
    torchrun merge's same sample.)"""
    def head(n: str) -> bytes:
        whole = source.tensor(n).detach()
        if whole.numel() == 0:  # a (0, N) tensor has no first row; its name and dtype are sampled all the same
            whole = whole.reshape(-1)
        parts = []
        for row in (0, -1):
            t = whole
            while t.dim() > 1:
                t = t[row]
            t = t.reshape(-1)
            parts.append((t[:16] if row == 0 else t[-16:]).cpu().contiguous())
        return str(whole.dtype).encode() + b"".join(
            t.view(torch.uint8).numpy().tobytes() for t in parts if t.numel())
    dtypes = {n: source.info(n)[0] for n in source.names()}
    return values_sample(
        [n for n, d in dtypes.items() if isinstance(d, torch.dtype) and d.is_floating_point], head)
