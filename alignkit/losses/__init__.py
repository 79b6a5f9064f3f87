"""Pure loss functions: tensors in, per-example losses and detached metrics out."""

from alignkit.losses.kto import KTOLogps, kto, kto_kl_estimate, kto_metric_means
from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    dpo,
    hinge,
    ipo,
    loss_for,
    needs_reference,
    orpo,
    robust_dpo,
    simpo,
)
from alignkit.losses.reward import bradley_terry
from alignkit.losses.sft import sft_loss
from alignkit.losses.types import LossOutput

__all__ = [
    "PREFERENCE_LOSSES",
    "KTOLogps",
    "LossOutput",
    "PairLogps",
    "bradley_terry",
    "dpo",
    "hinge",
    "ipo",
    "kto",
    "kto_kl_estimate",
    "kto_metric_means",
    "loss_for",
    "needs_reference",
    "orpo",
    "robust_dpo",
    "sft_loss",
    "simpo",
]
