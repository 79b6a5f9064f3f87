"""Prefix sharing invariant: [prompt, chosen, rejected] in one row, with the rejected reply masked
from the chosen one and its positions restarting after the prompt, gives every response exactly
the summed log-prob it has in its own plain row (SDPA and eager).

The test can fail: a plain causal mask over the shared row lets the rejected reply see the chosen
one, and not restarting the positions shifts RoPE; both are shown to change the rejected sums.
Also: the plain layout's padding side (owned by the builder) does not change the log-probs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from alignkit.config import DataConfig
from alignkit.data.batching import additive_mask
from alignkit.data.pair_batching import (
    collate_pairs,
    collate_pairs_shared,
    prefix_shared_mask,
    sum_by_segment,
)
from alignkit.data.preference import KTOExample, PairExample, load_preference_data

ATOL = 1e-4


@pytest.fixture(scope="module")
def pairs(tokenizer, data_dir) -> list[PairExample]:
    """Four real HH pairs, prompts cut from the left so rows stay short (a multi-turn one too)."""
    cfg = DataConfig(
        train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"),
        limit=12,
        max_length=96,
        truncation="truncate",
    )
    train = load_preference_data(cfg, tokenizer, seed=0).train
    assert len(train) >= 4
    chosen = train[:4]
    # Unequal response lengths, so padding and the rejected offset both matter.
    assert len({len(e.chosen_ids) for e in chosen}) > 1
    assert any(len(e.chosen_ids) != len(e.rejected_ids) for e in chosen)
    return chosen


def response_logps(model, batch, num_segments: int, **forward) -> torch.Tensor:
    """(2B,) summed log-probs: log_softmax over full logits at the explicit target positions."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=forward.pop("attention_mask", batch["attention_mask"]),
            position_ids=forward.pop("position_ids", batch["position_ids"]),
        ).logits  # (R, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp[batch["pred_rows"], batch["pred_cols"]]  # (N, V): each target's predictor
    token = picked.gather(1, batch["target_ids"][:, None]).squeeze(1)  # (N,)
    return sum_by_segment(token, batch["segment"], num_segments)


_MODELS: dict[str, torch.nn.Module] = {}


def model_for(attn: str):
    """One tiny model per attention kernel (same seed, same weights), built once."""
    if attn not in _MODELS:
        _MODELS[attn] = make_tiny_model(seed=3, attn_implementation=attn)
    assert _MODELS[attn].config._attn_implementation == attn
    return _MODELS[attn]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_shared_equals_plain(pairs, attn):
    model = model_for(attn)
    n = 2 * len(pairs)
    plain = collate_pairs(pairs, pad_id=2)
    shared = collate_pairs_shared(
        pairs, pad_id=2, mask_dtype=torch.float32 if attn == "eager" else None
    )
    assert shared["input_ids"].shape[0] == len(pairs) and plain["input_ids"].shape[0] == n
    expected = response_logps(model, plain, n)
    got = response_logps(model, shared, n)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Segments match the plain rows: chosen i is row i, rejected i is row B + i.
    counts = torch.bincount(shared["segment"], minlength=n)
    lengths = [len(e.chosen_ids) for e in pairs] + [len(e.rejected_ids) for e in pairs]
    assert counts.tolist() == lengths


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_plain_causal_mask_over_the_shared_row_is_wrong(pairs, attn):
    """The invariant is not vacuous: without the masking and the position restart it breaks."""
    model = model_for(attn)
    b, n = len(pairs), 2 * len(pairs)
    expected = response_logps(model, collate_pairs(pairs, pad_id=2), n)
    shared = collate_pairs_shared(pairs, pad_id=2)
    width = shared["input_ids"].shape[1]
    causal = torch.ones(b, 1, width, width, dtype=torch.bool).tril()
    wrong_mask = additive_mask(causal, torch.float32) if attn == "eager" else causal
    leaky = response_logps(model, shared, n, attention_mask=wrong_mask)
    # Chosen replies see the same tokens either way; rejected ones now also see the chosen reply.
    torch.testing.assert_close(leaky[:b], expected[:b], atol=ATOL, rtol=0)
    assert (leaky[b:] - expected[b:]).abs().min() > 1e-3

    right_mask = shared["attention_mask"]
    if attn == "eager":
        right_mask = additive_mask(right_mask, torch.float32)
    no_restart = torch.arange(width).expand(b, width)
    shifted = response_logps(model, shared, n, attention_mask=right_mask, position_ids=no_restart)
    assert (shifted[b:] - expected[b:]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_side_does_not_change_logps(pairs, attn):
    model = model_for(attn)
    n = 2 * len(pairs)
    right = collate_pairs(pairs, pad_id=2, padding_side="right")
    left = collate_pairs(pairs, pad_id=2, padding_side="left")
    assert (right["attention_mask"][:, 0] == 1).all() and (left["attention_mask"][:, -1] == 1).all()
    assert not torch.equal(right["input_ids"], left["input_ids"])
    torch.testing.assert_close(
        response_logps(model, left, n), response_logps(model, right, n), atol=ATOL, rtol=0
    )


def test_shared_mask_layout():
    mask = prefix_shared_mask(prompt=2, chosen=2, rejected=2, width=7)
    rejected_first = mask[4]
    assert rejected_first.tolist() == [True, True, False, False, True, False, False]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[6].tolist() == [False] * 6 + [True]  # padding sees only itself
    assert mask.any(dim=1).all()


def test_shared_targets_and_positions():
    ex = PairExample([10, 11, 12], [20, 21], [30, 31, 32])
    batch = collate_pairs_shared([ex, PairExample([10], [20], [30])], pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    first = batch["segment"] == 0  # pair 0 chosen
    assert batch["pred_cols"][first].tolist() == [2, 3]
    rejected = batch["segment"] == 2  # pair 0 rejected: B + 0
    assert batch["pred_cols"][rejected].tolist() == [2, 5, 6]  # first from the last prompt token
    assert batch["target_ids"][rejected].tolist() == [30, 31, 32]
    plain = collate_pairs([ex], pad_id=0)
    assert plain["labels"].tolist() == [
        [-100, -100, -100, 20, 21, -100],
        [-100, -100, -100, 30, 31, 32],
    ]
    assert plain["segment"].tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="prompt token"):
        collate_pairs_shared([PairExample([], [1], [2])], pad_id=0)


def _rows_of(view: dict) -> list[list[int]]:
    """The real tokens of each example in a collated view, packed (spans) or padded."""
    ids = view["input_ids"]
    if "spans" in view:
        return [ids[0, s:e].tolist() for s, e, _ in view["spans"].tolist()]
    return [r[m.bool()].tolist() for r, m in zip(ids, view["attention_mask"], strict=True)]


@pytest.mark.parametrize("packed", [True, False])
def test_kto_batch_mismatched_kl_rows(packed):
    """Each example's KL row is its prompt with its fixed partner's completion, in its own
    MISMATCHED group; padded, it is cut from the prompt's left when the pair exceeds max_length;
    packed, it keeps its prompt, and the reference's SHARED blocks hold prompt, completion and
    KL completion."""
    from alignkit.train.kto import CONTINUED, MISMATCHED, ROWS, SHARED, KTOItem, KTOMethod
    from alignkit.train.method import Indexed

    items = [
        KTOItem(KTOExample([1, 2], [10, 11], True), [20]),
        KTOItem(KTOExample([3], [20], False), [30, 31, 32]),
        KTOItem(KTOExample([4, 5, 6], [30, 31, 32], True), [10, 11]),
    ]
    method = KTOMethod({}, pad_id=0, max_length=4, packed=packed)
    batch = method.collate([Indexed("train", i, it) for i, it in enumerate(items)])
    assert batch["desirable"].tolist() == [True, False, True]
    # packed: the three rows back to back, no padding; padded: the matched rows' own width
    assert batch[ROWS]["input_ids"].shape == ((1, 12) if packed else (3, 6))
    assert _rows_of(batch[ROWS]) == [[1, 2, 10, 11], [3, 20], [4, 5, 6, 30, 31, 32]]
    kl = batch[MISMATCHED]
    third = [4, 5, 6, 10, 11] if packed else [5, 6, 10, 11]  # 3 + 2 > 4: cut left when padded
    assert _rows_of(kl) == [[1, 2, 20], [3, 30, 31, 32], third]
    if packed:
        ref = batch[SHARED]
        assert _rows_of(ref) == [
            [1, 2, 10, 11, 20],
            [3, 20, 30, 31, 32],
            [4, 5, 6, 30, 31, 32, 10, 11],
        ]
        assert ref["target_ids"][ref["segment"] == 5].tolist() == [10, 11]  # KL of example 2
        # The KL completions continue the matched row's prompts: each prompt's last token, then
        # the completion, at the positions of the full row; `prefix` names the rest of the
        # prompt's columns in the matched row (blocks at 0, 4 and 6).
        cont = batch[CONTINUED]
        assert _rows_of(cont) == [[2, 20], [3, 30, 31, 32], [6, 10, 11]]
        assert cont["position_ids"][0].tolist() == [1, 2, 0, 1, 2, 3, 2, 3, 4]
        assert cont["prefix"].tolist() == [[0, 1], [4, 4], [6, 8]]
        assert cont["pred_cols"].tolist() == [0, 2, 3, 4, 6, 7]  # first target from the prompt
        assert cont["target_ids"].tolist() == [20, 30, 31, 32, 10, 11]
    else:
        assert SHARED not in batch and CONTINUED not in batch
    assert kl["target_ids"][kl["segment"] == 2].tolist() == [10, 11]
    assert kl["segment"].max().item() == 2
    assert set(batch[ROWS]) == set(kl)  # the same row keys for both kinds


def test_kto_batch_runs_a_shared_prompt_once():
    """Packed, examples of a batch that share a prompt (unpaired data made from pairs) sit in
    one block, prompt first; their KL completions continue that one prompt, and the reference
    block holds every completion of the prompt after it."""
    from alignkit.train.kto import CONTINUED, ROWS, SHARED, KTOItem, KTOMethod
    from alignkit.train.method import Indexed

    items = [
        KTOItem(KTOExample([1, 2], [10, 11], True), [30]),
        KTOItem(KTOExample([3], [30], False), [10, 11]),
        KTOItem(KTOExample([1, 2], [20], False), [30]),
    ]
    batch = KTOMethod({}, pad_id=0, max_length=8).collate(
        [Indexed("train", i, it) for i, it in enumerate(items)]
    )
    matched = batch[ROWS]
    assert _rows_of(matched) == [[1, 2, 10, 11, 20], [3, 30]]
    assert matched["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 0, 1]
    assert matched["spans"][:, 2].tolist() == [0, 1]  # a shared block is not plain causal
    assert matched["target_ids"][matched["segment"] == 2].tolist() == [20]
    assert matched["pred_cols"][matched["segment"] == 2].tolist() == [1]  # the prompt's end
    assert batch[CONTINUED]["prefix"].tolist() == [[0, 1], [5, 5], [0, 1]]
    assert _rows_of(batch[SHARED]) == [[1, 2, 10, 11, 30, 20, 30], [3, 30, 10, 11]]
