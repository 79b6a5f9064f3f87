"""KL controllers (Ziegler et al. 2019): the adaptive update worked out by hand."""

import pytest

from alignkit.config import load_config
from alignkit.train.rl.kl import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_update_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 6.6: error 6.6/6 - 1 = 0.1; beta *= 1 + 0.1 * 100 / 10000
    assert ctl.update(6.6, 100) == pytest.approx(0.1 * 1.001)
    # KL 3: error -0.5, clipped to -0.2; beta *= 1 - 0.2 * 500 / 10000
    assert ctl.update(3.0, 500) == pytest.approx(0.1 * 1.001 * 0.99)


def test_adaptive_error_is_clipped_both_ways():
    up = AdaptiveKLController(1.0, target=1.0, horizon=100)
    assert up.update(50.0, 10) == pytest.approx(1.0 + 0.2 * 10 / 100)
    down = AdaptiveKLController(1.0, target=1.0, horizon=100)
    assert down.update(0.0, 10) == pytest.approx(1.0 - 0.2 * 10 / 100)


def test_adaptive_on_target_stays():
    ctl = AdaptiveKLController(0.3, target=4.0, horizon=1000)
    assert ctl.update(4.0, 64) == pytest.approx(0.3)


def test_fixed_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 64) == 0.05
    assert ctl.value == 0.05


def test_from_config():
    cfg = load_config(None, ["method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_format"])
    ctl = make_kl_controller(cfg.ppo)
    assert isinstance(ctl, AdaptiveKLController)
    assert (ctl.value, ctl.target, ctl.horizon) == (0.05, 6.0, 10000)
    cfg = load_config(
        None, ["method=ppo", "ppo.reward_fn=m:f", "ppo.adaptive_kl=false", "ppo.kl_coef=0.2"]
    )
    assert isinstance(make_kl_controller(cfg.ppo), FixedKLController)
    assert make_kl_controller(cfg.ppo).value == 0.2


def _through_a_checkpoint(state: dict) -> dict:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_adaptive_state_round_trips():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    for kl in (3.0, 0.2, 1.5):
        ctl.update(kl, 4)
    assert ctl.value != pytest.approx(0.1)  # it moved, so the round trip carries something
    fresh = AdaptiveKLController(0.1, target=1.0, horizon=10)
    fresh.load_state_dict(_through_a_checkpoint(ctl.state_dict()))
    assert fresh.value == ctl.value
    assert [fresh.update(kl, 4) for kl in (2.0, 0.5)] == [ctl.update(kl, 4) for kl in (2.0, 0.5)]


def test_fixed_state_round_trips():
    ctl = FixedKLController(0.2)
    fresh = FixedKLController(0.05)
    fresh.load_state_dict(_through_a_checkpoint(ctl.state_dict()))
    assert fresh.value == 0.2
