"""Continuous batching: several sequences decoded together, one forward pass per step.

Each sequence (a :class:`SequenceRequest`) has its own prompt, position, KV cache rows, sampling
settings, stop strings, token budget and optional output constraint. Sequences join and leave
between steps: :meth:`BatchGenerator.add` gives a request a row; :meth:`BatchGenerator.step`
reads the prompts of the rows added since the last step together (one padded ``(B', T)``
forward, each row skipping the longest prefix it shares with a recent sequence), draws every
row's next token, reports it, and runs all continuing rows through one compiled forward:
``(B, 1)`` tokens, each at its own position.

On the CPU this turns B single-row matmuls (``(1, K) @ (K, N)``, bound by reading the weights)
into one ``(B, K) @ (K, N)``: the weights are read once per step for the whole batch.

The rows' caches are one buffer per layer, ``(B, H, capacity, D)``; row b holds ``offsets[b]``
positions and its query sees only those (a boolean mask), so rows of any lengths share a step.
The capacity grows in steps of :data:`~mlxgpt.generation.cache.STEP` positions and shrinks when
the longest row leaves.

A sequence decoded here gives the same tokens as :func:`~mlxgpt.generation.generate.generate`
gives it alone (greedy: exactly; the context-limit policies included).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .cache import STEP
from .context import PREFILL_STEP, common_prefix
from .decode import Constraint, SequenceText, check_limits, constrain_logits, fit_prompt
from .sample import SamplingSettings, TokenSampler


@dataclass
class SequenceRequest:
    """One sequence to generate."""

    prompt: list[int]
    max_tokens: int = 256
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    constraint: Constraint | None = None
    context: str = "slide"  # at the context limit: "slide" the window or "stop"
    window_keep: int | None = None  # tokens kept when the window slides (half the context)


@dataclass
class TokenEvent:
    """One row's step: its new token and text, or (``finish_reason`` set) its end."""

    uid: int
    token: int | None
    text: str = ""  # may be "" while a character or a possible stop string is held back
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability)
    finish_reason: str | None = None  # "stop" (stop string, constraint done), "eos", "length"
    prompt_tokens: int = 0  # set on the finishing event
    cached_tokens: int = 0
    generation_tokens: int = 0
    drafted_tokens: int = 0  # with a draft model: tokens it proposed for this sequence
    accepted_tokens: int = 0  # ... and of those, the ones the model accepted


class BatchCache:
    """One layer's keys and values for a batch, traced inside the compiled step.

    ``offset`` (B,) int32: how many positions each row holds; the new token goes there.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Write k, v (B, H, T, D) at each row's offset; every key and value (B, H, S, D) and
        the mask (B, 1, T, S) of the keys each row's queries see (causal, per row)."""
        t = k.shape[2]
        queries = self.offset[:, None] + mx.arange(t)  # (B, T) positions of the new tokens
        where = mx.broadcast_to(queries[:, None, :, None], k.shape)
        self.keys = mx.put_along_axis(self.keys, where, k, axis=2)
        self.values = mx.put_along_axis(self.values, where, v, axis=2)
        seen = mx.arange(self.keys.shape[2]) <= queries[:, :, None]  # (B, T, S)
        return self.keys, self.values, seen[:, None, :, :]


def compiled_batch_step(model: Model, every: bool = False) -> Callable[..., tuple[mx.array, ...]]:
    """(tokens (B, 1), offsets (B,), *buffers) -> (logits (B, V), *buffers). Traced once per
    (B, capacity). With ``every``: tokens (B, T), logits (B, T, V) of every position (a draft's
    tokens verified), traced once per (B, T, capacity)."""

    def step(tokens: mx.array, offsets: mx.array, *buffers: mx.array):
        pairs = zip(buffers[0::2], buffers[1::2], strict=True)
        caches = [BatchCache(k, v, offsets) for k, v in pairs]
        logits = model(tokens, caches)
        return (logits if every else logits[:, 0, :],
                *[a for c in caches for a in (c.keys, c.values)])

    return mx.compile(step, inputs=model.state)


class RowBuffers:
    """A batch's keys and values: per layer (B, H, capacity, D), rows in the batch's order.
    The capacity grows in steps of STEP positions, at most ``n_positions``."""

    def __init__(self, n_positions: int):
        self.n_positions = n_positions
        self.arrays: list[mx.array] = []  # keys, values of each layer

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    def reserve(self, need: int) -> None:
        """Hold at least ``need`` positions (rounded up to STEP, at most n_positions)."""
        if need > self.capacity:
            self.resize(_round_up(need, self.n_positions))

    def resize(self, cap: int) -> None:
        """Make every buffer hold ``cap`` positions (cut or zero-padded at the end)."""
        if not self.arrays or cap == self.capacity:
            return
        if cap < self.capacity:
            self.arrays = [b[:, :, :cap, :] for b in self.arrays]
            return
        b, h, old, d = self.arrays[0].shape
        pad = mx.zeros((b, h, cap - old, d), self.arrays[0].dtype)
        self.arrays = [mx.concatenate([a, pad], axis=2) for a in self.arrays]

    def append(self, new: list[mx.array], need: int) -> None:
        """Add rows' buffers (B', H, cap', D) after the others; ``need``: positions the rows
        already here hold."""
        cap = max(self.capacity, new[0].shape[2], _round_up(need, self.n_positions))
        self.resize(cap)
        if new[0].shape[2] < cap:
            b, h, n, d = new[0].shape
            pad = mx.zeros((b, h, cap - n, d), new[0].dtype)
            new = [mx.concatenate([a, pad], axis=2) for a in new]
        if self.arrays:
            new = [mx.concatenate([old, a], axis=0)
                   for old, a in zip(self.arrays, new, strict=True)]
        self.arrays = new

    def keep(self, rows: list[int], need: int) -> None:
        """Keep only these rows (in this order), shrunk to ``need`` positions."""
        if not rows:
            self.arrays = []
            return
        idx = mx.array(rows, mx.int32)
        self.arrays = [b[idx] for b in self.arrays]
        self.resize(_round_up(need, self.n_positions))
        mx.eval(self.arrays)

    def row_kv(self, i: int, n: int) -> list[tuple[mx.array, mx.array]]:
        """Row i's keys and values of its first n positions, (1, H, n, D) per layer."""
        bufs = [b[i : i + 1, :, :n, :] for b in self.arrays]
        return list(zip(bufs[0::2], bufs[1::2], strict=True))


def read_rows(model: Model, starts: Sequence[tuple[int, Any]], rests: Sequence[Sequence[int]],
              n_positions: int) -> tuple[list[mx.array], mx.array]:
    """Read rows of ids in padded, chunked batched forwards: row i holds ``starts[i]``
    (n, each layer's keys/values of at least n positions, or None when n is 0) and reads
    ``rests[i]`` after it. The new rows' buffers (B, H, cap, D) per layer and the logits (B, V)
    of each row's last id.

    Rows are right-padded to the longest rest; padding writes keys/values past a row's real
    positions, where its queries never look, and later tokens overwrite them."""
    dtype = model.final_norm.weight.dtype  # the activations' dtype
    cfg = model.config
    span = max(len(r) for r in rests)
    cap = _round_up(max(n for n, _ in starts) + span, n_positions)
    buffers = []
    for layer in range(2 * cfg.n_layer):  # keys, values of each layer: (B, H, cap, D)
        parts = []
        for n, kv in starts:
            known = kv[layer // 2][layer % 2][..., :n, :].astype(dtype) if n else None
            pad = mx.zeros((1, cfg.n_kv_head, cap - n, cfg.head_dim), dtype)
            parts.append(pad if known is None else mx.concatenate([known, pad], axis=2))
        buffers.append(mx.concatenate(parts, axis=0))
    tokens = mx.array([list(r) + [0] * (span - len(r)) for r in rests], mx.int32)  # (B, span)
    offsets = mx.array([n for n, _ in starts], mx.int32)
    last: list[mx.array | None] = [None] * len(rests)
    for c0 in range(0, span, PREFILL_STEP):
        chunk = tokens[:, c0 : c0 + PREFILL_STEP]
        caches = [BatchCache(k, v, offsets + c0)
                  for k, v in zip(buffers[0::2], buffers[1::2], strict=True)]
        h = model.hidden(chunk, caches)  # (B, t, C)
        buffers = [a for c in caches for a in (c.keys, c.values)]
        for i, r in enumerate(rests):
            if c0 <= len(r) - 1 < c0 + chunk.shape[1]:
                last[i] = h[i, len(r) - 1 - c0]  # (C,) the row's last real position
        mx.eval(buffers, [x for x in last if x is not None])
    return buffers, model.logits(mx.stack(last))  # (B, V)


@dataclass
class _Row:
    uid: int
    request: SequenceRequest
    sampler: TokenSampler
    tokens: list[int]  # every id in the row's cache (prompt, then generated), + the pending one
    prompt_tokens: int
    cached_tokens: int
    keep: int  # window kept when sliding
    text: SequenceText
    logits: mx.array | None = None  # (V,) where the next token is drawn from
    generated: int = 0
    drafted: int = 0  # with a draft model: its tokens proposed for this row, and accepted
    accepted: int = 0


class PrefixStore:
    """The token ids and keys/values of a few recent sequences, newest first, and of pinned
    prefixes (prompt cache files, never dropped): a new prompt that starts like one of them
    reads only the rest."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: list[tuple[list[int], list[tuple[mx.array, mx.array]]]] = []
        self.pinned: list[tuple[list[int], list[tuple[mx.array, mx.array]]]] = []

    def pin(self, tokens: Sequence[int], kv: list[tuple[mx.array, mx.array]]) -> None:
        """Keep this prefix (each layer's keys and values, (1, H, N, D)) for as long as the
        store lives, whatever its size."""
        if not tokens:
            raise MlxgptError("a pinned prefix needs at least one token")
        self.pinned.append((list(tokens), list(kv)))

    def add(self, tokens: list[int], kv: list[tuple[mx.array, mx.array]]) -> None:
        if self.size <= 0 or not tokens:
            return
        # Own copies: views would keep a whole batch buffer alive.
        kv = [(mx.array(k), mx.array(v)) for k, v in kv]
        mx.eval(kv)
        self.entries = [e for e in self.entries if e[0] != tokens]
        self.entries.insert(0, (list(tokens), kv))
        del self.entries[self.size :]

    def longest(self, ids: Sequence[int]) -> tuple[int, list[tuple[mx.array, mx.array]] | None]:
        """(n, keys/values of ids[:n]) for the stored sequence sharing the longest prefix."""
        best, best_kv = 0, None
        for tokens, kv in [*self.entries, *self.pinned]:  # a tie: the recent one (same ids)
            n = common_prefix(tokens, ids)
            if n > best:
                best, best_kv = n, kv
        if best_kv is None:
            return 0, None
        return best, [(k[..., :best, :], v[..., :best, :]) for k, v in best_kv]


class BatchGenerator:
    """Sequences decoded together; add and remove them between steps.

    >>> gen = BatchGenerator(model, tokenizer)
    >>> uid = gen.add(SequenceRequest(tokenizer.encode_prompt("Hello"), max_tokens=20))
    >>> while gen.active:
    ...     for event in gen.step(): ...
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int = 16,
                 prefix_cache: int = 8):
        if max_batch < 1:
            raise MlxgptError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.n_positions = model.config.n_positions
        self.vocab_size = model.config.vocab_size
        self.prefixes = PrefixStore(prefix_cache)
        self.rows: list[_Row] = []  # in the batch, in the order of the buffers' rows
        self.pending: list[_Row] = []  # added (or slid) rows whose prompt is read next step
        self.kv = RowBuffers(self.n_positions)  # the rows' keys and values
        self._step = compiled_batch_step(model)
        self._uids = itertools.count()

    # -- state

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.pending)

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def full(self) -> bool:
        return self.active >= self.max_batch

    # -- joining and leaving

    def add(self, request: SequenceRequest) -> int:
        """Give the request a row; its prompt is read (with the others added since the last
        step, in one batched pass) and its first token drawn at the next :meth:`step`.
        Returns its id."""
        if self.full:
            raise MlxgptError(f"the batch is full ({self.max_batch} sequences)")
        keep = check_limits(self.n_positions, request.max_tokens, request.context,
                            request.window_keep)
        ids = list(request.prompt)
        if not ids:
            if self.tokenizer.eot_id is None:
                raise MlxgptError("the prompt is empty (and the tokenizer has no <|endoftext|>)")
            ids = [self.tokenizer.eot_id]
        ids = fit_prompt(ids, self.n_positions, request.context, keep)
        row = _Row(
            uid=next(self._uids), request=request,
            sampler=TokenSampler(request.sampling, self.vocab_size), tokens=ids,
            prompt_tokens=len(ids), cached_tokens=0, keep=keep,
            text=SequenceText(self.tokenizer, request.stop, request.stop_at_eos,
                              request.constraint),
        )
        self.pending.append(row)
        return row.uid

    def remove(self, uid: int) -> bool:
        """Drop a sequence (e.g. its client left); whether it was here."""
        for i, row in enumerate(self.pending):
            if row.uid == uid:
                del self.pending[i]
                return True
        for i, row in enumerate(self.rows):
            if row.uid == uid:
                self._drop([i])
                return True
        return False

    def _read(self, rows: list[_Row]) -> None:
        """Read the prompts of new rows (each row's ``tokens``) in batched forward passes and
        add the rows to the batch, each with the logits its first token is drawn from.

        A row whose prompt starts like a stored sequence reads only the rest. Rows of a pass
        are right-padded to the longest rest; padding writes keys/values past a row's real
        positions, where its queries never look, and later tokens overwrite them.
        """
        starts = []
        for row in rows:
            n, kv = self.prefixes.longest(row.tokens)
            n = min(n, len(row.tokens) - 1)  # the last id is read again: its logits are needed
            row.cached_tokens = n
            starts.append((n, kv))
        group: list[int] = []
        for i in range(len(rows)):  # rows whose padded length fits the model's positions
            span = max(len(rows[j].tokens) - starts[j][0] for j in [*group, i])
            if group and max(starts[j][0] for j in [*group, i]) + span > self.n_positions:
                self._read_group([rows[j] for j in group], [starts[j] for j in group])
                group = []
            group.append(i)
        self._read_group([rows[j] for j in group], [starts[j] for j in group])

    def _read_group(self, rows: list[_Row], starts: list[tuple[int, Any]]) -> None:
        rests = [row.tokens[n:] for row, (n, _) in zip(rows, starts, strict=True)]
        buffers, logits = read_rows(self.model, starts, rests, self.n_positions)
        for i, row in enumerate(rows):
            row.logits = logits[i]
        self.kv.append(buffers, self._held())
        self._joined(rows)
        self.rows.extend(rows)
        mx.eval(self.kv.arrays, *(r.logits for r in self.rows if r.logits is not None))

    def _held(self) -> int:
        """Positions the rows need kept: every id of each, and room for the next."""
        return max((len(r.tokens) for r in self.rows), default=-1) + 1

    def _joined(self, rows: list[_Row]) -> None:
        """Rows whose prompts were just read, about to join the batch (a subclass keeps
        state beside the rows' caches)."""

    def _kept(self, rows: list[int]) -> None:
        """Only these rows of the batch (by their old indices) remain."""

    def _drop(self, indices: list[int]) -> None:
        """Remove rows (and shrink the buffers to the longest row left)."""
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.kv.keep(keep, self._held())
        self._kept(keep)

    # -- stepping

    def step(self) -> list[TokenEvent]:
        """Draw every row's next token, report it (and each finished row), and start the
        forward pass of the rows that go on."""
        self._read_pending()
        if not self.rows:
            return []
        picks = [self._pick(row) for row in self.rows]
        mx.eval([a for p in picks for a in p if a is not None])
        outs = [[(int(tok.item()), None if lp is None else float(lp.item()),
                  None if ids is None else sorted(zip(ids.tolist(), lps.tolist(), strict=True),
                                                  key=lambda p: -p[1]))]
                for tok, lp, ids, lps in picks]
        events, moved = self._settle(outs)
        self._forward()
        self.pending.extend(moved)
        return events

    def _read_pending(self) -> None:
        if self.pending:
            self._read(self.pending)
            self.pending = []

    def _settle(self, outs: list[list[tuple[int, float | None, list | None]]]
                ) -> tuple[list[TokenEvent], list[_Row]]:
        """Give each row its new tokens (token, log-probability, top ones) in order, until one
        ends it; drop the rows that finished and those whose window slides. The events, and
        the sliding rows (their kept window cut, to be read again from position 0, as
        generate does)."""
        events, finished, slide = [], [], []
        for i, (row, toks) in enumerate(zip(self.rows, outs, strict=True)):
            for tok, lp, top in toks:
                event = self._emit(row, tok, lp, top)
                events.append(event)
                if event.finish_reason is None and len(row.tokens) > self.n_positions:
                    # the token just drawn has no position left: slide the window or stop
                    if row.request.context == "stop":
                        self._finish(row, event, "length")
                    else:
                        slide.append(i)
                        break
                if event.finish_reason is not None:
                    finished.append(i)
                    break
        for i in finished:
            row = self.rows[i]
            self.prefixes.add(row.tokens[:-1], self.kv.row_kv(i, len(row.tokens) - 1))
        moved = [self.rows[i] for i in slide]
        self._drop(finished + slide)
        for row in moved:
            row.tokens = row.tokens[-row.keep :]
        return events, moved

    def _pick(self, row: _Row) -> tuple[mx.array, ...]:
        """The row's next token (1,) and, if asked, its log-probability and the top ones."""
        logits = row.logits[None]  # (1, V)
        row.logits = None
        req = row.request
        logits = constrain_logits(logits, req.constraint)
        window = req.sampling.penalty_window if req.sampling.penalised else 0
        recent = mx.array(row.tokens[-window:], mx.int32)[None] if window else None
        tok = row.sampler(logits, recent)  # (1,)
        if req.logprobs is None:
            return tok, None, None, None
        logp = log_probs(logits[0])
        lp = logp[tok[0]]
        if not req.logprobs:
            return tok, lp, None, None
        k = min(req.logprobs, logp.shape[0])
        top = mx.argpartition(-logp, k - 1)[:k]
        return tok, lp, top, logp[top]

    def _emit(self, row: _Row, tok: int, lp: float | None,
              top: list[tuple[int, float]] | None) -> TokenEvent:
        row.generated += 1
        row.tokens.append(tok)
        event = TokenEvent(row.uid, tok, logprob=lp, top_logprobs=top)
        req = row.request
        if req.constraint is not None:  # (<|endoftext|> is allowed only once it is complete)
            req.constraint.advance(tok)  # before the text: it says when the document is done
        event.text, reason = row.text.add(tok)
        if reason == "eos":
            event.token = None  # <|endoftext|> is not part of the text
        if reason is None and row.generated >= req.max_tokens:
            reason = "length"
        return event if reason is None else self._finish(row, event, reason)

    def _finish(self, row: _Row, event: TokenEvent, reason: str) -> TokenEvent:
        event.text += row.text.tail()
        event.finish_reason = reason
        event.prompt_tokens, event.cached_tokens = row.prompt_tokens, row.cached_tokens
        event.generation_tokens = row.generated
        event.drafted_tokens, event.accepted_tokens = row.drafted, row.accepted
        return event

    def _forward(self) -> None:
        """Run every row's newest token through the model (lazily); sets each row's logits."""
        rows = self.rows
        if not rows:
            return
        self.kv.reserve(max(len(r.tokens) for r in rows))  # each newest token written
        tokens = mx.array([r.tokens[-1] for r in rows], mx.int32)[:, None]  # (B, 1)
        offsets = mx.array([len(r.tokens) - 1 for r in rows], mx.int32)  # (B,)
        out = self._step(tokens, offsets, *self.kv.arrays)
        self.kv.arrays = list(out[1:])
        for i, row in enumerate(rows):
            row.logits = out[0][i]
        mx.async_eval(out[0], *self.kv.arrays)


def log_probs(logits: mx.array) -> mx.array:
    """Log-probabilities (V,) from one row's logits."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits)


def _round_up(n: int, limit: int) -> int:
    """``n`` rounded up to a multiple of STEP, at most ``limit``."""
    return min(-(-n // STEP) * STEP, limit)


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_batch: int = 16,
    **kwargs,
) -> list[str]:
    """Generate for every prompt together; the texts, in order. Keyword arguments are
    :class:`SequenceRequest`'s (``max_tokens``, ``sampling``, ``stop``...), the same for all."""
    texts = dict.fromkeys(range(len(prompts)), "")
    for i, event in stream_batch(model, tokenizer, prompts, max_batch=max_batch, **kwargs):
        texts[i] += event.text
    return [texts[i] for i in range(len(prompts))]


def stream_batch(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_batch: int = 16,
    **kwargs,
) -> Iterator[tuple[int, TokenEvent]]:
    """(prompt index, event) as the batch runs; prompts beyond ``max_batch`` join as others
    finish."""
    gen = BatchGenerator(model, tokenizer, max_batch=max_batch)
    waiting = list(enumerate(prompts))[::-1]
    index: dict[int, int] = {}
    while waiting or gen.active:
        while waiting and not gen.full:
            i, prompt = waiting.pop()
            ids = tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
            index[gen.add(SequenceRequest(ids, **kwargs))] = i
        for event in gen.step():
            yield index[event.uid], event
