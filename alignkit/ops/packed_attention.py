"""Attention over a packed row, one example at a time.

A packed batch is one row holding several examples back to back, with a block mask (B=1, 1, T, T)
that lets no token see another example. Given that mask, SDPA computes the whole T x T score
matrix and throws most of it away: with four examples of ~200 tokens in a row of ~800, attention
is ~30% of a training step on CPU, four times the work the examples need.

`packed_attention` is the same computation cut to the blocks that matter: for each span
``[start, end)`` of the row (one example) it runs SDPA on that span's queries, keys and values
under the span's own slice of the mask (or, for a span marked causal, a plain row, with no mask
and ``is_causal``), and concatenates the outputs. Nothing crosses a span boundary in the block
mask, so this is exact, not an approximation.

It takes the place of transformers' ``sdpa`` attention (registered under that name through
``AttentionInterface``, transformers' extension point) and is a plain pass-through to the function
it replaced unless a forward carries the ``alignkit_spans`` keyword, which only alignkit's
:class:`~alignkit.train.forward.LogpsModel` passes. transformers hands forward keywords down to
every attention call, including the recomputation of gradient checkpointing, so the recomputed
forward is cut the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

SPANS_KWARG = "alignkit_spans"

# (start, end, causal): one example's columns of the packed row; causal: its block of the mask is
# plain causal (a prompt + response row), else it is used as it is (a prefix-shared pair).
Span = tuple[int, int, bool]


_replaced: dict[str, Callable] = {}  # the "sdpa" function before ours, to pass through to


def packed_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention signature: query (B, H, T, D), key/value (B, Hkv, T, D), mask
    (B, 1, T, T) -> ((B, T, H, D), weights or None). With ``alignkit_spans`` (B must be 1) the
    row is attended span by span; without it, the replaced SDPA function runs unchanged."""
    spans: Sequence[Span] | None = kwargs.pop(SPANS_KWARG, None)
    sdpa = _replaced["sdpa"]
    if spans is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed spans need a batch of one row, got {query.shape[0]}")
    kwargs.pop("is_causal", None)
    outs = []
    for start, end, causal in spans:
        mask = None if causal else attention_mask[:, :, start:end, start:end]
        out, _ = sdpa(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            mask,
            is_causal=causal,
            **kwargs,
        )
        outs.append(out)  # (1, end - start, H, D)
    if spans[-1][1] != query.shape[2]:
        raise ValueError(f"packed spans end at {spans[-1][1]}, the row at {query.shape[2]}")
    return torch.cat(outs, dim=1), None


def install() -> None:
    """Put `packed_attention` in place of transformers' "sdpa" (once per process)."""
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping["sdpa"]
    if current is not packed_attention:
        _replaced["sdpa"] = current
        AttentionInterface.register("sdpa", packed_attention)


def spans_from_tensor(spans: Tensor) -> tuple[Span, ...]:
    """A batch's (K, 3) long tensor of start, end, causal -> plain Python tuples, which must
    tile the row from column 0 without gaps."""
    out = tuple((int(s), int(e), bool(c)) for s, e, c in spans.tolist())
    starts = [0] + [e for _, e, _ in out[:-1]]
    if not out or any(s != want or e <= s for (s, e, _), want in zip(out, starts, strict=True)):
        raise ValueError(f"packed spans must tile the row from column 0, got {out}")
    return out


def span_kwargs(model: nn.Module, spans: Tensor | None) -> dict:
    """Forward keywords that make `model` (a transformers model or its backbone) attend a packed
    row span by span; none when there are no spans or the model's attention is not SDPA (its own
    attention then runs over the whole row with the block mask: slower, same values)."""
    config = getattr(model, "config", None)
    if spans is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return {}
    install()
    return {SPANS_KWARG: spans_from_tensor(spans)}
