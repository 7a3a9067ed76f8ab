"""The stage-1 heads' arithmetic (BLIP-2 paper §3.2; LAVIS blip2_qformer.py: Blip2Qformer.forward,
compute_sim_matrix), written once for the model's methods, the stage-1 objective, retrieval and serving.

ITC: the query outputs and the text's [CLS] output are projected and L2-normalised; a pair's similarity is the
max over the queries of their dot products (`losses.itc_similarity` for all pairs, `pair_similarity` row by
row). ITM: `itm_head` on every query output of the [queries; text] pass, averaged over the queries.

Each head runs in its own dtype (the Q-Former stays fp32 in an fp16 model, as in transformers, the heads do
not); fp32=True converts the head's output to fp32 before normalising / averaging (retrieval scores).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def apply_head(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) with x cast to the layer's dtype."""
    return layer(x.to(layer.weight.dtype))


def project_image(vision_proj: nn.Module, query_output: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Query outputs [B, Q, H] -> normalised ITC embeddings [B, Q, D]."""
    p = apply_head(vision_proj, query_output)
    return F.normalize(p.float() if fp32 else p, dim=-1)


def project_text(text_proj: nn.Module, text_output: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Text-only pass outputs [B, T, H] -> normalised ITC embedding of [CLS] (position 0) [B, D]."""
    p = apply_head(text_proj, text_output[:, 0])
    return F.normalize(p.float() if fp32 else p, dim=-1)


def itm_logits(itm_head: nn.Module, query_output: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Query outputs of the bidirectional [queries; text] pass [B, Q, H] -> matching logits [B, 2]."""
    logits = apply_head(itm_head, query_output)  # (B, Q, 2)
    return (logits.float() if fp32 else logits).mean(dim=1)


def pair_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row r's image [R, Q, D] against row r's text [R, D]: max over queries of the dot product [R]."""
    return torch.einsum("rqd,rd->rq", image_embeds, text_embeds).amax(dim=1)
