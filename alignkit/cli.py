"""The `alignkit` command line."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from alignkit.errors import AlignkitError
from alignkit.methods import METHODS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Align open language models: SFT with LoRA/QLoRA and more.",
)
data_app = typer.Typer(no_args_is_help=True, help="Check and inspect training data.")
app.add_typer(data_app, name="data")
err = Console(stderr=True)
out = Console()


def _log(message: str) -> None:
    """Progress and facts from a run: plain text (no rich markup: '[alignkit]' is not a tag)."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    """Our own progress output replaces transformers' per-load bars and deprecation chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")


@app.callback()
def _setup() -> None:
    """Align open language models: SFT with LoRA/QLoRA and more."""
    _quiet_libraries()


def _fail(exc: AlignkitError, code: int = 2) -> None:
    # escape: paths, values and hints are text, and "[x]"/"[/x]" in them is not rich markup
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file"),
    overrides: list[str] = typer.Argument(None, help="section.key=value overrides"),
) -> None:
    """Run one training method from a config file."""
    from alignkit.config import load_config
    from alignkit.train.loop import Interrupted
    from alignkit.train.run import run_training

    try:
        cfg = load_config(config, overrides or [])
        summary = run_training(cfg, log=_log)
    except Interrupted as exc:
        _fail(exc, code=130)
    except AlignkitError as exc:
        _fail(exc)
    _print_summary(summary, cfg.output_dir)


def _print_summary(summary: dict, output_dir: str) -> None:
    if not summary:
        return
    eb, ea = summary.get("eval_before", {}), summary.get("eval_after", {})
    if "eval/loss" in eb and "eval/loss" in ea:
        out.print(f"held-out loss: {eb['eval/loss']:.4f} -> {ea['eval/loss']:.4f}")
    if "eval/score" in eb and "eval/score" in ea:  # PPO: policy vs reference on held-out prompts
        out.print(
            f"held-out reward: {eb['eval/score']:.4f} -> {ea['eval/score']:.4f} "
            f"(reference {ea['eval/ref_score']:.4f}; win rate {ea['eval/win_rate']:.2f})",
            highlight=False,
        )
    for s in summary.get("samples", []):
        # Prompts and model text are printed as they are: "[/INST]" in a reply is not markup
        out.rule(Text(s["prompt"][:80]), style="dim")
        out.print(Text.assemble(("before: ", "bold"), s["before"]))
        out.print(Text.assemble(("after:  ", "bold"), s["after"]))
    out.print(
        f"{summary['steps']} steps in {summary['wall_time_s']:.0f}s, "
        f"{summary['tokens_per_s']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB"
        f"; run directory: {output_dir}",
        highlight=False,
        markup=False,
    )


@app.command()
def quickstart(
    output_dir: str = typer.Option("runs/quickstart", help="where the run goes"),
    overrides: list[str] = typer.Argument(None, help="section.key=value overrides"),
) -> None:
    """SFT of the default model on bundled GSM8K problems, with samples before and after."""
    from alignkit.quickstart import quickstart_config
    from alignkit.train.loop import Interrupted
    from alignkit.train.run import run_training

    try:
        cfg = quickstart_config(output_dir, overrides or [])
        summary = run_training(cfg, log=_log)
    except Interrupted as exc:
        _fail(exc, code=130)
    except AlignkitError as exc:
        _fail(exc)
    _print_summary(summary, cfg.output_dir)


@data_app.command("check")
def data_check(
    file: str = typer.Argument(None, help="data file or datasets hub name [default: data.train]"),
    config: Path = typer.Option(
        None, "--config", help="run config: method, model, data and the method's knobs from it"
    ),
    method: str = typer.Option(
        None, help=f"the method the data is for: {', '.join(METHODS)} [default: sft]"
    ),
    model: str = typer.Option(None, help="model whose tokenizer and template to use"),
    max_length: int = typer.Option(None, "--max-length", help="token limit per example [1024]"),
    fmt: str = typer.Option(None, "--format", help="force a format instead of detecting it"),
    column_map: list[str] = typer.Option(None, "--column-map", help="FIELD=CANONICAL, repeatable"),
    truncation: str = typer.Option(None, help="drop | truncate | error [default: drop]"),
    max_new_tokens: int = typer.Option(
        None, "--max-new-tokens", help="ppo: response length; prompts get max-length minus this"
    ),
    beta: float = typer.Option(None, help="the method's beta, for advice on it [its default]"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Preflight a data file: format, lengths, truncation, duplicates, label mask, advice."""
    from alignkit.data import preflight_for, render_report
    from alignkit.data.preflight_advice import RunSettings, advise
    from alignkit.models import load_tokenizer

    data_opts = {"train": file, "format": fmt, "max_length": max_length, "truncation": truncation}
    try:
        if column_map:
            data_opts["column_map"] = dict(_split_pair(p) for p in column_map)
        setup = _check_setup(config, method, model, beta, max_new_tokens, data_opts)
        tok = load_tokenizer(setup.model)
        check = preflight_for(setup.method.data)  # the method table's data kind picks it
        if setup.method.data == "prompts":  # responses are generated in training: leave room
            check = partial(
                check,
                max_new_tokens=setup.knobs.max_new_tokens,
                system_prompt=setup.knobs.system_prompt,
            )
        report = check(setup.data, tok)
        advise(report, RunSettings(setup.method, setup.knobs, bool(tok.chat_template)))
    except AlignkitError as exc:
        _fail(exc)
    except ValidationError as exc:  # pydantic validation of the options
        _fail(_option_error(exc))
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        render_report(report, out)
    if report.problems:
        raise typer.Exit(1)


class _CheckSetup(NamedTuple):
    method: Any  # the method table's row
    model: Any  # ModelConfig
    data: Any  # DataConfig
    knobs: Any  # the method's config section


def _check_setup(config, method, model, beta, max_new_tokens, data_opts) -> _CheckSetup:
    """What `data check` checks against: the run config's (if any), each given option on top."""
    from alignkit.config import DataConfig, ModelConfig, load_config
    from alignkit.methods import spec

    run = load_config(config) if config else None
    row = spec(method or (run.method if run else "sft"))
    mcfg = run.model if run else ModelConfig()
    if model:
        mcfg = mcfg.model_copy(update={"name": model})
    given = {k: v for k, v in data_opts.items() if v is not None}
    dcfg = DataConfig.model_validate({**(run.data.model_dump() if run else {}), **given})
    if not dcfg.train:
        raise AlignkitError("no data file given", hint="pass FILE, or --config with data.train")
    knobs = getattr(run, row.section) if run else row.knobs()
    updates = {"beta": beta, "max_new_tokens": max_new_tokens}
    for key, value in updates.items():
        if value is None:
            continue
        if key not in row.knobs.model_fields:
            raise AlignkitError(
                f"--{key.replace('_', '-')}: {row.name} has no {key}", hint="leave it out"
            )
        knobs = row.knobs.model_validate({**knobs.model_dump(by_alias=True), key: value})
    return _CheckSetup(row, mcfg, dcfg, knobs)


def _option_error(exc: ValidationError) -> AlignkitError:
    """Name the command-line option a DataConfig validation error is about, and the bad value."""
    lines = []
    for e in exc.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        option = {"train": "FILE", "format": "--format"}.get(field, "--" + field.replace("_", "-"))
        lines.append(f"{option}: {e['msg']} (got {e.get('input')!r})")
    return AlignkitError("; ".join(lines), hint="see alignkit data check --help")


def _split_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise AlignkitError(
            f"--column-map '{text}' is not FIELD=CANONICAL",
            hint="for GSM8K: --column-map question=prompt --column-map answer=completion",
        )
    a, b = text.split("=", 1)
    return a.strip(), b.strip()


@app.command()
def generate(
    model: str = typer.Option("smollm2-135m", help="model dir, adapter dir, run dir or alias"),
    prompt: list[str] = typer.Option(..., help="user message; repeat for several"),
    max_new_tokens: int = typer.Option(256, help="response length limit"),
    temperature: float = typer.Option(0.0, help="0 means greedy"),
    top_p: float = typer.Option(1.0),
    system: str = typer.Option(None, help="optional system message"),
) -> None:
    """Chat with a model: the chat template is applied to each prompt."""
    from alignkit.models import load_for_inference
    from alignkit.rollout.generate import generate_chat

    try:
        path = _final_dir(model)
        mdl, tok = load_for_inference(path, "cuda" if _cuda() else "cpu")
        gens = generate_chat(
            mdl,
            tok,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            system=system,
        )
    except AlignkitError as exc:
        _fail(exc)
    for g in gens:
        out.rule(Text(g.prompt[:80]), style="dim")
        out.print(Text(g.text))
        if not g.ended:
            err.print(f"[yellow](stopped at the {max_new_tokens}-token limit, no end-of-turn)[/]")


@app.command()
def export(
    source: str = typer.Argument(
        ..., help="run directory, its final/ adapter directory, or a model directory"
    ),
    out_dir: str = typer.Option(..., "--out", help="where to write the exported model"),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="merge LoRA into full weights"),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 for the saved weights"),
    gguf: bool = typer.Option(
        False, "--gguf", help="write model.gguf for llama.cpp and an Ollama Modelfile beside it"
    ),
    quant: str = typer.Option(None, help="GGUF quantization: f16 (default) | q8_0 | q4_k_m"),
) -> None:
    """Write a standalone model: the LoRA adapter merged into full weights, or a GGUF file."""
    try:
        if not merge:
            raise AlignkitError(
                "only --merge export is available", hint="final/ already holds the adapter as it is"
            )
        if gguf:
            _export_gguf(_final_dir(source), out_dir, quant or "f16")
            return
        if quant is not None:
            raise AlignkitError(
                "--quant applies to GGUF export only", hint="add --gguf, or drop --quant"
            )
        from alignkit.models import export_merged

        export_merged(_final_dir(source), out_dir, dtype=dtype)
    except AlignkitError as exc:
        _fail(exc)
    out.print(f"merged model written to {out_dir}", markup=False, highlight=False)


def _export_gguf(source: str, out_dir: str, quant: str) -> None:
    from alignkit.models.gguf_export import check_quant, export_gguf

    check_quant(quant)  # before the seconds of loading a model
    _log(f"[alignkit] writing GGUF ({quant}) from {source}")
    done = export_gguf(source, out_dir, quant)
    size_mb = done.gguf_path.stat().st_size / 1e6
    types = ", ".join(f"{n} {kind}" for kind, n in done.tensor_types.items())
    out.print(
        f"GGUF ({quant}, {size_mb:.0f} MB; tensors: {types}) written to {done.gguf_path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if not done.chat_template:
        _log("[alignkit] warning: the tokenizer has no chat template; the GGUF carries none")
    template = (
        "chatml TEMPLATE" if done.ollama_template else "no TEMPLATE (Ollama reads the GGUF's)"
    )
    out.print(
        f"Ollama Modelfile ({template}) written to {done.modelfile_path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"run it: llama-cli -m {done.gguf_path} -cnv   or   "
        f"ollama create NAME -f {done.modelfile_path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help="run dir, adapter dir, model dir, GGUF or alias"),
    data: list[str] = typer.Option(..., "--data", help="eval data file; repeat for several"),
    reference: str = typer.Option(
        None, help="reference (default: the run's, or the adapter's base)"
    ),
    task: str = typer.Option("auto", help="auto|preference|gsm8k|multiple_choice|win_rate|samples"),
    limit: int = typer.Option(None, help="use only the first N rows of each file"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="answer length limit"),
    beta: float = typer.Option(None, help="implicit-reward beta (default: the run's, else 0.1)"),
    samples: int = typer.Option(0, help="N prompts answered by both models, side by side"),
    reward_model: list[str] = typer.Option(None, "--reward-model", help="win-rate judge(s)"),
    judge_url: str = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint"),
    judge_model: str = typer.Option(None, "--judge-model", help="the judge's model name"),
    judge_key_env: str = typer.Option("OPENAI_API_KEY", "--judge-key-env"),
    output: str = typer.Option(None, "--output", help="write the results as JSON here"),
) -> None:
    """Evaluate a model against its reference: preference, win rate, capability, samples."""
    from alignkit.eval.run import EvalIncomplete, EvalOptions, render_report, run_eval

    opts = EvalOptions(
        model=model,
        data=data,
        reference=reference,
        task=task,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        beta=beta,
        samples=samples,
        reward_models=reward_model or [],
        judge_url=judge_url,
        judge_model=judge_model,
        judge_key_env=judge_key_env,
        output=output,
    )
    try:
        report = run_eval(opts, log=_log)
    except EvalIncomplete as exc:
        render_report(exc.report, out)
        _fail(exc, code=1)
    except AlignkitError as exc:
        _fail(exc)
    render_report(report, out)
    for path in report.written:
        _log(f"[alignkit] results written to {path}")


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="model/adapter/run dir, GGUF or alias"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)"),
    port: int = typer.Option(8000, help="port to listen on"),
    max_new_tokens: int = typer.Option(512, help="default and ceiling for a reply's max_tokens"),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="ALIGNKIT_API_KEY",
        show_default=False,
        help="require 'Authorization: Bearer KEY' (an OpenAI client's api_key) on every request",
    ),
) -> None:
    """Serve a model behind an OpenAI-compatible API: /v1/chat/completions and /v1/models."""
    from alignkit.models import load_for_inference
    from alignkit.serve import ChatEngine, exposure_warning, make_server, serve_forever

    try:
        server = make_server(None, host, port, api_key)  # a taken port fails before loading
        if warning := exposure_warning(server):
            _log(warning)
        mdl, tok = load_for_inference(_final_dir(model), "cuda" if _cuda() else "cpu")
        server.engine = ChatEngine(mdl, tok, model, max_new_tokens)
    except AlignkitError as exc:
        _fail(exc)
    serve_forever(server, log=_log)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="run directory (a train config's output_dir)"),
    output: Path = typer.Option(None, "--output", help="HTML file (default RUN_DIR/report.html)"),
) -> None:
    """Write one self-contained HTML page for a run: curves, health, eval, samples, config."""
    from alignkit.monitor.report import write_report

    try:
        result = write_report(run_dir, output)
    except AlignkitError as exc:
        _fail(exc)
    for problem in result.problems:
        err.print(f"warning: {problem}", markup=False, highlight=False, soft_wrap=True)
    out.print(str(result.path), markup=False, highlight=False, soft_wrap=True)


@app.command()
def score(
    model: list[str] = typer.Option(
        ..., "--model", help="reward model (run dir, final/ or model dir); repeat for an ensemble"
    ),
    data: str = typer.Option(..., "--data", help="prompt/completion or messages rows"),
    combine: str = typer.Option("mean", help="mean | min: how several --model combine"),
    output: str = typer.Option(None, "--output", help="write each row with its score (JSONL)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
) -> None:
    """Score prompt/response rows with a reward model or an ensemble of them."""
    from alignkit.data.score_rows import read_score_rows, score_summary, write_scores
    from alignkit.models.reward import load_reward_models

    try:
        if combine not in ("mean", "min"):
            raise AlignkitError(f"unknown --combine '{combine}'", hint="use mean or min")
        rows = read_score_rows(data)  # bad rows fail before any model is loaded
        scorer = load_reward_models(model, combine, device="cuda" if _cuda() else "cpu")
        scores = scorer.score(rows.prompts, rows.responses, batch_size=batch_size)
        if output:
            write_scores(output, rows, scores)
    except AlignkitError as exc:
        _fail(exc)
    s = score_summary(scores)
    out.print(
        f"{s['count']} rows: mean {s['mean']:.4f}, std {s['std']:.4f}, "
        f"min {s['min']:.4f}, max {s['max']:.4f}",
        markup=False,
        highlight=False,
    )
    if output:
        _log(f"[alignkit] scores written to {output}")


def _final_dir(path: str) -> str:
    """A run directory stands for its final/ model."""
    p = Path(path)
    return str(p / "final") if (p / "final").is_dir() and (p / "summary.json").exists() else path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
