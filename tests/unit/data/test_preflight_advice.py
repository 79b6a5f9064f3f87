"""`alignkit data check` advice from the literature: warnings with their reason, never errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignkit.cli import app


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pairs(tmp_path, n=4):
    rows = [
        {"prompt": f"Name a colour ({i}).", "chosen": "Blue.", "rejected": f"A fish {i}."}
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def kto(tmp_path, good, bad):
    rows = [{"prompt": f"{i} + 1?", "completion": f"{i + 1}.", "label": True} for i in range(good)]
    rows += [{"prompt": f"{i} + 2?", "completion": "No idea.", "label": False} for i in range(bad)]
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def check(*args) -> dict:
    """The --json report of a data check that found no problem (advice is never one)."""
    res = CliRunner().invoke(app, ["data", "check", *[str(a) for a in args], "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def warned(report: dict, text: str) -> list[str]:
    return [w for w in report["warnings"] if text in w]


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a tokenizer that has no chat template, as a base model's."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    out = tmp_path_factory.mktemp("base-model")
    tok.save_pretrained(out)
    shutil.copy(Path(tiny_model_dir) / "config.json", out)  # the tokenizer is all data check loads
    return str(out)


def test_few_pairs_are_noisy(tmp_path, tiny_model_dir):
    report = check(pairs(tmp_path), "--method", "dpo", "--model", tiny_model_dir)
    assert report["ok"]
    (message,) = warned(report, "only 4 pairs")
    assert "fewer than 1,000 are noisy" in message
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    assert not warned(check(sft, "--model", tiny_model_dir), "noisy")


def test_low_beta_on_little_data_overfits(tmp_path, tiny_model_dir):
    data = pairs(tmp_path)
    report = check(data, "--method", "dpo", "--model", tiny_model_dir, "--beta", "0.05")
    (message,) = warned(report, "dpo.beta=0.05 with 4 pairs")
    assert "overfits" in message and "dpo.beta=0.1 or more" in message
    assert not warned(check(data, "--method", "dpo", "--model", tiny_model_dir), "beta")


def test_beta_for_a_method_without_one_is_an_error(tmp_path, tiny_model_dir):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    res = CliRunner().invoke(app, ["data", "check", sft, "--model", tiny_model_dir, "--beta", "1"])
    assert res.exit_code == 2 and "--beta: sft has no beta" in res.output


def test_preference_from_a_model_without_chat_template(tmp_path, base_model_dir):
    data = pairs(tmp_path)
    (message,) = warned(check(data, "--method", "dpo", "--model", base_model_dir), "chat template")
    assert "run sft on the same format first" in message and "model.chat_template" in message
    # a reward model scores text: it needs no chat skills of its own
    assert not warned(check(data, "--method", "reward", "--model", base_model_dir), "chat tem")


def test_config_supplies_method_model_data_and_knobs(tmp_path, base_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"method: dpo\nmodel: {{name: {base_model_dir}, chat_template: chatml}}\n"
        f"data: {{train: {pairs(tmp_path)}, max_length: 256}}\ndpo: {{beta: 0.02}}\n",
        encoding="utf-8",
    )
    report = check("--config", config)
    assert report["max_length"] == 256
    assert warned(report, "dpo.beta=0.02 with 4 pairs")
    assert not warned(report, "chat template")  # model.chat_template sets one
    assert warned(check("--config", config, "--beta", "0.2"), "beta") == []


def test_kto_imbalance_names_the_weight_to_change(tmp_path, tiny_model_dir):
    data = kto(tmp_path, good=6, bad=2)
    report = check(data, "--method", "kto", "--model", tiny_model_dir)
    (message,) = warned(report, "75% desirable")
    # 6 / (7/6 * 2) = 2.57 puts the weighted ratio in the middle of [1, 4/3]
    assert "ratio" in message and "3.00" in message and "kto.undesirable_weight=2.57" in message
    few_good = kto(tmp_path, good=2, bad=6)
    assert warned(check(few_good, "--method", "kto", "--model", tiny_model_dir), "desirable_weight")
    balanced = kto(tmp_path, good=4, bad=4)
    assert not warned(check(balanced, "--method", "kto", "--model", tiny_model_dir), "ratio")


def test_kto_weights_from_config_count(tmp_path, tiny_model_dir):
    config = tmp_path / "kto.yaml"
    config.write_text(
        f"method: kto\nmodel: {{name: {tiny_model_dir}}}\n"
        f"data: {{train: {kto(tmp_path, good=6, bad=2)}}}\nkto: {{undesirable_weight: 2.5}}\n",
        encoding="utf-8",
    )
    assert not warned(check("--config", config), "ratio")  # 6 / (2.5 * 2) = 1.2
