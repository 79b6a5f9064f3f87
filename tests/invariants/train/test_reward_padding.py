"""A reward is read at the last real token: padding side, batch company and layout change nothing.

Rows end with id 2, which is both EOS and the pad id of the default model, so a rule that finds
the last token by comparing ids with the pad id would read the wrong position here.

The training layout (pairs packed into one unpadded row, attention per pair block) gives every
reply the score, and the model the gradient, of its own plain row run alone. The check can fail:
a spy shows attention is cut per pair block (so the spans reach it), and reading one column
early gives other scores.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.data.pair_batching import collate_rows
from alignkit.data.preference import PairExample
from alignkit.models.reward import RewardModel
from alignkit.ops import packed_attention
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


# Unequal lengths, and an empty rejected reply: its plain row is the prompt alone, read at the
# prompt's last token, not at the end of the pair's block (the chosen reply's last token).
PAIRS = [
    RewardPair(PairExample([5, 9, 14], [33, 40, EOS], [41, EOS]), 0.0),
    RewardPair(PairExample([7], [21, 22, 23, 24, EOS], [25, EOS]), 1.0),
    RewardPair(PairExample([11, 12, 13, 14], [16, EOS], [17, 18, 19, 20, 21, EOS]), 0.0),
    RewardPair(PairExample([8, 6], [30, 31, EOS], []), 0.0),
]


def scores_and_grads(module: RewardModel, batches: list[dict]) -> tuple[torch.Tensor, dict]:
    """(S,) scores of the batches in turn, and the gradient of a weighted sum of them (weights
    make every score count, each differently)."""
    module.zero_grad(set_to_none=True)
    method = RewardMethod(PAD, 0.0, shared=True)
    scores = torch.cat([method.rewards(module, b) for b in batches])
    (scores * torch.linspace(0.5, 1.5, len(scores))).sum().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    return scores.detach(), grads


def alone(e: PairExample, reply: list[int]) -> dict:
    """One plain row, prompt + reply, run by itself."""
    ids = torch.tensor([e.prompt_ids + reply])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pairs_give_the_scores_and_gradients_of_plain_rows(attn):
    module = RewardModel(tiny_reward_model(attn).train())
    packed = collate_reward(PAIRS, PAD, shared=True)
    assert packed["input_ids"].shape == (1, sum(p.pair.shared_len for p in PAIRS))  # no padding
    assert packed["tokens"] == packed["input_ids"].numel()
    rows = [alone(p.pair, p.pair.chosen_ids) for p in PAIRS]
    rows += [alone(p.pair, p.pair.rejected_ids) for p in PAIRS]
    r_packed, g_packed = scores_and_grads(module, [packed])
    r_plain, g_plain = scores_and_grads(module, rows)
    assert r_packed.shape == (2 * len(PAIRS),)
    torch.testing.assert_close(r_packed, r_plain, atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_plain.keys() and len(g_packed) > 0
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], atol=1e-5, rtol=1e-4)
    # the plain (parity) layout agrees too
    r_parity, _ = scores_and_grads(module, [collate_reward(PAIRS, PAD, shared=False)])
    torch.testing.assert_close(r_parity, r_plain, atol=1e-5, rtol=1e-5)


def test_packed_attention_is_cut_per_pair_and_the_read_column_matters(monkeypatch):
    module = RewardModel(tiny_reward_model())
    packed = collate_reward(PAIRS, PAD, shared=True)
    packed_attention.install()
    inner = packed_attention._replaced["sdpa"]
    widths = []

    def spy(mod, query, *args, **kwargs):
        widths.append(query.shape[2])
        return inner(mod, query, *args, **kwargs)

    monkeypatch.setitem(packed_attention._replaced, "sdpa", spy)
    with torch.no_grad():
        scores = RewardMethod(PAD, 0.0, shared=True).rewards(module, packed)
        early = dict(packed, read_cols=packed["read_cols"] - 1)
        shifted = RewardMethod(PAD, 0.0, shared=True).rewards(module, early)
    layers = module.model.config.num_hidden_layers
    # each layer attends block by block, never the whole row: two forwards of `layers` layers
    assert widths == [p.pair.shared_len for p in PAIRS] * layers * 2
    assert (scores - shifted).abs().max() > 1e-3
