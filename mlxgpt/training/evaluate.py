"""Evaluation: loss and perplexity on text or JSONL; accuracy of a classifier made by fine-tuning.

Loss is the mean next-token cross-entropy (nats) over the counted tokens, perplexity its
exponential. For ``{"prompt", "completion"}`` data, or conversations whose last turn is the
assistant's answer (rendered through the model's chat template), :func:`generated_labels` asks
the model for each prompt's answer (greedy decoding, stopping at end-of-text or after the
longest label's length) and compares it with the label, both stripped of surrounding
whitespace: exact match, nothing fuzzier. It also reports which label the model finds most
likely (the answers' log-probabilities compared, end token included), a score that is
meaningful even for a base model that never answers with a bare label. (A classifier
with its own head, ``mlxgpt finetune --task classify``, is evaluated by :mod:`.classify`.)
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..data.examples import (
    Batches,
    answer_prompt,
    encode_records,
    read_jsonl,
    read_text,
    record_kind,
)
from ..errors import MlxgptError
from ..generation.context import Context
from ..generation.generate import generate
from ..generation.sample import SamplingSettings
from ..tokenizers import Tokenizer
from .loss import lm_loss
from .step import Evaluator

OTHER = "(other)"  # confusion-table column for answers that are no label


def read_eval_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """JSONL records, or a whole text file as one ``{"text"}`` record."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return read_jsonl(p)
    text = read_text(p)
    if not text.strip():
        raise MlxgptError(f"{p}: empty")
    return [(str(p), {"text": text})]


def evaluate_loss(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[tuple[str, dict[str, Any]]],
    *,
    mask_prompt: bool = False,
    batch_size: int = 8,
    max_len: int | None = None,
) -> dict[str, float]:
    """Token-weighted mean loss, perplexity and token count over all records; for plain text
    also bits per byte (the loss per UTF-8 byte of text, in bits: comparable across tokenizers,
    taking the text's average bytes per token for the predicted tokens)."""
    max_len = max_len or model.config.n_positions
    examples, _ = encode_records(records, tokenizer, mask_prompt=mask_prompt, max_len=max_len)
    batches = Batches(examples, batch_size, pad_id=tokenizer.eot_id or 0,
                      max_width=model.config.n_positions)
    loss, count = Evaluator(model, lm_loss)(batches.epoch())
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count}
    if all(record_kind(rec) == "text" for _, rec in records):
        n_bytes = sum(len(rec["text"].encode("utf-8")) for _, rec in records)
        n_tokens = sum(len(e.tokens) for e in examples)
        out["bits_per_byte"] = loss / math.log(2) * n_tokens / max(n_bytes, 1)
    return out


@dataclass
class Classification:
    labels: list[str]  # stripped labels, sorted
    gold: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # stripped generations
    likeliest: list[str] = field(default_factory=list)  # most likely label per example

    @property
    def accuracy(self) -> float:
        return _share_equal(self.gold, self.generated)

    @property
    def label_accuracy(self) -> float:
        return _share_equal(self.gold, self.likeliest)

    @property
    def label_macro_f1(self) -> float:
        return macro_f1(self.gold, self.likeliest)

    def confusion(self) -> dict[str, Counter]:
        """gold label -> Counter of predicted labels (answers that are no label: ``OTHER``)."""
        table: dict[str, Counter] = {label: Counter() for label in self.labels}
        for g, p in zip(self.gold, self.generated, strict=True):
            table[g][p if p in table else OTHER] += 1
        return table

    def report(self) -> str:
        n = len(self.gold)
        majority = max(Counter(self.gold).values()) / max(n, 1)
        lines = [
            f"examples: {n}",
            f"accuracy: {self.accuracy:.4f} (generated completion == label, exact after strip)",
            f"label accuracy: {self.label_accuracy:.4f} (most likely label)",
            f"label macro-F1: {self.label_macro_f1:.4f}",
            f"majority-class baseline: {majority:.4f}",
            "",
            "confusion (rows: label, columns: generated):",
        ]
        table = self.confusion()
        cols = self.labels + ([OTHER] if any(t[OTHER] for t in table.values()) else [])
        return "\n".join(lines + confusion_lines(self.labels, cols, table))


def confusion_lines(rows: Sequence[str], cols: Sequence[str],
                    table: dict[str, Counter]) -> list[str]:
    """A confusion table as aligned text lines: a header of ``cols``, then one line per row."""
    width = max(len(c) for c in [*rows, *cols, "label"]) + 2
    lines = ["".ljust(width) + "".join(c.rjust(width) for c in cols)]
    for r in rows:
        lines.append(r.ljust(width) + "".join(str(table[r][c]).rjust(width) for c in cols))
    return lines


def macro_f1(gold: Sequence[Hashable], predicted: Sequence[Hashable]) -> float:
    """Mean F1 over the labels that occur (in the data or the predictions)."""
    pairs = list(zip(gold, predicted, strict=True))
    scores = []
    for c in set(gold) | set(predicted):
        tp = sum(g == c and p == c for g, p in pairs)
        wrong = sum((g == c) != (p == c) for g, p in pairs)  # false positives and negatives
        scores.append(2 * tp / (2 * tp + wrong))
    return sum(scores) / max(len(scores), 1)


def _share_equal(a: Sequence[str], b: Sequence[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def generated_labels(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[tuple[str, dict[str, Any]]],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Classification:
    """Generate each prompt's answer and compare it with the label (see module doc)."""
    if any(record_kind(r) == "text" for _, r in records):
        raise MlxgptError('--task classify needs {"prompt", "completion"} lines or messages '
                          'ending with the answer (or, for {"text", "label"} lines, a '
                          'classifier: finetune --task classify)')
    items = [answer_prompt(rec, tokenizer, where) for where, rec in records]
    # Each label as the model would write it (with the leading space or the template's
    # end-of-turn marker the data gives it): the likeliest of these is the predicted label.
    forms = sorted({tuple(ids): label for _, label, ids in items}.items())
    budget = max(len(ids) for ids, _ in forms)  # room for the answer and its end
    out = Classification(sorted({label for _, label, _ in items}))
    room = model.config.n_positions - budget - 1  # keep the prompt's end if it is too long
    ctx = Context(model)  # one compiled forward for every example
    for k, (prompt, label, _) in enumerate(items):
        prompt = prompt[-room:]
        out.gold.append(label)
        out.generated.append(greedy_text(model, tokenizer, prompt, budget, ctx).strip())
        scores = completion_logprobs(model, prompt, [list(ids) for ids, _ in forms])
        out.likeliest.append(forms[max(range(len(forms)), key=scores.__getitem__)][1])
        if progress:
            progress(k + 1, len(records))
    return out


def greedy_text(model: nn.Module, tokenizer: Tokenizer, prompt: list[int], max_tokens: int,
                ctx: Context | None = None) -> str:
    """The model's greedy continuation of ``prompt``, up to end-of-text or ``max_tokens``."""
    return generate(model, tokenizer, prompt, max_tokens=max_tokens,
                    sampling=SamplingSettings(temperature=0.0), ctx=ctx)


def completion_logprobs(model: nn.Module, prompt: list[int],
                        completions: Sequence[list[int]]) -> list[float]:
    """log p(completion | prompt) for each completion (its end token included), in one padded
    batch."""
    rows = [prompt + c for c in completions]
    width = max(len(r) for r in rows)
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows], mx.int32)  # (L, S)
    logp = nn.log_softmax(model(tokens[:, :-1]).astype(mx.float32), axis=-1)  # (L, S-1, V)
    picked = mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (L, S-1)
    start = len(prompt) - 1  # position that predicts the completion's first token
    return [picked[i, start:start + len(c)].sum().item() for i, c in enumerate(completions)]
