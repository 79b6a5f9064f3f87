"""Batches for causal-LM training: padded batches, length-grouped order, and packing.

Packing and transformers 5.x (checked against 5.24, LlamaForCausalLM):

- A 4D ``attention_mask`` is used as given (``masking_utils._preprocess_mask_arguments`` returns it
  untouched), so its type must suit the attention kernel. SDPA accepts a boolean mask
  (True = may attend) or an additive float one. Eager *adds* the mask to the scores: a boolean
  mask becomes +1/+0 and is silently ignored. An additive float mask (0 where allowed, the dtype's
  minimum elsewhere, in the model's dtype) works with both, hence ``mask_dtype``.
- Without a mask, transformers infers packed boundaries from ``position_ids`` restarting at 0, but
  only when ``attention_mask is None`` *and* no cache is used: with the default ``use_cache=True``
  (also in train mode) the inference is skipped and examples attend to each other. Passing the
  block mask explicitly does not depend on either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from alignkit.data.tokenize import IGNORE_INDEX, TokenizedExample


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, position_ids (B, T)."""
    width = max(len(e) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    # Pads continue counting (not 0) so RoPE never sees an out-of-order position; they are
    # masked anyway, and right padding leaves every real token's position unchanged.
    position_ids = torch.arange(width, dtype=torch.long).expand(batch, width).clone()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A shuffled order where each batch holds similar lengths (HF ``group_by_length``).

    Shuffle, cut into megabatches of 50 batches, sort each by length (longest first) so
    neighbouring batches pad little while the megabatch order stays random. The longest example
    goes first so an out-of-memory error shows up at step one rather than mid-run.
    """
    if not lengths:
        return []
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = max(1, 50 * batch_size)
    groups = [
        sorted(order[i : i + mega], key=lambda k: lengths[k], reverse=True)
        for i in range(0, len(order), mega)
    ]
    longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
    groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return [i for group in groups for i in group]


def prompt_grouped_order(groups: list[int], seed: int) -> list[int]:
    """A shuffled order in which the examples of each group (those sharing a prompt: equal ids
    in `groups`) follow each other, so a micro-batch holds whole groups where sizes allow. The
    groups are shuffled, and the examples within each group."""
    rng = random.Random(seed)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    rng.shuffle(keys)
    order = []
    for g in keys:
        group = members[g]
        rng.shuffle(group)
        order += group
    return order


@dataclass
class PackedExample:
    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]  # lengths of the examples packed in, in order

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: list[TokenizedExample], max_length: int) -> list[PackedExample]:
    """Greedy first-fit in the given order: each example joins the first pack with room.

    The first token of every example gets label IGNORE_INDEX: its label would be predicted from
    the end of the previous example, which the block mask hides, so it is not learnable (and in an
    unpacked batch the first token is never predicted either).
    """
    packs: list[PackedExample] = []
    for ex in examples:
        if len(ex) > max_length:
            raise ValueError(f"example of {len(ex)} tokens does not fit max_length={max_length}")
        target = next((p for p in packs if len(p) + len(ex) <= max_length), None)
        if target is None:
            target = PackedExample([], [], [])
            packs.append(target)
        target.input_ids.extend(ex.input_ids)
        target.labels.extend([IGNORE_INDEX, *ex.labels[1:]])
        target.seq_lens.append(len(ex))
    return packs


def block_causal_mask(seq_lens: list[int], width: int) -> torch.Tensor:
    """(T, T) bool: causal within each segment, nothing across segments; padding is a segment.

    Padding attends to itself: a query row with no allowed key makes SDPA return NaN, and NaN in
    a pad's value vector leaks into real rows through 0 * NaN in the next layer's attention.
    """
    segment = torch.empty(width, dtype=torch.long)
    start = 0
    for i, n in enumerate([*seq_lens, width - sum(seq_lens)]):
        segment[start : start + n] = i
        start += n
    same = segment[:, None] == segment[None, :]  # (T, T)
    return same & torch.ones(width, width, dtype=torch.bool).tril()


def collate_packed(
    packs: list[PackedExample], pad_id: int, *, mask_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Packed batch: input_ids, labels, position_ids (B, T) and a 4D mask (B, 1, T, T).

    The mask is boolean (True = may attend) unless `mask_dtype` is a float dtype, then additive
    (0 / dtype minimum): pass the model's dtype when it may run eager attention (module docstring).
    """
    width = max(len(p) for p in packs)
    batch = len(packs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, 1, width, width), dtype=torch.bool)
    for row, pack in enumerate(packs):
        n = len(pack)
        input_ids[row, :n] = torch.tensor(pack.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(pack.labels, dtype=torch.long)
        # Positions restart at 0 per example so RoPE sees each exactly as if it were alone.
        position_ids[row, :n] = torch.cat([torch.arange(k) for k in pack.seq_lens])
        position_ids[row, n:] = torch.arange(width - n)
        mask[row, 0] = block_causal_mask(pack.seq_lens, width)
    attention_mask: torch.Tensor = mask
    if mask_dtype is not None and mask_dtype.is_floating_point:
        attention_mask = additive_mask(mask, mask_dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> additive float mask: 0 where allowed, dtype min elsewhere."""
    out = torch.zeros(mask.shape, dtype=dtype)
    return out.masked_fill(~mask, torch.finfo(dtype).min)
