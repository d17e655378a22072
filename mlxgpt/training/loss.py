"""The language-model loss, one for pretraining and fine-tuning: next-token cross-entropy over
the counted targets, computed from hidden states a few rows at a time.

Why chunked: at GPT-2's vocabulary the logits and their gradient are the largest activations of
a training step (batch 8 x 1024: 1.6 GB per (B, T, V) float32 copy, several alive at once). Here
they exist at most :data:`CE_ELEMENTS` values at a time, in the forward pass and again
(recomputed, one more head matmul) in the backward pass. A small vocabulary fits in one chunk.
The exponentials come from the model's kernels (arithmetic-only on the CPU, see
:mod:`mlxgpt.core.backend`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

CE_ELEMENTS = 1 << 25  # logits made at a time (128 MB of float32)


def lm_loss(model: nn.Module, inputs: mx.array, targets: mx.array,
            mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy of next-token ``targets`` (B, T) over the counted positions (``mask``
    (B, T) 1/0; all of them without one), and how many were counted."""
    return hidden_lm_loss(model, model.hidden(inputs), targets, mask)


def hidden_lm_loss(model: nn.Module, h: mx.array, targets: mx.array,
                   mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """:func:`lm_loss` from final hidden states ``h`` (B, T, C) the caller already has (a
    classifier reads them too: one forward pass serves both losses)."""
    head = model.head
    if type(head) in (nn.Linear, nn.Embedding):  # float head: never hold all (B, T, V) logits
        ce_fn = linear_cross_entropy(model.kernels.exp)
        ce = ce_fn(h.reshape(-1, h.shape[-1]), head.weight, targets.reshape(-1))
        ce = ce.reshape(targets.shape)  # (B, T)
    else:  # a quantized (frozen) head
        ce = nn.losses.cross_entropy(model.logits(h).astype(mx.float32), targets)
    if mask is None:
        return ce.mean(), mx.array(targets.size, mx.float32)
    n = mask.sum()
    return (ce * mask).sum() / mx.maximum(n, 1), n


def _log_sum_exp(logits: mx.array, exp: Callable[[mx.array], mx.array]) -> mx.array:
    m = logits.max(axis=-1, keepdims=True)
    return m[:, 0] + mx.log(exp(logits - m).sum(axis=-1))


@functools.cache
def linear_cross_entropy(exp: Callable[[mx.array], mx.array]) -> Callable[..., mx.array]:
    """``ce(h (N, C), w (V, C), targets (N,)) -> (N,)``: cross-entropy of the logits ``h @ w.T``
    without keeping them (see the module docstring), with ``exp`` as the exponential."""

    @mx.custom_function
    def ce(h: mx.array, w: mx.array, targets: mx.array) -> mx.array:
        rows = _rows(w)
        out = []
        for s in range(0, h.shape[0], rows):
            logits = (h[s:s + rows] @ w.T).astype(mx.float32)  # (rows, V)
            picked = mx.take_along_axis(logits, targets[s:s + rows, None], axis=-1)[:, 0]
            out.append(_log_sum_exp(logits, exp) - picked)
        return out[0] if len(out) == 1 else mx.concatenate(out)

    @ce.vjp
    def ce_vjp(primals, cotangent, output):
        h, w, targets = primals
        rows = _rows(w)
        dh, dw = [], None
        for s in range(0, h.shape[0], rows):
            hs, ts = h[s:s + rows], targets[s:s + rows]
            logits = (hs @ w.T).astype(mx.float32)  # (rows, V), recomputed
            picked = mx.take_along_axis(logits, ts[:, None], axis=-1)[:, 0]
            lse = output[s:s + rows] + picked  # the saved log-sum-exp
            g = exp(logits - lse[:, None])  # softmax
            g = g - (mx.arange(g.shape[-1]) == ts[:, None])  # d ce / d logits
            g = (g * cotangent[s:s + rows, None]).astype(w.dtype)
            dh.append(g @ w)  # (rows, C)
            part = g.T @ hs  # (V, C); only evaluated when w trains (lazy otherwise)
            dw = part if dw is None else dw + part
        return (dh[0] if len(dh) == 1 else mx.concatenate(dh)), dw, mx.zeros_like(targets)

    return ce


def _rows(w: mx.array) -> int:
    """Rows of logits per chunk for a head of ``w.shape[0]`` outputs."""
    return max(1, CE_ELEMENTS // w.shape[0])
