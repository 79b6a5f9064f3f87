"""The one training loop every method shares.

A method supplies how to collate its examples, how many normalisation units (tokens, pairs) a
micro-batch holds, and a step function returning summed losses; the loop owns everything else:
optimizer and schedule, accumulation with the loss normalised over the whole accumulated batch
and across processes, clipping, mixed precision and DDP through `accelerate`, evaluation,
checkpoints and resume, logging and progress.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.config import RunConfig
from alignkit.errors import AlignkitError
from alignkit.monitor.progress import Phases
from alignkit.train.checkpoint import (
    TrainerState,
    checkpoint_dirs,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from alignkit.train.method import Method, StepOutput, to_device
from alignkit.train.session import (
    Cadence,
    interrupt_note,
    logged_eval_before,
    make_health,
    make_phases,
)
from alignkit.train.stream import MicroBatchStream, total_steps


class Interrupted(AlignkitError):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint."""


@dataclass
class FitResult:
    state: TrainerState
    last_metrics: dict[str, float]
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)  # HealthMonitor.summary()


# Metric-name suffix -> (reduction, its value over no examples). An extreme such as the lowest
# reward of a step cannot be averaged; every metric without one of these suffixes is a mean.
EXTREMES = {"/min": (torch.amin, float("inf")), "/max": (torch.amax, float("-inf"))}


def _extreme(name: str):
    return next((how for suffix, how in EXTREMES.items() if name.endswith(suffix)), None)


class MetricSums:
    """Running sums of per-example metrics and of the loss, reduced across processes at once.

    Each metric is kept as (sum, count), or (extreme, count) for the EXTREMES suffixes.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.tensors: dict[str, Tensor] = {}

    def add(self, out: StepOutput) -> None:
        for name, values in out.metrics.items():
            v = values.detach().float()
            # NaN marks "no value for this example" (e.g. KTO's chosen reward of an
            # undesirable example): excluded from both the sum and the count.
            has = ~torch.isnan(v)
            how = _extreme(name)
            if how is None:
                pair = torch.stack([v[has].sum(), has.sum().float()])
            else:  # the empty value keeps a batch without values neutral
                kept = torch.cat([v[has], v.new_full((1,), how[1])])
                pair = torch.stack([how[0](kept), has.sum().float()])
            prev = self.tensors.get(name)
            if prev is not None and how is not None:
                pair = torch.stack([how[0](torch.stack([prev[0], pair[0]])), prev[1] + pair[1]])
            elif prev is not None:
                pair = prev + pair
            self.tensors[name] = pair

    def reduce(self, accelerator, method=None) -> dict[str, float]:
        out = {}
        for name, pair in self.tensors.items():
            how = _extreme(name)
            if how is None:
                total = accelerator.reduce(pair, reduction="sum")
                if total[1] > 0:
                    out[name] = (total[0] / total[1]).item()
                continue
            rows = accelerator.gather(pair[None])  # (world, 2): each process's extreme, count
            if rows[:, 1].sum() > 0:
                out[name] = how[0](rows[:, 0]).item()
        return method.finalize_metrics(out) if method is not None else out


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AlignkitError(
            "the model has no trainable parameters",
            hint="enable lora or full fine-tuning (lora.enabled=false)",
        )
    # AdamW with decay only on matrices: biases and norms are not decayed (common practice).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def make_scheduler(optimizer, cfg, steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * steps))
    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps
    )


class Trainer:
    """Runs one method over its data with the shared machinery."""

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        method: Method,
        train_set: list[Any],
        eval_set: list[Any],
        lengths: list[int],
        accelerator,
        run_dir: Path,
        logger=None,
        on_eval: Callable[[str, dict[str, float]], None] | None = None,
        prompt_groups: list[int] | None = None,
    ):
        self.cfg, self.tcfg = cfg, cfg.train
        self.model, self.method, self.acc = model, method, accelerator
        self.train_set, self.eval_set = train_set, eval_set
        self.run_dir, self.logger, self.on_eval = run_dir, logger, on_eval
        self.stream = MicroBatchStream(
            lengths,
            self.tcfg.batch_size,
            accelerator.num_processes,
            self.tcfg.seed,
            self.tcfg.group_by_length,
            prompt_groups,
        )
        if self.stream.per_epoch == 0:
            raise AlignkitError(
                f"{len(train_set)} training examples are fewer than the {accelerator.num_processes}"
                " processes",
                hint="add data or run fewer processes",
            )
        self.steps = total_steps(
            self.stream.per_epoch, self.tcfg.epochs, self.tcfg.grad_accum, self.tcfg.max_steps
        )
        self.total_micro = (
            self.steps * self.tcfg.grad_accum
            if self.tcfg.max_steps
            else max(1, int(self.stream.per_epoch * self.tcfg.epochs))
        )
        self.optimizer = make_optimizer(model, self.tcfg)
        self.scheduler = make_scheduler(self.optimizer, self.tcfg, self.steps)
        self.prepared, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.state = TrainerState()
        # Run-health rules on every logged row; the main process owns the run directory.
        self.health = make_health(cfg, self.steps, run_dir) if accelerator.is_main_process else None
        self.cadence = Cadence(self.tcfg, self.steps, health=self.health)

    # -- pieces -------------------------------------------------------------------------------
    def _batch(self, micro_index: int) -> dict[str, Tensor]:
        idx = self.stream.indices(micro_index, self.acc.process_index)
        batch = self.method.collate([self.train_set[i] for i in idx])
        return to_device(batch, self.acc.device)

    def _unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.prepared)

    def resume_if_asked(self) -> bool:
        found = checkpoint_dirs(self.run_dir)
        if self.tcfg.resume != "auto" or not found:
            return False
        self.state = load_checkpoint(
            found[-1],
            self._unwrapped(),
            self.optimizer,
            self.scheduler,
            rank=self.acc.process_index,
            scaler=self.acc.scaler,
        )
        self.acc.print(f"[alignkit] resumed from {found[-1]} (step {self.state.step}/{self.steps})")
        return True

    def save(self) -> Path:
        ckpt = self.run_dir / "checkpoints" / f"step-{self.state.step}"
        self.acc.wait_for_everyone()
        save_checkpoint(
            ckpt,
            self._unwrapped(),
            self.optimizer,
            self.scheduler,
            self.state,
            rank=self.acc.process_index,
            is_main=self.acc.is_main_process,
            scaler=self.acc.scaler,
        )
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            prune_checkpoints(self.run_dir, self.tcfg.keep_checkpoints)
        return ckpt

    @torch.no_grad()
    def evaluate(self, phases: Phases | None = None, label: str = "eval") -> dict[str, float]:
        """Loss and metrics over the held-out set, sharded across processes; `phases` shows
        its progress (this process's batches) under `label`."""
        if not self.eval_set:
            return {}
        self.prepared.eval()
        sums, loss_sum, units = MetricSums(), torch.zeros((), device=self.acc.device), 0.0
        bs, world, rank = self.tcfg.batch_size, self.acc.num_processes, self.acc.process_index
        mine = self.eval_set[rank::world]
        starts = range(0, len(mine), bs)
        phases = phases if phases is not None else Phases(enabled=False)
        with phases(label, len(starts), "batches", f"of {bs}") as progress:
            for s in starts:
                batch = self.method.collate(mine[s : s + bs])
                batch = to_device(batch, self.acc.device)
                out = self.method.step(self.prepared, batch)
                loss_sum += out.loss_sum.detach().float()
                units += self.method.units(batch)
                sums.add(out)
                progress.advance()
        self.prepared.train()
        total = self.acc.reduce(
            torch.stack([loss_sum, torch.tensor(units, device=loss_sum.device)]), reduction="sum"
        )
        metrics = {
            "loss": (total[0] / total[1].clamp(min=1)).item(),
            **sums.reduce(self.acc, self.method),
        }
        return {f"eval/{k}": v for k, v in metrics.items()}

    def accumulate(self, first: int, last: int) -> tuple[Tensor, Tensor, int, MetricSums]:
        """Forward and backward micro-batches [first, last) of the stream, leaving the summed
        gradients in place; returns (loss sum, global units, tokens, metric sums)."""
        batches = [self._batch(i) for i in range(first, last)]
        local_units = sum(self.method.units(b) for b in batches)
        units = self.acc.reduce(
            torch.tensor(float(local_units), device=self.acc.device), reduction="sum"
        ).clamp(min=1)
        # DDP averages gradients over processes; scaling by the world size turns that average
        # into the sum, so the loss is normalised by the units of the whole global batch.
        scale = self.acc.num_processes / units
        sums, loss_sum, tokens = MetricSums(), torch.zeros((), device=self.acc.device), 0
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.prepared)
            with ctx:
                out = self.method.step(self.prepared, batch)
                self.acc.backward(out.loss_sum * scale)
            loss_sum += out.loss_sum.detach().float()
            tokens += out.tokens
            sums.add(out)
        return loss_sum, units, tokens, sums

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches."""
        first = self.state.step * self.tcfg.grad_accum
        last = min(first + self.tcfg.grad_accum, self.total_micro)
        loss_sum, units, tokens, sums = self.accumulate(first, last)
        max_norm = self.tcfg.max_grad_norm or float("inf")
        grad_norm = self.acc.clip_grad_norm_(self.prepared.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = self.acc.reduce(
            torch.stack([loss_sum, torch.tensor(float(tokens), device=loss_sum.device)]),
            reduction="sum",
        )
        self.state.step += 1
        self.state.micro_index = last
        self.state.tokens_seen += int(totals[1].item())
        return {
            "loss": (totals[0] / units).item(),
            "grad_norm": float(grad_norm),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "epoch": self.stream.epoch_of(last),
            "tokens": int(totals[1].item()),
            **sums.reduce(self.acc, self.method),
        }

    # -- the run --------------------------------------------------------------------------------
    def fit(self, phases: Phases | None = None) -> FitResult:
        """Train to the last step (from the checkpoint `train.resume=auto` finds), with the
        evaluations before, during and after; `phases` shows the progress of each (by default
        on stderr, as `train.progress` says)."""
        cadence = self.cadence
        if phases is None:
            phases = make_phases(self.tcfg, self.acc.is_main_process)
        # Read at fit time: the caller may attach or swap the logger after construction.
        cadence.logger = self.logger if self.acc.is_main_process else None
        result = FitResult(self.state, {})
        if self.resume_if_asked():
            cadence.resume_health(self.run_dir, upto=self.state.step)
            result = FitResult(self.state, {}, eval_before=logged_eval_before(self.run_dir))
        if self.state.step == 0 and self.eval_set:
            result.eval_before = self.evaluate(phases, "eval before training")
            self._log(0, result.eval_before)
        progress = phases("train", self.steps, "steps", lines=20)
        progress.start(self.state.step)
        self.prepared.train()
        t_start = time.perf_counter() - self.state.elapsed_s
        try:
            while self.state.step < self.steps:
                result.last_metrics = self._run_step(progress, phases, t_start)
        except KeyboardInterrupt:
            progress.stop()
            note = interrupt_note(
                self.run_dir, self.cfg.method, self.state.step, self.steps, saved=self.save()
            )
            raise Interrupted(note.message, hint=note.hint) from None
        progress.stop()
        self._finish_last_row(result, phases)
        self._show_findings(progress)
        result.wall_s = time.perf_counter() - t_start
        result.health = cadence.health_summary()
        return result

    def _finish_last_row(self, result: FitResult, phases: Phases) -> None:
        """Log the last step's row, with the evaluation after training merged in: one row per
        step keeps metrics.jsonl step-ordered with no step twice."""
        row = dict(result.last_metrics)  # empty when this fit ran no step
        if self.eval_set:
            result.eval_after = self.evaluate(phases, "eval after training")
            row.update(result.eval_after)
        if row:
            self._log(self.state.step, row)

    def _run_step(self, progress, phases: Phases, t_start: float) -> dict[str, float]:
        """One optimizer step with its evaluation, logging, progress and checkpoint as due."""
        t0 = time.perf_counter()
        metrics = self.train_step()
        dt = time.perf_counter() - t0
        metrics["tokens_per_s"] = metrics.pop("tokens") / max(dt, 1e-9)
        self.state.elapsed_s = time.perf_counter() - t_start
        step = self.state.step
        if self.cadence.eval_due(step):
            metrics.update(self.evaluate(phases, f"eval at step {step}"))
        # The last step's row waits for the evaluation after training (`_finish_last_row`).
        if step < self.steps and self.cadence.log_due(step):
            self._log(step, metrics)
        progress.update(step, metrics)
        self._show_findings(progress)
        if self.cadence.save_due(step):
            self.save()
        return metrics

    def _show_findings(self, progress) -> None:
        for text in self.cadence.take_findings():
            progress.note(text)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self.cadence.log(step, metrics)
        if self.on_eval is not None and any(k.startswith("eval/") for k in metrics):
            self.on_eval(f"step {step}", metrics)
