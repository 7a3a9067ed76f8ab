"""Continuous (step-level) batching: the LM decodes one token for every running request per step; waiting
requests join at step boundaries and finished ones leave at once.

Per step the worker (1) drops requests whose client went away, (2) admits queued requests while the running
rows (a request with n samples or K beams is n or K rows) fit in `max_batch_rows`, (3) prefills admitted
requests, at most `prefill_chunk` prompt tokens per step in all, so that a long prompt does not stall the
running decodes, and (4) runs one batched decode step. Jobs the step loop does not take (ITM, Q-Former
captions, encoder-decoder LLMs) run whole, batched by key as in blip2.serve.batching, between two steps.

Why a request gets the ids it gets alone:
  * its visual prompt comes from the visual-prompt cache, or is computed in one batch with the other requests
    starting in the same step; its prompt is prefilled with theirs in one left-padded batch (mask, positions
    from the mask: exactly the batch-at-once engine's prefill), or, when it is long or has several rows (beams,
    n samples), alone in chunks of `prefill_chunk` (a lone request is chunked the same way);
  * a plain greedy request (one row, no logits processing: blip2.search.plain_greedy; every greedy request
    of the server, which has no repetition penalty) gets the argmax of its row of the logits: one argmax over
    all rows per step, read to the host once, which is its own GreedySearch's argmax; every other request's
    search (sampling with its own seeded torch.Generator, beam search) runs on its own rows' logits with its
    own `max_tokens`, so the tokens come from the same ops as alone. Sampling stays per request: one
    multinomial over several requests' rows would draw from one generator, not each request's own;
  * in the batched decode step the requests' KV caches are left-padded to one length and the pads masked out
    (attention mask) while each row keeps its own position ids (= its own length): a masked key adds an exact
    0 to the softmax. What can still differ is the float rounding of a batched matmul vs a single-row one;
    the tests check that the ids are equal (the standard the batch-at-once engine is held to).
A request's own state (rows, search, progress, prefill cache) is a `sequence.StepSequence`.
The cache lives in one transformers DynamicCache whose layers' key / value tensors [N, H, W, d] are re-made
when a request joins (concatenated, padded on the left) or rows leave / beams reorder (one index_select).
Each row's real length is kept as a Python int (its keys are the last ones of the W columns), so the
attention mask and the position ids of a step are one comparison and one addition, without reading the device.
"""

from __future__ import annotations

import collections
import inspect
import logging
import time

import torch

from ..generation import new_dynamic_cache
from ..processing import pad_ids
from .batching import Batcher, Job
from .engine import Engine
from .sequence import StepSequence, batch_rows, left_pad, supports_steps
from .vcache import VisualCache

__all__ = ["ContinuousBatcher"]

log = logging.getLogger("blip2.serve")


class ContinuousBatcher(Batcher):
    """A Batcher whose worker runs the step loop above; slots, queue limits, cancelling and stopping are the
    Batcher's."""

    def __init__(self, engine: Engine, max_batch_rows: int = 8, max_wait_s: float = 0.01, max_pending: int = 64,
                 max_queue: int | None = None, prefill_chunk: int = 256, visual_cache: VisualCache | None = None,
                 admit_group: int | None = None):
        """admit_group: a running batch admits queued requests once this many rows are free (or all the queued
        ones fit); default max_batch_rows // 4 (at least 1)."""
        super().__init__(engine.run, max_batch_rows, max_wait_s, max_pending, max_queue)
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self.admit_group = max(1, max_batch_rows // 4) if admit_group is None else admit_group
        if self.admit_group < 1:
            raise ValueError(f"ContinuousBatcher: admit_group must be >= 1, got {admit_group}")
        self.visual_cache = visual_cache
        self.stepping = supports_steps(engine)
        lm = engine.model.llm
        self._kw = {"use_cache": True, "return_dict": True}
        params = inspect.signature(lm.forward).parameters if lm is not None else {}
        if "logits_to_keep" in params:
            self._kw["logits_to_keep"] = 1
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers' newer name
        self._prefilling: list = []  # jobs waiting for their prefill, then (from its start) StepSequences
        self._running_seqs: list[StepSequence] = []
        # The running rows: their DynamicCache [N, H, W, d], each row's real length (its keys are the last
        # `lens[i]` of the W columns, left padding before them), the same [N] on the device (the position of the
        # next fed token), and the tokens [N] to feed at the next step.
        self._cache = self._pos = self._next = None
        self._lens: list[int] = []
        self._width = 0
        self._steps = 0
        self._rows_stepped = 0  # sum over steps of running rows (batch occupancy)
        self._tokens = collections.deque(maxlen=256)  # (time, tokens) of recent steps (tokens/s)

    # ------------------------------------------------------------------------------------ stats
    def stats(self) -> dict:
        out = super().stats()
        with self._cond:
            rows = sum(s.rows for s in self._running_seqs)
            out.update(engine="continuous", steps=self._steps, running_rows=rows,
                       occupancy=rows / self.max_batch_rows,
                       mean_occupancy=(self._rows_stepped / self._steps / self.max_batch_rows) if self._steps else 0.0,
                       tokens_per_s=self._recent_rate())
        if self.visual_cache is not None:
            out["visual_cache"] = self.visual_cache.stats()
        return out

    def _recent_rate(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._tokens if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-6)

    # ------------------------------------------------------------------------------------ worker
    def _steppable(self, job: Job) -> bool:
        return self.stepping and job.key[0] == "llm"

    def _take(self):
        """Block until there is work; (whole-run batch or None, newly admitted jobs); None when stopping."""
        with self._cond:
            while True:
                if not self._running:
                    return None
                busy = self._running_seqs or self._prefilling
                if not self._queue and not busy:
                    self._cond.wait()
                    continue
                if not busy and not self._steppable(self._queue[0]):
                    batch = self._ready_batch()  # nothing decodes: it may wait for company, as in Batcher
                    if batch is None:
                        continue
                    return batch, []
                rows = sum(batch_rows(s) for s in self._running_seqs + self._prefilling)
                if busy and self._queue and self.max_batch_rows - rows < self._waiting():
                    return None, []  # a full batch: admissions wait until a group of them fits
                admitted = []
                for job in list(self._queue):
                    if not self._steppable(job):
                        if not admitted:  # runs now, between two steps, with the compatible jobs queued
                            batch = [j for j in self._queue if j.key == job.key][: self.max_batch_rows]
                            for j in batch:
                                self._queue.remove(j)
                            return batch, []
                        break
                    need = batch_rows(job)
                    if (busy or admitted) and rows + need > self.max_batch_rows:
                        break  # first come, first served: a large request is not overtaken
                    self._queue.remove(job)
                    admitted.append(job)
                    rows += need
                return None, admitted

    def _waiting(self) -> int:
        """With the lock held: the free rows to wait for before admitting into a running batch, the rows of the
        steppable jobs at the head of the queue up to `admit_group`. Admitting one request per step would cost
        each one an encoder / Q-Former pass and a prefill of its own; under load they start in groups."""
        queued = 0
        for job in self._queue:
            if not self._steppable(job) or queued >= self.admit_group:
                break
            queued += batch_rows(job)
        return min(queued, self.admit_group)

    def _loop(self) -> None:
        while (work := self._take()) is not None:
            whole, admitted = work
            if whole:
                with self._cond:
                    self._batch_sizes[len(whole)] += 1
                try:
                    self._run_isolated(whole)
                finally:
                    self._settle(whole)
                continue
            try:
                with torch.inference_mode():
                    with self._cond:
                        self._prefilling.extend(admitted)  # jobs until their prefill starts, then sequences
                    self._prefill_some()
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, the worker survives
                log.exception("decode step failed")
                self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"))  # stopped before they finished

    def _fail_all(self, error: BaseException) -> None:
        jobs = [s if isinstance(s, Job) else s.job for s in self._running_seqs + self._prefilling]
        for job in jobs:
            job.fail(error)
        self._settle(jobs)
        with self._cond:
            self._running_seqs, self._prefilling = [], []
            self._cache = self._pos = self._next = None
            self._lens, self._width = [], 0

    def _settle(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.settled:  # the runner owes every job a final event
                job.fail(RuntimeError("the batch ended without a result for this request"))
            self._release(job)

    def _admit(self, job: Job, vis: torch.Tensor | None = None) -> StepSequence | None:
        """Visual prompt [P, D] (given, cached or computed) + embedded prompt -> a sequence ready for its prefill
        (None: the job failed, alone)."""
        try:
            m, p = self.engine.model, job.payload
            vis = vis if vis is not None else self._visual_prompts([job])[0]
            ids = p.prompt_ids
            if ids is None:  # caption: decoder-only LLMs start from BOS (as Blip2Model.generate)
                hf = m.llm.config
                ids = [hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id]
            embeds = m.llm_inputs_embeds(vis[None], torch.tensor([ids], device=m.device))  # (1, L, D)
            return StepSequence(job, self.engine, embeds)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            job.fail(e)
            self._settle([job])
            return None

    def _visual_prompts(self, jobs: list[Job]) -> list[torch.Tensor]:
        """The visual prompts [P, D] of jobs: from the cache, the misses in one batch (as batch-at-once does)."""
        m, proc = self.engine.model, self.engine.proc
        keys = [(self.engine.settings.model_name, j.payload.image_key, tuple(j.payload.qformer_ids or ()))
                for j in jobs]
        found = [self.visual_cache.get(k) if self.visual_cache is not None else None for k in keys]
        miss = [i for i, v in enumerate(found) if v is None]
        if miss:
            pixels = torch.stack([jobs[i].payload.pixels for i in miss]).to(m.device)  # (M, 3, S, S)
            q_ids = q_mask = None
            if jobs[miss[0]].payload.qformer_ids is not None:  # InstructBLIP: right-padded, as the processor
                q_ids, q_mask = pad_ids([jobs[i].payload.qformer_ids for i in miss],
                                        proc.qformer_tokenizer.pad_token_id, "right", m.device)
            vis = m.visual_prompts(pixels, q_ids, q_mask)[1]  # (M, P, D)
            for row, i in enumerate(miss):
                found[i] = vis[row]
                if self.visual_cache is not None:
                    self.visual_cache.put(keys[i], vis[row])
        return found

    def _start(self) -> None:
        """The jobs at the head of the prefill line become sequences (their image encoder and Q-Former run now,
        not at admission, in one batch)."""
        head = []
        for item in self._prefilling:
            if not isinstance(item, Job):
                break
            head.append(item)
        if not head:
            return
        live = [j for j in head if not j.settled]
        try:
            vis = dict(zip(map(id, live), self._visual_prompts(live)))
        except Exception:  # noqa: BLE001 - one at a time, so that a bad request fails alone
            vis = {}
        seqs = [self._admit(j, vis.get(id(j))) if not j.settled else None for j in head]
        self._settle([j for j, seq in zip(head, seqs) if seq is None])
        with self._cond:
            self._prefilling[: len(head)] = [seq for seq in seqs if seq is not None]

    def _prefill_some(self) -> None:
        """Up to prefill_chunk prompt tokens of the oldest waiting prefills: the one-row prompts that start
        together and fit, in one left-padded batch; a long or multi-row one alone, chunk by chunk."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            self._start()
            if not self._prefilling:
                return
            seq = self._prefilling[0]
            if seq.job.settled:
                self._drop_prefilling(seq)
                continue
            group = []
            for other in self._prefilling:
                if (isinstance(other, Job) or other.rows != 1 or other.done_prefill
                        or sum(s.length for s in group) + other.length > budget):
                    break
                group.append(other)
            if len(group) > 1:
                self._prefill_group(group)
                budget -= sum(s.length for s in group)
                continue
            n = min(self.prefill_chunk, seq.length - seq.done_prefill)
            start, lm = seq.done_prefill, self.engine.model.llm
            pos = torch.arange(start, start + n, device=seq.embeds.device)[None].expand(seq.rows, -1)  # (rows, n)
            kw = {**self._kw, "position_ids": pos, self._cache_arg: seq.cache}
            if "logits_to_keep" in kw:  # as generation's prefill: the last position, by index
                kw["logits_to_keep"] = torch.tensor([n - 1], device=seq.embeds.device)
            out = lm(inputs_embeds=seq.embeds[:, start:start + n], attention_mask=None, **kw)
            seq.done_prefill += n
            budget -= n
            if seq.done_prefill == seq.length:
                seq.embeds = None
                with self._cond:
                    self._prefilling.pop(0)
                rows = seq.observe(out.logits[:, -1].float())  # the first new token
                if rows is not None:
                    seq.cache.reorder_cache(rows)
                if seq.finished:
                    self._settle([seq.job])
                else:
                    self._join([seq], seq.cache, [seq.length] * seq.rows, seq.length)

    def _prefill_group(self, group: list[StepSequence]) -> None:
        """One prefill for several one-row prompts, left-padded with masks and mask-derived positions exactly as
        the batch-at-once engine prefills a batch; then they join the running batch."""
        lm, W = self.engine.model.llm, max(s.length for s in group)
        embeds = torch.cat([left_pad(s.embeds, W, dim=1) for s in group])  # (G, W, D)
        mask = torch.cat([left_pad(torch.ones(1, s.length, dtype=torch.long, device=embeds.device), W, dim=1)
                          for s in group])  # (G, W)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' positions for a padded batch
        cache = new_dynamic_cache(lm)
        kw = {**self._kw, "position_ids": pos, self._cache_arg: cache}
        if "logits_to_keep" in kw:
            kw["logits_to_keep"] = torch.tensor([W - 1], device=embeds.device)
        logits = lm(inputs_embeds=embeds, attention_mask=None if bool(mask.all()) else mask,
                    **kw).logits[:, -1].float()  # (G, V)
        with self._cond:
            del self._prefilling[: len(group)]
        greedy = logits.argmax(-1)  # (G,) the plain sequences' first tokens
        first = greedy.tolist()
        keep = []
        for i, s in enumerate(group):
            s.embeds = None
            if s.plain:
                s.tokens = greedy[i:i + 1]
                s.take(first[i])
            else:
                s.observe(logits[i:i + 1])  # one row: no reorder
            if s.finished:
                self._settle([s.job])
            else:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(group):
            cache.reorder_cache(torch.tensor(keep, device=embeds.device))
        self._join([group[i] for i in keep], cache, [group[i].length for i in keep], W)

    def _drop_prefilling(self, seq: StepSequence) -> None:
        with self._cond:
            self._prefilling.remove(seq)
        self._settle([seq.job])

    def _join(self, seqs: list[StepSequence], cache, lens: list[int], width: int) -> None:
        """Add prefilled sequences, their cache [rows, H, width, d] (row i's real keys: its last lens[i]) and
        their next tokens, to the running batch, left-padding the narrower of the two."""
        tokens = torch.cat([s.tokens for s in seqs])  # (rows,)
        pos = torch.tensor(lens, device=tokens.device)
        if self._cache is None:
            self._cache, self._pos, self._next, self._lens, self._width = cache, pos, tokens, list(lens), width
        else:
            w = max(self._width, width)
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([left_pad(mine.keys, w), left_pad(theirs.keys, w)], 0)
                mine.values = torch.cat([left_pad(mine.values, w), left_pad(theirs.values, w)], 0)
            self._pos, self._next = torch.cat([self._pos, pos]), torch.cat([self._next, tokens])
            self._lens, self._width = self._lens + list(lens), w
        for seq in seqs:
            seq.cache = seq.tokens = None
        with self._cond:
            self._running_seqs.extend(seqs)

    def _step(self) -> None:
        """One decode step for every running sequence: one forward, one argmax over all rows (the plain
        sequences' tokens, read with one host copy), each other sequence's own search on its rows; finished
        ones leave, beams reorder."""
        seqs = self._running_seqs
        if not seqs:
            return
        W, n = self._width, len(self._lens)
        kw = {**self._kw, "position_ids": self._pos[:, None], self._cache_arg: self._cache}
        attn = None  # transformers drops an all-ones mask (no padding): so does a lone run
        if min(self._lens) < W:  # row i: W - lens[i] pad keys, then its own (and the fed token)
            cols = torch.arange(W + 1, device=self._pos.device)
            attn = (cols[None] >= (W - self._pos)[:, None]).long()  # (N, W + 1)
        logits = self.engine.model.llm(input_ids=self._next[:, None], attention_mask=attn, **kw).logits[:, -1].float()
        greedy = logits.argmax(-1)  # (N,)
        tokens = greedy.tolist()
        self._pos, self._lens, self._width = self._pos + 1, [k + 1 for k in self._lens], W + 1
        index, kept, done, own = [], [], [], []  # own: (new row, sequence) whose tokens come from its search
        start = 0
        for s in seqs:
            if s.job.settled:
                done.append(s)
            elif s.plain:
                s.take(tokens[start])
                if s.finished:
                    done.append(s)
                else:
                    index.append(start)
                    kept.append(s)
            else:
                rows = s.observe(logits[start:start + s.rows])
                if s.job.settled or s.finished:
                    done.append(s)
                else:
                    own.append((len(index), s))
                    index.extend(range(start, start + s.rows) if rows is None else (rows + start).tolist())
                    kept.append(s)
            start += s.rows
        with self._cond:
            self._steps += 1
            self._rows_stepped += n
            self._batch_sizes[len(seqs)] += 1
            self._tokens.append((time.monotonic(), n))
            self._running_seqs = kept
        self._settle([s.job for s in done])
        if not kept:
            self._cache = self._pos = self._next = None
            self._lens, self._width = [], 0
            return
        if index != list(range(n)):  # rows left, or beams reordered
            rows = torch.tensor(index, device=greedy.device)
            self._cache.reorder_cache(rows)
            self._pos, self._lens, greedy = self._pos[rows], [self._lens[i] for i in index], greedy[rows]
        for at, s in own:
            greedy[at:at + s.rows] = s.tokens
            s.tokens = None
        self._next = greedy
        first = self._width - max(self._lens)  # leading key columns that are padding in every row can go
        if first > 0:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._width -= first
