"""A reward is read at the last real token: padding side, batch company and layout change nothing.

Rows end with id 2, which is both EOS and the pad id of the default model, so a rule that finds
the last token by comparing ids with the pad id would read the wrong position here.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.data.pair_batching import collate_rows
from alignkit.data.preference import PairExample
from alignkit.models.reward import RewardModel
from alignkit.train.reward import RewardMethod, RewardPair, collate_reward
from tests.conftest import tiny_llama_config

PAD = EOS = 2
ROWS = [
    ([5, 9, 14], [33, 40, EOS]),
    ([7], [21, EOS]),
    ([11, 12, 13, 14, 15], [16, 17, 18, 19, EOS]),
]


def tiny_reward_model(attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_llama_config(num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores well apart from each other
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_and_right_padding_and_single_rows_agree(attn):
    module = RewardModel(tiny_reward_model(attn))
    with torch.no_grad():
        scores = {}
        for side in ("right", "left"):
            batch = collate_rows(ROWS, PAD, side)
            scores[side] = module(batch["input_ids"], batch["attention_mask"])
        alone = torch.cat(
            [
                module(torch.tensor([p + r]), torch.ones(1, len(p + r), dtype=torch.long))
                for p, r in ROWS
            ]
        )
    assert scores["right"].shape == (3,)
    torch.testing.assert_close(scores["right"], scores["left"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["right"], alone, atol=1e-5, rtol=1e-5)
    assert (alone[0] - alone[1]).abs() > 1e-3  # the check compares different numbers


def test_reading_before_the_eos_would_differ():
    """Guards the test above: the score at the token before the closing EOS is another number."""
    module = RewardModel(tiny_reward_model())
    p, r = ROWS[0]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        last = module(ids, torch.ones_like(ids))
        before = module(ids[:, :-1], torch.ones_like(ids[:, :-1]))
    assert (last - before).abs().item() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_shared_layout_matches_plain_rows(attn):
    pairs = [
        RewardPair(PairExample([5, 9, 14], [33, 40, EOS], [41, EOS]), 0.0),
        RewardPair(PairExample([7], [21, 22, 23, 24, EOS], [25, EOS]), 1.0),
        RewardPair(PairExample([11, 12, 13, 14], [16, EOS], [17, 18, 19, 20, 21, EOS]), 0.0),
    ]
    module = RewardModel(tiny_reward_model(attn))
    with torch.no_grad():
        plain = RewardMethod(PAD, 0.0, shared=False)
        shared = RewardMethod(PAD, 0.0, shared=True)
        r_plain = plain.rewards(module, collate_reward(pairs, PAD, shared=False))
        r_shared = shared.rewards(module, collate_reward(pairs, PAD, shared=True))
    assert r_plain.shape == (6,)
    torch.testing.assert_close(r_shared, r_plain, atol=1e-5, rtol=1e-5)
