"""Plain log-likelihood preference: the same sums as a plain forward, and the counts by hand."""

import pytest
import torch

from alignkit.data.preference import PairExample
from alignkit.eval.preference import PairScores, loglik_preference, pair_logps, pair_scores
from alignkit.train.forward import LogpsModel
from tests.conftest import make_tiny_model


def plain_sum(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    start = len(prompt) - 1
    return logp[start:].gather(1, ids[0, 1:][start:, None]).sum().item()


def random_pairs(n=5):
    g = torch.Generator().manual_seed(1)

    def ids(k):
        return torch.randint(3, 900, (k,), generator=g).tolist()

    return [PairExample(ids(3 + i), ids(2 + i % 3), ids(6 - i % 4)) for i in range(n)]


def test_pair_scores_equal_plain_forward_sums():
    model = make_tiny_model(seed=2)
    pairs = random_pairs()
    scores = pair_scores(LogpsModel(model), pairs, pad_id=2, batch_size=2)
    for i, ex in enumerate(pairs):
        hand = [plain_sum(model, ex.prompt_ids, r) for r in (ex.chosen_ids, ex.rejected_ids)]
        assert scores.logps[i].tolist() == pytest.approx(hand, abs=1e-4)
        assert scores.tokens[i].tolist() == [len(ex.chosen_ids), len(ex.rejected_ids)]
    # the older helper gives the same sums
    assert torch.allclose(pair_logps(LogpsModel(model), pairs, 2, 3), scores.logps, atol=1e-5)


def test_loglik_preference_by_hand():
    scores = PairScores(
        logps=torch.tensor([[-4.0, -6.0], [-10.0, -6.0], [-3.0, -3.5]]),
        tokens=torch.tensor([[2.0, 2.0], [10.0, 3.0], [1.0, 7.0]]),
    )
    # sum margins: 2, -4, 0.5 -> 2 of 3 prefer chosen; per token: (-2,-3), (-1,-2), (-3,-0.5)
    # margins 1, 1, -2.5 -> 2 of 3
    pref = loglik_preference(scores)
    assert pref.accuracy == pytest.approx(2 / 3)
    assert pref.accuracy_norm == pytest.approx(2 / 3)
    assert pref.margin == pytest.approx((2 - 4 + 0.5) / 3)
    assert pref.margin_norm == pytest.approx((1 + 1 - 2.5) / 3)
    assert pref.pairs == 3
    # length normalisation changes the verdict where lengths differ a lot
    only_second = loglik_preference(PairScores(scores.logps[1:2], scores.tokens[1:2]))
    assert (only_second.accuracy, only_second.accuracy_norm) == (0.0, 1.0)
