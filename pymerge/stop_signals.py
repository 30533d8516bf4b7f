"""The signals besides Ctrl-C that ask pymerge to stop, as Ctrl-C does (its temporary output removed, exit 130):
SIGTERM (kill, a scheduler, torchrun), SIGHUP (a closed terminal or ssh session) and SIGXCPU (a soft CPU-time limit's
warning before its SIGKILL: a batch system's). At their default action they killed the process and left a
model-sized temporary folder beside OUT (audits). One list for the CLI, the distributed join and the demo, and
held_signals, for the few steps that must not be cut in two."""
import contextlib
import os
import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGXCPU") if hasattr(signal, name))


@contextlib.contextmanager
def held_signals(repeat_acts: bool = True):
    """Ctrl-C, SIGTERM, SIGHUP and SIGXCPU wait until the block ends, then act as they would have: the block's steps
    land together (the demo's three result files; a file made and its descriptor kept, which an interrupt between
    the two leaked: an audit's Ctrl-C storm). With repeat_acts, a second one acts at once (a user pressing Ctrl-C
    again means it; for a block of a few system calls pass False: never one that may wait on another process). At
    the end every one taken acts, the stop signals before Ctrl-C, and after an error in the block too (the error
    then the interrupt's context).
    (Python handlers, not a signal mask: the process's other threads, torch's and the kernels', would take a masked
    signal and the main thread would still raise at once. Outside the main thread nothing raises: nothing is held.)"""
    held = (signal.SIGINT, *STOP_SIGNALS)
    old = {sig: signal.getsignal(sig) for sig in held} if threading.current_thread() is threading.main_thread() \
        else {}
    if not old or any(h is None for h in old.values()):  # another thread, or a handler installed from C
        yield
        return
    # an ignored one stays ignored (nohup's SIGHUP): held, it came first and the SIGTERM after it was lost (a review)
    held = tuple(sig for sig in held if old[sig] != signal.SIG_IGN)
    pending, released = [], []

    def deliver(sig, frame):
        handler = old[sig]
        if callable(handler):
            handler(sig, frame)  # KeyboardInterrupt, or the CLI's SIGTERM exit
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    def hold(sig, frame):
        if released or (repeat_acts and sig in pending):  # after the block (a restore not yet made), or a second one
            deliver(sig, frame)
        elif sig not in pending:
            pending.append(sig)

    installed, acted = [], None
    try:
        for sig in held:  # (inside the try: a SIGTERM raising as SIGINT was taken left Ctrl-C held for good; an audit)
            installed.append(sig)  # (listed first: giving back a handler never taken is harmless)
            signal.signal(sig, hold)
        yield
    finally:
        for sig in installed:  # every one given back, even where one already given back acts meanwhile
            for _ in range(10):
                try:
                    signal.signal(sig, old[sig])
                    break
                except BaseException as exc:  # noqa: BLE001  (raised once the rest are given back)
                    acted = exc
        released.append(True)
        if acted is not None:
            raise acted
        # every one, the stop signals first: a Ctrl-C acting first, caught by a caller that goes on, lost a SIGTERM
        # (the process was not ended); and after an error, which a caller may take for harmless (a review)
        for sig in sorted(pending, key=lambda sig: sig == signal.SIGINT):
            deliver(sig, None)
