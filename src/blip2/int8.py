"""The `int8` scheme's layer: int8 weights and int8 activations with a scale per token, SmoothQuant-style
smoothing of the activations' outlier channels, calibrated on a few generic prompts.

    stats = calibrate(model)                       max |x| per input channel of every linear layer of model.llm
    layer = Int8Linear.from_float(linear, act_max)  one quantised layer (act_max: that layer's entry of stats)

Why: an LLM's hidden states carry a few channels hundreds of times larger than the rest (SmolLM2's MLP
`down_proj` inputs, the attention-sink token). One int8 scale for a whole activation tensor (PyTorch's dynamic
quantisation) rounds every ordinary channel of every token to a handful of levels. Here
- each token (row of x) gets its own scale, so one outlier token does not flatten the others;
- smoothing (Xiao et al., SmoothQuant, 2023) divides input channel j by s_j = max|X_j|^a / max|W_j|^(1-a) and
  multiplies weight column j by s_j, an identity in exact arithmetic (x W^T = (x / s)(W s)^T) that moves the
  outliers' range from the activations, quantised per token, into the weights, quantised per output row;
- the product is one int8 x int8 -> int32 GEMM (`torch._int_mm`, oneDNN on CPU), rescaled by the token's and
  the output row's scales.
The inverse smoothing 1 / s is applied to the layer's input at run time (one multiply), which needs no
knowledge of the architecture (norms, gated MLPs, attention outputs alike).
"""

from __future__ import annotations

import torch
import torch.nn as nn

ALPHA = 0.5  # smoothing strength a: half of each outlier channel's range moves into the weights

# generic calibration prompts: the activation outliers are a property of the LLM, not of the data
CALIBRATION_TEXTS = (
    "Question: What is in the picture? Short answer:",
    "Question: How many objects are there? Short answer:",
    "Question: What colour is the largest thing? Short answer:",
    "A short image caption:",
    "Describe the image in detail.",
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest before night falls.",
    "In 1905 the physicist published four papers on light, motion, mass and energy that changed science.",
    "To bake bread, mix flour, water, salt and yeast, let the dough rise for two hours, then bake it hot.",
)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (a scale per output row) and x quantised to int8 per token at run time.

    weight: int8 [out, in] of W * s; weight_scale: [out]; inv_smooth: [in] (1 / s, or None: no smoothing)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 inv_smooth: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.register_buffer("inv_smooth", inv_smooth)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_max: torch.Tensor | None = None, alpha: float = ALPHA):
        """The int8 form of `linear`; with `act_max` ([in]: the calibrated max |x| per input channel) the
        input channels are smoothed first."""
        return cls.from_weight(linear.weight, linear.bias, act_max, alpha)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, act_max: torch.Tensor | None = None,
                    alpha: float = ALPHA):
        """The int8 layer of a full-precision `weight` [out, in] and `bias` [out] (see `from_float`)."""
        w, inv = weight.detach().float(), None
        if act_max is not None:
            w, inv = smooth(w, act_max, alpha)
        w_scale = w.abs().amax(1).clamp(min=1e-8) / 127  # [out]
        q = torch.round(w / w_scale[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if bias is None else bias.detach().float().clone()
        return cls(q, w_scale, bias, inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()  # (T, in)
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-8)  # (T, 1)
        q = torch.round(x * (127 / amax)).to(torch.int8)  # (|x| <= amax: no clamp needed)
        acc = torch._int_mm(q, self.weight.t())  # (T, out) int32
        y = acc * (amax * (self.weight_scale / 127))  # (T, out) float: token scale x row scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"smoothed={self.inv_smooth is not None}")


def smooth(weight: torch.Tensor, act_max: torch.Tensor, alpha: float = ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """(W * s, 1 / s): the smoothed weight [out, in] and the factor [in] its input is multiplied by; in exact
    arithmetic F.linear(x / s, W * s) == F.linear(x, W)."""
    w = weight.detach().float()
    s = smoothing_scales(act_max.float(), w, alpha)
    return w * s, (1.0 / s).contiguous()


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s_j = max|X_j|^a / max|W_j|^(1-a) per input channel j (weight [out, in]), kept within [1e-5, 1e5]."""
    w_max = weight.abs().amax(0).clamp(min=1e-5)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(1e-5, 1e5)


def calibrate(model, texts=CALIBRATION_TEXTS, images=None, new_tokens: int = 8) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of the input of every linear layer (nn.Linear or Int8Linear) under
    `model.llm`, keyed by the layer's name in `model.llm`, over greedy generations for `texts` (prompts and
    decoding steps both). `images`: pixel values or images (default: a few synthetic ones); a model without a
    processor gets random token ids."""
    layers = {n: m for n, m in model.llm.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float().cpu()  # (in,)
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    training = model.training
    model.eval()  # (no dropout)
    try:
        with torch.inference_mode():
            for kw in _calibration_batches(model, list(texts), images):
                model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return stats


def _calibration_batches(model, texts: list[str], images):
    size = model.cfg.vision.image_size
    pixels = model.pixel_values(images) if images is not None else synthetic_images(len(texts), size)
    pixels = pixels.to(model.device)
    proc, n = model.processor, len(texts)
    for i in range(0, n, 4):  # batches of 4 prompts
        px = pixels[torch.arange(i, min(i + 4, n)) % len(pixels)]
        kw = {"pixel_values": px}
        if proc is not None:
            kw["input_ids"], kw["attention_mask"] = proc.tokenize_prompts(texts[i:i + 4])
            if model.cfg.architecture == "instructblip":
                kw["qformer_input_ids"], kw["qformer_attention_mask"] = proc.tokenize_qformer(texts[i:i + 4])
        else:
            g = torch.Generator().manual_seed(i)
            vocab = model.llm.config.vocab_size
            kw["input_ids"] = torch.randint(3, vocab, (len(px), 12), generator=g)
            if model.cfg.architecture == "instructblip":
                kw["qformer_input_ids"] = torch.randint(3, 100, (len(px), 8), generator=g)
        yield {k: v.to(model.device) for k, v in kw.items()}


def synthetic_images(n: int, size: int) -> torch.Tensor:
    """`n` normalised images [n, 3, size, size] with no data behind them: gradients, stripes, blobs, noise."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            img = torch.stack([xs, ys, -xs])
        elif kind == 1:
            img = torch.sin(xs * (4 + i) * 3.14)[None].repeat(3, 1, 1) * torch.rand(3, 1, 1, generator=g)
        elif kind == 2:
            c = torch.rand(2, generator=g) * 1.2 - 0.6
            blob = ((xs - c[0]) ** 2 + (ys - c[1]) ** 2 < 0.15).float()
            img = blob[None] * (torch.rand(3, 1, 1, generator=g) * 2 - 1) * 1.5
        else:
            img = torch.randn(3, size, size, generator=g) * 0.8
        out.append(img)
    return torch.stack(out)
