"""The model side of the server: checked requests become jobs (pixels, token ids, decoding settings); batches
of jobs run on the model in the batching worker's thread.

What makes a batch give each request what it gets alone:
  * prompts are tokenized one by one and padded here exactly as the processor pads a batch (left for
    decoder-only LLMs, right for encoder-decoders and for ITM texts); greedy decoding of a left-padded batch
    gives the ids of one-by-one decoding (tests/test_api.py checks the library; tests/test_serve.py the server);
  * sampling draws from one generator per request, seeded by the request's `seed`
    (GenerationConfig.generator), so its samples do not depend on its neighbours;
  * requests of different lengths share a batch (greedy and sampling are prefix-consistent: the first k tokens
    do not depend on max_new_tokens); each one is finished, and its client answered, as soon as its own rows
    reach EOS or its own `max_tokens`; the batch stops when no request needs it any more. Beam search is not
    prefix-consistent, so its batches only hold requests with the same `max_tokens`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass

import torch

from ..generation import GenerationConfig
from ..heads import pair_similarity
from ..processing import pad_ids
from ..prompts import CAPTION_INSTRUCTION, VQA_TEMPLATE
from ..qformer_caption import qformer_generate
from .batching import Job

__all__ = ["Decoding", "Engine", "GenPayload", "ItmPayload", "Progress", "RequestError", "ServeSettings", "Settled"]

log = logging.getLogger("blip2.serve")


@dataclass
class ServeSettings:
    """Limits and batching of a server. Sizes are in bytes, pixels and tokens."""

    model_name: str = "blip2"
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int = 512
    max_tokens: int = 256  # the most new tokens a request may ask for
    default_max_tokens: int = 30
    max_n: int = 8
    max_itm_texts: int = 64
    max_batch_rows: int = 8  # rows per batch (a request with n samples is n rows); 1 turns batching off
    max_wait_ms: float = 10.0  # how long the oldest request waits for company
    max_pending: int = 64  # queued + running requests; more get HTTP 503
    image_root: str | None = None  # local image files are read only under this folder (None: never)
    template: str | None = None  # chat prompt template for BLIP-2 (None: "Question: {} Short answer:")
    engine: str = "continuous"  # "continuous": step-level batching (blip2.serve.continuous); "batch": batch-at-once
    prefill_chunk: int = 256  # continuous: prompt tokens prefilled per step (a long prompt does not stall decodes)
    visual_cache_mb: float = 256.0  # continuous: LRU of visual prompts (Q-Former outputs) per image; 0 turns it off
    max_queue: int | None = None  # requests waiting to start; more get HTTP 429 with Retry-After (None: no limit)
    api_key: str | None = None  # clients must send "Authorization: Bearer KEY" (None: no auth)
    cors_origins: tuple = ()  # origins allowed by CORS (empty: CORS off, browsers refuse cross-site calls)
    shutdown_timeout_s: float = 30.0  # on shutdown, how long running requests may take to finish

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_prompt_tokens", "max_tokens", "default_max_tokens",
                     "max_n", "max_itm_texts", "max_batch_rows", "max_pending"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ServeSettings.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.engine not in ("continuous", "batch"):
            raise ValueError(f"ServeSettings.engine must be 'continuous' or 'batch', got {self.engine!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise ValueError(f"ServeSettings.prefill_chunk must be an int >= 1, got {self.prefill_chunk!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 1):
            raise ValueError(f"ServeSettings.max_queue must be None or an int >= 1, got {self.max_queue!r}")
        if self.visual_cache_mb < 0 or self.shutdown_timeout_s < 0:
            raise ValueError(f"ServeSettings.visual_cache_mb ({self.visual_cache_mb}) and shutdown_timeout_s "
                             f"({self.shutdown_timeout_s}) must be >= 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServeSettings.api_key must not be empty (None: no auth)")
        if self.max_wait_ms < 0:
            raise ValueError(f"ServeSettings.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.template is not None and self.template.count("{}") != 1:
            raise ValueError(f"ServeSettings.template needs exactly one {{}} for the question, got {self.template!r}")


def _pixel_hash(pixels: torch.Tensor) -> str:
    """sha256 of the decoded, preprocessed pixels (shape and dtype included): equal images, equal key."""
    h = hashlib.sha256(f"{tuple(pixels.shape)}{pixels.dtype}".encode())
    h.update(pixels.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


@dataclass(frozen=True)
class Decoding:
    """Decoding settings a whole batch shares (part of the batch key)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    n: int = 1


@dataclass(eq=False)
class GenPayload:
    pixels: torch.Tensor  # [3, S, S]
    prompt_ids: list[int] | None  # LLM prompt tokens; None: start from BOS (BLIP-2 captioning)
    qformer_ids: list[int] | None  # InstructBLIP: the instruction for the Q-Former
    max_tokens: int
    seed: int | None  # sampling only
    stream: bool
    image_key: str = ""  # hash of the pixels (visual-prompt cache key, with the Q-Former instruction)
    first_token_at: float | None = None  # time.monotonic() of the first generated token (time to first token)


@dataclass(eq=False)
class ItmPayload:
    pixels: torch.Tensor  # [3, S, S]
    texts: list[list[int]]  # Q-Former token ids of each text


class Settled(Exception):
    """Raised from the streamer to end a batch that no request needs any more."""


class Engine:
    def __init__(self, model, settings: ServeSettings):
        if model.processor is None:
            raise ValueError("the server needs a checkpoint with tokenizer files (its processor is missing)")
        self.model, self.settings, self.proc = model.eval(), settings, model.processor
        cfg = model.cfg
        self.arch = cfg.architecture
        self.has_llm = model.llm is not None
        self.can_caption = self.has_llm or model.qformer.lm_head is not None
        self.can_itm = bool(cfg.stage1_heads)
        self._lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        if self.has_llm:
            hf = model.llm.config
            eos = hf.eos_token_id if hf.eos_token_id is not None else model.llm.generation_config.eos_token_id
            # decoder-only LLMs with learned positions have a hard context length; T5's is relative
            self.context = None if cfg.is_encoder_decoder else getattr(hf, "max_position_embeddings", None)
        else:
            sep = self.proc.tokenizer.sep_token_id
            eos = sep if sep is not None else 102  # the Q-Former decoder stops at [SEP] (qformer_caption)
            self.context = None
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.qformer_max_len = min(cfg.qformer_max_text_len, cfg.qformer.max_position_embeddings)
        template = settings.template or ("{}" if self.arch == "instructblip" else VQA_TEMPLATE)
        self.template = template

    def capabilities(self) -> list[str]:
        return [name for name, ok in (("chat", self.has_llm), ("caption", self.can_caption), ("itm", self.can_itm))
                if ok]

    # --------------------------------------------------------------------------- request side (any thread)
    def pixels(self, image) -> torch.Tensor:
        """A PIL image -> [3, S, S]."""
        try:
            return self.proc.images([image])[0]
        except (ValueError, TypeError, OSError) as e:
            raise RequestError(f"cannot preprocess the image: {e}") from None

    def _encode(self, fn, text: str, what: str, limit: int, **kw) -> list[int]:
        try:
            with self._lock:
                ids = fn([text], **kw)[0][0].tolist()
        except Exception as e:  # noqa: BLE001 - e.g. text the tokenizer cannot take (lone surrogates)
            raise RequestError(f"cannot tokenize the {what}: {type(e).__name__}") from None
        if len(ids) > limit:
            raise RequestError(f"the {what} has {len(ids)} tokens, more than the limit of {limit}",
                               code="prompt_too_long")
        return ids

    def generation_job(self, image, text: str | None, decoding: Decoding, max_tokens: int, seed: int | None,
                       stream: bool):
        """(batch key, payload, rows) for a caption / chat request. `text`: the LLM prompt (None or "": caption)."""
        s = self.settings
        if not self.can_caption:
            raise RequestError("this checkpoint cannot generate text (no language model, no Q-Former LM head)")
        if not 1 <= max_tokens <= s.max_tokens:
            raise RequestError(f"max_tokens must be between 1 and {s.max_tokens}, got {max_tokens}")
        if decoding.n > s.max_n:
            raise RequestError(f"n must be at most {s.max_n}, got {decoding.n}")
        try:  # the settings a batch will use, checked now so that one bad request cannot fail a batch
            GenerationConfig(max_new_tokens=max_tokens, do_sample=decoding.do_sample, temperature=decoding.temperature,
                             top_p=decoding.top_p, top_k=decoding.top_k, num_beams=decoding.num_beams,
                             num_return_sequences=decoding.n)
        except ValueError as e:
            raise RequestError(str(e).removeprefix("GenerationConfig: ")) from None
        pixels = self.pixels(image)
        prompt = qformer = None
        if not self.has_llm:  # stage-1 checkpoint: the Q-Former decodes from [DEC]
            if text:
                raise RequestError("this checkpoint captions with its Q-Former, which takes no prompt")
            task = "qformer"
        else:
            task = "llm"
            if self.arch == "instructblip":
                text = text or CAPTION_INSTRUCTION
                qformer = self._encode(self.proc.tokenize_qformer, text, "instruction", s.max_prompt_tokens,
                                       max_length=self.qformer_max_len)  # truncated on the left, as LAVIS
            if text or self.model.cfg.is_encoder_decoder:  # T5 captions from an empty prompt (its EOS)
                prompt = self._encode(self.proc.tokenize_prompts, text or "", "prompt", s.max_prompt_tokens)
            if self.context is not None:
                used = self.model.num_query_tokens + (len(prompt) if prompt else 1) + max_tokens
                if used > self.context:
                    raise RequestError(f"visual prompt ({self.model.num_query_tokens}) + prompt + max_tokens "
                                       f"({max_tokens}) = {used} tokens exceed the model's context of "
                                       f"{self.context}", code="context_length_exceeded")
        if decoding.do_sample and seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        # Beam search is not prefix-consistent: only requests with the same max_tokens may share its batches.
        # Beam sampling draws for all rows from one generator, so each of its requests is a batch of its own.
        alone = object() if decoding.do_sample and decoding.num_beams > 1 else None
        key = (task, prompt is None, decoding, max_tokens if decoding.num_beams > 1 else None, alone)
        payload = GenPayload(pixels, prompt, qformer, max_tokens, seed if decoding.do_sample else None, stream,
                             image_key=_pixel_hash(pixels))
        return Job(key=key, payload=payload, rows=decoding.n)

    def itm_job(self, image, texts: list[str]):
        if not self.can_itm:
            raise RequestError("this checkpoint has no image-text matching head (load a retrieval checkpoint)")
        if not 1 <= len(texts) <= self.settings.max_itm_texts:
            raise RequestError(f"texts must hold 1 to {self.settings.max_itm_texts} strings, got {len(texts)}")
        limit = min(self.settings.max_prompt_tokens, self.model.cfg.qformer.max_position_embeddings)
        ids = [self._encode(self._bert, t, "text", limit) for t in texts]
        return Job(key=("itm",), payload=ItmPayload(self.pixels(image), ids), rows=len(texts))

    def _bert(self, texts: list[str]):
        """Q-Former text ids for ITM (no truncation: too long is refused), in _encode's (ids, mask) form."""
        enc = self.proc.tokenizer(texts, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.proc.decode([ids])[0]

    # ---------------------------------------------------------------------------- worker side (one thread)
    @torch.inference_mode()
    def run(self, jobs: list) -> None:
        if jobs[0].key[0] == "itm":
            self._run_itm(jobs)
        else:
            self._run_generate(jobs)

    def _run_generate(self, jobs: list) -> None:
        task, _, dec, _, _ = jobs[0].key
        m, dev = self.model, self.model.device
        payloads = [j.payload for j in jobs]
        progress = Progress(self, jobs, dec.n)
        gen = dict(max_new_tokens=max(p.max_tokens for p in payloads), num_beams=dec.num_beams,
                   num_return_sequences=dec.n, eos_token_id=sorted(self.eos))
        if dec.do_sample:
            gen.update(do_sample=True, temperature=dec.temperature, top_p=dec.top_p, top_k=dec.top_k,
                       generator=[torch.Generator(device=dev).manual_seed(p.seed) for p in payloads])
            if dec.num_beams > 1:  # beam sampling: one request per batch (see generation_job), one generator
                gen["generator"] = gen["generator"][0]
        if dec.num_beams == 1:
            gen["streamer"] = progress.step  # beams are not final until the end: no streaming
        pixels = torch.stack([p.pixels for p in payloads]).to(dev)  # (B, 3, S, S)
        out = None
        try:
            if task == "qformer":
                out = qformer_generate(m, pixels, min_new_tokens=0, **gen)
            else:
                ids = mask = q_ids = q_mask = None
                if payloads[0].prompt_ids is not None:
                    ids, mask = pad_ids([p.prompt_ids for p in payloads], self.proc.pad_token_id,
                                     self.proc.padding_side, dev)
                if payloads[0].qformer_ids is not None:
                    q_ids, q_mask = pad_ids([p.qformer_ids for p in payloads], self.proc.qformer_tokenizer.pad_token_id,
                                         "right", dev)
                out = m.generate(pixels, input_ids=ids, attention_mask=mask, qformer_input_ids=q_ids,
                                 qformer_attention_mask=q_mask, **gen)
        except Settled:
            pass
        progress.finish(out)

    def _run_itm(self, jobs: list) -> None:
        m, dev = self.model, self.model.device
        pixels = torch.stack([j.payload.pixels for j in jobs]).to(dev)  # (J, 3, S, S)
        owner = torch.tensor([i for i, j in enumerate(jobs) for _ in j.payload.texts], device=dev)  # (R,) text -> job
        ids, mask = pad_ids([t for j in jobs for t in j.payload.texts], self.proc.tokenizer.pad_token_id or 0, "right",
                         dev)  # (R, T): right padding, as BERT's absolute positions need
        itm = m.itm_logits(pixels[owner], ids, mask).float().softmax(-1)[:, 1]  # (R,) P(match)
        img = m.image_embeds(pixels)[owner]  # (R, Q, D)
        itc = pair_similarity(img, m.text_embeds(ids, mask)).float()  # (R,) max over queries
        start = 0
        for job in jobs:
            k = len(job.payload.texts)
            job.done({"scores": [{"index": i, "itm": float(itm[start + i]), "itc": float(itc[start + i])}
                                 for i in range(k)]})
            start += k


@dataclass
class _Row:
    ids: list
    reason: str | None = None  # "stop" (EOS) or "length" (max_tokens) once finished
    emitted: str = ""  # text already streamed


class Progress:
    """Per-row bookkeeping for one batch: appends each step's tokens, streams text to streaming requests,
    answers each request as soon as its rows are finished, and ends the batch when nobody needs it."""

    def __init__(self, engine: Engine, jobs: list, n: int):
        self.engine, self.jobs, self.n = engine, jobs, n
        self.rows = [[_Row([]) for _ in range(n)] for _ in jobs]

    def _add(self, row: _Row, token: int, max_tokens: int) -> None:
        row.ids.append(token)
        if token in self.engine.eos:
            row.reason = "stop"
        elif len(row.ids) >= max_tokens:
            row.reason = "length"

    def step(self, tokens: torch.Tensor, t: int) -> None:
        """GenerationConfig.streamer: tokens [B * n] of step t."""
        self.add(tokens.tolist(), t)

    def add(self, toks: list[int], t: int) -> None:
        """The tokens [B * n] of step t, as ints (the continuous batcher reads one step's tokens at once)."""
        if t == 0:
            now = time.monotonic()
            for job in self.jobs:
                job.payload.first_token_at = now
        for j, (job, rows) in enumerate(zip(self.jobs, self.rows)):
            if job.settled:
                continue
            for r, row in enumerate(rows):
                if row.reason is None:
                    self._add(row, toks[j * self.n + r], job.payload.max_tokens)
                    if job.payload.stream and row.reason is None:
                        self._stream(job, r, row)
            if all(row.reason for row in rows):
                self._finish(job, rows)
        if all(job.settled for job in self.jobs):
            raise Settled

    def _stream(self, job, r: int, row: _Row) -> None:
        # The last word may still change (sub-word merges, clean-up of spaces before punctuation, a split
        # multi-byte character), so stream only the text before the last whitespace.
        text = self.engine.decode(row.ids)
        m = re.search(r"\s+\S*$", text)
        stable = text[: m.start()] if m else ""
        if len(stable) > len(row.emitted) and stable.startswith(row.emitted):
            job.emit(("delta", r, stable[len(row.emitted):]))
            row.emitted = stable

    def finish(self, out: torch.Tensor | None) -> None:
        """After decoding: rows not finished by the streamer (beam search) take their ids from `out`."""
        for j, (job, rows) in enumerate(zip(self.jobs, self.rows)):
            if job.settled:
                continue
            for r, row in enumerate(rows):
                if row.reason is None and out is not None:
                    row.ids = []
                    for token in out[j * self.n + r].tolist():
                        self._add(row, token, job.payload.max_tokens)
                        if row.reason:
                            break
                row.reason = row.reason or "length"
            self._finish(job, rows)

    def _finish(self, job, rows: list[_Row]) -> None:
        choices = []
        for r, row in enumerate(rows):
            text = self.engine.decode(row.ids)
            if job.payload.stream and text != row.emitted:
                if text.startswith(row.emitted):  # the final text extends what was streamed (see _stream)
                    job.emit(("delta", r, text[len(row.emitted):]))
                else:  # cannot happen with the tokenizers we know; a stream cannot take text back
                    log.warning("streamed text %r is not a prefix of the final text %r", row.emitted, text)
            choices.append({"index": r, "text": text, "finish_reason": row.reason, "tokens": len(row.ids)})
        p = job.payload
        if p.first_token_at is None:  # beam search: the tokens arrive at the end
            p.first_token_at = time.monotonic()
        prompt_tokens = len(p.prompt_ids or []) + self.engine.model.num_query_tokens
        job.done({"choices": choices, "prompt_tokens": prompt_tokens, "seed": p.seed})
