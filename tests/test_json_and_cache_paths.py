"""JSON-schema output on every path (``mlxgpt generate``, ``mlxgpt chat``, the Python API, the
server), and prompt cache files preloaded by ``mlxgpt serve --prompt-cache``.

A random model with GPT-2's tokenizer writes garbage unconstrained, so output that parses and
validates shows the constraint at work; each path is compared with the batched engine the
server runs (the same compiled schema, mask and seed give the same document).
"""

from __future__ import annotations

import json

import httpx
import pytest

import mlxgpt
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.batch import SequenceRequest, batch_generate
from mlxgpt.generation.batch_speculative import SpeculativeBatchGenerator
from mlxgpt.generation.chat import ChatSession, ChatSettings
from mlxgpt.generation.constrain import JsonConstraint
from mlxgpt.generation.generate import generate, stream_generate
from mlxgpt.generation.prompt_cache import make_prompt_cache, save_prompt_cache
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers.transcript import Message, chat_prompt

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "mood": {"enum": ["happy", "sad", "calm"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["name", "age", "mood", "tags"]}
ROWS = {"type": "array", "items": {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "score": {"type": "number", "minimum": -1, "maximum": 1}},
    "required": ["ok", "score"]}, "minItems": 1, "maxItems": 2}
SCHEMAS = [PERSON, ROWS]
SEEDS = range(3)
PROMPT = "A person, as JSON:"
N = 80  # tokens per reply: the documents fit, and prompt + reply stay inside 128 positions
EOT = 50256


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model_folder):
    return model_folder(tmp_path_factory.mktemp("json"), tokenizer="gpt2", n_positions=128)


@pytest.fixture(scope="module")
def library(folder):
    return mlxgpt.load(str(folder))


def sampled(seed: int) -> SamplingSettings:
    return SamplingSettings(temperature=1.0, seed=seed)


def batched(library, prompt_ids: list[int], schema: dict | None, seed: int) -> str:
    """What the server's engine writes: the batched path, its constraint compiled as the
    server compiles response_format (compact JSON)."""
    model, tok = library
    state = JsonConstraint(tok, schema, model.config.vocab_size, whitespace=0).start(N)
    return batch_generate(model, tok, [prompt_ids], max_tokens=N, sampling=sampled(seed),
                          constraint=state)[0]


def valid(text: str, schema: dict) -> dict | list:
    doc = json.loads(text)
    jsonschema.validate(doc, schema)
    return doc


# --------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array"])
def test_api_output_validates_ends_with_stop_and_equals_the_batched_path(library, schema):
    model, tok = library
    free = generate(model, tok, PROMPT, max_tokens=40, sampling=SamplingSettings(
        temperature=1.0, seed=0, logit_bias={EOT: -100.0}))
    with pytest.raises(json.JSONDecodeError):  # unconstrained, the model writes no JSON
        json.loads(free)
    texts = set()
    for seed in SEEDS:
        rs = list(stream_generate(model, tok, PROMPT, max_tokens=N, sampling=sampled(seed),
                                  json_schema=schema))
        text = "".join(r.text for r in rs)
        valid(text, schema)
        assert rs[-1].finish_reason == "stop"
        assert rs[-1].generation_tokens == len(rs) - 1  # the last token completed it
        assert text == generate(model, tok, PROMPT, max_tokens=N, sampling=sampled(seed),
                                json_schema=schema)
        assert text == batched(library, tok.encode(PROMPT), schema, seed)
        texts.add(text)
    assert len(texts) == len(SEEDS)  # the seeds were used


def test_api_greedy_logprobs_tight_budget_and_any_object(library):
    model, tok = library
    # greedy: the masked argmax at every step, with the masked distribution's log-probs
    rs = list(stream_generate(model, tok, PROMPT, max_tokens=N, json_schema=PERSON,
                              sampling=SamplingSettings(temperature=0), logprobs=True))
    valid("".join(r.text for r in rs), PERSON)
    assert all(r.logprob is not None and r.logprob <= 0 for r in rs[:-1])
    # a budget just above the shortest document still ends in a complete one
    need = JsonConstraint(tok, PERSON, model.config.vocab_size, whitespace=0).min_tokens
    text = generate(model, tok, PROMPT, max_tokens=need + 2, sampling=sampled(1),
                    json_schema=PERSON)
    valid(text, PERSON)
    # a compiled constraint of one's own: schema None is any object, whitespace allowed
    anything = JsonConstraint(tok, None, model.config.vocab_size, whitespace=1)
    for seed in SEEDS:
        doc = json.loads(generate(model, tok, PROMPT, max_tokens=N, sampling=sampled(seed),
                                  json_schema=anything))
        assert isinstance(doc, dict)


def test_documents_go_on_across_a_sliding_window_and_end_before_a_full_context(
        model_folder, tmp_path):
    """32 positions: "slide" keeps a long document going past the context (as the batched
    path does); "stop" gives the document only the positions left, so it still completes."""
    model, tok = mlxgpt.load(str(model_folder(tmp_path, tokenizer="gpt2", n_positions=32)))
    prompt = "Numbers, as a JSON list of twenty digits, then a few words:"
    ids = tok.encode(prompt)
    digits = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": 20, "maxItems": 20}
    words = {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 10}
    for seed in SEEDS:
        rs = list(stream_generate(model, tok, prompt, max_tokens=60, sampling=sampled(seed),
                                  json_schema=digits))
        text = "".join(r.text for r in rs)
        valid(text, digits)
        assert len(ids) + rs[-1].generation_tokens > 32  # the window slid
        state = JsonConstraint(tok, digits, model.config.vocab_size, whitespace=0).start(60)
        assert text == batch_generate(model, tok, [ids], max_tokens=60, sampling=sampled(seed),
                                      constraint=state)[0]
        rs = list(stream_generate(model, tok, prompt, max_tokens=60, sampling=sampled(seed),
                                  json_schema=words, context="stop"))
        valid("".join(r.text for r in rs), words)
        assert rs[-1].finish_reason == "stop" and rs[-1].generation_tokens <= 32 - len(ids)


def test_api_refusals(library):
    model, tok = library
    with pytest.raises(MlxgptError, match="json_schema: schema at #: unsupported .*'not'"):
        generate(model, tok, PROMPT, json_schema={"not": {}})
    with pytest.raises(MlxgptError, match="json_schema must be a JSON schema"):
        generate(model, tok, PROMPT, json_schema='{"type": "object"}')
    with pytest.raises(MlxgptError, match="too small for this schema"):
        generate(model, tok, PROMPT, max_tokens=3, json_schema=PERSON)
    other = JsonConstraint(tok, PERSON, tok.vocab_size + 1)
    with pytest.raises(MlxgptError, match="compiled for"):
        generate(model, tok, PROMPT, json_schema=other)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array"])
def test_a_draft_model_keeps_the_constraint(library, model_folder, tmp_path, schema):
    """Speculative decoding under a schema: greedy, the same document as without a draft
    (drafts the model accepts, so the constraint's mask was applied at every verified
    position); sampled, valid documents; a draft equal to the model is always accepted."""
    model, tok = library
    draft, _ = mlxgpt.load(str(model_folder(tmp_path, tokenizer="gpt2", seed=3, n_layer=1,
                                            n_positions=128)))
    greedy = SamplingSettings(temperature=0)
    plain = generate(model, tok, PROMPT, max_tokens=N, sampling=greedy, json_schema=schema)
    valid(plain, schema)
    for d in (draft, model):
        rs = list(stream_generate(model, tok, PROMPT, max_tokens=N, sampling=greedy,
                                  json_schema=schema, draft_model=d, draft_tokens=3))
        assert "".join(r.text for r in rs) == plain
        assert rs[-1].finish_reason == "stop" and rs[-1].drafted_tokens > 0
    assert rs[-1].accepted_tokens == rs[-1].drafted_tokens  # the model as its own draft
    for seed in SEEDS:
        rs = list(stream_generate(model, tok, PROMPT, max_tokens=N, sampling=sampled(seed),
                                  json_schema=schema, draft_model=draft, draft_tokens=3))
        valid("".join(r.text for r in rs), schema)
        assert rs[-1].finish_reason == "stop"
    chat = ChatSession(model, tok, ChatSettings(max_tokens=N, sampling=greedy),
                       json_schema=schema, draft_model=draft, draft_tokens=2)
    valid("".join(chat.reply("Who?")), schema)
    # batched rows (the server's engine with a draft): greedy, the plain batched document
    gen = SpeculativeBatchGenerator(model, tok, model, draft_tokens=3)
    compiled = JsonConstraint(tok, schema, model.config.vocab_size, whitespace=0)
    uid = gen.add(SequenceRequest(tok.encode(PROMPT), max_tokens=N, sampling=greedy,
                                  constraint=compiled.start(N)))
    events = []
    while gen.active:
        events += [e for e in gen.step() if e.uid == uid]
    assert "".join(e.text for e in events) == batch_generate(
        model, tok, [tok.encode(PROMPT)], max_tokens=N, sampling=greedy,
        constraint=compiled.start(N))[0] == plain
    assert events[-1].finish_reason == "stop"
    assert events[-1].accepted_tokens == events[-1].drafted_tokens > 0


def test_chat_session_replies_are_constrained_turn_after_turn(library):
    model, tok = library
    session = ChatSession(model, tok, ChatSettings(max_tokens=N, sampling=sampled(4)),
                          json_schema=PERSON)
    for turn in ("Who are you?", "And your friend?"):
        valid("".join(session.reply(turn)), PERSON)
        assert session.last.finish_reason == "stop"
    session.settings.max_tokens = 3  # /set max_tokens 3: refused before the turn is added
    before = list(session.messages)
    with pytest.raises(MlxgptError, match="too small"):
        list(session.reply("Again?"))
    assert session.messages == before


# --------------------------------------------------------------------------- the command line


def test_generate_cli_schema_file_and_inline_json_equal_the_api(folder, library, tmp_path,
                                                                 cli_ok):
    model, tok = library
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    for seed in SEEDS:
        out = cli_ok("generate", "--model", folder, "-p", PROMPT, "-n", N, "--temp", 1.0,
                     "--seed", seed, "--json-schema", path)
        text = out.stdout.removesuffix("\n")
        valid(text, PERSON)
        assert "finish: stop" in out.stderr
        assert text == generate(model, tok, PROMPT, max_tokens=N, sampling=sampled(seed),
                                json_schema=PERSON)
    inline = cli_ok("generate", "--model", folder, "-p", PROMPT, "-n", N, "--temp", 1.0,
                    "--seed", 0, "--json-schema", json.dumps(ROWS), "-q")
    assert inline.stdout.removesuffix("\n") == batched(library, tok.encode(PROMPT), ROWS, 0)
    valid(inline.stdout, ROWS)
    # --json-object: any object, as the server's json_object (schema None) writes it
    for seed in SEEDS:
        out = cli_ok("generate", "--model", folder, "-p", PROMPT, "-n", N, "--temp", 1.0,
                     "--seed", seed, "--json-object", "-q")
        assert isinstance(json.loads(out.stdout), dict)
        assert out.stdout.removesuffix("\n") == batched(library, tok.encode(PROMPT), None, seed)
    # whitespace: compact by default; with --json-whitespace the mask lets gaps through
    spaced = [cli_ok("generate", "--model", folder, "-p", PROMPT, "-n", N, "--temp", 1.0,
                     "--seed", seed, "--json-object", "--json-whitespace", 2, "-q").stdout
              for seed in range(6)]
    assert all(isinstance(json.loads(s), dict) for s in spaced)
    assert any(c in s.strip() for s in spaced for c in " \t\r\n")


def test_chat_cli_replies_validate_and_equal_the_session(folder, library, cli_ok):
    model, tok = library
    lines = ["Who are you?", "Where do you live?"]
    out = cli_ok("chat", "--model", folder, "-n", N, "--temp", 1.0, "--seed", 3,
                 "--json-schema", json.dumps(PERSON), input="\n".join(lines) + "\n")
    replies = out.stdout.splitlines()
    assert len(replies) == 2
    for r in replies:
        valid(r, PERSON)
    session = ChatSession(model, tok, ChatSettings(max_tokens=N, sampling=sampled(3)),
                          json_schema=PERSON)
    assert replies == ["".join(session.reply(line)) for line in lines]


def test_bad_schemas_and_combinations_are_one_line(folder, tmp_path, cli, refused):
    def gen(*args):
        return cli("generate", "--model", folder, "-p", "x", "-n", 60, *args)

    refused(gen("--json-schema", '{"type": "object", "patternProperties": {}}'),
            "--json-schema: schema at #: unsupported JSON schema keyword 'patternProperties'")
    refused(gen("--json-schema", '{"type": "object",'), "--json-schema: not valid JSON")
    refused(gen("--json-schema", "nowhere.json"), "--json-schema: no file 'nowhere.json'")
    (tmp_path / "bad.json").write_text("[1, 2]")
    refused(gen("--json-schema", tmp_path / "bad.json"), "expected a JSON object")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(gen("--json-schema", tmp_path / "deep.json"), "nested too deeply")
    refused(gen("--json-schema", '{"type": "number", "minimum": 5, "maximum": 1}'),
            "no number with at most 6 decimals lies between minimum and maximum")
    refused(gen("--json-schema", json.dumps(PERSON), "-n", 5), "too small for this schema")
    refused(gen("--json-schema", "{}", "--json-object"), "not both")
    refused(gen("--json-object", "--json-whitespace", 17), "--json-whitespace")
    refused(cli("chat", "--model", folder, "--json-schema", '{"type": "strin"}', input="hi\n"),
            "--json-schema: schema at #")


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def running_server():
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from test_serve import running_server

    return running_server


def chat_request(base: str, messages: list[dict], schema: dict, seed: int) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": N, "temperature": 1.0,
            "seed": seed, "response_format": {"type": "json_schema", "json_schema": {
                "name": "out", "schema": schema}}}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_server_replies_equal_chat_and_generate(folder, library, running_server, cli_ok):
    """The server's chat completion, ``mlxgpt chat`` and ``mlxgpt generate`` on the same
    prompt, schema and seed write the same document: one mask, one sampler, one seed."""
    model, tok = library
    messages = [{"role": "user", "content": "Describe a person."}]
    ids = chat_prompt(tok, messages)[0]
    session = ChatSession(model, tok)
    session.messages.append(Message(**messages[0]))
    assert session.prompt_ids() == ids  # the chat reads the prompt the server reads
    with running_server(folder) as (base, _):
        for schema in SCHEMAS:
            for seed in SEEDS:
                r = chat_request(base, messages, schema, seed)
                text = r["choices"][0]["message"]["content"]
                valid(text, schema)
                assert r["choices"][0]["finish_reason"] == "stop"
                out = cli_ok("chat", "--model", folder, "-n", N, "--temp", 1.0, "--seed", seed,
                             "--json-schema", json.dumps(schema),
                             input=messages[0]["content"] + "\n")
                assert out.stdout.removesuffix("\n") == text
                assert generate(model, tok, ids, max_tokens=N, sampling=sampled(seed),
                                json_schema=schema) == text


# --------------------------------------------------------------------------- serve --prompt-cache

HEAD = ("Zanzibar harbour at dawn: the fishing boats come in, the gulls circle, and the old "
        "men mend their nets on the sea wall.")


def test_serve_prompt_cache_is_reused_from_the_first_request(folder, library, tmp_path,
                                                            running_server):
    model, tok = library
    cache = make_prompt_cache(model, tok, HEAD)
    path = save_prompt_cache(cache, tmp_path / "head.safetensors")
    rest = " The market opens."
    ids = tok.encode(HEAD + rest)
    assert ids[: len(cache)] == cache.tokens  # the text prompt starts with the cached ids
    body = {"model": "m", "prompt": HEAD + rest, "max_tokens": 12, "temperature": 0,
            "logit_bias": {str(EOT): -100}}
    with running_server(folder) as (base, _):
        plain = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
    with running_server(folder, "--prompt-cache", str(path)) as (base, proc):
        first = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
        as_ids = httpx.post(f"{base}/v1/completions", timeout=120, json={
            **body, "prompt": cache.tokens + tok.encode(" Rain falls.")}).json()
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == len(cache)
    assert first["usage"]["prompt_tokens"] == len(ids)
    assert first["choices"][0]["text"] == plain["choices"][0]["text"]
    assert first["choices"][0]["text"] == generate(
        model, tok, HEAD + rest, max_tokens=12,
        sampling=SamplingSettings(temperature=0, logit_bias={EOT: -100.0}))
    assert as_ids["usage"]["prompt_tokens_details"]["cached_tokens"] == len(cache)


def test_serve_refuses_another_models_prompt_cache(folder, model_folder, tmp_path,
                                                    mlxgpt_process, refused):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    other = model_folder(tmp_path, tokenizer="gpt2", seed=1, n_positions=128)
    model, tok = mlxgpt.load(str(other))
    path = save_prompt_cache(make_prompt_cache(model, tok, HEAD), tmp_path / "other.safetensors")
    # a timeout (a server that started anyway) fails the test too
    refused(mlxgpt_process("serve", "--model", folder, "--prompt-cache", path, "--port", 0,
                           timeout=90), str(path))
    refused(mlxgpt_process("serve", "--model", folder, "--prompt-cache",
                           tmp_path / "none.safetensors", "--port", 0, timeout=90),
            "prompt cache file not found")
