"""Evaluation metrics (the protocols of the BLIP-2 paper §4, listed in docs/architecture.md §2), one section per
task; every function takes plain tensors / arrays / lists and returns a dict of named numbers, so the evaluation
scripts only collect predictions and call these.

- Retrieval: `recall_at_k` (image->text and text->image R@K, the COCO / Flickr30k protocol as LAVIS reports it).
- Captioning: `caption_scores` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D with the COCO caption toolkit, which needs
  `pycocoevalcap` and Java; `find_java` says where Java is or why it is missing).
- VQA: `normalize_vqa_answer`, `vqa_accuracy` (VQAv2, leave-one-out over the humans), `exact_match` (GQA) and
  `vqa_scores` (a whole set, with the per question type / answer type breakdown).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch


# -------------------------------------------------------------------------------------------------- retrieval
def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D score matrix, got shape {list(t.shape)}")
    return t.detach().float().cpu()


def _ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of each row's best-scored ground-truth column: the number of NON-ground-truth columns that
    score at least as high. Ties are broken against the ground truth (pessimistic), so a -inf ground truth outside
    the re-ranked top k never counts as a hit even when fewer than K entries are finite.

    scores [R, C] float, gt [R, C] bool -> [R] long."""
    best = torch.where(gt, scores, torch.tensor(-torch.inf)).amax(dim=1, keepdim=True)  # (R, 1)
    return ((scores >= best) & ~gt).sum(dim=1)


def recall_at_k(i2t, t2i, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent for image->text and text->image retrieval.

    i2t [N_img, N_txt] and t2i [N_txt, N_img]: score matrices (torch or numpy; higher = better; -inf allowed).
    img2txt[i]: the caption indices of image i (several per image: a hit at K if ANY of them is in the top K).
    txt2img[j]: the image of caption j (a hit at K if it is in the top K).
    Returns {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_mean", "t2i_r1", ..., "t2i_mean", "mean"} for ks=(1, 5, 10);
    `mean` averages the 2*len(ks) recalls.
    """
    i2t, t2i = _as_tensor(i2t, "i2t"), _as_tensor(t2i, "t2i")
    n_img, n_txt = i2t.shape
    if t2i.shape != (n_txt, n_img):
        raise ValueError(f"t2i must be [N_txt, N_img] = {[n_txt, n_img]} (the shape of i2t transposed), "
                         f"got {list(t2i.shape)}")
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries but i2t has {n_img} image rows")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries but t2i has {n_txt} caption rows")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")

    gt_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool)  # (N_img, N_txt): caption j belongs to image i
    for i, caps in enumerate(img2txt):
        caps = list(caps)
        if not caps:
            raise ValueError(f"image {i} has no captions in img2txt; every image needs at least one")
        if min(caps) < 0 or max(caps) >= n_txt:
            raise ValueError(f"img2txt[{i}] = {caps} has caption indices outside [0, {n_txt})")
        gt_i2t[i, caps] = True
    img_of = torch.as_tensor(np.asarray(txt2img, dtype=np.int64))  # (N_txt,)
    if img_of.numel() and (img_of.min() < 0 or img_of.max() >= n_img):
        raise ValueError(f"txt2img has image indices outside [0, {n_img})")
    gt_t2i = torch.zeros(n_txt, n_img, dtype=torch.bool)
    gt_t2i[torch.arange(n_txt), img_of] = True

    out: dict[str, float] = {}
    for name, scores, gt in (("i2t", i2t, gt_i2t), ("t2i", t2i, gt_t2i)):
        ranks = _ranks(scores, gt)
        recalls = [100.0 * (ranks < int(k)).float().mean().item() for k in ks]
        out.update({f"{name}_r{int(k)}": r for k, r in zip(ks, recalls)})
        out[f"{name}_mean"] = sum(recalls) / len(recalls)
    out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2  # equal counts per direction: the mean of all recalls
    return out


# ------------------------------------------------------------------------------------------------- captioning
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_NOTE = ("SPICE is not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP models on first use, "
              "which cannot work offline")


def find_java() -> str:
    """Path of the `java` executable: PATH first, then $JAVA_HOME/bin. The COCO caption toolkit's PTB tokenizer
    and METEOR are Java programs; without Java this raises a RuntimeError that says how to install it."""
    java = shutil.which("java")
    home = os.environ.get("JAVA_HOME")
    if java is None and home and os.access(Path(home) / "bin" / "java", os.X_OK):
        java = str(Path(home) / "bin" / "java")
    if java is None:
        raise RuntimeError("caption metrics need Java (the COCO caption toolkit's PTB tokenizer and METEOR are Java "
                           "programs), but there is no `java` on PATH or in $JAVA_HOME/bin; install a Java runtime, "
                           "e.g. `apt-get install -y default-jre-headless`")
    return java


@contextlib.contextmanager
def _java_on_path(java: str):
    """pycocoevalcap runs the bare command `java`: put the one found first on PATH while it runs."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(java).parent), old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _coco_toolkit():
    try:  # deferred: the COCO caption toolkit is optional (scripts/setup.sh installs it with --no-deps)
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError(f"caption metrics need the COCO caption toolkit: pip install pycocoevalcap ({e})") from None
    return PTBTokenizer, Bleu, Meteor, Rouge, Cider


def _one_line(text: str) -> str:
    # The PTB tokenizer reads one caption per line, and Java also ends lines at \r, \u2028, \x85...: a caption
    # holding one would silently shift every later caption onto the wrong image. Tokens are whitespace-separated
    # anyway, so collapsing whitespace changes no score.
    return " ".join(text.split())


def _stop_meteor(meteor) -> None:
    """End METEOR's Java process now rather than whenever the scorer object is garbage collected."""
    p = meteor.meteor_p
    with contextlib.suppress(OSError):
        p.stdin.close()
    p.kill()
    p.wait()


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   meteor: bool = True) -> dict[str, float | None]:
    """COCO caption metrics of one predicted caption per id against that id's reference captions.

    Computed by the COCO caption toolkit's own scorers (pycocoevalcap), called one by one as its `COCOEvalCap`
    calls them: PTB tokenisation (lower case, punctuation removed) of references and predictions, then BLEU
    (closest reference length), METEOR 1.5, ROUGE-L and CIDEr-D (whose IDF comes from these references, as the
    toolkit computes it).
    SPICE is never run (it downloads models): it is reported as None, see SPICE_NOTE.

    Returns {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE": None} on the
    toolkit's scale (fractions; CIDEr is often above 1; papers print all of them x100).
    Needs Java (see find_java); METEOR's start-up (loading its paraphrase table) takes several seconds:
    meteor=False skips it (METEOR is then None).
    """
    if not predictions:
        raise ValueError("caption_scores: no predictions")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"caption_scores: {len(missing)} predicted ids have no references, e.g. {missing[:5]}")
    gts, res = {}, {}
    for key, pred in predictions.items():
        refs = references[key]
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"caption_scores: id {key!r} has an empty reference list")
        if not isinstance(pred, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"caption_scores: id {key!r}: captions must be strings, got {pred!r} / {refs!r:.80}")
        gts[key] = [{"caption": _one_line(r)} for r in refs]
        res[key] = [{"caption": _one_line(pred)}]

    PTBTokenizer, Bleu, Meteor, Rouge, Cider = _coco_toolkit()
    with _java_on_path(find_java()):
        meteor = Meteor() if meteor else None  # starts Java now: its start-up overlaps the other scorers
        meteor_score = None
        try:
            tokenizer = PTBTokenizer()
            gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
            bad = [k for k in gts if len(gts_tok.get(k, ())) != len(gts[k]) or len(res_tok.get(k, ())) != 1]
            if bad:
                raise RuntimeError(f"the PTB tokenizer's output does not line up with the captions (ids {bad[:5]})")
            bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
            rouge, _ = Rouge().compute_score(gts_tok, res_tok)
            cider, _ = Cider().compute_score(gts_tok, res_tok)
            try:
                if meteor is not None:
                    meteor_score, _ = meteor.compute_score(gts_tok, res_tok)
            except (ValueError, OSError) as e:  # Java died: its replies are empty lines or the pipe is closed
                meteor.meteor_p.kill()
                err = meteor.meteor_p.stderr.read().decode(errors="replace").strip()
                raise RuntimeError(f"METEOR (Java) failed: {err[-500:] or e}") from None
        finally:
            if meteor is not None:
                _stop_meteor(meteor)
    out: dict[str, float | None] = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    out.update({"METEOR": None if meteor_score is None else float(meteor_score), "ROUGE-L": float(rouge), "CIDEr": float(cider), "SPICE": None})
    return out


# -------------------------------------------------------------------------------------------------------- VQA
# The official VQAv2 answer normalisation (the VQA evaluation tool, as LAVIS uses it), rule for rule.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]  # not "." (handled by _PERIOD), not "'" (contractions keep it), not ":"
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a mistyped lookbehind that never applies, so every period not
# followed by a digit goes ("5." -> "5", "2.5" stays). It is also called with re.UNICODE (32) in the `count`
# position, so at most 32 periods are removed; both quirks are kept so that scores are identical.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32
# The official contraction table maps each form written without one of its apostrophes to the full form
# ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've"). These are its full forms; its entries
# that can never fire (capitalised keys such as "Im", identities such as "let's") are left out.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for full in _CONTRACTED:
        for i, ch in enumerate(full):
            if ch == "'":
                table[full[:i] + full[i + 1:]] = full
    table["somebody'd"] = "somebodyd"  # the official table has this one entry backwards; kept for identical scores
    return table


_CONTRACTIONS = _contraction_table()


def _vqa_punctuation(text: str) -> str:
    """The official `processPunctuation`: a mark touching a space (or any mark, when the text holds a number
    with a thousands comma such as "3,000") is deleted; other marks become a space ("t-shirt" -> "t shirt")."""
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:  # tested on the input text, as the official code does
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """The official `processDigitArticle`: lower case, number words to digits, articles dropped, contractions
    restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """A predicted answer as the VQAv2 evaluation compares it: "Two." -> "2", "3,000" -> "3000",
    "T-shirt" -> "t shirt", "the dog" -> "dog", "dont" -> "don't"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def _as_answers(answers, where: str) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: answers must be a non-empty list of strings, got {answers!r:.80}")
    return answers


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize_answers: bool = False) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers (10 in VQAv2): for each of the len(answers)
    subsets that leave one human out, min(1, humans in the subset who gave the prediction / 3); averaged.
    With 10 humans of whom k agree with the prediction that is 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4+.

    The prediction is normalised (normalize_vqa_answer). The human answers are used as the official tool uses the
    (already normalised) VQAv2 annotations: only punctuation is processed, and only when they are not all equal.
    normalize_answers=True normalises them fully instead (for raw answers such as "Two").
    """
    answers = _as_answers(answers, "vqa_accuracy")
    pred = normalize_vqa_answer(prediction)
    if normalize_answers:
        humans = [normalize_vqa_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        humans = [_vqa_punctuation(a) for a in answers]
    else:
        humans = list(answers)
    per_subset = []
    for left_out in range(len(humans)):
        matches = sum(h == pred for i, h in enumerate(humans) if i != left_out)
        per_subset.append(min(1.0, matches / 3))
    return sum(per_subset) / len(per_subset)


def exact_match(prediction: str, answer: str, normalize_answers: bool = False) -> float:
    """GQA-style accuracy of one answer: 1.0 when the normalised prediction equals the answer, else 0.0 (LAVIS
    normalises the prediction only; normalize_answers=True normalises the answer too)."""
    if normalize_answers:
        answer = normalize_vqa_answer(answer)
    return float(normalize_vqa_answer(prediction) == answer)


def vqa_item_score(prediction: str, answers: Sequence[str] | str, normalize_answers: bool = False) -> float:
    """One question's score in [0, 1]: vqa_accuracy with several human answers, exact_match with one (a string or
    a one-item list: GQA; leave-one-out over a single human would always give 0)."""
    answers = _as_answers(answers, "vqa_item_score")
    if len(answers) == 1:
        return exact_match(prediction, answers[0], normalize_answers)
    return vqa_accuracy(prediction, answers, normalize_answers)


def vqa_scores(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str] | str],
               question_types: Mapping[Hashable, str] | None = None,
               answer_types: Mapping[Hashable, str] | None = None, normalize_answers: bool = False) -> dict:
    """Accuracy of a set of answers, in percent, each question scored by vqa_item_score.

    Returns {"accuracy", "count", "scored_by": {"vqa_accuracy": n, "exact_match": n},
    "per_question_type": {type: accuracy}, "per_answer_type": {type: accuracy} (each only when some types are
    given), "per_item": {id: score in [0, 1]}}.
    """
    if not predictions:
        raise ValueError("vqa_scores: no predictions")
    per_item: dict[Hashable, float] = {}
    counts = {"vqa_accuracy": 0, "exact_match": 0}
    for key, pred in predictions.items():
        if key not in answers:
            raise ValueError(f"vqa_scores: question {key!r} has no answers")
        gt = _as_answers(answers[key], f"vqa_scores: question {key!r}")
        per_item[key] = vqa_item_score(pred, gt, normalize_answers)
        counts["exact_match" if len(gt) == 1 else "vqa_accuracy"] += 1

    def mean_pct(keys) -> float:
        keys = list(keys)
        return 100.0 * sum(per_item[k] for k in keys) / len(keys)

    out: dict = {"accuracy": mean_pct(per_item), "count": len(per_item), "scored_by": counts}
    for name, types in (("per_question_type", question_types), ("per_answer_type", answer_types)):
        groups: dict[str, list] = {}
        for k in per_item:
            if types and types.get(k) is not None:
                groups.setdefault(types[k], []).append(k)
        if groups:
            out[name] = {t: mean_pct(ks) for t, ks in sorted(groups.items())}
    out["per_item"] = per_item
    return out
