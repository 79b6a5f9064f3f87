"""Held-out preference accuracy: does the policy prefer the chosen response, relative to its
reference, more often than chance?

The implicit reward of DPO (Rafailov et al. 2023, Eq. 5), r(x, y) = beta * log pi(y|x) /
pi_ref(y|x), is well defined for any policy trained from a reference, so the same check applies
to DPO, KTO or anything else: accuracy is the share of held-out pairs whose chosen response gets
the higher reward, and the margin is the mean reward difference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from alignkit.data.pair_batching import collate_packed_pairs
from alignkit.data.preference import PairExample
from alignkit.train.forward import LogpsModel
from alignkit.train.method import segment_logps
from alignkit.train.reference import adapter_disabled


class PairAccuracy(NamedTuple):
    accuracy: float
    margin: float  # mean of beta * (chosen log-ratio - rejected log-ratio)
    pairs: int


@torch.no_grad()
def pair_logps(module: nn.Module, pairs: list[PairExample], pad_id: int, batch_size: int):
    """(n, 2) summed log-probs of chosen and rejected responses, in pair order."""
    rows = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        logps, _ = segment_logps(module, collate_packed_pairs(chunk, pad_id), 2 * len(chunk))
        rows.append(logps.view(2, -1).T)  # (b, 2)
    return torch.cat(rows)


def implicit_reward_accuracy(policy: Tensor, reference: Tensor, beta: float) -> PairAccuracy:
    """policy, reference: (n, 2) log-probs of (chosen, rejected)."""
    reward = beta * (policy - reference)  # (n, 2)
    margin = reward[:, 0] - reward[:, 1]
    return PairAccuracy((margin > 0).float().mean().item(), margin.mean().item(), len(margin))


class PairScores(NamedTuple):
    logps: Tensor  # (n, 2) summed log-probs of (chosen, rejected)
    tokens: Tensor  # (n, 2) response tokens of (chosen, rejected)


@torch.no_grad()
def pair_scores(
    module: nn.Module, pairs: list[PairExample], pad_id: int, batch_size: int
) -> PairScores:
    """Like :func:`pair_logps`, with each response's token count (for per-token averages).

    `module` is a LogpsModel on any device; the batches are moved to it.
    """
    device = next(module.parameters()).device
    logps, tokens = [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        batch = {k: v.to(device) for k, v in collate_packed_pairs(chunk, pad_id).items()}
        lp, tok = segment_logps(module, batch, 2 * len(chunk))  # (2b,): chosen then rejected
        logps.append(lp.float().cpu().view(2, -1).T)  # (b, 2)
        tokens.append(tok.float().cpu().view(2, -1).T)
    return PairScores(torch.cat(logps), torch.cat(tokens))


class LoglikPreference(NamedTuple):
    accuracy: float  # share of pairs with log p(chosen) > log p(rejected)
    accuracy_norm: float  # the same per token: what SimPO optimises (Meng et al. 2024, Eq. 4)
    margin: float  # mean of log p(chosen) - log p(rejected)
    margin_norm: float  # mean per-token margin
    pairs: int


def loglik_preference(scores: PairScores) -> LoglikPreference:
    """Reference-free preference: does the model itself find the chosen response more likely?

    Summed log-probs favour the shorter response whatever its content, so the per-token variant
    is reported beside it; SimPO and ORPO models are trained on that kind of quantity.
    """
    margin = scores.logps[:, 0] - scores.logps[:, 1]  # (n,)
    per_token = scores.logps / scores.tokens.clamp(min=1)  # (n, 2)
    margin_norm = per_token[:, 0] - per_token[:, 1]
    return LoglikPreference(
        (margin > 0).float().mean().item(),
        (margin_norm > 0).float().mean().item(),
        margin.mean().item(),
        margin_norm.mean().item(),
        len(margin),
    )


def adapter_pair_accuracy(
    peft_model: nn.Module, pairs: list[PairExample], *, beta: float, pad_id: int, batch_size=4
) -> PairAccuracy:
    """Accuracy of a LoRA policy against its own base (the adapter disabled) as reference."""
    module = LogpsModel(peft_model).eval()
    policy = pair_logps(module, pairs, pad_id, batch_size)
    with adapter_disabled(peft_model):
        reference = pair_logps(module, pairs, pad_id, batch_size)
    return implicit_reward_accuracy(policy, reference, beta)
