"""blip2: BLIP-2 and InstructBLIP in PyTorch.

    model = blip2.load("DIR")                  # a transformers-format checkpoint directory
    model = blip2.from_preset("blip2-opt-2.7b")  # the architecture with random weights
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Blip2Config, ConfigError, LLMConfig, PRESETS, QFormerConfig, VisionConfig  # noqa: E402


def load(path, dtype=None, device=None, config=None):
    """Load a checkpoint directory in the transformers format (Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration)."""
    from .checkpoint import load_pretrained

    return load_pretrained(path, dtype=dtype, device=device)


def from_preset(name: str, device=None, dtype=None, **overrides):
    """A model with a public checkpoint's architecture and random weights (device="meta": no memory)."""
    from .model import Blip2Model

    return Blip2Model.from_config(Blip2Config.from_preset(name, **overrides), device=device, dtype=dtype)


__all__ = ["Blip2Config", "ConfigError", "LLMConfig", "PRESETS", "QFormerConfig", "VisionConfig", "load",
           "from_preset", "__version__"]
