"""The Python API takes str and PathLike paths, raises many_cli exceptions naming the argument or
file, and the exported model card's example runs as written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import invoke

import many_cli
from many_cli.adapters import ADAPTER_WEIGHTS

SAMPLE = Path(__file__).parent.parent / "sample_adapters"


def test_the_api_takes_str_paths_and_the_exported_cards_example_runs(tmp_path):
    adapters = [shutil.copytree(SAMPLE / "adapters" / task, tmp_path / task) for task in ("1_colour", "2_count")]
    for adapter in adapters:
        many_cli.collect_stats(
            str(SAMPLE / "base"),
            str(adapter),
            str(SAMPLE / "data" / adapter.name / "calibration.jsonl"),
            options=many_cli.StatsOptions(device="cpu"),
        )
    report = many_cli.merge_adapters([str(adapter) for adapter in adapters], str(tmp_path / "merged"))
    assert report.tasks == ["1_colour", "2_count"]
    data = [SAMPLE / "data" / adapter.name / "calibration.jsonl" for adapter in adapters]
    walked = many_cli.MergeOptions(one_pass=True, model=SAMPLE / "base")
    many_cli.merge_adapters(adapters, tmp_path / "one_pass", walked, data=[str(source) for source in data])
    arguments = [argument for source in data for argument in ("--data", source)]
    assert (
        invoke("merge", *adapters, "--out", tmp_path / "cli", "--one-pass", "--model", SAMPLE / "base", *arguments) == 0
    )
    assert (tmp_path / "one_pass" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "cli" / ADAPTER_WEIGHTS).read_bytes()
    assert (tmp_path / "one_pass" / ADAPTER_WEIGHTS).read_bytes() != (
        tmp_path / "merged" / ADAPTER_WEIGHTS
    ).read_bytes()
    with pytest.raises(many_cli.ArgumentError, match="data: applies to MergeOptions"):
        many_cli.merge_adapters(adapters, tmp_path / "no", data=data)
    exported = tmp_path / "exported"
    many_cli.export_model(
        str(SAMPLE / "base"), str(tmp_path / "merged"), str(exported), many_cli.ExportOptions(projector="routed")
    )
    card = (exported / "README.md").read_text()
    example = card.split("```python\n")[-1].split("\n```")[0].replace("THIS_DIRECTORY", str(exported))
    scope: dict = {}
    exec(compile(example, "exported card", "exec"), scope)
    routed = scope["routed"]
    image = SAMPLE / "data" / "2_count" / "evaluation" / "000.png"
    [prediction] = many_cli.answer(
        routed, [many_cli.Record(str(image), (image,), "how many dots are there ?", None)], 4
    )
    assert max(prediction.routing, key=prediction.routing.get) == "2_count"
    merged = many_cli.load_merged(str(SAMPLE / "base"), str(tmp_path / "merged"))
    assert many_cli.answer(merged, [prediction.record], 4)[0].prediction == prediction.prediction


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: many_cli.load_routed(42), "path"),
        (lambda: many_cli.load_merged(None, "m"), "base"),
        (lambda: many_cli.merge_adapters([], "out"), "adapters"),
        (lambda: many_cli.merge_adapters("one/adapter", "out"), "adapters"),
        (lambda: many_cli.merge_adapters(["a"], "out", options={"rank": 4}), "options"),
        (lambda: many_cli.answer(None, []), "merged"),
        (lambda: many_cli.collect_stats("base", "adapter", "data", options=None), "options"),
        (lambda: many_cli.export_model("base", "merged", ""), "out"),
    ],
)
def test_wrong_arguments_raise_an_argument_error_naming_them(call, argument):
    with pytest.raises(many_cli.ArgumentError) as raised:
        call()
    assert raised.value.path == argument and isinstance(raised.value, many_cli.InputError)


def test_bad_input_through_the_api_is_an_input_error_naming_the_file(tmp_path):
    with pytest.raises(many_cli.InputError, match="adapter directory not found"):
        many_cli.merge_adapters([tmp_path / "a", str(tmp_path / "b")], tmp_path / "out")


def test_the_readmes_python_api_example_runs_and_its_two_paths_agree(monkeypatch, capsys):
    """The README's Python API block, executed as written from the repository root: the merge
    keeps some energy at rank 8, and `many_cli.answer` and transformers' own `generate` on the
    loaded model give the same words."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    block = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    monkeypatch.chdir(root)
    capsys.readouterr()
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("merged ['1_colour', '2_count'], ") and "% of the output energy kept" in lines[0]
    answer, generated = lines[1].split(" {")[0].removeprefix("many_cli.answer: "), lines[2].removeprefix("generate: ")
    assert answer and answer == generated.strip()
    assert "'2_count': " in lines[1]
    assert not list((root / "sample_adapters" / "adapters").glob("*/many_stats.safetensors"))


@pytest.mark.parametrize(
    "options, line",
    [
        (lambda: many_cli.MergeOptions(scale="x"), "--scale must be a number, got 'x'"),
        (lambda: many_cli.MergeOptions(rank=2.5), "--rank must be an integer or None, got 2.5"),
        (lambda: many_cli.StatsOptions(batch_size=True), "--batch-size must be an integer, got True"),
        (lambda: many_cli.InferOptions(eta="1"), "--eta must be a number or None, got '1'"),
        (lambda: many_cli.ExportOptions(force="yes"), "--force must be True or False, got 'yes'"),
    ],
)
def test_an_option_of_the_wrong_type_is_an_input_error_naming_it(options, line, tmp_path):
    """Every function the API exports refuses them the same way, before any work (never a TypeError)."""
    with pytest.raises(many_cli.InputError) as raised:
        options().check()
    assert str(raised.value) == line
