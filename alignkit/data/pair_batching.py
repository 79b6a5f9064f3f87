"""Batches for preference pairs and rows (reward models, KTO), with explicit target positions.

Two layouts for a pair (DESIGN.md, Performance):

- plain (parity mode): ``2B`` rows, ``prompt + chosen`` for each pair and then ``prompt +
  rejected``, padded on the side the builder is told (``padding_side``) with positions counted
  from each row's first real token, so the padding side changes nothing;
- prefix-shared: one row per pair, ``[prompt, chosen, rejected]``: the prompt is run once. Positions
  restart after the prompt for the rejected part (prompt ``0..P-1``, chosen ``P..P+C-1``, rejected
  ``P..P+R-1``) and a 4D mask hides the chosen tokens from the rejected ones, so every rejected
  token sees exactly what it would see in its own plain row.

In the shared row the first rejected token is predicted by the *last prompt token*, not by the
token just before it (the chosen reply's end), so shift-by-one labels cannot describe the
targets. Both layouts therefore return them explicitly, as flat (N,) tensors over all targets:
``pred_rows``/``pred_cols`` index the hidden state that predicts each target, ``target_ids`` is
the token, ``segment`` the response it belongs to: pair i's chosen reply is segment i, its rejected
reply ``B + i`` (the plain layout's row numbers), so ``sum_by_segment`` gives the same (2B,)
per-response sums from either layout, and one forward function serves both:
``hidden[pred_rows, pred_cols]`` -> log-prob of ``target_ids`` -> ``sum_by_segment``.

Either kind of row can also be *packed* (the default in training: `collate_packed_pairs`,
`collate_packed_rows`): the micro-batch's rows are laid back to back in one row (1, N) with no
padding, a block mask that keeps each example to itself, positions that restart at each example,
and ``spans`` (K, 3) giving each example's start, end and whether its block is plain causal (a
row; a prefix-shared pair is not), so attention can run example by example
(:mod:`alignkit.ops.packed_attention`). Every target keeps its context and position, so the
log-probs are those of the unpacked rows. A packed row can also continue the prompts of another
packed row without running them again (`collate_packed_continuations`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from alignkit.data.batching import additive_mask
from alignkit.data.preference import PairExample
from alignkit.data.tokenize import IGNORE_INDEX

PaddingSide = Literal["right", "left"]


def _check_prompt(prompt_ids: list[int]) -> None:
    if not prompt_ids:
        # The first response token is predicted from the last prompt token; without one it is not.
        raise ValueError("every example needs at least one prompt token")


def _targets(
    row: int, first_col: int, pred_first: int, ids: list[int], segment: int
) -> dict[str, torch.Tensor]:
    """Targets `ids` at columns first_col.. of `row`: the first predicted from column
    `pred_first`, each later one from the column before it."""
    n = len(ids)
    cols = torch.arange(first_col, first_col + n)
    pred = cols - 1
    if n:
        pred[0] = pred_first
    return {
        "pred_rows": torch.full((n,), row, dtype=torch.long),
        "pred_cols": pred,
        "target_ids": torch.tensor(ids, dtype=torch.long),
        "segment": torch.full((n,), segment, dtype=torch.long),
    }


def _cat_targets(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = ("pred_rows", "pred_cols", "target_ids", "segment")
    empty = torch.zeros(0, dtype=torch.long)
    return {k: torch.cat([p[k] for p in parts]) if parts else empty for k in keys}


def collate_rows(
    rows: list[tuple[list[int], list[int]]], pad_id: int, padding_side: PaddingSide = "right"
) -> dict[str, torch.Tensor]:
    """Rows of prompt + response: input_ids, attention_mask, labels, position_ids (N, T) and the
    explicit targets (segment = row index). Labels are IGNORE_INDEX on prompt and padding."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(p) + len(r) for p, r in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    parts = []
    for i, (prompt, response) in enumerate(rows):
        _check_prompt(prompt)
        n, p = len(prompt) + len(response), len(prompt)
        start = width - n if padding_side == "left" else 0
        input_ids[i, start : start + n] = torch.tensor(prompt + response, dtype=torch.long)
        labels[i, start + p : start + n] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, start : start + n] = 1
        # Positions count from the first real token whatever the padding side; right pads keep
        # counting so RoPE never sees positions go backwards (they are masked anyway).
        position_ids[i, start : start + n] = torch.arange(n)
        if padding_side == "right":
            position_ids[i, n:] = torch.arange(n, width)
        parts.append(_targets(i, start + p, start + p - 1, response, segment=i))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        **_cat_targets(parts),
    }


def collate_pairs(
    examples: list[PairExample], pad_id: int, *, padding_side: PaddingSide = "right"
) -> dict[str, torch.Tensor]:
    """Plain layout: (2B, T) rows, chosen rows 0..B-1 then rejected rows B..2B-1, plus targets."""
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples]
    rows += [(e.prompt_ids, e.rejected_ids) for e in examples]
    return collate_rows(rows, pad_id, padding_side)


def shared_prompt_mask(prompt: int, responses: list[int]) -> torch.Tensor:
    """(n, n) bool, True = may attend, for a block ``[prompt, r_1, ..., r_m]`` without padding:
    the prompt is causal, each response sees the prompt and its own earlier tokens only."""
    sizes = torch.tensor([prompt, *responses])
    part = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # 0 = prompt, j = r_j
    q, k = part[:, None], part[None, :]
    causal = torch.ones(len(part), len(part), dtype=torch.bool).tril()
    return causal & ((k == 0) | (q == k))


def prefix_shared_mask(prompt: int, chosen: int, rejected: int, width: int) -> torch.Tensor:
    """(T, T) bool, True = may attend, for a row [prompt, chosen, rejected, padding].

    Prompt causal; chosen sees the prompt and earlier chosen tokens; rejected sees the prompt and
    earlier rejected tokens, never the chosen ones. Padding sees only itself: a query with no
    allowed key makes SDPA return NaN, which then leaks into real rows via 0 * NaN.
    """
    n = prompt + chosen + rejected
    mask = torch.eye(width, dtype=torch.bool)  # padding sees itself (real tokens do anyway)
    mask[:n, :n] = shared_prompt_mask(prompt, [chosen, rejected])
    return mask


def collate_pairs_shared(
    examples: list[PairExample], pad_id: int, *, mask_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Prefix-shared layout: input_ids, position_ids (B, T), attention_mask (B, 1, T, T), targets.

    The mask is boolean (True = may attend) unless `mask_dtype` is a float dtype, then additive
    (0 / dtype minimum), as eager attention needs (see :mod:`alignkit.data.batching`).
    """
    batch = len(examples)
    width = max(e.shared_len for e in examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, 1, width, width), dtype=torch.bool)
    chosen_parts, rejected_parts = [], []
    for i, e in enumerate(examples):
        _check_prompt(e.prompt_ids)
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        n = p + c + r
        input_ids[i, :n] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids)
        # The rejected reply continues the prompt at position P, as in its own plain row.
        position_ids[i, : p + c] = torch.arange(p + c)
        position_ids[i, p + c : n] = torch.arange(p, p + r)
        position_ids[i, n:] = torch.arange(p + max(c, r), p + max(c, r) + width - n)
        mask[i, 0] = prefix_shared_mask(p, c, r, width)
        chosen_parts.append(_targets(i, p, p - 1, e.chosen_ids, segment=i))
        # The first rejected token is predicted from the last prompt token (column P-1).
        rejected_parts.append(_targets(i, p + c, p - 1, e.rejected_ids, segment=batch + i))
    attention_mask: torch.Tensor = mask
    if mask_dtype is not None and mask_dtype.is_floating_point:
        attention_mask = additive_mask(mask, mask_dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        **_cat_targets(chosen_parts + rejected_parts),
    }


class _Block(NamedTuple):
    """One example's part of a packed row: its tokens, positions and mask (None: causal)."""

    ids: list[int]
    positions: torch.Tensor  # (n,)
    mask: torch.Tensor | None  # (n, n) bool, True = may attend


def _pack(blocks: list[_Block], pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Blocks back to back in one row: input_ids, position_ids (1, N), attention_mask
    (1, 1, N, N) bool, spans (K, 3); and each block's first column."""
    width = sum(len(b.ids) for b in blocks)
    input_ids = torch.full((1, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((1, width), dtype=torch.long)
    mask = torch.zeros((1, 1, width, width), dtype=torch.bool)
    spans, starts, s = [], [], 0
    for b in blocks:
        n = len(b.ids)
        input_ids[0, s : s + n] = torch.tensor(b.ids, dtype=torch.long)
        position_ids[0, s : s + n] = b.positions
        block = b.mask if b.mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
        mask[0, 0, s : s + n, s : s + n] = block
        spans.append((s, s + n, int(b.mask is None)))
        starts.append(s)
        s += n
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "spans": torch.tensor(spans, dtype=torch.long).view(-1, 3),
    }
    return batch, starts


# One prompt and its responses, each with the segment its log-prob sums into.
SharedGroup = tuple[list[int], list[tuple[list[int], int]]]


def collate_packed_shared(groups: list[SharedGroup], pad_id: int) -> dict[str, Any]:
    """Blocks ``[prompt, r_1, ..., r_m]`` (the prompt run once for all its responses) packed into
    one (1, N) row: every response continues the prompt at position P and sees nothing of the
    others, so its log-prob is that of its own plain row. Targets go to each response's segment;
    plus spans."""
    blocks = []
    for prompt, responses in groups:
        _check_prompt(prompt)
        p, sizes = len(prompt), [len(r) for r, _ in responses]
        positions = torch.cat([torch.arange(p)] + [torch.arange(p, p + n) for n in sizes])
        ids = prompt + [t for r, _ in responses for t in r]
        # One response: a plain causal row, which attention runs without a mask.
        mask = shared_prompt_mask(p, sizes) if len(sizes) > 1 else None
        blocks.append(_Block(ids, positions, mask))
    batch, starts = _pack(blocks, pad_id)
    parts = []
    for (prompt, responses), s in zip(groups, starts, strict=True):
        col = s + len(prompt)
        for ids, segment in responses:  # each first token predicted from the last prompt token
            parts.append(_targets(0, col, s + len(prompt) - 1, ids, segment=segment))
            col += len(ids)
    return {**batch, **_cat_targets(parts)}


def collate_packed_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Rows of prompt + response packed into one (1, N) row, with targets (segment = row index)
    and spans; the log-probs equal `collate_rows`' on the same rows."""
    return collate_packed_shared([(p, [(r, i)]) for i, (p, r) in enumerate(rows)], pad_id)


def collate_packed_pairs(examples: list[PairExample], pad_id: int) -> dict[str, Any]:
    """Prefix-shared rows ``[prompt, chosen, rejected]`` packed into one (1, N) row: no padding,
    targets as in `collate_pairs_shared` (chosen segment i, rejected B + i), plus spans."""
    b = len(examples)
    groups = [
        (e.prompt_ids, [(e.chosen_ids, i), (e.rejected_ids, b + i)]) for i, e in enumerate(examples)
    ]
    return collate_packed_shared(groups, pad_id)


def collate_packed_continuations(
    rows: list[tuple[list[int], list[int]]], prompt_starts: list[int], pad_id: int
) -> dict[str, Any]:
    """Responses that continue prompts another packed row already holds, packed into one row.

    rows: (prompt, response) pairs whose prompts start at columns `prompt_starts` of that other
    row (e.g. `collate_packed_rows` of the same prompts). Block i is the prompt's last token and
    then the response, at positions ``P-1..``; ``prefix`` (K, 2) names the columns of the rest of
    the prompt, ``[start, start + P - 1)``, whose kept keys and values attention puts in front of
    the block (:mod:`alignkit.ops.packed_attention`). The last prompt token is run again because
    it predicts the response's first token. Targets as in `collate_packed_rows`: the log-probs
    equal those of the full rows.
    """
    blocks, prefix = [], []
    for (prompt, response), start in zip(rows, prompt_starts, strict=True):
        _check_prompt(prompt)
        p = len(prompt)
        blocks.append(_Block(prompt[-1:] + response, torch.arange(p - 1, p + len(response)), None))
        prefix.append((start, start + p - 1))
    batch, starts = _pack(blocks, pad_id)
    parts = [
        _targets(0, s + 1, s, r, segment=i)
        for i, ((_, r), s) in enumerate(zip(rows, starts, strict=True))
    ]
    batch["prefix"] = torch.tensor(prefix, dtype=torch.long).view(-1, 2)
    return {**batch, **_cat_targets(parts)}


def token_count(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a collated batch, packed or padded."""
    if "spans" in batch:  # packed: no padding
        return batch["input_ids"].numel()
    return int(batch["attention_mask"].sum())


def sum_by_segment(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(N,) per-target values -> (num_segments,) sums (e.g. per-response log-probs, 2B)."""
    out = values.new_zeros(num_segments)
    return out.index_add(0, segment, values)
