"""How the command line ends: usage errors, bad input and failures as one line with their exit
status, Ctrl-C and SIGTERM as one line after cleanup, and standard output guarded (a closed pipe
ends quietly, a full disk is an error naming it); the libraries' own bars and notices kept out."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import typer

from many_cli import qlora
from many_cli.errors import InputError, OutputError, Terminated
from many_cli.files import signals_held


def run(app: typer.Typer) -> None:
    """Run the command line: usage errors exit 2 (typer's message); bad input exits 2 with one
    line; Ctrl-C exits 130 and SIGTERM 143, each with one line, after the outputs in progress
    are cleaned up; any other failure exits 1 with one line (MANY_DEBUG=1 shows the traceback)."""
    warnings.showwarning = _warn_in_one_line
    sys.stdout = _StandardOutput(sys.stdout)
    try:
        try:
            status = app(standalone_mode=False)
        finally:
            sys.stdout.flush()  # a full disk shows here, while it can still be reported
        if isinstance(status, int) and status:
            sys.exit(status)
    except _ReaderGone:  # the reader went away (`many … | head`): stop quietly, as other tools do
        sys.stdout = open(os.devnull, "w")  # nothing left to flush at exit
        sys.exit(0)
    except OutputError as error:
        sys.stdout = open(os.devnull, "w")
        fail(1, str(error))
    except SystemExit as done:
        if done.code == 130:  # typer's silent exit on Ctrl-C inside a command
            fail(130, "interrupted")
        raise
    except (KeyboardInterrupt, typer.Abort):
        fail(130, "interrupted")
    except typer.TyperException as error:  # a usage error: one line like any bad input
        _usage_error(error)
    except Terminated:
        fail(143, "terminated")
    except InputError as error:
        fail(2, str(error))
    except Exception as error:  # noqa: BLE001 - the last line of defence, reported in one line
        if os.environ.get("MANY_DEBUG"):
            raise
        fail(1, f"{type(error).__name__}: {error}")


def _usage_error(error) -> None:
    """The parser's refusal (an unknown option, a value outside an option's choices, a missing
    argument) in one line, exit 2; no arguments at all: the help typer has just shown, exit 2."""
    message = error.format_message()
    context = getattr(error, "ctx", None)
    if not message and context is not None:
        sys.exit(2)
    where = f" (`{context.command_path} --help` lists the options)" if context is not None else ""
    fail(2, f"{message.replace('Value error, ', '')}{where}")  # typer's validator wording


class _ReaderGone(Exception):
    """The reader of standard output closed it."""


class _StandardOutput:
    """sys.stdout whose failures (closed, a full disk) are an OutputError naming it, and a reader
    that went away is _ReaderGone."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guarded(lambda: self._stream.write(text))

    def flush(self) -> None:
        self._guarded(lambda: self._stream.flush())

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _guarded(self, call):
        if self._stream is None:
            raise OutputError("standard output: cannot write (it is closed)")
        try:
            return call()
        except BrokenPipeError:
            raise _ReaderGone() from None  # not an OSError: click would turn that into exit 1
        except OSError as error:
            raise OutputError(f"standard output: cannot write ({error.strerror or error})") from None


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (PEFT, Pillow) as one line each, not a source excerpt."""
    print(f"many: warning: {one_line(str(message))[:300]}", file=sys.stderr)


def fail(code: int, message: str) -> None:
    print(f"many: error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def one_line(text: str) -> str:
    """`text` on one line, every control character escaped (a file name from a data file can hold
    the terminal's escape sequences: they are shown, never obeyed)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in " ".join(text.split()))


@contextmanager
def importing(transformers: bool = True) -> Iterator[None]:
    """The block where a command imports its work (and torch with it), once its arguments have
    passed, with Ctrl-C and SIGTERM held back until the imports end: torch's import runs Python
    from C++, where the exception a signal raises is lost, or aborts the process (exit 134)."""
    with signals_held():
        if transformers:
            quiet_libraries()
        yield


def quiet_libraries() -> None:
    """Libraries' own progress bars and notices would bury the one-line reports."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    hub_logging.set_verbosity_error()  # its retry notices, one per attempt, would bury the one-line error
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    qlora.quiet()  # bitsandbytes, where installed, is imported by PEFT
