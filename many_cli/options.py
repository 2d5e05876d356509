"""One source per option: each command's settings object (a frozen dataclass) declares every
option once, with its flag, default and help; the command line is built from it, and the
object's `check()` validates it before any work."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Annotated, Any, Callable

import typer


def option(default: Any, flag: str, help: str) -> Any:
    """A settings field that is also a command-line option."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help})


def with_options(settings: type) -> Callable[[Callable], Callable]:
    """Give a typer command, whose last parameter is `options: SETTINGS`, one option per field
    of SETTINGS declared with `option(...)`; the command receives them as one SETTINGS object."""
    hints = typing.get_type_hints(settings)
    fields = [field for field in dataclasses.fields(settings) if "flag" in field.metadata]

    def decorate(command: Callable) -> Callable:
        own = [parameter for parameter in inspect.signature(command, eval_str=True).parameters.values()
               if parameter.name != "options"]
        declared = [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                      annotation=Annotated[hints[field.name],
                                                           typer.Option(field.metadata["flag"], help=field.metadata["help"])])
                    for field in fields]

        @functools.wraps(command)
        def run(**arguments: Any) -> Any:
            values = {field.name: arguments.pop(field.name) for field in fields}
            return command(**arguments, options=settings(**values))

        del run.__wrapped__  # typer must see the signature below, not the command's own
        run.__signature__ = inspect.Signature([*own, *declared])
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in run.__signature__.parameters.values()}
        return run

    return decorate
