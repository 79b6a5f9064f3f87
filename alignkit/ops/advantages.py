"""Advantages for PPO: masked statistics, whitening, and generalized advantage estimation.

Every tensor here is laid out per response token, (B, T), right-padded: position t of row b is
the t-th generated token, and `mask` (B, T) is 1 on real response tokens (up to and including
the end-of-turn token) and 0 on the padding after it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1; over everything, or along `dim`."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries; Bessel-corrected by default, as whitening uses it."""
    mean = masked_mean(values, mask)
    sq = masked_mean((values - mean) ** 2, mask)
    if not unbiased:
        return sq
    n = mask.sum()
    if n < 2:
        # one value has no spread: report 0 rather than dividing by zero
        return torch.zeros_like(sq)
    return sq * n / (n - 1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps=1e-8) -> Tensor:
    """(values - mean) / std over the masked entries; padding stays 0.

    shift_mean=False only rescales: rewards are whitened that way, since subtracting their mean
    would change which responses are better than "nothing" (Huang et al. 2024, detail 7).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


class Advantages(NamedTuple):
    advantages: Tensor  # (B, T) GAE advantages, 0 on padding
    returns: Tensor  # (B, T) advantages + values: the value function's regression target


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Advantages:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16).

    rewards, values, mask: (B, T). The value after a row's last real token is 0 (the episode
    ends there), so delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t and
    A_t = delta_t + gamma * lam * A_{t+1}, computed right to left.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    out = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        out[:, t] = next_adv
        next_value = values[:, t]
    return Advantages(out, (out + values) * mask)
