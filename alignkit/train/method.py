"""What an offline method supplies to the offline loop, and the batch helpers methods share.

A method (one row of `alignkit.methods` whose runner is "offline") is built by its builder into a
`MethodSetup`: the `Method` object the loop calls (collate, units, step, finalize_metrics), the
examples, and facts for `summary.json`. A method whose table row needs a reference also
implements `ReferenceUser`: how to compute its responses' log-probs under a reference module,
and a place to receive the source the run chose (`alignkit.train.reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

# The targets of a collated batch that `LogpsModel` reads: which rows/columns predict which
# token, and which response (segment) each target belongs to.
TARGET_KEYS = ("pred_rows", "pred_cols", "target_ids", "segment")


class StepOutput(NamedTuple):
    loss_sum: Tensor  # scalar: sum of per-example loss terms in this micro-batch (with grad)
    metrics: dict[str, Tensor]  # name -> (B,) detached per-example values, averaged per step
    tokens: int  # non-padding tokens processed, for throughput


class Method(Protocol):
    """What a training method supplies to the offline loop."""

    def collate(self, examples: list[Any]) -> dict[str, Any]: ...

    def units(self, batch: dict[str, Any]) -> float: ...

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput: ...

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the step's reduced means (KTO's margin from its two means)."""
        ...


@runtime_checkable
class ReferenceUser(Protocol):
    """A method whose loss compares the policy with a reference policy."""

    def ref_logps(self, module: nn.Module, batch: dict[str, Any]) -> Tensor:
        """(S,) the batch's response log-probs under `module`, in the order `step` reads them."""
        ...

    def ref_order(self, items: list[Any], batch_size: int) -> list[list[int]] | None:
        """Batches (example positions) for the precomputing pass when some order makes it
        cheaper (KTO: examples that share a prompt together); None: in order."""
        ...

    def use_reference(self, source: ReferenceSource) -> None:
        """Receive the reference the run chose; `step` reads it from then on."""
        ...


class ReferenceSource:
    """Reference log-probs for a batch: from a cache, or a live forward of some module."""

    def __init__(
        self,
        mode: str,
        live: Callable[[dict[str, Any]], Tensor] | None = None,
        cache=None,
    ):
        self.mode, self.live, self.cache = mode, live, cache

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        if self.cache is not None:
            return self.cache.lookup(batch["split"], batch["index"])
        with torch.no_grad():
            return self.live(batch)


class WithReference:
    """The reference slot of a `ReferenceUser`: empty until the run attaches its source."""

    reference: ReferenceSource | None = None

    def use_reference(self, source: ReferenceSource) -> None:
        self.reference = source

    def ref_order(self, items: list[Any], batch_size: int) -> list[list[int]] | None:
        return None

    def require_reference(self, batch: dict[str, Any]) -> Tensor:
        if self.reference is None:
            raise RuntimeError("no reference attached: the run attaches one before training")
        return self.reference(batch)


def same_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`finalize_metrics` of the methods that derive nothing."""
    return metrics


@dataclass
class MethodSetup:
    """Everything the loop needs from a method, built from the config and tokenizer."""

    method: Method
    train: list[Any]
    eval: list[Any]
    lengths: list[int]  # per training example, for length-grouped batches
    wrap: Callable[[nn.Module], nn.Module]  # model -> the module the loop trains
    info: dict[str, Any] = field(default_factory=dict)  # data facts for summary.json
    # per training example, an id shared by the examples with the same prompt: given (KTO,
    # train.group_by_prompt), the batches hold whole prompts
    prompt_groups: list[int] | None = None
    # (trained model, final/ dir) -> extra summary.json entries, run on the main process after
    # final/ is saved (e.g. a reward model's reward mean/std on the eval split)
    after_training: Callable[[nn.Module, Path], dict] | None = None


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
    """Normalisation unit of the pair, KTO and reward methods: the example."""
    return float(len(batch["index"]))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch on `device`: tensors moved, named groups of tensors (KTO's) too."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            out[k] = v.to(device)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


def segment_logps(model: nn.Module, rows: dict[str, Tensor], num_segments: int, **kv):
    """(S,) per-response summed log-probs and token counts of collated `rows` from explicit
    targets; a packed batch's spans (and a continuation's prefix columns) go along, with `kv`
    (`kv_out`, `kv_in`: see `LogpsModel.forward`)."""
    if "prefix" in rows:
        kv["prefix"] = rows["prefix"]
    out = model(
        input_ids=rows["input_ids"],
        attention_mask=rows["attention_mask"],
        position_ids=rows["position_ids"],
        num_segments=num_segments,
        spans=rows.get("spans"),
        **{k: rows[k] for k in TARGET_KEYS},
        **kv,
    )
    return out.seq_logps, out.seq_tokens


def build_method(cfg, tokenizer) -> MethodSetup:
    """The setup of `cfg.method` from its method-table builder (offline methods)."""
    from alignkit.methods import resolve, spec

    row = spec(cfg.method)
    if row.runner != "offline":
        raise ValueError(f"{row.name} runs in the {row.runner} loop, not the offline one")
    return resolve(row.builder)(cfg, tokenizer)
