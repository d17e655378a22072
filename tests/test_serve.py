"""``mlxgpt serve`` against the real OpenAI client, over loopback, on a random-weight model.

Each server is a real ``python -m mlxgpt serve`` process on a free port.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

EOT = 50256
NO_EOT = {str(EOT): -100}  # random models end early otherwise; lets runs last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(folder: Path, *args: str, timeout: float = 90):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgpt", "serve", "--model", str(folder), "--port", str(port),
         "--log-level", "warning", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.communicate()[1]}")
        time.sleep(0.2)
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model_folder):
    # GPT-2's tokenizer (so the JSON tests run on the real vocabulary), 128 positions
    return model_folder(tmp_path_factory.mktemp("serve"), tokenizer="gpt2", n_positions=128)


@pytest.fixture(scope="module")
def server(folder):
    with running_server(folder) as (base, proc):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def cli_greedy(cli_ok, folder: Path, prompt: str, n: int) -> str:
    out = cli_ok("generate", "--model", folder, "--prompt", prompt, "--temp", "0", "-n", n, "-q")
    return out.stdout[:-1]  # generate ends its output with a newline


PROMPTS = ["The meaning of life is", "Once upon a time", "1, 2, 3,", "Hello"]


def test_models_and_health(client, server, folder):
    assert [m.id for m in client.models.list().data] == [folder.name]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_completion_equals_generate_streamed_or_not(client, cli_ok, folder):
    for prompt in PROMPTS[:2]:
        ref = cli_greedy(cli_ok, folder, prompt, 24)
        r = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == ref
        assert 1 <= r.usage.completion_tokens <= 24
        assert r.usage.prompt_tokens > 0
        assert r.choices[0].finish_reason in ("stop", "length")
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_streamed_equals_whole_and_library(client, folder):
    from mlxgpt.cli.options import load_model
    from mlxgpt.generation.generate import generate
    from mlxgpt.generation.sample import SamplingSettings
    from mlxgpt.tokenizers.transcript import STOPS, render_transcript

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=30,
                                           temperature=0)
    text = whole.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=messages, max_tokens=30, temperature=0, stream=True)]
    assert "".join(pieces) == text
    model, tok = load_model(str(folder), None, "auto")
    ref = generate(model, tok, render_transcript(messages, add_generation_prompt=True),
                   max_tokens=30, sampling=SamplingSettings(temperature=0), stop=STOPS)
    assert text == ref.strip()
    assert whole.choices[0].message.role == "assistant"


def test_sampling_parameters_and_logprobs(client):
    kw = dict(model="m", prompt="Hello", max_tokens=12, temperature=0.9, top_p=0.9,
              seed=7, presence_penalty=0.5, frequency_penalty=0.3,
              extra_body={"top_k": 50, "min_p": 0.01})
    a, b = (client.completions.create(**kw) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text  # same seed, same text
    n3 = client.completions.create(model="m", prompt="Hello", max_tokens=12, n=3, seed=1,
                                   temperature=1.0, logit_bias=NO_EOT)
    assert [c.index for c in n3.choices] == [0, 1, 2]
    assert len({c.text for c in n3.choices}) > 1  # each choice its own draws
    assert n3.usage.completion_tokens == 36
    # logprobs: the greedy token is the most likely of the top ones
    lp = client.completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0,
                                   logprobs=3, logit_bias=NO_EOT).choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.top_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and logprob == pytest.approx(max(top.values()), abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2, logit_bias=NO_EOT)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 for c in content)
    # a ban through logit_bias holds
    banned = client.completions.create(model="m", prompt="Hello", max_tokens=1, temperature=0,
                                       logprobs=0).choices[0].logprobs.tokens[0]
    tok_id = _gpt2_id(banned)
    again = client.completions.create(model="m", prompt="Hello", max_tokens=1, temperature=0,
                                      logit_bias={str(tok_id): -100})
    assert again.choices[0].text != banned


def _gpt2_id(text: str) -> int:
    from mlxgpt.tokenizers import gpt2_tokenizer

    ids = gpt2_tokenizer().encode(text, allow_special=True)
    assert len(ids) == 1
    return ids[0]


def test_max_tokens_and_length(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=3, temperature=0,
                                       logit_bias=NO_EOT, stop=["zzzz"])
    assert r.usage.completion_tokens <= 3


def test_sixteen_concurrent_streams_each_get_their_greedy_text(client, cli_ok, folder):
    prompts = [f"Item {i}: the" for i in range(16)]
    refs = [cli_greedy(cli_ok, folder, p, 20) for p in prompts]

    def one(prompt: str) -> str:
        s = client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0,
                                      stream=True)
        return "".join(c.choices[0].text for c in s if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == refs


def test_client_killed_mid_stream_frees_its_row(server, client, cli_ok, folder):
    ref = cli_greedy(cli_ok, folder, "Once upon a time", 16)
    body = {"model": "m", "prompt": "Dropped", "max_tokens": 5000, "stream": True,
            "logit_bias": NO_EOT, "temperature": 1.0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    # the connection is closed: its row goes, and the others are served as before
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=16,
                                  temperature=0)
    assert r.choices[0].text == ref
    deadline = time.time() + 10
    while httpx.get(f"{server}/health").json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server}/health").json()["running"] == 0


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize("body, match, param", [
    ({"model": "m", "prompt": "x", "temprature": 1}, "unknown parameter", "temprature"),
    ({"model": "m", "prompt": "x", "temperature": 5}, "temperature", "temperature"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": "m", "prompt": "x", "top_p": "high"}, "top_p", "top_p"),
    ({"model": "m", "prompt": "x", "n": 99}, "'n'", "n"),
    ({"model": "m", "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias", "logit_bias"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop"),
    ({"model": "m", "prompt": 42}, "prompt", "prompt"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options", "stream_options"),
    ({"model": "m", "prompt": "word " * 200}, "context", "prompt"),
])
def test_bad_completion_requests_get_400(server, body, match, param):
    err = error_of(httpx.post(f"{server}/v1/completions", json=body), 400)
    assert match in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_bad_chat_requests_and_malformed_json_get_400(server):
    url = f"{server}/v1/chat/completions"
    err = error_of(httpx.post(url, content=b"{not json", headers={
        "content-type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    err = error_of(httpx.post(url, json=[1, 2]), 400)
    assert "JSON object" in err["message"]
    err = error_of(httpx.post(url, json={"model": "m", "messages": []}), 400)
    assert err["param"] == "messages"
    err = error_of(httpx.post(url, json={"model": "m", "messages": [
        {"role": "wizard", "content": "hi"}]}), 400)
    assert "wizard" in err["message"]
    err = error_of(httpx.post(url, json={"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "tools": []}), 400)
    assert err["param"] == "tools"
    err = error_of(httpx.post(url, json={"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}), 400)
    assert err["param"] == "response_format"
    # the openai client raises its own error type for these
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="x", temperature=-1)
    error_of(httpx.get(f"{server}/v1/nowhere"), 404)


def test_api_key_and_full_queue(folder):
    with running_server(folder, "--api-key", "sekret", "--max-batch", "1",
                        "--max-queue", "1") as (base, _):
        error_of(httpx.get(f"{base}/v1/models"), 401)
        error_of(httpx.post(f"{base}/v1/completions", json={"prompt": "x"},
                            headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong",
                          max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        assert client.models.list().data
        # one row, one waiting place: of four long requests at once, some get 429
        body = {"model": "m", "prompt": "x", "max_tokens": 120, "logit_bias": NO_EOT}
        auth = {"Authorization": "Bearer sekret"}

        def post(_):
            return httpx.post(f"{base}/v1/completions", json=body, headers=auth, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(post, range(4)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1"
        assert error_of(busy, 429)["type"] == "rate_limit_error"


def test_sigterm_finishes_the_running_stream_and_exits_cleanly(folder):
    with running_server(folder) as (base, proc):
        body = {"model": "m", "prompt": "x", "max_tokens": 100, "stream": True,
                "logit_bias": NO_EOT}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert rest[-2 if rest[-1] == "" else -1] == "data: [DONE]"
        code = proc.wait(30)
        assert code == 0, (code, proc.stderr.read())
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/health", timeout=2)


# --------------------------------------------------------------------------- structured output

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "zip": {"type": "number"}}, "required": ["city", "zip"]}},
     "required": ["name", "age", "mood", "tags", "address"]},
    {"type": "array", "items": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "score": {"type": "number", "minimum": -1, "maximum": 1},
        "note": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["ok", "score", "note"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", 42, None]}},
     "required": ["answer"]},
]


def chat_json(client, schema, seed, stream=False, max_tokens=200):
    fmt = ({"type": "json_object"} if schema is None else
           {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}})
    kw = dict(model="m", messages=[{"role": "user", "content": "Describe a person as JSON."}],
              response_format=fmt, max_tokens=max_tokens, temperature=1.0, seed=seed)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    parts, finish = [], None
    for c in client.chat.completions.create(stream=True, **kw):
        parts.append(c.choices[0].delta.content or "")
        finish = c.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_json_schema_output_parses_and_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    # unconstrained, the random model writes garbage: the constraint is what makes it JSON
    free = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "JSON please"}], max_tokens=40,
        temperature=1.0, seed=0, logit_bias=NO_EOT).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    for schema in SCHEMAS:
        for seed in range(3):
            text, finish = chat_json(client, schema, seed)
            jsonschema.validate(json.loads(text), schema)
            assert finish == "stop"
        text, _ = chat_json(client, schema, 5, stream=True)
        jsonschema.validate(json.loads(text), schema)
    for seed in range(3):  # json_object: any object
        assert isinstance(json.loads(chat_json(client, None, seed)[0]), dict)
    # a tight budget still ends in a complete document
    text, _ = chat_json(client, SCHEMAS[0], 1, max_tokens=90)
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_bad_response_formats_get_400(server):
    url = f"{server}/v1/chat/completions"
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "patternProperties": {"^a": {}}}}}
    err = error_of(httpx.post(url, json={**base, "response_format": fmt}), 400)
    assert "patternProperties" in err["message"] and err["param"] == "response_format"
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[0]}}
    err = error_of(httpx.post(url, json={**base, "response_format": fmt, "max_tokens": 5}), 400)
    assert "max_tokens" in err["message"]
