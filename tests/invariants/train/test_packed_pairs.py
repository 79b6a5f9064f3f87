"""Packing invariant: a micro-batch's preference pairs (prefix-shared) or rows laid back to back
in one unpadded row give every response the log-prob, and the model the gradient, of the plain
padded rows; and attention run span by span equals attention over the whole row under the block
mask. A prompt may be shared by any number of responses, and responses may continue the prompts
of an earlier packed row from its kept keys and values: the same log-probs again.

The tests can fail: spans that cut an example in two change its log-probs (so the spans do reach
attention), a spy shows each attention call covers one example, not the whole row, and kept keys
and values that are not the prompt's change a continuation's log-probs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from alignkit.config import DataConfig
from alignkit.data.pair_batching import (
    collate_packed_continuations,
    collate_packed_pairs,
    collate_packed_rows,
    collate_packed_shared,
    collate_pairs,
    collate_rows,
    token_count,
)
from alignkit.data.preference import load_preference_data
from alignkit.ops import packed_attention
from alignkit.train.forward import LogpsModel
from alignkit.train.method import segment_logps

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


def test_shared_prompt_groups_equal_plain_rows(pairs, wrapped):
    """One prompt with three responses, one with a single response (a causal block), one with
    two: each response gets its plain row's log-prob and gradient."""
    a, b, c = pairs[:3]
    groups = [
        (a.prompt_ids, [(a.chosen_ids, 0), (a.rejected_ids, 1), (b.chosen_ids, 2)]),
        (b.prompt_ids, [(b.rejected_ids, 3)]),
        (c.prompt_ids, [(c.chosen_ids, 4), (c.rejected_ids, 5)]),
    ]
    rows = [(prompt, r) for prompt, responses in groups for r, _ in responses]
    packed = collate_packed_shared(groups, pad_id=2)
    assert packed["input_ids"].shape[1] == sum(
        len(prompt) + sum(len(r) for r, _ in responses) for prompt, responses in groups
    )
    assert packed["spans"][:, 2].tolist() == [0, 1, 0]  # the single response is a causal row
    assert_same(
        logps_and_grads(wrapped, packed, 6), logps_and_grads(wrapped, collate_rows(rows, 2), 6)
    )


def continuation_setup(pairs):
    """The chosen rows packed, and the rejected replies continuing their prompts (the first
    prompt cut to one token, so its kept prefix is empty)."""
    rows = [(e.prompt_ids, e.chosen_ids) for e in pairs]
    rows[0] = (rows[0][0][-1:], rows[0][1])
    later = [(p, e.rejected_ids) for (p, _), e in zip(rows, pairs, strict=True)]
    first = collate_packed_rows(rows, pad_id=2)
    cont = collate_packed_continuations(later, first["spans"][:, 0].tolist(), pad_id=2)
    return first, cont, later


def test_continuation_equals_the_full_rows(pairs, attention_calls):
    """Responses continuing the prompts kept from a training forward get the log-probs of their
    full rows, while attention runs only their own tokens as queries (the last prompt token and
    the response) against the kept prompt keys and their own."""
    wrapped = LogpsModel(make_tiny_model(seed=5))
    first, cont, later = continuation_setup(pairs)
    assert cont["input_ids"].shape[1] == sum(1 + len(r) for _, r in later)
    assert cont["prefix"].tolist() == [
        [s, s + len(p) - 1] for s, (p, _) in zip(first["spans"][:, 0].tolist(), later, strict=True)
    ]
    kept = packed_attention.KVStore()
    n = len(pairs)
    segment_logps(wrapped, first, n, kv_out=kept)
    assert len(kept.kv) == wrapped.model.config.num_hidden_layers
    attention_calls.clear()
    with torch.no_grad():
        got, _ = segment_logps(wrapped, cont, n, kv_in=kept)
        layers = wrapped.model.config.num_hidden_layers
        assert attention_calls == [1 + len(r) for _, r in later] * layers
        want, _ = segment_logps(wrapped, collate_rows(later, pad_id=2), n)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_continuation_reads_the_kept_prompts(pairs):
    """Kept keys and values of other prompts (the same rows with each prompt reversed) change
    every continuation whose prompt has more than one token, and only those."""
    wrapped = LogpsModel(make_tiny_model(seed=5))
    first, cont, later = continuation_setup(pairs)
    n = len(pairs)
    other = collate_packed_rows([(p[::-1], r) for p, r in later], pad_id=2)
    right, wrong = packed_attention.KVStore(), packed_attention.KVStore()
    with torch.no_grad():
        segment_logps(wrapped, first, n, kv_out=right)
        segment_logps(wrapped, other, n, kv_out=wrong)
        good, _ = segment_logps(wrapped, cont, n, kv_in=right)
        bad, _ = segment_logps(wrapped, cont, n, kv_in=wrong)
    torch.testing.assert_close(bad[0], good[0], atol=ATOL, rtol=0)  # empty prefix: nothing read
    assert (bad[1:] - good[1:]).abs().min() > 1e-3


def test_continuation_needs_span_attention(pairs):
    eager = LogpsModel(make_tiny_model(seed=5, attn_implementation="eager"))
    first, cont, _ = continuation_setup(pairs)
    kept = packed_attention.KVStore()
    with torch.no_grad():
        segment_logps(eager, first, len(pairs), kv_out=kept)
        assert not kept  # eager attention keeps nothing: callers fall back to the full rows
        with pytest.raises(ValueError, match="needs a packed batch and SDPA"):
            segment_logps(eager, cont, len(pairs), kv_in=kept)
    sdpa = LogpsModel(make_tiny_model(seed=5))
    with pytest.raises(ValueError, match="a filled store"), torch.no_grad():
        segment_logps(sdpa, cont, len(pairs), kv_in=kept)
