"""The exception types the command line turns into exit statuses: bad input (2), SIGTERM (143)."""

from pathlib import Path


class InputError(Exception):
    """Bad usage or bad input: the CLI prints the message as one line and exits with 2.

    The message names the file and the fault, and where it can, what to do about it.
    """

    def __init__(self, path: Path | str | None, fault: str):
        self.path = path
        self.fault = fault
        super().__init__(f"{path}: {fault}" if path is not None else fault)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that outputs in progress are cleaned up as on
    Ctrl-C (a BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it)."""


class OutputError(Exception):
    """Standard output or an output file cannot be written (closed, its disk full): exit 1 with one
    line naming it."""


class ArgumentError(InputError):
    """A Python API argument of the wrong kind (a path that is not str or PathLike, an empty list):
    names the argument."""
