"""blip2: BLIP-2 and InstructBLIP in PyTorch.

    model = blip2.load("DIR")                  # a transformers-format checkpoint directory
    model = blip2.from_preset("blip2-opt-2.7b")  # the architecture with random weights

The public API lives in blip2/api.py; this file only re-exports it. Nothing inside the package imports
`blip2` itself (the layers in docs/architecture.md).
"""

from __future__ import annotations

from .api import __version__, from_bert, from_preset, load, load_lavis
from .config import PRESETS, Blip2Config, ConfigError, LLMConfig, QFormerConfig, VisionConfig

__all__ = ["Blip2Config", "ConfigError", "LLMConfig", "PRESETS", "QFormerConfig", "VisionConfig", "load",
           "load_lavis", "from_bert", "from_preset", "__version__"]
