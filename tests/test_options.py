"""One source per option: the command line is built from the settings objects."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from many_cli.infer import InferOptions
from many_cli.merge import MergeOptions
from many_cli.options import option, with_options
from many_cli.stats import StatsOptions


@dataclass(frozen=True)
class Settings:
    size: int = option(3, "--size", "How many.")
    name: str | None = option(None, "--name", "Who.")
    loud: bool = option(False, "--loud/--quiet", "How.")
    internal: str = "kept"  # not an option


def test_every_declared_field_becomes_an_option_with_its_default():
    app = typer.Typer()
    seen = []

    @app.command()
    @with_options(Settings)
    def command(where: str = typer.Option("here", "--where"), *, options: Settings) -> None:
        seen.append((where, options))

    runner = CliRunner()
    assert runner.invoke(app, []).exit_code == 0
    assert runner.invoke(app, ["--size", "5", "--name", "x", "--loud", "--where", "there"]).exit_code == 0
    assert seen == [("here", Settings()), ("there", Settings(size=5, name="x", loud=True))]
    assert runner.invoke(app, ["--internal", "x"]).exit_code == 2
    help_text = runner.invoke(app, ["--help"]).output
    assert all(text in help_text for text in ("How many.", "Who.", "--quiet"))


@pytest.mark.parametrize("command,settings", [("merge", MergeOptions), ("stats", StatsOptions), ("infer", InferOptions)])
def test_the_cli_offers_exactly_the_declared_options(command, settings):
    from many_cli.cli import app

    click_command = typer.main.get_command(app).commands[command]
    flags = {name for parameter in click_command.params for name in parameter.opts + parameter.secondary_opts}
    declared = [field for field in dataclasses.fields(settings) if "flag" in field.metadata]
    assert declared and all(set(field.metadata["flag"].split("/")) <= flags for field in declared)
    defaults = {parameter.name: parameter.default for parameter in click_command.params}
    assert all(defaults[field.name] == field.default for field in declared)
