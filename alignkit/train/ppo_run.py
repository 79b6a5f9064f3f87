"""`method: ppo`: from a validated config to a finished run directory.

Uses the shared machinery (optimizer and schedule from the loop, run directory, loggers,
progress, summary, `save_final`) around PPO's own step (:mod:`alignkit.train.ppo`). Evaluation
scores the responses of the policy and of the reference to the same held-out prompts, before
and after training: `eval/score` against `eval/ref_score` is the measure of improvement.

Checkpoints (`train.save_every`) hold the shared pieces (trainable weights of every role,
optimizer, schedule, RNG states, TrainerState) plus PPO's own: the KL coefficient, the prompt
position, the minibatch-shuffle generator, and the evaluation before training with the
reference's scores. The reference scores are stored, not resampled: they are small, and storing
them keeps the resumed summary exact however the sampling kernels behave. The health monitor is
rebuilt by replaying `metrics.jsonl` up to the checkpoint, as in the shared loop.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from alignkit.config import RunConfig
from alignkit.data.prompts import PromptExample
from alignkit.errors import AlignkitError, ConfigError
from alignkit.rollout.sampling import decode_responses, sample_responses
from alignkit.train.ppo import Optim, make_experience, ppo_updates, updates_per_step
from alignkit.train.ppo_models import PPOModels


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


def ppo_steps(cfg: RunConfig, n_prompts: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(n_prompts * cfg.train.epochs / cfg.ppo.rollout_batch_size))


class Rollouts:
    """Sampling, decoding and scoring of prompt batches with the run's settings."""

    def __init__(self, models: PPOModels, tokenizer, reward, cfg: RunConfig, stops: list[int]):
        self.models, self.tokenizer, self.reward, self.cfg = models, tokenizer, reward, cfg
        self.stops = stops
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    def sample(self, module, examples: list[PromptExample], greedy: bool = False):
        p = self.cfg.ppo
        return sample_responses(
            module,
            [e.prompt_ids for e in examples],
            pad_id=self.pad,
            stops=self.stops,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            greedy=greedy,
        )

    def scored(self, module, examples: list[PromptExample]):
        rollout = self.sample(module, examples)
        texts = decode_responses(self.tokenizer, rollout)
        return rollout, texts, self.reward(examples, texts)

    @torch.no_grad()
    def evaluate_role(self, role: str, examples: list[PromptExample], seed: int) -> dict:
        """Mean score, length and EOS share of `role`'s responses, sampled with a fixed seed."""
        ctx = self.models.as_policy() if role == "policy" else self.models.as_reference()
        scores, lengths, ended = [], [], []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), ctx as module:
            torch.manual_seed(seed)
            for s in range(0, len(examples), self.cfg.ppo.rollout_batch_size):
                chunk = examples[s : s + self.cfg.ppo.rollout_batch_size]
                rollout, _, score = self.scored(module, chunk)
                scores.append(score)
                lengths.append(rollout.response_mask.sum(1).float().cpu())
                ended.append(rollout.ended.float().cpu())
        return {"scores": torch.cat(scores), "length": torch.cat(lengths), "eos": torch.cat(ended)}


def eval_metrics(policy: dict, reference: dict) -> dict[str, float]:
    """Policy vs reference on the same prompts: mean scores, gain, win rate (ties count half)."""
    p, r = policy["scores"], reference["scores"]
    wins = (p > r).float() + 0.5 * (p == r).float()
    return {
        "eval/score": p.mean().item(),
        "eval/ref_score": r.mean().item(),
        "eval/score_gain": (p - r).mean().item(),
        "eval/win_rate": wins.mean().item(),
        "eval/response_length": policy["length"].mean().item(),
        "eval/eos_fraction": policy["eos"].mean().item(),
    }


def _health(cfg: RunConfig, steps: int, run_dir: Path):
    """The run-health monitor, with the PPO section's settings (kl_target) and log_every."""
    from alignkit.monitor.health import HealthMonitor, settings_from_config

    return HealthMonitor("ppo", steps, run_dir=run_dir, settings=settings_from_config(cfg))


def _mb(n: int) -> float:
    return round(n / 2**20, 2)


def describe_layout(models: PPOModels) -> tuple[str, dict[str, float]]:
    sizes = {k: _mb(v) for k, v in models.component_bytes().items()}
    text = ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
    how = (
        "policy and value are LoRA adapters on one frozen base; the reference is that base "
        "with adapters disabled (no copy)"
        if models.shared
        else "separate policy, frozen reference and value models (full fine-tuning)"
    )
    return f"[alignkit] ppo layout {models.layout}: {how}; parameters: {text}", sizes


def run_ppo(cfg: RunConfig, *, log=print) -> dict:
    """Train with PPO end to end; returns the summary also written to summary.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignkit.data.prompts import load_prompt_data
    from alignkit.models import load_tokenizer
    from alignkit.rollout.generate import stop_token_ids
    from alignkit.train.ppo_models import build_ppo_models
    from alignkit.train.ppo_reward import make_reward
    from alignkit.train.run import mixed_precision, prepare_run_dir, sigterm_as_interrupt

    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision(cfg.train.mixed_precision),
    )
    if acc.num_processes > 1:
        raise ConfigError(
            "ppo runs in one process", hint="launch it without accelerate/torchrun workers"
        )
    set_seed(cfg.train.seed)
    sigterm_as_interrupt()
    run_dir = prepare_run_dir(cfg, True)
    tokenizer = load_tokenizer(cfg.model)
    data = load_prompt_data(cfg, tokenizer)
    reward = make_reward(cfg, tokenizer, acc.device)
    models = build_ppo_models(cfg, acc.device)
    models.train(False)  # no dropout: rollout and update log-probs must agree
    text, sizes = describe_layout(models)
    log(
        f"[alignkit] ppo on {cfg.model.name}: {len(data.train)} train / {len(data.eval)} eval "
        f"prompts ({data.format}); reward: {reward.describe}; device {acc.device}"
    )
    log(text)
    st = data.stats
    if st.dropped_too_long or st.truncated:
        log(
            f"[alignkit] prompts over the {cfg.data.max_length - cfg.ppo.max_new_tokens} tokens "
            f"left by data.max_length - ppo.max_new_tokens: {st.dropped_too_long} dropped, "
            f"{st.truncated} cut on the left (data.truncation={cfg.data.truncation})"
        )
    stops = stop_token_ids(tokenizer, models.policy)
    state = PPOState(cfg, models, tokenizer, reward, stops, acc, run_dir, log)
    state.layout_mb = sizes
    return state.run(data)


class PPOState:
    """The PPO run loop and what it keeps between steps."""

    def __init__(self, cfg, models, tokenizer, reward, stops, acc, run_dir, log):
        from alignkit.train.kl import make_kl_controller

        self.cfg, self.models, self.tokenizer, self.acc = cfg, models, tokenizer, acc
        self.run_dir, self.log = run_dir, log
        self.rollouts = Rollouts(models, tokenizer, reward, cfg, stops)
        self.kl = make_kl_controller(cfg.ppo)
        self.layout_mb: dict[str, float] = {}
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    def make_optim(self, steps: int) -> Optim:
        """Optimizer, schedule (over every update in `steps` PPO steps) and accelerator hooks."""
        from alignkit.train.loop import make_optimizer, make_scheduler

        trainable = self.models.trainable()
        optimizer = make_optimizer(trainable, self.cfg.train)
        scheduler = make_scheduler(
            optimizer, self.cfg.train, steps * updates_per_step(self.cfg.ppo)
        )
        optimizer = self.acc.prepare(optimizer)
        params = [p for p in trainable.parameters() if p.requires_grad]
        return Optim(
            optimizer,
            scheduler,
            self.acc.backward,
            lambda norm: self.acc.clip_grad_norm_(params, norm),
            self.acc.autocast,
        )

    def evaluate(self, prompts: list[PromptExample], ref: dict | None) -> tuple[dict, dict]:
        seed = self.cfg.train.seed + 1
        if ref is None:
            ref = self.rollouts.evaluate_role("reference", prompts, seed)
        pol = self.rollouts.evaluate_role("policy", prompts, seed)
        return eval_metrics(pol, ref), ref

    def step(self, examples: list[PromptExample], opt: Optim) -> dict[str, float]:
        pcfg, micro = self.cfg.ppo, self.cfg.train.batch_size
        t0 = time.perf_counter()
        with self.models.as_policy() as module:
            rollout, _, scores = self.rollouts.scored(module, examples)
        t1 = time.perf_counter()
        kl_coef = self.kl.value
        with self.acc.autocast():
            exp, metrics = make_experience(self.models, rollout, scores, pcfg, kl_coef, micro)
        metrics.update(
            ppo_updates(
                self.models, exp, pcfg, micro, opt, self.cfg.train.max_grad_norm, self.generator
            )
        )
        t2 = time.perf_counter()
        self.kl.update(metrics["objective/kl"], len(examples))
        gen_tokens = int(rollout.response_mask.sum().item())
        train_tokens = int(exp.batch.attention_mask.sum().item()) * pcfg.ppo_epochs
        metrics.update(
            {
                "learning_rate": opt.scheduler.get_last_lr()[0],
                "rollout/tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
                "tokens_per_s": train_tokens / max(t2 - t1, 1e-9),
                "tokens": train_tokens,
            }
        )
        return metrics

    def run(self, data) -> dict:
        from alignkit.monitor.loggers import make_loggers
        from alignkit.monitor.progress import Progress
        from alignkit.train.checkpoint import TrainerState
        from alignkit.train.loop import FitResult

        cfg = self.cfg
        steps = ppo_steps(cfg, len(data.train))
        opt = self.make_optim(steps)
        stream = PromptStream(len(data.train), cfg.ppo.rollout_batch_size, cfg.train.seed)
        eval_prompts = data.eval[: cfg.ppo.eval_prompts]
        fit = FitResult(TrainerState(), {})
        before = _samples(self.models, self.tokenizer, cfg)  # the starting policy, even on resume
        ref = self.resume_if_asked(opt, stream, fit, steps)
        logger = make_loggers(cfg.train.loggers, self.run_dir, cfg.model_dump(mode="json"))
        health = self._monitor(steps, fit.state.step)
        t_start = time.perf_counter() - fit.state.elapsed_s
        try:
            if eval_prompts and fit.state.step == 0:
                fit.eval_before, ref = self.evaluate(eval_prompts, ref)
                logger.log(0, fit.eval_before)
            progress = Progress(steps, enabled=cfg.train.progress)
            progress.start(fit.state.step)
            for step in range(fit.state.step + 1, steps + 1):
                metrics = self.step([data.train[i] for i in stream.next()], opt)
                fit.state.step = step
                fit.state.tokens_seen += metrics.pop("tokens")
                fit.state.elapsed_s = time.perf_counter() - t_start
                due = cfg.train.eval_every and step % cfg.train.eval_every == 0
                if eval_prompts and due and step < steps:
                    metrics.update(self.evaluate(eval_prompts, ref)[0])
                if step % cfg.train.log_every == 0 or step == steps:
                    logger.log(step, metrics)
                    self._observe(health, step, metrics)
                fit.last_metrics = metrics
                progress.update(step, metrics)
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < steps:
                    self.save(opt, stream, fit, ref)
            progress.stop()
            if eval_prompts:
                fit.eval_after, _ = self.evaluate(eval_prompts, ref)
                logger.log(steps, fit.eval_after)
        except KeyboardInterrupt:
            raise self._interrupted(fit.state.step, steps) from None
        finally:
            logger.close()
        fit.wall_s = time.perf_counter() - t_start
        return self._finish(fit, data, before, health)

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_extra(self, stream: PromptStream, fit, ref: dict | None) -> dict:
        """PPO's state beyond the shared checkpoint's (weights, optimizer, schedule, RNG)."""
        return {
            "kl": self.kl.state_dict(),
            "prompt_position": stream.pos,
            "generator": self.generator.get_state(),
            "eval_before": dict(fit.eval_before),
            "eval_ref": ref,  # {"scores", "length", "eos"}: (N,) CPU tensors, or None
        }

    def save(self, opt: Optim, stream: PromptStream, fit, ref: dict | None) -> Path:
        from alignkit.train.checkpoint import prune_checkpoints, save_checkpoint

        ckpt = self.run_dir / "checkpoints" / f"step-{fit.state.step}"
        save_checkpoint(
            ckpt,
            self.models.trainable(),
            opt.optimizer,
            opt.scheduler,
            fit.state,
            rank=0,
            is_main=True,
            extra=self.checkpoint_extra(stream, fit, ref),
            scaler=self.acc.scaler,
        )
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return ckpt

    def resume_if_asked(self, opt: Optim, stream: PromptStream, fit, steps: int) -> dict | None:
        """Restore the latest complete checkpoint when `train.resume=auto` finds one, in place;
        returns the stored reference evaluation (None when there is none)."""
        from alignkit.train.checkpoint import checkpoint_dirs, load_checkpoint, load_extra

        found = checkpoint_dirs(self.run_dir)
        if self.cfg.train.resume != "auto" or not found:
            return None
        ckpt = found[-1]
        extra = load_extra(ckpt)
        if "generator" not in extra:
            raise AlignkitError(
                f"checkpoint {ckpt} was not written by a ppo run",
                hint="resume it with the method that wrote it, or use a new output_dir",
            )
        trainable = self.models.trainable()
        fit.state = load_checkpoint(
            ckpt, trainable, opt.optimizer, opt.scheduler, rank=0, scaler=self.acc.scaler
        )
        self.kl.load_state_dict(extra["kl"])
        stream.pos = int(extra["prompt_position"])
        self.generator.set_state(extra["generator"])
        fit.eval_before = dict(extra["eval_before"])
        self.log(f"[alignkit] resuming ppo from {ckpt}, step {fit.state.step}/{steps}")
        return extra["eval_ref"]

    def _interrupted(self, step: int, steps: int) -> AlignkitError:
        """A PPO step stops mid-update, so Ctrl-C saves nothing: resume from the last checkpoint."""
        from alignkit.train.checkpoint import checkpoint_dirs
        from alignkit.train.loop import Interrupted

        found = checkpoint_dirs(self.run_dir)
        if not found:
            return Interrupted(
                f"interrupted after step {step}/{steps}, with no checkpoint to resume from",
                hint="set train.save_every to checkpoint a PPO run as it goes",
            )
        return Interrupted(
            f"interrupted after step {step}/{steps}; the last checkpoint is {found[-1]}",
            hint="run the same command with train.resume=auto to continue from it",
        )

    def _monitor(self, steps: int, resumed_at: int):
        """The health monitor, with the rows logged up to a resumed checkpoint replayed (step 0
        holds the evaluation before training, which the monitor does not watch in PPO)."""
        health = _health(self.cfg, steps, self.run_dir)
        if resumed_at:
            from alignkit.monitor.health import read_metrics

            rows = read_metrics(self.run_dir / "metrics.jsonl", upto=resumed_at)
            health.replay(r for r in rows if r.get("step", 0) > 0)
        return health

    def _observe(self, health, step: int, metrics: dict[str, float]) -> None:
        from alignkit.monitor.health import format_finding

        for finding in health.observe(step, metrics):
            self.log("[alignkit] " + format_finding(finding))

    def _finish(self, fit, data, before, health) -> dict:
        from alignkit.models import count_parameters
        from alignkit.monitor.health import format_summary
        from alignkit.train.run import peak_memory_mb, summarize

        cfg = self.cfg
        self.models.save(self.tokenizer, self.run_dir / "final")
        after = _samples(self.models, self.tokenizer, cfg)
        info = {
            "format": data.format,
            **{k: v for k, v in vars(data.stats).items()},
            "eval_prompts": len(data.eval[: cfg.ppo.eval_prompts]),
            "layout": self.models.layout,
        }
        setup = SimpleNamespace(info=info)
        params = count_parameters(self.models.trainable())
        summary = summarize(cfg, fit, setup, before, after, params)
        memory = {"layout": self.models.layout, "param_mb": self.layout_mb, **peak_memory_mb()}
        summary["memory"] = memory
        summary["kl_coef_final"] = self.kl.value
        summary["health"] = health.summary()
        self.log(format_summary(summary["health"]))
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in peak_memory_mb().items())
        self.log(f"[alignkit] ppo memory ({self.models.layout}): {peaks}")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), "utf-8")
        return summary


def _samples(models: PPOModels, tokenizer, cfg: RunConfig) -> list[Any]:
    from alignkit.train.run import sample_generations

    with models.as_policy() as module:
        return sample_generations(module, tokenizer, cfg)
