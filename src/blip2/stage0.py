"""Stage 0: pretrain a small image encoder contrastively against a frozen sentence encoder, then freeze it.

BLIP-2 starts from a frozen CLIP-style encoder (EVA-CLIP ViT-g). Where no such encoder exists for the images at
hand (the quickstart's generated world), stage 0 makes one: a ViT learns to map each image to the frozen
sentence embedding of its caption (mean-pooled, L2-normalised outputs of a BERT-family encoder such as
all-MiniLM-L6-v2), with a symmetric InfoNCE loss whose positives are the pairs that share a caption text or an
image. The text side never trains ("locked text"), so the image encoder inherits the sentence encoder's
geometry. After training only the ViT is kept: `export` writes it as an eva_vit_g.pth-style file that
`model.vit_path` (stages 1 and 2) loads, and the head is dropped, as BLIP-2 drops CLIP's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig
from .vision import build_vision


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where mask is 1: [B, T, D], [B, T] -> [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def contrastive_targets(text_ids: torch.Tensor, text_mask: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, B] row-normalised positives: pairs whose texts are token-identical or whose images are the same."""
    ids = text_ids.masked_fill(text_mask == 0, -1)
    _, text_group = torch.unique(ids, dim=0, return_inverse=True)  # equal rows -> equal group
    pos = text_group[:, None] == text_group[None, :]
    if image_ids is not None:
        pos = pos | (image_ids[:, None] == image_ids[None, :])
    pos = pos.float()
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
    """What the training pipeline reads from a model's `cfg`."""

    vision: VisionConfig
    architecture: str = "stage0"
    is_encoder_decoder: bool = False


class ImageTextAligner(nn.Module):
    """A trainable ViT (`vision`, the part that is kept) with a pooling head, and a frozen sentence encoder.

    image side: ViT tokens -> LayerNorm -> mean over tokens -> Linear -> L2 norm.
    text side:  frozen encoder (eval mode, no gradient) -> mean over non-pad tokens -> L2 norm.
    """

    def __init__(self, vision: VisionConfig, text_dir: str | Path):
        super().__init__()
        from transformers import AutoModel

        self.cfg = Stage0Config(vision)
        self.vision = build_vision(vision)
        try:
            self.text = AutoModel.from_pretrained(str(text_dir))
        except Exception as e:
            raise ValueError(f"stage 0: cannot load the sentence encoder at {text_dir}: "
                             f"{str(e).splitlines()[0]}") from None
        self.text.requires_grad_(False)
        self.text.eval()
        D, E = self.vision.hidden_size, self.text.config.hidden_size
        self.norm = nn.LayerNorm(D)
        self.proj = nn.Linear(D, E)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.llm = None  # (the training loop's precision code looks for it)
        self.processor = None
        self._text_cache: dict[tuple[int, ...], torch.Tensor] = {}  # frozen encoder: one pass per distinct text

    def train(self, mode: bool = True):
        super().train(mode)
        self.text.eval()  # frozen: no dropout
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)

    def image_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision(pixel_values)  # (B, 1+N, D)
        return F.normalize(self.proj(self.norm(x).mean(1)), dim=-1)  # (B, E)

    @torch.no_grad()
    def text_embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, E]; the encoder is frozen, so each distinct text is encoded once and kept."""
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
        """Write the ViT as `vit.pth` (eva_vit_g.pth layout, what `model.vit_path` reads) and its config as
        `vision_config.json`; atomically. Returns the .pth path."""
        from .convert_lavis import ours_to_lavis

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {f"vision.{k}": v.detach().float().cpu().contiguous() for k, v in self.vision.state_dict().items()}
        lavis = {k.removeprefix("visual_encoder."): v for k, v in ours_to_lavis(state, "blip2_opt").items()}
        path = out / "vit.pth"
        tmp = out / f".vit.pth.{os.getpid()}.tmp"
        torch.save(lavis, tmp)
        os.replace(tmp, path)
        cfg_tmp = out / f".vision_config.json.{os.getpid()}.tmp"
        cfg_tmp.write_text(json.dumps(asdict(self.cfg.vision), indent=2))
        os.replace(cfg_tmp, out / "vision_config.json")
        return path
