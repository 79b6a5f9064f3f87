"""Advice the literature gives about a run's data and settings, added to a preflight report.

These are warnings with their reason, never problems: each names a common cause of a run that
trains without error and still disappoints, and what to change. They need more than the data
(the method's row in the table, its knobs, whether the model has a chat template), so
`advise` runs after the data preflight, on its report.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.preflight import PreflightReport
from alignkit.knobs import Section
from alignkit.methods import MethodSpec

NOISY_BELOW = 1000  # pairs: fewer gives results that move by several points between seeds
LOW_BETA = 0.1  # DPO's usual beta; below it the policy may drift far from the reference ...
LOW_BETA_DATA = 2000  # ... which overfits when there are fewer pairs than this
# KTO paper (Ethayarajh et al. 2024, section 4.2): keep lambda_D * n_D / (lambda_U * n_U) in
# [1, 4/3]; the middle of that range is what a suggested weight aims at.
KTO_RATIO = (1.0, 4 / 3)
KTO_TARGET = 7 / 6


@dataclass(frozen=True)
class RunSettings:
    """What the advice reads besides the data: the method's row and knobs, the model's template."""

    method: MethodSpec
    knobs: Section
    chat_template: bool  # the tokenizer has one, or model.chat_template sets one


def advise(report: PreflightReport, run: RunSettings) -> None:
    """Append the advice that applies to `report.warnings`."""
    if report.problems:  # the data itself must be fixed first
        return
    for rule in (_small_data, _low_beta, _no_chat_template, _kto_balance):
        message = rule(report, run)
        if message:
            report.warnings.append(message)


def _units(report: PreflightReport) -> tuple[int, str]:
    """Training units kept, and their name: pairs, or KTO's examples (a pair gives two)."""
    return report.stats.kept, "examples" if report.kind == "unpaired" else "pairs"


def _small_data(report: PreflightReport, run: RunSettings) -> str | None:
    n, unit = _units(report)
    if run.method.data not in ("pairs", "unpaired") or n >= NOISY_BELOW:
        return None
    return (
        f"only {n} {unit}: preference results on fewer than {NOISY_BELOW:,} are noisy "
        "(held-out accuracy and win rate move by several points between seeds); use more data, "
        "or compare runs over several seeds"
    )


def _low_beta(report: PreflightReport, run: RunSettings) -> str | None:
    # beta scales the implicit reward against the reference policy: only then is a small one
    # a weak KL anchor (reference-free losses use beta on another scale)
    beta = getattr(run.knobs, "beta", None)
    if beta is None or run.method.reference != "required":
        return None
    n, unit = _units(report)
    if beta >= LOW_BETA or n >= LOW_BETA_DATA:
        return None
    return (
        f"{run.method.section}.beta={beta:g} with {n} {unit}: a beta below {LOW_BETA:g} lets the "
        f"policy drift far from the reference, and on fewer than {LOW_BETA_DATA:,} {unit} it "
        f"overfits (train accuracy near 1.0 early, rejected log-probs collapsing); use "
        f"{run.method.section}.beta={LOW_BETA:g} or more, or more data"
    )


def _no_chat_template(report: PreflightReport, run: RunSettings) -> str | None:
    # Methods anchored to the starting policy (a reference, or PPO's KL) stay near what it
    # already does: a model that never learned the chat format stays unable to chat
    anchored = run.method.reference in ("required", "start") and run.method.head == "lm"
    if not anchored or run.chat_template:
        return None
    return (
        f"the model has no chat template (a base model): {run.method.name} starting from a model "
        "that never learned the chat format is the usual cause of a run that learns nothing; "
        "run sft on the same format first and start from its result, or set "
        "model.chat_template to the template the model was trained with"
    )


def _kto_balance(report: PreflightReport, run: RunSettings) -> str | None:
    if report.kind != "unpaired" or not hasattr(run.knobs, "desirable_weight"):
        return None
    n_d, n_u = report.desirable, report.undesirable
    section = run.method.section
    if not n_d or not n_u:
        missing = "undesirable (label false)" if n_d else "desirable (label true)"
        return (
            f"no {missing} example is kept: {run.method.name} then pushes only one way, with "
            "nothing to contrast against; add examples of the other label"
        )
    w_d, w_u = run.knobs.desirable_weight, run.knobs.undesirable_weight
    ratio = w_d * n_d / (w_u * n_u)
    low, high = KTO_RATIO
    if low <= ratio <= high:
        return None
    if ratio < low:  # desirable examples weigh too little: raise their weight
        knob, value = "desirable_weight", KTO_TARGET * w_u * n_u / n_d
    else:  # undesirable examples weigh too little: raise theirs
        knob, value = "undesirable_weight", w_d * n_d / (KTO_TARGET * n_u)
    return (
        f"{n_d} desirable and {n_u} undesirable examples ({n_d / (n_d + n_u):.0%} desirable): "
        f"with weights {w_d:g}/{w_u:g} the weighted ratio desirable_weight*n_D / "
        f"(undesirable_weight*n_U) is {ratio:.2f}, outside the KTO paper's [1, 4/3]; set "
        f"{section}.{knob}={value:.2f} to rebalance it"
    )
