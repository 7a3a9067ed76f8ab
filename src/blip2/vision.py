"""The frozen image encoder: an EVA/CLIP-style pre-LayerNorm ViT (EVA ViT-g/14 by default), any timm ViT, or a
small convolutional tower (`ConvTower`, for small pictures and small data, where a ViT learns too slowly).

EVA ViT-g as BLIP-2 uses it (LAVIS eva_vit.py: create_eva_vit_g): patch 14, width 1408, 16 heads, exact GELU,
pre-LN (eps 1e-6), learned absolute position embedding + CLS token, q and v biases (no k bias), no layer-scale,
no final norm, the first 39 of 40 blocks. Position embeddings are interpolated bicubically when the image size
differs from the one the table was trained for (224 -> 364 gives 677 tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


def _act(name: str):
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":  # CLIP's x * sigmoid(1.702 x)
        return _QuickGELU()
    raise ValueError(f"unsupported activation {name!r}")


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; biases on q and v only (k bias is zero)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        qkv = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hs)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_hidden_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(pe: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, 1 + side*side, D] -> [1, 1 + grid_h*grid_w, D]: the square patch grid resized bicubically (in pe's
    dtype), the CLS slot kept. The one resizer: at forward time for another image size and when a checkpoint
    trained at another size is converted (as LAVIS's interpolate_pos_embed)."""
    side = int(math.isqrt(pe.shape[1] - 1))
    cls_pos, patch_pos = pe[:, :1], pe[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
    patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)  # (1, gh*gw, D)
    return torch.cat([cls_pos, patch_pos], dim=1)


class EvaViT(nn.Module):
    """Pre-LN ViT returning all token features [B, 1 + (H/p)(W/p), D] of the last built block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():  # ViT-style init (timm / EVA): truncated normal, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position table for a grid_h x grid_w patch grid: [1, 1 + grid_h*grid_w, D] (bicubic resize)."""
        n = self.pos_embed.shape[1] - 1
        if grid_h * grid_w == n and grid_h == grid_w:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid_h, grid_w)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        x = x + self.position_embedding(H // p, W // p).to(x.dtype)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixel_values)


class TimmViT(nn.Module):
    """Any timm VisionTransformer as the frozen encoder; features after block `cfg.timm_block` (token outputs,
    before the final norm). Needs the optional `timm` package."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        try:  # deferred: timm is the optional `timm` extra
            import timm
        except Exception as e:  # timm also needs torchvision
            raise ImportError(f"vision.kind='timm' needs the timm package (pip install 'blip2[timm]'): {e}") from None
        self.cfg = cfg
        self.model = timm.create_model(cfg.timm_name, pretrained=cfg.timm_pretrained, num_classes=0,
                                       img_size=cfg.image_size)
        if not hasattr(self.model, "blocks"):
            raise ValueError(f"timm model {cfg.timm_name!r} is not a ViT (it has no .blocks)")
        n = len(self.model.blocks)
        self.last_block = cfg.timm_block % n
        self.model.blocks = self.model.blocks[: self.last_block + 1]  # drop the unused blocks
        self.model.norm = nn.Identity()
        self.model.fc_norm = nn.Identity()
        self.model.head = nn.Identity()

    @property
    def hidden_size(self) -> int:
        return self.model.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixel_values)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes [grid*grid, dim], row-major: half the channels code the row, half
    the column, each as sin/cos pairs at geometrically spaced frequencies (the MAE / ViT-22B table)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    freqs = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    angles = pos[:, None] * freqs[None, :]  # (grid, dim/4)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim/2)
    rows = code[:, None, :].expand(grid, grid, -1)  # (grid_row, grid_col, dim/2)
    cols = code[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


class ConvTower(nn.Module):
    """A small convolutional image encoder returning a grid of feature tokens [B, (H/s)(W/s), D].

    Each stage is conv3x3 -> GroupNorm (up to 8 groups) -> GELU -> max-pool 2x2 (`cnn_channels` gives the widths; the total
    stride s = 2^stages = patch_size); a last conv3x3 maps to `hidden_size`, and fixed 2-D sine-cosine position
    codes are added so that the Q-Former's cross-attention, which has no positions of its own, can tell where a
    token is. Convolutions share weights across positions and max pooling keeps local detections, the inductive
    bias that lets a shape detector be learnt from a few thousand pictures (a ViT of the same cost does not).
    All parameters live under `convnet.` (the checkpoint key maps pass them through unchanged)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        layers, width = [], 3
        for c in cfg.cnn_channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.GroupNorm(math.gcd(8, c), c), nn.GELU(), nn.MaxPool2d(2)]
            width = c
        layers.append(nn.Conv2d(width, cfg.hidden_size, 3, padding=1))
        self.convnet = nn.Sequential(*layers)
        grid = cfg.image_size // cfg.patch_size
        self.register_buffer("pos_code", sincos_2d(grid, cfg.hidden_size)[None], persistent=False)  # (1, N, D)
        self.grad_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable  # (a few MB of activations: nothing to save)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.convnet(pixel_values.to(self.convnet[0].weight.dtype))  # (B, D, H/s, W/s)
        B, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos_code if gh * gw == self.pos_code.shape[1] and gh == gw else sincos_2d(gh, D)[None]
        return x + pos.to(x.dtype)


def build_vision(cfg: VisionConfig) -> nn.Module:
    return {"eva": EvaViT, "timm": TimmViT, "cnn": ConvTower}[cfg.kind](cfg)
