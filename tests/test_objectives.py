"""One objective per training stage (blip2.train.objectives): the mapping covers every stage, the training code
asks the objective instead of comparing stage names, and each objective answers for its stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import blip2
from blip2.config import Blip2Config, ConfigError, VisionConfig
from blip2.model import Blip2Model
from blip2.stage0 import TagPretrainer
from blip2.train.collate import KINDS
from blip2.train.config import STAGES, DataSection, RunConfigError
from blip2.train.objectives import OBJECTIVES, objective_for

TRAIN = Path(__file__).resolve().parents[1] / "src" / "blip2" / "train"
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden_size=64)


def test_every_stage_has_one_objective_and_nothing_else():
    assert set(OBJECTIVES) == set(STAGES)
    assert len(set(OBJECTIVES.values())) == len(OBJECTIVES)
    for stage, cls in OBJECTIVES.items():
        assert objective_for(stage) is cls
        assert cls.collator_kind in KINDS, stage
        assert cls.encoder_only or cls.architectures, stage
    with pytest.raises(RunConfigError, match="stage: must be one of"):
        objective_for("stage3")


def _stage_name_comparisons(path: Path) -> list[str]:
    """`x == "stage1"`, `x in ("stage0", "stage1")`, `x != "instruct"` ...: a comparison with a stage name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and sub.value in STAGES:
                    found.append(f"{path.name}:{node.lineno}")
    return sorted(set(found))


def test_the_training_code_asks_the_objective_not_the_stage_name():
    # config.py validates stage-specific options; objectives.py is the mapping itself; collate.py's kinds are text
    # layouts that share the stage names (Collator("stage1", ...)), chosen by the objective (collator_kind)
    files = [p for p in sorted(TRAIN.glob("*.py")) if p.name not in ("config.py", "objectives.py", "collate.py")]
    assert any(p.name == "loop.py" for p in files)
    found = [hit for p in files for hit in _stage_name_comparisons(p)]
    assert not found, found


def test_the_stage_name_check_finds_a_comparison(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cfg):\n    return 1 if cfg.stage in ("stage0", "stage1") else 2\n')
    assert _stage_name_comparisons(bad) == ["bad.py:2"]


def test_stage0_objective_keeps_the_encoder_alone():
    """The stage-0 tagger is its own small model (no LLM attribute); its objective has nothing to shard and
    computes the model's own losses."""
    torch.manual_seed(0)
    model = TagPretrainer(VisionConfig(**VISION), [[5], [6, 7]], tags=["red", "blue square"])
    assert not hasattr(model, "llm")
    objective = objective_for("stage0")(model)
    assert objective.frozen_llm() is None
    assert objective.encoder_decoder(model) is False
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.tensor([[1, 5, 2, 0], [1, 6, 7, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    out = objective(batch)
    ref = model.losses(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(out["loss"], ref["loss"]) and set(out) == set(ref)
    with pytest.raises(RunConfigError, match="stage 0 has no validation"):
        objective.val_task(DataSection())


class _Recorder(torch.nn.Module):
    """Records the keyword arguments of the model call (an LM objective's forward)."""

    def forward(self, **kw):
        self.seen = sorted(kw)
        return type("Out", (), {"loss": torch.tensor(1.5)})()


def test_language_model_objectives_pass_only_their_batch_keys():
    batch = {k: torch.zeros(1) for k in ("pixel_values", "input_ids", "attention_mask", "labels",
                                         "qformer_input_ids", "qformer_attention_mask", "image_ids")}
    for stage, extra in (("stage2", []), ("instruct", ["qformer_attention_mask", "qformer_input_ids"])):
        model = _Recorder()
        out = objective_for(stage)(model)(batch)
        assert model.seen == sorted(["attention_mask", "input_ids", "labels", "loss_only", "pixel_values", *extra])
        assert out == {"lm_loss": torch.tensor(1.5), "loss": torch.tensor(1.5)}


@pytest.mark.parametrize("stage, task, want", [("stage1", "caption", "retrieval"), ("stage2", "caption", "caption"),
                                               ("stage2", "vqa", "vqa"), ("instruct", "vqa", "vqa")])
def test_validation_task_by_stage(stage, task, want):
    assert objective_for(stage).val_task(DataSection(task=task)) == want


def test_text_lengths_and_data_tasks_by_stage():
    d = DataSection(max_text_len=40, task="vqa")
    assert [objective_for(s).max_text_len(d) for s in STAGES] == [40, 40, 40, 128]
    assert [objective_for(s).data_task(d) for s in STAGES] == ["caption", "caption", "vqa", "vqa"]
    assert [objective_for(s).takes_prompt for s in STAGES] == [False, False, True, False]


def test_from_preset_takes_a_config_as_it_is():
    cfg = Blip2Config.from_preset("tiny-opt")
    torch.manual_seed(3)
    ours = blip2.from_preset(cfg)
    torch.manual_seed(3)
    ref = Blip2Model(cfg)
    for (n, p), q in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), n
    with pytest.raises(ConfigError, match="overrides"):
        blip2.from_preset(cfg, num_query_tokens=4)
