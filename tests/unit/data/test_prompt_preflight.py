"""Preflight for PPO prompts: what rollouts would start from, checked as training reads it."""

from __future__ import annotations

import json

from rich.console import Console
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.config import DataConfig, load_config
from alignkit.data import render_report
from alignkit.data.io import read_located
from alignkit.data.prompt_preflight import preflight_prompts
from alignkit.data.prompts import build_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def gsm8k_slice(data_dir, tmp_path, n=40):
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check(model_dir, *args):
    # A tiny model with the default model's tokenizer: no model download
    args = (*args, "--model", model_dir)
    res = CliRunner().invoke(app, ["data", "check", *[str(a) for a in args]])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def test_cli_gsm8k_with_column_map_matches_what_training_keeps(
    tokenizer, data_dir, tmp_path, tiny_model_dir
):
    src = gsm8k_slice(data_dir, tmp_path)
    res = check(tiny_model_dir, 
        src, "--method", "ppo", "--column-map", "question=prompt", "--max-length", "256",
        "--max-new-tokens", "160", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["ok"] and report["kind"] == "prompts" and report["format"] == "prompt_only"
    assert (report["rows"], report["valid_rows"], report["prompt_budget"]) == (40, 40, 96)
    lengths = report["lengths"]["prompt"]
    ranked = [lengths[k] for k in ("min", "p50", "p90", "p99", "max")]
    assert 0 < ranked[0] and ranked == sorted(ranked)
    # A 96-token budget cuts into GSM8K questions (system turn included): some are dropped.
    stats = report["stats"]
    assert 0 < stats["dropped_too_long"] == report["over_max_length"] < 40
    assert stats["kept"] + stats["dropped_too_long"] == 40 and stats["truncated"] == 0
    assert report["suggested_max_length"] >= 160 + lengths["p99"]
    assert any("prompt budget" in w and "dropped" in w for w in report["warnings"])
    # The example is one rendered prompt, ending where the policy starts its reply.
    (example,) = report["example"]
    assert example["trained"] is False and example["text"].endswith("<|im_start|>assistant\n")
    assert "Natalia sold clips" in example["text"]
    # The same counts as the loader PPO trains from.
    cfg = load_config(None, [
        "method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_answer", f"data.train={src}",
        "data.column_map={question: prompt}", "data.max_length=256", "ppo.max_new_tokens=160",
    ])  # fmt: skip
    kept, train_stats = build_prompts(read_located(str(src)), "prompt_only", cfg, tokenizer)
    assert (train_stats.kept, train_stats.dropped_too_long) == (
        stats["kept"],
        stats["dropped_too_long"],
    )
    assert max(len(k.prompt_ids) for k in kept) <= 96


def test_cli_gsm8k_without_column_map_fails_with_the_fix(data_dir, tmp_path, tiny_model_dir):
    res = check(tiny_model_dir, gsm8k_slice(data_dir, tmp_path, 5), "--method", "ppo")
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "PPO prompt preflight" in text and "PROBLEM" in text
    assert "answer, question" in text and "column_map" in text


def test_cli_hh_pairs_give_their_shared_prompt(data_dir, tiny_model_dir):
    src = data_dir / "hh-rlhf-harmless" / "pairs.jsonl"
    res = check(
        tiny_model_dir, src, "--method", "ppo", "--max-length", "512", "--truncation", "truncate"
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "PPO prompt preflight" in text and "hh" in text and "No problems found" in text
    assert "384 tokens" in text  # 512 - the default 128 new tokens
    assert "will lose their left side" in text
    res = check(tiny_model_dir, src, "--method", "ppo", "--max-length", "512", "--json")
    report = json.loads(res.output)
    assert report["format"] == "hh" and report["rows"] == report["valid_rows"] == 1800
    assert report["duplicates"] >= 1 and report["empty_prompts"] == 0
    # The prompt ends at the last human turn: neither reply is in it.
    first = json.loads(src.read_text(encoding="utf-8").splitlines()[0])
    reply = first["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    example = report["example"][0]["text"]
    assert example.endswith("<|im_start|>assistant\n") and reply[:40] not in example


def test_truncation_error_meeting_a_long_prompt_is_a_problem(tokenizer, tmp_path):
    rows = [{"prompt": "short question"}, {"prompt": "word " * 300}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(train=src, max_length=256, truncation="error")
    report = preflight_prompts(cfg, tokenizer, max_new_tokens=128)
    assert not report.ok and report.over_max_length == 1
    assert "truncation=error" in report.problems[0] and "p.jsonl:2" in report.problems[0]
    report = preflight_prompts(cfg.model_copy(update={"truncation": "truncate"}), tokenizer)
    assert report.ok and report.stats.truncated == 1 and report.stats.kept == 2


def test_no_room_for_a_prompt_is_a_problem(tokenizer, tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    res = check(
        tiny_model_dir, src, "--method", "ppo", "--max-length", "128", "--max-new-tokens", "128"
    )
    assert res.exit_code == 1
    assert "leaves no room for a prompt" in " ".join(res.output.split())


def test_every_prompt_too_long_leaves_nothing(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 200}] * 3)
    report = preflight_prompts(DataConfig(train=src, max_length=160), tokenizer, max_new_tokens=64)
    assert report.stats.kept == 0 and report.stats.dropped_too_long == 3
    assert any(p.startswith("no usable prompt") for p in report.problems)


def test_duplicates_empty_prompts_and_conversations(tokenizer, tmp_path):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [{"prompt": "a"}, {"prompt": "a"}, {"prompt": "  "}, conv]
    src = write_jsonl(tmp_path / "p.jsonl", rows[:3])
    report = preflight_prompts(DataConfig(train=src), tokenizer, system_prompt="Be brief.")
    assert report.ok, report.problems
    assert report.duplicates == 1 and report.empty_prompts == 1
    assert "Be brief." in report.example[0][0]
    text = " | ".join(report.warnings)
    assert "exact duplicates" in text and "empty user message" in text
    only_empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}, {"prompt": " "}])
    report = preflight_prompts(DataConfig(train=only_empty), tokenizer)
    assert not report.ok and "every kept prompt" in report.problems[0]
    messages = write_jsonl(tmp_path / "m.jsonl", [conv])
    report = preflight_prompts(DataConfig(train=messages), tokenizer)
    assert report.ok and report.format == "messages"
    assert "yo" not in report.example[0][0] and "hi" in report.example[0][0]


def test_format_without_prompts_and_unconvertible_rows(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    report = preflight_prompts(DataConfig(train=src), tokenizer)
    assert not report.ok and "holds no prompts for PPO" in report.problems[0]
    src = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "ok"}, {"prompt": 7}])
    report = preflight_prompts(DataConfig(train=src), tokenizer)
    assert report.valid_rows == 1 and "b.jsonl:2" in report.problems[0]


def test_rendered_report_flags_prompts_over_the_budget(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}, {"prompt": "word " * 100}])
    report = preflight_prompts(DataConfig(train=src, max_length=128), tokenizer, max_new_tokens=64)
    console = Console(record=True, width=200)
    render_report(report, console)
    text = " ".join(console.export_text().split())
    assert "PPO prompt preflight" in text and "64 tokens" in text
    assert "1 prompts longer than the prompt budget (64)" in text
    assert "Example prompt" in text and "warning:" in text
