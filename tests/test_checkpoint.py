"""Checkpoint layouts (sharded, legacy .bin, tied weights present or absent) and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import blip2
from blip2.checkpoint import CheckpointError
from blip2.config import ConfigError
from hf_models import OPT, T5_UNTIED, blip2_hf, pixels, text_ids



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def hf_opt():
    return blip2_hf(OPT)


def _same(model_dir, hf):
    ours = blip2.load(model_dir)
    px, ids = pixels(2), text_ids(2, 5, 200)
    from hf_models import NUM_QUERY, with_placeholders

    ref = hf(pixel_values=px, input_ids=with_placeholders(ids)[0]).logits[:, NUM_QUERY:]
    torch.testing.assert_close(ours(pixel_values=px, input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_sharded_safetensors(hf_opt, tmp_path):
    hf_opt.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _same(tmp_path, hf_opt)


def test_legacy_bin_with_tied_weights_present(hf_opt, tmp_path):
    sd = hf_opt.state_dict()  # the state dict holds lm_head.weight and embed_tokens.weight (tied)
    assert "language_model.lm_head.weight" in sd
    torch.save(dict(sd), tmp_path / "pytorch_model.bin")
    hf_opt.config.save_pretrained(tmp_path)
    _same(tmp_path, hf_opt)


def test_sharded_bin(hf_opt, tmp_path):
    sd = dict(hf_opt.state_dict())
    keys = sorted(sd)
    a, b = keys[: len(keys) // 2], keys[len(keys) // 2:]
    torch.save({k: sd[k] for k in a}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in b}, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in a} | {k: "pytorch_model-00002-of-00002.bin" for k in b}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    hf_opt.config.save_pretrained(tmp_path)
    _same(tmp_path, hf_opt)


def test_our_sharded_save_roundtrip(hf_opt, tmp_path):
    ours = blip2.load(_saved(hf_opt, tmp_path / "src"))
    ours.save_pretrained(tmp_path / "out", max_shard_size=50_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    _same(tmp_path / "out", hf_opt)


def _saved(hf, d):
    hf.save_pretrained(d)
    return d


def test_missing_shard_error(hf_opt, tmp_path):
    hf_opt.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        blip2.load(tmp_path)


def test_truncated_safetensors_error(hf_opt, tmp_path):
    hf_opt.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        blip2.load(tmp_path)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_config_type_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForX"]}))
    with pytest.raises(ConfigError, match="unsupported model type 'llava'"):
        blip2.load(tmp_path)


def test_missing_and_mismatched_keys_are_listed(hf_opt, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_opt.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("qformer.encoder.layer.1.output_query.dense.weight")
    sd["language_projection.bias"] = torch.zeros(7)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        blip2.load(tmp_path)
    msg = str(e.value)
    assert "qformer.layers.1.ffn_query.fc2.weight" in msg and "language_projection.bias" in msg


def test_t5_head_untied_when_present_tied_when_absent(tmp_path):
    """Flan-T5 files carry their own head; transformers 5 ties T5's head when the file has none. Both load the
    same way transformers' from_pretrained does."""
    from safetensors.torch import load_file, save_file
    from transformers import Blip2ForConditionalGeneration

    hf = blip2_hf(T5_UNTIED)
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert "language_model.lm_head.weight" in sd
    ours = blip2.load(tmp_path)
    assert ours.llm.lm_head.weight is not ours.llm.shared.weight
    torch.testing.assert_close(ours.llm.lm_head.weight, hf.language_model.lm_head.weight)
    sd.pop("language_model.lm_head.weight")
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = blip2.load(tmp_path)
    ref = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.llm.lm_head.weight is ours.llm.shared.weight
    torch.testing.assert_close(ours.llm.lm_head.weight, ref.language_model.lm_head.weight)


def test_no_directory_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        blip2.load(tmp_path / "nope")


def test_cli_prints_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "blip2.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "invalid JSON" in lines[0], r.stderr


def test_info_counts_parameters(hf_opt, tmp_path):
    from blip2.info import describe

    hf_opt.save_pretrained(tmp_path)
    info = describe(tmp_path)
    unique = {id(p): p for p in hf_opt.parameters()}
    assert info["parameters"]["total"] == sum(p.numel() for p in unique.values())
    assert info["parameters"]["vision encoder"] == sum(p.numel() for p in hf_opt.vision_model.parameters())
