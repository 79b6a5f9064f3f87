"""One forward pass that returns label log-probabilities, never full logits.

The training loop wraps the model in :class:`LogpsModel` before `accelerate` prepares it, so
distributed wrappers (DDP) see the whole computation, LM head included, as one forward call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from alignkit.models.decoder import decoder_hidden_states, hidden_dtype, unwrap_hf
from alignkit.ops.logps import label_positions, per_sequence_sum, target_logps
from alignkit.ops.packed_attention import KVStore

# unwrap_hf and hidden_dtype live with the decoder forward (alignkit.models.decoder), which the
# reward model shares; they stay importable from here for this module's other users.
__all__ = ["LogpsModel", "SequenceLogps", "hidden_dtype", "unwrap_hf"]


class SequenceLogps(NamedTuple):
    token_logps: Tensor  # (N,) fp32 log-prob of each labelled token
    rows: Tensor  # (N,) sequence (or segment) of each labelled token
    seq_logps: Tensor  # (S,) summed log-probs per sequence or segment
    seq_tokens: Tensor  # (S,) labelled tokens per sequence or segment


class LogpsModel(nn.Module):
    """Wraps a causal LM: forward(batch) -> SequenceLogps, computed from hidden states."""

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        hf = unwrap_hf(model)
        head = hf.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError("LogpsModel needs a bias-free LM head (get_output_embeddings)")

    def _hf(self) -> nn.Module:
        return unwrap_hf(self.model)

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        spans: Tensor | None = None,
        kv_out: KVStore | None = None,
        kv_in: KVStore | None = None,
        prefix: Tensor | None = None,
    ):
        """(B, T) inputs -> (B, T, H) last hidden states, adapters active; see
        :func:`alignkit.models.decoder.decoder_hidden_states` for the mask, `spans`, `kv_out`,
        `kv_in` and `prefix`."""
        return decoder_hidden_states(
            self.model, input_ids, attention_mask, position_ids, spans, kv_out, kv_in, prefix
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        temperature: float = 1.0,
        pred_rows: Tensor | None = None,
        pred_cols: Tensor | None = None,
        target_ids: Tensor | None = None,
        segment: Tensor | None = None,
        num_segments: int | None = None,
        spans: Tensor | None = None,
        kv_out: KVStore | None = None,
        kv_in: KVStore | None = None,
        prefix: Tensor | None = None,
    ) -> SequenceLogps:
        """Log-probs of the labelled tokens, summed per sequence (or per segment).

        input_ids: (B, T); attention_mask: (B, T) or a 4D block mask (B, 1, T, T).
        Targets come either from `labels` (B, T) with the usual shift-by-one, or explicitly:
        `pred_rows`, `pred_cols` (N,) name the hidden state that predicts each of `target_ids`
        (N,), and `segment` (N,) in [0, num_segments) says which sum each one joins; prefix-shared
        preference rows need this, since a rejected response's first token is predicted from
        the prompt's last position, not from the token before it in the row. `spans` (K, 3)
        marks the examples of a packed row, and `kv_out`, `kv_in`, `prefix` keep or continue
        one (see :meth:`hidden_states`).
        """
        if position_ids is None:
            if attention_mask.dim() == 4:
                raise ValueError("a packed (4D-mask) batch must come with its position_ids")
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kept = {"kv_out": kv_out, "kv_in": kv_in, "prefix": prefix}
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, spans, **kept)
        if labels is not None:
            pos = label_positions(labels)
            rows, cols, targets = pos.rows, pos.cols, pos.targets
            segment, num_segments = rows, input_ids.shape[0]
        else:
            rows, cols, targets = pred_rows, pred_cols, target_ids
            num_segments = int(num_segments) if num_segments is not None else input_ids.shape[0]
        picked = hidden[rows, cols]  # (N, H): only the positions that predict a target
        weight = self._hf().get_output_embeddings().weight  # (V, H)
        logps = target_logps(
            picked, weight, targets, chunk_size=self.chunk_size, temperature=temperature
        )
        ones = torch.ones_like(logps)
        return SequenceLogps(
            logps,
            segment,
            per_sequence_sum(logps, segment, num_segments),
            per_sequence_sum(ones, segment, num_segments),
        )
