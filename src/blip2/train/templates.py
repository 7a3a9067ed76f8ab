"""InstructBLIP instruction templates (the InstructBLIP paper's appendix, written exactly as listed there) and
the paper's held-in / held-out dataset lists.

`{Question}` and `{Answer}` are filled with `str.format`; `<Image>` (the visual prompt) is not written into
the text: the model puts the visual vectors in front of it.
"""

from __future__ import annotations

CAPTION_TEMPLATES = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

VQA_TEMPLATES = (
    "{Question}",
    "Question: {Question}",
    "{Question} A short answer to the question is",
    "Q: {Question} A:",
    "Question: {Question} Short answer:",
    "Given the image, answer the following question with no more than three words. {Question}",
    "Based on the image, respond to this question with a short answer: {Question}. Answer:",
    "Use the provided image to answer the question: {Question} Provide your answer as short as possible:",
    'What is the answer to the following question? "{Question}"',
    'The question "{Question}" can be answered using the image. A short answer is',
)

QGEN_TEMPLATES = (
    "Given the image, generate a question whose answer is: {Answer}. Question:",
    "Based on the image, provide a question with the answer: {Answer}. Question:",
    'Given the visual representation, create a question for which the answer is "{Answer}".',
    "From the image provided, craft a question that leads to the reply: {Answer}. Question:",
    "Considering the picture, come up with a question where the answer is: {Answer}.",
    "Taking the image into account, generate an question that has the answer: {Answer}. Question:",
)

# Free-form instruction data carries its own instruction: the only "template" is the instruction itself.
INSTRUCTION_TEMPLATES = ("{Instruction}",)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": CAPTION_TEMPLATES,
    "vqa": VQA_TEMPLATES,
    "qgen": QGEN_TEMPLATES,
    "instruction": INSTRUCTION_TEMPLATES,
}

# The paper's split (its Figure 2): whole task categories are held out (visual reasoning, video QA, visual
# conversational QA, image classification) plus some datasets of held-in categories. Lower-case names.
HELD_OUT = (
    "nocaps", "flickr30k",  # image captioning
    "gqa", "vsr", "iconqa",  # visual reasoning
    "vizwiz",  # image QA
    "scienceqa",  # knowledge-grounded image QA
    "textvqa",  # image QA with reading comprehension
    "msvd-qa", "msrvtt-qa", "ivqa",  # video QA
    "visual-dialog",  # visual conversational QA
    "hateful-memes",  # image classification
)
HELD_IN = (
    "coco-caption", "web-capfilt",  # image captioning
    "textcaps",  # image captioning with reading comprehension
    "vqav2",  # image QA
    "okvqa", "a-okvqa",  # knowledge-grounded image QA
    "ocr-vqa",  # image QA with reading comprehension
    "llava-instruct-150k",  # visual instruction data
    "vqav2-qgen", "okvqa-qgen", "a-okvqa-qgen",  # image question generation from the QA sets
)


def check_held_in(names) -> None:
    """Raise if any training dataset name is a held-out evaluation set (zero-shot results would be void)."""
    bad = sorted({n.lower() for n in names} & set(HELD_OUT))
    if bad:
        raise ValueError(f"held-out evaluation datasets in the training mixture: {bad} (see templates.HELD_OUT)")
