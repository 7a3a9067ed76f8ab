"""Stage 0: pretrain a small image encoder, then freeze it for every later stage (the role of EVA-CLIP).

BLIP-2 starts from a frozen pretrained encoder (EVA-CLIP ViT-g). Where no such encoder exists for the images at
hand (the quickstart's generated world), stage 0 makes one from the (image, caption) pairs, with one of two
objectives:
- `ImageTextAligner` (objective "contrastive"): the encoder learns to map each image to the sentence embedding
  of its caption (mean-pooled, L2-normalised outputs of a BERT-family encoder such as all-MiniLM-L6-v2) with a
  symmetric InfoNCE loss whose positives are the pairs that share a caption text or an image. The text side is
  locked (never trains) unless `text_trainable`, as CLIP trains its own.
- `TagPretrainer` (objective "tags"): the encoder learns to predict the tags its caption contains (Tag2Text).

After training only the image encoder is kept: `export` writes it as an eva_vit_g.pth-style file that
`model.vit_path` (stages 1 and 2) loads, and the heads and the text tower are dropped, as BLIP-2 drops CLIP's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel

from . import losses
from .config import VisionConfig
from .convert_lavis import ours_to_lavis
from .files import atomic_file, write_text_atomic
from .vision import build_vision


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where mask is 1: [B, T, D], [B, T] -> [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def contrastive_targets(text_ids: torch.Tensor, text_mask: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, B] row-normalised positives: pairs whose texts are token-identical or whose images are the same."""
    pos = losses.pair_positives(image_ids, text_ids, text_mask).float()
    return pos / pos.sum(1, keepdim=True)


def locked_text_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between normalised image [B, D] and text [B, D] embeddings with soft targets [B, B]
    (symmetric). Returns (loss, logits [B, B] image -> text)."""
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()  # (B, B)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    return loss, logits


@dataclass
class Stage0Config:
    """A stage-0 model's settings: the image encoder's (what the data pipeline reads for the image size)."""

    vision: VisionConfig


class ImageTextAligner(nn.Module):
    """A trainable image encoder (`vision`, the part that is kept) with a pooling head, and a sentence encoder.

    image side: encoder tokens -> LayerNorm -> mean over tokens -> Linear -> L2 norm.
    text side:  sentence encoder -> mean over non-pad tokens -> (trained: Linear) -> L2 norm; frozen (eval mode,
                no gradient, one pass per distinct text) unless `text_trainable`.
    """

    def __init__(self, vision: VisionConfig, text_dir: str | Path, text_trainable: bool = False,
                 text_layers: int | None = None):
        super().__init__()
        self.cfg = Stage0Config(vision)
        self.vision = build_vision(vision)
        try:
            self.text = AutoModel.from_pretrained(str(text_dir))
        except Exception as e:
            raise ValueError(f"stage 0: cannot load the sentence encoder at {text_dir}: "
                             f"{str(e).splitlines()[0]}") from None
        if text_layers:
            layers = self.text.encoder.layer
            if not 1 <= text_layers <= len(layers):
                raise ValueError(f"stage 0: text_layers must be in [1, {len(layers)}], got {text_layers}")
            self.text.encoder.layer = layers[:text_layers]
        self.text_trainable = bool(text_trainable)
        self.text.requires_grad_(self.text_trainable)
        self.text.train(self.text_trainable)
        D, E = self.vision.hidden_size, self.text.config.hidden_size
        self.norm = nn.LayerNorm(D)
        self.proj = nn.Linear(D, E)
        self.text_proj = nn.Linear(E, E) if self.text_trainable else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.processor = None
        self._text_cache: dict[tuple[int, ...], torch.Tensor] = {}  # frozen encoder: one pass per distinct text

    def train(self, mode: bool = True):
        super().train(mode)
        self.text.train(mode and self.text_trainable)  # a frozen encoder stays in eval mode: no dropout
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)

    def image_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision(pixel_values)  # (B, 1+N, D)
        return F.normalize(self.proj(self.norm(x).mean(1)), dim=-1)  # (B, E)

    def text_embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, E]."""
        if self.text_trainable:
            hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, E)
            return F.normalize(self.text_proj(mean_pool(hidden, attention_mask)), dim=-1)
        return self._frozen_text_embed(input_ids, attention_mask)

    @torch.no_grad()
    def _frozen_text_embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's embeddings: each distinct text is encoded once and kept."""
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        todo = [k for k in dict.fromkeys(keys) if k not in self._text_cache]
        if todo:
            rows = [keys.index(k) for k in todo]
            ids, mask = input_ids[rows], attention_mask[rows]
            hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, T, E)
            for k, e in zip(todo, F.normalize(mean_pool(hidden, mask), dim=-1)):
                self._text_cache[k] = e.float().cpu()
        return torch.stack([self._text_cache[k] for k in keys]).to(input_ids.device)

    def losses(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The stage-0 objective for a batch of (image, caption) pairs (`generator` is unused: no sampling)."""
        image = self.image_embed(pixel_values)
        text = self.text_embed(input_ids, attention_mask)
        targets = contrastive_targets(input_ids, attention_mask, image_ids)
        loss, logits = locked_text_loss(image, text, self.logit_scale, targets)
        with torch.no_grad():  # in-batch retrieval accuracy, a readable progress figure
            acc = (targets > 0)[torch.arange(len(targets)), logits.argmax(1)].float().mean()
        return {"loss": loss, "contrastive_loss": loss.detach(), "i2t_acc": acc}

    def export(self, out_dir: str | Path) -> Path:
        return export_encoder(self, out_dir)


def tag_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, tag_ids: list[list[int]]) -> torch.Tensor:
    """[B, n_tags] multi-hot: tag k is present when its token sequence `tag_ids[k]` occurs contiguously in the
    caption (within the attention mask)."""
    B, T = input_ids.shape
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    out = torch.zeros(B, len(tag_ids), device=input_ids.device)
    for k, seq in enumerate(tag_ids):
        n = len(seq)
        if n == 0 or n > T:
            continue
        windows = ids.unfold(1, n, 1)  # (B, T-n+1, n)
        want = torch.tensor(seq, device=ids.device)
        out[:, k] = (windows == want).all(-1).any(-1).float()
    return out


class TagPretrainer(nn.Module):
    """Pretraining of the image encoder by tags parsed from the captions (Tag2Text, Huang et al. 2023: a fixed
    tag list, and an image's tags are the listed phrases its caption contains). From the encoder's tokens,
    pooled (mean and max over positions), a linear head predicts each tag (binary cross-entropy).

    Why tags and not the whole caption: measured on the quickstart world (linear probes scored on the val
    scenes, exact set of (colour, shape) pairs), a captioning decoder (CapPa) or hashed caption n-grams leave
    the encoder with no more binding than it has at random initialisation (18 % and 34 % vs 34 %), because the
    phrasing of the captions, which is not in the picture, dominates those losses; a contrastive loss (with a
    trained text tower) is satisfied once a batch's pictures are told apart (21 %); tags: 86 %. Tags keep only
    what names the objects. The head is dropped after training; only `vision` is kept. `tags` are phrases,
    tokenised with the caption tokenizer."""

    def __init__(self, vision: VisionConfig, tag_ids: list[list[int]], tags: list[str] | None = None):
        super().__init__()
        if not tag_ids or any(not t for t in tag_ids):
            raise ValueError("stage 0 (tags): give a non-empty list of tags, none of them empty")
        self.cfg = Stage0Config(vision)
        self.vision = build_vision(vision)
        self.tag_ids = [list(map(int, t)) for t in tag_ids]
        self.tags = list(tags) if tags is not None else [str(t) for t in self.tag_ids]
        D = self.vision.hidden_size
        self.head = nn.Linear(2 * D, len(self.tag_ids))
        self.processor = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision(pixel_values)  # (B, N, D)
        return self.head(torch.cat([x.mean(1), x.amax(1)], dim=-1))  # (B, n_tags)

    def losses(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Mean binary cross-entropy over tags and pictures (`image_ids`, `generator` unused)."""
        target = tag_targets(input_ids, attention_mask, self.tag_ids)
        logits = self.logits(pixel_values)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        with torch.no_grad():  # the whole tag set right, a readable progress figure
            exact = ((logits > 0) == target.bool()).all(1).float().mean()
        return {"loss": loss, "tag_loss": loss.detach(), "exact_set": exact}

    def export(self, out_dir: str | Path) -> Path:
        return export_encoder(self, out_dir)


def export_encoder(model: nn.Module, out_dir: str | Path) -> Path:
    """Write `model.vision` as `vit.pth` (eva_vit_g.pth layout, what `model.vit_path` reads) and its config as
    `vision_config.json`; atomically. Returns the .pth path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"vision.{k}": v.detach().float().cpu().contiguous() for k, v in model.vision.state_dict().items()}
    lavis = {k.removeprefix("visual_encoder."): v for k, v in ours_to_lavis(state, "blip2_opt").items()}
    path = out / "vit.pth"
    with atomic_file(path) as tmp:
        torch.save(lavis, tmp)
    write_text_atomic(out / "vision_config.json", json.dumps(asdict(model.cfg.vision), indent=2))
    return path
