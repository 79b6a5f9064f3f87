"""KTO: Kahneman-Tversky Optimization on unpaired thumbs-up / thumbs-down data.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv:2402.01306), the KTO loss L = E[lambda_y - v(x, y)] (Eq. 7 as TRL 1.16 cites it) with
the value function
    v = lambda_D * sigmoid(beta (r - z0))  for a desirable y,
    v = lambda_U * sigmoid(beta (z0 - r))  for an undesirable y,
r = log pi/pi_ref(y | x) and z0 the reference point, an estimate of KL(pi || pi_ref) that the
trainer takes from mismatched prompt/completion pairs (`kto_kl_estimate`).

Metrics. Rewards and log-probs are means over the desirable (or undesirable) examples only,
which a per-example mean over the batch cannot give. So `kto` returns masked sums and counts,
all (B,) and detached:
    rewards/chosen_sum, logps/chosen_sum, count/chosen        (desirable examples)
    rewards/rejected_sum, logps/rejected_sum, count/rejected  (undesirable examples)
    kl                                                        (z0, repeated B times)
where X_sum is the value on examples of that kind and 0 elsewhere, and count/* is 1.0 or 0.0.
The trainer concatenates them over the accumulated batch (and gathers them across processes)
and calls `kto_metric_means`, which divides each sum by its count and returns the names users
read (rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected, kl),
leaving out a kind the batch has none of, as TRL does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignkit.losses.types import LossOutput


class KTOLogps(NamedTuple):
    """One batch of B unpaired completions.

    policy: (B,) fp32 policy log-probs summed over each completion's tokens.
    ref: (B,) the same under the reference model (detached inside `kto`).
    desirable: (B,) bool, True for a thumbs-up completion.
    kl: () fp32 reference point z0 from `kto_kl_estimate` (detached inside `kto`).
    """

    policy: Tensor
    ref: Tensor
    desirable: Tensor
    kl: Tensor


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: a batch estimate of KL(pi || pi_ref), clamped at 0, detached.

    policy_kl_logps, ref_kl_logps: (M,) summed log-probs of M mismatched completions (a
    completion paired with another example's prompt) under policy and reference; M >= 1.
    Returns a () tensor, mean(policy - ref) clamped >= 0 (a KL is never negative; the batch
    estimate can be). As in the paper, no gradient flows through z0. Under data parallelism,
    pass the all-gathered (M,) tensors so that every process uses the same z0, and the clamp
    applies to the global mean.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto(
    lp: KTOLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Per-example KTO loss (B,), = lambda_y - v(x, y) of the module docstring.

    desirable: w_d * (1 - sigmoid(beta (r - z0))); undesirable: w_u * (1 - sigmoid(beta (z0 - r))).
    Written as sigmoid(-t) rather than 1 - sigmoid(t): the same value, without the cancellation
    when the loss is near 0. Rewards are beta * r, not shifted by z0, as TRL 1.16 logs them.
    """
    r = lp.policy - lp.ref.detach()  # (B,) log-ratio; gradient reaches the policy only
    z0 = lp.kl.detach()  # () reference point, a constant here
    desirable = lp.desirable.bool()
    loss_d = desirable_weight * torch.sigmoid(-beta * (r - z0))
    loss_u = undesirable_weight * torch.sigmoid(-beta * (z0 - r))
    losses = torch.where(desirable, loss_d, loss_u)  # (B,)

    reward, logps = beta * r.detach(), lp.policy.detach()
    is_d, is_u = desirable.to(reward.dtype), (~desirable).to(reward.dtype)
    metrics = {
        "rewards/chosen_sum": reward * is_d,
        "logps/chosen_sum": logps * is_d,
        "count/chosen": is_d,
        "rewards/rejected_sum": reward * is_u,
        "logps/rejected_sum": logps * is_u,
        "count/rejected": is_u,
        "kl": z0.expand_as(reward),
    }
    return LossOutput(losses, metrics)


def kto_metric_means(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Reduce `kto` metrics, concatenated over a whole accumulated batch, to logged means.

    metrics: name -> (N,) as returned by `kto` (concatenated along the batch axis).
    Returns rewards/chosen and logps/chosen when the batch has a desirable example,
    rewards/rejected and logps/rejected when it has an undesirable one, rewards/margins when it
    has both, and kl always.
    """
    out = {"kl": metrics["kl"].float().mean().item()}
    for kind in ("chosen", "rejected"):
        count = metrics[f"count/{kind}"].sum().item()
        if count > 0:
            for name in (f"rewards/{kind}", f"logps/{kind}"):
                out[name] = metrics[f"{name}_sum"].sum().item() / count
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
