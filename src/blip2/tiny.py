"""Tiny tokenizers built offline (no downloads) for demos and tests: trained in a second on a small corpus with
the `tokenizers` library and saved so that transformers' AutoTokenizer loads them."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = """a photo of a cat on a couch . a dog running in the park . two people riding bikes down a street .
a man in a space suit holding a flag . a woman standing next to a red car . a close up of a cat with green eyes .
a bowl of fruit on a wooden table . a group of children playing soccer on a field . a plane flying over the city .
question : what color is the cat ? short answer : orange . question : how many people are there ? answer : two .
what is the man wearing ? a white space suit . is there a dog in the picture ? yes . no . left right above below .
describe the image in detail . a short image caption : a picture of an astronaut . the sky is blue and clear .
a red circle , a blue square and a green triangle on a white background . small large big tiny shapes colors .
"""


def gpt2_style_tokenizer(directory: str | Path, vocab_size: int = 200, image_token: str | None = "<image>"):
    """A byte-level BPE tokenizer laid out like OPT's: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - (1 if image_token else 0), special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if image_token:
        fast.add_tokens([image_token], special_tokens=True)
    fast.padding_side = "left"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast
