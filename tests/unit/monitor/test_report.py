"""`alignkit report`: SVG scaling, NaN/inf handling, escaping, sections present or absent, and
clear errors for bad run directories.

`make_run_dir` writes a realistic DPO run directory by hand (no training); the browser test in
tests/invariants renders the same directory in headless Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.errors import AlignkitError
from alignkit.monitor.report import load_run, render_html, write_report
from alignkit.monitor.report_svg import (
    BANDS,
    Frame,
    Series,
    frame_for,
    line_chart,
    nice_ticks,
    path_data,
)

HOSTILE = "<script>alert('x')</script> & </td></table> \"quoted\""
TRAIN_STEPS = 40
EVAL_STEPS = (0, 20, 40)


def _train_row(step: int) -> dict:
    t = step / TRAIN_STEPS
    return {
        "step": step,
        "loss": 0.6931 - 0.3 * t,
        "rewards/chosen": 0.2 * t,
        "rewards/rejected": -0.6 * t,
        "rewards/margins": 0.8 * t,
        "rewards/accuracies": 0.5 + 0.4 * t,
        "logps/chosen": -80.0 - 2 * t,
        "logps/rejected": -90.0 - 30 * t,
        "learning_rate": 5e-4 * (1 - t),
        "grad_norm": 1.5 - t,
        "epoch": t,
    }


def _eval_row(step: int) -> dict:
    t = step / TRAIN_STEPS
    return {
        "step": step,
        "eval/loss": 0.6931 - 0.1731 * t,
        "eval/rewards/margins": 0.5 * t,
        "eval/rewards/accuracies": 0.5 + 0.25 * t,
    }


def metrics_rows() -> list[dict]:
    rows = []
    for step in range(TRAIN_STEPS + 1):
        if step in EVAL_STEPS:
            rows.append(_eval_row(step))
        if step:
            rows.append(_train_row(step))
    return rows


def summary_dict() -> dict:
    return {
        "method": "dpo",
        "model": "smollm2-135m",
        "steps": TRAIN_STEPS,
        "final": _train_row(TRAIN_STEPS),
        "eval_before": {"eval/loss": 0.6931, "eval/rewards/accuracies": 0.5},
        "eval_after": {"eval/loss": 0.52, "eval/rewards/accuracies": 0.75},
        "wall_time_s": 125.0,
        "tokens_per_s": 1234.5,
        "peak_rss_mb": 2048.0,
        "trainable_params": 4884480,
        "total_params": 139399488,
        "data": {"format": "prompt_chosen_rejected", "rows_read": 300, "kept": 290},
        "samples": [
            {
                "prompt": HOSTILE,
                "before": "I cannot & will not",
                "after": "Sure: 2 < 3",
                "ended_before": True,
                "ended_after": False,
            }
        ],
        "health": {
            "checked": 2,
            "not_applicable": 1,
            "rules": [
                _rule("accuracy_saturated_early", "fired", "1 finding(s)"),
                _rule("rejected_logps_collapse", "ok", "rejected log-probs collapsing"),
                _rule("ppo_kl_above_target", "not applicable", "not a dpo rule"),
            ],
            "findings": [FINDING],
        },
    }


def _rule(name: str, status: str, detail: str) -> dict:
    """A rule entry as HealthMonitor.summary() writes it."""
    return {"rule": name, "status": status, "severity": "warning", "detail": detail, "findings": 0}


FINDING = {
    "rule": "accuracy_saturated_early",
    "step": 4,
    "severity": "warning",
    "message": "rewards/accuracies reached 0.98 by step 4 <10% of training>",
    "reason": "the pairs are too easy & the model memorises them",
    "fix": "raise dpo.beta or add harder pairs",
}

EVAL_JSON = {
    "model": "runs/dpo/final",
    "reference": "smollm2-135m",
    "results": [
        {
            "task": "preference",
            "data": "heldout.jsonl",
            "n": 64,
            "metrics": {
                "accuracy": {"before": 0.5, "after": 0.75, "delta": None},
                "margin": {"before": 0.0, "after": 1.25, "delta": 1.25},
            },
            "details": {"ties": 2, "records": [{"i": i} for i in range(25)], "error": "<gone>"},
        }
    ],
    "samples": [{"prompt": "Say <hi>", "reference": "hello & bye", "model": "hi there"}],
}


def make_run_dir(root: Path, *, full: bool = True) -> Path:
    """A DPO run directory as `alignkit train` (+ health, + `alignkit eval`) leaves it."""
    run = root / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in metrics_rows()]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if full:
        (run / "config.yaml").write_text(
            f"method: dpo\nmodel:\n  name: smollm2-135m\ntrain:\n  sample_prompts:\n"
            f"  - {json.dumps(HOSTILE)}\ndpo:\n  beta: 0.1\n",
            encoding="utf-8",
        )
        (run / "summary.json").write_text(json.dumps(summary_dict()), encoding="utf-8")
        (run / "health.jsonl").write_text(json.dumps(FINDING) + "\n", encoding="utf-8")
        (run / "eval.json").write_text(json.dumps(EVAL_JSON), encoding="utf-8")
    return run


# --------------------------------------------------------------------------- SVG


def test_points_map_to_expected_coordinates():
    frame = Frame(0, 10, 0, 1, left=50, top=20, width=100, height=200)
    assert (frame.x(0), frame.y(0)) == (50, 220)  # data origin at the plot's bottom left
    assert (frame.x(10), frame.y(1)) == (150, 20)
    d = path_data([(0, 0.0), (5, 0.25), (10, 1.0)], frame)
    assert d == "M50.00,220.00 L100.00,170.00 L150.00,20.00"


def test_non_finite_values_break_the_line_and_not_the_range():
    frame = Frame(0, 4, 0, 2, left=0, top=0, width=40, height=20)
    points = [(0, 0.0), (1, float("nan")), (2, 1.0), (3, "inf"), (4, 2.0), (5, None)]
    assert path_data(points, frame) == "M0.00,20.00 M20.00,10.00 M40.00,0.00"
    auto = frame_for([Series("loss", [(1, 1.0), (2, float("inf")), (3, 2.0), (4, "-inf")], "#000")])
    assert auto.y_lo <= 1.0 and 2.0 <= auto.y_hi < 3.0
    assert frame_for([Series("loss", [(1, float("nan")), (2, "nan")], "#000")]) is None
    assert line_chart("loss", [Series("loss", [(1, float("nan"))], "#000")]) == ""


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 49, [0, 10, 20, 30, 40, 50]),
        (0.36, 0.83, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
        (-250, -80, [-250, -200, -150, -100, -50]),
        (0.0, 5e-4, [0.0, 1e-4, 2e-4, 3e-4, 4e-4, 5e-4]),
    ],
)
def test_ticks_are_round_and_enclose_the_data(lo, hi, expected):
    assert nice_ticks(lo, hi) == pytest.approx(expected)
    flat = nice_ticks(3.0, 3.0)
    assert flat[0] < 3.0 < flat[-1]


def test_chart_ticks_lie_inside_the_plot():
    chart = line_chart("g", [Series("grad_norm", [(1, 0.36), (2, 0.83), (50, 0.5)], "#000")])
    frame = frame_for([Series("grad_norm", [(1, 0.36), (2, 0.83), (50, 0.5)], "#000")])
    for v in frame.y_ticks:
        assert frame.top - 0.01 <= frame.y(v) <= frame.top + frame.height + 0.01
    assert f">{0.9}</text>" in chart and ">0.3</text>" in chart


# --------------------------------------------------------------------------- the page


def _paths(page: str) -> dict[str, str]:
    """data-metric -> d of each series path in the page."""
    pattern = r'<path class="series [a-z]+" id="[^"]*" data-metric="([^"]*)" d="([^"]*)"'
    return dict(re.findall(pattern, page))


def test_full_page_has_every_section_and_a_curve_per_series(tmp_path):
    page = render_html(load_run(make_run_dir(tmp_path)))
    for sid in ("overview", "curves", "health", "eval", "samples", "data", "config"):
        assert f'<section id="{sid}">' in page
    paths = _paths(page)
    for metric in (
        "loss",
        "eval/loss",
        "rewards/margins",
        "eval/rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "grad_norm",
    ):
        assert metric in paths, metric
    assert paths["loss"].count("M") + paths["loss"].count("L") == TRAIN_STEPS
    assert paths["eval/loss"].count("M") + paths["eval/loss"].count("L") == len(EVAL_STEPS)
    assert "epoch" not in paths
    # eval/loss shares the loss chart's axes
    loss_chart = page.split('id="chart-loss"')[1].split("</svg>")[0]
    assert 'data-metric="eval/loss"' in loss_chart
    # before/after tables with their deltas (0.52 - 0.6931; 0.75 - 0.5 with delta left null)
    assert "<td>eval/loss</td><td>0.6931</td><td>0.52</td><td>-0.1731</td>" in page
    assert "<td>accuracy</td><td>0.5</td><td>0.75</td><td>+0.25</td>" in page
    assert "incomplete: &lt;gone&gt;" in page and "... and 5 more" in page  # long lists cut
    assert "accuracy_saturated_early" in page and "not applicable" in page
    assert "no findings" not in page
    assert "2m 5s" in page and "1,234" in page and "2,048 MB" in page


def test_hostile_text_is_escaped_and_nothing_is_fetched(tmp_path):
    page = render_html(load_run(make_run_dir(tmp_path)))
    assert "<script" not in page and "alert('x')</script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;/td&gt;" in page
    assert "&lt;10% of training&gt;" in page  # health text
    assert "Say &lt;hi&gt;" in page and "hello &amp; bye" in page  # eval.json samples
    assert "Sure: 2 &lt; 3" in page
    for fetch in ("<link", "src=", "url(", "@import", "http://", "https://"):
        assert fetch not in page, fetch


def test_hostile_metric_names_are_escaped(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    name = json.dumps('<b>x"</b>')
    (run / "metrics.jsonl").write_text(f'{{"step": 1, {name}: 1.0}}\n{{"step": 2, {name}: 2}}\n')
    page = render_html(load_run(run))
    assert "<b>" not in page and 'data-metric="&lt;b&gt;x&quot;&lt;/b&gt;"' in page


def test_minimal_run_dir_omits_optional_sections_with_notes(tmp_path):
    page = render_html(load_run(make_run_dir(tmp_path, full=False)))
    assert "not checked: no health data" in page
    assert "no eval.json" in page and "no config.yaml" in page and "no summary.json" in page
    assert "no sample generations" in page and "no data summary" in page
    assert "held-out eval during training" not in page
    assert f"<dd>{TRAIN_STEPS}</dd>" in page  # steps come from the metrics
    assert 'data-metric="loss"' in page


def test_clean_health_says_no_findings(tmp_path):
    run = make_run_dir(tmp_path)
    (run / "health.jsonl").unlink()  # written only when a rule fires
    summary = summary_dict()
    summary["health"]["findings"] = []
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    page = render_html(load_run(run))
    assert '<p class="ok" id="health-clean">no findings</p>' in page
    assert "<td>rejected_logps_collapse</td><td>ok</td>" in page
    assert "2 rules checked, no findings" in page
    assert '<table class="findings">' not in page


def test_health_from_a_run_still_going_or_in_another_shape(tmp_path):
    run = make_run_dir(tmp_path)
    summary = summary_dict()
    del summary["health"]  # no end-of-run account yet: health.jsonl as written so far
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    page = render_html(load_run(run))
    assert "<td>4</td><td>warning</td><td>accuracy_saturated_early</td>" in page
    assert "no findings" not in page and "not checked" not in page
    # rules given as a name -> status mapping
    (run / "health.jsonl").unlink()
    summary["health"] = {"rules": {"nan_loss": "fired"}, "findings": [FINDING | {"rule": "nan"}]}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    page = render_html(load_run(run))
    assert "<td>nan_loss</td><td>fired</td>" in page and "<td>nan</td>" in page


def test_non_finite_metrics_are_reported_not_drawn(tmp_path):
    run = make_run_dir(tmp_path, full=False)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 41, "loss": "nan", "grad_norm": "inf"}\n')
        fh.write('{"step": 42, "loss": 0.1, "odd": "nan"}\n')
    page = render_html(load_run(run))
    assert "loss: 1 NaN/inf value(s), first at step 41; not drawn" in page
    assert "grad_norm: 1 NaN/inf value(s), first at step 41" in page
    assert "odd: no finite values to draw" in page
    d = _paths(page)["loss"]
    assert d.count("M") == 2 and "nan" not in d.lower()  # the NaN breaks the line


# --------------------------------------------------------------------------- command line


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["report", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_cli_writes_the_page_and_prints_its_path(tmp_path):
    run = make_run_dir(tmp_path)
    code, output = invoke(run)
    assert code == 0 and str(run / "report.html") in output
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    code, output = invoke(run, "--output", tmp_path / "elsewhere.html")
    assert code == 0 and (tmp_path / "elsewhere.html").is_file()
    code, output = invoke(run, "--output", tmp_path / "missing-dir" / "r.html")
    assert code != 0 and "cannot write the report" in output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no metrics.jsonl"),
        ("", "empty"),
        ("\n  \n", "empty"),
        ('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n', "metrics.jsonl:2: not valid JSON"),
        ('{"step": 1}\n[1, 2]\n', "metrics.jsonl:2: expected a JSON object"),
        ('{"loss": 1.0}\n', "metrics.jsonl:1: the row has no numeric 'step'"),
    ],
)
def test_cli_bad_metrics_are_clear_errors(tmp_path, content, expected):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content, encoding="utf-8")
    code, output = invoke(run)
    assert code != 0 and expected in output.replace("\n", "")
    assert not (run / "report.html").exists()


def test_cli_bad_paths_are_clear_errors(tmp_path):
    code, output = invoke(tmp_path / "nope")
    assert code != 0 and "no such directory" in output
    (tmp_path / "file.txt").write_text("x")
    code, output = invoke(tmp_path / "file.txt")
    assert code != 0 and "not a directory" in output


def test_corrupt_optional_file_is_a_warning_not_a_failure(tmp_path):
    run = make_run_dir(tmp_path)
    (run / "eval.json").write_text('{"model": ', encoding="utf-8")
    (run / "summary.json").write_text("[1, 2]", encoding="utf-8")
    code, output = invoke(run)
    assert code == 0 and "eval.json: cannot be read" in output.replace("\n", "")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "summary.json: expected a JSON object" in page and "no eval.json" in page


def test_write_report_raises_alignkit_error_for_library_callers(tmp_path):
    with pytest.raises(AlignkitError) as info:
        write_report(tmp_path)
    assert info.value.where == str(tmp_path) and info.value.hint


# --------------------------------------------------------------------------- reading the curves


def _write_run(root: Path, name: str, rows: list[dict], summary: dict | None = None) -> Path:
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _title(page: str) -> str:
    return page.split("<title>")[1].split("</title>")[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dpo", "alignkit report: dpo"),
        ("dpo-hh", "alignkit report: dpo-hh"),
        ("run", "alignkit report: run (dpo)"),
    ],
)
def test_title_names_the_method_once(tmp_path, name, expected):
    run = _write_run(tmp_path, name, [{"step": 1, "loss": 0.69}], {"method": "dpo"})
    page = render_html(load_run(run))
    assert _title(page) == expected and f"<h1>{expected}</h1>" in page


def _chart(page: str, title: str) -> str:
    return page.split(f'id="chart-{title}"')[1].split("</svg>")[0]


def test_accuracy_chart_shows_the_healthy_bands_with_a_legend(tmp_path):
    # Accuracy around 0.5-0.6: the bands (0.70-0.92) must still be inside the plot.
    rows = [{"step": 0, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.01}]
    rows += [{"step": s, "rewards/accuracies": 0.5 + 0.002 * s} for s in range(1, 51)]
    page = render_html(load_run(_write_run(tmp_path, "r", rows)))
    chart = _chart(page, "rewards-accuracies")
    assert 'class="band train"' in chart and 'class="band eval"' in chart
    assert "healthy train 0.75–0.92" in chart and "healthy held-out 0.70–0.90" in chart
    ticks = [float(t) for t in re.findall(r'class="tick y"[^>]*>([-0-9.]+)<', chart)]
    assert min(ticks) <= 0.5 and max(ticks) >= 0.92
    # Other charts have no bands.
    assert 'class="band' not in page.split('id="chart-rewards-accuracies"')[0]


def test_bands_sit_at_their_values():
    curve = [Series("rewards/accuracies", [(0, 0.5), (10, 0.6)], "#000")]
    curve.append(Series("eval/rewards/accuracies", [(0, 0.55), (10, 0.6)], "#000", dashed=True))
    svg = line_chart("rewards/accuracies", curve, bands=BANDS)
    # The held-out band's dashed edges give the y scale; the shaded train band must match it.
    y70, y90 = sorted(
        (float(y) for y in re.findall(r'<line class="band eval" x1="[^"]*" y1="([^"]*)"', svg)),
        reverse=True,
    )
    per_unit = (y70 - y90) / 0.2
    (top, height) = re.findall(
        r'<rect class="band train" x="[^"]*" y="([^"]*)" [^>]*height="([^"]*)"', svg
    )[0]
    assert float(top) == pytest.approx(y90 - 0.02 * per_unit, abs=0.02)
    assert float(height) == pytest.approx(0.17 * per_unit, abs=0.02)
    assert frame_for(curve, bands=BANDS).y_hi >= 0.92  # in view though the data stop at 0.6
    assert 'class="band eval"' not in line_chart("a", curve[:1], bands=BANDS[:1])


def test_all_tie_accuracy_is_not_drawn_as_zero(tmp_path):
    # Before training policy and reference are the same model: every pair ties (margin exactly
    # 0), and the loss module counts a tie as wrong, so the logged accuracy is 0.0.
    tie = {"rewards/accuracies": 0.0, "rewards/margins": 0.0, "rewards/chosen": 0.0}
    rows = [{"step": 0, **{f"eval/{k}": v for k, v in tie.items()}}, {"step": 1, **tie}]
    rows += [{"step": s, "rewards/accuracies": 0.5, "rewards/margins": 0.1} for s in (2, 3)]
    rows += [{"step": 3, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.05}]
    summary = {
        "method": "dpo",
        "eval_before": {"eval/rewards/accuracies": 0.0, "eval/rewards/margins": 0.0},
        "eval_after": {"eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.05},
    }
    page = render_html(load_run(_write_run(tmp_path, "r", rows, summary)))
    paths = _paths(page)
    assert (
        paths["eval/rewards/accuracies"].count("M") + paths["eval/rewards/accuracies"].count("L")
        == 1
    )
    assert paths["rewards/accuracies"].count("M") + paths["rewards/accuracies"].count("L") == 2
    assert "eval/rewards/accuracies at step 0: n/a" in page and "tie" in page
    assert "<td>eval/rewards/accuracies</td><td>n/a</td><td>0.6</td><td>—</td>" in page
    # An accuracy of 0 with a non-zero margin is a real 0 and is drawn.
    rows[1]["rewards/margins"] = -0.2
    page = render_html(load_run(_write_run(tmp_path, "s", rows, summary)))
    assert (
        _paths(page)["rewards/accuracies"].count("M")
        + _paths(page)["rewards/accuracies"].count("L")
        == 3
    )
