"""Text generation: KV-cached, streamed, with stop strings and a context-limit policy.

Three layers, each usable on its own:

- :class:`mlxgpt.generation.context.Context` holds the tokens a model has read and their KV
  cache; ``sync(ids)`` reads only what is not cached yet.
- :func:`mlxgpt.generation.decode.generate_tokens` yields token ids (see :mod:`.decode`: the
  per-token logic every path shares).
- :func:`stream_generate` / :func:`generate` turn ids into text with the tokenizer's UTF-8-safe
  stream decoder, stop at ``<|endoftext|>`` or at stop strings (a partial match is held back, so
  a stop string never leaks), and report speed and memory.

Context limit: Model-2 learned ``n_positions`` absolute positions. With ``context="slide"`` (the
default) a sequence that would pass it is cut to its most recent ``window_keep`` tokens (half the
context unless given), which are read again from position 0, and generation goes on; with
``context="stop"`` generation ends with finish reason ``"length"``.

Two ways to spend less time, both through :func:`stream_generate`: a draft model
(:mod:`.speculative`, same output) and a prompt cache file (:mod:`.prompt_cache`, a long prefix
read once and saved).

Structured output: ``json_schema`` (a JSON schema, or a compiled
:class:`~mlxgpt.generation.constrain.JsonConstraint`) limits every token to those that keep the
text a prefix of a document the schema accepts; generation ends (finish reason ``"stop"``) when
the document is complete. The same compiled schema and mask as the server's ``response_format``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .context import PREFILL_STEP, Context, common_prefix
from .decode import (
    SequenceText,
    check_limits,
    constraint_budget,
    fit_prompt,
    generate_tokens,
)
from .prompt_cache import PromptCache, check_prompt_cache, load_prompt_cache
from .sample import SamplingSettings, TokenSampler
from .speculative import (
    DEFAULT_DRAFT_TOKENS,
    DraftStats,
    check_draft,
    load_draft,
    speculative_tokens,
)

if TYPE_CHECKING:  # the JSON compiler is imported only when a schema is given
    from .constrain import JsonConstraint

MIN_TIMED = 1e-3  # seconds: a rate over a shorter time is noise (or a division by ~0)


# --------------------------------------------------------------------------- text


@dataclass
class GenerationResponse:
    """One streamed step; the last one (``finish_reason`` set, ``token`` None) is the summary."""

    text: str = ""  # new text; may be "" while a character or a possible stop string is held
    token: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None  # "stop" (stop string, JSON document complete), "eos"
    # (<|endoftext|>), "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens already in the KV cache (not read again)
    generation_tokens: int = 0
    prompt_tps: float | None = None  # prompt tokens read per second (up to the first token)
    generation_tps: float | None = None  # tokens per second after the first
    # (a rate is None when there is too little to time: nothing read, one token, < 1 ms)
    ttft: float = 0.0  # seconds to the first token (a prompt cache file read included)
    peak_memory_gb: float = 0.0
    drafted_tokens: int = 0  # with a draft model: tokens it proposed
    accepted_tokens: int = 0  # ... and of those, the ones the model accepted
    undrafted_tokens: int = 0  # draft_tokens="auto": tokens decoded without the draft (where
    # drafting was slower on this machine than decoding without it)

    @property
    def acceptance(self) -> float | None:
        """Share of the draft's tokens accepted (None without a draft)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


def stream_generate(
    model: Model,
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
    draft_model: Model | str | None = None,
    draft_tokens: int | str = DEFAULT_DRAFT_TOKENS,
    draft_ctx: Context | None = None,
    prompt_cache: PromptCache | str | os.PathLike | None = None,
    json_schema: dict | JsonConstraint | None = None,
) -> Iterator[GenerationResponse]:
    """Generate text piece by piece. ``prompt`` is text or token ids.

    Yields one response per token, then a final one with the finish reason and statistics.
    Pass a :class:`Context` to keep the KV cache between calls (as the chat does).

    ``draft_model`` (a GPT sharing the tokenizer, or a model reference to load): speculative
    decoding, ``draft_tokens`` proposed per round ("auto": 4, for as long as that is faster
    on this machine than decoding without the draft, see :mod:`mlxgpt.generation.draft_length`);
    the same text greedily, the same distribution when sampling (``draft_ctx`` keeps the
    draft's cache between calls).
    ``prompt_cache`` (a file from ``mlxgpt cache-prompt`` or a :class:`PromptCache`): its
    prefix is taken as read, and ``prompt`` follows it (encoded on its own; may be empty).
    ``json_schema``: the output is a JSON document the schema accepts, within ``max_tokens``
    (compact: no whitespace between its tokens; a
    :class:`~mlxgpt.generation.constrain.JsonConstraint` of your own allows some, or with
    schema None any JSON object); with a draft model too (the draft proposes under a copy of
    the constraint and the model checks each position under its mask).
    """
    constraint = None if json_schema is None else json_constraint(
        tokenizer, model.config.vocab_size, json_schema)
    sampling = sampling or SamplingSettings()
    start = time.perf_counter()  # reading a prompt cache counts towards the first token
    if isinstance(prompt, str):
        # after a cached prefix the text continues it: no BOS in between
        ids = (tokenizer.encode_prompt(prompt) if prompt_cache is None
               else tokenizer.encode(prompt) if prompt else [])
    else:
        ids = [int(i) for i in prompt]
    ctx = ctx or Context(model, prefill_step)
    if prompt_cache is not None:
        ids = use_prompt_cache(ctx, prompt_cache, tokenizer) + ids
    if not ids:
        if tokenizer.eot_id is None:
            raise MlxgptError("the prompt is empty (and the tokenizer has no <|endoftext|>)")
        ids = [tokenizer.eot_id]  # GPT-2 was trained with documents after <|endoftext|>
    if draft_ctx is None and draft_model is not None:
        draft = (load_draft(draft_model, model, tokenizer) if isinstance(draft_model, str)
                 else draft_model)
        check_draft(model, draft)
        draft_ctx = Context(draft, prefill_step)
    sampler = TokenSampler(sampling, model.config.vocab_size)
    state = None
    if constraint is not None:
        keep = check_limits(ctx.n_positions, max_tokens, context, window_keep)
        read = len(fit_prompt(ids, ctx.n_positions, context, keep))
        state = constraint.start(constraint_budget(max_tokens, read, ctx.n_positions, context))
    seq = SequenceText(tokenizer, stop, stop_at_eos, state)

    mx.reset_peak_memory()
    cached = common_prefix(ctx.tokens, ids)
    first = last = start
    n = 0
    stats = DraftStats()
    if draft_ctx is None:
        tokens = generate_tokens(ctx, ids, sampler, max_tokens=max_tokens, context=context,
                                 window_keep=window_keep, logprobs=logprobs, constraint=state)
    else:
        keep = check_limits(ctx.n_positions, max_tokens, context, window_keep)
        tokens = speculative_tokens(
            ctx, draft_ctx, fit_prompt(ids, ctx.n_positions, context, keep), sampler,
            draft_tokens=draft_tokens, max_tokens=max_tokens, keep=keep,
            slide=context == "slide", logprobs=logprobs, stats=stats, constraint=state)
    reason = "length"  # unless a token ends it: the budget was spent or the context is full
    for tok, lp in tokens:
        last = time.perf_counter()
        if n == 0:
            first = last
        n += 1
        text, why = seq.add(tok)
        if why == "eos":  # <|endoftext|> is no part of the text
            reason = why
            break
        yield GenerationResponse(text, tok, lp)
        if why is not None:
            reason = why
            break
    yield GenerationResponse(
        text=seq.tail(),
        finish_reason=reason,
        prompt_tokens=len(ids),
        cached_tokens=cached,
        generation_tokens=n,
        prompt_tps=rate(len(ids) - cached, first - start),
        generation_tps=rate(n - 1, last - first),
        ttft=first - start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        drafted_tokens=stats.proposed,
        accepted_tokens=stats.accepted,
        undrafted_tokens=stats.undrafted,
    )


def json_constraint(tokenizer: Tokenizer, vocab_size: int, schema: dict | JsonConstraint | None,
                    whitespace: int = 0, name: str = "json_schema") -> JsonConstraint:
    """``schema`` compiled for this tokenizer and vocabulary (a JsonConstraint as it is; None:
    any JSON object). Whitespace bytes per gap: 0 by default, compact as the server writes.
    A schema it cannot compile: one line naming ``name``."""
    from .constrain import JsonConstraint

    if isinstance(schema, JsonConstraint):
        if schema.vocab_size != vocab_size:
            raise MlxgptError(f"{name}: compiled for {schema.vocab_size} token ids, the model "
                              f"has {vocab_size}")
        return schema
    if schema is not None and not isinstance(schema, dict):
        raise MlxgptError(f"{name} must be a JSON schema (a dict), got "
                          f"{type(schema).__name__}")
    try:
        return JsonConstraint(tokenizer, schema, vocab_size, whitespace=whitespace)
    except MlxgptError as e:  # the compiler words its messages for the server's field
        raise MlxgptError(f"{name}: {str(e).removeprefix('response_format ')}") from None


def use_prompt_cache(ctx: Context, cache: PromptCache | str | os.PathLike,
                     tokenizer: Tokenizer) -> list[int]:
    """Put a prompt cache's prefix into ``ctx`` (unless it holds it already), checked to be
    ``ctx``'s model's; its ids."""
    if not isinstance(cache, PromptCache):
        cache = load_prompt_cache(cache, ctx.model, tokenizer)
    elif common_prefix(ctx.tokens, cache.tokens) < len(cache):
        check_prompt_cache(cache, ctx.model, tokenizer)
    if common_prefix(ctx.tokens, cache.tokens) < len(cache):
        ctx.load(cache.tokens, cache.kv)
    return list(cache.tokens)


def rate(count: int, seconds: float) -> float | None:
    """count / seconds, or None when there is nothing to count or too short a time to trust."""
    return count / seconds if count > 0 and seconds >= MIN_TIMED else None


def format_rate(tps: float | None, digits: int = 1) -> str:
    """A rate for people: "12.3 tok/s", or "- tok/s" when it could not be measured."""
    return "- tok/s" if tps is None else f"{tps:.{digits}f} tok/s"


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The generated text (without the prompt). Keyword arguments as :func:`stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
