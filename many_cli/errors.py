"""The one exception type that means "the user's input is wrong" (exit status 2)."""

from pathlib import Path


class InputError(Exception):
    """Bad usage or bad input: the CLI prints the message as one line and exits with 2.

    The message names the file and the fault, and where it can, what to do about it.
    """

    def __init__(self, path: Path | str | None, fault: str):
        self.path = path
        self.fault = fault
        super().__init__(f"{path}: {fault}" if path is not None else fault)
