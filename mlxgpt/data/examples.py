"""Fine-tuning data: JSONL examples -> token sequences with loss masks -> padded batches.

Each line of a ``.jsonl`` file is one example, in one of three forms::

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion only with mask_prompt
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
        rendered with the model's own chat template when its tokenizer has one, else with the
        transcript format of ``mlxgpt chat`` (:mod:`mlxgpt.tokenizers.transcript`): what the
        model sees when it chats; with mask_prompt the loss counts only the assistant turns
        (what the model says in a chat)

Every example ends with the tokenizer's end-of-text token, so the model learns where an answer
stops; a chat template ends each turn with the model's own end-of-turn marker instead. A bad
line is reported as ``file:line: why``. Batches group examples of similar length (less
padding) and are drawn in a fixed, seeded order, so batch ``k`` is the same batch whether a run
went straight through or was resumed.

Classification data (``mlxgpt finetune --task classify``) is ``{"text": ..., "label": ...}``
lines instead (:func:`check_labelled_record`); :func:`encode_labelled` and
:class:`LabelledBatches` add each row's length and label id to the batches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..checks import check_int
from ..errors import MlxgptError
from ..tokenizers.chat_template import render_chat
from ..tokenizers.transcript import ROLES, render_transcript

SPLITS = ("train", "valid", "test")
PAD_MULTIPLE = 32  # pad batch lengths to a multiple of this: fewer distinct shapes to compile


@dataclass
class Example:
    """One tokenized example. ``mask[i]`` is 1 when token ``i`` is a prediction target."""

    tokens: list[int]
    mask: list[int]
    where: str = ""  # "file:line", for messages
    label: int = -1  # the label's id, for classification examples

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])  # token 0 has no context to be predicted from


# --------------------------------------------------------------------------- reading


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 file's text, or one line saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MlxgptError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise MlxgptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MlxgptError(f"{path}: cannot read ({e.strerror or e})") from None


RecordCheck = Callable[[Any, str], None]  # (record, "file:line") -> None, or raise


def read_jsonl(path: str | os.PathLike,
               check: RecordCheck | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Parse a JSONL file into ``("file:line", record)`` pairs, checking every record's form
    (with ``check``; :func:`check_record` by default)."""
    check = check or check_record
    path = Path(path)
    text = read_text(path)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MlxgptError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # Python's parser recurses once per level of nesting
            raise MlxgptError(f"{where}: JSON nested too deeply") from None
        check(rec, where)
        records.append((where, rec))
    if not records:
        raise MlxgptError(f"{path}: empty (no examples)")
    return records


def record_kind(rec: dict[str, Any]) -> str:
    if "messages" in rec:
        return "messages"
    if "prompt" in rec or "completion" in rec:
        return "completion"
    return "text"


def check_record(rec: Any, where: str) -> None:
    """Raise ``file:line: why`` unless ``rec`` is one of the three example forms."""
    if not isinstance(rec, dict):
        raise MlxgptError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    kind = record_kind(rec)
    if kind == "text" and "text" not in rec:
        found = ", ".join(sorted(rec)) or "none"
        raise MlxgptError(
            f'{where}: needs "text", "prompt" and "completion", or "messages" (found keys: {found})'
        )
    if kind == "completion":
        for key in ("prompt", "completion"):
            if key not in rec:
                other = "completion" if key == "prompt" else "prompt"
                raise MlxgptError(f'{where}: "{other}" without "{key}"')
    keys = {"text": ("text",), "completion": ("prompt", "completion"), "messages": ()}[kind]
    for key in keys:
        if not isinstance(rec[key], str):
            raise MlxgptError(f'{where}: "{key}" must be a string, got {type(rec[key]).__name__}')
    if kind == "completion" and not rec["completion"]:
        raise MlxgptError(f'{where}: "completion" is empty')
    if kind == "messages":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MlxgptError(f'{where}: "messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MlxgptError(f'{where}: messages[{i}] needs "role" and "content"')
            if m["role"] not in ROLES:
                raise MlxgptError(
                    f"{where}: messages[{i}] has role {m['role']!r} "
                    f"(expected one of {', '.join(ROLES)})"
                )
            if not isinstance(m["content"], str):
                raise MlxgptError(f'{where}: messages[{i}] "content" must be a string')
        if not any(m["role"] == "assistant" for m in msgs):
            raise MlxgptError(f"{where}: messages has no assistant turn to learn from")


def check_labelled_record(rec: Any, where: str) -> None:
    """Raise ``file:line: why`` unless ``rec`` is ``{"text": non-empty str, "label": str}``."""
    if not isinstance(rec, dict):
        raise MlxgptError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("text", "label"):
        if key not in rec:
            found = ", ".join(sorted(rec)) or "none"
            raise MlxgptError(f'{where}: needs "text" and "label" (no "{key}"; found keys: '
                              f"{found})")
        if not isinstance(rec[key], str):
            raise MlxgptError(f'{where}: "{key}" must be a string, got {type(rec[key]).__name__}')
        if not rec[key].strip():
            raise MlxgptError(f'{where}: "{key}" is empty')


# --------------------------------------------------------------------------- tokenizing


def encode_record(rec: dict[str, Any], tokenizer: Any, mask_prompt: bool,
                  where: str = "") -> tuple[list, list]:
    """(tokens, mask) for one checked record; see the module docstring for what is masked."""
    templated = record_kind(rec) == "messages" and _has_template(tokenizer)
    try:
        segments = record_segments(rec, tokenizer)
    except MlxgptError as e:
        raise MlxgptError(f"{where}: {e}" if where else str(e)) from None
    # Plain text (not a chat template's) starts with BOS where the tokenizer adds it, as
    # at inference; position 0 is input only, never a target.
    tokens = [] if templated else tokenizer.with_bos([])
    mask = [0] * len(tokens)
    for text, trained in segments:
        ids = tokenizer.encode(text, allow_special=templated)  # a template writes specials
        tokens += ids
        mask += [1 if (trained or not mask_prompt) else 0] * len(ids)
    if tokenizer.eot_id is not None and not templated:
        tokens.append(tokenizer.eot_id)
        mask.append(1)
    return tokens, mask


def answer_prompt(rec: dict[str, Any], tokenizer: Any,
                  where: str = "") -> tuple[list[int], str, list[int]]:
    """(prompt tokens, answer, answer tokens) of a ``{"prompt", "completion"}`` record or of a
    conversation whose last turn is the assistant's: what the model reads, the answer stripped,
    and the tokens that write the answer as training taught them (the completion and the
    end-of-text token; or the reply as the chat template renders it, its end-of-turn marker
    included), tokenized as :func:`encode_record` tokenizes them (BOS first as there)."""
    kind = record_kind(rec)
    if kind == "completion":
        end = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
        return (tokenizer.encode_prompt(rec["prompt"]), rec["completion"].strip(),
                tokenizer.encode(rec["completion"]) + end)
    if kind != "messages" or rec["messages"][-1]["role"] != "assistant":
        raise MlxgptError(f"{where}: needs a prompt and a completion, or messages ending with "
                          "the assistant's answer")
    templated = _has_template(tokenizer)
    segments = record_segments(rec, tokenizer)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    prompt = [t for text, _ in segments[:last]
              for t in tokenizer.encode(text, allow_special=templated)]
    if not templated:
        prompt = tokenizer.with_bos(prompt)
    answer = tokenizer.encode(segments[last][0], allow_special=templated)
    if not templated and tokenizer.eot_id is not None:
        answer.append(tokenizer.eot_id)
    return prompt, rec["messages"][-1]["content"].strip(), answer


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def record_segments(rec: dict[str, Any], tokenizer: Any = None) -> list[tuple[str, bool]]:
    """The example's text in pieces, each marked True when it is what the model should say
    (messages through ``tokenizer``'s chat template where it has one, see
    :func:`message_segments`).

    Prompt and completion are tokenized separately (not as one string) because at inference
    time the prompt is encoded alone and the model continues from its last token.
    """
    kind = record_kind(rec)
    if kind == "text":
        return [(rec["text"], True)]
    if kind == "completion":
        return [(rec["prompt"], False), (rec["completion"], True)]
    return message_segments(rec["messages"], tokenizer)


def message_segments(messages: list[dict[str, str]],
                     tokenizer: Any = None) -> list[tuple[str, bool]]:
    """Split a conversation into prompt parts and assistant replies; joined, they are the whole
    conversation as rendered.

    Rendered as the model sees it when it chats: with ``tokenizer``'s chat template where it has
    one, else with the transcript format of ``mlxgpt chat``. Each assistant reply is the text
    that rendering the conversation up to it adds after rendering the prompt that asks for it
    (the generation prompt); with a template, less the whitespace after the reply's end-of-turn
    marker, which separates turns and so belongs to the next prompt.
    """
    templated = _has_template(tokenizer)

    def render(msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if templated:
            return render_chat(tokenizer, msgs, add_generation_prompt)
        return render_transcript(msgs, add_generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The conversation so far plus the assistant's cue, then with the reply added.
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise MlxgptError(f"the {'chat template' if templated else 'transcript format'} "
                              "renders a conversation otherwise than its beginning, so its "
                              "assistant turns cannot be told apart")
        end = max(len(full.rstrip()), len(prompt)) if templated else len(full)
        segments += [(prompt[len(done):], False), (full[len(prompt):end], True)]
        done = full[:end]
    # What follows the last reply (the template's separator, later turns): nothing to learn
    # there, kept so that the tokens are the rendered conversation.
    rest = render(messages, False)
    if rest.startswith(done):
        segments.append((rest[len(done):], False))
    return [(t, trained) for t, trained in segments if t]


def encode_records(
    records: Sequence[tuple[str, dict[str, Any]]],
    tokenizer: Any,
    *,
    mask_prompt: bool = False,
    max_len: int,
) -> tuple[list[Example], dict[str, int]]:
    """Tokenize records. Text longer than ``max_len`` tokens is cut into windows; a longer
    prompt/completion or chat loses its first tokens; examples left with nothing to learn are
    dropped.
    Returns the examples and counts of what was truncated or dropped."""
    out, stats = [], {"truncated": 0, "dropped": 0}
    for where, rec in records:
        tokens, mask = encode_record(rec, tokenizer, mask_prompt, where)
        pieces = [(tokens, mask)]
        if len(tokens) > max_len:
            if record_kind(rec) == "text":  # plain text: keep all of it, in windows
                pieces = [(tokens[k:k + max_len], mask[k:k + max_len])
                          for k in range(0, len(tokens), max_len)]
            else:  # keep the end: the completion (or the last reply) is what is learnt
                stats["truncated"] += 1
                pieces = [(tokens[-max_len:], mask[-max_len:])]
        for tokens, mask in pieces:
            ex = Example(tokens, mask, where)
            if len(tokens) < 2 or ex.n_targets == 0:
                stats["dropped"] += 1
                continue
            out.append(ex)
    return out, stats


def text_tokens(tokenizer: Any, text: str, max_len: int) -> tuple[list[int], bool]:
    """A text's tokens for a classifier, and whether it was cut: the first ``max_len`` of them
    (a text longer than the context is classified by its beginning), in training and
    prediction alike."""
    ids = tokenizer.encode_prompt(text)
    return ids[:max_len], len(ids) > max_len


def encode_labelled(
    records: Sequence[tuple[str, dict[str, Any]]],
    tokenizer: Any,
    labels: Sequence[str],
    *,
    max_len: int,
) -> tuple[list[Example], int]:
    """Classification examples: the text's tokens (see :func:`text_tokens`) and end-of-text,
    every next token a language-model target (the auxiliary loss), and the label's id.
    Returns the examples and how many texts were cut to ``max_len``."""
    ids = {label: i for i, label in enumerate(labels)}
    out, truncated = [], 0
    for where, rec in records:
        if rec["label"] not in ids:
            raise MlxgptError(f"{where}: label {rec['label']!r} is not one of the classifier's "
                              f"labels ({', '.join(map(repr, labels))})")
        example, cut = text_example(tokenizer, rec["text"], max_len, ids[rec["label"]], where)
        out.append(example)
        truncated += cut
    return out, truncated


def text_example(tokenizer: Any, text: str, max_len: int, label: int = -1,
                 where: str = "") -> tuple[Example, bool]:
    """One classification example (see :func:`encode_labelled`), and whether it was cut."""
    tokens, cut = text_tokens(tokenizer, text, max_len)
    end = tokenizer.eot_id
    # One token past the text, so that the inputs (tokens[:-1]) are the whole text: end-of-text
    # as the last LM target, or (a tokenizer without one) a pad that is not counted.
    mask = [1] * len(tokens) + [int(end is not None)]
    return Example(tokens + [end if end is not None else 0], mask, where, label), cut


# --------------------------------------------------------------------------- data folders


def find_splits(
    data: str | os.PathLike, val_fraction: float = 0.0, seed: int = 0,
    check: RecordCheck | None = None,
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Records per split from a folder (``train.jsonl`` [+ ``valid``/``test``]) or one file,
    each record checked by ``check`` (see :func:`read_jsonl`).

    A single file is split into train and valid by ``val_fraction`` (a seeded shuffle).
    """
    path = Path(data)
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise MlxgptError(f"{path}: no train.jsonl in this folder")
        splits = {s: read_jsonl(path / f"{s}.jsonl", check) for s in SPLITS
                  if (path / f"{s}.jsonl").is_file()}
        if val_fraction and "valid" not in splits:
            splits["train"], splits["valid"] = split_records(splits["train"], val_fraction, seed)
        return splits
    if not path.exists():
        raise MlxgptError(f"{path}: not found")
    records = read_jsonl(path, check)
    if not val_fraction:
        return {"train": records}
    train, valid = split_records(records, val_fraction, seed)
    return {"train": train, "valid": valid}


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    if not 0.0 < val_fraction < 1.0:
        raise MlxgptError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise MlxgptError(
            f"--val-fraction {val_fraction} leaves no training examples ({len(records)} in all)"
        )
    order = np.random.default_rng(seed).permutation(len(records))
    val = set(order[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in val],
            [r for i, r in enumerate(records) if i in val])


# --------------------------------------------------------------------------- batches


class Batches:
    """Padded batches over examples, in a seeded order that depends only on the step.

    Examples are sorted by length and cut into batches of ``batch_size`` (neighbours have
    similar lengths, so little padding); each epoch visits the batches in a fresh permutation.
    ``batch(step)`` is a pure function of ``step``, which makes resuming exact.
    A batch is ``(inputs (B, T) int32, targets (B, T) int32, mask (B, T) float32)``.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int = 0,
                 pad_id: int = 0, max_width: int | None = None):
        if not examples:
            raise MlxgptError("no examples to train on")
        check_int(batch_size, "batch size", 1)
        self.examples = list(examples)
        self.batch_size = min(batch_size, len(self.examples))
        self.seed = seed
        self.pad_id = pad_id
        self.max_width = max_width  # the model's context: padding never goes past it
        order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i].tokens))
        n = len(order) // self.batch_size  # drop the ragged end: every batch has B rows
        self.groups = [order[k * self.batch_size:(k + 1) * self.batch_size] for k in range(n)]

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, step: int) -> tuple[mx.array, mx.array, mx.array]:
        epoch, k = divmod(step, len(self.groups))
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        return self.collate([self.examples[i] for i in self.groups[perm[k]]])

    def epoch(self) -> Iterator[tuple[mx.array, mx.array, mx.array]]:
        """Every example once, in file order (for evaluation); the last batch may be smaller."""
        for k in range(0, len(self.examples), self.batch_size):
            yield self.collate(self.examples[k:k + self.batch_size])

    def collate(self, rows: Sequence[Example]) -> tuple[mx.array, mx.array, mx.array]:
        longest = max(len(e.tokens) for e in rows) - 1  # inputs drop the last token
        width = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
        if self.max_width:
            width = max(longest, min(width, self.max_width))
        tokens = np.full((len(rows), width + 1), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width + 1), dtype=np.float32)
        for r, e in enumerate(rows):
            tokens[r, :len(e.tokens)] = e.tokens
            mask[r, :len(e.mask)] = e.mask
        # (B, T) inputs, (B, T) next-token targets, (B, T) which targets count
        return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask[:, 1:])


class LabelledBatches(Batches):
    """:class:`Batches` of classification examples, adding each row's length and label.

    A batch is ``(inputs, targets, mask, lengths (B,) int32, labels (B,) int32)``: ``inputs``
    are the texts' tokens (right-padded), ``lengths`` how many of each row are real, and
    ``targets``/``mask`` the language-model targets. With ``lm=False`` (validation, prediction)
    it is ``(inputs, lengths, labels)``.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, *, lm: bool = True,
                 **kwargs: Any):
        super().__init__(examples, batch_size, **kwargs)
        self.lm = lm

    def collate(self, rows: Sequence[Example]) -> tuple[mx.array, ...]:
        inputs, targets, mask = super().collate(rows)
        lengths = mx.array([len(e.tokens) - 1 for e in rows], mx.int32)  # the text's tokens
        labels = mx.array([e.label for e in rows], mx.int32)
        return (inputs, targets, mask, lengths, labels) if self.lm else (inputs, lengths, labels)
