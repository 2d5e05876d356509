"""Asking an adapter as its training tool did (`many_cli/prompting.py`): each tool's template
against its own definition written out by hand, the statistics of a run under a tool's template
against a brute force fed the token ids the tool builds piece by piece, the tools' image rules
against hand-computed sizes, and where the choice comes from and is kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    IMAGE_TOKEN,
    IMAGE_TOKENS,
    brute_force_covariances,
    build_base,
    make_adapter,
    run_cli,
    run_cli_output,
    stats_covariances,
    task_configs,
)
from PIL import Image

from many_cli.prompting import Asking, ImageRule, prompting_for, qwen_smart_resize

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ASKED = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it ?"}]}]
ANSWERED = [*ASKED, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
CHATML_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

# Each tool's conversation written out from its own template definition (LLaMA-Factory's
# data/template.py slots, ms-swift's TemplateMeta prompts), answered and asked.
EXPECTED = {
    "llamafactory:llava": (
        f"{VICUNA} USER: <image>what colour is it ? ASSISTANT: red</s>",
        f"{VICUNA} USER: <image>what colour is it ? ASSISTANT:",
    ),
    "llamafactory:qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{CHATML_IMAGE}what colour is it ?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{CHATML_IMAGE}what colour is it ?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "swift:llava1_5_hf": (
        "<s>USER: <image>\nwhat colour is it ?\nASSISTANT: red</s>",
        "<s>USER: <image>\nwhat colour is it ?\nASSISTANT:",
    ),
}
EXPECTED["swift:qwen2_vl"] = EXPECTED["llamafactory:qwen2_vl"]


class Echo:
    """A processor that renders the template it is given (the wrapped processor's role)."""

    def apply_chat_template(self, conversation, chat_template=None, **_):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        return ImmutableSandboxedEnvironment().from_string(chat_template).render(messages=conversation)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_tool_template_writes_the_tools_own_text(name):
    prompting, note = prompting_for(None, Asking(template=name))
    assert note is None
    processor = prompting.wrap(Echo())
    answered, asked = EXPECTED[name]
    assert processor.apply_chat_template(ANSWERED) == answered
    assert processor.apply_chat_template(ASKED) == asked
    # --system replaces the default; a record's own system turn wins over both.
    system = "be brief ."
    told, _ = prompting_for(None, Asking(template=name, system=system))
    own = [{"role": "system", "content": "say one word ."}, *ASKED]
    if name == "swift:llava1_5_hf":  # no default system: its system prompt opens after the BOS, on its own line
        assert told.wrap(Echo()).apply_chat_template(ASKED) == "<s>be brief .\n" + asked[3:]
    else:
        assert told.wrap(Echo()).apply_chat_template(ASKED) == asked.replace(
            VICUNA if "llava" in name else "You are a helpful assistant.", system
        )
    assert "say one word ." in told.wrap(Echo()).apply_chat_template(own)
    assert system not in told.wrap(Echo()).apply_chat_template(own)
    empty, _ = prompting_for(None, Asking(template=name, system=""))
    assert "system" not in empty.wrap(Echo()).apply_chat_template(ASKED) and VICUNA not in empty.wrap(
        Echo()
    ).apply_chat_template(ASKED)


def test_the_tools_image_rules_give_the_sizes_worked_out_by_hand():
    # qwen_vl_utils: sides to the nearest multiple of 28, then scaled by √ into [min, max] pixels.
    assert qwen_smart_resize(32, 32, 28, 3136, 12845056) == (56, 56)  # 28·28 < 3136: up to 56·56
    assert qwen_smart_resize(100, 300, 28, 3136, 12845056) == (112, 308)  # round(100/28)=4, round(300/28)=11
    assert qwen_smart_resize(1000, 2000, 28, 3136, 200_000) == (308, 616)  # β = √10, floor(316.2/28)=11, 22
    swift = ImageRule("qwen_vl_utils", 3136, 12845056)
    assert swift.resize(Image.new("RGB", (300, 100))).size == (308, 112) and not swift.processor_resizes
    # LLaMA-Factory: by √(limit / pixels), each side truncated.
    factory = ImageRule("llamafactory", 32 * 32, 768 * 768)
    assert factory.resize(Image.new("RGB", (20, 20))).size == (32, 32)
    assert factory.resize(Image.new("RGB", (1000, 500))).size == (1000, 500)  # within the limits
    assert factory.resize(Image.new("RGB", (1000, 1000))).size == (768, 768)  # √(589824/10⁶) = 0.768
    assert factory.resize(Image.new("RGB", (2000, 1000))).size == (1086, 543)  # √(589824/(2·10⁶)) = 0.54306
    qwen = ImageRule("llamafactory", 32 * 32, 768 * 768, qwen=True)  # its Qwen2-VL plugin: no side under 28
    assert qwen.resize(Image.new("RGB", (200, 10))).size == (200, 28)
    assert factory.processor_resizes


def _picture(path: Path, size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The tiny LLaVA, one adapter, and two records whose 20×20 pictures LLaMA-Factory enlarges
    to 32×32 (its image_min_pixels) before the processor."""
    root = tmp_path_factory.mktemp("prompting")
    base = build_base(root / "base")
    _adds_bos(base)
    adapter = make_adapter(base, root / "adapter", task_configs()[0], seed=3)
    records = [
        {"image": _picture(root / f"{index}.png", 20, index), "prompt": prompt, "answer": answer}
        for index, (prompt, answer) in enumerate([("what colour is it ?", "red"), ("how many dots ?", "two")])
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return base, adapter, records, data


def _adds_bos(base: Path) -> None:
    """The base's tokenizer adds a BOS to every text, as LLaVA-1.5's Llama tokenizer does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base)("red")["input_ids"][0] == tokenizer.bos_token_id


def _llamafactory_inputs(base: Path, record: dict) -> dict:
    """The ids LLaMA-Factory's llava template builds, piece by piece as its encoder does (system,
    user turn with the image's tokens, answer, EOS; no BOS), and the picture as it resizes it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    user = "USER: " + "<image>" * IMAGE_TOKENS + record["prompt"] + " ASSISTANT:"
    ids = [tokenizer.encode(piece, add_special_tokens=False) for piece in (VICUNA, user, record["answer"])]
    ids = [*ids[0], *ids[1], *ids[2], tokenizer.eos_token_id]
    with Image.open(record["image"]) as image:
        enlarged = image.convert("RGB").resize((32, 32))
    pixels = processor.image_processor(enlarged, return_tensors="pt")["pixel_values"]
    assert ids.count(IMAGE_TOKEN) == IMAGE_TOKENS
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels}


def test_stats_under_a_tools_template_take_the_inputs_the_tool_trained_on(task, tmp_path, capsys):
    base, adapter, records, data = task
    out = tmp_path / "stats.safetensors"
    code, err = run_cli(
        capsys, "stats", "--model", str(base), "--adapter", str(adapter), "--data", str(data),
        "--template", "llamafactory:llava", "--out", str(out), "--device", "cpu", "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "does not say which chat template" not in err
    expected = brute_force_covariances(base, adapter, [_llamafactory_inputs(base, record) for record in records])
    got = stats_covariances(out)
    for name, reference in expected.items():
        torch.testing.assert_close(got[name], reference.to(torch.float32).to(torch.float64), rtol=1e-5, atol=1e-4)
    from many_cli.state import read_stats_header

    asked = read_stats_header(out).asked_as
    assert asked["template"] == "llamafactory:llava" and asked["pixels"] == [32 * 32, 768 * 768]


def test_without_a_word_the_base_template_is_used_with_a_note(task, tmp_path, capsys):
    base, adapter, _, data = task
    common = ["--model", str(base), "--adapter", str(adapter), "--data", str(data), "--device", "cpu"]
    code, err = run_cli(capsys, "stats", *common, "--out", str(tmp_path / "a.safetensors"))
    assert code == 0 and f"{adapter}: its folder does not say which chat template trained it" in err
    code, err = run_cli(capsys, "stats", *common, "--out", str(tmp_path / "b.safetensors"), "--template", "base")
    assert code == 0 and "chat template" not in err
    # The two ask alike: the same statistics.
    first, second = stats_covariances(tmp_path / "a.safetensors"), stats_covariances(tmp_path / "b.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_ms_swift_args_json_beside_the_adapter_names_its_template(task, tmp_path, capsys):
    base, adapter, _, data = task
    import shutil

    swift = shutil.copytree(adapter, tmp_path / "checkpoint-100")
    (swift / "args.json").write_text(json.dumps({"template": "llava1_5_hf", "system": "be brief .", "lora_rank": 8}))
    common = ["--model", str(base), "--adapter", str(swift), "--data", str(data), "--device", "cpu"]
    code, err = run_cli(capsys, "stats", *common)
    assert code == 0, err
    from many_cli.state import read_stats_header

    asked = read_stats_header(swift / "many_stats.safetensors").asked_as
    assert asked == {"template": "swift:llava1_5_hf", "source": str(swift / "args.json"), "system": "be brief ."}
    (swift / "args.json").write_text(json.dumps({"template": "internvl2_5"}))
    code, err = run_cli(capsys, "stats", *common, "--out", str(tmp_path / "other.safetensors"))
    assert code == 0 and "ms-swift's template 'internvl2_5' is not one many writes" in err
    (swift / "args.json").write_text("{not json")
    code, err = run_cli(capsys, "stats", *common, "--out", str(tmp_path / "broken.safetensors"))
    assert code == 2 and str(swift / "args.json") in err and err.count("\n") == 1
    assert not (tmp_path / "broken.safetensors").exists()


def test_a_merge_keeps_each_tasks_template_and_asks_as_they_agree(task, tmp_path, capsys):
    base, adapter, records, data = task
    import shutil

    folders = [shutil.copytree(adapter, tmp_path / name) for name in ("first", "second")]
    for folder, template in zip(folders, ("llamafactory:llava", "base")):
        common = ["--model", str(base), "--adapter", str(folder), "--data", str(data), "--device", "cpu"]
        assert run_cli(capsys, "stats", *common, "--template", template)[0] == 0
    assert run_cli(capsys, "merge", *map(str, folders), "--out", str(tmp_path / "merged"))[0] == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "| `llamafactory:llava`, pixels 1024-589824 |" in card and "| the base's own template |" in card
    image = records[0]["image"]
    asking = ["infer", "--model", str(base), "--merged", str(tmp_path / "merged"), "--image", image, "--device", "cpu"]
    code, err = run_cli(capsys, *asking)
    assert code == 2 and "asked with different templates" in err and "give --template" in err
    code, out, err = run_cli_output(capsys, *asking, "--template", "llamafactory:llava")
    assert code == 0, err


def test_infer_adapter_asks_as_its_stats_file_recorded(task, tmp_path, capsys):
    base, adapter, _, data = task
    import shutil

    folder = shutil.copytree(adapter, tmp_path / "task")
    common = ["--model", str(base), "--adapter", str(folder), "--data", str(data), "--device", "cpu"]
    assert run_cli(capsys, "stats", *common, "--template", "llamafactory:llava")[0] == 0
    predictions = {}
    for name, extra in {
        "recorded": [],
        "said": ["--template", "llamafactory:llava"],
        "base": ["--template", "base"],
    }.items():
        out = tmp_path / f"{name}.jsonl"
        code, err = run_cli(capsys, "infer", *common, "--out", str(out), "--max-new-tokens", "4", *extra)
        assert code == 0 and "does not say which chat template" not in err, err
        predictions[name] = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert predictions["recorded"] == predictions["said"] != predictions["base"]


def test_a_chat_template_file_asks_as_its_text_says(task, tmp_path, capsys):
    """A file is tokenized by transformers' rule: no BOS added when its text opens with one. So
    ms-swift's llava1_5_hf text (which opens with <s>) from a file gives the tool template's
    statistics, and the base's own template from a file the base's."""
    from many_cli.prompting import TOOL_TEMPLATES

    base, adapter, _, data = task
    common = ["--model", str(base), "--adapter", str(adapter), "--data", str(data), "--device", "cpu"]
    files = {"swift.jinja": TOOL_TEMPLATES["swift:llava1_5_hf"].chat_template}
    files["base.jinja"] = (base / "chat_template.jinja").read_text()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    pairs = {"swift.jinja": "swift:llava1_5_hf", "base.jinja": "base"}
    for file, template in pairs.items():
        for out, said in (
            (tmp_path / f"{file}.safetensors", tmp_path / file),
            (tmp_path / f"{template}.safetensors", template),
        ):
            code, err = run_cli(capsys, "stats", *common, "--template", str(said), "--out", str(out))
            assert code == 0, err
        first, second = (
            stats_covariances(tmp_path / f"{file}.safetensors"),
            stats_covariances(tmp_path / f"{template}.safetensors"),
        )
        assert all(torch.equal(first[name], second[name]) for name in first), file
    (tmp_path / "broken.jinja").write_text("{% for x %}")
    code, err = run_cli(
        capsys, "stats", *common, "--template", str(tmp_path / "broken.jinja"), "--out", str(tmp_path / "no")
    )
    assert code == 2 and f"{tmp_path / 'broken.jinja'}: is not a Jinja chat template" in err and err.count("\n") == 1


def test_an_older_tasks_stats_count_as_the_base_template_and_the_users_word_wins(task, tmp_path, capsys):
    """Stats written before many recorded how it asked were taken on the base's template: merged
    with a task asked `--template base`, the model is asked so without a word; a bundle naming a
    template this many does not know is asked as `--template` says."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, adapter, records, data = task
    folders = [shutil.copytree(adapter, tmp_path / name) for name in ("older", "newer")]
    for folder in folders:
        common = ["--model", str(base), "--adapter", str(folder), "--data", str(data), "--device", "cpu"]
        assert run_cli(capsys, "stats", *common, "--template", "base")[0] == 0

    def rewrite(path: Path, change) -> None:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        save_file(load_file(path), path, metadata=change(metadata))

    rewrite(folders[0] / "many_stats.safetensors", lambda m: {k: v for k, v in m.items() if k != "asked_as"})
    assert run_cli(capsys, "merge", *map(str, folders), "--out", str(tmp_path / "merged"))[0] == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "unknown (stats of an older many)" in card
    asking = ["infer", "--model", str(base), "--merged", str(tmp_path / "merged"), "--image", records[0]["image"]]
    code, _, err = run_cli_output(capsys, *asking, "--device", "cpu")
    assert code == 0, err
    bundle = tmp_path / "merged" / "many_bundle.safetensors"
    rewrite(bundle, lambda m: {**m, "asked_as": json.dumps([{"template": "newtool:x"}, {"template": "base"}])})
    code, err = run_cli(capsys, *asking, "--device", "cpu")
    assert code == 2 and "does not know ('newtool:x')" in err
    code, _, err = run_cli_output(capsys, *asking, "--device", "cpu", "--template", "base")
    assert code == 0, err
