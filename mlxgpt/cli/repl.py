"""The terminal face of ``mlxgpt chat``: the read-reply loop, slash commands, line editing.

On a terminal: a prompt, line editing and history (readline), Ctrl-C stops a reply, Ctrl-D or
``/quit`` leaves. With piped input each line is one turn and only the replies are printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from typing import TextIO

from mlxgpt.errors import MlxgptError
from mlxgpt.generation.chat import ChatSession, ChatSettings
from mlxgpt.generation.generate import format_rate
from mlxgpt.generation.sample import SamplingSettings

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
    settings.sampling = replace(settings.sampling, **{name: new})
    return f"{name} = {new}"


def _parse(kind: type, name: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise MlxgptError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def format_stats(session: ChatSession) -> str:
    n_pos = session.model.config.n_positions
    used = len(session.transcript_ids())
    lines = [f"conversation: {len(session.messages)} messages, {used} of {n_pos} tokens"
             + (f" ({session.dropped} oldest messages dropped to fit)" if session.dropped else "")]
    r = session.last
    if r is not None:
        lines.append(
            f"last reply: {r.generation_tokens} tokens, {format_rate(r.generation_tps)}, "
            f"read {r.prompt_tokens - r.cached_tokens} new prompt tokens "
            f"({format_rate(r.prompt_tps, 0)}; {r.cached_tokens} were cached), "
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


def run_repl(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None,
             err: TextIO | None = None) -> None:
    """The interactive loop. On a terminal: a prompt, line editing and history; otherwise each
    input line is one turn and only the replies are printed (one line each). The streams
    default to sys's as they are when called (not when this module was imported)."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
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
            try:
                _reply(session, line, out, err)
            except MlxgptError as e:  # this turn cannot be answered; the conversation goes on
                print(f"Error: {e}", file=err)
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
