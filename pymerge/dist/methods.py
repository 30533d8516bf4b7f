"""Merge methods with whole-tensor statistics, on a sharded pool's local shards.

Each method runs the single-process kernels on the local tensors; only its statistics are
global, computed with collectives over the pool's group (collectives.py) and cached in the pool
(they depend on the checkpoints, never on the weights, so a search pays for them once). A tensor
the pool holds that changed in place (its autograd version counter moved, as the single-process
pool's cache keys see it) drops its cached statistics on every rank: the ranks agree on that
decision in the same all_reduce as their errors, so their collectives stay in step. An error while
merging on one rank is agreed before the next collective (_in_step), and drops the tensors' statistics.

- TIES, DARE (linear/ties), breadcrumbs (plain/ties): global magnitude rank boundaries, Philox
  masks keyed by the GLOBAL element index, and L1 rescale norms as exact sums (the single
  process's definition, pymerge/ops/exact_sum.py: the same bits). A shard that is
  one contiguous run of the global tensor (FSDP2's Shard(0), row-parallel biases...) runs the
  fused kernel with its global offset, exactly as the single process does. A strided shard
  (Shard(1): a piece of every row) gets its keep-masks from torch as bitmasks (cached).
- SLERP, NuSLERP, Model Stock: their whole-tensor dot products as exact sums, as in one process (per-row or
  per-column ones stay local where each vector is on one rank, else the merge is refused).
- DELLA: per-row ranks need whole rows (Shard(0)); a 1-D tensor's deltas are gathered (small).
Other methods are refused with a clear error.
"""
import dataclasses
import functools
import math

import numpy as np
import torch

from pymerge.dist import collectives
from pymerge.dist.layout import counts
from pymerge.errors import InputError
from pymerge.methods.base import TensorTask
from pymerge.ops import interp, philox, select
from pymerge.ops import task_vector_ops as tvo
from pymerge.pool.grouped import Selection


def run_sharded(pool, m, plans, tables, seed: int, params) -> None:
    """Checks everything, agrees across ranks, then merges each planned tensor into its local targets."""
    from pymerge.dist.pool import _plain
    from pymerge.methods.base import check_magnitudes
    from pymerge.methods.task_vectors import TaskVectorMethod
    from pymerge.pool.pool import _split_params
    args_of: dict = {}  # the task-vector call's resolved arguments by weights (_tv_args)
    if isinstance(m, TaskVectorMethod):
        merge = functools.partial(_task_vectors, args_of=args_of)
    elif hasattr(m, "dot_group"):  # slerp, nuslerp, model_stock: dot products, then elementwise
        merge = _with_global_dots
    else:
        raise InputError(f"merge_method {m.name} is not supported on a sharded pool (elementwise methods, "
                         "ties, dare_*, breadcrumbs*, della*, slerp, nuslerp and model_stock are)")
    error, tasks, stale, grouped_call = None, [], False, None
    names = [p.name for p in plans]
    tv_table = getattr(pool, "_tv_table", None)  # (native table, groups) of the plans: a CPU pool's, with a base
    # the task-vector family in one native call (DELLA too: its masks are cached bits): no per-tensor tasks to make
    one_call = isinstance(m, TaskVectorMethod) and tv_table is not None and bool(plans)
    versions = list(map(pool.input_versions, names))  # read once: nothing writes the inputs before the merge
    try:
        stale = any(pool.stats_versions.get(n, v) != v for n, v in zip(names, versions))
        m.validate(pool.num_checkpoints, pool.has_base)
        per_model, global_params = _split_params(m, params, pool.num_checkpoints)
        checked = set()  # (weight row, candidate): the parameters are those of every tensor the row weights
        for p in plans:
            for k, table in enumerate(tables):
                row = p.group if table.shape[0] > 1 else 0
                if one_call and (row, k) in checked:
                    continue
                w = table[row]
                mp = [dict(per_model[i], weight=float(w[i])) for i in range(pool.num_checkpoints)]
                task = TensorTask(inputs=pool._inputs[p.name], base=pool._base.get(p.name), model_params=mp,
                                  params=dict(global_params), name=p.name, seed=seed, backend=pool.backend,
                                  num_threads=pool.num_threads)
                if (row, k) not in checked:  # once, at the row's first tensor (the one an error names)
                    m.check_params(task)
                    check_magnitudes(m, task, pool.labels)  # as the single-process pool: lambda 1e39 wrote NaN
                    checked.add((row, k))
                if merge is _with_global_dots:
                    _check_vectors(pool, task.name, m.dot_group(task), m.name)
                if not one_call:  # (the one native call takes the plans, not tasks)
                    tasks.append((task, p.outs[k]))
            if merge is not _with_global_dots and m.sparsification == "della_magprune":  # (every tensor's)
                _check_della(pool, p.name, m.name)
        if one_call:
            from pymerge.pool.grouped import TaskVectorCall
            grouped_call = (TaskVectorCall(m, per_model, global_params, tables, tv_table[1], names[0], seed,
                                           pool.labels),
                            tv_table[0])
        # the weights, a groups rule and the parameters read so far are the caller's code, which may have freed
        # or moved what the pool holds (as the single-process pool checks; agreed below: one line on every rank)
        pool._check_borrowed()
    except Exception as exc:
        error = exc
    try:
        what = collectives.fingerprint(m.name, [t.tolist() for t in tables], _plain(params), seed)  # 0.5 == np 0.5
    except Exception:  # parameters _plain cannot read: compare the method alone
        what = collectives.fingerprint(m.name)
    if collectives.agree(error, pool.agreeing, what, flag=stale):  # some rank's inputs changed: all recompute
        _drop_stats(pool, names)
    pool.stats_versions.update(zip(names, versions))
    # An error in the merge itself on one rank (DELLA's empty shard raised IndexError there) left the
    # others in a statistic's collective: gloo aborted, or they waited until the timeout. The failing rank
    # goes to the agree below, and every other rank meets it there or in _in_step before its next collective.
    pool._loop_agreed, error = False, None
    try:
        try:
            if grouped_call is not None:
                _grouped_task_vectors(pool, *grouped_call, plans, seed)
            if tasks and merge is not _with_global_dots:
                wanted = [(task, i, sp, out.device) for task, out in tasks
                          for i, sp in enumerate(_tv_args(m, task, args_of)[1])]
                _find_bounds(pool, wanted)
                _find_plans(pool, wanted)
            if merge is _with_global_dots:
                _find_dots(pool, m, tasks)
            for task, out in tasks:
                inputs = [t.to(out.device) for t in task.inputs]
                base = task.base.to(out.device) if task.base is not None else None
                task = TensorTask(inputs=inputs, base=base, model_params=task.model_params, params=task.params,
                                  name=task.name, seed=task.seed, backend=task.backend, num_threads=task.num_threads)
                merge(pool, m, task, out)
        except Exception as exc:
            if pool._loop_agreed:  # raised by _in_step: every rank has raised it
                raise
            error = exc
        collectives.agree(error, pool.agreeing)
    except Exception:
        # the ranks stopped at different statistics: one's cache held what another's lacked, and the cap may have
        # emptied one rank's alone (a review): all of it goes, on every rank
        pool.stats_cache.clear()
        raise
    finally:
        pool.found_bounds = {}  # (_find_bounds) only this call's: what its loop left unused goes


def _drop_stats(pool, names) -> None:
    for key in [k for k in pool.stats_cache if k[0] in set(names)]:
        del pool.stats_cache[key]


def _in_step(pool, group) -> None:
    """Before each collective of run_sharded's merge loop: one all_reduce that pairs with the last agree of
    a rank that failed since (its error is then raised on every rank), not with a statistic's collective.
    (Not between the rounds of one collectives.boundaries call: only bincounts of held keys run there.)"""
    if group is None:  # no collective follows
        return
    pool._loop_agreed = True
    collectives.agree(None, pool.agreeing)
    pool._loop_agreed = False


def _group(pool, name):
    """Where this tensor's statistics are summed: the pool's group, or nowhere when every rank has it all."""
    return pool.group if pool.boxes[name].signature[0] == "sharded" else None


def _counts(pool, name) -> bool:
    """Whether this rank's piece of the tensor counts in its global statistics (layout.counts)."""
    group = _group(pool, name)
    return group is None or counts(pool.boxes[name], group)


def _counted(pool, name, t: torch.Tensor) -> torch.Tensor:
    """t as this rank's part of a global statistic: empty where another copy of the piece counts."""
    return t if _counts(pool, name) else t[:0]


def _counted_parts(pool, name, parts: torch.Tensor) -> torch.Tensor:
    """Exact-sum parts as this rank's share of a global statistic: zero where another copy counts."""
    return parts if _counts(pool, name) else torch.zeros_like(parts)


# ---- the task-vector family ---------------------------------------------------------------------------
def _tv_args(m, task: TensorTask, args_of: dict) -> tuple:
    """(normalize, sparsifiers, weights, lam, divisor) of a task; args_of keeps a call's by weights (the rest of
    the parameters is the same for every tensor of the call): resolved per tensor, they cost ~60 us of Python
    each."""
    from pymerge.methods.task_vectors import task_vector_args
    key = tuple(float(mp["weight"]).hex() for mp in task.model_params)  # by bits: -0.0 is not 0.0 (a zero's sign)
    hit = args_of.get(key)
    if hit is None:
        normalize, rescale = m._settings(task)
        sparsifiers, weights, lam = task_vector_args(task, m.sparsification, rescale)
        hit = args_of[key] = (normalize, sparsifiers, weights, lam, tvo.linear_divisor(weights))
    return hit


def _task_vectors(pool, m, task: TensorTask, out: torch.Tensor, args_of: dict) -> None:
    """One tensor (args_of: see _tv_args)."""
    normalize, sparsifiers, weights, lam, divisor = _tv_args(m, task, args_of)
    start = pool.boxes[task.name].contiguous_start()
    plans = [_model_plan(pool, task, i, sp, w, start) for i, (sp, w) in enumerate(zip(sparsifiers, weights))]
    bits = start is None or any(p.mode == tvo.BITS for p in plans)  # bitmasks index the LOCAL elements
    tvo.merge_planned(task.inputs, task.base, plans, out, consensus=m.consensus, normalize=normalize, lam=lam,
                      divisor=divisor, name=task.name, seed=task.seed,
                      offset=0 if bits else start, backend=task.backend, num_threads=task.num_threads)


def _grouped_task_vectors(pool, call, native, plans, seed: int) -> None:
    """Every tensor's model plans over the GLOBAL tensors (as _task_vectors resolves them: cached per pool, with
    collectives on a miss, in the agreed plan order on every rank), then one native call (GroupedTVPlan) over the
    local shards, each tensor at its global offset: the per-tensor path's bits, without its ~80 us of Python
    and checks per tensor and candidate. The resolved arrays are kept while the pool's statistics stay as they
    were (their generation: any statistic computed or dropped moves it). Ranks may differ in that (one
    reuses, another resolves) only with the same statistics cached, so a rank resolving meets only cache hits,
    which run no collectives; and the native table, rebuilt on every rank or none, is the same on all."""
    kept = pool.kept_selection
    cache = pool.stats_cache
    if kept is not None and kept[0] is native and kept[1] is cache and kept[2] == (call.key, cache.generation):
        sel, offsets = kept[3:]  # nothing the statistics say has changed since
    else:
        sel, offsets = _select(pool, call, plans, seed)
        pool.kept_selection = (native, cache, (call.key, cache.generation), sel, offsets)
    native.run(sel.ints, sel.scales, sel.bits, call.weights, call.divisors, call.consensus, call.normalize,
               float(call.lam), int(seed) & 0xFFFFFFFFFFFFFFFF, pool.num_threads, offsets)


def _select(pool, call, plans, seed: int):
    """Every tensor's model plans (grouped.Selection) and its offset, for GroupedTVPlan.run."""
    n = len(call.sparsifiers)
    sel, offsets = Selection(len(plans), n), np.zeros(len(plans), dtype=np.int64)
    tasks = [TensorTask(inputs=pool._inputs[p.name], base=pool._base[p.name], model_params=[{}] * n, params={},
                        name=p.name, seed=seed, backend=pool.backend, num_threads=pool.num_threads) for p in plans]
    wanted = [(task, i, sp, None) for task in tasks for i, sp in enumerate(call.sparsifiers)]
    _find_bounds(pool, wanted)
    _find_plans(pool, wanted)
    for t, (p, task) in enumerate(zip(plans, tasks)):
        start = pool.boxes[p.name].contiguous_start()
        mps = [_model_plan(pool, task, i, sp, 1.0, start) for i, sp in enumerate(call.sparsifiers)]
        # bitmasks index the LOCAL elements (as merge_planned's offset 0 where any model takes one)
        offsets[t] = 0 if start is None or any(mp.mode == tvo.BITS for mp in mps) else start
        for i, mp in enumerate(mps):
            if mp.mode == tvo.BITS and not task.inputs[i].numel():  # an empty shard: no element, no mask's address
                mp = tvo.ModelPlan(model=i)
            sel.put(t, i, mp)
    return sel, offsets


def _model_plan(pool, task: TensorTask, i: int, sp: tvo.Sparsifier, weight: float, start) -> tvo.ModelPlan:
    """Model i's sparsifier resolved over the GLOBAL tensor (cached per pool), for this rank's kernel."""
    box = pool.boxes[task.name]
    n = math.prod(box.global_shape)
    plan = tvo.ModelPlan(weight=float(weight), model=i)
    if sp.method is None or sp.density >= 1 or n == 0:
        return plan
    if sp.method in _ZEROED and sp.density <= 0:
        plan.mode = tvo.ZERO
        return plan
    key = _plan_key(task, i, sp)
    hit = pool.stats_cache.get(key)
    if hit is None:
        hit = _resolve(pool, task, i, sp, n, start)
        _put_plan(pool, key, sp, hit)
    plan.mode, plan.lo, plan.hi, plan.thr, plan.scale, plan.bits = hit
    return plan


_RANKED = ("magnitude", "magnitude_outliers")  # sparsifiers that select by global magnitude rank
_ZEROED = ("magnitude", "della_magprune")  # those that keep nothing at density 0


def _resolved(sp: tvo.Sparsifier, n: int) -> bool:
    """Whether _model_plan resolves statistics for sp over a tensor of n elements: not without a sparsifier, at
    density 1 or for an empty tensor, nor where density 0 keeps nothing (its early returns)."""
    return not (sp.method is None or sp.density >= 1 or n == 0 or (sp.method in _ZEROED and sp.density <= 0))


def _on_device(task: TensorTask, i: int, device) -> TensorTask:
    """task with model i's input and the base on `device`, the one the merge computes on (a pinned pool's targets'
    GPU), as _resolve sees them there; task itself for None."""
    if device is None:
        return task
    inputs = list(task.inputs)
    inputs[i] = inputs[i].to(device)
    return dataclasses.replace(task, inputs=inputs, base=task.base.to(device) if task.base is not None else None)
# rank boundaries found together (_find_bounds): per collective round, a histogram of up to 2,048 int64 bins each;
# and the tensors' global elements, which bound the int64 magnitude keys a rank holds meanwhile
_BATCH_BOUNDS, _BATCH_ELEMENTS = 256, 1 << 25


def _ranks(sp: tvo.Sparsifier, n: int) -> tuple:
    """(ranks, descending) of a magnitude sparsifier's boundaries over a tensor of n elements."""
    if sp.method == "magnitude":  # TIES: the top density * n
        return [max(1, int(sp.density * n))], [True]
    target, n_top = int(sp.density * n), int(sp.gamma * n)  # breadcrumbs: the middle, outliers dropped
    n_bot = max(0, n - target - n_top)
    return [min(n_bot, n), min(n_bot + target, n)], [False, False]


def _find_bounds(pool, wanted) -> None:
    """The rank boundaries _resolve is about to need for `wanted`, (task, model, sparsifier, device) of one call, found
    together into pool.found_bounds: a few collectives per 256 of them instead of four for each tensor and
    checkpoint (a first TIES call over 10,000 tiny tensors took 71 s on gloo: a scaling audit). Only those of
    sharded tensors that the cache lacks, which every rank lacks alike (a miss runs collectives)."""
    batch: list = []  # (key, magnitude keys, ranks, descending, numel, global index)

    def flush():
        keys, ranks, descending, numel, index = [], [], [], [], []
        for _, k, rs, ds, n, gidx in batch:
            keys += [k] * len(rs)
            ranks += rs
            descending += ds
            numel += [n] * len(rs)
            index += [gidx] * len(rs)
        _in_step(pool, pool.group)
        found = collectives.boundaries(keys, ranks, descending, numel, index, pool.group)
        for key, _, rs, _, _, _ in batch:
            pool.found_bounds[key], found = found[:len(rs)], found[len(rs):]
        batch.clear()

    held = bounds = 0  # magnitude keys held, boundaries wanted
    seen = set()  # keys batched or found (a population's candidates want each tensor's again)
    for task, i, sp, device in wanted:
        key, box = (task.name, i, sp), pool.boxes[task.name]
        n = math.prod(box.global_shape)
        if (key in seen or sp.method not in _RANKED or not _resolved(sp, n) or _group(pool, task.name) is None
                or (*key, None) in pool.stats_cache):
            continue
        seen.add(key)
        task = _on_device(task, i, device)
        keys = _counted(pool, task.name, select.magnitude_keys(task.inputs[i], task.base))
        gidx = functools.partial(_counted_indices, pool, task.name, task.inputs[i].device)
        batch.append((key, keys, *_ranks(sp, n), n, gidx))
        # by the GLOBAL size: every rank cuts its batches at the same keys (its own count differs with uneven
        # shards, and is 0 where another copy of a piece counts: the histograms' shapes then differed, a review)
        held, bounds = held + n, bounds + len(batch[-1][2])
        if bounds >= _BATCH_BOUNDS or held >= _BATCH_ELEMENTS:
            flush()
            held = bounds = 0
    if batch:
        flush()


def _counted_indices(pool, name: str, device) -> torch.Tensor:
    """The global flat indices of this rank's counted elements of tensor `name`."""
    return _counted(pool, name, pool.boxes[name].global_indices(device))


def _plan_key(task: TensorTask, i: int, sp: tvo.Sparsifier) -> tuple:
    """A model plan's statistics-cache key: a seeded sparsifier's (random masks) depends on the seed."""
    return task.name, i, sp, int(task.seed) if sp.method in tvo.SEEDED else None


def _put_plan(pool, key: tuple, sp: tvo.Sparsifier, hit: tuple) -> None:
    if sp.method in tvo.SEEDED:  # another seed's or density's mask of this tensor and model goes (a mask per element)
        pool.stats_cache.put_seeded(key, (key[0], key[1], sp.method), hit)
    else:
        pool.stats_cache[key] = hit


def _resolve(pool, task: TensorTask, i: int, sp: tvo.Sparsifier, n: int, start):
    """(mode, lo, hi, thr, scale, bits) of one model: collectives over the pool's group."""
    group = _group(pool, task.name)
    plan, keep, parts = _local_plan(pool, task, i, sp, n, start)
    sums = None
    if sp.rescale == "l1":
        _in_step(pool, group)
        sums = collectives.sum_parts(_l1_parts(pool, task, i, plan, keep, start, parts), group)
    _scale(plan, sp, sums)
    return _entry(plan, _bits(plan, keep, start))


def _scale(plan: tvo.ModelPlan, sp: tvo.Sparsifier, l1_sums) -> None:
    if sp.rescale == "l1":
        plan.scale = tvo.l1_ratio(*l1_sums)
    elif sp.rescale == "inverse_density":
        plan.scale = tvo._f32(1.0 / sp.density) if sp.density > 0 else 1.0


def _bits(plan: tvo.ModelPlan, keep, start):
    """The packed keep-mask where the kernel indexes it by LOCAL element (the plan's mode then BITS), else None."""
    if start is None or plan.mode == tvo.BITS:
        plan.mode = tvo.BITS
        return keep if keep.dtype == torch.int64 else tvo.pack_bits(keep)  # (int64: packed already)
    return None


def _entry(plan: tvo.ModelPlan, bits) -> tuple:
    return plan.mode, plan.lo, plan.hi, plan.thr, plan.scale, bits


def _local_plan(pool, task: TensorTask, i: int, sp: tvo.Sparsifier, n: int, start, row=None) -> tuple:
    """(plan without its scale, keep-mask, L1 parts or None) of one model: the mask of this rank's elements (bool,
    or packed int64 words where DELLA's native kernel made it, and with it the L1 parts), None where nothing needs
    it; its rank boundaries those _find_bounds found, or found here by collectives; `row`: a 1-D tensor's whole
    delta for DELLA (_gather_rows), else gathered here."""
    box, group = pool.boxes[task.name], _group(pool, task.name)
    x, base = task.inputs[i], task.base
    keys = select.magnitude_keys(x, base) if sp.method in _RANKED else None
    plan = tvo.ModelPlan(model=i)
    gidx = functools.partial(box.global_indices, x.device)  # global flat indices, made only where needed
    if sp.method in _RANKED:
        bounds = pool.found_bounds.pop((task.name, i, sp), None) if group is not None else None
        if bounds is None:
            ranks, descending = _ranks(sp, n)
            counted_gidx = lambda: _counted(pool, task.name, gidx())  # noqa: E731
            _in_step(pool, group)
            bounds = collectives.boundaries([_counted(pool, task.name, keys)] * len(ranks), ranks, descending, n,
                                            counted_gidx, group)
        if sp.method == "magnitude":
            plan.mode, plan.hi = tvo.TOPK, bounds[0]
        else:
            plan.mode, (plan.lo, plan.hi) = tvo.RANGE, bounds
    elif sp.method == "random":
        plan.mode = tvo.RANDOM
        plan.thr = philox.keep_threshold(sp.density)
    keep = parts = None
    if sp.method == "della_magprune":
        plan.mode = tvo.BITS
        keep, parts = _della_keep(pool, task, i, sp, box, group, start, row)
    elif start is None:  # a shard that is not one run of the global elements: the kernel takes a bitmask
        keep = _keep(plan, keys, gidx(), task.name, task.seed)
    return plan, keep, parts


def _l1_parts(pool, task: TensorTask, i: int, plan: tvo.ModelPlan, keep, start, parts=None) -> torch.Tensor:
    """[2, PARTS]: this rank's share of the exact sums of |d| and |d * keep| of model i (an L1 rescale): `parts`
    where the mask's kernel gave them; without a keep-mask, those of the plan over the shard's elements from global
    index `start`, as the kernels mask them (the native kernel on a CPU: the torch Philox here took 0.7 ms per
    tiny tensor, an audit)."""
    x, base = task.inputs[i], task.base
    if parts is None and keep is None:
        parts = tvo.model_l1_parts(x, base, plan, name=task.name, seed=task.seed, offset=start,
                                   cpu=tvo._use_cpu(x, task.backend), num_threads=task.num_threads)
    elif parts is None:
        parts = tvo.l1_parts(x.float() - base.float(), keep)
    return _counted_parts(pool, task.name, parts)


_BATCH_ROWS = 512  # exact sums found together per all_reduce (_find_dots): 17 KB of int64 parts each
_BATCH_PLANS = 256  # model plans found together (_find_plans): up to 512 sums, and DELLA's 1-D deltas gathered


def _find_plans(pool, wanted) -> None:
    """The whole plans of `wanted` whose statistics need more than rank boundaries (an L1 rescale's sums, DELLA's
    masks), found together into the statistics cache after _find_bounds, whose boundaries the ranked masks take:
    per 256 of them (or 2^25 global elements), one all_gather_object of DELLA's 1-D deltas and one all_reduce of
    the L1 sums, instead of up to three collectives for each tensor and checkpoint (a first call over 1,000 tiny
    tensors and 2 checkpoints on 2 gloo ranks: DARE-TIES ran 4,005 all_reduces in 7.5 s, DELLA 5,005 and 1,000
    all_gathers in 18.7 s). Only those of sharded tensors that the cache lacks, which every rank lacks alike."""
    batch: list = []  # (key, task, model, sparsifier, global elements)

    def flush():
        rows = _gather_rows(pool, batch)
        done, parts = [], []
        for key, task, i, sp, n in batch:
            start = pool.boxes[task.name].contiguous_start()
            plan, keep, l1 = _local_plan(pool, task, i, sp, n, start, rows.get(key))
            if sp.rescale == "l1":
                parts.append(_l1_parts(pool, task, i, plan, keep, start, l1))
            done.append((key, sp, plan, _bits(plan, keep, start)))  # the keep-mask goes: packed, where kept
        sums = []
        if parts:
            _in_step(pool, pool.group)
            sums = collectives.sum_parts(torch.cat(parts), pool.group)
        for key, sp, plan, bits in done:
            if sp.rescale == "l1":
                _scale(plan, sp, sums[:2])
                sums = sums[2:]
            else:
                _scale(plan, sp, None)
            _put_plan(pool, key, sp, _entry(plan, bits))
        batch.clear()

    held, seen = 0, set()
    for task, i, sp, device in wanted:
        key, n = _plan_key(task, i, sp), math.prod(pool.boxes[task.name].global_shape)
        if (key in seen or not _resolved(sp, n) or (sp.rescale != "l1" and sp.method != "della_magprune")
                or _group(pool, task.name) is None or key in pool.stats_cache):
            continue
        seen.add(key)
        batch.append((key, _on_device(task, i, device), i, sp, n))
        held += n  # by the GLOBAL size, as _find_bounds: every rank cuts its batches alike
        if len(batch) >= _BATCH_PLANS or held >= _BATCH_ELEMENTS:
            flush()
            held = 0
    if batch:
        flush()


def _gather_rows(pool, batch) -> dict:
    """key -> the whole delta of each of the batch's 1-D DELLA tensors (a bias, a norm: small), from every rank's
    piece in one all_gather_object (DELLA ranks a 1-D tensor as one row); batch: _find_plans's entries, or one
    (_della_keep's, where a cleared cache left a plan to resolve alone)."""
    import torch.distributed as dist
    wanted = [(key, task, i) for key, task, i, sp, _ in batch
              if sp.method == "della_magprune" and len(pool.boxes[task.name].global_shape) < 2]
    if not wanted:
        return {}
    mine = [(pool.boxes[task.name].offset[0], (task.inputs[i].float() - task.base.float()).reshape(-1).cpu())
            if _counts(pool, task.name) else None for _, task, i in wanted]
    everyone = [None] * dist.get_world_size(pool.group)
    _in_step(pool, pool.group)
    dist.all_gather_object(everyone, mine, group=pool.group)
    return {key: torch.cat([d for _, d in sorted(filter(None, (theirs[j] for theirs in everyone)), key=lambda p: p[0])])
            for j, (key, _, _) in enumerate(wanted)}


def _check_della(pool, name: str, method: str) -> None:
    """DELLA ranks |d| along dim 1 (one row for a 1-D tensor): a rank needs whole rows, i.e. only dim 0 split."""
    box = pool.boxes[name]
    if len(box.global_shape) >= 2 and set(box.split_dims) - {0}:
        raise InputError(f"{method}: tensor {name!r} is split along dimension {max(box.split_dims)}; DELLA ranks "
                         "magnitudes within rows, so a sharded pool needs its rows whole on each rank (Shard(0))")


def _della_keep(pool, task: TensorTask, i: int, sp: tvo.Sparsifier, box, group, start, row=None) -> tuple:
    """(DELLA's keep-mask of this rank's elements, its L1 parts or None): rows whole here, a 1-D tensor one row
    (`row`, or gathered). A CPU shard of rows takes the native kernel, at the rows' global offset (as one
    process's: the torch form took ~3 ms per tiny tensor and far longer per large one)."""
    x, base = task.inputs[i], task.base
    if len(box.global_shape) >= 2 or group is None:
        if x.dim() <= 2 and start is not None and tvo._use_cpu(x, task.backend):
            return tvo.della_native(x, base, sp, i, task.name, task.seed, start, task.num_threads)
        return tvo.della_keep_torch(x, base, sp, i, task.name, task.seed, offset=start), None
    full = row if row is not None else _gather_rows(pool, [(None, task, i, sp, 0)])[None]  # float32, on the CPU
    lo, n = box.offset[0], box.shape[0]
    if tvo._use_cpu(full, task.backend):  # the native kernel over the whole row (the torch form: ~1 ms more a mask)
        words, _ = tvo.della_native(full, torch.zeros_like(full), sp, i, task.name, task.seed, 0, task.num_threads)
        keep = tvo.bits_at(words, torch.arange(lo, lo + n))
    else:
        keep = tvo.della_keep_torch(full, torch.zeros_like(full), sp, i, task.name, task.seed, offset=0)[lo:lo + n]
    return keep.to(x.device), None


def _keep(plan: tvo.ModelPlan, keys: torch.Tensor, gidx: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """Keep-mask of this rank's elements (global flat indices gidx), as the single-process kernel decides."""
    if plan.mode == tvo.TOPK:
        return select.before(keys, plan.hi, True, gidx)
    if plan.mode == tvo.RANGE:
        return select.before(keys, plan.hi, False, gidx) & ~select.before(keys, plan.lo, False, gidx)
    h0, h1 = philox.name_hash(name)
    k0, k1 = philox.seed_key(seed)
    words = torch.stack(philox.philox4x32(gidx >> 2, plan.model & philox.M32, h0, h1, k0, k1), dim=1)
    draws = words.gather(1, (gidx & 3).view(-1, 1)).view(-1)
    return draws < plan.thr


# ---- SLERP, NuSLERP, Model Stock --------------------------------------------------------------------------
_VECTOR_DIM = {"rows": -1, "cols": 0}  # the tensor dimension a "rows" / "cols" vector runs along


def _check_vectors(pool, name: str, group: str, method: str) -> None:
    """Per-row or per-column statistics need each vector whole on one rank (placements: the same on all ranks)."""
    box = pool.boxes[name]
    if group in _VECTOR_DIM and len(box.global_shape) >= 2 and \
            _VECTOR_DIM[group] % len(box.global_shape) in box.split_dims:
        raise InputError(f"{method}: tensor {name!r} is split along the dimension its {group} vectors run along; "
                         "a sharded pool computes these per-vector statistics only where each vector is on one rank")


def _with_global_dots(pool, m, task: TensorTask, out: torch.Tensor) -> None:
    """The method's own merge_tensor, with dot products summed over the whole tensor across ranks."""
    group_of = _group(pool, task.name)

    def dots(xs, base, sub, group, backend="auto", num_threads=0):
        if group != "whole":  # each vector is local (checked up front): the single-process reduction
            return interp.group_dots(xs, base, sub, group, backend, num_threads)
        parts = interp.whole_dot_parts(xs, base, sub, backend, num_threads)
        _in_step(pool, group_of)
        return _gram(collectives.sum_parts(_counted_parts(pool, task.name, parts), group_of), len(xs))

    def cached(xs, base, sub, group, backend="auto", num_threads=0):  # dropped with the tensor's statistics
        key = _dots_key(m, task, group, sub)
        if key not in pool.stats_cache:
            pool.stats_cache[key] = dots(xs, base, sub, group, backend, num_threads)
        return pool.stats_cache[key]

    task.dots = cached
    m.merge_tensor(task, out)


def _dots_key(m, task: TensorTask, group: str, sub: bool) -> tuple:
    return task.name, "dots", m.name, group, sub


def _gram(sums, k: int) -> torch.Tensor:
    """[1, k, k] Gram matrix from the sums of its upper triangle's entries, row by row (interp.whole_dot_parts)."""
    iu = torch.triu_indices(k, k)
    g = torch.zeros(1, k, k, dtype=torch.float64)
    g[0, iu[0], iu[1]] = g[0, iu[1], iu[0]] = torch.tensor(sums, dtype=torch.float64)
    return g


def _find_dots(pool, m, tasks) -> None:
    """The whole-tensor dot products _with_global_dots is about to need for `tasks`, (task, target) of one call,
    summed together into the pool's statistics: one all_reduce per 512 sums instead of two
    collectives per tensor (a first Model Stock call over 1,000 tiny tensors ran 2,004). Only those of sharded
    tensors that the cache lacks, which every rank lacks alike."""
    batch: list = []  # (key, vectors, parts)

    def flush():
        _in_step(pool, pool.group)
        sums = collectives.sum_parts(torch.cat([parts for _, _, parts in batch]), pool.group)
        for key, k, parts in batch:
            pool.stats_cache[key], sums = _gram(sums[:len(parts)], k), sums[len(parts):]
        batch.clear()

    rows, seen = 0, set()
    for task, out in tasks:
        group = m.dot_group(task)
        try:
            xs, base, sub = m.dot_args(task)
        except InputError:  # the merge raises it, in its order
            continue
        key = _dots_key(m, task, group, sub)
        if group != "whole" or _group(pool, task.name) is None or key in seen or key in pool.stats_cache:
            continue
        seen.add(key)
        xs = [x.to(out.device) for x in xs]  # on the device the merge computes on, as _find_bounds
        base = base.to(out.device) if base is not None else None
        parts = _counted_parts(pool, task.name, interp.whole_dot_parts(xs, base, sub, task.backend, task.num_threads))
        batch.append((key, len(xs), parts))
        rows += len(parts)
        if rows >= _BATCH_ROWS:
            flush()
            rows = 0
    if batch:
        flush()
