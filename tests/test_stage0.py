"""Stage 0: the contrastive targets and loss against hand computations, the frozen sentence encoder against
transformers' BertModel, the exported ViT against the Blip2Model that loads it, and a tiny training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from blip2.config import VisionConfig
from blip2.stage0 import ImageTextAligner, contrastive_targets, locked_text_loss

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden_size=64)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BertModel (weights perturbed so biases and norms are not trivial) + a tiny BERT tokenizer."""
    from fixtures import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("bert"), seed=0, add_pooling_layer=False, hidden_size=24,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bert_dir))


def _aligner(bert_dir, seed: int = 0) -> ImageTextAligner:
    torch.manual_seed(seed)
    return ImageTextAligner(VisionConfig(**VISION), bert_dir)


# ------------------------------------------------------------------------------------------ targets and loss
def test_contrastive_targets_hand_matrix():
    # rows 0 and 2: the same text (row 2's pad slot holds another id, masked out); rows 1 and 3: the same image;
    # row 4: the same image as row 0, another text
    ids = torch.tensor([[2, 7, 8, 3, 0],
                        [2, 9, 3, 0, 0],
                        [2, 7, 8, 3, 5],
                        [2, 10, 11, 3, 0],
                        [2, 12, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 0],
                         [1, 1, 1, 0, 0]])
    image_ids = torch.tensor([10, 11, 12, 11, 10])
    h, t = 1 / 2, 1 / 3
    expected = torch.tensor([[t, 0, t, 0, t],
                             [0, h, 0, h, 0],
                             [h, 0, h, 0, 0],
                             [0, h, 0, h, 0],
                             [h, 0, 0, 0, h]])
    torch.testing.assert_close(contrastive_targets(ids, mask, image_ids), expected)
    # without image ids only the shared text counts
    expected_text = torch.tensor([[h, 0, h, 0, 0],
                                  [0, 1, 0, 0, 0],
                                  [h, 0, h, 0, 0],
                                  [0, 0, 0, 1, 0],
                                  [0, 0, 0, 0, 1]])
    torch.testing.assert_close(contrastive_targets(ids, mask, None), expected_text)
    # the same ids with a different mask are different texts
    ids2 = torch.tensor([[2, 7, 8, 3], [2, 7, 8, 3]])
    mask2 = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    torch.testing.assert_close(contrastive_targets(ids2, mask2, None), torch.eye(2))


def _hand_loss(img, txt, scale, targets):
    logits = scale * img @ txt.t()

    def soft_ce(z, tgt):  # -mean_i sum_j tgt_ij * log_softmax(z)_ij, log_softmax written out
        log_p = z - torch.log(torch.exp(z).sum(1, keepdim=True))
        return -(tgt * log_p).sum(1).mean()

    return (soft_ce(logits, targets) + soft_ce(logits.t(), targets)) / 2, logits


@pytest.mark.parametrize("scale", [2.0, 500.0], ids=["plain", "clamped"])
def test_locked_text_loss_hand_computation(scale):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    loss, logits = locked_text_loss(img, txt, torch.tensor(math.log(scale)), targets)
    ref_loss, ref_logits = _hand_loss(img, txt, min(scale, 100.0), targets)  # the scale is capped at 100
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


# ------------------------------------------------------------------------------------------ the text side
def _encode(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_text_embed_equals_bert_mean_pool_and_is_cached(bert_dir, tokenizer):
    from transformers import BertModel

    model = _aligner(bert_dir)
    texts = ["a cat", "a black and white cat sitting on a red couch", "a cat", "two dogs"]
    ids, mask = _encode(tokenizer, texts)
    assert (mask == 0).any()  # padding is exercised

    ref_model = BertModel.from_pretrained(str(bert_dir)).eval()
    with torch.no_grad():
        hidden = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, E)
    m = mask.float()[:, :, None]
    pooled = (hidden * m).sum(1) / m.sum(1)
    ref = pooled / pooled.norm(dim=-1, keepdim=True)

    calls = []
    inner = model.text.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0] if "input_ids" in kwargs else args[0].shape[0])
        return inner(*args, **kwargs)

    model.text.forward = counting
    first = model.text_embed(ids, mask)
    assert calls == [3]  # one pass, over the three distinct texts
    torch.testing.assert_close(first, ref, atol=1e-5, rtol=1e-5)
    second = model.text_embed(ids, mask)
    assert calls == [3]  # all cached: the encoder did not run
    assert torch.equal(first, second)
    # the same text padded to another length is the same cache entry
    ids1, mask1 = _encode(tokenizer, ["a cat"])
    assert ids1.shape[1] < ids.shape[1]
    assert torch.equal(model.text_embed(ids1, mask1)[0], first[0])
    assert calls == [3]


def test_text_encoder_frozen_vision_trains(bert_dir, tokenizer):
    model = _aligner(bert_dir)
    model.train()
    assert model.training and model.vision.training
    assert not model.text.training and not any(m.training for m in model.text.modules())
    assert not any(p.requires_grad for p in model.text.parameters())
    ids, mask = _encode(tokenizer, ["a red square", "a blue square", "a green square"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model.losses(pixels, ids, mask, image_ids=torch.tensor([0, 1, 2]))
    assert set(out) >= {"loss", "contrastive_loss", "i2t_acc"}
    out["loss"].backward()
    assert all(p.grad is None for p in model.text.parameters())
    vision_grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None for g in vision_grads) and any(g.abs().sum() > 0 for g in vision_grads)
    for p in (model.proj.weight, model.norm.weight, model.logit_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ export
def test_export_loads_into_blip2_vision(bert_dir, tmp_path):
    from blip2.config import Blip2Config
    from blip2.lavis_load import load_vit_weights
    from blip2.model import Blip2Model

    aligner = _aligner(bert_dir, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # every ViT tensor random (biases, cls token, norms are zero/one at init)
        for p in aligner.vision.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = aligner.export(tmp_path / "out")
    assert path == tmp_path / "out" / "vit.pth" and path.is_file()

    vcfg = VisionConfig(**json.loads((tmp_path / "out" / "vision_config.json").read_text()))
    assert vcfg == aligner.cfg.vision

    qformer = dict(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=32, vocab_size=50,
                   max_position_embeddings=16, num_query_tokens=2)
    torch.manual_seed(5)
    target = Blip2Model(Blip2Config(architecture="blip2-retrieval", vision=vcfg, qformer=qformer)).eval()
    load_vit_weights(target, path)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(target.vision(pixels), aligner.vision(pixels))


# ------------------------------------------------------------------------------------------ training
def _run_config(tmp_path, bert_dir, **top):
    from blip2.train.config import load_run_config

    data = {"stage": "stage0",
            "model": {"vision": dict(VISION), "bert": str(bert_dir)},
            "data": {"train": "synthetic:colors", "augment": False, "batch_size": 16, "max_text_len": 16},
            "optim": {"lr": 1.0e-3, "warmup_steps": 0},
            "output_dir": str(tmp_path / "run"), "max_steps": 40, "tensorboard": False, "plots": False,
            **top}
    path = tmp_path / "stage0.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_run_config(path)


def test_stage0_training_run_learns_and_exports(tmp_path, bert_dir):
    from blip2.train.loop import train

    cfg = _run_config(tmp_path, bert_dir)
    train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first, (first, last)
    assert (run / "model" / "vit.pth").is_file()
    assert VisionConfig(**json.loads((run / "model" / "vision_config.json").read_text())) == VisionConfig(**VISION)


def test_stage0_config_errors_name_the_key(tmp_path, bert_dir):
    from blip2.train.config import RunConfig, RunConfigError, load_run_config

    path = tmp_path / "bad.yaml"
    # no sentence encoder (a preset is given so that only the stage-0 rule can fail)
    path.write_text(yaml.safe_dump({"stage": "stage0", "model": {"preset": "tiny-opt", "vision": dict(VISION)}}))
    with pytest.raises(RunConfigError, match=r"model\.bert"):
        load_run_config(path)
    # no vision section
    path.write_text(yaml.safe_dump({"stage": "stage0", "model": {"bert": str(bert_dir)}}))
    with pytest.raises(RunConfigError, match=r"model\.vision"):
        load_run_config(path)
    with pytest.raises(RunConfigError, match=r"val_every"):
        _run_config(tmp_path, bert_dir, val_every=5)
    assert isinstance(_run_config(tmp_path, bert_dir), RunConfig)


def test_trained_text_tower_and_truncation(bert_dir, tokenizer):
    torch.manual_seed(0)
    model = ImageTextAligner(VisionConfig(**VISION), bert_dir, text_trainable=True, text_layers=1)
    assert len(model.text.encoder.layer) == 1
    model.train()
    assert model.text.training  # a trained tower uses its dropout like the rest
    ids, mask = _encode(tokenizer, ["a red square", "a blue square", "a green square"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.losses(pixels, ids, mask, image_ids=torch.tensor([0, 1, 2]))["loss"].backward()
    grads = [p.grad for p in model.text.encoder.layer[0].parameters()]  # (a pooler, if any, is unused)
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model.text.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.text_proj.weight.grad is not None
    # nothing is cached for a trained tower: the same text gives a new embedding once the weights move
    before = model.text_embed(ids, mask).detach()
    with torch.no_grad():
        for p in model.text.parameters():
            p.add_(0.01)
    assert not torch.allclose(model.text_embed(ids, mask), before)
    with pytest.raises(ValueError, match="text_layers"):
        ImageTextAligner(VisionConfig(**VISION), bert_dir, text_layers=5)
