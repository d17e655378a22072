"""Everything that depends on the device MLX runs on, decided here and nowhere else.

- :class:`Kernels`: the few functions whose fastest form differs by backend. A GPU (Metal,
  CUDA) runs MLX's fused ``mx.fast.scaled_dot_product_attention`` and its own ``tanh``/``exp``;
  MLX's CPU backend evaluates ``exp``/``tanh`` element by element through libm, so there the
  arithmetic-only kernels of :mod:`mlxgpt.cpu.fastmath` are used. A model takes its set when it
  is built (:func:`kernels_for`), like nanoGPT's ``self.flash``.
- :func:`default_dtype`: float32 on the CPU (no fast half-precision matmul there), float16 on a GPU.
- :func:`prepare_for_inference`: on the CPU, a weight layout that suits single-row matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..cpu import fastmath


@dataclass(frozen=True)
class Kernels:
    """The backend-dependent functions of the model and its loss."""

    name: str
    # (q (B, H, T, D), k, v (B, H, S, D), scale, mask) -> (B, H, T, D); mask: None, "causal"
    # (query i sees keys up to i + S - T) or a boolean array broadcastable to (B, H, T, S)
    attention: Callable[..., mx.array]
    gelu_tanh: Callable[[mx.array], mx.array]  # GPT-2's GELU (Hugging Face "gelu_new")
    exp: Callable[[mx.array], mx.array]  # the loss's log-sum-exp and softmax


def _sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU, written out as the reference computes it."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


FUSED = Kernels("fused", _sdpa, gelu_tanh, mx.exp)
ARITHMETIC = Kernels("arithmetic", fastmath.attention, fastmath.gelu_tanh, fastmath.exp)


def on_cpu(device: mx.Device | None = None) -> bool:
    return (device or mx.default_device()) == mx.cpu


def kernels_for(device: mx.Device | None = None) -> Kernels:
    """The kernels for ``device`` (default: MLX's default device)."""
    return ARITHMETIC if on_cpu(device) else FUSED


def default_dtype(device: mx.Device | None = None) -> mx.Dtype:
    """float32 on the CPU (no fast half-precision matmul there), float16 on a GPU."""
    return mx.float32 if on_cpu(device) else mx.float16


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Convert ``model`` in place for fast generation on the CPU; a GPU keeps it as it is.

    Float32 weight matrices are stored as column blocks that reach BLAS's small-matrix kernel
    when one token is decoded (see :mod:`mlxgpt.cpu.layout`): same numbers, another layout. The
    model is for inference afterwards (its parameter names changed: do not train or save it).
    Idempotent; returns the model.
    """
    if on_cpu():
        from ..cpu.layout import block_weights

        block_weights(model)
    return model


def keep_freed_buffers() -> None:
    """Let MLX keep freed buffers for reuse while training (a no-op on Metal, where the cache
    limit already equals the memory limit).

    MLX's CPU allocator caches only 32 MB by default, so a training step's big activations went
    back to the OS and every step paid for fresh zeroed pages (a third of the step time at
    6/6/384, block 256).
    """
    mx.set_cache_limit(max(mx.get_memory_limit(), 1 << 30))
