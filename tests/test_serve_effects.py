"""``mlxgpt serve``: every sampling parameter changes what the server writes, as the library's
:class:`SamplingSettings` would; finish reasons, stop strings, prefix reuse and
log-probabilities checked against the model itself.

Each test compares the server (a real process, through the openai client) with the library
run in this process on the same model folder (``mlxgpt.load`` + ``stream_generate``), and also
with the output *without* the parameter, so a parameter the server ignored would fail.
The server's helpers and fixtures (``folder``: GPT-2 tokenizer, 128 positions) come from
test_serve.py.
"""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
import test_serve
from test_serve import EOT, NO_EOT, running_server

import mlxgpt
from mlxgpt.generation.generate import stream_generate
from mlxgpt.generation.sample import SamplingSettings

PROMPT = "The meaning of life is"
N = 24  # tokens per run: well inside the 128 positions
NO_EOT_IDS = {EOT: -100.0}  # NO_EOT as the library takes it
LOGPROB_TOL = 1e-4  # float32: the server's KV-cached batched forward vs one full forward here
EXTENSIONS = {"top_k", "min_p", "repetition_penalty"}  # not in the openai client's signature

# test_serve's fixtures (this module gets its own server): the model folder, server, client
folder, server, client = test_serve.folder, test_serve.server, test_serve.client


@pytest.fixture(scope="module")
def library(folder):
    return mlxgpt.load(str(folder))


def lib_run(library, prompt, max_tokens=N, stop=(), **settings):
    """(text, token ids, finish reason) of the library on ``prompt`` (text or ids); EOT banned
    unless ``logit_bias`` is given."""
    model, tok = library
    settings.setdefault("logit_bias", NO_EOT_IDS)
    rs = list(stream_generate(model, tok, prompt, max_tokens=max_tokens, stop=stop,
                              sampling=SamplingSettings(**settings)))
    return "".join(r.text for r in rs), [r.token for r in rs[:-1]], rs[-1].finish_reason


def complete(client, prompt=PROMPT, max_tokens=N, **params):
    """A completion (``stream=True``: its chunks); EOT banned unless ``logit_bias`` is given."""
    params.setdefault("logit_bias", NO_EOT)
    extra = {k: params.pop(k) for k in list(params) if k in EXTENSIONS}
    return client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                     extra_body=extra or None, **params)


def server_text(client, **params) -> str:
    return complete(client, **params).choices[0].text


def model_log_probs(model, prompt_ids: list[int], generated: list[int],
                    bias: dict[int, float] | None = None) -> mx.array:
    """log-softmax of the model's logits (one full forward, no cache) at each generated
    position, ``bias`` added to the logits first: row i is the distribution ``generated[i]``
    was drawn from."""
    ids = prompt_ids + generated
    logits = model(mx.array([ids]))[0, len(prompt_ids) - 1: len(ids) - 1].astype(mx.float32)
    for t, b in (bias or {}).items():
        logits[:, t] += b
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- penalties


def test_greedy_server_equals_the_library(client, library):
    text, tokens, _ = lib_run(library, PROMPT, temperature=0)
    assert server_text(client, temperature=0) == text
    assert len(set(tokens)) < len(tokens) // 2  # greedy repeats itself: penalties will show


@pytest.mark.parametrize("penalty", [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"repetition_penalty": 2.0},
    {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.3},
], ids=["presence", "frequency", "repetition", "all"])
def test_penalties_change_greedy_text_as_the_library_does(client, library, penalty):
    plain, plain_tokens, _ = lib_run(library, PROMPT, temperature=0)
    ref, tokens, _ = lib_run(library, PROMPT, temperature=0, **penalty)
    assert ref != plain
    assert len(set(tokens)) > len(set(plain_tokens))  # fewer repeats
    assert server_text(client, temperature=0, **penalty) == ref


def test_penalties_reach_chat_requests(client, library):
    from mlxgpt.tokenizers.transcript import chat_prompt

    model, tok = library
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids, stops = chat_prompt(tok, messages)

    def chat(**params) -> str:
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=N,
                                           temperature=0, logit_bias=NO_EOT, **params)
        return r.choices[0].message.content

    plain = lib_run(library, ids, stop=stops, temperature=0)[0].strip()
    ref = lib_run(library, ids, stop=stops, temperature=0, frequency_penalty=1.0)[0].strip()
    assert ref != plain
    assert chat() == plain
    assert chat(frequency_penalty=1.0) == ref


# --------------------------------------------------------------------------- filters and seed


def _top_k_holds(logp: mx.array, tok: int, k: int) -> bool:
    return int(mx.sum(logp > logp[tok]).item()) < k  # fewer than k tokens are more likely


def _top_p_holds(logp: mx.array, tok: int, p: float) -> bool:
    # (temperature 1) the mass strictly more likely than the token is below p
    probs = mx.exp(logp)
    return mx.sum(mx.where(logp > logp[tok], probs, 0.0)).item() < p + 1e-5


def _min_p_holds(logp: mx.array, tok: int, min_p: float) -> bool:
    # (temperature 1) p(tok) >= min_p * p(most likely)
    return logp[tok].item() >= mx.max(logp).item() + math.log(min_p) - 1e-5


@pytest.mark.parametrize("param, value, holds", [
    ("top_k", 3, _top_k_holds),
    ("top_p", 0.3, _top_p_holds),
    ("min_p", 0.5, _min_p_holds),
])
def test_filters_change_sampled_text_as_the_library_does(client, library, param, value, holds):
    model, tok = library
    sampled = {"temperature": 1.0, "seed": 3}
    unfiltered = server_text(client, **sampled)
    assert unfiltered == lib_run(library, PROMPT, **sampled)[0]
    ref, tokens, _ = lib_run(library, PROMPT, **sampled, **{param: value})
    got = server_text(client, **sampled, **{param: value})
    assert got == ref and got != unfiltered
    # each drawn token obeys the filter, checked on the model's own distribution (unfiltered,
    # some would not: 24 draws at temperature 1 from 50257 tokens)
    logp = model_log_probs(model, tok.encode(PROMPT), tokens, NO_EOT_IDS)
    assert all(holds(logp[i], t, value) for i, t in enumerate(tokens))


def test_seed_makes_the_library_draws(client, library):
    a = server_text(client, temperature=1.0, seed=5)
    assert a == lib_run(library, PROMPT, temperature=1.0, seed=5)[0]
    assert server_text(client, temperature=1.0, seed=5) == a
    b = server_text(client, temperature=1.0, seed=6)
    assert b == lib_run(library, PROMPT, temperature=1.0, seed=6)[0] and b != a


# --------------------------------------------------------------------------- logit_bias


def test_logit_bias_bans_a_token_of_the_greedy_output(client, library):
    model, tok = library
    _, tokens, _ = lib_run(library, PROMPT, temperature=0)
    banned = max(set(tokens), key=tokens.count)  # the token greedy decoding repeats most
    bias = {**NO_EOT_IDS, banned: -100.0}
    ref, ref_tokens, _ = lib_run(library, PROMPT, temperature=0, logit_bias=bias)
    assert banned not in ref_tokens
    got = server_text(client, temperature=0, logit_bias={**NO_EOT, str(banned): -100})
    assert got == ref
    assert tok.decode([banned]) not in got


def test_logit_bias_forces_a_token(client, library):
    _, tok = library
    forced = tok.encode(" sea")
    assert len(forced) == 1
    r = complete(client, max_tokens=6, temperature=1.0, seed=0,
                 logit_bias={str(forced[0]): 100})
    assert r.choices[0].text == " sea" * 6
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


# --------------------------------------------------------------------------- finish reasons


def test_max_tokens_ends_with_length(client, library):
    ref = lib_run(library, PROMPT, max_tokens=7, temperature=0)[0]
    r = complete(client, max_tokens=7, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref, "length")
    assert r.usage.completion_tokens == 7
    chunks = list(complete(client, max_tokens=7, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("key", ["max_completion_tokens", "max_tokens"])
def test_chat_token_limit_ends_with_length(client, library, key):
    from mlxgpt.tokenizers.transcript import chat_prompt

    messages = [{"role": "user", "content": "Hi"}]
    ids, stops = chat_prompt(library[1], messages)
    ref, _, reason = lib_run(library, ids, max_tokens=5, stop=stops, temperature=0)
    assert reason == "length"  # the limit, not a stop string, ends it
    r = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                       logit_bias=NO_EOT, **{key: 5})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].message.content == ref.strip()


def test_end_of_text_ends_with_stop(client):
    r = complete(client, max_tokens=10, temperature=0, logit_bias={str(EOT): 100})
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop")
    assert r.usage.completion_tokens == 1


def _stop_from(text: str, tok, tokens: list[int]) -> str:
    """A stop string taken from the middle of the greedy output: two tokens' text, not at the
    start, ASCII (so it is plain text however the output is cut)."""
    for k in range(len(tokens) // 3, len(tokens) - 2):
        s = tok.decode(tokens[k:k + 2]).strip()
        if len(s) >= 3 and s.isascii() and text.find(s) > 0:
            return s
    raise AssertionError(f"no stop string found in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_from_the_greedy_output_cuts_it(client, library, stream):
    text, tokens, _ = lib_run(library, PROMPT, temperature=0, frequency_penalty=0.5)
    stop = _stop_from(text, library[1], tokens)
    expect = text[:text.find(stop)]
    assert server_text(client, temperature=0, frequency_penalty=0.5) == text  # uncut
    params = dict(temperature=0, frequency_penalty=0.5, stop=["zzzz", stop])
    if stream:
        chunks = list(complete(client, stream=True, **params))
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = complete(client, **params).choices[0]
        got, finish = choice.text, choice.finish_reason
    assert (got, finish) == (expect, "stop")


def test_chat_stop_string_from_the_greedy_reply_cuts_it(client, library):
    from mlxgpt.tokenizers.transcript import chat_prompt

    messages = [{"role": "user", "content": "Tell me a story."}]
    ids, stops = chat_prompt(library[1], messages)
    text, tokens, _ = lib_run(library, ids, stop=stops, temperature=0, frequency_penalty=0.5)
    reply = text.strip()
    stop = _stop_from(reply, library[1], tokens)

    def chat(**params):
        return client.chat.completions.create(
            model="m", messages=messages, max_tokens=N, temperature=0, frequency_penalty=0.5,
            logit_bias=NO_EOT, **params).choices[0]

    assert chat().message.content == reply
    cut = chat(stop=stop)
    assert (cut.message.content, cut.finish_reason) == (reply[:reply.find(stop)].rstrip(),
                                                        "stop")


# --------------------------------------------------------------------------- prefix reuse


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_shared_prefix_is_reused_and_gives_a_fresh_runs_text(folder, client, library):
    _, tok = library
    head = "Zanzibar harbour at dawn: the fishing boats come in, the gulls circle, " * 3
    first, second = head + "and the market opens.", head + "and the rain begins."
    shared = _shared(tok.encode(first), tok.encode(second))
    assert shared >= 40
    # a fresh run of `second` (the module's server has seen nothing starting like it)
    fresh = complete(client, prompt=second, temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    with running_server(folder) as (base, _):
        import openai

        other = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        a = complete(other, prompt=first, temperature=0)
        assert a.usage.prompt_tokens_details.cached_tokens == 0
        b = complete(other, prompt=second, temperature=0)
        assert b.usage.prompt_tokens_details.cached_tokens == shared
        assert b.usage.prompt_tokens == len(tok.encode(second))
        assert b.choices[0].text == fresh.choices[0].text
        assert b.choices[0].text == lib_run(library, second, temperature=0)[0]
        # chat requests sharing a system message reuse it too (the transcript starts with
        # the system text: the first reuses what it shares with the completions above)
        from mlxgpt.tokenizers.transcript import chat_prompt

        chats = [[{"role": "system", "content": head}, {"role": "user", "content": q}]
                 for q in ("Who are you?", "Where is it?")]
        ids = [chat_prompt(tok, m)[0] for m in chats]
        c1, c2 = (other.chat.completions.create(model="m", messages=m, max_tokens=4,
                                                temperature=0) for m in chats)
        before = max(_shared(ids[0], tok.encode(p)) for p in (first, second))
        assert c1.usage.prompt_tokens_details.cached_tokens == before
        assert c2.usage.prompt_tokens_details.cached_tokens == _shared(*ids) > before


# --------------------------------------------------------------------------- logprobs


def test_completion_logprobs_are_the_model_log_softmax(client, library):
    model, tok = library
    prompt = tok.encode(PROMPT)
    _, tokens, _ = lib_run(library, prompt, max_tokens=8, temperature=0)
    lp = complete(client, prompt=prompt, max_tokens=8, temperature=0,
                  logprobs=5).choices[0].logprobs
    logp = model_log_probs(model, prompt, tokens)
    assert lp.tokens == [tok.decode([t]) for t in tokens]
    for i, t in enumerate(tokens):
        assert lp.token_logprobs[i] == pytest.approx(logp[i, t].item(), abs=LOGPROB_TOL)
        top = mx.argsort(-logp[i])[:5].tolist()
        expect = {tok.decode([j]): logp[i, j].item() for j in top}  # as the server's dict
        assert lp.top_logprobs[i].keys() == expect.keys()
        for s, value in expect.items():
            assert lp.top_logprobs[i][s] == pytest.approx(value, abs=LOGPROB_TOL)


def test_chat_logprobs_are_the_model_log_softmax_even_when_sampling(client, library):
    from mlxgpt.tokenizers.transcript import chat_prompt

    model, tok = library
    messages = [{"role": "user", "content": "Hi"}]
    ids, stops = chat_prompt(tok, messages)
    # sampled (and biased, penalised): the log-probabilities are still the model's own
    params = dict(temperature=1.0, seed=2, frequency_penalty=0.5)
    _, tokens, _ = lib_run(library, ids, max_tokens=6, stop=stops, **params)
    content = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3,
        logit_bias=NO_EOT, **params).choices[0].logprobs.content
    assert len(content) == len(tokens) > 0
    logp = model_log_probs(model, ids, tokens)
    for i, (entry, t) in enumerate(zip(content, tokens, strict=True)):
        assert entry.token == tok.decode([t])
        assert entry.logprob == pytest.approx(logp[i, t].item(), abs=LOGPROB_TOL)
        top = mx.argsort(-logp[i])[:3].tolist()
        assert [e.token for e in entry.top_logprobs] == [tok.decode([j]) for j in top]
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(
            [logp[i, j].item() for j in top], abs=LOGPROB_TOL)
