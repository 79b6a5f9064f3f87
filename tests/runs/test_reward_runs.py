"""`method: reward` through the shared training run on a tiny model: it learns, records reward
stats, and its final/ scores the eval split as training measured it."""

from __future__ import annotations

import json

import pytest

from alignkit.config import load_config
from alignkit.models.reward import REWARD_INFO, load_reward_model
from alignkit.train.run import run_training
from tests.unit.train.test_reward_train import EVAL, TRAIN, write_jsonl


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reward-run")
    cfg = load_config(
        None,
        [
            "method=reward",
            f"model.name={tiny_model_dir}",
            f"data.train={write_jsonl(root / 'train.jsonl', TRAIN)}",
            f"data.eval={write_jsonl(root / 'eval.jsonl', EVAL)}",
            "lora.enabled=true",
            "lora.r=4",
            "train.max_steps=12",
            "train.batch_size=4",
            "train.lr=3e-3",
            "train.scheduler=constant",
            "train.progress=false",
            "reward.center_coef=0.01",
            f"output_dir={root / 'run'}",
        ],
    )
    summary = run_training(cfg, log=lambda message: None)
    return root / "run", summary


def test_training_lowers_the_held_out_loss(reward_run):
    _, summary = reward_run
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval/loss"] < before["eval/loss"] - 0.05
    assert after["eval/accuracy"] >= before["eval/accuracy"]
    assert summary["method"] == "reward"
    assert summary["data"]["layout"] == "prefix-shared, packed"


def test_metrics_are_logged_train_and_eval(reward_run):
    run_dir, _ = reward_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "accuracy" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(train) == 12 and len(evals) == 2
    for r in train:
        assert r["rewards/min"] <= r["rewards/mean"] <= r["rewards/max"]
        assert r["margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    for r in evals:
        assert r["eval/rewards/min"] <= r["eval/rewards/mean"] <= r["eval/rewards/max"]
    assert train[-1]["loss"] < train[0]["loss"]


def test_reward_stats_recorded_and_reloaded(reward_run):
    run_dir, summary = reward_run
    stats = summary["reward_stats"]
    assert stats["split"] == "eval" and stats["responses"] == 2 * len(EVAL)
    info = json.loads((run_dir / "final" / REWARD_INFO).read_text())
    assert info["type"] == "reward"
    assert (info["mean"], info["std"]) == (stats["mean"], stats["std"])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["reward_stats"] == stats
    # final/ reloaded from the run directory scores the eval responses as training measured them
    scorer = load_reward_model(str(run_dir), device="cpu")
    assert scorer.stats == {"mean": stats["mean"], "std": stats["std"]}
    prompts = [r["prompt"] for r in EVAL] * 2
    responses = [r["chosen"] for r in EVAL] + [r["rejected"] for r in EVAL]
    scores = scorer.score(prompts, responses)
    assert scores.mean().item() == pytest.approx(stats["mean"], abs=1e-4)
    assert scores.std(correction=0).item() == pytest.approx(stats["std"], abs=1e-4)
    n = len(EVAL)
    assert (scores[:n] > scores[n:]).float().mean().item() == pytest.approx(stats["accuracy"])
