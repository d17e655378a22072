"""Logits -> next token: penalties, logit bias, temperature, top-k / top-p / min-p, sampling.

Everything here is an MLX graph (no ``.item()``), so the generation loop can build step n+1
before step n's token is read. Order, as Hugging Face applies it: penalties and bias on the raw
logits, then temperature, then the top-k, top-p and min-p filters, then a categorical draw.
Temperature 0 means greedy (argmax of the penalised, biased logits).

Shapes: logits (B, V); recent token window (B, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import mlx.core as mx

from ..checks import check_int, check_number, check_seed
from ..errors import MlxgptError

NEG_INF = -math.inf


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token. Defaults are neutral: every filter and penalty is off."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (1 = off)
    min_p: float = 0.0  # drop tokens less likely than min_p * P(most likely) (0 = off)
    repetition_penalty: float = 1.0  # CTRL-style: divide positive logits of seen tokens (1 = off)
    presence_penalty: float = 0.0  # subtract once from every token seen in the window
    frequency_penalty: float = 0.0  # subtract per occurrence in the window
    penalty_window: int = 64  # how many recent tokens (prompt included) the penalties look at
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # same seed, same text

    def __post_init__(self) -> None:
        for name in ("top_k", "penalty_window"):
            check_int(getattr(self, name), f"sampling: {name}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            check_number(getattr(self, name), f"sampling: {name}")
        if self.seed is not None:  # MLX takes 0..2**64-1; a bad one would fail mid-reply
            check_seed(self.seed, "sampling: seed")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.penalty_window > 0, "penalty_window must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MlxgptError(f"sampling: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# --------------------------------------------------------------------------- filters


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits per row (ties at the k-th value are kept), the rest -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)  # (B, 1) k-th largest
    return mx.where(logits >= kth, logits, NEG_INF)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the most likely tokens until their probability reaches p.

    The token that crosses p is kept, and so is always the most likely one.
    """
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # (B, V) most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each token
    kept = mx.where(before < p, sorted_logits, NEG_INF)
    return mx.put_along_axis(mx.full(logits.shape, NEG_INF, logits.dtype), order, kept, axis=-1)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    top = mx.max(logits, axis=-1, keepdims=True)
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    return mx.where(logits >= top + math.log(min_p), logits, NEG_INF)


def apply_penalties(
    logits: mx.array,
    recent: mx.array,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> mx.array:
    """Penalise the tokens in ``recent`` (B, W): repetition (CTRL: positive logits divided,
    negative multiplied), presence (minus a constant once) and frequency (minus per count)."""
    counts = mx.zeros(logits.shape, mx.float32)
    rows = mx.broadcast_to(mx.arange(logits.shape[0])[:, None], recent.shape)
    counts = counts.at[rows, recent].add(1.0)  # (B, V) occurrences in the window
    seen = counts > 0
    out = logits
    if repetition != 1.0:
        out = mx.where(seen, mx.where(out > 0, out / repetition, out * repetition), out)
    if presence:
        out = out - presence * seen.astype(out.dtype)
    if frequency:
        out = out - frequency * counts.astype(out.dtype)
    return out


def bias_vector(bias: dict[int, float], vocab_size: int) -> mx.array | None:
    """The logit bias as a dense (V,) vector, or None when empty."""
    if not bias:
        return None
    for tok in bias:
        if not 0 <= int(tok) < vocab_size:
            raise MlxgptError(f"logit bias: token id {tok} is not in 0..{vocab_size - 1}")
    ids = mx.array([int(t) for t in bias], mx.int32)
    vals = mx.array([float(v) for v in bias.values()], mx.float32)
    return mx.zeros((vocab_size,), mx.float32).at[ids].add(vals)


# --------------------------------------------------------------------------- the sampler


class TokenSampler:
    """Callable ``(logits (B, V), recent (B, W) | None) -> tokens (B,) int32``.

    Holds the random key so a seed reproduces the same draws; each call splits it.
    """

    def __init__(self, settings: SamplingSettings, vocab_size: int):
        self.settings = settings
        self.bias = bias_vector(settings.logit_bias, vocab_size)
        self.key = mx.random.key(settings.seed) if settings.seed is not None else None

    def process(self, logits: mx.array, recent: mx.array | None = None) -> mx.array:
        """Penalties, bias, temperature and filters: the logits the token is drawn from."""
        s = self.settings
        logits = logits.astype(mx.float32)
        if s.penalised and recent is not None and recent.size:
            logits = apply_penalties(
                logits, recent, s.repetition_penalty, s.presence_penalty, s.frequency_penalty
            )
        if self.bias is not None:
            logits = logits + self.bias
        if s.greedy:
            return logits
        logits = logits * (1.0 / s.temperature)
        logits = apply_top_k(logits, s.top_k)
        logits = apply_top_p(logits, s.top_p)
        return apply_min_p(logits, s.min_p)

    def __call__(self, logits: mx.array, recent: mx.array | None = None) -> mx.array:
        logits = self.process(logits, recent)
        if self.settings.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        if self.key is None:
            return mx.random.categorical(logits, axis=-1).astype(mx.int32)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logits, axis=-1, key=sub).astype(mx.int32)
