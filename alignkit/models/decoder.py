"""The decoder of a transformers model run without its head: last hidden states, adapters active.

Both heads alignkit trains read from here: the LM head's label log-probs
(:class:`~alignkit.train.forward.LogpsModel`) and the scalar head of a reward model
(:class:`~alignkit.models.reward.RewardModel`), so a padded row, a prefix-shared block and a packed
row reach attention the same way for both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkit.data.batching import additive_mask
from alignkit.ops.packed_attention import KVStore, span_kwargs


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def hidden_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def decoder_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    spans: Tensor | None = None,
    kv_out: KVStore | None = None,
    kv_in: KVStore | None = None,
    prefix: Tensor | None = None,
) -> Tensor:
    """(B, T) inputs -> (B, T, H) last hidden states of `model` (peft-wrapped or not).

    attention_mask: (B, T) 0/1, or a block mask (B, 1, T, T). A packed row (B=1) may name its
    examples' `spans` (K, 3): start, end, causal; attention then runs per example
    (:mod:`alignkit.ops.packed_attention`), with the same result as the block mask. `kv_out`
    keeps the row's keys and values; `kv_in` and `prefix` (K, 2) continue a kept row, span k
    after its columns ``prefix[k]``.
    """
    hf = unwrap_hf(model)
    backbone = hf.base_model  # e.g. LlamaModel: the decoder without its LM or score head
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        # A block mask: SDPA takes booleans, but eager attention *adds* the mask to the scores,
        # so a boolean one would be silently ignored there.
        if getattr(hf.config, "_attn_implementation", "sdpa") != "sdpa":
            attention_mask = additive_mask(attention_mask, hidden_dtype(hf))
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **span_kwargs(backbone, spans, kv_out=kv_out, kv_in=kv_in, prefix=prefix),
    )
    return out.last_hidden_state
