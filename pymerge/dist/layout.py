"""Which part of each global tensor this rank holds, as torch's DTensor computes it.

A parameter of an FSDP2 (`fully_shard`) or tensor-parallel (`parallelize_module`) model is a
DTensor: a global shape, a DeviceMesh and one placement per mesh dimension. Its local tensor is a
box of the global tensor: `offset` and `shape` per dimension (torch.chunk sizes, so the last
shards may be smaller or empty). A plain tensor, or a DTensor replicated on every mesh
dimension, is the whole box on every rank. Only Shard(d) and Replicate placements are held;
Partial and strided shards have no box of their own and are refused.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from pymerge.errors import InputError


@dataclass(frozen=True)
class Box:
    """This rank's local slice of one global tensor, and the layout it comes from."""
    global_shape: Tuple[int, ...]
    offset: Tuple[int, ...]
    shape: Tuple[int, ...]
    signature: tuple        # the layout, identical on every rank: compared against targets
    sharded_dims: Tuple[int, ...] = ()   # mesh dimensions that split this tensor
    mesh: Optional[object] = None
    split_dims: Tuple[int, ...] = ()     # tensor dimensions split across ranks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_whole(self) -> bool:
        return self.shape == self.global_shape

    def contiguous_start(self) -> Optional[int]:
        """The global flat index of the first element when the box is one contiguous run, else None."""
        d = 0  # leading dimensions of length 1 (or an empty box) do not break contiguity
        while d < len(self.shape) and self.shape[d] == 1:
            d += 1
        if self.numel == 0 or all(self.shape[e] == self.global_shape[e] for e in range(d + 1, len(self.shape))):
            return flat_index(self.offset, self.global_shape)
        return None

    def global_indices(self, device=None) -> torch.Tensor:
        """int64 global flat indices of the box's elements, in the local tensor's (row-major) order."""
        idx = torch.zeros((), dtype=torch.int64, device=device)
        stride = 1
        for dim in reversed(range(len(self.shape))):
            r = torch.arange(self.offset[dim], self.offset[dim] + self.shape[dim], dtype=torch.int64, device=device)
            idx = idx + (r * stride).view(-1, *([1] * (len(self.shape) - 1 - dim)))
            stride *= self.global_shape[dim]
        return idx.reshape(-1)


def flat_index(offset, shape) -> int:
    idx = 0
    for o, s in zip(offset, shape):
        idx = idx * s + o
    return idx


def box_of(t: torch.Tensor, what: str) -> Box:
    """The box this rank holds of tensor t (a DTensor or a plain tensor)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    shape = tuple(t.shape)
    if not isinstance(t, DTensor) or all(isinstance(p, Replicate) for p in t.placements):
        return Box(shape, (0,) * len(shape), shape, ("replicated", shape))
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    mesh, placements = t.device_mesh, tuple(t.placements)
    sharded = []
    for i, p in enumerate(placements):
        if type(p) is Shard:
            sharded.append(i)
        elif not isinstance(p, Replicate):
            raise InputError(f"{what}: placement {p} is not held by a sharded pool (Shard(d) and Replicate are)")
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    signature = ("sharded", shape, mesh.device_type, tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape),
                 tuple(repr(p) for p in placements))
    split = tuple(sorted({placements[i].dim % len(shape) for i in sharded}))
    return Box(shape, tuple(offset), tuple(local_shape), signature, tuple(sharded), mesh, split)


def boxes_of(shard_like) -> Dict[str, Box]:
    """Name -> Box for a module's parameters and buffers (tied names included) or a state dict."""
    if isinstance(shard_like, torch.nn.Module):
        tensors = dict(shard_like.named_parameters(remove_duplicate=False))
        tensors.update(shard_like.named_buffers(remove_duplicate=False))
    elif isinstance(shard_like, dict):
        tensors = shard_like
    else:
        raise InputError(f"shard_like must be an nn.Module or a state dict, got {type(shard_like).__name__}")
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"shard_like: entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = box_of(t, f"shard_like tensor {name!r}")
    return out


def describe(box: Box) -> str:
    if box.signature[0] == "replicated":
        return "replicated"
    _, _, dev, ranks, mshape, placements = box.signature
    return f"({', '.join(placements)}) on a {dev} mesh of shape {list(mshape)} (ranks {list(ranks)})"


def reduce_group(boxes) -> Optional[object]:
    """The process group spanning the ranks that hold different shards (None: nothing is sharded).

    Every sharded tensor must split over the same mesh dimensions of one mesh, so one group
    serves every statistic and every agreement."""
    import torch.distributed as dist
    keys = {(b.signature[3], b.signature[4], b.sharded_dims) for b in boxes if b.sharded_dims}
    if not keys:
        return None
    if len(keys) > 1:
        raise InputError("shard_like: tensors are split over different meshes or mesh dimensions; a sharded pool "
                         "needs one (e.g. FSDP2 over one mesh, or tensor parallel over one mesh dimension)")
    box = next(b for b in boxes if b.sharded_dims)
    mesh, dims = box.mesh, box.sharded_dims
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    if mesh.mesh_dim_names is None:
        raise InputError("shard_like: tensors are split over several mesh dimensions of an unnamed mesh; "
                         "name them (init_device_mesh(..., mesh_dim_names=...)) so the pool can group them")
    return mesh[tuple(mesh.mesh_dim_names[d] for d in dims)]._flatten().get_group()
