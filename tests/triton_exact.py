"""Triton's interpreter with a GPU's float conversions, so the kernels' bfloat16 and float8 paths can be compared
bit for bit with the C++ kernels on a CPU.

Triton 3.9's interpreter truncates float32 to bfloat16 (cvt.rn.bf16x2.f32 on a GPU rounds to nearest even),
reads bfloat16 subnormals wrongly, float8_e4m3fn NaN as 480 and float8_e5m2 inf as 65536 (a GPU's cvt reads
them exactly): so bfloat16 outputs were left out of every bit test. install() routes those conversions through
torch's, which are a GPU's, where the interpreter is in use and still gets them wrong; on another Triton whose
interpreter has other internals it changes nothing and EXACT stays False (the tests then leave bfloat16 out as
before).
"""
import os

import numpy as np
import torch


def _probe() -> bool:
    """Does the interpreter round float32 -> bfloat16 to nearest even and read a bfloat16 subnormal exactly?"""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x, y, out_bf16, out_f32):
        tl.store(out_bf16, tl.load(x).to(tl.bfloat16))
        tl.store(out_f32, tl.load(y).to(tl.float32))

    x = torch.tensor([1 + 2**-8 + 2**-12], dtype=torch.float32)  # above the halfway point: rounds up
    y = torch.tensor([1], dtype=torch.int16).view(torch.bfloat16)  # the smallest subnormal
    out_bf16, out_f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    cast[(1,)](x, y, out_bf16, out_f32)
    return bool(out_bf16.view(torch.int16) == x.to(torch.bfloat16).view(torch.int16)) and \
        bool(out_f32 == y.float())


def install() -> bool:
    """Exact conversions in the interpreter; True where its conversions are now (or were already) a GPU's."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
        builder, handle, np_dtype = interp.InterpreterBuilder, interp.TensorHandle, interp._get_np_dtype
        cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
        if _probe():
            return True
    except Exception:  # noqa: BLE001  (no interpreter of these internals, or one that cannot run the probe)
        return False
    torch_of = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float32: torch.float32,
                tl.float8e5: torch.float8_e5m2, tl.float8e4nv: torch.float8_e4m3fn}
    bits_of = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float8_e5m2: torch.uint8,
               torch.float8_e4m3fn: torch.uint8}

    def exact(data, src, dst):
        t = torch.from_numpy(np.ascontiguousarray(data)).view(torch_of[src]).to(torch_of[dst])
        return handle(t.view(bits_of.get(t.dtype, t.dtype)).numpy().view(np_dtype(dst)), dst)

    def exact_cast(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if (s, d) in ((tl.bfloat16, tl.float32), (tl.float32, tl.bfloat16)):
            return exact(src.data, s, d)
        return cast_impl(self, src, dst_type)

    def exact_fp_to_fp(self, src, dst_type, rounding_mode):  # upcasts (exact) and round-to-nearest-even only:
        s, d = src.dtype.scalar, dst_type.scalar                # a GPU saturates float8 downcasts, torch does not
        if s in torch_of and d in torch_of and (d.primitive_bitwidth > s.primitive_bitwidth or (
                d == tl.bfloat16 and s == tl.float32 and str(rounding_mode).lower() in ("none", "rtne",
                                                                                       "roundingmode.rtne"))):
            return exact(src.data, s, d)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl, builder.create_fp_to_fp = exact_cast, exact_fp_to_fp
    try:
        if _probe():
            return True
    except Exception:  # another interpreter's internals: put them back
        pass
    builder.cast_impl, builder.create_fp_to_fp = cast_impl, fp_to_fp
    return False
