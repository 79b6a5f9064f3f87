"""PPO losses for RLHF: clipped policy and value objectives, the KL-shaped reward, entropy.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347), Eq. 7 (the
clipped surrogate) and Eq. 9 (policy + value terms); Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences" (arXiv:1909.08593), Eq. 2 (reward minus a KL penalty); the
implementation details follow Huang et al. 2024, "The N+ Implementation Details of RLHF with
PPO" (arXiv:2403.17031).

All tensors are per response token, (B, T), right-padded, with `mask` (B, T) 1 on real tokens.
Losses come back per token (0 on padding) so the trainer can sum them over the whole
accumulated batch and divide by its token count (global normalisation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PolicyLoss(NamedTuple):
    losses: Tensor  # (B, T) per-token clipped surrogate loss, 0 on padding
    clipped: Tensor  # (B, T) 1.0 where the clipped branch was taken (policy/clipfrac)
    approxkl: Tensor  # (B, T) 0.5 * (logp - old_logp)^2 (policy/approxkl)
    ratio: Tensor  # (B, T) pi / pi_old, detached


def policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> PolicyLoss:
    """Clipped surrogate, PPO Eq. 7, negated to be minimised.

    logps: (B, T) log pi(a_t|s_t) under the policy being trained (with grad);
    old_logps: (B, T) the same under the policy that sampled the rollout;
    advantages: (B, T), already whitened.
    loss_t = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps)), r_t = exp(logp - old_logp).
    """
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    losses = torch.maximum(unclipped, clipped) * mask
    took_clip = (clipped > unclipped).to(logps.dtype) * mask
    # k2 estimator of KL(pi_old || pi): the quantity PPO implementations report as approxkl
    approxkl = 0.5 * log_ratio.detach() ** 2 * mask
    return PolicyLoss(losses, took_clip.detach(), approxkl, ratio.detach())


class ValueLoss(NamedTuple):
    losses: Tensor  # (B, T) per-token 0.5 * max of squared errors, 0 on padding
    clipped: Tensor  # (B, T) 1.0 where the clipped prediction gave the larger error


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> ValueLoss:
    """Clipped value loss (Huang et al. 2024, detail 9; as in OpenAI's baselines PPO2).

    values: (B, T) current predictions (with grad); old_values: (B, T) predictions at rollout
    time; returns: (B, T) GAE returns. The prediction may move at most `cliprange_value` from the
    old one: loss_t = 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2).
    """
    mask = mask.to(values.dtype)
    old, target = old_values.detach(), returns.detach()
    v_clipped = old + torch.clamp(values - old, -cliprange_value, cliprange_value)
    err = (values - target) ** 2
    err_clipped = (v_clipped - target) ** 2
    losses = 0.5 * torch.maximum(err, err_clipped) * mask
    return ValueLoss(losses, (err_clipped > err).to(values.dtype).detach() * mask)


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """(B, T) per-token k1 estimator of KL(pi || pi_ref): log pi - log pi_ref at the sampled
    token (Schulman 2020, "Approximating KL divergence"); unbiased, can be negative per token."""
    return logps - ref_logps


class TokenRewards(NamedTuple):
    rewards: Tensor  # (B, T) -kl_coef * kl_t, plus the score at each row's last real token
    kl: Tensor  # (B, T) k1 KL per token, 0 on padding
    non_score: Tensor  # (B, T) the KL penalty alone


def token_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float
) -> TokenRewards:
    """The RLHF reward of Ziegler et al. 2019, Eq. 2, spread over tokens.

    scores: (B,) reward-model (or function) score of each whole response;
    logps, ref_logps: (B, T) sampled tokens' log-probs under the rollout policy and reference.
    Each token pays -kl_coef * (logp - ref_logp); the score is added at the final response
    token only, since the reward model judges the finished response (Huang et al. detail 5).
    """
    mask = mask.to(logps.dtype)
    kl = kl_k1(logps, ref_logps) * mask
    non_score = -kl_coef * kl
    lengths = mask.sum(1).long()  # (B,) real tokens per row
    last = (lengths - 1).clamp(min=0)
    rewards = non_score.clone()
    has = lengths > 0
    rows = torch.arange(scores.shape[0], device=scores.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return TokenRewards(rewards, kl, non_score)


def missing_eos_penalty(scores: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """(B,) scores minus `penalty` for the responses that never emitted EOS (ended False):
    without it a policy can learn to ramble until the length limit (Huang et al. detail 10)."""
    if penalty is None:
        return scores
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(N, V) logits -> (N,) entropy of softmax(logits) in nats, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
