"""Method registry: `method:` in the config picks a builder from this dict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from alignkit.config import PAIR_METHODS, RunConfig
from alignkit.train.loop import Method


@dataclass
class MethodSetup:
    """Everything the loop needs from a method, built from the config and tokenizer."""

    method: Method
    train: list[Any]
    eval: list[Any]
    lengths: list[int]  # per training example, for length-grouped batches
    wrap: Callable[[nn.Module], nn.Module]  # model -> the module the loop trains
    info: dict[str, Any] = field(default_factory=dict)  # data facts for summary.json
    needs_reference: bool = False
    # (module, batch) -> (S,) reference log-probs of the batch's responses, segment order
    ref_logps: Callable[[nn.Module, dict], Any] | None = None
    # (examples, batch size) -> the batches (example positions) in which to precompute reference
    # log-probs, when some order makes that pass cheaper (KTO: examples sharing a prompt
    # together); None: in order, batch_size at a time
    ref_order: Callable[[list[Any], int], list[list[int]]] | None = None
    # per training example, an id shared by the examples with the same prompt: given (KTO,
    # train.group_by_prompt), the batches hold whole prompts
    prompt_groups: list[int] | None = None
    head: str = "lm"  # "lm" (causal LM) or "reward" (scalar score head), for load_model
    # (trained model, final/ dir) -> extra summary.json entries, run on the main process after
    # final/ is saved (e.g. a reward model's reward mean/std on the eval split)
    after_training: Callable[[nn.Module, Path], dict] | None = None


def _sft(cfg: RunConfig, tokenizer) -> MethodSetup:
    from alignkit.train.sft import build_sft

    return build_sft(cfg, tokenizer)


def _pairs(cfg: RunConfig, tokenizer) -> MethodSetup:
    from alignkit.train.preference import build_pairs_method

    return build_pairs_method(cfg, tokenizer)


def _reward(cfg: RunConfig, tokenizer) -> MethodSetup:
    from alignkit.train.reward import build_reward_method

    return build_reward_method(cfg, tokenizer)


def _kto(cfg: RunConfig, tokenizer) -> MethodSetup:
    from alignkit.train.kto import build_kto_method

    return build_kto_method(cfg, tokenizer)


BUILDERS: dict[str, Callable[[RunConfig, Any], MethodSetup]] = {
    "sft": _sft,
    **{name: _pairs for name in PAIR_METHODS},
    "kto": _kto,
    "reward": _reward,
}


def build_method(cfg: RunConfig, tokenizer) -> MethodSetup:
    return BUILDERS[cfg.method](cfg, tokenizer)
