"""Token log-probabilities from hidden states, without the (B, T, V) logits tensor.

A causal LM's memory peak during fine-tuning is usually its logits: batch x sequence x vocabulary
floats (4 x 512 x 49k x 4 bytes = 400 MB for a 135M model), kept for the backward pass. Only the
log-probability of the target token at positions that carry a label is ever needed, so we gather
those positions' hidden states first and push them through the LM head in chunks. The autograd
function below keeps each row's log-sum-exp for the backward pass and recomputes one chunk of
logits at a time there, so the peak is one (chunk, V) block. When all the rows fit in one chunk
(a preference micro-batch's few hundred response tokens), the forward's block is kept instead of
recomputed: no more memory than that peak, and one LM-head product fewer per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100
# Rows per pass of the elementwise work over a logits block: a (32, 49k) fp32 slice is 6 MB,
# small enough to stay in cache between the max, exp and sum passes (twice as fast on CPU as
# one pass over a block of hundreds of rows, which streams it from memory each time).
ROWS_PER_PASS = 32


def _logits(h: Tensor, weight: Tensor, temp: float) -> Tensor:
    """(c, H) hidden states -> (c, V) fp32 logits over the temperature."""
    logits = (h @ weight.T).float()
    return logits if temp == 1.0 else logits.div_(temp)


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h W^T / T)[target] per row, computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, temp: float):
        # hidden (N, H), weight (V, H), targets (N,) -> logps (N,), fp32
        n = hidden.shape[0]
        out = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        logits = None
        for s in range(0, n, chunk):
            logits = _logits(hidden[s : s + chunk], weight, temp)  # (c, V)
            block_lse = lse[s : s + chunk]
            for r in range(0, logits.shape[0], ROWS_PER_PASS):
                part = slice(r, r + ROWS_PER_PASS)
                block_lse[part] = torch.logsumexp(logits[part], dim=-1)
            picked = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)  # (c,)
            out[s : s + chunk] = picked - block_lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        # One chunk: keep it rather than recompute it. Held outside save_for_backward because
        # the backward overwrites it in place and lets it go (a second backward recomputes it).
        ctx.kept = logits if n <= chunk else None
        ctx.chunk, ctx.temp = chunk, temp
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, temp, kept = ctx.chunk, ctx.temp, ctx.kept
        ctx.kept = None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]  # (c, H)
            g = grad_out[s : s + chunk].float()  # (c,)
            # (c, V): the forward's block when it was kept (overwritten in place), else
            # recomputed instead of stored
            logits = kept if kept is not None else _logits(h, weight, temp)
            # d logp_t / d logits = onehot(t) - softmax(logits), then the 1/T of the scaling
            block_lse = lse[s : s + chunk, None]
            for r in range(0, logits.shape[0], ROWS_PER_PASS):  # in place: -g * softmax
                part = slice(r, r + ROWS_PER_PASS)
                logits[part].sub_(block_lse[part]).exp_().mul_(-g[part, None])
            grad_logits = logits.scatter_add_(1, targets[s : s + chunk, None], g[:, None])
            if temp != 1.0:
                grad_logits = grad_logits.div_(temp)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_h[s : s + chunk] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.T @ h).float()
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def target_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int = 1024, temperature=1.0
) -> Tensor:
    """Log-probabilities of `targets` under the LM head, chunked.

    hidden: (N, H) hidden states at the positions that predict each target.
    weight: (V, H) LM head (output embedding) weight; a bias-free head is assumed.
    targets: (N,) token ids.
    Returns (N,) fp32 log-probabilities, differentiable w.r.t. hidden and weight.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    return _ChunkedTargetLogps.apply(hidden, weight, targets, chunk_size, float(temperature))


def plain_target_logps(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Reference computation: (N, V) logits and (N,) targets -> (N,) log-probabilities."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1)


class LabelPositions(NamedTuple):
    """Where a (B, T) label tensor carries targets, after the causal shift."""

    rows: Tensor  # (N,) batch row of each target
    cols: Tensor  # (N,) position in the sequence whose hidden state predicts the target
    targets: Tensor  # (N,) target token ids


def label_positions(labels: Tensor) -> LabelPositions:
    """labels (B, T) with IGNORE_INDEX on masked tokens -> positions that predict them.

    Token t is predicted by the hidden state at t - 1, so the labels are shifted left by one.
    """
    shifted = labels[:, 1:]  # (B, T-1): shifted[b, i] is predicted at position i
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return LabelPositions(rows, cols, shifted[rows, cols])


def per_sequence_sum(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Scatter (N,) per-token values into (num_rows,) per-sequence sums."""
    out = values.new_zeros(num_rows)
    return out.index_add(0, rows, values)
