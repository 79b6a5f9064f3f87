"""The PPO entropy metric is computed in small row blocks: same values, bounded peak."""

from __future__ import annotations

import pytest
import torch

import alignkit.train.rl.ppo_models as ppo_models
from alignkit.losses.ppo import entropy_from_logits
from alignkit.train.rl.ppo_models import ENTROPY_CHUNK_ROWS, entropy_in_chunks, response_logps


def _inputs(n=300, h=16, v=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)


@pytest.mark.parametrize("rows", [1, 7, 128, 1000])
def test_chunked_entropy_equals_unchunked(rows):
    hidden, weight = _inputs()
    want = entropy_from_logits((hidden @ weight.T) / 0.7)  # (N,) from the whole (N, V) block
    got = entropy_in_chunks(hidden, weight, 0.7, rows)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and not got.requires_grad


def test_entropy_blocks_stay_small_whatever_the_logps_chunk(monkeypatch):
    seen = []

    def recording(logits):
        seen.append(logits.shape[0])
        return entropy_from_logits(logits)

    monkeypatch.setattr(ppo_models, "entropy_from_logits", recording)
    hidden, weight = _inputs(n=2 * 150)
    targets = torch.randint(0, 50, (2, 150))
    out = response_logps(hidden.view(2, 150, 16), weight, targets, 1.0, chunk_size=1024,
                         with_entropy=True)  # fmt: skip
    assert ENTROPY_CHUNK_ROWS <= 128 and max(seen) == ENTROPY_CHUNK_ROWS and sum(seen) == 300
    want = entropy_from_logits(hidden @ weight.T).view(2, 150)
    torch.testing.assert_close(out.entropy, want, rtol=1e-6, atol=1e-6)
    seen.clear()
    response_logps(hidden.view(2, 150, 16), weight, targets, 1.0, chunk_size=64, with_entropy=True)
    assert max(seen) == 64  # a smaller log-prob chunk is kept
