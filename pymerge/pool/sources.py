"""Opens the pool's sources (HF folders, .safetensors files, in-memory state dicts) behind one interface.

Each source answers names(), info(name) -> (dtype, shape), tensor(name) -> CPU tensor (zero-copy
where the backing allows), mapped (True when tensors are memory-map views) and close().
Folders and files go through pymerge.io.Checkpoint; until that lands, through safetensors.safe_open.
"""
import glob
import json
import os
from typing import Dict, List, Tuple

import torch

from pymerge.errors import CheckpointError, InputError


class DictSource:
    """A state dict the caller already holds (tensors or nn.Parameters, any device)."""
    mapped = False

    def __init__(self, state: Dict[str, torch.Tensor], label: str):
        self.label = label
        self._state = {}
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise InputError(f"{label}: entry {k!r} is a {type(v).__name__}, not a tensor")
            if v.device.type == "meta":  # a model built on the meta device has shapes but no weights
                raise InputError(f"{label}: tensor {k!r} is on the meta device and holds no data; load "
                                 f"the weights first")
            self._state[k] = v.detach()

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

    def close(self):
        self._ckpt.close()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class _SafeOpenSource:
    """Stand-in until pymerge.io.Checkpoint lands: safe_open per shard (reads copy into RAM)."""
    mapped = False

    def __init__(self, files: List[str], label: str):
        from safetensors import safe_open
        self.label = label
        self._handles, self._where = [], {}
        for f in files:
            try:
                h = safe_open(f, framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot read as safetensors ({exc})") from None
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise CheckpointError(f"{label}: tensor {k!r} appears in two shards")
                self._where[k] = h

    def names(self):
        return list(self._where)

    def info(self, name):
        s = self._where[name].get_slice(name)
        code = s.get_dtype()
        return _ST_DTYPES.get(code, code), tuple(s.get_shape())

    def tensor(self, name):
        return self._where[name].get_tensor(name)

    def close(self):
        self._handles, self._where = [], {}


def _shards(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files in this folder")
    return files


def open_source(src, label: str):
    """One pool source: a state dict (or nn.Module), or a path to an HF folder / .safetensors file."""
    if isinstance(src, torch.nn.Module):
        return DictSource(src.state_dict(), label)
    if isinstance(src, dict):
        return DictSource(src, label)
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"{label}: expected a path, a state dict or a module, got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    try:
        from pymerge.io import Checkpoint  # the validated reader, once it lands
    except ImportError:
        return _SafeOpenSource(_shards(path), path)
    return _CheckpointSource(Checkpoint(path), path)
