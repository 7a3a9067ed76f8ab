"""Tiny tokenizers built offline (no downloads) for demos and tests.

Each `make_*_tokenizer(dir, ...)` trains a small tokenizer with the `tokenizers` library on the built-in
English corpus below and writes `tokenizer.json` + `tokenizer_config.json` that
`transformers.AutoTokenizer.from_pretrained(dir)` loads as the same class the hub checkpoints use
(GPT2Tokenizer for OPT, LlamaTokenizer, T5Tokenizer, BertTokenizer). transformers 5 rebuilds those classes'
normalizer / pre-tokenizer / decoder from the vocabulary, so each pipeline below is built to be the one the
class would build: the loaded tokenizer then encodes exactly like the trained one.

All ids are < `vocab_size` (the trainer may learn fewer tokens than asked; `len(tokenizer) <= vocab_size`).
Every function returns the directory as a `Path`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# A few hundred words of captions, questions and instructions, so that real prompts split into several
# tokens. Repeated words let BPE / WordPiece learn whole-word merges for the common ones.
CORPUS = """\
a photo of a cat on a couch
a photo of a dog on the grass
a black and white cat sitting on a red couch
two dogs playing with a ball in the park
a man riding a bicycle down a city street
a woman holding an umbrella in the rain
an astronaut in a white suit standing next to a flag
a cat sleeping in the sun near a window
a plate of food with rice and vegetables
a red bus parked at the side of the road
a group of people standing around a table
a small boat on a lake with mountains in the background
a train traveling through a green field
a bowl of fruit on a wooden kitchen table
a child flying a kite on the beach
a brown horse eating hay in a barn
a pizza with cheese and tomato on a plate
a bird sitting on the branch of a tree
an orange cat looking at the camera
a living room with a couch and a television
Question: what color is the cat? Short answer: black
Question: how many dogs are in the picture? Short answer: two
Question: what is the man riding? Short answer: a bicycle
Question: where is the boat? Short answer: on a lake
Question: what is on the plate? Short answer: food
Q: what animal is on the couch? A: a cat
Q: is it raining? A: yes
Q: what is the woman holding? A: an umbrella
What is the answer to the following question? "What is in the image?"
Given the image, answer the following question with no more than three words.
Based on the image, respond to this question with a short answer.
A short image caption:
A short image description:
Write a short description for the image.
Write a description for the photo.
Provide a description of what is presented in the photo.
Briefly describe the content of the image.
Can you briefly explain what you see in the image?
Could you use a few words to describe what you perceive in the photo?
Please provide a short depiction of the picture.
Use a few words to illustrate what is happening in the picture.
Given the image, generate a question whose answer is: a cat. Question:
The question can be answered using the image. A short answer is
the cat is black and the couch is red
the dog is brown and the grass is green
there are two people and one dog in the photo
this is a picture of a kitchen with a stove and a sink
the sky is blue and the sun is shining
"""

# Llama's byte-fallback pieces <0x00> ... <0xFF>: unseen characters are spelled byte by byte.
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


def _write(dir: str | Path, tok: Tokenizer, config: dict) -> Path:
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"model_max_length": 512, "clean_up_tokenization_spaces": False, **config}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def _check_size(tok: Tokenizer, vocab_size: int, what: str) -> None:
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:  # would break the model's embedding table; a bug here, not in the caller
        raise AssertionError(f"{what} tokenizer has {n} tokens, more than vocab_size={vocab_size}")


def _train_bpe_merges(pre_tokenizer, vocab_size: int, alphabet: list[str]) -> tuple[list[str], list]:
    """Train BPE on the corpus; return (learned tokens in id order, merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    data = json.loads(tok.to_str())["model"]
    tokens = sorted(data["vocab"], key=data["vocab"].get)
    return tokens, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["merges"]]


def make_gpt2_tokenizer(dir: str | Path, vocab_size: int = 512) -> Path:
    """OPT-style byte-level BPE: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3; `<image>` added last.

    Like OPT, every encoding starts with `</s>` (id 2). "\\n" is the single token "Ċ" (BLIP-2 OPT stops on it).
    """
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    n_learn = vocab_size - len(specials) - 1  # room for <image>
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learned, merges = _train_bpe_merges(byte_level, n_learn, pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + learned)}
    # The same pipeline GPT2Tokenizer builds when transformers loads the directory.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    _check_size(tok, vocab_size, "gpt2")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
    }
    return _write(dir, tok, config)


def make_llama_tokenizer(dir: str | Path, vocab_size: int = 512, pad_token: str | None = "[PAD]") -> Path:
    """Llama-style SentencePiece BPE with byte fallback: <unk>=0, <s>=1 (bos, prepended), </s>=2.

    pad_token: "[PAD]" adds it as the first added token (the InstructBLIP-Vicuna layout, where the hub has
    `[PAD]` = 32000 right after the 32000 base pieces), None leaves the tokenizer without a pad token
    (original Llama), any other string names an existing token (e.g. "<unk>", as Vicuna v1.3 does).
    `<image>` is added last.
    """
    specials = ["<unk>", "<s>", "</s>"]
    n_added = 2 if pad_token == "[PAD]" else 1
    n_learn = vocab_size - len(specials) - len(_BYTE_TOKENS) - n_added
    if n_learn < 64:
        raise ValueError(f"make_llama_tokenizer needs vocab_size >= {vocab_size - n_learn + 64} (256 byte tokens)")
    # Train with split=True so no merge crosses a word boundary, as SentencePiece does.
    split_metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted(set("▁" + "".join(corpus_lines())) - {" "})
    learned, merges = _train_bpe_merges(split_metaspace, n_learn, alphabet)
    vocab = {t: i for i, t in enumerate(specials + _BYTE_TOKENS + learned)}
    # The pipeline LlamaTokenizer builds (legacy=False, add_prefix_space=True).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if pad_token == "[PAD]":
        tok.add_special_tokens([AddedToken("[PAD]", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    _check_size(tok, vocab_size, "llama")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "add_prefix_space": True,
    }
    if pad_token is not None:
        config["pad_token"] = pad_token
    return _write(dir, tok, config)


def make_t5_tokenizer(dir: str | Path, vocab_size: int = 512) -> Path:
    """T5-style SentencePiece unigram: <pad>=0, </s>=1 (appended), <unk>=2; no bos; `<image>` added last."""
    specials = ["<pad>", "</s>", "<unk>"]
    # The pre-tokenizer T5Tokenizer builds when transformers loads the directory.
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    # A deterministic unigram vocabulary (the trainer's result varies from run to run): whole words scored
    # by their log frequency, then single characters (with and without the word-start mark) as fallbacks.
    counts: dict[str, int] = {}
    for line in corpus_lines():
        for piece, _ in pre.pre_tokenize_str(line):
            counts[piece] = counts.get(piece, 0) + 1
    total = sum(counts.values())
    chars = sorted({c for w in counts for c in w.lstrip("▁")})
    room = vocab_size - 1 - len(specials) - 2 * len(chars)
    words = sorted(counts, key=lambda w: (-counts[w], w))[:max(0, room)]
    pieces = [(t, 0.0) for t in specials] + [(w, math.log(counts[w] / total)) for w in words]
    pieces += [("▁" + c, -20.0) for c in chars] + [(c, -21.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    _check_size(tok, vocab_size, "t5")
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0,
    }
    return _write(dir, tok, config)


def make_bert_tokenizer(dir: str | Path, vocab_size: int = 400) -> Path:
    """BERT uncased WordPiece: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then words; writes vocab.txt too."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    # A deterministic vocabulary (WordPiece training breaks ties differently from run to run): every
    # character, its "##" continuation, then the corpus words, most frequent first.
    counts: dict[str, int] = {}
    for line in corpus_lines():
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for w in counts for c in w})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces = specials + chars + ["##" + c for c in chars] + words
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(pieces[:vocab_size])}, unk_token="[UNK]"))
    # The pipeline BertTokenizer builds (do_lower_case=True).
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    _check_size(tok, vocab_size, "bert")
    vocab = tok.get_vocab()
    out = _write(dir, tok, {"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    (out / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- images
