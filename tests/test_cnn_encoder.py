"""The convolutional image encoder (vision.kind="cnn"): its config rules, its shapes and position codes (by hand),
that the Q-Former reads it, and that it survives every checkpoint path (the blip2 directory format, the LAVIS
layout, the stage-0 export read through model.vit_path)."""

from __future__ import annotations

import math

import pytest
import torch

from blip2.config import Blip2Config, ConfigError, VisionConfig
from blip2.vision import ConvTower, build_vision, sincos_2d

CNN = dict(kind="cnn", image_size=32, patch_size=4, hidden_size=16, cnn_channels=(8, 12))
QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=32, vocab_size=50,
               max_position_embeddings=16, num_query_tokens=3)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_config_rules_name_the_field():
    with pytest.raises(ConfigError, match="patch_size"):
        VisionConfig(kind="cnn", image_size=32, patch_size=8, hidden_size=16, cnn_channels=(8, 12))
    with pytest.raises(ConfigError, match="cnn_channels"):
        VisionConfig(kind="cnn", image_size=32, patch_size=1, hidden_size=16, cnn_channels=())
    with pytest.raises(ConfigError, match="divisible by 4"):
        VisionConfig(kind="cnn", image_size=32, patch_size=4, hidden_size=18, cnn_channels=(8, 12))
    with pytest.raises(ConfigError, match="kind"):
        VisionConfig(kind="resnet")
    assert VisionConfig(**{**CNN, "cnn_channels": [8, 12]}).cnn_channels == (8, 12)  # YAML / JSON lists


def test_sincos_codes_by_hand():
    code = sincos_2d(3, 8)  # (9, 8): [sin(r f), cos(r f)] for f in (1, 1/100), then the same for the column
    assert code.shape == (9, 8)
    f = torch.tensor([1.0, 0.01])
    for r in range(3):
        for c in range(3):
            row = torch.cat([torch.sin(r * f), torch.cos(r * f)])
            col = torch.cat([torch.sin(c * f), torch.cos(c * f)])
            torch.testing.assert_close(code[r * 3 + c], torch.cat([row, col]))
    assert len({tuple(v.tolist()) for v in code}) == 9  # every cell its own code


def test_tokens_shape_and_position_codes():
    cfg = VisionConfig(**CNN)
    tower = build_vision(cfg)
    assert isinstance(tower, ConvTower) and tower.hidden_size == 16
    _randomise(tower, 0)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = tower(px)
    assert out.shape == (2, (32 // 4) ** 2, 16)  # (B, N, D), no CLS token
    # the codes are what is added to the conv grid, row-major
    grid = tower.convnet(px).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out - grid, sincos_2d(8, 16)[None].expand(2, -1, -1))
    # other picture sizes get codes for their own grid
    assert tower(torch.randn(1, 3, 48, 48)).shape == (1, 144, 16)
    # the position codes are not weights
    assert not any("pos_code" in k for k in tower.state_dict())
    # translation equivariance away from the border: a shifted picture shifts the conv grid
    # (a 48 px picture: the padding's effect reaches two tokens in from the border, the object stays clear)
    img = torch.zeros(1, 3, 48, 48)
    img[:, :, 12:20, 12:20] = 1.0
    moved = torch.roll(img, shifts=(8, 8), dims=(2, 3))
    a = tower.convnet(img)[0, :, 3:5, 3:5]
    b = tower.convnet(moved)[0, :, 5:7, 5:7]
    torch.testing.assert_close(a, b)


def _model(architecture: str = "blip2-retrieval", seed: int = 0):
    from blip2.model import Blip2Model

    torch.manual_seed(seed)
    cfg = Blip2Config(architecture=architecture, vision=VisionConfig(**CNN), qformer=dict(QFORMER))
    model = Blip2Model(cfg).eval()
    _randomise(model.vision, seed + 1)
    return model


def test_qformer_reads_the_grid():
    model = _model()
    assert model.cfg.qformer.encoder_hidden_size == 16  # the cross-attention width follows the tower
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    feats = model.image_features(px).embeds
    assert feats.shape == (2, 3, 32) and torch.isfinite(feats).all()
    # the queries see the picture: another picture, other query outputs
    assert not torch.allclose(model.image_features(px.flip(0)).embeds, feats)


def test_checkpoint_directory_round_trip(tmp_path):
    import json

    import blip2
    from blip2.checkpoint import save_pretrained

    model = _model(seed=3)
    save_pretrained(model, tmp_path / "m")
    vc = json.loads((tmp_path / "m" / "config.json").read_text())["vision_config"]
    assert vc["encoder_kind"] == "cnn" and vc["cnn_channels"] == [8, 12]
    back = blip2.load(tmp_path / "m")
    for field in ("kind", "cnn_channels", "hidden_size", "image_size", "patch_size", "ln_vision_eps"):
        assert getattr(back.cfg.vision, field) == getattr(model.cfg.vision, field), field
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back.vision(px), model.vision(px))
        torch.testing.assert_close(back.image_features(px).embeds, model.image_features(px).embeds)


def test_lavis_layout_round_trip():
    from blip2.convert_lavis import lavis_to_ours, ours_to_lavis

    state = _model(seed=5).state_dict()
    lavis = ours_to_lavis(state, "blip2")
    assert any(k.startswith("visual_encoder.convnet.") for k in lavis)
    back, unknown = lavis_to_ours(lavis)
    assert not unknown
    vision = {k for k in state if k.startswith("vision.")}
    assert vision and vision <= set(back)
    for k in vision:
        assert torch.equal(back[k], state[k])


def test_stage0_tag_export_loads_through_vit_path(tmp_path):
    from blip2.lavis_load import load_vit_weights
    from blip2.stage0 import TagPretrainer

    pre = TagPretrainer(VisionConfig(**CNN), tag_ids=[[5, 6], [7]]).eval()
    _randomise(pre.vision, 6)
    path = pre.export(tmp_path / "enc")
    target = _model(seed=7)
    load_vit_weights(target, path)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(target.vision(px), pre.vision(px))


def test_tag_targets_by_hand():
    from blip2.stage0 import tag_targets

    ids = torch.tensor([[1, 5, 6, 9, 2, 0],    # holds "5 6", and 9
                        [1, 6, 5, 2, 0, 0],    # 5 and 6, but not "5 6" in that order
                        [1, 9, 5, 6, 2, 6]])   # "5 6"; the last 6 is padding (masked): "6" alone still counts
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    got = tag_targets(ids, mask, [[5, 6], [9], [6, 2, 6]])
    assert torch.equal(got, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_tag_pretrainer_learns_the_tags():
    from blip2.stage0 import TagPretrainer

    torch.manual_seed(0)
    pre = TagPretrainer(VisionConfig(**CNN), tag_ids=[[5, 6], [7], [8]])
    # pictures: a bright square in the top-left (tag 0) or bottom-right (tag 1); tag 2 never occurs
    px = torch.zeros(8, 3, 32, 32)
    px[::2, :, 2:10, 2:10] = 2.0
    px[1::2, :, 20:28, 20:28] = 2.0
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]] * 4)
    mask = (ids != 0).long()
    first = pre.losses(px, ids, mask)
    assert set(first) >= {"loss", "tag_loss", "exact_set"}
    assert abs(first["loss"].item() - math.log(2)) < 0.3  # untrained: about log 2 per tag
    opt = torch.optim.AdamW(pre.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        out = pre.losses(px, ids, mask)
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.1 and out["exact_set"].item() == 1.0
    assert all(p.grad is not None for p in pre.vision.parameters())  # the encoder learns through the head
    with pytest.raises(ValueError, match="tags"):
        TagPretrainer(VisionConfig(**CNN), tag_ids=[])
