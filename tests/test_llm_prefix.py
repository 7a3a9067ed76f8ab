"""`Blip2Config.llm_prefix_ids`: tokens in front of the visual prompt, checked against the LLM run by hand on
[prefix embeddings, projected queries, text embeddings]; kept through save/load; refused for encoder-decoders."""

import pytest
import torch

from blip2.config import Blip2Config, ConfigError
from blip2.model import Blip2Model


def _model(prefix):
    torch.manual_seed(0)
    model = Blip2Model(Blip2Config.from_preset("tiny-opt", llm_prefix_ids=prefix)).eval()
    return model


def test_forward_and_loss_match_the_llm_on_hand_built_inputs():
    model = _model([2, 7])
    size = model.cfg.vision.image_size
    px = torch.randn(2, 3, size, size)
    ids = torch.randint(4, 100, (2, 6))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        fast = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, loss_only=True)
        q = model.query_features(px)
        emb = model.llm.get_input_embeddings()
        x = torch.cat([emb(torch.tensor([[2, 7]] * 2)), model.language_projection(q), emb(ids)], dim=1)
        ref = model.llm(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).logits
    n = 2 + model.cfg.num_query_tokens
    torch.testing.assert_close(out.logits, ref[:, n:])
    assert out.language_model_inputs.shape[1] == n
    shifted = ref[:, n - 1:-1]
    want = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(fast.loss, want)


def test_prefix_changes_generation_and_survives_save_load(tmp_path):
    import blip2

    model = _model([2])
    size = model.cfg.vision.image_size
    px = torch.randn(2, 3, size, size)
    model.save_pretrained(tmp_path / "m")
    loaded = blip2.load(tmp_path / "m")
    assert loaded.cfg.llm_prefix_ids == [2]
    a = model.generate(pixel_values=px, max_new_tokens=5)
    assert torch.equal(a, loaded.generate(pixel_values=px, max_new_tokens=5))
    # the same weights without the prefix see another prompt
    plain = Blip2Model(Blip2Config.from_preset("tiny-opt")).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(4, 100, (2, 5))
    with torch.no_grad():
        assert not torch.allclose(plain(pixel_values=px, input_ids=ids).logits, model(pixel_values=px, input_ids=ids).logits)


def test_encoder_decoder_refuses_a_prefix():
    with pytest.raises(ConfigError, match="llm_prefix_ids"):
        Blip2Config.from_preset("tiny-t5", llm_prefix_ids=[1])
