"""BLIP-2 / InstructBLIP: frozen image encoder -> Q-Former -> projection -> frozen LLM (BLIP-2 paper §3.1;
docs/architecture.md has the data path with shapes).

`Blip2Model` covers the three public layouts: 'blip2' (queries -> LLM), 'instructblip' (the instruction enters
the Q-Former with the queries too) and 'blip2-retrieval' (no LLM; ITC/ITM heads). The LLM is a transformers
model (AutoModelForCausalLM / AutoModelForSeq2SeqLM) wrapped, not forked. The model never sees strings: the
text helpers (`caption`, `answer`, `instruct`) go through an attached `Processor`.

`generate`, `caption` (Q-Former decoding for stage-1 models), `losses` (stage 1) and `save_pretrained` delegate
to generation.py, qformer_caption.py, stage1.py and checkpoint.py, which take the model as an argument and never
import this module; models are built from files one layer up, in api.py (docs/architecture.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from . import checkpoint, heads, losses
from .config import Blip2Config
from .generation import GenerationConfig, generate
from .lora import lora_train_mode
from .prompts import CAPTION_INSTRUCTION, VQA_TEMPLATE
from .protocols import original_generation
from .qformer import QFormer
from .qformer_caption import qformer_generate
from .stage1 import stage1_losses
from .vision import build_vision


@dataclass
class Features:
    embeds: torch.Tensor  # Q-Former outputs
    proj: torch.Tensor | None  # normalised projections into the contrastive space (stage-1 heads)


@dataclass
class Blip2Output:
    logits: torch.Tensor  # [B, T, V]: text positions (decoder positions for encoder-decoder LLMs)
    loss: torch.Tensor | None = None
    query_output: torch.Tensor | None = None  # [B, F*Q, H] Q-Former query outputs
    language_model_inputs: torch.Tensor | None = None  # [B, P+F*Q, D] the soft visual prompt (P prefix tokens)


def build_llm(cfg: Blip2Config) -> nn.Module:
    hf = cfg.llm.to_transformers()
    auto = AutoModelForSeq2SeqLM if cfg.llm.is_encoder_decoder else AutoModelForCausalLM
    try:
        llm = auto.from_config(hf)
    except ValueError as e:
        raise ValueError(f"llm: transformers cannot build a {auto.__name__} for model_type "
                         f"{cfg.llm.model_type!r}: {e}") from None
    head, emb = llm.get_output_embeddings(), llm.get_input_embeddings()
    if cfg.llm.hf_config.get("tie_word_embeddings") is False and head is not None and head.weight is emb.weight:
        # transformers 5 always ties T5's head, but Flan-T5 checkpoints have their own
        llm.config.tie_word_embeddings = False
        head.weight = nn.Parameter(head.weight.detach().clone())
    return llm


class Blip2Model(nn.Module):
    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision(cfg.vision)
        width = self.vision.hidden_size
        self.ln_vision = nn.LayerNorm(width, eps=cfg.vision.ln_vision_eps)
        if cfg.qformer.encoder_hidden_size != width:
            cfg.qformer.encoder_hidden_size = width
        self.qformer = QFormer(cfg.qformer)
        H = cfg.qformer.hidden_size
        self.llm = None
        self.language_projection = None
        if cfg.llm is not None:
            self.llm = build_llm(cfg)
            self.language_projection = nn.Linear(H, self.llm.get_input_embeddings().embedding_dim)
        if cfg.stage1_heads:
            self.vision_proj = nn.Linear(H, cfg.image_text_hidden_size)
            self.text_proj = nn.Linear(H, cfg.image_text_hidden_size)
            self.itm_head = nn.Linear(H, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        for head in (self.language_projection, getattr(self, "vision_proj", None), getattr(self, "text_proj", None),
                     getattr(self, "itm_head", None)):
            if head is not None:  # BERT-style init, as the Q-Former (LAVIS / transformers)
                nn.init.normal_(head.weight, std=cfg.qformer.initializer_range)
                nn.init.zeros_(head.bias)
        self.processor = None  # a blip2.processing.Processor, attached by blip2.load when tokenizers are present
        self.set_trainable(vision=cfg.vision_trainable, llm=cfg.llm_trainable)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Blip2Config | str, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> "Blip2Model":
        """Random weights from a config or preset name; device="meta" builds without allocating memory."""
        if isinstance(cfg, str):
            cfg = Blip2Config.from_preset(cfg)
        if device is not None:
            with torch.device(device):
                model = cls(cfg)
        else:
            model = cls(cfg)
        if dtype is not None:
            model.set_dtype(dtype)
        return model

    def set_trainable(self, vision: bool = False, llm: bool = False) -> None:
        """Freezing is explicit: frozen towers get requires_grad=False and stay in eval mode."""
        self.vision_trainable, self.llm_trainable = vision, llm
        self.vision.requires_grad_(vision)
        if self.llm is not None:
            self.llm.requires_grad_(llm)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Blip2Model":
        super().train(mode)
        if not self.vision_trainable:
            self.vision.eval()
        if self.llm is not None and not self.llm_trainable:
            self.llm.eval()
        lora_train_mode(self, mode)  # adapters' dropout inside the frozen towers follows the mode
        return self

    def set_dtype(self, dtype: torch.dtype) -> "Blip2Model":
        """Cast for inference: in fp16 the Q-Former (and its queries) stay fp32, as transformers does, because
        its post-LN activations overflow fp16; bf16 and fp32 cast everything."""
        self.to(dtype)
        if dtype == torch.float16:
            self.qformer.float()
        return self

    def unique_parameters(self):
        """Parameters with tied tensors counted once."""
        seen = set()
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n.endswith("query_tokens")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.qformer.set_grad_checkpointing(enable)
        if self.llm is not None:
            if enable:
                self.llm.gradient_checkpointing_enable()
            else:
                self.llm.gradient_checkpointing_disable()

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    @property
    def num_query_tokens(self) -> int:
        return self.cfg.num_query_tokens

    # -------------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen encoder + ln_vision: [B, 3, H, W] -> [B, N, Dv]. Precomputed encoder outputs [B, N, Dv] (the
        frozen-feature cache of `blip2 cache-features`) skip the encoder and go through ln_vision only."""
        dtype = self.ln_vision.weight.dtype
        if pixel_values.ndim == 3 and pixel_values.shape[-1] == self.ln_vision.normalized_shape[0]:
            return self.ln_vision(pixel_values.to(dtype))
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W] (or [B, F, 3, H, W]), got {list(pixel_values.shape)}")
        with torch.set_grad_enabled(self.vision_trainable and torch.is_grad_enabled()):
            feats = self.vision(pixel_values.to(dtype))
        return self.ln_vision(feats.to(dtype))

    def query_features(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                       qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Q-Former query outputs [B, F*Q, H] for images [B, 3, H, W] or videos [B, F, 3, H, W] (each frame goes
        through the encoder and Q-Former; the frames' queries are concatenated). With qformer_input_ids (the
        InstructBLIP instruction) the text joins the queries under the bidirectional mask."""
        frames = 1
        if pixel_values.ndim == 5:
            B, frames = pixel_values.shape[:2]
            pixel_values = pixel_values.flatten(0, 1)  # (B*F, 3, H, W)
            if qformer_input_ids is not None:
                qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)
                if qformer_attention_mask is not None:
                    qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        image = self.encode_image(pixel_values)
        # without qformer_input_ids an InstructBLIP Q-Former sees only the queries: BLIP-2 behaviour (the InstructBLIP
        # paper's ablation without instruction-aware features)
        out = self.qformer(image, input_ids=qformer_input_ids, text_mask=qformer_attention_mask, mode="itm")
        q = out.query_output  # (B*F, Q, H)
        if frames > 1:
            q = q.reshape(-1, frames * q.shape[1], q.shape[2])  # (B, F*Q, H)
        return q

    def visual_prompts(self, pixel_values: torch.Tensor, qformer_input_ids=None, qformer_attention_mask=None):
        """(query outputs [B, F*Q, H], soft visual prompt [B, P + F*Q, D_llm] in the LLM's dtype), where the
        P = len(cfg.llm_prefix_ids) embeddings of the prefix tokens (usually none) come first."""
        if self.llm is None:
            raise ValueError("this checkpoint has no language model (architecture 'blip2-retrieval')")
        q = self.query_features(pixel_values, qformer_input_ids, qformer_attention_mask)
        proj = self.language_projection
        vis = proj(q.to(proj.weight.dtype))  # (B, F*Q, D)
        if self.cfg.llm_prefix_ids:
            ids = torch.tensor(self.cfg.llm_prefix_ids, device=vis.device).expand(vis.shape[0], -1)
            vis = torch.cat([self.llm.get_input_embeddings()(ids).to(vis.dtype), vis], dim=1)  # (B, P+F*Q, D)
        return q, vis

    # ---------------------------------------------------------------------------------------- LLM inputs
    def _strip_placeholders(self, input_ids, attention_mask, labels, n_visual: int):
        """Drop transformers-processor image placeholder tokens (`image_token_index`) from the text."""
        tok = self.cfg.image_token_index
        if tok is None or input_ids is None:
            return input_ids, attention_mask, labels
        is_img = input_ids == tok
        if not is_img.any():
            return input_ids, attention_mask, labels
        counts = is_img.sum(1)
        if not bool((counts == n_visual).all()):
            raise ValueError(f"input_ids carry {counts.tolist()} image placeholder tokens ({tok}) per row; "
                             f"expected {n_visual} (num_query_tokens x frames) or none")
        keep = ~is_img
        T = input_ids.shape[1] - n_visual

        def strip(x):
            return x[keep].view(x.shape[0], T) if x is not None and x.shape == input_ids.shape else x

        return strip(input_ids), strip(attention_mask), strip(labels)

    def _llm_inputs(self, pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask,
                    labels=None):
        q, vis = self.visual_prompts(pixel_values, qformer_input_ids, qformer_attention_mask)
        B, n_vis = vis.shape[:2]
        n_prefix = len(self.cfg.llm_prefix_ids or ())
        input_ids, attention_mask, labels = self._strip_placeholders(input_ids, attention_mask, labels,
                                                                     n_vis - n_prefix)
        if input_ids is None:
            input_ids = torch.zeros(B, 0, dtype=torch.long, device=vis.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds = self.llm_inputs_embeds(vis, input_ids)  # (B, F*Q + T, D)
        mask = torch.cat([torch.ones(B, n_vis, dtype=attention_mask.dtype, device=vis.device), attention_mask], 1)
        return q, vis, input_ids, inputs_embeds, mask, labels

    def llm_inputs_embeds(self, visual_prompt: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The LLM input: the soft visual prompt [B, P, D] (`visual_prompts`), then the embedded text ids [B, T]
        (text only, no placeholders) -> [B, P + T, D] in the embeddings' dtype."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        return torch.cat([visual_prompt.to(embeds.dtype), embeds], dim=1)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                qformer_input_ids: torch.Tensor | None = None, qformer_attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                loss_only: bool = False) -> Blip2Output:
        """LLM logits for the text positions (`input_ids` are text only; transformers-processor placeholder
        tokens are accepted and dropped). With `labels` ([B, T] aligned with `input_ids`, -100 = ignore) the
        loss is the shifted LM loss (decoder-only) or the decoder loss (encoder-decoder).

        loss_only=True (training): a decoder-only LLM with a plain output head applies the head at the labelled
        positions only (the same loss, without the [B, T, vocab] logits); `logits` is then None."""
        q, vis, input_ids, inputs_embeds, mask, labels = self._llm_inputs(
            pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask, labels)
        n_vis = vis.shape[1]
        if self.cfg.is_encoder_decoder:
            out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                           decoder_attention_mask=decoder_attention_mask, labels=labels)
            return Blip2Output(logits=out.logits, loss=out.loss, query_output=q, language_model_inputs=vis)
        if loss_only and labels is not None and self.llm.config.model_type in _PLAIN_HEAD_LLMS:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {list(labels.shape)} must have the shape of the text input_ids "
                                 f"{list(input_ids.shape)}")
            hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
            hidden = hidden[:, n_vis - 1:-1]  # (B, T, D): position t predicts labels[:, t]
            keep = labels.to(hidden.device) != -100
            logits = self.llm.get_output_embeddings()(hidden[keep])  # (K, V), K = labelled tokens
            loss = F.cross_entropy(logits.float(), labels.to(hidden.device)[keep])
            return Blip2Output(logits=None, loss=loss, query_output=q, language_model_inputs=vis)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask)
        logits = out.logits[:, n_vis:]  # (B, T, V): text positions only
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {list(labels.shape)} must have the shape of the text input_ids "
                                 f"{list(input_ids.shape)}")
            # the last visual position predicts the first text token, as in LAVIS and transformers
            loss = causal_lm_loss(out.logits[:, n_vis - 1:-1], labels)
        return Blip2Output(logits=logits, loss=loss, query_output=q, language_model_inputs=vis)

    # ---------------------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None, **generation: Any) -> torch.Tensor:
        """New token ids [B * num_return_sequences, N]. `input_ids` is the (left-padded) text prompt; without
        one, decoder-only LLMs start from BOS. Generation settings: see blip2.generation.GenerationConfig."""
        if self.llm is None:
            raise ValueError("this checkpoint has no language model; use Q-Former captioning or the ITM/ITC heads")
        hf = self.llm.config
        if input_ids is None and not self.cfg.is_encoder_decoder:
            bos = hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id
            input_ids = torch.full((pixel_values.shape[0], 1), bos, dtype=torch.long, device=self.device)
        q, vis, input_ids, inputs_embeds, mask, _ = self._llm_inputs(
            pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask)
        generation.setdefault("eos_token_id", hf.eos_token_id)
        generation.setdefault("pad_token_id", hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
        if self.cfg.is_encoder_decoder:
            generation.setdefault("decoder_start_token_id", hf.decoder_start_token_id)
        gcfg = GenerationConfig(**generation)
        prompt_ids = None
        if not self.cfg.is_encoder_decoder and self.cfg.image_token_index is not None:
            # what transformers' generate sees as the prompt: placeholders then the text (repetition penalty)
            ph = torch.full(vis.shape[:2], self.cfg.image_token_index, dtype=torch.long, device=vis.device)
            prompt_ids = torch.cat([ph, input_ids], dim=1)
        return generate(self.llm, inputs_embeds, mask, gcfg, input_ids=prompt_ids)

    # ------------------------------------------------------------------------------------- text helpers
    def need_processor(self):
        """The attached Processor, or a clear error when the checkpoint came without tokenizer files."""
        if self.processor is None:
            raise ValueError("no tokenizer is attached to this model: load it from a directory with tokenizer "
                             "files (blip2.load) or set model.processor = blip2.processing.Processor(...)")
        return self.processor

    def pixel_values(self, images) -> torch.Tensor:
        """Pixel values on the model's device from a tensor, or from images / paths through the processor."""
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        return self.need_processor().images(images).to(self.device)

    def _generate_text(self, images, prompts: list[str] | None, qformer_texts: list[str] | None, **generation):
        proc = self.need_processor()
        pixels = self.pixel_values(images)
        ids = mask = q_ids = q_mask = None
        if prompts is not None:
            ids, mask = proc.tokenize_prompts(prompts)
            ids, mask = ids.to(self.device), mask.to(self.device)
        if qformer_texts is not None and self.cfg.architecture == "instructblip":
            q_ids, q_mask = proc.tokenize_qformer(qformer_texts, max_length=self.cfg.qformer_max_text_len)
            q_ids, q_mask = q_ids.to(self.device), q_mask.to(self.device)
        out = self.generate(pixels, input_ids=ids, attention_mask=mask, qformer_input_ids=q_ids,
                            qformer_attention_mask=q_mask, **generation)
        return proc.decode(out)

    def generation_defaults(self, kind: str) -> dict:
        """The settings `caption` / `answer` / `instruct` (kind) use where their keyword arguments are silent: the
        original implementation's for this architecture and LLM family (blip2.protocols.original_generation; e.g.
        InstructBLIP: 5 beams, up to 256 new tokens, repetition penalty 1.5). Keyword arguments override them;
        `do_sample=True` without `num_beams` samples one sequence (the original would beam-sample). A model
        without an LLM (a retrieval checkpoint) has none."""
        if self.llm is None:
            return {}
        return original_generation(self.cfg, kind)

    def _with_defaults(self, kind: str, generation: dict) -> dict:
        merged = {**self.generation_defaults(kind), **generation}
        if generation.get("do_sample") and "num_beams" not in generation:
            merged["num_beams"] = 1
        return merged

    def caption(self, images, prompt: str | None = None, **generation) -> list[str]:
        """Captions for a list of images (PIL, paths or a pixel tensor); `prompt` e.g. "a photo of". Unset
        generation settings take `generation_defaults("caption")` (models with an LLM)."""
        if self.llm is None:  # a stage-1 / retrieval model: the Q-Former itself decodes (ITG)
            return self.need_processor().decode(qformer_generate(self, self.pixel_values(images), **generation))
        generation = self._with_defaults("caption", generation)
        n = _batch_len(images)
        prompts = [prompt] * n if prompt else None
        if prompts is None and (self.cfg.is_encoder_decoder or not _adds_bos(self.need_processor().tokenizer)):
            # as in training: the text starts as the tokenizer frames it (no BOS: straight after the visual
            # prompt, whose last position predicts the first word)
            prompts = [""] * n
        if self.cfg.architecture == "instructblip":
            text = prompt or CAPTION_INSTRUCTION
            return self._generate_text(images, [text] * n, [text] * n, **generation)
        return self._generate_text(images, prompts, None, **generation)

    def answer(self, images, questions: list[str] | str, template: str = VQA_TEMPLATE,
               **generation) -> list[str]:
        """Short answers (the zero-shot VQA prompt of the BLIP-2 paper §4.1) to one question per image. Unset
        generation settings take `generation_defaults("answer")` (the original `predict_answers`: up to 10 tokens)."""
        generation = self._with_defaults("answer", generation)
        questions = [questions] if isinstance(questions, str) else list(questions)
        prompts = [template.format(q) for q in questions]
        return self._generate_text(images, prompts, prompts, **generation)

    def instruct(self, images, instructions: list[str] | str, **generation) -> list[str]:
        """Follow one free-form instruction per image (InstructBLIP: the instruction also enters the Q-Former).
        Unset generation settings take `generation_defaults("instruct")`."""
        generation = self._with_defaults("instruct", generation)
        instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        return self._generate_text(images, instructions, instructions, **generation)

    # -------------------------------------------------------------------------------- stage-1 heads (ITM/ITC)
    def _need_heads(self):
        if not self.cfg.stage1_heads:
            raise ValueError("this checkpoint has no stage-1 heads (vision_proj/text_proj/itm_head); "
                             "load a Blip2ForImageTextRetrieval or stage-1 checkpoint")

    def itm_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image-text matching logits [B, 2] for pairs row by row (itm_head averaged over the query outputs)."""
        self._need_heads()
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"itm_logits pairs rows: {pixel_values.shape[0]} images vs {input_ids.shape[0]} texts")
        image = self.encode_image(pixel_values)
        out = self.qformer(image, input_ids=input_ids, text_mask=attention_mask, mode="itm")
        return heads.itm_logits(self.itm_head, out.query_output)  # (B, 2)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised projected query outputs [B, Q, D_itc]."""
        self._need_heads()
        q = self.qformer(self.encode_image(pixel_values)).query_output
        return heads.project_image(self.vision_proj, q)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised projected [CLS] outputs of the text-only pass [B, D_itc]."""
        self._need_heads()
        out = self.qformer(None, input_ids=input_ids, text_mask=attention_mask, mode="itc", with_queries=False)
        return heads.project_text(self.text_proj, out.text_output)

    def itc_scores(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Contrastive similarity [B_img, B_txt]: max over queries of the cosine similarity (no temperature)."""
        img = self.image_embeds(pixel_values)  # (Bi, Q, D)
        txt = self.text_embeds(input_ids, attention_mask)  # (Bt, D)
        return losses.itc_similarity(img, txt)  # (Bi, Bt)

    # ---------------------------------------------------------------------------------------- features
    def image_features(self, pixel_values: torch.Tensor) -> Features:
        """Query outputs [B, Q, H] and, with stage-1 heads, their normalised projections [B, Q, D_itc]."""
        q = self.qformer(self.encode_image(pixel_values)).query_output
        proj = heads.project_image(self.vision_proj, q) if self.cfg.stage1_heads else None
        return Features(embeds=q, proj=proj)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Features:
        """Text-only Q-Former outputs [B, T, H] and, with stage-1 heads, the normalised [CLS] projection [B, D]."""
        out = self.qformer(None, input_ids=input_ids, text_mask=attention_mask, mode="itc", with_queries=False)
        t = out.text_output
        proj = heads.project_text(self.text_proj, t) if self.cfg.stage1_heads else None
        return Features(embeds=t, proj=proj)

    def multimodal_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> Features:
        """Query outputs [B, Q, H] of the bidirectional pass over [queries; text] (text-conditioned queries)."""
        out = self.qformer(self.encode_image(pixel_values), input_ids=input_ids, text_mask=attention_mask, mode="itm")
        return Features(embeds=out.query_output, proj=None)

    def losses(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        """Stage-1 losses {"itc_loss", "itm_loss", "itg_loss", "loss"} (see blip2.stage1)."""
        return stage1_losses(self, pixel_values, input_ids, attention_mask, image_ids, generator)

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, path, max_shard_size: int = 2 * 1024**3) -> None:
        """Write a transformers-format directory (config.json + safetensors + tokenizer files)."""
        checkpoint.save_pretrained(self, path, max_shard_size=max_shard_size)


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts a token before a text by itself (OPT's </s>, LLaMA's <s>)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return tok("a")["input_ids"][: len(plain)] != plain


# decoder-only LLMs whose logits are exactly output_embeddings(decoder(...).last_hidden_state)
_PLAIN_HEAD_LLMS = ("llama", "opt", "mistral", "qwen2")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of already-aligned predictions: logits[:, t] predicts labels[:, t]; -100 is ignored."""
    logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100)


def _batch_len(images) -> int:
    if isinstance(images, torch.Tensor):
        return images.shape[0]
    if isinstance(images, (list, tuple)):
        return len(images)
    return 1
