"""The pymerge command: merge | demo | search | bench | doctor, and --version.

Exit codes: 0 success; 2 bad input or a system error such as a full disk (one line on stderr
naming the file, tensor or key: no traceback); 130 interrupted (Ctrl-C, SIGTERM, SIGHUP or SIGXCPU; no output left
behind); 141 stdout's reader went away (`pymerge doctor | head -1`: silent, as a tool stopped by SIGPIPE); 1 a
distributed failure (another rank failed or was lost, or this rank cannot join: one line, a DistributedError) or
anything else, with the traceback, since that is a bug in pymerge.
"""
import argparse
import atexit
import os
import signal
import sys
from typing import List, Optional

from pymerge import mergekit_flags
from pymerge.argparser import ArgumentParser
from pymerge.progress import say
from pymerge.stop_signals import STOP_SIGNALS


def parse_size(text, zero: bool = False, minimum: int = 1) -> int:
    """A size option (see pymerge/sizes.py): '5GB', '500MB', '1.5GiB', '2e9', mergekit's '5B' (billion)."""
    from pymerge.errors import InputError
    from pymerge.sizes import parse_size as parse
    try:
        return parse(text, zero=zero, minimum=minimum)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def _shard_size(value) -> int:
    return parse_size(value, zero=True)  # 0: one file, as mergekit's writer splits only above 0


def _chunk_size(value) -> int:
    from pymerge.sizes import MIN_CHUNK_BYTES
    return parse_size(value, minimum=MIN_CHUNK_BYTES)  # the floor run_merge applies: one message for both


def _merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge models as a mergekit YAML config says",
                       description="Merge models as a mergekit YAML config says, into the folder OUT.")
    p.add_argument("config", metavar="CONFIG.yml")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute (auto: cuda when available)")
    p.add_argument("--out-shard-size", type=_shard_size, default=5_000_000_000, metavar="SIZE",
                   help="maximum bytes per output shard, e.g. 5GB (default), 500MB, 2GiB; 0: one file (as mergekit)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="compute threads (default: every core but one, which the writer thread keeps busy)")
    p.add_argument("--chunk-size", type=_chunk_size, default=None, metavar="SIZE",
                   help="scratch memory per chunk, 3 in flight (at least 1MiB; default 16MiB on the CPU, 128MiB "
                        "pinned on the GPU)")
    p.add_argument("--random-seed", type=int, default=None, metavar="N", help="seed for randomized methods")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists and is not empty (the whole folder: files the merge does not "
                        "write are deleted)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar (--no-quiet, mergekit's spelling of the default, shows it)")
    mergekit_flags.add_flags(p)
    return p


def version_text() -> str:
    """pymerge's version and the backends this install has (without importing torch)."""
    import importlib.metadata
    import importlib.util
    from pymerge import __version__, _native
    def missing(name: str, error, unbuilt: str) -> str:  # built but not loading is not "not built" (an audit)
        return unbuilt if _native._not_built(error) else f"{name} extension built but does not load (see pymerge doctor)"
    cpu = (f"cpu ({_native.cpu.simd_level()})" if _native.cpu is not None else
           missing("cpu", _native.CPU_IMPORT_ERROR, "cpu: NOT BUILT"))
    cuda = "cuda extension" if _native.cuda is not None else missing(
        "cuda", _native.CUDA_IMPORT_ERROR, "no cuda extension (built without nvcc or nvcc failed, or with PYMERGE_NO_CUDA=1)")
    triton = "triton" if importlib.util.find_spec("triton") is not None else "no triton (pip install triton)"
    try:
        torch = f"torch {importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        torch = "torch not installed"
    return f"pymerge {__version__} ({torch}); backends: {cpu}, {cuda}, {triton}"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and the backends built in, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


class _Parser(ArgumentParser):
    """argparse's parser, remembering its last usage error (subcommands' parsers are of this class too)."""
    last_error: Optional[str] = None

    def error(self, message):
        _Parser.last_error = message
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="pymerge", description="Fast, trustworthy model merging.")
    ap.add_argument("--version", action=_Version)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ap.commands = sub.choices  # (a dict filled below: _main names an unknown option given without a command)
    ap.merge_parser = _merge_parser(sub)
    for name, text in (("demo", "run the demo (pymerge.demo)"), ("search", "merge-weight search (pymerge.search)"),
                       ("bench", "quick weighted-sum benchmark against copy bandwidth (pymerge.bench)"),
                       ("doctor", "which backends (C++, CUDA, Triton, GPUs) this install can use, and why not")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def _cmd_merge(args) -> int:
    from pymerge.errors import InputError, one_line
    from pymerge.merge import run_merge  # torch loads only for real work
    try:
        extra = mergekit_flags.merge_options(args)
    except InputError as exc:  # a distributed merge's other ranks hear of it (see _refuse_with_other_ranks)
        _refuse_with_other_ranks(str(exc))
        raise
    with mergekit_flags.hub_cache(args):
        report = run_merge(args.config, args.out, device=args.device, out_shard_size=args.out_shard_size,
                           threads=args.threads, force=args.force, quiet=args.quiet,
                           chunk_bytes=args.chunk_size, random_seed=args.random_seed, **extra)
    if report.rank:  # a distributed merge: rank 0 speaks for all
        return 0
    for w in dict.fromkeys(report.warnings):  # once each: a slice's every scope can repeat a module's warning
        say(f"pymerge: warning: {one_line(w)}")  # (a path holding ESC or a line break: as errors are; a review)
    ranks = f" x {report.world_size} ranks" if report.world_size > 1 else ""
    if not args.quiet:
        say(f"pymerge: merged {report.tensors} tensors ({report.input_bytes / 1e9:.2f} GB read, "
             f"{report.output_bytes / 1e9:.2f} GB written in {len(report.shards)} shard(s)) into {report.out_dir} "
             f"in {report.seconds:.2f} s on {report.device}{ranks}")
    return 0


# what each command can lower when it runs out of memory (search and demo have no --chunk-size: a line advising it
# to them was refused; an audit)
_MEMORY_ADVICE = {"merge": "lower --chunk-size or the thread count, or ",
                  "search": "lower the config's memory_budget (the pool then reads its files from the memory map) or "
                            "search.replicas, or "}


def _dispatch(args) -> int:
    if args.command == "merge":
        return _cmd_merge(args)
    # search's parser takes a "--" as the end of its options (`search -- -c.yml`: dropped, the config named -c.yml
    # was taken for an option); demo, bench and doctor take no operands, so a leading "--" is dropped for them
    # (`pymerge bench -- --rounds 1`)
    if args.command == "search":
        rest = list(args.args)
    else:
        rest = [a for a in args.args if a != "--"] if args.args[:1] == ["--"] else list(args.args)
    if args.command == "demo":
        from pymerge import demo
        return demo.main(rest) or 0
    if args.command == "search":
        from pymerge import search
        return search.cli_main(rest) or 0
    if args.command == "bench":
        from pymerge import bench
        return bench.main(rest) or 0
    if args.command == "doctor":
        from pymerge import doctor
        return doctor.main(rest)
    raise AssertionError(args.command)


_SIGNALLED: list = []  # the signals the CLI's handler took during this call of main
_SCRIPT_DONE: list = []  # set once the script's command has returned (see _on_sigterm)


def _on_sigterm(signum, frame):
    _SIGNALLED.append(signum)
    if _SCRIPT_DONE and signum != signal.SIGINT:  # the command finished: an interrupt raised now, in main's last
        _exit_interrupted(signum, frame)          # lines, left it uncaught (the process killed itself, -2: a review)
    raise KeyboardInterrupt  # same clean abort as Ctrl-C


def _exit_interrupted(signum, frame):
    """After the script's command: SIGTERM, SIGHUP or SIGXCPU at their default action end the process with 130 at
    once, as they would have killed it; with the handlers just given back, one as the command returned killed the
    process (-15, -1) where the README promises 130 (an audit). A caller that runs `python -m pymerge` in-process
    (runpy) had those signals end its process too: they still do, with 130."""
    try:
        os.write(2, b"pymerge: interrupted\n")
    except OSError:
        pass
    os._exit(130)


_TEARDOWN_HANDLED: list = []  # the exit handler below registered (once per process)


def _ignore_stop_signals_at_exit() -> None:
    """The script's stop signals that were at their default action (main has given them _exit_interrupted) are
    ignored from the interpreter's exit on (an exit handler), the command having finished: Python gives every
    signal it handled its default action back as it finalizes, so one in the teardown that follows (~0.6 s of
    torch's) killed the process (an audit); an ignored one stays ignored, and the process exits with its command's
    status. (Ending the process at once instead skipped a search's user code's exit handlers and unflushed files:
    a review.)"""
    if _TEARDOWN_HANDLED:
        return
    _TEARDOWN_HANDLED.append(True)

    def at_exit():
        # Children multiprocessing's exit handler (after this one) joins: _exit_interrupted still ends the process
        # there (ignored, a worker a search's user code left running made the teardown unstoppable: a review)
        mp = sys.modules.get("multiprocessing")
        if mp is not None and mp.active_children():
            return
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) in (signal.SIG_DFL, _exit_interrupted):
                signal.signal(sig, signal.SIG_IGN)
    atexit.register(at_exit)


def _memory_limit() -> Optional[str]:
    """The address-space or data-size limit set on this process (ulimit -v, -d), as said to the user, or None."""
    import resource
    from pymerge.sizes import format_size
    for name, flag in (("RLIMIT_AS", "ulimit -v"), ("RLIMIT_DATA", "ulimit -d")):
        soft = resource.getrlimit(getattr(resource, name))[0] if hasattr(resource, name) else resource.RLIM_INFINITY
        if soft != resource.RLIM_INFINITY:
            return f"{flag}: {format_size(soft)}"
    return None


def _quiet_interrupts_in_finalizers(previous):
    """sys.unraisablehook while main runs: the interrupt _on_sigterm raised inside a __del__ or a weakref callback
    cannot leave it, and Python printed it as "Exception ignored in ..." with a traceback (an audit). _main says it
    in one line instead; anything else goes to the previous hook."""
    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _SIGNALLED):
            previous(unraisable)
    return hook


def main(argv: Optional[List[str]] = None) -> int:
    """Runs a command and returns its exit code. Called without argv (the `pymerge` script,
    `python -m pymerge`), a finished merge ends the process at once: its output is committed and
    flushed, and skipping the interpreter's teardown of torch saves ~0.6 s per run."""
    if argv is None:  # the script's own process (a library caller's descriptors are its own business)
        _fill_closed_descriptors()
        _escape_unencodable_output()
    stand_in = None
    if sys.stderr is None:  # 2>&-: Python writes file=None lines to stdout, argparse's usage among them
        # (for this call: a library caller's None comes back)
        sys.stderr = stand_in = open(os.devnull, "w", encoding="utf-8")
    # SIGTERM as Ctrl-C from the start: one while importing or parsing ended the process without a word (-15).
    # Ctrl-C through the same handler (where it is Python's own): the signal is recorded, see ImportError below.
    # Signals, and the hook that quiets the interrupts they raise in finalizers, are the main thread's: a main() in
    # another thread (a pipeline's worker) leaves the process's hook, and the main thread's signal state, alone
    # (overlapping calls put back each other's hooks: the application's own was lost; an audit)
    in_main_thread = _main_thread()
    if in_main_thread:
        _SIGNALLED.clear()
        _SCRIPT_DONE.clear()
    previous = {}
    hook = sys.unraisablehook
    ours = _quiet_interrupts_in_finalizers(hook) if in_main_thread else None
    if ours is not None:
        sys.unraisablehook = ours
    try:  # (installed inside: one arriving between the two installs is the interrupt below, and both restored)
        if in_main_thread:
            # each handler recorded before ours is set (a Ctrl-C as signal.signal returned, before its result was
            # stored, left ours installed after main returned: a later SIGTERM raised KeyboardInterrupt; an audit)
            previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.default_int_handler
                signal.signal(signal.SIGINT, _on_sigterm)
            # SIGHUP and SIGXCPU too, unless ignored (nohup): they left the temporary folder, a model's size,
            # beside OUT until the next merge into it (audits)
            for sig in STOP_SIGNALS:  # (_exit_interrupted: an earlier main()'s, in this process)
                if sig != signal.SIGTERM and signal.getsignal(sig) in (signal.SIG_DFL, _exit_interrupted):
                    previous[sig] = signal.getsignal(sig)
                    signal.signal(sig, _on_sigterm)
        try:
            _Parser.last_error = None
            rc = _main(argv)
        except SystemExit as exc:  # argparse's --version, --help and usage errors
            _flush_stdout()
            words = [a for a in (sys.argv[1:] if argv is None else argv) if not str(a).startswith("-")]
            if exc.code == 2 and _Parser.last_error is not None and words[:1] == ["merge"]:
                _refuse_with_other_ranks(_Parser.last_error)
            raise
        _flush_stdout()
        return _interrupted(argv is None) if rc == 130 else rc
    except KeyboardInterrupt:  # before a command started (its own interrupt is _run's): importing, parsing
        say("pymerge: interrupted")
        return _interrupted(argv is None)
    except ImportError as exc:  # an interrupt inside an extension's import comes out as its ImportError (numpy's:
        if _SIGNALLED and in_main_thread:  # a 40-line traceback, exit 1, for a Ctrl-C at start-up)
            say("pymerge: interrupted")
            return _interrupted(argv is None)
        text = str(exc).lower()  # the loader's words for an mmap or allocation refused (not a module missing)
        limit = _memory_limit() if "failed to map segment" in text or "allocate memory" in text else None
        if limit is None:
            raise
        # torch's libraries could not be mapped under ulimit -v or -d: a 54-line traceback (an audit)
        from pymerge.errors import exception_line
        say(f"pymerge: error: a library did not load: {exception_line(exc)} (this process's memory limit, {limit}, "
            "may be too low)")  # (a noexec mount says the same words: a review)
        return 2
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return _stdout_reader_gone()
    except OSError as exc:  # printing --version or --help, or the last flush, to a full disk: as _run's errors
        if exc.errno is None:
            raise
        _say_system_error(exc)
        _discard_stdout()  # its buffer would raise again at exit
        return 2
    finally:
        for sig, handler in previous.items():  # the script's stop signals go straight to _exit_interrupted: at
            after = argv is None and sig in STOP_SIGNALS and handler in (signal.SIG_DFL, _exit_interrupted)
            signal.signal(sig, _exit_interrupted if after else handler)  # their default action a moment, -1 (a review)
        if argv is None and previous:  # (none: main ran in another thread, installed nothing and leaves nothing)
            _ignore_stop_signals_at_exit()
        if ours is not None and sys.unraisablehook is ours:  # (one the caller set meanwhile stays)
            sys.unraisablehook = hook
        if stand_in is not None and sys.stderr is stand_in:
            sys.stderr = None
            stand_in.close()


def _interrupted(as_script: bool) -> int:
    """130, an interrupted run's status. The script's process ends here: CPython 3.11 marks a KeyboardInterrupt
    raised inside eval() (namedtuple's, while a module imports) as unhandled even once caught, and the process
    then killed itself with SIGINT at exit: -2, not 130, for 2-3 % of SIGTERMs at start-up (an audit)."""
    if as_script:
        _end_process(130)
    return 130


def _end_process(rc: int) -> None:
    """Ends the script's process with status rc, its output flushed, skipping the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a reader gone away, or none: the status still counts
            pass
    os._exit(rc)


def _escape_unencodable_output() -> None:
    """stdout escapes what its encoding cannot write (é under PYTHONIOENCODING=ascii), as Python's stderr does: a
    search's last line, naming its non-ASCII out, raised UnicodeEncodeError after every result was written (an
    audit)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # closed, or not a text stream of its own
            pass


def _fill_closed_descriptors() -> None:
    """Descriptors 0-2 closed by the caller (`>&- 2>&-`) are opened on /dev/null, each at its own number: the
    next file opened took number 2 (a demo's lock file), where torch's and libgomp's C code write their
    messages (a CLI audit). sys.stdout and sys.stderr stay None, so what would go there is dropped."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
            except OSError:  # no /dev/null (a minimal chroot): as before
                return
            if null != fd:
                os.dup2(null, fd)  # (inheritable)
                os.close(null)
            else:
                os.set_inheritable(fd, True)  # os.open's are not: children started with it closed again


def _refuse_with_other_ranks(message: str) -> None:
    """A distributed `pymerge merge` whose command line this rank refused: it joins the process group and fails
    the first agreement with that line, as the other ranks' run_merge expects (it had exited before joining, so
    a launcher other than torchrun, or another node's torchrun, left them waiting out the whole timeout)."""
    from pymerge.dist import disk_merge
    if disk_merge.launched():
        disk_merge.refuse(f"command line: {message}")


def _flush_stdout() -> None:
    """Delivers stdout's buffer here, where a reader gone away is handled (at interpreter exit Python
    prints "Exception ignored ... BrokenPipeError" and exits 120)."""
    if sys.stdout is not None:  # >&-
        sys.stdout.flush()


def _stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone away: a BrokenPipeError from elsewhere
    (a peer's socket) stays an error."""
    import select
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # None, closed, or not a file (captured)
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _stdout_reader_gone() -> int:
    """`pymerge doctor | head -1`: stop without a word and exit 141, as a tool that SIGPIPE stops (Python
    ignores SIGPIPE, so the write raised instead). Buffered output goes to /dev/null: it would raise again
    at exit."""
    _discard_stdout()
    return 128 + signal.SIGPIPE


def _say_system_error(exc: OSError) -> None:
    """The system refused (disk full, I/O error, permissions...): the user's to fix; no traceback helps.
    Without a file name nothing is blamed: the writer names OUT's files itself."""
    from pymerge.errors import one_line
    where = f"{exc.filename}: " if exc.filename else ""
    left = getattr(exc, "not_removed", None)  # a writer's folder that could not be removed after it
    say("pymerge: error: " + one_line(f"{where}{exc.strerror or exc}" + (f"; {left}" if left else "")))


def _discard_stdout() -> None:
    """What stdout still buffers goes to /dev/null, where the flush at exit cannot fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # None, closed, or not a file (captured)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _main(argv: Optional[List[str]]) -> int:
    as_script = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    # demo/search/bench parse their own options: argparse's REMAINDER would not pass a leading
    # option (`pymerge demo --quick`) through, so the rest of the line goes to them untouched.
    parser = build_parser()
    asked = any(a in ("-h", "--help", "--version") for a in argv)  # (never abbreviated: see argparser)
    if not asked and not any(a in parser.commands for a in argv):  # `pymerge --bogus` said only "COMMAND required"
        unknown = [a for a in argv if a.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args, rest = parser.parse_known_args(argv)  # usage errors: argparse prints them, exits 2
    if args.command == "merge" and rest:  # unknown options: merge's usage error, or pymerge's before `merge`
        before = argv[:argv.index("merge")]
        (parser if any(r in before for r in rest) else parser.merge_parser).error(
            f"unrecognized arguments: {' '.join(rest)}")
    if args.command != "merge":
        args.args = rest + list(args.args)
    rc = _run(args)
    if as_script:
        _SCRIPT_DONE.append(True)
    # a signal taken inside a finalizer as the command's objects went: Python printed the KeyboardInterrupt there and
    # went on, and the command ended 0 (an audit): its work is done, it was asked to stop. (Signals are the main
    # thread's: one an earlier main-thread call took is no worker's, which then said "interrupted": a review.)
    if _SIGNALLED and rc == 0 and _main_thread():
        say(f"pymerge: {args.command} interrupted; it ran to its end, so what it wrote is complete")
        rc = 130
    if as_script and args.command == "merge":
        _end_process(rc)
    return rc


def _run(args) -> int:
    from pymerge.io.writer import recording_installs
    with recording_installs() as installed:
        return _run_recorded(args, installed)


def _run_recorded(args, installed) -> int:
    from pymerge.errors import DistributedError, InputError, InterruptedAfterParts, exception_line, one_line
    previous = None
    try:  # the handler installed inside: a SIGTERM just after it, before the try, was a raw traceback
        if _main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        return _dispatch(args)
    except InputError as exc:
        say(f"pymerge: error: {exception_line(exc)}")
        return 2
    except DistributedError as exc:
        say(f"pymerge: error: {exception_line(exc)}")
        return 1
    except KeyboardInterrupt as exc:
        if isinstance(exc, InterruptedAfterParts):
            say(f"pymerge: interrupted after {one_line(str(exc))}")
        elif installed:
            say(f"pymerge: interrupted after writing {one_line(', '.join(map(str, installed)))} (complete)")
        elif args.command == "merge":
            left = getattr(exc, "not_removed", None)  # a writer's folder that could not be removed
            say("pymerge: interrupted; no output was written" + (f" ({left})" if left else ""))
        else:  # the demo keeps its checkpoints once all are trained (the next run reuses them), a search its state
            say(f"pymerge: {args.command} interrupted")
        return 130
    except OSError as exc:
        if exc.errno is None or (isinstance(exc, BrokenPipeError) and _stdout_gone()):
            raise  # a bug; or stdout's reader gone away, which main() ends quietly
        _say_system_error(exc)
        return 2
    except (MemoryError, RuntimeError) as exc:  # the machine's limits (ulimit -v, a cgroup), not a bug: one line
        text = str(exc)
        # torch's allocators raise RuntimeErrors: "DefaultCPUAllocator: can't allocate memory: ...", and on a GPU
        # torch.OutOfMemoryError ("CUDA out of memory"); a whole-tensor method's buffers were a traceback
        torch_oom = "can't allocate memory" in text or type(exc).__name__ == "OutOfMemoryError"
        if isinstance(exc, RuntimeError) and not torch_oom and "can't start new thread" not in text:
            raise
        what = "out of memory" if isinstance(exc, MemoryError) or torch_oom else \
            "cannot start a thread (out of memory or threads)"
        say(f"pymerge: error: {what}; {_MEMORY_ADVICE.get(args.command, '')}raise the limit (ulimit -v, -u)")
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
