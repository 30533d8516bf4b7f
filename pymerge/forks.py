"""Locks a forked child must not inherit held: another thread of the parent may have held one at the fork
(a DataLoader worker forked while the pool planned a call waited for the pool's lock forever). Objects that
hold a threading.Lock register here; in a forked child each one's _after_fork() gives it a new lock (and
drops what it held under the old one)."""
import os
import weakref

_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def renew_after_fork(obj) -> None:
    """obj._after_fork() runs in every child forked from now on, while obj lives."""
    _LIVE.add(obj)


def _in_child() -> None:
    for obj in list(_LIVE):
        try:  # one failing must not leave the others' locks as inherited
            obj._after_fork()
        except Exception:  # noqa: BLE001  (a fork hook's exception is only printed; the next object goes on)
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
