"""Merge methods with whole-tensor statistics, on a sharded pool's local shards.

Each method runs the single-process kernels on the local tensors; only its statistics are
global, computed with collectives over the pool's group (collectives.py) and cached in the pool
(they depend on the checkpoints, never on the weights, so a search pays for them once):

- TIES, DARE (linear/ties), breadcrumbs (plain/ties): global magnitude rank boundaries, Philox
  masks keyed by the GLOBAL element index, and L1 rescale norms as exact sums. A shard that is
  one contiguous run of the global tensor (FSDP2's Shard(0), row-parallel biases...) runs the
  fused kernel with its global offset, exactly as the single process does. A strided shard
  (Shard(1): a piece of every row) gets its keep-masks from torch as bitmasks (cached).
- SLERP: the norms and dot product as exact sums; the interpolation is elementwise.
The rest (DELLA's per-row ranks, NuSLERP, Model Stock, ...) is refused with a clear error.
"""
import math
from typing import List

import torch

from pymerge.dist import collectives
from pymerge.errors import InputError
from pymerge.methods.base import TensorTask
from pymerge.ops import philox, select
from pymerge.ops import task_vector_ops as tvo


def run_sharded(pool, m, plans, tables, seed: int, params) -> None:
    """Checks everything, agrees across ranks, then merges each planned tensor into its local targets."""
    from pymerge.methods.slerp import Slerp
    from pymerge.methods.task_vectors import TaskVectorMethod
    from pymerge.pool.pool import _split_params
    if isinstance(m, TaskVectorMethod) and m.sparsification != "della_magprune":
        merge = _task_vectors
    elif isinstance(m, Slerp):
        merge = _slerp
    else:
        raise InputError(f"merge_method {m.name} is not supported on a sharded pool (linear, task_arithmetic, "
                         "ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties and slerp are)")
    error, tasks = None, []
    try:
        m.validate(pool.num_checkpoints, pool.has_base)
        per_model, global_params = _split_params(m, params, pool.num_checkpoints)
        for p in plans:
            for k, table in enumerate(tables):
                w = table[p.group if table.shape[0] > 1 else 0]
                mp = [dict(per_model[i], weight=float(w[i])) for i in range(pool.num_checkpoints)]
                task = TensorTask(inputs=pool._inputs[p.name], base=pool._base.get(p.name), model_params=mp,
                                  params=dict(global_params), name=p.name, seed=seed, backend=pool.backend,
                                  num_threads=pool.num_threads)
                m.check_params(task)
                tasks.append((task, p.outs[k]))
    except Exception as exc:
        error = exc
    try:
        what = collectives.fingerprint(m.name, [t.tolist() for t in tables], sorted(map(repr, params.items())), seed)
    except Exception:  # unpicklable parameters: compare the method alone
        what = collectives.fingerprint(m.name)
    collectives.agree(error, pool.group, what)
    for task, out in tasks:
        inputs = [t.to(out.device) for t in task.inputs]
        base = task.base.to(out.device) if task.base is not None else None
        task = TensorTask(inputs=inputs, base=base, model_params=task.model_params, params=task.params,
                          name=task.name, seed=task.seed, backend=task.backend, num_threads=task.num_threads)
        merge(pool, m, task, out)


def _group(pool, name):
    """Where this tensor's statistics are summed: the pool's group, or nowhere when every rank has it all."""
    return pool.group if pool.boxes[name].signature[0] == "sharded" else None


# ---- the task-vector family ---------------------------------------------------------------------------
def _task_vectors(pool, m, task: TensorTask, out: torch.Tensor) -> None:
    from pymerge.methods.task_vectors import task_vector_args
    normalize, rescale = m._settings(task)
    sparsifiers, weights, lam = task_vector_args(task, m.sparsification, rescale)
    start = pool.boxes[task.name].contiguous_start()
    plans = [_model_plan(pool, task, i, sp, w, start) for i, (sp, w) in enumerate(zip(sparsifiers, weights))]
    tvo.merge_planned(task.inputs, task.base, plans, out, consensus=m.consensus, normalize=normalize, lam=lam,
                      divisor=tvo.linear_divisor(weights), name=task.name, seed=task.seed,
                      offset=0 if start is None else start, backend=task.backend, num_threads=task.num_threads)


def _model_plan(pool, task: TensorTask, i: int, sp: tvo.Sparsifier, weight: float, start) -> tvo.ModelPlan:
    """Model i's sparsifier resolved over the GLOBAL tensor (cached per pool), for this rank's kernel."""
    box = pool.boxes[task.name]
    n = math.prod(box.global_shape)
    plan = tvo.ModelPlan(weight=float(weight), model=i)
    if sp.method is None or sp.density >= 1 or n == 0:
        return plan
    if sp.method == "magnitude" and sp.density <= 0:
        plan.mode = tvo.ZERO
        return plan
    key = (task.name, i, sp, int(task.seed) if sp.method == "random" else None)
    hit = pool.stats_cache.get(key)
    if hit is None:
        hit = pool.stats_cache[key] = _resolve(pool, task, i, sp, n, start)
    plan.mode, plan.lo, plan.hi, plan.thr, plan.scale, plan.bits = hit
    return plan


def _resolve(pool, task: TensorTask, i: int, sp: tvo.Sparsifier, n: int, start):
    """(mode, lo, hi, thr, scale, bits) of one model: collectives over the pool's group."""
    box, group = pool.boxes[task.name], _group(pool, task.name)
    x, base = task.inputs[i], task.base
    keys = select.magnitude_keys(x, base)
    plan = tvo.ModelPlan(model=i)
    gidx = box.global_indices
    if sp.method == "magnitude":
        plan.mode = tvo.TOPK
        plan.hi = collectives.boundaries([keys], [max(1, int(sp.density * n))], [True], n, gidx, group)[0]
    elif sp.method == "magnitude_outliers":
        target, n_top = int(sp.density * n), int(sp.gamma * n)
        n_bot = max(0, n - target - n_top)
        plan.mode = tvo.RANGE
        plan.lo, plan.hi = collectives.boundaries([keys, keys], [min(n_bot, n), min(n_bot + target, n)],
                                                  [False, False], n, gidx, group)
    else:  # random
        plan.mode = tvo.RANDOM
        plan.thr = philox.keep_threshold(sp.density)
    keep = None
    if sp.rescale == "l1" or start is None:
        keep = _keep(plan, keys, gidx(), task.name, task.seed)
    if sp.rescale == "l1":
        d = (x.float() - base.float()).reshape(-1).abs().double()
        total, kept = collectives.exact_sums([d, d * keep], group)
        plan.scale = tvo.l1_ratio(total, kept)
    elif sp.rescale == "inverse_density":
        plan.scale = tvo._f32(1.0 / sp.density) if sp.density > 0 else 1.0
    bits = None
    if start is None:  # a strided shard: the kernel's element index is local, so the mask is precomputed
        plan.mode, bits = tvo.BITS, tvo.pack_bits(keep)
    return plan.mode, plan.lo, plan.hi, plan.thr, plan.scale, bits


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


# ---- SLERP ----------------------------------------------------------------------------------------------
def _slerp(pool, m, task: TensorTask, out: torch.Tensor) -> None:
    from pymerge.methods.task_vectors import _number
    from pymerge.ops import interp
    t = _number(task.params.get("t"), "t", task.name)
    xs: List[torch.Tensor] = [task.base, task.inputs[0]]
    a, b = (v.reshape(-1).float().double() for v in xs)
    aa, bb, ab = collectives.exact_sums([a * a, b * b, a * b], _group(pool, task.name))
    ca, cb = interp.slerp_coefs(t, aa, bb, ab)
    interp.group_lincomb(xs, None, False, "whole", torch.tensor([[ca, cb, 0.0]]), out, task.backend,
                         task.num_threads)
