"""The paper's two models as MCITlib trains them, in LLaVA's own code base's layout: InternVL-Chat-7B
(an InternViT-6B tower read from its own folder) and LLaVA-1.5 (a CLIP tower), read as they are:
the fixtures were written by MCITlib's code (tests/fixtures/llava_code/make.py, its pins in its
header), with what that code answers; here nothing of it runs. The base read as transformers' LLaVA
gives its logits, the processor its pixels and token ids, greedy decoding its tokens; its LoRA
runs, as MCITlib saves them, answer as they do under its code, merge, route, answer and export."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import merge_recorded_tasks, run_cli, run_cli_output
from safetensors.torch import load_file, save_file

from many_cli.data import Record, encode_records, load_image
from many_cli.models import base_fingerprint, load_base_model, load_processor

FIXTURES = Path(__file__).parent / "fixtures" / "llava_code"
IMAGE_PATCHES = 144  # 336 px in 28 px patches: 12 × 12, both towers
pytestmark = pytest.mark.filterwarnings("ignore:.*tower tensors are not read")
GREEDY = ("--max-new-tokens", "4", "--device", "cpu", "--json")


@dataclass(frozen=True)
class Kit:
    """One base's fixtures: its folder, its tower's folder name."""

    folder: Path
    tower_name: str

    @property
    def base(self) -> Path:
        return self.folder / "base"

    @property
    def tower(self) -> Path:
        return self.folder / self.tower_name

    @property
    def cases(self) -> list[dict]:
        return json.loads((self.folder / "reference.json").read_text())

    def inputs_of(self, index: int) -> dict:
        case = self.cases[index]
        record = Record(case["image"], (self.folder / case["image"],), case["question"], None)
        image = load_image(case["image"], self.folder / case["image"])
        return encode_records(load_processor(str(self.base)), [record], [image], False)

    def ask(self, index: int) -> list:
        case = self.cases[index]
        question, image = case["question"], self.folder / case["image"]
        return ["infer", "--model", self.base, "--image", image, "--prompt", question, *GREEDY]


KITS = {
    "internvit": Kit(FIXTURES, "InternViT-6B-224px"),  # InternVL-Chat-ViT-6B-Vicuna-7B
    "clip": Kit(FIXTURES / "clip", "clip-vit-large-patch14-336"),  # llava-v1.5-7b
}
INTERNVIT = KITS["internvit"]
BASE, TOWER, CASES = INTERNVIT.base, INTERNVIT.tower, INTERNVIT.cases


# The quick loop (`-m "not slow"`) reads the paper's InternViT base; the full suite both.
@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=() if name == "internvit" else pytest.mark.slow) for name in KITS],
)
def kit(request) -> Kit:
    return KITS[request.param]


@pytest.fixture(scope="module")
def reference(kit) -> dict[str, torch.Tensor]:
    return load_file(kit.folder / "reference.safetensors")


@pytest.mark.parametrize("index", range(2))
def test_the_checkpoint_answers_as_mcitlibs_own_code(kit, reference, index):
    base_fingerprint(str(kit.base))  # not refused
    with pytest.warns(UserWarning, match=rf"its \d+ tower tensors are not read; the tower is read from {kit.tower}"):
        model = load_base_model(str(kit.base), torch.device("cpu"))  # the checkpoint's own copy, as LLaVA's code
    inputs = kit.inputs_of(index)
    image_token = load_processor(str(kit.base)).tokenizer.convert_tokens_to_ids("<image>")
    expected = []  # LLaVA's tokenizer_image_token marks the image's place -200; its features fill it
    for token in reference[f"input_ids/{index}"].tolist():
        expected += [image_token] * IMAGE_PATCHES if token == -200 else [token]
    assert inputs["input_ids"][0].tolist() == expected
    torch.testing.assert_close(inputs["pixel_values"], reference[f"pixel_values/{index}"], rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    torch.testing.assert_close(logits, reference[f"logits/{index}"], rtol=0, atol=1e-6)  # float32 rounding
    assert generated.tolist() == reference[f"generated/{index}"].tolist()
    decoded = load_processor(str(kit.base)).batch_decode([generated], skip_special_tokens=True)[0].strip()
    assert decoded == kit.cases[index]["response"]


@pytest.mark.parametrize("task", ["task_a", "task_b"])
def test_an_mcitlib_lora_run_answers_as_under_mcitlibs_own_code(kit, reference, task):
    """A LoRA run as MCITlib's train.py saves it (adapter_model.bin, its projector in
    non_lora_trainables.bin), read as it is, folded in or not: what MCITlib's loader (the LoRA
    merged in, the projector replaced) gave."""
    from many_cli.infer import InferOptions, load_task_adapter

    for fold in (True, False):
        adapted = load_task_adapter(
            str(kit.base), kit.folder / f"adapter_{task}", InferOptions(device="cpu", fold=fold)
        ).model
        for index in range(len(kit.cases)):
            inputs = kit.inputs_of(index)
            with torch.no_grad():
                logits = adapted(**inputs).logits[0]
                generated = adapted.generate(**inputs, max_new_tokens=4, do_sample=False)[
                    0, inputs["input_ids"].shape[1] :
                ]
            # two float32 runs, each within 3.1e-6 of the float64 one here (measured): rounding
            torch.testing.assert_close(logits, reference[f"{task}_logits/{index}"], rtol=0, atol=1e-5)
            assert generated.tolist() == reference[f"{task}_generated/{index}"].tolist()
            assert not torch.allclose(reference[f"{task}_logits/{index}"], reference[f"logits/{index}"], atol=1e-2)


def test_two_lora_runs_merge_route_and_answer(kit, tmp_path, capsys):
    """Two MCITlib tasks, each with its own projector: statistics on each task's own image, a
    merge, each image routed to its task, and answered by that task's own LoRA (--lm-routing
    experts) as the task's run answers alone."""
    adapters, merged = merge_recorded_tasks(capsys, kit.base, kit.folder, kit.cases, tmp_path)
    for index, adapter in enumerate(adapters):
        code, out, err = run_cli_output(capsys, *kit.ask(index), "--merged", merged, "--lm-routing", "experts")
        assert code == 0, err
        routed = json.loads(out)
        assert routed["routing"] == {"task_a": float(index == 0), "task_b": float(index == 1)}
        code, out, err = run_cli_output(capsys, *kit.ask(index), "--adapter", adapter)
        assert code == 0, err
        assert routed["prediction"] == json.loads(out)["prediction"] and routed["prediction"], (routed, out)


def test_pickled_weights_fingerprint_as_the_same_weights_in_safetensors(tmp_path):
    """The base's identity does not depend on how its weights are stored: its pickled shards and
    the same tensors written as safetensors by safetensors itself give one fingerprint."""
    from many_cli.tensorfiles import weights_fingerprint

    shards = sorted(BASE.glob("pytorch_model-*.bin"))
    converted = []
    for shard in shards:
        tensors = torch.load(shard, map_location="cpu", weights_only=True)
        converted.append(tmp_path / shard.with_suffix(".safetensors").name)
        save_file({key: value.contiguous() for key, value in tensors.items()}, converted[-1])
    assert weights_fingerprint(shards) == weights_fingerprint(converted)
    changed = load_file(converted[0])
    first = sorted(changed)[0]
    changed[first] = changed[first] + 1
    save_file(changed, converted[0])
    assert weights_fingerprint(shards) != weights_fingerprint(converted)


def copied_base(tmp_path: Path, **config) -> Path:
    base = shutil.copytree(BASE, tmp_path / "base")
    shutil.copytree(TOWER, tmp_path / TOWER.name)
    shutil.copytree(TOWER, tmp_path / "vit-huge")  # InternViT's files under a name that is not InternViT's
    saved = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**saved, **config}))
    return base


@pytest.mark.parametrize(
    "change, fault",
    [
        (
            {"mm_vision_tower": "../elsewhere/InternViT-6B-224px"},
            "its mm_vision_tower '../elsewhere/InternViT-6B-224px' is no model folder here",
        ),
        ({"mm_vision_tower": "../vit-huge"}, "is neither InternViT-6B (by its name"),
        ({"mm_projector_type": "linear"}, "its projector 'linear' is not mlp2x_gelu"),
        ({"image_aspect_ratio": "anyres"}, "its image_aspect_ratio 'anyres' is not pad"),
    ],
)
def test_what_is_not_translated_is_refused_in_one_line(change, fault, tmp_path, capsys):
    base = copied_base(tmp_path, **change)
    code, err = run_cli(capsys, "infer", "--model", base, "--adapter", FIXTURES / "adapter_task_a", "--prompt", "hi")
    assert code == 2 and err.count("\n") == 1, err
    assert fault in err and str(base) in err, err


def test_a_pickle_that_is_more_than_tensors_is_refused_before_it_runs(tmp_path, capsys):
    """A shard whose pickle would call a function when unpickled is refused naming it, and the
    function never runs (torch's tensors-only unpickler)."""
    import pickle

    base = copied_base(tmp_path)
    shard = sorted(base.glob("pytorch_model-*.bin"))[0]
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (witness,))

    with open(shard, "wb") as handle:
        pickle.dump({"model.norm.weight": Payload()}, handle)
    code, err = run_cli(capsys, "infer", "--model", base, "--adapter", FIXTURES / "adapter_task_a", "--prompt", "hi")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{shard}: is not a tensors-only torch file" in err, err
    assert not witness.exists()


def test_export_writes_llavas_own_layout_with_the_merge_folded_in(kit, tmp_path, capsys):
    """`many export` of a merge on this base: LLaVA's own keys (what its loader reads, with the
    tower named by its full path), each merged module W + s·B A, the chosen task's projector, every
    other tensor the base's; many reads it back as it read the base. `merge --checkpoint-names`
    does not write this layout yet and says so."""
    adapters = []
    for task in ("task_a", "task_b"):
        adapter = shutil.copytree(kit.folder / f"adapter_{task}", tmp_path / task)
        data = tmp_path / f"{task}.jsonl"
        data.write_text(
            "".join(
                json.dumps({"image": str(kit.folder / c["image"]), "prompt": c["question"]}) + "\n" for c in kit.cases
            )
        )
        assert (
            run_cli(capsys, "stats", "--model", kit.base, "--adapter", adapter, "--data", data, "--device", "cpu")[0]
            == 0
        )
        adapters.append(adapter)
    merged, exported = tmp_path / "merged", tmp_path / "exported"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    code, err = run_cli(
        capsys, "export", "--model", kit.base, "--merged", merged, "--projector", "task_b", "--out", exported
    )
    assert code == 0, err

    base = {}
    for shard in kit.base.glob("pytorch_model-*.bin"):
        base.update(torch.load(shard, map_location="cpu", weights_only=True))
    written = {}
    for shard in exported.glob("model-*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(base)
    lora = load_file(merged / "adapter_model.safetensors")
    settings = json.loads((merged / "adapter_config.json").read_text())
    projector = torch.load(kit.folder / "adapter_task_b" / "non_lora_trainables.bin", weights_only=True)
    folded = 0
    for key, weight in base.items():
        module = key.removesuffix(".weight").replace("model.", "model.language_model.", 1)
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None:
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            scale = settings["lora_alpha"] / (settings.get("rank_pattern") or {}).get(module, settings["r"])
            expected = (weight.double() + scale * b.double() @ a.double()).float()
            torch.testing.assert_close(written[key], expected, rtol=0, atol=1e-6)
            folded += 1
        elif "mm_projector" in key:
            assert torch.equal(written[key], projector[f"base_model.model.{key}"]), key
        else:
            assert torch.equal(written[key], weight), key
    assert folded == 14  # 2 layers × 7 linears
    config = json.loads((exported / "config.json").read_text())
    assert config["mm_vision_tower"] == str(kit.tower.resolve())

    # read back as the base is: the logits of the base with the merged LoRA and task_b's projector
    from peft import PeftModel

    reread = load_base_model(str(exported), torch.device("cpu"))
    adapted = PeftModel.from_pretrained(load_base_model(str(kit.base), torch.device("cpu")), merged).eval()
    inner = adapted.get_base_model().model.multi_modal_projector
    with torch.no_grad():
        for layer, index in (("linear_1", 0), ("linear_2", 2)):
            for parameter in ("weight", "bias"):
                getattr(inner, layer).get_parameter(parameter).copy_(
                    projector[f"base_model.model.model.mm_projector.{index}.{parameter}"]
                )
        for index in range(len(kit.cases)):
            inputs = kit.inputs_of(index)
            torch.testing.assert_close(reread(**inputs).logits, adapted(**inputs).logits, rtol=0, atol=2e-6)

    code, err = run_cli(
        capsys, "merge", adapters[0], "--out", tmp_path / "named", "--checkpoint-names", "--model", kit.base
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "whose names many does not write a merged LoRA in yet" in err, err
    assert not (tmp_path / "named").exists()
