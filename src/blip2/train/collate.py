"""Raw samples -> model inputs: image decoding + augmentation, tokenisation and label masking.

The model never sees strings (STYLE 7): `Collator(kind, ...)(samples)` returns exactly the keyword arguments
of the model call for that stage, plus "skipped":

    stage1    model.losses(pixel_values, input_ids, attention_mask, image_ids)
    stage2    model(pixel_values, input_ids, attention_mask, labels)
    instruct  model(pixel_values, input_ids, attention_mask, labels[, qformer_input_ids, qformer_attention_mask])
    skipped   int64 0-d tensor: samples of this batch dropped for an unreadable image or an empty text.
              The loop pops it and sums it (across workers that is automatic: each batch carries its own
              count; across ranks with an all-reduce). If every sample was bad the batch holds only "skipped".

Text layouts (all int64, right padded; labels -100 where no loss):
  stage1, BERT (Q-Former tokenizer): [CLS] caption [SEP], max 32 tokens.
  stage2, decoder-only (OPT, Llama): [BOS] prompt caption END, END = "\n" for OPT (LAVIS Blip2OPT), EOS otherwise.
      labels = input_ids with BOS + prompt and padding at -100, aligned with input_ids (the model makes the
      last visual position predict the first text token).
  stage2, encoder-decoder (T5): prefix LM. The caption's words are split after word k, k uniform in
      [1, max(1, n_words // 2)] and drawn from (seed, epoch, key): prompt + prefix -> input_ids (+ T5's EOS),
      suffix + EOS -> labels (a one-word caption: empty prefix).
  instruct, decoder-only: [BOS] instruction (truncated on the left to max_len, BOS included) + answer + EOS
      (max_target_len, EOS included); labels on the answer and EOS only.
  instruct, encoder-decoder: instruction (+ EOS, left truncated) -> input_ids; answer + EOS -> labels.
  instruct, Q-Former (when the processor has a Q-Former tokenizer): [CLS] instruction [SEP], truncated on
      the left to 128 -> qformer_input_ids / qformer_attention_mask.
A prompt and the text after it are tokenised as one string (with a space between) and split by character
offsets, so the ids are the tokenizer's own for the full text and the mask boundary is exact.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..processing import ImageError, ImageProcessor, Processor, pad_ids
from .data import seeded_rng, stable_hash
from .transforms import EvalTransform, open_image

log = logging.getLogger(__name__)

KINDS = ("stage1", "stage2", "instruct")
DEFAULT_MAX_LEN = {"stage1": 32, "stage2": 32, "instruct": 128}
DEFAULT_MAX_TARGET_LEN = {"stage1": 0, "stage2": 32, "instruct": 256}
IGNORE = -100
_MAX_LOGGED_SKIPS = 20  # per collator copy (i.e. per DataLoader worker): the count is exact, the log is not

# seeded_rng purposes, so that the image crop and the text split of one sample are independent draws
_IMAGE_RNG, _SPLIT_RNG = 1, 3


def special_frame(tok) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text by itself ([BOS] / [CLS] before, [SEP] / T5's EOS
    after), found by encoding a probe with and without special tokens."""
    probe = "a"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise ValueError(f"cannot find the special tokens of {type(tok).__name__}: {probe!r} -> {full} vs {plain}")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def split_tokens(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + " " + target` (no special tokens), split into (prompt part, target part).

    A token belongs to the target when it starts at or after the end of the prompt's last non-space
    character (a leading-space token like OPT's "Ġa" starts on the separator)."""
    if not prompt:
        return [], _ids(tok, target)
    if not target:
        return _ids(tok, prompt), []
    sep = "" if prompt[-1].isspace() else " "
    boundary = len(prompt.rstrip())
    try:
        enc = tok(prompt + sep + target, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets: tokenise the parts apart
        return _ids(tok, prompt), _ids(tok, target)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n_prompt = next((i for i, (start, _) in enumerate(offsets) if start >= boundary), len(ids))
    return ids[:n_prompt], ids[n_prompt:]


def prefix_split(caption: str, rng: np.random.Generator) -> tuple[str, str]:
    """(prefix, suffix) of a caption cut after word k, k uniform in [1, max(1, n_words // 2)]; a one-word
    caption gives ("", caption)."""
    words = caption.split()
    if len(words) < 2:
        return "", " ".join(words)
    k = int(rng.integers(1, len(words) // 2 + 1))
    return " ".join(words[:k]), " ".join(words[k:])


class Collator:
    """collate_fn for a DataLoader over raw samples (see blip2.train.data); see the module doc for layouts.

    kind: "stage1" | "stage2" | "instruct". processor: a blip2 Processor; stage 1 uses its Q-Former
    tokenizer (else its main tokenizer, which for a stage-1 model is the BERT one). encoder_decoder: the LLM
    is T5-like. image_transform: `f(pil_image, rng) -> [3, S, S]` (TrainTransform for training; default the
    processor's eval resize). prompt: stage-2 text prompt (e.g. "a photo of"). max_len: text / instruction
    tokens (default 32 / 32 / 128); max_target_len: target tokens (T5 stage-2 suffix 32, instruct 256).
    caption_end: stage-2 decoder-only end of caption, "newline" or "eos" (default "newline" for OPT's GPT2
    tokenizer, else "eos"). seed: with each sample's (epoch, key), seeds its augmentation and T5 split.
    image_features: a `feature_cache.FeatureStore`; when given, "pixel_values" holds each sample's cached
    encoder output instead of pixels: [B, N, Dv] (the model then runs only ln_vision on it).
    """

    def __init__(self, kind: str, processor: Processor, encoder_decoder: bool = False, image_transform=None,
                 prompt: str | None = None, max_len: int | None = None, max_target_len: int | None = None,
                 seed: int = 0, caption_end: str | None = None, qformer_max_len: int = 128,
                 image_features=None):
        if kind not in KINDS:
            raise ValueError(f"unknown collator kind {kind!r}; choose one of {KINDS}")
        self.kind, self.processor, self.encoder_decoder = kind, processor, bool(encoder_decoder)
        if image_transform is None or isinstance(image_transform, ImageProcessor):
            image_transform = EvalTransform(image_transform or processor.image_processor)
        self.image_transform = image_transform
        self.image_features = image_features
        self.prompt = (prompt or "").strip() if kind == "stage2" else ""
        if prompt and kind != "stage2":
            raise ValueError(f"prompt is a stage-2 setting; {kind} samples carry their own text")
        self.max_len = int(max_len or DEFAULT_MAX_LEN[kind])
        self.max_target_len = int(max_target_len or DEFAULT_MAX_TARGET_LEN[kind])
        self.seed = int(seed)
        self.qformer_max_len = int(qformer_max_len)

        self.tok = (processor.qformer_tokenizer or processor.tokenizer) if kind == "stage1" else processor.tokenizer
        if self.tok.pad_token_id is None:
            raise ValueError(f"{type(self.tok).__name__} has no pad token (build it through blip2 Processor)")
        self.prefix, self.suffix = special_frame(self.tok)
        self.eos = self.tok.eos_token_id
        if kind != "stage1" and self.eos is None:
            raise ValueError(f"{type(self.tok).__name__} has no EOS token: targets cannot be terminated")
        if caption_end is None:
            caption_end = "newline" if "GPT2" in type(self.tok).__name__ else "eos"
        if caption_end not in ("newline", "eos"):
            raise ValueError(f"caption_end must be 'newline' or 'eos', got {caption_end!r}")
        self.end_ids = _ids(self.tok, "\n") if caption_end == "newline" else [self.eos]
        self.qtok = processor.qformer_tokenizer if kind == "instruct" else None
        if self.qtok is not None:
            self.q_prefix, self.q_suffix = special_frame(self.qtok)
        reserved = len(self.prefix) + len(self.suffix) + (len(self.end_ids) if kind == "stage2" else 0)
        if self.max_len <= reserved:
            raise ValueError(f"max_len={self.max_len} leaves no room for text after {reserved} special tokens")
        self._logged = 0

    # ------------------------------------------------------------------------------------------ samples
    def _rng(self, s: dict, purpose: int) -> np.random.Generator:
        return seeded_rng(self.seed, s.get("epoch", 0), str(s.get("key", s.get("index", 0))), purpose)

    def _skip(self, s: dict, reason: str) -> None:
        if self._logged < _MAX_LOGGED_SKIPS:
            self._logged += 1
            more = " (further skips are counted, not logged)" if self._logged == _MAX_LOGGED_SKIPS else ""
            log.warning("skipping sample %s: %s%s", s.get("key", "?"), reason, more)

    def _load(self, samples: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
        """The usable samples and their pixels [3, S, S] (or cached features [N, Dv]); bad ones are logged
        and dropped."""
        kept, pixels = [], []
        for s in samples:
            text = s.get("text")
            if not isinstance(text, str) or not text.strip():
                self._skip(s, "empty text")
                continue
            try:
                if self.image_features is not None:
                    pixels.append(self.image_features.lookup(s))  # (N, Dv); ImageError if it was unreadable
                else:
                    pixels.append(self.image_transform(open_image(s["image"]), self._rng(s, _IMAGE_RNG)))
            except ImageError as e:
                self._skip(s, str(e))
                continue
            kept.append(s)
        return kept, pixels

    # ------------------------------------------------------------------------------------------- texts
    def _frame(self, body: list[int], max_len: int, keep: str) -> list[int]:
        """prefix + body + suffix within max_len, cutting the body at the end (keep="start") or start."""
        room = max_len - len(self.prefix) - len(self.suffix)
        body = body[:room] if keep == "start" else body[len(body) - room:] if len(body) > room else body
        return self.prefix + body + self.suffix

    def _target(self, text: str) -> list[int]:
        """Target ids: text + EOS within max_target_len (EOS kept)."""
        return _ids(self.tok, text)[:self.max_target_len - 1] + [self.eos]

    def _stage1(self, kept: list[dict]) -> dict:
        rows = [self._frame(_ids(self.tok, s["text"]), self.max_len, keep="start") for s in kept]
        # without an image_id, the key's hash: ids are gathered across ranks, so batch positions would collide
        image_ids = [int(s["image_id"]) if "image_id" in s else stable_hash(str(s.get("key"))) for s in kept]
        ids, mask = pad_ids(rows, self.tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask,
                "image_ids": torch.tensor(image_ids, dtype=torch.long)}

    def _decoder_only(self, pairs: list[tuple[list[int], list[int]]]) -> dict:
        """(context ids, target ids) per sample -> BOS + context + target, labels on the target only."""
        rows = [self.prefix + c + t for c, t in pairs]
        labels = [[IGNORE] * (len(self.prefix) + len(c)) + t for c, t in pairs]
        ids, mask = pad_ids(rows, self.tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_ids(labels, IGNORE)[0]}

    def _encoder_decoder(self, inputs: list[list[int]], targets: list[list[int]]) -> dict:
        ids, mask = pad_ids(inputs, self.tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_ids(targets, IGNORE)[0]}

    def _stage2(self, kept: list[dict]) -> dict:
        if self.encoder_decoder:
            inputs, targets = [], []
            for s in kept:
                prefix, suffix = prefix_split(s["text"], self._rng(s, _SPLIT_RNG))
                source = " ".join(p for p in (self.prompt, prefix) if p)
                inputs.append(self._frame(_ids(self.tok, source), self.max_len, keep="start"))
                targets.append(self._target(suffix))
            return self._encoder_decoder(inputs, targets)
        pairs = []
        for s in kept:
            p, t = split_tokens(self.tok, self.prompt, s["text"])
            room = self.max_len - len(self.prefix) - len(self.end_ids)
            p = p[:room]  # an over-long prompt leaves no caption (still a valid, if useless, row)
            pairs.append((p, t[:room - len(p)] + self.end_ids))
        return self._decoder_only(pairs)

    def _instruct(self, kept: list[dict]) -> dict:
        for s in kept:
            if not isinstance(s.get("instruction"), str):
                raise KeyError(f"instruct samples need an 'instruction' string (wrap the dataset in a "
                               f"mixture.TaskDataset); sample {s.get('key', '?')} has keys {sorted(s)}")
        if self.encoder_decoder:
            inputs = [self._frame(_ids(self.tok, s["instruction"]), self.max_len, keep="end") for s in kept]
            out = self._encoder_decoder(inputs, [self._target(s["text"]) for s in kept])
        else:
            pairs = []
            for s in kept:
                c, t = split_tokens(self.tok, s["instruction"], s["text"])
                room = self.max_len - len(self.prefix)
                pairs.append((c[len(c) - room:] if len(c) > room else c, t[:self.max_target_len - 1] + [self.eos]))
            out = self._decoder_only(pairs)
        if self.qtok is not None:
            room = self.qformer_max_len - len(self.q_prefix) - len(self.q_suffix)
            rows = []
            for s in kept:
                body = _ids(self.qtok, s["instruction"])
                rows.append(self.q_prefix + (body[len(body) - room:] if len(body) > room else body) + self.q_suffix)
            out["qformer_input_ids"], out["qformer_attention_mask"] = pad_ids(rows, self.qtok.pad_token_id)
        return out

    # -------------------------------------------------------------------------------------------- call
    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        kept, pixels = self._load(samples)
        skipped = torch.tensor(len(samples) - len(kept), dtype=torch.long)
        if not kept:
            return {"skipped": skipped}
        text = {"stage1": self._stage1, "stage2": self._stage2, "instruct": self._instruct}[self.kind](kept)
        # pixels (B, 3, S, S), or cached encoder outputs (B, N, Dv)
        return {"pixel_values": torch.stack(pixels), **text, "skipped": skipped}
