"""The prompt literals and the caption / question cleaning: plain text, no torch, so that everything that
speaks to a user (the command line's help, the benchmark protocols) reads them without the model code.

The prompts: BLIP-2 paper §4.1 (the zero-shot VQA prompt); InstructBLIP paper (the captioning instruction).
The cleaning is LAVIS's caption / question text processor (`lavis/processors/blip_processors.py:
BlipCaptionProcessor.pre_caption`, `BlipQuestionProcessor.pre_question`).
"""

from __future__ import annotations

import re

VQA_TEMPLATE = "Question: {} Short answer:"
CAPTION_INSTRUCTION = "A short image caption:"

# LAVIS's caption/question cleaning drops these characters (commas, apostrophes, '?', '-' are kept).
_DROPPED_PUNCT = re.compile(r'[.!"()*#:;~]')


def _cap_words(text: str, max_words: int | None) -> str:
    words = text.split()  # also collapses runs of spaces, tabs and newlines
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


def pre_caption(caption: str, max_words: int | None = 50) -> str:
    """Lowercase, replace . ! " ( ) * # : ; ~ by spaces, collapse whitespace, keep the first max_words words.
    An empty result means the caption had no words (the data code skips such samples)."""
    return _cap_words(_DROPPED_PUNCT.sub(" ", caption.lower()), max_words)


def pre_question(question: str, max_words: int | None = 50) -> str:
    """Like pre_caption, but the punctuation is deleted rather than replaced ("what's this?" keeps its '?')."""
    return _cap_words(_DROPPED_PUNCT.sub("", question.lower()), max_words)
