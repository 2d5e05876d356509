"""OpenGVLab's own InternVL-Chat checkpoints, read as they are: the fixtures were written by
OpenGVLab's code (tests/fixtures/opengvlab_internvl/make.py, its pins in its header), with what
that code answers; here nothing of it runs. The checkpoint read as transformers' InternVL gives
the remote code's logits, the processor gives its tiles and tokens, greedy decoding its tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from many_cli.data import Record, encode_records, load_image
from many_cli.models import base_fingerprint, load_base_model, load_processor

FIXTURES = Path(__file__).parent / "fixtures" / "opengvlab_internvl"
LANGUAGE_MODELS = {"qwen2": FIXTURES, "internlm2": FIXTURES / "internlm2", "llama": FIXTURES / "llama"}  # one each
INDICES = range(2)  # the cases make.py records


@dataclass(frozen=True)
class Kit:
    """One checkpoint's fixtures: its folder, base and recorded cases."""

    folder: Path
    GREEDY = ("--max-new-tokens", "4", "--device", "cpu")

    @property
    def base(self) -> str:
        return str(self.folder / "base")

    @property
    def atol(self) -> float:
        """Float32 rounding of an adapted model's logits: the InternViT-6B-style fixtures run larger
        hidden states (between the float32 and float64 logits of the same adapted model here:
        1.6e-5 for InternLM2's, 2.4e-5 for Llama's whole-model LoRA, whose float64 logits are
        OpenGVLab's own to 7e-6), Qwen2's under 1e-6."""
        return {"internlm2": 2e-5, "llama": 3e-5}.get(self.folder.name, 2e-6)

    @property
    def cases(self) -> list[dict]:
        return json.loads((self.folder / "reference.json").read_text())

    def infer(self, case: dict) -> list:
        """`many infer` of one recorded case on the base, four greedy tokens, one JSON answer."""
        question, image = case["question"], self.folder / case["image"]
        return ["infer", "--model", self.base, "--image", image, "--prompt", question, "--json", *self.GREEDY]


# The quick loop (`-m "not slow"`) reads InternLM2's checkpoint, the one whose fused `wqkv` and
# own names are translated; the full suite reads every language model.
QUICK_LANGUAGE_MODEL = "internlm2"


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=() if name == QUICK_LANGUAGE_MODEL else pytest.mark.slow) for name in LANGUAGE_MODELS
    ],
)
def kit(request) -> Kit:
    return Kit(LANGUAGE_MODELS[request.param])


@pytest.fixture(scope="module")
def reference(kit) -> dict[str, torch.Tensor]:
    return load_file(kit.folder / "reference.safetensors")


@pytest.fixture(scope="module")
def model(kit):
    base_fingerprint(kit.base)  # not refused as remote code
    return load_base_model(kit.base, torch.device("cpu"))


@pytest.mark.parametrize("index", INDICES)
def test_the_checkpoint_answers_as_opengvlabs_own_code(kit, model, reference, index):
    case = kit.cases[index]
    processor = load_processor(kit.base)
    image = load_image(case["image"], kit.folder / case["image"])
    record = Record(case["image"], (kit.folder / case["image"],), case["question"], None)
    inputs = encode_records(processor, [record], [image], with_answers=False)
    assert inputs["input_ids"][0].tolist() == reference[f"input_ids/{index}"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], reference[f"pixel_values/{index}"], rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    torch.testing.assert_close(logits, reference[f"logits/{index}"], rtol=0, atol=1e-6)  # float32 rounding
    assert generated.tolist() == reference[f"generated/{index}"].tolist()
    # the words chat() answered, from the same tokens (InternLM2's byte pieces included)
    assert processor.batch_decode([generated], skip_special_tokens=True)[0].strip() == case["response"]


def inputs_of(kit: Kit, index: int) -> dict:
    case = kit.cases[index]
    record = Record(case["image"], (kit.folder / case["image"],), case["question"], None)
    return encode_records(
        load_processor(kit.base), [record], [load_image(case["image"], kit.folder / case["image"])], False
    )


@pytest.mark.parametrize("adapter, prefix", [("swift", "adapted_"), ("task_a", "task_a_"), ("task_b", "task_b_")])
@pytest.mark.parametrize("index", INDICES)
def test_an_ms_swift_lora_answers_as_under_opengvlabs_own_code(kit, reference, index, adapter, prefix):
    """ms-swift's LoRA for an internvl_chat model (a regex on `language_model` linears, saved by
    PEFT on the remote model; with `--modules_to_save mlp1`, the task's own projector too) mapped
    onto transformers' InternVL, folded in or not."""
    from many_cli.infer import InferOptions, load_task_adapter

    inputs = inputs_of(kit, index)
    for fold in (True, False):
        adapted = load_task_adapter(
            kit.base, kit.folder / f"adapter_{adapter}", InferOptions(device="cpu", fold=fold)
        ).model
        with torch.no_grad():
            logits = adapted(**inputs).logits[0]
            generated = adapted.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        torch.testing.assert_close(logits, reference[f"{prefix}logits/{index}"], rtol=0, atol=kit.atol)
        assert generated.tolist() == reference[f"{prefix}generated/{index}"].tolist()
    assert not torch.allclose(reference[f"{prefix}logits/{index}"], reference[f"logits/{index}"], atol=1e-2)


def test_stats_merge_and_infer_run_on_the_checkpoint_as_it_is(kit, tmp_path, capsys):
    """The command line on OpenGVLab's layout: statistics of the ms-swift adapter, a one-task merge
    (least squares without ridge: the adapter itself), and its answers equal the adapter's own."""
    import shutil

    from helpers import run_cli, run_cli_output

    adapter = shutil.copytree(kit.folder / "adapter_swift", tmp_path / "swift_task")
    data = tmp_path / "calibration.jsonl"
    data.write_text(
        "".join(
            json.dumps({"image": str(kit.folder / case["image"]), "prompt": case["question"], "answer": "red"}) + "\n"
            for case in kit.cases
        )
    )
    code, err = run_cli(capsys, "stats", "--model", kit.base, "--adapter", adapter, "--data", data, "--device", "cpu")
    assert code == 0, err
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapter, "--out", merged, "--ridge", "0")[0] == 0
    for case in kit.cases:
        ask = kit.infer(case)
        answers = []
        for answering in (["--merged", merged], ["--adapter", adapter]):
            code, out, err = run_cli_output(capsys, *ask, *answering)
            assert code == 0, err
            answers.append(json.loads(out)["prediction"])
        assert answers[0] == answers[1] and answers[0], answers

    # export keeps OpenGVLab's layout (what LMDeploy and vLLM's InternVL-Chat read), the LoRA folded in
    exported = tmp_path / "exported"
    code, err = run_cli(capsys, "export", "--model", kit.base, "--merged", merged, "--out", exported)
    assert code == 0, err
    assert json.loads((exported / "config.json").read_text())["model_type"] == "internvl_chat"
    folded = load_base_model(str(exported), torch.device("cpu"))
    adapted = PeftModel.from_pretrained(load_base_model(kit.base, torch.device("cpu")), merged).eval()
    with torch.no_grad():
        for index in INDICES:
            inputs = inputs_of(kit, index)
            torch.testing.assert_close(folded(**inputs).logits, adapted(**inputs).logits, rtol=0, atol=kit.atol)


@pytest.mark.parametrize(
    "change, fault",
    [
        ({"llm_config": {"architectures": ["Phi3ForCausalLM"]}}, "its language model Phi3ForCausalLM"),
        ({"use_llm_lora": 8}, "it carries a LoRA inside the whole model"),
        ({"template": "vicuna_v1.1"}, "its chat template 'vicuna_v1.1' is none of"),
        ({"ps_version": "v3"}, "its pixel shuffle 'v3' is neither v1 nor v2"),
        (
            {"llm_config": {"architectures": ["InternLM2ForCausalLM"], "rope_scaling": {"type": "yarn", "factor": 4}}},
            "its rope scaling 'yarn' is none of dynamic, linear",
        ),
    ],
)
def test_what_is_not_translated_is_refused_in_one_line(change, fault, tmp_path, capsys):
    import shutil

    kit = Kit(FIXTURES)
    from helpers import run_cli

    base = shutil.copytree(kit.folder / "base", tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (base / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "infer", "--model", base, "--adapter", kit.folder / "adapter_swift", "--prompt", "hi")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{base}: is an OpenGVLab InternVL-Chat checkpoint, but {fault}" in err, err


def test_two_tasks_with_their_own_mlp1_merge_route_and_answer(kit, tmp_path, capsys):
    """Two ms-swift tasks, each with its own projector (mlp1): statistics on each task's own image,
    a merge, and each image routed to its task's projector; answered by that task's own LoRA
    (--lm-routing experts) it says what the task's adapter says alone."""
    from helpers import merge_recorded_tasks, run_cli, run_cli_output

    adapters, merged = merge_recorded_tasks(capsys, kit.base, kit.folder, kit.cases, tmp_path)
    for adapter, case in zip(adapters, kit.cases):
        ask = kit.infer(case)
        code, out, err = run_cli_output(capsys, *ask, "--merged", merged, "--lm-routing", "experts")
        assert code == 0, err
        routed = json.loads(out)
        assert routed["routing"] == {
            "task_a": float(adapter.name == "task_a"),
            "task_b": float(adapter.name == "task_b"),
        }
        code, out, err = run_cli_output(capsys, *ask, "--adapter", adapter)
        assert code == 0, err
        assert routed["prediction"] == json.loads(out)["prediction"], (routed, out)
    # export writes the chosen task's projector under OpenGVLab's own keys
    exported = tmp_path / "exported"
    code, err = run_cli(
        capsys, "export", "--model", kit.base, "--merged", merged, "--projector", "task_b", "--out", exported
    )
    assert code == 0, err
    written = load_file(exported / "model.safetensors")
    saved = load_file(kit.folder / "adapter_task_b" / "adapter_model.safetensors")
    for key in ("mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias"):
        assert torch.equal(written[key], saved[f"base_model.model.{key}"]), key


@pytest.mark.parametrize("index", INDICES)
def test_internvls_whole_model_lora_answers_as_under_its_own_code(kit, reference, index, tmp_path):
    """A checkpoint internvl_chat_finetune.py saved with --use_llm_lora (the whole model, the LoRA
    inside, mlp1 trained): its LoRA (rank R, alpha 2R) and mlp1 taken out as a PEFT adapter give
    what OpenGVLab's code gave with that checkpoint."""
    from many_cli.infer import InferOptions, load_task_adapter
    from many_cli.internvl_layout import write_peft_adapter

    write_peft_adapter(kit.folder / "whole_model_lora", tmp_path / "taken_out")
    adapted = load_task_adapter(kit.base, tmp_path / "taken_out", InferOptions(device="cpu")).model
    inputs = inputs_of(kit, index)
    with torch.no_grad():
        logits = adapted(**inputs).logits[0]
        generated = adapted.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    torch.testing.assert_close(logits, reference[f"whole_model_lora_logits/{index}"], rtol=0, atol=kit.atol)
    assert generated.tolist() == reference[f"whole_model_lora_generated/{index}"].tolist()


def test_a_whole_model_lora_checkpoint_merges_as_it_is_and_nothing_else_may_differ(kit, tmp_path, capsys):
    import shutil

    from helpers import run_cli, run_cli_output
    from safetensors.torch import save_file

    from many_cli.internvl_layout import write_peft_adapter

    whole = shutil.copytree(kit.folder / "whole_model_lora", tmp_path / "internvl_task")
    data = tmp_path / "calibration.jsonl"
    data.write_text(
        "".join(json.dumps({"image": str(kit.folder / c["image"]), "prompt": c["question"]}) + "\n" for c in kit.cases)
    )
    stats = ["stats", "--model", kit.base, "--data", data, "--device", "cpu"]
    code, err = run_cli(capsys, *stats, "--adapter", whole)
    assert code == 0, err
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", whole, "--out", merged, "--ridge", "0")[0] == 0
    write_peft_adapter(whole, tmp_path / "taken_out")
    for case in kit.cases:
        ask = kit.infer(case)
        answers = []
        for answering in (["--merged", merged], ["--adapter", tmp_path / "taken_out"]):
            code, out, err = run_cli_output(capsys, *ask, *answering)
            assert code == 0, err
            answers.append(json.loads(out)["prediction"])
        assert answers[0] == answers[1], answers
    # a tower weight that differs from the base's: more than the LoRA and mlp1 was trained
    weights = load_file(whole / "model.safetensors")
    weights["vision_model.encoder.layers.0.mlp.fc1.weight"] += 0.01
    save_file(weights, whole / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capsys, *stats, "--adapter", whole, "--force")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{whole}: its vision_model.encoder.layers.0.mlp.fc1.weight differs from the base" in err, err


def test_a_tensor_the_translation_does_not_place_is_refused(tmp_path, capsys):
    """Every tensor of the checkpoint must land on transformers' InternVL, and every parameter get
    one: a tensor under a name the translation does not know is one line, not a silent skip."""
    import shutil

    kit = Kit(FIXTURES)
    from helpers import run_cli
    from safetensors.torch import save_file

    base = shutil.copytree(kit.folder / "base", tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    weights["mlp1.9.weight"] = weights.pop("mlp1.3.weight")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capsys, "infer", "--model", base, "--adapter", kit.folder / "adapter_swift", "--prompt", "hi")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{base}: its tensor mlp1.9.weight loads nowhere in transformers' InternVL" in err, err


def test_an_average_merge_keeps_the_adapters_own_names_and_still_loads_and_exports(kit, tmp_path, capsys):
    """`merge --method average` reads no base: the merge keeps the adapters' saved names (OpenGVLab's,
    InternLM2's wqkv fused); infer splits it as it loads, export folds it into the key it names."""
    from helpers import run_cli, run_cli_output

    from many_cli.infer import InferOptions, load_task_adapter

    merged = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", kit.folder / "adapter_swift", "--out", merged, "--method", "average")
    assert code == 0, err
    case = kit.cases[0]
    ask = kit.infer(case)
    answers = []
    for answering in (["--merged", merged], ["--adapter", kit.folder / "adapter_swift"]):
        code, out, err = run_cli_output(capsys, *ask, *answering)
        assert code == 0, err
        answers.append(json.loads(out)["prediction"])
    assert answers[0] == answers[1], answers
    exported = tmp_path / "exported"
    code, err = run_cli(capsys, "export", "--model", kit.base, "--merged", merged, "--out", exported)
    assert code == 0, err
    folded = load_base_model(str(exported), torch.device("cpu"))
    adapted = load_task_adapter(kit.base, kit.folder / "adapter_swift", InferOptions(device="cpu")).model
    with torch.no_grad():
        inputs = inputs_of(kit, 0)
        torch.testing.assert_close(folded(**inputs).logits, adapted(**inputs).logits, rtol=0, atol=kit.atol)


def test_the_merged_lora_in_opengvlabs_own_names_folds_as_todays_export(kit, tmp_path, capsys):
    """`merge --checkpoint-names --model BASE`: the merged LoRA named as the checkpoint names its
    weights (OpenGVLab's names; InternLM2's q/k/v LoRAs as one LoRA on wqkv, A stacked, B by rows),
    for the stacks that serve the original checkpoints. Folded by hand into the checkpoint's own
    tensors it gives what `many export` writes from today's merge, and `infer` answers alike."""
    import shutil

    from helpers import run_cli, run_cli_output

    adapters = []
    for task, case in zip(("task_a", "task_b"), kit.cases):
        adapter = shutil.copytree(kit.folder / f"adapter_{task}", tmp_path / task)
        data = tmp_path / f"{task}.jsonl"
        data.write_text(json.dumps({"image": str(kit.folder / case["image"]), "prompt": case["question"]}) + "\n")
        code, err = run_cli(capsys, "stats", "--model", kit.base, "--adapter", adapter, "--data", data)
        assert code == 0, err
        adapters.append(adapter)
    today, named = tmp_path / "today", tmp_path / "named"
    assert run_cli(capsys, "merge", *adapters, "--out", today)[0] == 0
    code, err = run_cli(capsys, "merge", *adapters, "--out", named, "--checkpoint-names", "--model", kit.base)
    assert code == 0, err
    exported = tmp_path / "exported"
    code, err = run_cli(capsys, "export", "--model", kit.base, "--merged", today, "--out", exported)
    assert code == 0, err
    base = load_file(Path(kit.base) / "model.safetensors")
    written = load_file(exported / "model.safetensors")
    lora = load_file(named / "adapter_model.safetensors")
    config = json.loads((named / "adapter_config.json").read_text())
    modules = sorted({key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in lora})
    assert sorted(config["target_modules"]) == modules
    assert all(f"{module}.weight" in base for module in modules)  # the checkpoint's own names
    fused = [module for module in modules if module.endswith("attention.wqkv")]
    assert len(fused) == (2 if kit.folder.name == "internlm2" else 0)  # one per layer
    assert config["lora_alpha"] == config["r"] and config.get("alpha_pattern") == config.get("rank_pattern")
    for module in modules:
        a, b = lora[f"base_model.model.{module}.lora_A.weight"], lora[f"base_model.model.{module}.lora_B.weight"]
        folded = base[f"{module}.weight"] + b @ a  # scale 1: lora_alpha = r, module by module
        torch.testing.assert_close(folded, written[f"{module}.weight"], rtol=0, atol=1e-6)
    case = kit.cases[0]
    ask = kit.infer(case)
    answers = []
    for merge in (today, named):
        code, out, err = run_cli_output(capsys, *ask, "--merged", merge)
        assert code == 0, err
        answers.append(json.loads(out)["prediction"])
    assert answers[0] == answers[1]
