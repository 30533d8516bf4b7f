"""Scale-out on torch.distributed: sharded pools that merge straight into FSDP2 and tensor-parallel
models, distributed search, and `torchrun -m pymerge merge`.

layout.py       which box of each global tensor a rank holds (DTensor placements, torch's own arithmetic;
                1-D and 2-D meshes: FSDP2, TP, FSDP2 x TP's strided shards, HSDP), and the pool's group
reads.py        reads exactly those boxes from the checkpoints' bytes
collectives.py  errors all ranks agree on; exact global sums and magnitude rank boundaries
sample.py       a digest of a few bytes of each checkpoint, which ranks compare
pool.py         ShardedPool, what CheckpointPool(..., shard_like=model) builds
methods.py      TIES/DARE/breadcrumbs/DELLA/SLERP/NuSLERP/Model Stock with global statistics on local shards
search.py       pymerge.search.optimize across ranks and replica groups
disk_merge.py   `pymerge merge` under torchrun (or RANK/WORLD_SIZE): tensors split by bytes, rank 0 installs
"""
