"""Scores for rollouts of any online method: a reward model (or ensemble), or a Python function.

The method's config section names the source (`ppo.reward_model` or `ppo.reward_fn`, and the
same keys in the section of any other online method).

A function is named `module:function` and called as
``fn(prompts: list[str], responses: list[str], examples: list[dict]) -> sequence of floats``
(see :mod:`alignkit.rewards`). Whatever it does wrong (cannot be imported, raises, returns the
wrong length, a non-number or NaN) stops the run with an :class:`AlignkitError` naming it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.data.prompts import PromptExample
from alignkit.errors import AlignkitError, ConfigError, ModelError

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


def load_reward_fn(spec: str, where: str = "ppo.reward_fn") -> RewardFn:
    """Import `module:function`; ConfigError when it cannot be found or is not callable.
    `where` is the config key that named it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"'{spec}' is not of the form module:function",
            where=where,
            hint="e.g. alignkit.rewards:gsm8k_answer, or mypackage.rewards:my_fn",
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or whatever the module raises on import
        raise ConfigError(
            f"cannot import module '{module_name}': {type(exc).__name__}: {exc}",
            where=where,
            hint="make the module importable (installed, or on PYTHONPATH)",
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(
            f"module '{module_name}' has no function '{attr}'",
            where=where,
            hint="functions there: "
            + ", ".join(n for n in dir(module) if callable(getattr(module, n)) and n[0] != "_"),
        )
    return fn


def call_reward_fn(fn: RewardFn, name: str, prompts, responses, examples) -> Tensor:
    """Call a reward function and check what it returns: (N,) float32 finite scores."""
    hint = "a reward function takes (prompts, responses, examples) and returns one float each"
    try:
        out = fn(list(prompts), list(responses), list(examples))
    except Exception as exc:
        raise AlignkitError(
            f"reward function {name} raised {type(exc).__name__}: {exc}", hint=hint
        ) from None
    if isinstance(out, Tensor):
        out = out.detach().cpu().reshape(-1).tolist()
    if isinstance(out, str | bytes) or not isinstance(out, Sequence | range):
        try:
            out = list(out)
        except TypeError:
            raise AlignkitError(
                f"reward function {name} returned {type(out).__name__}, not a sequence of floats",
                hint=hint,
            ) from None
    if len(out) != len(responses):
        raise AlignkitError(
            f"reward function {name} returned {len(out)} scores for {len(responses)} responses",
            hint=hint,
        )
    values = []
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, int | float):
            try:
                v = float(v)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise AlignkitError(
                    f"reward function {name} returned {type(v).__name__} for response {i}, "
                    "not a number",
                    hint=hint,
                ) from None
        if not math.isfinite(float(v)):
            raise AlignkitError(
                f"reward function {name} returned {v} for response {i}", hint="return finite floats"
            )
        values.append(float(v))
    return torch.tensor(values, dtype=torch.float32)


def same_tokenizer(a: Any, b: Any) -> bool:
    """Same vocabulary and special tokens: ids mean the same text under both."""
    if len(a) != len(b) or a.eos_token_id != b.eos_token_id:
        return False
    return a.get_vocab() == b.get_vocab()


def check_tokenizer(policy_tok: Any, other_tok: Any, what: str, where: str) -> None:
    if not same_tokenizer(policy_tok, other_tok):
        raise ModelError(
            f"the {what}'s tokenizer differs from the policy's ({len(other_tok)} vs "
            f"{len(policy_tok)} tokens, eos {other_tok.eos_token!r} vs {policy_tok.eos_token!r})",
            where=where,
            hint=f"train the {what} from the same base model as the policy",
        )


class RewardSource:
    """Scores a batch of responses to prompts: (N,) float32 on the CPU."""

    def __init__(self, score: Callable[[list[PromptExample], list[str]], Tensor], describe: str):
        self._score, self.describe = score, describe

    def __call__(self, examples: list[PromptExample], responses: list[str]) -> Tensor:
        return self._score(examples, responses).detach().float().cpu()


def function_reward(spec: str, where: str = "ppo.reward_fn") -> RewardSource:
    fn = load_reward_fn(spec, where)

    def score(examples: list[PromptExample], responses: list[str]) -> Tensor:
        return call_reward_fn(
            fn, spec, [e.text for e in examples], responses, [e.row for e in examples]
        )

    return RewardSource(score, f"reward function {spec}")


def model_reward(
    section, policy_tokenizer: Any, device, *, batch_size: int = 8, name: str = "ppo"
) -> RewardSource:
    """A reward model or ensemble through `alignkit.models.reward`, checked and normalised.
    `section` is the method's config section (`name`: its key, for error messages)."""
    try:
        rm = importlib.import_module("alignkit.models.reward")
    except ModuleNotFoundError as exc:
        if exc.name != "alignkit.models.reward":
            raise
        raise ConfigError(
            "reward models are not available in this installation",
            where=f"{name}.reward_model",
            hint=f"use {name}.reward_fn with a module:function reward",
        ) from None
    paths = list(section.reward_model)
    ensemble_norm = section.normalize_reward and len(paths) > 1
    if ensemble_norm:  # each member standardised with its own stats before combining
        members = [rm.load_reward_model(p, device=device) for p in paths]
        scorer = rm.RewardEnsemble(members, section.reward_combine, normalize=True)
    else:
        scorer = rm.load_reward_models(paths, combine=section.reward_combine, device=device)
    for member in getattr(scorer, "scorers", [scorer]):
        check_tokenizer(policy_tokenizer, member.tokenizer, "reward model", f"{name}.reward_model")
    mean, std = 0.0, 1.0
    if section.normalize_reward and not ensemble_norm:
        stats = getattr(scorer, "stats", None)
        if not stats:
            raise ConfigError(
                f"{name}.normalize_reward needs the reward model's recorded mean and std, and "
                f"{', '.join(paths)} has none",
                where=f"{name}.normalize_reward",
                hint="use a reward model trained by alignkit (it records them), or set "
                f"{name}.normalize_reward=false",
            )
        mean, std = float(stats["mean"]), max(float(stats["std"]), 1e-6)

    def score(examples: list[PromptExample], responses: list[str]) -> Tensor:
        raw = scorer.score([e.messages for e in examples], responses, batch_size=batch_size)
        return (raw.float().cpu() - mean) / std

    what = "ensemble" if len(paths) > 1 else "reward model"
    norm = f", normalised with mean {mean:.3f} std {std:.3f}" if section.normalize_reward else ""
    return RewardSource(score, f"{what} {', '.join(paths)}{norm}")


def make_reward(
    section, policy_tokenizer: Any, device, *, batch_size: int, name: str = "ppo"
) -> RewardSource:
    """The score source a method's config section names: `reward_fn`, else `reward_model`."""
    if section.reward_fn:
        return function_reward(section.reward_fn, f"{name}.reward_fn")
    return model_reward(section, policy_tokenizer, device, batch_size=batch_size, name=name)
