"""Paired preference optimization: DPO, IPO, hinge, robust DPO, SimPO, ORPO.

A micro-batch is B pairs; its normalisation unit is the pair, so the loss of a step is the mean
over the pairs of the whole accumulated global batch. The policy's log-probs come from one forward
over prefix-shared rows (prompt once, both responses after it), packed into one row without
padding, unless `train.parity` asks for the plain layout (two padded rows per pair); the
reference's come from the source `alignkit.train.reference` picked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from alignkit.config import RunConfig
from alignkit.data.pair_batching import collate_packed_pairs, collate_pairs, token_count
from alignkit.data.preference import PairExample
from alignkit.losses import PREFERENCE_LOSSES, PairLogps, needs_reference
from alignkit.train.forward import LogpsModel
from alignkit.train.loop import StepOutput

TARGET_KEYS = ("pred_rows", "pred_cols", "target_ids", "segment")


class Indexed(NamedTuple):
    """A training or eval example with its position, to find its cached reference log-probs."""

    split: str  # "train" | "eval"
    index: int
    example: Any


def tag_batch(batch: dict[str, Any], items: list[Indexed]) -> dict[str, Any]:
    """Mark a collated batch with where its examples come from (for cached references)."""
    batch["split"] = items[0].split
    batch["index"] = torch.tensor([it.index for it in items])
    return batch


def count_examples(batch: dict[str, Any]) -> float:
    """Normalisation unit of the pair and KTO methods: the example."""
    return float(len(batch["index"]))


def segment_logps(model: nn.Module, batch: dict[str, Tensor], num_segments: int, **kv):
    """(S,) per-response summed log-probs and token counts from explicit targets; a packed
    batch's spans (and a continuation's prefix columns) go along, with `kv` (`kv_out`,
    `kv_in`: see `LogpsModel.forward`)."""
    if "prefix" in batch:
        kv["prefix"] = batch["prefix"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        num_segments=num_segments,
        spans=batch.get("spans"),
        **{k: batch[k] for k in TARGET_KEYS},
        **kv,
    )
    return out.seq_logps, out.seq_tokens


class ReferenceSource:
    """Reference log-probs for a batch: from a cache, or a live forward of some module."""

    def __init__(
        self,
        mode: str,
        live: Callable[[dict[str, Tensor]], Tensor] | None = None,
        cache=None,
    ):
        self.mode, self.live, self.cache = mode, live, cache

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        if self.cache is not None:
            return self.cache.lookup(batch["split"], batch["index"])
        with torch.no_grad():
            return self.live(batch)


class PairMethod:
    """One preference loss from `PREFERENCE_LOSSES`, over pairs."""

    def __init__(self, loss: str, params: dict, pad_id: int, shared: bool):
        self.loss_fn = PREFERENCE_LOSSES[loss]
        self.params, self.pad_id, self.shared = params, pad_id, shared
        self.reference: ReferenceSource | None = None  # set once the model exists

    def collate(self, items: list[Indexed]) -> dict[str, Any]:
        examples = [it.example for it in items]
        if self.shared:
            batch = collate_packed_pairs(examples, self.pad_id)
        else:
            batch = collate_pairs(examples, self.pad_id)
        return tag_batch(batch, items)

    units = staticmethod(count_examples)

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        b = len(batch["index"])
        logps, tokens = segment_logps(model, batch, 2 * b)  # (2B,): chosen then rejected
        ref_c = ref_r = None
        if self.reference is not None:
            ref = self.reference(batch)  # (2B,)
            ref_c, ref_r = ref[:b], ref[b:]
        lp = PairLogps(logps[:b], logps[b:], ref_c, ref_r, tokens[:b], tokens[b:])
        out = self.loss_fn(lp, **self.params)
        return StepOutput(out.losses.sum(), out.metrics, token_count(batch))


def pair_length(ex: PairExample, shared: bool) -> int:
    p, c, r = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    return p + c + r if shared else p + max(c, r)


def build_pairs_method(cfg: RunConfig, tokenizer) -> Any:
    from alignkit.data.preference import load_preference_data
    from alignkit.train.methods import MethodSetup

    data = load_preference_data(cfg.data, tokenizer, seed=cfg.train.seed)
    shared = not cfg.train.parity
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    method = PairMethod(cfg.method, cfg.method_params(), pad_id, shared)
    train = [Indexed("train", i, ex) for i, ex in enumerate(data.train)]
    evals = [Indexed("eval", i, ex) for i, ex in enumerate(data.eval)]
    stats = {k: v for k, v in vars(data.stats).items() if not k.startswith("_")}
    return MethodSetup(
        method=method,
        train=train,
        eval=evals,
        lengths=[pair_length(ex, shared) for ex in data.train],
        wrap=lambda m: LogpsModel(m, chunk_size=cfg.train.logps_chunk_size),
        info={
            "format": data.format,
            **stats,
            "layout": "prefix-shared, packed" if shared else "plain",
        },
        needs_reference=needs_reference(cfg.method),
        ref_logps=lambda module, batch: segment_logps(module, batch, 2 * len(batch["index"]))[0],
    )
