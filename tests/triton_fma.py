"""Whether Triton's interpreter rounds tl.fma once, as a GPU does. Triton 3.9's interpreter does; 3.8's
(which torch 2.14 pins) multiplies, rounds, then adds: a float32 result can be 1 ulp or a zero's sign
away from the C++ kernels' single fma, so comparing their bits on the CPU means nothing there."""
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def interpreter_rounds_fma_once() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":  # compiled for a GPU: its fma rounds once
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def fma(a, b, c, out):
        tl.store(out, tl.fma(tl.load(a), tl.load(b), tl.load(c)))

    # (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24: rounded to float32 first, the 2**-24 is lost
    x = torch.tensor([1 + 2**-12], dtype=torch.float32)
    c = torch.tensor([-(1 + 2**-11)], dtype=torch.float32)
    out = torch.empty(1, dtype=torch.float32)
    fma[(1,)](x, x, c, out)
    return out.item() == 2**-24


UNFUSED_REASON = ("this Triton's interpreter rounds tl.fma twice (3.9's and a GPU's round once): its float32 bits "
                  "cannot match the C++ kernels' single fma")
