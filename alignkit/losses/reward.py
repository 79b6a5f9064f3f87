"""Reward-model loss: Bradley-Terry over preference pairs, with optional margin and centering.

- Bradley-Terry (Ouyang et al. 2022, Eq. 1): -log sigmoid(r(x, y_c) - r(x, y_r)).
- Per-pair margin (Touvron et al. 2023, Llama 2, Eq. 2): -log sigmoid(r_c - r_r - m); a pair rated
  "much better" asks for a wider gap than one rated "slightly better". m = 0 is plain BT.
- Reward centering (Eisenstein et al. 2023, "Helping or Herding?", Sec. 3): + eta * (r_c + r_r)^2.
  BT only sees differences, so the reward's offset is free and drifts; this term pins the mean
  reward near zero, which makes rewards of separately trained models comparable (ensembles) and
  keeps the scale PPO sees stable.

Metrics, all (B,) per pair and detached; names ending in ``/min`` and ``/max`` are reduced by
minimum and maximum in the training loop, every other one is averaged:
``accuracy`` (1.0 where r_c > r_r strictly, a tie is wrong), ``margin`` (r_c - r_r),
``rewards/chosen``, ``rewards/rejected``, ``rewards/mean`` ((r_c + r_r) / 2, so its average is
the mean over all responses), ``rewards/min``, ``rewards/max``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.types import LossOutput


def bradley_terry(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> LossOutput:
    """Per-pair reward-model loss.

    chosen, rejected: (B,) scalar rewards of each pair's two responses (with grad).
    margin: (B,) required gap per pair (no grad), or None for zero.
    center_coef: weight eta of the centering term (0 disables it).
    """
    chosen, rejected = chosen.float(), rejected.float()
    diff = chosen - rejected  # (B,)
    target = diff if margin is None else diff - margin.to(diff).detach()
    # logsigmoid, not log(sigmoid(.)): stays finite for large negative gaps.
    losses = -F.logsigmoid(target)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected).pow(2)
    rc, rr = chosen.detach(), rejected.detach()
    metrics = {
        "accuracy": (rc > rr).float(),
        "margin": rc - rr,
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/mean": (rc + rr) / 2,
        "rewards/min": torch.minimum(rc, rr),
        "rewards/max": torch.maximum(rc, rr),
    }
    return LossOutput(losses, metrics)
