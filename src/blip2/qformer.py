"""The Q-Former: learned queries and text in one BERT-shaped transformer (BLIP-2 paper §3.1-3.2; LAVIS
blip2_models/Qformer.py).

The input sequence is [queries ; text]. One set of self-attention weights serves both; which position sees which
is decided by one of three masks (`itc_mask`, `itm_mask`, `itg_mask`). Every `cross_attention_frequency` layers
the query positions (only they) cross-attend to the image features. Query and text positions have separate
feed-forward networks. A key/value cache lets text be decoded token by token after a queries-only pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import QFormerConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (B, nh, L, hs) each


# ------------------------------------------------------------------------------------------------------ masks
# Each mask is [B, Q+T, Q+T] bool, True where row position may attend to column position.
# Q = num_query query positions (never padded), T = text positions with text_mask [B, T] (1 = real, 0 = pad).
# Padding keys are always masked.


def _keys(num_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, Q+T] bool: which keys are real (queries always are)."""
    B = text_mask.shape[0]
    q = torch.ones(B, num_query, dtype=torch.bool, device=text_mask.device)
    return torch.cat([q, text_mask.bool()], dim=1)[:, None, :]


def itm_mask(num_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Bidirectional (ITM, InstructBLIP): every position sees every real position."""
    L = num_query + text_mask.shape[1]
    return _keys(num_query, text_mask).expand(-1, L, -1)


def itc_mask(num_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Unimodal (ITC): queries see queries only, text sees (real) text only."""
    L = num_query + text_mask.shape[1]
    is_q = torch.arange(L, device=text_mask.device) < num_query  # (L,)
    same_side = is_q[:, None] == is_q[None, :]  # (L, L)
    return _keys(num_query, text_mask) & same_side[None]


def itg_mask(num_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Multimodal causal (ITG): queries see queries only; text sees all queries and text up to itself."""
    L = num_query + text_mask.shape[1]
    idx = torch.arange(L, device=text_mask.device)
    is_q = idx < num_query
    causal = idx[None, :] <= idx[:, None]  # (L, L): column <= row
    allowed = torch.where(is_q[:, None], is_q[None, :], causal)  # query rows: query columns; text rows: causal
    return _keys(num_query, text_mask) & allowed[None]


MASKS = {"itm": itm_mask, "itc": itc_mask, "itg": itg_mask}


# ----------------------------------------------------------------------------------------------------- layers
class MultiHeadAttention(nn.Module):
    """Self- or cross-attention (BERT layout: q/k/v, output dense, post-LN residual)."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(kv_dim, H)
        self.value = nn.Linear(kv_dim, H)
        self.out = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.out_dropout = nn.Dropout(cfg.hidden_dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        return x.view(B, L, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, L, hs)

    def project_kv(self, src: torch.Tensor) -> KV:
        """Keys and values [B, nh, M, hs] of `src` [B, M, D]."""
        return self._split(self.key(src)), self._split(self.value(src))

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                past: KV | None = None, kv: KV | None = None) -> tuple[torch.Tensor, KV]:
        """x [B, N, H]; kv_input (cross-attention) [B, M, Dkv], else x; mask [B, 1|nh, N, P+N] bool; past: cached
        self-attention keys/values [B, nh, P, hs]; kv: precomputed cross-attention keys/values. Returns the
        output and this call's full (k, v)."""
        q = self._split(self.query(x))
        k, v = kv if kv is not None else self.project_kv(x if kv_input is None else kv_input)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, N, hs)
        y = y.transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.out_dropout(self.out(y))), (k, v)


class FeedForward(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[cfg.hidden_act]
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, cfg.hidden_size)
        self.crossattention = MultiHeadAttention(cfg, cfg.encoder_hidden_size) if cfg.has_cross_attention(index) else None
        self.ffn_query = FeedForward(cfg)
        self.ffn_text = FeedForward(cfg) if cfg.use_text else None

    def forward(self, x: torch.Tensor, num_query: int, mask: torch.Tensor | None, image: torch.Tensor | None,
                image_mask: torch.Tensor | None, past: KV | None, image_kv: KV | None = None) -> tuple[torch.Tensor, KV]:
        """x [B, Nq+Nt, H] with the first `num_query` positions being queries."""
        x, kv = self.attention(x, mask=mask, past=past)
        parts = []
        if num_query > 0:
            q = x[:, :num_query]
            if self.crossattention is not None:
                if image is None and image_kv is None:
                    raise ValueError("the Q-Former's cross-attention layers need image features")
                q, _ = self.crossattention(q, kv_input=image, mask=image_mask, kv=image_kv)
            parts.append(self.ffn_query(q))
        if x.shape[1] > num_query:
            if self.ffn_text is None:
                raise ValueError("this Q-Former has no text side (qformer.use_text=False)")
            parts.append(self.ffn_text(x[:, num_query:]))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], kv


class Embeddings(nn.Module):
    """Word + absolute position embeddings for text (none for queries), one LayerNorm + dropout over [Q; T]."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.use_text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None, position_offset: int = 0):
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            T = input_ids.shape[1]
            if position_offset + T > self.position_embeddings.num_embeddings:
                raise ValueError(f"Q-Former text of {position_offset + T} tokens is longer than its "
                                 f"{self.position_embeddings.num_embeddings} positions")
            pos = torch.arange(position_offset, position_offset + T, device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
            parts.append(text.to(queries.dtype) if queries is not None else text)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.dropout(self.layernorm(x))


class LMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (+ bias)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(x))), word_embeddings, self.bias)


@dataclass
class QFormerOutput:
    hidden_states: torch.Tensor  # [B, Nq+Nt, H] of this call's positions
    query_output: torch.Tensor | None  # [B, Q, H] or None when the queries were not in this call
    text_output: torch.Tensor | None  # [B, Nt, H]
    cache: list[KV] | None  # self-attention keys/values of past + this call, per layer


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_layers))
        self.lm_head = LMHead(cfg) if cfg.lm_head else None
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=cfg.initializer_range)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_query(self) -> int:
        return self.cfg.num_query_tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def image_kv(self, image_embeds: torch.Tensor) -> list[KV | None]:
        """The image's cross-attention keys/values for every layer (None where a layer has none): computed once,
        they serve every pass over the same images (stage 1 runs them through the ITC and the ITM passes)."""
        image_embeds = image_embeds.to(self.embeddings.layernorm.weight.dtype)
        return [layer.crossattention.project_kv(image_embeds) if layer.crossattention is not None else None
                for layer in self.layers]

    def forward(self, image_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, mode: str = "itm", with_queries: bool = True,
                past: list[KV] | None = None, past_text_len: int = 0, image_mask: torch.Tensor | None = None,
                use_cache: bool = False, query_embeds: torch.Tensor | None = None,
                image_kv: list[KV | None] | None = None) -> QFormerOutput:
        """Run the Q-Former over [queries ; text].

        image_embeds [B, M, Dv]: image features (needed when queries are in the call).
        input_ids / text_mask [B, T]: text (optional). mode: which mask joins queries and text ("itm", "itc",
        "itg"). image_kv: precomputed `image_kv(image_embeds)` instead of image_embeds.
        with_queries=False runs the text alone (ITC's text pass). past: a cache from an earlier call
        whose first positions were the queries (then this call holds text only and `past_text_len` text tokens
        are already in the cache): this is how ITG and Q-Former captioning reuse the queries' keys/values.
        """
        if mode not in MASKS:
            raise ValueError(f"unknown Q-Former mask mode {mode!r}; expected one of {sorted(MASKS)}")
        Q = self.num_query
        has_q_now = with_queries and past is None
        if image_embeds is not None:
            B = image_embeds.shape[0]
        elif image_kv is not None:
            B = next(kv[0].shape[0] for kv in image_kv if kv is not None)
        else:
            B = input_ids.shape[0]
        queries = None
        if has_q_now:
            queries = self.query_tokens.expand(B, -1, -1) if query_embeds is None else query_embeds
            # the Q-Former runs in its own dtype (fp32 when the rest of the model is fp16)
            queries = queries.to(self.embeddings.layernorm.weight.dtype)
        if input_ids is not None and text_mask is None:
            text_mask = torch.ones_like(input_ids)
        x = self.embeddings(queries, input_ids, position_offset=past_text_len)  # (B, Nq+Nt, H)
        dtype = x.dtype

        mask = None
        n_new = x.shape[1]
        if input_ids is not None or past is not None:
            # full mask over (past + this call); keep the rows of this call
            q_in_mask = Q if (has_q_now or past is not None) and with_queries else 0
            past_text = torch.ones(B, past_text_len, dtype=torch.long, device=x.device)
            full_text = torch.cat([past_text, text_mask.to(past_text.dtype)], dim=1) if input_ids is not None else past_text
            full = MASKS[mode](q_in_mask, full_text)  # (B, P+N, P+N)
            mask = full[:, -n_new:, :][:, None]  # (B, 1, N, P+N)
        if image_embeds is not None:
            image_embeds = image_embeds.to(dtype)
        img_mask = None
        if image_mask is not None:
            img_mask = image_mask.bool()[:, None, None, :]  # (B, 1, 1, M)

        num_query_now = Q if has_q_now else 0
        cache = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            lp = past[i] if past is not None else None
            ikv = image_kv[i] if image_kv is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, kv = torch.utils.checkpoint.checkpoint(layer, x, num_query_now, mask, image_embeds, img_mask, lp,
                                                          ikv, use_reentrant=False)
            else:
                x, kv = layer(x, num_query_now, mask, image_embeds, img_mask, lp, ikv)
            if use_cache:
                cache.append(kv)
        return QFormerOutput(
            hidden_states=x,
            query_output=x[:, :num_query_now] if num_query_now else None,
            text_output=x[:, num_query_now:] if x.shape[1] > num_query_now else None,
            cache=cache,
        )

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [B, T, V] for text hidden states (needs lm_head=True)."""
        if self.lm_head is None:
            raise ValueError("this Q-Former has no LM head (qformer.lm_head=False)")
        return self.lm_head(text_hidden, self.embeddings.word_embeddings.weight)
