"""GAE and masked whitening against values worked out by hand."""

import pytest
import torch

from alignkit.ops.advantages import gae, masked_mean, masked_var, masked_whiten


def test_gae_hand_worked():
    # gamma 0.9, lambda 0.5; V after the last token is 0 (the episode ends)
    # t=2: delta = 1 - 0.7 = 0.3                 A2 = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03        A1 = 0.03 + 0.45 * 0.3 = 0.165
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04        A0 = 0.04 + 0.45 * 0.165 = 0.11425
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    out = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.11425, 0.165, 0.3]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.61425, 0.765, 1.0]]))


def test_gae_ignores_padding_after_the_last_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0, 7.0]])  # padding holds garbage
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    out = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.11425, 0.165, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(out.returns[:, 3:], torch.zeros(1, 2))


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    out = gae(rewards, values, torch.ones(3, 6), gamma=1.0, lam=1.0)
    future = rewards.flip(1).cumsum(1).flip(1)  # sum of rewards from t to the end
    torch.testing.assert_close(out.advantages, future - values)
    torch.testing.assert_close(out.returns, future)


def test_gae_lambda_zero_is_one_step_td():
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.5, 0.25]])
    out = gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    # A0 = 1 + 0.5 * 0.25 - 0.5 = 0.625;  A1 = 2 - 0.25 = 1.75
    torch.testing.assert_close(out.advantages, torch.tensor([[0.625, 1.75]]))


def test_masked_mean_and_var():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(4.0)
    assert masked_var(x, m).item() == pytest.approx(4.0)  # (4 + 0 + 4) / (3 - 1)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(8 / 3)
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([4.0]))


def test_masked_whiten_by_hand():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    # mean 4, std 2 -> (-1, 0, 1); padding stays 0
    torch.testing.assert_close(masked_whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # scale only: the mean is put back, as for reward whitening
    torch.testing.assert_close(
        masked_whiten(x, m, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]])
    )


def test_masked_whiten_statistics_over_many_rows():
    torch.manual_seed(1)
    x = torch.randn(4, 7) * 3 + 5
    m = (torch.rand(4, 7) > 0.3).long()
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[m == 0] == 0).all()


def test_single_value_has_zero_variance_not_nan():
    x, m = torch.tensor([[3.0, 1.0]]), torch.tensor([[1, 0]])
    assert masked_var(x, m).item() == 0.0
    assert torch.isfinite(masked_whiten(x, m)).all()
