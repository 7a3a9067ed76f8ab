"""LAVIS `.pth` checkpoints: key placement, parity with transformers' own conversion, round trip, errors.

The LAVIS-layout fixtures are written by hand from the documented LAVIS key names (docs/architecture.md), never
produced by the converter under test. The independent reference is transformers' LAVIS conversion scripts
(convert_blip_2_original_to_pytorch.py, convert_instructblip_original_to_pytorch.py; not shipped in the wheel):
their renames are transcribed in `hf_names` below, the renamed weights go into transformers' own tiny models,
and our model loaded from the same LAVIS file must give the same logits.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from blip2.checkpoint import CheckpointError, hf_to_ours
from blip2.config import Blip2Config
from blip2.api import load_lavis
from blip2.convert_lavis import lavis_architecture, lavis_to_ours, ours_to_lavis, read_lavis, save_lavis
from hf_models import (LLAMA_GQA, NUM_QUERY, OPT, T5_UNTIED, blip2_hf, instructblip_hf, pixels, retrieval_hf,
                       text_ids, with_placeholders)



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

# the tiny shapes of tests/hf_models.py: ViT 32 wide, 2 blocks, MLP 64, 32 px / patch 8 (16 patches);
# Q-Former 32 wide, 3 layers, FFN 48, vocab 120, 64 positions, cross-attention every 2 layers; 4 queries
DIMS = dict(H=32, I=48, layers=3, Dv=32, Q=NUM_QUERY, vocab=120, max_pos=64, freq=2)


# --------------------------------------------------------------------------------------------- fixtures
class _Rand:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, norm=False):
        x = torch.randn(shape, generator=self.g)
        return 1 + 0.1 * x if norm else 0.2 * x


def lavis_state(*, text=False, lm_head=False, heads=False, proj=None, proj_dim=48, itc=16, vit=False, seed=0,
                H=32, I=48, layers=3, Dv=32, Q=4, vocab=120, max_pos=64, freq=2):
    """A LAVIS `model` state dict written from the documented names. text: the Q-Former's text embeddings and
    text FFN (stage 1, InstructBLIP); lm_head: Qformer.cls (stage 1); heads: vision_proj/text_proj/itm_head/temp;
    proj: "opt_proj" / "t5_proj" / "llm_proj"; vit: visual_encoder.* (a trained ViT)."""
    r = _Rand(seed)
    s = {"query_tokens": r(1, Q, H)}
    b = "Qformer.bert."
    s[b + "embeddings.LayerNorm.weight"], s[b + "embeddings.LayerNorm.bias"] = r(H, norm=True), r(H)
    s[b + "embeddings.position_ids"] = torch.arange(max_pos)[None]  # a LAVIS buffer
    if text:
        s[b + "embeddings.word_embeddings.weight"] = r(vocab, H)
        s[b + "embeddings.position_embeddings.weight"] = r(max_pos, H)

    def linear(name, n_out, n_in):
        s[name + ".weight"], s[name + ".bias"] = r(n_out, n_in), r(n_out)

    def layernorm(name, n):
        s[name + ".weight"], s[name + ".bias"] = r(n, norm=True), r(n)

    for i in range(layers):
        L = f"{b}encoder.layer.{i}."
        blocks = [("attention", H)] + ([("crossattention", Dv)] if i % freq == 0 else [])
        for blk, kv_in in blocks:
            linear(L + blk + ".self.query", H, H)
            linear(L + blk + ".self.key", H, kv_in)
            linear(L + blk + ".self.value", H, kv_in)
            linear(L + blk + ".output.dense", H, H)
            layernorm(L + blk + ".output.LayerNorm", H)
        linear(L + "intermediate_query.dense", I, H)
        linear(L + "output_query.dense", H, I)
        layernorm(L + "output_query.LayerNorm", H)
        if text:
            linear(L + "intermediate.dense", I, H)
            linear(L + "output.dense", H, I)
            layernorm(L + "output.LayerNorm", H)
    if lm_head:
        c = "Qformer.cls.predictions."
        s[c + "bias"] = r(vocab)
        linear(c + "transform.dense", H, H)
        layernorm(c + "transform.LayerNorm", H)
        s[c + "decoder.weight"] = s[b + "embeddings.word_embeddings.weight"]  # tied in LAVIS's BERT
        s[c + "decoder.bias"] = s[c + "bias"]
    if heads:
        linear("vision_proj", itc, H)
        linear("text_proj", itc, H)
        linear("itm_head", 2, H)
        s["temp"] = torch.tensor(0.07)
    layernorm("ln_vision", Dv)
    if proj:
        linear(proj, proj_dim, H)
    if vit:
        s.update({"visual_encoder." + k: v for k, v in eva_vit_state(seed=seed + 1, D=Dv).items()})
    return s


def eva_vit_state(*, blocks=2, D=32, mlp=64, patch=8, num_patches=16, seed=1):
    """An eva_vit_g.pth-style state dict (no `visual_encoder.` prefix)."""
    r = _Rand(seed)
    s = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + num_patches, D),
         "patch_embed.proj.weight": r(D, 3, patch, patch), "patch_embed.proj.bias": r(D)}
    for i in range(blocks):
        B = f"blocks.{i}."
        s[B + "norm1.weight"], s[B + "norm1.bias"] = r(D, norm=True), r(D)
        s[B + "attn.qkv.weight"], s[B + "attn.q_bias"], s[B + "attn.v_bias"] = r(3 * D, D), r(D), r(D)
        s[B + "attn.proj.weight"], s[B + "attn.proj.bias"] = r(D, D), r(D)
        s[B + "norm2.weight"], s[B + "norm2.bias"] = r(D, norm=True), r(D)
        s[B + "mlp.fc1.weight"], s[B + "mlp.fc1.bias"] = r(mlp, D), r(mlp)
        s[B + "mlp.fc2.weight"], s[B + "mlp.fc2.bias"] = r(D, mlp), r(D)
    return s


def save_pth(path, state, **extra):
    torch.save({"model": state, **extra}, path)
    return path


def hf_config(hf, d):
    """The transformers config.json of a reference model (with its class name, as model.save_pretrained writes)."""
    hf.config.architectures = [type(hf).__name__]
    hf.config.save_pretrained(d)
    return d / "config.json"


# ----------------------------------------------------------------------- the reference: transformers' renames
def hf_names(lavis: dict, kind: str) -> dict:
    """LAVIS names -> transformers names by the rules of transformers' LAVIS conversion scripts (transcribed).
    kind: "blip2" (blip2_opt / blip2_t5), "instructblip", "itm" (Blip2ForImageTextRetrieval)."""
    explicit = {"visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
                "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
                "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
                "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias"}
    ln = "qformer.embeddings.layernorm" if kind == "instructblip" else "qformer.layernorm"
    for p in ("weight", "bias"):
        explicit[f"ln_vision.{p}"] = f"vision_model.post_layernorm.{p}"
        explicit[f"Qformer.bert.embeddings.LayerNorm.{p}"] = f"{ln}.{p}"
        if kind == "itm":
            explicit[f"vision_proj.{p}"] = f"vision_projection.{p}"
            explicit[f"text_proj.{p}"] = f"text_projection.{p}"
    if kind == "itm":
        for e in ("word_embeddings", "position_embeddings"):
            explicit[f"Qformer.bert.embeddings.{e}.weight"] = f"embeddings.{e}.weight"
    vit_blocks = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                  "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out, qv = {}, {}
    for k, v in lavis.items():
        if k.startswith("visual_encoder.blocks."):
            _, _, i, *rest = k.split(".")
            rest = ".".join(rest)
            if rest in ("attn.q_bias", "attn.v_bias"):  # fused into qkv.bias = cat(q, 0, v)
                qv[(i, rest[5])] = v
                continue
            mod, p = rest.rsplit(".", 1)
            k = f"vision_model.encoder.layers.{i}.{vit_blocks[mod]}.{p}"
        k = explicit.get(k, k)
        if k.startswith("Qformer.bert"):
            k = k.replace("Qformer.bert", "qformer")
        if "attention.self" in k:
            k = k.replace("self", "attention")
        for proj in ("opt_proj", "t5_proj", "llm_proj"):
            k = k.replace(proj, "language_projection")
        out[k] = v
    for (i, which), q in qv.items():
        if which == "q":
            v = qv[(i, "v")]
            out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def load_into_hf(hf, lavis, kind):
    """What transformers' conversion scripts do after renaming: load non-strictly, check what is left over."""
    missing, unexpected = hf.load_state_dict(hf_names(lavis, kind), strict=False)
    assert [k for k in missing if not k.startswith("language_model.")] == []
    leftover = {k for k in unexpected if not k.startswith("Qformer.cls")}
    assert leftover <= {"qformer.embeddings.position_ids", "temp"}, leftover
    return hf


# -------------------------------------------------------------------------------------- placement
@pytest.fixture(scope="module")
def hf_opt():
    return blip2_hf(OPT)


def test_values_land_in_place(hf_opt, tmp_path, caplog):
    lavis = lavis_state(proj="opt_proj")
    vit = eva_vit_state()
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    with caplog.at_level(logging.WARNING, logger="blip2.lavis_load"):
        m = load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf_opt, tmp_path), vit=tmp_path / "eva_vit_g.pth")
    sd = m.state_dict()
    L = "Qformer.bert.encoder.layer."
    pairs = {
        "qformer.query_tokens": lavis["query_tokens"],
        "qformer.layers.1.ffn_query.fc2.weight": lavis[L + "1.output_query.dense.weight"],
        "qformer.layers.2.ffn_query.fc1.bias": lavis[L + "2.intermediate_query.dense.bias"],
        "qformer.layers.0.ffn_query.norm.weight": lavis[L + "0.output_query.LayerNorm.weight"],
        "qformer.layers.1.attention.value.weight": lavis[L + "1.attention.self.value.weight"],
        "qformer.layers.2.attention.norm.bias": lavis[L + "2.attention.output.LayerNorm.bias"],
        "qformer.layers.2.crossattention.key.weight": lavis[L + "2.crossattention.self.key.weight"],
        "qformer.layers.0.crossattention.out.weight": lavis[L + "0.crossattention.output.dense.weight"],
        "qformer.embeddings.layernorm.weight": lavis["Qformer.bert.embeddings.LayerNorm.weight"],
        "ln_vision.bias": lavis["ln_vision.bias"],
        "language_projection.weight": lavis["opt_proj.weight"],
        "language_projection.bias": lavis["opt_proj.bias"],
        "vision.blocks.1.attn.q_bias": vit["blocks.1.attn.q_bias"],
        "vision.blocks.1.attn.v_bias": vit["blocks.1.attn.v_bias"],
        "vision.blocks.0.attn.qkv.weight": vit["blocks.0.attn.qkv.weight"],
        "vision.patch_embed.weight": vit["patch_embed.proj.weight"],
        "vision.pos_embed": vit["pos_embed"],
    }
    for ours, ref in pairs.items():
        torch.testing.assert_close(sd[ours], ref, rtol=0, atol=0, msg=ours)
    rep = m.load_report
    assert rep["random"] == ["llm"]
    assert set(rep["loaded"]) == {"vision", "ln_vision", "qformer", "language_projection"}
    assert rep["lavis_architecture"] == "blip2_opt"
    assert any("position_ids" in k for k in rep["ignored"])
    assert any("random weights: llm" in r.getMessage() for r in caplog.records)
    assert not any(p.requires_grad for p in m.vision.parameters())  # the ViT stays frozen


def test_stage1_file_enables_heads_and_text(tmp_path, caplog):
    lavis = lavis_state(text=True, lm_head=True, heads=True)
    cfg = Blip2Config.from_hf(json.loads(hf_config(blip2_hf(OPT), tmp_path).read_text()))
    assert not cfg.stage1_heads and not cfg.qformer.lm_head
    with caplog.at_level(logging.WARNING, logger="blip2.lavis_load"):
        m = load_lavis(save_pth(tmp_path / "blip2_pretrained.pth", lavis), cfg)
    assert m.cfg.stage1_heads and m.cfg.qformer.use_text and m.cfg.qformer.lm_head
    assert len(m.load_report["config_changes"]) == 3
    assert any("enabled stage1_heads" in r.getMessage() for r in caplog.records)
    assert m.load_report["random"] == ["vision", "language_projection", "llm"]
    c, L = "Qformer.cls.predictions.", "Qformer.bert.encoder.layer."
    sd = m.state_dict()
    for ours, ref in {
        "qformer.lm_head.dense.weight": lavis[c + "transform.dense.weight"],
        "qformer.lm_head.norm.bias": lavis[c + "transform.LayerNorm.bias"],
        "qformer.lm_head.bias": lavis[c + "bias"],
        "qformer.embeddings.word_embeddings.weight": lavis["Qformer.bert.embeddings.word_embeddings.weight"],
        "qformer.embeddings.position_embeddings.weight": lavis["Qformer.bert.embeddings.position_embeddings.weight"],
        "qformer.layers.1.ffn_text.fc1.weight": lavis[L + "1.intermediate.dense.weight"],
        "qformer.layers.2.ffn_text.norm.weight": lavis[L + "2.output.LayerNorm.weight"],
        "temp": lavis["temp"], "itm_head.weight": lavis["itm_head.weight"],
        "vision_proj.bias": lavis["vision_proj.bias"], "text_proj.weight": lavis["text_proj.weight"],
    }.items():
        torch.testing.assert_close(sd[ours], ref, rtol=0, atol=0, msg=ours)
    # BERT's LM head by hand: decoder(LayerNorm(gelu(dense(h)))) with LAVIS's decoder weight and bias
    h = torch.randn(2, 5, 32)
    x = F.gelu(F.linear(h, lavis[c + "transform.dense.weight"], lavis[c + "transform.dense.bias"]))
    x = F.layer_norm(x, (32,), lavis[c + "transform.LayerNorm.weight"], lavis[c + "transform.LayerNorm.bias"], 1e-12)
    ref = F.linear(x, lavis[c + "decoder.weight"], lavis[c + "decoder.bias"])
    torch.testing.assert_close(m.qformer.lm_logits(h), ref, atol=1e-5, rtol=1e-5)


def test_preset_config_by_name(tmp_path):
    # tiny-opt: Q-Former 2 layers, FFN 64, vocab 100; OPT width 32
    lavis = lavis_state(proj="opt_proj", proj_dim=32, layers=2, I=64, vocab=100)
    m = load_lavis(save_pth(tmp_path / "a.pth", lavis), "tiny-opt")
    torch.testing.assert_close(m.language_projection.weight, lavis["opt_proj.weight"], rtol=0, atol=0)


# ------------------------------------------------------------------------- agreement with transformers
@pytest.mark.parametrize("kind,lavis", [
    ("blip2", lavis_state(proj="opt_proj", vit=True)),
    ("instructblip", lavis_state(proj="llm_proj", text=True, vit=True)),
    ("itm", lavis_state(text=True, lm_head=True, heads=True, vit=True)),
])
def test_key_map_agrees_with_transformers_renames(kind, lavis):
    """Every key transformers' converter places, ours places at the same tensor (via our transformers map)."""
    arch = {"blip2": "blip2", "instructblip": "instructblip", "itm": "blip2-retrieval"}[kind]
    ref, unknown_ref = hf_to_ours({k: v for k, v in hf_names(lavis, kind).items() if not k.startswith("Qformer.cls")
                                   and k != "temp"}, arch)
    assert unknown_ref == []
    ours, unknown = lavis_to_ours(lavis)
    assert unknown == []
    only_lavis = {k for k in ours if k.startswith("qformer.lm_head.") or k == "temp"}  # not in transformers
    assert set(ours) - only_lavis == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)


def _hf_logits(hf, px, ids, **kw):
    return hf(pixel_values=px, input_ids=with_placeholders(ids)[0], **kw).logits[:, NUM_QUERY:]


def test_blip2_opt_logits_match_transformers(tmp_path):
    hf = blip2_hf(OPT, seed=3)
    lavis = lavis_state(proj="opt_proj")
    vit = eva_vit_state()
    load_into_hf(hf, {**lavis, **{"visual_encoder." + k: v for k, v in vit.items()}}, "blip2")
    torch.save(vit, tmp_path / "vit.pth")
    ours = load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf, tmp_path), vit=tmp_path / "vit.pth",
                      llm=hf.language_model)
    assert ours.load_report["random"] == []
    px, ids = pixels(2), text_ids(2, 5, 200)
    torch.testing.assert_close(ours(pixel_values=px, input_ids=ids).logits, _hf_logits(hf, px, ids),
                               atol=1e-5, rtol=1e-5)


def test_instructblip_llm_proj_logits_match_transformers(tmp_path):
    hf = instructblip_hf(LLAMA_GQA, seed=4)
    lavis = lavis_state(proj="llm_proj", text=True, vit=True)  # a file with a trained ViT
    load_into_hf(hf, lavis, "instructblip")
    ours = load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf, tmp_path), llm=hf.language_model)
    assert ours.load_report["lavis_architecture"] == "blip2_vicuna_instruct"
    px, ids, q = pixels(2), text_ids(2, 5, 200), text_ids(2, 6, 120, seed=7)
    qm = torch.ones_like(q)
    qm[1, 4:] = 0
    kw = dict(qformer_input_ids=q, qformer_attention_mask=qm)
    torch.testing.assert_close(ours(pixel_values=px, input_ids=ids, **kw).logits, _hf_logits(hf, px, ids, **kw),
                               atol=1e-5, rtol=1e-5)


def test_stage1_itm_matches_transformers_retrieval(tmp_path):
    hf = retrieval_hf(seed=5)
    lavis = lavis_state(text=True, lm_head=True, heads=True, vit=True)
    load_into_hf(hf, lavis, "itm")
    ours = load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf, tmp_path))
    assert ours.load_report["random"] == []
    px, ids = pixels(3), text_ids(3, 7, 120)
    m = torch.ones_like(ids)
    m[2, 5:] = 0
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=m, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(ours.itm_logits(px, ids, m), ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- ViT and LLM files
def test_vit_file_extra_block_dropped_and_positions_resized(tmp_path):
    """eva_vit_g.pth has one block more than BLIP-2 uses; a larger image size resizes the position table as
    transformers' interpolate_pos_encoding does at run time."""
    hf = blip2_hf(OPT, seed=6)
    vit, lavis = eva_vit_state(blocks=3), lavis_state(proj="opt_proj")
    used = {"visual_encoder." + k: v for k, v in vit.items() if not k.startswith("blocks.2.")}
    load_into_hf(hf, {**lavis, **used}, "blip2")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    cfg = json.loads(hf_config(hf, tmp_path).read_text())
    cfg["vision_config"]["image_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_lavis(save_pth(tmp_path / "a.pth", lavis), tmp_path / "config.json", vit=tmp_path / "eva_vit_g.pth")
    assert any(k.endswith("blocks.2.mlp.fc2.bias") for k in ours.load_report["ignored"])
    assert ours.vision.pos_embed.shape == (1, 37, 32)
    px = pixels(2, size=48)
    ref = hf.vision_model(px, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours.encode_image(px), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bare", [False, True])
def test_llm_from_directory(hf_opt, tmp_path, bare):
    d = tmp_path / "opt"
    if bare:  # facebook/opt-* files hold the base model's keys (no "model." prefix)
        d.mkdir()
        sd = {k.removeprefix("model."): v for k, v in hf_opt.language_model.state_dict().items()}
        torch.save(sd, d / "pytorch_model.bin")
    else:
        hf_opt.language_model.save_pretrained(d)
    ours = load_lavis(save_pth(tmp_path / "a.pth", lavis_state(proj="opt_proj")), hf_config(hf_opt, tmp_path), llm=d)
    assert "llm" in ours.load_report["loaded"]
    ref = hf_opt.language_model.state_dict()
    for k, v in ours.llm.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------- saving
def _tiny_cfg(**over):
    cfg = Blip2Config.from_preset("tiny-opt", stage1_heads=True, **over)
    cfg.qformer.lm_head = True
    return Blip2Config.from_dict(cfg.to_dict())


@pytest.mark.parametrize("trained", [False, True])
def test_save_then_load_round_trip(tmp_path, trained):
    """trained=True: ViT and LLM were trained too, so the file holds visual_encoder.* and opt_model.*."""
    from blip2.model import Blip2Model

    torch.manual_seed(0)
    a = Blip2Model(_tiny_cfg(vision_trainable=trained, llm_trainable=trained))
    for p in a.parameters():  # LayerNorms, biases and temp are constants at init; make every value distinct
        p.add_(torch.randn_like(p) * 0.1)
    save_lavis(a, tmp_path / "ckpt.pth")
    raw = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert set(raw) == {"model"}
    keys = set(raw["model"])
    assert {"opt_proj.weight", "temp", "Qformer.cls.predictions.decoder.weight", "query_tokens"} <= keys
    assert any(k.startswith("opt_model.") for k in keys) == trained  # a frozen LLM is not written
    assert any(k.startswith("visual_encoder.") for k in keys) == trained
    assert not list(tmp_path.glob(".ckpt.pth*"))  # no temporary file left
    b = load_lavis(tmp_path / "ckpt.pth", a.cfg, llm=None if trained else a.llm)
    assert b.load_report["random"] == ([] if trained else ["vision"])
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        if trained or not k.startswith("vision."):
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


def test_trained_vit_in_checkpoint_wins_over_vit_file(hf_opt, tmp_path):
    lavis = lavis_state(proj="opt_proj", vit=True)
    torch.save(eva_vit_state(seed=9), tmp_path / "eva.pth")
    m = load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf_opt, tmp_path), vit=tmp_path / "eva.pth")
    torch.testing.assert_close(m.vision.blocks[0].mlp.fc1.weight, lavis["visual_encoder.blocks.0.mlp.fc1.weight"],
                               rtol=0, atol=0)
    assert any("trained" in n for n in m.load_report["notes"])


def test_projection_names_follow_the_llm():
    cfgs = {"blip2_opt": Blip2Config.from_preset("tiny-opt"),
            "blip2_t5": Blip2Config.from_preset("blip2-flan-t5-xl"),
            "blip2_t5_instruct": Blip2Config.from_preset("instructblip-flan-t5-xl"),
            "blip2_vicuna_instruct": Blip2Config.from_preset("instructblip-vicuna-7b"),
            "blip2": Blip2Config.from_preset("blip2-itm-vit-g")}
    for arch, cfg in cfgs.items():
        assert lavis_architecture(cfg) == arch
    w = {"language_projection.weight": torch.zeros(2, 2)}
    assert set(ours_to_lavis(w, "blip2_t5")) == {"t5_proj.weight"}
    assert set(ours_to_lavis(w, "blip2_vicuna_instruct")) == {"llm_proj.weight"}
    assert set(ours_to_lavis({"llm.lm_head.weight": torch.zeros(1)}, "blip2_opt")) == {"opt_model.lm_head.weight"}
    with pytest.raises(CheckpointError, match="no language model"):
        ours_to_lavis(w, "blip2")


# ----------------------------------------------------------------------------------------------- errors
def test_file_without_model_dict(tmp_path):
    torch.save(eva_vit_state(), tmp_path / "eva.pth")
    with pytest.raises(CheckpointError, match=r"eva\.pth is not a LAVIS checkpoint.*vit="):
        read_lavis(tmp_path / "eva.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        read_lavis(tmp_path / "absent.pth")


def test_shape_mismatch_names_the_key(hf_opt, tmp_path):
    lavis = lavis_state(proj="opt_proj", Q=5)  # 5 queries, the config has 4
    with pytest.raises(CheckpointError, match=r"shape mismatch.*query_tokens \[1, 5, 32\]"):
        load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf_opt, tmp_path))


def test_unknown_key_strict_and_lenient(hf_opt, tmp_path):
    lavis = lavis_state(proj="opt_proj")
    lavis["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    lavis["Qformer.bert.encoder.layer.1.crossattention.self.query.weight"] = torch.zeros(32, 32)  # no such layer
    path, cfg = save_pth(tmp_path / "a.pth", lavis), hf_config(hf_opt, tmp_path)
    with pytest.raises(CheckpointError, match=r"2 weight\(s\) with no place.*rotary.*layer\.1\.crossattention"):
        load_lavis(path, cfg)
    m = load_lavis(path, cfg, strict=False)
    assert len(m.load_report["unknown"]) == 2


def test_missing_qformer_weight_strict_and_lenient(hf_opt, tmp_path):
    lavis = lavis_state(proj="opt_proj")
    del lavis["Qformer.bert.encoder.layer.2.output_query.dense.weight"]
    path, cfg = save_pth(tmp_path / "a.pth", lavis), hf_config(hf_opt, tmp_path)
    with pytest.raises(CheckpointError, match=r"qformer: missing qformer\.layers\.2\.ffn_query\.fc2\.weight"):
        load_lavis(path, cfg)
    m = load_lavis(path, cfg, strict=False)
    assert m.load_report["partial"] == {"qformer": ["qformer.layers.2.ffn_query.fc2.weight"]}


def test_untied_decoder_is_an_error(tmp_path):
    lavis = lavis_state(text=True, lm_head=True, heads=True)
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="decoder.weight differs from Qformer.bert.embeddings.word_embeddings"):
        lavis_to_ours(lavis)


def test_t5_config_rejects_opt_sized_projection(tmp_path):
    """A projection of the wrong width (a checkpoint for another LLM) fails on shape, naming the LAVIS key."""
    hf = blip2_hf(T5_UNTIED)
    lavis = lavis_state(proj="t5_proj", proj_dim=40)
    with pytest.raises(CheckpointError, match=r"t5_proj\.weight \[40, 32\]"):
        load_lavis(save_pth(tmp_path / "a.pth", lavis), hf_config(hf, tmp_path))


def test_blip2_load_routes_pth_files(tmp_path):
    import blip2
    from blip2.config import ConfigError

    f = tmp_path / "ckpt.pth"
    torch.save({"model": {}}, f)
    with pytest.raises(ConfigError, match="pass config="):
        blip2.load(f)
