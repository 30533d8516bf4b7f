"""Opens the pool's sources (HF folders, .safetensors files, in-memory state dicts) behind one interface.

Each source answers names(), info(name) -> (dtype, shape), tensor(name) -> CPU tensor (zero-copy
where the backing allows), mapped (True when tensors are memory-map views) and close().
Folders and files go through pymerge.io.Checkpoint (validated headers, zero-copy memory maps).
"""
import os
from typing import Dict, List, Tuple

import torch

from pymerge.errors import CheckpointError, InputError
from pymerge.io import Checkpoint
from pymerge.io.checkpoint import lora_hint, refuse_quantized
from pymerge.ops._memory import address_problem, check_backed, kind_problem


def check_range(held: torch.Tensor, t: torch.Tensor, label: str, name: str) -> None:
    """A pool held in a narrower dtype (dtype=float16) than its file's refuses values past that dtype's range:
    they became inf, and every merge of them inf or NaN, silently (a compressed pool held them so too, and took a
    frozen tensor's infs for an unchanged one; audits)."""
    if (held.dtype == t.dtype or not held.dtype.is_floating_point or not t.dtype.is_floating_point
            or torch.finfo(held.dtype).max >= torch.finfo(t.dtype).max):
        return
    if bool(torch.isinf(held).any()) and int(torch.isinf(held).sum()) > int(torch.isinf(t).sum()):  # (the file's
        # own infs, rare, are counted only where the held copy has any: a second read of the source)
        big = float(t.detach().abs().nan_to_num(nan=0.0).max())  # (infs counted alike: a finite one is largest)
        where = (f"past {str(held.dtype).replace('torch.', '')}'s range (largest finite "
                 f"{torch.finfo(held.dtype).max:.6g}), ")
        if held.dtype == torch.float32:  # no dtype= would help: the kernels read float64 checkpoints as float32
            raise CheckpointError(f"{label}: tensor {name!r} holds values up to {big:.4g}, {where}in which the "
                                  "kernels hold a float64 checkpoint; no pool dtype holds them")
        raise CheckpointError(f"{label}: tensor {name!r} holds values up to {big:.4g}, {where}where the pool's "
                              "dtype= would make them inf; choose a wider dtype (bfloat16, float32) or none")


def _is_dtensor(t: torch.Tensor) -> bool:
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


class DictSource:
    """A state dict the caller already holds (tensors or nn.Parameters, any device)."""
    mapped = False

    def __init__(self, state: Dict[str, torch.Tensor], label: str):
        self.label = label
        self._state = {}
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise InputError(f"{label}: entry {k!r} is a {type(v).__name__}, not a tensor")
            if _is_dtensor(v):  # its local shard is not the tensor: refused here, not deep in a copy
                raise InputError(f"{label}: tensor {k!r} is a DTensor (a sharded model's); a pool's sources are "
                                 "whole tensors: pass checkpoint files or a full state dict (torch.distributed's "
                                 "get_model_state_dict with full_state_dict=True)")
            if (problem := kind_problem(v)) is not None:  # sparse, nested, quantized, meta
                raise InputError(f"{label}: tensor {k!r} {problem}")
            check_backed(v, f"{label}: tensor {k!r}", InputError)  # a freed storage (FSDP's resize_(0))
            if (problem := address_problem(v)) is not None:  # a FakeTensor, a wrapper: read at address 0 in place
                raise InputError(f"{label}: tensor {k!r}: {problem}")
            self._state[k] = v.detach().resolve_neg()  # a lazily negated view: its values, not its memory
        refuse_quantized(label, list(self._state), lambda n: self._state[n].dtype)  # as a Checkpoint on opening

    def names(self) -> List[str]:
        return list(self._state)

    def info(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        t = self._state[name]
        return t.dtype, tuple(t.shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        self._state = {}


class _CheckpointSource:
    """pymerge.io.Checkpoint (validated header, zero-copy mmap views)."""
    mapped = True

    def __init__(self, ckpt, label: str):
        self._ckpt, self.label = ckpt, label

    def names(self):
        return list(self._ckpt.names())

    def info(self, name):
        i = self._ckpt.info(name)
        return i.dtype, tuple(i.shape)

    def tensor(self, name):
        return self._ckpt.tensor(name)

    def byte_view(self, name):
        return self._ckpt.byte_view(name)

    @property
    def shards(self):  # the mapped files, for the pool's SIGBUS guard (pymerge/io/sigbus.py)
        return self._ckpt.shards

    def close(self):
        self._ckpt.close()


def open_source(src, label: str):
    """One pool source: a state dict (or nn.Module), or a path to an HF folder / .safetensors file."""
    if isinstance(src, torch.nn.Module):  # less a module's get_extra_state() objects, which are no weights (a module
        # holding one, as TransformerEngine's do, was refused outright: an audit)
        return DictSource({k: v for k, v in src.state_dict().items() if isinstance(v, torch.Tensor)
                           or k.rpartition(".")[2] != "_extra_state"}, label)
    if isinstance(src, dict):
        return DictSource(src, label)
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"{label}: expected a path, a state dict or a module, got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder{lora_hint(path)}")
    return _CheckpointSource(Checkpoint(path), path)
