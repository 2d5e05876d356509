"""many: merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny)."""

__version__ = "0.1.0"
