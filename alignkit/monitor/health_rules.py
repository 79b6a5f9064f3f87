"""Run-health rules: the failure signatures practitioners diagnose by hand, as pure checks.

Each rule reads the metric history of a run (a `View`) and says whether it can judge yet and,
if so, whether the failure shows. Rules look at windows of several logged values, never at one
step, so that the noise of small batches does not set them off; the only single-step rules are
the ones whose failure is exact (a NaN, a batch with no target tokens). Everything here is plain
Python on floats: a check costs O(window) per logged step.

Calibration. Per-batch preference metrics are noisy: a batch of 8 pairs has an accuracy of k/8
and margins that swing by as much as a slow run gains in its whole first epoch. A warning that
fires on a run that learns teaches the user to ignore warnings, so the trend rules follow four
habits, each stated where it is used:

- smooth: compare means over windows of logged values, a quarter of what has been logged (at
  least the smoothing window, at most 50 values) when judging a trend since the start;
- judge on the eval split where there is one: every evaluation scores the same held-out pairs,
  so the difference between two evaluations is the model's change alone, with no batch noise;
- require significance: a train trend must stand out of the noise by Welch's t over windows,
  and a level or a fall must also be large enough to matter, not only significant;
- wait for a minimum share of the run (a quarter for levels, half for growth) before judging,
  since a run with warmup and a small learning rate moves slowly at first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from alignkit import methods
from alignkit.methods import with_health
from alignkit.monitor.health_view import (
    OK,
    WAIT,
    Check,
    Series,
    View,
    after_start,
    fire,
    held_out_late,
    mean,
    median,
    resolved,
    shift_t,
    stderr,
    trend_window,
)

LN2 = math.log(2.0)
# Which methods a method-specific rule watches comes from the method table's health tags:
# Sigmoid-loss methods, whose loss is exactly ln 2 while chosen and rejected rewards are equal
# (DPO, -log sigmoid(0); robust DPO's de-biased form gives ln 2 at zero margin as well).
STUCK_LOSS = with_health(methods.SIGMOID_LOSS)
# Methods whose rewards are the policy's own log-probs (against a reference, or length-normalised):
# there a falling chosen reward means the chosen answers became less likely. A reward model's
# scores have no fixed level (Bradley-Terry sees differences only), so the rule is not for it.
POLICY_REWARDS = with_health(methods.POLICY_REWARDS)
DEFAULT_KL_TARGET = 6.0  # the adaptive KL controller's usual target (Ziegler et al. 2019)
# Summed rejected log-probs below this are the collapse level practitioners quote: about -2 nats
# per token on ~100 tokens, where ordinary text sits near -1. The metrics hold sums only (no
# token counts), so the floor is absolute in summed nats and applies only to runs that started
# above it: data whose responses are long start below it and are left to the relative rule.
REJECTED_FLOOR = -200.0
MIN_FALL_NATS = 20.0  # a collapse is at least this large, whatever the noise
# Evaluations score the same held-out pairs, so any change between two of them is the model's;
# these tolerances only ignore changes too small to mean anything.
EVAL_LN2_TOL = 0.002  # eval loss this close to ln 2: the policy still ties on held-out pairs
EVAL_GROWTH_TOL = 0.01  # eval margin growth below this (reward units) is no growth
# Train reward trends are judged only when their windows resolve a quarter of the level reached,
# or of this floor (a quarter of it is an eighth of a nat of log-ratio at beta 0.1).
REWARD_RESOLUTION = 0.05
# A chosen-reward fall smaller than this is drift, not displacement: one nat of the chosen
# response's summed log-prob at beta 0.1 (DPO's default).
MIN_CHOSEN_FALL = 0.1
SATURATED = 0.98  # train accuracy above this late in training: the training pairs are memorised


TOO_NOISY = Check(
    False,
    pending="train batches too noisy to judge the trend; an eval split (data.eval_size) lets it "
    "be judged on held-out pairs",
)


class Rule(NamedTuple):
    name: str
    severity: str  # "warning" | "error"
    title: str  # what healthy looks like, for the summary
    # Groups of alternative names; every group must have values for the rule to apply, and the
    # rule is checked when the first group is in the observation. () means always.
    needs: tuple[tuple[str, ...], ...]
    reason: str
    fix: str
    check: Callable[[View], Check]
    methods: frozenset[str] | None = None  # None: any method whose metrics are there
    # A verdict on the run as a whole (a trend since the start) is reported once; an episode
    # (a NaN, a stretch of high KL) again after it has cleared, since it can recur.
    once: bool = True


# -- preference rules --------------------------------------------------------------------------
ACCURACY = ("rewards/accuracies", "accuracy")
MARGINS = ("rewards/margins", "margin")
EVAL_MARGINS = ("eval/rewards/margins", "eval/margin")


def accuracy_early(v: View) -> Check:
    s, every = v.get(ACCURACY), v.settings.get("log_every", 1)
    # "Early" is the first tenth of training; a window of half of it (at least 3 logged steps)
    # leaves room for the first steps, where policy == reference and accuracy is 0.
    w = max(3, min(v.window, int(0.1 * v.total_steps / every) // 2))
    early_end = max(0.1 * v.total_steps, w * every)
    if s is None or len(s) < w or v.step > early_end:
        return WAIT
    acc = mean(s.tail(w))
    if acc >= 0.95:
        return fire(
            f"preference accuracy averaged {acc:.2f} over the last {w} logged steps at step "
            f"{v.step}, within the first tenth of training ({v.total_steps} steps)"
        )
    return OK


def accuracy_late(v: View) -> Check:
    s = v.get(ACCURACY)
    # The last quarter of training, smoothed over a window: at 8 pairs a batch one batch at 1.0
    # says little, while a window mean above 0.98 leaves at most one wrong pair in about 50.
    w = max(v.window, 5)
    if s is None or len(s) < w or v.progress < 0.75:
        return WAIT
    acc = mean(s.tail(w))
    if acc > SATURATED:
        return fire(
            f"train preference accuracy averaged {acc:.3f} over the last {w} logged steps at "
            f"step {v.step} of {v.total_steps} (healthy on real data: about 0.75 to 0.92)"
        )
    return OK


def rejected_collapse(v: View) -> Check:
    s, w = v.series.get("logps/rejected"), v.window
    if s is None or len(s) < 2 * w:
        return WAIT
    early, late = s.head(w), s.tail(w)
    start, now = mean(early), mean(late)
    # Absolute: the window mean crossed the floor during training, by a fall that is both
    # significant against the batch-to-batch spread of lengths and at least MIN_FALL_NATS.
    fell = start - now >= MIN_FALL_NATS and shift_t(early, late) < -3.0
    if start > REJECTED_FLOOR > now and fell:
        return fire(
            f"rejected log-probs fell from {start:.1f} to {now:.1f} by step {v.step}, below "
            f"{REJECTED_FLOOR:.0f} (summed over each response)"
        )
    # Relative: summed log-probs scale with length, so a run whose responses start long is
    # judged against its own start: twice the starting negative log-likelihood.
    if start < 0 and now < 2.0 * start and start - now >= MIN_FALL_NATS:
        return fire(
            f"rejected log-probs fell from {start:.1f} to {now:.1f} ({now / start:.1f}x their "
            f"start) by step {v.step}"
        )
    return OK


def margins_not_growing(v: View) -> Check:
    s = v.get(MARGINS)
    if s is None or v.progress < 0.5:
        return WAIT
    held_out = held_out_late(v, v.get(EVAL_MARGINS))
    if held_out is not None:
        if not held_out:
            return WAIT  # the evaluation past half-way is still to come
        # The same held-out pairs each time: growth since the baseline is the model's own.
        first, last = held_out.values[0], held_out.values[-1]
        if last - first > EVAL_GROWTH_TOL:
            return OK
        return fire(
            f"eval reward margins went from {first:.3f} (step {held_out.steps[0]}) to "
            f"{last:.3f} (step {held_out.steps[-1]}) by step {v.step}: no growth on held-out pairs"
        )
    w = trend_window(v, len(s))
    if len(s) < 2 * w:
        return WAIT
    early, late = s.head(w), s.tail(w)
    if not resolved(early, late, REWARD_RESOLUTION):
        return TOO_NOISY
    # Growth must stand out of the noise by one standard error of the windows' difference.
    if shift_t(early, late) < 1.0:
        return fire(
            f"reward margins went from {mean(early):.3f} (first {w} logged steps) to "
            f"{mean(late):.3f} (last {w}) by step {v.step}: no clear growth"
        )
    return OK


def chosen_falling(v: View) -> Check:
    s, margins = v.series.get("rewards/chosen"), v.get(MARGINS)
    if s is None or v.progress < 0.5:
        return WAIT
    held_out = held_out_late(v, v.series.get("eval/rewards/chosen"))
    if held_out is not None:
        if not held_out:
            return WAIT  # the evaluation past half-way is still to come
        if held_out.values[0] - held_out.values[-1] < MIN_CHOSEN_FALL:
            return OK  # the held-out chosen answers did not become materially less likely
    w = trend_window(v, len(s))
    if len(s) < 3 * w:
        return WAIT
    early, mid, late = s.head(w), s.values[-2 * w : -w], s.tail(w)
    a, b, c = mean(early), mean(mid), mean(late)
    if not resolved(early, late, REWARD_RESOLUTION):
        return TOO_NOISY
    # Steady: three successive windows each lower, and the overall drop well beyond the noise.
    if not (a > b > c and shift_t(early, late) < -3.0):
        return OK
    # Large enough to matter: some displacement is usual in the DPO family (both rewards drift
    # down, rejected faster). It is the failure when the chosen reward loses at least
    # MIN_CHOSEN_FALL and at least half as much as the margin gains: the margin is then won by
    # making chosen answers less likely.
    gain = mean(margins.tail(w)) - mean(margins.head(w)) if margins is not None else 0.0
    if a - c < max(MIN_CHOSEN_FALL, 0.5 * gain):
        return OK
    return fire(f"chosen rewards fell steadily from {a:.3f} to {b:.3f} to {c:.3f} by step {v.step}")


def _diverges(v: View, train: Series, step: int, eval_margin: float) -> bool:
    recent = train.tail(v.window, upto=step)
    if len(recent) < v.window:
        return False
    m, low = mean(recent), mean(recent) - 2.0 * stderr(recent)
    # Only a train margin clearly above zero can be "not tracked"; eval below half of it is.
    # Half of its lower bound (two standard errors down), not of its mean: a noisy window that
    # happens to run high must not make a held-out margin look left behind.
    return low > 0 and m > 0 and eval_margin < 0.5 * low


def eval_divergence(v: View) -> Check:
    ev, train = v.get(EVAL_MARGINS), v.get(MARGINS)
    if ev is None or train is None:
        return WAIT
    # The last two evaluations since training began (the one at step 0 comes before it).
    tail = zip(ev.steps[-3:], ev.values[-3:], strict=True)
    points = [(st, x) for st, x in tail if st > 0][-2:]
    final = v.step >= v.total_steps  # the last evaluation: no later point will confirm it
    if not points or (len(points) < 2 and not final):
        return WAIT
    step, margin = points[-1]
    recent = train.tail(v.window, upto=step)
    if len(recent) < v.window:
        return WAIT
    if all(_diverges(v, train, st, x) for st, x in points):
        return fire(
            f"eval margin {margin:.3f} at step {step} against a train margin of "
            f"{mean(recent):.3f}: held-out pairs do not follow the training pairs"
        )
    return OK


def loss_stuck(v: View) -> Check:
    s, w = v.series.get("loss"), v.window
    if v.method not in STUCK_LOSS or s is None or len(s) < w or v.progress < 0.25:
        return WAIT
    # Root-mean-square distance from ln 2 over the window: a stuck policy ties on every pair, so
    # every batch sits at ln 2; one that has moved at all spreads its pairs' margins, and the
    # per-batch loss scatters around ln 2 even while its mean is still close to it.
    rms = math.sqrt(mean([(x - LN2) ** 2 for x in s.tail(w)]))
    if rms >= 0.005:
        return OK
    held_out = after_start(v.series.get("eval/loss"))
    if held_out and abs(held_out[-1] - LN2) >= EVAL_LN2_TOL:
        return OK  # the held-out pairs no longer tie: the policy has moved
    return fire(
        f"loss stayed within {rms:.4f} (rms) of ln 2 = {LN2:.4f} over the last {w} logged steps "
        f"at step {v.step}: policy and reference still score pairs alike"
    )


# -- any method --------------------------------------------------------------------------------
def non_finite(v: View) -> Check:
    # An infinite grad norm is how fp16 loss scaling reports a skipped step; NaN is never fine.
    bad = [
        k
        for k, x in v.current.items()
        if math.isnan(x) or (math.isinf(x) and not k.endswith("grad_norm"))
    ]
    if bad:
        shown = ", ".join(f"{k}={v.current[k]}" for k in sorted(bad)[:4])
        return fire(f"non-finite values at step {v.step}: {shown}")
    return OK


# -- PPO ---------------------------------------------------------------------------------------
def kl_above_target(v: View) -> Check:
    s, w = v.series.get("objective/kl"), v.window
    target = float(v.settings.get("kl_target") or DEFAULT_KL_TARGET)
    # "For long": a tenth of the run's logged steps, at least two windows, at most 50.
    span = min(50, max(2 * w, round(0.1 * v.total_steps / v.settings.get("log_every", 1))))
    if s is None or len(s) < span:
        return WAIT
    last = s.tail(span)
    above = sum(x > target for x in last) / span
    if mean(last) > target and above >= 0.8:
        return fire(
            f"KL to the reference averaged {mean(last):.2f} over the last {span} logged steps "
            f"(target {target:g}) at step {v.step}"
        )
    return OK


def reward_hacking(v: View) -> Check:
    scores, length, w = v.series.get("objective/scores"), v.series.get("response/length"), v.window
    if scores is None or length is None or min(len(scores), len(length)) < 2 * w:
        return WAIT
    l0, l1 = mean(length.head(w)), mean(length.tail(w))
    rising = shift_t(scores.head(w), scores.tail(w)) > 2.0
    longer = shift_t(length.head(w), length.tail(w)) > 3.0 and l1 >= 1.25 * max(l0, 1e-9)
    if rising and longer:
        return fire(
            f"reward rose from {mean(scores.head(w)):.3f} to {mean(scores.tail(w)):.3f} while "
            f"responses grew from {l0:.0f} to {l1:.0f} tokens by step {v.step}"
        )
    return OK


def missing_eos(v: View) -> Check:
    s, w = v.series.get("response/eos_fraction"), v.window
    if s is None or len(s) < w:
        return WAIT
    low = float(v.settings.get("min_eos_fraction", 0.5))
    frac = mean(s.tail(w))
    if frac < low:
        return fire(
            f"only {frac:.0%} of sampled responses ended with EOS over the last {w} logged "
            f"steps at step {v.step}"
        )
    return OK


def value_loss_exploding(v: View) -> Check:
    s, w = v.series.get("val/vf_loss"), v.window
    if s is None or len(s) < 2 * w:
        return WAIT
    # Medians, so a single spike in either window neither fires nor hides the rule.
    start, now = median(s.head(w)), median(s.tail(w))
    if now > 10.0 * max(start, 1e-6):
        return fire(
            f"value loss rose from {start:.4g} to {now:.4g} ({now / max(start, 1e-6):.0f}x) "
            f"by step {v.step}"
        )
    return OK


# -- SFT ---------------------------------------------------------------------------------------
def labels_masked(v: View) -> Check:
    for prefix in ("", "eval/"):
        tokens = v.current.get(f"{prefix}target_tokens")
        loss = v.current.get(f"{prefix}loss")
        # A zero loss is exact only when nothing was scored: the NLL of a real token is > 0.
        if tokens == 0 or (tokens is None and loss == 0.0):
            where = "an eval pass" if prefix else "a training step"
            return fire(f"{where} at step {v.step} had no target tokens: loss {loss}")
    return OK


RULES: tuple[Rule, ...] = (
    Rule(
        "non_finite",
        "error",
        "loss and metrics stay finite",
        (),  # every observation, whatever the method logs
        "a NaN or infinite value means the weights or the optimizer state are already damaged; "
        "every later step trains on garbage",
        "lower train.lr, keep train.max_grad_norm set, use bf16 rather than fp16, and check the "
        "data for empty or extreme examples; resume from the last good checkpoint",
        non_finite,
        once=False,
    ),
    Rule(
        "labels_all_masked",
        "error",
        "every SFT batch has target tokens",
        (("loss", "eval/loss"),),
        "with every label masked the loss is 0 and no gradient flows: the step trains nothing",
        "check the chat template and data.completion_only: the assistant turns must be found "
        "and unmasked (`alignkit data check` shows the label mask)",
        labels_masked,
        with_health(methods.SFT_LABELS),
        once=False,
    ),
    Rule(
        "loss_stuck_at_ln2",
        "warning",
        "the sigmoid preference loss moves off ln 2",
        (("loss",),),
        "a DPO loss at ln 2 means the policy has not moved away from the reference: it is not "
        "learning the preferences",
        "raise train.lr (LoRA usually needs 1e-5 to 1e-4), check that trainable parameters "
        "exist and that the reference is not the live policy",
        loss_stuck,
        STUCK_LOSS,
    ),
    Rule(
        "accuracy_saturated_early",
        "warning",
        "preference accuracy stays below 0.95 in the first tenth of training",
        (ACCURACY,),
        "pairs separated almost perfectly this early are too easy or leak the answer (chosen "
        "and rejected differ in a trivial way), or beta/lr is so large the model overfits",
        "check the pairs for trivial cues (length, formatting), lower dpo.beta or train.lr, "
        "and watch eval accuracy rather than train accuracy",
        accuracy_early,
    ),
    Rule(
        "accuracy_saturated_late",
        "warning",
        "train preference accuracy stays below 0.98 at the end of training",
        (ACCURACY,),
        "near-perfect accuracy on the training pairs late in the run means they are memorised: "
        "margins keep growing on them while held-out accuracy stalls or falls",
        "train fewer steps or epochs, lower train.lr or raise beta, add data, and pick the "
        "checkpoint by eval accuracy (healthy train accuracy on real data: 0.75 to 0.92)",
        accuracy_late,
    ),
    Rule(
        "rejected_logps_collapse",
        "warning",
        "rejected log-probs stay above -200 and within twice their starting value",
        (("logps/rejected",),),
        "the loss is being won by pushing rejected responses to absurdly low likelihood, which "
        "degrades generation rather than teaching the preference",
        "lower train.lr or raise beta, train for fewer steps, or add an SFT term (orpo, or "
        "rpo-style NLL on chosen)",
        rejected_collapse,
    ),
    Rule(
        "margins_not_growing",
        "warning",
        "reward margins grow over the run",
        (MARGINS,),
        "flat margins mean the model is not separating chosen from rejected responses",
        "raise train.lr or beta, train longer, and check that chosen and rejected are not "
        "swapped or nearly identical (`alignkit data check`)",
        margins_not_growing,
    ),
    Rule(
        "chosen_rewards_falling",
        "warning",
        "chosen rewards do not fall steadily",
        (("rewards/chosen",),),
        "both responses are being pushed down (likelihood displacement): margins may grow "
        "while the chosen answers become less likely too",
        "lower train.lr, raise beta, add an SFT/NLL term on chosen responses, or use a "
        "length-normalised loss (simpo, ipo)",
        chosen_falling,
        POLICY_REWARDS,
    ),
    Rule(
        "eval_margins_diverge",
        "warning",
        "eval margins track train margins",
        (EVAL_MARGINS, MARGINS),
        "margins that grow on training pairs but not on held-out ones are memorisation, "
        "not a learned preference",
        "train fewer steps or epochs, lower train.lr, raise beta, add data, or check that the "
        "eval pairs come from the same distribution",
        eval_divergence,
        once=False,
    ),
    Rule(
        "kl_above_target",
        "warning",
        "PPO KL stays near its target",
        (("objective/kl",),),
        "a policy far from the reference is exploiting the reward model and losing fluency",
        "raise ppo.kl_coef, keep ppo.adaptive_kl on, or lower train.lr",
        kl_above_target,
        once=False,
    ),
    Rule(
        "reward_hacking_length",
        "warning",
        "reward does not rise only with response length",
        (("objective/scores",), ("response/length",)),
        "reward models often prefer longer answers: rising reward with climbing length is the "
        "classic sign of reward hacking rather than better answers",
        "raise ppo.kl_coef, add a length penalty or a length-normalised reward model, cap "
        "ppo.max_new_tokens, and read samples",
        reward_hacking,
    ),
    Rule(
        "missing_eos",
        "warning",
        "sampled responses end with EOS",
        (("response/eos_fraction",),),
        "responses cut off at the token limit never learned to stop; their scores are "
        "unreliable and the policy drifts toward rambling",
        "keep ppo.missing_eos_penalty set, raise ppo.max_new_tokens, and check that the chat "
        "template's end-of-turn token is in the SFT loss",
        missing_eos,
        once=False,
    ),
    Rule(
        "value_loss_exploding",
        "warning",
        "the value loss does not grow tenfold",
        (("val/vf_loss",),),
        "an exploding value loss gives wrong advantages and usually precedes a collapse of "
        "the policy",
        "lower train.lr, lower ppo.vf_coef or ppo.cliprange_value, and normalise or whiten "
        "rewards (ppo.normalize_reward, ppo.whiten_rewards)",
        value_loss_exploding,
    ),
)
