"""Packing invariant: a packed batch gives every example exactly the loss it has on its own.

Also pins down how transformers (5.24) treats a custom 4D mask, so an upgrade that changes it
fails here instead of silently mixing examples: SDPA honours a boolean mask, eager only an
additive float one, and inferring boundaries from position_ids needs mask=None and no cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from alignkit.config import DataConfig
from alignkit.data.batching import (
    block_causal_mask,
    collate,
    collate_packed,
    length_grouped_order,
    pack_examples,
    prompt_grouped_order,
)
from alignkit.data.tokenize import IGNORE_INDEX, TokenizedExample, load_sft_data, tokenize_sft

ATOL = 1e-5
MAX_LEN = 512  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def examples(tokenizer, data_dir) -> list[TokenizedExample]:
    cfg = DataConfig(
        train=str(data_dir / "gsm8k" / "train.jsonl"),
        column_map={"question": "prompt", "answer": "completion"},
        limit=6,
        max_length=256,
    )
    chats = load_sft_data(cfg, tokenizer, seed=0).train
    # Plain text trains on its first token too, which packing must not predict across examples.
    texts = [
        tokenize_sft({"text": t}, tokenizer, max_length=256, truncation="error")
        for t in ("Hello there, world.", "Numbers: 1 2 3 4 5.")
    ]
    return [chats[0], texts[0], *chats[1:3], texts[1], *chats[3:]]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T-1) per-token CE of predicting token t+1 at t; 0 where ignored."""
    shifted = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce  # cross_entropy already returns 0 at ignored targets


def per_example_alone(model, examples) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            ce = token_ce(model(input_ids=ids).logits, torch.tensor([ex.labels]))
            out.append(ce.sum() / (ce.new_tensor(ex.labels[1:]) != IGNORE_INDEX).sum())
    return out


def per_example_packed(model, packs, batch, **forward) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward
        ).logits
    ce = token_ce(logits, batch["labels"])
    valid = batch["labels"][:, 1:] != IGNORE_INDEX
    out = []
    for row, pack in enumerate(packs):
        start = 0
        for n in pack.seq_lens:
            # Example tokens [start, start+n) are predicted at shifted positions [start, start+n-1).
            sl = slice(start, start + n - 1)
            out.append(ce[row, sl].sum() / valid[row, sl].sum())
            start += n
    return out


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().item() for x, y in zip(a, b, strict=True))


def packed_order(packs, examples):
    """The examples in the order packing placed them (first-fit may reorder)."""
    flat, used = [], set()
    for pack in packs:
        start = 0
        for n in pack.seq_lens:
            ids = pack.input_ids[start : start + n]
            idx = next(i for i, e in enumerate(examples) if i not in used and e.input_ids == ids)
            used.add(idx)
            flat.append(examples[idx])
            start += n
    return flat


@pytest.fixture(scope="module")
def models():
    # Same seed, same weights: only the attention kernel differs.
    return {attn: make_tiny_model(0, attn_implementation=attn) for attn in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def packs(examples):
    packs = pack_examples(examples, MAX_LEN)
    assert len(packs) < len(examples) and any(len(p.seq_lens) > 1 for p in packs)
    return packs


@pytest.fixture(scope="module")
def alone(models, packs, examples):
    """Each example's loss on its own, in packed order (the reference every variant must meet)."""
    return per_example_alone(models["sdpa"], packed_order(packs, examples))


@pytest.mark.parametrize(
    ("attn", "mask_dtype"),
    [("sdpa", None), ("sdpa", torch.float32), ("eager", torch.float32)],
)
def test_packed_equals_unpacked_per_example_loss(models, packs, alone, attn, mask_dtype):
    batch = collate_packed(packs, pad_id=2, mask_dtype=mask_dtype)
    packed = per_example_packed(models[attn], packs, batch, attention_mask=batch["attention_mask"])
    assert max_gap(alone, packed) < ATOL


def test_without_the_block_mask_examples_leak_into_each_other(models, packs, alone):
    batch = collate_packed(packs, pad_id=2)
    # Plain causal attention over the whole pack (model defaults: no mask, cache on).
    leaked = per_example_packed(models["sdpa"], packs, batch)
    assert max_gap(alone, leaked) > 1e-3


def batch_loss(model, batch, **forward) -> torch.Tensor:
    """The token-weighted mean loss over the whole batch, as a training step computes it."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward
        ).logits
    return token_ce(logits, batch["labels"]).sum() / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_first_token_of_each_packed_example_is_not_a_target(models, packs, alone, examples):
    for pack in packs:
        starts = [sum(pack.seq_lens[:i]) for i in range(len(pack.seq_lens))]
        assert all(pack.labels[s] == IGNORE_INDEX for s in starts)
    ordered = packed_order(packs, examples)
    counts = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in ordered]
    reference = sum(a * n for a, n in zip(alone, counts, strict=True)) / sum(counts)
    batch = collate_packed(packs, pad_id=2)
    mask = batch["attention_mask"]
    assert abs(batch_loss(models["sdpa"], batch, attention_mask=mask) - reference) < ATOL
    # Text examples are trained from their first token. Keeping that label in a pack adds a
    # target predicted from the previous example's last token, and the batch loss changes.
    assert any(e.labels[0] != IGNORE_INDEX for e in examples)
    for row, pack in enumerate(packs):
        start = 0
        for n in pack.seq_lens:
            batch["labels"][row, start] = pack.input_ids[start]
            start += n
    # (A random model predicts every token about equally badly, so two extra targets among
    # hundreds move the mean by ~1e-3: still 100x the tolerance above.)
    assert abs(batch_loss(models["sdpa"], batch, attention_mask=mask) - reference) > 1e-4


def test_transformers_4d_mask_contract(models, packs, alone):
    """Pins transformers' behaviour that collate_packed's mask_dtype advice rests on."""
    batch = collate_packed(packs, pad_id=2)
    # Eager adds the mask to the scores: a boolean mask is +1/+0 there, i.e. ignored.
    ignored = per_example_packed(
        models["eager"], packs, batch, attention_mask=batch["attention_mask"]
    )
    assert max_gap(alone, ignored) > 1e-3
    # With no mask and no cache, transformers infers packed boundaries from position_ids...
    for model in models.values():
        inferred = per_example_packed(model, packs, batch, use_cache=False)
        assert max_gap(alone, inferred) < ATOL
    # ...but not with the cache on (the default, also in train mode).
    models["sdpa"].train()
    try:
        with_cache = per_example_packed(models["sdpa"], packs, batch)
    finally:
        models["sdpa"].eval()
    assert max_gap(alone, with_cache) > 1e-3


def test_padded_batch_equals_unpacked(models, examples):
    model = models["sdpa"]
    batch = collate(examples, pad_id=2)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ce = token_ce(logits, batch["labels"])
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert max_gap(per_example_alone(model, examples), list(ce.sum(1) / counts)) < ATOL


def test_collate_shapes_and_padding():
    exs = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])]
    b = collate(exs, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_pack_first_fit_and_collate_packed_layout():
    exs = [TokenizedExample([1] * n, [1] * n) for n in (3, 4, 2, 1)]
    packs = pack_examples(exs, 5)
    assert [p.seq_lens for p in packs] == [[3, 2], [4, 1]]
    assert packs[0].labels == [-100, 1, 1, -100, 1]
    b = collate_packed(packs, pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b["attention_mask"].shape == (2, 1, 5, 5) and b["attention_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([TokenizedExample([1] * 6, [1] * 6)], 5)


def test_block_causal_mask_with_padding():
    m = block_causal_mask([2, 1], 4).int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_padded_packs_stay_finite(models, packs):
    model = models["sdpa"]
    batch = collate_packed(packs, pad_id=2)
    assert any(len(p) < batch["input_ids"].shape[1] for p in packs)  # some rows are padded
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
    assert torch.isfinite(logits).all()


def test_length_grouped_order():
    lengths = [(i * 37) % 101 for i in range(400)]
    order = length_grouped_order(lengths, batch_size=4, seed=3)
    assert sorted(order) == list(range(400))
    assert order == length_grouped_order(lengths, batch_size=4, seed=3)
    assert order != length_grouped_order(lengths, batch_size=4, seed=4)
    assert lengths[order[0]] == max(lengths)
    batches = [order[i : i + 4] for i in range(0, 400, 4)]
    spread = sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches)
    assert spread < 0.2 * sum(max(lengths[j] for j in b) for b in batches)


def test_prompt_grouped_order_keeps_each_prompt_together():
    """Every example once; the examples sharing a prompt consecutive; a seeded shuffle of the
    groups (and, in the stream, a new one each epoch); ungrouped examples are not kept apart."""
    from alignkit.train.stream import MicroBatchStream

    groups = [i // 2 for i in range(40)] + [100 + i for i in range(5)] + [200] * 3  # pairs, ...
    order = prompt_grouped_order(groups, seed=3)
    assert sorted(order) == list(range(len(groups)))
    runs = [groups[order[0]]]
    for i in order[1:]:
        if groups[i] != runs[-1]:
            runs.append(groups[i])
    assert len(runs) == len(set(groups))  # one run of consecutive examples per group
    assert order == prompt_grouped_order(groups, seed=3)
    assert order != prompt_grouped_order(groups, seed=4)
    assert [groups[i] for i in order] != sorted(groups)  # the groups themselves are shuffled
    stream = MicroBatchStream([1] * 40, 4, 1, seed=3, prompt_groups=groups[:40])
    first = [stream.indices(i, 0) for i in range(stream.per_epoch)]
    assert all(len({groups[i] for i in b}) == 2 for b in first)  # two whole pairs per batch
    assert first != [stream.indices(stream.per_epoch + i, 0) for i in range(stream.per_epoch)]
