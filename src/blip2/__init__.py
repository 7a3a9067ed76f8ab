"""blip2: BLIP-2 and InstructBLIP in PyTorch.

    model = blip2.load("DIR")                  # a transformers-format checkpoint directory
    model = blip2.from_preset("blip2-opt-2.7b")  # the architecture with random weights
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Blip2Config, ConfigError, LLMConfig, PRESETS, QFormerConfig, VisionConfig  # noqa: E402


def load(path, dtype=None, device=None, config=None, vit=None, llm=None):
    """Load a checkpoint.

    - a directory in the transformers format (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
      InstructBlipForConditionalGeneration);
    - a training run's directory (its exported `model/` is loaded);
    - a LAVIS `.pth` file: `config` (a preset name, a Blip2Config or a transformers-style config.json path)
      describes the architecture; `vit` (an eva_vit_g.pth-style file) and `llm` (a transformers directory) supply
      the frozen towers the file does not hold (see blip2.convert_lavis.load_lavis).
    """
    from pathlib import Path

    if Path(path).suffix in (".pth", ".pt"):
        from .convert_lavis import load_lavis

        if config is None:
            raise ConfigError(f"{path}: a LAVIS checkpoint holds no architecture; pass config= (a preset name, "
                              f"e.g. 'blip2-itm-vit-g', or a config.json path)")
        return load_lavis(path, config, vit=vit, llm=llm, dtype=dtype, device=device)
    from .checkpoint import load_pretrained

    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        path = p / "model"  # a `blip2 train` output directory
    return load_pretrained(path, dtype=dtype, device=device)


def from_preset(name: str, device=None, dtype=None, **overrides):
    """A model with a public checkpoint's architecture and random weights (device="meta": no memory)."""
    from .model import Blip2Model

    return Blip2Model.from_config(Blip2Config.from_preset(name, **overrides), device=device, dtype=dtype)


__all__ = ["Blip2Config", "ConfigError", "LLMConfig", "PRESETS", "QFormerConfig", "VisionConfig", "load",
           "from_preset", "__version__"]
