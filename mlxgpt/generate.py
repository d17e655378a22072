"""Text generation: KV-cached, streamed, with stop strings and a context-limit policy.

Three layers, each usable on its own:

- :class:`Context` holds the tokens a model has read and their keys/values. Prompts (in
  chunks, padded to a few sizes) and then each new token run through one compiled forward that
  writes keys and values in place into a buffer grown in fixed steps, so it is traced once per
  (chunk size, buffer size), not once per token. ``sync(ids)`` keeps the longest common prefix
  and reads only the rest: a chat re-reads nothing it already read.
- :func:`generate_tokens` yields token ids. It builds step n+1 and starts evaluating it
  (``mx.async_eval``) before reading token n, so Python overhead hides behind the model.
- :func:`stream_generate` / :func:`generate` turn ids into text with the tokenizer's UTF-8-safe
  stream decoder, stop at ``<|endoftext|>`` or at stop strings (a partial match is held back, so
  a stop string never leaks), and report speed and memory.

Context limit: GPT-2 learned ``n_positions`` absolute positions. With ``context="slide"`` (the
default) a sequence that would pass it is cut to its most recent ``window_keep`` tokens (half the
context unless given), which are read again from position 0, and generation goes on; with
``context="stop"`` generation ends with finish reason ``"length"``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxgptError
from .model import GPT
from .sample import SamplingSettings, TokenSampler

CONTEXT_POLICIES = ("slide", "stop")
CACHE_STEP = 64  # KV buffers grow in steps of this many positions (attention spans the buffer)
PREFILL_STEP = 512  # prompt tokens read per chunk
PAD_TO = 64  # prompt chunks are padded to a multiple of this: few shapes to trace


# --------------------------------------------------------------------------- KV cache


class _LayerCache:
    """One layer's keys and values in a buffer (B, H, capacity, D).

    Eager (prefill): ``offset`` is an int, writes go in place and the filled part is returned.
    Traced (the compiled decode step): ``offset`` is a scalar array; the whole buffer comes back
    with a mask of the positions written so far (the model asks through ``attention_mask``).
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: int | mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        t = k.shape[2]
        if isinstance(self.offset, int):
            start, self.offset = self.offset, self.offset + t
            self.keys[..., start : self.offset, :] = k
            self.values[..., start : self.offset, :] = v
            return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        self.keys = mx.slice_update(self.keys, k, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, v, self.offset[None], axes=(2,))
        self.offset = self.offset + t
        return self.keys, self.values

    def attention_mask(self, t: int) -> mx.array | str | None:
        if isinstance(self.offset, int):
            return "causal" if t > 1 else None
        # Each query sees the keys up to its own position; the unwritten tail is masked.
        keys = mx.arange(self.keys.shape[2])
        if t == 1:
            return keys < self.offset  # (capacity,)
        queries = self.offset - t + mx.arange(t)  # positions of the t new tokens
        return keys[None, :] <= queries[:, None]  # (t, capacity)


def _forward_fn(model: GPT):
    """The compiled forward: (tokens (1, T), offset (), last (), *buffers) -> logits (1, V) at
    position ``last``, *buffers. Traced once per (T, buffer size); decoding uses T = 1."""

    def step(tok: mx.array, offset: mx.array, last: mx.array, *buffers: mx.array):
        pairs = zip(buffers[0::2], buffers[1::2], strict=True)
        caches = [_LayerCache(k, v, offset) for k, v in pairs]
        h = model.hidden(tok, caches)  # (1, T, C)
        out = [a for c in caches for a in (c.keys, c.values)]
        return (model.logits(mx.take(h, last, axis=1)), *out)  # logits (1, V)

    # The weights are inputs, not constants, so a model changed later (LoRA, training) is seen.
    return mx.compile(step, inputs=model.state)


class Context:
    """The token ids a model has read and their keys/values; batch size 1."""

    def __init__(self, model: GPT, prefill_step: int = PREFILL_STEP):
        self.model = model
        self.n_positions = model.config.n_positions
        self.prefill_step = prefill_step
        self._tokens: list[int | mx.array] = []
        self._buffers: list[mx.array] = []  # keys, values of each layer (1, H, capacity, D)
        self._dtype = model.ln_f.weight.dtype
        step = getattr(model, "_mlxgpt_forward", None)
        if step is None:
            step = _forward_fn(model)
            model._mlxgpt_forward = step  # shared by the model's contexts
        self._step = step

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
        return self._buffers[0].shape[2] if self._buffers else 0

    def reset(self) -> None:
        self._tokens = []

    def trim(self, n: int) -> None:
        """Forget the last n tokens (their keys/values are overwritten later)."""
        del self._tokens[max(0, len(self._tokens) - n) :]

    def _reserve(self, total: int) -> None:
        """Make the buffers hold ``total`` positions, growing in steps of CACHE_STEP."""
        if total <= self.capacity:
            return
        cap = min(self.n_positions, -(-total // CACHE_STEP) * CACHE_STEP)
        cfg = self.model.config
        shape = (1, cfg.n_head, cap, cfg.head_dim)
        new = [mx.zeros(shape, self._dtype) for _ in range(2 * cfg.n_layer)]
        if self._buffers and self.offset:
            keep = self.offset
            new = [mx.slice_update(n, b[..., :keep, :], mx.array([0]), axes=(2,))
                   for n, b in zip(new, self._buffers, strict=True)]
        self._buffers = []  # drop the old buffers before the new ones are evaluated
        mx.eval(new)
        self._buffers = new

    def _forward(self, tokens: mx.array, n: int) -> mx.array:
        """Run tokens (1, T) after the cached ones, of which the first n are real and the rest
        padding; logits (1, V) of the last real one (not evaluated yet).

        Padding writes keys/values past the real tokens, where no real query looks (causal
        mask) and later tokens overwrite them.
        """
        self._reserve(self.offset + tokens.shape[1])
        pos = mx.array(self.offset, mx.int32)
        out = self._step(tokens, pos, mx.array(n - 1, mx.int32), *self._buffers)
        self._buffers = list(out[1:])  # the old buffers are donated to the in-place update
        return out[0]

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
            mx.eval(self._buffers)
        mx.eval(logits)
        return logits

    def step(self, token: mx.array) -> mx.array:
        """Read one token (a (1,) array, possibly not evaluated yet); return logits (1, V)."""
        if self.offset >= self.n_positions:
            raise MlxgptError(f"the context is full ({self.n_positions} positions)")
        logits = self._forward(token.reshape(1, 1), 1)
        self._tokens.append(token.reshape(()))
        return logits

    def sync(self, ids: Sequence[int]) -> mx.array:
        """Make the cache hold exactly ``ids``, reusing the common prefix; logits (1, V) of the
        last id (which is read again when everything was cached already)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise MlxgptError("nothing to read: the prompt is empty")
        have = self.tokens
        common = min(_common_prefix(have, ids), len(ids) - 1)
        self.trim(len(have) - common)
        return self.prefill(ids[common:])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- token loop


def fit_prompt(ids: Sequence[int], n_positions: int, context: str, window_keep: int) -> list[int]:
    """The prompt the model can read: cut to the last ``window_keep`` tokens when it does not
    fit and the policy is "slide"; refused with "stop"."""
    ids = list(ids)
    if len(ids) <= n_positions:
        return ids
    if context == "stop":
        raise MlxgptError(
            f"the prompt is {len(ids)} tokens; the model's context is {n_positions} "
            "(use the sliding window to keep only the most recent tokens)"
        )
    return ids[-window_keep:]


def generate_tokens(
    ctx: Context,
    prompt: Sequence[int],
    sampler: TokenSampler,
    *,
    max_tokens: int = 256,
    context: str = "slide",
    window_keep: int | None = None,
    logprobs: bool = False,
) -> Iterator[tuple[int, float | None]]:
    """Yield (token id, log-probability or None) for up to ``max_tokens`` new tokens.

    The cache of ``ctx`` is synced to ``prompt`` first (a shared prefix is not read again).
    Ends early only when the context is full and ``context == "stop"``.
    """
    if context not in CONTEXT_POLICIES:
        raise MlxgptError(f"context policy must be one of {', '.join(CONTEXT_POLICIES)}")
    n_pos = ctx.n_positions
    keep = window_keep or max(1, n_pos // 2)
    if not 0 < keep <= n_pos:
        raise MlxgptError(f"window_keep must be in 1..{n_pos}")
    prompt = fit_prompt(prompt, n_pos, context, keep)
    if max_tokens <= 0:
        return
    window = sampler.settings.penalty_window if sampler.settings.penalised else 0
    recent = mx.array(list(prompt)[-window:], mx.int32)[None] if window else None  # (1, W)

    def pick(logits: mx.array) -> tuple[mx.array, mx.array | None]:
        nonlocal recent
        tok = sampler(logits, recent)  # (1,)
        if recent is not None:
            recent = mx.concatenate([recent, tok[None]], axis=1)[:, -window:]
        lp = None
        if logprobs:
            lp = logits[0, tok[0]] - mx.logsumexp(logits[0])
        mx.async_eval(tok, *([] if lp is None else [lp]))
        return tok, lp

    def advance(y: mx.array):
        """Queue the step after token y (None when the context is full and we stop)."""
        if ctx.offset < n_pos:
            return pick(ctx.step(y))
        if context == "slide":
            ids = ctx.tokens[-(keep - 1) :] if keep > 1 else []
            ctx.reset()
            return pick(ctx.prefill([*ids, y.item()]))
        return None

    def read(y: mx.array, lp: mx.array | None) -> tuple[int, float | None]:
        return y.item(), (lp.item() if lp is not None else None)

    y, lp = pick(ctx.sync(prompt))
    for n in range(max_tokens):
        last = n + 1 == max_tokens
        if n == 0:
            yield read(y, lp)  # the first token goes out at once (time to first token)
            nxt = None if last else advance(y)
        else:
            nxt = None if last else advance(y)  # queued before y is read: no idle gap
            yield read(y, lp)
        if nxt is None:
            return
        y, lp = nxt
        if n % 256 == 255:
            mx.clear_cache()


# --------------------------------------------------------------------------- text


@dataclass
class GenerationResponse:
    """One streamed step; the last one (``finish_reason`` set, ``token`` None) is the summary."""

    text: str = ""  # new text; may be "" while a character or a possible stop string is held
    token: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None  # "stop" (stop string), "eos" (<|endoftext|>), "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens already in the KV cache (not read again)
    generation_tokens: int = 0
    prompt_tps: float = 0.0  # prompt tokens read per second (up to the first token)
    generation_tps: float = 0.0  # tokens per second after the first
    ttft: float = 0.0  # seconds to the first token
    peak_memory_gb: float = 0.0


class StopMatcher:
    """Streams text and stops at any stop string, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string was hit)."""
        self.pending += text
        hit = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hit:
            out, self.pending = self.pending[: min(hit)], ""
            return out, True
        hold = 0
        for s in self.stops:  # the longest tail of pending that starts some stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    model: GPT,
    tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingSettings | None = None,
    stop: Sequence[str] = (),
    stop_at_eos: bool = True,
    context: str = "slide",
    window_keep: int | None = None,
    logprobs: bool = False,
    ctx: Context | None = None,
    prefill_step: int = PREFILL_STEP,
) -> Iterator[GenerationResponse]:
    """Generate text piece by piece. ``prompt`` is text or token ids.

    Yields one response per token, then a final one with the finish reason and statistics.
    Pass a :class:`Context` to keep the KV cache between calls (as the chat does).
    """
    sampling = sampling or SamplingSettings()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        if tokenizer.eot_id is None:
            raise MlxgptError("the prompt is empty (and the tokenizer has no <|endoftext|>)")
        ids = [tokenizer.eot_id]  # GPT-2 was trained with documents after <|endoftext|>
    ctx = ctx or Context(model, prefill_step)
    sampler = TokenSampler(sampling, model.config.vocab_size)
    decoder = tokenizer.stream_decoder()
    matcher = StopMatcher(stop)
    eos = tokenizer.eot_id if stop_at_eos else None

    mx.reset_peak_memory()
    cached = _common_prefix(ctx.tokens, ids)
    start = time.perf_counter()
    first = last = start
    n = 0
    reason = "length"
    for tok, lp in generate_tokens(
        ctx, ids, sampler, max_tokens=max_tokens, context=context,
        window_keep=window_keep, logprobs=logprobs,
    ):
        last = time.perf_counter()
        if n == 0:
            first = last
        n += 1
        if tok == eos:
            reason = "eos"
            break
        text, hit = matcher.feed(decoder.add(tok))
        if hit:
            yield GenerationResponse(text, tok, lp)
            reason = "stop"
            break
        yield GenerationResponse(text, tok, lp)
    tail = ""
    if reason != "stop":
        tail, _ = matcher.feed(decoder.flush())
        tail += matcher.flush()
    yield GenerationResponse(
        text=tail,
        finish_reason=reason,
        prompt_tokens=len(ids),
        cached_tokens=cached,
        generation_tokens=n,
        prompt_tps=(len(ids) - cached) / max(first - start, 1e-9),
        generation_tps=(n - 1) / (last - first) if n > 1 and last > first else 0.0,
        ttft=first - start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def generate(model: GPT, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The generated text (without the prompt). Keyword arguments as :func:`stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


# --------------------------------------------------------------------------- models


def shipped_model() -> Path:
    """The model folder that ships in ``mlxgpt.models`` (the first one, by name)."""
    from importlib import resources

    from .checkpoint import is_model_folder

    try:
        root = resources.files("mlxgpt.models")
        found = sorted(
            Path(str(p)) for p in root.iterdir() if p.is_dir() and is_model_folder(Path(str(p)))
        )
    except (ModuleNotFoundError, OSError):
        found = []
    if not found:
        raise MlxgptError(
            "no --model given and no model ships with this install: pass --model PATH "
            "(an mlxgpt or Hugging Face GPT-2 folder, or a hub id such as gpt2), "
            "or train one with `mlxgpt pretrain`"
        )
    return found[0]


# --------------------------------------------------------------------------- speed


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Convert ``model`` in place for fast generation on the CPU; a GPU keeps it as it is.

    Float32 weight matrices are stored as column blocks that reach BLAS's small-matrix kernel
    when one token is decoded (see :mod:`mlxgpt.layout`): same numbers, another layout. The
    model is for inference afterwards (its parameter names changed: do not train or save it).
    Idempotent; returns the model.
    """
    if mx.default_device() != mx.cpu or getattr(model, "_mlxgpt_blocked", False):
        return model
    from .layout import block_weights

    block_weights(model)
    model._mlxgpt_blocked = True
    model._mlxgpt_forward = None  # traced for the old parameters: trace again
    return model
