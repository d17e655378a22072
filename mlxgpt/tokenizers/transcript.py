"""How a conversation becomes a prompt: the model's own chat template where it has one
(:func:`chat_prompt`, :mod:`mlxgpt.tokenizers.chat_template`), else mlxgpt's transcript format.

The transcript format: one definition, used by ``mlxgpt chat``, the server and fine-tuning data.

It works with a base (not instruction-tuned) GPT-2, which has seen many dialogues written this
way::

    <system text>            (optional first paragraph)

    User: Hello!
    Assistant: Hi. How can I help?
    User: ...
    Assistant:

The model writes after ``Assistant:`` and its reply ends at the next speaker tag (:data:`STOPS`).
Fine-tuning data rendered with :func:`render_transcript` teaches a model to chat in this shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..errors import MlxgptError
from .base import Tokenizer
from .chat_template import render_chat

USER = "User"
ASSISTANT = "Assistant"
STOPS = (f"\n{USER}:", f"\n{ASSISTANT}:")
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise MlxgptError(f"chat: unknown role {self.role!r} (expected one of {ROLES})")


def render_message(message: Message) -> str:
    """One message as transcript text (each ends with a newline; the system text with two)."""
    text = message.content.strip()
    if message.role == "system":
        return f"{text}\n\n"
    tag = USER if message.role == "user" else ASSISTANT
    return f"{tag}: {text}\n"


def render_transcript(
    messages: Sequence[Message | dict], add_generation_prompt: bool = False
) -> str:
    """Messages (``Message`` or ``{"role", "content"}`` dicts) -> transcript text.

    ``add_generation_prompt`` ends it with ``"Assistant:"``, where the model's reply goes.
    """
    msgs = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]
    text = "".join(render_message(m) for m in msgs)
    return text + (f"{ASSISTANT}:" if add_generation_prompt else "")


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Message | dict],
                add_generation_prompt: bool = True) -> tuple[list[int], tuple[str, ...]]:
    """A conversation as prompt ids, and the stop strings that end a reply.

    With a chat template the reply ends at the model's end-of-turn token (``eot_id``), so there
    are no stop strings; with the transcript format it ends at the next speaker tag.
    The template's text is encoded as it is, BOS only where the template writes ``bos_token``
    (as transformers' ``apply_chat_template`` does); the transcript is plain text, which
    starts with BOS where the tokenizer adds it (:meth:`Tokenizer.encode_prompt`).
    """
    if tokenizer.chat_template:
        msgs = [asdict(m) if isinstance(m, Message) else m for m in messages]
        text = render_chat(tokenizer, msgs, add_generation_prompt)
        return tokenizer.encode(text, allow_special=True), ()
    text = render_transcript(messages, add_generation_prompt)
    return tokenizer.encode_prompt(text), STOPS
