"""Evaluation metrics (SPEC §9), one section per task; every function takes plain tensors / arrays / lists and
returns a dict of named numbers, so the evaluation scripts only collect predictions and call these.

- Retrieval: `recall_at_k` (image->text and text->image R@K, the COCO / Flickr30k protocol as LAVIS reports it).
- Captioning and VQA metrics belong in their own sections below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


# -------------------------------------------------------------------------------------------------- retrieval
def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D score matrix, got shape {list(t.shape)}")
    return t.detach().float().cpu()


def _ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of each row's best-scored ground-truth column: the number of NON-ground-truth columns that
    score at least as high. Ties are broken against the ground truth (pessimistic), so a -inf ground truth outside
    the re-ranked top k never counts as a hit even when fewer than K entries are finite.

    scores [R, C] float, gt [R, C] bool -> [R] long."""
    best = torch.where(gt, scores, torch.tensor(-torch.inf)).amax(dim=1, keepdim=True)  # (R, 1)
    return ((scores >= best) & ~gt).sum(dim=1)


def recall_at_k(i2t, t2i, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent for image->text and text->image retrieval.

    i2t [N_img, N_txt] and t2i [N_txt, N_img]: score matrices (torch or numpy; higher = better; -inf allowed).
    img2txt[i]: the caption indices of image i (several per image: a hit at K if ANY of them is in the top K).
    txt2img[j]: the image of caption j (a hit at K if it is in the top K).
    Returns {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_mean", "t2i_r1", ..., "t2i_mean", "mean"} for ks=(1, 5, 10);
    `mean` averages the 2*len(ks) recalls.
    """
    i2t, t2i = _as_tensor(i2t, "i2t"), _as_tensor(t2i, "t2i")
    n_img, n_txt = i2t.shape
    if t2i.shape != (n_txt, n_img):
        raise ValueError(f"t2i must be [N_txt, N_img] = {[n_txt, n_img]} (the shape of i2t transposed), "
                         f"got {list(t2i.shape)}")
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries but i2t has {n_img} image rows")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries but t2i has {n_txt} caption rows")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")

    gt_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool)  # (N_img, N_txt): caption j belongs to image i
    for i, caps in enumerate(img2txt):
        caps = list(caps)
        if not caps:
            raise ValueError(f"image {i} has no captions in img2txt; every image needs at least one")
        if min(caps) < 0 or max(caps) >= n_txt:
            raise ValueError(f"img2txt[{i}] = {caps} has caption indices outside [0, {n_txt})")
        gt_i2t[i, caps] = True
    img_of = torch.as_tensor(np.asarray(txt2img, dtype=np.int64))  # (N_txt,)
    if img_of.numel() and (img_of.min() < 0 or img_of.max() >= n_img):
        raise ValueError(f"txt2img has image indices outside [0, {n_img})")
    gt_t2i = torch.zeros(n_txt, n_img, dtype=torch.bool)
    gt_t2i[torch.arange(n_txt), img_of] = True

    out: dict[str, float] = {}
    for name, scores, gt in (("i2t", i2t, gt_i2t), ("t2i", t2i, gt_t2i)):
        ranks = _ranks(scores, gt)
        recalls = [100.0 * (ranks < int(k)).float().mean().item() for k in ks]
        out.update({f"{name}_r{int(k)}": r for k, r in zip(ks, recalls)})
        out[f"{name}_mean"] = sum(recalls) / len(recalls)
    out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2  # equal counts per direction: the mean of all recalls
    return out


# ------------------------------------------------------------------------------------------------- captioning
# (BLEU, METEOR, ROUGE-L, CIDEr-D: to be added)

# -------------------------------------------------------------------------------------------------------- VQA
# (VQAv2 accuracy, GQA exact match: to be added)
