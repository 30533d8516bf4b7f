"""Checkpoint I/O: strict zero-copy safetensors reading, HF folder/shard handling, atomic sharded writing.

Importing it does not import torch (SAFETENSORS_DTYPES and TORCH_TO_SAFETENSORS, keyed by torch
dtypes, are built on first use).
"""
from pymerge.io.checkpoint import Checkpoint, TorchFile, check_compatible, open_tensor_file
from pymerge.io.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile, TensorInfo
from pymerge.io.writer import ShardedWriter

__all__ = [
    "Checkpoint", "TorchFile", "check_compatible", "open_tensor_file",
    "SafetensorsFile", "TensorInfo", "SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS", "MAX_HEADER_BYTES",
    "ShardedWriter",
]


def __getattr__(name):
    if name in ("SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS"):
        from pymerge.io import safetensors_file
        return getattr(safetensors_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
