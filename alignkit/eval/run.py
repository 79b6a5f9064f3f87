"""`alignkit eval`: which evaluation each data file calls for, run before (the reference) and
after (the model), and one report of it all.

Every data file is read and its task decided before any model is loaded, so a wrong file fails
in a second. Answers are generated greedily and at most once per model and prompt (GSM8K, win
rate and samples share them). The report is the JSON of DESIGN.md's eval contract: ``before`` is
the reference model, ``after`` the evaluated one, ``delta`` their difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.data.io import LocatedRecords, read_located
from alignkit.errors import AlignkitError, DataError
from alignkit.eval import tasks
from alignkit.eval.loading import EvalModels, Which, load_eval_models
from alignkit.eval.samples import (
    Prompt,
    prompt_key,
    prompt_title,
    prompts_from_rows,
    side_by_side,
    unique_prompts,
)

TASKS = ("auto", "preference", "gsm8k", "multiple_choice", "win_rate", "samples")
DEFAULT_BETA = 0.1
DEFAULT_SAMPLES = 5  # for --task samples without --samples


@dataclass
class EvalOptions:
    model: str
    data: list[str]
    reference: str | None = None
    task: str = "auto"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    beta: float | None = None  # None: the run's own beta, else DEFAULT_BETA
    samples: int = 0
    reward_models: list[str] = field(default_factory=list)
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    output: str | None = None
    device: str | None = None  # None: cuda when available

    @property
    def has_judge(self) -> bool:
        return bool(self.reward_models or self.judge_url)


@dataclass
class EvalReport:
    model: str
    reference: str | None
    results: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # where the JSON went

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "reference": self.reference,
            "results": self.results,
            "samples": self.samples,
        }


class EvalIncomplete(AlignkitError):
    """The judge became unreachable: the report holds what was evaluated up to then."""

    def __init__(self, cause: AlignkitError, report: EvalReport):
        super().__init__(cause.message, where=cause.where, hint=cause.hint)
        self.report = report


# --------------------------------------------------------------------------- options and data


def check_options(opts: EvalOptions) -> None:
    """Option combinations that cannot work, refused before anything is loaded."""
    if opts.task not in TASKS:
        raise AlignkitError(
            f"unknown task '{opts.task}'", hint=f"--task is one of {', '.join(TASKS)}"
        )
    if not opts.data:
        raise AlignkitError("no data file given", hint="pass --data FILE (repeatable)")
    for name, value, low in (("--batch-size", opts.batch_size, 1), ("--samples", opts.samples, 0)):
        if value < low:
            raise AlignkitError(f"{name} must be at least {low}, got {value}")
    if opts.limit is not None and opts.limit < 1:
        raise AlignkitError(f"--limit must be at least 1, got {opts.limit}")
    if opts.max_new_tokens < 1:
        raise AlignkitError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    if opts.beta is not None and opts.beta <= 0:
        raise AlignkitError(f"--beta must be positive, got {opts.beta}")
    if opts.reward_models and opts.judge_url:
        raise AlignkitError(
            "both --reward-model and --judge-url given", hint="choose one judge for win rate"
        )
    if opts.judge_url and not opts.judge_model:
        raise AlignkitError("--judge-url needs --judge-model (the model name the server serves)")
    if opts.task == "win_rate" and not opts.has_judge:
        raise AlignkitError(
            "--task win_rate needs a judge",
            hint="pass --reward-model PATH, or --judge-url URL --judge-model NAME",
        )


@dataclass
class DataFile:
    source: str
    rows: LocatedRecords
    task: str


def read_data(opts: EvalOptions) -> list[DataFile]:
    files = []
    for source in opts.data:
        rows = read_located(source, limit=opts.limit)
        task = tasks.detect_task(
            rows.records, source, forced=opts.task, has_judge=opts.has_judge, samples=opts.samples
        )
        files.append(DataFile(source, rows, task))
    return files


# --------------------------------------------------------------------------- context


class Answers:
    """Greedy answers per model and prompt, generated once and shared by every task."""

    def __init__(self, models: EvalModels, opts: EvalOptions, log: Callable[[str], None]):
        self.models, self.opts, self.log = models, opts, log
        self._cache: dict[Which, dict[str, str]] = {"model": {}, "reference": {}}

    def get(self, which: Which, prompts: list[Prompt]) -> list[str]:
        """One answer per prompt; a conversational prompt is answered with every turn in view."""
        from alignkit.rollout.generate import generate_chat

        cache = self._cache[which]
        todo = unique_prompts([p for p in prompts if prompt_key(p) not in cache])
        if todo:
            self.log(f"[alignkit] generating {len(todo)} answers with the {which}")
            with self.models.use(which) as module:
                gens = generate_chat(
                    module,
                    self.models.tokenizer,
                    todo,
                    max_new_tokens=self.opts.max_new_tokens,
                    batch_size=self.opts.batch_size,
                )
            cache.update({prompt_key(p): g.text for p, g in zip(todo, gens, strict=True)})
        return [cache[prompt_key(p)] for p in prompts]


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_judge(opts: EvalOptions, device: torch.device) -> Any:
    if opts.reward_models:
        from alignkit.eval.reward_judge import RewardModelJudge
        from alignkit.models.reward import load_reward_models

        scorer = load_reward_models(list(opts.reward_models), device=device)
        return RewardModelJudge(scorer, batch_size=opts.batch_size)
    if opts.judge_url:
        from alignkit.eval.judge import OpenAIJudge

        return OpenAIJudge(opts.judge_url, opts.judge_model, api_key_env=opts.judge_key_env)
    return None


def resolve_beta(opts: EvalOptions, models: EvalModels) -> float:
    if opts.beta is not None:
        return opts.beta
    if models.run is not None and models.run.beta is not None:
        return models.run.beta
    return DEFAULT_BETA


# --------------------------------------------------------------------------- run


def run_eval(
    opts: EvalOptions,
    *,
    log: Callable[[str], None] = print,
    judge: Any = None,
    models: EvalModels | None = None,
) -> EvalReport:
    """Evaluate; writes the JSON report (to opts.output and RUN_DIR/eval.json) and returns it.

    `judge` and `models` replace what the options would load (for library use and tests).
    A judge that becomes unreachable raises :class:`EvalIncomplete` once the partial report is
    written.
    """
    check_options(opts)
    files = read_data(opts)
    torch.manual_seed(0)  # greedy decoding is deterministic; this pins anything else
    if models is None:
        models = load_eval_models(opts.model, opts.reference, pick_device(opts.device))
    ref = f"{models.reference_name}" if models.has_reference else "none"
    log(f"[alignkit] eval of {opts.model}; reference: {ref}")
    if judge is None and any(f.task == "win_rate" for f in files):
        judge = make_judge(opts, models.device)
    ctx = tasks.TaskContext(
        models, Answers(models, opts, log), opts.batch_size, resolve_beta(opts, models), judge
    )
    report = EvalReport(opts.model, models.reference_name if models.has_reference else None)
    try:
        for f in files:
            if f.task == "samples":
                continue
            log(f"[alignkit] {f.task} on {f.source} ({len(f.rows)} rows)")
            report.results.append(tasks.RUNNERS[f.task](ctx, f.source, f.rows))
    except tasks.PartialResult as stop:
        report.results.append(stop.result)
        report.written = write_report(report, opts, models)
        raise EvalIncomplete(stop.cause, report) from stop.cause
    n_samples = opts.samples or (DEFAULT_SAMPLES if opts.task == "samples" else 0)
    if n_samples:
        report.samples = collect_samples(ctx, files, n_samples)
    report.written = write_report(report, opts, models)
    return report


def collect_samples(ctx: tasks.TaskContext, files: list[DataFile], n: int) -> list[dict]:
    """The first n prompts across the data files, answered by both models."""
    prompts: list[Prompt] = []
    for f in files:
        try:
            prompts.extend(prompts_from_rows(f.rows.records, f.source))
        except DataError:
            if f.task == "samples":
                raise
        if len(prompts) >= n:
            break
    prompts = unique_prompts(prompts)[:n]
    if not prompts:
        raise DataError(
            "--samples found no prompts in the data files",
            hint="samples read a prompt / question / instruction column",
        )
    model = ctx.answers.get("model", prompts)
    reference = ctx.answers.get("reference", prompts) if ctx.models.has_reference else None
    return side_by_side(prompts, reference, model)


def write_report(report: EvalReport, opts: EvalOptions, models: EvalModels) -> list[str]:
    """Write the JSON to --output and, for a run directory, to RUN_DIR/eval.json."""
    targets = [Path(opts.output)] if opts.output else []
    if models.run is not None:
        targets.append(models.run.run_dir / "eval.json")
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    for path in targets:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise AlignkitError(
                f"could not write the report: {exc.strerror}", where=str(path)
            ) from None
    return [str(p) for p in targets]


# --------------------------------------------------------------------------- printing


COUNT_METRICS = {"no_answer"}  # whole numbers: printed without decimals


def _fmt(value: float | None, *, count: bool = False, sign: bool = False) -> str:
    if value is None:
        return "-"
    if count:
        return f"{value:+.0f}" if sign else f"{value:.0f}"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def render_report(report: EvalReport, console: Any) -> None:
    """A before/after table per task, then the samples; all text is shown as it is."""
    from rich.table import Table
    from rich.text import Text

    for res in report.results:
        title = Text(f"{res['task']} on {res['data']} (n={res['n']})")
        table = Table(title=title, title_justify="left")
        for col in ("metric", "reference", "model", "delta"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for name, m in res["metrics"].items():
            count = name in COUNT_METRICS
            table.add_row(
                Text(name),
                _fmt(m["before"], count=count),
                _fmt(m["after"], count=count),
                _fmt(m["delta"], count=count, sign=True),
            )
        console.print(table)
        if res["details"].get("error"):
            console.print(Text(f"incomplete: {res['details']['error']}", style="yellow"))
    for s in report.samples:
        console.rule(Text(prompt_title(s["prompt"])[:80]), style="dim")
        if s["reference"] is not None:
            console.print(Text.assemble(("reference: ", "bold"), s["reference"]))
        console.print(Text.assemble(("model:     ", "bold"), s["model"]))
