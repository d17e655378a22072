"""Batched generation: every sequence of a batch gets what ``generate`` gives it alone."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlxgpt
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.batch import BatchGenerator, SequenceRequest, batch_generate, stream_batch
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers import byte_tokenizer

GREEDY = SamplingSettings(temperature=0)
PROMPTS = ["Hello there", "a", "The quick brown fox jumps over", "xyz" * 5, "Once", "To be, or"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model, tok):
    return tiny_model(vocab_size=tok.vocab_size)  # 64 positions: long runs reach the limit


@pytest.mark.parametrize("context", ["slide", "stop"])
def test_greedy_batch_equals_alone(model, tok, context):
    # 80 tokens pass the 64-position context: the slide re-reads a window, stop ends early;
    # max_batch 3 < 6 prompts, so sequences join as others leave.
    alone = [mlxgpt.generate(model, tok, p, max_tokens=80, sampling=GREEDY, stop_at_eos=False,
                             context=context) for p in PROMPTS]
    batched = batch_generate(model, tok, PROMPTS, max_tokens=80, sampling=GREEDY,
                             stop_at_eos=False, context=context, max_batch=3)
    assert batched == alone
    assert all(len(t) > 0 for t in batched)


def test_window_keep_and_stop_strings(model, tok):
    kw = dict(max_tokens=90, sampling=GREEDY, stop_at_eos=False, window_keep=10)
    alone = [mlxgpt.generate(model, tok, p, **kw) for p in PROMPTS]
    assert batch_generate(model, tok, PROMPTS, max_batch=4, **kw) == alone
    # stop strings: cut at the first occurrence, and the reason is "stop"
    stop = alone[2][30:32]
    kw = dict(max_tokens=90, sampling=GREEDY, stop_at_eos=False, stop=[stop])
    ref = mlxgpt.generate(model, tok, PROMPTS[2], **kw)
    assert stop not in ref and len(ref) < 90
    events = [e for _, e in stream_batch(model, tok, [PROMPTS[2]], **kw)]
    assert "".join(e.text for e in events) == ref
    assert events[-1].finish_reason == "stop"


def test_seeded_sampling_equals_alone(model, tok):
    settings = [SamplingSettings(temperature=0.9, top_k=40, seed=s) for s in range(4)]
    alone = [mlxgpt.generate(model, tok, PROMPTS[i], max_tokens=30, sampling=s,
                             stop_at_eos=False) for i, s in enumerate(settings)]
    gen = BatchGenerator(model, tok)
    uids = [gen.add(SequenceRequest(tok.encode(PROMPTS[i]), max_tokens=30, sampling=s,
                                    stop_at_eos=False)) for i, s in enumerate(settings)]
    texts = dict.fromkeys(uids, "")
    while gen.active:
        for e in gen.step():
            texts[e.uid] += e.text
    assert [texts[u] for u in uids] == alone
    assert len(set(alone)) == 4  # different seeds, different texts: the check can fail


def test_logprobs_match_the_model(model, tok):
    ids = tok.encode("Hello")
    gen = BatchGenerator(model, tok)
    gen.add(SequenceRequest(ids, max_tokens=5, sampling=GREEDY, logprobs=3, stop_at_eos=False))
    events = []
    while gen.active:
        events += gen.step()
    seq = list(ids)
    for e in events:
        logits = model(mx.array(seq)[None])[0, -1].astype(mx.float32)
        ref = np.array(logits - mx.logsumexp(logits))
        assert e.token == int(ref.argmax())
        assert e.logprob == pytest.approx(float(ref[e.token]), abs=1e-4)
        top = np.argsort(-ref)[:3]
        assert [t for t, _ in e.top_logprobs] == top.tolist()
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(ref[top].tolist(), abs=1e-4)
        seq.append(e.token)


def test_prefix_reuse_reads_only_the_rest(model, tok):
    gen = BatchGenerator(model, tok)
    first = tok.encode("The quick brown fox jumps over")
    gen.add(SequenceRequest(first, max_tokens=8, sampling=GREEDY, stop_at_eos=False))
    out = []
    while gen.active:
        out += gen.step()
    follow = first + [e.token for e in out] + tok.encode(" and then")
    gen.add(SequenceRequest(follow, max_tokens=8, sampling=GREEDY, stop_at_eos=False))
    events = []
    while gen.active:
        events += gen.step()
    # the whole first sequence but its last token (never read) came from the store
    assert events[-1].cached_tokens == len(first) + len(out) - 1
    ref = mlxgpt.generate(model, tok, follow, max_tokens=8, sampling=GREEDY, stop_at_eos=False)
    assert "".join(e.text for e in events) == ref


def test_remove_frees_the_row_and_others_go_on(model, tok):
    gen = BatchGenerator(model, tok, max_batch=2)
    a = gen.add(SequenceRequest(tok.encode("abc"), max_tokens=20, sampling=GREEDY,
                                stop_at_eos=False))
    b = gen.add(SequenceRequest(tok.encode("xyz"), max_tokens=20, sampling=GREEDY,
                                stop_at_eos=False))
    assert gen.full
    with pytest.raises(MlxgptError, match="full"):
        gen.add(SequenceRequest(tok.encode("no"), max_tokens=3))
    text_b = "".join(e.text for e in gen.step() if e.uid == b)
    assert gen.remove(a) and not gen.remove(a)
    while gen.active:
        text_b += "".join(e.text for e in gen.step() if e.uid == b)
    ref = mlxgpt.generate(model, tok, "xyz", max_tokens=20, sampling=GREEDY, stop_at_eos=False)
    assert text_b == ref


class EvenOnly:
    """A constraint: even token ids only, complete after five tokens."""

    def __init__(self, vocab: int):
        self.mask = np.arange(vocab) % 2 == 0
        self.n = 0

    @property
    def complete(self) -> bool:
        return self.n >= 5

    def allowed(self) -> np.ndarray:
        return self.mask

    def advance(self, token: int) -> None:
        assert token % 2 == 0
        self.n += 1


def test_constraint_limits_tokens_and_ends_the_sequence(model, tok):
    gen = BatchGenerator(model, tok)
    gen.add(SequenceRequest(tok.encode("Hi"), max_tokens=50, stop_at_eos=False,
                            sampling=SamplingSettings(temperature=1.0, seed=3),
                            constraint=EvenOnly(model.config.vocab_size)))
    events = []
    while gen.active:
        events += gen.step()
    assert [e.token % 2 for e in events] == [0] * 5
    assert events[-1].finish_reason == "stop"


def test_bad_requests_refused(model, tok):
    gen = BatchGenerator(model, tok)
    with pytest.raises(MlxgptError, match="max_tokens"):
        gen.add(SequenceRequest([1, 2], max_tokens=0))
    with pytest.raises(MlxgptError, match="context policy"):
        gen.add(SequenceRequest([1, 2], context="wrap"))
    with pytest.raises(MlxgptError, match="context"):
        gen.add(SequenceRequest(list(range(100)), context="stop"))
    with pytest.raises(MlxgptError, match="max_batch"):
        BatchGenerator(model, tok, max_batch=0)
