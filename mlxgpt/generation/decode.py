"""Decoding one sequence: what every generation path shares (single, speculative, batched).

- the context-limit policy: :func:`check_limits` and :func:`fit_prompt` (Model-2-style absolute
  positions end at ``n_positions``; ``"slide"`` keeps the most recent ``window_keep`` tokens and
  reads them again from position 0, ``"stop"`` ends with finish reason ``"length"``);
- :func:`generate_tokens`: token ids (and log-probabilities) from a :class:`Context`, with the
  sampler's penalty window; it builds step n+1 and starts evaluating it (``mx.async_eval``)
  before reading token n, so Python overhead hides behind the model;
- :class:`StopMatcher`: stop strings over streamed text, a possible partial match held back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx

from ..errors import MlxgptError
from .context import SHORT_READ, Context
from .sample import TokenSampler

CONTEXT_POLICIES = ("slide", "stop")


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


def check_limits(n_positions: int, max_tokens: int, context: str,
                 window_keep: int | None) -> int:
    """Refuse a bad policy, token budget or window; the tokens kept when the window slides."""
    if context not in CONTEXT_POLICIES:
        raise MlxgptError(f"context policy must be one of {', '.join(CONTEXT_POLICIES)}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise MlxgptError(f"max_tokens must be a positive number of tokens, got {max_tokens!r}")
    keep = window_keep or max(1, n_positions // 2)
    if not 0 < keep <= n_positions:
        raise MlxgptError(f"window_keep must be in 1..{n_positions}")
    return keep


def generate_tokens(
    ctx: Context,
    prompt: Sequence[int],
    sampler: TokenSampler,
    *,
    max_tokens: int = 256,
    context: str = "slide",
    window_keep: int | None = None,
    logprobs: bool = False,
    history: Sequence[int] | None = None,
) -> Iterator[tuple[int, float | None]]:
    """Yield (token id, log-probability or None) for up to ``max_tokens`` new tokens.

    The cache of ``ctx`` is synced to ``prompt`` first (a shared prefix is not read again).
    Ends early only when the context is full and ``context == "stop"``. The penalties look
    back over ``history`` (the text so far, when ``prompt`` is only its window), else
    ``prompt``.
    """
    n_pos = ctx.n_positions
    keep = check_limits(n_pos, max_tokens, context, window_keep)
    prompt = fit_prompt(prompt, n_pos, context, keep)
    window = sampler.settings.penalty_window if sampler.settings.penalised else 0
    past = list(prompt if history is None else history)[-window:]
    recent = mx.array(past, mx.int32)[None] if window else None  # (1, W)

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

    y, lp = pick(ctx.sync(prompt, unpadded=SHORT_READ))
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
