"""GPT-2 in MLX: the only module that knows its architecture (the families: :mod:`.model`).

Module names mirror the Hugging Face GPT-2 checkpoint (``wte``, ``wpe``, ``h.{i}.attn.c_attn``,
``ln_f``...), so loading a converted checkpoint is a key-by-key copy. Linear weights use MLX's
``(out, in)`` layout; Hugging Face's Conv1D ``(in, out)`` weights are transposed by the converter.

The backend's kernels (attention, GELU) are chosen once, when the model is built (``kernels``,
by default the backend record's, :class:`mlxgpt.core.backend.Backend`), the way nanoGPT decides
``self.flash``. A KV cache is anything with ``update_and_fetch(k, v) -> (keys, values, mask)``
and an ``offset`` (:class:`mlxgpt.generation.cache.KVCache`); the model holds none itself.

Shapes: B batch, T new tokens, S cached + new tokens, C = n_embd, H = n_head, D = C // H, V vocab.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .backend import Kernels, backend
from .config import TANH_GELU, GPTConfig


class Cache(Protocol):
    offset: int | mx.array  # positions already cached (a scalar array inside mx.compile)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, Any]:
        """Store k, v (B, H, T, D); return every key and value (B, H, S, D) and the mask
        saying which keys each new query sees (None, "causal" or a boolean array)."""


def gelu_erf(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0)))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, kernels: Kernels):
        super().__init__()
        self.n_head = cfg.n_head
        self.scale = cfg.head_dim**-0.5
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attend = kernels.attention

    def __call__(self, x: mx.array, cache: Cache | None = None) -> mx.array:
        B, T, C = x.shape
        # One copy puts every head of q, k and v in its own contiguous (T, D) block, which MLX's
        # CPU matmul takes as it is (head views of the fused projection it copies one by one,
        # in the forward and again in the backward pass). The split's gradient is one concat.
        qkv = self.c_attn(x).reshape(B, T, 3, self.n_head, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = (a.squeeze(0) for a in mx.split(mx.contiguous(qkv), 3))  # 3 x (B, H, T, D)
        if cache is None:
            mask = "causal" if T > 1 else None
        else:
            k, v, mask = cache.update_and_fetch(k, v)  # (B, H, S, D)
        y = self.attend(q, k, v, self.scale, mask)  # (B, H, T, D)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, kernels: Kernels):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden_dim)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd)
        self.act = kernels.gelu_tanh if cfg.activation_function in TANH_GELU else gelu_erf

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig, kernels: Kernels):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, kernels)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, kernels)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def __call__(self, x: mx.array, cache: Cache | None = None) -> mx.array:
        a = self.attn(self.ln_1(x), cache)
        if self.drop is not None:
            a = self.drop(a)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if self.drop is not None:
            m = self.drop(m)
        return x + m


class GPT(nn.Module):
    weight_prefix = "model."  # model folders store mlx-lm's GPT-2 names: model.h.0.attn...

    def __init__(self, cfg: GPTConfig, kernels: Kernels | None = None):
        super().__init__()
        self.config = cfg
        self.kernels = kernels or backend().kernels
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = [Block(cfg, self.kernels) for _ in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    @property
    def layers(self) -> list[Block]:
        return self.h

    @property
    def final_norm(self) -> nn.Module:
        return self.ln_f

    def hidden(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        """Final hidden states (B, T, C) for token ids (B, T)."""
        T = tokens.shape[1]
        # an int, a scalar array inside mx.compile, or (B,) per-row offsets (a batch of sequences)
        offset = cache[0].offset if cache else 0
        if isinstance(offset, int) and offset + T > self.config.n_positions:
            raise ValueError(
                f"positions {offset}..{offset + T - 1} exceed n_positions={self.config.n_positions}"
            )
        if isinstance(offset, mx.array) and offset.ndim == 1:
            offset = offset[:, None]  # (B, 1): each row's positions (B, T)
        x = self.wte(tokens) + self.wpe(offset + mx.arange(T))  # (B, T, C)
        if self.drop is not None:
            x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache else None)
        return self.ln_f(x)

    def logits(self, x: mx.array) -> mx.array:
        """Hidden states (..., C) -> logits (..., V) through the tied (or explicit) head."""
        return self.head.as_linear(x) if self.head is self.wte else self.head(x)

    @property
    def head(self) -> nn.Module:
        """The output projection: ``lm_head``, or the tied input embedding ``wte``."""
        return self.lm_head if "lm_head" in self else self.wte

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        """Token ids (B, T) -> logits (B, T, V). With a cache, positions continue from it."""
        return self.logits(self.hidden(tokens, cache))

    @property
    def n_params(self) -> int:
        """Parameter count, counting the tied embedding once (as GPT-2's 124M does)."""
        return sum(v.size for _, v in tree_flatten(self.parameters()))
