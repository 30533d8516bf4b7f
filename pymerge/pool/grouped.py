"""The pool's linear hot path: one native call (CPU) or one launch (GPU) per materialize[_many].

A model of many small tensors merged one kernel call per tensor pays a call, a thread wake-up
(or a launch) and a short loop per tensor. Instead, the validated write plans of a set of targets
are kept with a task table that runs the whole candidate at once: on the CPU pymerge._cpu.GroupedPlan
(split across the thread pool by bytes), on the GPU kernels/weighted_sum_grouped.py (one Triton
launch over a tensor table, for pools resident on the device).

A cached entry is reused while its targets are provably the ones it was built for:
- the same target objects (the entry holds them, so their ids cannot be reused),
- no parameter, buffer or submodule registered on any module since (a global registration hook
  counts them: `module.w = nn.Parameter(...)`, weight tying),
- every target tensor still at the same address (`param.data = ...`, `module.half()` and
  `module.to()` swap storage without registering anything, and a new storage has a new address
  while the entry holds the old one alive),
- for state-dict targets, the same tensor objects under the same keys.
Anything else rebuilds the entry (the pool's full checks run again).
"""
from collections import OrderedDict
from typing import Callable, List, Sequence

import numpy as np
import torch

from pymerge import _native
from pymerge.pool.weights import group_indices

_registrations = 0  # parameters, buffers and submodules registered on any module so far


def _count(*_args):
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count)
torch.nn.modules.module.register_module_buffer_registration_hook(_count)
torch.nn.modules.module.register_module_module_registration_hook(_count)


_data_ptr = torch.Tensor.data_ptr


class _Entry:
    """One set of targets' validated plans, their task table, and what a call needs besides the kernel."""
    __slots__ = ("into", "generation", "held", "ptrs", "keyed", "plans", "native", "written", "fixups")

    def __init__(self, into, watched, plans, native):
        self.into = into                    # the targets themselves (keeps their ids unique)
        self.generation = _registrations
        self.held = tuple(t for t, _, _ in watched)  # the tensors the targets hold (not detached copies)
        self.ptrs = list(map(_data_ptr, self.held))
        self.keyed = [(t, d, key) for t, d, key in watched if d is not None]
        self.plans = plans
        self.native = native
        self.written = tuple(t for p in plans for t in p.targets)  # version counters to bump per call
        self.fixups = [f for p in plans for f in p.fixups]

    def valid(self) -> bool:
        # Storage swaps (param.data = ..., module.half(), .to()) always move data_ptr.
        return (self.generation == _registrations and all(d.get(key) is t for t, d, key in self.keyed)
                and list(map(_data_ptr, self.held)) == self.ptrs)


class PlanCache:
    """Validated write plans (and their native task tables) per set of targets; a few entries, LRU."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._groups: dict = {}

    def entry(self, key: tuple, into: list, build: Callable[[], list], targets_of: Callable[[list], list],
              make_table: Callable[[list], object]) -> _Entry:
        """The valid entry for `into` (and key), built when there is none: build() makes the plans,
        targets_of(plans) lists for every plan and target model (tensor as held, dict or None, key),
        make_table(plans) the table that runs them all in one call (None: not possible)."""
        key = (tuple(map(id, into)),) + key
        entry = self._entries.get(key)
        if entry is not None and entry.valid():
            self._entries.move_to_end(key)
            return entry
        plans = build()
        entry = _Entry(list(into), targets_of(plans), plans, make_table(plans))
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._groups.clear()

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


def triton_table(plans, inputs: dict, n_groups: int):
    """A grouped Triton launch for the plans (pool tensors resident on the device), or None where
    it does not apply (no plans, outputs of several dtypes)."""
    if not plans or len({o.dtype for p in plans for o in p.outs}) != 1:
        return None
    from pymerge.kernels.weighted_sum_grouped import GroupedTable
    return GroupedTable([inputs[p.name] for p in plans], [p.outs for p in plans], [p.group for p in plans], n_groups)


def native_table(plans, inputs: dict, n_groups: int):
    """A GroupedPlan for the plans, or None where the C++ path does not apply (no plans, no build,
    a dtype the kernels do not read)."""
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
                           out_codes, [p.group for p in plans], n_groups)


def weight_array(tables: Sequence[np.ndarray], n_groups: int, n: int) -> np.ndarray:
    """float32 [G, K, N]: candidate k's weights per group (a one-row table serves every group)."""
    w = np.empty((n_groups, len(tables), n), dtype=np.float32)
    for k, t in enumerate(tables):
        w[:, k, :] = t[0] if t.shape[0] == 1 else t[:n_groups]
    return w


def method_coefficients(method, per_model: list, global_params: dict, tables: Sequence[np.ndarray], n_groups: int,
                        name_of: Callable[[int], str], seed: int):
    """(sources, float32 [G, K, S] coefficients) of a WeightedSum method (task_arithmetic) for every weight
    group and candidate: source i < N is checkpoint i, source N the base, in the method's order (the same
    for every group and candidate: the order depends on the method alone). Parameters are checked here
    exactly as the per-tensor path checks them, once per group and candidate instead of per tensor."""
    from pymerge.methods.base import TensorTask
    order, rows = None, []
    for g in range(n_groups):
        for table in tables:
            w = table[g if table.shape[0] > 1 else 0]
            mp = [dict(per_model[i], weight=float(w[i])) for i in range(len(per_model))]
            task = TensorTask(inputs=[], base=None, model_params=mp, params=dict(global_params), name=name_of(g),
                              seed=seed)
            method.check_params(task)
            src, coef = method.weights_for(task)
            if order is None:
                order = list(src)
            elif list(src) != order:  # not the case of any registered method; refused, not guessed
                raise ValueError(f"method {method.name}: sources differ between weight groups")
            rows.append(coef)
    return order, np.asarray(rows, dtype=np.float32).reshape(n_groups, len(tables), len(order))
