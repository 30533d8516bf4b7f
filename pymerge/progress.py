"""Progress bars that never stop the work they show."""
import sys


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
