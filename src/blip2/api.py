"""The public API: every way to get a model. `blip2/__init__.py` re-exports it.

    blip2.load(path)                    a transformers-format directory, a `blip2 train` run or a LAVIS .pth
    blip2.from_preset(name)             a public checkpoint's architecture with random weights
    blip2.from_bert(bert_dir, vision)   a stage-1 model whose Q-Former starts from a BERT-family checkpoint

This is the layer that builds models from files: the converters below it (checkpoint.py, convert_lavis.py,
convert_bert.py) translate weights and never import the model (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights

from .checkpoint import NOT_IN_HF, find_checkpoint, load_into, read_checkpoint
from .config import Blip2Config, ConfigError, VisionConfig
from .convert_bert import init_qformer_from_bert
from .convert_lavis import fill_from_lavis, read_lavis_checkpoint
from .model import Blip2Model
from .processing import ImageProcessor, Processor
from .stage1 import add_decoder_token, stage1_config

__version__ = "0.1.0"


def load(path, dtype=None, device=None, config=None, vit=None, llm=None) -> Blip2Model:
    """Load a checkpoint (the forms `blip2.checkpoint.find_checkpoint` accepts, as every command does):

    - a directory in the transformers format (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
      InstructBlipForConditionalGeneration);
    - a training run's directory (its exported `model/` is loaded);
    - a LAVIS `.pth` file: `config` (a preset name, a Blip2Config or a transformers-style config.json path)
      describes the architecture; `vit` (an eva_vit_g.pth-style file) and `llm` (a transformers directory) supply
      the frozen towers the file does not hold (see `load_lavis`).
    """
    path = find_checkpoint(path)
    if path.suffix in (".pth", ".pt"):
        if config is None:
            raise ConfigError(f"{path}: a LAVIS checkpoint holds no architecture; pass config= (a preset name, "
                              f"e.g. 'blip2-itm-vit-g', or a config.json path)")
        return load_lavis(path, config, vit=vit, llm=llm, dtype=dtype, device=device)
    return load_pretrained(path, dtype=dtype, device=device)


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None, device=None) -> Blip2Model:
    """A model from a transformers-format checkpoint directory, with its tokenizers and image processor
    attached when the directory has them."""
    d = Path(directory)
    cfg, weights = read_checkpoint(d)
    with no_init_weights():  # every tensor is overwritten below; skip the random initialisation
        model = Blip2Model(cfg)
    if model.llm is not None:
        model.llm.tie_weights()  # skipped with the initialisation above
    load_into(model, weights, str(d), allow_missing=NOT_IN_HF)
    model.processor = Processor.from_dir(d)
    return _finish(model, dtype, device)


def load_lavis(path: str | Path, config: str | Path | Blip2Config, vit: str | Path | None = None,
               llm=None, strict: bool = True, dtype: torch.dtype | None = None, device=None) -> Blip2Model:
    """A `Blip2Model` from a LAVIS `.pth` checkpoint.

    config: a preset name, a `Blip2Config`, or the path of a config.json (transformers or our own format).
    Parts the file has weights for but the config lacks are switched on (stage-1 heads, the Q-Former's text
    side and LM head), with a warning. vit: an `eva_vit_g.pth`-style file for the frozen ViT (extra blocks are
    dropped, the position table is resized to the configured image size). llm: the LLM's weights (a
    transformers directory, a weight file, a state dict or a module). What no source covers keeps its random
    initial values: `model.load_report` lists the parts (`loaded`, `random`, `partial`) and a warning names them.

    strict=True: keys that have no place in the model, and missing weights other than whole optional parts
    (ViT, LLM, LLM projection), are errors. strict=False skips unknown keys and leaves any missing weight
    random (both reported). Shape mismatches are always errors.
    """
    ckpt = read_lavis_checkpoint(path, config, vit=vit)
    model = Blip2Model(ckpt.cfg)
    fill_from_lavis(model, ckpt, llm=llm, strict=strict)
    return _finish(model, dtype, device)


def from_preset(name: str, device=None, dtype=None, **overrides) -> Blip2Model:
    """A model with a public checkpoint's architecture and random weights (device="meta": no memory)."""
    return Blip2Model.from_config(Blip2Config.from_preset(name, **overrides), device=device, dtype=dtype)


def from_bert(bert_dir: str | Path, vision: VisionConfig | None = None, image_size: int | None = None,
              **kw) -> Blip2Model:
    """A stage-1 model initialised from a BERT-family checkpoint directory (weights + tokenizer, [DEC] added).
    Returns the model with a Processor attached (its tokenizer is the BERT tokenizer)."""
    vision = vision or VisionConfig()
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    add_decoder_token(tok)
    cfg = stage1_config(vision, bert_dir, vocab_size=len(tok), **kw)
    cfg.qformer.bos_token_id = tok.bos_token_id
    model = Blip2Model(cfg)
    init_qformer_from_bert(model.qformer, bert_dir)
    model.processor = Processor(ImageProcessor(image_size=image_size or vision.image_size), tok, padding_side="right")
    return model


def _finish(model: Blip2Model, dtype, device) -> Blip2Model:
    if dtype is not None:
        model.set_dtype(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
