"""Preflight for KTO data, and every method's preflight accepting what its training reads."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from alignkit.config import DataConfig, RunConfig
from alignkit.data import preflight_for, render_report
from alignkit.data.preference import load_kto_data, load_preference_data
from alignkit.data.prompts import load_prompt_data
from alignkit.data.tokenize import load_sft_data
from alignkit.errors import DataError
from alignkit.methods import TABLE

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def kto_rows(n_good=3, n_bad=2):
    rows = [
        {"prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}.", "label": True}
        for i in range(n_good)
    ]
    rows += [
        {"prompt": f"What is {i} + 2?", "completion": "No idea.", "label": False}
        for i in range(n_bad)
    ]
    return rows


def pair_rows(n=3):
    return [
        {"prompt": f"Name a colour ({i}).", "chosen": "Blue.", "rejected": f"A fish {i}."}
        for i in range(n)
    ]


# One small file per format training reads: the parametrized test below feeds each to each
# method's loader and its preflight.
SAMPLES = {
    "kto": kto_rows,
    "pairs": pair_rows,
    "pairs_conversational": lambda: [
        {"chosen": [msg(U, "Hi?"), msg(A, "Hello!")], "rejected": [msg(U, "Hi?"), msg(A, "Go.")]},
        {"chosen": [msg(U, "Yo?"), msg(A, "Hey!")], "rejected": [msg(U, "Yo?"), msg(A, "No.")]},
    ],
    "prompt_completion": lambda: [
        {"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(1, i + 2)))}
        for i in range(3)
    ],
    "messages": lambda: [{"messages": [msg(U, f"Say {i}."), msg(A, f"{i}.")]} for i in range(3)],
    "prompts": lambda: [{"prompt": f"Solve {i} * 3."} for i in range(3)],
}


def test_native_kto_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", kto_rows(3, 2))
    report = preflight_for("unpaired")(DataConfig(train=path), tokenizer)
    assert report.ok, report.problems
    assert report.kind == "unpaired" and report.format == "kto"
    assert (report.rows, report.valid_rows, report.stats.kept) == (5, 5, 5)
    assert (report.desirable, report.undesirable) == (3, 2)
    assert report.eot_token == "<|im_end|>" and report.eot_in_loss
    assert report.example_marked.endswith("It is 1.<|im_end|>]]")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and (data["desirable"], data["undesirable"]) == (3, 2)


def test_pairs_are_split_as_training_splits_them(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    cfg = DataConfig(train=path)
    report = preflight_for("unpaired")(cfg, tokenizer)
    assert report.ok, report.problems
    assert report.format == "preference" and report.rows == 4
    assert (report.stats.kept, report.desirable, report.undesirable) == (8, 4, 4)
    trained = load_kto_data(cfg, tokenizer, seed=0)
    assert trained.desirable_counts == (report.desirable, report.undesirable)


def test_kto_bad_labels_and_sft_data_are_problems(tokenizer, tmp_path):
    rows = kto_rows(2, 1) + [{"prompt": "Hi", "completion": "Yo", "label": "yes"}]
    report = preflight_for("unpaired")(
        DataConfig(train=write_jsonl(tmp_path / "k.jsonl", rows)), tokenizer
    )
    assert not report.ok and "k.jsonl:4" in report.problems[0]
    sft = write_jsonl(tmp_path / "s.jsonl", SAMPLES["messages"]())
    report = preflight_for("unpaired")(DataConfig(train=sft), tokenizer)
    assert not report.ok and "not KTO data" in report.problems[0]


def test_kto_report_renders(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", kto_rows(3, 2))
    report = preflight_for("unpaired")(DataConfig(train=path, max_length=24), tokenizer)
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "KTO data preflight" in text and "desirable / undesirable" in text


def _run_config(method: str, cfg: DataConfig) -> RunConfig:
    run = {"method": method, "data": cfg.model_dump()}
    if TABLE[method].runner == "rollout":  # a rollout needs a reward source to validate
        run[method] = {"reward_fn": "alignkit.rewards:gsm8k_answer"}
    return RunConfig.model_validate(run)


def _loads(kind: str, cfg: DataConfig, method: str, tokenizer) -> bool:
    """Whether training's loader for this data kind accepts the file."""
    loaders = {
        "sft": lambda: load_sft_data(cfg, tokenizer, seed=0),
        "pairs": lambda: load_preference_data(cfg, tokenizer, seed=0),
        "unpaired": lambda: load_kto_data(cfg, tokenizer, seed=0),
        "prompts": lambda: load_prompt_data(_run_config(method, cfg), tokenizer),
    }
    try:
        loaders[kind]()
    except DataError:
        return False
    return True


@pytest.mark.parametrize("sample", sorted(SAMPLES))
@pytest.mark.parametrize("method", sorted(TABLE))
def test_preflight_accepts_what_training_accepts(method, sample, tokenizer, tmp_path):
    kind = TABLE[method].data
    cfg = DataConfig(train=write_jsonl(tmp_path / f"{sample}.jsonl", SAMPLES[sample]()))
    accepted = _loads(kind, cfg, method, tokenizer)
    report = preflight_for(kind)(cfg, tokenizer)
    assert report.ok == accepted, (accepted, report.format, report.problems)
