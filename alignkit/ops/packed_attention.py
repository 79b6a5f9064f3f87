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
it replaced unless a forward carries the ``alignkit_spans`` keyword, which only alignkit's decoder
forward (:func:`~alignkit.models.decoder.decoder_hidden_states`, behind the log-prob and reward
models) passes. transformers hands forward keywords down to every attention call, including the
recomputation of gradient checkpointing, so the recomputed forward is cut the same way.

Two more keywords let a no-grad forward continue prompts that an earlier forward of the same
model already ran (KTO's mismatched rows, which share their prompts with the training rows):
``alignkit_kv_out`` (a :class:`KVStore`) keeps every attention layer's keys and values of the row,
and ``alignkit_prefix`` (that store, with one ``(start, end)`` column range of the earlier row per
span) puts those columns' keys and values before each span's own, every span query seeing all of
them and its own earlier tokens. The span then attends exactly as the same tokens would at the end
of a row that began with the prefix, which is never run again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

SPANS_KWARG = "alignkit_spans"
KV_OUT_KWARG = "alignkit_kv_out"
PREFIX_KWARG = "alignkit_prefix"

# (start, end, causal): one example's columns of the packed row; causal: its block of the mask is
# plain causal (a prompt + response row), else it is used as it is (a prefix-shared pair).
Span = tuple[int, int, bool]


_replaced: dict[str, Callable] = {}  # the "sdpa" function before ours, to pass through to


class KVStore:
    """Keys and values (1, Hkv, T, D) of one packed row, per attention module, detached.

    A plain object rather than a dict, so that wrappers which copy a forward's container
    arguments on their way down (DDP moving inputs to a device) hand the same store to attention.
    Empty after a forward whose attention was not `packed_attention` (no spans, or not SDPA).
    """

    def __init__(self) -> None:
        self.kv: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.kv)

    def clear(self) -> None:
        self.kv.clear()


# The store, and per span a column range of the kept row and the span's `continuation_mask`
Prefix = tuple[KVStore, Sequence[tuple[int, int]], Sequence[Tensor]]


def continuation_mask(queries: int, prefix: int, device: torch.device) -> Tensor:
    """(1, 1, L, P + L) bool: every query sees the P prefix keys and its own earlier tokens."""
    seen = torch.ones(queries, prefix + queries, dtype=torch.bool, device=device)
    return seen.tril(diagonal=prefix)[None, None]


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
    row is attended span by span; without it, the replaced SDPA function runs unchanged.
    ``alignkit_kv_out`` keeps this call's keys and values; ``alignkit_prefix`` prepends kept
    ones to each span's (see the module docstring)."""
    spans: Sequence[Span] | None = kwargs.pop(SPANS_KWARG, None)
    kv_out: KVStore | None = kwargs.pop(KV_OUT_KWARG, None)
    prefix: Prefix | None = kwargs.pop(PREFIX_KWARG, None)
    sdpa = _replaced["sdpa"]
    if spans is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed spans need a batch of one row, got {query.shape[0]}")
    if kv_out is not None:
        kv_out.kv[module] = (key.detach(), value.detach())
    if prefix is not None:
        store, columns, masks = prefix
        kept_key, kept_value = store.kv[module]
    kwargs.pop("is_causal", None)
    outs = []
    for k, (start, end, causal) in enumerate(spans):
        span_key, span_value = key[:, :, start:end], value[:, :, start:end]
        if prefix is not None:
            first, last = columns[k]
            span_key = torch.cat([kept_key[:, :, first:last], span_key], dim=2)
            span_value = torch.cat([kept_value[:, :, first:last], span_value], dim=2)
            mask, causal = masks[k], False
        else:
            mask = None if causal else attention_mask[:, :, start:end, start:end]
        out, _ = sdpa(
            module, query[:, :, start:end], span_key, span_value, mask, is_causal=causal, **kwargs
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


def span_kwargs(
    model: nn.Module,
    spans: Tensor | None,
    *,
    kv_out: KVStore | None = None,
    kv_in: KVStore | None = None,
    prefix: Tensor | None = None,
) -> dict:
    """Forward keywords that make `model` (a transformers model or its backbone) attend a packed
    row span by span; none when there are no spans or the model's attention is not SDPA (its own
    attention then runs over the whole row with the block mask: slower, same values, and
    `kv_out` stays empty). `kv_out` is filled with the row's keys and values; `kv_in` with
    `prefix` (K, 2), a column range of the row kept in it for each span, continues that row."""
    config = getattr(model, "config", None)
    if spans is None or getattr(config, "_attn_implementation", None) != "sdpa":
        if kv_in is not None:
            raise ValueError("continuing a kept row needs a packed batch and SDPA attention")
        return {}
    install()
    out: dict = {SPANS_KWARG: spans_from_tensor(spans)}
    if kv_out is not None:
        out[KV_OUT_KWARG] = kv_out
    if kv_in is not None:
        if not kv_in or prefix is None or len(prefix) != len(out[SPANS_KWARG]):
            raise ValueError("continuing a kept row needs a filled store and one prefix per span")
        columns = tuple((int(a), int(b)) for a, b in prefix.tolist())
        device = next(iter(kv_in.kv.values()))[0].device
        # built once here, not in each layer's attention call
        masks = tuple(
            continuation_mask(end - start, last - first, device)
            for (start, end, _), (first, last) in zip(out[SPANS_KWARG], columns, strict=True)
        )
        out[PREFIX_KWARG] = (kv_in, columns, masks)
    return out
