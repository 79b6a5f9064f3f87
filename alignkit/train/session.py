"""One run session, shared by the offline loop and the rollout loop.

Everything about a run that is not how a step trains: the accelerator (mixed precision), seeding,
SIGTERM handled as Ctrl-C, the run directory (one run per directory; on resume the metric rows
past the checkpoint are trimmed so they are not doubled; a finished run is left as it is),
loggers, progress output, the cadence of evaluation, logging and checkpoints, the run-health
monitor (replayed on resume), the interrupt message, samples before and after, and
`summary.json`. Both loops write the same files through it.

`metrics.jsonl` holds one row per step, in step order: step 0 is the evaluation before training
(when there is an eval set), and an evaluation during or after training shares the row of the
step it follows.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from alignkit.config import RunConfig
from alignkit.errors import AlignkitError, ConfigError
from alignkit.monitor.health import (
    HealthMonitor,
    format_finding,
    format_summary,
    read_metrics,
    settings_from_config,
)
from alignkit.monitor.progress import Phases
from alignkit.train.checkpoint import checkpoint_dirs

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def mixed_precision(requested: str) -> str:
    """'auto' means bf16 where the GPU has it, fp16 on older GPUs, none on CPU."""
    if requested == "fp16" and not torch.cuda.is_available():
        raise AlignkitError(
            "train.mixed_precision=fp16 needs a CUDA device", hint="use bf16 or no on CPU"
        )
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM (schedulers, `kill`) like Ctrl-C: save a checkpoint, then stop."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass


def prepare_run_dir(cfg: RunConfig, is_main: bool) -> Path:
    """Create the run directory; refuse to mix two runs in one directory."""
    run_dir = Path(cfg.output_dir)
    ckpts = checkpoint_dirs(run_dir)
    metrics = run_dir / METRICS_FILE
    if cfg.train.resume == "never" and (ckpts or metrics.exists()):
        raise AlignkitError(
            f"output_dir '{run_dir}' already holds a run",
            hint="continue it with train.resume=auto, or pick another output_dir",
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        if metrics.exists():
            trim_metrics(metrics, ckpts[-1] if ckpts else None)
    return run_dir


def trim_metrics(path: Path, ckpt: Path | None) -> None:
    """Keep the metric rows up to the checkpoint we resume from, one per step in step order,
    so the resumed run's rows follow them without doubling a step. Rows sharing a step (an
    evaluation logged apart from its step's training row, as older runs did) are merged."""
    last = int(ckpt.name.split("-")[1]) if ckpt else -1
    rows: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = row.get("step", 0)
        if step <= last:
            rows.setdefault(step, {}).update(row)
    path.write_text("".join(json.dumps(rows[s]) + "\n" for s in sorted(rows)), encoding="utf-8")


def finished_summary(cfg: RunConfig) -> dict | None:
    """The summary of the run already finished in `output_dir`, when `train.resume=auto` finds
    one there: it is returned as it is, and nothing in the directory changes."""
    path = Path(cfg.output_dir) / SUMMARY_FILE
    if cfg.train.resume != "auto" or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def finished_note(run_dir: Path, summary: dict) -> str:
    """What to tell the user who resumes a finished run: nothing was done, and how to train
    further (a new run starting from this one's result, in a new directory)."""
    final = run_dir / "final"
    head = (
        f"[alignkit] {run_dir} holds a finished {summary.get('method', '')} run of "
        f"{summary.get('steps', '?')} steps ({run_dir / SUMMARY_FILE}): train.resume=auto has "
        "nothing to resume, and nothing was changed."
    )
    if (final / "adapter_config.json").is_file():  # LoRA: merge before training on
        merged = f"{run_dir}-merged"
        how = (
            f"merge its adapter (alignkit export {run_dir} --out {merged}), then train with "
            f"model.name={merged} and a new output_dir"
        )
    else:
        how = f"train with model.name={final} and a new output_dir"
    return f"{head} To train further, {how}."


def logged_eval_before(run_dir: Path) -> dict[str, float]:
    """The evaluation before training as metrics.jsonl holds it (step 0), for a resumed run's
    summary: the resumed run does not evaluate the starting model again."""
    rows = read_metrics(run_dir / METRICS_FILE, upto=0)
    return {k: v for row in rows for k, v in row.items() if k.startswith("eval/")}


class RunStart(NamedTuple):
    accelerator: Any  # accelerate.Accelerator
    run_dir: Path


def start_run(cfg: RunConfig, *, one_process: bool = False) -> RunStart:
    """Accelerator, seed, SIGTERM handler and run directory, in the order every run uses."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision(cfg.train.mixed_precision),
    )
    if one_process and acc.num_processes > 1:
        raise ConfigError(
            f"{cfg.method} runs in one process",
            hint="launch it without accelerate/torchrun workers",
        )
    set_seed(cfg.train.seed)
    sigterm_as_interrupt()
    return RunStart(acc, prepare_run_dir(cfg, acc.is_main_process))


def open_loggers(cfg: RunConfig, run_dir: Path):
    """metrics.jsonl plus the loggers `train.loggers` names (main process only)."""
    from alignkit.monitor.loggers import make_loggers

    return make_loggers(cfg.train.loggers, run_dir, cfg.model_dump(mode="json"))


def make_health(cfg: RunConfig, steps: int, run_dir: Path) -> HealthMonitor:
    """The run-health monitor for the method, with its section's settings (e.g. kl_target)."""
    return HealthMonitor(cfg.method, steps, run_dir=run_dir, settings=settings_from_config(cfg))


class Cadence:
    """When a step evaluates, logs and checkpoints, and what sees each logged row: the loggers
    and the run-health monitor, whose findings wait until the loop shows them.

    `watch_evals`: whether the monitor also reads the row holding only the evaluation before
    training (step 0; the evaluation after training shares the last step's row). The offline
    loop's rules read eval metrics; the rollout loop's do not, so its replay on resume skips
    step 0 as well.
    """

    def __init__(self, tcfg, steps: int, *, logger=None, health=None, watch_evals: bool = True):
        self.tcfg, self.steps = tcfg, steps
        self.logger, self.health, self.watch_evals = logger, health, watch_evals
        self.findings: list = []  # found since the loop last showed them

    def _every(self, every: int | None, step: int) -> bool:
        return bool(every) and step % every == 0

    def eval_due(self, step: int) -> bool:
        """Evaluate mid-run; the evaluation after training covers the last step."""
        return self._every(self.tcfg.eval_every, step) and step < self.steps

    def save_due(self, step: int) -> bool:
        """Checkpoint mid-run; the last step is written as `final/` instead."""
        return self._every(self.tcfg.save_every, step) and step < self.steps

    def log_due(self, step: int) -> bool:
        return step % self.tcfg.log_every == 0 or step == self.steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """A training row (with any mid-run evaluation merged in)."""
        if self.logger is not None:
            self.logger.log(step, metrics)
        if self.health is not None:
            self.findings += self.health.observe(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """The row holding only the evaluation before training (step 0)."""
        if self.watch_evals:
            self.log(step, metrics)
        elif self.logger is not None:
            self.logger.log(step, metrics)

    def resume_health(self, run_dir: Path, upto: int) -> None:
        """Rebuild the health state from the rows logged up to the resumed checkpoint, so a
        finding is neither lost nor reported twice."""
        if self.health is None:
            return
        rows = read_metrics(run_dir / METRICS_FILE, upto=upto)
        if not self.watch_evals:
            rows = [r for r in rows if r.get("step", 0) > 0]
        self.health.replay(rows)
        self.findings.clear()

    def take_findings(self) -> list[str]:
        """The findings not shown yet, formatted; they count as shown once taken."""
        out = [format_finding(f) for f in self.findings]
        self.findings.clear()
        return out

    def health_summary(self) -> dict[str, Any]:
        return self.health.summary() if self.health is not None else {}


def make_phases(tcfg, is_main: bool, stream=None) -> Phases:
    """The run's progress output: on the main process only, silent with train.progress=false;
    `stream` defaults to stderr."""
    return Phases(enabled=is_main and tcfg.progress, stream=stream)


class InterruptNote(NamedTuple):
    message: str
    hint: str


def interrupt_note(
    run_dir: Path, method: str, step: int, steps: int, saved: Path | None
) -> InterruptNote:
    """What to tell the user when Ctrl-C or SIGTERM stops a run.

    `saved` is the checkpoint written on the way out; a loop whose step cannot stop halfway
    (the rollout loop) saves none and points at its last regular checkpoint, if any.
    """
    if saved is not None:
        return InterruptNote(
            f"interrupted at step {step}/{steps}; checkpoint saved to {saved}",
            "run the same command with train.resume=auto to continue",
        )
    found = checkpoint_dirs(run_dir)
    if not found:
        return InterruptNote(
            f"interrupted after step {step}/{steps}, with no checkpoint to resume from",
            f"set train.save_every to checkpoint a {method} run as it goes",
        )
    return InterruptNote(
        f"interrupted after step {step}/{steps}; the last checkpoint is {found[-1]}",
        "run the same command with train.resume=auto to continue from it",
    )


def peak_memory_mb() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


SAMPLE_BATCH = 8  # prompts generated together for the samples before and after


def sample_generations(
    model, tokenizer, tcfg, phases: Phases | None = None, label: str = "samples"
) -> list[Any]:
    """Greedy answers to `train.sample_prompts` (shown before and after training), a batch of
    prompts at a time so that the progress can count them."""
    from alignkit.rollout.generate import generate_chat

    prompts = list(tcfg.sample_prompts)
    if not prompts:
        return []
    phases = phases if phases is not None else Phases(enabled=False)
    out: list[Any] = []
    each = f"(up to {tcfg.sample_max_new_tokens} new tokens each)"
    with phases(label, len(prompts), "prompts", each) as p:
        for s in range(0, len(prompts), SAMPLE_BATCH):
            chunk = prompts[s : s + SAMPLE_BATCH]
            out += generate_chat(
                model,
                tokenizer,
                chunk,
                max_new_tokens=tcfg.sample_max_new_tokens,
                batch_size=SAMPLE_BATCH,
            )
            p.advance(len(chunk))
    return out


def summarize(cfg: RunConfig, fit, info: dict, samples_before, samples_after, params) -> dict:
    """The summary.json body shared by every method; `fit` is the loop's FitResult."""
    samples = [
        {
            "prompt": b.prompt,
            "before": b.text,
            "after": a.text,
            "ended_before": b.ended,
            "ended_after": a.ended,
        }
        for b, a in zip(samples_before, samples_after, strict=True)
    ]
    return {
        "method": cfg.method,
        "model": cfg.model.name,
        "steps": fit.state.step,
        "final": fit.last_metrics,
        "eval_before": fit.eval_before,
        "eval_after": fit.eval_after,
        "wall_time_s": fit.wall_s,
        "train_tokens": fit.state.tokens_seen,
        "tokens_per_s": fit.state.tokens_seen / max(fit.state.elapsed_s, 1e-9),
        **peak_memory_mb(),
        "trainable_params": params.trainable,
        "total_params": params.total,
        "data": info,
        "samples": samples,
    }


def write_summary(
    run_dir: Path, summary: dict, health: dict, log: Callable[[str], None], notes=()
) -> dict:
    """Add the health summary, show it and any closing `notes`, write summary.json."""
    if health:
        summary["health"] = health
        log(format_summary(health))
    for note in notes:
        log(note)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    sys.stdout.flush()
    return summary
