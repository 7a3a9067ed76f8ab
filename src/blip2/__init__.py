"""blip2: BLIP-2 and InstructBLIP in PyTorch.

    model = blip2.load("DIR")                  # a transformers-format checkpoint directory
    model = blip2.from_preset("blip2-opt-2.7b")  # the architecture with random weights

The public API lives in blip2/api.py and blip2/config.py; this file only names it. The names are resolved on
first use (module `__getattr__`, PEP 562), so importing a submodule (`blip2.cli` for `blip2 --help`) does not
import torch and transformers. Nothing inside the package imports `blip2` itself (docs/architecture.md).
"""

from __future__ import annotations

import importlib

_PUBLIC = {  # name -> the module that defines it
    "load": "api", "load_lavis": "api", "from_bert": "api", "from_preset": "api", "__version__": "api",
    "Blip2Config": "config", "ConfigError": "config", "LLMConfig": "config", "PRESETS": "config",
    "QFormerConfig": "config", "VisionConfig": "config",
}

__all__ = ["Blip2Config", "ConfigError", "LLMConfig", "PRESETS", "QFormerConfig", "VisionConfig", "load",
           "load_lavis", "from_bert", "from_preset", "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'blip2' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
