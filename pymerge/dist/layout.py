"""Which part of each global tensor this rank holds, as torch's DTensor computes it.

A parameter of an FSDP2 (`fully_shard`) or tensor-parallel (`parallelize_module`) model is a
DTensor: a global shape, a DeviceMesh and one placement per mesh dimension. Its local tensor is a
box of the global tensor: `offset` and `shape` per dimension (torch.chunk sizes, so the last
shards may be smaller or empty). A plain tensor, or a DTensor replicated on every mesh
dimension, is the whole box on every rank. Shard(d), Replicate and the strided shards FSDP2 over
tensor parallelism makes (_StridedShard: sharded right to left, one box per rank) are held; a
Partial placement, or a strided shard that gives some rank scattered rows, has no box and is refused.

Tensors may live on different meshes sliced from one (FSDP2 x TP: a norm weight on the "dp" mesh,
the linears on ("dp", "tp")). The pool's group is the ranks that hold different pieces of one copy
of the model; a tensor with fewer pieces than that (split on "dp" only) has several copies in the
group, and only the copy of the group's first rank counts in statistics (`counts`).
"""
import functools
import itertools
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
    ranks: Tuple[int, ...] = ()          # the global ranks holding the pieces of this rank's copy

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

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


def whole_box(shape: Tuple[int, ...]) -> Box:
    """A tensor every rank holds whole."""
    return Box(shape, (0,) * len(shape), shape, ("replicated", shape))


class NotInMesh(InputError):
    """A DTensor on a mesh without this rank: an error on this rank only."""


# (shape, id(mesh), placements) -> Box. box_of is a function of these alone (and this rank, fixed per mesh), and
# a sharded pool checks every target tensor's layout on every call: DeviceMesh's layout arithmetic was 80 % of
# a candidate of 64 tensors (12.7 ms on the CPU, 17 ms on an H200). The Box holds its mesh, so an id is never
# reused while its entry lives (and a mesh outlives its process group until the cache is cleared: small).
_BOXES: Dict[tuple, Box] = {}


def box_of(t: torch.Tensor, what: str) -> Box:
    """The box this rank holds of tensor t (a DTensor or a plain tensor)."""
    from torch.distributed.tensor import DTensor, Replicate
    shape = tuple(t.shape)
    if not isinstance(t, DTensor):
        return whole_box(shape)
    if all(isinstance(p, Replicate) for p in t.placements):  # whole on every rank, its mesh kept: agreement_group
        return Box(shape, (0,) * len(shape), shape, ("replicated", shape), mesh=t.device_mesh)
    mesh, placements = t.device_mesh, tuple(t.placements)
    key = (shape, id(mesh), tuple((type(p), p) for p in placements))  # types: a strided shard == Shard in old torch
    box = _BOXES.get(key)
    if box is None or box.mesh is not mesh:
        box = _sharded_box(shape, mesh, placements, what)
        if len(_BOXES) >= 4096:
            _BOXES.clear()
        _BOXES[key] = box
    return box


def _sharded_box(shape, mesh, placements, what: str) -> Box:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard
    sharded = []
    for i, p in enumerate(placements):
        if type(p) in (Shard, _StridedShard):
            sharded.append(i)
        elif not isinstance(p, Replicate):
            raise InputError(f"{what}: placement {p!r} is not held by a sharded pool (Shard(d), Replicate and "
                             "FSDP2's strided shards are)")
    strided = any(type(p) is _StridedShard for p in placements)
    if strided and not _knows_strided_offsets():
        raise InputError(f"{what}: placements {placements} (FSDP2 over tensor parallel) need torch 2.10 or newer "
                         f"to be read as boxes; this is torch {torch.__version__}")
    if strided and not _boxes_everywhere(shape, tuple(mesh.mesh.shape), placements):
        raise InputError(f"{what}: placements {placements} give some rank rows that are not one contiguous range "
                         "of the tensor; a sharded pool holds one box per rank")
    coord = mesh.get_coordinate()
    if coord is None:
        raise NotInMesh(f"{what}: this rank is not in the tensor's mesh, so it holds no part of it")
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    signature = ("sharded", shape, mesh.device_type, tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape),
                 tuple(repr(p) for p in placements))
    # a mesh dimension of size 1 splits nothing (tp = 1 in a 2-D script): DELLA's rows stay whole there
    split = tuple(sorted({placements[i].dim % len(shape) for i in sharded if mesh.mesh.shape[i] > 1}))
    copy = mesh.mesh[tuple(slice(None) if d in sharded else coord[d] for d in range(mesh.ndim))]
    return Box(shape, tuple(offset), tuple(local_shape), signature, tuple(sharded), mesh, split,
               tuple(sorted(copy.flatten().tolist())))


def _knows_strided_offsets() -> bool:
    """Whether torch has the function _boxes_everywhere asks (torch 2.10 on; an audit of older releases)."""
    try:
        from torch.distributed.tensor._utils import _get_shard_size_and_offsets  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _boxes_everywhere(shape, mesh_shape, placements) -> bool:
    """Whether every mesh coordinate holds one box: its global indices along each dimension, as
    torch computes them (shard by shard, strided ones right to left), are one contiguous range."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets
    from torch.distributed.tensor.placement_types import _StridedShard
    for coord in itertools.product(*map(range, mesh_shape)):
        size, index = list(shape), {}
        for mesh_dim, p in enumerate(placements):
            if type(p) in (Shard, _StridedShard):
                d = p.dim % len(shape)
                size[d], index[d] = _get_shard_size_and_offsets(size[d], mesh_shape[mesh_dim], coord[mesh_dim], p,
                                                                index.get(d), shape[d], False)
        for d, idx in index.items():
            if size[d] and not torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + size[d])):
                return False
    return True


def boxes_of(shard_like, absent: Optional[list] = None) -> Dict[str, Box]:
    """Name -> Box for a module's parameters and buffers (tied names included) or a state dict.
    With `absent` (a list), a tensor on a mesh without this rank gets a box of nothing, on its mesh, and
    its error goes to `absent`: the caller agrees on it with the ranks in that mesh, which raising here
    alone left waiting in their next collective."""
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
        try:
            out[name] = box_of(t, f"shard_like tensor {name!r}")
        except NotInMesh as exc:
            if absent is None:
                raise
            absent.append(exc)
            out[name] = Box(tuple(t.shape), (0,) * t.dim(), (0,) * t.dim(), ("absent",), mesh=t.device_mesh)
    return out


def describe(box: Box) -> str:
    if box.signature[0] == "replicated":
        return "replicated"
    _, _, dev, ranks, mshape, placements = box.signature
    names = box.mesh.mesh_dim_names  # the same on every rank, where a sliced mesh's ranks are not
    where = f"dimensions {list(names)}" if names else f"ranks {list(ranks)}"
    return f"({', '.join(placements)}) on a {dev} mesh of shape {list(mshape)} ({where})"


def layout_key(box: Box) -> Optional[str]:
    """A tensor's layout as every rank of its mesh describes it alike (not by the mesh's own ranks, which differ
    between the sub-meshes of FSDP x TP), or None where this rank holds none of it (a mesh without it)."""
    if box.signature[0] == "absent":
        return None
    if box.signature[0] == "replicated":
        return f"whole {list(box.global_shape)}"
    _, shape, dev, _, mshape, placements = box.signature
    names = box.mesh.mesh_dim_names
    return (f"{list(shape)} as ({', '.join(placements)}) on a {dev} mesh of shape {list(mshape)}"
            + (f" {list(names)}" if names else ""))


def reduce_group(boxes) -> Optional[object]:
    """The process group of the ranks that hold different pieces of one copy of the model (None:
    nothing is sharded): one tensor's copy must span all the others' (e.g. FSDP2 x TP: the linears
    split over ("dp", "tp") span the norms split over "dp"), so one group serves every statistic
    and every agreement."""
    import torch.distributed as dist
    sharded = [b for b in boxes if b.sharded_dims]
    if not sharded:
        return None
    everyone = set().union(*(b.ranks for b in sharded))
    box = next((b for b in sharded if set(b.ranks) == everyone), None)
    if box is None:
        raise InputError("shard_like: no tensor is split across all the ranks the others are split across (e.g. "
                         "some over one mesh dimension only, others over another only); a sharded pool needs one "
                         "group of ranks holding one copy of the model")
    mesh, dims = box.mesh, box.sharded_dims
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    if mesh.mesh_dim_names is None:
        raise InputError("shard_like: tensors are split over several mesh dimensions of an unnamed mesh; "
                         "name them (init_device_mesh(..., mesh_dim_names=...)) so the pool can group them")
    return mesh[tuple(mesh.mesh_dim_names[d] for d in dims)]._flatten().get_group()


def counts(box: Box, group) -> bool:
    """Whether this rank's piece counts in the tensor's global statistics over group: its copy is
    the one of the group's first rank (other copies would count the same elements again)."""
    import torch.distributed as dist
    return not box.ranks or min(dist.get_process_group_ranks(group)) in box.ranks


def agreement_group(boxes, group) -> Optional[object]:
    """The ranks that build a pool together and agree on its errors: every rank of the mesh the model
    lives on (replica groups too: a rank that cannot read its checkpoint fails every replica, so no
    replica waits for it in a later collective), else the pool's group. A model all Replicate() has no pool
    group, yet its ranks hold copies that must agree: they compared nothing, and replicas given other weights
    or checkpoints held different values, silently (an audit)."""
    import torch.distributed as dist
    roots = {id(root): root for root in (b.mesh._get_root_mesh() for b in boxes if b.mesh is not None)}
    if len(roots) == 1 and next(iter(roots.values())).size() == dist.get_world_size():
        return dist.group.WORLD
    return group
