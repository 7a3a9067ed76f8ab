"""LoRA through peft: `blip2 train CONFIG lora.r=8` trains adapters + the stage's parts only, lowers the loss,
resumes exactly, exports a merged model equal to the unmerged one and a PEFT adapter that peft itself loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import blip2
from blip2.lora import DEFAULT_TARGETS, LoraError, add_lora, plain_name
from blip2.train.build import build_model
from blip2.train.config import RunConfigError, load_run_config, shipped_configs
from blip2.train.loop import train
from blip2.train.runtime import seed_everything

peft = pytest.importorskip("peft")

CONFIGS = shipped_configs() / "tiny"
FAST = ["tensorboard=false", "plots=false", "data.num_workers=0"]


def _cfg(name: str, run: Path, *overrides: str):
    return load_run_config(CONFIGS / f"{name}.yaml", [f"output_dir={run}", *FAST, *overrides])


def _initial(cfg):
    """The model a run starts from, built as the loop builds it (same seed), LoRA included."""
    seed_everything(cfg.seed)
    return build_model(cfg, Path(cfg.output_dir) / "work")


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.vision.image_size
    px = torch.randn(2, 3, size, size, generator=g)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    kw = {}
    if model.cfg.architecture == "instructblip":
        kw["qformer_input_ids"] = torch.randint(3, 100, (2, 5), generator=g)
    return px, ids, kw


@pytest.fixture(scope="module")
def opt_run(tmp_path_factory):
    """A finished tiny stage-2 OPT run with LoRA on the LLM (r=4), checkpoints every 5 steps."""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = _cfg("stage2-opt", run, "lora.r=4", "max_steps=20", "save_every=5", "keep_last=4", "optim.lr=3e-3")
    train(cfg)
    return cfg, run


def test_lora_lowers_the_loss_and_trains_only_adapters_and_stage_parts(opt_run):
    cfg, run = opt_run
    rows = _losses(run)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.05, (first, last)

    start = _initial(cfg)
    trainable = {n for n, p in start.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if "lora_" in n}
    assert adapters and all(n.startswith("llm.") for n in adapters)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable)  # the base LLM stays frozen
    assert not any(n.startswith("vision.") for n in trainable)
    assert any(n.startswith("qformer.") for n in trainable) and any(n.startswith("language_projection.")
                                                                    for n in trainable)
    # the checkpoint holds the trainable tensors (+ buffers), not the frozen weights
    state = load_file(str(run / "checkpoints" / "step-0000020" / "state.safetensors"))
    params = {k[len("model."):] for k in state if k.startswith("model.")} & {n for n, _ in start.named_parameters()}
    assert params == trainable

    # what changed: the adapters and the stage's parts; every frozen weight of the export equals the start's,
    # except the adapted projections, into which the adapters were merged
    assert any(not torch.equal(state[f"model.{n}"], dict(start.named_parameters())[n]) for n in adapters
               if "lora_B" in n)  # (peft starts lora_B at zero)
    merged = dict(blip2.load(run / "model").named_parameters())
    for n, p in start.named_parameters():
        if p.requires_grad:
            continue
        name = plain_name(n)
        if name.endswith(("q_proj.weight", "v_proj.weight")) and name.startswith("llm."):
            assert not torch.equal(merged[name], p), name
        else:
            assert torch.equal(merged[name], p), name


def test_merged_export_equals_the_unmerged_model_and_the_adapter_loads_in_peft(opt_run, tmp_path):
    cfg, run = opt_run
    unmerged = _initial(cfg)
    st = load_file(str(run / "checkpoints" / "step-0000020" / "state.safetensors"))
    own = dict(unmerged.named_parameters()) | dict(unmerged.named_buffers())
    with torch.no_grad():
        for k, v in st.items():
            if k.startswith("model."):
                own[k[6:]].copy_(v)
    unmerged.eval()
    px, ids, kw = _inputs(unmerged)
    merged = blip2.load(run / "model")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        ref = unmerged(px, ids, **kw).logits
        torch.testing.assert_close(merged(px, ids, **kw).logits, ref, rtol=1e-5, atol=1e-5)

    # peft itself: the adapter directory onto the run's starting LLM gives the trained LLM
    plain = load_run_config(CONFIGS / "stage2-opt.yaml", [f"output_dir={tmp_path}", *FAST])
    base = _initial(plain)
    llm = peft.PeftModel.from_pretrained(base.llm, str(run / "adapter")).eval()
    emb = torch.randn(2, 9, base.llm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(llm(inputs_embeds=emb).logits, unmerged.llm(inputs_embeds=emb).logits,
                                   rtol=1e-5, atol=1e-5)

    # blip2.load(start, adapter=...): the adapters and the stage's trained tensors on the starting model
    _initial(plain).save_pretrained(tmp_path / "start")  # (peft injected its layers into base.llm)
    loaded = blip2.load(tmp_path / "start", adapter=run / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(px, ids, **kw).logits, ref, rtol=1e-5, atol=1e-5)


def test_lora_resume_is_exact(opt_run, tmp_path):
    cfg, run = opt_run
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    for d in (cut / "checkpoints").glob("step-*"):
        if d.name != "step-0000010":
            shutil.rmtree(d)
    (cut / "checkpoints" / "latest").write_text("step-0000010")
    shutil.rmtree(cut / "model")
    shutil.rmtree(cut / "adapter")
    train(_cfg("stage2-opt", cut, "lora.r=4", "max_steps=20", "save_every=5", "keep_last=4", "optim.lr=3e-3",
               "resume=true"))
    a, b = _losses(run), _losses(cut)
    assert [r["step"] for r in b] == list(range(1, 21))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]


@pytest.mark.parametrize("preset,kind", [("tiny-llama-instruct", "llama"), ("tiny-t5", "t5")])
def test_default_targets_per_architecture(preset, kind):
    model = blip2.from_preset(preset)
    add_lora(model, r=2)
    adapted = {n.split(".")[-1] for n, m in model.llm.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(DEFAULT_TARGETS[kind])
    px, ids, kw = _inputs(model.eval())
    with torch.no_grad():  # the wrapped LLM decodes through the model's own loop
        assert model.generate(px, ids, max_new_tokens=3, **kw).shape[0] == 2


def test_lora_on_the_qformer_adapts_its_attention_and_trains_the_rest():
    model = blip2.from_preset("tiny-opt")
    model.set_trainable(vision=False, llm=False)
    add_lora(model, r=2, on=["qformer"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any(n.endswith(("query.base_layer.weight", "value.base_layer.weight")) for n in trainable)
    assert any("query_tokens" in n for n in trainable) and "language_projection.weight" in trainable


def test_bad_lora_settings_are_named(tmp_path):
    with pytest.raises(RunConfigError, match="lora.on"):
        _cfg("stage2-opt", tmp_path, "lora.r=4", "lora.on=[decoder]")
    with pytest.raises(RunConfigError, match="LoRA is for stage2"):
        _cfg("stage1", tmp_path, "lora.r=4")
    with pytest.raises(LoraError, match="lora.target_modules"):
        add_lora(blip2.from_preset("tiny-opt"), r=2, target_modules=["no_such_layer"])


def test_qlora_on_cpu_names_the_alternative(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs QLoRA (benchmarks/gpu_check.py)")
    cfg = _cfg("stage2-opt", tmp_path, "lora.r=4", "lora.quantize=nf4")
    with pytest.raises(RunConfigError, match="needs a CUDA GPU.*unset lora.quantize"):
        _initial(cfg)
