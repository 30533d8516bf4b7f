"""Merge weights for the pool: one row of N floats, or a [G, N] table plus a grouping rule.

Everything here runs on the host before anything is written, so a bad weight never reaches a model.
"""
import decimal
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from pymerge.config import layer_of  # one layer rule for configs and pool alike
from pymerge.errors import InputError, short
from pymerge.methods.base import MAX_MAGNITUDE
from pymerge.ops._checks import check_layout, check_values_readable
from pymerge.sizes import parse_size

GroupRule = Union[None, str, Callable[[str], int], Dict[str, int]]


def layer_index(name: str) -> Optional[int]:
    """The block index in a tensor name ("model.layers.3.mlp" -> 3), or None outside the blocks
    (embeddings, norms, heads): the merge configs' rule, pymerge.config.layer_of."""
    found = layer_of(name)
    return None if found is None else found[1]


def group_indices(names: Sequence[str], rule: GroupRule) -> List[int]:
    """Group index per tensor name. "layer" (the default): block i -> group i + 1, the rest -> group 0."""
    if rule is None or rule == "layer":
        out = []
        for n in names:
            i = layer_index(n)
            out.append(0 if i is None else i + 1)
        return out
    if isinstance(rule, dict):
        missing = [n for n in names if n not in rule]
        if missing:
            raise InputError(f"groups: no group given for tensor {missing[0]!r} ({len(missing)} tensor(s) without one)")
        out = [rule[n] for n in names]
    elif callable(rule):
        out = [rule(n) for n in names]
    else:
        raise InputError(f"groups must be 'layer', a dict name -> group or a function, got {short(rule)}")
    for n, g in zip(names, out):
        if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g < 0:
            raise InputError(f"groups: tensor {n!r} got group {short(g)}; groups are integers >= 0")
    return [int(g) for g in out]


def check_readable_values(t: torch.Tensor, what: str) -> None:
    """A tensor whose values are read here (weights, a search's x0): dense, with data, as an InputError (a storage
    freed with resize_(0): torch's own conversion segfaulted; sparse: a raw TypeError)."""
    try:
        check_layout(t, what)
        check_values_readable(t, what)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _has_bool(x, depth: int = 0) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return True
    if depth > 2:  # deeper than a [G, N] table (a list holding itself recursed without end): numpy refuses it
        return False
    return isinstance(x, (list, tuple)) and any(_has_bool(v, depth + 1) for v in x)


_PLAIN = frozenset((float, int))  # exactly these types: bool (an int subclass) and numpy scalars take the full path
_within = MAX_MAGNITUDE.__ge__  # on abs(v): False for NaN and inf, and exact for ints past float's range


def _detached(values):
    """Lists (of lists) with tensors that require grad detached (their values are what counts here)."""
    if isinstance(values, (list, tuple)):
        return [_detached(v) for v in values]
    if not isinstance(values, torch.Tensor):
        return values
    t = values.detach().cpu()
    return t.double() if t.is_floating_point() else t  # (numpy reads no bfloat16 or float8 0-d tensor: an audit)


def weight_table(weights, n: int, normalize: bool = False, what: str = "weights") -> np.ndarray:
    """Weights as a float64 [G, N] table (G = 1 for a flat list), finite, optionally rows summing to one."""
    if (type(weights) is list or type(weights) is tuple) and len(weights) == n and set(map(type, weights)) <= _PLAIN \
            and all(map(_within, map(abs, weights))):
        # A search's every call: n plain numbers, finite and in range, so nothing below can refuse them (~1 us
        # instead of ~7: the bool walk, the object-dtype parse and the finiteness checks are for other inputs)
        table = np.array((weights,), dtype=np.float64)
        return _normalized(table, what) if normalize else table
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool or weights.is_complex():
            raise InputError(f"{what} must be real numbers, got a {weights.dtype} tensor")
        if weights.is_meta:
            raise InputError(f"{what} are a tensor on the meta device, which holds no values")
        check_readable_values(weights, what)
        if weights.dim() not in (1, 2) or weights.shape[-1] != n:  # before the copy (an expand()ed 10**8 weights)
            raise InputError(f"{what} must be {n} numbers or a [G, {n}] table, got a tensor of shape "
                             f"{list(weights.shape)}")
        weights = weights.detach().cpu().double().numpy()
    if _has_bool(weights):  # numpy would read [True, 0.5] as [1.0, 0.5]
        raise InputError(f"{what} must be numbers, got {short(weights)}")
    if isinstance(weights, (list, tuple)):  # list(alpha) of a learnable tensor: numpy refused its 0-d elements
        weights = _detached(weights)
    try:
        table = np.asarray(weights)
        if table.dtype.kind == "O" and table.ndim and all(  # Fraction, Decimal, ints past 2**64: numbers,
                isinstance(v, (numbers.Real, decimal.Decimal)) and not isinstance(v, bool)  # not strings or dicts
                for v in table.reshape(-1)):
            table = table.astype(np.float64)
        if table.dtype.kind not in "iuf":  # strings were parsed ("0.25"), booleans and objects (a dict) taken
            raise TypeError
        table = table.astype(np.float64)
    except OverflowError:  # an int past float's range (10**400)
        raise InputError(f"{what} hold {short(weights)}; weights beyond {MAX_MAGNITUDE:g} make a non-finite "
                         "or meaningless model") from None
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers, got {short(weights)}") from None
    rows = table.ndim == 2
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2:
        raise InputError(f"{what} must be N numbers or a [G, N] table, got shape {table.shape}")
    if table.shape[1] != n and rows:  # ([[0.5], [0.5]] or one-element tensors: a table, read by rows)
        rows_of = f"{table.shape[0]} row{'s' if table.shape[0] != 1 else ''}"
        raise InputError(f"{what} are a table of {rows_of} (one per weight group) of {table.shape[1]}, "
                         f"for {n} checkpoints" + (f"; one weight per checkpoint is {n} numbers, not one-element "
                                                   "lists or tensors" if table.shape == (n, 1) else ""))
    if table.shape[1] != n:
        raise InputError(f"got {table.shape[1]} {what} for {n} checkpoints")
    if not np.isfinite(table).all():
        bad = np.argwhere(~np.isfinite(table))
        g, i = bad[0]
        where = f"[{i}]" if table.shape[0] == 1 else f"[{g}][{i}]"
        raise InputError(f"{what}{where} is {table[g, i]}; weights must be finite")
    if normalize:
        return _normalized(table, what)
    _check_magnitude(table, what, "")
    return table


def _normalized(table: np.ndarray, what: str) -> np.ndarray:
    """table's rows scaled to sum to one (finite rows only), checked again for magnitude."""
    sums = table.sum(axis=1, keepdims=True)
    tiny = np.flatnonzero(np.abs(sums[:, 0]) < 1e-12)
    if len(tiny):
        raise InputError(f"{what}: row {tiny[0]} sums to {sums[tiny[0], 0]:g}; cannot normalize it to one")
    table = table / sums
    _check_magnitude(table, what, " after normalizing")
    return table


def _check_magnitude(table: np.ndarray, what: str, after: str) -> None:
    if np.abs(table).max(initial=0.0) > MAX_MAGNITUDE:  # float32 kernels would turn it into inf or noise: a typo
        g, i = np.argwhere(np.abs(table) > MAX_MAGNITUDE)[0]
        where = f"[{i}]" if table.shape[0] == 1 else f"[{g}][{i}]"
        raise InputError(f"{what}{where} is {float(table[g, i])!r}{after}; "
                         f"weights beyond {MAX_MAGNITUDE:g} make a non-finite or meaningless model")


def check_groups(groups: List[int], names: Sequence[str], n_rows: int, what: str = "weights") -> None:
    """Every tensor's group must have a row, and every row a group (a longer table was made for another
    model or grouping); a flat list (one row) serves every group."""
    if n_rows == 1:
        return
    for name, g in zip(names, groups):
        if g >= n_rows:
            raise InputError(f"tensor {name!r} is in group {g} but the {what} table has {n_rows} rows")
    used = max(groups, default=-1) + 1
    if n_rows > used:
        raise InputError(f"the {what} table has {n_rows} rows but the pool's tensors fall in {used} groups "
                         "(pool.num_groups(groups) says how many)")


def parse_bytes(budget) -> Optional[int]:
    """memory_budget as bytes (None: no cap): an int, a float, or a string such as '12GB', '512MiB',
    '2e9', read as every size in pymerge is (pymerge/sizes.py)."""
    return None if budget is None else parse_size(budget, "memory_budget", minimum=0)
