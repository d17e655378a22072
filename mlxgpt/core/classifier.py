"""A language model of any family with a classification head (Radford et al. 2018; Hugging
Face's ``GPT2ForSequenceClassification`` and ``LlamaForSequenceClassification``): a linear layer
without bias on the final hidden state of each row's last real token.

The head is ``score`` as in Hugging Face; the model under it is ``transformer`` (GPT-2's name in
Hugging Face; a Llama's own keys, ``model.*``, are Hugging Face's classifier keys already), so
converting is a key copy (plus GPT-2's Conv1D transposes, see :mod:`mlxgpt.checkpoints.hf`). The
whole language model stays under the head, its LM head included: fine-tuning adds its loss.
Hugging Face finds each row's last real token by looking for ``pad_token_id``; this model is told
each row's length instead, which stays right when the padding id is also a real token (SmolLM2
pads with its end-of-turn token).

Shapes: B batch, T tokens, C = n_embd, L labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxgptError
from .backend import Kernels
from .model import Model, ModelConfig

INIT_STD = 0.02  # GPT-2's and Llama's initializer_range, what Hugging Face starts a head with


class GPTClassifier(nn.Module):
    """``gpt`` (a model of any family) with a head for ``labels`` (ids in that order). The head
    starts as Hugging Face starts one, normal with std 0.02, drawn from ``key``; without a key it
    is zeros, for weights that are loaded next."""

    def __init__(self, gpt: Model, labels: Sequence[str], key: mx.array | None = None):
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
    def config(self) -> ModelConfig:
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
