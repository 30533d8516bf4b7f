"""The signals besides Ctrl-C that ask pymerge to stop, as Ctrl-C does (its temporary output removed, exit 130):
SIGTERM (kill, a scheduler, torchrun), SIGHUP (a closed terminal or ssh session) and SIGXCPU (a soft CPU-time limit's
warning before its SIGKILL: a batch system's). At their default action they killed the process and left a
model-sized temporary folder beside OUT (audits). One list for the CLI, the distributed join and the demo."""
import signal

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGXCPU") if hasattr(signal, name))
