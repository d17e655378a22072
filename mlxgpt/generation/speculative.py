"""Speculative decoding: a small draft model proposes tokens, the model checks them in one forward.

Each round the draft proposes k tokens one by one; the model reads its last token and the k
drafts in one forward (:meth:`Context.extend`) and so has its own distribution at each of the
k + 1 positions. Drafts are accepted left to right:

- greedy: while a draft equals the model's argmax (the output is the model's greedy text);
- sampling: draft d (drawn from the draft's q) with probability min(1, p(d) / q(d)); the first
  rejected one is replaced by a draw from max(0, p - q) normalised (Leviathan et al. 2023, Chen
  et al. 2023), so each token is distributed exactly as the model alone would draw it.

Every round emits the accepted drafts plus one token of the model's own (the replacement, or
after k accepted drafts the token that follows), and both caches forget what was rejected
(:meth:`Context.trim`). p and q are the distributions after the sampling settings (penalties,
bias, temperature, top-k/p, min-p), the same settings for both models.

It pays where reading k + 1 tokens costs the model little more than reading one: a decoding step
moves every weight through memory once whatever the number of rows (``tools/bench_speculative.py``
measures it). The context-limit policies behave as without a draft: the model's window slides (or
generation stops) at the same token; the draft keeps its own window inside its own context.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .context import SHORT_READ, Context
from .decode import Constraint, constrain_logits, generate_tokens
from .draft_length import PAUSE, RECENT_ROUNDS, DraftCosts, costs_for, drafting_pays
from .identity import tokenizer_digest
from .sample import NEG_INF, TokenSampler

AUTO = "auto"  # draft_tokens: AUTO_MAX a round while that pays on this machine (draft_length.py)
DEFAULT_DRAFT_TOKENS = AUTO
AUTO_MAX = 4  # the most an automatic round proposes (the best fixed k on the shipped pair)
PLAIN_TRIAL = 8  # tokens decoded without the draft to time that (draft_tokens="auto")


@dataclass
class DraftStats:
    """How the draft did: tokens proposed and accepted, rounds of verification."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    undrafted: int = 0  # "auto": tokens decoded without the draft (drafting did not pay)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


# --------------------------------------------------------------------------- the draft model


def check_draft(model: Model, draft: Model, tokenizer: Tokenizer | None = None,
                draft_tokenizer: Tokenizer | None = None) -> None:
    """Refuse a draft that does not share the model's vocabulary (and tokenizer, when given)."""
    v, dv = model.config.vocab_size, draft.config.vocab_size
    if v != dv:
        raise MlxgptError(f"the draft model has {dv:,} token ids, the model {v:,}: a draft must "
                          "share the model's tokenizer")
    if tokenizer is not None and draft_tokenizer is not None and (
            tokenizer_digest(tokenizer) != tokenizer_digest(draft_tokenizer)):
        raise MlxgptError("the draft model's tokenizer is not the model's: a draft must share "
                          "the model's tokenizer")


def load_draft(ref: str, model: Model, tokenizer: Tokenizer, dtype: str | None = None) -> Model:
    """Load the draft model ``ref`` (as :func:`mlxgpt.load` does) for ``model``, refusing one with
    another tokenizer; prepared for fast decoding (it is used for nothing else)."""
    from ..checkpoints.load import load
    from ..core.backend import prepare_for_inference

    draft, draft_tok = load(ref, dtype=dtype)
    check_draft(model, draft, tokenizer, draft_tok)
    return prepare_for_inference(draft)


def check_draft_tokens(k: int | str) -> int | str:
    """``k`` if it is "auto" or a whole number of at least 1."""
    if k == AUTO:
        return k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MlxgptError(f"draft_tokens must be at least 1 or {AUTO!r}, got {k!r}")
    return k


# --------------------------------------------------------------------------- one round
# What one sequence does in a round, shared by the single-sequence path (:class:`Speculator`)
# and the batched one (:mod:`.batch_speculative`): draw a draft token, then judge the drafts
# against the model's distributions.


def _subkey(sampler: TokenSampler) -> mx.array | None:
    """The next random key of a seeded sampler (None: MLX's global generator)."""
    if sampler.key is None:
        return None
    sampler.key, sub = mx.random.split(sampler.key)
    return sub


def recent_window(seq: Sequence[int], window: int,
                  drafts: Sequence[mx.array] = ()) -> mx.array | None:
    """The penalty window (1, W) before the position after ``seq`` + ``drafts`` (each (1,));
    None when the sampler has no penalties (window 0)."""
    if not window:
        return None
    tail = mx.array(list(seq[-window:]), mx.int32)
    return mx.concatenate([tail, *drafts])[-window:][None]


def draft_token(sampler: TokenSampler, logits: mx.array, recent: mx.array | None,
                mask: np.ndarray | None = None) -> tuple[mx.array, mx.array]:
    """A draft token (1,) from the draft's logits (1, V), and the processed logits (1, V) it was
    drawn from (q of the acceptance rule): argmax when greedy, else a draw."""
    if mask is not None:
        logits = mx.where(mx.array(mask[: logits.shape[-1]]), logits, NEG_INF)
    q = sampler.process(logits, recent)
    if sampler.settings.greedy:
        return mx.argmax(q, axis=-1).astype(mx.int32), q
    return mx.random.categorical(q, axis=-1, key=_subkey(sampler)).astype(mx.int32), q


def forked(constraint: Constraint | None) -> Constraint | None:
    """A copy of ``constraint`` that drafts may advance (None: drafting cannot follow it)."""
    fork = getattr(constraint, "copy", None)
    return fork() if fork is not None else None


@dataclass
class Verdict:
    """One sequence's round, judged: lazy arrays (evaluate :attr:`arrays`), then :meth:`read`.

    ``drafts`` (k,), ``own`` (k + 1,): the model's token at each position in case the drafts
    before it were accepted and the one there was not; ``accept`` (k,); with log-probabilities,
    those of each draft (k,) and own token (k + 1,), and the top ones (k + 1, t).
    """

    drafts: mx.array
    own: mx.array
    accept: mx.array
    draft_lps: mx.array | None = None
    own_lps: mx.array | None = None
    top_ids: mx.array | None = None
    top_lps: mx.array | None = None

    @property
    def arrays(self) -> list[mx.array]:
        return [a for a in (self.drafts, self.own, self.accept, self.draft_lps, self.own_lps,
                            self.top_ids, self.top_lps) if a is not None]

    def read(self) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """The emitted tokens: the accepted drafts and one of the model's own, each with its
        log-probability and top ones (None when not asked)."""
        acc = self.accept.tolist()
        k = len(acc)
        n = acc.index(False) if False in acc else k
        toks = self.drafts.tolist()[:n] + [int(self.own[n].item())]
        lps: list[float | None] = [None] * (n + 1)
        if self.own_lps is not None:
            lps = (self.draft_lps.tolist()[:n] if n else []) + [float(self.own_lps[n].item())]
        tops: list[list[tuple[int, float]] | None] = [None] * (n + 1)
        if self.top_ids is not None:
            ids, vals = self.top_ids.tolist(), self.top_lps.tolist()
            tops = [sorted(zip(ids[j], vals[j], strict=True), key=lambda p: -p[1])
                    for j in range(n + 1)]
        return list(zip(toks, lps, tops, strict=True))


def verify(sampler: TokenSampler, logits: mx.array, drafts: Sequence[mx.array],
           q_logits: Sequence[mx.array], recent: Callable[[int], mx.array | None],
           masks: Sequence[np.ndarray] = (), logprobs: int | None = None) -> Verdict:
    """Judge k drafts (each (1,)) against the model's logits (k + 1, V) at the positions after
    the last token and after each draft: greedy, a draft is accepted while it equals the
    model's argmax; sampling, draft d (drawn from q) with probability min(1, p(d) / q(d)), and
    the first rejected one is replaced by a draw from max(0, p - q) normalised.

    ``recent(j)``: the penalty window before position j; ``masks`` (k + 1 bool (V,), or none):
    what a constraint allows at each position (the draft was drawn under the same masks, so a
    draft is always allowed). p and q are after the sampling settings. ``logprobs``: None,
    0 (the chosen tokens' log-probabilities, of the masked logits) or t (and the top t)."""
    k = len(drafts)
    if masks:
        allowed = mx.array(np.stack([m[: logits.shape[-1]] for m in masks[: k + 1]]))
        logits = mx.where(allowed, logits, NEG_INF)
    p_logits = mx.concatenate([sampler.process(logits[j : j + 1], recent(j))
                               for j in range(k + 1)])  # (k + 1, V)
    d = mx.concatenate(list(drafts)) if k else mx.zeros((0,), mx.int32)  # (k,)
    if sampler.settings.greedy:
        own = mx.argmax(p_logits, axis=-1).astype(mx.int32)  # (k + 1,)
        accept = d == own[:k]
    else:
        own, accept = accept_sampled(sampler, p_logits, mx.concatenate(list(q_logits))
                                     if k else p_logits[:0], d)
    verdict = Verdict(d, own, accept)
    if logprobs is not None:
        raw = logits.astype(mx.float32)
        logp = raw - mx.logsumexp(raw, axis=-1, keepdims=True)  # (k + 1, V)
        rows = mx.arange(k + 1)
        verdict.draft_lps = logp[rows[:k], d]
        verdict.own_lps = logp[rows, own]
        if logprobs:
            t = min(logprobs, logp.shape[-1])
            verdict.top_ids = mx.argpartition(-logp, t - 1, axis=-1)[:, :t]
            verdict.top_lps = mx.take_along_axis(logp, verdict.top_ids, axis=-1)
    return verdict


def accept_sampled(sampler: TokenSampler, p_logits: mx.array, q_logits: mx.array,
                   d: mx.array) -> tuple[mx.array, mx.array]:
    """The acceptance rule: per position, whether draft d (k,) is kept (u < p(d) / q(d)) and
    the model's own token in case it is not (a draw from max(0, p - q) normalised; at the
    last position, after k accepted drafts, a draw from p). p_logits (k + 1, V),
    q_logits (k, V)."""
    k = d.shape[0]
    p = mx.softmax(p_logits, axis=-1)  # (k + 1, V)
    q = mx.softmax(q_logits, axis=-1)  # (k, V)
    rows = mx.arange(k)
    u = mx.random.uniform(shape=(k,), key=_subkey(sampler))
    accept = u * q[rows, d] < p[rows, d]  # q(d) > 0: d was drawn from q
    residual = mx.maximum(p[:k] - q, 0.0)
    # p == q leaves nothing: then rejection never happens and the row is never used.
    empty = mx.sum(residual, axis=-1, keepdims=True) <= 0
    residual = mx.concatenate([mx.where(empty, p[:k], residual), p[k:]])  # (k + 1, V)
    own = mx.random.categorical(mx.log(residual), axis=-1, key=_subkey(sampler))
    return own.astype(mx.int32), accept


class Speculator:
    """The state of one speculative generation: the sequence so far and both contexts.

    ``seq`` is every token of the prompt (as the model holds it) and output so far; the model has
    read all of it but the last one, the draft a stretch of it starting at ``draft_start``.
    ``constraint`` (its state after ``seq``): the draft proposes and the model picks only what
    it allows; whoever takes the emitted tokens advances it (:func:`speculative_tokens`).
    """

    def __init__(self, ctx: Context, draft: Context, sampler: TokenSampler, *, keep: int,
                 slide: bool, logprobs: bool, stats: DraftStats,
                 constraint: Constraint | None = None):
        self.ctx, self.draft, self.sampler = ctx, draft, sampler
        self.keep, self.slide, self.logprobs, self.stats = keep, slide, logprobs, stats
        self.constraint = constraint
        s = sampler.settings
        self.window = s.penalty_window if s.penalised else 0
        self.greedy = s.greedy
        self.seq: list[int] = []
        self.draft_start = 0

    def recent(self, drafts: Sequence[mx.array] = ()) -> mx.array | None:
        """The penalty window (1, W) before the position after ``seq`` + ``drafts``."""
        return recent_window(self.seq, self.window, drafts)

    def pick(self, logits: mx.array) -> tuple[int, float | None]:
        """A token of the model's own from logits (1, V) after ``seq``."""
        logits = constrain_logits(logits, self.constraint)
        tok = self.sampler(logits, self.recent())  # (1,)
        lp = logits[0, tok[0]] - mx.logsumexp(logits[0]) if self.logprobs else None
        mx.eval(tok, *([] if lp is None else [lp]))
        return tok.item(), (lp.item() if lp is not None else None)

    def start(self, prompt: Sequence[int]) -> tuple[int, float | None]:
        """Read the prompt; the first token."""
        self.seq = list(prompt)
        self.draft_start = 0
        tok = self.pick(self.ctx.sync(self.seq, unpadded=SHORT_READ))
        self.seq.append(tok[0])
        return tok

    # -- the draft

    def draft_logits(self, k: int) -> mx.array:
        """Bring the draft up to ``seq`` (its window slid if k more tokens would not fit);
        logits (1, V) of the position after it."""
        d = self.draft
        if len(self.seq) - self.draft_start + k - 1 > d.n_positions:
            size = min(self.keep, d.n_positions // 2, d.n_positions - k + 1)
            self.draft_start = len(self.seq) - max(1, size)
        return d.sync(self.seq[self.draft_start :], unpadded=SHORT_READ)

    def propose(self, k: int) -> tuple[list[mx.array], list[mx.array], list[np.ndarray]]:
        """Up to k draft tokens (each (1,)), the draft's processed logits (1, V) for each and,
        under a constraint, its mask at each drafted position and the one after (fewer
        drafts when one completes the document: the sequence ends there)."""
        logits = self.draft_logits(k)
        state = forked(self.constraint)  # advanced over the drafts, not the real state
        tokens: list[mx.array] = []
        dists: list[mx.array] = []
        masks: list[np.ndarray] = []
        for j in range(k):
            mask = None if state is None else state.allowed()
            tok, q = draft_token(self.sampler, logits, self.recent(tokens), mask)
            tokens.append(tok)
            dists.append(q)
            if state is not None:
                masks.append(mask)
                state.advance(tok.item())  # the next mask needs the token
                if state.complete:
                    break
            else:
                mx.async_eval(tok)  # the draft runs while the next step is built
            if j + 1 < k:
                logits = self.draft.step(tok)
        if state is not None:
            masks.append(state.allowed())
        return tokens, dists, masks  # the draft has read every token but the last

    # -- a round

    def round(self, k: int) -> list[tuple[int, float | None]]:
        """Propose k tokens, verify them with the model in one forward, keep what is accepted;
        the emitted tokens (accepted drafts + one of the model's own)."""
        drafts, q_logits, masks = self.propose(k)
        k = len(drafts)
        y = mx.array([self.seq[-1]], mx.int32)
        logits = self.ctx.extend(mx.concatenate([y, *drafts])[None])[0]  # (k + 1, V)
        verdict = verify(self.sampler, logits, drafts, q_logits,
                         lambda j: self.recent(drafts[:j]), masks,
                         0 if self.logprobs else None)
        mx.eval(verdict.arrays)
        out = verdict.read()
        n = len(out) - 1
        self.stats.proposed += k
        self.stats.accepted += n
        self.stats.rounds += 1
        self.ctx.trim(k - n)  # the model read y and k drafts; it keeps y and the accepted ones
        self.seq.extend(t for t, _, _ in out)
        return [(t, lp) for t, lp, _ in out]

    def trial(self, k: int) -> int:
        """Run a round with k drafts, or decode PLAIN_TRIAL tokens without the draft (k = 0, as
        :meth:`undrafted` does), then undo it: the sequence, the model's context, the sampler's
        key and the statistics are as they were (the next round brings the draft's context up to
        the text, as after any round). For timing (:mod:`.draft_length`); needs room for
        max(k + 1, PLAIN_TRIAL) tokens in the model. Returns how many tokens it made."""
        seq, draft_start, key = list(self.seq), self.draft_start, self.sampler.key
        stats = dataclasses.replace(self.stats)
        offset = self.ctx.offset
        made = (len(list(self.undrafted(PLAIN_TRIAL, forked(self.constraint)))) if k == 0
                else len(self.round(k)))
        self.ctx.trim(self.ctx.offset - offset)
        self.seq, self.draft_start, self.sampler.key = seq, draft_start, key
        for f in dataclasses.fields(stats):
            setattr(self.stats, f.name, getattr(stats, f.name))
        return made

    def undrafted(self, max_tokens: int, constraint: Constraint | None = None
                  ) -> Iterator[tuple[int, float | None]]:
        """The next ``max_tokens`` tokens decoded without the draft, as generation without one
        decodes (each step queued before the token before it is read); ``constraint`` is
        advanced over them (ending them when its document is complete)."""
        window = self.keep if self.slide else None
        # what the model holds (its window, if it slid) and the token it has not read yet
        held = [*self.ctx.tokens, self.seq[-1]]
        for tok in generate_tokens(self.ctx, held, self.sampler, max_tokens=max_tokens,
                                   context="slide" if self.slide else "stop",
                                   window_keep=window, logprobs=self.logprobs,
                                   history=self.seq, constraint=constraint):
            self.seq.append(tok[0])
            yield tok

    def step(self) -> tuple[int, float | None] | None:
        """One token of the model's own without drafts (too little room for a round); None when
        the context is full and the policy is to stop."""
        y = mx.array([self.seq[-1]], mx.int32)
        if self.ctx.offset < self.ctx.n_positions:
            tok = self.pick(self.ctx.step(y))
        elif self.slide:  # exactly as without a draft: keep - 1 recent tokens and y
            ids = self.ctx.tokens[-(self.keep - 1) :] if self.keep > 1 else []
            self.ctx.reset()
            tok = self.pick(self.ctx.prefill([*ids, self.seq[-1]]))
            self.draft_start = len(self.seq) - self.keep  # the draft sees the same window
        else:
            return None
        self.seq.append(tok[0])
        return tok


def speculative_tokens(
    ctx: Context,
    draft: Context,
    prompt: Sequence[int],
    sampler: TokenSampler,
    *,
    draft_tokens: int | str = DEFAULT_DRAFT_TOKENS,
    max_tokens: int = 256,
    keep: int,
    slide: bool = True,
    logprobs: bool = False,
    stats: DraftStats | None = None,
    constraint: Constraint | None = None,
) -> Iterator[tuple[int, float | None]]:
    """Yield (token id, log-probability or None) as :func:`generate_tokens` does, drafted by
    ``draft`` ``draft_tokens`` at a time, or with "auto" AUTO_MAX at a time while that is
    faster on this machine than decoding without the draft (:mod:`.draft_length`).
    ``prompt`` must fit the model's context; ``keep`` tokens stay when the window slides
    (``slide``), else generation stops at the limit. ``constraint``: as for
    :func:`generate_tokens` (every token allowed by it, read by it as it is yielded, the end
    after the token that completes its document); the draft proposes under a copy of it."""
    check_draft(ctx.model, draft.model)
    auto = check_draft_tokens(draft_tokens) == AUTO
    k_max = AUTO_MAX if auto else int(draft_tokens)
    spec = Speculator(ctx, draft, sampler, keep=keep, slide=slide, logprobs=logprobs,
                      stats=stats if stats is not None else DraftStats(), constraint=constraint)

    def emit(toks: list[tuple[int, float | None]]) -> Iterator[tuple[int, float | None]]:
        for tok in toks:  # the constraint reads each token before the next is drawn or shown
            if constraint is not None:
                constraint.advance(tok[0])
            yield tok

    def done() -> bool:
        return constraint is not None and constraint.complete

    yield from emit([spec.start(prompt)])
    if done():
        return
    costs: DraftCosts | None = None
    made: deque[int] = deque(maxlen=RECENT_ROUNDS)  # tokens of the last rounds ("auto")
    n = 1
    while n < max_tokens:
        room = ctx.n_positions - ctx.offset - 1  # after the last token, for drafts
        k = min(k_max, max_tokens - n - 1, room, draft.n_positions - 1)
        if auto and k >= 1 and (costs is not None or room >= max(k_max, PLAIN_TRIAL)):
            costs = costs or costs_for(ctx.model, draft.model, spec.trial, k_max, spec.greedy)
            if not drafting_pays(costs, made, k_max):
                # a pause, then the draft is tried again; for good when it cannot pay at all
                pause = max_tokens - n if not made else min(PAUSE, max_tokens - n)
                made.clear()
                before = spec.stats.undrafted
                for tok in spec.undrafted(pause, constraint):  # which advances the constraint
                    spec.stats.undrafted += 1
                    yield tok
                n += spec.stats.undrafted - before
                if spec.stats.undrafted - before < pause or done():
                    return  # the context is full and generation stops there, or the document
                    # is complete
                continue
        if k < 1:
            tok = spec.step()
            if tok is None:
                return
            toks = [tok]
        else:
            toks = spec.round(k)
            made.append(len(toks))
        for tok in emit(toks):
            yield tok
            if done():  # the token completed the document: what follows it is not text
                return
        n += len(toks)
        if spec.stats.rounds % 64 == 63:
            mx.clear_cache()
