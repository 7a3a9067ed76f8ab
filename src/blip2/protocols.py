"""The evaluation protocol of every BLIP-2 / InstructBLIP benchmark, as data (`blip2 eval --benchmark NAME`,
`blip2 eval --list`; docs/evaluation.md).

One `Protocol` per benchmark: the reader of its official files (blip2.benchmark_files), the prompt per
architecture, the image size, the generation settings per architecture and LLM family, question cleaning, answer
post-processing, the metric, and the papers' published numbers. Every setting names its source in `sources`:
a paper section / table, or a file + function of the original implementation (LAVIS, read at commit 506965b;
`captioning.py` at 200ac17, the version the papers were evaluated with). Where the original released no
setting (InstructBLIP's held-out benchmarks) the entry says "not released" and which released config it follows.

Lengths are converted to new-token counts. The original passes `max_length` / `min_length` to transformers 4.33
`generate` with `inputs_embeds` only: for decoder-only LLMs (OPT, Vicuna) both count new tokens; for Flan-T5 the
caption / instruct path passes `max_new_tokens` (new tokens) but `min_length`, which counts the decoder start
token, so "min 8" there is 7 new tokens (`lavis_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompts import pre_question

LAVIS = "LAVIS lavis/"
# The architecture keys a protocol's settings are given for: (architecture, LLM family)
ARCH_KEYS = ("blip2-opt", "blip2-t5", "instructblip-t5", "instructblip-vicuna")


def architecture_key(architecture: str, is_encoder_decoder: bool) -> str:
    """"blip2-opt" / "blip2-t5" / "instructblip-t5" / "instructblip-vicuna" for a model's config: a decoder-only
    LLM takes the OPT settings under BLIP-2 and the Vicuna settings under InstructBLIP (the released pairings)."""
    if architecture not in ("blip2", "instructblip"):
        raise ValueError(f"benchmark protocols are for 'blip2' / 'instructblip' models, got {architecture!r}")
    family = "t5" if is_encoder_decoder else ("opt" if architecture == "blip2" else "vicuna")
    return f"{architecture}-{family}"


def lavis_lengths(family: str, max_len: int, min_len: int) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) for the original's (max_len, min_len): see the module docstring."""
    return max_len, (max(min_len - 1, 0) if family == "t5" else min_len)


def _gen(key: str, beams: int, max_len: int, min_len: int, length_penalty: float, repetition_penalty: float) -> dict:
    max_new, min_new = lavis_lengths(key.split("-")[1], max_len, min_len)
    return {"num_beams": beams, "max_new_tokens": max_new, "min_new_tokens": min_new,
            "length_penalty": float(length_penalty), "repetition_penalty": float(repetition_penalty),
            "repetition_context": "generated"}


# The defaults of the original `generate` per architecture (blip2_opt.py / blip2_t5.py / blip2_t5_instruct.py /
# blip2_vicuna_instruct.py `generate`): 5 beams, max 30 / min 1, no repetition penalty for BLIP-2; 5 beams,
# max 256 / min 1, repetition penalty 1.5, length penalty 1 for InstructBLIP. `predict_answers` passes only
# beams / lengths / length penalty, so InstructBLIP answers keep the 1.5 repetition penalty.
ORIGINAL_GENERATE = {
    "blip2-opt": _gen("blip2-opt", 5, 30, 1, 1.0, 1.0),
    "blip2-t5": _gen("blip2-t5", 5, 30, 1, 1.0, 1.0),
    "instructblip-t5": _gen("instructblip-t5", 5, 256, 1, 1.0, 1.5),
    "instructblip-vicuna": _gen("instructblip-vicuna", 5, 256, 1, 1.0, 1.5),
}
# `predict_answers` defaults: max_len 10, min_len 1, length penalty 0 (OPT, Vicuna) / -1 (Flan-T5)
ORIGINAL_ANSWER = {k: {**v, **dict(zip(("max_new_tokens", "min_new_tokens"), lavis_lengths(k.split("-")[1], 10, 1))),
                       "length_penalty": -1.0 if k.endswith("t5") else 0.0} for k, v in ORIGINAL_GENERATE.items()}


def original_generation(cfg, kind: str = "instruct") -> dict:
    """The original `generate` defaults (kind "caption" / "instruct") or `predict_answers` defaults ("answer") for a
    model config; `model.caption` / `answer` / `instruct` use them where their keyword arguments are silent."""
    if kind not in ("caption", "instruct", "answer"):
        raise ValueError(f"kind must be 'caption', 'instruct' or 'answer', got {kind!r}")
    key = architecture_key(cfg.architecture, cfg.is_encoder_decoder)
    return dict((ORIGINAL_ANSWER if kind == "answer" else ORIGINAL_GENERATE)[key])


@dataclass(frozen=True)
class Published:
    checkpoint: str
    metric: str
    value: float
    source: str


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    kind: str  # caption | vqa | choice | aokvqa | binary | retrieval | video-qa
    reader: str  # a key of blip2.benchmark_files.READERS
    data: str  # the files --data takes, in order
    split: str
    image_size: int
    prompts: dict  # architecture ("blip2" / "instructblip") -> template; {} for retrieval
    generation: dict = field(default_factory=dict)  # ARCH_KEYS -> settings (generate kinds only)
    clean_question: bool = True  # lower case, punctuation removed (LAVIS `blip_question` eval text processor)
    lemmatize: bool = False
    metric: str = ""
    result_format: str = ""
    published: tuple = ()
    sources: dict = field(default_factory=dict)
    fold_size: int = 0  # retrieval: also report recall averaged over folds of this many images (0: none)

    def prompt(self, architecture: str) -> str:
        if architecture not in self.prompts:
            raise ValueError(f"benchmark {self.name}: no prompt for architecture {architecture!r}; "
                             f"it is given for {sorted(self.prompts)}")
        return self.prompts[architecture]

    def settings(self, arch_key: str) -> dict:
        if not self.generation:
            return {}
        if arch_key not in self.generation:
            raise ValueError(f"benchmark {self.name}: no generation settings for {arch_key!r}; "
                             f"it has them for {sorted(self.generation)}")
        return dict(self.generation[arch_key])


def format_choices(choices) -> str:
    """ "(a) first (b) second": the original's option list (blip2_t5_instruct.py / blip2_vicuna_instruct.py
    `predict_answers`, prompts with two {} and choices)."""
    return " ".join(f"({chr(ord('a') + j)}) {c}" for j, c in enumerate(choices))


def build_prompt(protocol: Protocol, architecture: str, item: dict) -> str:
    """The LLM prompt (and, for InstructBLIP, the Q-Former text) of one item: the question cleaned as in training
    when the protocol says so; OCR tokens (the first 30, comma-separated) before the question (TextVQA); the hint
    and the lettered options (ScienceQA); the meme text (HatefulMemes)."""
    template = protocol.prompt(architecture)
    q = item.get("question")
    if isinstance(q, str) and protocol.clean_question:
        q = pre_question(q)
    n = template.count("{}")
    if protocol.kind == "caption":
        return template
    if protocol.name == "textvqa" and n == 2:
        return template.format(", ".join((item.get("ocr_tokens") or [])[:30]), q)
    if protocol.name == "scienceqa-img":
        return template.format(item.get("context") or "", q, format_choices(item["choices"]))
    if protocol.name == "hatefulmemes":
        return template.format(item["text"])
    if n == 2:
        return template.format(q, format_choices(item["choices"]))
    return template.format(q)


def build_choice_prompt(protocol: Protocol, architecture: str, item: dict) -> str:
    """A-OKVQA multiple choice: the direct-answer template with the lettered options after the question."""
    q = pre_question(item["question"]) if protocol.clean_question else item["question"]
    return protocol.prompt(architecture).replace("{}", "{} Options: {}.", 1).format(q, format_choices(item["choices"]))


# ------------------------------------------------------------------------------------------------- the table
_EVAL = LAVIS + "projects/blip2/eval/"
_IB = LAVIS + "projects/instructblip/"
_BLIP2_VQA = "Question: {} Short answer:"
_IB_VQA = "Question: {} Short Answer:"
_NOT_RELEASED = "not released; follows " + _IB + "qa_okvqa_*_eval.yaml"
# Where the published numbers come from (each read, not recalled). The papers' tables themselves were not readable
# here; PwC is Papers with Code's extraction of the BLIP-2 paper's tables, a secondary source. The LAVIS eval
# configs open with the scores of a run of the original code on that checkpoint, not the paper's table.
_README = "LAVIS projects/blip2/README.md (introduction)"
_PWC = ("paperswithcode.com/paper/blip-2-bootstrapping-language-image-pre, 'Results from the Paper' (its model "
        "labels; a secondary source for arXiv 2301.12597)")


def _run(file: str) -> str:
    return f"{_EVAL}{file}, header comment (a run of the original code, not the paper's table)"


def _answers(blip2: tuple | None, ib: tuple | None) -> dict:
    """Generation per architecture key from (beams, max_len, min_len) of the BLIP-2 and the InstructBLIP config;
    length penalties are predict_answers' (0 OPT, -1 Flan-T5) for BLIP-2 and the configs' -1 for InstructBLIP."""
    out = {}
    for key in ARCH_KEYS:
        spec = blip2 if key.startswith("blip2") else ib
        if spec is None:
            continue
        lp = (-1.0 if key.endswith("t5") else 0.0) if key.startswith("blip2") else -1.0
        out[key] = _gen(key, *spec, lp, 1.0 if key.startswith("blip2") else 1.5)
    return out


def _captions(blip2: tuple | None, ib: tuple | None) -> dict:
    out = {}
    for key in ARCH_KEYS:
        spec = blip2 if key.startswith("blip2") else ib
        if spec is not None:
            out[key] = _gen(key, *spec, 1.0, 1.0 if key.startswith("blip2") else 1.5)
    return out


_CAP_SRC = {"generation": "beams / max_len / min_len from the eval config; repetition and length penalty are the "
                          "model's `generate` defaults (LAVIS lavis/tasks/captioning.py valid_step, 200ac17, passes "
                          "only beams and lengths)",
            "metric": "COCO caption toolkit (pycocoevalcap): BLEU-4, METEOR, ROUGE-L, CIDEr; SPICE not run offline"}
_VQA_SRC = {"clean_question": LAVIS + "processors/blip_processors.py BlipQuestionProcessor (the eval configs' "
                              "text processor `blip_question`)",
            "post-processing": "answers stripped (blip2_*.py predict_answers); the VQA evaluation tool normalises "
                               "them (punctuation, digits, articles, contractions)"}

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol(
        "coco-caption", "COCO Karpathy test captioning", "caption", "karpathy-caption", "dataset_coco.json", "test",
        364, {"blip2": "a photo of", "instructblip": "A short image caption."},
        _captions((5, 30, 8), (5, 80, 10)), metric="CIDEr", result_format='[{"image_id", "caption"}]',
        published=(Published("BLIP-2 ViT-G OPT 2.7B", "CIDEr", 145.8, _PWC),
                   Published("BLIP-2 ViT-G OPT 2.7B", "BLEU-4", 43.7, _PWC),
                   Published("BLIP-2 ViT-G OPT 6.7B", "CIDEr", 145.2, _PWC),
                   Published("BLIP-2 ViT-G OPT 6.7B", "BLEU-4", 43.5, _PWC),
                   Published("BLIP-2 ViT-G FlanT5 XL", "CIDEr", 144.5, _PWC),
                   Published("BLIP-2 ViT-G FlanT5 XL", "BLEU-4", 42.4, _PWC),
                   Published("LAVIS caption_coco_opt2.7b", "CIDEr (pycocoevalcap scale)", 1.461,
                             _run("caption_coco_opt2.7b_eval.yaml")),
                   Published("LAVIS caption_coco_opt6.7b", "CIDEr (pycocoevalcap scale)", 1.451,
                             _run("caption_coco_opt6.7b_eval.yaml"))),
        sources={"prompt": LAVIS + "configs/models/blip2/blip2_caption_*.yaml (prompt); " + _IB
                 + "caption_coco_*_eval_test.yaml", "image_size": _EVAL + "caption_coco_opt2.7b_eval.yaml (364); "
                 "InstructBLIP 224", "lengths": _EVAL + "caption_coco_opt*_eval.yaml (5 beams, 30 / 8); " + _IB
                 + "caption_coco_*_eval_test.yaml (5 beams, 80 / 10)", **_CAP_SRC}),
    Protocol(
        "nocaps", "NoCaps val captioning (in / near / out-domain)", "caption", "nocaps",
        "nocaps_val_4500_captions.json", "val", 364, {"blip2": "a photo of", "instructblip": "A short image caption."},
        _captions((5, 80, 10), (5, 80, 10)), metric="CIDEr (overall and per domain)",
        result_format='[{"image_id", "caption"}]',
        published=(Published("best BLIP-2 (the source does not name it)", "CIDEr", 121.6, _README),),
        sources={"prompt": "BLIP-2 §4.2: NoCaps zero-shot with the COCO-finetuned captioner (its prompt)",
                 "lengths": _EVAL + "caption_nocaps_out_domain_flant5xl_eval.yaml (5 beams, 80 / 10); " + _IB
                 + "caption_nocaps_out_domain_*_eval.yaml (5 beams, 80 / 10)",
                 "breakdown": "NoCaps: images carry `domain`; each domain is scored on its own images", **_CAP_SRC}),
    Protocol(
        "flickr30k-caption", "Flickr30K Karpathy test captioning (InstructBLIP held-out)", "caption",
        "karpathy-caption", "dataset_flickr30k.json", "test", 224, {"instructblip": "A short image caption."},
        _captions(None, (5, 80, 10)), metric="CIDEr", result_format='[{"image_id", "caption"}]',
        sources={"settings": "not released; follows " + _IB + "caption_nocaps_out_domain_*_eval.yaml", **_CAP_SRC}),
    Protocol(
        "vqav2", "VQAv2 val (or test-dev: submission file only)", "vqa", "vqa-questions",
        "questions.json [annotations.json]", "val", 224, {"blip2": _BLIP2_VQA, "instructblip": _IB_VQA},
        _answers((5, 10, 1), (5, 10, 1)), metric="VQA accuracy", result_format='[{"question_id", "answer"}]',
        published=(Published("best BLIP-2 (the source does not name it)", "VQA accuracy (zero-shot)", 65.0, _README),
                   Published("LAVIS pretrain_flant5xl", "VQA accuracy (val)", 63.13,
                             _run("vqav2_zeroshot_flant5xl_eval.yaml")),
                   Published("LAVIS pretrain_opt2.7b", "VQA accuracy (val; the file: differs from the paper, "
                             "another implementation and transformers version)", 51.88,
                             _run("vqav2_zeroshot_opt_eval.yaml"))),
        sources={"prompt / lengths": _EVAL + "vqav2_zeroshot_opt_eval.yaml, vqav2_zeroshot_flant5xl_eval.yaml; "
                 "InstructBLIP: " + _NOT_RELEASED, "length_penalty": "predict_answers defaults (0 OPT, -1 Flan-T5)",
                 **_VQA_SRC}),
    Protocol(
        "okvqa", "OK-VQA val", "vqa", "vqa-questions", "OpenEnded_mscoco_val2014_questions.json "
        "mscoco_val2014_annotations.json", "val", 224, {"blip2": _BLIP2_VQA, "instructblip": _IB_VQA},
        _answers((5, 10, 1), (5, 10, 1)), lemmatize=True, metric="VQA accuracy",
        result_format='[{"question_id", "answer"}]',
        published=(Published("LAVIS pretrain_flant5xl", "VQA accuracy", 41.22, _run("okvqa_zeroshot_flant5xl_eval.yaml")),),
        sources={"prompt / lengths": _EVAL + "okvqa_zeroshot_flant5xl_eval.yaml; " + _IB + "qa_okvqa_*_eval.yaml",
                 "lemmatize": _EVAL + "okvqa_zeroshot_flant5xl_eval.yaml apply_lemmatizer (spaCy en_core_web_sm)",
                 **_VQA_SRC}),
    Protocol(
        "aokvqa", "A-OKVQA val, direct answer and multiple choice", "aokvqa", "aokvqa", "aokvqa_v1p0_val.json",
        "val", 224, {"blip2": _BLIP2_VQA, "instructblip": _IB_VQA}, _answers((5, 10, 1), (5, 10, 1)),
        metric="DA: min(1, matches / 3) on non-difficult questions; MC: accuracy (choice by summed log-likelihood)",
        result_format='{question_id: {"direct_answer", "multiple_choice"}}',
        sources={"metric": "allenai/aokvqa evaluation/eval_predictions.py eval_aokvqa (raw string match, "
                 "difficult_direct_answer questions left out of DA)", "settings": _NOT_RELEASED,
                 "choice": LAVIS + "models/blip2_models/blip2_t5_instruct.py _predict_class (candidates ranked by "
                 "their summed token loss)", **_VQA_SRC}),
    Protocol(
        "gqa", "GQA testdev balanced", "vqa", "gqa", "testdev_balanced_questions.json", "testdev", 224,
        {"blip2": _BLIP2_VQA, "instructblip": _IB_VQA}, _answers((5, 10, 1), (5, 10, 1)),
        metric="exact match (per structural / semantic type)", result_format='[{"questionId", "prediction"}]',
        published=(Published("LAVIS pretrain_flant5xl", "accuracy", 43.98, _run("gqa_zeroshot_flant5xl_eval.yaml")),),
        sources={"prompt / lengths": _EVAL + "gqa_zeroshot_flant5xl_eval.yaml; InstructBLIP: " + _NOT_RELEASED,
                 "metric": LAVIS + "tasks/vqa.py GQATask (normalised prediction == answer)", **_VQA_SRC}),
    Protocol(
        "vizwiz", "VizWiz val (unanswerable questions included)", "vqa", "vizwiz", "val.json", "val", 224,
        {"blip2": _BLIP2_VQA, "instructblip": _IB_VQA}, _answers((5, 10, 1), (5, 10, 1)),
        metric="VQA accuracy (per answer type, 'unanswerable' included)", result_format='[{"image", "answer"}]',
        sources={"settings": _NOT_RELEASED, "reader": LAVIS + "datasets/datasets/vizwiz_vqa_datasets.py (question "
                 "id = image name)", **_VQA_SRC}),
    Protocol(
        "textvqa", "TextVQA val, OCR tokens in the instruction", "vqa", "textvqa",
        "TextVQA_0.5.1_val.json [TextVQA_Rosetta_OCR_v0.2_val.json]", "val", 224,
        {"instructblip": "OCR tokens: {}. Question: {} Short answer:"}, _answers(None, (5, 10, 1)),
        metric="VQA accuracy", result_format='[{"question_id", "answer"}]',
        sources={"prompt": LAVIS + "models/blip2_models/blip2_vicuna_instruct.py predict_answers (a prompt with two {} "
                 "gets the first 30 OCR tokens joined by ', ', then the question); the wording is not released",
                 "settings": _NOT_RELEASED, **_VQA_SRC}),
    Protocol(
        "scienceqa-img", "ScienceQA test, questions with an image", "choice", "scienceqa",
        "problems.json pid_splits.json", "test", 224,
        {"instructblip": "Context: {} Question: {} Options: {}. Answer:"}, metric="accuracy (choice by summed "
        "log-likelihood)", result_format='[{"pid", "prediction", "answer"}]',
        sources={"prompt": "option list as predict_answers formats it; the wording is not released",
                 "choice": LAVIS + "models/blip2_models/blip2_t5_instruct.py _predict_class (summed token loss)",
                 "split": "InstructBLIP Table 1: ScienceQA-IMG = the test questions with an image context"}),
    Protocol(
        "iconqa", "IconQA test, multiple text choice", "choice", "iconqa", "problems.json pid_splits.json",
        "choose_txt test", 224, {"instructblip": "Question: {} Options: {}. Short answer:"},
        metric="accuracy (choice by summed log-likelihood)", result_format='[{"pid", "prediction", "answer"}]',
        sources={"prompt": "option list as predict_answers formats it; the wording is not released",
                 "choice": LAVIS + "models/blip2_models/blip2_t5_instruct.py _predict_class (summed token loss)"}),
    Protocol(
        "hatefulmemes", "Hateful Memes dev (seen)", "binary", "hatefulmemes", "dev_seen.jsonl", "dev", 224,
        {"instructblip": 'This is an image with: "{}" written on it. Is it hateful? Answer:'},
        metric="ROC AUC of p(yes) (scikit-learn roc_auc_score)", result_format='[{"id", "proba", "label"}]',
        sources={"prompt": "the wording is not released", "metric": "InstructBLIP Table 1 reports AUC",
                 "score": "p(yes) = softmax over the summed log-likelihoods of 'yes' and 'no'"}),
    Protocol(
        "msvd-qa", "MSVD-QA test (4 frames)", "video-qa", "video-qa", "test_qa.json [youtube_mapping.txt]", "test",
        224, {"instructblip": _IB_VQA}, _answers(None, (5, 30, 1)), metric="VQA accuracy (one answer: exact match)",
        result_format='[{"question_id", "answer"}]',
        sources={"settings": _IB + "qa_msvd_*_eval.yaml (4 frames, 5 beams, 30 / 1, length penalty -1)"}),
    Protocol(
        "msrvtt-qa", "MSRVTT-QA test (4 frames)", "video-qa", "video-qa", "test_qa.json", "test", 224,
        {"instructblip": _IB_VQA}, _answers(None, (5, 10, 1)), metric="VQA accuracy (one answer: exact match)",
        result_format='[{"question_id", "answer"}]',
        sources={"settings": _IB + "qa_msrvtt_*_eval_test.yaml (4 frames, 5 beams, 10 / 1, length penalty -1)"}),
    Protocol(
        "flickr30k-retrieval", "Flickr30K test image-text retrieval (1k images: one gallery)", "retrieval",
        "karpathy-retrieval", "dataset_flickr30k.json", "test", 364, {},
        metric="R@1/5/10 both directions (the test split is 1000 images: the 1k protocol)",
        published=tuple(Published("BLIP-2 ViT-G (zero-shot, 1K test set)", m, v, _PWC) for m, v in (
            ("i2t_r1", 97.6), ("i2t_r5", 100.0), ("t2i_r1", 89.7), ("t2i_r5", 98.1), ("t2i_r10", 98.9))),
        sources={"settings": _EVAL + "ret_flickr_eval.yaml (COCO-finetuned model, 364 px, k_test 128)"}),
    Protocol(
        "coco-retrieval", "COCO Karpathy test image-text retrieval, 5k and 1k (5 folds)", "retrieval",
        "karpathy-retrieval", "dataset_coco.json", "test", 364, {},
        metric="R@1/5/10 both directions: 5k; `folds_of_1000`: the mean over 5 folds of 1000 images", fold_size=1000,
        published=tuple(Published("BLIP-2 ViT-G (fine-tuned)", m, v, _PWC) for m, v in (
            ("i2t_r1", 85.4), ("i2t_r5", 97.0), ("i2t_r10", 98.5), ("t2i_r1", 68.3), ("t2i_r5", 87.7),
            ("t2i_r10", 92.6))),
        sources={"settings": _EVAL + "ret_coco_eval.yaml (364 px, k_test 128)",
                 "1k": "the 5k test images in file order, 5 folds of 1000 with their captions; each fold is its own "
                       "gallery (ITC, ITM re-ranking of its own top 128) and the recalls are averaged over folds"}),
]}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def table() -> str:
    """`blip2 eval --list`: one markdown row per benchmark."""
    refs = list(dict.fromkeys(x.source for p in PROTOCOLS.values() for x in p.published))
    rows = ["| benchmark | files (--data) | prompt | image | generation | metric | published |",
            "|---|---|---|---|---|---|---|"]
    for p in PROTOCOLS.values():
        prompts = "; ".join(f"{a}: `{t}`" for a, t in p.prompts.items()) or "-"
        gens = "; ".join(f"{k}: {g['num_beams']} beams, {g['min_new_tokens']}-{g['max_new_tokens']} new, "
                         f"lp {g['length_penalty']:g}, rp {g['repetition_penalty']:g}" for k, g in p.generation.items())
        pub = "; ".join(f"{x.value:g} {x.metric} ({x.checkpoint}) [{refs.index(x.source) + 1}]"
                        for x in p.published) or "unknown (no source read)"
        rows.append(f"| {p.name} | `{p.data}` | {prompts} | {p.image_size} | {gens or '-'} | {p.metric} | {pub} |")
    return "\n".join(rows + ["", "Sources of the published numbers:", ""]
                     + [f"{i}. {src}" for i, src in enumerate(refs, 1)])
