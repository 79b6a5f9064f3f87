"""`method: reward`'s pieces: margins per pair, the config section and its refusals, equal pair
weights, and where real HH pairs are read. Whole runs: tests/runs/test_reward_runs.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError, DataError
from alignkit.methods import spec
from alignkit.models.reward import last_token_index
from alignkit.train.method import build_method
from alignkit.train.reward import row_margin

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
