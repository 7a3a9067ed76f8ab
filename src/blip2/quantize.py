"""Quantised linear layers for the LLM: int8 on CPU, bitsandbytes 8-bit / nf4 on CUDA.

    scheme = check_scheme("int8", device)      the scheme's canonical name, or a QuantizeError naming what works
    quantize_llm(model, scheme)                every linear layer of model.llm quantised in place
    quantize_ready(module, scheme)             only the linear layers whose weights are all loaded (streaming)

Schemes:
- `int8` (CPU): int8 weights (a scale per output row) x int8 activations (a scale per token), SmoothQuant-style
  smoothing of the activations' outlier channels calibrated on a few generic prompts, on `torch._int_mm`
  (`blip2.int8`). The calibration runs the model once it is quantised without smoothing; the layers are then
  quantised again, smoothed, from the full-precision weights (a streamed load reads the checkpoint twice).
- `int8-dynamic` (CPU): PyTorch's own dynamic quantisation (`torch.ao.quantization`, fbgemm / onednn): one
  activation scale per call, which loses accuracy on LLMs with outlier activations (SmolLM2: README,
  benchmarks/quantize.py); kept for comparison.
- `int8-weight-only` (CPU or CUDA): torchao's `Int8WeightOnlyConfig` (int8 weights, fp32 activations).
- `int4` (CPU or CUDA): torchao's int4 weight-only where its kernels exist for the device (checked by a probe).
- `bnb-int8`, `bnb-nf4` (CUDA): bitsandbytes `Linear8bitLt` / `Linear4bit` (NF4, bf16 compute), quantised when
  the layer moves to the GPU. The same layers carry QLoRA's frozen LLM.

The Q-Former, the projection and the image encoder stay in full precision: only `model.llm` is touched.
torchao and bitsandbytes are optional extras, imported inside the functions that use them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from .int8 import Int8Linear, calibrate
from .options import SCHEMES

_ALIASES = {"nf4": "bnb-nf4", "int8-wo": "int8-weight-only", "bnb-4bit": "bnb-nf4", "bnb-8bit": "bnb-int8"}
_CUDA_ONLY = ("bnb-int8", "bnb-nf4")
_CPU_ALTERNATIVE = "on CPU use quantize='int8'"
_CPU_ONLY = ("int8", "int8-dynamic")


class QuantizeError(ValueError):
    pass


def check_scheme(scheme: str, device=None) -> str:
    """The canonical name of `scheme` for `device` (None = CPU), or a QuantizeError naming the alternative."""
    name = _ALIASES.get(scheme, scheme)
    if name not in SCHEMES:
        raise QuantizeError(f"quantize: unknown scheme {scheme!r}; one of {list(SCHEMES)} (or {sorted(_ALIASES)})")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if name in _CUDA_ONLY and not (cuda and torch.cuda.is_available()):
        raise QuantizeError(f"quantize={scheme}: bitsandbytes needs a CUDA GPU (device='cuda'); {_CPU_ALTERNATIVE}")
    if name in _CPU_ONLY and cuda:
        raise QuantizeError(f"quantize={name} runs on CPU int8 kernels; on CUDA use 'bnb-int8' or 'bnb-nf4'")
    if name == "int4" and not int4_available("cuda" if cuda else "cpu"):
        raise QuantizeError(f"quantize=int4: torchao has no int4 weight-only kernel for this "
                            f"{'GPU' if cuda else 'CPU'} in the installed torch / torchao; "
                            + ("use 'bnb-nf4'" if cuda else
                               "use quantize='int8' (fast) or 'int8-weight-only' (closer to fp32)"))
    return name


def int4_available(device: str) -> bool:
    """Whether torchao's int4 weight-only layer runs here (probed on a small layer once per process)."""
    if device not in _INT4_PROBED:
        try:
            layer = nn.Linear(256, 64, bias=False).to(device)
            _torchao_quantize(layer, "int4")
            layer(torch.randn(2, 256, device=device))
            _INT4_PROBED[device] = isinstance(layer.weight, torch.Tensor) and type(layer.weight) is not nn.Parameter
        except Exception:  # missing kernels surface as NotImplementedError / RuntimeError / import errors
            _INT4_PROBED[device] = False
    return _INT4_PROBED[device]


_INT4_PROBED: dict[str, bool] = {}


def _torchao_quantize(module: nn.Module, scheme: str) -> None:
    try:  # deferred: torchao is an optional extra (quantize)
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantizeError(f"quantize={scheme} needs torchao: pip install 'blip2[quantize]'; "
                            f"or use quantize='int8' (PyTorch's own)") from None
    quantize_(module, Int8WeightOnlyConfig() if scheme == "int8-weight-only" else Int4WeightOnlyConfig())


def quantize_linear(linear: nn.Linear, scheme: str, act_max: torch.Tensor | None = None) -> nn.Module:
    """A quantised replacement for one `nn.Linear` (its weights copied, not shared); `act_max`: the `int8`
    scheme's calibrated max |x| per input channel (None: no smoothing)."""
    if scheme == "int8":
        return Int8Linear.from_float(linear, act_max)
    if scheme == "int8-dynamic":
        linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # a scale per output row
        return DynamicInt8Linear.from_float(linear)
    if scheme in ("int8-weight-only", "int4"):
        if scheme == "int4" and linear.in_features % 128:
            return linear  # torchao's int4 groups 128 input features; a narrower layer stays in full precision
        _torchao_quantize(linear, scheme)
        return linear
    return _bnb_linear(linear, scheme)


def _bnb_linear(linear: nn.Linear, scheme: str) -> nn.Module:
    try:  # deferred: bitsandbytes is an optional extra (cuda)
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizeError(f"quantize={scheme} needs bitsandbytes: pip install 'blip2[cuda]'") from None
    bias = linear.bias is not None
    w = linear.weight.detach()
    if scheme == "bnb-int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.bfloat16,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q  # quantised when moved to the GPU (.to("cuda"))


def _is_loaded(module: nn.Module) -> bool:
    return all(p.device.type != "meta" for p in module.parameters(recurse=False))


def quantize_ready(root: nn.Module, scheme: str, device=None, done: set | None = None) -> int:
    """Replace every `nn.Linear` under `root` whose weights are loaded (not on the meta device) by its quantised
    form; bitsandbytes layers move to `device` at once (that quantises them). `done` collects the names
    replaced, so that a streaming loader may call this after each tensor. Returns how many were replaced."""
    done = set() if done is None else done
    replaced = 0
    for name, module in list(root.named_modules()):
        if name in done or not isinstance(module, nn.Linear) or not _is_loaded(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        q = quantize_linear(module, scheme)
        if device is not None and scheme in _CUDA_ONLY:
            q = q.to(device)
        setattr(parent, attr, q)
        done.add(name)
        replaced += 1
    return replaced


def quantize_llm(model, scheme: str, device=None) -> None:
    """Every linear layer of `model.llm` (an output head tied to the embeddings gets its own quantised copy;
    the embeddings stay in full precision) quantised in place with `scheme` (see `check_scheme`)."""
    if model.llm is None:
        raise QuantizeError("quantize: the model has no LLM (a retrieval / stage-1 model); nothing to quantise")
    name = check_scheme(scheme, device)
    weights = [(n, m.weight) for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)]
    quantize_ready(model.llm, name, device=device)
    if name == "int8":
        smooth_int8(model, weights)
    model.llm.requires_grad_(False)
    model.quantized = name


def smooth_int8(model, weights) -> int:
    """The `int8` scheme's second step: calibrate `model` (its LLM layers quantised per token, not smoothed
    yet: `blip2.int8.calibrate`), then quantise every such layer again, smoothed, from its full-precision
    weight. `weights`: (name in model.llm, weight) pairs (names of other modules are passed over), e.g. read
    from the checkpoint a second time. Returns how many layers were smoothed."""
    stats = calibrate(model)
    smoothed = 0
    for name, weight in weights:
        layer = model.llm.get_submodule(name)
        if not isinstance(layer, Int8Linear) or layer.inv_smooth is not None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.llm.get_submodule(parent_name) if parent_name else model.llm
        setattr(parent, attr, Int8Linear.from_weight(weight, layer.bias, stats[name]))
        smoothed += 1
    return smoothed


def dequantize_llm(model) -> int:
    """Replace the LLM's bitsandbytes layers by full-precision `nn.Linear`s of their dequantised weights (a
    QLoRA run's export: the transformers format has no 4-bit layers). Returns how many were replaced."""
    try:  # deferred: peft is an optional extra (lora); its helper dequantises either bitsandbytes format
        from peft.utils.integrations import dequantize_module_weight
    except ImportError:
        raise QuantizeError("dequantising bitsandbytes layers needs peft: pip install 'blip2[lora]'") from None
    replaced = 0
    for name, module in list(model.llm.named_modules()):
        if type(module).__module__.split(".")[0] != "bitsandbytes":
            continue
        w = dequantize_module_weight(module).detach().float()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=w.device)
        with torch.no_grad():
            linear.weight.copy_(w)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        linear.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.llm.get_submodule(parent_name) if parent_name else model.llm, attr, linear)
        replaced += 1
    return replaced
