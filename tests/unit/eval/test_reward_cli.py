"""`alignkit score` and `alignkit data check --method reward`, in-process through CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.config import LoraConfig, ModelConfig
from alignkit.models import load_model, save_final
from alignkit.models.reward import load_reward_model

COLOUR = [{"role": "user", "content": "Name a colour."}]
ROWS = [
    {"prompt": "How do I boil an egg?", "completion": "Boil it for eight minutes."},
    {"prompt": "Say hi.", "response": "Hi!"},
    {"messages": [*COLOUR, {"role": "assistant", "content": "Blue."}]},
]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory, tiny_model_dir, tokenizer):
    dirs = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(), head="reward")
        torch.nn.init.normal_(model.score.weight, std=1.0)
        out = tmp_path_factory.mktemp(f"rm{seed}")
        save_final(model, tokenizer, out)
        dirs.append(str(out))
    return dirs


def test_score_prints_stats_and_writes_rows(reward_dirs, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out_file = tmp_path / "scores.jsonl"
    result = invoke("score", "--model", reward_dirs[0], "--data", data, "--output", out_file)
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "score"} for w in written] == ROWS
    scorer = load_reward_model(reward_dirs[0], device="cpu")
    prompts = ["How do I boil an egg?", "Say hi.", COLOUR]
    expected = scorer.score(prompts, ["Boil it for eight minutes.", "Hi!", "Blue."])
    got = torch.tensor([w["score"] for w in written])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert f"3 rows: mean {expected.mean().item():.4f}" in result.output
    assert f"max {expected.max().item():.4f}" in result.output


def test_score_with_an_ensemble_takes_the_minimum(reward_dirs, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out_file = tmp_path / "scores.jsonl"
    args = ["score", "--model", reward_dirs[0], "--model", reward_dirs[1], "--combine", "min"]
    result = invoke(*args, "--data", data, "--output", out_file)
    assert result.exit_code == 0, result.output
    got = torch.tensor([json.loads(line)["score"] for line in out_file.read_text().splitlines()])
    prompts = ["How do I boil an egg?", "Say hi.", COLOUR]
    responses = ["Boil it for eight minutes.", "Hi!", "Blue."]
    each = [load_reward_model(d, device="cpu").score(prompts, responses) for d in reward_dirs]
    torch.testing.assert_close(got, torch.minimum(*each), atol=1e-5, rtol=1e-5)


def _clean_failure(result) -> str:
    """Exit code 2 from the CLI's error path, not an exception CliRunner caught."""
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, result.output
    return result.output.replace("\n", " ")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Hi"}, "prompt + completion"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "must end with the assistant turn"),
        ({"prompt": "Hi", "completion": 3}, "must be a string"),
    ],
)
def test_a_bad_row_names_file_and_line(reward_dirs, tmp_path, bad, message):
    data = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], bad])
    output = _clean_failure(invoke("score", "--model", reward_dirs[0], "--data", data))
    assert "rows.jsonl:2" in output
    assert message in output


def test_score_refuses_a_causal_lm(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    output = _clean_failure(invoke("score", "--model", tiny_model_dir, "--data", data))
    assert "not an alignkit/transformers reward model" in output
    assert "method: reward" in output


def test_score_refuses_an_unknown_combine(reward_dirs, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    args = ["score", "--model", reward_dirs[0], "--combine", "max", "--data", data]
    assert "unknown --combine 'max'" in _clean_failure(invoke(*args))


def test_data_check_for_reward_reads_pairs(tiny_model_dir, tmp_path):
    pairs = [
        {"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": "No."}
        for i in range(5)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common = ["data", "check", data, "--model", tiny_model_dir, "--json"]
    reward = invoke(*common, "--method", "reward")
    dpo = invoke(*common, "--method", "dpo")
    assert reward.exit_code == 0, reward.output
    assert json.loads(reward.output) == json.loads(dpo.output)
    assert json.loads(reward.output)["format"] == "preference"
    sft = invoke(*common, "--method", "sft")
    assert json.loads(sft.output) != json.loads(reward.output)  # the method changes the check
