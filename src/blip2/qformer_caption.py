"""Stage-1 captioning: the Q-Former alone as an image-grounded text decoder (ITG mode).

The queries attend to the image once; their self-attention keys/values are cached; the text starts with
[DEC] and is decoded token by token under the multimodal causal mask, with the same search loop (greedy,
sampling, beam search with length penalty, min/max length, repetition penalty) as the LLM decoder.
"""

from __future__ import annotations

import torch

from .generation import GenerationConfig, decode
from .stage1 import decoder_token_id


class QFormerRunner:
    """Runner for blip2.generation.decode over the Q-Former's LM head."""

    def __init__(self, model, pixel_values: torch.Tensor, expand: int, start_id: int):
        self.qf = model.qformer
        image = model.encode_image(pixel_values)  # (B, M, Dv)
        if expand > 1:
            image = image.repeat_interleave(expand, 0)  # (N, M, Dv): one row per beam
        self.cache = self.qf(image, use_cache=True).cache  # the queries' keys/values
        self.start = torch.full((image.shape[0],), start_id, dtype=torch.long, device=image.device)

    def _feed(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        out = self.qf(None, input_ids=tokens[:, None], mode="itg", past=self.cache, past_text_len=t, use_cache=True)
        self.cache = out.cache
        return self.qf.lm_logits(out.text_output[:, -1]).float()  # (N, V)

    def prefill(self) -> torch.Tensor:
        return self._feed(self.start, 0)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        return self._feed(tokens, t)

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache = [(k[rows], v[rows]) for k, v in self.cache]

    def keep(self, rows: torch.Tensor) -> None:  # greedy search drops finished rows
        self.reorder(rows)


@torch.inference_mode()
def qformer_generate(model, pixel_values: torch.Tensor, eos_token_id: int | None = None,
                     pad_token_id: int | None = None, **generation) -> torch.Tensor:
    """Caption token ids [B * num_return_sequences, N] (without [DEC]). Defaults follow BLIP's captioning:
    5 beams, at most 30 and at least 8 new tokens; EOS = the tokenizer's [SEP] (else the config's)."""
    if model.qformer.lm_head is None:
        raise ValueError("Q-Former captioning needs the Q-Former LM head (a stage-1 model, qformer.lm_head=True)")
    tok = getattr(model.processor, "tokenizer", None) if model.processor is not None else None
    if eos_token_id is None:
        eos_token_id = tok.sep_token_id if tok is not None and tok.sep_token_id is not None else 102
    if pad_token_id is None:
        pad_token_id = model.cfg.qformer.pad_token_id
    generation = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, **generation}
    cfg = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **generation)
    B = pixel_values.shape[0]
    expand = max(cfg.num_beams, cfg.num_return_sequences)
    runner = QFormerRunner(model, pixel_values, expand, decoder_token_id(model))
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return decode(runner, B, cfg, eos, pad_token_id, runner.start[:, None]).clone()
