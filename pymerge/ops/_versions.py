"""Autograd's view of writes made through raw pointers.

The C++/Triton/CUDA kernels write outputs by address, so autograd does not see them: a tensor
saved for backward and then overwritten would give gradients of the old values, silently. Bumping
the version counter of every tensor written makes backward raise torch's usual "modified by an
inplace operation" error instead, as a torch in-place op would.
"""
import itertools
from typing import Iterable, List

import torch

_set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


def _batched_increment():
    """torch._C._increment_version over a tuple (torch >= 2.5 takes one; older builds take one tensor)."""
    bump = getattr(torch._C, "_increment_version", None)
    try:
        bump((torch.empty(0),))
    except (TypeError, RuntimeError):
        return None
    return bump


_increment = _batched_increment()
_parametrize = getattr(torch.nn.utils, "parametrize", None)  # (its cache and flag are private: absent, skipped)
if _parametrize is not None and not isinstance(getattr(_parametrize, "_cache", None), dict):
    _parametrize = None


def mark_written(tensors: Iterable[torch.Tensor]) -> None:
    """Bumps the version counter of each tensor (views share their base's counter), and drops autocast's
    cached casts: inside one torch.autocast region a forward reuses the low-precision copies it made of
    parameters that require grad, so every candidate a search merged there scored as the first (torch's
    own in-place copy_ is not seen either; the cache is empty outside autocast: ~0.2 us). Likewise the tensors
    `torch.nn.utils.parametrize.cached()` computed from a parametrized model's originals (a weight_norm'd model's
    second candidate scored with the first's weights, inside one such block: an audit)."""
    torch.clear_autocast_cache()
    if _parametrize is not None and _parametrize._cache_enabled:  # (its cache: every block's, keyed by module)
        _parametrize._cache.clear()
    if _increment is not None:  # one call; inference tensors (no counter) are skipped inside
        _increment(tensors if isinstance(tensors, tuple) else tuple(tensors))
        return
    tracked = tuple(t for t in tensors if not t.is_inference())  # inference tensors have no counter
    if not tracked:
        return
    if _set_versions is not None:  # one call for all of them
        _set_versions(tracked, tuple(t._version + 1 for t in tracked))
        return
    with torch.no_grad():  # the documented way, one tiny op per tensor: an in-place op on an empty view
        for t in tracked:
            t.unsqueeze(0)[:0].zero_()


_unknown = itertools.count(-1, -1)  # below every real counter, and never the same twice


def versions_of(tensors: Iterable[torch.Tensor]) -> List[int]:
    """The version counters of `tensors`, for caches keyed by "these tensors as of now". An inference
    tensor has none (reading it raises inside inference mode and gives 0 outside): it gets a negative
    number never seen before, so nothing cached for it is ever reused (it may change unseen)."""
    return [next(_unknown) if t.is_inference() else t._version for t in tensors]
