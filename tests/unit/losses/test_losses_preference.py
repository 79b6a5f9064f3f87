"""Preference losses against values worked out by hand, their limits, and TRL 1.16's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import (
    PREFERENCE_LOSSES,
    LossOutput,
    PairLogps,
    dpo,
    hinge,
    ipo,
    needs_reference,
    orpo,
    robust_dpo,
    simpo,
)
from alignkit.losses.preference import apo_zero

METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def pair(c, r, rc=None, rr=None, ct=None, rt=None) -> PairLogps:
    """A PairLogps of one-element (B=1) tensors, or of lists."""

    def one(x):
        return None if x is None else t(*(x if isinstance(x, list | tuple) else [x]))

    return PairLogps(one(c), one(r), one(rc), one(rr), one(ct), one(rt))


# beta = 0.1; policy chosen -10, rejected -12; reference -11 for both:
# log-ratios chosen -10 - (-11) = 1, rejected -12 - (-11) = -1, h = 1 - (-1) = 2, beta h = 0.2.
HAND = pair(-10.0, -12.0, -11.0, -11.0, 4.0, 4.0)
# -logsigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
DPO_HAND = 0.5981388694


def random_batch(b: int = 16, seed: int = 0) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    return PairLogps(
        chosen=-torch.rand(b, generator=g) * 40 - 1,
        rejected=-torch.rand(b, generator=g) * 40 - 1,
        ref_chosen=-torch.rand(b, generator=g) * 40 - 1,
        ref_rejected=-torch.rand(b, generator=g) * 40 - 1,
        chosen_tokens=torch.randint(1, 30, (b,), generator=g).float(),
        rejected_tokens=torch.randint(1, 30, (b,), generator=g).float(),
    )


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected).to(actual), atol=tol, rtol=tol)


# --- shared contract -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_shapes_metric_names_and_detached(name):
    lp = random_batch(5)
    lp = lp._replace(chosen=lp.chosen.requires_grad_(), rejected=lp.rejected.requires_grad_())
    out = PREFERENCE_LOSSES[name](lp, beta=0.5)
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (5,) and out.losses.requires_grad
    assert METRICS <= out.metrics.keys()
    for key, value in out.metrics.items():
        assert value.shape == (5,), key
        assert not value.requires_grad, key
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradient_reaches_policy_only(name):
    lp = random_batch(6)
    leaves = {f: getattr(lp, f).clone().requires_grad_() for f in lp._fields[:4]}
    lp = lp._replace(**leaves)
    PREFERENCE_LOSSES[name](lp, beta=0.5).losses.sum().backward()
    assert torch.isfinite(lp.chosen.grad).all() and lp.chosen.grad.abs().sum() > 0
    assert torch.isfinite(lp.rejected.grad).all() and lp.rejected.grad.abs().sum() > 0
    assert lp.ref_chosen.grad is None and lp.ref_rejected.grad is None


def test_registry_and_needs_reference():
    assert set(PREFERENCE_LOSSES) == {
        "dpo", "ipo", "hinge", "robust_dpo", "apo_zero", "simpo", "orpo"
    }  # fmt: skip
    assert {n: needs_reference(n) for n in PREFERENCE_LOSSES} == {
        "dpo": True,
        "ipo": True,
        "hinge": True,
        "robust_dpo": True,
        "apo_zero": True,
        "simpo": False,
        "orpo": False,
    }
    assert needs_reference("kto")
    with pytest.raises(KeyError):
        needs_reference("dop")


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_accept_no_reference(name):
    lp = random_batch(4)._replace(ref_chosen=None, ref_rejected=None)
    assert torch.isfinite(PREFERENCE_LOSSES[name](lp).losses).all()


# --- DPO and cDPO ----------------------------------------------------------------------------


def test_dpo_by_hand():
    out = dpo(HAND, beta=0.1)
    close(out.losses, [DPO_HAND])
    # rewards = beta * log-ratio: 0.1 * 1 = 0.1 and 0.1 * -1 = -0.1; margin 0.2; chosen ahead.
    close(out.metrics["rewards/chosen"], [0.1])
    close(out.metrics["rewards/rejected"], [-0.1])
    close(out.metrics["rewards/margins"], [0.2])
    close(out.metrics["rewards/accuracies"], [1.0])
    close(out.metrics["logps/chosen"], [-10.0])
    close(out.metrics["logps/rejected"], [-12.0])


def test_dpo_policy_equals_reference_gives_ln2_and_zero_rewards():
    lp = random_batch(8)
    lp = lp._replace(ref_chosen=lp.chosen.clone(), ref_rejected=lp.rejected.clone())
    out = dpo(lp, beta=0.3)
    # h = 0 -> -logsigmoid(0) = ln 2 for every pair, whatever beta.
    close(out.losses, torch.full((8,), math.log(2)))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        close(out.metrics[key], torch.zeros(8))
    close(out.metrics["rewards/accuracies"], torch.zeros(8))  # a tie is not a win


def test_dpo_accuracy_follows_sign_of_margin():
    # pair 0: log-ratios 1 vs -1 (ahead); pair 1: -1 vs 1 (behind).
    lp = pair([-10, -12], [-12, -10], [-11, -11], [-11, -11])
    close(dpo(lp).metrics["rewards/accuracies"], [1.0, 0.0])


def test_cdpo_by_hand_and_zero_smoothing_is_dpo():
    # eps = 0.1: 0.9 * -logsigmoid(0.2) + 0.1 * -logsigmoid(-0.2);
    # -logsigmoid(-x) = -logsigmoid(x) + x, so this is 0.5981388694 + 0.1 * 0.2 = 0.6181388694.
    close(dpo(HAND, beta=0.1, label_smoothing=0.1).losses, [0.6181388694])
    lp = random_batch()
    close(dpo(lp, beta=0.2, label_smoothing=0.0).losses, dpo(lp, beta=0.2).losses)


# --- robust DPO ------------------------------------------------------------------------------


def test_robust_dpo_by_hand():
    # eps = 0.1, l(x) = -logsigmoid(x), l(0.2) = 0.5981388694, l(-0.2) = 0.7981388694:
    # (0.9 * 0.5981388694 - 0.1 * 0.7981388694) / 0.8 = 0.4585111... / 0.8 = 0.5731388694
    # (in closed form: l(0.2) - eps * 0.2 / (1 - 2 eps) = 0.5981388694 - 0.025).
    close(robust_dpo(HAND, beta=0.1, label_smoothing=0.1).losses, [0.5731388694])


def test_robust_dpo_zero_flip_rate_is_dpo():
    lp = random_batch()
    close(robust_dpo(lp, beta=0.2, label_smoothing=0.0).losses, dpo(lp, beta=0.2).losses)


# --- hinge -----------------------------------------------------------------------------------


def test_hinge_by_hand_and_zero_beyond_margin():
    # beta h = 0.1 * 2 = 0.2 -> relu(1 - 0.2) = 0.8
    close(hinge(HAND, beta=0.1).losses, [0.8])
    # margin is 1 / beta = 10 in h: h = 10 (exactly at it) and h = 20 (past it) both give 0 ...
    lp = pair([-6.0, -1.0], [-16.0, -21.0], [-11.0, -11.0], [-11.0, -11.0])
    lp = lp._replace(chosen=lp.chosen.requires_grad_())
    out = hinge(lp, beta=0.1)
    close(out.losses, [0.0, 0.0])
    out.losses.sum().backward()
    close(lp.chosen.grad, [0.0, 0.0])  # ... and no gradient
    # h = -5 (wrong way round): 1 - 0.1 * -5 = 1.5
    close(hinge(pair(-13.0, -8.0, -11.0, -11.0), beta=0.1).losses, [1.5])


# --- APO-zero --------------------------------------------------------------------------------


def test_apo_zero_by_hand():
    # HAND: chosen log-ratio 1, rejected -1, beta 0.1:
    # (1 - sigmoid(0.1)) + sigmoid(-0.1) = (1 - 0.5249791875) + 0.4750208125 = 0.9500416250
    lp = HAND._replace(chosen=HAND.chosen.clone().requires_grad_(), rejected=HAND.rejected.clone())
    lp = lp._replace(rejected=lp.rejected.requires_grad_())
    out = apo_zero(lp, beta=0.1)
    close(out.losses, [0.9500416250])
    # each response is pushed on its own: d/d chosen = -beta s(1 - s) at 0.1, d/d rejected =
    # +beta s(1 - s) at -0.1; both 0.1 * 0.2493760401 = 0.0249376040 in size
    out.losses.sum().backward()
    close(lp.chosen.grad, [-0.0249376040])
    close(lp.rejected.grad, [0.0249376040])
    close(out.metrics["rewards/margins"], [0.2])  # the DPO family's summed rewards


def test_apo_zero_is_one_at_the_reference_and_pushes_chosen_up_past_the_margin():
    """At policy == reference each pair's loss is exactly 1. Unlike DPO, whose gradient fades
    once the margin is large, APO-zero keeps raising a chosen response that sits below the
    reference: chosen log-ratio -2, rejected -40, beta 0.5. DPO's gradient on chosen is
    -beta (1 - sigmoid(19)) ~ -2.8e-9; APO-zero's is -beta s(-1)(1 - s(-1)) = -0.0983059666."""
    close(apo_zero(pair(-10.0, -12.0, -10.0, -12.0), beta=0.5).losses, [1.0])
    grads = {}
    for name, fn in (("apo_zero", apo_zero), ("dpo", dpo)):
        lp = pair(-12.0, -52.0, -10.0, -12.0)
        lp = lp._replace(chosen=lp.chosen.requires_grad_())
        fn(lp, beta=0.5).losses.sum().backward()
        grads[name] = lp.chosen.grad.item()
    close(torch.tensor(grads["apo_zero"]), -0.0983059666)
    assert abs(grads["dpo"]) < 1e-8


# --- IPO -------------------------------------------------------------------------------------


def test_ipo_by_hand_uses_per_token_log_ratios():
    # chosen: (-10 - -11) / 2 tokens = 0.5; rejected: (-12 - -11) / 4 tokens = -0.25;
    # h = 0.75, target 1 / (2 * 0.1) = 5, loss = (0.75 - 5)^2 = 18.0625
    lp = pair(-10.0, -12.0, -11.0, -11.0, 2.0, 4.0)
    out = ipo(lp, beta=0.1)
    close(out.losses, [18.0625])
    # metrics are the summed DPO rewards, as for the whole family: 0.1 * 1 and 0.1 * -1
    close(out.metrics["rewards/margins"], [0.2])


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25  # target h = 1 / (2 * 0.25) = 2 per token
    hs = torch.linspace(0.0, 4.0, 41)  # per-token margin, 3 tokens each side
    chosen = (hs * 3).requires_grad_()
    zeros = torch.zeros(41)
    lp = PairLogps(chosen, zeros, zeros, zeros, torch.full((41,), 3.0), torch.full((41,), 3.0))
    out = ipo(lp, beta=beta)
    assert hs[out.losses.argmin()].item() == pytest.approx(2.0)
    assert out.losses.min().item() == pytest.approx(0.0, abs=1e-10)
    out.losses.sum().backward()
    assert chosen.grad[out.losses.argmin()].item() == pytest.approx(0.0, abs=1e-6)


def test_ipo_empty_response_counts_as_one_token():
    lp = pair(-10.0, -12.0, -11.0, -11.0, 0.0, 0.0)  # h = 1 - (-1) = 2 -> (2 - 5)^2 = 9
    close(ipo(lp, beta=0.1).losses, [9.0])


# --- SimPO -----------------------------------------------------------------------------------


def test_simpo_by_hand():
    # beta 2, gamma 0.5; chosen -10 over 10 tokens = -1, rejected -30 over 15 tokens = -2;
    # rewards 2 * -1 = -2 and 2 * -2 = -4, margin 2; loss = -logsigmoid(2 - 0.5)
    # = log(1 + e^-1.5) = log(1.2231301601) = 0.2014132780
    lp = pair(-10.0, -30.0, ct=10.0, rt=15.0)
    out = simpo(lp, beta=2.0, gamma=0.5)
    close(out.losses, [0.2014132780])
    close(out.metrics["rewards/chosen"], [-2.0])
    close(out.metrics["rewards/rejected"], [-4.0])
    close(out.metrics["rewards/margins"], [2.0])
    close(out.metrics["rewards/accuracies"], [1.0])
    close(out.metrics["logps/chosen"], [-10.0])  # summed, not averaged


def test_simpo_defaults_are_the_papers():
    lp = random_batch()
    close(simpo(lp).losses, simpo(lp, beta=2.0, gamma=0.5).losses)


def test_simpo_is_length_normalised():
    lp = random_batch()
    doubled = lp._replace(
        chosen=2 * lp.chosen,
        rejected=2 * lp.rejected,
        chosen_tokens=2 * lp.chosen_tokens,
        rejected_tokens=2 * lp.rejected_tokens,
    )
    close(simpo(doubled).losses, simpo(lp).losses)


def test_simpo_zero_margin_gives_softplus_gamma():
    # equal per-token log-probs: loss = -logsigmoid(-gamma) = log(1 + e^gamma); gamma=0 -> ln 2
    lp = pair(-6.0, -9.0, ct=2.0, rt=3.0)
    close(simpo(lp, gamma=0.0).losses, [math.log(2)])
    close(simpo(lp, gamma=0.5).losses, [math.log1p(math.exp(0.5))])


# --- ORPO ------------------------------------------------------------------------------------


def test_orpo_by_hand():
    # chosen -2 over 4 tokens: mean -0.5; rejected -6 over 3 tokens: mean -2.
    # log odds = m - log(1 - e^m):
    #   chosen   -0.5 - log(1 - 0.6065306597) = -0.5 + 0.9327521296 =  0.4327521296
    #   rejected -2   - log(1 - 0.1353352832) = -2   + 0.1454134579 = -1.8545865421
    # log odds ratio z = 2.2873386717; OR loss = log(1 + e^-z) = 0.0967058636
    # NLL per chosen token = 2 / 4 = 0.5; loss = 0.5 + 0.1 * 0.0967058636 = 0.5096705864
    lp = pair(-2.0, -6.0, ct=4.0, rt=3.0)
    out = orpo(lp, beta=0.1)
    close(out.losses, [0.5096705864])
    close(out.metrics["nll_loss"], [0.5])
    close(out.metrics["log_odds_chosen"], [2.2873386717], tol=1e-5)
    close(out.metrics["log_odds_ratio"], [-0.0967058636], tol=1e-5)
    close(out.metrics["rewards/chosen"], [0.1 * -0.5])  # lambda * mean log-prob, as TRL
    close(out.metrics["rewards/rejected"], [0.1 * -2.0])
    close(out.metrics["rewards/accuracies"], [1.0])


def test_orpo_explicit_nll_is_used_and_default_derives_it():
    lp = pair(-2.0, -6.0, ct=4.0, rt=3.0)
    close(orpo(lp._replace(chosen_nll=t(2.0))).losses, orpo(lp).losses)
    # an NLL of 4 over 4 tokens adds 1 - 0.5 = 0.5 to the loss
    close(orpo(lp._replace(chosen_nll=t(4.0))).losses, orpo(lp).losses + 0.5)


@pytest.mark.parametrize("mean_logp", [-1e-8, -1e-7, 0.0, -1e-3, -50.0, -120.0])
def test_orpo_stable_at_extreme_mean_logps(mean_logp):
    chosen = t(mean_logp * 5, mean_logp * 5).requires_grad_()
    rejected = t(mean_logp * 5 - 1, -3.0).requires_grad_()
    lp = PairLogps(chosen, rejected, chosen_tokens=t(5.0, 5.0), rejected_tokens=t(5.0, 1.0))
    out = orpo(lp, beta=0.1)
    assert torch.isfinite(out.losses).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


# --- parity with TRL 1.16's formulas (reference expressions written out here) ----------------


def _trl_log1mexp(x):
    # trl/experimental/orpo/orpo_trainer.py: branch at -ln 2
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def test_parity_with_trl_formulas():
    lp, beta, eps = random_batch(32, seed=3), 0.3, 0.2
    cl, rl = lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected
    d = cl - rl
    # trl/trainer/dpo_trainer.py, loss_type "sigmoid" (DPO) and "robust"; "hinge"; "ipo"
    trl_sigmoid = -F.logsigmoid(beta * d)
    trl_robust = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (
        1 - 2 * eps
    )
    trl_hinge = torch.relu(1 - beta * d)
    ipo_d = cl / lp.chosen_tokens.clamp(min=1) - rl / lp.rejected_tokens.clamp(min=1)
    trl_ipo = (ipo_d - 1 / (2 * beta)) ** 2
    close(dpo(lp, beta=beta).losses, trl_sigmoid, tol=1e-5)
    close(robust_dpo(lp, beta=beta, label_smoothing=eps).losses, trl_robust, tol=1e-5)
    close(hinge(lp, beta=beta).losses, trl_hinge, tol=1e-5)
    close(ipo(lp, beta=beta).losses, trl_ipo, tol=1e-5)
    # DPOTrainer metrics: rewards = beta * summed log-ratios for every loss type
    for fn in (dpo, robust_dpo, hinge, ipo):
        m = fn(lp, beta=beta).metrics
        close(m["rewards/chosen"], beta * cl, tol=1e-5)
        close(m["rewards/margins"], beta * d, tol=1e-5)
        close(m["rewards/accuracies"], (beta * cl > beta * rl).float())
    # trl/experimental/cpo/cpo_trainer.py, loss_type "simpo" (with cpo_alpha = 0):
    # logits = avg_c - avg_r - gamma / beta; loss = -logsigmoid(beta * logits)
    ac, ar = lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens
    trl_simpo = -F.logsigmoid(beta * (ac - ar - 0.7 / beta))
    close(simpo(lp, beta=beta, gamma=0.7).losses, trl_simpo, tol=1e-5)
    # trl/experimental/orpo/orpo_trainer.py odds_ratio_loss on averaged log-probs; its NLL term
    # is a token mean over the batch, here replaced by our per-pair mean NLL.
    log_odds = (ac - ar) - (_trl_log1mexp(ac) - _trl_log1mexp(ar))
    out = orpo(lp, beta=beta)
    close(out.losses - out.metrics["nll_loss"], -beta * F.logsigmoid(log_odds), tol=1e-5)
    close(out.metrics["log_odds_ratio"], F.logsigmoid(log_odds), tol=1e-5)
    close(out.metrics["log_odds_chosen"], log_odds, tol=1e-5)
    close(out.metrics["rewards/chosen"], beta * ac, tol=1e-5)
