"""Chunked log-probs from hidden states equal the plain logits computation, values and grads."""

import pytest
import torch

from alignkit.ops.logps import (
    ROWS_PER_PASS,
    label_positions,
    per_sequence_sum,
    plain_target_logps,
    target_logps,
)
from alignkit.train.forward import LogpsModel


# 70 rows: a chunk of 40 or 1024 is worked on in passes of ROWS_PER_PASS, the last one short;
# 1024 is one chunk, kept for the backward
@pytest.mark.parametrize("chunk", [1, 3, 40, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_plain_values_and_grads(chunk, temperature):
    torch.manual_seed(0)
    n = 70
    assert ROWS_PER_PASS < 40 < n
    h1 = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    w2 = w1.detach().clone().requires_grad_(True)
    t = torch.randint(0, 50, (n,))
    weights = torch.randn(n, dtype=torch.float64)

    ours = target_logps(h1, w1, t, chunk_size=chunk, temperature=temperature)
    ref = plain_target_logps(h2 @ w2.T, t, temperature=temperature)
    torch.testing.assert_close(ours.double(), ref.double(), atol=1e-5, rtol=1e-5)
    (ours.double() * weights).sum().backward()
    (ref.double() * weights).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, 1024])  # recomputed, kept (and overwritten) logits
def test_a_second_backward_gives_the_same_gradient(chunk):
    torch.manual_seed(1)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(50, 8)
    loss = target_logps(h, w, torch.randint(0, 50, (10,)), chunk_size=chunk).sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    loss.backward()
    torch.testing.assert_close(h.grad, first)


def test_frozen_head_gets_no_grad_and_empty_input_is_fine():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(20, 8)
    target_logps(h, w, torch.tensor([1, 2, 3, 4])).sum().backward()
    assert h.grad is not None and w.grad is None
    empty = target_logps(torch.zeros(0, 8, requires_grad=True), w, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_label_positions_shift_and_sums():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    pos = label_positions(labels)
    # token at t is predicted from position t-1
    assert pos.rows.tolist() == [0, 0, 1, 1]
    assert pos.cols.tolist() == [0, 1, 1, 2]
    assert pos.targets.tolist() == [5, 6, 7, 8]
    sums = per_sequence_sum(torch.tensor([1.0, 2.0, 3.0, 4.0]), pos.rows, 2)
    assert sums.tolist() == [3.0, 7.0]


def test_logps_model_matches_full_logits(tiny_model):
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second row
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    out = LogpsModel(tiny_model, chunk_size=4)(ids, mask, labels)
    logits = tiny_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    ref = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
    keep = labels[:, 1:] != -100
    expected = (ref * keep).sum(1)
    torch.testing.assert_close(out.seq_logps, expected, atol=1e-5, rtol=1e-5)
    assert out.seq_tokens.tolist() == keep.sum(1).float().tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logps_model_packed_equals_unpacked(attn):
    from alignkit.data import TokenizedExample, collate, collate_packed, pack_examples
    from tests.conftest import make_tiny_model

    model = make_tiny_model(attn_implementation=attn)
    torch.manual_seed(2)
    examples = []
    for n in (5, 9, 4, 7):
        ids = torch.randint(3, 900, (n,)).tolist()
        examples.append(TokenizedExample(ids, [-100, -100] + ids[2:]))
    wrapped = LogpsModel(model)
    plain = collate(examples, pad_id=2)
    packed = collate_packed(pack_examples(examples, 16), pad_id=2)
    assert packed["attention_mask"].dim() == 4 and packed["input_ids"].shape[0] < 4
    a = wrapped(**plain).seq_logps.sum()
    b = wrapped(**packed).seq_logps.sum()
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
