"""The public API: every way to get a model. `blip2/__init__.py` re-exports it.

    blip2.load(path)                    a transformers-format directory, a `blip2 train` run or a LAVIS .pth
    blip2.load(path, quantize="int8")   the LLM's linear layers quantised while the checkpoint streams in
    blip2.load(path, adapter=DIR)       LoRA adapters (a run's adapter/ directory) applied at load time
    blip2.from_preset(name)             a public checkpoint's architecture with random weights (or a Blip2Config's)
    blip2.from_bert(bert_dir, vision)   a stage-1 model whose Q-Former starts from a BERT-family checkpoint

This is the layer that builds models from files: the converters below it (checkpoint.py, convert_lavis.py,
lavis_load.py, convert_bert.py) translate weights and never import the model (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights

from .checkpoint import (NOT_IN_HF, CheckpointError, find_checkpoint, hf_to_ours, iter_weights, load_into,
                         read_checkpoint, read_config, tied_names)
from .config import Blip2Config, ConfigError, VisionConfig
from .convert_bert import init_qformer_from_bert
from .lavis_load import fill_from_lavis, read_lavis_checkpoint
from .lora import load_adapters
from .model import Blip2Model
from .precision import apply_precision, resolve_policy
from .processing import ImageProcessor, Processor
from .quantize import QuantizeError, check_scheme, quantize_llm, quantize_ready, smooth_int8
from .stage1 import add_decoder_token, stage1_config

__version__ = "0.1.0"


def load(path, dtype=None, device=None, config=None, vit=None, llm=None, quantize: str | None = None,
         adapter=None, precision: str = "auto") -> Blip2Model:
    """Load a checkpoint (the forms `blip2.checkpoint.find_checkpoint` accepts, as every command does):

    - a directory in the transformers format (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
      InstructBlipForConditionalGeneration);
    - a training run's directory (its exported `model/` is loaded);
    - a LAVIS `.pth` file: `config` (a preset name, a Blip2Config or a transformers-style config.json path)
      describes the architecture; `vit` (an eva_vit_g.pth-style file) and `llm` (a transformers directory) supply
      the frozen towers the file does not hold (see `load_lavis`).

    quantize: a `blip2.quantize` scheme for the LLM's linear layers ("int8" on CPU; "bnb-int8" / "bnb-nf4" on
    CUDA; see `load_quantized`). adapter: a LoRA adapter directory (`blip2.lora.save_adapters`, a run's
    `adapter/`), merged into the weights after loading; with `quantize` too, the model is loaded in full
    precision, merged, then quantised (no streaming).
    precision: how `dtype` (fp16 / bf16) is applied (blip2.precision.resolve_policy): "auto" = the original's
    per-module policy on CUDA (ViT fp16 with fp32 LayerNorms; ln_vision, Q-Former, queries, projection fp32; LLM
    in `dtype`) and the plain cast elsewhere; "original" = the policy on any device; "cast" = every weight in
    `dtype` except, in fp16, the Q-Former (`Blip2Model.set_dtype`, the behaviour before the policy).
    """
    path = find_checkpoint(path)
    if path.suffix in (".pth", ".pt"):
        if config is None:
            raise ConfigError(f"{path}: a LAVIS checkpoint holds no architecture; pass config= (a preset name, "
                              f"e.g. 'blip2-itm-vit-g', or a config.json path)")
        model = load_lavis(path, config, vit=vit, llm=llm, device=None if quantize else device)
    elif quantize and adapter is None:
        return load_quantized(path, quantize, dtype=dtype, device=device)
    else:
        model = load_pretrained(path, device=None if quantize else device)
    if adapter is not None:
        load_adapters(model, adapter, merge=True)
    if quantize:
        quantize_llm(model, quantize, device=device)
        return _finish(model, None, device)
    return _finish(model, dtype, device, precision)


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None, device=None,
                    precision: str = "auto") -> Blip2Model:
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
    return _finish(model, dtype, device, precision)


def load_quantized(directory: str | Path, scheme: str, dtype: torch.dtype | None = None, device=None) -> Blip2Model:
    """A transformers-format checkpoint with the LLM's linear layers quantised as the weights stream in: the
    model is built with its parameters on the meta device (no memory), each tensor is read from its shard,
    put in place and, once a linear layer of the LLM has all its weights, that layer is quantised, so the full-
    precision LLM never exists in memory at once (peak ~ quantised model + one tensor + the open shard's pages).
    The Q-Former, projection and image encoder load as usual (fp32, or `dtype` when given)."""
    try:  # deferred: accelerate is an optional extra (quantize); it builds modules with parameters on meta
        from accelerate import init_empty_weights
    except ImportError:
        raise QuantizeError("streaming quantised loading needs accelerate: pip install 'blip2[quantize]'") from None
    d = Path(directory)
    name = check_scheme(scheme, device)
    if name in ("int8", "int8-dynamic") and dtype not in (None, torch.float32):
        raise QuantizeError(f"quantize={name} runs in fp32 (its int8 kernels take fp32 activations); drop "
                            f"dtype={dtype} or use a bitsandbytes scheme on CUDA")
    cfg = read_config(d)
    if cfg.llm is None:
        raise QuantizeError(f"{d}: a {cfg.architecture} model has no LLM to quantise; load it without quantize")
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = Blip2Model(cfg)
    model.llm.tie_weights()  # (accelerate's meta parameters are new objects: the ties are made again)
    aliases, given, done = tied_names(model), set(), set()
    for key, tensor in iter_weights(d):
        ours, unknown = hf_to_ours({key: tensor}, cfg.architecture)
        if unknown:
            raise CheckpointError(f"{d}: weight {key!r} has no place in a {cfg.architecture} model")
        for k, v in ours.items():
            _place(model, k, v, aliases, given, dtype or torch.float32, str(d))
            if k.startswith("llm."):
                quantize_ready(model.llm, name, device=device, done=done)
    missing = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and n not in NOT_IN_HF)
    if missing:
        raise CheckpointError(f"{d}: weights do not match the model: missing {len(missing)}: {missing[:8]}")
    model.llm.requires_grad_(False)
    model.quantized = name
    model.processor = Processor.from_dir(d)
    if name == "int8":  # calibrated on the model as it is, then smoothed from the file's weights (read again)
        smooth_int8(model.eval(), _llm_weights(model, d, cfg.architecture, aliases))
    if device is not None:
        model.to(device)
    return model.eval()


def _llm_weights(model, directory: Path, architecture: str, aliases: dict):
    """(name in model.llm, full-precision weight) of every LLM weight of a checkpoint, streamed again; a
    weight the file leaves to a tied tensor (an output head tied to the embeddings) is that tensor."""
    seen = set()
    for key, tensor in iter_weights(directory):
        for k, v in hf_to_ours({key: tensor}, architecture)[0].items():
            if k.startswith("llm.") and k.endswith(".weight"):
                seen.add(k)
                yield k[len("llm."):-len(".weight")], v.float()
    for k, names in aliases.items():
        tied = [a for a in names if a in seen]
        if k.startswith("llm.") and k.endswith(".weight") and k not in seen and tied:
            yield k[len("llm."):-len(".weight")], model.get_parameter(tied[0])


def _place(model, name: str, value: torch.Tensor, aliases: dict, given: set, dtype: torch.dtype, source: str):
    """Put one loaded tensor into a model built on meta, and into the names tied to it that the file does
    not give themselves (a file that gives both tied names different values unties them)."""
    # an owned copy: safetensors may hand out a view of the mapped file, and a kept view would keep every page
    # of its shard that was read resident
    v = value.to(dtype=dtype if value.is_floating_point() else value.dtype, copy=True)
    if any(a in given for a in aliases.get(name, [])):  # a tied name given again: keep the tie if equal
        mod_name, _, attr = name.rpartition(".")
        cur = model.get_submodule(mod_name)._parameters.get(attr)
        quantised = cur is None or type(cur.data) is not torch.Tensor  # (torchao's tensors are subclasses)
        if quantised or (cur.device.type != "meta" and cur.shape == v.shape and torch.equal(cur, v)):
            given.add(name)
            return
    param = None
    for n in [name] + [a for a in aliases.get(name, []) if a != name and a not in given]:
        mod_name, _, attr = n.rpartition(".")
        mod = model.get_submodule(mod_name)
        old = mod._parameters.get(attr, mod._buffers.get(attr))
        if old is None:  # a layer quantised already from a tied tensor (e.g. the head from the embeddings)
            if n == name and not any(a in given for a in aliases.get(name, [])):
                raise CheckpointError(f"{source}: weight {name!r} has no place in the model")
            continue
        if tuple(old.shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {name}: file {list(v.shape)} vs model {list(old.shape)}")
        if attr in mod._parameters:
            param = param if param is not None else torch.nn.Parameter(v, requires_grad=old.requires_grad)
            mod._parameters[attr] = param  # tied names share one tensor
        else:
            mod._buffers[attr] = v
    given.add(name)


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


def from_preset(name: str | Blip2Config, device=None, dtype=None, **overrides) -> Blip2Model:
    """A model with a public checkpoint's architecture and random weights (device="meta": no memory). `name`
    is a preset name, or a `Blip2Config` (a preset edited, or one assembled from parts) taken as it is."""
    if isinstance(name, Blip2Config):
        if overrides:
            raise ConfigError(f"from_preset: overrides {sorted(overrides)} apply to a preset name, not a Blip2Config")
        return Blip2Model.from_config(name, device=device, dtype=dtype)
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


def _finish(model: Blip2Model, dtype, device, precision: str = "auto") -> Blip2Model:
    """`dtype` by the precision policy (blip2.precision), then `device`, in eval mode."""
    policy = resolve_policy(precision, dtype, device)
    if dtype is not None and policy == "original":
        apply_precision(model, llm_dtype=dtype)
    elif dtype is not None:
        model.set_dtype(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
