"""Run health, live: known failure signatures flagged while training, with reason and fix.

`HealthMonitor.observe` is called with every row that goes to `metrics.jsonl` (train names plain,
eval names prefixed `eval/`) and returns the findings that are new at that step. A rule fires
once when its failure shows and is re-armed only after it has been clear for a whole window, so
a persistent problem is reported once, not every step. Findings are appended to
`RUN_DIR/health.jsonl` as they fire; `summary()` lists every rule with its status (ok, fired,
not applicable), so a clean run says what was checked rather than saying nothing.

The rules themselves live in `alignkit.monitor.health_rules`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from alignkit.monitor.health_rules import RULES, Rule
from alignkit.monitor.health_view import Series, View

HEALTH_FILE = "health.jsonl"


class Finding(NamedTuple):
    rule: str
    step: int
    severity: str  # "warning" | "error"
    message: str  # what was seen, with numbers
    reason: str  # why it matters
    fix: str  # the usual remedy


@dataclass
class RuleState:
    """Book-keeping of one rule across observations."""

    applicable: bool = False
    judged: bool = False
    active: bool = False  # the failure is showing and has been reported
    clear_streak: int = 0  # consecutive judged-healthy checks since it last showed
    fired: int = 0
    pending: str | None = None  # why the last check could not judge, when the rule said


def smoothing_window(total_steps: int, log_every: int = 1) -> int:
    """Logged values per smoothing window: a tenth of the run, between 3 and 20."""
    observations = max(1, total_steps // max(1, log_every))
    return max(3, min(20, observations // 10))


def _as_float(value: Any) -> float | None:
    """Metric values as floats; `metrics.jsonl` writes NaN and inf as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


class HealthMonitor:
    """Evaluates the run-health rules as metrics arrive."""

    def __init__(
        self,
        method: str,
        total_steps: int,
        *,
        run_dir: Path | None = None,
        settings: dict | None = None,
        rules: tuple[Rule, ...] = RULES,
    ):
        self.method, self.total_steps = method, max(1, int(total_steps))
        self.settings = dict(settings or {})
        self.window = smoothing_window(self.total_steps, int(self.settings.get("log_every", 1)))
        self.rules = rules
        self.series: dict[str, Series] = {}
        self.states = {r.name: RuleState() for r in rules}
        self.findings: list[Finding] = []
        self.path = Path(run_dir) / HEALTH_FILE if run_dir is not None else None
        if self.path is not None:
            # A fresh file: a resumed run rebuilds it by replaying its metrics (`replay`).
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")

    # -- feeding ------------------------------------------------------------------------------
    def observe(self, step: int, metrics: dict[str, Any]) -> list[Finding]:
        """Record one logged row and return the findings that are new at this step."""
        current = {
            k: f for k, v in metrics.items() if k != "step" and (f := _as_float(v)) is not None
        }
        for name, value in current.items():
            self.series.setdefault(name, Series()).add(step, value)
        view = View(
            self.series, current, step, self.total_steps, self.window, self.method, self.settings
        )
        new = []
        for rule in self.rules:
            finding = self._judge(rule, view)
            if finding is not None:
                new.append(finding)
        self.findings.extend(new)
        self._write(new)
        return new

    def replay(self, rows: Iterable[dict[str, Any]]) -> None:
        """Feed rows already logged (a resumed run's `metrics.jsonl`), rebuilding the state and
        the findings file exactly as the continuous run had them."""
        for row in rows:
            self.observe(int(row.get("step", 0)), row)

    def _applies(self, rule: Rule) -> bool:
        if rule.methods is not None and self.method not in rule.methods:
            return False
        return all(any(n in self.series for n in group) for group in rule.needs)

    def _judge(self, rule: Rule, view: View) -> Finding | None:
        state = self.states[rule.name]
        if not self._applies(rule):
            return None
        state.applicable = True
        if rule.needs and not any(n in view.current for n in rule.needs[0]):
            return None  # nothing new for this rule in this observation
        check = rule.check(view)
        state.pending = check.pending
        if not check.judged:
            return None
        state.judged = True
        if check.message is None:
            state.clear_streak += 1
            if state.clear_streak >= self.window and not rule.once:
                state.active = False  # healthy for a whole window: report a relapse again
            return None
        state.clear_streak = 0
        if state.active:
            return None
        state.active, state.fired = True, state.fired + 1
        return Finding(rule.name, view.step, rule.severity, check.message, rule.reason, rule.fix)

    def _write(self, findings: list[Finding]) -> None:
        if self.path is None or not findings:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            for f in findings:
                fh.write(json.dumps(f._asdict()) + "\n")

    # -- reading ------------------------------------------------------------------------------
    def _rule_entry(self, rule: Rule) -> dict[str, Any]:
        state = self.states[rule.name]
        if state.fired:
            status, detail = "fired", f"{state.fired} finding(s)"
        elif state.judged:
            status, detail = "ok", rule.title
        elif state.applicable:
            status, detail = "not applicable", state.pending or "too few logged steps to judge"
        elif rule.methods is not None and self.method not in rule.methods:
            status, detail = "not applicable", f"not a {self.method} rule"
        else:
            missing = [g[0] for g in rule.needs if not any(n in self.series for n in g)]
            status, detail = "not applicable", f"no {', '.join(missing)} logged"
        return {
            "rule": rule.name,
            "status": status,
            "severity": rule.severity,
            "detail": detail,
            "findings": state.fired,
        }

    def summary(self) -> dict[str, Any]:
        """Every rule with its status, and every finding, ready for summary.json."""
        rules = [self._rule_entry(r) for r in self.rules]
        return {
            "checked": sum(r["status"] != "not applicable" for r in rules),
            "not_applicable": sum(r["status"] == "not applicable" for r in rules),
            "warnings": sum(f.severity == "warning" for f in self.findings),
            "errors": sum(f.severity == "error" for f in self.findings),
            "rules": rules,
            "findings": [f._asdict() for f in self.findings],
        }


def format_finding(f: Finding | dict[str, Any]) -> str:
    """Two lines for the progress output and the end-of-run log."""
    d = f._asdict() if isinstance(f, Finding) else f
    return (
        f"health {d['severity']} [{d['rule']}] step {d['step']}: {d['message']}\n"
        f"    why: {d['reason']}\n    fix: {d['fix']}"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run health lines: what was checked and what was found."""
    findings = summary.get("findings", [])
    n = len(findings)
    head = f"health: {summary.get('checked', 0)} rules checked, {n} finding{'s' * (n != 1)}"
    if summary.get("not_applicable"):
        head += f" ({summary['not_applicable']} rules not applicable)"
    return "\n".join([head, *(format_finding(f) for f in findings)])


def read_metrics(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """Rows of a `metrics.jsonl` (steps <= upto), for `HealthMonitor.replay`."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if upto is None or row.get("step", 0) <= upto:
                rows.append(row)
    return rows


def settings_from_config(cfg) -> dict[str, Any]:
    """Rule settings from a run config: the method's own section (beta, kl_target, ...) plus
    how often metrics are logged."""
    section = getattr(cfg, cfg.method, None)
    settings = section.model_dump() if hasattr(section, "model_dump") else {}
    settings["log_every"] = cfg.train.log_every
    return settings
