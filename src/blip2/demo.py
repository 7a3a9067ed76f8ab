"""`blip2 demo`: the whole inference path on a tiny random model, offline, in seconds.

Builds a small BLIP-2 (EVA-style ViT, Q-Former, OPT) with a freshly trained tokenizer, saves it in the
transformers format, loads it back with `blip2.load`, captions two photos that ship with scikit-image (as
files, through the real preprocessing), and checks the generated ids against transformers' own
`Blip2ForConditionalGeneration.generate` on the same directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

from .api import load
from .config import Blip2Config
from .model import Blip2Model
from .processing import ImageProcessor, Processor
from .tiny import make_gpt2_tokenizer


def _photos(out: Path) -> list[Path]:
    from skimage import data  # deferred: scikit-image (the photos) is a test extra, needed by `blip2 demo` only

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "chelsea"):
        p = out / f"{name}.png"
        if not p.exists():
            Image.fromarray(getattr(data, name)()).save(p)
        paths.append(p)
    return paths


def build_demo_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny random BLIP-2 + OPT checkpoint with tokenizer and preprocessor files."""
    tok_dir = make_gpt2_tokenizer(directory / "_tokenizer", vocab_size=512)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    image_token = tok.convert_tokens_to_ids("<image>")
    cfg = Blip2Config.from_preset("tiny-opt", image_token_index=image_token)
    cfg.vision.image_size, cfg.vision.patch_size = 64, 8
    cfg.llm.hf_config.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Blip2Model.from_config(cfg)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.mul_(8.0)  # a livelier random model than the default init: more varied tokens
        # favour whole-word tokens over single bytes so the (random) output is readable
        emb = model.llm.get_input_embeddings().weight
        lengths = torch.tensor([len(t) for t in tok.convert_ids_to_tokens(list(range(emb.shape[0])))])
        emb.mul_((lengths >= 4).float()[:, None] * 0.9 + 0.1)
        model.language_projection.weight.mul_(30.0)  # let the picture move the words
    model.processor = Processor(ImageProcessor(image_size=64), tok)
    model.save_pretrained(directory / "model")
    return directory / "model"


def run_demo(output: Path) -> dict:
    t0 = time.perf_counter()
    output = Path(output)
    ckpt = build_demo_checkpoint(output)
    photos = _photos(output / "images")
    model = load(ckpt)
    gen = dict(max_new_tokens=12, num_beams=3, repetition_penalty=1.5)
    captions = model.caption([str(p) for p in photos], **gen)
    prompted = model.caption([str(p) for p in photos], prompt="a photo of", **gen)

    # the same checkpoint through transformers' own classes
    hf = Blip2ForConditionalGeneration.from_pretrained(ckpt).eval()
    px = model.processor.images([str(p) for p in photos])
    ours = model.generate(px, **gen)
    nq, bos = model.num_query_tokens, hf.config.text_config.bos_token_id
    start = torch.tensor([[model.cfg.image_token_index] * nq + [bos]] * len(photos))
    with torch.no_grad():
        theirs = hf.generate(pixel_values=px, input_ids=start, attention_mask=torch.ones_like(start), **gen)
    theirs = theirs[:, start.shape[1]:]
    n = min(ours.shape[1], theirs.shape[1])
    same = torch.equal(ours[:, :n], theirs[:, :n])

    print(f"checkpoint: {ckpt} (transformers format, {sum(p.numel() for p in model.unique_parameters()):,} parameters)")
    for p, c, cp in zip(photos, captions, prompted):
        print(f"  {p.name}: {c!r} | with prompt 'a photo of': {cp!r}")
    print(f"beam search ids identical to transformers' generate: {same}")
    print(f"done in {time.perf_counter() - t0:.1f}s (random weights: the words are noise, the pipeline is real)")
    if not same:
        raise RuntimeError("generated ids differ from transformers' generate")
    return {"captions": captions, "prompted": prompted, "identical_to_transformers": same}
