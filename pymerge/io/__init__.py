"""Checkpoint I/O: strict zero-copy safetensors reading, HF folder/shard handling, atomic sharded writing."""
from pymerge.io.checkpoint import Checkpoint, TorchFile, check_compatible, open_tensor_file
from pymerge.io.safetensors_file import (MAX_HEADER_BYTES, SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS,
                                         SafetensorsFile, TensorInfo)
from pymerge.io.writer import ShardedWriter

__all__ = [
    "Checkpoint", "TorchFile", "check_compatible", "open_tensor_file",
    "SafetensorsFile", "TensorInfo", "SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS", "MAX_HEADER_BYTES",
    "ShardedWriter",
]
