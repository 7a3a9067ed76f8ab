"""One request's decoding state in the continuous batcher's step loop (`StepSequence`), and the small helpers
the step loop shares with it: can an engine be stepped, how many batch rows a request takes, left padding of
cache tensors. blip2.serve.continuous explains why a request gets the ids it would get alone.
"""

from __future__ import annotations

import inspect

import torch

from ..generation import GenerationConfig, new_dynamic_cache, special_tokens
from ..search import make_search, plain_greedy
from .batching import Job
from .engine import Engine, Progress, Settled


def supports_steps(engine: Engine) -> bool:
    """Can the engine's LLM be stepped by the continuous batcher (decoder-only, explicit position ids,
    no sliding-window layers)?"""
    m = engine.model
    if m.llm is None or m.cfg.is_encoder_decoder:
        return False
    cfg = m.llm.config.get_text_config(decoder=True)
    full = all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
    return ("position_ids" in inspect.signature(m.llm.forward).parameters and full
            and not getattr(cfg, "sliding_window", None))


class StepSequence:
    """One request in the step loop: its rows, search, progress, and (while prefilling) its own cache.

    A plain one (one row, greedy, no logits processing: blip2.search.plain_greedy) has no search object: the
    step takes its token from one argmax over all rows' logits (`take`)."""

    def __init__(self, job: Job, engine: Engine, embeds: torch.Tensor):
        p, dec = job.payload, job.key[2]
        self.job, self.n = job, dec.n
        self.rows = max(dec.num_beams, dec.n)  # rows in the batch (beams or samples)
        lm = engine.model.llm
        hf = lm.config
        gen = dict(max_new_tokens=p.max_tokens, num_beams=dec.num_beams, num_return_sequences=dec.n,
                   eos_token_id=sorted(engine.eos),
                   pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
        if dec.do_sample:
            gen.update(do_sample=True, temperature=dec.temperature, top_p=dec.top_p, top_k=dec.top_k,
                       generator=torch.Generator(device=embeds.device).manual_seed(p.seed))
        cfg = GenerationConfig(**gen)
        self.plain = self.rows == 1 and plain_greedy(cfg)
        self.search = None
        if not self.plain:
            eos, pad, _ = special_tokens(lm, cfg, False)
            # the server has no repetition penalty: the search needs no prompt history
            history = torch.empty(self.rows, 0, dtype=torch.long, device=embeds.device)
            self.search = make_search(cfg, 1, eos, pad, history)
        self.t, self.max_tokens = 0, p.max_tokens  # tokens generated so far (plain)
        self.progress = Progress(engine, [job], dec.n)
        self.embeds = embeds.repeat_interleave(self.rows, 0) if self.rows > 1 else embeds  # (rows, L, D)
        self.length = self.embeds.shape[1]
        self.done_prefill = 0
        self.cache = new_dynamic_cache(lm)
        self.tokens: torch.Tensor | None = None  # the tokens to feed at the next step (rows,), until it joins
        self.finished = False

    def take(self, token: int) -> None:
        """A plain sequence's next token (the argmax of its logits)."""
        t, self.t = self.t, self.t + 1
        try:
            self.progress.add([token], t)  # streams text, answers at EOS / max_tokens
        except Settled:
            self.finished = True
        if self.t >= self.max_tokens and not self.job.settled:  # Progress answers at max_tokens: a safety net
            self.progress.finish(None)
        self.finished = self.finished or self.job.settled

    def observe(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Pick the next tokens from this request's logits [rows, V]; the rows' reorder (None: keep)."""
        if self.plain:
            self.tokens = logits.argmax(-1)
            self.take(int(self.tokens[0]))
            return None
        tokens, rows = self.search.step(logits)
        try:
            if self.search.cfg.num_beams == 1:
                self.progress.step(tokens, self.search.t - 1)  # streams text, answers at EOS / max_tokens
        except Settled:
            self.finished = True
        if self.search.done:
            self.finished = True
            if not self.job.settled:
                self.progress.finish(self.search.result())
        self.tokens = tokens
        return rows


def batch_rows(item) -> int:
    """Batch rows of a job or sequence: its beams or samples."""
    if isinstance(item, StepSequence):
        return item.rows
    dec = item.key[2]
    return max(dec.num_beams, dec.n)


def left_pad(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad x on the left along `dim` to `width` (keys / values [N, H, W, d]: dim 2; masks [N, W]: dim 1)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim)
