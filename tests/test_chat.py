"""The chat: transcript format, the KV cache across turns, overflow, and the REPL as a user
drives it (piped stdin, and a pseudo-terminal with Ctrl-C)."""

import json
import os
import pty
import select
import signal
import sys
import time

import pytest

from mlxgpt.cli.repl import apply_setting
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.chat import ChatSession, ChatSettings
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers import byte_tokenizer, gpt2_tokenizer
from mlxgpt.tokenizers.transcript import Message, render_transcript

GREEDY = ChatSettings(max_tokens=12, sampling=SamplingSettings(temperature=0))


def test_transcript_format():
    msgs = [
        {"role": "system", "content": "A helpful assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": " Hello. "},
        Message("user", "How are you?"),
    ]
    assert render_transcript(msgs) == (
        "A helpful assistant.\n\nUser: Hi!\nAssistant: Hello.\nUser: How are you?\n"
    )
    assert render_transcript(msgs[1:2], add_generation_prompt=True) == "User: Hi!\nAssistant:"
    with pytest.raises(MlxgptError, match="role"):
        render_transcript([{"role": "bot", "content": "x"}])


def test_turns_reuse_the_kv_cache_and_match_a_fresh_read(tiny_model):
    model = tiny_model(vocab_size=50257, n_positions=256)
    chat = ChatSession(model, gpt2_tokenizer(), GREEDY, system="Be brief.")
    first = "".join(chat.reply("Hello there"))
    read_first = chat.last.prompt_tokens
    second = "".join(chat.reply("And then?"))
    # Turn two re-read nothing of turn one's prompt.
    assert chat.last.cached_tokens >= read_first
    assert chat.last.prompt_tokens > read_first
    assert [m.role for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1].content == first.strip()
    # A new session reading the whole conversation at once replies the same (greedy).
    fresh = ChatSession(model, gpt2_tokenizer(), GREEDY, system="Be brief.")
    fresh.messages = chat.messages[:2]
    assert "".join(fresh.reply("And then?")) == second
    assert fresh.last.cached_tokens == 0


def test_oldest_turns_are_dropped_when_the_context_would_overflow(tiny_model):
    model = tiny_model()
    chat = ChatSession(model, byte_tokenizer(), ChatSettings(max_tokens=8), system="S")
    for i in range(6):
        "".join(chat.reply(f"message number {i}"))
    assert chat.dropped > 0
    assert chat.messages[0].role == "user"
    assert chat.messages[-2].content == "message number 5"
    assert len(chat.prompt_ids()) + 8 <= 64 + 8  # the kept conversation fits with its reply
    assert chat.transcript()[0] == Message("system", "S")


def test_settings_change_by_name():
    s = ChatSettings()
    assert apply_setting(s, "temp", "0.5") == "temperature = 0.5"
    apply_setting(s, "top-k", "40")
    apply_setting(s, "max_tokens", "99")
    apply_setting(s, "seed", "none")
    assert (s.sampling.temperature, s.sampling.top_k, s.max_tokens) == (0.5, 40, 99)
    for name, value in (("nope", "1"), ("temp", "hot"), ("top_p", "2"), ("max_tokens", "0")):
        with pytest.raises(MlxgptError):
            apply_setting(s, name, value)


# --------------------------------------------------------------------------- the REPL


def chat_cmd(folder, *args):
    """The command line a terminal (pty) runs."""
    return [sys.executable, "-m", "mlxgpt", "chat", "-m", str(folder), *args]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model_folder):
    return model_folder(tmp_path_factory.mktemp("chat"), "gpt2", n_positions=128)


def test_piped_stdin_is_one_turn_per_line(folder, tmp_path, mlxgpt_process):
    save = tmp_path / "conv.json"
    lines = [
        "/set temp 0",
        "Hello",
        "Tell me more",
        "/stats",
        f"/save {save}",
        "/reset",
        "Hello",  # the same first turn after /reset: the same greedy reply
        "/system You are terse.",
        "/bogus",
        "/quit",
        "never read",
    ]
    p = mlxgpt_process("chat", "-m", folder, "-n", "10", stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0] == "temperature = 0.0"
    reply1, reply2 = out[1], out[2]
    assert out[3].startswith("conversation: 4 messages")
    assert out[4].startswith("last reply: ") and "tok/s" in out[4]
    assert out[5] == f"(saved to {save})"
    assert out[6] == "(conversation cleared)"
    assert out[7] == reply1 and reply1 != reply2
    assert out[8] == "(system text set)"
    assert "Error: unknown command /bogus" in p.stderr
    saved = json.loads(save.read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[1]["content"] == reply1.strip()


def read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


class Terminal:
    """The chat run on a pseudo-terminal, as a person at a keyboard would run it."""

    def __init__(self, cmd: list[str], history: str):
        env = {**os.environ, "MLXGPT_HISTORY": history, "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, its stdin/stdout the terminal
            os.execvpe(cmd[0], cmd, env)

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def until(self, marker: bytes, timeout: float = 60.0) -> bytes:
        return read_until(self.fd, marker, timeout)

    def exit_status(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        assert os.WIFEXITED(status)
        return os.WEXITSTATUS(status)

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []
    yield lambda cmd, history="": opened.append(Terminal(cmd, history)) or opened[-1]
    for t in opened:
        t.close()


def test_terminal_session_with_ctrl_c_during_a_reply(folder, tmp_path, terminal):
    # Replies as long as they like (the window slides), so one is still running at Ctrl-C.
    term = terminal(chat_cmd(folder, "-n", "100000", "--seed", "0"), str(tmp_path / "history"))
    term.until(b">>> ")
    term.type(b"/set temp 1.5\r")
    assert b"temperature = 1.5" in term.until(b">>> ")
    term.type(b"Write a long story\r")
    shown = term.until(b"Write a long story")
    while len(shown) < 400:  # the reply is streaming
        ready, _, _ = select.select([term.fd], [], [], 10)
        assert ready, "the reply should stream"
        shown += os.read(term.fd, 4096)
    term.type(b"\x03")  # Ctrl-C, through the terminal: SIGINT
    assert b"(stopped)" in term.until(b">>> ", 30)
    term.type(b"/stats\r")
    assert b"conversation: 2 messages" in term.until(b">>> ")
    term.type(b"/quit\r")
    assert term.exit_status() == 0
    assert "Write a long story" in (tmp_path / "history").read_text()  # readline history


def test_terminal_ctrl_d_leaves(tmp_path, terminal, model_folder):
    term = terminal(chat_cmd(model_folder(tmp_path), "-n", "5"))
    term.until(b">>> ")
    term.type(b"hi\r")
    term.until(b">>> ")
    term.type(b"\x04")  # Ctrl-D on an empty line: end of input
    assert term.exit_status() == 0
