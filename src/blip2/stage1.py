"""Stage 1: Q-Former representation learning with the image encoder frozen (BLIP-2 paper §3.2;
LAVIS blip2_qformer.py: Blip2Qformer.forward).

`stage1_losses` is the whole objective: one queries-only pass (whose keys/values ITG reuses), one text-only
pass (ITC), one bidirectional pass over 3B (text, image) pairs (ITM with hard negatives from the global batch),
one causal text pass (ITG). It returns the named losses; `Blip2Model.losses` calls it. It takes the model as an
argument and never imports it.

`stage1_config` is a stage-1 model's config; `blip2.from_bert` (blip2/api.py) builds the model from a
BERT-family checkpoint directory with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import dist, heads, losses
from .config import Blip2Config, QFormerConfig, VisionConfig
from .convert_bert import qformer_config_from_bert


DECODER_TOKEN = "[DEC]"  # the Q-Former's bos token for ITG and captioning (LAVIS Blip2Base.init_tokenizer)


def add_decoder_token(tok) -> None:
    """Give a BERT tokenizer the [DEC] bos token (appended to its vocabulary) unless it has it already."""
    if tok.bos_token != DECODER_TOKEN:
        tok.add_special_tokens({"bos_token": DECODER_TOKEN})


def decoder_token_id(model) -> int:
    """[DEC]: from the attached tokenizer (its bos token), else the Q-Former config's bos_token_id, else the
    last id of the Q-Former vocabulary (where LAVIS appends it)."""
    proc = getattr(model, "processor", None)
    tok = getattr(proc, "qformer_tokenizer", None) or getattr(proc, "tokenizer", None)
    if tok is not None and tok.bos_token_id is not None and tok.bos_token == DECODER_TOKEN:
        return int(tok.bos_token_id)
    if model.cfg.qformer.bos_token_id is not None:
        return int(model.cfg.qformer.bos_token_id)
    return model.cfg.qformer.vocab_size - 1


def stage1_losses(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_ids: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """ITC + ITM + ITG for a batch of (image, text) pairs. input_ids: BERT-tokenised text starting with [CLS],
    right-padded, [B, T]; image_ids [B] marks texts that share an image. Pairs that share an image or whose texts
    are identical are positives of each other (soft ITC targets, never ITM negatives): losses.pair_positives."""
    if not model.cfg.stage1_heads or model.qformer.lm_head is None:
        raise ValueError("stage-1 losses need the stage-1 heads and the Q-Former LM head "
                         "(config stage1_heads=True, qformer.lm_head=True)")
    qf = model.qformer
    B = pixel_values.shape[0]
    attention_mask = attention_mask.long()

    # --- image side: frozen encoder, then the queries alone (ITC); the cache feeds ITG
    image = model.encode_image(pixel_values)  # (B, M, Dv)
    image_kv = qf.image_kv(image)  # cross-attention keys/values, shared by the ITC and ITM passes
    q_out = qf(image_kv=image_kv, use_cache=True)
    image_feats = heads.project_image(model.vision_proj, q_out.query_output)  # (B, Q, D)

    # --- text side alone (ITC)
    t_out = qf(None, input_ids=input_ids, text_mask=attention_mask, mode="itc", with_queries=False)
    text_feat = heads.project_text(model.text_proj, t_out.text_output)  # (B, D) from [CLS]

    # which pairs of the global batch match: same image, or the same caption text (never negatives)
    ids_all = dist.gather(input_ids)  # (W*B, T)
    mask_all = dist.gather(attention_mask)
    image_ids_all = dist.gather(image_ids) if image_ids is not None else None
    positive = losses.pair_positives(image_ids_all, ids_all, mask_all)  # (W*B, W*B)
    rows = torch.arange(B, device=input_ids.device) + dist.rank() * B  # this rank's global rows

    itc, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feat, model.temp, positive[rows])

    # --- ITM: hard negatives from the global batch
    image_all = dist.gather_with_grad(image)  # (W*B, M, Dv)
    neg_text, neg_image = losses.sample_hard_negatives(dist.gather(sim_i2t.detach()), dist.gather(sim_t2i.detach()),
                                                       positive, generator=generator)
    neg_t, neg_i = neg_text[rows], neg_image[rows]
    itm_ids = torch.cat([input_ids, input_ids, ids_all[neg_t]], dim=0)  # (3B, T)
    itm_mask = torch.cat([attention_mask, attention_mask, mask_all[neg_t]], dim=0)
    if dist.world_size() == 1:  # negatives are local images: reuse their keys/values
        neg_kv = [None if kv is None else (kv[0][neg_i], kv[1][neg_i]) for kv in image_kv]
    else:
        neg_kv = qf.image_kv(image_all[neg_i])
    itm_kv = [None if kv is None else (torch.cat([kv[0], nk[0], kv[0]]), torch.cat([kv[1], nk[1], kv[1]]))
              for kv, nk in zip(image_kv, neg_kv)]  # rows: (pos, pos), (pos, neg image), (neg text, pos)
    m_out = qf(image_kv=itm_kv, input_ids=itm_ids, text_mask=itm_mask, mode="itm")
    itm_logits = heads.itm_logits(model.itm_head, m_out.query_output)  # (3B, 2)
    itm = losses.itm_loss(itm_logits)

    # --- ITG: [DEC] starts the text; queries' keys/values from the first pass (not detached)
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = decoder_token_id(model)
    labels = dec_ids.masked_fill(attention_mask == 0, -100)
    g_out = qf(None, input_ids=dec_ids, text_mask=attention_mask, mode="itg", past=q_out.cache)
    hidden, target = g_out.text_output[:, :-1], labels[:, 1:]  # position t predicts token t+1
    keep = target != -100  # the vocabulary projection only where there is a target
    itg = losses.itg_loss(qf.lm_logits(hidden[keep]), target[keep])

    return {"itc_loss": itc, "itm_loss": itm, "itg_loss": itg, "loss": itc + itm + itg}


def stage1_config(vision: VisionConfig, bert_dir: str | Path | None = None, vocab_size: int | None = None,
                  num_query_tokens: int = 32, cross_attention_frequency: int = 2,
                  image_text_hidden_size: int = 256, **qformer) -> Blip2Config:
    """A stage-1 model config; the Q-Former takes the BERT checkpoint's shape when `bert_dir` is given."""
    q = dict(num_query_tokens=num_query_tokens, cross_attention_frequency=cross_attention_frequency,
             encoder_hidden_size=vision.hidden_size, use_text=True, lm_head=True, **qformer)
    if vocab_size is not None:
        q["vocab_size"] = vocab_size
    qcfg = qformer_config_from_bert(bert_dir, **q) if bert_dir is not None else QFormerConfig(**q)
    return Blip2Config(architecture="blip2-retrieval", vision=vision, qformer=qcfg, llm=None,
                       image_text_hidden_size=image_text_hidden_size, stage1_heads=True)
