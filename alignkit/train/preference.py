"""Paired preference optimization: every method-table row with a pair loss (DPO and family).

A micro-batch is B pairs; its normalisation unit is the pair, so the loss of a step is the mean
over the pairs of the whole accumulated global batch. The policy's log-probs come from one forward
over prefix-shared rows (prompt once, both responses after it), packed into one row without
padding, unless `train.parity` asks for the plain layout (two padded rows per pair); the
reference's come from the source `alignkit.train.reference` picked.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from alignkit.config import RunConfig
from alignkit.data.pair_batching import collate_packed_pairs, collate_pairs, token_count
from alignkit.data.preference import PairExample
from alignkit.losses import PairLogps, loss_for, needs_reference
from alignkit.train.forward import LogpsModel
from alignkit.train.method import (
    Indexed,
    MethodSetup,
    StepOutput,
    WithReference,
    count_examples,
    same_metrics,
    segment_logps,
    tag_batch,
)


class PairMethod(WithReference):
    """One pair loss (the method table's `loss` of the method), over pairs; reference-free
    losses never read the reference slot."""

    def __init__(self, method: str, params: dict, pad_id: int, shared: bool):
        self.loss_fn = loss_for(method)
        self.params, self.pad_id, self.shared = params, pad_id, shared
        self.uses_reference = needs_reference(method)

    def collate(self, items: list[Indexed]) -> dict[str, Any]:
        examples = [it.example for it in items]
        if self.shared:
            batch = collate_packed_pairs(examples, self.pad_id)
        else:
            batch = collate_pairs(examples, self.pad_id)
        return tag_batch(batch, items)

    units = staticmethod(count_examples)
    finalize_metrics = staticmethod(same_metrics)

    def ref_logps(self, module: nn.Module, batch: dict[str, Any]) -> Tensor:
        """(2B,) chosen then rejected log-probs under `module`."""
        return segment_logps(module, batch, 2 * len(batch["index"]))[0]

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        b = len(batch["index"])
        logps, tokens = segment_logps(model, batch, 2 * b)  # (2B,): chosen then rejected
        ref_c = ref_r = None
        if self.uses_reference:
            ref = self.require_reference(batch)  # (2B,)
            ref_c, ref_r = ref[:b], ref[b:]
        lp = PairLogps(logps[:b], logps[b:], ref_c, ref_r, tokens[:b], tokens[b:])
        out = self.loss_fn(lp, **self.params)
        return StepOutput(out.losses.sum(), out.metrics, token_count(batch))


def pair_length(ex: PairExample, shared: bool) -> int:
    p, c, r = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    return p + c + r if shared else p + max(c, r)


def build_pairs_method(cfg: RunConfig, tokenizer) -> MethodSetup:
    from alignkit.data.preference import load_preference_data

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
    )
