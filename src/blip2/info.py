"""`blip2 info`: what a checkpoint holds, read from its config and weight headers (no weights loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import INDEX_FILES, WEIGHT_FILES, CheckpointError, find_checkpoint, read_config

# transformers key prefix -> part name
_PARTS = [("vision_model.", "vision encoder"), ("qformer.", "q-former"), ("query_tokens", "q-former"),
          ("embeddings.", "q-former"), ("language_projection.", "projection"), ("language_model.", "language model"),
          ("vision_projection.", "stage-1 heads"), ("text_projection.", "stage-1 heads"), ("itm_head.", "stage-1 heads")]


def _headers(d: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from safetensors headers; .bin files are loaded (mmap)."""
    files: list[Path] = []
    for name in INDEX_FILES:
        if (d / name).is_file():
            files = sorted({d / f for f in json.loads((d / name).read_text())["weight_map"].values()})
            break
    else:
        files = [d / n for n in WEIGHT_FILES if (d / n).is_file()]
    if not files:
        raise CheckpointError(f"{d}: no weights found")
    out = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{d}: shard {f.name} is missing")
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        out[k] = (list(sl.get_shape()), sl.get_dtype())
            except Exception as e:
                raise CheckpointError(f"weight file {f} is corrupt or truncated ({e})") from None
        else:
            for k, v in torch.load(str(f), map_location="cpu", weights_only=True, mmap=True).items():
                out[k] = (list(v.shape), str(v.dtype).replace("torch.", ""))
    return out


def describe(directory: str | Path) -> dict:
    """{"architecture", "dtype", "parameters": {part: count}, "details"} of a checkpoint in any form
    `find_checkpoint` accepts except a LAVIS file (which holds no architecture)."""
    d = find_checkpoint(directory)
    if d.suffix in (".pth", ".pt"):
        raise CheckpointError(f"{d}: a LAVIS file holds no architecture; `blip2 info` reads transformers-format "
                              f"directories (load it with blip2.load(path, config=...) and save_pretrained)")
    cfg = read_config(d)
    counts: dict[str, int] = {}
    dtypes = set()
    for k, (shape, dt) in _headers(d).items():
        part = next((p for pre, p in _PARTS if k.startswith(pre)), "other")
        n = 1
        for s in shape:
            n *= s
        counts[part] = counts.get(part, 0) + n
        dtypes.add(dt)
    counts["total"] = sum(counts.values())
    details = {
        "image size": cfg.vision.image_size,
        "vision": f"{cfg.vision.num_layers} blocks x {cfg.vision.hidden_size}",
        "q-former": f"{cfg.qformer.num_layers} layers x {cfg.qformer.hidden_size}, {cfg.num_query_tokens} queries",
    }
    if cfg.llm is not None:
        details["language model"] = f"{cfg.llm.model_type} ({'encoder-decoder' if cfg.is_encoder_decoder else 'decoder-only'})"
        details["image_token_index"] = cfg.image_token_index
    return {"architecture": cfg.architecture, "dtype": "/".join(sorted(dtypes)), "parameters": counts,
            "details": details}
