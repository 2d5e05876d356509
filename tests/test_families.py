"""`many stats`, `merge` and `infer` end to end on each supported model family (tiny configs,
the family's own processor class): covariances and prototypes against a brute force, a one-task
merge at --ridge 0 against base + adapter run directly, and two tasks' images routed each to its
own task, a mixed batch answering as one record at a time."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from families import AUDIO_FAMILIES, COLOURS, FAMILIES, SHAPES, family_adapter, write_records
from helpers import input_sums, invoke, load_base, run_cli, stats_covariances
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor

from many_cli.bench.tiny import WORDS
from many_cli.families import find_projector
from many_cli.state import STATS_FILE


def encode_one(processor, entry: dict, root: Path, with_answer: bool):
    kind = next(kind for kind in ("audio", "video", "image") if kind in entry)
    turns = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": entry["prompt"]}]}]
    if with_answer:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": entry["answer"]}]})
    text = processor.apply_chat_template(turns, add_generation_prompt=not with_answer, tokenize=False)
    if kind == "audio":
        with wave.open(str(root / entry["audio"])) as clip:
            samples = np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2").astype(np.float32) / 32768
        return processor(text=[text], audio=[samples], return_tensors="pt")
    if "video" in entry:
        frames = [Image.open(frame).convert("RGB") for frame in sorted((root / entry["video"]).iterdir())]
        return processor(text=[text], videos=[frames], return_tensors="pt")
    image = Image.open(root / entry["image"]).convert("RGB")
    return processor(text=[text], images=[[image]], return_tensors="pt")


def brute_force(base: Path, adapter: Path, records: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Σ x xᵀ of every adapted layer's input, float64, one record at a time, no padding; and the
    prototype: the mean over records of the normalised mean of all the projector's input rows
    (each forward holds one image, however the family cuts it)."""
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    directions = []

    def pool(_module, args):
        rows = args[0].to(torch.float64)
        directions.append(torch.nn.functional.normalize(rows.reshape(-1, rows.shape[-1]).mean(dim=0), dim=0))

    handle = find_projector(model.get_base_model()).register_forward_pre_hook(pool)
    lines = [json.loads(line) for line in open(records)]
    sums = input_sums(
        model, lambda: [model(**encode_one(processor, entry, records.parent, with_answer=True)) for entry in lines]
    )
    handle.remove()
    assert len(directions) == len(lines)
    return sums, torch.stack(directions).mean(dim=0)


# The quick loop (`-m "not slow"`) builds two families, one of each projector layout (a
# `multi_modal_projector` and Qwen's `visual.merger`); the full suite builds every one.
QUICK_FAMILIES = ("llava", "qwen2_vl")


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=() if name in QUICK_FAMILIES else pytest.mark.slow) for name in sorted(FAMILIES)],
)
def family(request, tmp_path_factory):
    """A tiny base of the family, two task adapters with their calibration and held-out records,
    and each adapter's stats."""
    root = tmp_path_factory.mktemp(request.param)
    base = FAMILIES[request.param](root / "base")
    adapters = [family_adapter(base, root / "adapters" / f"task{index}", seed=index) for index in range(2)]
    audio = request.param in AUDIO_FAMILIES
    calibration = [write_records(root / "calibration", f"task{index}", 6, index, index, audio) for index in range(2)]
    heldout = [write_records(root / "heldout", f"task{index}", 3, 100 + index, index, audio) for index in range(2)]
    for adapter, records in zip(adapters, calibration, strict=True):
        assert invoke("stats", "--model", base, "--adapter", adapter, "--data", records, "--batch-size", "4") == 0
    return root, base, adapters, calibration, heldout


def test_stats_equal_brute_force_for_two_tasks(family):
    root, base, adapters, calibration, _ = family
    for adapter, records in zip(adapters, calibration, strict=True):
        expected, prototype = brute_force(base, adapter, records)
        measured = stats_covariances(adapter / STATS_FILE)
        assert measured.keys() == expected.keys()
        for module, matrix in expected.items():
            assert torch.linalg.norm(measured[module] - matrix) <= 1e-5 * torch.linalg.norm(matrix), module
        with safe_open(str(adapter / STATS_FILE), "pt") as stats:
            assert torch.allclose(stats.get_tensor("prototype").to(torch.float64), prototype, atol=1e-5)


def test_one_task_merge_answers_like_its_adapter(family, tmp_path, capsys):
    root, base, adapters, calibration, heldouts = family
    heldout = heldouts[0]
    code, err = run_cli(capsys, "merge", adapters[0], "--out", tmp_path / "merged", "--ridge", "0")
    assert code == 0, err
    code, err = run_cli(
        capsys,
        "infer",
        "--model",
        base,
        "--merged",
        tmp_path / "merged",
        "--data",
        heldout,
        "--out",
        tmp_path / "answers.jsonl",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, err
    answers = [json.loads(line)["prediction"] for line in open(tmp_path / "answers.jsonl")]
    assert all(answers)  # words to compare, not empty strings
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(load_base(base), adapters[0]).eval()
    for line, answer in zip(open(heldout), answers, strict=True):
        encoded = encode_one(processor, json.loads(line), heldout.parent, with_answer=False)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=4, do_sample=False)
        direct = processor.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        assert answer == direct.strip()


def test_images_route_to_their_own_task_and_a_mixed_batch_equals_one_by_one(family, tmp_path, capsys):
    root, base, adapters, _, heldout = family
    assert run_cli(capsys, "merge", *adapters, "--out", tmp_path / "merged")[0] == 0
    outputs = {}
    for routing, batch in (("soft", "1"), ("soft", "4"), ("hard", "4")):
        out = tmp_path / f"{routing}{batch}.jsonl"
        code, err = run_cli(
            capsys,
            "infer",
            "--model",
            base,
            "--merged",
            tmp_path / "merged",
            "--data",
            heldout[0],
            "--data",
            heldout[1],
            "--batch-size",
            batch,
            "--max-new-tokens",
            "3",
            "--routing",
            routing,
            "--out",
            out,
        )
        assert code == 0, err
        outputs[routing, batch] = [json.loads(line) for line in open(out)]
    for alone, mixed in zip(outputs["soft", "1"], outputs["soft", "4"], strict=True):
        assert alone["prediction"] == mixed["prediction"]
        assert list(mixed["routing"]) == ["task0", "task1"]
        for task in ("task0", "task1"):
            assert mixed["routing"][task] == pytest.approx(alone["routing"][task], abs=1e-5)
    assert [row["task"] for row in outputs["hard", "4"]] == ["task0"] * 3 + ["task1"] * 3
    for row in outputs["hard", "4"]:  # the task's own colour: all weight on its own projector
        assert row["routing"] == {task: float(task == row["task"]) for task in ("task0", "task1")}


def write_videos(folder: Path, name: str, count: int, seed: int, task: int) -> Path:
    """Records of four-frame clips (a folder of PNGs each) in the task's colour, then as many
    still images: the model encodes a batch's images first, its videos second."""
    rng = np.random.default_rng(seed)
    records = write_records(folder, name, count, seed, task, audio=False)
    lines = [json.loads(line) for line in open(records)]
    for index in range(count):
        clip = folder / name / f"clip{index}"
        clip.mkdir()
        for frame in range(4):
            pixels = np.clip(COLOURS[task] + rng.normal(0, 30, SHAPES[index % len(SHAPES)]), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(clip / f"{frame}.png")
        lines.insert(
            2 * index,
            {
                "video": f"{name}/clip{index}",
                "prompt": " ".join(rng.choice(WORDS, 8)),
                "answer": str(rng.choice(WORDS)),
            },
        )
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return records


@pytest.mark.parametrize("name", ["qwen2_vl", pytest.param("llava_onevision", marks=pytest.mark.slow)])
def test_a_video_pools_every_frame_and_routes_as_one(name, tmp_path, capsys):
    base = FAMILIES[name](tmp_path / "base")
    adapters = [family_adapter(base, tmp_path / "adapters" / f"task{index}", seed=index) for index in range(2)]
    for index, adapter in enumerate(adapters):
        records = write_videos(tmp_path / "calibration", f"task{index}", 3, index, index)
        code, err = run_cli(
            capsys, "stats", "--model", base, "--adapter", adapter, "--data", records, "--batch-size", "4"
        )
        assert code == 0, err
        expected, prototype = brute_force(base, adapter, records)
        measured = stats_covariances(adapter / STATS_FILE)
        for module, matrix in expected.items():
            assert torch.linalg.norm(measured[module] - matrix) <= 1e-5 * torch.linalg.norm(matrix), module
        with safe_open(str(adapter / STATS_FILE), "pt") as stats:
            assert stats.metadata()["images"] == "6"  # three clips, three images: one direction each
            assert torch.allclose(stats.get_tensor("prototype").to(torch.float64), prototype, atol=1e-5)
    assert run_cli(capsys, "merge", *adapters, "--out", tmp_path / "merged")[0] == 0
    heldout = [write_videos(tmp_path / "heldout", f"task{index}", 2, 50 + index, index) for index in range(2)]
    outputs = {}
    for batch in ("1", "4"):
        code, err = run_cli(
            capsys,
            "infer",
            "--model",
            base,
            "--merged",
            tmp_path / "merged",
            "--data",
            heldout[0],
            "--data",
            heldout[1],
            "--batch-size",
            batch,
            "--max-new-tokens",
            "3",
            "--out",
            tmp_path / f"{batch}.jsonl",
        )
        assert code == 0, err
        outputs[batch] = [json.loads(line) for line in open(tmp_path / f"{batch}.jsonl")]
    assert sum("video" in row for row in outputs["4"]) == 4
    for alone, mixed in zip(outputs["1"], outputs["4"], strict=True):
        assert alone["prediction"] == mixed["prediction"]
        for task in ("task0", "task1"):
            assert mixed["routing"][task] == pytest.approx(alone["routing"][task], abs=1e-5)
        assert max(mixed["routing"], key=mixed["routing"].get) == mixed["task"]


@pytest.mark.parametrize("family", [pytest.param("qwen3_vl", marks=pytest.mark.slow)], indirect=True)
def test_qwen3_vl_deepstack_mergers_follow_the_main_mergers_route(family, tmp_path, capsys):
    """Hard routing: each image is answered by the merged LoRA with its own task's main merger
    *and* DeepStack mergers, copied straight from that task's adapter file into the base model."""
    root, base, adapters, _, heldout = family
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    code, err = run_cli(
        capsys,
        "infer",
        "--model",
        base,
        "--merged",
        merged,
        "--data",
        heldout[0],
        "--data",
        heldout[1],
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--routing",
        "hard",
        "--out",
        tmp_path / "answers.jsonl",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "answers.jsonl")]
    processor = AutoProcessor.from_pretrained(base)
    for index, adapter in enumerate(adapters):
        model = PeftModel.from_pretrained(load_base(base), merged).merge_and_unload().eval()
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
            saved = {
                key.removeprefix("base_model.model."): weights.get_tensor(key)
                for key in weights.keys()
                if "merger" in key
            }
        assert any("deepstack" in key for key in saved)
        model.load_state_dict(saved, strict=False)
        for row in rows:
            if row["task"] != f"task{index}":
                continue
            assert row["routing"][f"task{index}"] == 1.0
            encoded = encode_one(processor, row, heldout[index].parent, with_answer=False)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=4, do_sample=False)
            direct = processor.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            assert row["prediction"] == direct[0].strip()


@pytest.mark.parametrize(
    "family", ["llava", "qwen2_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)], indirect=True
)
def test_an_exported_model_answers_like_many_infer_with_its_projector(family, tmp_path, capsys, monkeypatch):
    """`many export --projector task1` loads with transformers alone and answers task 1's images
    as `many infer --routing hard` does (which sends them to task 1's projector); `routed`
    loads through many_cli.load_routed and answers as `many infer` does."""
    from transformers import AutoModelForImageTextToText, PreTrainedModel

    import many_cli

    root, base, adapters, _, heldout = family
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    inferred = {}
    for routing in ("hard", "soft"):
        out = tmp_path / f"{routing}.jsonl"
        code, err = run_cli(
            capsys,
            "infer",
            "--model",
            base,
            "--merged",
            merged,
            "--data",
            heldout[0],
            "--data",
            heldout[1],
            "--max-new-tokens",
            "4",
            "--routing",
            routing,
            "--out",
            out,
        )
        assert code == 0, err
        inferred[routing] = [json.loads(line) for line in open(out)]

    def no_full_load(*_args, **_kwargs):
        raise AssertionError("export loaded the whole model")

    with monkeypatch.context() as patched:  # export streams the checkpoint: it never loads the model
        patched.setattr(PreTrainedModel, "from_pretrained", no_full_load)
        for projector in ("task1", "routed"):
            code, err = run_cli(
                capsys,
                "export",
                "--model",
                base,
                "--merged",
                merged,
                "--projector",
                projector,
                "--out",
                tmp_path / projector,
            )
            assert code == 0, err
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "task1").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "task1")
    task1 = [row for row in inferred["hard"] if row["task"] == "task1"]
    assert task1 and all(row["routing"]["task1"] == 1.0 for row in task1)
    for row in task1:
        encoded = encode_one(processor, row, heldout[1].parent, with_answer=False)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=4, do_sample=False)
        assert (
            row["prediction"]
            == processor.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        )
    routed = many_cli.load_routed(tmp_path / "routed")
    for row in inferred["soft"]:
        record = many_cli.Record(row["image"], (Path(row["image"]),), row["prompt"], None)
        [prediction] = many_cli.answer(routed, [record], max_new_tokens=4)
        assert prediction.prediction == row["prediction"]
        assert prediction.routing == pytest.approx(row["routing"], abs=1e-5)


@pytest.mark.parametrize("family", ["llava", pytest.param("qwen2_vl", marks=pytest.mark.slow)], indirect=True)
def test_statistics_under_a_merge_see_the_merged_layers(family, tmp_path, capsys):
    """`many stats --under MERGE` (RegMean++'s inputs): every covariance equals a float64 brute
    force through the task's adapter whose LoRA is replaced, layer by layer, by the merged update
    (folded by hand from the merge's factors), its projector kept; the prototype is the task's."""
    from safetensors.torch import load_file

    root, base, adapters, calibration, _ = family
    merged = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", *adapters, "--out", merged)
    assert code == 0, err
    config = json.loads((merged / "adapter_config.json").read_text())
    assert not config.get("rank_pattern")  # one scale for every module
    factors = load_file(merged / "adapter_model.safetensors")
    for adapter, records in zip(adapters, calibration, strict=True):
        copy = shutil.copytree(adapter, tmp_path / adapter.name)
        stats = ("stats", "--model", base, "--adapter", copy, "--data", records, "--batch-size", "4")
        code, err = run_cli(capsys, *stats, "--under", merged)
        assert code == 0, err
        model = PeftModel.from_pretrained(load_base(base), adapter).eval()
        with torch.no_grad():
            for key in [key for key in factors if "lora_A" in key]:
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                layer = model.get_base_model().get_submodule(module)
                update = factors[key.replace("lora_A", "lora_B")] @ factors[key]
                layer.base_layer.weight += update * config["lora_alpha"] / config["r"]
                layer.lora_B["default"].weight.zero_()  # the merge's update, not the task's own
        processor = AutoProcessor.from_pretrained(base)
        expected = input_sums(
            model,
            lambda model=model, processor=processor, records=records: [
                model(**encode_one(processor, json.loads(line), records.parent, with_answer=True))
                for line in open(records)
            ],
        )
        measured, original = stats_covariances(copy / STATS_FILE), stats_covariances(adapter / STATS_FILE)
        assert measured.keys() == expected.keys()
        for module, matrix in expected.items():
            assert torch.linalg.norm(measured[module] - matrix) <= 1e-5 * torch.linalg.norm(matrix), module
        assert any(  # the merge changed what later layers read
            torch.linalg.norm(original[module] - matrix) > 1e-3 * torch.linalg.norm(matrix)
            for module, matrix in expected.items()
        )
        with safe_open(str(copy / STATS_FILE), "pt") as under, safe_open(str(adapter / STATS_FILE), "pt") as own:
            assert torch.equal(under.get_tensor("prototype"), own.get_tensor("prototype"))


def test_a_base_without_a_processor_is_refused_by_every_command(world, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(world.base / name, bare / name)
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", merged)[0] == 0
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    for args in (
        ["stats", "--model", bare, "--adapter", world.adapters[0], "--data", data, "--out", tmp_path / "s"],
        ["infer", "--model", bare, "--merged", merged, "--prompt", "hi"],
        ["export", "--model", bare, "--merged", merged, "--out", tmp_path / "exported"],
    ):
        code, err = run_cli(capsys, *args)
        assert code == 2 and f"{bare}: has no processor or tokenizer" in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "s").exists()


def test_every_family_many_knows_has_a_builder_that_goes_through_the_family_tests():
    """`many_cli.families.FAMILIES` and the tests' builders name the same families (the family
    fixture above takes every builder)."""
    import many_cli.families

    assert set(FAMILIES) == set(many_cli.families.FAMILIES)


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_stats_under_what_is_not_a_merge_or_into_the_merge_is_refused(family, tmp_path, capsys):
    root, base, adapters, calibration, _ = family
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    stats = ("stats", "--model", base, "--adapter", adapters[0], "--data", calibration[0])
    for under, out, fault in (
        (adapters[1], tmp_path / "s.safetensors", "--under is not a `many merge` output"),
        (tmp_path / "nowhere", tmp_path / "s.safetensors", "--under: merge directory not found"),
        (merged, merged / "s.safetensors", "the output would overwrite the input"),
    ):
        before = sorted(path.name for path in merged.iterdir())
        code, err = run_cli(capsys, *stats, "--under", under, "--out", out)
        assert code == 2 and fault in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and sorted(path.name for path in merged.iterdir()) == before
