"""Collator: token layouts and label masks checked by hand (tiny tokenizers from blip2.tiny), skipped samples,
and the batches fed to tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from blip2 import tiny
from blip2.processing import ImageProcessor, Processor
from blip2.train.collate import Collator, prefix_split
from blip2.train.transforms import TrainTransform

IGN = -100


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    makers = {"opt": tiny.make_gpt2_tokenizer, "llama": tiny.make_llama_tokenizer, "t5": tiny.make_t5_tokenizer,
              "bert": tiny.make_bert_tokenizer}
    return {k: str(f(d / k)) for k, f in makers.items()}


def load(path):
    """A fresh tokenizer instance: the collator's processor and the reference never share state."""
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(p)
    return str(p)


IP = ImageProcessor(image_size=32)


def proc(toks, llm, qformer=None, side="left"):
    return Processor(IP, load(toks[llm]), load(toks[qformer]) if qformer else None, padding_side=side)


def sample(image, text, key="k0", **kw):
    return {"image": image, "text": text, "key": key, "epoch": 0, **kw}


def tokens(tok, row):
    return [tok.convert_ids_to_tokens(int(i)) if i >= 0 else None for i in row]


# ------------------------------------------------------------------------------------------------ stage 1


def test_stage1_bert_layout(toks, image_file):
    ref = load(toks["bert"])
    long = " ".join(["a cat on the couch"] * 10)  # 50 words: longer than 32 tokens
    b = Collator("stage1", proc(toks, "bert", side="right"))(
        [sample(image_file, "a cat on the couch", image_id=7), sample(image_file, long, "k1", image_id=9)])
    assert tokens(ref, b["input_ids"][0, :7]) == ["[CLS]", "a", "cat", "on", "the", "couch", "[SEP]"]
    assert b["input_ids"].shape == (2, 32)
    assert b["input_ids"][0, 7:].tolist() == [ref.pad_token_id] * 25  # right padded
    assert b["attention_mask"][0].tolist() == [1] * 7 + [0] * 25
    ref.truncation_side = "right"  # keep the start of a long caption, like LAVIS
    assert b["input_ids"][1].tolist() == ref(long, truncation=True, max_length=32)["input_ids"]
    assert b["image_ids"].tolist() == [7, 9] and b["image_ids"].dtype == torch.long
    assert set(b) == {"pixel_values", "input_ids", "attention_mask", "image_ids", "skipped"}


# ------------------------------------------------------------------------------------------------ stage 2


def test_stage2_opt_prompt_mask_and_newline(toks, image_file):
    ref = load(toks["opt"])
    b = Collator("stage2", proc(toks, "opt"), prompt="a photo of")(
        [sample(image_file, "a cat on the couch"), sample(image_file, "a dog", "k1")])
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    # OPT puts </s> first (BOS); the caption ends with "\n" (LAVIS Blip2OPT), the token OPT generation stops on
    assert tokens(ref, ids[0]) == ["</s>", "a", "Ġphoto", "Ġof", "Ġa", "Ġcat", "Ġon", "Ġthe", "Ġcouch", "Ċ"]
    assert ids[0].tolist() == ref("a photo of a cat on the couch\n")["input_ids"]
    # positions 0..3 (BOS + the 3 prompt tokens) carry no loss; every caption token and "\n" does
    assert labels[0].tolist() == [IGN] * 4 + ids[0, 4:].tolist()
    # second row: right padded with <pad>, padding masked out and ignored
    assert tokens(ref, ids[1, :7]) == ["</s>", "a", "Ġphoto", "Ġof", "Ġa", "Ġdog", "Ċ"]
    assert ids[1, 7:].tolist() == [ref.pad_token_id] * 3
    assert mask[1].tolist() == [1] * 7 + [0] * 3
    assert labels[1].tolist() == [IGN] * 4 + ids[1, 4:7].tolist() + [IGN] * 3
    assert set(b) == {"pixel_values", "input_ids", "attention_mask", "labels", "skipped"}


def test_stage2_llama_eos_no_prompt(toks, image_file):
    ref = load(toks["llama"])
    b = Collator("stage2", proc(toks, "llama"))([sample(image_file, "a cat on the couch")])
    assert tokens(ref, b["input_ids"][0]) == ["<s>", "▁a", "▁cat", "▁on", "▁the", "▁couch", "</s>"]
    assert b["labels"][0].tolist() == [IGN] + b["input_ids"][0, 1:].tolist()  # only BOS masked


def test_stage2_truncation_keeps_end_token(toks, image_file):
    ref = load(toks["opt"])
    b = Collator("stage2", proc(toks, "opt"), prompt="a photo of", max_len=6)(
        [sample(image_file, "a cat on the couch")])
    assert tokens(ref, b["input_ids"][0]) == ["</s>", "a", "Ġphoto", "Ġof", "Ġa", "Ċ"]
    assert b["labels"][0].tolist()[:4] == [IGN] * 4


def test_t5_prefix_split_layout_and_reproducible(toks, image_file):
    ref = load(toks["t5"])  # appends </s> itself: the reference for both sides
    col = Collator("stage2", proc(toks, "t5", side="right"), encoder_decoder=True, seed=3)
    caption = "a cat on the couch"  # 5 words: the cut is after word 1 or 2
    seen = set()
    for k in range(40):
        s = sample(image_file, caption, key=f"k{k}")
        b = col([s])
        src = ref.decode(b["input_ids"][0], skip_special_tokens=True)
        n = len(src.split())
        seen.add(n)
        words = caption.split()
        assert b["input_ids"][0].tolist() == ref(" ".join(words[:n]))["input_ids"]
        assert b["labels"][0].tolist() == ref(" ".join(words[n:]))["input_ids"]  # suffix + </s>
        assert torch.equal(col([s])["labels"], b["labels"])  # same (seed, epoch, key): same split
    assert seen == {1, 2}
    # a one-word caption: nothing for the encoder but </s>, the word is the target
    b = col([sample(image_file, "cat")])
    assert b["input_ids"][0].tolist() == [ref.eos_token_id]
    assert b["labels"][0].tolist() == ref("cat")["input_ids"]


def test_prefix_split_range():
    rng = np.random.default_rng(0)
    ks = {len(prefix_split("w " * 9 + "w", rng)[0].split()) for _ in range(300)}  # 10 words
    assert ks == {1, 2, 3, 4, 5}


def test_t5_prompt_and_padding(toks, image_file):
    ref = load(toks["t5"])
    b = Collator("stage2", proc(toks, "t5", side="right"), encoder_decoder=True, prompt="a photo of")(
        [sample(image_file, "cat"), sample(image_file, "a dog on the grass", "k1")])
    enc = ref("a photo of")["input_ids"]  # one-word caption: the encoder gets the prompt alone (+ </s>)
    width = b["input_ids"].shape[1]
    assert b["input_ids"][0].tolist() == enc + [ref.pad_token_id] * (width - len(enc))
    assert b["attention_mask"][0].tolist() == [1] * len(enc) + [0] * (width - len(enc))
    assert b["labels"][0].tolist()[:2] == ref("cat")["input_ids"]
    assert (b["labels"][0, 2:] == IGN).all()  # padding of the shorter target is ignored


# ----------------------------------------------------------------------------------------------- instruct

INSTR = "Question: what is on the couch? Short answer:"


def test_instruct_llama_masks_and_qformer(toks, image_file):
    ref, bert = load(toks["llama"]), load(toks["bert"])
    b = Collator("instruct", proc(toks, "llama", "bert"))([sample(image_file, "a cat", instruction=INSTR)])
    n_ctx = len(ref(INSTR)["input_ids"])  # BOS + instruction tokens
    assert b["input_ids"][0].tolist() == ref(INSTR + " a cat")["input_ids"] + [ref.eos_token_id]
    assert b["labels"][0].tolist() == [IGN] * n_ctx + b["input_ids"][0, n_ctx:].tolist()
    assert tokens(ref, b["input_ids"][0, n_ctx:]) == ["▁a", "▁cat", "</s>"]
    assert b["qformer_input_ids"][0].tolist() == bert(INSTR)["input_ids"]  # [CLS] ... [SEP]
    assert b["qformer_attention_mask"].all()


def test_instruct_truncation_left_and_target(toks, image_file):
    ref, bert = load(toks["llama"]), load(toks["bert"])
    col = Collator("instruct", proc(toks, "llama", "bert"), max_len=6, max_target_len=3, qformer_max_len=6)
    b = col([sample(image_file, "a cat on the couch", instruction=INSTR)])
    body = ref(INSTR, add_special_tokens=False)["input_ids"]
    expect_ctx = [ref.bos_token_id] + body[-5:]  # BOS kept, the instruction's start dropped
    assert b["input_ids"][0, :6].tolist() == expect_ctx
    assert tokens(ref, b["input_ids"][0, 6:]) == ["▁a", "▁cat", "</s>"]  # answer cut to 2 tokens + EOS
    assert b["labels"][0].tolist() == [IGN] * 6 + b["input_ids"][0, 6:].tolist()
    qbody = bert(INSTR, add_special_tokens=False)["input_ids"]
    assert b["qformer_input_ids"][0].tolist() == [bert.cls_token_id] + qbody[-4:] + [bert.sep_token_id]


def test_instruct_t5(toks, image_file):
    ref = load(toks["t5"])
    b = Collator("instruct", proc(toks, "t5", side="right"), encoder_decoder=True)(
        [sample(image_file, "a cat", instruction=INSTR)])
    assert b["input_ids"][0].tolist() == ref(INSTR)["input_ids"]
    assert b["labels"][0].tolist() == ref("a cat")["input_ids"]
    assert "qformer_input_ids" not in b  # the processor has no Q-Former tokenizer: BLIP-2 style


def test_instruct_needs_instruction(toks, image_file):
    with pytest.raises(KeyError, match="instruction"):
        Collator("instruct", proc(toks, "llama"))([sample(image_file, "a cat")])


# ------------------------------------------------------------------------------------------ images, skips


def test_pixels_eval_and_seeded_train(toks, image_file):
    b = Collator("stage2", proc(toks, "opt"))([sample(image_file, "a cat")])
    assert torch.equal(b["pixel_values"], IP(Image.open(image_file)))  # default: the eval ImageProcessor
    col = Collator("stage2", proc(toks, "opt"), image_transform=TrainTransform(IP), seed=1)
    one = col([sample(image_file, "a cat", key="x")])["pixel_values"]
    assert torch.equal(one, col([sample(image_file, "a cat", key="x")])["pixel_values"])
    other = [col([sample(image_file, "a cat", key=f"y{i}")])["pixel_values"] for i in range(3)]
    assert not all(torch.equal(one, o) for o in other)


def test_bad_samples_skipped_and_counted(toks, image_file, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    data = open(image_file, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])  # a valid header, half the pixels
    batch = [sample(image_file, "a cat"), sample(str(truncated), "a dog", "k1"),
             sample(str(tmp_path / "missing.jpg"), "a cat", "k2"), sample(image_file, "  ", "k3"),
             sample(b"not a jpeg", "a cat", "k4")]
    b = Collator("stage2", proc(toks, "opt"))(batch)
    assert int(b["skipped"]) == 4 and b["skipped"].dtype == torch.long
    assert b["pixel_values"].shape[0] == b["input_ids"].shape[0] == 1
    b = Collator("stage2", proc(toks, "opt"))(batch[1:])
    assert set(b) == {"skipped"} and int(b["skipped"]) == 4  # nothing usable: the loop skips the step


# ------------------------------------------------------------------------------------------- with models


def _model(preset, **edit):
    from blip2.config import PRESETS, Blip2Config
    from blip2.model import Blip2Model

    d = copy.deepcopy(PRESETS[preset])
    for path, value in edit.items():
        node = d
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    torch.manual_seed(0)
    return Blip2Model(Blip2Config.from_dict(d)).eval()


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "skipped"}


def test_batches_feed_the_models(toks, image_file):
    samples = [sample(image_file, "a cat on the couch", image_id=0, instruction=INSTR),
               sample(image_file, "a dog", "k1", image_id=1, instruction="A short image caption:")]
    with torch.no_grad():
        m = _model("tiny-opt", **{"llm.hf_config.vocab_size": 512})
        out = m(**_inputs(Collator("stage2", proc(toks, "opt"), prompt="a photo of")(samples)))
        assert torch.isfinite(out.loss)
        m = _model("tiny-t5", **{"llm.hf_config.vocab_size": 512})
        out = m(**_inputs(Collator("stage2", proc(toks, "t5", side="right"), encoder_decoder=True)(samples)))
        assert torch.isfinite(out.loss)
        m = _model("tiny-llama-instruct", **{"llm.hf_config.vocab_size": 512, "qformer.vocab_size": 400})
        out = m(**_inputs(Collator("instruct", proc(toks, "llama", "bert"))(samples)))
        assert torch.isfinite(out.loss)
        m = _model("tiny-stage1", **{"qformer.vocab_size": 401})
        losses = m.losses(**_inputs(Collator("stage1", proc(toks, "bert", side="right"))(samples)))
        assert torch.isfinite(losses["loss"])
