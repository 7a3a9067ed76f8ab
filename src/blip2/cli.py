"""The `blip2` command line. One entry point; each subcommand is a small typed function whose help text is
its docstring.

The parser is built from torch-free modules (`options`, `prompts`, `protocols`), so `blip2 --help` and a
mistyped command answer at once; each handler imports the code it runs (torch, transformers, the model) when it
runs. These are the module's function-level imports, each marked "deferred: ...".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import protocols
from .options import POLICIES, SCHEMES
from .prompts import VQA_TEMPLATE


# every command that takes a model reads it through blip2.checkpoint.find_checkpoint (in blip2.load / describe)
MODEL_HELP = "a transformers-format checkpoint directory or a `blip2 train` run directory (its model/ is read)"


def _gen_kwargs(a) -> dict:
    """The generation options given on the command line; the model's `generation_defaults` fill the rest."""
    kw = {k: v for k, v in (("max_new_tokens", a.max_new_tokens), ("num_beams", a.num_beams),
                            ("min_new_tokens", a.min_new_tokens)) if v is not None}
    if a.sample:
        kw.update(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)
    if a.repetition_penalty is not None:
        kw["repetition_penalty"] = a.repetition_penalty
    if a.length_penalty is not None:
        kw["length_penalty"] = a.length_penalty
    return kw


def load_options(a) -> dict:
    """blip2.load's keyword arguments from the options `add_load_options` adds (every command that loads a model)."""
    import torch  # deferred: the parser is built without torch (module docstring)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    return {"dtype": dtype, "device": a.device, "quantize": a.quantize, "adapter": a.adapter, "precision": a.precision}


def _load(a):
    import torch  # deferred: the parser is built without torch (module docstring)

    from .api import load  # deferred: torch and transformers

    if a.seed is not None:
        torch.manual_seed(a.seed)
    return load(a.model, **load_options(a))


def _emit(a, rows: list[dict], key: str) -> None:
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['image']}: {r[key]}" if len(rows) > 1 else r[key])


def _bulk(a, task: str, question: str | None = None) -> None:
    """`--input` given: label the whole dataset (blip2.bulk.run); under torchrun each process takes its share."""
    from .bulk.run import BulkJob, format_summary, label_dataset  # deferred: torch (module docstring)
    from .evaluation import distributed_session  # deferred: torch

    with distributed_session(a.device) as a.device:
        model = _load(a)
        workers = a.workers
        if workers is None:  # on a CPU the decoders share the model's cores: one keeps up (benchmarks/bulk.py)
            workers = 1 if model.device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))
        job = BulkJob(task=task, input=a.input, output=a.output, sidecar=a.sidecar, overwrite=a.overwrite,
                      batch_size=a.batch_size, workers=workers, chunk_size=a.chunk_size,
                      prompt=getattr(a, "prompt", None), question=question,
                      question_column=getattr(a, "question_column", None), template=getattr(a, "template", None),
                      image_column=a.image_column, key_column=a.key_column, generation=_gen_kwargs(a),
                      model_name=str(a.model), progress=not a.no_progress)
        summary = label_dataset(model, job)
    # one write per process: under torchrun the processes share stdout, and a line written in two pieces can
    # interleave with another process's line
    sys.stdout.write((json.dumps(summary) if a.json else format_summary(summary)) + "\n")
    sys.stdout.flush()


def _no_positionals(a, names: tuple[str, ...], flag: str) -> None:
    given = [n for n in names if getattr(a, n, None)]
    if a.input is not None and given:
        raise ValueError(f"--input labels a dataset: give the {flag} as an option, not as the {given[0]} argument")
    if a.input is None and len(given) != len(names):
        raise ValueError(f"give {' and '.join(n.upper() for n in names)}, or --input to label a dataset")


def cmd_caption(a) -> None:
    """Caption one or more images, or (with --input) a whole dataset."""
    if a.input is not None:
        if a.images:
            raise ValueError("give IMAGE arguments or --input, not both")
        return _bulk(a, "caption")
    if not a.images:
        raise ValueError("give one or more IMAGE arguments, or --input to label a dataset")
    model = _load(a)
    out = model.caption([str(p) for p in a.images], prompt=a.prompt, **_gen_kwargs(a))
    _emit(a, [{"image": str(p), "caption": c} for p, c in zip(a.images, out)], "caption")


def cmd_ask(a) -> None:
    """Answer a question about an image (prompt "Question: {} Short answer:" unless --template is given), or
    (with --input) about every image of a dataset."""
    _no_positionals(a, ("image", "question"), "question (--question) or --question-column")
    if a.input is not None:
        return _bulk(a, "ask", a.question_text)
    model = _load(a)
    kw = {"template": a.template} if a.template else {}
    out = model.answer([str(a.image)], [a.question], **kw, **_gen_kwargs(a))
    _emit(a, [{"image": str(a.image), "question": a.question, "answer": out[0]}], "answer")


def cmd_instruct(a) -> None:
    """Follow a free-form instruction about an image (InstructBLIP checkpoints), or (with --input) about every
    image of a dataset."""
    _no_positionals(a, ("image", "text"), "instruction (--question) or --question-column")
    if a.input is not None:
        return _bulk(a, "instruct", a.question_text)
    model = _load(a)
    out = model.instruct([str(a.image)], [a.text], **_gen_kwargs(a))
    _emit(a, [{"image": str(a.image), "instruction": a.text, "response": out[0]}], "response")


def cmd_info(a) -> None:
    """Describe a checkpoint: architecture, parameters per part, dtype."""
    from .info import describe  # deferred: torch (module docstring)

    info = describe(a.model)
    if a.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{a.model}: {info['architecture']} ({info['dtype']})")
    for part, n in info["parameters"].items():
        print(f"  {part:<22} {n:>15,d}")
    for k, v in info["details"].items():
        print(f"  {k}: {v}")


def cmd_demo(a) -> None:
    """Build a tiny random BLIP-2 (OPT) with a small tokenizer, save it in the transformers format, load it back,
    caption two photos that ship with scikit-image, and check the ids against transformers' own generate."""
    from .demo import run_demo  # deferred: torch (module docstring)

    run_demo(Path(a.output))


def cmd_train(a) -> None:
    """Train stage 1, stage 2 or InstructBLIP from a YAML run config; key=value pairs override it
    (e.g. `max_steps=20 optim.lr=3e-4 resume=true`). Works in one process and under torchrun."""
    from .train.config import load_run_config  # deferred: the training code imports torch (module docstring)
    from .train.loop import train

    cfg = load_run_config(a.config, a.overrides)
    summary = train(cfg)
    print(json.dumps(summary))


def cmd_cache_features(a) -> None:
    """Run the frozen image encoder once over the training images of a run config and store its outputs
    (sharded safetensors) in data.feature_cache (default OUTPUT/feature_cache); key=value pairs override the
    config. Training with data.feature_cache set and data.augment=false then reads them instead of images."""
    from .train.cache_features import cache_features  # deferred: torch (module docstring)
    from .train.config import load_run_config

    cfg = load_run_config(a.config, a.overrides)
    print(cache_features(cfg))


def cmd_eval(a) -> None:
    """Evaluate a checkpoint on a benchmark: captioning (BLEU, METEOR, ROUGE-L, CIDEr), VQA (VQAv2 accuracy / exact
    match), image-text retrieval (recall@K) or multiple choice (likelihood ranking). Batched; under torchrun the
    items are split across processes. Writes predictions.json, metrics.json and metrics.md to --output."""
    from .benchmark import run_benchmark  # deferred: torch (module docstring)
    from .evaluation import distributed_session, evaluate, markdown_report

    if a.list:
        print(protocols.table())
        return
    if (a.task is None) == (a.benchmark is None) or a.model is None or not a.data:
        raise ValueError("blip2 eval needs --model, --data and one of --task / --benchmark (or --list)")
    gen = {k: v for k, v in (("num_beams", a.num_beams), ("max_new_tokens", a.max_new_tokens),
                             ("min_new_tokens", a.min_new_tokens), ("length_penalty", a.length_penalty),
                             ("repetition_penalty", a.repetition_penalty),
                             ("repetition_context", a.repetition_context)) if v is not None}
    with distributed_session(a.device) as a.device:
        model = _load(a)
        if a.benchmark is not None:
            report = run_benchmark(a.benchmark, model, a.data, a.images, output=a.output or f"runs/eval/{a.benchmark}",
                                   batch_size=a.batch_size, generation=gen, limit=a.limit,
                                   progress=not a.no_progress, model_name=str(a.model), fold_size=a.fold_size)
        else:
            report = evaluate(a.task, model, a.data, a.images, output=a.output or f"runs/eval/{a.task}",
                              batch_size=a.batch_size, generation=gen, prompt=a.prompt, template=a.template,
                              k=a.k, reduce=a.reduce, normalize_answers=a.normalize_answers,
                              clean_questions=not a.keep_questions, limit=a.limit,
                              progress=not a.no_progress, model_name=str(a.model))
    if report is not None:  # process 0
        print(json.dumps(report, indent=2) if a.json else markdown_report(report), end="\n" if a.json else "")


def cmd_quickstart(a) -> None:
    """Train BLIP-2 and InstructBLIP end to end on a generated world of coloured shapes, on a CPU, with real
    pretrained parts (all-MiniLM-L6-v2 for the Q-Former, SmolLM2-135M-Instruct as the frozen LLM): stage 0 (the
    image encoder), stage 1, stage 2, instruction tuning, evaluation and linear probes (with --ablations, also the
    two ablations); writes report.md / report.json and pictures to --output. Rerunning skips finished steps and
    resumes an interrupted one."""
    from .quickstart.run import run_quickstart  # deferred: torch (module docstring)

    run_quickstart(a.output, smoke=a.smoke, configs=a.configs, progress=not a.no_progress, ablations=a.ablations,
                   seed=a.seed)


def cmd_serve(a) -> None:
    """Serve a checkpoint over HTTP: OpenAI-style /v1/chat/completions (streaming), /v1/caption, /v1/itm,
    /health, /v1/models and a web page at / (needs the `serve` extra: fastapi, uvicorn)."""
    try:  # deferred: only to say clearly that the optional `serve` extra is missing
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"blip2 serve needs fastapi and uvicorn (pip install 'blip2[serve]'): {e}") from None
    from .serve.app import serve  # deferred: torch (module docstring)
    from .serve.engine import ServeSettings

    settings = ServeSettings(
        model_name=a.name or Path(a.model).name, max_batch_rows=a.max_batch_size, max_wait_ms=a.max_wait_ms,
        max_pending=a.max_pending, max_body_bytes=a.max_body_mb * 2**20, max_image_pixels=a.max_image_pixels,
        max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens, image_root=a.image_root,
        template=a.template, engine=a.engine, prefill_chunk=a.prefill_chunk, visual_cache_mb=a.visual_cache_mb,
        max_queue=a.max_queue, api_key=a.api_key or os.environ.get("BLIP2_API_KEY") or None,
        cors_origins=tuple(a.cors_origin))
    serve(a.model, a.host, a.port, settings, log_level=a.log_level, **load_options(a))


def _add_generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation", "unset options take the original implementation's defaults for the "
                             "model's architecture (Blip2Model.generation_defaults; e.g. InstructBLIP: 5 beams, up "
                             "to 256 new tokens, repetition penalty 1.5; answers: up to 10 tokens)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--min-new-tokens", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--sample", action="store_true", help="sample instead of beam search / greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--length-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)


def add_load_options(p: argparse.ArgumentParser) -> None:
    """--dtype, --precision, --device, --quantize, --adapter: how a command loads its model (`load_options`)."""
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--precision", choices=list(POLICIES), default="auto",
                   help="how --dtype fp16 / bf16 is applied: auto = the original's per-module policy on CUDA (ViT "
                        "fp16 with fp32 LayerNorms; Q-Former, queries, projection fp32; LLM in --dtype), a plain "
                        "cast elsewhere; original = the policy on any device; cast = every weight in --dtype")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--quantize", choices=list(SCHEMES), default=None,
                   help="quantise the LLM's linear layers while loading: int8 / int8-dynamic (CPU), "
                        "bnb-int8 / bnb-nf4 (CUDA), int8-weight-only / int4 (torchao)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (a run's adapter/) merged at load")


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=MODEL_HELP)
    add_load_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_labelling(p: argparse.ArgumentParser, questions: bool) -> None:
    """caption / ask / instruct: the model, the generation settings and the bulk-labelling options."""
    _add_model(p)
    _add_generation(p)
    _add_bulk(p, questions=questions)


def _add_bulk(p: argparse.ArgumentParser, questions: bool) -> None:
    g = p.add_argument_group("datasets (--input: label every image; see README, Label a dataset)")
    g.add_argument("--input", default=None,
                   help="a folder (recursive), a .txt list of paths, a .jsonl list of records, webdataset shards "
                        "('dir/{00000..00099}.tar'), .parquet files or a saved Hugging Face datasets folder")
    g.add_argument("--output", type=Path, default=None, help="OUT.jsonl or OUT.parquet (with OUT.failed.jsonl and "
                   "OUT.meta.json); an unfinished run is resumed by the same command")
    g.add_argument("--sidecar", action="store_true", help="write IMAGE.txt next to each image instead")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT, or existing sidecar .txt files (which are otherwise kept)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers decoding images (default: 1 for a CPU model, else up to 4)")
    g.add_argument("--chunk-size", type=int, default=256, help="images per part file (the unit of resumption)")
    g.add_argument("--image-column", default=None, help="table / JSONL column with the image (bytes or path)")
    g.add_argument("--key-column", default=None, help="table / JSONL column with each image's key")
    if questions:
        g.add_argument("--question", dest="question_text", default=None, help="one text for every image")
        g.add_argument("--question-column", default=None,
                       help="column / JSONL field (shards: KEY.<name> member or .json field) with each image's text")
    g.add_argument("--no-progress", action="store_true")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    """`blip2 eval`: a generic task or a benchmark protocol, and the generation settings."""
    p.add_argument("--task", default=None, choices=["caption", "vqa", "retrieval", "choice"],
                   help="a generic task on custom data")
    p.add_argument("--benchmark", default=None, choices=list(protocols.PROTOCOLS),
                   help="a paper benchmark under its protocol (--list shows them; --data takes its official files "
                        "in the order listed there)")
    p.add_argument("--list", action="store_true", help="print the benchmark protocols and exit")
    p.add_argument("--data", default=None, nargs="+", type=Path,
                   help="annotation file; for VQAv2 the questions file and the annotations file")
    p.add_argument("--images", type=Path, default=None, help="image root (default: the annotation file's folder)")
    p.add_argument("--output", type=Path, default=None, help="result folder (default runs/eval/TASK)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N entries")
    p.add_argument("--prompt", default=None, help='caption: text the caption continues, e.g. "a photo of"')
    p.add_argument("--template", default=None, help='vqa / choice: question template (default '
                                                      f'"{VQA_TEMPLATE}")')
    p.add_argument("--k", type=int, default=128, help="retrieval: candidates per row re-ranked with ITM")
    p.add_argument("--fold-size", type=int, default=None,
                   help="retrieval benchmarks: images per fold of the fold-averaged breakdown (default: the "
                        "protocol's, coco-retrieval 1000 = COCO 1k; 0: none, half the work)")
    p.add_argument("--reduce", choices=["mean", "sum"], default="sum",
                   help="choice: rank by the sum (the original's) or the mean of the choice's token log-probabilities")
    p.add_argument("--keep-questions", action="store_true",
                   help="vqa: ask the questions as written (default: cleaned as the original's eval and our VQA "
                        "training data: lower case, . ! \" ( ) * # : ; ~ removed)")
    p.add_argument("--normalize-answers", action="store_true",
                   help="vqa: normalise ground-truth answers fully (raw answers), not only as the official tool does")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    _add_model(p, required=False)  # not for --list
    g = p.add_argument_group("generation (caption / vqa; defaults per task: LAVIS lavis/projects/blip2/eval/*.yaml; "
                             "per benchmark: its protocol)")
    for flag, kind in (("--num-beams", int), ("--max-new-tokens", int), ("--min-new-tokens", int),
                       ("--length-penalty", float), ("--repetition-penalty", float)):
        g.add_argument(flag, type=kind, default=None)
    g.add_argument("--repetition-context", choices=["generated", "prompt+generated"], default=None,
                   help="tokens the repetition penalty sees: the original's (generated) or transformers' (with prompt)")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    """`blip2 serve`: the model, the HTTP server, the limits and the engine."""
    p.add_argument("--model", required=True, help=MODEL_HELP + " (with tokenizer files)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model id reported by the API (default: the directory name)")
    add_load_options(p)
    p.add_argument("--max-batch-size", type=int, default=8, help="rows per batch; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for a batch to fill")
    p.add_argument("--max-pending", type=int, default=64, help="queued + running requests; more get 503")
    p.add_argument("--max-body-mb", type=int, default=20)
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256, help="the most new tokens a request may ask for")
    p.add_argument("--image-root", default=None, help="allow local image paths, only under this folder")
    p.add_argument("--template", default=None, help=f'BLIP-2 chat prompt template, default "{VQA_TEMPLATE}"')
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--engine", choices=["continuous", "batch"], default="continuous",
                   help="continuous: step-level batching (requests join and leave every decode step); "
                        "batch: batch-at-once (a batch runs to its end)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="continuous: prompt tokens prefilled per step")
    p.add_argument("--visual-cache-mb", type=float, default=256.0,
                   help="continuous: LRU of visual prompts per image (repeated images skip the encoder); 0: off")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting to start; more get 429")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set BLIP2_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow this origin by CORS (repeatable; default: CORS off)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blip2", description="BLIP-2 and InstructBLIP: caption, answer, instruct.")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn):
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=fn.__doc__)
        p.set_defaults(func=fn)
        return p

    p = add("caption", cmd_caption)
    p.add_argument("images", nargs="*", type=Path)
    p.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photo of"')
    _add_labelling(p, questions=False)
    p = add("ask", cmd_ask)
    p.add_argument("image", type=Path, nargs="?")
    p.add_argument("question", nargs="?")
    p.add_argument("--template", default=None, help='prompt template with {} for the question')
    _add_labelling(p, questions=True)
    p = add("instruct", cmd_instruct)
    p.add_argument("image", type=Path, nargs="?")
    p.add_argument("text", nargs="?")
    _add_labelling(p, questions=True)
    p = add("info", cmd_info)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p = add("train", cmd_train)
    p.add_argument("config", help="run config (YAML), e.g. src/blip2/configs/tiny/stage1.yaml of a checkout")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys")
    p = add("cache-features", cmd_cache_features)
    p.add_argument("config", help="run config (YAML) whose training images are encoded")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys")
    _eval_arguments(add("eval", cmd_eval))
    _serve_arguments(add("serve", cmd_serve))
    p = add("quickstart", cmd_quickstart)
    p.add_argument("--smoke", action="store_true", help="the same pipeline at toy size (a few minutes)")
    p.add_argument("--output", default=None, help="run directory (default runs/quickstart, or runs/quickstart-smoke; "
                   "with --seed N != 0, -seedN appended)")
    p.add_argument("--configs", default=None,
                   help="directory of the step configs (default: blip2/configs/quickstart, shipped with the package)")
    p.add_argument("--ablations", action="store_true",
                   help="also train and evaluate the two ablations (reuses the finished main steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of every training step (the world stays the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = add("demo", cmd_demo)
    p.add_argument("--output", default="runs/demo", help="where the tiny checkpoint is written")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        # known failure modes (bad checkpoint, bad image, bad config) end with one clear line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"blip2 {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
