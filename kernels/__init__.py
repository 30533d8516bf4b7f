"""Triton kernels, one file per op (installed as ``pymerge.kernels``)."""
import os


def triton_available() -> bool:
    """True when the triton package imports (it is optional on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


E4M3 = 3  # dtype code of float8_e4m3fn (pymerge._native.DTYPE_CODES)


def body_and_tail(numel: int, block: int, num_warps: int) -> list:
    """The launches over numel elements, (lo, hi, block, num_warps) each, empty ones left out: the body, whole
    runs of 16 elements (a mask constant over each run lets aligned loads go 16 bytes at a time), in blocks of
    `block`; then the last numel % 16 elements in blocks of 16 on one warp."""
    body = numel - numel % 16
    return [r for r in ((0, body, block, num_warps), (body, numel, 16, 1)) if r[1] > r[0]]


def to_device(values, dtype, device):
    """values (numbers, nested lists or an array) as a `dtype` tensor on `device`. On a GPU one non-blocking copy
    from pinned memory: a pageable copy synchronizes the stream (one host wait per call), and the caching host
    allocator keeps the pinned block until the copy has run. (Under a CUDA graph capture the graph would keep this
    call's values: the callers refuse it first.)"""
    import torch
    t = torch.as_tensor(values, dtype=dtype).contiguous()
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def synchronize_gpus(keys) -> None:
    """Waits for every GPU that cache keys (device name first) name: a table freed from a cache may still be read
    by a kernel queued on any stream of its own device (one cache serves every GPU)."""
    import torch
    for name in sorted({key[0] for key in keys if key[0].startswith("cuda")}):
        torch.cuda.synchronize(name)


def e4m3_unsupported(device, codes) -> bool:
    """True when a Triton launch on `device` would read float8_e4m3fn (dtype code 3 among `codes`) and the
    GPU cannot: Triton builds tl.float8e4nv for compute capability 8.9 and newer only (an A100, sm_80,
    rejects the kernel at compile time). The ops route such calls to the CUDA extension (its conversion
    runs on every GPU), else to torch. CPU tensors (Triton's interpreter) read it anywhere."""
    if getattr(device, "type", None) != "cuda" or E4M3 not in codes:
        return False
    import torch
    return torch.cuda.get_device_capability(device) < (8, 9)


def refuse_e4m3(device, codes, op: str) -> None:
    """The Triton launchers' guard, for a call that reached one anyway (the ops route such calls first):
    one line instead of Triton's compile error."""
    if e4m3_unsupported(device, codes):
        import torch
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"{op}: Triton cannot read float8_e4m3fn on this GPU (compute capability {major}.{minor}; "
                           f"it needs 8.9 or newer); use backend 'cuda' or 'torch'")
