"""Counter-based random bits for DARE/DELLA masks: Philox4x32-10, keyed by (seed, tensor, model, element).

Masks are never stored: every backend recomputes the bits of element j from its coordinates, so
the same seed gives bit-identical masks on the CPU (C++), in Triton (its own ``philox`` with the
same key/counter layout) and in CUDA, whatever the chunking or thread count.

Layout (the one contract all backends follow):
  key     (k0, k1)         = (low 32 bits of seed, high 32 bits of seed)   [Triton's convention]
  counter (c0, c1, c2, c3) = (j // 4, model index, h0, h1)   with (h0, h1) = FNV-1a-64(tensor name)
  bits of element j        = output word (j % 4) of Philox4x32-10(counter, key)
An element is kept with probability p iff bits < keep_threshold(p) = floor(p * 2**32), an integer
computed once on the host, so no backend's float rounding can change a mask.

This module is the vectorized torch form (int64 arithmetic, any device); it is the reference the
C++ (csrc/cpu/philox.h), Triton (kernels/task_vectors.py) and CUDA versions are tested against.
"""
import math
from typing import Tuple

import torch

KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
M32 = 0xFFFFFFFF
MAX_ELEMENTS = 1 << 34  # j // 4 must fit the 32-bit counter word


def name_hash(name: str) -> Tuple[int, int]:
    """FNV-1a 64 of the UTF-8 name, split into (low, high) 32-bit words."""
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & M32, h >> 32


def seed_key(seed: int) -> Tuple[int, int]:
    s = int(seed) & 0xFFFFFFFFFFFFFFFF  # negative seeds wrap like a uint64
    return s & M32, s >> 32


def keep_threshold(p: float) -> int:
    """Integer threshold on 32-bit draws: P(bits < t) = t / 2**32, t = floor(p * 2**32) clamped."""
    if not p > 0:  # also NaN
        return 0
    if p >= 1:
        return 1 << 32
    return min(1 << 32, int(math.floor(p * 4294967296.0)))


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product a*b; b holds values < 2**32 in int64.

    Split b into 16-bit halves so no intermediate leaves int64 (works on every device)."""
    bl, bh = b & 0xFFFF, b >> 16
    lo_part = a * bl                           # < 2**48
    mid = a * bh + (lo_part >> 16)             # < 2**49
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi & M32, lo & M32


def philox4x32(c0: torch.Tensor, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words."""
    def full(c):
        return c if isinstance(c, torch.Tensor) else torch.full_like(c0, int(c))
    c1, c2, c3 = full(c1), full(c2), full(c3)
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def random_bits(seed: int, name, model: int, offset: int, numel: int,
                device=None) -> torch.Tensor:
    """The 32-bit draws (int64 tensor) of elements offset .. offset+numel-1 of one model's tensor; name is the
    tensor's name or its name_hash() (what the custom ops carry)."""
    _check_keyable(name, offset, numel)
    j = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    g0 = offset // 4
    groups = torch.arange(g0, (offset + numel + 3) // 4, dtype=torch.int64, device=device)
    h0, h1 = name if isinstance(name, tuple) else name_hash(name)
    k0, k1 = seed_key(seed)
    words = torch.stack(philox4x32(groups, model & M32, h0, h1, k0, k1), dim=1)  # [groups, 4]
    return words[(j >> 2) - g0, j & 3]


def draws(seed: int, name, model: int, offset: int, numel: int, device=None) -> torch.Tensor:
    """random_bits, computed by the Triton kernel on a GPU: one launch where the torch form is ~250 (10 rounds of
    int64 ops, each a launch; an uncached DARE-TIES call on an H200 made ~5,000 launches, most of them here).
    The torch form elsewhere, and while a CUDA graph is being captured (the kernel's table is a host copy)."""
    if numel and _kernel_draws(device):
        from pymerge.kernels import task_vectors as tk
        _check_keyable(name, offset, numel)
        return tk.philox_draws(seed, name, model, offset, numel, device=device)
    return random_bits(seed, name, model, offset, numel, device)


def _check_keyable(name, offset: int, numel: int) -> None:
    if offset + numel > MAX_ELEMENTS:
        raise ValueError(f"tensor {name!r} has more than 2**34 elements; the Philox counter layout cannot key it")


def _kernel_draws(device) -> bool:
    if device is None or torch.device(device).type != "cuda":
        return False
    with torch.cuda.device(device):  # the tensors' device's stream, not the current device's
        if torch.cuda.is_current_stream_capturing():
            return False
    from pymerge.kernels import triton_available
    return triton_available()


def bernoulli_mask(seed: int, name: str, model: int, offset: int, numel: int, p: float,
                   device=None) -> torch.Tensor:
    """Boolean keep-mask with P(keep) = p under the layout above."""
    return random_bits(seed, name, model, offset, numel, device) < keep_threshold(p)
