"""Supervised fine-tuning: batches of tokenized conversations, NLL on the labelled tokens."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from torch import Tensor, nn

from alignkit.config import RunConfig
from alignkit.data import collate, collate_packed, load_sft_data, pack_examples
from alignkit.losses.sft import sft_loss
from alignkit.ops.logps import IGNORE_INDEX
from alignkit.train.forward import LogpsModel
from alignkit.train.method import MethodSetup, StepOutput, same_metrics


class SFTMethod:
    """Token-level NLL; a micro-batch's normalisation units are its labelled tokens."""

    def __init__(self, pad_id: int, packed: bool):
        self.pad_id, self.packed = pad_id, packed

    def collate(self, examples: list[Any]) -> dict[str, Tensor]:
        if self.packed:
            return collate_packed(examples, self.pad_id)
        return collate(examples, self.pad_id)

    def units(self, batch: dict[str, Tensor]) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    finalize_metrics = staticmethod(same_metrics)

    def step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            position_ids=batch.get("position_ids"),
        )
        loss = sft_loss(out.seq_logps, out.seq_tokens)
        # Padding is the pad id in input_ids beyond each row's length; count real tokens.
        tokens = (
            int((batch["labels"] != IGNORE_INDEX).sum())
            if self.packed
            else int(batch["attention_mask"].sum())
        )
        # Labelled tokens per sequence, averaged per step: 0 means every label in the step was
        # masked, which the run-health rule `labels_all_masked` reports.
        metrics = {"target_tokens": out.seq_tokens.detach().float()}  # (B,)
        return StepOutput(loss.losses.sum(), metrics, tokens)


def build_sft(cfg: RunConfig, tokenizer) -> MethodSetup:
    data = load_sft_data(cfg.data, tokenizer, seed=cfg.train.seed)
    train, evals = data.train, data.eval
    if cfg.data.packing:
        train = pack_examples(train, cfg.data.max_length)
        evals = pack_examples(evals, cfg.data.max_length)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    stats = asdict(data.stats) if is_dataclass(data.stats) else dict(data.stats._asdict())
    info = {"format": data.format, **stats, "packed_rows": len(train) if cfg.data.packing else None}
    return MethodSetup(
        method=SFTMethod(pad_id, cfg.data.packing),
        train=train,
        eval=evals,
        lengths=[len(ex.input_ids) for ex in train],
        wrap=lambda m: LogpsModel(m, chunk_size=cfg.train.logps_chunk_size),
        info=info,
    )
