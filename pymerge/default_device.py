"""torch's default device set by a caller (torch.set_default_device("meta"), a `with torch.device(...)` block) is
not pymerge's: its working buffers are made without naming a device, for the CPU, and on meta they had no memory
(a segfault in the native quantizer; "output 0 is on meta" errors blaming the config; an audit)."""
import functools
import sys


def factories_on_cpu(fn):
    """fn run with torch's default device the CPU where a caller set another. Nothing is entered where it is the
    CPU already (torch's device mode costs every torch call inside), nor where torch is not imported (a torch-free
    merge: no caller can have set one)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch = sys.modules.get("torch")
        if torch is None or torch.get_default_device().type == "cpu":
            return fn(*args, **kwargs)
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper
