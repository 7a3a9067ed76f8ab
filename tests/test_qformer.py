"""The three Q-Former masks against hand-written matrices, and behaviour tests that catch a wrong mask."""

from __future__ import annotations

import torch

from blip2.config import QFormerConfig
from blip2.qformer import QFormer, itc_mask, itg_mask, itm_mask

# 2 queries, 3 text positions; row 0 has all text real, row 1 has its last text position padded.
TEXT_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])

# Columns: q0 q1 t0 t1 t2. Rows: the same positions. 1 = may attend.
ITM_ROW0 = [[1, 1, 1, 1, 1]] * 5
ITM_ROW1 = [[1, 1, 1, 1, 0]] * 5
ITC_ROW0 = [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1]]
ITC_ROW1 = [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0]]
ITG_ROW0 = [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1]]
ITG_ROW1 = [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0]]  # the padded key t2 is never visible


def _expect(a, b):
    return torch.tensor([a, b], dtype=torch.bool)


def test_itm_mask_hand_written():
    assert torch.equal(itm_mask(2, TEXT_MASK), _expect(ITM_ROW0, ITM_ROW1))


def test_itc_mask_hand_written():
    assert torch.equal(itc_mask(2, TEXT_MASK), _expect(ITC_ROW0, ITC_ROW1))


def test_itg_mask_hand_written():
    assert torch.equal(itg_mask(2, TEXT_MASK), _expect(ITG_ROW0, ITG_ROW1))


def _tiny():
    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, vocab_size=50,
                        max_position_embeddings=32, num_query_tokens=4, encoder_hidden_size=16, use_text=True,
                        lm_head=True, hidden_dropout=0.0, attention_dropout=0.0)
    q = QFormer(cfg).eval()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return q


IMAGE = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def test_itg_future_text_does_not_change_past_logits():
    q = _tiny()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    t = 3
    changed[:, t + 1] = (changed[:, t + 1] + 7) % 50
    a = q.lm_logits(q(IMAGE, ids, mode="itg").text_output)
    b = q.lm_logits(q(IMAGE, changed, mode="itg").text_output)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4  # and the change is visible after it


def test_query_outputs_depend_on_text_only_in_itm_mode():
    q = _tiny()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    other = (ids + 5) % 50
    for mode in ("itc", "itg"):
        a = q(IMAGE, ids, mode=mode).query_output
        b = q(IMAGE, other, mode=mode).query_output
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, q(IMAGE).query_output)  # = the queries-only pass
    a = q(IMAGE, ids, mode="itm").query_output
    b = q(IMAGE, other, mode="itm").query_output
    assert (a - b).abs().max() > 1e-4


def test_kv_cache_decoding_equals_full_itg_pass():
    """Queries-only pass with a cache, then text token by token == one ITG pass over [queries; text]."""
    q = _tiny()
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    full = q.lm_logits(q(IMAGE, ids, mode="itg").text_output)
    cache = q(IMAGE, use_cache=True).cache
    steps = []
    for t in range(ids.shape[1]):
        out = q(None, ids[:, t:t + 1], mode="itg", past=cache, past_text_len=t, use_cache=True)
        cache = out.cache
        steps.append(q.lm_logits(out.text_output))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_text_only_pass_ignores_padding_values():
    q = _tiny()
    ids = torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    m = torch.tensor([[1, 1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 4:] = 7
    a = q(None, ids, m, mode="itc", with_queries=False).text_output[:, :4]
    b = q(None, other, m, mode="itc", with_queries=False).text_output[:, :4]
    torch.testing.assert_close(a, b)
