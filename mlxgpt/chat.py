"""Chat with a GPT-2: a plain-text transcript, a KV cache kept across turns, and the REPL.

The transcript format works with a base (not instruction-tuned) GPT-2, which has seen many
dialogues written this way::

    <system text>            (optional first paragraph)

    User: Hello!
    Assistant: Hi. How can I help?
    User: ...
    Assistant:

The model writes after ``Assistant:`` and its reply ends at the next speaker tag (``\\nUser:``),
at ``<|endoftext|>`` or at the token limit. :func:`render_transcript` is the one definition of
the format; fine-tuning data made with it teaches a model to chat in the same shape.

Between turns the conversation stays in the model's KV cache: each turn reads only its new
tokens. When the next turn would not leave room for a reply, the oldest turns are dropped (the
system text stays) and the rest is read again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TextIO

from .checkpoint import atomic_write_text
from .errors import MlxgptError
from .generate import Context, GenerationResponse, stream_generate
from .model import GPT
from .sample import SamplingSettings

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


@dataclass
class ChatSettings:
    max_tokens: int = 256  # per reply
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


class ChatSession:
    """A conversation with one model; the KV cache follows the transcript."""

    def __init__(self, model: GPT, tokenizer, settings: ChatSettings | None = None,
                 system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ChatSettings()
        self.system = system
        self.messages: list[Message] = []  # user and assistant turns, oldest first
        self.ctx = Context(model)
        self.last: GenerationResponse | None = None  # the last reply's summary
        self.dropped = 0  # turns dropped to fit the context, over the session
        self._encoded: dict[tuple[str, str], list[int]] = {}
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
        ids = [i for m in self.transcript() for i in self._ids(m)]
        return ids + self._reply_prompt

    def _fit(self) -> list[int]:
        """Drop the oldest turns until the prompt leaves room for a reply."""
        n_pos = self.model.config.n_positions
        room = min(self.settings.max_tokens, n_pos // 2)
        ids = self.prompt_ids()
        while len(ids) + room > n_pos and len(self.messages) > 1:
            # Drop the oldest user turn with its reply.
            cut = 2 if len(self.messages) > 2 and self.messages[1].role == "assistant" else 1
            del self.messages[:cut]
            self.dropped += cut
            ids = self.prompt_ids()
        return ids

    def reset(self) -> None:
        self.messages.clear()
        self.last = None

    # -- a turn

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's turn and stream the assistant's reply, piece by piece.

        If the consumer stops early (Ctrl-C), the reply so far is kept as the assistant's turn.
        """
        self.messages.append(Message("user", user_text))
        ids = self._fit()
        parts: list[str] = []
        try:
            for r in stream_generate(
                self.model, self.tokenizer, ids, ctx=self.ctx, stop=STOPS,
                max_tokens=self.settings.max_tokens, sampling=self.settings.sampling,
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


# --------------------------------------------------------------------------- the REPL

HELP = """\
Commands:
  /help               this help
  /reset              forget the conversation (the system text stays)
  /system [TEXT]      show the system text, or set it ("/system none" removes it)
  /set [NAME VALUE]   show the settings, or change one, e.g. /set temp 0.7
                      names: temp, top_k, top_p, min_p, repetition_penalty,
                      presence_penalty, frequency_penalty, penalty_window, seed, max_tokens
  /stats              speed and memory of the last reply, context use
  /save FILE          save the conversation (.json: messages; otherwise the transcript)
  /quit               leave (or Ctrl-D). Ctrl-C stops a reply."""

_ALIASES = {"temp": "temperature", "t": "temperature", "tokens": "max_tokens", "max": "max_tokens"}


def apply_setting(settings: ChatSettings, name: str, value: str) -> str:
    """Change one setting from text (``/set``); returns a confirmation line."""
    name = _ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if name == "max_tokens":
        n = _parse(int, name, value)
        if n <= 0:
            raise MlxgptError("max_tokens must be > 0")
        settings.max_tokens = n
        return f"max_tokens = {n}"
    types = {f.name: f.type for f in fields(SamplingSettings)}
    if name not in types or name == "logit_bias":
        raise MlxgptError(f"unknown setting {name!r} (see /help)")
    if name == "seed":
        new = None if value.lower() == "none" else _parse(int, name, value)
    elif name in ("top_k", "penalty_window"):
        new = _parse(int, name, value)
    else:
        new = _parse(float, name, value)
    settings.sampling = settings.sampling.replace(**{name: new})
    return f"{name} = {new}"


def _parse(kind: type, name: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise MlxgptError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def format_stats(session: ChatSession) -> str:
    n_pos = session.model.config.n_positions
    used = len(session.prompt_ids()) - len(session._reply_prompt)
    lines = [f"conversation: {len(session.messages)} messages, {used} of {n_pos} tokens"
             + (f" ({session.dropped} oldest messages dropped to fit)" if session.dropped else "")]
    r = session.last
    if r is not None:
        lines.append(
            f"last reply: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s, "
            f"read {r.prompt_tokens - r.cached_tokens} new prompt tokens "
            f"({r.prompt_tps:.0f} tok/s; {r.cached_tokens} were cached), "
            f"first token {r.ttft * 1000:.0f} ms, peak memory {r.peak_memory_gb:.2f} GB, "
            f"finish: {r.finish_reason}"
        )
    return "\n".join(lines)


def _settings_text(s: ChatSettings) -> str:
    sp = s.sampling
    items = [f"max_tokens={s.max_tokens}"] + [
        f"{f.name}={getattr(sp, f.name)}" for f in fields(sp) if f.name != "logit_bias"
    ]
    return " ".join(items)


def handle_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a slash command; False means quit."""
    cmd, _, arg = line[1:].strip().partition(" ")
    cmd, arg = cmd.lower(), arg.strip()
    if cmd in ("quit", "exit", "q"):
        return False
    if cmd in ("help", "h", "?"):
        print(HELP, file=out)
    elif cmd == "reset":
        session.reset()
        print("(conversation cleared)", file=out)
    elif cmd == "system":
        if not arg:
            print(session.system or "(no system text)", file=out)
        else:
            session.system = None if arg.lower() == "none" else arg
            print("(system text " + ("removed)" if session.system is None else "set)"), file=out)
    elif cmd == "set":
        if not arg:
            print(_settings_text(session.settings), file=out)
        else:
            name, _, value = arg.partition(" ")
            if not value.strip():
                raise MlxgptError("usage: /set NAME VALUE (e.g. /set temp 0.7)")
            print(apply_setting(session.settings, name, value.strip()), file=out)
    elif cmd == "stats":
        print(format_stats(session), file=out)
    elif cmd == "save":
        if not arg:
            raise MlxgptError("usage: /save FILE")
        print(f"(saved to {session.save(arg)})", file=out)
    else:
        raise MlxgptError(f"unknown command /{cmd} (try /help)")
    return True


def _setup_readline() -> Callable[[], None]:
    """Line editing and history for input() on a terminal; returns a function saving history."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return lambda: None
    path = os.environ.get("MLXGPT_HISTORY", os.path.expanduser("~/.mlxgpt_history"))
    if not path:
        return lambda: None
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def run_repl(session: ChatSession, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> None:
    """The interactive loop. On a terminal: a prompt, line editing and history; otherwise each
    input line is one turn and only the replies are printed (one line each)."""
    interactive = stdin.isatty()
    save_history = _setup_readline() if interactive else (lambda: None)
    if interactive:
        print("Chatting with the model. /help for commands, Ctrl-C stops a reply, "
              "Ctrl-D or /quit leaves.", file=err)
    try:
        while True:
            try:
                line = input(">>> ") if interactive else stdin.readline()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                print("\n(Ctrl-D or /quit to leave)", file=err)  # a fresh line, as a shell
                continue
            except EOFError:
                break
            if not interactive and not line:
                break  # end of the piped input
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    if not handle_command(session, line, out):
                        break
                except MlxgptError as e:
                    print(f"Error: {e}", file=err)
                continue
            _reply(session, line, out, err)
    finally:
        if interactive:
            print(file=out)
        save_history()


def _reply(session: ChatSession, line: str, out: TextIO, err: TextIO) -> None:
    stream = session.reply(line)
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()  # records the partial reply
        out.write("\n")
        print("(stopped)", file=err)
        return
    out.write("\n")
    out.flush()
