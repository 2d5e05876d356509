"""Loading a base model with an adapter, and finding what `many` needs in it by structure:
the LoRA layers PEFT created and the module named `multi_modal_projector`."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
from pathlib import Path

import torch
from torch import nn

from many_cli.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_supported_config
from many_cli.errors import InputError
from many_cli.files import check_tensors

PROJECTOR_NAME = "multi_modal_projector"
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise InputError(None, f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype | str:
    choices = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}
    if dtype not in choices:
        raise InputError(None, f"--dtype must be one of {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def base_fingerprint(base: str) -> str:
    """sha256 of the base model's config.json as saved, less fields that do not change the
    model (its path, dtype, the transformers version that wrote it)."""
    from transformers import PretrainedConfig

    local = Path(base).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        hint = (f"; it holds {ADAPTER_CONFIG}: --model takes the base model, not an adapter"
                if (local / ADAPTER_CONFIG).is_file() else "")
        raise InputError(base, f"not a transformers model directory (no config.json){hint}")
    try:
        config, _ = PretrainedConfig.get_config_dict(base)
    except (OSError, ValueError) as error:
        where = "" if local.exists() else "not found here, nor as a Hugging Face Hub id: "
        raise InputError(base, f"{where}no readable config.json ({' '.join(str(error).split())[:200]})") from None
    canonical = json.dumps(_without_volatile(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _without_volatile(value):
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items() if key not in _VOLATILE_CONFIG_KEYS}
    return value


def load_base_model(base: str, dtype: torch.dtype | str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    base_fingerprint(base)  # a clear error for a missing or broken base before transformers' own
    # Vision-language first, then any-modality (audio-language: Qwen2-Audio), then plain LMs.
    for auto in (AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForCausalLM):
        try:  # safetensors only: a pickled checkpoint could run code when loaded
            model = auto.from_pretrained(base, dtype=dtype, use_safetensors=True)
            return model.to(device).eval()
        except ValueError:
            continue
        except OSError as error:
            raise InputError(base, f"cannot load safetensors model weights (many loads no pickled "
                                   f".bin checkpoint: {' '.join(str(error).split())[:300]})") from None
    raise InputError(base, "is neither an image-text-to-text, a multimodal nor a causal language "
                           "model transformers knows")


def apply_adapters(model: nn.Module, base: str, adapters: list[tuple[Path, str]]) -> nn.Module:
    """`model` with each PEFT adapter (directory, name) loaded under its name, the first one
    active; one that does not fit the base model is an InputError naming its directory."""
    from peft import PeftModel
    from safetensors import SafetensorError

    adapted = None
    for directory, name in adapters:
        check_supported_config(directory)
        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():  # PEFT would fall back to unpickling adapter_model.bin
            raise InputError(weights, "file not found (many reads adapter weights from safetensors only; "
                                      "re-save with safe_serialization=True)")
        check_tensors(weights)
        try:
            if adapted is None:
                adapted = PeftModel.from_pretrained(model, str(directory), adapter_name=name)
            else:
                adapted.load_adapter(str(directory), adapter_name=name)
        except SafetensorError as error:
            raise InputError(directory, f"its adapter weights are not a readable safetensors file ({error})") from None
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(directory, f"does not fit the base model {base} ({first_line})") from None
    return adapted


def load_adapted_model(base: str, adapter: Path, dtype: torch.dtype | str, device: torch.device):
    """base + adapter (its LoRA and its modules_to_save projector), through PEFT."""
    model = load_base_model(base, dtype, device)
    return apply_adapters(model, base, [(adapter, "default")]).to(device).eval()


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The layers PEFT adapted, by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    return {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}


def text_layers(model: nn.Module, layers: dict[str, nn.Module]) -> set[str]:
    """Those of `layers` (by name in `model`) that read the token sequence: the language model's
    own and its output layer; the others (a vision or audio tower's) read media features."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        return set(layers)
    inside = {id(module) for module in decoder.modules()} | {id(model.get_output_embeddings())}
    return {name for name, layer in layers.items() if id(layer) in inside}


def _projector_name(model: nn.Module) -> str | None:
    return next((name for name, _ in model.named_modules() if name.split(".")[-1] == PROJECTOR_NAME), None)


def find_projector(model: nn.Module) -> nn.Module | None:
    """The multimodal projector, found by its module name, whatever the model class."""
    name = _projector_name(model)
    return None if name is None else model.get_submodule(name)


def replace_projector(model: nn.Module, replacement: nn.Module) -> None:
    """Put `replacement` where the model's multi_modal_projector was."""
    name = _projector_name(model)
    if name is None:
        raise ValueError("the model has no multi_modal_projector")
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, PROJECTOR_NAME, replacement)


def crops_per_image(model: nn.Module, pixel_values: torch.Tensor | None, image_sizes) -> list[int] | None:
    """How many crops of each image the projector will see as separate rows, for models that cut
    images into a grid of crops (LLaVA-NeXT, LLaVA-OneVision: 5-D pixel values and the model's
    own `image_size_to_num_patches` rule); None for models that give one row per image."""
    config = getattr(model, "config", None)
    rule = getattr(sys.modules[type(model).__module__], "image_size_to_num_patches", None)
    if pixel_values is None or pixel_values.dim() != 5 or image_sizes is None or rule is None:
        return None
    return [rule(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                 patch_size=config.vision_config.image_size) for size in image_sizes]


def track_crops(model: nn.Module, target: nn.Module | object) -> None:
    """Whenever the module that owns the projector encodes images (`get_image_features`, called
    by forward and by generate alike), tell `target` (a RoutedProjector or a prototype sum) how
    many projector rows belong to each image."""
    name = _projector_name(model)
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if name and "." in name else model
    encode = getattr(owner, "get_image_features", None)
    if encode is None:
        return
    signature = inspect.signature(encode)

    @functools.wraps(encode)  # generate() inspects its signature
    def get_image_features(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        target.rows_per_image = crops_per_image(owner, bound.get("pixel_values"), bound.get("image_sizes"))
        return encode(*args, **kwargs)

    owner.get_image_features = get_image_features
