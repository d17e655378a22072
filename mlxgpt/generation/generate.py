"""Text generation: KV-cached, streamed, with stop strings and a context-limit policy.

Three layers, each usable on its own:

- :class:`mlxgpt.generation.context.Context` holds the tokens a model has read and their KV
  cache; ``sync(ids)`` reads only what is not cached yet.
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

import mlx.core as mx

from ..core.model import GPT
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .context import PREFILL_STEP, Context, common_prefix
from .sample import SamplingSettings, TokenSampler

CONTEXT_POLICIES = ("slide", "stop")
MIN_TIMED = 1e-3  # seconds: a rate over a shorter time is noise (or a division by ~0)


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
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise MlxgptError(f"max_tokens must be a positive number of tokens, got {max_tokens!r}")
    n_pos = ctx.n_positions
    keep = window_keep or max(1, n_pos // 2)
    if not 0 < keep <= n_pos:
        raise MlxgptError(f"window_keep must be in 1..{n_pos}")
    prompt = fit_prompt(prompt, n_pos, context, keep)
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
    prompt_tps: float | None = None  # prompt tokens read per second (up to the first token)
    generation_tps: float | None = None  # tokens per second after the first
    # (a rate is None when there is too little to time: nothing read, one token, < 1 ms)
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
    tokenizer: Tokenizer,
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
    cached = common_prefix(ctx.tokens, ids)
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
        prompt_tps=rate(len(ids) - cached, first - start),
        generation_tps=rate(n - 1, last - first),
        ttft=first - start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def rate(count: int, seconds: float) -> float | None:
    """count / seconds, or None when there is nothing to count or too short a time to trust."""
    return count / seconds if count > 0 and seconds >= MIN_TIMED else None


def format_rate(tps: float | None, digits: int = 1) -> str:
    """A rate for people: "12.3 tok/s", or "- tok/s" when it could not be measured."""
    return "- tok/s" if tps is None else f"{tps:.{digits}f} tok/s"


def generate(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The generated text (without the prompt). Keyword arguments as :func:`stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
