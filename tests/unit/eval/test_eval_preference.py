"""Held-out implicit-reward accuracy."""

import pytest
import torch

from alignkit.config import LoraConfig
from alignkit.data.preference import PairExample
from alignkit.eval.preference import adapter_pair_accuracy, implicit_reward_accuracy
from alignkit.models.lora import apply_lora
from tests.conftest import make_tiny_model


def test_accuracy_and_margin_by_hand():
    policy = torch.tensor([[-10.0, -12.0], [-8.0, -7.0], [-5.0, -9.0]])
    ref = torch.tensor([[-11.0, -11.0], [-8.0, -8.0], [-5.0, -5.0]])
    # log-ratios (chosen, rejected): (1, -1), (0, 1), (0, -4); margins x beta=0.5: 1, -0.5, 2
    acc = implicit_reward_accuracy(policy, ref, beta=0.5)
    assert acc.accuracy == pytest.approx(2 / 3)
    assert acc.margin == pytest.approx((1 - 0.5 + 2) / 3)
    assert acc.pairs == 3


def test_fresh_adapter_has_zero_margin_then_moves():
    torch.manual_seed(0)
    model = apply_lora(make_tiny_model(), LoraConfig(enabled=True, r=4, dropout=0.0))
    pairs = [PairExample([5, 6, 7], [8, 9], [10, 11, 12]) for _ in range(3)]
    fresh = adapter_pair_accuracy(model, pairs, beta=0.1, pad_id=2)
    assert fresh.margin == pytest.approx(0.0, abs=1e-6) and fresh.accuracy == 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    moved = adapter_pair_accuracy(model, pairs, beta=0.1, pad_id=2)
    assert abs(moved.margin) > 1e-3
