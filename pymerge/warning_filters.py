"""Warnings pymerge silences around a library call (torch's notes on a read-only buffer or an old file format,
cma's on a missing matplotlib). Python's filters are one list for the whole process, which catch_warnings swaps
and puts back: two threads' blocks that overlapped put back each other's lists (every warning ignored for good),
and a block that ignored everything dropped the application's own warnings raised meanwhile in other threads (an
audit). So every block holds one lock and ignores only what it names."""
import contextlib
import os
import threading
import warnings

_LOCK = threading.RLock()


def _renew_lock() -> None:
    """In a forked child: a lock of its own (another thread of the parent may have held it at the fork)."""
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)


@contextlib.contextmanager
def ignoring(message: str = "", category=Warning, module: str = ""):
    """The block with warnings matching all three (regular expressions matched at the start, as a warnings filter
    does; module: the module a warning is attributed to) ignored."""
    with _LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield
