"""PPO losses against values worked out by hand, and their limits."""

import math

import pytest
import torch

from alignkit.losses.ppo import (
    entropy_from_logits,
    kl_k1,
    missing_eos_penalty,
    policy_loss,
    token_rewards,
    value_loss,
)


def _logps_for_ratios(ratios):
    old = torch.zeros(1, len(ratios))
    return torch.log(torch.tensor([ratios])), old


def test_policy_loss_by_hand():
    # A=2, r=1.5 -> clipped at 1.2: max(-3, -2.4) = -2.4 (clip taken)
    # A=-1, r=0.5 -> max(0.5, 0.8) = 0.8 (clip taken)
    # A=1, r=1.1 -> inside the range: -1.1 (no clip)
    logps, old = _logps_for_ratios([1.5, 0.5, 1.1])
    adv = torch.tensor([[2.0, -1.0, 1.0]])
    out = policy_loss(logps, old, adv, torch.ones(1, 3), cliprange=0.2)
    torch.testing.assert_close(out.losses, torch.tensor([[-2.4, 0.8, -1.1]]))
    torch.testing.assert_close(out.clipped, torch.tensor([[1.0, 1.0, 0.0]]))
    expected_kl = 0.5 * torch.log(torch.tensor([[1.5, 0.5, 1.1]])) ** 2
    torch.testing.assert_close(out.approxkl, expected_kl)


def test_policy_loss_clipped_tokens_get_no_gradient():
    logps, old = _logps_for_ratios([1.5, 1.1])
    logps.requires_grad_(True)
    out = policy_loss(logps, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), cliprange=0.2)
    out.losses.sum().backward()
    assert logps.grad[0, 0] == 0  # clipped: no incentive to move further
    assert logps.grad[0, 1] == pytest.approx(-1.1)  # d(-A r)/d logp = -A r


def test_policy_loss_at_ratio_one_is_minus_advantage_and_masks_padding():
    logps = torch.randn(2, 4)
    adv = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = policy_loss(logps, logps.clone(), adv, mask, cliprange=0.2)
    torch.testing.assert_close(out.losses, -adv * mask)
    assert out.clipped.sum() == 0 and out.approxkl.sum() == 0


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 1.0, 1.1]])
    returns = torch.tensor([[0.5, 2.0, 3.0]])
    out = value_loss(values, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    # 1: err 0.25, clipped pred 0.2 -> err 0.09: 0.5 * 0.25 = 0.125, unclipped wins
    # 2: err 1, clipped pred 0.2 -> err 3.24: 0.5 * 3.24 = 1.62, clipped wins
    # 3: inside the range: 0.5 * 1.9^2 = 1.805
    torch.testing.assert_close(out.losses, torch.tensor([[0.125, 1.62, 1.805]]))
    torch.testing.assert_close(out.clipped, torch.tensor([[0.0, 1.0, 0.0]]))


def test_value_loss_masks_padding():
    mask = torch.tensor([[1, 0]])
    out = value_loss(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2), mask, 0.2)
    torch.testing.assert_close(out.losses, torch.tensor([[0.5, 0.0]]))


def test_kl_k1_is_zero_when_policy_is_reference():
    lp = torch.randn(3, 5)
    assert kl_k1(lp, lp).abs().max() == 0
    torch.testing.assert_close(kl_k1(lp, lp - 0.5), torch.full((3, 5), 0.5))


def test_token_rewards_score_at_last_real_token_and_kl_everywhere():
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([3.0, 5.0])
    out = token_rewards(scores, logps, ref, mask, kl_coef=0.1)
    # kl = logp - ref: row 0 (0.5, 0, -0.5); row 1 (0, -1, padding 0)
    torch.testing.assert_close(out.kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.0, 0.05 + 3.0], [0.0, 0.1 + 5.0, 0.0]])
    torch.testing.assert_close(out.rewards, expected)


def test_token_rewards_with_zero_kl_coef_is_score_only():
    mask = torch.tensor([[1, 1, 0, 0]])
    out = token_rewards(torch.tensor([2.0]), torch.randn(1, 4), torch.randn(1, 4), mask, 0.0)
    torch.testing.assert_close(out.rewards, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))


def test_missing_eos_penalty_hits_exactly_the_unended():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ended = torch.tensor([True, False, True, False])
    torch.testing.assert_close(
        missing_eos_penalty(scores, ended, 1.5), torch.tensor([1.0, 0.5, 3.0, 2.5])
    )
    assert missing_eos_penalty(scores, ended, None) is scores


def test_entropy_limits():
    uniform = torch.zeros(2, 16)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2,), math.log(16)))
    peaked = torch.tensor([[0.0, -1e4, -1e4]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
