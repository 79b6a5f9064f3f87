"""Pure loss functions: tensors in, per-example losses and detached metrics out."""

from alignkit.losses.sft import sft_loss
from alignkit.losses.types import LossOutput

__all__ = ["LossOutput", "sft_loss"]
