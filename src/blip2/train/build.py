"""Build the model and its processor for a run from the `model` section of a run config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..api import from_bert, from_preset, load
from ..checkpoint import read_weights
from ..config import Blip2Config, VisionConfig
from ..convert_bert import init_qformer_from_bert
from ..lavis_load import load_vit_weights
from ..lora import LoraError, add_lora
from ..model import Blip2Model
from ..processing import ImageProcessor, Processor
from ..quantize import QuantizeError, quantize_llm
from ..stage0 import ImageTextAligner, TagPretrainer
from ..stage1 import add_decoder_token
from ..tiny import make_bert_tokenizer, make_gpt2_tokenizer, make_llama_tokenizer, make_t5_tokenizer
from .config import ModelSection, RunConfig, RunConfigError
from .objectives import Objective, objective_for


def _tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise RunConfigError(f"cannot load the tokenizer at {path}: {str(e).splitlines()[0]}") from None


def _tiny_llm_tokenizer(model_type: str, directory: Path):
    make = {"opt": make_gpt2_tokenizer, "llama": make_llama_tokenizer, "t5": make_t5_tokenizer}.get(model_type)
    if make is None:
        raise RunConfigError(f"model.tiny_tokenizers: no tiny tokenizer for LLM type {model_type!r}")
    return _tokenizer(str(make(directory, vocab_size=400)))


def _tiny_bert_tokenizer(directory: Path):
    return _tokenizer(str(make_bert_tokenizer(directory)))


def _llm_hf_config(path: str) -> dict:
    """The LLM's config.json as an llm.hf_config dict."""
    f = Path(path) / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise RunConfigError(f"model.llm_path: cannot read {f}: {e}") from None
    if "model_type" not in d:
        raise RunConfigError(f"model.llm_path: {f} has no model_type")
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        d.pop(k, None)
    return d


def _assembled_config(cfg: RunConfig, objective: type[Objective]) -> Blip2Config:
    """The architecture of a model with random weights: a preset, or assembled from parts (the LLM from
    llm_path, vision and Q-Former from their sections), with the run config's edits laid on."""
    m = cfg.model
    if m.preset:
        d = Blip2Config.from_preset(m.preset).to_dict()
    else:
        arch = m.architecture or objective.architectures[0]
        d = {"architecture": arch, "vision": {}, "qformer": {"use_text": arch == "instructblip"},
             "llm": {"hf_config": _llm_hf_config(m.llm_path)}}
    d["vision"].update(m.vision)
    d["qformer"].update(m.qformer)
    if m.llm:
        if d["llm"] is None:
            raise RunConfigError(f"model.llm: preset {m.preset!r} has no LLM")
        d["llm"]["hf_config"].update(m.llm)
    if objective.retrieval:  # the Q-Former's text side and the stage-1 heads, no LLM
        d.update(architecture="blip2-retrieval", llm=None, stage1_heads=True)
        d["qformer"].update(use_text=True, lm_head=True)
    return Blip2Config.from_dict(d)


def _fit_to_tokenizers(bcfg: Blip2Config, m: ModelSection, llm_tok, q_tok) -> None:
    """Vocabulary sizes, special ids, the image token and the LLM prefix of `bcfg` made to match the tokenizers."""
    if bcfg.llm is not None and llm_tok is not None:
        hf = bcfg.llm.hf_config
        hf["vocab_size"] = max(int(hf.get("vocab_size", 0)), len(llm_tok))
        for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(llm_tok, k)
            if v is not None:
                hf[k] = v
        if bcfg.image_token_index is None or bcfg.image_token_index >= hf["vocab_size"]:
            bcfg.image_token_index = (llm_tok.convert_tokens_to_ids("<image>")
                                      if "<image>" in llm_tok.get_vocab() else None)
    if m.llm_prefix:
        if llm_tok is None:
            raise RunConfigError("model.llm_prefix: the model has no LLM tokenizer")
        bcfg.llm_prefix_ids = llm_tok(m.llm_prefix, add_special_tokens=False).input_ids
    if q_tok is not None:
        bcfg.qformer.vocab_size = max(bcfg.qformer.vocab_size, len(q_tok))
        bcfg.qformer.bos_token_id = q_tok.bos_token_id


def build_model(cfg: RunConfig, work_dir: Path) -> Blip2Model | ImageTextAligner | TagPretrainer:
    """The model to train (with its processor attached), frozen parts frozen, in fp32: one public-API call
    (`blip2.from_bert` / `blip2.load` / `blip2.from_preset`), then the explicit init steps of the `model:`
    section, in this order: LLM weights, the Q-Former from BERT, earlier stages' weights, ViT weights."""
    objective, m = objective_for(cfg.stage), cfg.model
    if objective.encoder_only:
        return _image_encoder_trainer(cfg)
    model = _base_model(cfg, objective, Path(work_dir) / "tokenizers")
    if m.llm_path:
        _load_llm_weights(model, m.llm_path)
    if m.bert and not objective.retrieval:  # the Q-Former straight from BERT (BLIP-2's no-stage-1 ablation)
        init_qformer_from_bert(model.qformer, m.bert)
    for path in ([m.qformer_init] if isinstance(m.qformer_init, str) else m.qformer_init or []):
        _copy_stage1(model, path)
    if m.vit_path and not m.init:  # (a LAVIS init reads vit_path itself)
        load_vit_weights(model, m.vit_path)
    if model.cfg.architecture not in objective.architectures:
        raise RunConfigError(f"stage {cfg.stage} trains a {' or '.join(objective.architectures)} model, got "
                             f"{model.cfg.architecture!r}")
    model.set_trainable(vision=False, llm=False)
    model = model.float()
    if cfg.lora.r:
        _add_lora(cfg, model)
    return model


def _base_model(cfg: RunConfig, objective: type[Objective], tok_dir: Path) -> Blip2Model:
    """The model before the init steps, with its processor: stage 1 from BERT, a checkpoint, or random weights."""
    m = cfg.model
    if objective.retrieval and m.bert:
        return from_bert(m.bert, vision=VisionConfig(**m.vision), image_size=cfg.data.image_size, **m.qformer)
    if m.init:
        model = load(m.init, config=m.config, vit=m.vit_path)
        if model.processor is None:
            model.processor = _processor(cfg, objective, model.cfg, *_tokenizers(cfg, objective, model.cfg, tok_dir))
        return model
    bcfg = _assembled_config(cfg, objective)
    llm_tok, q_tok = _tokenizers(cfg, objective, bcfg, tok_dir)
    _fit_to_tokenizers(bcfg, m, llm_tok, q_tok)
    model = from_preset(bcfg)
    model.processor = _processor(cfg, objective, bcfg, llm_tok, q_tok)
    return model


def _image_encoder_trainer(cfg: RunConfig) -> ImageTextAligner | TagPretrainer:
    """Stage 0: the image encoder with its training head (tags) or against a frozen sentence encoder."""
    m = cfg.model
    tok = _tokenizer(m.qformer_tokenizer or m.bert)
    if m.objective == "tags":
        tag_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in m.tags]
        model = TagPretrainer(VisionConfig(**m.vision), tag_ids, tags=m.tags)
    else:
        model = ImageTextAligner(VisionConfig(**m.vision), m.bert, text_trainable=m.text_trainable,
                                 text_layers=m.text_layers)
    model.processor = Processor(ImageProcessor(image_size=cfg.data.image_size or model.cfg.vision.image_size),
                                tok, padding_side="right")
    return model.float()


def _add_lora(cfg: RunConfig, model: Blip2Model) -> None:
    """LoRA adapters on the parts `lora.on` names; with `lora.quantize` (QLoRA, CUDA) the frozen LLM's linear
    layers become bitsandbytes 4-bit / 8-bit layers first (quantised when the model moves to the GPU)."""
    lo = cfg.lora
    try:
        if lo.quantize:
            if not (torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")):
                raise RunConfigError(f"lora.quantize={lo.quantize}: QLoRA needs a CUDA GPU (bitsandbytes); on "
                                     f"this machine train LoRA on the full-precision LLM (unset lora.quantize)")
            if "llm" not in lo.on:
                raise RunConfigError("lora.quantize: the quantised LLM needs adapters on it (lora.on: [llm, ...])")
            quantize_llm(model, "bnb-" + lo.quantize, device="cuda")
        add_lora(model, lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules or None,
                 on=lo.on)
    except (LoraError, QuantizeError) as e:
        raise RunConfigError(str(e)) from None


def _tokenizers(cfg: RunConfig, objective: type[Objective], bcfg: Blip2Config, tok_dir: Path):
    """(LLM tokenizer, Q-Former tokenizer), each None where the model has no use for it."""
    m = cfg.model
    llm_tok = q_tok = None
    if bcfg.llm is not None:
        path = m.tokenizer or (m.llm_path if not m.preset else None)  # an LLM directory carries its tokenizer
        if path:
            llm_tok = _tokenizer(path)
        elif m.tiny_tokenizers:
            llm_tok = _tiny_llm_tokenizer(bcfg.llm.model_type, tok_dir / "llm")
        else:
            raise RunConfigError("model.tokenizer: give the LLM tokenizer directory (or tiny_tokenizers: true)")
        if m.image_token and "<image>" not in llm_tok.get_vocab():
            llm_tok.add_tokens(["<image>"], special_tokens=True)
    if objective.retrieval or bcfg.architecture == "instructblip":
        if m.qformer_tokenizer:
            q_tok = _tokenizer(m.qformer_tokenizer)
        elif m.tiny_tokenizers:
            q_tok = _tiny_bert_tokenizer(tok_dir / "bert")
        else:
            raise RunConfigError("model.qformer_tokenizer: give the BERT tokenizer directory (or tiny_tokenizers: true)")
        if objective.retrieval:
            add_decoder_token(q_tok)
    return llm_tok, q_tok


def _processor(cfg: RunConfig, objective: type[Objective], bcfg: Blip2Config, llm_tok, q_tok) -> Processor:
    """Stage 1 reads its text with the Q-Former (BERT) tokenizer, right-padded; the other stages with the LLM's
    (left-padded for batched decoding with a decoder-only LLM), the Q-Former tokenizer second."""
    size = cfg.data.image_size or bcfg.vision.image_size
    if objective.retrieval:
        return Processor(ImageProcessor(image_size=size), q_tok, padding_side="right")
    return Processor(ImageProcessor(image_size=size), llm_tok, q_tok,
                     padding_side="right" if bcfg.is_encoder_decoder else "left")


def _copy_stage1(model: Blip2Model, path: str) -> None:
    """Stage 2 starts from stage 1: copy the image encoder, ln_vision, the queries and the Q-Former weights that
    the target has (BLIP-2 drops the text side; InstructBLIP keeps it), and the LLM projection when the source
    has one of the same shape (instruction tuning from a stage-2 result)."""
    src = load(path).state_dict()
    own = model.state_dict()
    parts = ("vision.", "ln_vision.", "qformer.", "query_tokens", "language_projection.")
    copied = 0
    with torch.no_grad():
        for k, v in src.items():
            if k.startswith(parts) and k in own:
                if tuple(v.shape) != tuple(own[k].shape):
                    raise RunConfigError(f"model.qformer_init {path}: {k} has shape {list(v.shape)}, "
                                         f"the model {list(own[k].shape)}")
                own[k].copy_(v)
                copied += 1
    if not copied:
        raise RunConfigError(f"model.qformer_init {path}: no Q-Former weights to copy")


def _load_llm_weights(model: Blip2Model, path: str) -> None:
    """Pretrained LLM weights from a transformers directory (its own keys, no `language_model.` prefix)."""
    state = read_weights(path)
    missing, unexpected = model.llm.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.llm.named_parameters(remove_duplicate=False)} - {n for n, _ in model.llm.named_parameters()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RunConfigError(f"model.llm_path {path}: weights do not match the LLM "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


