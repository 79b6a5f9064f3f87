"""`alignkit train`: from a validated config to a finished run directory, through one of two loops.

The offline loop (:mod:`alignkit.train.loop`) trains on a fixed data set; the rollout loop
(:mod:`alignkit.train.rl.loop`) samples from the policy as it trains. Both run inside the same
run session (:mod:`alignkit.train.session`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alignkit.config import RunConfig
from alignkit.methods import resolve, spec
from alignkit.train.loop import Trainer
from alignkit.train.method import build_method
from alignkit.train.session import (
    finished_note,
    finished_summary,
    make_phases,
    open_loggers,
    sample_generations,
    start_run,
    summarize,
    write_summary,
)


def describe_config(cfg: RunConfig) -> list[str]:
    """What the run read into its config (a lora section, a default learning rate) and the
    settings far from the method's usual ones: said before anything loads."""
    return [f"[alignkit] {line}" for line in cfg.decisions] + [
        f"[alignkit] warning: {line}" for line in cfg.warnings
    ]


def describe_offline(cfg: RunConfig, setup, params, acc) -> list[str]:
    """The lines an offline run starts with: data, parameters, device, batch order."""
    lines = [
        f"[alignkit] {cfg.method} on {cfg.model.name}: {len(setup.train)} train / "
        f"{len(setup.eval)} eval examples; {params.trainable:,} of {params.total:,} "
        f"parameters trainable; device {acc.device}, {acc.num_processes} process(es)"
    ]
    if setup.prompt_groups is not None:
        lines.append(
            "[alignkit] batches hold whole prompts: the examples sharing one are drawn "
            "together (train.group_by_prompt=false to order the examples one by one)"
        )
    return lines


def run_offline(cfg: RunConfig, *, log=print, progress_stream=None) -> dict:
    """Train an offline method end to end; returns the summary also written to summary.json.
    Progress goes to `progress_stream` (stderr by default)."""
    from alignkit.models import count_parameters, load_model, load_tokenizer, save_final

    acc, run_dir = start_run(cfg)
    is_main = acc.is_main_process
    say = log if is_main else (lambda m: None)
    phases = make_phases(cfg.train, is_main, progress_stream)
    row = spec(cfg.method)
    tokenizer = load_tokenizer(cfg.model)
    setup = build_method(cfg, tokenizer)
    model = load_model(
        cfg.model,
        cfg.lora,
        device=acc.device,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        head=row.head,
    )
    params = count_parameters(model)
    for line in describe_offline(cfg, setup, params, acc):
        say(line)
    before = (
        sample_generations(model, tokenizer, cfg.train, phases, "samples before training")
        if is_main
        else []
    )
    logger = open_loggers(cfg, run_dir) if is_main else None
    wrapped = setup.wrap(model)
    if row.reference == "required":
        from alignkit.train.reference import attach_reference

        setup.info["reference"] = attach_reference(cfg, setup, model, wrapped, acc, say, phases)
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
        fit = trainer.fit(phases)
    finally:
        if logger is not None:
            logger.close()
    acc.wait_for_everyone()
    summary: dict = {}
    if is_main:
        save_final(model, tokenizer, run_dir / "final")
        after = sample_generations(model, tokenizer, cfg.train, phases, "samples after training")
        summary = summarize(cfg, fit, setup.info, before, after, params)
        if setup.after_training is not None:
            summary.update(setup.after_training(model, run_dir / "final"))
        write_summary(run_dir, summary, fit.health, log)
    acc.wait_for_everyone()
    return summary


def run_rollout(cfg: RunConfig, *, log=print, progress_stream=None) -> dict:
    """Train an online method with the rollout loop; its table row's builder makes the
    algorithm (PPO: `alignkit.train.rl.ppo:build_ppo`)."""
    from alignkit.train.rl.loop import run_rollout as rollout_loop

    builder = resolve(spec(cfg.method).builder)
    return rollout_loop(cfg, builder, log=log, progress_stream=progress_stream)


# The loop of each method-table runner.
LOOPS: dict[str, Callable[..., dict]] = {"offline": run_offline, "rollout": run_rollout}


def run_training(cfg: RunConfig, *, log=print, progress_stream=None) -> dict:
    """Train one method end to end; returns the summary also written to summary.json.

    With `train.resume=auto`, a run that already finished in `output_dir` is left as it is and
    its summary returned: resuming it would train its last steps again from the last checkpoint.
    Progress goes to `progress_stream` (stderr by default); `log` takes the run's messages.
    """
    done = finished_summary(cfg)
    if done is not None:
        log(finished_note(Path(cfg.output_dir), done))
        return done
    for line in describe_config(cfg):
        log(line)
    return LOOPS[spec(cfg.method).runner](cfg, log=log, progress_stream=progress_stream)
