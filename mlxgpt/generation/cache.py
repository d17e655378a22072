"""The KV cache: each layer's keys and values of the positions a model has read.

One class serves both ways the model runs:

- eager (``offset`` an int, e.g. ``model(tokens, make_cache(model))``): new keys and values are
  written in place into a buffer grown in steps of :data:`STEP` positions, and the written part
  comes back with the ``"causal"`` mask;
- traced (inside :class:`mlxgpt.generation.context.Context`'s compiled forward, ``offset`` a
  scalar array): the buffer has a fixed size, so the whole of it comes back with a boolean mask
  of the keys each new query may see (its own position and before; the unwritten tail never).
"""

from __future__ import annotations

import mlx.core as mx

from ..core.model import Model, ModelConfig

STEP = 64  # buffers grow in steps of this many positions (traced attention spans the buffer)


class KVCache:
    """One layer's keys and values (B, H, capacity, D); the first ``offset`` positions are real."""

    def __init__(self, keys: mx.array, values: mx.array, offset: int | mx.array = 0):
        self.keys, self.values, self.offset = keys, values, offset

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int = 1, dtype: mx.Dtype = mx.float32) -> KVCache:
        shape = (batch, cfg.n_kv_head, 0, cfg.head_dim)
        return cls(mx.zeros(shape, dtype), mx.zeros(shape, dtype))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reserve(self, total: int, limit: int | None = None) -> None:
        """Hold at least ``total`` positions (at most ``limit``), growing in steps of STEP and
        keeping the first ``offset``; lazy (evaluate ``keys``/``values`` to allocate)."""
        if total <= self.capacity:
            return
        cap = -(-total // STEP) * STEP
        cap = min(cap, limit) if limit else cap
        b, h, _, d = self.keys.shape
        keep = int(self.offset)
        grown = []
        for old in (self.keys, self.values):
            new = mx.zeros((b, h, cap, d), old.dtype)
            if keep:
                new = mx.slice_update(new, old[..., :keep, :], mx.array([0]), axes=(2,))
            grown.append(new)
        self.keys, self.values = grown

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array,
                                                                   str | mx.array | None]:
        """Write k, v (B, H, T, D) at ``offset``; return keys, values (B, H, S, D) and the mask."""
        t = k.shape[2]
        if isinstance(self.offset, int):
            self.reserve(self.offset + t)
            start, self.offset = self.offset, self.offset + t
            self.keys[..., start : self.offset, :] = k
            self.values[..., start : self.offset, :] = v
            mask = "causal" if t > 1 else None
            return self.keys[..., : self.offset, :], self.values[..., : self.offset, :], mask
        self.keys = mx.slice_update(self.keys, k, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, v, self.offset[None], axes=(2,))
        self.offset = self.offset + t
        keys = mx.arange(self.capacity)
        if t == 1:
            return self.keys, self.values, keys < self.offset  # (capacity,)
        queries = self.offset - t + mx.arange(t)  # positions of the t new tokens
        return self.keys, self.values, keys[None, :] <= queries[:, None]  # (t, capacity)


def make_cache(model: Model, batch: int = 1) -> list[KVCache]:
    """An empty cache for every layer of ``model``, in the dtype of its activations."""
    dtype = model.final_norm.weight.dtype
    return [KVCache.empty(model.config, batch, dtype) for _ in model.layers]
