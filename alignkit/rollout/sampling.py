"""Batched sampling for PPO rollouts: token ids in, padded prompt and response tensors out.

Generation runs through `transformers`' `generate` with temperature and top-p and no top-k (its
default of 50 would make the sampling distribution differ from the tempered softmax the PPO
log-probs are computed from). A response ends at its first stop token (EOS / end-of-turn),
which stays in the response so the policy learns to emit it; what follows is padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Rollout(NamedTuple):
    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, R) right-padded with the pad id after the stop token
    response_mask: Tensor  # (B, R) 1 up to and including the stop token
    ended: Tensor  # (B,) bool: the response emitted a stop token


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Token id lists -> (B, P) ids and mask, padded on the left (generation appends right)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def stop_mask(tokens: Tensor, stops: list[int]) -> tuple[Tensor, Tensor]:
    """(B, R) generated tokens -> ((B, R) mask up to and including the first stop, (B,) ended)."""
    is_stop = torch.isin(tokens, torch.tensor(stops, device=tokens.device))
    # stops strictly before position t: t is kept while none has occurred yet
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (before == 0).long(), is_stop.any(dim=1)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    pad_id: int,
    stops: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """Sample one response per prompt (token ids) from `model`."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    kwargs = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        **kwargs,
    )
    new = out[:, ids.shape[1] :]  # (B, R): R may be below max_new_tokens when all rows ended
    if new.shape[1] == 0:
        new = torch.full((len(prompts), 1), pad_id, dtype=torch.long, device=device)
    rmask, ended = stop_mask(new, stops)
    new = torch.where(rmask.bool(), new, torch.full_like(new, pad_id))
    return Rollout(ids, mask, new, rmask, ended)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without special tokens or padding."""
    rows = [
        [t for t, m in zip(r, k, strict=True) if m]
        for r, k in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(), strict=True)
    ]
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
