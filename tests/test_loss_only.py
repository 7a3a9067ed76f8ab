"""Training's loss_only path (output head at labelled positions only) gives the full-logits loss and gradients."""

import pytest
import torch

from blip2.config import Blip2Config
from blip2.model import Blip2Model


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama-instruct"])
def test_loss_only_equals_full_logits(preset):
    torch.manual_seed(0)
    model = Blip2Model(Blip2Config.from_preset(preset))
    model.set_trainable(vision=False, llm=False)
    model.eval()  # no dropout: both passes see the same function
    size = model.cfg.vision.image_size
    px = torch.randn(3, 3, size, size)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt that is not learned
    extra = {}
    if model.cfg.architecture == "instructblip":
        extra = {"qformer_input_ids": torch.randint(3, 50, (3, 5)), "qformer_attention_mask": torch.ones(3, 5, dtype=torch.long)}

    def run(loss_only):
        model.zero_grad()
        out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, loss_only=loss_only, **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, g_full = run(False)
    fast, g_fast = run(True)
    assert fast.logits is None and full.logits is not None
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert g_full.keys() == g_fast.keys()
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)
