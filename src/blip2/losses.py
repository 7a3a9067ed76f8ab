"""Stage-1 losses (BLIP-2 paper §3.2): image-text contrastive (ITC), hard-negative mining for matching (ITM), and
image-grounded text generation (ITG). Pure functions of features and logits; the cross-process gather lives
here (through blip2.dist) so that N processes give the losses and gradients of one process with the global
batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dist

LABEL_SMOOTHING = 0.1


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Max over queries of the dot product: image_feats [Bi, Q, D], text_feats [Bt, D] -> [Bi, Bt]."""
    return torch.einsum("iqd,td->iqt", image_feats, text_feats).amax(dim=1)


def same_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: rows whose texts are token-identical (padding ignored)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    _, group = torch.unique(ids, dim=0, return_inverse=True)  # equal rows -> equal group
    return group[:, None] == group[None, :]


def pair_positives(image_ids: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[N, N] bool over a (global) batch of N (image, text) pairs: pair i's image matches pair j's text when
    they share an image id (the original's `image_id` masking, LAVIS blip2_qformer.Blip2Qformer.forward) or
    when the two texts are token-identical. A caption that two pictures share describes both, so it must be
    neither a contrastive negative nor a hard negative for either (templated captions repeat often: "an orange
    triangle" for dozens of pictures). A row left without any negative keeps only its same-image positives.
    Without image ids each pair is its own image (the diagonal)."""
    if image_ids is None and input_ids is None:
        raise ValueError("pair_positives needs image ids or texts")
    if image_ids is None:
        same_image = torch.eye(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    else:
        same_image = image_ids[:, None] == image_ids[None, :]
    if input_ids is None:
        return same_image
    pos = same_image | same_text(input_ids, attention_mask)
    lonely = pos.all(dim=1)
    pos[lonely] = same_image[lonely]
    return pos


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor,
             positive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive loss over the global batch.

    image_feats [B, Q, D] and text_feats [B, D] (normalised, this rank's); features of all ranks are gathered
    with gradient. Targets: this rank's diagonal (rank*B + arange(B)), or, when `positive` [B, W*B] (this
    rank's rows of `pair_positives`) is given, its normalised indicator. Cross-entropy with label smoothing
    0.1, mean of both directions.
    Returns (loss, sim_i2t [B, W*B], sim_t2i [B, W*B]) with the similarities divided by `temp`.
    """
    B = image_feats.shape[0]
    image_all = dist.gather_with_grad(image_feats)  # (W*B, Q, D)
    text_all = dist.gather_with_grad(text_feats)  # (W*B, D)
    sim_i2t = itc_similarity(image_feats, text_all) / temp  # (B, W*B)
    sim_t2i = itc_similarity(image_all, text_feats).t() / temp  # (B, W*B)
    if positive is None:
        targets = torch.arange(B, device=image_feats.device) + dist.rank() * B
        targets = F.one_hot(targets, sim_i2t.shape[1]).to(sim_i2t.dtype)
    else:
        targets = positive.to(sim_i2t.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(sim_i2t_all: torch.Tensor, sim_t2i_all: torch.Tensor,
                          positive: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of the GLOBAL batch: one negative text per image and one negative image per text, drawn
    with probability softmax(similarity) where positives are excluded.

    sim_*_all [N, N] (N = W*B, rows = all ranks' samples); `positive` [N, N] (`pair_positives`, default the
    diagonal) marks the pairs that are never negatives. Sampling every global row on every rank with the
    same generator state makes the negatives independent of how the batch is split across processes.
    Returns (neg_text_for_image [N], neg_image_for_text [N]) indices into the global batch.
    """
    N = sim_i2t_all.shape[0]
    if positive is None:
        positive = torch.eye(N, dtype=torch.bool, device=sim_i2t_all.device)
    if bool(positive.all(dim=1).any()):
        raise ValueError("ITM hard negatives need at least two different images in the global batch")
    w_i2t = _negative_weights(sim_i2t_all, positive)
    w_t2i = _negative_weights(sim_t2i_all, positive)
    neg_text = torch.multinomial(w_i2t.cpu(), 1, generator=generator).squeeze(1).to(sim_i2t_all.device)
    neg_image = torch.multinomial(w_t2i.cpu(), 1, generator=generator).squeeze(1).to(sim_i2t_all.device)
    return neg_text, neg_image


def _negative_weights(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """softmax over the negatives of each row; a row with non-finite similarities (a diverged step, whose loss
    the training loop will skip) falls back to uniform so that sampling itself never fails."""
    w = sim.float().masked_fill(positive, float("-inf")).softmax(dim=1)
    bad = ~torch.isfinite(w).all(dim=1)
    if bool(bad.any()):
        uniform = (~positive).float()
        w[bad] = (uniform / uniform.sum(dim=1, keepdim=True))[bad]
    return w


def itm_loss(itm_logits: torch.Tensor) -> torch.Tensor:
    """itm_logits [3B, 2] for rows (pos text, pos image), (pos text, neg image), (neg text, pos image)."""
    B = itm_logits.shape[0] // 3
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(itm_logits.device)
    return F.cross_entropy(itm_logits.float(), labels)


def itg_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing 0.1 of aligned predictions: logits [N, V] for targets [N] (the caller
    shifts: hidden state t predicts token t+1, and drops ignored positions before the vocabulary projection).

    Averaged over the tokens of the GLOBAL batch (the token count is summed across ranks and this rank's sum
    scaled by the world size, so that DDP's gradient averaging gives exactly the one-process gradient)."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=-100, label_smoothing=LABEL_SMOOTHING,
                            reduction="sum")
    n_local = (targets != -100).sum()
    n_global = dist.all_reduce_sum(n_local.detach().float())
    return total * dist.world_size() / n_global.clamp(min=1)
