"""pymerge.search.optimize across ranks: CMA-ES on rank 0, candidates materialized and evaluated everywhere.

The ranks first compare their arguments and pools (one all_reduce; a difference is the same error on
every rank). Rank 0 (the leader) then runs the single-process optimize unchanged (same CMA-ES, same state file,
same resume), but on a stand-in pool: each of its materialize_many calls (one generation)
broadcasts the candidates' weights, every replica group materializes its share of them into
its own model (candidate c goes to replica group c mod G) and runs evaluate(model) on all of its
ranks, and the scores come back with one all_gather. The other ranks serve those calls until
the leader broadcasts the result, which every rank returns. So a distributed run proposes the
same candidates and returns the same result as a single-process run with the same seed (as far
as evaluate gives the same scores). Every rank of a replica group must return the same scores (within 1e-4
relative): a difference is one error on every rank, not the lowest rank's scores taken silently.

Replica groups: the ranks of one pool.group (the ranks that hold different shards of one model,
e.g. one row of a (replicas, shards) mesh) form one group; a pool that is not sharded makes
every rank its own group. In history, materialize_s is a generation's wall time per candidate
(materialize and evaluate, replica groups in parallel) and evaluate_s the leader's bookkeeping.
"""
from typing import Callable, Optional

import torch

from pymerge.errors import InputError, add_note, first_line, short


def across_ranks(pool, distributed: Optional[bool] = None) -> Optional[Callable]:
    """The distributed driver when a process group of several ranks is up (and pool is not our stand-in), unless
    the caller asked for a search of its own (distributed=False: one rank alone waited in the start's agreement
    for the others until the group's timeout)."""
    import torch.distributed as dist
    if distributed is not None and type(distributed) is not bool:  # (0 == False, but 0 is not False below)
        raise InputError(f"distributed must be True, False or None, got {short(distributed)}")
    if isinstance(pool, _LeaderPool):
        return None
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is False:
        from pymerge.dist.pool import ShardedPool
        if isinstance(pool, ShardedPool):
            raise InputError("distributed=False: a sharded pool merges with collectives over its ranks, so every "
                             "rank takes part in its search; build a pool without shard_like for a search of "
                             "this rank's own")
        return None
    if distributed and not several:
        raise InputError("distributed=True needs an initialized torch.distributed process group of several ranks")
    return optimize_across_ranks if several else None


_SEARCH_ONLY = ("budget", "popsize", "sigma0", "seed", "state_path", "normalize", "x0", "bounds", "objective")
_ARGUMENTS_DIFFER = ("ranks called optimize with different arguments (method, method parameters, budget, popsize, "
                     "sigma0, seed, x0, bounds, normalize, groups, names or objective); every rank must pass the same")
_POOLS_DIFFER = ("ranks called optimize with different pools (other checkpoints, compress= or dtype=); every rank "
                 "must build the same pool")


def optimize_across_ranks(optimize, pool, evaluate, model, *, replicas=None, log=print, refused=None, **kwargs):
    """Every rank calls this (through optimize) with the same arguments; `replicas` is unused (one model per rank).
    refused: this rank's error in optimize's own checks, which the start's agreement raises on every rank."""
    contents = _agreed_start(pool, kwargs, refused)
    try:
        return _search(optimize, pool, evaluate, model, contents, log, kwargs)
    finally:
        # Each replica group cached the statistics of its own candidates (none where it got none: budget=1),
        # so after the search a whole-mesh materialize ran a statistic's collectives on some ranks only (a
        # hang): every rank leaves with none. Every rank gets here, the search's errors being agreed.
        cache = getattr(pool, "stats_cache", None)
        if cache is not None:
            cache.clear()
            pool.kept_selection = None  # (what was derived from them: its bitmasks and table freed now)


def _search(optimize, pool, evaluate, model, contents, log, kwargs):
    import torch.distributed as dist
    from pymerge.dist import collectives
    from pymerge.search.optimize import _scores
    merge_kw = {k: v for k, v in kwargs.items() if k not in _SEARCH_ONLY}  # method, groups, names, parameters
    crew = _Crew(pool, evaluate, model, _scores, merge_kw)
    if dist.get_rank() == 0:
        leader = _LeaderPool(pool, crew, contents)
        try:
            result = optimize(leader, leader.evaluate, torch.nn.Module(), log=log, **kwargs)
        except Exception as exc:
            if not crew.failed_together:  # only the leader saw it (a bad state file, budget...): tell the others
                first = first_line(exc)
                dist.broadcast_object_list([("error", collectives.error_kind(exc), first)], src=0)
            raise
        dist.broadcast_object_list([("done", result)], src=0)
        return result
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        kind = msg[0][0]
        if kind == "batch":
            crew.run(*msg[0][1:])
        elif kind == "done":
            return msg[0][1]
        else:
            collectives.raise_agreed([(msg[0][1], f"rank 0: {msg[0][2]}")], None)


def _pool_facts(pool) -> dict:
    """The pool as the state's fingerprint records it (_pool_contents), as a single process records it,
    less the sample of its tensors where the ranks hold shards of them (not what one process samples)."""
    from pymerge.search.optimize import _pool_contents
    contents = _pool_contents(pool)
    if getattr(pool, "group", None) is not None:
        contents.pop("sample", None)
        contents.pop("base_sample", None)
        contents.pop("spread", None)
    return contents


def _agreed_start(pool, kwargs, refused: Optional[Exception] = None) -> dict:
    """One all_reduce before the search: the same InputError on every rank unless all passed the same
    arguments and built the same pool. Each rank merges its share of candidates with its own method and
    parameters, and only rank 0's budget, seed... drive the search: on plain pools (nothing compares them
    there, unlike a sharded pool's materialize) a rank passing others went unnoticed, its candidates merged
    otherwise and recorded as rank 0's. Returns this rank's _pool_facts."""
    import torch.distributed as dist
    from pymerge.dist import collectives
    from pymerge.dist.pool import _plain
    from pymerge.pool.pool import _map_name, method_params_of
    from pymerge.pool.weights import group_indices
    error, arguments, facts, contents = refused, 0, 0, {}
    try:
        if refused is not None:
            raise refused
        args = {k: v for k, v in kwargs.items() if k != "state_path"}  # rank 0's file: the others may pass None
        extra = {k: args.pop(k) for k in list(args) if k not in _SEARCH_ONLY + ("method", "groups", "names",
                                                                               "method_params")}
        args["method_params"] = method_params_of(args.pop("method_params", None), extra)  # either way alike
        # groups=/names= functions as they resolve on the pool's tensors: two of one name that group or map them
        # otherwise on some rank merged its share of the candidates with its own (a bug hunt)
        if callable(args.get("groups")):
            args["groups"] = group_indices(pool.names, args["groups"])
        if callable(args.get("names")):
            args["names"] = [_map_name(n, args["names"]) for n in pool.names]
        arguments = collectives.fingerprint(_plain(args))  # numbers by value
        contents = _pool_facts(pool)
        facts = collectives.fingerprint(_plain([pool.num_checkpoints, pool.has_base, contents]))
    except Exception as exc:  # noqa: BLE001  (raised on every rank by the agreement)
        error = exc
    collectives.agree(error, dist.group.WORLD, (arguments, facts), differs=(_ARGUMENTS_DIFFER, _POOLS_DIFFER))
    return contents


class _Crew:
    """What every rank does with one generation: its replica group's candidates, then the scores of all."""

    def __init__(self, pool, evaluate, model, to_scores, merge_kw):
        import torch.distributed as dist
        self.pool, self.evaluate, self.model, self.to_scores = pool, evaluate, model, to_scores
        self.merge_kw = merge_kw  # each rank's own (callables need not travel)
        group = getattr(pool, "group", None)
        me = dist.get_rank()
        leader = min(dist.get_process_group_ranks(group)) if group is not None else me
        leaders = [None] * dist.get_world_size()
        dist.all_gather_object(leaders, leader)
        order = sorted(set(leaders))
        self.replica, self.replicas = order.index(leader), len(order)
        self.failed_together = False

    def run(self, weights, first_index: int):
        import torch.distributed as dist
        from pymerge.dist import collectives
        mine, error, own = [], None, None
        group = getattr(self.pool, "group", None)  # the ranks that hold one model copy: a replica group
        agreeing = getattr(self.pool, "agreeing", None)
        if agreeing is not None:  # a sharded pool agrees over the whole mesh; here each replica group
            self.pool.agreeing = group  # materializes its own candidates, as many as it has
        try:
            for c in range(self.replica, len(weights), self.replicas):
                try:
                    self.pool.materialize(weights[c], into=self.model, **self.merge_kw)
                    mine.append((c, self.to_scores(self.evaluate(self.model), first_index + c)))
                except Exception as exc:
                    own, error = exc, (collectives.error_kind(exc), f"rank {dist.get_rank()}: {first_line(exc)}")
                # The group stops together: an evaluate() failing on one rank only left the others in the
                # next candidate's collectives while it waited in the gather below (a hang until the timeout).
                if _stop_together(group, error, own):
                    break
        finally:
            if agreeing is not None:
                self.pool.agreeing = agreeing
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (mine, error))
        errors = [e for _, e in everyone if e is not None]
        if errors:  # (the user's input error on every rank; anything else stays itself where it was raised)
            self.failed_together = True
            collectives.raise_agreed(errors, own)
        scores, first = {}, {}
        for rank, (got, _) in enumerate(everyone):
            for c, s in got:
                if c not in scores:
                    scores[c], first[c] = s, rank
                elif not _same_scores(scores[c], s):
                    # every rank of the group scored candidate c: the lowest rank's scores were taken silently
                    # (a data-parallel evaluate that forgot to reduce its metric drove CMA-ES with one rank's share)
                    self.failed_together = True  # every rank raises this, from the same gathered scores
                    raise InputError(
                        f"evaluate returned different scores on ranks {first[c]} and {rank} of one replica group for "
                        f"candidate {first_index + c} ({short(scores[c])} and {short(s)}); every rank of a group must "
                        "return the same scores: reduce a metric computed on each rank's share of the data across "
                        "the group (torch.distributed.all_reduce) before returning it")
        return [scores[c] for c in range(len(weights))]


def _same_scores(a: dict, b: dict) -> bool:
    """The same tasks with the same scores, within 1e-4 relative (a GPU's nondeterministic reductions differ in the
    last bits between ranks; different shares of the data differ far more), NaN as NaN."""
    import math
    return a.keys() == b.keys() and all(
        math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y))
        for x, y in ((a[k], b[k]) for k in a))


def _stop_together(group, error, own) -> bool:
    """Whether any rank of group failed (error: this rank's (kind, message) or None; own: its exception). Where the
    agreement itself fails (an evaluate() that raised on this rank before its own collectives, a sharded forward,
    left the others waiting in them until the process group's timeout), this rank raises its own error, not the
    collective's: the user's input error as one line saying so, anything else itself with that as a note."""
    from pymerge.dist import collectives
    if group is None:
        return error is not None
    try:
        return collectives.agree(None, group, flag=error is not None)
    except Exception as exc:
        if error is None:
            raise
        why = ("the other ranks never reached the agreement after it: if evaluate runs collectives, they waited in "
               "them until the process group's timeout; an evaluate must fail on every rank or none")
        if error[0] not in collectives._ERRORS:  # (the user's input errors, by kind)
            add_note(own, why)
            raise own from exc
        raise collectives._ERRORS[error[0]](f"{error[1]} ({why})") from exc


class _LeaderPool:
    """What the leader's optimize sees as the pool: materialize_many runs a generation on every rank."""

    def __init__(self, pool, crew: _Crew, contents: dict):
        self.num_checkpoints, self.device, self.crew = pool.num_checkpoints, pool.device, crew
        self.num_groups, self.labels, self.has_base = pool.num_groups, pool.labels, pool.has_base
        self.groups_used, self.names = pool.groups_used, pool.names  # (names: a groups=/names= function's rows)
        self.read_file = getattr(pool, "read_file", lambda path: None)  # (state_path: checked on the leader)
        # the real pool's facts for the state's fingerprint (_pool_contents), as a single process records them:
        # without whether it is compressed, a state saved on an int4 pool resumed on an exact one (mixed scores)
        self.pool_contents = contents
        self.evaluate_name = getattr(crew.evaluate, "evaluate_name", None)  # the user's, not this stand-in's
        from pymerge.search.optimize import _model_signature
        self.model_signature = _model_signature(crew.model)  # the model scored, not optimize's stand-in
        self._scores, self._done = {}, 0

    def resumed_from(self, n: int) -> None:
        """optimize's history holds n candidates already (a resumed state): the next one is candidate n."""
        self._done = n

    def materialize_many(self, weights, into, **kw):
        import torch.distributed as dist
        weights = [w.tolist() if hasattr(w, "tolist") else w for w in weights]
        dist.broadcast_object_list([("batch", weights, self._done)], src=0)
        scores = self.crew.run(weights, self._done)
        self._done += len(weights)
        self._scores = {id(m): s for m, s in zip(into, scores)}
        return into

    def evaluate(self, model):
        return self._scores.pop(id(model))
