"""The rollout loop every online method shares: sample -> score -> experience -> update.

An algorithm (PPO today; GRPO and online DPO next) implements :class:`RolloutAlgorithm`: one
step takes a batch of prompts and does its own sampling (n completions per prompt or one),
scoring through :mod:`alignkit.train.rl.scoring`, experience and updates with the optimizer the
loop hands it. The loop owns the rest, through the run session: the prompt stream, the optimizer
and schedule, evaluation before, during and after training, logging, progress, run health,
checkpoints and resume, `final/` and `summary.json`. The method's config section (`ppo`, ...)
supplies `rollout_batch_size`, `eval_prompts`, `max_new_tokens` and the score source
(`reward_fn` or `reward_model`); a method sampling n completions per prompt repeats each prompt
n times in its step.

Checkpoints (`train.save_every`) hold the shared pieces (trainable weights, optimizer, schedule,
RNG states, TrainerState) plus, as `extra`, the prompt position, the evaluation before training
and the algorithm's own state (`state_dict`). A step stops midway through its updates, so an
interrupt saves nothing: the run resumes from its last regular checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from alignkit.config import RunConfig
from alignkit.data.prompts import PromptExample
from alignkit.errors import AlignkitError
from alignkit.monitor.progress import Phases
from alignkit.train.checkpoint import (
    TrainerState,
    checkpoint_dirs,
    load_checkpoint,
    load_extra,
    prune_checkpoints,
    save_checkpoint,
)
from alignkit.train.loop import FitResult, Interrupted, make_optimizer, make_scheduler
from alignkit.train.rl.scoring import RewardSource, make_reward
from alignkit.train.session import (
    Cadence,
    interrupt_note,
    make_health,
    make_phases,
    open_loggers,
    peak_memory_mb,
    sample_generations,
    start_run,
    summarize,
    write_summary,
)


@dataclass
class Optim:
    """What an update step needs from the training machinery."""

    optimizer: Any
    scheduler: Any
    backward: Callable[[Tensor], None]
    clip: Callable[[float], float]  # max norm -> grad norm before clipping
    autocast: Callable[[], Any] = contextlib.nullcontext  # mixed-precision forward context


def make_optim(trainable: nn.Module, tcfg, accelerator, updates: int) -> Optim:
    """Optimizer, schedule over `updates` optimizer steps, and the accelerator's hooks."""
    optimizer = make_optimizer(trainable, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, updates)
    optimizer = accelerator.prepare(optimizer)
    params = [p for p in trainable.parameters() if p.requires_grad]
    return Optim(
        optimizer,
        scheduler,
        accelerator.backward,
        lambda norm: accelerator.clip_grad_norm_(params, norm),
        accelerator.autocast,
    )


class RolloutAlgorithm(Protocol):
    """What an online method supplies to the rollout loop."""

    layout: str  # how its models share weights (summary, memory line)
    describe: str  # one line shown at the start: its models and their sizes
    param_mb: dict[str, float]  # parameter megabytes per component, for the summary

    def trainable(self) -> nn.Module: ...  # every trainable parameter, checkpointed

    def updates_per_step(self) -> int: ...  # optimizer steps in one rollout step

    def step(self, examples: list[PromptExample], opt: Optim) -> dict[str, float]:
        """Sample, score, build experience and update on one batch of prompts; the metrics
        hold `tokens` (tokens trained on) for throughput and the token count."""
        ...

    def evaluate(self, prompts: list[PromptExample]) -> dict[str, float]: ...  # `eval/` metrics

    def policy(self) -> AbstractContextManager[nn.Module]: ...  # the model that samples

    def state_dict(self) -> dict[str, Any]: ...  # checkpoint state beyond the shared pieces

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_final(self, out_dir: Path) -> None: ...  # `final/`, loadable as it is

    def summary_extras(self) -> dict[str, Any]: ...  # entries of its own in summary.json


# cfg, tokenizer, score source, accelerator -> the algorithm, its models built
BuildAlgorithm = Callable[[RunConfig, Any, RewardSource, Any], RolloutAlgorithm]
LOOP_STATE = ("prompt_position", "eval_before")  # the loop's own keys in a checkpoint's extra


class PromptStream:
    """Rollout batches of prompts: a seeded shuffle per pass over the data, wrapping around."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.pos = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch:
            epoch, i = divmod(self.pos, self.n)
            out.append(self._order(epoch)[i])
            self.pos += 1
        return out


def rollout_steps(tcfg, n_prompts: int, rollout_batch_size: int) -> int:
    if tcfg.max_steps:
        return tcfg.max_steps
    return max(1, math.ceil(n_prompts * tcfg.epochs / rollout_batch_size))


def run_rollout(cfg: RunConfig, build: BuildAlgorithm, *, log=print, progress_stream=None) -> dict:
    """Train an online method end to end; returns the summary also written to summary.json.
    Progress goes to `progress_stream` (stderr by default)."""
    from alignkit.data.prompts import load_prompt_data
    from alignkit.models import load_tokenizer

    acc, run_dir = start_run(cfg, one_process=True)
    section = getattr(cfg, cfg.method)  # the method's own section: ppo, ...
    tokenizer = load_tokenizer(cfg.model)
    data = load_prompt_data(cfg, tokenizer)
    reward = make_reward(
        section, tokenizer, acc.device, batch_size=cfg.train.batch_size, name=cfg.method
    )
    algo = build(cfg, tokenizer, reward, acc)
    log(
        f"[alignkit] {cfg.method} on {cfg.model.name}: {len(data.train)} train / "
        f"{len(data.eval)} eval prompts ({data.format}); reward: {reward.describe}; "
        f"device {acc.device}"
    )
    log(algo.describe)
    st = data.stats
    if st.dropped_too_long or st.truncated:
        log(
            f"[alignkit] prompts over the {cfg.data.max_length - section.max_new_tokens} tokens "
            f"left by data.max_length - {cfg.method}.max_new_tokens: {st.dropped_too_long} "
            f"dropped, {st.truncated} cut on the left (data.truncation={cfg.data.truncation})"
        )
    phases = make_phases(cfg.train, True, progress_stream)
    return RolloutRun(cfg, section, algo, tokenizer, acc, run_dir, log, phases).run(data)


class RolloutRun:
    """One rollout run: the loop, its checkpoints and its summary."""

    def __init__(
        self,
        cfg: RunConfig,
        section,
        algo: RolloutAlgorithm,
        tokenizer,
        acc,
        run_dir,
        log,
        phases: Phases | None = None,
    ):
        self.cfg, self.section, self.algo, self.tokenizer = cfg, section, algo, tokenizer
        self.acc, self.run_dir, self.log = acc, run_dir, log
        self.phases = phases if phases is not None else make_phases(cfg.train, True)

    def samples(self, label: str) -> list[Any]:
        with self.algo.policy() as module:
            return sample_generations(module, self.tokenizer, self.cfg.train, self.phases, label)

    def evaluate(self, prompts: list[PromptExample], label: str) -> dict[str, float]:
        """The algorithm's evaluation (policy against reference) as a phase of its own: said
        when it starts and ends, since sampling every eval prompt can take minutes. The
        algorithm reports no progress within it, so its count moves once, at the end."""
        with self.phases(label, len(prompts), "prompts", "(policy and reference)") as progress:
            metrics = self.algo.evaluate(prompts)
            progress.update(len(prompts))
        return metrics

    def run(self, data) -> dict:
        cfg, algo = self.cfg, self.algo
        steps = rollout_steps(cfg.train, len(data.train), self.section.rollout_batch_size)
        opt = make_optim(algo.trainable(), cfg.train, self.acc, steps * algo.updates_per_step())
        stream = PromptStream(len(data.train), self.section.rollout_batch_size, cfg.train.seed)
        fit = FitResult(TrainerState(), {})
        before = self.samples("samples before training")  # the starting policy, even on resume
        self.resume_if_asked(opt, stream, fit, steps)
        cadence = Cadence(
            cfg.train,
            steps,
            logger=open_loggers(cfg, self.run_dir),
            health=make_health(cfg, steps, self.run_dir),
            watch_evals=False,  # the health rules read training rows only
        )
        if fit.state.step:
            cadence.resume_health(self.run_dir, upto=fit.state.step)
        t_start = time.perf_counter() - fit.state.elapsed_s
        try:
            self.train(data, opt, stream, fit, cadence, t_start)
        except KeyboardInterrupt:
            note = interrupt_note(self.run_dir, cfg.method, fit.state.step, steps, saved=None)
            raise Interrupted(note.message, hint=note.hint) from None
        finally:
            cadence.logger.close()
        fit.wall_s = time.perf_counter() - t_start
        return self.finish(fit, data, before, cadence)

    def train(
        self, data, opt: Optim, stream: PromptStream, fit: FitResult, cadence: Cadence, t0: float
    ) -> None:
        """Steps from the current one to the last, with the evaluations before and after;
        `t0` is when the run would have started had it never stopped (resumed time included)."""
        algo, steps = self.algo, cadence.steps
        eval_prompts = data.eval[: self.section.eval_prompts]
        if eval_prompts and fit.state.step == 0:
            fit.eval_before = self.evaluate(eval_prompts, "eval before training")
            cadence.log_eval(0, fit.eval_before)
        ran = fit.state.step < steps
        progress = self.phases("train", steps, "steps", lines=20)
        progress.start(fit.state.step)
        try:
            for step in range(fit.state.step + 1, steps + 1):
                metrics = algo.step([data.train[i] for i in stream.next()], opt)
                fit.state.step = step
                fit.state.tokens_seen += metrics.pop("tokens")
                fit.state.elapsed_s = time.perf_counter() - t0
                if eval_prompts and cadence.eval_due(step):
                    metrics.update(self.evaluate(eval_prompts, f"eval at step {step}"))
                # The last step's row waits for the evaluation after training: one row per step.
                if step < steps and cadence.log_due(step):
                    self.log_row(cadence, step, metrics)
                fit.last_metrics = metrics
                progress.update(step, metrics)
                if cadence.save_due(step):
                    self.save(opt, stream, fit)
        finally:
            progress.stop()
        row = dict(fit.last_metrics) if ran else {}
        if eval_prompts:
            fit.eval_after = self.evaluate(eval_prompts, "eval after training")
            row.update(fit.eval_after)
        if row:
            self.log_row(cadence, steps, row)

    def log_row(self, cadence: Cadence, step: int, metrics: dict[str, float]) -> None:
        cadence.log(step, metrics)
        for text in cadence.take_findings():
            self.log("[alignkit] " + text)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, opt: Optim, stream: PromptStream, fit: FitResult) -> Path:
        ckpt = self.run_dir / "checkpoints" / f"step-{fit.state.step}"
        extra = {
            **self.algo.state_dict(),
            "prompt_position": stream.pos,
            "eval_before": dict(fit.eval_before),
        }
        save_checkpoint(
            ckpt,
            self.algo.trainable(),
            opt.optimizer,
            opt.scheduler,
            fit.state,
            rank=0,
            is_main=True,
            extra=extra,
            scaler=self.acc.scaler,
        )
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return ckpt

    def resume_if_asked(self, opt: Optim, stream: PromptStream, fit: FitResult, steps: int):
        """Restore the latest complete checkpoint in place when `train.resume=auto` finds one."""
        found = checkpoint_dirs(self.run_dir)
        if self.cfg.train.resume != "auto" or not found:
            return
        ckpt, method = found[-1], self.cfg.method
        extra = load_extra(ckpt)
        if {*LOOP_STATE, *self.algo.state_dict()} - extra.keys():
            raise AlignkitError(
                f"checkpoint {ckpt} was not written by a {method} run",
                hint="resume it with the method that wrote it, or use a new output_dir",
            )
        trainable, scaler = self.algo.trainable(), self.acc.scaler
        fit.state = load_checkpoint(
            ckpt, trainable, opt.optimizer, opt.scheduler, rank=0, scaler=scaler
        )
        self.algo.load_state_dict(extra)
        stream.pos = int(extra["prompt_position"])
        fit.eval_before = dict(extra["eval_before"])
        self.log(f"[alignkit] resuming {method} from {ckpt}, step {fit.state.step}/{steps}")

    # -- the end --------------------------------------------------------------------------------
    def finish(self, fit: FitResult, data, before, cadence: Cadence) -> dict:
        from alignkit.models import count_parameters

        algo = self.algo
        algo.save_final(self.run_dir / "final")
        after = self.samples("samples after training")
        info = {
            "format": data.format,
            **vars(data.stats),
            "eval_prompts": len(data.eval[: self.section.eval_prompts]),
            "layout": algo.layout,
        }
        params = count_parameters(algo.trainable())
        summary = summarize(self.cfg, fit, info, before, after, params)
        summary["memory"] = {"layout": algo.layout, "param_mb": algo.param_mb, **peak_memory_mb()}
        summary.update(algo.summary_extras())
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in peak_memory_mb().items())
        note = f"[alignkit] {self.cfg.method} memory ({algo.layout}): {peaks}"
        return write_summary(
            self.run_dir, summary, cadence.health_summary(), self.log, notes=[note]
        )
