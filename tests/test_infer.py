"""`many infer` on a tiny LLaVA: against base + adapter run directly, and through its gates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LM_TARGETS, invoke, make_adapter, many_as_ordinary_user, run_cli, run_cli_output
from peft import LoraConfig, PeftModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from many_cli.bench.tiny import WORDS, build_tiny_llava

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


def write_task_data(folder: Path, name: str, colour, count: int, seed: int, varied: bool = False) -> Path:
    """Images of one colour. Calibration prompts are `varied`: random words, so that the inputs
    of every layer span its whole width (a merge only knows what its calibration data spans)."""
    rng = np.random.default_rng(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with open(path, "w") as handle:
        for index in range(count):
            pixels = np.clip(np.array(colour) + rng.normal(0, 15, (20, 20, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name / f"{index}.png")
            prompt = " ".join(rng.choice(WORDS, 12)) if varied else "what colour is it ?"
            handle.write(json.dumps({"image": f"{name}/{index}.png", "prompt": prompt, "answer": name}) + "\n")
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    base = build_tiny_llava(root / "base")
    adapters, heldout = [], []
    for index, (name, colour) in enumerate(COLOURS.items()):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"])
        adapters.append(make_adapter(base, root / "adapters" / name, config, seed=10 + index))
        calibration = write_task_data(root / "calibration", name, colour, 8, seed=index, varied=True)
        heldout.append(write_task_data(root / "heldout", name, colour, 3, seed=100 + index))
        assert invoke("stats", "--model", base, "--adapter", adapters[-1], "--data", calibration) == 0
    return root, base, adapters, heldout


def direct_greedy(base: Path, adapter: Path, records: Path, max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids of base + adapter (its LoRA and its projector), one record at a time."""
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), adapter).eval()
    tokens = []
    for line in open(records):
        entry = json.loads(line)
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": entry["prompt"]}]}]
        text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        encoded = processor(
            text=[text], images=[Image.open(records.parent / entry["image"]).convert("RGB")], return_tensors="pt"
        )
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        tokens.append(output[0, encoded["input_ids"].shape[1] :].tolist())
    return tokens


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_one_task_merge_answers_like_its_adapter(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapters[0], "--out", merged, "--ridge", 0)[0] == 0
    out = tmp_path / "preds.jsonl"
    code, err = run_cli(
        capsys,
        "infer",
        "--model",
        base,
        "--merged",
        merged,
        "--data",
        heldout[0],
        "--out",
        out,
        "--max-new-tokens",
        6,
        "--batch-size",
        1,
    )
    assert code == 0, err
    processor = AutoProcessor.from_pretrained(base)
    expected = [
        processor.decode(ids, skip_special_tokens=True).strip()
        for ids in direct_greedy(base, adapters[0], heldout[0], 6)
    ]
    assert [row["prediction"] for row in predictions(out)] == expected
    assert all(row["routing"] == {"red": 1.0} for row in predictions(out))


def test_hard_routing_sends_heldout_images_to_their_task(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    out = tmp_path / "preds.jsonl"
    code, err = run_cli(
        capsys,
        "infer",
        "--model",
        base,
        "--merged",
        merged,
        *sum((["--data", p] for p in heldout), []),
        "--out",
        out,
        "--routing",
        "hard",
        "--max-new-tokens",
        3,
    )
    assert code == 0, err
    rows = predictions(out)
    assert len(rows) == 9
    for row in rows:
        assert max(row["routing"], key=row["routing"].get) == row["task"]
        assert sorted(row["routing"].values()) == [0.0, 0.0, 1.0]


LAYER_BY_LAYER = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "cpu",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def test_batched_answers_equal_single_ones_and_folding_and_placement_change_nothing(
    tasks, tmp_path, capsys, monkeypatch
):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    placement = tmp_path / "device_map.json"
    placement.write_text(json.dumps(LAYER_BY_LAYER))
    placement_reads = []
    read_text = Path.read_text

    def counted_read_text(path, *args, **kwargs):
        if path == placement:
            placement_reads.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted_read_text)
    runs = {}
    for name, extra in {
        "single": ["--batch-size", 1],
        "batched": ["--batch-size", 4],
        "unfolded": ["--batch-size", 4, "--no-fold"],
        "auto": ["--device-map", "auto"],
        "placed": ["--device-map", placement, "--no-fold"],
    }.items():
        out = tmp_path / f"{name}.jsonl"
        args = [
            "infer",
            "--model",
            base,
            "--merged",
            merged,
            "--data",
            heldout[1],
            "--data",
            heldout[2],
            "--out",
            out,
            "--max-new-tokens",
            5,
            *extra,
        ]
        assert run_cli(capsys, *args)[0] == 0
        runs[name] = predictions(out)
    for name in ("batched", "unfolded", "auto", "placed"):
        assert [r["prediction"] for r in runs[name]] == [r["prediction"] for r in runs["single"]]
        for mine, single in zip(runs[name], runs["single"]):
            for task, weight in single["routing"].items():
                assert mine["routing"][task] == pytest.approx(weight, abs=1e-5)
    assert all(sum(r["routing"].values()) == pytest.approx(1.0) for r in runs["single"])
    assert len(placement_reads) == 1  # the options are resolved once, where they are checked


def test_accuracy_table_and_min_accuracy_gate(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    out = tmp_path / "preds.jsonl"
    args = [
        "infer",
        "--model",
        base,
        "--merged",
        merged,
        "--data",
        heldout[0],
        "--data",
        heldout[1],
        "--out",
        out,
        "--max-new-tokens",
        2,
    ]
    code, err = run_cli(capsys, *args, "--min-accuracy", 0)
    assert code == 0, err
    rows = predictions(out)
    accuracies = []
    for task in ("red", "green"):
        mine = [r for r in rows if r["task"] == task]
        correct = sum(r["prediction"].lower().strip(" .") == r["answer"] for r in mine)
        accuracies.append(correct / len(mine))
        assert f"{accuracies[-1]:.4f}" in err
    average = sum(accuracies) / len(accuracies)
    assert average < 1, "the gate needs a threshold above the average to be tested"
    code, err = run_cli(capsys, *args, "--min-accuracy", average + 1e-3, "--force")
    assert code == 1 and "below --min-accuracy" in err

    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "answer"}) + "\n" for line in open(heldout[0])
        )
    )
    unanswered.with_name("red").symlink_to(heldout[0].with_name("red"))
    for name, text in (("empty", ""), ("blank", "\n \n"), ("unanswered", None)):
        data = unanswered if text is None else tmp_path / f"{name}.jsonl"
        if text is not None:
            data.write_text(text)
        code, err = run_cli(
            capsys,
            "infer",
            "--model",
            base,
            "--merged",
            merged,
            "--data",
            data,
            "--out",
            tmp_path / f"{name}.out",
            "--max-new-tokens",
            1,
            "--min-accuracy",
            0,
        )
        assert code == 1 and "nothing was scored" in err and err.count("\n") == 1, (name, err)


def test_single_image_prints_the_answer_and_json(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    image = heldout[2].parent / "blue" / "0.png"
    args = [
        "infer",
        "--model",
        base,
        "--merged",
        merged,
        "--image",
        image,
        "--prompt",
        "what colour is it ?",
        "--max-new-tokens",
        3,
    ]
    code, plain, err = run_cli_output(capsys, *args)
    assert code == 0, err
    code, out, err = run_cli_output(capsys, *args, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert plain == row["prediction"] + "\n"
    assert set(row) >= {"prediction", "routing", "seconds"}
    assert sum(row["routing"].values()) == pytest.approx(1.0)
    assert max(row["routing"], key=row["routing"].get) == "blue"


def test_bad_inputs_exit_2(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters[:2], "--out", merged)[0] == 0
    broken_image = tmp_path / "broken.png"
    broken_image.write_bytes(b"no")
    wrong = tmp_path / "wrong"
    shutil.copytree(merged, wrong)
    bundle = load_file(wrong / "many_bundle.safetensors")
    for index in (0, 1):  # both alike, so the bundle is consistent and only the base disagrees
        key = f"projector/{index}/linear_1.weight"
        bundle[key] = bundle[key][:, :3].contiguous()
    from safetensors import safe_open

    with safe_open(str(merged / "many_bundle.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    save_file(bundle, wrong / "many_bundle.safetensors", metadata=metadata)
    (tmp_path / "empty").mkdir()
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9", "image": "x.png"}\n')
    cases = [
        (["--merged", merged, "--data", latin1], "latin1.jsonl:1: is not UTF-8 text"),
        (["--merged", merged, "--image", tmp_path / "nope.png"], "nope.png: image not found"),
        (["--merged", merged, "--image", broken_image], "broken.png"),
        (["--merged", wrong, "--image", heldout[0].parent / "red" / "0.png"], "projector of task red does not fit"),
        (
            ["--merged", tmp_path / "empty", "--image", heldout[0].parent / "red" / "0.png"],
            "is not a `many merge` output",
        ),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, "infer", "--model", base, *args)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_loaded_model_is_folded_and_routed(tasks, tmp_path, capsys):
    from peft.tuners.lora import LoraLayer

    from many_cli.cpm import RoutedProjector
    from many_cli.infer import InferOptions, load_merged

    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    folded = load_merged(str(base), merged, InferOptions(device="cpu"))
    assert not any(isinstance(module, LoraLayer) for module in folded.model.modules())
    assert isinstance(folded.model.model.multi_modal_projector, RoutedProjector)
    assert folded.router.tasks == ["red", "green", "blue"]
    unfolded = load_merged(str(base), merged, InferOptions(device="cpu", fold=False))
    assert any(isinstance(module, LoraLayer) for module in unfolded.model.modules())


def test_bench_infer_runs_on_a_tiny_model():
    import math

    from many_cli.bench.infer_bench import bench_infer

    result = bench_infer(tasks=2, hidden=64, layers=1, images=1, new_tokens=2, device="cpu", repeats=1)
    measured = [
        result.base_seconds_per_image,
        result.many_seconds_per_image,
        result.experts_seconds_per_image,
        result.base_load_seconds,
        result.many_load_seconds,
    ]
    assert all(0 < seconds < math.inf for seconds in measured), measured  # every path ran and was timed
    assert math.isfinite(result.latency_ratio) and math.isfinite(result.experts_latency_ratio)


def test_experts_routing_answers_like_each_tasks_own_adapter_in_mixed_batches(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    data = sum((["--data", path] for path in heldout), [])
    outputs = {}
    for batch in (4, 1):  # batches of 4 over 3 + 3 + 3 records mix the tasks
        out = tmp_path / f"experts{batch}.jsonl"
        code, err = run_cli(
            capsys,
            "infer",
            "--model",
            base,
            "--merged",
            merged,
            *data,
            "--out",
            out,
            "--lm-routing",
            "experts",
            "--batch-size",
            batch,
            "--max-new-tokens",
            5,
        )
        assert code == 0, err
        outputs[batch] = predictions(out)
    assert [r["prediction"] for r in outputs[4]] == [r["prediction"] for r in outputs[1]]
    processor = AutoProcessor.from_pretrained(base)
    for adapter, records in zip(adapters, heldout):
        expected = [
            processor.decode(ids, skip_special_tokens=True).strip() for ids in direct_greedy(base, adapter, records, 5)
        ]
        mine = [row for row in outputs[4] if row["task"] == adapter.name]
        assert [row["lm"] for row in mine] == [adapter.name] * len(mine)
        assert [row["prediction"] for row in mine] == expected


def test_experts_below_confidence_fall_back_to_the_merged_path(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    runs = {}
    # At η = 1 no soft weight of three tasks reaches 1, so confidence 1 never picks an expert.
    soft = ["--routing", "soft", "--eta", 1]
    for name, extra in {
        "fallback": ["--lm-routing", "experts", "--confidence", 1, *soft],
        "merged": ["--lm-routing", "merged", *soft],
    }.items():
        out = tmp_path / f"{name}.jsonl"
        assert (
            run_cli(
                capsys,
                "infer",
                "--model",
                base,
                "--merged",
                merged,
                "--data",
                heldout[0],
                "--data",
                heldout[2],
                "--out",
                out,
                "--max-new-tokens",
                5,
                *extra,
            )[0]
            == 0
        )
        runs[name] = predictions(out)
    assert all(row["lm"] == "merged" for row in runs["fallback"])
    assert [r["prediction"] for r in runs["fallback"]] == [r["prediction"] for r in runs["merged"]]
    code, err = run_cli(capsys, "merge", *adapters, "--out", tmp_path / "lean", "--no-experts")
    assert code == 0 and not (tmp_path / "lean" / "experts").exists()
    code, err = run_cli(
        capsys, "infer", "--model", base, "--merged", tmp_path / "lean", "--data", heldout[0], "--lm-routing", "experts"
    )
    assert code == 2 and "--no-experts" in err


@pytest.mark.slow
def test_an_ordinary_user_merges_resumes_and_routes_experts(tasks, tmp_path):
    """As root, run the console script without the powers that ignore file permissions, so that a
    directory without its search bit fails here as it would for any user."""
    import subprocess

    root, base, adapters, heldout = tasks
    many = many_as_ordinary_user()
    for args in (
        ["merge", *adapters[:2], "--out", tmp_path / "first"],
        ["merge", adapters[2], "--resume", tmp_path / "first", "--out", tmp_path / "all"],
        [
            "infer",
            "--model",
            base,
            "--merged",
            tmp_path / "all",
            "--data",
            heldout[2],
            "--lm-routing",
            "experts",
            "--max-new-tokens",
            2,
            "--out",
            tmp_path / "preds.jsonl",
        ],
    ):
        run = subprocess.run([*many, *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    rows = predictions(tmp_path / "preds.jsonl")
    assert len(rows) == 3 and {row["lm"] for row in rows} == {"blue"}


def write_mixed_records(folder: Path, heldout: list[Path]) -> Path:
    """Text-only records between the image records of two tasks, in one file."""
    lines = []
    for index, source in enumerate(heldout[:2]):
        for line in open(source):
            entry = json.loads(line)
            entry["image"] = str((source.parent / entry["image"]).resolve())
            lines.append(entry)
            lines.append({"prompt": f"say word {index}", "task": "text"})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in lines))
    return path


@pytest.mark.parametrize("lm_routing", ["merged", "experts"])
def test_text_only_records_mixed_with_images_answer_in_order(tasks, tmp_path, capsys, lm_routing):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    mixed = write_mixed_records(tmp_path, heldout)
    common = ["infer", "--model", base, "--merged", merged, "--max-new-tokens", 3, "--lm-routing", lm_routing]
    code, err = run_cli(capsys, *common, "--data", mixed, "--out", tmp_path / "mixed.out", "--batch-size", 4)
    assert code == 0, err
    rows = predictions(tmp_path / "mixed.out")
    expected = [json.loads(line) for line in open(mixed)]
    assert [row["prompt"] for row in rows] == [entry["prompt"] for entry in expected]
    # Each record alone (batch size 1) is the independent answer: same words, same routing.
    code, err = run_cli(capsys, *common, "--data", mixed, "--out", tmp_path / "alone.out", "--batch-size", 1)
    assert code == 0, err
    alone = predictions(tmp_path / "alone.out")
    for row, single, entry in zip(rows, alone, expected, strict=True):
        assert row["prediction"] == single["prediction"] and row["lm"] == single["lm"]
        assert row["routing"].keys() == single["routing"].keys()
        for task, weight in single["routing"].items():
            assert row["routing"][task] == pytest.approx(weight, abs=1e-5)
        if "image" in entry:
            assert max(row["routing"], key=row["routing"].get) == entry["answer"]
        else:
            assert row["routing"] == {} and row["lm"] == "merged"
    code, out, err = run_cli_output(capsys, *common, "--prompt", "say word 0")
    assert code == 0 and out.strip() == alone[1]["prediction"], err


def test_infer_out_never_replaces_its_input_or_a_foreign_file(tasks, tmp_path, capsys):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapters[0], "--out", merged)[0] == 0
    data = tmp_path / "data.jsonl"
    shutil.copy(heldout[0], data)
    for name in ("red",):
        shutil.copytree(heldout[0].parent / name, tmp_path / name)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine\n")
    common = ["infer", "--model", base, "--merged", merged, "--data", data, "--max-new-tokens", 1]
    before = data.read_bytes()
    code, err = run_cli(capsys, *common, "--out", data, "--force")
    assert code == 2 and "would overwrite the input" in err and data.read_bytes() == before
    code, err = run_cli(capsys, *common, "--out", merged / "preds.jsonl")
    assert code == 2 and "would overwrite the input" in err
    code, err = run_cli(capsys, *common, "--out", foreign)
    assert code == 2 and "--force" in err and foreign.read_text() == "mine\n"
    code, err = run_cli(capsys, *common, "--out", tmp_path / "red")  # the folder of the records' images
    assert code == 2 and "would overwrite the input" in err
    (tmp_path / "a folder").mkdir()
    code, err = run_cli(capsys, *common, "--out", tmp_path / "a folder")
    assert code == 2 and "is a directory" in err
    lookalikes = {
        "blank first line": "\nmy notes\n",
        "a row with more": '{"prediction": "x", "routing": {}}\nmy notes\n',
        "a foreign field": '{"prediction": "x", "routing": {}, "mine": 1}\n',
        "a cut-off output": '{"prediction": "x", "routing": {}}\n{"prediction": "y", "rou',
    }
    for case, text in lookalikes.items():
        foreign.write_text(text)
        code, err = run_cli(capsys, *common, "--out", foreign)
        assert code == 2 and "--force" in err and foreign.read_text() == text, case
    assert run_cli(capsys, *common, "--out", foreign, "--force")[0] == 0
    assert len(predictions(foreign)) == 3
    assert run_cli(capsys, *common, "--out", foreign)[0] == 0  # its own kind now
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_pickled_weights_are_never_loaded(tasks, tmp_path, capsys):
    """A pickle that would write a marker file if it were ever unpickled."""
    import pickle

    root, base, adapters, heldout = tasks
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapters[0], "--out", merged)[0] == 0
    (merged / "adapter_model.safetensors").unlink()
    (merged / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    pickled_base = tmp_path / "base"
    shutil.copytree(base, pickled_base)
    (pickled_base / "model.safetensors").unlink()
    (pickled_base / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    image = heldout[0].parent / "red" / "0.png"
    for model, folder, message in (
        (base, merged, "adapter_model.safetensors: file not found"),
        (pickled_base, tmp_path / "ok", "safetensors"),
    ):
        if folder.name == "ok":
            assert run_cli(capsys, "merge", adapters[0], "--out", folder)[0] == 0
        code, err = run_cli(capsys, "infer", "--model", model, "--merged", folder, "--image", image)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not marker.exists()


def test_oversized_images_warn_or_fail_in_one_line(tasks, tmp_path, capsys, monkeypatch):
    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapters[0], "--out", merged)[0] == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    for side, status in ((20, 0), (30, 2)):  # 400 pixels: Pillow warns; 900 > 2 x 300: it refuses
        path = tmp_path / f"{side}.png"
        Image.new("RGB", (side, side), (200, 10, 10)).save(path)
        code, out, err = run_cli_output(
            capsys, "infer", "--model", base, "--merged", merged, "--image", path, "--max-new-tokens", 1
        )
        assert code == status and err.count("\n") == 1 and err.startswith("many: "), err
        assert str(path) in err if status else "warning" in err


def test_a_projector_adapted_by_lora_is_merged_not_routed(tasks, tmp_path, capsys):
    """LoRA on the projector's own first layer (no modules_to_save): its input rows (image
    patches) all count in the statistics, LPM merges it like any layer, and infer applies it
    instead of routing; a one-task merge at ridge 0 answers like base + adapter."""
    root, base, _, heldout = tasks
    targets = r".*(multi_modal_projector\.linear_1|language_model.*\.(q_proj|v_proj|down_proj))"
    adapter = make_adapter(base, tmp_path / "red", LoraConfig(r=2, target_modules=targets), seed=21)
    calibration = root / "calibration" / "red.jsonl"
    assert run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", calibration)[0] == 0
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapter, "--out", merged, "--ridge", 0)[0] == 0
    out = tmp_path / "preds.jsonl"
    code, err = run_cli(
        capsys, "infer", "--model", base, "--merged", merged, "--data", heldout[0], "--out", out, "--max-new-tokens", 6
    )
    assert code == 0, err
    processor = AutoProcessor.from_pretrained(base)
    expected = [
        processor.decode(ids, skip_special_tokens=True).strip() for ids in direct_greedy(base, adapter, heldout[0], 6)
    ]
    rows = predictions(out)
    assert [row["prediction"] for row in rows] == expected
    assert all(row["routing"] == {} for row in rows)  # nothing routed: the bundle holds no projector


def test_a_model_with_no_known_projector_gets_the_merged_lora_alone_and_one_line(tasks, tmp_path, capsys, monkeypatch):
    """With LLaVA taken out of the family table, infer answers as base + the merged LoRA (the
    base's own projector, nothing routed) and says in one line what it looked for."""
    from many_cli import families

    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    monkeypatch.setattr(
        families, "FAMILIES", {name: family for name, family in families.FAMILIES.items() if name != "llava"}
    )
    out = tmp_path / "preds.jsonl"
    code, err = run_cli(
        capsys, "infer", "--model", base, "--merged", merged, "--data", heldout[0], "--out", out, "--max-new-tokens", 4
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if "projector" in line]
    assert notes == [notes[0]] and "no projector for model type 'llava'" in notes[0], err
    processor = AutoProcessor.from_pretrained(base)
    expected = [
        processor.decode(ids, skip_special_tokens=True).strip() for ids in direct_greedy(base, merged, heldout[0], 4)
    ]
    assert [row["prediction"] for row in predictions(out)] == expected
    assert all(row["routing"] == {} for row in predictions(out))


def test_default_routing_follows_the_nearest_calibration_image(tasks, tmp_path, capsys):
    """The default routing (nearest), against a brute force: each held-out image's pooled
    projector input (hooked on the base model here) against every calibration image's direction
    as the stats files keep them; the image goes to the task of the closest one. A merge whose
    stats predate the exemplars falls back to the paper's soft prototype routing, with a note."""
    from many_cli.state import STATS_FILE, read_stats_header, write_stats

    root, base, adapters, heldout = tasks
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    exemplars = [read_stats_header(adapter / STATS_FILE).exemplars() for adapter in adapters]
    assert all(part.shape[0] == 8 for part in exemplars)  # one per calibration image
    model = LlavaForConditionalGeneration.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    pooled = []
    model.model.multi_modal_projector.register_forward_pre_hook(
        lambda _, args: pooled.append(torch.nn.functional.normalize(args[0][0].double().mean(0), dim=0))
    )
    for path in heldout:
        for line in open(path):
            entry = json.loads(line)
            turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": entry["prompt"]}]}]
            text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            with torch.no_grad():
                model(
                    **processor(
                        text=[text],
                        images=[Image.open(path.parent / entry["image"]).convert("RGB")],
                        return_tensors="pt",
                    )
                )
    rows = torch.cat([part.double() for part in exemplars])
    owners = torch.cat([torch.full((len(part),), task) for task, part in enumerate(exemplars)])
    nearest = owners[(torch.stack(pooled) @ rows.T).argmax(dim=1)]
    out = tmp_path / "nearest.jsonl"
    code, err = run_cli(
        capsys,
        "infer",
        "--model",
        base,
        "--merged",
        merged,
        *sum((["--data", p] for p in heldout), []),
        "--out",
        out,
        "--max-new-tokens",
        1,
    )
    assert code == 0, err
    weights = torch.tensor([[row["routing"][name] for name in COLOURS] for row in predictions(out)])
    assert torch.equal(weights, torch.nn.functional.one_hot(nearest, 3).float())
    # A stats file with a prototype but no exemplars (no release of many wrote one) is refused.
    older = shutil.copytree(adapters[0], tmp_path / "older")
    header = read_stats_header(older / STATS_FILE)
    write_stats(
        older / STATS_FILE,
        covariances={key: header.packed(key) for key in header.inputs},
        tokens={key: entry.tokens for key, entry in header.inputs.items()},
        modules={key: list(entry.modules) for key, entry in header.inputs.items()},
        prototype=header.prototype(),
        images=header.images,
        adapter_fingerprint=header.adapter_fingerprint,
        base_fingerprint=header.base_fingerprint,
        token_rule="before exemplars",
    )
    code, err = run_cli(capsys, "merge", older, *adapters[1:], "--out", tmp_path / "old")
    assert code == 2 and err.startswith(f"many: error: {older / STATS_FILE}: holds a prototype without"), err
    assert not (tmp_path / "old").exists()
