"""KTO loss, its KL reference point and its masked metrics, against hand values and TRL 1.16."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import KTOLogps, kto, kto_kl_estimate, kto_metric_means


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected).to(actual), atol=tol, rtol=tol)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two examples with policy -10, reference -12 (log-ratio r = 2), z0 = 0.5, beta = 0.1:
# desirable:   1 - sigmoid(0.1 * (2 - 0.5)) = 1 - sigmoid(0.15)  = 0.4625701547
# undesirable: 1 - sigmoid(0.1 * (0.5 - 2)) = 1 - sigmoid(-0.15) = 0.5374298453
HAND = KTOLogps(t(-10.0, -10.0), t(-12.0, -12.0), torch.tensor([True, False]), torch.tensor(0.5))


def test_kto_by_hand():
    out = kto(HAND, beta=0.1)
    close(out.losses, [0.4625701547, 0.5374298453])
    m = out.metrics
    # reward = beta * r = 0.2 for both; each lands in the sum of its own kind only
    close(m["rewards/chosen_sum"], [0.2, 0.0])
    close(m["rewards/rejected_sum"], [0.0, 0.2])
    close(m["logps/chosen_sum"], [-10.0, 0.0])
    close(m["logps/rejected_sum"], [0.0, -10.0])
    close(m["count/chosen"], [1.0, 0.0])
    close(m["count/rejected"], [0.0, 1.0])
    close(m["kl"], [0.5, 0.5])
    assert all(v.shape == (2,) and not v.requires_grad for v in m.values())


def test_kto_weights_scale_each_kind():
    # w_d = 2, w_u = 0.5: 2 * 0.4625701547 = 0.9251403093, 0.5 * 0.5374298453 = 0.2687149227
    out = kto(HAND, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    close(out.losses, [0.9251403093, 0.2687149227])


def test_kto_defaults():
    close(kto(HAND).losses, kto(HAND, beta=0.1, desirable_weight=1, undesirable_weight=1).losses)


def test_kto_policy_equals_reference_with_zero_kl_gives_half():
    lp = KTOLogps(t(-3.0, -7.0, -9.0), t(-3.0, -7.0, -9.0), torch.tensor([1, 0, 1]), t(0.0)[0])
    close(kto(lp, beta=0.7).losses, [0.5, 0.5, 0.5])  # 1 - sigmoid(0)


def test_kto_desirable_only_batch():
    lp = KTOLogps(t(-10.0, -20.0), t(-12.0, -19.0), torch.tensor([True, True]), torch.tensor(0.0))
    out = kto(lp, beta=0.1)
    # r = 2 and -1: 1 - sigmoid(0.2) = 0.4501660027, 1 - sigmoid(-0.1) = 0.5249791875
    close(out.losses, [1 - sigmoid(0.2), 1 - sigmoid(-0.1)])
    means = kto_metric_means(out.metrics)
    # rewards/chosen = (0.2 + -0.1) / 2 = 0.05; logps/chosen = (-10 + -20) / 2 = -15
    assert means["rewards/chosen"] == pytest.approx(0.05)
    assert means["logps/chosen"] == pytest.approx(-15.0)
    assert means["kl"] == 0.0
    assert "rewards/rejected" not in means and "rewards/margins" not in means


def test_kto_undesirable_only_batch():
    lp = KTOLogps(t(-10.0, -20.0), t(-12.0, -19.0), torch.tensor([False, False]), t(0.0)[0])
    out = kto(lp, beta=0.1)
    # 1 - sigmoid(0.1 * (0 - 2)) = 1 - sigmoid(-0.2); 1 - sigmoid(0.1 * (0 - -1)) = 1 - sigmoid(0.1)
    close(out.losses, [1 - sigmoid(-0.2), 1 - sigmoid(0.1)])
    means = kto_metric_means(out.metrics)
    assert means["rewards/rejected"] == pytest.approx(0.05)
    assert means["logps/rejected"] == pytest.approx(-15.0)
    assert "rewards/chosen" not in means and "rewards/margins" not in means


def test_kto_metric_means_over_mixed_batches():
    # two micro-batches concatenated, as the trainer does under accumulation
    a = kto(HAND, beta=0.1).metrics
    b = kto(HAND._replace(policy=t(-14.0, -14.0)), beta=0.1).metrics  # r = -2, reward -0.2
    merged = {k: torch.cat([a[k], b[k]]) for k in a}
    means = kto_metric_means(merged)
    # desirable rewards 0.2 and -0.2 -> 0; undesirable the same -> 0; logps (-10 - 14) / 2 = -12
    assert means["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
    assert means["rewards/rejected"] == pytest.approx(0.0, abs=1e-7)
    assert means["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert means["logps/chosen"] == pytest.approx(-12.0)
    assert means["kl"] == pytest.approx(0.5)


def test_kl_point_shifts_the_implied_reward():
    # z0 enters only as r - z0: raising z0 by 1 equals lowering every log-ratio by 1.
    g = torch.Generator().manual_seed(0)
    policy, ref = -torch.rand(8, generator=g) * 30, -torch.rand(8, generator=g) * 30
    desirable = torch.arange(8) % 2 == 0
    shifted = kto(KTOLogps(policy, ref, desirable, torch.tensor(1.0)), beta=0.3)
    moved = kto(KTOLogps(policy - 1.0, ref, desirable, torch.tensor(0.0)), beta=0.3)
    close(shifted.losses, moved.losses)
    # a higher reference point makes a desirable example harder, an undesirable one easier
    base = kto(KTOLogps(policy, ref, desirable, torch.tensor(0.0)), beta=0.3)
    assert (shifted.losses[desirable] > base.losses[desirable]).all()
    assert (shifted.losses[~desirable] < base.losses[~desirable]).all()
    # the logged reward is beta * r, not shifted (TRL's convention)
    close(shifted.metrics["rewards/chosen_sum"], base.metrics["rewards/chosen_sum"])


def test_kto_gradient_reaches_policy_only():
    policy = t(-10.0, -11.0, -4.0).requires_grad_()
    ref = t(-12.0, -10.0, -4.0).requires_grad_()
    kl = torch.tensor(0.3, requires_grad=True)
    lp = KTOLogps(policy, ref, torch.tensor([True, False, True]), kl)
    kto(lp, beta=0.1).losses.sum().backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad != 0).all()
    # desirable: loss falls as the policy log-prob rises; undesirable: the opposite
    assert policy.grad[0] < 0 and policy.grad[1] > 0
    assert ref.grad is None and kl.grad is None


def test_kl_estimate():
    # diffs 1 and -1 -> mean 0
    assert kto_kl_estimate(t(-5.0, -7.0), t(-6.0, -6.0)).item() == 0.0
    # diffs 1, 2 -> 1.5
    assert kto_kl_estimate(t(-5.0, -4.0), t(-6.0, -6.0)).item() == pytest.approx(1.5)
    # policy below reference on average: a negative estimate, clamped to 0
    assert kto_kl_estimate(t(-9.0, -9.0), t(-6.0, -6.0)).item() == 0.0
    p = t(-5.0, -4.0).requires_grad_()
    z0 = kto_kl_estimate(p, t(-6.0, -6.0))
    assert z0.shape == () and not z0.requires_grad


def test_parity_with_trl_formula():
    # trl/trainer/kto_trainer.py, loss_type "kto": chosen 1 - sigmoid(beta * (r - kl)), rejected
    # 1 - sigmoid(beta * (kl - r)), weighted; kl = mean(KL_logps - ref_KL_logps).clamp(min=0).
    g = torch.Generator().manual_seed(7)
    b, m, beta, wd, wu = 24, 12, 0.2, 1.3, 0.8
    policy, ref = -torch.rand(b, generator=g) * 40, -torch.rand(b, generator=g) * 40
    desirable = torch.rand(b, generator=g) > 0.4
    pkl, rkl = -torch.rand(m, generator=g) * 40, -torch.rand(m, generator=g) * 35
    trl_kl = (pkl - rkl).mean().clamp(min=0)
    z0 = kto_kl_estimate(pkl, rkl)
    close(z0, trl_kl)
    r = policy - ref
    trl = torch.where(
        desirable,
        wd * (1 - torch.sigmoid(beta * (r - trl_kl))),
        wu * (1 - torch.sigmoid(beta * (trl_kl - r))),
    )
    out = kto(
        KTOLogps(policy, ref, desirable, z0), beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    close(out.losses, trl, tol=1e-6)
    # TRL logs loss = losses.nanmean(), rewards/chosen = sum(beta * r over chosen) / n_chosen
    means = kto_metric_means(out.metrics)
    assert means["rewards/chosen"] == pytest.approx((beta * r[desirable]).mean().item(), rel=1e-5)
    assert means["rewards/rejected"] == pytest.approx(
        (beta * r[~desirable]).mean().item(), rel=1e-5
    )
    assert means["logps/rejected"] == pytest.approx(policy[~desirable].mean().item(), rel=1e-5)
