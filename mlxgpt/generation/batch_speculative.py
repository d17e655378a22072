"""Speculative decoding for batched rows: a draft model proposes tokens for every row, the model
checks all rows' proposals in one forward.

Each step (:meth:`SpeculativeBatchGenerator.step`) is one round for every row:

1. the draft, with a batched cache of its own that mirrors the rows, catches up with each row
   (reading the one or two tokens it has not seen: every row reads the same number of its
   last ids, re-reading some it holds, so nothing is padded past a row's real positions) and
   proposes up to k tokens per row, one batched step each, under each row's sampling settings
   and a copy of its constraint;
2. the model reads every row's last token and drafts in one ``(B, k + 1)`` forward, each row at
   its own offset (the batch cache's mask is causal within the new positions and per row);
3. each row judges its drafts exactly as a single sequence does
   (:func:`~mlxgpt.generation.speculative.verify`: greedy by match, sampling by the rejection
   rule), takes the accepted ones and one token of the model's own, and both caches forget
   the rest by their row offsets.

Rows differ in how many drafts they get: a row's budget and its room in the context limit it
(a row with none is decoded plainly, from the same forward); constraints, log-probabilities and
penalties are applied per position as on the single-sequence path, so every row is drafted.
Greedy rows give the tokens plain batched decoding gives; sampled rows follow the model's
distribution. The draft's context must hold the model's (it mirrors each row's window).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .batch import (
    BatchGenerator,
    RowBuffers,
    TokenEvent,
    _Row,
    compiled_batch_step,
    read_rows,
)
from .decode import Constraint
from .speculative import (
    DraftStats,
    check_draft,
    draft_token,
    forked,
    recent_window,
    verify,
)

Emitted = list[tuple[int, float | None, list[tuple[int, float]] | None]]


def check_batch_draft(model: Model, draft: Model, draft_tokens: int) -> int:
    """Refuse a draft the batched path cannot use; the number of drafts per round."""
    check_draft(model, draft)
    if not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 1:
        raise MlxgptError(f"draft_tokens must be a whole number of at least 1, got "
                          f"{draft_tokens!r}")
    n, dn = model.config.n_positions, draft.config.n_positions
    if dn < n:
        raise MlxgptError(f"the draft model's context ({dn} positions) is shorter than the "
                          f"model's ({n}): to draft for batched rows it must hold as much")
    if 2 * draft_tokens >= n:
        raise MlxgptError(f"draft_tokens {draft_tokens} is too many for a context of {n}")
    return draft_tokens


class SpeculativeBatchGenerator(BatchGenerator):
    """A :class:`~mlxgpt.generation.batch.BatchGenerator` whose steps are speculative rounds:
    each step gives every row one to ``draft_tokens + 1`` tokens. ``stats`` counts the draft's
    tokens proposed and accepted over every row."""

    def __init__(self, model: Model, tokenizer: Tokenizer, draft: Model, draft_tokens: int = 4,
                 max_batch: int = 16, prefix_cache: int = 8):
        super().__init__(model, tokenizer, max_batch, prefix_cache)
        self.k = check_batch_draft(model, draft, draft_tokens)
        self.draft = draft
        self.draft_positions = draft.config.n_positions
        self.draft_kv = RowBuffers(self.draft_positions)
        self.draft_held: list[int] = []  # per row: its leading ids the draft's cache holds
        self._draft_step = compiled_batch_step(draft)
        self._draft_read = compiled_batch_step(draft, every=True)
        self._verify = compiled_batch_step(model, every=True)
        self.stats = DraftStats()

    # -- the draft's rows follow the batch's

    def _joined(self, rows: list[_Row]) -> None:
        buffers, _ = read_rows(self.draft, [(0, None)] * len(rows), [r.tokens for r in rows],
                               self.draft_positions)
        self.draft_kv.append(buffers, max(self.draft_held, default=-1) + 1)
        self.draft_held += [len(r.tokens) for r in rows]

    def _kept(self, rows: list[int]) -> None:
        self.draft_held = [self.draft_held[i] for i in rows]
        self.draft_kv.keep(rows, max(self.draft_held, default=-1) + 1)

    # -- stepping

    def step(self) -> list[TokenEvent]:
        """One speculative round for every row: report each row's new tokens (and each
        finished row)."""
        self._read_pending()
        if not self.rows:
            return []
        for row in self.rows:  # the round's verifying forward gives the first token too
            row.logits = None
        events, moved = self._settle(self._round())
        self.pending.extend(moved)
        return events

    def _draft_counts(self) -> list[int]:
        """Drafts per row this round: k, within the row's token budget (the model's own token
        comes after them) and its room in the context (every draft needs a position)."""
        counts = []
        for row in self.rows:
            budget = row.request.max_tokens - row.generated - 1
            room = self.n_positions - len(row.tokens)
            k = max(0, min(self.k, budget, room))
            if row.request.constraint is not None and forked(row.request.constraint) is None:
                k = 0  # a constraint that cannot be copied cannot follow the drafts
            counts.append(k)
        return counts

    def _round(self) -> list[Emitted]:
        counts = self._draft_counts()
        drafts, dists, masks = self._propose(counts)
        counts = [len(d) for d in drafts]  # fewer where a draft completed a document
        width = max(counts) + 1
        starts, tokens = [], []
        for row, d in zip(self.rows, drafts, strict=True):
            # the last token and the drafts, after as many held ids as make every row `width`
            # long (re-reading them writes the same keys); a row too short is padded after
            seq = row.tokens + [int(t.item()) for t in d]
            start = max(0, len(seq) - width)
            starts.append(start)
            tokens.append(seq[start:] + [0] * (width - len(seq) + start))
        self.kv.reserve(max(s + width for s in starts))
        out = self._verify(mx.array(tokens, mx.int32), mx.array(starts, mx.int32),
                           *self.kv.arrays)
        self.kv.arrays = list(out[1:])
        verdicts = []
        for i, row in enumerate(self.rows):
            first = len(row.tokens) - 1 - starts[i]  # slot of the row's last token
            k = counts[i]
            if row.request.constraint is not None and not masks[i]:  # no drafts: its own mask
                masks[i] = [row.request.constraint.allowed()]
            window = row.sampler.settings.penalty_window if row.sampler.settings.penalised \
                else 0
            verdicts.append(verify(
                row.sampler, out[0][i, first : first + k + 1], drafts[i], dists[i],
                lambda j, row=row, d=drafts[i], w=window: recent_window(row.tokens, w, d[:j]),
                masks[i], row.request.logprobs))
        mx.eval([a for v in verdicts for a in v.arrays], *self.kv.arrays)
        emitted = [v.read() for v in verdicts]
        for i, (row, toks) in enumerate(zip(self.rows, emitted, strict=True)):
            n = len(toks) - 1
            row.drafted += counts[i]
            row.accepted += n
            self.stats.proposed += counts[i]
            self.stats.accepted += n
            # the draft holds the row's ids and its drafts but the last: those accepted stay
            self.draft_held[i] = min(self.draft_held[i], len(row.tokens) + n)
        self.stats.rounds += 1
        if self.stats.rounds % 256 == 255:
            mx.clear_cache()
        return emitted

    def _propose(self, counts: list[int]
                 ) -> tuple[list[list[mx.array]], list[list[mx.array]], list[list[np.ndarray]]]:
        """Per row: its drafts (each (1,)), the draft's processed logits (1, V) for each, and
        under a constraint the masks at each drafted position and the one after."""
        rows = self.rows
        drafts: list[list[mx.array]] = [[] for _ in rows]
        dists: list[list[mx.array]] = [[] for _ in rows]
        masks: list[list[np.ndarray]] = [[] for _ in rows]
        k = max(counts)
        if k == 0:
            return drafts, dists, masks
        states: list[Constraint | None] = [forked(r.request.constraint) for r in rows]
        logits = self._catch_up()  # (B, V) after each row's ids
        lens = [len(r.tokens) for r in rows]
        active = [c > 0 for c in counts]
        for j in range(k):
            for i, row in enumerate(rows):
                if not (active[i] and j < counts[i]):
                    continue
                mask = None if states[i] is None else states[i].allowed()
                s = row.sampler.settings
                recent = recent_window(row.tokens, s.penalty_window if s.penalised else 0,
                                       drafts[i])
                tok, q = draft_token(row.sampler, logits[i : i + 1], recent, mask)
                drafts[i].append(tok)
                dists[i].append(q)
                if mask is not None:
                    masks[i].append(mask)
            mx.eval([d[-1] for d in drafts if d])
            for i, state in enumerate(states):
                if state is not None and active[i] and j < counts[i]:
                    state.advance(int(drafts[i][-1].item()))
                    if state.complete:  # the row ends at this draft: nothing after it
                        active[i] = False
            if j + 1 < k and any(active[i] and j + 1 < counts[i] for i in range(len(rows))):
                logits = self._draft_forward(drafts, lens, j)
        for i, state in enumerate(states):
            if state is not None and drafts[i]:
                masks[i].append(state.allowed())
        # the draft read the ids and each row's drafts but the last (some rows' steps wrote at
        # the last position: never count it as held)
        self.draft_held = [min(len(r.tokens) + max(len(d) - 1, 0), self.draft_positions - 1)
                           for r, d in zip(rows, drafts, strict=True)]
        return drafts, dists, masks

    def _catch_up(self) -> mx.array:
        """Bring the draft's cache up to every row's ids; logits (B, V) after each. Every row
        reads the same number of its last ids (the most any row misses; at least its last, whose
        logits are needed), so no row reads past its own last position."""
        lens = [len(r.tokens) for r in self.rows]
        held = [min(h, n - 1) for h, n in zip(self.draft_held, lens, strict=True)]
        span = max(n - h for n, h in zip(lens, held, strict=True))
        starts = [max(0, n - span) for n in lens]
        ids = [r.tokens[s:] + [0] * (span - len(r.tokens) + s)
               for r, s in zip(self.rows, starts, strict=True)]
        self.draft_kv.reserve(max(lens) + self.k)
        out = self._draft_read(mx.array(ids, mx.int32), mx.array(starts, mx.int32),
                               *self.draft_kv.arrays)
        self.draft_kv.arrays = list(out[1:])
        self.draft_held = lens
        last = mx.array([n - 1 - s for n, s in zip(lens, starts, strict=True)], mx.int32)
        return mx.take_along_axis(out[0], last[:, None, None], axis=1)[:, 0, :]  # (B, V)

    def _draft_forward(self, drafts: Sequence[list[mx.array]], lens: list[int],
                       j: int) -> mx.array:
        """The draft reads each row's draft j at its position; logits (B, V). Rows with no
        draft j read a 0 at a position past what they keep (the last one, where it would not
        fit), which nothing looks at."""
        zero = mx.zeros((1,), mx.int32)
        tokens = mx.concatenate([d[j] if len(d) > j else zero for d in drafts])[:, None]
        offsets = mx.array([min(n + j, self.draft_positions - 1) for n in lens], mx.int32)
        out = self._draft_step(tokens, offsets, *self.draft_kv.arrays)
        self.draft_kv.arrays = list(out[1:])
        return out[0]
