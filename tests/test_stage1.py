"""Stage-1 objective: one process vs two processes (gloo, torchrun), and the losses' behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "stage1_equivalence.py"


def _run(out: Path, nproc: int, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(WORKER), str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("extra", [[], ["--image-ids"]], ids=["plain", "image-ids"])
def test_two_processes_equal_one(tmp_path, extra):
    one = _run(tmp_path / "one.pt", 1, *extra)
    two = _run(tmp_path / "two.pt", 2, *extra)
    assert set(one) == set(two)
    for k in ("itc_loss", "itm_loss", "itg_loss", "loss"):
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=k)
    grads = [k for k in one if k.startswith("grad.")]
    assert any("crossattention" in k for k in grads) and "grad.temp" in grads and "grad.ln_vision.weight" in grads
    for k in grads:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------------------------ learning test
COLORS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]]).float()


def _color_batch(g: torch.Generator, B: int = 8):
    """8 colour classes: a noisy solid-colour image; the caption is two class-specific tokens."""
    cls = torch.randperm(8, generator=g)[:B]
    px = COLORS[cls][:, :, None, None].expand(B, 3, 32, 32) * 2 - 1 + 0.3 * torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.zeros(B, 6, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = 2, 10 + cls, 20 + cls, 3  # [CLS] w1 w2 [SEP] pad pad
    mask = torch.ones_like(ids)
    mask[:, 4:] = 0
    return px, ids, mask


def test_stage1_learns():
    from blip2.config import VisionConfig
    from blip2.model import Blip2Model
    from blip2.stage1 import stage1_config

    torch.manual_seed(0)
    cfg = stage1_config(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                                     mlp_hidden_size=64),
                        num_query_tokens=4, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32, initializer_range=0.1)
    model = Blip2Model(cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g, gn = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    history = []
    for _ in range(100):
        out = model.losses(*_color_batch(g), generator=gn)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    last = {k: sum(h[k] for h in history[-10:]) / 10 for k in history[0]}
    assert last["itc_loss"] < 0.6 * first["itc_loss"], (first, last)
    assert last["itg_loss"] < 0.6 * first["itg_loss"], (first, last)
    assert last["itm_loss"] < first["itm_loss"] - 0.01, (first, last)
    model.eval()
    with torch.no_grad():
        px, ids, mask = _color_batch(torch.Generator().manual_seed(123))
        s = model.itc_scores(px, ids, mask)  # (8 images, 8 texts), the diagonal matches
    acc_i2t = (s.argmax(1) == torch.arange(8)).float().mean().item()
    acc_t2i = (s.argmax(0) == torch.arange(8)).float().mean().item()
    assert acc_i2t >= 0.75 and acc_t2i >= 0.75, (acc_i2t, acc_t2i)  # chance: 0.125


def test_decoder_token_id_sources():
    from types import SimpleNamespace

    from blip2.stage1 import decoder_token_id

    def model(bos=None, vocab=100, tok=None):
        cfg = SimpleNamespace(qformer=SimpleNamespace(bos_token_id=bos, vocab_size=vocab))
        return SimpleNamespace(cfg=cfg, processor=SimpleNamespace(tokenizer=tok, qformer_tokenizer=None))

    assert decoder_token_id(model()) == 99  # the last id, where LAVIS appends [DEC]
    assert decoder_token_id(model(bos=42)) == 42
    tok = SimpleNamespace(bos_token="[DEC]", bos_token_id=7)
    assert decoder_token_id(model(bos=42, tok=tok)) == 7


def test_grad_checkpointing_gives_the_same_losses_and_grads():
    from blip2.config import VisionConfig
    from blip2.model import Blip2Model
    from blip2.stage1 import stage1_config

    torch.manual_seed(0)
    cfg = stage1_config(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                                     mlp_hidden_size=64),
                        num_query_tokens=4, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    model = Blip2Model(cfg).train()
    batch = _color_batch(torch.Generator().manual_seed(5))
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model.losses(*batch, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6) and set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
