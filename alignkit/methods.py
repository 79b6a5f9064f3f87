"""The method table: every training method alignkit runs, one row each.

Everything that differs between methods by *kind* is read from here: the config section, where
the reference log-probs come from, which loader and preflight the data goes through, which loop
runs the method, which run-health rules apply, and the function that builds it. No list of method
names exists anywhere else. This module imports no torch (the config, the CLI's help and the
health rules read it), so builders and losses are named as `module:function` strings, imported
only when a run starts.

A new pair loss is one function in `alignkit/losses/preference.py` plus one row here; see
docs/architecture.md for the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from alignkit import knobs
from alignkit.errors import ConfigError

# required: a reference policy whose log-probs the loss compares against (the `reference`
#   section picks cache, adapter or copy); free: the loss needs none (SimPO, ORPO);
#   start: always the starting model, not configurable (PPO's KL anchor); none: no reference.
Reference = Literal["required", "free", "start", "none"]
# sft: prompt/completion or conversations; pairs: prompt/chosen/rejected; unpaired: KTO's
# prompt/completion/label (pairs are split); prompts: prompt-only rows, responses are sampled.
DataKind = Literal["sft", "pairs", "unpaired", "prompts"]
Runner = Literal["offline", "rollout"]

# Health-rule tags: a rule with a tag applies to the methods whose row lists it; a rule without
# one applies wherever its metrics are logged.
SFT_LABELS = "sft_labels"  # every batch must hold target tokens
SIGMOID_LOSS = "sigmoid_loss"  # the loss sits at ln 2 while chosen and rejected tie
POLICY_REWARDS = "policy_rewards"  # rewards are the policy's own log-probs (not a scorer's)

PAIR_BUILDER = "alignkit.train.preference:build_pairs_method"


class LearningRates(NamedTuple):
    """A method's usual learning rates: the default and the range practice stays within, with
    LoRA adapters and with every parameter trained. Full fine-tuning moves all the weights, so
    its rates are one to two orders of magnitude below LoRA's for the same method."""

    lora: float
    lora_range: tuple[float, float]
    full: float
    full_range: tuple[float, float]

    def pick(self, lora: bool) -> tuple[float, tuple[float, float]]:
        return (self.lora, self.lora_range) if lora else (self.full, self.full_range)


# SFT: LoRA 2e-4 is the common QLoRA recipe (Dettmers et al. 2023); full 2e-5 (Alpaca, Zephyr).
SFT_LR = LearningRates(2e-4, (1e-5, 1e-3), 2e-5, (1e-6, 1e-4))
# DPO family and KTO: full fine-tuning 5e-7 (Zephyr; Rafailov et al. use 1e-6), LoRA 5e-5.
PREFERENCE_LR = LearningRates(5e-5, (5e-6, 5e-4), 5e-7, (1e-7, 1e-5))
# ORPO trains an SFT term as well: its paper uses 8e-6 for full fine-tuning.
ORPO_LR = LearningRates(5e-5, (5e-6, 5e-4), 8e-6, (1e-6, 5e-5))
# Reward models: about 1e-5 full (InstructGPT used 9e-6), 1e-4 with LoRA.
REWARD_LR = LearningRates(1e-4, (5e-6, 5e-4), 1e-5, (1e-6, 5e-5))
# PPO: about 1e-5 (InstructGPT 9.65e-6); LoRA policies go up to a few 1e-4 on short runs.
PPO_LR = LearningRates(1e-5, (1e-6, 5e-4), 1e-5, (1e-7, 5e-5))


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table."""

    name: str
    knobs: type[knobs.Section]  # the class of its config section (named after the method)
    reference: Reference
    data: DataKind
    runner: Runner
    builder: str  # "module:function" returning the method's setup for its loop
    lr: LearningRates  # train.lr's default and usual range, with LoRA and without
    health: frozenset[str] = field(default_factory=frozenset)
    loss: str | None = None  # pair methods: the function's name in alignkit.losses.preference
    head: Literal["lm", "reward"] = "lm"  # reward: a scalar score head, the model never samples
    summary: str = ""  # one line for help texts and the docs

    @property
    def section(self) -> str:
        return self.name

    @property
    def configurable_reference(self) -> bool:
        return self.reference == "required"


def pair(
    name: str,
    section: type[knobs.Section],
    reference: Reference,
    health,
    summary: str,
    lr: LearningRates = PREFERENCE_LR,
):
    """A row for a pair loss of the DPO family: the `loss` function named after the method."""
    return MethodSpec(
        name=name,
        knobs=section,
        reference=reference,
        data="pairs",
        runner="offline",
        builder=PAIR_BUILDER,
        lr=lr,
        health=frozenset(health),
        loss=name,
        summary=summary,
    )


# fmt: off
_ROWS = (
    MethodSpec(
        name="sft", knobs=knobs.SFTConfig, reference="none", data="sft", runner="offline",
        builder="alignkit.train.sft:build_sft", lr=SFT_LR, health=frozenset({SFT_LABELS}),
        summary="supervised fine-tuning on completions",
    ),
    pair("dpo", knobs.DPOConfig, "required", {SIGMOID_LOSS, POLICY_REWARDS},
         "direct preference optimization (label_smoothing > 0: conservative DPO)"),
    pair("ipo", knobs.IPOConfig, "required", {POLICY_REWARDS}, "identity preference loss"),
    pair("hinge", knobs.HingeConfig, "required", {POLICY_REWARDS}, "SLiC hinge loss"),
    pair("robust_dpo", knobs.RobustDPOConfig, "required", {SIGMOID_LOSS, POLICY_REWARDS},
         "DPO de-biased for flipped labels"),
    pair("apo_zero", knobs.BetaConfig, "required", {POLICY_REWARDS},
         "anchored preference optimization: chosen up and rejected down, each on its own"),
    pair("simpo", knobs.SimPOConfig, "free", {POLICY_REWARDS},
         "length-normalised, reference-free preference loss"),
    pair("orpo", knobs.ORPOConfig, "free", {POLICY_REWARDS},
         "SFT plus an odds-ratio penalty, reference-free", ORPO_LR),
    MethodSpec(
        name="kto", knobs=knobs.KTOConfig, reference="required", data="unpaired",
        runner="offline", builder="alignkit.train.kto:build_kto_method", lr=PREFERENCE_LR,
        health=frozenset({POLICY_REWARDS}),
        summary="prospect-theoretic loss on thumbs-up/down examples",
    ),
    MethodSpec(
        name="reward", knobs=knobs.RewardConfig, reference="none", data="pairs",
        runner="offline", builder="alignkit.train.reward:build_reward_method", lr=REWARD_LR,
        head="reward",
        summary="Bradley-Terry reward model",
    ),
    MethodSpec(
        name="ppo", knobs=knobs.PPOConfig, reference="start", data="prompts", runner="rollout",
        builder="alignkit.train.rl.ppo:build_ppo", lr=PPO_LR,
        summary="RLHF with PPO against a reward model or a verifiable reward",
    ),
)
# fmt: on

TABLE: dict[str, MethodSpec] = {row.name: row for row in _ROWS}
METHODS: tuple[str, ...] = tuple(TABLE)


def spec(name: str) -> MethodSpec:
    """The row of method `name`; an unknown name is a config error listing the known ones."""
    row = TABLE.get(name)
    if row is None:
        raise ConfigError(f"unknown method '{name}'", hint=f"use one of: {', '.join(METHODS)}")
    return row


def names(**where) -> tuple[str, ...]:
    """Methods whose row has every given attribute value, e.g. names(data="pairs")."""
    return tuple(row.name for row in _ROWS if all(getattr(row, k) == v for k, v in where.items()))


def with_health(tag: str) -> frozenset[str]:
    """The methods a health-rule tag applies to."""
    return frozenset(row.name for row in _ROWS if tag in row.health)


def resolve(ref: str):
    """Import a `module:function` reference of the table."""
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
