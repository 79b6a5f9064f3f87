"""KL penalty controllers for RLHF (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", arXiv:1909.08593, Sec. 2.2).

The fixed controller keeps beta constant. The adaptive one moves beta so that the measured
KL(pi || pi_ref) approaches a target: with e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),
beta_{t+1} = beta_t * (1 + K_beta * e_t) where K_beta = n_steps / horizon, n_steps being the
number of rollouts the KL was measured on. The clip bounds one update to +-20% of the horizon's
rate, so one noisy batch cannot swing the penalty.

The only state either controller carries between steps is beta (`value`): `state_dict` and
`load_state_dict` save and restore it with a checkpoint; target and horizon come from the config.
"""

from __future__ import annotations


class _KLState:
    value: float

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(_KLState):
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController(_KLState):
    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("the KL target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from the KL measured on the last `n_steps` rollouts; returns the new beta."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(ppo_cfg) -> FixedKLController | AdaptiveKLController:
    """From the `ppo:` config section: adaptive toward kl_target, or fixed at kl_coef."""
    if ppo_cfg.adaptive_kl:
        return AdaptiveKLController(ppo_cfg.kl_coef, ppo_cfg.kl_target, ppo_cfg.kl_horizon)
    return FixedKLController(ppo_cfg.kl_coef)
