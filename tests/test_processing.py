"""Pre-processing tests. Pixel references come from transformers' BLIP PIL image processor or from hand
computation; token references from the tokenizer itself called without padding/truncation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from blip2.processing import CLIP_MEAN, CLIP_STD, ImageError, ImageProcessor, Processor, load_image
from fixtures import (
    hf_blip_image_processor,
    make_bert_tokenizer,
    make_gpt2_tokenizer,
    make_llama_tokenizer,
    make_t5_tokenizer,
    random_pil,
    sample_image,
)

VOCAB = 512
MEAN = np.array(CLIP_MEAN)[:, None, None]
STD = np.array(CLIP_STD)[:, None, None]


def hf_pixels(image, size: int) -> torch.Tensor:
    return hf_blip_image_processor(size)(image, return_tensors="pt")["pixel_values"]


def assert_same_pixels(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def by_hand(rgb_uint8: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> normalised [1, 3, H, W], in float64 (no resize)."""
    x = rgb_uint8.transpose(2, 0, 1) / 255.0
    return torch.from_numpy((x - MEAN) / STD).float()[None]


# ------------------------------------------------------------------------------------- image parity

# (mode, transparency): every PIL mode a user is likely to meet, incl. palette/grey with a transparent colour.
MODES = [
    ("RGB", False), ("L", False), ("L", True), ("LA", False), ("P", False), ("P", True), ("PA", False),
    ("RGBA", False), ("CMYK", False), ("I;16", False), ("I;16B", False), ("I", False), ("F", False),
    ("1", False), ("YCbCr", False), ("RGBa", False),
]


@pytest.mark.parametrize("mode,transparency", MODES, ids=[f"{m}{'+t' if t else ''}" for m, t in MODES])
def test_pixel_parity_with_transformers_every_mode(mode, transparency):
    img = random_pil(mode, (23, 17), seed=1, transparency=transparency)  # non-square, upscaled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the high-bit-depth clipping warning, tested below
        ours = ImageProcessor(224)(img)
    assert_same_pixels(ours, hf_pixels(img, 224))


@pytest.mark.parametrize("size", [224, 364])
@pytest.mark.parametrize("wh", [(128, 128), (300, 180), (50, 90)])
def test_pixel_parity_with_transformers_photo(size, wh):
    img = sample_image(wh)
    assert_same_pixels(ImageProcessor(size)(img), hf_pixels(img, size))


def test_batch_of_mixed_inputs(tmp_path):
    photo, grey = sample_image(96), random_pil("L", (40, 30))
    path = tmp_path / "photo.png"
    photo.save(path)
    arr = np.asarray(sample_image((70, 50)))
    ours = ImageProcessor(224)([photo, str(path), grey, arr])
    assert ours.shape == (4, 3, 224, 224)
    ref = torch.cat([hf_pixels(photo, 224), hf_pixels(str(path), 224), hf_pixels(grey, 224), hf_pixels(arr, 224)])
    assert_same_pixels(ours, ref)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_numpy_parity(channels):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (33, 47, channels), dtype=np.uint8)
    assert_same_pixels(ImageProcessor(224)(arr), hf_pixels(arr, 224))


def test_numpy_2d_is_grey():
    arr = np.random.default_rng(0).integers(0, 256, (33, 47), dtype=np.uint8)
    proc = ImageProcessor(64)
    torch.testing.assert_close(proc(arr), proc(arr[:, :, None]), atol=0, rtol=0)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_path_input_parity(tmp_path, suffix):
    path = tmp_path / f"photo{suffix}"
    sample_image((120, 80)).save(path)
    ref = hf_pixels(str(path), 224)
    assert_same_pixels(ImageProcessor(224)(str(path)), ref)
    assert_same_pixels(ImageProcessor(224)(path), ref)  # pathlib.Path too


def test_path_with_alpha_drops_alpha_like_transformers(tmp_path):
    img = random_pil("RGBA", 24, seed=3)
    path = tmp_path / "alpha.png"
    img.save(path)
    ours = ImageProcessor(24)(path)
    assert_same_pixels(ours, hf_pixels(str(path), 24))
    # by hand: transformers' load_image does convert("RGB"): alpha dropped, colour kept (24 px -> no resize)
    torch.testing.assert_close(ours, by_hand(np.asarray(img)[:, :, :3]), atol=1e-6, rtol=0)


def test_exif_orientation_applied(tmp_path):
    img = sample_image((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (40, 60)
    assert_same_pixels(ImageProcessor(224)(path), hf_pixels(str(path), 224))


# ------------------------------------------------------------------------------------ hand computation


def test_normalisation_by_hand():
    colour = (10, 128, 250)
    img = Image.new("RGB", (31, 19), colour)  # bicubic of a constant image is the same constant
    out = ImageProcessor(224)(img)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)]
    for ch in range(3):
        torch.testing.assert_close(out[0, ch], torch.full((224, 224), expected[ch]), atol=1e-6, rtol=0)


def test_alpha_composited_on_white_by_hand():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (200, 100, 0, 0)  # fully transparent -> white
    rgba[4:] = (200, 100, 0, 255)  # opaque -> the colour itself
    out = ImageProcessor(8)(Image.fromarray(rgba, "RGBA"))
    expected = np.zeros((8, 8, 3), dtype=np.uint8)
    expected[:4], expected[4:] = 255, (200, 100, 0)
    torch.testing.assert_close(out, by_hand(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mode,values,eight_bit",
    [
        ("I;16", [0, 1, 200, 255, 256, 1000, 65535, 7, 128], [0, 1, 200, 255, 255, 255, 255, 7, 128]),
        ("I", [-5, 0, 17, 255, 256, 70000, 3, 99, 128], [0, 0, 17, 255, 255, 255, 3, 99, 128]),
        ("F", [-3.7, 0.6, 1.5, 27.9, 254.9, 255.5, 300.0, 100.0, 2.5], [0, 0, 1, 27, 254, 255, 255, 100, 2]),
    ],
)
def test_high_bit_depth_is_clipped_by_hand(mode, values, eight_bit):
    # transformers converts with PIL's convert("RGB"): values are truncated and clipped to 0..255, not scaled.
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    img = Image.fromarray(np.array(values, dtype=dtype).reshape(3, 3))
    assert img.mode == mode
    with pytest.warns(UserWarning, match="clips them to 255"):
        out = ImageProcessor(3)(img)  # same size: no resampling
    grey = np.array(eight_bit, dtype=np.uint8).reshape(3, 3)
    torch.testing.assert_close(out, by_hand(np.repeat(grey[:, :, None], 3, axis=2)), atol=1e-6, rtol=0)


def test_no_warning_for_16_bit_within_8_bit_range():
    img = Image.fromarray(np.full((4, 4), 200, dtype=np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageProcessor(4)(img)


# ----------------------------------------------------------------------------------------------- errors


def test_missing_file_raises_image_error(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg") as err:
        ImageProcessor()(str(missing))
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_corrupt_file_raises_image_error(tmp_path):
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"this is not a jpeg\x00\xff" * 20)
    with pytest.raises(ImageError, match="garbage.jpg") as err:
        ImageProcessor()([bad])
    assert "\n" not in str(err.value)


def test_truncated_file_raises_image_error(tmp_path):
    good = tmp_path / "good.jpg"
    sample_image(128).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(cut)


def test_directory_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="not an image file"):
        load_image(tmp_path)


@pytest.mark.parametrize("bad", [3, None, b"bytes", torch.zeros(3, 8, 8, dtype=torch.uint8)])
def test_non_image_type_raises_type_error(bad):
    with pytest.raises(TypeError, match="unsupported image type"):
        ImageProcessor()(bad)


def test_bad_arrays():
    with pytest.raises(TypeError, match="uint8"):
        ImageProcessor()(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        ImageProcessor()(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        ImageProcessor()([])


def test_unconvertible_mode_raises_image_error():
    img = Image.new("La", (4, 4))  # PIL cannot convert La to RGB (transformers fails on it too)
    with pytest.raises(ImageError, match="'La'"):
        ImageProcessor()(img)


# ---------------------------------------------------------------------------------------------- from_dir


def test_image_processor_from_transformers_saved_config(tmp_path):
    hf = hf_blip_image_processor(364)
    hf.save_pretrained(tmp_path)
    proc = ImageProcessor.from_dir(tmp_path)
    assert proc.image_size == 364 and proc.resample == Image.Resampling.BICUBIC
    img = sample_image((100, 70))
    assert_same_pixels(proc(img), hf(img, return_tensors="pt")["pixel_values"])


def test_image_processor_from_dir_variants(tmp_path):
    cfg = {"size": {"shortest_edge": 196}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3, "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = ImageProcessor.from_dir(tmp_path)
    assert (proc.image_size, proc.mean, proc.std) == (196, (0.5,) * 3, (0.25,) * 3)
    assert proc.resample == Image.Resampling.BILINEAR

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 300}}))
    with pytest.raises(ValueError, match="square"):
        ImageProcessor.from_dir(tmp_path)

    only_model = tmp_path / "model"
    only_model.mkdir()
    (only_model / "config.json").write_text(json.dumps({"vision_config": {"image_size": 364}}))
    assert ImageProcessor.from_dir(only_model).image_size == 364
    assert ImageProcessor.from_dir(tmp_path / "missing").image_size == 224


# ------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "gpt2": make_gpt2_tokenizer(root / "gpt2", VOCAB),
        "llama": make_llama_tokenizer(root / "llama", VOCAB),
        "llama_nopad": make_llama_tokenizer(root / "llama_nopad", VOCAB, pad_token=None),
        "t5": make_t5_tokenizer(root / "t5", VOCAB),
        "bert": make_bert_tokenizer(root / "bert"),
    }


CAPTION = "a photo of a cat on a couch"


@pytest.mark.parametrize(
    "name,cls,bos,eos,pad",
    [
        ("gpt2", "GPT2Tokenizer", 2, 2, 1),
        ("llama", "LlamaTokenizer", 1, 2, VOCAB - 2),
        ("llama_nopad", "LlamaTokenizer", 1, 2, None),
        ("t5", "T5Tokenizer", None, 1, 0),
    ],
)
def test_llm_tokenizer_fixtures_load(tok_dirs, name, cls, bos, eos, pad):
    tok = AutoTokenizer.from_pretrained(tok_dirs[name])
    assert type(tok).__name__ == cls
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, pad)
    assert len(tok) <= VOCAB and max(tok.get_vocab().values()) < VOCAB
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 1
    ids = tok(CAPTION)["input_ids"]
    assert len(ids) >= 6  # real words split into several tokens, plus bos/eos
    assert (ids[0] == bos) if bos is not None else (ids[-1] == eos)
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION


def test_special_ids_of_fixtures(tok_dirs):
    llama = AutoTokenizer.from_pretrained(tok_dirs["llama"])
    assert llama.unk_token_id == 0 and llama.pad_token == "[PAD]"
    t5 = AutoTokenizer.from_pretrained(tok_dirs["t5"])
    assert t5.unk_token_id == 2
    assert AutoTokenizer.from_pretrained(tok_dirs["gpt2"]).tokenize("\n") == ["Ċ"]


def test_bert_fixture_loads(tok_dirs):
    tok = AutoTokenizer.from_pretrained(tok_dirs["bert"])
    assert type(tok).__name__ == "BertTokenizer"
    assert [tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    ids = tok("A Photo of a CAT")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) >= 6
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"  # uncased


# -------------------------------------------------------------------------------------------- Processor

PROMPTS = ["a photo of", "Question: what is the man riding? Short answer:"]


def _processor(tok_dirs, name, qformer=False) -> Processor:
    qf = AutoTokenizer.from_pretrained(tok_dirs["bert"]) if qformer else None
    return Processor(ImageProcessor(), AutoTokenizer.from_pretrained(tok_dirs[name]), qf)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prompts_left_padded_with_bos(tok_dirs, name):
    proc = _processor(tok_dirs, name)
    ref_tok = AutoTokenizer.from_pretrained(tok_dirs[name])  # reference: each prompt alone, no padding
    ids, mask = proc.tokenize_prompts(PROMPTS)
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
    for row, text in enumerate(PROMPTS):
        ref = ref_tok(text)["input_ids"]
        n_pad = ids.shape[1] - len(ref)
        assert ids[row, n_pad:].tolist() == ref and ref[0] == ref_tok.bos_token_id
        assert (ids[row, :n_pad] == proc.pad_token_id).all()
        assert mask[row].tolist() == [0] * n_pad + [1] * len(ref)
    assert n_pad == 0 and (mask[0] == 0).any()  # the longest prompt is unpadded, the short one is padded
    assert ref_tok.convert_tokens_to_ids("<image>") not in ids  # no image placeholders


def test_pad_falls_back_to_eos(tok_dirs):
    proc = _processor(tok_dirs, "llama_nopad")
    assert proc.pad_token_id == 2
    ids, mask = proc.tokenize_prompts(PROMPTS)
    assert (ids[mask == 0] == 2).all()


def test_vicuna_pad_is_the_pad_token_not_eos_or_unk(tok_dirs):
    proc = Processor.from_dir(tok_dirs["llama"])  # InstructBLIP-Vicuna layout: [PAD] right after the base vocab
    pad = AutoTokenizer.from_pretrained(tok_dirs["llama"]).convert_tokens_to_ids("[PAD]")
    assert proc.pad_token_id == pad == VOCAB - 2
    # a Vicuna tokenizer that lost its pad token but still has [PAD] in its vocabulary gets [PAD] back
    tok = AutoTokenizer.from_pretrained(tok_dirs["llama"])
    tok.pad_token = None
    assert Processor(ImageProcessor(), tok).pad_token_id == pad
    ids, mask = proc.tokenize_prompts(PROMPTS)
    assert (ids[mask == 0] == pad).all()


def test_t5_prompts_right_padded_with_eos(tok_dirs, tmp_path):
    proc = Processor.from_dir(tok_dirs["t5"])  # no config.json: decided from the tokenizer class
    assert proc.padding_side == "right"
    ids, mask = proc.tokenize_prompts(PROMPTS)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and mask[0, :n].all()

    # a BLIP-2 config.json decides it too: an OPT text_config with the same tokenizer means left padding
    for model_type, side in [("t5", "right"), ("opt", "left")]:
        d = tmp_path / model_type
        d.mkdir()
        for f in tok_dirs["t5"].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": model_type}}))
        assert Processor.from_dir(d).padding_side == side


def test_retrieval_checkpoint_pads_its_bert_tokenizer_on_the_right(tmp_path):
    """A checkpoint without an LLM has only the Q-Former's BERT tokenizer; its text embedding is the [CLS] output
    at position 0, so left padding (the decoder-only default) would make a short caption's embedding read a pad
    token and depend on the longest caption of its batch."""
    import blip2
    from fixtures import make_bert_tokenizer
    from hf_models import retrieval_hf

    retrieval_hf().save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(make_bert_tokenizer(tmp_path / "_bert", vocab_size=120)).save_pretrained(tmp_path)
    proc = Processor.from_dir(tmp_path)
    assert proc.padding_side == "right"
    model = blip2.load(tmp_path)
    short, long = "a red circle", "a small red circle and a large blue square"
    tok = proc.tokenizer
    ids, mask = (torch.tensor(x) for x in (lambda b: (b["input_ids"], b["attention_mask"]))(
        tok([short, long], padding=True)))
    assert ids[0, 0] == tok.cls_token_id and mask[0, -1] == 0
    alone = tok([short], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.text_embeds(ids, mask)[0], model.text_embeds(alone["input_ids"])[0])


def test_prompt_truncation_keeps_bos_and_the_end(tok_dirs):
    proc = _processor(tok_dirs, "gpt2")
    text = "Question: what is the man riding? Short answer:"
    full = AutoTokenizer.from_pretrained(tok_dirs["gpt2"])(text)["input_ids"]
    ids, mask = proc.tokenize_prompts([text], max_length=6)
    assert ids[0].tolist() == [full[0]] + full[-5:] and mask.all()


def test_qformer_left_truncation_right_padding(tok_dirs):
    proc = _processor(tok_dirs, "llama", qformer=True)
    bert = AutoTokenizer.from_pretrained(tok_dirs["bert"])
    long_text = "Given the image, answer the following question with no more than three words. What is on the plate?"
    short_text = "a cat"
    full = bert(long_text)["input_ids"]
    assert len(full) > 10
    ids, mask = proc.tokenize_qformer([long_text, short_text], max_length=10)
    # [CLS] + the last 8 word pieces + [SEP]: the beginning of the instruction is dropped
    assert ids[0].tolist() == [2] + full[-9:-1] + [3]
    short = bert(short_text)["input_ids"]
    assert ids[1].tolist() == short + [0] * (10 - len(short))
    assert mask[1].tolist() == [1] * len(short) + [0] * (10 - len(short))
    # default max_length 128 keeps everything
    assert proc.tokenize_qformer([long_text])[0][0].tolist() == full


def test_qformer_tokenizer_required(tok_dirs):
    with pytest.raises(ValueError, match="Q-Former tokenizer"):
        _processor(tok_dirs, "gpt2").tokenize_qformer(["hi"])


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_decode_skips_special_tokens(tok_dirs, name):
    proc = _processor(tok_dirs, name)
    ids, _ = proc.tokenize_prompts(PROMPTS)
    assert proc.decode(ids) == PROMPTS
    assert proc.decode(ids[1]) == [PROMPTS[1]]  # a single sequence
    with_labels = ids[1].tolist() + [-100, -100]
    assert proc.decode([with_labels]) == [PROMPTS[1]]
    image_id = AutoTokenizer.from_pretrained(tok_dirs[name]).convert_tokens_to_ids("<image>")
    assert proc.decode([[image_id] + ids[0].tolist()]) == [PROMPTS[0]]


def test_processor_from_dir_none_without_tokenizer(tmp_path):
    assert Processor.from_dir(tmp_path) is None


def test_processor_from_transformers_saved_instructblip(tok_dirs, tmp_path):
    from transformers import InstructBlipProcessor

    hf = InstructBlipProcessor(
        hf_blip_image_processor(364),
        AutoTokenizer.from_pretrained(tok_dirs["llama"]),
        AutoTokenizer.from_pretrained(tok_dirs["bert"]),
        num_query_tokens=4,
    )
    hf.save_pretrained(tmp_path)  # transformers 5 layout: processor_config.json + qformer_tokenizer/
    proc = Processor.from_dir(tmp_path)
    assert proc.image_processor.image_size == 364 and proc.qformer_tokenizer is not None
    assert proc.padding_side == "left"
    enc = hf(text=[PROMPTS[1]], return_tensors="pt")
    qf_ids, qf_mask = proc.tokenize_qformer([PROMPTS[1]])
    assert qf_ids.tolist() == enc["qformer_input_ids"].tolist()
    assert proc.tokenize_prompts([PROMPTS[1]])[0].tolist() == enc["input_ids"].tolist()
