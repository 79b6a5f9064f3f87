"""Run-health rules: the failure signatures practitioners diagnose by hand, as pure checks.

Each rule reads the metric history of a run (a `View`) and says whether it can judge yet and,
if so, whether the failure shows. Rules look at windows of several logged values, never at one
step, so that the noise of small batches does not set them off; the only single-step rules are
the ones whose failure is exact (a NaN, a batch with no target tokens). Everything here is plain
Python on floats: a check costs O(window) per logged step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from alignkit import methods
from alignkit.methods import with_health

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


@dataclass
class Series:
    """One metric's logged values in order, with the step of each."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.values)

    def head(self, n: int) -> list[float]:
        return self.values[:n]

    def tail(self, n: int, upto: int | None = None) -> list[float]:
        """The last n values, or the last n logged at steps <= upto."""
        end = len(self.values) if upto is None else bisect.bisect_right(self.steps, upto)
        return self.values[max(0, end - n) : end]


@dataclass
class View:
    """What a rule sees: the history so far, the latest observation and the run's shape."""

    series: dict[str, Series]
    current: dict[str, float]  # the observation being judged
    step: int
    total_steps: int
    window: int  # logged values per smoothing window
    method: str
    settings: dict

    @property
    def progress(self) -> float:
        return self.step / max(self.total_steps, 1)

    def get(self, names: tuple[str, ...]) -> Series | None:
        """The first of `names` (alternative spellings of one metric) that has values."""
        return next((self.series[n] for n in names if n in self.series), None)


class Check(NamedTuple):
    judged: bool  # False: too little data to say yet
    message: str | None = None  # set when the failure shows


WAIT, OK = Check(False), Check(True)


def fire(message: str) -> Check:
    return Check(True, message)


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


# -- statistics over windows -------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def shift_t(early: list[float], late: list[float]) -> float:
    """Welch's t statistic of mean(late) - mean(early): how many standard errors it moved."""
    diff = mean(late) - mean(early)
    se = math.sqrt(stderr(early) ** 2 + stderr(late) ** 2)
    if se < 1e-12:  # noiseless windows: any real change is significant
        return 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
    return diff / se


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


def rejected_collapse(v: View) -> Check:
    s, w = v.series.get("logps/rejected"), v.window
    if s is None or len(s) < 2 * w:
        return WAIT
    start, now = mean(s.head(w)), mean(s.tail(w))
    # Summed log-probs scale with length, so the rule is relative to the run's own start:
    # twice the starting negative log-likelihood is about -200 on ~100 tokens of ordinary text
    # (~-1 nat per token at the start), the collapse level practitioners quote. The 20-nat floor
    # keeps very short responses from tripping it.
    if start < 0 and now < 2.0 * start and start - now >= 20.0:
        return fire(
            f"rejected log-probs fell from {start:.1f} to {now:.1f} ({now / start:.1f}x their "
            f"start) by step {v.step}"
        )
    return OK


def margins_not_growing(v: View) -> Check:
    s, w = v.get(MARGINS), v.window
    if s is None or len(s) < 2 * w or v.progress < 0.5:
        return WAIT
    early, late = s.head(w), s.tail(w)
    # Growth must stand out of the noise by one standard error, judged from half-way on.
    if shift_t(early, late) < 1.0:
        return fire(
            f"reward margins went from {mean(early):.3f} (first {w} logged steps) to "
            f"{mean(late):.3f} (last {w}) by step {v.step}: no clear growth"
        )
    return OK


def chosen_falling(v: View) -> Check:
    s, w = v.series.get("rewards/chosen"), v.window
    if s is None or len(s) < 3 * w:
        return WAIT
    early, mid, late = s.head(w), s.values[-2 * w : -w], s.tail(w)
    a, b, c = mean(early), mean(mid), mean(late)
    # Steady: three successive windows each lower, and the overall drop well beyond the noise.
    if a > b > c and shift_t(early, late) < -3.0:
        return fire(
            f"chosen rewards fell steadily from {a:.3f} to {b:.3f} to {c:.3f} by step {v.step}"
        )
    return OK


def _diverges(v: View, train: Series, step: int, eval_margin: float) -> bool:
    recent = train.tail(v.window, upto=step)
    if len(recent) < v.window:
        return False
    m = mean(recent)
    # Only a train margin clearly above zero can be "not tracked"; eval below half of it is.
    return m > 2.0 * stderr(recent) and m > 0 and eval_margin < 0.5 * m


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
    stuck = LN2 if v.method in STUCK_LOSS else None
    if stuck is None or s is None or len(s) < w or v.progress < 0.2:
        return WAIT
    now = mean(s.tail(w))
    if abs(now - stuck) < 0.005:
        return fire(
            f"loss averaged {now:.4f} over the last {w} logged steps at step {v.step}, "
            f"still at ln 2 = {stuck:.4f}: policy and reference still score pairs alike"
        )
    return OK


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
        "rejected_logps_collapse",
        "warning",
        "rejected log-probs stay within twice their starting value",
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
