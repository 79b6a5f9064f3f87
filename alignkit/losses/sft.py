"""Supervised fine-tuning loss: negative log-likelihood of the response tokens."""

from __future__ import annotations

from torch import Tensor

from alignkit.losses.types import LossOutput


def sft_loss(seq_logps: Tensor, seq_tokens: Tensor) -> LossOutput:
    """Summed token NLL per sequence.

    seq_logps: (B,) sum of log-probs of each sequence's labelled tokens.
    seq_tokens: (B,) number of labelled tokens per sequence.
    Returns per-sequence *sums* of token NLL: the trainer divides by the token count of the whole
    accumulated batch, so every token weighs the same whatever micro-batch it lands in (a mean
    per micro-batch would overweight short micro-batches under accumulation).
    """
    nll = -seq_logps  # (B,)
    per_token = nll.detach() / seq_tokens.clamp(min=1)
    return LossOutput(losses=nll, metrics={"nll_per_token": per_token})
