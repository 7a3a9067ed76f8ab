"""Run configs: YAML files validated into dataclasses, `key=value` overrides, the resolved config saved.

An unknown or ill-typed key is an error that names the key (dotted) and the allowed keys. The configs that ship
with the package (tiny/, quickstart/, the paper-scale ones) are package data: `shipped_configs()`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("stage0", "stage1", "stage2", "instruct")


class RunConfigError(ValueError):
    pass


def shipped_configs() -> Path:
    """The directory of the run configs inside the installed package (blip2/configs), found through
    importlib.resources: the same in a source checkout and in an installed wheel."""
    root = importlib.resources.files("blip2").joinpath("configs")
    path = Path(str(root))
    if not path.is_dir():  # e.g. a zipped install: no directory to hand to the file-based code
        raise RunConfigError(f"the package's run configs are not a directory on disk ({root}); pass a config path")
    return path


@dataclass
class ModelSection:
    """Which model to train. One of: `preset` (random weights, e.g. "tiny-opt"), `init` (a checkpoint directory,
    a LAVIS .pth with `config`, or a run's exported model), for stage 1 `bert` (the Q-Former from a BERT
    checkpoint) with `vision`, or for stages 2 / instruct `llm_path` with `vision` and `qformer` (the
    architecture assembled from parts; the LLM's config, weights and tokenizer come from that directory).
    Stage 0 trains the `vision` encoder against the frozen sentence encoder at `bert`.
    `llm_path` also loads pretrained LLM weights into a preset's LLM; `tokenizer` / `qformer_tokenizer` are
    tokenizer directories. `tiny_tokenizers: true` trains small tokenizers on the fly (for the tiny configs that
    need no files). `qformer_init` (a directory or a list, copied in order) starts from earlier stages' weights.
    `architecture` picks blip2 or instructblip where the parts are assembled (instruct with blip2 = the
    instruction reaches the LLM only, InstructBLIP's ablation)."""

    preset: str | None = None
    init: str | None = None
    config: str | None = None  # architecture for a LAVIS .pth init
    bert: str | None = None
    vision: dict = field(default_factory=dict)  # VisionConfig fields
    qformer: dict = field(default_factory=dict)  # QFormerConfig fields
    llm: dict = field(default_factory=dict)  # LLM hf_config fields (merged into the preset's)
    llm_path: str | None = None
    vit_path: str | None = None  # frozen encoder weights (eva_vit_g.pth style)
    qformer_init: Any = None  # earlier results (a dir or a list): Q-Former, queries, ln_vision, ViT, projection copied
    architecture: str | None = None  # blip2 | instructblip, for a model assembled from parts (default by stage)
    llm_prefix: str | None = None  # text whose tokens go in front of the visual prompt (Blip2Config.llm_prefix_ids)
    tokenizer: str | None = None
    qformer_tokenizer: str | None = None
    tiny_tokenizers: bool = False
    image_token: bool = True  # add an image placeholder token to the LLM tokenizer (transformers >= 4.47)
    objective: str = "contrastive"  # stage 0: contrastive (against the text tower at `bert`) | tags (Tag2Text)
    text_trainable: bool = False  # stage 0, contrastive: train the text tower too (CLIP-style) instead of locking it
    text_layers: int | None = None  # stage 0, contrastive: keep only the first N layers of the text tower
    tags: list = field(default_factory=list)  # stage 0, tags: the tag phrases (found in captions by their tokens)


@dataclass
class DataSection:
    """Training data: `train` is an annotation file (.json / .jsonl), a list of them, webdataset shards
    ("dir/{000..009}.tar"), or parquet files / a saved Hugging Face `datasets` folder with an image column
    (`image_column`, bytes or paths) and a caption column (`text_column`); `mixture` lists instruction-tuning
    datasets instead."""

    train: Any = None
    image_column: str | None = None  # tables: default the first of image, img, jpg, png, image_path, path, file_name
    text_column: str = "caption"  # tables: the caption column
    image_root: str | None = None
    val: Any = None
    val_image_root: str | None = None
    val_task: str | None = None  # caption | vqa | retrieval (default: retrieval for stage 1, else by `task`)
    val_prompt: str | None = None  # the caption prompt, or the VQA template ("Question: {} Short answer:")
    task: str = "caption"  # caption | vqa: how `train` is read
    mixture: list = field(default_factory=list)  # [{name, path, task, weight?, image_root?}]
    held_out: list = field(default_factory=list)  # dataset names kept out of training (zero-shot evaluation)
    batch_size: int = 8
    num_workers: int = 0
    image_size: int | None = None  # default: the vision tower's
    augment: bool = True
    prompt: str | None = None  # stage 2: text in front of the caption (e.g. "a photo of")
    max_text_len: int = 32
    feature_cache: str | None = None  # a directory written by `blip2 cache-features`


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    lr_scale: dict = field(default_factory=dict)  # {parameter-name prefix: lr multiplier}, e.g. {language_projection: 4}


@dataclass
class LoraSection:
    """LoRA adapters (through peft), on as soon as `r` > 0: `on` lists the parts that get them (llm, qformer,
    vision); `target_modules` empty = each part's defaults (blip2.lora.DEFAULT_TARGETS). On CUDA,
    `quantize: nf4 | int8` keeps the frozen LLM in 4 / 8 bits (bitsandbytes) under the adapters: QLoRA."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=list)
    on: Any = field(default_factory=lambda: ["llm"])  # a list, or one part name
    quantize: str | None = None  # CUDA only: nf4 | int8 (the frozen LLM's weights, bitsandbytes)

    def __post_init__(self):
        if isinstance(self.on, str):
            self.on = [self.on]
        if not isinstance(self.on, list) or not self.on or any(p not in ("llm", "qformer", "vision") for p in self.on):
            raise RunConfigError(f"lora.on: a list of llm, qformer, vision; got {self.on!r}")
        if self.r < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise RunConfigError(f"lora: r >= 0, alpha > 0 and 0 <= dropout < 1; got r={self.r}, "
                                 f"alpha={self.alpha}, dropout={self.dropout}")
        if self.quantize not in (None, "nf4", "int8"):
            raise RunConfigError(f"lora.quantize: nf4 or int8 (QLoRA, CUDA), got {self.quantize!r}")


@dataclass
class RunConfig:
    stage: str = "stage1"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    output_dir: str = "runs/train"
    max_steps: int = 100
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: bool = False
    val_every: int = 0
    val_max_samples: int = 256
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    fsdp: bool = False  # shard the frozen LLM across processes (when it does not fit one device)
    max_bad_steps: int = 10  # NaN/inf losses in a row before giving up
    device: str | None = None  # default: cuda:LOCAL_RANK when available, else cpu
    tensorboard: bool = True
    plots: bool = True

    def __post_init__(self):
        if self.stage not in STAGES:
            raise RunConfigError(f"stage: must be one of {STAGES}, got {self.stage!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise RunConfigError(f"precision: must be auto|fp32|bf16|fp16, got {self.precision!r}")
        for k in ("max_steps", "keep_last"):
            if getattr(self, k) < 1:
                raise RunConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.optim.grad_accum < 1:
            raise RunConfigError("optim.grad_accum: must be >= 1")
        if self.data.batch_size < 1:
            raise RunConfigError("data.batch_size: must be >= 1")
        m = self.model
        if not (m.preset or m.init or m.bert or m.llm_path):
            raise RunConfigError("model: give one of model.preset, model.init, model.bert or model.llm_path")
        if self.stage == "stage0" and not (m.bert and m.vision):
            raise RunConfigError("stage0: give model.vision (the encoder to train) and model.bert (the frozen "
                                 "sentence encoder directory)")
        if self.stage == "stage0" and m.objective not in ("contrastive", "tags"):
            raise RunConfigError(f"model.objective: contrastive or tags, got {m.objective!r}")
        if self.stage == "stage0" and m.objective == "tags" and not all(isinstance(t, str) and t.strip()
                                                                         for t in m.tags or [None]):
            raise RunConfigError("model.tags: objective 'tags' needs a list of non-empty tag phrases")
        if self.stage == "stage0" and self.val_every:
            raise RunConfigError("val_every: stage 0 has no validation; set it to 0")
        if self.data.val_task not in (None, "caption", "vqa", "retrieval"):
            raise RunConfigError(f"data.val_task: caption, vqa or retrieval, got {self.data.val_task!r}")
        if self.lora.r and self.stage in ("stage0", "stage1"):
            raise RunConfigError(f"lora.r: LoRA is for stage2 and instruct (a model with an LLM), not {self.stage}")
        if self.lora.r and self.fsdp:
            raise RunConfigError("lora.r: LoRA adapters and fsdp (a sharded frozen LLM) do not combine; set fsdp=false")
        if self.lora.r and "vision" in self.lora.on and self.data.feature_cache:
            raise RunConfigError("lora.on: vision adapters change the encoder's outputs; unset data.feature_cache")
        if m.architecture not in (None, "blip2", "instructblip"):
            raise RunConfigError(f"model.architecture: blip2 or instructblip, got {m.architecture!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- validation
def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp)


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise RunConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise RunConfigError(f"unknown key {where!r}; allowed keys{' in ' + prefix[:-1] if prefix else ''}: "
                                 f"{sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, where + ".")
            continue
        value = _numeric_string(value, tp)
        if not _type_ok(value, tp):
            raise RunConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[key] = float(value) if tp is float and isinstance(value, int) else value
    try:
        return cls(**kwargs)
    except RunConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{prefix or 'config'}: {e}") from None


def _numeric_string(value, tp):
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it where a float is expected."""
    if isinstance(value, str) and _type_ok(1.5, tp) and not _type_ok(value, tp):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_overrides(items: list[str]) -> dict:
    """["optim.lr=3e-4", "max_steps=10"] -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise RunConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") and value not in ("e", "E") else value
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """`over` laid onto `base`, section by section (nested dicts merge, other values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RunConfigError(f"{p}: no such config file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    data = merge(data, parse_overrides(list(overrides)))
    return _build(RunConfig, data, "")


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
