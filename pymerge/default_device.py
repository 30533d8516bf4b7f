"""torch's default device set by a caller (torch.set_default_device("meta"), a `with torch.device(...)` block) is
not pymerge's: its working buffers are made without naming a device, for the CPU, and on meta they had no memory
(a segfault in the native quantizer; "output 0 is on meta" errors blaming the config; an audit)."""
import functools

from pymerge.errors import imported


def factories_on_cpu(fn):
    """fn run with torch's default device the CPU where a caller set another. Nothing is entered where it is the
    CPU already (torch's device mode costs every torch call inside), nor where torch is not imported, or still being
    imported by another thread (a torch-free merge: no caller can have set one)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch = imported("torch")
        if torch is None or not _modes(torch) or torch.get_default_device().type == "cpu":  # (the first two: ~0.1 us;
            return fn(*args, **kwargs)                                                    # the last ~5, a pool's merge)
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper


def _modes(torch) -> int:
    """The torch function modes active (a default device is one); 1 where torch cannot say, so the device is asked."""
    count = getattr(torch._C, "_len_torch_function_stack", None)
    return count() if count is not None else 1
