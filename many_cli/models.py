"""Loading a base model with an adapter, and finding what `many` needs in it by structure:
the LoRA layers PEFT created and, through the family table, the projector CPM routes."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from many_cli import internvl_layout, llava_code
from many_cli import qlora as qlora_scheme
from many_cli.adapters import ADAPTER_CONFIG, BASE_LAYER, PEFT_PREFIX, Adapter, loading_config, read_adapter
from many_cli.errors import InputError
from many_cli.layouts import checkpoint_names, converted_names, module_renames, rename_key, renamer
from many_cli.options import Placement
from many_cli.tensorfiles import WEIGHTS_INDEX, check_tensors, open_safetensors, weight_files, weights_fingerprint

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
# Checkpoints in a maker's own layout, read without their code as a transformers model: each module
# tells its own (config_of), refuses what it does not translate, and builds, loads and processes.
MAKER_LAYOUTS = (internvl_layout, llava_code)


@contextmanager
def maker_names() -> Iterator[None]:
    """transformers' loaders read every maker's own names while this lasts (`layouts.renamer`
    then maps a checkpoint's or an adapter's keys in those names)."""
    with ExitStack() as stack:
        for layout in MAKER_LAYOUTS:
            stack.enter_context(layout.own_names())
        yield


def refuse_unwritten_layout(base: str) -> None:
    """A base whose maker's layout many reads but does not write (export, --checkpoint-names) is
    refused in one line, before anything is read."""
    maker = maker_layout(base)
    if maker is not None and maker[0].NOT_WRITTEN:
        raise InputError(base, maker[0].NOT_WRITTEN)


def maker_layout(base: str):
    """(the module that reads the base, its config.json) for a maker's own layout, else None."""
    for layout in MAKER_LAYOUTS:
        config = layout.config_of(base)
        if config is not None:
            return layout, config
    return None


def resolve_device(device: str) -> torch.device:
    """The torch device of a checked --device (auto: CUDA when torch sees it)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """The torch dtype of a checked --dtype ("auto": the checkpoint's own)."""
    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def base_fingerprint(base: str, qlora: str = qlora_scheme.NONE) -> str:
    """The base model's identity, "CONFIG-WEIGHTS": sha256 of its config.json as saved, less
    fields that do not change the model (its path, dtype, the transformers version that wrote
    it), and `weights_fingerprint` of its safetensors weights as stored (however sharded); with
    "+SCHEME" for the base as a QLoRA adapter saw it (`--qlora`), which is another model."""
    from transformers import PretrainedConfig

    local = Path(base).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        hint = (
            f"; it holds {ADAPTER_CONFIG}: --model takes the base model, not an adapter"
            if (local / ADAPTER_CONFIG).is_file()
            else ""
        )
        raise InputError(base, f"not a transformers model directory (no config.json){hint}")
    try:
        config, _ = PretrainedConfig.get_config_dict(base)
    except (OSError, ValueError) as error:
        where = "" if local.exists() else "not found here, nor as a Hugging Face Hub id: "
        raise InputError(base, f"{where}no readable config.json ({' '.join(str(error).split())[:200]})") from None
    maker = refuse_untranslated_code(base, config)
    if qlora != qlora_scheme.NONE:
        _check_requantisable(base, config, maker is not None)
    _check_quantised(base, config)
    canonical = json.dumps(_without_volatile(config), sort_keys=True, separators=(",", ":"))
    files = maker[0].weight_paths(base, config) if maker is not None else _weight_files(base)
    requantised = "" if qlora == qlora_scheme.NONE else f"+{qlora}"
    return f"{hashlib.sha256(canonical.encode()).hexdigest()[:16]}-{weights_fingerprint(files)}{requantised}"


def _check_requantisable(base: str, config: dict, maker: bool) -> None:
    """--qlora takes a full-precision base that transformers itself builds."""
    if quantisation(config) is not None:
        raise InputError(base, f"is quantised already ({quantisation(config)}); --qlora takes the full-precision base")
    if maker:  # transformers quantised the maker's own modules (InternLM2's fused wqkv): other blocks
        raise InputError(
            base,
            "--qlora is not available for a checkpoint in its maker's own layout yet (its training "
            "quantised the maker's own modules); give the base without --qlora",
        )


def quantisation(config: dict) -> str | None:
    """What the checkpoint's `quantization_config` says its weights are ("bitsandbytes 4-bit
    nf4"), or None for full-precision weights."""
    settings = config.get("quantization_config")
    if not isinstance(settings, dict):
        return None
    method = str(settings.get("quant_method", "an unnamed method"))
    if method != "bitsandbytes":
        return method
    return (
        f"bitsandbytes 4-bit {settings.get('bnb_4bit_quant_type', 'fp4')}"
        if settings.get("load_in_4bit")
        else ("bitsandbytes 8-bit")
    )


def _check_quantised(base: str, config: dict) -> None:
    """A quantised base is run as transformers loads it, said in one line; without the library
    that loads it, refused in one line saying what to install."""
    import importlib.util
    import warnings

    quantised = quantisation(config)
    if quantised is None:
        return
    if quantised.startswith("bitsandbytes") and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            base,
            f"is quantised ({quantised}); loading it needs bitsandbytes (pip install bitsandbytes), "
            f"or give the full-precision base it was quantised from",
        )
    warnings.warn(  # printed as one line by the command line
        f"{base}: its weights are quantised ({quantised}): many runs it as transformers loads it; "
        f"merges fold into full-precision weights only (README, What many reads: which base a QLoRA adapter wants)",
        stacklevel=3,
    )


def refuse_untranslated_code(base: str, config: dict):
    """The maker's layout `base` is read in (see `maker_layout`), else None; a model that runs its
    own code and is no layout many translates is refused in one line, as is a maker's checkpoint
    with a part many does not translate."""
    maker = maker_layout(base)
    if maker is not None:  # read without its code, translated
        maker[0].check_readable_layout(base, config)
    else:
        refuse_remote_code(base, config)
    return maker


def refuse_remote_code(base: str, config: dict) -> None:
    """A model that runs its own code, in no maker's layout many translates, refused in one line."""
    if "auto_map" in config and maker_layout(base) is None:  # transformers would run its code (and ask first)
        raise InputError(
            base,
            f"is a remote-code model (its config.json maps {', '.join(sorted(config['auto_map']))} "
            f"to its own code, model_type {config.get('model_type')!r}); many runs models "
            f"transformers implements itself (and the makers' layouts it translates: OpenGVLab's "
            f"InternVL-Chat, LLaVA's own code): use the model's transformers-native conversion",
        )


def _weight_files(base: str) -> list[Path]:
    """The base's safetensors files (a hub id's from its cached snapshot, fetched as loading would)."""
    local = Path(base).expanduser()
    if not local.exists():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(base, allow_patterns=["*.safetensors", WEIGHTS_INDEX]))
        except Exception as error:  # noqa: BLE001 - the hub client raises many kinds
            raise InputError(base, f"its weights cannot be fetched ({type(error).__name__}: {error})") from None
    return [local / name for name in weight_files(local)]


def refuse_other_base(recorded_by: Path, recorded: str, base: str, actual: str) -> None:
    """Refuse `base` (fingerprint `actual`) for what `recorded_by` says was built on `recorded`."""
    if recorded == actual:
        return
    (recorded_base, _, recorded_qlora), (actual_base, _, actual_qlora) = recorded.partition("+"), actual.partition("+")
    if recorded_base == actual_base:
        given = f"--qlora {recorded_qlora}" if recorded_qlora else "no --qlora"
        raise InputError(
            recorded_by,
            f"was built on {base} {f'as quantised by --qlora {recorded_qlora}' if recorded_qlora else 'at full precision'}, "
            f"not {f'as --qlora {actual_qlora} gives it' if actual_qlora else 'at full precision'}: give {given}",
        )
    same_config = recorded.partition("-")[0] == actual.partition("-")[0]
    how = "the same config but other weights" if same_config else "another config"
    raise InputError(
        recorded_by,
        f"was built on another base model than {base} ({how}); give the base it was built on, "
        f"or re-run many stats (and the merge) on this one",
    )


def _without_volatile(value):
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items() if key not in _VOLATILE_CONFIG_KEYS}
    return value


def auto_model_classes() -> tuple[type, ...]:
    """The transformers auto classes a base model is tried with, in order: vision-language
    first, then any-modality (audio-language: Qwen2-Audio), then plain language models."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    return AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForCausalLM


def meta_model(base_dir: Path) -> nn.Module:
    """The base model's structure without its weights (on the meta device): its parameter names."""
    from transformers import AutoConfig

    maker = maker_layout(str(base_dir))
    if maker is not None:
        with torch.device("meta"):
            return maker[0].meta_model(str(base_dir), maker[1])
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    for auto in auto_model_classes():
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except ValueError:
            continue
    raise InputError(
        base_dir, "is neither an image-text-to-text, a multimodal nor a causal language model transformers knows"
    )


def checkpoint_module_names(base: str) -> tuple[dict[str, str], dict[str, tuple[str, torch.Tensor]]]:
    """Each module's name in the base model as transformers builds it now -> its name in the
    base's checkpoint, which keeps the layout of the transformers that wrote it (the hub's
    checkpoints, and the language model of any LLaVA-like save, that of transformers < 4.52);
    and the modules the checkpoint holds fused (InternLM2's q, k, v in `wqkv`) -> (the fused
    module, their rows in its weight)."""
    base_dir = Path(base).expanduser()
    if not (base_dir / "config.json").is_file():
        raise InputError(
            base,
            "is not a local model folder: naming modules as its checkpoint does needs the base's own files",
        )
    refuse_unwritten_layout(base)
    keys = []
    for name in weight_files(base_dir):
        with open_safetensors(base_dir / name) as handle:
            keys += handle.keys()
    from many_cli import internlm2

    model = meta_model(base_dir)
    with maker_names():
        names = checkpoint_names(model, keys)
        fused = internlm2.fused_rows(model, converted_names(model, keys))
    suffix = ".weight"
    return (
        {
            name.removesuffix(suffix): key.removesuffix(suffix)
            for name, key in names.items()
            if name.endswith(suffix) and key.endswith(suffix)
        },
        {name.removesuffix(suffix): (key.removesuffix(suffix), rows) for name, (key, rows) in fused.items()},
    )


def _check_gpus(placement: Placement) -> None:
    """The GPUs a --device-map file names must exist here (an index or "cuda:N")."""
    if not isinstance(placement.device_map, dict):
        return
    gpus = torch.cuda.device_count()
    for module, device in placement.device_map.items():
        index = (
            device
            if isinstance(device, int) and not isinstance(device, bool)
            else (int(device[5:]) if isinstance(device, str) and re.fullmatch(r"cuda:\d+", device) else None)
        )
        if device != "cpu" and not (index is not None and 0 <= index < gpus):
            choices = f'"cpu", a GPU index below {gpus} or "cuda:N"' if gpus else '"cpu" (torch sees no GPU)'
            raise InputError(placement.map_file, f"places {module} on {device!r}; use {choices}")


def load_base_model(
    base: str, device: torch.device, placement: Placement = Placement(), qlora: str = qlora_scheme.NONE
) -> nn.Module:
    """The base model in the placement's dtype, on `device` or placed by accelerate as the
    placement's device map says, and as a QLoRA adapter saw it when `qlora` names a scheme.
    `base` is one `base_fingerprint` has checked (a missing or broken base is refused there, in
    one line, before transformers' own error; as is --qlora on a base it does not apply to)."""
    _check_gpus(placement)
    mapped = placement.device_map is not None
    maker = maker_layout(base)
    if maker is not None:
        model = maker[0].load_model(base, maker[1], resolve_dtype(placement.dtype), placement.device_map)
        return (model if mapped else model.to(device)).eval()
    where = {"device_map": placement.device_map} if mapped else {}
    for auto in auto_model_classes():
        try:  # safetensors only: a pickled checkpoint could run code when loaded
            model = auto.from_pretrained(
                base, dtype=resolve_dtype(placement.dtype), use_safetensors=True, trust_remote_code=False, **where
            )
            if isinstance(placement.device_map, dict):
                _check_placed_modules(model, placement.device_map, placement.map_file)
            if qlora != qlora_scheme.NONE:
                qlora_scheme.requantise(model, qlora)
            return (model if mapped else model.to(device)).eval()
        except ValueError as error:
            if mapped and "offload" in str(error):
                raise InputError(
                    base,
                    f"does not fit in the devices --device-map {placement.map_file or placement.device_map} "
                    f"may use, and many does not offload to disk",
                ) from None
            continue
        except OSError as error:
            raise InputError(
                base,
                f"cannot load safetensors model weights (many loads no pickled "
                f".bin checkpoint: {' '.join(str(error).split())[:300]})",
            ) from None
    raise InputError(
        base, "is neither an image-text-to-text, a multimodal nor a causal language model transformers knows"
    )


def load_processor(base: str, padding_side: str = "right"):
    """The base model's processor (a plain language model's tokenizer), padding on `padding_side`;
    a model folder without one is an InputError naming it."""
    from transformers import AutoProcessor

    from many_cli.data import tokenizer_of

    maker = maker_layout(base)
    try:
        if maker is not None:
            processor = maker[0].load_processor(base, maker[1])
        else:
            processor = AutoProcessor.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(
            base,
            f"has no processor or tokenizer transformers can load ({' '.join(str(error).split())[:200]}); "
            f"a model folder needs its tokenizer and processor files beside config.json",
        ) from None
    tokenizer_of(processor).padding_side = padding_side
    return processor


def _check_placed_modules(model: nn.Module, placement: dict[str, Any], path: str) -> None:
    """A map key that names no module of the model places nothing (transformers ignores it):
    most likely a misspelt name, so refuse it rather than leave that part where it fell."""
    names = {name for name, _ in model.named_modules()}
    for module in placement:
        if module not in names:
            tops = ", ".join(name for name, _ in model.named_children())
            raise InputError(
                path,
                f"places {module!r}, which is not a module of this model (its top-level "
                f"modules: {tops}; names are dotted paths from there)",
            )


def apply_adapters(model: nn.Module, base: str, adapters: list[tuple[Path, str]]) -> nn.Module:
    """`model` with each PEFT adapter (directory, name) loaded under its name, the first one
    active. Module names saved under an older transformers layout are mapped onto the model;
    an adapter with a tensor that loads nowhere, or that does not fit, is an InputError naming
    its directory (PEFT itself only warns)."""
    from many_cli import internlm2

    adapted, layout = None, internlm2.head_layout(model)
    for given, name in adapters:
        with internlm2.split_adapter(given, layout) as directory:  # InternLM2's wqkv LoRA as q, k, v
            adapted = _load_adapter(adapted, model, base, directory, name)
    return adapted


def _load_adapter(adapted, model: nn.Module, base: str, directory: Path, name: str):
    """`adapted` (None before the first) with the PEFT adapter `directory` loaded as `name`."""
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
    from safetensors import SafetensorError

    adapter = read_adapter(directory)
    check_tensors(adapter.weights)
    renames = adapter_renames(model, adapter)
    _check_targets(directory, base, model, adapter, renames)
    _check_base_weights(directory, base, model, adapter, renames)
    config = loading_config(adapter, renames)
    key_mapping = {
        f"^{re.escape(key)}$": rename_key(key, renames)
        for key in _saved_keys(adapter)
        if rename_key(key, renames) != key
    }
    try:
        if adapted is None:
            kind = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)  # as from_pretrained picks
            adapted = kind(model, config, adapter_name=name)
        else:
            adapted.add_adapter(name, config)
        loaded = adapted.load_adapter(str(directory), adapter_name=name, key_mapping=key_mapping)
    except SafetensorError as error:
        raise InputError(directory, f"its adapter weights are not a readable safetensors file ({error})") from None
    except (RuntimeError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(directory, f"does not fit the base model {base} ({first_line})") from None
    _check_loaded(directory, base, loaded)
    return adapted


def adapter_renames(model: nn.Module, adapter: Adapter) -> dict[str, str]:
    """Each module the adapter adapts or saves -> its name in `model` (the base, before PEFT wraps
    it), through transformers' renamings of older layouts."""
    with maker_names():  # a maker's own names too (OpenGVLab's mlp1)
        rename = renamer(model)
    return module_renames(rename, adapter.modules, adapter.saved_parameters)


def _saved_keys(adapter: Adapter) -> list[str]:
    """The adapter's tensor keys as PEFT's key mapping sees them (without its prefix)."""
    keys = [f"{module}.lora_{part}.weight" for module in adapter.modules for part in "AB"]
    keys += [f"{module}{BASE_LAYER}" for module in adapter.base_weights]
    return keys + [f"{module}.{parameter}" for module, parameter in adapter.saved_parameters]


def _check_targets(directory: Path, base: str, model: nn.Module, adapter: Adapter, renames: dict[str, str]) -> None:
    """Each module the adapter's tensors name must be a module of the base (PEFT skips the rest)."""
    modules = dict(model.named_modules())
    for saved, kind in [*((m, "lora_A.weight") for m in adapter.modules), *((m, "") for m in adapter.saved_modules)]:
        if renames[saved] not in modules:
            key = f"{saved}.{kind}" if kind else saved
            raise InputError(
                directory,
                f"its tensor {key} loads nowhere in {base} (no module {renames[saved]}); "
                f"adapter saved for another model or a layout many does not map "
                f"(see the README's table of adapter layouts)",
            )


def _check_base_weights(
    directory: Path, base: str, model: nn.Module, adapter: Adapter, renames: dict[str, str]
) -> None:
    """A base weight PEFT saved beside a LoRA (a tied lm_head) must be the base's own: the merge
    keeps LoRA factors only, so a different one (a resized vocabulary) would be lost there."""
    if not adapter.base_weights:
        return
    with open_safetensors(adapter.weights) as handle:
        for module in adapter.base_weights:
            saved = handle.get(f"{PEFT_PREFIX}{module}{BASE_LAYER}")
            own = model.get_submodule(renames[module]).weight
            if saved.shape != own.shape or not torch.equal(saved.to(own.device, own.dtype), own):
                raise InputError(
                    directory,
                    f"carries its own weight for {module}, not the base's ({base}): many "
                    f"merges LoRA factors only; train the adapter without changing it",
                )


def _check_loaded(directory: Path, base: str, loaded) -> None:
    """Every saved tensor must land on the model, and every adapted module get its tensors."""
    if loaded.unexpected_keys:
        key = sorted(loaded.unexpected_keys)[0]
        raise InputError(
            directory,
            f"its tensor {key} loads nowhere in {base} ({len(loaded.unexpected_keys)} "
            f"such); adapter saved for another model or a layout many does not map "
            f"(see the README's table of adapter layouts)",
        )
    if loaded.missing_keys:
        key = sorted(loaded.missing_keys)[0]
        raise InputError(
            directory,
            f"leaves {key} of {base} without weights ({len(loaded.missing_keys)} such); "
            f"adapter saved for another model?",
        )


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The layers PEFT adapted, by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    return {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}


def linear_layers(model: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The base model's own linear layers whose names fully match `pattern` (PEFT's rule for a
    target_modules string); a LoRA layer's inner layers and a saved module's copies are not the
    model's own."""
    wrapped = re.compile(r".*\.(base_layer|lora_[A-Za-z_]+|original_module|modules_to_save)(\.|$).*")
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(pattern, name) and not wrapped.fullmatch(name)
    }


def computes_own_positions(model: nn.Module) -> bool:
    """Whether the model derives its position ids from the attention mask itself (the Qwen-VL
    families' multimodal rope), so that passing 1-D positions would be wrong."""
    return any(hasattr(module, "get_rope_index") for module in model.modules())


def text_layers(model: nn.Module, layers: dict[str, nn.Module]) -> set[str]:
    """Those of `layers` (by name in `model`) that read the token sequence: the language model's
    own and its output layer; the others (a vision or audio tower's) read media features."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        return set(layers)
    inside = {id(module) for module in decoder.modules()} | {id(model.get_output_embeddings())}
    return {name for name, layer in layers.items() if id(layer) in inside}
