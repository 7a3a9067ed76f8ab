"""The original implementation's precision on GPUs, in one place (docs/evaluation.md "Precision").

    apply_precision(model, llm_dtype=torch.float16)   # OPT / Vicuna; Flan-T5: torch.bfloat16

Which module holds which dtype (LAVIS lavis/models/blip2_models/blip2.py init_vision_encoder with
vit_precision="fp16" -> eva_vit.py convert_weights_to_fp16, which converts the ViT's conv / linear / attention
weights and leaves its LayerNorms in fp32; ln_vision, the Q-Former, the query tokens and the projection are
created in fp32 and stay there; blip2_opt.py / blip2_vicuna_instruct.py load the LLM with torch_dtype=float16,
blip2_t5.py / blip2_t5_instruct.py cast the T5 weights to bfloat16):

    vision (conv, linear, embeddings)  fp16        vision LayerNorms   fp32 (input cast up, output back)
    ln_vision                          fp32        qformer, queries    fp32
    language_projection                fp32        llm                 fp16 (OPT, Vicuna) / bf16 (Flan-T5)

The original also runs the ViT and Q-Former under torch.autocast(fp16) on GPUs (`maybe_autocast`); here each
module computes in its own dtype (the LLM's inputs are cast to its dtype by the model).

Where it applies (`resolve_policy`): `blip2.load(..., dtype=fp16 | bf16)` and the commands' `--dtype` on a CUDA
device ("auto"; `precision="original"` anywhere, `precision="cast"` / `--precision cast` for the plain cast of
`Blip2Model.set_dtype`), and training under autocast on GPUs (blip2.train.runtime.place_for_training: the frozen
towers in the autocast dtype, trainable weights fp32). fp32 and CPU loads are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .options import POLICIES


def resolve_policy(policy: str, dtype: torch.dtype | None, device=None) -> str:
    """"original" (apply_precision) or "cast" (every weight in `dtype`) for a model put in `dtype` on `device`.
    fp32 (or no dtype) is always a cast (nothing changes); for fp16 / bf16 "auto" is the original's policy on a
    CUDA device and the cast elsewhere (CPU loads behave as before)."""
    if policy not in POLICIES:
        raise ValueError(f"precision must be one of {', '.join(POLICIES)}, got {policy!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        return "cast"
    if policy != "auto":
        return policy
    return "original" if device is not None and torch.device(device).type == "cuda" else "cast"


def vision_plan(vision: nn.Module, vit_dtype: torch.dtype = torch.float16) -> dict[str, torch.dtype]:
    """The image encoder's parameter name -> dtype: LayerNorm weights fp32, every other parameter `vit_dtype`."""
    norms = {name for name, m in vision.named_modules() if isinstance(m, nn.LayerNorm)}
    return {name: torch.float32 if name.rpartition(".")[0] in norms else vit_dtype
            for name, _ in vision.named_parameters()}


def precision_plan(model, llm_dtype: torch.dtype = torch.float16, vit_dtype: torch.dtype = torch.float16,
                   trainable_fp32: bool = False) -> dict[str, torch.dtype]:
    """Parameter name -> the dtype the policy gives it; trainable_fp32: parameters that require grad stay fp32
    (training's master weights, e.g. LoRA adapters inside the LLM)."""
    vision = vision_plan(model.vision, vit_dtype)
    plan = {}
    for name, p in model.named_parameters():
        top, _, rest = name.partition(".")
        if trainable_fp32 and p.requires_grad:
            plan[name] = torch.float32
        elif top == "vision":
            plan[name] = vision[rest]
        elif top == "llm":
            plan[name] = llm_dtype
        else:  # ln_vision, qformer, query tokens, projection, stage-1 heads
            plan[name] = torch.float32
    return plan


def _norm_in_fp32(module, args):
    (x,) = args
    module._precision_dtype = x.dtype
    return (x.float(),)


def _norm_out_back(module, args, out):
    return out.to(module._precision_dtype)


def _vision_input(dtype):
    def hook(module, args):
        return (args[0].to(dtype),) + tuple(args[1:])
    return hook


def apply_precision(model, llm_dtype: torch.dtype = torch.float16, vit_dtype: torch.dtype = torch.float16,
                    trainable_fp32: bool = False):
    """Cast `model` in place to precision_plan and make the mixed towers run: the vision encoder takes its input
    in `vit_dtype` and returns it in fp32 for ln_vision; its LayerNorms compute in fp32. Idempotent."""
    for what, dt in (("llm_dtype", llm_dtype), ("vit_dtype", vit_dtype)):
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{what} must be float16, bfloat16 or float32, got {dt}")
    plan = precision_plan(model, llm_dtype, vit_dtype, trainable_fp32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(plan[name])
        for name, b in model.named_buffers():
            if b.is_floating_point() and name.startswith("llm."):
                b.data = b.data.to(llm_dtype)
    if not getattr(model.vision, "_precision_hooked", False):
        model.vision.register_forward_pre_hook(_vision_input(vit_dtype))
        model.vision.register_forward_hook(lambda m, a, out: out.float())
        for m in model.vision.modules():
            if isinstance(m, nn.LayerNorm):
                m.register_forward_pre_hook(_norm_in_fp32)
                m.register_forward_hook(_norm_out_back)
        model.vision._precision_hooked = True
    return model
