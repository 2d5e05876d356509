"""One source per option: the command line is built from the settings objects, and a bad setting
is refused in one line before any work."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from helpers import run_cli, run_cli_output
from typer.testing import CliRunner

from many_cli.cli import with_options
from many_cli.options import option


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


# The command line's documented options and defaults (the README's), written out here rather
# than read from the settings objects the CLI is generated from.
DOCUMENTED = {
    "merge": {
        "--method": "many",
        "--scale": 1.0,
        "--ridge": 1e-4,
        "--balance": False,
        "--eta": 0.05,
        "--alpha": 1.0,
        "--rank": None,
        "--state-precision": None,
        "--force": False,
        "--device": "cpu",
        "--experts": True,
        "--for-transformers": None,
        "--checkpoint-names": False,
        "--model": None,
        "--density": 0.2,
        "--out": None,
        "--resume": None,
        "--one-pass": False,
        "--data": None,
        "--walk-memory": 4.0,
        "--qlora": "none",
    },
    "stats": {
        "--model": None,
        "--adapter": None,
        "--data": None,
        "--out": None,
        "--batch-size": 8,
        "--max-samples": None,
        "--device": "auto",
        "--dtype": "auto",
        "--prompt": "Describe the image.",
        "--skip-bad": False,
        "--padding-side": "right",
        "--force": False,
        "--answer-weight": 1.0,
        "--modules": None,
        "--under": None,
        "--device-map": None,
        "--qlora": "none",
        "--format": "auto",
        "--media-dir": None,
        "--text-only": False,
        "--template": None,
        "--system": None,
        "--min-pixels": None,
        "--max-pixels": None,
    },
    "infer": {
        "--model": None,
        "--merged": None,
        "--adapter": None,
        "--image": None,
        "--prompt": None,
        "--data": None,
        "--out": None,
        "--json": False,
        "--routing": "nearest",
        "--eta": None,
        "--lm-routing": "merged",
        "--max-new-tokens": 32,
        "--min-accuracy": None,
        "--batch-size": 8,
        "--format": "auto",
        "--media-dir": None,
        "--confidence": 0.5,
        "--force": False,
        "--fold": True,
        "--device": "auto",
        "--dtype": "auto",
        "--device-map": None,
        "--qlora": "none",
        "--template": None,
        "--system": None,
        "--min-pixels": None,
        "--max-pixels": None,
    },
    "export": {
        "--model": None,
        "--merged": None,
        "--out": None,
        "--projector": "routed",
        "--qlora": "none",
        "--force": False,
    },
    "report": {
        "--out": None,
        "--upper": None,
        "--experts": None,
        "--min-final-accuracy": None,
        "--max-forgetting": None,
        "--force": False,
    },
    "convert": {"--out": None, "--force": False},
    "demo": {"--sample": None, "--out": Path("many-demo"), "--force": False},
}


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_the_cli_offers_the_documented_options_with_their_defaults(command):
    from many_cli.cli import app

    click_command = typer.main.get_command(app).commands[command]
    offered = {
        name: parameter for parameter in click_command.params for name in parameter.opts if name.startswith("--")
    }
    assert set(offered) == set(DOCUMENTED[command])  # both ways: nothing undocumented, nothing gone
    for flag, default in DOCUMENTED[command].items():
        assert offered[flag].default == default or (default is None and offered[flag].required), flag


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_the_readme_s_synopsis_names_every_option_of_each_command(command):
    """Each command's synopsis in the README's command section names exactly its options (a
    switch by either of its names, --experts or --no-experts)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The commands") : readme.index("## After each fine-tune")]
    synopsis = re.search(rf"^    many {command} (.*?)(?=\n\n)", section, re.M | re.S).group(1)
    named = {re.sub(r"^--no-", "--", flag) for flag in re.findall(r"--[a-z][a-z-]*", synopsis)}
    assert named == set(DOCUMENTED[command])


# The options with a fixed set of values, and that set, as the README documents them.
CHOICES = {
    ("merge", "--method"): ["many", "average", "task-arithmetic", "ties"],
    ("merge", "--state-precision"): ["float64", "float32"],
    ("merge", "--device"): ["auto", "cpu", "cuda"],
    ("stats", "--dtype"): ["auto", "float32", "bfloat16", "float16"],
    ("stats", "--padding-side"): ["left", "right"],
    ("stats", "--format"): ["auto", "many", "llava", "sharegpt", "alpaca", "swift", "internvl", "hf"],
    ("infer", "--routing"): ["nearest", "soft", "hard"],
    ("infer", "--lm-routing"): ["merged", "experts"],
    ("infer", "--device"): ["auto", "cpu", "cuda"],
    ("stats", "--qlora"): ["none", "nf4-double", "nf4", "fp4-double", "fp4"],
}


@pytest.mark.parametrize("command, flag", sorted(CHOICES))
def test_an_option_with_fixed_values_shows_them_and_refuses_others(command, flag):
    from many_cli.cli import app

    runner = CliRunner()
    help_text = " ".join(
        runner.invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).output.split()
    )
    assert "<" + "|".join(CHOICES[command, flag]) + ">" in help_text
    refused = runner.invoke(app, [command, flag, "nonsense"])
    assert refused.exit_code == 2 and "nonsense" in refused.output


@pytest.mark.parametrize(
    "args,option",
    [
        (["infer", "--image", "x.png", "--eta", "inf"], "--eta"),
        (["infer", "--image", "x.png", "--confidence", "1.5", "--lm-routing", "experts"], "--confidence"),
        (["infer", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size"),
        (["infer", "--data", "x.jsonl", "--min-accuracy", "nan"], "--min-accuracy"),
        (["infer", "--data", "x.jsonl", "--min-accuracy", "1.5"], "--min-accuracy"),
        (["infer", "--image", "x.png", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["infer", "--image", "x.png", "--device", "tpu"], "--device"),
        (["infer", "--image", "x.png", "--out", "p.jsonl"], "--out or --min-accuracy does not apply"),
        (["infer", "--prompt", "hi", "--min-accuracy", "0.5"], "--out or --min-accuracy does not apply"),
        (["infer", "--data", "x.jsonl", "--json"], "--json does not apply"),
        (["infer", "--image", "x.png", "--eta", "0.1"], "--eta does not apply to --routing nearest"),
        (["infer", "--image", "x.png", "--confidence", "0.9"], "--confidence does not apply to --lm-routing merged"),
        (["merge", "nowhere", "--out", "m", "--eta", "inf"], "--eta"),
        (["merge", "nowhere", "--out", "m", "--ridge", "nan"], "--ridge"),
        (["stats", "--adapter", "nowhere", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size"),
        (["stats", "--adapter", "nowhere", "--data", "x.jsonl", "--dtype", "float8"], "--dtype"),
        (["stats", "--adapter", "nowhere", "--data", "x.jsonl", "--device-map", ""], "--device-map is empty"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, args, option):
    command, rest = args[0], args[1:]
    model = [] if command == "merge" else ["--model", tmp_path / "no-model"]
    merged = ["--merged", tmp_path / "no-merge"] if command == "infer" else []
    code, err = run_cli(capsys, command, *model, *merged, *rest)
    assert code == 2 and option in err and "no-model" not in err and err.count("\n") == 1, err


def test_the_habits_users_bring_to_a_command_line(capsys):
    """-h as --help everywhere, --version, no arguments: the help once; a refused choice in words."""
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    code, out, _ = run_cli_output(capsys, "--version")
    assert (code, out) == (0, f"many {project['version']}\n")
    for command in ([], ["merge"], ["infer"], ["bench"], ["bench", "sample"]):
        code, out, err = run_cli_output(capsys, *command, "-h")
        usage = f" {' '.join(command)} [OPTIONS]" if command else " [OPTIONS] COMMAND"
        assert code == 0 and "Usage:" in out and usage in out and not err, (command, out, err)
    for command in ([], ["bench"]):
        code, out, _ = run_cli_output(capsys, *command)
        assert code == 2 and out.count("Usage:") == 1, out
    code, _, err = run_cli_output(capsys, "merge", "a", "--out", "b", "--method", "regmean")
    assert code == 2 and "'regmean' is not one of 'many'" in err and "Value error" not in err, err
    _, infer_help, _ = run_cli_output(capsys, "infer", "--help")
    _, stats_help, _ = run_cli_output(capsys, "stats", "--help")
    assert "statistics" not in " ".join(infer_help.split()) and "routed projector" in " ".join(infer_help.split())
    assert "statistics sum in float32" in " ".join(stats_help.replace("│", " ").split())
