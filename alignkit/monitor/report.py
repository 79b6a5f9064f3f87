"""`alignkit report RUN_DIR`: one self-contained HTML page per run.

The page holds the headline facts, curves of the logged metrics, health findings, eval
before/after, sample generations, the data preflight and the resolved config. It opens with no
network: styles are inline, curves are inline SVG (`report_svg`), and there is no script. All text
from the run (prompts, generations, config values) is escaped, since it routinely holds <, > and &.

Only metrics.jsonl is required. Every other file is optional: a missing one leaves a note where its
section would be; an unreadable one is also reported as a problem at the top of the page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, NamedTuple

from alignkit.errors import AlignkitError
from alignkit.monitor.report_svg import finite, metric_charts


class HealthData(NamedTuple):
    """Run-health results; `rules` may be empty when only findings were written."""

    rules: list[dict[str, Any]]
    findings: list[dict[str, Any]]


@dataclass
class RunData:
    run_dir: Path
    rows: list[dict[str, Any]]
    config_text: str | None = None
    summary: dict[str, Any] | None = None
    health: HealthData | None = None
    eval: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


class ReportResult(NamedTuple):
    path: Path
    problems: list[str]


# --------------------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as rows; a bad line is an error naming the file and line."""
    if not path.is_file():
        raise AlignkitError(
            "no metrics.jsonl here: not a run directory, or the run has logged nothing yet",
            where=str(path.parent),
            hint="pass the output_dir of a run started with `alignkit train`",
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AlignkitError(f"cannot read the metrics file: {exc}", where=str(path)) from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_metrics_row(line, f"{path}:{lineno}"))
    if not rows:
        raise AlignkitError(
            "the metrics file is empty: the run has not logged a step yet",
            where=str(path),
            hint="wait for the first logged step (train.log_every), or check the run's output",
        )
    return rows


def _metrics_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AlignkitError(
            f"not valid JSON ({exc.msg} at column {exc.colno})",
            where=where,
            hint="fix or delete that line; metrics.jsonl holds one JSON object per line",
        ) from None
    if not isinstance(row, dict):
        raise AlignkitError(f"expected a JSON object, got {type(row).__name__}", where=where)
    if not finite(row.get("step")):
        raise AlignkitError("the row has no numeric 'step'", where=where)
    return row


def _optional_json(path: Path, problems: list[str]) -> Any:
    """A JSON (or, for .jsonl, list of JSON lines) file, or None when absent or unreadable."""
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: cannot be read ({exc}); its section is left out")
        return None


def _dict_or_none(value: Any, path: Path, problems: list[str]) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    problems.append(f"{path}: expected a JSON object; its section is left out")
    return None


def _health(summary: dict | None, lines: list | None) -> HealthData | None:
    """summary.json's "health" (the end-of-run account), else health.jsonl as written so far
    (a run still going, or one that stopped early); None when neither exists: not checked."""
    block = (summary or {}).get("health")
    if lines is None and not isinstance(block, dict):
        return None
    block = block if isinstance(block, dict) else {}
    findings = block["findings"] if isinstance(block.get("findings"), list) else lines or []
    return HealthData(_rules(block.get("rules")), [f for f in findings if isinstance(f, dict)])


def _rules(raw: Any) -> list[dict[str, Any]]:
    """Rules as [{rule, status, ...}] from a list of dicts or a {name: status | dict} mapping."""
    if isinstance(raw, dict):
        raw = [{"rule": k, **(v if isinstance(v, dict) else {"status": v})} for k, v in raw.items()]
    if not isinstance(raw, list):
        return []
    out = []
    for r in raw:
        if isinstance(r, dict):
            out.append({"rule": r.get("rule", r.get("name", "?")), **r})
        elif isinstance(r, str):
            out.append({"rule": r})
    return out


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise AlignkitError("no such directory", where=str(run_dir), hint="pass a run directory")
    if not run_dir.is_dir():
        raise AlignkitError(
            "not a directory", where=str(run_dir), hint="pass the run directory, not a file in it"
        )
    run = RunData(run_dir, read_metrics(run_dir / "metrics.jsonl"))
    try:
        run.config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        run.problems.append(f"{run_dir / 'config.yaml'}: cannot be read ({exc})")
    p = run_dir / "summary.json"
    run.summary = _dict_or_none(_optional_json(p, run.problems), p, run.problems)
    p = run_dir / "eval.json"
    run.eval = _dict_or_none(_optional_json(p, run.problems), p, run.problems)
    run.health = _health(run.summary, _optional_json(run_dir / "health.jsonl", run.problems))
    return run


# --------------------------------------------------------------------------- formatting


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


def num(value: Any, signed: bool = False) -> str:
    """A table cell for a number: 4 significant digits, '—' when absent."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return esc(value)
    if isinstance(value, int):
        return f"{value:+,}" if signed else f"{value:,}"
    return format(value, "+.4g" if signed else ".4g")


def duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h {m}m {s % 60}s" if h else f"{m}m {s % 60}s" if m else f"{seconds:.1f}s"


def table(head: list[str], rows: list[list[str]], cls: str) -> str:
    """Cells arrive already escaped/formatted; the head is escaped here."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def value_cell(value: Any, max_items: int = 20) -> str:
    """A scalar, or JSON for nested values; long lists (per-item judge records) are cut short."""
    if isinstance(value, list) and len(value) > max_items:
        more = f"\n... and {len(value) - max_items} more"
        return f"<pre>{esc(json.dumps(value[:max_items], indent=1) + more)}</pre>"
    if isinstance(value, dict | list):
        return f"<pre>{esc(json.dumps(value, indent=1))}</pre>"
    return num(value)


def facts_table(facts: dict[str, Any], cls: str) -> str:
    return table(["key", "value"], [[esc(k), value_cell(v)] for k, v in facts.items()], cls)


# --------------------------------------------------------------------------- sections


ACCURACY, MARGIN = "rewards/accuracies", "rewards/margins"


def all_tie(row: dict, prefix: str = "") -> bool:
    """Whether every pair behind the row's accuracy tied. The loss module counts a tie as
    wrong, so such a row logs accuracy 0.0; with margins exactly 0.0 that can only mean ties,
    since no pair was ahead and the margins average to 0. It is what a run logs before the
    policy leaves the reference (the eval at step 0, the first step)."""
    return row.get(prefix + ACCURACY) == 0 and row.get(prefix + MARGIN) == 0


class TiedRows(NamedTuple):
    rows: list[dict[str, Any]]  # accuracy removed where every pair tied: not a 0 to draw
    notes: list[str]


def drop_tied_accuracy(rows: list[dict[str, Any]]) -> TiedRows:
    out, steps = [], {"": [], "eval/": []}
    for row in rows:
        tied = [p for p in steps if all_tie(row, p)]
        for p in tied:
            steps[p].append(row["step"])
        out.append({k: v for k, v in row.items() if k not in {p + ACCURACY for p in tied}})
    notes = [
        f"{p}{ACCURACY} at step{'s' * (len(st) > 1)} {', '.join(map(str, st[:5]))}: n/a, not "
        "drawn: policy and reference tie on every pair (margins exactly 0), and a tie is "
        "neither right nor wrong"
        for p, st in steps.items()
        if st
    ]
    return TiedRows(out, notes)


def curves_section(rows: list[dict]) -> str:
    tied = drop_tied_accuracy(rows)
    charts = metric_charts(tied.rows)
    body = "".join(note(n) for n in [*tied.notes, *charts.notes])
    body += '<div class="charts">' + "".join(charts.svgs) + "</div>"
    return section("curves", "Curves", body)


def health_section(health: HealthData | None) -> str:
    if health is None:
        text = 'not checked: no health data (no "health" in summary.json, no health.jsonl)'
        return section("health", "Run health", note(text))
    parts = []
    if health.findings:
        rows = [
            [num(f.get("step")), esc(f.get("severity", "")), esc(f.get("rule", ""))]
            + [esc(f.get(k, "")) for k in ("message", "reason", "fix")]
            for f in health.findings
        ]
        head = ["step", "severity", "rule", "message", "reason", "fix"]
        parts.append(table(head, rows, "findings"))
    else:
        parts.append('<p class="ok" id="health-clean">no findings</p>')
    if health.rules:
        rows = [
            [esc(r["rule"]), esc(r.get("status", "")), esc(r.get("detail", r.get("message", "")))]
            for r in health.rules
        ]
        parts.append(table(["rule", "status", "detail"], rows, "rules"))
    return section("health", "Run health", "".join(parts))


def _before_after_rows(before: dict, after: dict) -> list[list[str]]:
    rows = []
    # An accuracy over pairs that all tie is not 0: it is not defined yet (see all_tie).
    b_tied = {f"eval/{ACCURACY}"} if all_tie(before, "eval/") else set()
    a_tied = {f"eval/{ACCURACY}"} if all_tie(after, "eval/") else set()
    for name in dict.fromkeys([*before, *after]):
        b = None if name in b_tied else before.get(name)
        a = None if name in a_tied else after.get(name)
        delta = a - b if finite(a) and finite(b) else None
        cells = [
            "n/a" if name in tied else num(value) for value, tied in ((b, b_tied), (a, a_tied))
        ]
        rows.append([esc(name), *cells, num(delta, signed=True)])
    return rows


def _eval_result(res: dict) -> str:
    title = f"{res.get('task', '?')} on {res.get('data', '?')} (n={res.get('n', '?')})"
    rows = []
    for name, m in (res.get("metrics") or {}).items():
        m = m if isinstance(m, dict) else {"after": m}
        b, a, d = m.get("before"), m.get("after"), m.get("delta")
        d = a - b if d is None and finite(a) and finite(b) else d
        rows.append([esc(name), num(b), num(a), num(d, signed=True)])
    html = f"<h3>{esc(title)}</h3>" + table(["metric", "before", "after", "delta"], rows, "eval")
    details = res.get("details")
    if isinstance(details, dict) and details.get("error"):
        html += f'<p class="problem">incomplete: {esc(details["error"])}</p>'
    if isinstance(details, dict) and details:
        html += f"<details><summary>details</summary>{facts_table(details, 'facts')}</details>"
    return html


def eval_section(summary: dict | None, ev: dict | None) -> str:
    parts = []
    before, after = (summary or {}).get("eval_before"), (summary or {}).get("eval_after")
    if isinstance(before, dict) and isinstance(after, dict) and (before or after):
        parts.append("<h3>held-out eval during training</h3>")
        head = ["metric", "before", "after", "delta"]
        parts.append(table(head, _before_after_rows(before, after), "eval train-eval"))
    if ev is None:
        parts.append(note("no eval.json: `alignkit eval` has not been run into this directory"))
    else:
        ref = ev.get("reference") or "none"
        parts.append(f"<p>model {esc(ev.get('model', '?'))}, reference {esc(ref)}</p>")
        results = ev.get("results") if isinstance(ev.get("results"), list) else []
        parts += [_eval_result(r) for r in results if isinstance(r, dict)]
        samples = [s for s in ev.get("samples") or [] if isinstance(s, dict)]
        if samples:
            rows = [[_text(s.get(k)) for k in ("prompt", "reference", "model")] for s in samples]
            parts.append(table(["prompt", "reference", "model"], rows, "samples eval-samples"))
    return section("eval", "Evaluation: before and after", "".join(parts))


def _text(value: Any, ended: Any = True) -> str:
    cut = "" if ended is not False else '<div class="cut">stopped at the token limit, no EOS</div>'
    return f'<pre class="text">{esc("" if value is None else value)}</pre>{cut}'


def samples_section(summary: dict | None) -> str:
    samples = [s for s in (summary or {}).get("samples") or [] if isinstance(s, dict)]
    if not samples:
        return section("samples", "Sample generations", note("no sample generations recorded"))
    rows = [
        [
            _text(s.get("prompt")),
            _text(s.get("before"), s.get("ended_before")),
            _text(s.get("after"), s.get("ended_after")),
        ]
        for s in samples
    ]
    return section(
        "samples", "Sample generations", table(["prompt", "before", "after"], rows, "samples")
    )


def _health_fact(health: HealthData | None) -> str:
    if health is None:
        return "not checked"
    checked = sum(r.get("status") != "not applicable" for r in health.rules)
    if not health.findings:
        return f"{checked} rules checked, no findings" if health.rules else "no findings"
    errors = sum(f.get("severity") == "error" for f in health.findings)
    return f"{len(health.findings)} finding(s), {errors} error(s)"


def headline_facts(run: RunData) -> dict[str, str]:
    """Method, model, steps, time, speed, memory: whatever the run recorded, formatted."""
    s = run.summary or {}
    facts = {
        "method": esc(s.get("method", _config_value(run.config_text, "method") or "?")),
        "model": esc(s.get("model", "?")),
        "steps": num(s.get("steps", run.rows[-1]["step"])),
    }
    if finite(s.get("wall_time_s")):
        facts["wall time"] = duration(s["wall_time_s"])
    if finite(s.get("tokens_per_s")):
        facts["tokens/s"] = f"{s['tokens_per_s']:,.0f}"
    for key, label in (("peak_rss_mb", "peak RSS"), ("peak_cuda_mb", "peak GPU memory")):
        if finite(s.get(key)):
            facts[label] = f"{s[key]:,.0f} MB"
    if finite(s.get("trainable_params")) and finite(s.get("total_params")):
        share = 100 * s["trainable_params"] / max(s["total_params"], 1)
        facts["trainable parameters"] = (
            f"{s['trainable_params']:,} of {s['total_params']:,} ({share:.2f}%)"
        )
    final = s.get("final") if isinstance(s.get("final"), dict) else {}
    if finite(final.get("loss")):
        facts["final loss"] = num(final["loss"])
    facts["run health"] = esc(_health_fact(run.health))
    return facts


def _config_value(text: str | None, key: str) -> str | None:
    """A top-level scalar from config.yaml, read without YAML: enough for the headline."""
    for line in (text or "").splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip() or None
    return None


def overview_section(run: RunData) -> str:
    facts = headline_facts(run)
    cells = "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in facts.items())
    body = f'<dl class="headline">{cells}</dl>'
    if run.summary is None:
        body += note("no summary.json: the run may not have finished; facts come from its metrics")
    body += "".join(f'<p class="problem">{esc(p)}</p>' for p in run.problems)
    if isinstance((run.summary or {}).get("reward_stats"), dict):
        body += "<h3>reward statistics</h3>" + facts_table(run.summary["reward_stats"], "facts")
    return section("overview", "Overview", body)


def data_section(summary: dict | None) -> str:
    data = (summary or {}).get("data")
    if not isinstance(data, dict) or not data:
        return section("data", "Data preflight", note("no data summary recorded for this run"))
    return section("data", "Data preflight", facts_table(data, "facts data"))


def config_section(text: str | None) -> str:
    if text is None:
        return section("config", "Resolved config", note("no config.yaml in the run directory"))
    return section("config", "Resolved config", f'<pre class="config">{esc(text)}</pre>')


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1240px;
color:#1b1b1b;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:28px}h3{font-size:15px;margin:16px 0 6px}
.headline{display:flex;flex-wrap:wrap;gap:8px 28px;margin:0}
.headline dt{color:#666;font-size:12px}.headline dd{margin:0;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee;background:#fff}
.chart text{font-size:11px;fill:#333}.chart .title{font-size:13px;font-weight:600}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td:nth-child(n+2){font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,monospace}
pre.config{background:#f7f7f7;padding:10px;border:1px solid #e4e4e4}
table.samples td{width:33%}.cut{color:#b35900;font-size:12px}
.note{color:#666;font-style:italic}.ok{color:#087f23;font-weight:600}
.problem{color:#b00020}
"""


def page_title(method: str | None, run_name: str) -> str:
    """The run's name, with its method added only when the name does not already say it (a run
    directory is often named after its method: runs/dpo)."""
    if method and method.lower() not in run_name.lower():
        return f"alignkit report: {run_name} ({method})"
    return f"alignkit report: {run_name}"


def render_html(run: RunData) -> str:
    s = run.summary or {}
    method = s.get("method") or _config_value(run.config_text, "method")
    title = page_title(str(method) if method else None, run.run_dir.resolve().name)
    sections = [
        overview_section(run),
        curves_section(run.rows),
        health_section(run.health),
        eval_section(run.summary, run.eval),
        samples_section(run.summary),
        data_section(run.summary),
        config_section(run.config_text),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="note">{esc(run.run_dir.resolve())}</p>'
        + "".join(sections)
        + "</body></html>\n"
    )


def write_report(run_dir: Path | str, output: Path | str | None = None) -> ReportResult:
    """Render RUN_DIR's report to `output` (default RUN_DIR/report.html)."""
    run = load_run(Path(run_dir))
    path = Path(output) if output is not None else run.run_dir / "report.html"
    try:
        path.write_text(render_html(run), encoding="utf-8")
    except OSError as exc:
        raise AlignkitError(
            f"cannot write the report: {exc.strerror or exc}",
            where=str(path),
            hint="pick a writable --output path",
        ) from None
    return ReportResult(path, run.problems)
