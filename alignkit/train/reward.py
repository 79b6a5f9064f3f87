"""Reward modeling (`method: reward`): a scalar head trained on preference pairs.

Each pair is two sequences, prompt + chosen and prompt + rejected, scored at their last real
token; the loss is Bradley-Terry with an optional per-pair margin and the centering term
(:mod:`alignkit.losses.reward`). The normalisation unit is the pair. As for the DPO family, the
prompt runs once per pair: one block [prompt, chosen, rejected] per pair, the rejected reply
masked from the chosen one, the micro-batch's blocks packed back to back into one row without
padding (`collate_packed_pairs`, the DPO family's layout), attention running block by block;
`train.parity` asks for the plain layout instead (two right-padded rows per pair).

After training, the rewards of the eval split (or of the training split when there is none) give
the mean and std that later stages normalise with; they go into summary.json
("reward_stats") and final/alignkit_reward.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from alignkit.config import DataConfig, RunConfig
from alignkit.data.formats import apply_column_map
from alignkit.data.pair_batching import collate_packed_pairs, collate_rows, token_count
from alignkit.data.preference import (
    PREFERENCE_FORMATS,
    PairExample,
    PairStats,
    convert_located,
    fit_prompt,
    nothing_left_error,
    read_split,
    render_rows,
)
from alignkit.errors import DataError
from alignkit.losses.reward import bradley_terry
from alignkit.models.reward import RewardModel, write_reward_info
from alignkit.train.method import (
    Indexed,
    MethodSetup,
    StepOutput,
    count_examples,
    same_metrics,
    tag_batch,
)


class RewardPair(NamedTuple):
    pair: PairExample
    margin: float  # the gap the chosen reward must clear (0: plain Bradley-Terry)


# --------------------------------------------------------------------------- data


def row_margin(record: dict[str, Any], where: str, column_map: dict[str, str]) -> float | None:
    """A row's numeric `margin` (after the column map), None when it has none."""
    value = apply_column_map(record, column_map).get("margin")
    if value is None:
        return None
    # bool is an int subclass: `true` is not a margin
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            f"'margin' must be a finite number, got {value!r}",
            where=where,
            hint="the margin is how much better chosen is than rejected (e.g. a rating gap); "
            "remove the column or set reward.use_margin=false to ignore it",
        )
    return float(value)


def build_reward_pairs(
    located, fmt: str, cfg: DataConfig, tokenizer: Any, use_margin: bool
) -> tuple[list[RewardPair], PairStats, int]:
    """Pairs that survive the truncation policy with their margins, the stats, and how many
    pairs carried a margin. Same conversion and truncation as the DPO family."""
    stats = PairStats(rows_read=len(located))
    margins = {}
    if use_margin:
        margins = {
            where: row_margin(rec, where, cfg.column_map)
            for rec, where in zip(located.records, located.locations, strict=True)
        }
    pairs, wheres = convert_located(located, fmt, cfg, stats)
    ids = render_rows([(p.prompt, [p.chosen, p.rejected]) for p in pairs], wheres, tokenizer, None)
    out, with_margin = [], 0
    for pair, (prompt_ids, chosen, rejected), where in zip(pairs, ids, wheres, strict=True):
        fitted = fit_prompt(
            prompt_ids, [chosen, rejected], cfg.max_length, cfg.truncation, where=where
        )
        stats.add(fitted.outcome)
        if fitted.prompt_ids is None:
            continue
        stats.identical += pair.chosen == pair.rejected
        margin = margins.get(where)
        with_margin += margin is not None
        out.append(RewardPair(PairExample(fitted.prompt_ids, chosen, rejected), margin or 0.0))
    return out, stats, with_margin


# --------------------------------------------------------------------------- batches


def packed_read_cols(examples: list[PairExample], spans: Tensor) -> Tensor:
    """(2B,) columns of a packed pair row (`collate_packed_pairs`) to score: each chosen reply's
    last token, then each rejected reply's; spans (B, 3) give each pair's block.

    A reply's score is read where its own plain row ends: at its last token, or, for an empty
    reply, at the prompt's last token (the rejected block's end would be the chosen reply's).
    """
    starts = spans[:, 0]  # (B,) first column of each pair's block
    prompt = torch.tensor([len(e.prompt_ids) for e in examples])  # (B,)
    chosen = torch.tensor([len(e.chosen_ids) for e in examples])  # (B,)
    rejected = torch.tensor([len(e.rejected_ids) for e in examples])  # (B,)
    chosen_end = starts + prompt + chosen - 1
    rejected_end = torch.where(rejected > 0, chosen_end + rejected, starts + prompt - 1)
    return torch.cat([chosen_end, rejected_end])


def collate_reward(pairs: list[RewardPair], pad_id: int, shared: bool) -> dict[str, Any]:
    """Inputs for RewardModel and where to read the 2B rewards: chosen 0..B-1, rejected B..2B-1.

    Plain: (2B, T) right-padded rows, read at each row's last real token.
    Shared (the default): the pairs' blocks [prompt, chosen, rejected] packed into one (1, N)
    row with a block mask (1, 1, N, N) and spans (B, 3), attention run per block; chosen is
    read at its block's column P+C-1, rejected at P+C+R-1, each having seen only the prompt and
    itself, so the rewards are those of the plain rows.
    """
    examples = [p.pair for p in pairs]
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)
    if not shared:
        rows = [(e.prompt_ids, e.chosen_ids) for e in examples]
        rows += [(e.prompt_ids, e.rejected_ids) for e in examples]
        full = collate_rows(rows, pad_id)
        batch = {k: full[k] for k in ("input_ids", "attention_mask", "position_ids")}
        return {**batch, "margin": margin, "tokens": token_count(full)}
    full = collate_packed_pairs(examples, pad_id)
    batch = {k: full[k] for k in ("input_ids", "attention_mask", "position_ids", "spans")}
    return {
        **batch,
        "read_rows": torch.zeros(2 * len(examples), dtype=torch.long),  # (2B,) one packed row
        "read_cols": packed_read_cols(examples, full["spans"]),  # (2B,)
        "margin": margin,
        "tokens": token_count(full),
    }


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "read_rows", "read_cols", "spans")


class RewardMethod:
    """Bradley-Terry over pairs; the normalisation unit is the pair."""

    def __init__(self, pad_id: int, center_coef: float, shared: bool):
        self.pad_id, self.center_coef, self.shared = pad_id, center_coef, shared

    def collate(self, items: list[Indexed]) -> dict[str, Any]:
        batch = collate_reward([it.example for it in items], self.pad_id, self.shared)
        return tag_batch(batch, items)

    units = staticmethod(count_examples)
    finalize_metrics = staticmethod(same_metrics)

    def rewards(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """(2B,) rewards: chosen then rejected."""
        return model(**{k: batch[k] for k in MODEL_KEYS if k in batch})

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        b = len(batch["index"])
        r = self.rewards(model, batch)
        out = bradley_terry(r[:b], r[b:], batch["margin"], center_coef=self.center_coef)
        return StepOutput(out.losses.sum(), out.metrics, batch["tokens"])


# --------------------------------------------------------------------------- after training


class RewardStats(NamedTuple):
    mean: float
    std: float
    accuracy: float
    responses: int
    split: str


@torch.no_grad()
def reward_stats(
    model: nn.Module, method: RewardMethod, items: list[Indexed], batch_size: int, split: str
) -> RewardStats:
    """Mean and std of the rewards of every response (both sides of each pair) in `items`."""
    module = RewardModel(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for s in range(0, len(items), batch_size):
        batch = method.collate(items[s : s + batch_size])
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        r = method.rewards(module, batch).cpu()  # (2b,)
        b = len(r) // 2
        chosen.append(r[:b])
        rejected.append(r[b:])
    model.train(was_training)
    rc, rr = torch.cat(chosen), torch.cat(rejected)
    every = torch.cat([rc, rr])  # (2N,)
    # population std (correction 0): defined for a single response, as normalisation needs
    std = every.std(correction=0).item()
    accuracy = (rc > rr).float().mean().item()
    return RewardStats(every.mean().item(), std, accuracy, len(every), split)


def record_reward_stats(
    model: nn.Module, final_dir: Path, method: RewardMethod, setup_eval, setup_train, bs: int
) -> dict:
    """Score the eval split (else the training split), write final/alignkit_reward.json, and
    return what goes into summary.json."""
    split, items = ("eval", setup_eval) if setup_eval else ("train", setup_train)
    stats = reward_stats(model, method, items, bs, split)
    write_reward_info(
        final_dir, stats.mean, stats.std, split=stats.split, responses=stats.responses
    )
    return {"reward_stats": stats._asdict()}


def build_reward_method(cfg: RunConfig, tokenizer) -> MethodSetup:
    rcfg, dcfg = cfg.reward, cfg.data
    train_rows, fmt, eval_rows, eval_fmt = read_split(dcfg, cfg.train.seed, PREFERENCE_FORMATS)
    train, stats, with_margin = build_reward_pairs(
        train_rows, fmt, dcfg, tokenizer, rcfg.use_margin
    )
    if not train:
        raise nothing_left_error(stats, dcfg, "pairs")
    evals: list[RewardPair] = []
    if len(eval_rows):
        evals, _, _ = build_reward_pairs(eval_rows, eval_fmt, dcfg, tokenizer, rcfg.use_margin)
    shared = not cfg.train.parity
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    method = RewardMethod(pad_id, rcfg.center_coef, shared)
    train_items = [Indexed("train", i, ex) for i, ex in enumerate(train)]
    eval_items = [Indexed("eval", i, ex) for i, ex in enumerate(evals)]
    info = {k: v for k, v in vars(stats).items() if not k.startswith("_")}
    return MethodSetup(
        method=method,
        train=train_items,
        eval=eval_items,
        lengths=[ex.pair.shared_len if shared else len(ex.pair) for ex in train],
        wrap=RewardModel,
        info={
            "format": fmt,
            **info,
            "pairs_with_margin": with_margin,
            "layout": "prefix-shared, packed" if shared else "plain",
        },
        after_training=lambda model, final_dir: record_reward_stats(
            model, final_dir, method, eval_items, train_items, cfg.train.batch_size
        ),
    )
