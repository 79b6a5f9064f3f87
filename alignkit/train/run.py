"""`alignkit train`: from a validated config to a finished run directory."""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from alignkit.config import RunConfig
from alignkit.errors import AlignkitError
from alignkit.methods import spec
from alignkit.train.checkpoint import checkpoint_dirs
from alignkit.train.loop import FitResult, Trainer
from alignkit.train.method import build_method


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


def prepare_run_dir(cfg: RunConfig, is_main: bool) -> Path:
    """Create the run directory; refuse to mix two runs in one directory."""
    run_dir = Path(cfg.output_dir)
    ckpts = checkpoint_dirs(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if cfg.train.resume == "never" and (ckpts or metrics.exists()):
        raise AlignkitError(
            f"output_dir '{run_dir}' already holds a run",
            hint="continue it with train.resume=auto, or pick another output_dir",
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        if metrics.exists():
            _trim_metrics(metrics, ckpts[-1] if ckpts else None)
    return run_dir


def _trim_metrics(path: Path, ckpt: Path | None) -> None:
    """Drop metric rows logged after the checkpoint we resume from, so they are not doubled."""
    last = int(ckpt.name.split("-")[1]) if ckpt else -1
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last
    ]
    path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")


def peak_memory_mb() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def sample_generations(model, tokenizer, cfg: RunConfig) -> list[Any]:
    """Greedy answers to `train.sample_prompts` (shown before and after training)."""
    from alignkit.rollout.generate import generate_chat

    if not cfg.train.sample_prompts:
        return []
    return generate_chat(
        model, tokenizer, cfg.train.sample_prompts, max_new_tokens=cfg.train.sample_max_new_tokens
    )


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM (schedulers, `kill`) like Ctrl-C: save a checkpoint, then stop."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass


def summarize(cfg, fit: FitResult, setup, samples_before, samples_after, params) -> dict:
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
        "data": setup.info,
        "samples": samples,
    }


def run_training(cfg: RunConfig, *, log=print) -> dict:
    """Train one method end to end; returns the summary also written to summary.json."""
    if cfg.method == "ppo":  # rollouts and several updates per batch: PPO runs its own loop
        from alignkit.train.ppo_run import run_ppo

        return run_ppo(cfg, log=log)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignkit.models import count_parameters, load_model, load_tokenizer, save_final
    from alignkit.monitor.loggers import make_loggers

    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision(cfg.train.mixed_precision),
    )
    set_seed(cfg.train.seed)
    sigterm_as_interrupt()
    run_dir = prepare_run_dir(cfg, acc.is_main_process)
    tokenizer = load_tokenizer(cfg.model)
    setup = build_method(cfg, tokenizer)
    model = load_model(
        cfg.model,
        cfg.lora,
        device=acc.device,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        head=spec(cfg.method).head,
    )
    params = count_parameters(model)
    if acc.is_main_process:
        log(
            f"[alignkit] {cfg.method} on {cfg.model.name}: {len(setup.train)} train / "
            f"{len(setup.eval)} eval examples; {params.trainable:,} of {params.total:,} "
            f"parameters trainable; device {acc.device}, {acc.num_processes} process(es)"
        )
        if setup.prompt_groups is not None:
            log(
                "[alignkit] batches hold whole prompts: the examples sharing one are drawn "
                "together (train.group_by_prompt=false to order the examples one by one)"
            )
    before = sample_generations(model, tokenizer, cfg) if acc.is_main_process else []
    logger = (
        make_loggers(cfg.train.loggers, run_dir, cfg.model_dump(mode="json"))
        if acc.is_main_process
        else None
    )
    wrapped = setup.wrap(model)
    if spec(cfg.method).reference == "required":
        from alignkit.train.reference import attach_reference

        setup.info["reference"] = attach_reference(
            cfg, setup, model, wrapped, acc, log if acc.is_main_process else (lambda m: None)
        )
    trainer = Trainer(
        cfg,
        wrapped,
        setup.method,
        setup.train,
        setup.eval,
        setup.lengths,
        acc,
        run_dir,
        logger=logger,
        prompt_groups=setup.prompt_groups,
    )
    try:
        fit = trainer.fit()
    finally:
        if logger is not None:
            logger.close()
    acc.wait_for_everyone()
    summary: dict = {}
    if acc.is_main_process:
        save_final(model, tokenizer, run_dir / "final")
        after = sample_generations(model, tokenizer, cfg)
        summary = summarize(cfg, fit, setup, before, after, params)
        if setup.after_training is not None:
            summary.update(setup.after_training(model, run_dir / "final"))
        if fit.health:
            from alignkit.monitor.health import format_summary

            summary["health"] = fit.health
            log(format_summary(fit.health))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        sys.stdout.flush()
    acc.wait_for_everyone()
    return summary
