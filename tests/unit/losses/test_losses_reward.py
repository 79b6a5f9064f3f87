"""Bradley-Terry reward loss against values worked out by hand, plus its limits."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import bradley_terry

LOG2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_plain_bradley_terry_by_hand():
    out = bradley_terry(t(1.0, 0.0, -1.0), t(0.0, 0.0, 1.0))
    # -log sigmoid(d) = log(1 + exp(-d)): d = 1, 0, -2
    expected = [softplus(-1.0), LOG2, softplus(2.0)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_margin_is_subtracted_from_the_gap():
    # a gap of 2 against a required margin of 2 is as good as a gap of 0 without one
    out = bradley_terry(t(2.0, 1.0), t(0.0, 0.0), t(2.0, -1.0))
    assert out.losses.tolist() == pytest.approx([LOG2, softplus(-2.0)], abs=1e-6)
    zero = bradley_terry(t(2.0, 1.0), t(0.0, 0.0), t(0.0, 0.0))
    assert zero.losses.tolist() == pytest.approx(bradley_terry(t(2.0, 1.0), t(0.0, 0.0)).losses)


def test_centering_term_by_hand():
    # r_c + r_r = 2 -> + 0.5 * 4; r_c + r_r = 0 -> nothing added
    out = bradley_terry(t(1.0, 1.0), t(1.0, -1.0), center_coef=0.5)
    assert out.losses.tolist() == pytest.approx([LOG2 + 2.0, softplus(-2.0)], abs=1e-6)


def test_gradients_by_hand():
    rc = t(0.0, 1.0).requires_grad_()
    rr = t(0.0, 1.0).requires_grad_()
    bradley_terry(rc, rr, center_coef=0.25).losses.sum().backward()
    # d/d r_c [-log sigmoid(r_c - r_r)] = -sigmoid(-(r_c - r_r)) = -0.5 at a tie;
    # centering adds 2 * 0.25 * (r_c + r_r) = 0 and 1
    assert rc.grad.tolist() == pytest.approx([-0.5, -0.5 + 1.0])
    assert rr.grad.tolist() == pytest.approx([0.5, 0.5 + 1.0])


def test_margin_gets_no_gradient():
    margin = t(1.0).requires_grad_()
    bradley_terry(t(0.0).requires_grad_(), t(0.0), margin).losses.sum().backward()
    assert margin.grad is None


def test_limits_are_finite():
    out = bradley_terry(t(100.0, -100.0), t(-100.0, 100.0))
    assert torch.isfinite(out.losses).all()
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-6)  # far right: no loss
    assert out.losses[1].item() == pytest.approx(200.0, rel=1e-6)  # far wrong: linear in the gap


def test_metrics_by_hand():
    out = bradley_terry(t(2.0, 0.5, -1.0), t(1.0, 0.5, 3.0))
    m = out.metrics
    assert m["accuracy"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert m["margin"].tolist() == pytest.approx([1.0, 0.0, -4.0])
    assert m["rewards/chosen"].tolist() == pytest.approx([2.0, 0.5, -1.0])
    assert m["rewards/rejected"].tolist() == pytest.approx([1.0, 0.5, 3.0])
    assert m["rewards/mean"].tolist() == pytest.approx([1.5, 0.5, 1.0])
    assert m["rewards/min"].tolist() == pytest.approx([1.0, 0.5, -1.0])
    assert m["rewards/max"].tolist() == pytest.approx([2.0, 0.5, 3.0])
    assert not any(v.requires_grad for v in m.values())


def test_metrics_detached_when_inputs_need_grad():
    rc = t(1.0).requires_grad_()
    out = bradley_terry(rc, t(0.0), center_coef=0.1)
    assert out.losses.requires_grad
    assert not any(v.requires_grad for v in out.metrics.values())
