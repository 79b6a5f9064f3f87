"""Paired preference losses: DPO and its family (cDPO, IPO, hinge/SLiC, robust DPO, APO-zero),
SimPO, ORPO.

Every loss takes one `PairLogps` (all fields (B,) fp32) and returns a `LossOutput` whose
`losses` are per-pair (B,); the trainer averages them over the pairs of the whole accumulated
batch. Metrics are (B,), detached, and averaged the same way:

- `rewards/chosen`, `rewards/rejected`: the method's implicit reward of each response.
  DPO family (dpo, ipo, hinge, robust_dpo): beta * (logp - ref_logp) on *summed* log-probs, for
  every variant, IPO included, so dashboards compare across the family (TRL 1.16 logs the same).
  SimPO and ORPO: beta * (logp / tokens), the length-normalised reward of their papers.
- `rewards/accuracies`: 1.0 where the chosen reward is strictly higher (a tie counts as wrong).
- `rewards/margins`: rewards/chosen - rewards/rejected.
- `logps/chosen`, `logps/rejected`: the *summed* policy log-probs for every method (TRL's ORPO
  and CPO trainers log averages here; we keep sums so the run-health rules read one scale).

Reference log-probs are detached inside the losses: gradients only ever reach the policy.
Input checks (beta > 0, label_smoothing in [0, 0.5), lengths present) belong to the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.types import LossOutput


class PairLogps(NamedTuple):
    """Sequence log-probs of a batch of B preference pairs; every tensor is (B,) fp32.

    chosen, rejected: policy log-probs summed over each response's tokens.
    ref_chosen, ref_rejected: the same under the reference model; None for reference-free
        losses (see `needs_reference`).
    chosen_tokens, rejected_tokens: response token counts, used by the length-normalised losses
        (ipo, simpo, orpo); counts below 1 are treated as 1.
    chosen_nll: summed NLL of the chosen response over its chosen_tokens tokens, for ORPO's SFT
        term. It equals -chosen, so None (the usual case) derives it; pass it only when the
        trainer computes that NLL separately (a fused cross-entropy kernel, say).
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None
    chosen_nll: Tensor | None = None


def _logratios(lp: PairLogps) -> tuple[Tensor, Tensor]:
    """(B,) log pi/pi_ref of chosen and rejected; the reference never receives gradient."""
    return lp.chosen - lp.ref_chosen.detach(), lp.rejected - lp.ref_rejected.detach()


def _pair_metrics(
    chosen_reward: Tensor, rejected_reward: Tensor, lp: PairLogps
) -> dict[str, Tensor]:
    """The shared reward/log-prob metrics, all (B,) and detached."""
    rc, rr = chosen_reward.detach(), rejected_reward.detach()
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": (rc > rr).float(),
        "rewards/margins": rc - rr,
        "logps/chosen": lp.chosen.detach(),
        "logps/rejected": lp.rejected.detach(),
    }


def _dpo_metrics(
    chosen_lr: Tensor, rejected_lr: Tensor, lp: PairLogps, beta: float
) -> dict[str, Tensor]:
    # DPO's implicit reward r = beta * log pi/pi_ref (Rafailov et al. 2023, Eq. 5).
    return _pair_metrics(beta * chosen_lr, beta * rejected_lr, lp)


def _per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    """(B,) length-normalised log-probs; an empty response counts as one token, not 0/0."""
    return logps / tokens.clamp(min=1)


def dpo(lp: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO, sigmoid loss; label_smoothing = eps > 0 gives conservative DPO (cDPO).

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
        L = -log sigmoid(beta * h),  h = log pi/pi_ref(y_w) - log pi/pi_ref(y_l).
    cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): the label is right with
    probability 1 - eps, so L = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h).
    """
    chosen_lr, rejected_lr = _logratios(lp)
    z = beta * (chosen_lr - rejected_lr)  # (B,)
    # logsigmoid, not log(sigmoid(.)): it stays finite for large |z|.
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return LossOutput(losses, _dpo_metrics(chosen_lr, rejected_lr, lp, beta))


def ipo(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO: squared distance of the log-ratio margin from 1 / (2 beta).

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17 (beta is the paper's tau): L = (h - 1 / (2 tau))^2.
    h uses log-ratios *averaged over response tokens*: with sums the squared loss grows with
    length and beta stops meaning the same thing across datasets. TRL 1.16 does the same (it
    reports confirming this reading with the IPO authors), so a parity run matches it.
    Metrics stay the summed-log-ratio DPO rewards, like the rest of the family.
    """
    chosen_lr, rejected_lr = _logratios(lp)
    h = _per_token(chosen_lr, lp.chosen_tokens) - _per_token(rejected_lr, lp.rejected_tokens)
    losses = (h - 1 / (2 * beta)) ** 2  # (B,)
    return LossOutput(losses, _dpo_metrics(chosen_lr, rejected_lr, lp, beta))


def hinge(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Hinge loss on the log-ratio margin, as in SLiC.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", its
    calibration loss max(0, delta - log P(y_w) + log P(y_l)), taken on log-ratios against the
    reference as in Liu et al. 2023 ("Statistical Rejection Sampling Improves Preference
    Optimization", hinge-norm loss): L = relu(1 - beta h), a margin of 1 / beta in h.
    Pairs already past the margin contribute zero loss and zero gradient.
    """
    chosen_lr, rejected_lr = _logratios(lp)
    losses = torch.relu(1 - beta * (chosen_lr - rejected_lr))  # (B,)
    return LossOutput(losses, _dpo_metrics(chosen_lr, rejected_lr, lp, beta))


def robust_dpo(lp: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Provably robust DPO (rDPO) for labels flipped at rate eps = label_smoothing.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback" (arXiv:2403.00409), the de-biased loss of Sec. 3:
        L = ((1 - eps) * l(h) - eps * l(-h)) / (1 - 2 eps),  l(h) = -log sigmoid(beta h).
    Unlike cDPO it is an unbiased estimate of the clean-label DPO loss; it can go negative, and
    it blows up as eps -> 0.5 (the config keeps eps in [0, 0.5)). eps = 0 is plain DPO.
    """
    chosen_lr, rejected_lr = _logratios(lp)
    z = beta * (chosen_lr - rejected_lr)  # (B,)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, _dpo_metrics(chosen_lr, rejected_lr, lp, beta))


def simpo(lp: PairLogps, *, beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """SimPO: reference-free, length-normalised reward with a target margin.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6: L = -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).
    `gamma` is the margin in reward units, as in the paper and TRL's `simpo_gamma`; the
    authors' own code exposes gamma_beta_ratio = gamma / beta instead. Defaults are the paper's
    (beta 2.0; gamma 0.5, the low end of its range). TRL's CPOTrainer adds an NLL term unless
    cpo_alpha = 0; set it to 0 for a parity run.
    """
    chosen_reward = beta * _per_token(lp.chosen, lp.chosen_tokens)  # (B,)
    rejected_reward = beta * _per_token(lp.rejected, lp.rejected_tokens)
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return LossOutput(losses, _pair_metrics(chosen_reward, rejected_reward, lp))


# Largest per-token log-prob fed to log(1 - exp(x)): at x = 0 the log-odds are +inf and
# d/dx = -1/|x| overflows. -1e-6 means every token at probability 0.999999: capping there
# changes nothing a real run produces and keeps values and gradients finite.
_LOG1MEXP_MAX = -1e-6


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2. The clamp comes
    first so that neither branch of `where` sees an infinity; an infinite untaken branch still
    makes a NaN gradient."""
    x = x.clamp(max=_LOG1MEXP_MAX)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """ORPO: length-normalised NLL of the chosen response plus an odds-ratio penalty.

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 6-7: L = L_SFT + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), with
    odds(y) = P / (1 - P) of the per-token-averaged likelihood P = exp(mean log pi(y)), so
    log odds = mean_logp - log(1 - exp(mean_logp)). `beta` is lambda (TRL's name; default 0.1).
    L_SFT is the chosen NLL per response token, averaged over pairs. TRL's ORPOTrainer instead
    averages cross-entropy over the prompt *and* response tokens of the batch, so its nll_loss
    differs from ours when prompts or lengths vary; the odds-ratio term is the same.
    Extra metrics (TRL's names): `nll_loss`, `log_odds_ratio` = log sigmoid(log odds ratio),
    `log_odds_chosen` = the log odds ratio itself.
    """
    chosen_avg = _per_token(lp.chosen, lp.chosen_tokens)  # (B,)
    rejected_avg = _per_token(lp.rejected, lp.rejected_tokens)
    log_odds = (chosen_avg - _log1mexp(chosen_avg)) - (rejected_avg - _log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    nll_sum = -lp.chosen if lp.chosen_nll is None else lp.chosen_nll
    nll = _per_token(nll_sum, lp.chosen_tokens)
    losses = nll - beta * ratio
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg, lp)
    metrics.update(
        nll_loss=nll.detach(), log_odds_ratio=ratio.detach(), log_odds_chosen=log_odds.detach()
    )
    return LossOutput(losses, metrics)


def apo_zero(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero: push the chosen response's likelihood up and the rejected one's down, each on
    its own, instead of only their difference.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    Eq. 8: L = (1 - sigmoid(beta * log pi/pi_ref(y_w))) + sigmoid(beta * log pi/pi_ref(y_l)).
    For chosen responses better than what the model writes now: DPO can satisfy its margin by
    lowering both likelihoods, APO-zero cannot lower the chosen one without cost. At
    policy == reference every pair's loss is 1 - 1/2 + 1/2 = 1.
    """
    chosen_lr, rejected_lr = _logratios(lp)
    losses = (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)  # (B,)
    return LossOutput(losses, _dpo_metrics(chosen_lr, rejected_lr, lp, beta))


def loss_for(method: str) -> Callable[..., LossOutput]:
    """The pair loss of `method`, from its row in the method table (alignkit.methods)."""
    from alignkit.methods import spec

    row = spec(method)
    if row.loss is None or row.name not in PREFERENCE_LOSSES:
        raise KeyError(f"{method!r} has no pair loss; pair methods: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[row.name]


def needs_reference(method: str) -> bool:
    """Whether `method` needs reference log-probs (its table row says "required")."""
    from alignkit.methods import TABLE

    if method not in TABLE:
        raise KeyError(f"unknown method {method!r}; known: {sorted(TABLE)}")
    return TABLE[method].reference == "required"


def _pair_losses() -> dict[str, Callable[..., LossOutput]]:
    """Method name -> loss function, for every table row that names a pair loss."""
    from alignkit.methods import TABLE

    return {row.name: globals()[row.loss] for row in TABLE.values() if row.loss is not None}


PREFERENCE_LOSSES: dict[str, Callable[..., LossOutput]] = _pair_losses()
