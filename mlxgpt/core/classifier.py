"""A GPT with a classification head (Radford et al. 2018; Hugging Face's
``GPT2ForSequenceClassification``): a linear layer without bias on the final hidden state of each
row's last real token.

Names mirror Hugging Face's (``transformer`` for the GPT, ``score`` for the head), so the
classifier's parameters carry Hugging Face's keys and converting is a key copy (plus GPT-2's
Conv1D transposes, see :mod:`mlxgpt.checkpoints.hf`). Hugging Face finds each row's last real
token by looking for ``pad_token_id``; this model is told each row's length instead, which stays
right when the padding id is also a real token.

Shapes: B batch, T tokens, C = n_embd, L labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxgptError
from .backend import Kernels
from .config import GPTConfig
from .gpt2 import GPT

INIT_STD = 0.02  # GPT-2's initializer_range, what Hugging Face starts a new head with


class GPTClassifier(nn.Module):
    """``gpt`` with a head for ``labels`` (ids in that order). The head starts as Hugging Face
    starts one, normal with std 0.02, drawn from ``key``; without a key it is zeros, for
    weights that are loaded next."""

    def __init__(self, gpt: GPT, labels: Sequence[str], key: mx.array | None = None):
        super().__init__()
        labels = tuple(labels)
        if len(labels) < 2:
            raise MlxgptError(f"a classifier needs at least two labels, got {len(labels)}")
        if len(set(labels)) != len(labels):
            raise MlxgptError("classifier labels must be distinct")
        self.transformer = gpt
        self.score = nn.Linear(gpt.config.n_embd, len(labels), bias=False)
        shape = self.score.weight.shape
        self.score.weight = (INIT_STD * mx.random.normal(shape, key=key) if key is not None
                             else mx.zeros(shape))
        # A plain attribute: MLX would file a tuple among the module's arrays.
        object.__setattr__(self, "labels", labels)

    @property
    def config(self) -> GPTConfig:
        return self.transformer.config

    @property
    def kernels(self) -> Kernels:
        return self.transformer.kernels

    def __call__(self, tokens: mx.array, lengths: mx.array | None = None) -> mx.array:
        """Token ids (B, T), right-padded, and each row's count of real tokens (B,) -> logits
        (B, L). Without ``lengths`` every position is real."""
        return self.pooled_logits(self.transformer.hidden(tokens), lengths)

    def pooled_logits(self, h: mx.array, lengths: mx.array | None = None) -> mx.array:
        """Head logits (B, L) from the final hidden states ``h`` (B, T, C), read at position
        ``lengths - 1`` of each row (the last position without ``lengths``)."""
        last = h[:, -1] if lengths is None else h[mx.arange(h.shape[0]), lengths - 1]  # (B, C)
        return self.score(last)
