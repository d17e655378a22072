"""Decoding one sequence: what every generation path shares (single, speculative, batched).

- the context-limit policy: :func:`check_limits` and :func:`fit_prompt` (Model-2-style absolute
  positions end at ``n_positions``; ``"slide"`` keeps the most recent ``window_keep`` tokens and
  reads them again from position 0, ``"stop"`` ends with finish reason ``"length"``);
- :func:`generate_tokens`: token ids (and log-probabilities) from a :class:`Context`, with the
  sampler's penalty window; it builds step n+1 and starts evaluating it (``mx.async_eval``)
  before reading token n, so Python overhead hides behind the model;
- a :class:`Constraint` (e.g. a compiled JSON schema): :func:`constrain_logits` masks what it
  forbids before the sampler sees the logits, :func:`constraint_budget` sizes it;
- :class:`StopMatcher`: stop strings over streamed text, a possible partial match held back;
- :class:`SequenceText`: one sequence's tokens -> text and the reason it ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import mlx.core as mx
import numpy as np

from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .context import SHORT_READ, Context
from .sample import NEG_INF, TokenSampler

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


class Constraint(Protocol):
    """What limits a sequence's tokens (e.g. :class:`mlxgpt.generation.constrain.JsonState`)."""

    complete: bool  # the text is a finished document: the sequence ends here

    def allowed(self) -> np.ndarray:
        """bool (V,): the tokens that may come next."""

    def advance(self, token: int) -> None: ...

    def copy(self) -> Constraint:
        """An independent state at the same point (what a draft's tokens advance)."""


def constrain_logits(logits: mx.array, constraint: Constraint | None) -> mx.array:
    """``logits`` (1, V) with every token the constraint forbids at -inf (before the sampler,
    so penalties, bias and filters act only among the allowed ones)."""
    if constraint is None:
        return logits
    allowed = mx.array(constraint.allowed()[: logits.shape[-1]])
    return mx.where(allowed, logits, NEG_INF)


def constraint_budget(max_tokens: int, prompt_tokens: int, n_positions: int,
                      context: str) -> int:
    """The tokens a constrained document must end within: ``max_tokens``, and with the "stop"
    policy no more than the context has left after the prompt (a sliding window goes on)."""
    if context == "stop":
        return min(max_tokens, n_positions - prompt_tokens)
    return max_tokens


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
    constraint: Constraint | None = None,
) -> Iterator[tuple[int, float | None]]:
    """Yield (token id, log-probability or None) for up to ``max_tokens`` new tokens.

    The cache of ``ctx`` is synced to ``prompt`` first (a shared prefix is not read again).
    Ends early only when the context is full and ``context == "stop"``, or after the token
    that completes ``constraint``'s document. The penalties look back over ``history`` (the
    text so far, when ``prompt`` is only its window), else ``prompt``.

    With ``constraint`` every token is drawn from those it allows and is read by it before
    the next draw; log-probabilities are of the masked logits (as the server reports them).
    """
    n_pos = ctx.n_positions
    keep = check_limits(n_pos, max_tokens, context, window_keep)
    prompt = fit_prompt(prompt, n_pos, context, keep)
    window = sampler.settings.penalty_window if sampler.settings.penalised else 0
    past = list(prompt if history is None else history)[-window:]
    recent = mx.array(past, mx.int32)[None] if window else None  # (1, W)

    def pick(logits: mx.array) -> tuple[mx.array, mx.array | None]:
        nonlocal recent
        logits = constrain_logits(logits, constraint)
        tok = sampler(logits, recent)  # (1,)
        if recent is not None:
            recent = mx.concatenate([recent, tok[None]], axis=1)[:, -window:]
        lp = None
        if logprobs:
            lp = logits[0, tok[0]] - mx.logsumexp(logits[0])
        mx.async_eval(tok, *([] if lp is None else [lp]))
        return tok, lp

    def forward(y: mx.array) -> mx.array | None:
        """The logits after token y, queued (None when the context is full and we stop)."""
        if ctx.offset < n_pos:
            return ctx.step(y)
        if context == "slide":
            ids = ctx.tokens[-(keep - 1) :] if keep > 1 else []
            ctx.reset()
            return ctx.prefill([*ids, y.item()])
        return None

    def advance(y: mx.array):
        """Queue the step after token y (None when the context is full and we stop)."""
        logits = forward(y)
        return None if logits is None else pick(logits)

    def read(y: mx.array, lp: mx.array | None) -> tuple[int, float | None]:
        return y.item(), (lp.item() if lp is not None else None)

    y, lp = pick(ctx.sync(prompt, unpadded=SHORT_READ))
    for n in range(max_tokens):
        last = n + 1 == max_tokens
        if constraint is not None:
            # The mask of step n+1 needs token n read, so only the model's forward is queued
            # ahead (the mask is computed while it runs).
            logits = None if last else forward(y)
            if logits is not None:
                mx.async_eval(logits)
            out = read(y, lp)
            constraint.advance(out[0])
            yield out
            if logits is None or constraint.complete:
                return
            nxt = pick(logits)
        elif n == 0:
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


class SequenceText:
    """One sequence's new tokens as text, and why it ends: every path feeds its tokens here.

    :meth:`add` returns the text a token adds ("" while a character or a possible stop string
    is held back) and the finish reason it causes: ``"eos"`` (``<|endoftext|>``, not part of
    the text), ``"stop"`` (a stop string, which is cut with everything after it, or a
    constraint whose document the token completed), else None. The caller ends a sequence
    for its own reasons ("length": the token budget or a full context) and every ending takes
    :meth:`tail`.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), stop_at_eos: bool = True,
                 constraint: Constraint | None = None):
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopMatcher(stop)
        self.eos = tokenizer.eot_id if stop_at_eos else None
        self.constraint = constraint  # read only: whoever draws the tokens advances it
        self.cut = False  # a stop string ended the text

    def add(self, token: int) -> tuple[str, str | None]:
        if token == self.eos:
            return "", "eos"
        text, self.cut = self.matcher.feed(self.decoder.add(token))
        if self.cut:
            return text, "stop"
        if self.constraint is not None and self.constraint.complete:
            return text, "stop"
        return text, None

    def tail(self) -> str:
        """What the decoder and the stop matcher still hold, at the end ("" after a stop
        string: what it held is the stop string's start)."""
        if self.cut:
            return ""
        text, _ = self.matcher.feed(self.decoder.flush())
        return text + self.matcher.flush()
