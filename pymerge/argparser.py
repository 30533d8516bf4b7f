"""argparse's parser for pymerge's commands, except that
- a usage error is one line, as every bad input is (argparse printed its whole usage block first: 20 lines
  for `--chunk-size 512KiB`), pointing to --help;
- help written to stdout must arrive: argparse swallows a failed write (OSError), so `pymerge --help >
  /dev/full` exited 0 having printed nothing. The error reaches cli.main, which says it in one line and
  exits 2 (a reader gone away: 141);
- an option is never abbreviated (a script that ran under pymerge failed under mergekit-yaml, or the reverse)."""
import argparse
import sys

from pymerge.errors import one_line


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no abbreviated options: mergekit-yaml refuses `--write-model`, which argparse took for --write-model-card
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # (one_line: an argument holding a line break or ESC, echoed raw, broke the line or reached the terminal)
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        if file is None:  # help or version with stdout closed (>&-): dropped, as any stdout output (not to stderr)
            return
        if message and file is sys.stdout:
            file.write(message)
            file.flush()
        else:  # stderr (usage errors): argparse's own, which a closed stderr cannot fail
            super()._print_message(message, file)
