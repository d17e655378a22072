"""Speculative decoding for batched rows (what ``mlxgpt serve --draft-model`` runs): greedy rows
give plain batched decoding's tokens, sampled rows the model's distribution, and every row's
options (penalties, log-probabilities, stop strings, budgets, the context policies) hold."""

from __future__ import annotations

import json

import httpx
import mlx.core as mx
import numpy as np
import pytest
from test_speculative import (
    V,
    chi2_critical,
    chi_square,
    exact_distribution,
    perturbed,
    scaled,
)

from mlxgpt.errors import MlxgptError
from mlxgpt.generation.batch import BatchGenerator, SequenceRequest, TokenEvent
from mlxgpt.generation.batch_speculative import SpeculativeBatchGenerator
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers import IdTokenizer, byte_tokenizer

GREEDY = SamplingSettings(temperature=0)
PROMPTS = ["Hello there, friend", "a", "The quick brown fox jumps over the lazy dog. ", "xyz" * 5,
           "Once", "To be, or"]


@pytest.fixture(scope="module")
def pair(tiny_model):
    """(model, a good draft, a poor draft, the model itself): byte vocabulary, 64 positions."""
    main = scaled(tiny_model(0), 6.0)
    good = perturbed(tiny_model(0), main, 0.1, seed=3)
    poor = scaled(tiny_model(1, n_layer=1), 6.0)
    return main, good, poor


def run(gen: BatchGenerator, requests: list[SequenceRequest]) -> list[list[TokenEvent]]:
    """Every request's events; requests join as rows free up."""
    waiting = list(enumerate(requests))[::-1]
    index: dict[int, int] = {}
    out: list[list[TokenEvent]] = [[] for _ in requests]
    while waiting or gen.active:
        while waiting and not gen.full:
            i, r = waiting.pop()
            index[gen.add(r)] = i
        for e in gen.step():
            out[index[e.uid]].append(e)
    return out


def requests(**kw) -> list[SequenceRequest]:
    tok = byte_tokenizer()
    return [SequenceRequest(tok.encode(p), **kw) for p in PROMPTS]


def tokens(events: list[TokenEvent]) -> list[int | None]:
    return [e.token for e in events]


@pytest.mark.parametrize("context", ["slide", "stop"])
def test_greedy_rows_are_plain_batched_decodings_token_for_token(pair, context):
    """80 tokens pass the 64-position context (the window slides or the row ends); 6 prompts
    in 3 rows join as others leave; k = 3 drafts, some rows' budgets and room cut them."""
    main, good, poor = pair
    tok = byte_tokenizer()
    kw = dict(max_tokens=80, sampling=GREEDY, stop_at_eos=False, context=context)
    plain = run(BatchGenerator(main, tok, max_batch=3), requests(**kw))
    for draft in (good, poor, main):
        gen = SpeculativeBatchGenerator(main, tok, draft, draft_tokens=3, max_batch=3)
        got = run(gen, requests(**kw))
        assert [tokens(e) for e in got] == [tokens(e) for e in plain]
        assert ["".join(x.text for x in e) for e in got] == \
            ["".join(x.text for x in e) for e in plain]
        assert [e[-1].finish_reason for e in got] == [e[-1].finish_reason for e in plain]
        s = gen.stats
        assert s.proposed > 0 and 0 <= s.accepted <= s.proposed
        assert s.accepted > 0 or draft is poor  # (a random draft may never be right)
        assert sum(e[-1].accepted_tokens for e in got) == s.accepted
        assert sum(e[-1].drafted_tokens for e in got) == s.proposed
        if draft is main:  # the model as its own draft: every draft accepted
            assert s.accepted == s.proposed
            assert s.rounds < sum(len(e) for e in got) / 2  # several tokens a step


def test_penalties_logprobs_stops_and_budgets_per_row(pair):
    """Rows with different options in one batch: each equals its plain batched decoding
    (log-probabilities to float rounding, the top ones the same ids)."""
    main, good, _ = pair
    tok = byte_tokenizer()
    settings = [GREEDY, SamplingSettings(temperature=0, repetition_penalty=1.3,
                                         penalty_window=8),
                SamplingSettings(temperature=0, presence_penalty=0.8, frequency_penalty=0.3,
                                 logit_bias={101: 2.0})]
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append(SequenceRequest(tok.encode(p), max_tokens=5 + 9 * i,
                                    sampling=settings[i % 3], stop_at_eos=False,
                                    logprobs=[None, 0, 3][i % 3], stop=["ee"] if i == 2 else ()))
    plain = run(BatchGenerator(main, tok), reqs)
    gen = SpeculativeBatchGenerator(main, tok, good, draft_tokens=4)
    got = run(gen, reqs)
    assert gen.stats.accepted > 0
    for a, b in zip(got, plain, strict=True):
        assert tokens(a) == tokens(b)
        assert [e.finish_reason for e in a] == [e.finish_reason for e in b]
        for x, y in zip(a, b, strict=True):
            assert (x.logprob is None) == (y.logprob is None)
            if x.logprob is not None:
                assert x.logprob == pytest.approx(y.logprob, abs=1e-3)
            assert (x.top_logprobs is None) == (y.top_logprobs is None)
            if x.top_logprobs is not None:
                assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]


def test_sampled_rows_follow_the_models_distribution(tiny_model):
    """1000 rows of 4 tokens (16 at a time, 2 drafts a round): the joints of tokens (2, 3) and
    (3, 4) pass a chi-square test against the model's exact distribution, which the draft's
    own distribution fails by far."""
    settings = SamplingSettings(temperature=1.0)
    main = scaled(tiny_model(0, vocab_size=V, n_positions=16), 4.0)
    draft = perturbed(tiny_model(0, vocab_size=V, n_positions=16), main, 0.2, seed=5)
    prompt = [1, 4, 2]
    exact = exact_distribution(main, prompt, settings, 4)
    drafty = exact_distribution(draft, prompt, settings, 4)
    mx.random.seed(0)
    n_draws = 1000
    gen = SpeculativeBatchGenerator(main, IdTokenizer(V), draft, draft_tokens=2, max_batch=16)
    got = run(gen, [SequenceRequest(prompt, max_tokens=4, sampling=settings, stop_at_eos=False)
                    for _ in range(n_draws)])
    counts = np.zeros([V] * 4)
    for events in got:
        counts[tuple(tokens(events))] += 1
    assert 0.2 < gen.stats.accepted / gen.stats.proposed < 0.95
    assert counts.sum() == n_draws
    for axes in ((0, 3), (0, 1)):
        p, q, c = (a.sum(axis=axes) for a in (exact, drafty, counts))
        stat, dof = chi_square(c, p)
        assert dof >= 10
        assert stat < chi2_critical(dof), (axes, stat, dof)
        assert chi_square(q * n_draws, p)[0] > 10 * chi2_critical(dof)


def test_refusals(pair, tiny_model):
    main, good, _ = pair
    tok = byte_tokenizer()
    with pytest.raises(MlxgptError, match="context .* is shorter"):
        SpeculativeBatchGenerator(main, tok, tiny_model(1, n_layer=1, n_positions=32))
    with pytest.raises(MlxgptError, match="share the model's tokenizer"):
        SpeculativeBatchGenerator(main, tok, tiny_model(1, vocab_size=300))
    with pytest.raises(MlxgptError, match="at least 1"):
        SpeculativeBatchGenerator(main, tok, good, draft_tokens=0)


# --------------------------------------------------------------------------- the server


def test_serve_with_a_draft_model_writes_the_same_greedy_text(tmp_path, model_folder, cli,
                                                              refused):
    """``mlxgpt serve --draft-model``: greedy completions (plain, and as JSON) equal those of
    a server without the draft; usage and /health report the draft's accepted tokens (the
    model as its own draft: all of them)."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from test_serve import running_server

    folder = model_folder(tmp_path, tokenizer="gpt2", n_positions=128)
    short = model_folder(tmp_path, tokenizer="gpt2", n_positions=64, name="short")
    bodies = [{"model": "m", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0},
              {"model": "m", "prompt": "The sea", "n": 2, "max_tokens": 30,
               "temperature": 0, "logprobs": 2},
              {"model": "m", "messages": [{"role": "user", "content": "A person, as JSON:"}],
               "max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}}]

    def answers(*args: str) -> tuple[list[dict], dict]:
        with running_server(folder, *args) as (base, _):
            out = []
            for body in bodies:
                path = "chat/completions" if "messages" in body else "completions"
                r = httpx.post(f"{base}/v1/{path}", json=body, timeout=120)
                assert r.status_code == 200, r.text
                out.append(r.json())
            return out, httpx.get(f"{base}/health", timeout=10).json()

    def text(choice: dict) -> str:
        return choice["message"]["content"] if "message" in choice else choice["text"]

    plain, health = answers()
    assert isinstance(json.loads(text(plain[2]["choices"][0])), dict)
    drafted, drafted_health = answers("--draft-model", str(folder), "--draft-tokens", "3")
    assert "draft" not in health
    for a, b in zip(drafted, plain, strict=True):
        assert [text(c) for c in a["choices"]] == [text(c) for c in b["choices"]]
        assert [c["finish_reason"] for c in a["choices"]] == \
            [c["finish_reason"] for c in b["choices"]]
        details = a["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 0
        assert details["rejected_prediction_tokens"] == 0
        assert "completion_tokens_details" not in b["usage"]
    a, b = drafted[1]["choices"][0]["logprobs"], plain[1]["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"]
    assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-3)
    stats = drafted_health["draft"]
    assert stats["draft_tokens"] == 3 and stats["accepted"] == stats["proposed"] > 0
    refused(cli("serve", "--model", folder, "--draft-model", short), "is shorter than")
