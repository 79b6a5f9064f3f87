"""Packing invariant: a micro-batch's preference pairs (prefix-shared) or rows laid back to back
in one unpadded row give every response the log-prob, and the model the gradient, of the plain
padded rows; and attention run span by span equals attention over the whole row under the block
mask.

The tests can fail: spans that cut an example in two change its log-probs (so the spans do reach
attention), and a spy shows each attention call covers one example, not the whole row.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from alignkit.config import DataConfig
from alignkit.data.pair_batching import (
    collate_packed_pairs,
    collate_packed_rows,
    collate_pairs,
    collate_rows,
    token_count,
)
from alignkit.data.preference import load_preference_data
from alignkit.ops import packed_attention
from alignkit.train.forward import LogpsModel
from alignkit.train.preference import segment_logps

ATOL = 1e-4


@pytest.fixture(scope="module")
def pairs(tokenizer, data_dir):
    """Four real HH pairs of unequal lengths, prompts cut from the left so rows stay short."""
    cfg = DataConfig(
        train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"),
        limit=12,
        max_length=96,
        truncation="truncate",
    )
    train = load_preference_data(cfg, tokenizer, seed=0).train[:4]
    assert len({e.shared_len for e in train}) > 1
    return train


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def wrapped(request):
    return LogpsModel(make_tiny_model(seed=5, attn_implementation=request.param))


def logps_and_grads(wrapped, batch, n):
    wrapped.zero_grad(set_to_none=True)
    logps, _ = segment_logps(wrapped, batch, n)
    (logps * torch.linspace(0.5, 1.5, n)).sum().backward()  # weights make every segment count
    grads = {k: p.grad.clone() for k, p in wrapped.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=0)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=ATOL, rtol=1e-4, msg=k)


def test_packed_pairs_equal_plain_rows(pairs, wrapped):
    n = 2 * len(pairs)
    packed = collate_packed_pairs(pairs, pad_id=2)
    assert packed["input_ids"].shape == (1, sum(e.shared_len for e in pairs))  # no padding
    assert token_count(packed) == packed["input_ids"].shape[1]
    assert_same(
        logps_and_grads(wrapped, packed, n), logps_and_grads(wrapped, collate_pairs(pairs, 2), n)
    )


def test_packed_rows_equal_padded_rows(pairs, wrapped):
    rows = [(e.prompt_ids, e.chosen_ids) for e in pairs] + [
        (e.prompt_ids, e.rejected_ids) for e in pairs
    ]
    packed, padded = collate_packed_rows(rows, pad_id=2), collate_rows(rows, pad_id=2)
    assert token_count(packed) == token_count(padded) == packed["input_ids"].shape[1]
    assert packed["spans"][:, 2].tolist() == [1] * len(rows)  # plain rows: causal blocks
    n = len(rows)
    assert_same(logps_and_grads(wrapped, packed, n), logps_and_grads(wrapped, padded, n))


@pytest.fixture
def attention_calls(monkeypatch) -> list[int]:
    """The query length of every SDPA call made through alignkit's packed attention."""
    seen: list[int] = []
    packed_attention.install()
    real = packed_attention._replaced["sdpa"]

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setitem(packed_attention._replaced, "sdpa", spy)
    return seen


def test_span_attention_equals_the_whole_row_under_the_block_mask(pairs, attention_calls):
    """The same packed batch with and without spans: equal values, and with spans every
    attention call sees one example, without them the whole row."""
    wrapped = LogpsModel(make_tiny_model(seed=5))
    batch = collate_packed_pairs(pairs, pad_id=2)
    n, width = 2 * len(pairs), batch["input_ids"].shape[1]
    whole = {k: v for k, v in batch.items() if k != "spans"}
    with_spans = logps_and_grads(wrapped, batch, n)
    layers = wrapped.model.config.num_hidden_layers
    assert attention_calls == [e.shared_len for e in pairs] * layers
    attention_calls.clear()
    without = logps_and_grads(wrapped, whole, n)
    assert attention_calls == [width] * layers
    assert_same(with_spans, without)


def test_spans_reach_attention(pairs):
    """Cutting the first example in two inside its chosen reply (the second part then sees
    nothing of the prompt) must change both of its replies and leave the other examples alone."""
    wrapped = LogpsModel(make_tiny_model(seed=5))
    batch = collate_packed_pairs(pairs, pad_id=2)
    start, end, _ = batch["spans"][0].tolist()
    mid = start + len(pairs[0].prompt_ids) + 1
    cut = torch.tensor([[start, mid, 0], [mid, end, 0]])
    cut = dict(batch, spans=torch.cat([cut, batch["spans"][1:]]))
    n, b = 2 * len(pairs), len(pairs)
    with torch.no_grad():
        right, _ = segment_logps(wrapped, batch, n)
        wrong, _ = segment_logps(wrapped, cut, n)
    assert (wrong[[0, b]] - right[[0, b]]).abs().min() > 1e-3
    keep = [i for i in range(n) if i not in (0, b)]
    torch.testing.assert_close(wrong[keep], right[keep], atol=ATOL, rtol=0)


def test_gradient_checkpointing_recomputes_span_by_span(pairs, attention_calls):
    plain = LogpsModel(make_tiny_model(seed=5))
    ckpt = LogpsModel(make_tiny_model(seed=5))
    ckpt.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train(), plain.train()
    batch, n = collate_packed_pairs(pairs, pad_id=2), 2 * len(pairs)
    expected = logps_and_grads(plain, batch, n)
    attention_calls.clear()
    got = logps_and_grads(ckpt, batch, n)
    # The forward and the backward's recomputation: every call one example.
    layers = ckpt.model.config.num_hidden_layers
    assert attention_calls == [e.shared_len for e in pairs] * layers * 2
    assert_same(got, expected)


def test_bad_spans_are_refused():
    with pytest.raises(ValueError, match="tile the row"):
        packed_attention.spans_from_tensor(torch.tensor([[0, 3, 1], [4, 6, 1]]))  # a gap
    with pytest.raises(ValueError, match="tile the row"):
        packed_attention.spans_from_tensor(torch.tensor([[0, 3, 1], [3, 3, 1]]))  # empty
    with pytest.raises(ValueError, match="tile the row"):
        packed_attention.spans_from_tensor(torch.zeros(0, 3, dtype=torch.long))
    q = torch.zeros(2, 1, 4, 8)
    packed_attention.install()
    with pytest.raises(ValueError, match="one row"):
        packed_attention.packed_attention(None, q, q, q, None, alignkit_spans=((0, 4, True),))
    one = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="spans end at 3, the row at 4"):
        packed_attention.packed_attention(None, one, one, one, None, alignkit_spans=((0, 3, True),))
