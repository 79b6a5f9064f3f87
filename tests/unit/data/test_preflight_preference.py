"""Preflight for preference data: what DPO-style training would see, reported first."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from alignkit.config import DataConfig
from alignkit.data import preflight_preference, render_report

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def hh(data_dir, **kw) -> DataConfig:
    kw.setdefault("limit", 40)
    return DataConfig(train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"), **kw)


def test_clean_hh_slice(tokenizer, data_dir):
    report = preflight_preference(hh(data_dir, max_length=2048), tokenizer)
    assert report.ok, report.problems
    assert report.kind == "preference" and report.format == "hh"
    assert (report.rows, report.valid_rows, report.stats.kept) == (40, 40, 40)
    assert set(report.lengths) == {"prompt", "chosen", "rejected", "total"}
    for stats in report.lengths.values():
        assert stats.min <= stats.p50 <= stats.p90 <= stats.p99 <= stats.max
    lengths = report.lengths
    assert lengths["total"].max <= lengths["prompt"].max + max(
        lengths["chosen"].max, lengths["rejected"].max
    )
    assert report.eot_token == "<|im_end|>" and report.eot_in_loss
    assert report.identical_pairs == report.duplicates == report.prompt_mismatch == 0
    # One rendered pair: the shared prompt masked, each reply (with <|im_end|>) in the loss.
    assert report.example_marked.count("[[") == 1
    assert report.example_marked.endswith("pens.<|im_end|>]]")
    assert report.example[0] == report.example_rejected[0]
    assert report.example_rejected[1][0].endswith("It’s really funny.<|im_end|>")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and data["kind"] == "preference"
    assert data["example_rejected"][1]["trained"] is True


def test_real_empty_responses_are_warned(tokenizer, data_dir):
    report = preflight_preference(hh(data_dir, limit=90, max_length=2048), tokenizer)
    assert report.empty_targets == 1  # line 87: "\n\nAssistant: " with nothing after it
    assert report.lengths["chosen"].min == 1  # only <|im_end|>
    assert report.ok and any("empty response" in w for w in report.warnings)


def test_content_findings(tokenizer, tmp_path):
    pair = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    same = {"prompt": "q2", "chosen": "same", "rejected": "same"}
    empty = {"prompt": "q3", "chosen": "", "rejected": "bad"}
    mismatch = {
        "prompt": "q4",
        "chosen": [msg(U, "q4"), msg(A, "good")],
        "rejected": [msg(U, "something else"), msg(A, "bad")],
    }
    src = write_jsonl(tmp_path / "p.jsonl", [pair, pair, same, empty, mismatch])
    report = preflight_preference(DataConfig(train=src), tokenizer)
    assert report.ok, report.problems
    assert (report.rows, report.valid_rows) == (5, 4)
    assert report.duplicates == 1 and report.identical_pairs == 1 and report.empty_targets == 1
    assert report.prompt_mismatch == 1 and report.stats.dropped_prompt_mismatch == 1
    assert report.stats.kept == 4 and report.stats.identical == 1
    text = " | ".join(report.warnings)
    needles = ["exact duplicates", "chosen identical", "empty response", "different prompts"]
    assert all(needle in text for needle in needles), text


def test_nothing_usable_is_a_problem(tokenizer, tmp_path):
    row = {
        "chosen": [msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d")],
        "rejected": [msg(U, "a"), msg(A, "x"), msg(U, "c"), msg(A, "d")],
    }
    src = write_jsonl(tmp_path / "p.jsonl", [row])
    report = preflight_preference(DataConfig(train=src), tokenizer)
    assert not report.ok and report.prompt_mismatch == 1
    assert any("no usable pair" in p for p in report.problems)


def test_too_short_max_length_is_a_problem_with_a_suggestion(tokenizer, data_dir):
    report = preflight_preference(hh(data_dir, max_length=24), tokenizer)
    assert report.stats.kept == 0 and not report.ok
    assert any(f"about {report.suggested_max_length}" in p for p in report.problems)


def test_truncation_effects_are_counted(tokenizer, data_dir):
    cap = 160
    drop = preflight_preference(hh(data_dir, max_length=cap), tokenizer)
    cut = preflight_preference(hh(data_dir, max_length=cap, truncation="truncate"), tokenizer)
    error = preflight_preference(hh(data_dir, max_length=cap, truncation="error"), tokenizer)
    over, damaged = drop.over_max_length, drop.damaged
    assert 0 < damaged < over < 40 and cut.damaged == damaged
    assert drop.ok and drop.stats.dropped_too_long == over and drop.stats.kept == 40 - over
    assert any("will be dropped" in w for w in drop.warnings)
    assert cut.ok and cut.stats.truncated == over - damaged
    assert cut.stats.dropped_damaged == damaged and cut.stats.kept == 40 - damaged
    assert any("lose the left of their prompt" in w for w in cut.warnings)
    assert any("dropped under every policy" in w for w in cut.warnings)
    (problem,) = error.problems
    assert "truncation=error stops training at the first" in problem
    assert f"{error.source}:" in problem


def test_bad_rows_are_problems_with_their_lines(tokenizer, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    src = write_jsonl(tmp_path / "p.jsonl", [good, {"prompt": "q", "chosen": "a"}, good])
    report = preflight_preference(DataConfig(train=src), tokenizer)
    assert report.valid_rows == 2 and report.stats.kept == 2
    (problem,) = report.problems
    assert f"{src}:2: row has no 'rejected' column" in problem


def test_sft_data_is_named_and_refused(tokenizer, data_dir):
    cfg = DataConfig(
        train=str(data_dir / "gsm8k" / "train.jsonl"),
        column_map={"question": "prompt", "answer": "completion"},
        limit=5,
    )
    report = preflight_preference(cfg, tokenizer)
    assert report.format == "prompt_completion"
    assert any("is not preference data" in p for p in report.problems)


def test_eval_file_is_checked(tokenizer, tmp_path, data_dir):
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "completion": "a"}])
    report = preflight_preference(hh(data_dir, limit=3, eval=evals), tokenizer)
    assert any(p.startswith("eval data:") for p in report.problems)
    ok = preflight_preference(hh(data_dir, limit=3, eval=hh(data_dir).train), tokenizer)
    assert ok.eval_rows == 1800


@pytest.mark.parametrize("max_length", [2048, 24])
def test_render_report(tokenizer, data_dir, max_length):
    report = preflight_preference(hh(data_dir, limit=10, max_length=max_length), tokenizer)
    console = Console(record=True, width=140, color_system=None)
    render_report(report, console)
    out = console.export_text()
    assert "Preference data preflight" in out and "hh" in out and "p90" in out
    assert "rejected" in out and "Example, rejected" in out and "<|im_end|>" in out
    assert ("PROBLEM" in out) == (max_length == 24)
