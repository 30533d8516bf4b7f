"""Reads this rank's box of each tensor straight from the checkpoint's bytes.

A box of a row-major tensor is a strided pattern of byte runs: Shard(0) is one contiguous run,
Shard(1) one run per row. The runs are copied out of the strict safetensors reader's zero-copy
memory map (SafetensorsFile.byte_view), so only their pages are ever touched and no rank
materializes a whole tensor. State dicts and modules (already in the caller's memory) are sliced.

`touched`, when set to a list, records (source label, tensor name, [(first byte, end byte), ...])
per read, byte offsets relative to the tensor's first byte: tests check it against the layout.
"""
from typing import List, Optional, Tuple

import torch

from pymerge.dist.layout import Box, describe, whole_box
from pymerge.errors import CheckpointError

touched: Optional[list] = None


def byte_runs(box: Box, itemsize: int) -> List[Tuple[int, int]]:
    """The box's byte runs (start, end), relative to the tensor's first byte, coalesced, in order."""
    if box.numel == 0:
        return []
    runs = []
    inner = 1
    for dim in reversed(range(len(box.shape))):  # find the innermost dimension the box does not span
        if box.shape[dim] != box.global_shape[dim]:
            break
        inner *= box.global_shape[dim]
    else:
        return [(0, box.numel * itemsize)]
    run = box.shape[dim] * inner * itemsize
    outer = Box(box.global_shape[:dim], box.offset[:dim], box.shape[:dim], ())
    lead = outer.global_indices().tolist() if dim else [0]
    for i in lead:
        start = (i * box.global_shape[dim] + box.offset[dim]) * inner * itemsize
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + run)
        else:
            runs.append((start, start + run))
    return runs


def read_box(raw: torch.Tensor, dtype: torch.dtype, box: Box) -> torch.Tensor:
    """Copies the box out of a tensor's flat bytes `raw` (uint8) into a new contiguous tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty(box.shape, dtype=dtype)
    if box.numel == 0:
        return out
    strides, s = [], itemsize
    for n in reversed(box.global_shape):
        strides.insert(0, s)
        s *= n
    start = sum(o * st for o, st in zip(box.offset, strides))
    region = raw.as_strided(tuple(box.shape) + (itemsize,), tuple(strides) + (1,), start)
    out.reshape(-1).view(torch.uint8).view(tuple(box.shape) + (itemsize,)).copy_(region)  # 0-d too
    return out


class ShardedSource:
    """A pool source seen through the layout: info() gives local shapes, tensor() this rank's box."""

    def __init__(self, inner, boxes):
        self._inner, self._boxes = inner, boxes
        self.label, self.mapped = inner.label, inner.mapped

    def names(self):
        return self._inner.names()

    def _box(self, name):
        dtype, shape = self._inner.info(name)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            return dtype, shape, None  # not merged (the pool skips it): no layout needed
        box = self._boxes.get(name)
        if box is None:  # no counterpart in shard_like: held whole (a target holding it then says so)
            box = self._boxes[name] = whole_box(tuple(shape))
        if box.global_shape != tuple(shape):
            raise CheckpointError(f"{self.label}: tensor {name!r} has shape {list(shape)}, shard_like's "
                                  f"{describe(box)} tensor has {list(box.global_shape)}")
        return dtype, shape, box

    def info(self, name):
        dtype, shape, box = self._box(name)
        return dtype, (tuple(shape) if box is None else box.shape)

    def tensor(self, name):
        dtype, _, box = self._box(name)
        raw = self._bytes(name)
        if raw is None:  # an in-memory tensor: slice it
            t = self._inner.tensor(name)
            for dim, (o, n) in enumerate(zip(box.offset, box.shape)):
                t = t.narrow(dim, o, n)
            return t.contiguous()
        if touched is not None:
            touched.append((self.label, name, byte_runs(box, torch.empty((), dtype=dtype).element_size())))
        try:
            return read_box(raw, dtype, box)
        except (OSError, RuntimeError) as exc:  # an unreadable page of the mapping, a short file
            raise CheckpointError(f"{self.label}: tensor {name!r}: cannot read this rank's bytes ({exc})") from None

    def _bytes(self, name):
        return self._inner.byte_view(name) if hasattr(self._inner, "byte_view") else None

    @property
    def shards(self):  # mapped sources only (the pool's SIGBUS guard)
        return self._inner.shards

    def close(self):
        self._inner.close()
