"""Progress bars and lines on stderr that never stop the work they show."""
import sys


def say(line: str) -> None:
    """A line on stderr, or none where it cannot be written (its reader went away: `2>&1 | head`): the exit
    status still tells the outcome, which a BrokenPipeError raised here turned into a failure after the
    work was done."""
    if sys.stderr is None:  # 2>&-: print(file=None) would write to stdout (into --json's output)
        return
    try:  # one write: print's two (the line, then its newline) ran two ranks' lines together under torchrun
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class SafeStream:
    """stderr for tqdm: a write that fails (the reader of a pipe went away, stderr full or closed) turns the
    bar off instead of raising. Raised inside tqdm's display, such an error left tqdm's global lock held: a
    merge's writer thread stored it as the merge's error, and bar.close() on the main thread waited forever."""

    def __init__(self, stream=None):
        self._stream = stream if stream is not None else sys.stderr
        self.broken = self._stream is None  # python -m pymerge ... 2>&-

    def write(self, text):
        if not self.broken:
            try:
                self._stream.write(text)
            except (OSError, ValueError):  # ValueError: a closed file
                self.broken = True
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def __getattr__(self, name):  # isatty, fileno, encoding...: the stream's own
        return getattr(self._stream, name)
