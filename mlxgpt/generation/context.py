"""What a model has read: token ids and their KV cache, advanced through one compiled forward.

Prompts (in chunks, padded to a few sizes) and then each new token run through one compiled
forward that writes keys and values in place into the cache's buffers, which grow in fixed steps,
so it is traced once per (chunk size, buffer size), not once per token. ``sync(ids)`` keeps the
longest common prefix and reads only the rest: a chat re-reads nothing it already read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from ..core.model import Model
from ..errors import MlxgptError
from .cache import KVCache, make_cache

PREFILL_STEP = 512  # prompt tokens read per chunk
PAD_TO = 64  # prompt chunks are padded to a multiple of this: few shapes to trace
SHORT_READ = 16  # generation reads up to this many new prompt tokens unpadded (Context.sync)


def compiled_forward(model: Model, every: bool = False) -> Callable[..., tuple[mx.array, ...]]:
    """(tokens (1, T), offset (), last (), *buffers) -> (logits (1, V) at position ``last``,
    *buffers): the model reading T tokens after ``offset`` cached ones. Traced once per
    (T, buffer size); decoding uses T = 1. With ``every`` the logits are those of every
    position, (1, T, V) (verifying a draft's tokens)."""

    def step(tok: mx.array, offset: mx.array, last: mx.array, *buffers: mx.array):
        pairs = zip(buffers[0::2], buffers[1::2], strict=True)
        caches = [KVCache(k, v, offset) for k, v in pairs]
        h = model.hidden(tok, caches)  # (1, T, C)
        out = [a for c in caches for a in (c.keys, c.values)]
        if every:
            return (model.logits(h), *out)  # logits (1, T, V)
        return (model.logits(mx.take(h, last, axis=1)), *out)  # logits (1, V)

    # The weights are inputs, not constants, so a model changed later (LoRA, training) is seen.
    return mx.compile(step, inputs=model.state)


class Context:
    """The token ids a model has read and their keys/values; batch size 1."""

    def __init__(self, model: Model, prefill_step: int = PREFILL_STEP):
        self.model = model
        self.n_positions = model.config.n_positions
        self.prefill_step = prefill_step
        self.cache = make_cache(model)
        self._tokens: list[int | mx.array] = []
        self._step = compiled_forward(model)
        self._step_every: Callable[..., tuple[mx.array, ...]] | None = None  # made when needed

    # -- state

    @property
    def offset(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The ids in the cache (a token the decode step was given is read here)."""
        self._tokens = [t.item() if isinstance(t, mx.array) else t for t in self._tokens]
        return list(self._tokens)  # type: ignore[arg-type]

    @property
    def capacity(self) -> int:
        return self.cache[0].capacity

    def reset(self) -> None:
        self.trim(self.offset)

    def trim(self, n: int) -> None:
        """Forget the last n tokens (their keys/values are overwritten later)."""
        del self._tokens[max(0, len(self._tokens) - n) :]
        for c in self.cache:
            c.offset = self.offset

    def _forward(self, tokens: mx.array, n: int, step: Callable | None = None) -> mx.array:
        """Run tokens (1, T) after the cached ones, of which the first n are real and the rest
        padding; logits (1, V) of the last real one (not evaluated yet), or what ``step`` (a
        :func:`compiled_forward`) returns.

        Padding writes keys/values past the real tokens, where no real query looks (causal
        mask) and later tokens overwrite them.
        """
        total = self.offset + tokens.shape[1]
        if total > self.capacity:
            for c in self.cache:
                c.reserve(total, self.n_positions)
            mx.eval([a for c in self.cache for a in (c.keys, c.values)])
        buffers = [a for c in self.cache for a in (c.keys, c.values)]
        out = (step or self._step)(tokens, mx.array(self.offset, mx.int32),
                                   mx.array(n - 1, mx.int32), *buffers)
        for c, k, v in zip(self.cache, out[1::2], out[2::2], strict=True):
            c.keys, c.values, c.offset = k, v, self.offset + n
        return out[0]

    def kv(self) -> list[tuple[mx.array, mx.array]]:
        """Each layer's keys and values of the cached tokens, (1, H, offset, D) each."""
        n = self.offset
        return [(c.keys[..., :n, :], c.values[..., :n, :]) for c in self.cache]

    def load(self, tokens: Sequence[int], kv: Sequence[tuple[mx.array, mx.array]]) -> None:
        """Hold exactly ``tokens`` with their keys and values (as :meth:`kv` gives them): a
        prefix read earlier, by this process or a saved prompt cache, is not read again."""
        tokens = [int(t) for t in tokens]
        if len(kv) != len(self.cache):
            raise MlxgptError(f"the cache has {len(kv)} layers; the model has {len(self.cache)}")
        if len(tokens) > self.n_positions:
            raise MlxgptError(f"{len(tokens)} cached tokens do not fit the model's context "
                              f"({self.n_positions} positions)")
        dtype = self.cache[0].keys.dtype
        want = self.cache[0].keys.shape[:2] + (len(tokens),) + self.cache[0].keys.shape[3:]
        for c, (k, v) in zip(self.cache, kv, strict=True):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise MlxgptError(f"cached keys/values of shape {tuple(k.shape)} do not fit "
                                  f"this model (expected {want})")
            c.keys, c.values, c.offset = k.astype(dtype), v.astype(dtype), len(tokens)
        self._tokens = list(tokens)

    # -- reading tokens

    def prefill(self, ids: Sequence[int]) -> mx.array:
        """Read ``ids`` after what is cached; the last position's logits (1, V).

        The prompt goes in chunks of at most ``prefill_step`` tokens, each padded to a multiple
        of PAD_TO, so the compiled forward is traced for a few shapes whatever the lengths.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise MlxgptError("nothing to read: the prompt is empty")
        if self.offset + len(ids) > self.n_positions:
            raise MlxgptError(
                f"{self.offset + len(ids)} tokens do not fit the model's context "
                f"({self.n_positions} positions)"
            )
        for start in range(0, len(ids), self.prefill_step):
            chunk = ids[start : start + self.prefill_step]
            padded = min(-(-len(chunk) // PAD_TO) * PAD_TO, self.n_positions - self.offset)
            tokens = mx.array(chunk + [0] * (padded - len(chunk)), mx.int32)[None]
            logits = self._forward(tokens, len(chunk))
            self._tokens.extend(chunk)
            mx.eval([a for c in self.cache for a in (c.keys, c.values)])
        mx.eval(logits)
        return logits

    def step(self, token: mx.array) -> mx.array:
        """Read one token (a (1,) array, possibly not evaluated yet); return logits (1, V)."""
        if self.offset >= self.n_positions:
            raise MlxgptError(f"the context is full ({self.n_positions} positions)")
        logits = self._forward(token.reshape(1, 1), 1)
        self._tokens.append(token.reshape(()))
        return logits

    def extend(self, tokens: mx.array) -> mx.array:
        """Read tokens (1, T) (a few, possibly not evaluated yet) in one forward, unpadded;
        return the logits of every one, (1, T, V): a draft's tokens verified at once."""
        t = tokens.shape[1]
        if self.offset + t > self.n_positions:
            raise MlxgptError(f"the context is full ({self.n_positions} positions)")
        if self._step_every is None:
            self._step_every = compiled_forward(self.model, every=True)
        logits = self._forward(tokens, t, self._step_every)
        self._tokens.extend(tokens[0, i] for i in range(t))
        return logits

    def sync(self, ids: Sequence[int], unpadded: int = 0) -> mx.array:
        """Make the cache hold exactly ``ids``, reusing the common prefix; logits (1, V) of the
        last id (which is read again when everything was cached already). A rest of at most
        ``unpadded`` ids is read in one forward of its own length (:meth:`extend`), not padded
        to a chunk of PAD_TO: a few tokens after a long cached prefix cost a few tokens."""
        ids = [int(i) for i in ids]
        if not ids:
            raise MlxgptError("nothing to read: the prompt is empty")
        have = self.tokens
        common = min(common_prefix(have, ids), len(ids) - 1)
        self.trim(len(have) - common)
        rest = ids[common:]
        if len(rest) == 1 and unpadded:  # the decode step, traced already when generating
            return self.step(mx.array(rest, mx.int32))
        if len(rest) <= unpadded:
            return self.extend(mx.array(rest, mx.int32)[None])[:, -1]
        return self.prefill(rest)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
