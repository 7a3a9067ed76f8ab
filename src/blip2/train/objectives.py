"""One small objective per training stage, chosen from `OBJECTIVES` (stage name -> class).

An objective is the stage's loss as a module (so DDP sees a forward: batch -> {"loss", named losses...}) and
the one place that knows what the stage needs; the loop, the data pipeline, the model builder and validation
ask it instead of comparing stage names:

    stage     objective                 model                      loss                         saved at the end
    stage0    ImageEncoderObjective     stage0 aligner / tagger    contrastive or tags          the image encoder
    stage1    RepresentationObjective   blip2-retrieval            ITC + ITM + ITG              the whole model
    stage2    GenerativeObjective       blip2 | instructblip       LM / prefix LM (LLM frozen)  the whole model
    instruct  InstructionObjective      instructblip | blip2       LM on the answer             the whole model

The class attributes are read before the model exists (`build.build_model`, `pipeline.TrainData`); the
methods take the built model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import save_pretrained
from ..convert_lavis import save_lavis
from ..files import atomic_dir
from ..lora import lora_parts, merge_lora, save_adapters
from ..quantize import dequantize_llm
from .config import DataSection, RunConfig, RunConfigError


class Objective(torch.nn.Module):
    """Base: what every stage answers. `model` is the model being trained (its parameters are the objective's
    under the name `model.`, which is what DDP and FSDP see)."""

    collator_kind = "stage1"  # the text layout of a batch (collate.Collator kinds)
    encoder_only = False  # the model is a stage-0 image-encoder trainer, not a Blip2Model
    retrieval = False  # the Q-Former's text side is trained (ITC / ITM / ITG): BERT tokenizer first, [DEC] added
    architectures: tuple[str, ...] = ()  # Blip2Config.architecture values this stage trains (first = default)
    instruction_data = False  # samples carry an instruction (mixture.TaskDataset); data.mixture is allowed
    takes_prompt = False  # data.prompt goes in front of every caption

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def max_text_len(d: DataSection) -> int:
        return d.max_text_len

    @staticmethod
    def data_task(d: DataSection) -> str:
        """How `data.train` annotation files are read (caption | vqa | ...)."""
        return "caption"

    @staticmethod
    def val_task(d: DataSection) -> str:
        """The evaluation task of validation when `data.val_task` is not set."""
        return "vqa" if d.task == "vqa" else "caption"

    @staticmethod
    def encoder_decoder(model) -> bool:
        return bool(model.cfg.is_encoder_decoder)

    def frozen_llm(self) -> torch.nn.Module | None:
        """The frozen LLM that `fsdp` may shard across processes (None: nothing to shard)."""
        return None

    def export(self, cfg: RunConfig, out_dir: Path, full_state: dict | None) -> None:
        """The trained model in the transformers format (`model/`) and the LAVIS layout (`model_lavis.pth`); with
        LoRA, the adapters alone (`adapter/`, PEFT format) first, then merged into the exported model."""
        model = self.model
        if lora_parts(model):
            with atomic_dir(out_dir / "adapter") as tmp:
                save_adapters(model, tmp)
            merge_lora(model)
            if cfg.lora.quantize:  # QLoRA: the 4-bit LLM (adapters merged) written in full precision
                dequantize_llm(model)
        save_pretrained(model, out_dir / "model", state=full_state)  # the transformers format
        save_lavis(model, out_dir / "model_lavis.pth")  # the LAVIS layout (keeps the Q-Former LM head)


class _ImageTextObjective(Objective):
    """Losses the model computes itself from (image, caption) pairs: `model.losses` (pixels, ids, mask, image ids)."""

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        return self.model.losses(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                 image_ids=batch.get("image_ids"), generator=generator)


class ImageEncoderObjective(_ImageTextObjective):
    """Stage 0: the image encoder against a frozen sentence encoder (or tags); only the encoder is kept."""

    encoder_only = True

    @staticmethod
    def val_task(d: DataSection) -> str:
        raise RunConfigError("val_every: stage 0 has no validation; set it to 0")

    @staticmethod
    def encoder_decoder(model) -> bool:
        return False  # no LLM

    def export(self, cfg: RunConfig, out_dir: Path, full_state: dict | None) -> None:
        self.model.export(out_dir / "model")  # the image encoder alone, for the next stages' model.vit_path


class RepresentationObjective(_ImageTextObjective):
    """Stage 1: ITC + ITM + ITG of the Q-Former against the frozen image encoder (BLIP-2 paper §3.2)."""

    retrieval = True
    architectures = ("blip2-retrieval",)

    @staticmethod
    def val_task(d: DataSection) -> str:
        return "retrieval"


class GenerativeObjective(Objective):
    """Stage 2: language modelling through the frozen LLM (prefix LM for encoder-decoder LLMs, §3.3). Of a
    collated batch, the `batch_keys` entries reach the model."""

    collator_kind = "stage2"
    architectures = ("blip2", "instructblip")
    takes_prompt = True
    batch_keys = ("pixel_values", "input_ids", "attention_mask", "labels", "decoder_input_ids",
                  "decoder_attention_mask")

    @staticmethod
    def data_task(d: DataSection) -> str:
        return d.task

    def frozen_llm(self) -> torch.nn.Module | None:
        return self.model.llm

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        out = self.model(**{k: batch[k] for k in self.batch_keys if k in batch}, loss_only=True)
        return {"lm_loss": out.loss, "loss": out.loss}


class InstructionObjective(GenerativeObjective):
    """Instruction tuning: the loss on the answer only; InstructBLIP's Q-Former also reads the instruction.
    With a blip2 model the instruction reaches the LLM only (InstructBLIP's ablation)."""

    collator_kind = "instruct"
    architectures = ("instructblip", "blip2")
    instruction_data = True
    takes_prompt = False
    batch_keys = GenerativeObjective.batch_keys + ("qformer_input_ids", "qformer_attention_mask")

    @staticmethod
    def max_text_len(d: DataSection) -> int:
        return max(d.max_text_len, 128)  # instructions: at least InstructBLIP's 128 tokens


OBJECTIVES: dict[str, type[Objective]] = {
    "stage0": ImageEncoderObjective,
    "stage1": RepresentationObjective,
    "stage2": GenerativeObjective,
    "instruct": InstructionObjective,
}


def objective_for(stage: str) -> type[Objective]:
    try:
        return OBJECTIVES[stage]
    except KeyError:
        raise RunConfigError(f"stage: must be one of {sorted(OBJECTIVES)}, got {stage!r}") from None
