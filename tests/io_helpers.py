"""Tensor helpers shared by the I/O tests."""
import numpy as np
import torch


def bits(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes: compares NaNs, -0.0 and float8 bit-exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype, shape, seed=0):
    """Random bytes of any dtype (every bit pattern, NaNs included); bool as 0/1."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)
