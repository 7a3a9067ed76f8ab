"""Run configs (errors name the key), overrides, the schedule, parameter groups, atomic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from blip2.train.config import RunConfigError, load_run_config, parse_overrides, shipped_configs
from blip2.train.optim import lr_at, param_groups

CONFIGS = shipped_configs()


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    if path.parent.name == "quickstart":  # ${...} names are filled in by blip2 quickstart
        from blip2.quickstart.run import resolve_config

        names = {"world": "/w", "minilm": "/m", "smollm2": "/s", "last_shard": "000005", "out": "/o"}
        path = resolve_config(path, names, [], tmp_path / path.name)
        assert "${" not in path.read_text()
    cfg = load_run_config(path)
    assert cfg.max_steps >= 1


def test_unknown_key_names_it_and_the_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: stage1\nmodel: {preset: tiny-stage1}\noptim: {lr: 1e-3, lerning_rate: 2}\n")
    with pytest.raises(RunConfigError, match=r"unknown key 'optim.lerning_rate'.*allowed keys in optim.*'lr'"):
        load_run_config(p)


def test_ill_typed_value_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: stage1\nmodel: {preset: tiny-stage1}\nmax_steps: ten\n")
    with pytest.raises(RunConfigError, match=r"max_steps: expected int, got 'ten'"):
        load_run_config(p)


def test_bad_stage_and_missing_model():
    with pytest.raises(RunConfigError, match="stage: must be one of"):
        load_run_config(None, ["stage=stage3", "model.preset=tiny-opt"])
    with pytest.raises(RunConfigError, match="model: give one of"):
        load_run_config(None, ["stage=stage1"])


def test_overrides_nest_and_parse_yaml_scalars():
    assert parse_overrides(["optim.lr=3e-4", "max_steps=7", "resume=true", "optim.betas=[0.9, 0.99]"]) == {
        "optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "max_steps": 7, "resume": True}
    cfg = load_run_config(CONFIGS / "tiny" / "stage1.yaml", ["max_steps=3", "optim.lr=0.5"])
    assert cfg.max_steps == 3 and cfg.optim.lr == 0.5 and cfg.data.batch_size == 8
    with pytest.raises(RunConfigError, match="not key=value"):
        parse_overrides(["max_steps"])


def test_schedule_by_hand():
    # warmup 10 steps from 0.1 to 1.0, cosine to 0.0 at step 110
    assert lr_at(0, 1.0, 0.0, 10, 0.1, 110) == pytest.approx(0.1)
    assert lr_at(5, 1.0, 0.0, 10, 0.1, 110) == pytest.approx(0.55)
    assert lr_at(10, 1.0, 0.0, 10, 0.1, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.0, 10, 0.1, 110) == pytest.approx(0.5)
    assert lr_at(35, 1.0, 0.2, 10, 0.1, 110) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, 1.0, 0.2, 10, 0.1, 110) == pytest.approx(0.2)


def test_no_weight_decay_on_biases_norms_and_1d():
    import blip2

    model = blip2.from_preset("tiny-stage1")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for p in no_decay["params"]:
        n = names[id(p)]
        assert p.ndim < 2 or "norm" in n or n.endswith("query_tokens"), n
    for p in decay["params"]:
        n = names[id(p)]
        assert p.ndim >= 2 and "norm" not in n and not n.endswith("bias"), n
    frozen = {id(p) for p in model.vision.parameters()}
    assert not frozen & {id(p) for g in (decay, no_decay) for p in g["params"]}


def test_lr_scale_splits_groups_by_longest_prefix():
    import blip2

    model = blip2.from_preset("tiny-stage1")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, {"qformer.": 0.5, "qformer.layers.0.": 2.0, "itm_head.": 0.0})
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            want = 2.0 if n.startswith("qformer.layers.0.") else 0.5 if n.startswith("qformer.") else \
                0.0 if n.startswith("itm_head.") else 1.0
            assert g["lr_scale"] == want, n
            decays = not (p.ndim < 2 or "norm" in n.lower() or n in model.no_weight_decay())
            assert g["weight_decay"] == (0.05 if decays else 0.0), n
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    assert [g["lr_scale"] for g in param_groups(model, 0.05)] == [1.0, 1.0]  # no scales: the two plain groups


def test_training_state_roundtrip(tmp_path):
    import blip2
    from blip2.train.state import latest_checkpoint, load_training_state, save_training_state

    torch.manual_seed(0)
    model = blip2.from_preset("tiny-stage1")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.qformer.query_tokens.sum().backward()
    opt.step()
    for k in range(1, 4):
        save_training_state(tmp_path, k, model, opt, None, {"data": {"pos": k}}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]
    expected_rand = torch.rand(3)  # the RNG state after the save...
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-0000003"
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_opt = opt.state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.rand(5)
    st = load_training_state(ckpt, model, opt2, None)
    assert st["step"] == 3 and st["extra"]["data"] == {"pos": 3}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref[n], msg=n)
    s1, s2 = ref_opt["state"], opt2.state_dict()["state"]
    assert set(s1) == set(s2)
    for k in s1:
        torch.testing.assert_close(s1[k]["exp_avg"], s2[k]["exp_avg"])
    # ...is restored: the same draws follow
    torch.testing.assert_close(torch.rand(3), expected_rand)
