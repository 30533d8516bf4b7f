"""Exceptions a user can cause. The CLI turns any InputError into one line on stderr and exit 2."""
import re
import sys


class InputError(ValueError):
    """Bad input the user can fix: a file, a tensor, a config key or a value. Message names it."""


class CheckpointError(InputError):
    """A checkpoint file or folder is missing, corrupt or inconsistent with the others."""


class MergeConfigError(InputError):
    """A merge config or method parameter is invalid."""


class DistributedError(RuntimeError):
    """Another rank of a distributed merge failed, or was lost (it died, or a collective timed
    out). Not the user's input, but not a traceback either: the CLI prints one line, exits 1."""


class InterruptedAfterParts(KeyboardInterrupt):
    """An interrupt on a rank above 0 of a torchrun merge after every part was written: rank 0 may have
    installed OUT, complete, so "no output was written" would be false (users deleted good models on it)."""


MAX_ECHO = 80  # characters of a user's value an error message repeats
MAX_ERROR_CHARS = 1000  # a message naming a hostile input (a 10 MB model path) is cut, not printed whole

# what a terminal would act on rather than show: C0 and C1 controls (ESC starts a sequence that clears the screen
# or recolours it) and the bidirectional overrides, which reorder the text shown (whitespace is squashed first)
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


_HAS_NOTES = hasattr(BaseException, "add_note")  # Python 3.11 on


def add_note(exc: BaseException, note: str) -> None:
    """exc.add_note(note). Python 3.10 has no add_note and its tracebacks show no notes (an audit: a half-merged
    model went unsaid there): the note is kept in __notes__ as 3.11 keeps it, and added to the message as a new line
    where the message is the exception's arguments (a KeyboardInterrupt's, torch's out-of-memory's). (Where the
    exceptiongroup backport is loaded, as under pytest, it prints __notes__ too: the note shows twice.)"""
    if _HAS_NOTES:
        exc.add_note(note)
        return
    notes = getattr(exc, "__notes__", None)
    exc.__notes__ = [*notes, note] if isinstance(notes, list) else [note]
    if type(exc).__str__ is BaseException.__str__ and len(exc.args) <= 1 and all(isinstance(a, str) for a in exc.args):
        exc.args = ("\n".join((*exc.args, note)),)


def one_line(text: str) -> str:
    """A message as one line a terminal shows as it is: whitespace runs (a library's line breaks) one space,
    controls escaped (\\x1b; a path or argument holding them reached the terminal raw: an audit), the middle cut
    where it is too long: the cause comes last (a path past PATH_MAX printed whole left no room for "File name too
    long")."""
    text = _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), " ".join(text.split()))
    if len(text) <= MAX_ERROR_CHARS:
        return text
    tail = MAX_ERROR_CHARS // 3
    return text[:MAX_ERROR_CHARS - tail - 5] + " ... " + text[-tail:]


def exception_line(exc: BaseException) -> str:
    """An exception's message as one_line gives it (its type's name where it has none): what the CLI and another
    rank's report say of it."""
    return one_line(str(exc)) or type(exc).__name__


def imported(name: str):
    """The module `name` where an import of it has finished, else None: another thread may be importing it right
    now, and its half-initialized module has no attributes yet (torch._C: an AttributeError from run_merge called
    in threads, when torch is first imported; an audit)."""
    module = sys.modules.get(name)
    return None if getattr(getattr(module, "__spec__", None), "_initializing", False) else module


def first_line(exc: BaseException) -> str:
    """An exception's message reduced to its first line (its type's name where it has none): what one-line
    reports (another rank's error, doctor's rows) repeat."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def short(value, limit: int = MAX_ECHO) -> str:
    """repr(value), cut to ``limit`` characters: an error echoes what was wrong, never a whole
    hostile input (a 250 MB expanded YAML alias, a 400-digit number, a binary file's bytes)."""
    unreadable = _without_data(value)
    if unreadable is not None:
        return unreadable
    try:
        text = repr(value) if not isinstance(value, (list, dict, tuple)) else _short_container(value, limit)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    except ValueError:  # an int of more than 4300 digits (Python refuses to print it)
        text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    text = re.sub(r"\s*\n\s*", " ", text)  # one line: a tensor's or an array's repr spans several
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _without_data(value):
    """A plain tensor whose storage was freed (resize_(0), as FSDP does) described without its values, which its
    repr reads past the storage (a segfault in an error message); None for anything else."""
    torch = imported("torch")
    if torch is None or type(value) not in (torch.Tensor, torch.nn.Parameter) or value.device.type == "meta":
        return None
    try:
        from pymerge.ops._memory import extent_bytes
        if value.layout != torch.strided or value.untyped_storage().nbytes() >= extent_bytes(value):
            return None
    except Exception:  # noqa: BLE001  (a quantized or otherwise unusual tensor: its repr is torch's business)
        return None
    return f"<a {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)} whose storage is freed>"


def described(value) -> str:
    """What a config value is, for an error: "nothing", "a mapping", "an empty list", the string '...', or
    the (shortened) value itself."""
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return ("an empty " if not value else "a ") + ("mapping" if isinstance(value, dict) else "list")
    return f"the string {short(value)}" if isinstance(value, str) else short(value)


def _short_container(value, limit: int) -> str:
    # repr of a billion-laughs list would build the whole expansion first: stop at the limit.
    out, size = [], 0
    items = value.items() if isinstance(value, dict) else value
    for item in items:
        part = (f"{short(item[0], limit)}: {short(item[1], limit)}" if isinstance(value, dict)
                else short(item, limit))
        out.append(part)
        size += len(part) + 2
        if size > limit:
            break
    open_, close = {list: "[]", tuple: "()", dict: "{}"}.get(type(value), "[]")
    return open_ + ", ".join(out) + close
