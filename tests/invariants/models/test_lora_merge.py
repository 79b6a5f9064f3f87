"""Invariant: merging a LoRA adapter into its base changes no logit.

A fresh adapter has B = 0, so merged and unmerged would agree even if merging were broken; the B
matrices are perturbed first, and the test checks that the perturbation moved the logits.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.config import LoraConfig
from alignkit.models import apply_lora, merge_lora

IDS = torch.tensor([[1, 9690, 198, 2683, 314, 253, 2, 42], [1, 4093, 28, 905, 17, 2, 2, 2]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_merged_equals_unmerged(tiny_model, targets):
    base_logits = _logits(tiny_model)
    model = apply_lora(tiny_model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()  # dropout off: the unmerged forward must be deterministic
    unmerged = _logits(model)
    assert (unmerged - base_logits).abs().max() > 1e-2, "perturbed adapter did not change logits"

    merged_model = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(_logits(merged_model), unmerged, atol=1e-5, rtol=0)
