"""Fast decoding for the frozen language model, id-for-id equal to transformers' `generate`.

BLIP-2 feeds the LLM `inputs_embeds` [B, L, D] (32 visual soft-prompt vectors, then the embedded text prompt)
with a left-padded `attention_mask` [B, L]. `generate` below returns exactly the token ids that
`lm.generate(inputs_embeds=..., attention_mask=..., **fields)` returns (new tokens only), for greedy search,
multinomial sampling (same seed -> same ids), beam search and beam sampling, with repetition penalty,
min/max new tokens and EOS stopping. It is faster because everything transformers re-derives every step
(processor lists, stopping criteria, kwargs bookkeeping, input preparation, cache lookup) is computed once
here, each processor is a couple of tensor ops, and per-step work the LM itself would repeat is done once
where the result is provably the same: the 4D decode mask (OPT/Llama with SDPA), T5's cross-attention mask,
and (checked at run time) the beam reorder of a cross-attention cache whose beams are identical.

Exactness comes from feeding the LM the very same forward arguments transformers feeds it (same batch
expansion, positions, mask, cache class, `logits_to_keep=1`) and from doing the same floating-point ops in
the same order on the scores (e.g. beam scores use transformers' additive -1e9 masks, not -inf).
Quirks of transformers 5.24 that are replicated on purpose, because the ids depend on them:
  * Decoder-only position ids are `cumsum(mask) - 1` with pads set to 0; the mask is dropped (None) when it
    is all ones.
  * The repetition penalty ignores, per row, the first `p` positions of the token history, `p` = index of
    the first non-zero in the attention mask. With `inputs_embeds` only (no `input_ids`) the history holds
    just the generated tokens, so a row with `p` pads does not penalise its first `p` generated tokens.
  * For encoder-decoders the decoder start token is part of the history (it is penalised).
  * Beam search fills finished hypotheses with `pad_token_id`, but with `eos_token_id[0]` when
    `pad_token_id` is 0 (transformers tests `pad or eos`), and with -1 when there is no EOS.
"""

from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput

from .search import make_search

__all__ = ["GenerationConfig", "decode", "generate", "new_dynamic_cache", "special_tokens"]


@dataclass
class GenerationConfig:
    """Decoding settings; every field means what the argument of the same name means to transformers'
    `generate`. Special tokens left as None are taken from `lm.generation_config` (as `lm.generate` does when
    the argument is not passed); `eos_token_id=[]` disables EOS stopping explicitly.

    top_k / top_p / temperature act only when `do_sample` is True (top_k None or 0 = off). `early_stopping`
    (beam search): True stops a batch row as soon as it holds `num_beams` finished hypotheses; False stops when
    no running beam can beat the worst finished one at the current length; "never" at the best possible length.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    # What the repetition penalty sees before the first new token (decoder-only LLMs): "prompt+generated" is
    # transformers 5 (the ids passed as input_ids, left pads skipped as above); "generated" is the original
    # BLIP-2 / InstructBLIP (transformers 4.33 generate with inputs_embeds only: just the new tokens).
    repetition_context: str = "prompt+generated"
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    # Hooks for serving (blip2.serve), not decoding settings.
    # streamer(tokens [N], t) is called after step t (0-based) of greedy search / sampling (not beam search,
    # whose beams are not final) with the token each row just got (rows that already finished get pad); an
    # exception it raises ends the decoding (e.g. every client went away).
    streamer: Callable[[torch.Tensor, int], None] | None = None
    # generator: a torch.Generator for sampling (beam sampling too), or, without beams, a list of one per input,
    # so that each input's rows sample from its own generator: a batch's samples then equal those the inputs
    # would get alone with theirs.
    generator: torch.Generator | list[torch.Generator] | None = None

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"GenerationConfig: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.max_new_tokens) and self.max_new_tokens > 0,
             f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        need(is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
             f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        need(is_int(self.num_beams) and self.num_beams >= 1, f"num_beams must be an int >= 1, got {self.num_beams!r}")
        need(isinstance(self.do_sample, bool), f"do_sample must be a bool, got {self.do_sample!r}")
        need(isinstance(self.temperature, (int, float)) and self.temperature > 0,
             f"temperature must be > 0 (use do_sample=False for greedy decoding), got {self.temperature!r}")
        need(self.top_k is None or (is_int(self.top_k) and self.top_k >= 0),
             f"top_k must be None or an int >= 0 (0/None = off), got {self.top_k!r}")
        need(isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0,
             f"top_p must be in [0, 1], got {self.top_p!r}")
        need(isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        need(isinstance(self.length_penalty, (int, float)) and not isinstance(self.length_penalty, bool),
             f"length_penalty must be a number, got {self.length_penalty!r}")
        need(self.repetition_context in ("prompt+generated", "generated"),
             f"repetition_context must be 'prompt+generated' or 'generated', got {self.repetition_context!r}")
        need(self.early_stopping in (True, False, "never"),
             f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        need(is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
             f"num_return_sequences must be an int >= 1, got {self.num_return_sequences!r}")
        if self.num_beams == 1:
            need(self.do_sample or self.num_return_sequences == 1,
                 "num_return_sequences > 1 needs num_beams > 1 or do_sample=True (greedy returns one sequence)")
        else:
            need(self.num_return_sequences <= self.num_beams,
                 f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        eos = self.eos_token_id
        need(eos is None or (is_int(eos) and eos >= 0)
             or (isinstance(eos, (list, tuple)) and all(is_int(e) and e >= 0 for e in eos)),
             f"eos_token_id must be None, an int >= 0 or a list of them, got {eos!r}")
        for name in ("pad_token_id", "decoder_start_token_id", "bos_token_id"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 0), f"{name} must be None or an int >= 0, got {v!r}")
        need(self.streamer is None or callable(self.streamer), f"streamer must be callable, got {self.streamer!r}")
        gen = self.generator
        need(gen is None or isinstance(gen, torch.Generator)
             or (isinstance(gen, (list, tuple)) and all(isinstance(g, torch.Generator) for g in gen)),
             f"generator must be a torch.Generator or a list of them, got {type(gen).__name__}")
        need(self.num_beams == 1 or not isinstance(gen, (list, tuple)),
             "one generator per input needs num_beams == 1")
        # transformers passes float parameters through as given; ints would work but keep them floats.
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.repetition_penalty, self.length_penalty = float(self.repetition_penalty), float(self.length_penalty)


# --------------------------------------------------------------------------------------------------------
# Special tokens


def special_tokens(lm, cfg: GenerationConfig, encoder_decoder: bool):
    """(eos ids tuple or None, pad id or None, decoder start id or None), resolved like transformers:
    unset fields come from `lm.generation_config`; pad falls back to eos[0]; decoder start falls back to bos."""
    gc = getattr(lm, "generation_config", None)

    def pick(name):
        v = getattr(cfg, name)
        return v if v is not None else getattr(gc, name, None)

    eos = pick("eos_token_id")
    if eos is not None:
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        eos = eos or None  # [] = explicitly no EOS
    pad = pick("pad_token_id")
    if pad is None and eos is not None:
        pad = eos[0]
    start = None
    if encoder_decoder:
        start = pick("decoder_start_token_id")
        start = start if start is not None else pick("bos_token_id")
        if start is None:
            raise ValueError("generate: encoder-decoder LMs need decoder_start_token_id (or bos_token_id) in the "
                             "GenerationConfig or in lm.generation_config")
    return eos, pad, start


# Logits processors `lm.generate` would also take from `lm.generation_config` (e.g. a hub
# generation_config.json) but this loop does not implement, with their "off" values.
_NOT_IMPLEMENTED = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
                    "encoder_repetition_penalty": 1.0, "renormalize_logits": False, "remove_invalid_values": False,
                    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
                    "guidance_scale": 1.0}


def _warn_not_implemented(lm) -> None:
    gc = getattr(lm, "generation_config", None)
    set_ = [k for k, off in _NOT_IMPLEMENTED.items() if getattr(gc, k, None) not in (None, off)]
    if set_:
        warnings.warn(f"generate: lm.generation_config sets {set_}, which lm.generate would apply but this "
                      "decoding loop does not; its ids can differ from lm.generate's", stacklevel=3)


# --------------------------------------------------------------------------------------------------------
# Running the LM: one prefill, then one token per step with a KV cache


def _forward_params(lm) -> set[str]:
    return set(inspect.signature(lm.forward).parameters)


_EMPTY_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> (its config, empty cache)


def new_dynamic_cache(lm):
    """An empty cache laid out like the one transformers' generate makes (`DynamicCache(config=...)`: layer
    types, e.g. sliding windows, come from the config). Built once per model and copied: building it
    deep-copies encoder-decoder configs, which costs more than a short generation step."""
    config, empty = _EMPTY_CACHES.get(lm, (None, None))
    if config is not lm.config:
        config, empty = lm.config, DynamicCache(config=lm.config.get_text_config(decoder=True))
        _EMPTY_CACHES[lm] = (config, empty)
    return copy.deepcopy(empty)


# Model types whose decoder builds its mask with transformers' `create_causal_mask`, which passes a 4D mask
# through unchanged (checked for transformers 5.x). Other models get the 2D mask, as transformers gives them.
_PASSES_4D_MASK = ("opt", "llama")


def _decode_mask_is_padding_only(lm, cache) -> bool:
    """True when the model can take a precomputed 4D SDPA mask for decode steps and would build the same one:
    SDPA attention, full (not sliding / linear) attention in every layer, a model type known to accept it."""
    cfg = lm.config.get_text_config(decoder=True)
    return (getattr(cfg, "model_type", None) in _PASSES_4D_MASK
            and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and len(cache.layers) > 0
            and not any(cache.is_sliding) and not any(cache.is_linear))


class _CausalLMRunner:
    """Decoder-only LM. Rows are already expanded to N = B * expand (beams / return sequences)."""

    def __init__(self, lm, embeds, mask, position_ids, expand: int, max_new: int):
        params = _forward_params(lm)
        self.lm = lm
        B, L, _ = embeds.shape
        if expand > 1:
            embeds = embeds.repeat_interleave(expand, 0)
            mask = mask.repeat_interleave(expand, 0) if mask is not None else None
            position_ids = position_ids.repeat_interleave(expand, 0) if position_ids is not None else None
        if position_ids is None and "position_ids" in params:
            # transformers: cumsum of the mask - 1, pads at 0 (a missing mask counts as all ones)
            m = mask if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            position_ids = (m.long().cumsum(-1) - 1).masked_fill(m == 0, 0)  # [N, L]
        self.embeds, self.L = embeds, L
        self.position_ids = position_ids if "position_ids" in params else None
        # Positions of the fed-back tokens: last prompt position + 1, + 2, ... [N, max_new]
        if self.position_ids is not None:
            steps = torch.arange(1, max_new + 1, device=embeds.device, dtype=self.position_ids.dtype)
            self.step_pos = self.position_ids[:, -1:] + steps
        # transformers drops an all-ones mask (no padding); otherwise the mask grows by one 1 per step:
        # precompute it once and slice [N, L + t] instead of concatenating every step.
        self.cache = new_dynamic_cache(lm)
        if mask is None or bool((mask == 1).all()):
            self.prefill_mask = self.step_mask = None
        else:
            self.prefill_mask = mask
            self.step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_new)], 1)  # [N, L + max_new]
            if _decode_mask_is_padding_only(lm, self.cache):
                # Skip the model's per-step mask construction: with one query token the 4D boolean mask it
                # would build for SDPA is the padding row itself, [N, 1, 1, kv]; sliced per step below.
                self.step_mask = self.step_mask.bool()[:, None, None, :]
        self.kwargs = {"use_cache": True, "return_dict": True}
        self.kwargs["cache" if "cache" in params else "past_key_values"] = self.cache
        if "logits_to_keep" in params:
            self.kwargs["logits_to_keep"] = 1

    def prefill(self) -> torch.Tensor:
        """Logits [N, V] of the next token after the whole prompt."""
        kw = self.kwargs if self.position_ids is None else {**self.kwargs, "position_ids": self.position_ids}
        if "logits_to_keep" in kw:
            # the last position as an index: the sliced hidden states are then contiguous and the head is one
            # plain matrix product (the strided slice of `logits_to_keep=1` can take a batched-matmul path)
            kw = {**kw, "logits_to_keep": torch.tensor([self.embeds.shape[1] - 1], device=self.embeds.device)}
        out = self.lm(inputs_embeds=self.embeds, attention_mask=self.prefill_mask, **kw)
        self.embeds = None  # no longer needed
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Logits [N, V] after feeding `tokens` [N], the t-th generated token (1-based)."""
        mask = self.step_mask[..., : self.L + t] if self.step_mask is not None else None
        if self.position_ids is None:
            out = self.lm(input_ids=tokens[:, None], attention_mask=mask, **self.kwargs)
        else:
            pos = self.step_pos[:, t - 1 : t]  # [N, 1]
            out = self.lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos, **self.kwargs)
        return out.logits[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only [n] (the others finished): the cache, the mask and positions shrink."""
        self.cache.reorder_cache(rows)
        if self.step_mask is not None:
            self.step_mask = self.step_mask[rows]
        if self.position_ids is not None:
            self.step_pos = self.step_pos[rows]


class _Seq2SeqRunner:
    """Encoder-decoder LM: encode once on B rows, expand the encoder states, decode from the start token."""

    def __init__(self, lm, embeds, mask, expand: int, start_id: int):
        params = _forward_params(lm)
        self.lm, self.expand = lm, expand
        hidden = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state
        if expand > 1:
            hidden = hidden.repeat_interleave(expand, 0)  # [N, S, D]
            mask = mask.repeat_interleave(expand, 0) if mask is not None else None
        self.cache = EncoderDecoderCache(new_dynamic_cache(lm), new_dynamic_cache(lm))
        self.kwargs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden),
                       "attention_mask": _cross_attention_mask(lm, hidden, mask),
                       "use_cache": True, "return_dict": True}
        self.kwargs["cache" if "cache" in params else "past_key_values"] = self.cache
        if "logits_to_keep" in params:
            self.kwargs["logits_to_keep"] = 1
        self.start = torch.full((hidden.shape[0],), start_id, dtype=torch.long, device=hidden.device)
        self.cross_rows_equal = False

    def prefill(self) -> torch.Tensor:
        logits = self.step(self.start, 0)
        # The cross-attention cache (filled by this first step) is the same for the `expand` rows of a batch
        # item when they come out of the projections bit-identical; beam reorders stay within a batch item, so
        # they leave it unchanged and can be skipped. Checked, not assumed.
        if self.expand > 1:
            layers = self.cache.cross_attention_cache.layers
            self.cross_rows_equal = all(_rows_repeat(x, self.expand) for layer in layers
                                        for x in (layer.keys, layer.values))
        return logits

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        out = self.lm(decoder_input_ids=tokens[:, None], **self.kwargs)
        return out.logits[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        (self.cache.self_attention_cache if self.cross_rows_equal else self.cache).reorder_cache(rows)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only [n]: both caches, the encoder states and the cross-attention mask shrink."""
        self.cache.reorder_cache(rows)
        enc = self.kwargs["encoder_outputs"]
        self.kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=enc.last_hidden_state[rows])
        if self.kwargs["attention_mask"] is not None:
            self.kwargs["attention_mask"] = self.kwargs["attention_mask"][rows]


def _rows_repeat(x: torch.Tensor | None, n: int) -> bool:
    """Is x [N, ...] made of groups of n bit-identical consecutive rows?"""
    if x is None:
        return False
    g = x.view(x.shape[0] // n, n, *x.shape[1:])
    return torch.equal(g, g[:, :1].expand_as(g))


def _cross_attention_mask(lm, hidden: torch.Tensor, mask: torch.Tensor | None):
    """T5 turns the 2D encoder mask into the same 4D cross-attention mask at every step (one query token); build
    it once with the model's own function (which passes a 4D mask through unchanged). Other models: 2D mask."""
    if mask is None or getattr(lm.config, "model_type", None) != "t5":
        return mask
    query = hidden.new_empty(hidden.shape[0], 1, hidden.shape[2])  # only its shape / dtype / device are read
    mask4d = create_bidirectional_mask(config=lm.get_decoder().config, inputs_embeds=query, attention_mask=mask,
                                       encoder_hidden_states=hidden)
    return mask4d if isinstance(mask4d, torch.Tensor) and mask4d.dim() == 4 else mask


# --------------------------------------------------------------------------------------------------------


def generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig,
             input_ids: torch.LongTensor | None = None,
             position_ids: torch.LongTensor | None = None) -> torch.LongTensor:
    """Decode from a frozen transformers LM (`AutoModelForCausalLM` or `AutoModelForSeq2SeqLM`).

    inputs_embeds [B, L, D]: the LM input (decoder-only) or encoder input (encoder-decoder);
    attention_mask [B, L] (1 = real, 0 = pad; left padding for decoder-only) or None (no padding);
    input_ids [B, L] (decoder-only only, optional): the ids transformers would receive alongside
    `inputs_embeds` (placeholder ids at visual positions); they enter only the repetition-penalty history;
    position_ids [B, L] (decoder-only only, optional): overrides positions derived from the mask.
    Returns the new tokens [B * num_return_sequences, N] (N <= max_new_tokens; rows that finished early
    are padded), equal to what `lm.generate(inputs_embeds=..., attention_mask=..., ...)` generates.
    """
    cfg = config
    if not isinstance(cfg, GenerationConfig):
        raise TypeError(f"generate: config must be a GenerationConfig, got {type(cfg).__name__}")
    if inputs_embeds.dim() != 3:
        raise ValueError(f"generate: inputs_embeds must be [B, L, D], got shape {tuple(inputs_embeds.shape)}")
    B, L, _ = inputs_embeds.shape
    for name, t in (("attention_mask", attention_mask), ("input_ids", input_ids), ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != (B, L):
            raise ValueError(f"generate: {name} must be [B, L] = {[B, L]} like inputs_embeds, got {list(t.shape)}")
    enc_dec = bool(getattr(lm.config, "is_encoder_decoder", False))
    if enc_dec and (input_ids is not None or position_ids is not None):
        raise ValueError("generate: input_ids / position_ids apply to decoder-only LMs; an encoder-decoder LM "
                         "takes only inputs_embeds and attention_mask")
    eos, pad, start = special_tokens(lm, cfg, enc_dec)
    _warn_not_implemented(lm)
    expand = max(cfg.num_beams, cfg.num_return_sequences)
    dev = inputs_embeds.device

    with torch.inference_mode():
        # The history transformers' processors see before the first new token, and the per-row count of
        # ignored leading positions for the repetition penalty (from the decoder-only attention mask).
        if enc_dec:
            runner = _Seq2SeqRunner(lm, inputs_embeds, attention_mask, expand, start)
            prompt_ids, ignore_len = runner.start[:, None], None
        else:
            runner = _CausalLMRunner(lm, inputs_embeds, attention_mask, position_ids, expand, cfg.max_new_tokens)
            prompt_ids = (input_ids.repeat_interleave(expand, 0) if input_ids is not None
                          else torch.empty(B * expand, 0, dtype=torch.long, device=dev))
            mask = runner.prefill_mask  # None when there is no padding
            ignore_len = (mask != 0).int().argmax(dim=1) if mask is not None else None
            if cfg.repetition_context == "generated":
                prompt_ids, ignore_len = prompt_ids[:, :0], None
        ids = decode(runner, B, cfg, eos, pad, prompt_ids, ignore_len)
    return ids.clone()  # a normal tensor: inference-mode tensors refuse in-place updates outside the mode


def decode(runner, batch_size: int, cfg: GenerationConfig, eos: list[int] | None, pad: int,
           history: torch.Tensor, ignore_len: torch.Tensor | None = None) -> torch.LongTensor:
    """The search (greedy, sampling or beam; blip2.search) over any runner: an object with
    `prefill() -> logits [N, V]`, `step(tokens [N], t) -> logits [N, V]`, `reorder(rows [N])` and
    `keep(rows [n])` (go on with those rows only: greedy search drops finished ones), whose
    N = batch_size * max(num_beams, num_return_sequences) rows are already expanded. history [N, P]: the ids the
    repetition penalty sees before the first new token; ignore_len [N]: leading history positions it skips."""
    search = make_search(cfg, batch_size, eos, pad, history, ignore_len, drop_finished=hasattr(runner, "keep"))
    logits = runner.prefill()
    while True:
        tokens, rows = search.step(logits)
        if search.done:
            return search.result()
        if rows is not None:
            runner.reorder(rows)
        if search.kept is not None:  # greedy: rows that reached EOS left the batch
            runner.keep(search.kept)
        logits = runner.step(tokens, search.t)
