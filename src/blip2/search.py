"""The searches of blip2.generation, one decoding step at a time: greedy search / sampling and beam search
(beam sampling too), with transformers' logits processors.

A search takes the logits [N, V] of its rows, picks the next tokens and says which rows continue which
(beam search reorders its rows). `generation.decode` drives one over a runner until it is done; the server's
continuous batching (blip2.serve) drives one per request while the LM steps many requests together, so a
request's tokens come from exactly the ops it would see alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BeamSearch", "GreedySearch", "Scores", "make_search", "plain_greedy", "sample"]

NEG = -1.0e9  # transformers' "impossible" beam score; finite so that sums of it stay comparable


# --------------------------------------------------------------------------------------------------------
# Logits processors, in transformers' order: repetition penalty, min length, then (sampling only)
# temperature, top-k, top-p.


class Scores:
    def __init__(self, cfg, eos, prompt_ids, ignore_len, min_keep: int):
        """prompt_ids: [N, P] ids that precede the generated ones in transformers' history (P may be 0);
        ignore_len: [N] or None, history positions < ignore_len are not penalised."""
        self.cfg, self.min_keep = cfg, min_keep
        self.eos = torch.tensor(eos, device=prompt_ids.device) if eos is not None else None
        self.rep = cfg.repetition_penalty if cfg.repetition_penalty != 1.0 else None
        self.prompt_ids, self.ignore_len, self.P = prompt_ids, ignore_len, prompt_ids.shape[1]
        self.seen = None  # [N, V] bool: tokens of the (non-ignored) history, built at the first call

    def _init_seen(self, V: int):
        ids = self.prompt_ids
        if self.ignore_len is not None and self.P:
            pos = torch.arange(self.P, device=ids.device)
            ids = ids.masked_fill(pos[None] < self.ignore_len[:, None], V)
        seen = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device)
        seen.scatter_(1, ids.clamp(max=V), True)  # ids beyond the LM head (or ignored) land in column V
        self.seen = seen[:, :V]

    def __call__(self, scores: torch.Tensor, n_new: int) -> torch.Tensor:
        """scores [N, V] -> processed scores; n_new = tokens generated so far."""
        if self.rep is not None:
            if self.seen is None:
                self._init_seen(scores.shape[-1])
            p = self.rep
            scores = torch.where(self.seen, torch.where(scores < 0, scores * p, scores / p), scores)
        if self.eos is not None and n_new < self.cfg.min_new_tokens:
            scores = scores.index_fill(1, self.eos, -math.inf)
        if self.cfg.do_sample:
            scores = self._warp(scores)
        return scores

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k:
            k = min(max(cfg.top_k, self.min_keep), scores.shape[-1])
            kth = torch.topk(scores, k)[0][..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if cfg.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - cfg.top_p  # low tail whose mass is <= 1 - top_p
            drop[..., -self.min_keep :] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
        return scores

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (a greedy search dropping finished rows)."""
        self.prompt_ids = self.prompt_ids[rows]
        if self.ignore_len is not None:
            self.ignore_len = self.ignore_len[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]

    def observe(self, tokens: torch.Tensor, n_new: int, rows: torch.Tensor | None = None) -> None:
        """Record the n_new-th (0-based) generated token of each row; `rows` first reorders the history
        (beam search: row i continues row rows[i])."""
        if self.seen is None:  # no repetition penalty, or not started
            return
        if rows is not None:
            self.seen = self.seen[rows]
        add = torch.ones_like(tokens, dtype=torch.bool)
        if self.ignore_len is not None:
            add = (self.P + n_new) >= self.ignore_len
        r = torch.arange(tokens.shape[0], device=tokens.device)
        self.seen[r, tokens] |= add


# --------------------------------------------------------------------------------------------------------
# Searches. Protocol: `step(logits [N, V])` picks the next token of every row and returns
# (tokens [N] to feed, rows [N] or None): the LM's cache must first be reordered so that row i continues row
# rows[i] (beam search), then fed `tokens`. After the step that ends the search `done` is True (nothing to
# feed); `result()` gives the new tokens [batch * num_return_sequences, T'].
# A greedy search made with drop_finished=True may instead set `kept` (rows [n] < N) after a step: the rows
# that go on, the others having reached EOS; the driver shrinks the LM's state to them (runner.keep) and the
# returned tokens are for those rows only.


class GreedySearch:
    """Greedy search or multinomial sampling over N rows; finished rows get `pad`.

    drop_finished: rows that reached EOS leave the batch (`kept`), so the LM does no work for them; their later
    tokens are `pad`, as transformers writes them. Greedy only: with sampling, fewer rows would draw other
    random numbers, and a streamer sees every row at every step."""

    def __init__(self, scores_fn: Scores, cfg, eos, pad, n_rows: int, device, drop_finished: bool = False):
        self.scores_fn, self.cfg, self.eos, self.pad = scores_fn, cfg, eos, pad
        self.out = torch.full((n_rows, cfg.max_new_tokens), pad if pad is not None else 0, dtype=torch.long,
                              device=device)
        self.unfinished = torch.ones(n_rows, dtype=torch.bool, device=device)
        self.drop = drop_finished and eos is not None and not cfg.do_sample and cfg.streamer is None
        self.alive = torch.arange(n_rows, device=device)  # the output rows still in the batch
        self.kept: torch.Tensor | None = None
        self.t, self.done = 0, False

    def step(self, logits: torch.Tensor):
        cfg, t = self.cfg, self.t
        scores = self.scores_fn(logits, t)
        if cfg.do_sample:
            tokens = sample(F.softmax(scores, dim=-1), cfg.generator)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.eos is not None:
            tokens = tokens.masked_fill(~self.unfinished, self.pad)  # finished rows are padded
            self.unfinished &= ~torch.isin(tokens, self.scores_fn.eos)
        self.out[self.alive, t] = tokens
        if cfg.streamer is not None:
            cfg.streamer(tokens, t)
        self.scores_fn.observe(tokens, t)
        self.t = t + 1
        self.done = self.t == cfg.max_new_tokens or (self.eos is not None and not bool(self.unfinished.any()))
        self.kept = None
        if self.drop and not self.done and not bool(self.unfinished.all()):
            rows = self.unfinished.nonzero().squeeze(1)
            self.scores_fn.keep(rows)
            self.alive, self.unfinished, tokens, self.kept = self.alive[rows], self.unfinished[rows], tokens[rows], rows
        return tokens, None

    def result(self) -> torch.Tensor:
        return self.out[:, : self.t]


def sample(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row [N] from probs [N, V]; with one generator per input (B of them), input i's rows
    (N // B consecutive ones) draw from generator i exactly as they would in a batch of their own."""
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    groups = probs.view(len(generator), -1, probs.shape[-1])  # (B, N // B, V)
    return torch.cat([torch.multinomial(p, num_samples=1, generator=g) for p, g in zip(groups, generator)]).squeeze(1)


class BeamSearch:
    """transformers' vectorised beam search: keep the top K2 = max(2, 1 + #eos) * K continuations so that K
    of them can keep running, move EOS-ending ones (among the top K) into a pool of K finished hypotheses
    per row scored by logprob / length ** length_penalty."""

    def __init__(self, scores_fn: Scores, cfg, B: int, eos, fill: int, device):
        K, T = cfg.num_beams, cfg.max_new_tokens
        self.scores_fn, self.cfg, self.B, self.eos = scores_fn, cfg, B, eos
        self.K2 = max(2, 1 + (len(eos) if eos is not None else 0)) * K
        self.run_scores = torch.zeros(B, K, device=device)
        self.run_scores[:, 1:] = NEG  # only beam 0 is live at first, so the K beams do not pick the same tokens
        self.run_tokens = torch.full((B, K, T), fill, dtype=torch.long, device=device)  # tokens of running beams
        self.fin_tokens = self.run_tokens.clone()  # finished hypotheses [B, K, T], scores, lengths, "is real" flags
        self.fin_scores = torch.full((B, K), NEG, device=device)
        self.fin_lens = torch.zeros(B, K, dtype=torch.long, device=device)
        self.fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # may a running beam beat the worst?
        self.in_top_k = torch.arange(self.K2, device=device) < K  # only the best K candidates may be finalised
        self.row_offset = torch.arange(B, device=device)[:, None] * K
        self.kept = None  # beam search keeps every row (see GreedySearch)
        self.t, self.done = 0, False

    def step(self, logits: torch.Tensor):
        cfg, B, t = self.cfg, self.B, self.t
        K, T, lp, es, K2 = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty, cfg.early_stopping, self.K2
        logp = self.scores_fn(F.log_softmax(logits, dim=-1), t)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + self.run_scores[:, :, None]).view(B, K * V)
        if cfg.do_sample:
            idx = torch.multinomial(F.softmax(acc, dim=-1), num_samples=K2, generator=cfg.generator)
            top, order = acc.gather(1, idx).sort(dim=-1, descending=True)
            idx = idx.gather(-1, order)
        else:
            top, idx = torch.topk(acc, k=K2)
        src, tok = idx // V, idx % V  # [B, K2] source beam and token of each candidate
        cand = torch.take_along_dim(self.run_tokens, src[:, :, None], dim=1)  # [B, K2, T]
        cand[:, :, t] = tok
        if t + 1 >= T:
            hits = torch.ones_like(tok, dtype=torch.bool)  # max length reached
        elif self.eos is not None:
            hits = torch.isin(tok, self.scores_fn.eos)
        else:
            hits = torch.zeros_like(tok, dtype=torch.bool)

        # Running beams for the next step: the best K candidates that did not stop.
        run_cand = top + hits.to(torch.float32) * NEG
        keep = torch.topk(run_cand, k=K)[1]
        self.run_tokens = torch.take_along_dim(cand, keep[:, :, None], dim=1)
        self.run_scores = run_cand.gather(1, keep)
        origin = src.gather(1, keep)

        # Finished pool: merge stopped candidates (length-penalised) with the pool, keep the best K.
        just_done = hits & self.in_top_k
        fin_cand = top / ((t + 1) ** lp)
        fin_cand += (self.fin_done.all(-1, keepdim=True) & (es is True)).to(torch.float32) * NEG
        fin_cand += (~self.improvable).to(torch.float32) * NEG
        fin_cand += (~just_done) * NEG
        pool = torch.cat([self.fin_scores, fin_cand], 1)
        best = torch.topk(pool, k=K)[1]
        self.fin_tokens = torch.take_along_dim(torch.cat([self.fin_tokens, cand], 1), best[:, :, None], dim=1)
        self.fin_scores = pool.gather(1, best)
        self.fin_lens = torch.cat([self.fin_lens, torch.full_like(tok, t + 1)], 1).gather(1, best)
        self.fin_done = torch.cat([self.fin_done, just_done], 1).gather(1, best)

        # Stop when no row can improve, or (early_stopping=True) all pools are full, or nothing can continue.
        best_len = T if (es == "never" and lp > 0.0) else t + 1
        best_running = self.run_scores[:, :1] / (best_len**lp)
        worst_done = torch.where(self.fin_done, self.fin_scores.min(1, keepdim=True)[0], NEG)
        self.improvable = self.improvable & (best_running > worst_done).any(-1, keepdim=True)
        self.t = t + 1
        if not bool(self.improvable.any()) or (es is True and bool(self.fin_done.all())) or bool(hits.all()):
            self.done = True
            return None, None
        rows = (origin + self.row_offset).view(-1)
        tokens = self.run_tokens[:, :, t].reshape(-1)
        self.scores_fn.observe(tokens, t, rows)
        return tokens, rows

    def result(self) -> torch.Tensor:
        n = self.cfg.num_return_sequences
        length = int(self.fin_lens[:, :n].max())
        return self.fin_tokens[:, :n, :length].reshape(self.B * n, length)


def plain_greedy(cfg) -> bool:
    """Is cfg greedy search whose logits processors change nothing (no repetition penalty, no minimum length)?
    Its next token is then the argmax of the row's logits, so one argmax over many requests' rows gives each
    the token its own GreedySearch would (the server's continuous batching takes these rows together)."""
    return (cfg.num_beams == 1 and not cfg.do_sample and cfg.repetition_penalty == 1.0 and cfg.min_new_tokens == 0
            and cfg.streamer is None)


def make_search(cfg, batch_size: int, eos, pad, history: torch.Tensor, ignore_len: torch.Tensor | None = None,
                drop_finished: bool = False):
    """The search `cfg` asks for, over batch_size * max(num_beams, num_return_sequences) rows (expanded).
    history [N, P]: the ids the repetition penalty sees before the first new token; ignore_len [N]: leading
    history positions it skips (left padding). eos: tuple of ids or None; pad: the fill of finished rows.
    drop_finished: a greedy search lets finished rows leave the batch (GreedySearch; the driver calls
    runner.keep)."""
    if cfg.num_beams > 1:
        min_keep = 1 + (len(eos) if eos is not None else 1)
    else:
        min_keep = 1
    if isinstance(cfg.generator, (list, tuple)) and len(cfg.generator) != batch_size:
        raise ValueError(f"generate: {len(cfg.generator)} generators for a batch of {batch_size} inputs")
    scores_fn = Scores(cfg, eos, history, ignore_len, min_keep)
    if cfg.num_beams == 1:
        return GreedySearch(scores_fn, cfg, eos, pad, history.shape[0], history.device, drop_finished)
    # transformers: `pad_token_id or eos_token_id[0]` (a pad id of 0 counts as unset), -1 without EOS
    fill = (pad if pad else eos[0]) if eos is not None else -1
    return BeamSearch(scores_fn, cfg, batch_size, eos, fill, history.device)
