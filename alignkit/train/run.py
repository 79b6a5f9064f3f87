"""`alignkit train`: from a validated config to a finished run directory, through one of two loops.

The offline loop (:mod:`alignkit.train.loop`) trains on a fixed data set; the rollout loop
(:mod:`alignkit.train.rl.loop`) samples from the policy as it trains. Both run inside the same
run session (:mod:`alignkit.train.session`).
"""

from __future__ import annotations

from collections.abc import Callable

from alignkit.config import RunConfig
from alignkit.methods import resolve, spec
from alignkit.train.loop import Trainer
from alignkit.train.method import build_method
from alignkit.train.session import (
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


def run_offline(cfg: RunConfig, *, log=print) -> dict:
    """Train an offline method end to end; returns the summary also written to summary.json."""
    from alignkit.models import count_parameters, load_model, load_tokenizer, save_final

    acc, run_dir = start_run(cfg)
    is_main = acc.is_main_process
    say = log if is_main else (lambda m: None)
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
    before = sample_generations(model, tokenizer, cfg.train) if is_main else []
    logger = open_loggers(cfg, run_dir) if is_main else None
    wrapped = setup.wrap(model)
    if row.reference == "required":
        from alignkit.train.reference import attach_reference

        setup.info["reference"] = attach_reference(cfg, setup, model, wrapped, acc, say)
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
    if is_main:
        save_final(model, tokenizer, run_dir / "final")
        after = sample_generations(model, tokenizer, cfg.train)
        summary = summarize(cfg, fit, setup.info, before, after, params)
        if setup.after_training is not None:
            summary.update(setup.after_training(model, run_dir / "final"))
        write_summary(run_dir, summary, fit.health, log)
    acc.wait_for_everyone()
    return summary


def run_rollout(cfg: RunConfig, *, log=print) -> dict:
    """Train an online method with the rollout loop; its table row's builder makes the
    algorithm (PPO: `alignkit.train.rl.ppo:build_ppo`)."""
    from alignkit.train.rl.loop import run_rollout as rollout_loop

    return rollout_loop(cfg, resolve(spec(cfg.method).builder), log=log)


# The loop of each method-table runner.
LOOPS: dict[str, Callable[..., dict]] = {"offline": run_offline, "rollout": run_rollout}


def run_training(cfg: RunConfig, *, log=print) -> dict:
    """Train one method end to end; returns the summary also written to summary.json."""
    for line in describe_config(cfg):
        log(line)
    return LOOPS[spec(cfg.method).runner](cfg, log=log)
