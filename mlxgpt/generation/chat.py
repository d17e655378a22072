"""A conversation with a model: its transcript (:mod:`.transcript`), and a KV cache kept across
turns.

Between turns the conversation stays in the model's KV cache: each turn reads only its new
tokens. When the next turn would not leave room for a reply, the oldest turns are dropped (the
system text stays) and the rest is read again. The terminal REPL is :mod:`mlxgpt.cli.repl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints.files import atomic_write_text
from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from ..tokenizers.transcript import (
    ASSISTANT,
    STOPS,
    Message,
    chat_prompt,
    render_message,
    render_transcript,
)
from .context import Context
from .generate import GenerationResponse, json_constraint, stream_generate
from .sample import SamplingSettings
from .speculative import DEFAULT_DRAFT_TOKENS, check_draft, check_draft_tokens, load_draft

if TYPE_CHECKING:
    from .constrain import JsonConstraint


@dataclass
class ChatSettings:
    max_tokens: int = 256  # per reply
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MlxgptError(f"max_tokens must be at least 1, got {self.max_tokens!r}")


class ChatSession:
    """A conversation with one model; the KV cache follows the transcript.

    With ``draft_model`` (a GPT sharing the tokenizer, or a reference to load) replies are
    decoded speculatively, ``draft_tokens`` at a time ("auto": 4 while that is faster on this
    machine than decoding without the draft, see :mod:`mlxgpt.generation.draft_length`); the
    draft keeps its own cache too.

    With ``json_schema`` (a schema, or a compiled
    :class:`~mlxgpt.generation.constrain.JsonConstraint`) every reply is a JSON document it
    accepts, as :func:`~mlxgpt.generation.generate.stream_generate` writes it.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, settings: ChatSettings | None = None,
                 system: str | None = None, *, draft_model: Model | str | None = None,
                 draft_tokens: int | str = DEFAULT_DRAFT_TOKENS,
                 json_schema: dict | JsonConstraint | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ChatSettings()
        # Compiled once: each reply starts a fresh document of the same schema.
        self.json = None if json_schema is None else json_constraint(
            tokenizer, model.config.vocab_size, json_schema)
        self.check_json_budget()
        self.system = system
        self.messages: list[Message] = []  # user and assistant turns, oldest first
        self.ctx = Context(model)
        self.draft_ctx: Context | None = None
        self.draft_tokens = check_draft_tokens(draft_tokens)
        if draft_model is not None:
            if isinstance(draft_model, str):
                draft_model = load_draft(draft_model, model, tokenizer)
            check_draft(model, draft_model)
            self.draft_ctx = Context(draft_model)
        self.last: GenerationResponse | None = None  # the last reply's summary
        self.dropped = 0  # turns dropped to fit the context, over the session
        self._encoded: dict[tuple[str, str], list[int]] = {}
        # The model's own chat template where it has one; else the transcript format.
        self.templated = bool(tokenizer.chat_template)
        self.stops = () if self.templated else STOPS
        self._reply_prompt = tokenizer.encode(f"{ASSISTANT}:")  # refuses an ids-only tokenizer

    # -- transcript

    def transcript(self) -> list[Message]:
        head = [Message("system", self.system)] if self.system else []
        return head + self.messages

    def _ids(self, message: Message) -> list[int]:
        # Each message is encoded on its own, so earlier turns keep the same ids (and their
        # cached keys/values) however the conversation continues.
        key = (message.role, message.content)
        if key not in self._encoded:
            self._encoded[key] = self.tokenizer.encode(render_message(message))
        return self._encoded[key]

    def prompt_ids(self) -> list[int]:
        if self.templated:
            return chat_prompt(self.tokenizer, self.transcript())[0]
        return self.transcript_ids() + self._reply_prompt

    def transcript_ids(self) -> list[int]:
        """The conversation so far as token ids (without the cue for the next reply)."""
        if self.templated:
            return chat_prompt(self.tokenizer, self.transcript(), False)[0]
        # as chat_prompt encodes it: plain text, BOS first where the tokenizer adds it
        return self.tokenizer.with_bos([i for m in self.transcript() for i in self._ids(m)])

    def check_json_budget(self) -> None:
        """Refuse a reply budget too small for the schema's shortest document (before a turn
        is added, so a refused turn leaves the conversation as it was)."""
        if self.json is not None and self.settings.max_tokens < self.json.min_tokens:
            raise MlxgptError(f"max_tokens {self.settings.max_tokens} is too small for this "
                              f"schema: it needs at least {self.json.min_tokens}")

    def _room(self) -> int:
        """Positions a reply needs: max_tokens, up to half the context."""
        return min(self.settings.max_tokens, self.model.config.n_positions // 2)

    def check_room(self, ids: list[int] | None = None) -> None:
        """Refuse a prompt (``ids``, by default this conversation's) that leaves no room for a
        reply: generation would slide the window past the system text and answer without it.
        Before the first turn that is a system text longer than the context allows."""
        n_pos, room = self.model.config.n_positions, self._room()
        n = len(self.prompt_ids() if ids is None else ids)
        if n + room <= n_pos:
            return
        if self.system and self.messages:
            what, fix = "the system text and this message take", "shorten them"
        elif self.system:
            what, fix = "the system text takes", "shorten it"
        else:
            what, fix = "this message takes", "shorten it"
        raise MlxgptError(f"{what} {n} of the model's {n_pos} positions, leaving less than the "
                          f"{room} a reply needs: {fix}")

    def _fit(self) -> list[int]:
        """Drop the oldest turns until the prompt leaves room for a reply; refuse the turn
        (the conversation as it was) when even the newest message alone does not fit."""
        n_pos, room = self.model.config.n_positions, self._room()
        before, dropped = list(self.messages), self.dropped
        ids = self.prompt_ids()
        while len(ids) + room > n_pos and len(self.messages) > 1:
            # Drop the oldest user turn with its reply.
            cut = 2 if len(self.messages) > 2 and self.messages[1].role == "assistant" else 1
            del self.messages[:cut]
            self.dropped += cut
            ids = self.prompt_ids()
        try:
            self.check_room(ids)
        except MlxgptError:
            self.messages, self.dropped = before[:-1], dropped  # without the refused turn
            raise
        return ids

    def reset(self) -> None:
        self.messages.clear()
        self.last = None

    # -- a turn

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's turn and stream the assistant's reply, piece by piece.

        If the consumer stops early (Ctrl-C), the reply so far is kept as the assistant's turn.
        """
        self.check_json_budget()
        self.messages.append(Message("user", user_text))
        ids = self._fit()
        parts: list[str] = []
        try:
            for r in stream_generate(
                self.model, self.tokenizer, ids, ctx=self.ctx, stop=self.stops,
                max_tokens=self.settings.max_tokens, sampling=self.settings.sampling,
                draft_ctx=self.draft_ctx, draft_tokens=self.draft_tokens, json_schema=self.json,
            ):
                text = r.text
                if not parts:
                    text = text.lstrip()  # the model writes " Hi" after "Assistant:"
                if text:
                    parts.append(text)
                    yield text
                if r.finish_reason:
                    self.last = r
        except GeneratorExit:  # closed between two tokens: the cache is consistent
            raise
        except BaseException:
            # Interrupted inside the model (Ctrl-C): the cache may be half-updated, so the
            # next turn reads the conversation again.
            self.ctx.reset()
            if self.draft_ctx is not None:
                self.draft_ctx.reset()
            raise
        finally:
            self.messages.append(Message("assistant", "".join(parts).strip()))

    # -- saving

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation: JSON messages for ``.json``/``.jsonl`` files, else the text."""
        path = Path(path)
        msgs = self.transcript()
        if path.suffix == ".json":
            text = json.dumps([asdict(m) for m in msgs], indent=2, ensure_ascii=False) + "\n"
        elif path.suffix == ".jsonl":
            text = json.dumps({"messages": [asdict(m) for m in msgs]}, ensure_ascii=False) + "\n"
        else:
            text = render_transcript(msgs)
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise MlxgptError(f"cannot write {path}: {e.strerror or e}") from None
        return path
