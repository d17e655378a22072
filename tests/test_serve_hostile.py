"""``mlxgpt serve`` against hostile and broken clients, over real HTTP: bodies built to crash the
parser or the schema compiler get 400, oversized bodies 413, slow ones 408; a big prompt does not
stall other clients; a shutdown that must cut requests ends each with a 503 (a stream: an error
event and ``[DONE]``); the API key can come from a file. The server's log never holds a
traceback.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_serve import NO_EOT, error_of, folder, running_server  # noqa: F401 (fixture)

MAX_BODY = 24_000_000  # the hostile server's --max-body: room for the 20 MB prompt below
TIMEOUT = 3  # its --request-timeout


class LogTail:
    """A server's stderr, read as it comes (a thread drains the pipe), so that each test can
    check the log right after its own requests."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self.checked = 0  # lines already checked: each test checks what its requests logged
        self.thread = threading.Thread(target=self._drain, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _drain(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def assert_clean(self, settle: float = 0.3) -> None:
        """No traceback among the lines logged since the last check."""
        time.sleep(settle)  # what the server logs after answering
        lines = self.lines[self.checked:]
        self.checked += len(lines)
        log = "".join(lines)
        assert "Traceback" not in log and "Exception in ASGI" not in log, log
        assert "CancelledError" not in log, log


@pytest.fixture(scope="module")
def hostile(folder):  # noqa: F811 (the fixture imported above)
    with running_server(folder, "--max-body", str(MAX_BODY), "--request-timeout",
                        str(TIMEOUT)) as (base, proc):
        log = LogTail(proc)
        yield base, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log.thread.join(10)
    log.assert_clean()


def nested_schema(depth: int) -> str:
    """A response_format schema ``depth`` arrays deep, as JSON text (json.dumps would hit the
    recursion limit building it)."""
    return '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth


def chat_with_schema(schema_text: str) -> bytes:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "response_format": {"type": "json_schema", "json_schema": {
                           "name": "x", "schema": "SCHEMA"}}})
    return body.replace('"SCHEMA"', schema_text).encode()


HOSTILE_BODIES = {
    "json nested 10,000 deep": (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
    "an integer of 5,000 digits": (
        b'{"model": "m", "prompt": "hi", "seed": ' + b"7" * 5000 + b"}",
        "integer with too many digits"),
    "a schema nested 900 deep": (chat_with_schema(nested_schema(900)),
                                 "nested more than 128 levels deep"),
    "a schema nested 2,000 deep": (chat_with_schema(nested_schema(2000)), "nested too deeply"),
    "a schema nested 70 deep": (chat_with_schema(nested_schema(70)),
                                "nested more than 64 deep"),
    "minimum 1e40": (chat_with_schema('{"type": "integer", "minimum": 1e40}'),
                     "minimum must be between -1e20 and 1e20"),
    "maximum of 400 digits": (chat_with_schema('{"type": "number", "maximum": 1' + "0" * 400
                                               + "}"), "maximum must be between"),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_get_400_never_500(hostile, name):
    base, log = hostile
    body, match = HOSTILE_BODIES[name]
    path = "/v1/completions" if b'"prompt"' in body or body.startswith(b"[") else \
        "/v1/chat/completions"
    r = httpx.post(base + path, content=body, headers={"content-type": "application/json"},
                   timeout=60)
    err = error_of(r, 400)
    assert match in err["message"] and "\n" not in err["message"]
    assert err["type"] == "invalid_request_error"
    log.assert_clean()


def raw_request(base: str, data: bytes, wait: float = 0) -> socket.socket:
    """A connection that has sent ``data`` (and then nothing more)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(data)
    time.sleep(wait)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """What the server sent until it closed the connection (a reset, when it closed with bytes
    of ours unread, ends it too)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    sock.close()
    return out


def command_line(pid: int) -> bytes:
    """A process's arguments as other users see them (``ps``)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.exists():
        return proc.read_bytes()
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True,
                          check=True).stdout


def response_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_bodies_over_the_limit_get_413_before_they_are_read(hostile):
    base, log = hostile
    url = base + "/v1/completions"
    # declared too large: refused on the headers alone, with 1 KB of 100 MB sent
    sock = raw_request(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
                       + b"x" * 1024)
    status, body = response_of(read_all(sock))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # chunked (no length): refused once the limit is passed, the end never sent (one byte
    # past it: a server that closes with bytes unread resets the connection)
    chunk = b"x" * 1_000_000
    sock = raw_request(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n"
                       + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (MAX_BODY // len(chunk))
                       + b"1\r\nx\r\n")
    status, body = response_of(read_all(sock))
    assert status == 413 and "limit of 24000000 bytes" in body["error"]["message"]
    # the usual client gets the OpenAI-style error too
    err = error_of(httpx.post(url, content=b"x" * (MAX_BODY + 1), timeout=60), 413)
    assert "--max-body" in err["message"]
    assert httpx.get(base + "/health").status_code == 200
    log.assert_clean()


def test_slow_or_silent_clients_get_408(hostile):
    base, log = hostile
    start = time.time()
    silent = raw_request(base, b"")
    half_headers = raw_request(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    half_body = raw_request(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                            b'{"prompt": ')
    for sock, what in ((silent, "headers"), (half_headers, "headers"), (half_body, "body")):
        status, body = response_of(read_all(sock))  # read_all: the server closed it
        assert status == 408, body
        assert f"request {what} did not arrive within {TIMEOUT} s" in body["error"]["message"]
    assert time.time() - start < TIMEOUT + 10
    log.assert_clean()


def test_a_client_leaving_mid_body_logs_nothing(hostile):
    base, log = hostile
    for _ in range(3):
        raw_request(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                    b'{"messages": [', wait=0.2).close()
    time.sleep(0.5)
    assert httpx.get(base + "/health").json()["running"] == 0
    log.assert_clean()


def test_a_big_prompt_does_not_stall_other_clients(hostile):
    """Parsing and tokenizing 20 MB take a while; meanwhile /health still answers at once."""
    base, log = hostile
    body = json.dumps({"model": "m", "prompt": "the quick brown fox " * 1_000_000}).encode()
    result: dict = {}

    def big() -> None:
        start = time.time()
        result["response"] = httpx.post(base + "/v1/completions", content=body, timeout=120)
        result["elapsed"] = time.time() - start

    thread = threading.Thread(target=big)
    thread.start()
    latencies = []
    while thread.is_alive():
        start = time.time()
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        latencies.append(time.time() - start)
        time.sleep(0.02)
    thread.join()
    err = error_of(result["response"], 400)  # far past the 128-token context
    assert err["code"] == "context_length_exceeded"
    # on the event loop, one /health call would wait out the whole parse
    assert len(latencies) >= 3, (latencies, result["elapsed"])
    assert max(latencies) < result["elapsed"] / 2, (latencies, result["elapsed"])
    log.assert_clean()


def test_shutdown_cuts_running_requests_with_an_error(folder):  # noqa: F811
    """Requests that outlast --shutdown-timeout: each stream gets an error event, then
    [DONE]; each whole request a 503; the server exits 0 with a clean log."""
    with running_server(folder, "--context", "slide", "--shutdown-timeout", "1") as (base, proc):
        log = LogTail(proc)
        endless = {"model": "m", "max_tokens": 1 << 20, "logit_bias": NO_EOT}
        results: dict = {}

        def stream(i: int) -> None:
            lines = results[f"stream {i}"] = []
            with contextlib.suppress(httpx.HTTPError), httpx.stream(
                    "POST", base + "/v1/completions", timeout=60,
                    json={**endless, "prompt": "x", "stream": True}) as r:
                lines += (line for line in r.iter_lines() if line)  # a cut stream: what came

        def whole(i: int) -> None:
            results[f"whole {i}"] = httpx.post(
                base + "/v1/chat/completions", timeout=60,
                json={**endless, "messages": [{"role": "user", "content": "x"}]})

        threads = [threading.Thread(target=f, args=(i,)) for f in (stream, whole)
                   for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while httpx.get(base + "/health").json()["running"] < 4:
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0
    log.thread.join(10)
    for i in range(2):
        lines = results[f"stream {i}"]
        assert lines[-1] == "data: [DONE]"
        assert lines[-2].startswith("data: {")
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down"
        assert all("error" not in json.loads(x[6:]) for x in lines[:-2])  # tokens before it
        err = error_of(results[f"whole {i}"], 503)
        assert err["code"] == "server_shutting_down" and err["type"] == "server_error"
    log.assert_clean()


def test_api_key_file(folder, tmp_path, cli, refused):  # noqa: F811
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-from-a-file\n")
    with running_server(folder, "--api-key-file", str(key_file)) as (base, proc):
        cmdline = command_line(proc.pid)
        assert b"api-key-file" in cmdline and b"s3cret" not in cmdline
        error_of(httpx.get(base + "/v1/models"), 401)
        ok = httpx.get(base + "/v1/models",
                       headers={"Authorization": "Bearer s3cret-from-a-file"})
        assert ok.status_code == 200
        # the default body limit (4 MiB) holds here
        err = error_of(httpx.post(base + "/v1/completions", content=b"x" * (4 * 2**20 + 1),
                                  headers={"Authorization": "Bearer s3cret-from-a-file"},
                                  timeout=60), 413)
        assert "4194304 bytes" in err["message"]
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    model = str(folder)
    refused(cli("serve", "--model", model, "--api-key-file", empty), "is empty")
    refused(cli("serve", "--model", model, "--api-key-file", tmp_path / "missing"),
            "cannot read it")
    refused(cli("serve", "--model", model, "--api-key-file", tmp_path), "cannot read it")
    refused(cli("serve", "--model", model, "--api-key-file", two), "more than one line")
    refused(cli("serve", "--model", model, "--api-key-file", key_file, "--api-key", "x"),
            "not both")
    refused(cli("serve", "--model", model, "--max-body", "0"), "--max-body")
    refused(cli("serve", "--model", model, "--request-timeout", "nan"), "--request-timeout")
    refused(cli("serve", "--model", model, "--shutdown-timeout", "-1"), "--shutdown-timeout")
    help_text = " ".join(cli("serve", "--help").output.split())
    assert "--api-key-file" in help_text and "MLXGPT_API_KEY" in help_text
    assert "visible to other users in `ps`" in help_text
