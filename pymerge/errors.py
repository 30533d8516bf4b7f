"""Exceptions a user can cause. The CLI turns any InputError into one line on stderr and exit 2."""


class InputError(ValueError):
    """Bad input the user can fix: a file, a tensor, a config key or a value. Message names it."""


class CheckpointError(InputError):
    """A checkpoint file or folder is missing, corrupt or inconsistent with the others."""


class MergeConfigError(InputError):
    """A merge config or method parameter is invalid."""


class DistributedError(RuntimeError):
    """Another rank of a distributed merge failed, or was lost (it died, or a collective timed
    out). Not the user's input, but not a traceback either: the CLI prints one line, exits 1."""
