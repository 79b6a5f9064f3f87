"""`method: reward` through the shared training run on a tiny model: it learns, records reward
stats, and its final/ scores the eval split as training measured it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError, DataError
from alignkit.methods import spec
from alignkit.models.reward import REWARD_INFO, last_token_index, load_reward_model
from alignkit.train.method import build_method
from alignkit.train.reward import row_margin
from alignkit.train.run import run_training

# The chosen reply always praises, the rejected one always refuses: learnable by a tiny model.
TRAIN = [
    {"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is great.", "rejected": "No."}
    for i in range(24)
]
EVAL = [
    {"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is great.", "rejected": "No."}
    for i in range(100, 106)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


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


def test_margin_column_is_read_per_pair(tmp_path, tokenizer):
    rows = [dict(TRAIN[0], rating_gap=2.5), dict(TRAIN[1]), dict(TRAIN[2], rating_gap=0)]
    overrides = [
        "method=reward",
        f"data.train={write_jsonl(tmp_path / 'm.jsonl', rows)}",
        "data.column_map={rating_gap: margin}",
    ]
    setup = build_method(load_config(None, overrides), tokenizer)
    assert [it.example.margin for it in setup.train] == [2.5, 0.0, 0.0]
    assert setup.info["pairs_with_margin"] == 2
    assert spec("reward").head == "reward"  # loaded with a score head
    batch = setup.method.collate(setup.train)
    assert batch["margin"].tolist() == [2.5, 0.0, 0.0]
    ignored = build_method(load_config(None, [*overrides, "reward.use_margin=false"]), tokenizer)
    assert [it.example.margin for it in ignored.train] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["big", True, float("nan"), [1]])
def test_a_bad_margin_names_its_row(bad):
    with pytest.raises(DataError, match="finite number") as info:
        row_margin({"margin": bad}, "pairs.jsonl:7", {})
    assert info.value.where == "pairs.jsonl:7"


def test_bad_margin_in_a_file_names_file_and_line(tmp_path, tokenizer):
    rows = [dict(TRAIN[0], margin=1), dict(TRAIN[1], margin="high")]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = load_config(None, ["method=reward", f"data.train={path}"])
    with pytest.raises(DataError) as info:
        build_method(cfg, tokenizer)
    assert info.value.where == f"{path}:2"


def test_reward_config_section_and_refusals():
    cfg = load_config(None, ["method=reward", "reward.center_coef=0.01"])
    text = cfg.to_yaml()
    assert "reward:" in text and "center_coef: 0.01" in text and "reference:" not in text
    with pytest.raises(ConfigError, match="reference"):
        load_config(None, ["method=reward", "reference.model=foo"])
    with pytest.raises(ConfigError, match="sample_prompts"):
        load_config(None, ["method=reward", "train.sample_prompts=[hi]"])
    with pytest.raises(ConfigError, match="center_coef"):
        load_config(None, ["method=reward", "reward.center_coef=-1"])


def test_loss_weights_each_pair_equally(tmp_path, tokenizer):
    """The unit is the pair: a step's loss is the mean of per-pair losses, not per response."""
    path = write_jsonl(tmp_path / "p.jsonl", TRAIN[:3])
    cfg = load_config(None, ["method=reward", f"data.train={path}"])
    setup = build_method(cfg, tokenizer)
    batch = setup.method.collate(setup.train)
    assert setup.method.units(batch) == 3.0
    fixed = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 3.0])  # (2B,) chosen then rejected

    class Fixed(torch.nn.Module):
        def forward(self, **kwargs):
            return fixed

    out = setup.method.step(Fixed(), batch)
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 0.0, -1.0))
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("parity", [False, True], ids=["shared", "plain"])
def test_real_hh_pairs_are_read_at_their_end_of_turn(data_dir, tokenizer, parity):
    path = data_dir / "hh-rlhf-harmless" / "pairs.jsonl"
    overrides = [
        "method=reward",
        f"data.train={path}",
        "data.limit=40",
        "data.eval_size=8",
        "data.max_length=512",
        "data.truncation=truncate",
        f"train.parity={str(parity).lower()}",
    ]
    setup = build_method(load_config(None, overrides), tokenizer)
    assert setup.info["format"] == "hh" and setup.info["pairs_with_margin"] == 0
    assert len(setup.eval) == 8 and len(setup.train) + len(setup.eval) <= 40
    batch = setup.method.collate(setup.train[:4])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if parity:  # (2B, T) rows read at the last real token, found by the model from the mask
        read = batch["input_ids"][torch.arange(8), last_token_index(batch["attention_mask"])]
    else:
        read = batch["input_ids"][batch["read_rows"], batch["read_cols"]]
    assert read.tolist() == [end] * 8
