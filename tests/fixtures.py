"""Offline test fixtures: tiny tokenizer directories (re-exported from blip2.tiny), sample images and the
transformers image processor used as the pixel reference."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

from blip2.tiny import (CORPUS, corpus_lines, make_bert_tokenizer, make_gpt2_tokenizer,  # noqa: F401
                        make_llama_tokenizer, make_t5_tokenizer)


def sample_image(size: int | tuple[int, int] | None = 64) -> Image.Image:
    """A real photo (scikit-image's astronaut, 512x512 RGB), resized to `size` (int or (width, height))."""
    from skimage import data

    img = Image.fromarray(data.astronaut())
    if size is None:
        return img
    wh = (size, size) if isinstance(size, int) else tuple(size)
    return img.resize(wh, Image.Resampling.BICUBIC)


def random_pil(mode: str, size: int | tuple[int, int] = 32, seed: int = 0, transparency: bool = False) -> Image.Image:
    """A random image of PIL `mode` (any of RGB, RGBA, L, LA, P, CMYK, I;16, I, F, 1, ...).

    size: int or (width, height). Alpha bands take values across the whole 0..255 range, 16/32-bit and
    float modes use values above 255 too. transparency=True (mode "P" or "L" only) marks one palette index /
    grey level as transparent through `info["transparency"]`, as GIF and PNG files do.
    """
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    if mode.startswith("I;16"):
        order = ">" if mode == "I;16B" else "<"
        arr = rng.integers(0, 65536, (h, w)).astype(f"{order}u2")
        img = Image.frombytes(mode, (w, h), arr.tobytes())
    elif mode == "I":
        img = Image.fromarray(rng.integers(-1000, 70000, (h, w), dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray((rng.random((h, w)) * 400 - 50).astype(np.float32))
    elif mode == "1":
        img = Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1")
    elif mode in ("L", "P"):
        grey = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        img = grey if mode == "L" else Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=16
        )
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        img = Image.frombytes(mode, (w, h), arr.tobytes())
    if transparency:
        if img.mode not in ("P", "L"):
            raise ValueError(f"transparency=True needs mode 'P' or 'L', got {mode!r}")
        img.info["transparency"] = int(np.asarray(img)[0, 0])  # at least one pixel is transparent
    if img.mode != mode:
        raise AssertionError(f"random_pil built mode {img.mode!r} instead of {mode!r}")
    return img


# ---------------------------------------------------------------------------------------- references


def hf_blip_image_processor(image_size: int = 224, **kwargs):
    """transformers' BLIP image processor with the PIL backend: the reference for pixel parity tests."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size}, **kwargs)


def save_tiny_bert(directory, seed: int, add_pooling_layer: bool = True, **config):
    """A tiny random BertModel (weights perturbed by N(0, 0.1) so biases and norms are not trivial) saved with
    save_pretrained into `directory`, with a tiny BERT tokenizer; returns the directory."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=400, max_position_embeddings=64, type_vocab_size=2, **config)
    bert = BertModel(cfg, add_pooling_layer=add_pooling_layer).eval()
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    bert.save_pretrained(directory)
    make_bert_tokenizer(directory)
    return directory


@contextlib.contextmanager
def one_torch_thread():
    """Tiny ops on a busy 2-core machine spend most of their time in OpenMP barriers: run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
