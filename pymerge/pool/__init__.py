"""CheckpointPool: checkpoints held once, merged many times straight into live models.

pool.py holds the class; sources.py opens what a pool is built from (folders, files, state
dicts, modules); weights.py turns user weights into [G, N] tables; cuda.py streams pinned tiers.
"""
from pymerge.pool.pool import CheckpointPool

__all__ = ["CheckpointPool"]
