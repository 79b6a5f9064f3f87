"""Preflight: what training would see, reported before training."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from alignkit.config import DataConfig
from alignkit.data.preflight import preflight_sft, render_report

GSM8K_MAP = {"question": "prompt", "answer": "completion"}


def gsm8k(data_dir, **kw) -> DataConfig:
    kw.setdefault("limit", 40)
    return DataConfig(train=str(data_dir / "gsm8k" / "train.jsonl"), column_map=GSM8K_MAP, **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_clean_gsm8k_slice(tokenizer, data_dir):
    report = preflight_sft(gsm8k(data_dir, max_length=1024), tokenizer)
    assert report.ok, report.problems
    assert report.format == "prompt_completion"
    assert (report.rows, report.valid_rows, report.stats.kept) == (40, 40, 40)
    for stats in report.lengths.values():
        assert stats.min <= stats.p50 <= stats.p90 <= stats.p99 <= stats.max
    total = report.lengths["total"]
    assert total.max <= report.lengths["prompt"].max + report.lengths["response"].max
    assert report.eot_token == "<|im_end|>" and report.eot_in_loss
    first = json.loads(open(report.source, encoding="utf-8").readline())
    assert f"[[{first['answer']}<|im_end|>]]" in report.example_marked
    assert report.example_marked.count("[[") == 1  # the prompt is masked
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and data["lengths"]["total"]["max"] == total.max
    assert data["example"][0] == {"text": report.example[0][0], "trained": False}


def test_too_short_max_length_is_a_problem_with_a_suggestion(tokenizer, data_dir):
    report = preflight_sft(gsm8k(data_dir, max_length=32), tokenizer)
    assert report.stats.dropped_too_long == 40 and report.stats.kept == 0
    (problem,) = report.problems
    assert "shorter than every prompt" in problem
    assert f"about {report.suggested_max_length}" in problem
    assert report.suggested_max_length % 64 == 0
    assert report.suggested_max_length >= report.lengths["total"].p50


def test_truncation_effects_are_counted(tokenizer, data_dir):
    cap = 200
    drop = preflight_sft(gsm8k(data_dir, max_length=cap), tokenizer)
    cut = preflight_sft(gsm8k(data_dir, max_length=cap, truncation="truncate"), tokenizer)
    error = preflight_sft(gsm8k(data_dir, max_length=cap, truncation="error"), tokenizer)
    over = drop.over_max_length
    assert 0 < over < 40
    assert drop.stats.dropped_too_long == over and drop.ok
    assert any("will be dropped" in w for w in drop.warnings)
    assert cut.stats.truncated == over and cut.stats.kept == 40
    assert any("lose the left of their prompt" in w for w in cut.warnings)
    assert any("truncation=error stops training" in p for p in error.problems)


def test_duplicates_and_empty_responses(tokenizer, tmp_path):
    rows = [{"prompt": "q", "completion": "a"}] * 3 + [{"prompt": "q2", "completion": " "}]
    report = preflight_sft(DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer)
    assert report.duplicates == 2 and report.empty_targets == 1
    assert any("duplicates" in w for w in report.warnings)
    assert any("empty response" in w for w in report.warnings)


def test_end_of_turn_that_is_not_a_token_is_a_problem(tokenizer, data_dir):
    # llama3's <|eot_id|> is plain text to the SmolLM2 tokenizer: the model could not stop.
    report = preflight_sft(gsm8k(data_dir, limit=5), tokenizer, chat_template="llama3")
    assert not report.eot_in_loss
    assert any("never learns to stop" in p for p in report.problems)


def test_template_without_end_marker_is_a_problem(tokenizer, data_dir):
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    jinja += "{% if add_generation_prompt %}assistant: {% endif %}"
    report = preflight_sft(gsm8k(data_dir, limit=5), tokenizer, chat_template=jinja)
    assert any("not an end-of-turn token" in p for p in report.problems)


def test_end_of_turn_that_is_not_eos_is_a_warning(tokenizer, tmp_path):
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
    jinja += "{% if add_generation_prompt %}assistant: {% endif %}"
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    report = preflight_sft(DataConfig(train=src), tokenizer, chat_template=jinja)
    assert report.ok and report.eot_token == "<|endoftext|>" and report.eot_in_loss
    assert any("generation must also stop on it" in w for w in report.warnings)


def test_preference_data_is_named_and_refused(tokenizer, data_dir):
    cfg = DataConfig(train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"), limit=5)
    report = preflight_sft(cfg, tokenizer)
    assert report.format == "hh"
    assert any("not supervised fine-tuning data" in p for p in report.problems)


def test_bad_rows_are_listed_with_their_lines(tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    bad = {"messages": [{"role": "user", "content": "x"}]}
    src = write_jsonl(tmp_path / "m.jsonl", [good, bad, good])
    report = preflight_sft(DataConfig(train=src), tokenizer)
    assert report.valid_rows == 2 and report.stats.kept == 2
    (problem,) = report.problems
    assert f"{src}:2: the conversation has no assistant turn" in problem


def test_eval_file_is_checked(tokenizer, tmp_path, data_dir):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    evals = write_jsonl(tmp_path / "e.jsonl", [{"foo": 1}])
    report = preflight_sft(DataConfig(train=src, eval=evals), tokenizer)
    assert any(p.startswith("eval data:") for p in report.problems)


@pytest.mark.parametrize("max_length", [1024, 32])
def test_render_report(tokenizer, data_dir, max_length):
    report = preflight_sft(gsm8k(data_dir, limit=10, max_length=max_length), tokenizer)
    console = Console(record=True, width=140, color_system=None)
    render_report(report, console)
    out = console.export_text()
    assert "prompt_completion" in out and "p90" in out and "<|im_end|>" in out
    assert ("PROBLEM" in out) == (max_length == 32)
