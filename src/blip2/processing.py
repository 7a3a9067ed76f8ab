"""Pre-processing: images -> pixel tensors, prompts -> token ids, generated ids -> text.

Images follow transformers' BLIP image processor with the PIL backend step for step, so the pixel tensors
match it bit for bit:
  1. to RGB. A PIL image with an alpha band (RGBA, LA, PA) or with `info["transparency"]` (P, L, RGB with a
     colour key) is composited onto a white background with `Image.alpha_composite`; every other mode goes
     through PIL's own `convert("RGB")`. 16/32-bit and float modes (I;16, I, F) are therefore *clipped* to
     0..255, not scaled (values are truncated; negatives become 0): this is what transformers does, so we
     match it and warn when pixels above 255 are lost. A uint8 numpy array [H, W, C] is converted the way
     transformers converts arrays: C=1 is repeated, C=4 is blended onto white in float64 and rounded.
  2. resize to a square S x S with PIL (bicubic by default) in uint8.
  3. x * rescale_factor (1/255) in float64, cast to float32.
  4. (x - mean) / std in float32.
A file path is read by `load_image`, which, like transformers' `load_image` (and LAVIS's
`Image.open(p).convert("RGB")`), applies the EXIF orientation and converts to RGB *dropping* any alpha.

Text: `Processor` wraps the LLM tokenizer (and InstructBLIP's Q-Former BERT tokenizer). Prompts are left-padded
for batched generation with decoder-only LLMs (right-padded for encoder-decoder LLMs such as Flan-T5, whose
relative position bias would otherwise see the pads between the visual prompt and the text), carry the
tokenizer's own special tokens (OPT/Llama BOS, T5 EOS) and no image placeholder tokens: the model puts the
visual vectors in front of the text itself.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's resampling filters by name; preprocessor_config.json stores their integer values (bicubic = 3).
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

ImageInput = Union[Image.Image, str, Path, np.ndarray]


class ImageError(ValueError):
    """An image file is missing or cannot be decoded."""


# ------------------------------------------------------------------------------------------------ images


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """Read an image file (or take a PIL image), apply its EXIF orientation and convert it to RGB.

    The same steps as transformers' `load_image`: alpha is dropped, not composited (see the module doc).
    Raises ImageError naming the file when it is missing or cannot be decoded.
    """
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"load_image expects a path or a PIL image, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}" if not path.exists() else f"not an image file: {path}")
    try:
        with Image.open(path) as img:
            # exif_transpose and convert decode the pixels, so a truncated or corrupt file fails here.
            return ImageOps.exif_transpose(img).convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError...
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # keep the message on one line
        raise ImageError(f"cannot read image file {path}: {reason}") from None


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of a PIL image; transparency is composited onto white (as transformers' convert_to_rgb)."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if img.mode in _HIGH_BIT_MODES:
        hi = np.asarray(img).max()  # (getextrema does not handle every 16-bit layout)
        if hi > 255:
            warnings.warn(
                f"{img.mode} image has values up to {hi}: converting to RGB clips them to 255 (transformers "
                "does the same); scale the image to 0..255 first to keep its contrast",
                stacklevel=4,
            )
    try:
        return img.convert("RGB")
    except ValueError as e:  # exotic modes PIL cannot convert (e.g. "La"); transformers fails on them too
        raise ImageError(f"cannot convert a PIL image of mode {img.mode!r} to RGB: {e}") from None


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    """RGB PIL image from a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels last)."""
    if arr.dtype != np.uint8:
        raise TypeError(
            f"numpy images must be uint8 [H, W, C], got dtype {arr.dtype}; "
            "for floats in [0, 1] pass (x * 255).round().astype(np.uint8)"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"numpy images must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        # Blend onto white in float64 and round: the arithmetic transformers uses for arrays (PIL images go
        # through PIL's integer alpha_composite instead).
        alpha = arr[:, :, 3:] / 255
        arr = np.round(alpha * arr[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def _resample(value: str | int) -> Image.Resampling:
    if isinstance(value, str):
        if value.lower() not in RESAMPLE:
            raise ValueError(f"unknown resample {value!r}; choose one of {sorted(RESAMPLE)}")
        return RESAMPLE[value.lower()]
    try:
        return Image.Resampling(int(value))
    except ValueError:
        raise ValueError(f"unknown resample {value!r}; PIL filters are 0..5 or {sorted(RESAMPLE)}") from None


def _square_size(size: Any, where: str) -> int:
    """The square side from a preprocessor `size` entry: {height, width}, {shortest_edge} or an int."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"{where}: only square images are supported, got size {size}")
            return int(size["height"])
        if "shortest_edge" in size:
            # transformers would keep the aspect ratio here; BLIP-2's ViT needs a fixed square grid.
            return int(size["shortest_edge"])
    raise ValueError(f"{where}: cannot read an image size from size={size!r}")


class ImageProcessor:
    """Images -> normalised pixel tensor [B, 3, S, S] (float32), identical to transformers' BLIP PIL processor."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resample: str | int = "bicubic",
        rescale_factor: float = 1 / 255,
    ):
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got mean={mean} std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = _resample(resample)
        self.rescale_factor = float(rescale_factor)
        # float32 [3, 1, 1] so that (x - mean) / std runs in float32, channel by channel, like transformers.
        self._mean = np.array(self.mean, dtype=np.float32)[:, None, None]
        self._std = np.array(self.std, dtype=np.float32)[:, None, None]

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"resample={self.resample.name.lower()!r}, rescale_factor={self.rescale_factor})"
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ImageProcessor":
        """Settings from `preprocessor_config.json` (or the `image_processor` entry of transformers 5's
        `processor_config.json`); failing both, the image size of `config.json`'s vision_config; else defaults."""
        path = Path(path)
        cfg = None
        if (path / "preprocessor_config.json").is_file():
            where = str(path / "preprocessor_config.json")
            cfg = json.loads((path / "preprocessor_config.json").read_text())
        elif (path / "processor_config.json").is_file():
            where = str(path / "processor_config.json")
            cfg = json.loads((path / "processor_config.json").read_text()).get("image_processor")
        if cfg is None:
            model_cfg = path / "config.json"
            if model_cfg.is_file():
                vision = json.loads(model_cfg.read_text()).get("vision_config") or {}
                if "image_size" in vision:
                    return cls(image_size=int(vision["image_size"]))
            return cls()
        if cfg.get("do_resize", True) is False:
            raise ValueError(f"{where}: do_resize=false is not supported (the ViT needs a fixed square size)")
        kwargs: dict[str, Any] = {}
        if "size" in cfg:
            kwargs["image_size"] = _square_size(cfg["size"], where)
        if cfg.get("do_normalize", True) is False:
            kwargs["mean"], kwargs["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            kwargs["mean"] = cfg.get("image_mean", CLIP_MEAN)
            kwargs["std"] = cfg.get("image_std", CLIP_STD)
        if "resample" in cfg:
            kwargs["resample"] = cfg["resample"]
        kwargs["rescale_factor"] = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        return cls(**kwargs)

    def to_rgb(self, image: ImageInput) -> Image.Image:
        """Step 1 for one image of any accepted kind: an RGB PIL image at its original size."""
        if isinstance(image, Image.Image):
            return _pil_to_rgb(image)
        if isinstance(image, (str, Path)):
            return load_image(image)
        if isinstance(image, np.ndarray):
            return _array_to_rgb(image)
        hint = " (convert tensors with .permute(1, 2, 0).numpy())" if isinstance(image, torch.Tensor) else ""
        raise TypeError(
            f"unsupported image type {type(image).__name__}: expected a PIL image, a path (str or Path) "
            f"or a uint8 numpy array [H, W, C]{hint}"
        )

    def preprocess_one(self, image: ImageInput) -> torch.Tensor:
        """One image -> float32 tensor [3, S, S]."""
        rgb = self.to_rgb(image)
        s = self.image_size
        resized = rgb.resize((s, s), resample=self.resample)  # PIL sizes are (width, height)
        return self.normalize(resized)

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """An RGB image already at its final size -> float32 [3, H, W]: float64 rescale, then float32
        (x - mean) / std channel by channel, as transformers computes it (training transforms reuse it)."""
        x = np.asarray(image).transpose(2, 0, 1)  # [H, W, 3] uint8 -> [3, H, W]
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(x))

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """One image or a list of images -> float32 tensor [B, 3, S, S]."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given (empty list)")
            return torch.stack([self.preprocess_one(im) for im in images])
        return self.preprocess_one(images)[None]


# -------------------------------------------------------------------------------------------------- text

# Files any transformers tokenizer directory holds at least one of.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
)
_ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5", "bart", "mbart")


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES)


def _llm_is_encoder_decoder(path: Path, tokenizer) -> bool:
    """From config.json (BLIP-2 `text_config`, or a bare LLM config); failing that, the tokenizer class."""
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        text = cfg.get("text_config") or cfg
        if "model_type" in text or "is_encoder_decoder" in text:
            return bool(text.get("is_encoder_decoder")) or text.get("model_type") in _ENCODER_DECODER_TYPES
    return "T5" in type(tokenizer).__name__


def _has_llm(path: Path) -> bool:
    """False for a BLIP-2 checkpoint without a language model (config.json of transformers'
    `Blip2ForImageTextRetrieval`, which still writes a default `text_config`, or with a `qformer_config` and no
    `text_config`: the retrieval / stage-1 architecture); True otherwise, a bare LLM directory included."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return True
    cfg = json.loads(cfg_file.read_text())
    if "Blip2ForImageTextRetrieval" in (cfg.get("architectures") or []):
        return False
    return not ("qformer_config" in cfg and not cfg.get("text_config"))


def _load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ValueError(f"cannot load the tokenizer in {path}: {reason}") from None


def pad_ids(seqs: Sequence[list[int]], value: int, side: str = "right",
            device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), int64 [B, T], padded with `value` on `side` as a tokenizer pads a batch."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


class Processor:
    """Image processor + LLM tokenizer (+ Q-Former BERT tokenizer for InstructBLIP).

    padding_side: "left" for decoder-only LLMs (batched generation), "right" for encoder-decoder LLMs.
    The processor owns its tokenizers: it sets their padding/truncation sides and, when the LLM tokenizer has
    no pad token, makes `[PAD]` (if in the vocabulary, as in InstructBLIP-Vicuna) or else EOS the pad token.
    """

    def __init__(self, image_processor: ImageProcessor, tokenizer, qformer_tokenizer=None, padding_side="left"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        if tokenizer.pad_token is None:
            if "[PAD]" in tokenizer.get_vocab():
                tokenizer.pad_token = "[PAD]"
            elif tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            else:
                raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an eos token to pad with")
        tokenizer.padding_side = padding_side
        tokenizer.truncation_side = "left"  # keep the end of a long prompt ("... Short answer:")
        if qformer_tokenizer is not None:
            qformer_tokenizer.padding_side = "right"
            qformer_tokenizer.truncation_side = "left"  # the instruction is truncated on the left (LAVIS)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Processor | None":
        """Load from a transformers checkpoint directory; None when it holds no tokenizer files.

        The LLM tokenizer is at the top level, the Q-Former tokenizer (InstructBLIP) in `qformer_tokenizer/`.
        """
        path = Path(path)
        if not _has_tokenizer(path):
            return None
        tokenizer = _load_tokenizer(path)
        qformer_dir = path / "qformer_tokenizer"
        qformer_tokenizer = _load_tokenizer(qformer_dir) if _has_tokenizer(qformer_dir) else None
        # left padding is for batched generation by a decoder-only LLM; a retrieval checkpoint's only tokenizer is
        # the Q-Former's BERT, whose text embedding is the [CLS] output at position 0
        side = "right" if _llm_is_encoder_decoder(path, tokenizer) or not _has_llm(path) else "left"
        return cls(ImageProcessor.from_dir(path), tokenizer, qformer_tokenizer, padding_side=side)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer(s) and a transformers `preprocessor_config.json` into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(path / "qformer_tokenizer"))
        ip = self.image_processor
        cfg = {
            "image_processor_type": "BlipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": ip.image_size, "width": ip.image_size}, "resample": int(_resample(ip.resample)),
            "do_rescale": True, "rescale_factor": ip.rescale_factor, "do_normalize": True,
            "image_mean": list(ip.mean), "image_std": list(ip.std),
        }
        (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Pixel values [B, 3, S, S] (see ImageProcessor)."""
        return self.image_processor(images)

    @staticmethod
    def _encode(tokenizer, texts, max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"expected a non-empty list of strings, got {texts!r:.80}")
        enc = tokenizer(
            list(texts), padding="longest", truncation=max_length is not None, max_length=max_length,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def tokenize_prompts(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM prompts -> (input_ids, attention_mask), both int64 [B, T], padded on `padding_side`.

        Special tokens are the tokenizer's own (OPT/Llama BOS first, T5 EOS last); no image tokens.
        max_length truncates on the left, special tokens included in the count and kept.
        """
        return self._encode(self.tokenizer, texts, max_length)

    def tokenize_qformer(self, texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """InstructBLIP instructions for the Q-Former -> (input_ids, attention_mask) int64 [B, T]:
        `[CLS] ... [SEP]`, truncated on the left to max_length, padded on the right."""
        if self.qformer_tokenizer is None:
            raise ValueError("this processor has no Q-Former tokenizer (InstructBLIP keeps it in qformer_tokenizer/)")
        return self._encode(self.qformer_tokenizer, texts, max_length)

    def decode(self, ids) -> list[str]:
        """Token ids [B, T] (tensor or lists; a single [T] sequence too) -> B strings, special tokens skipped,
        whitespace stripped. Negative ids (e.g. -100 label padding) are ignored."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], int):
            ids = [ids]
        ids = [[int(i) for i in seq if i >= 0] for seq in ids]
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
