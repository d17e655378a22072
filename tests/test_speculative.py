"""Speculative decoding: the model's own greedy text token for token, its own distribution when
sampling (a chi-square test on a small vocabulary), caches rolled back, refusals, CLI and chat."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlxgpt.checkpoints.folder import save_model
from mlxgpt.errors import MlxgptError
from mlxgpt.generation import draft_length as dl
from mlxgpt.generation import speculative as spec_mod
from mlxgpt.generation.chat import ChatSession, ChatSettings
from mlxgpt.generation.context import Context
from mlxgpt.generation.generate import stream_generate
from mlxgpt.generation.sample import SamplingSettings, TokenSampler
from mlxgpt.generation.speculative import DraftStats, speculative_tokens
from mlxgpt.tokenizers import IdTokenizer, byte_tokenizer

GREEDY = SamplingSettings(temperature=0)
PROMPTS = ["Hello there, friend", "a", "The quick brown fox jumps over the lazy dog. "]


def scaled(model, factor: float):
    """Larger weights: greedy decoding wanders instead of repeating one token."""
    model.update(tree_map(lambda a: a * factor if a.ndim == 2 else a, model.parameters()))
    mx.eval(model.parameters())
    return model


def perturbed(model, like, noise: float, seed: int):
    """``model`` with ``like``'s weights plus relative noise: a draft that is often right."""
    mx.random.seed(seed)
    model.update(tree_map(lambda a: a * (1 + noise * mx.random.normal(a.shape)), like.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def pair(tiny_model):
    """(model, a good draft, a poor draft): byte vocabulary, 64 positions."""
    main = scaled(tiny_model(0), 6.0)
    good = perturbed(tiny_model(0), main, 0.1, seed=3)
    poor = scaled(tiny_model(1, n_layer=1, n_positions=24), 6.0)
    return main, good, poor


def run(model, prompt, **kw):
    rs = list(stream_generate(model, byte_tokenizer(), prompt, stop_at_eos=False, **kw))
    return [r.token for r in rs[:-1]], rs[-1]


# --------------------------------------------------------------------------- greedy


def test_one_forward_gives_every_positions_logits(pair):
    """Context.extend over T tokens: the logits of reading them one by one (float32 rounding)."""
    main = pair[0]
    ids = list(b"verify these")
    one_by_one, at_once = Context(main), Context(main)
    one_by_one.prefill(ids[:4])
    at_once.prefill(ids[:4])
    steps = [one_by_one.step(mx.array([t], mx.int32))[0] for t in ids[4:]]
    every = at_once.extend(mx.array([ids[4:]], mx.int32))[0]  # (T, V)
    np.testing.assert_allclose(np.array(every), np.array(mx.stack(steps)), atol=1e-4, rtol=1e-4)
    assert at_once.tokens == one_by_one.tokens == ids


@pytest.mark.parametrize("context", ["slide", "stop"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_is_the_models_own_token_for_token(pair, context, k):
    main, good, poor = pair
    for prompt in PROMPTS:
        want, plain = run(main, prompt, max_tokens=110, sampling=GREEDY, context=context)
        for draft in (good, poor):  # the poor one has a 24-position context: it slides too
            got, r = run(main, prompt, max_tokens=110, sampling=GREEDY, context=context,
                         draft_model=draft, draft_tokens=k)
            assert got == want, (prompt, k, context)
            assert r.finish_reason == plain.finish_reason
            assert r.drafted_tokens > 0 and 0 <= r.accepted_tokens <= r.drafted_tokens
    # past the 64-position context: the slide (or the stop) happened at the same token
    assert len(want) == (110 if context == "slide" else 64 + 1 - len(PROMPTS[-1]))


def test_greedy_with_penalties_and_bias_and_logprobs(pair):
    main, good, _ = pair
    s = SamplingSettings(temperature=0, repetition_penalty=1.5, frequency_penalty=0.3,
                         penalty_window=16, logit_bias={101: 2.0})
    want, _ = run(main, "penalties", max_tokens=80, sampling=s, logprobs=True)
    got, r = run(main, "penalties", max_tokens=80, sampling=s, draft_model=good, draft_tokens=4)
    assert got == want and r.accepted_tokens > 0
    lp_want = [x.logprob for x in stream_generate(main, byte_tokenizer(), "x", max_tokens=40,
                                                  sampling=GREEDY, logprobs=True)][:-1]
    lp_got = [x.logprob for x in stream_generate(main, byte_tokenizer(), "x", max_tokens=40,
                                                 sampling=GREEDY, logprobs=True,
                                                 draft_model=good)][:-1]
    np.testing.assert_allclose(lp_got, lp_want, atol=1e-4)


def test_a_draft_that_is_the_model_is_always_accepted(pair):
    main = pair[0]
    _, r = run(main, "self", max_tokens=60, sampling=GREEDY, draft_model=main, draft_tokens=4)
    assert r.drafted_tokens >= 4 * 10 and r.accepted_tokens == r.drafted_tokens


def test_rejected_tokens_are_rolled_back_in_both_caches(pair):
    main, _, poor = pair
    ctx, dctx = Context(main), Context(poor)
    prompt = list(b"roll back")
    stats = DraftStats()
    out = [t for t, _ in speculative_tokens(ctx, dctx, prompt, TokenSampler(GREEDY, 257),
                                            draft_tokens=5, max_tokens=40, keep=32,
                                            stats=stats)]
    assert stats.accepted < stats.proposed  # something was rejected
    seq = prompt + out
    assert ctx.tokens == seq[:-1]  # everything but the last token, nothing rejected
    fresh = Context(main)
    fresh.prefill(seq[:-1])
    for (k, v), (fk, fv) in zip(ctx.kv(), fresh.kv(), strict=True):
        np.testing.assert_allclose(np.array(k), np.array(fk), atol=1e-4)
        np.testing.assert_allclose(np.array(v), np.array(fv), atol=1e-4)
    d = dctx.tokens  # the draft holds a stretch of seq (its own 24-position window)
    assert len(d) > 0 and any(seq[s : s + len(d)] == d for s in range(len(seq)))


def test_chat_replies_are_the_same_with_a_draft(pair):
    main, good, _ = pair
    settings = ChatSettings(max_tokens=30, sampling=GREEDY)
    plain = ChatSession(main, byte_tokenizer(), settings)
    drafted = ChatSession(main, byte_tokenizer(), settings, draft_model=good, draft_tokens=3)
    for turn in ("hi", "how are you?", "bye"):
        assert "".join(drafted.reply(turn)) == "".join(plain.reply(turn))
    assert drafted.last.accepted_tokens > 0


# --------------------------------------------------------------------------- sampling


V = 6  # a vocabulary small enough to enumerate every continuation


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.001 (z = 3.09), Wilson-Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def exact_distribution(model, prompt, settings, n):
    """P(t1..tn | prompt) under ``model`` with ``settings``, as an array (V,)*n."""
    sampler = TokenSampler(settings, V)
    heads = [list(h) for h in itertools.product(range(V), repeat=n - 1)]
    logits = model(mx.array([prompt + h for h in heads]))  # (V**(n-1), L + n - 1, V)
    L = len(prompt)
    probs = mx.softmax(sampler.process(logits[:, L - 1 :].reshape(-1, V)), axis=-1)
    probs = np.array(probs.reshape(len(heads), n, V))
    p = np.zeros([V] * n)
    for b, h in enumerate(heads):
        lead = np.prod([probs[b, j, h[j]] for j in range(n - 1)])
        p[tuple(h)] = lead * probs[b, n - 1]
    return p


def chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < 5 pooled; (statistic, dof)."""
    expected = p.ravel() * counts.sum()
    counts = counts.ravel()
    small = expected < 5
    e = np.append(expected[~small], expected[small].sum())
    c = np.append(counts[~small], counts[small].sum())
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum() - 1)


@pytest.mark.parametrize("settings, n_draws", [
    (SamplingSettings(temperature=1.0, seed=0), 1000),
    pytest.param(SamplingSettings(temperature=1.5, top_p=0.9, seed=1), 2000,
                 marks=pytest.mark.slow),
])
def test_sampled_tokens_follow_the_models_distribution(tiny_model, settings, n_draws):
    """n draws of 4 tokens with 2 drafts per round: the joints of tokens (2, 3) and (3, 4) (the
    accept, resample and bonus paths) pass a chi-square test at p = 0.001 against the model's
    exact distribution, which the draft's own distribution fails by far (the test has power),
    and are within a total-variation distance of it that n draws reach (~0.05 at 1000)."""
    main = scaled(tiny_model(0, vocab_size=V, n_positions=16), 4.0)
    draft = perturbed(tiny_model(0, vocab_size=V, n_positions=16), main, 0.2, seed=5)
    prompt = [1, 4, 2]
    exact = exact_distribution(main, prompt, settings, 4)
    drafty = exact_distribution(draft, prompt, settings, 4)
    ctx, dctx = Context(main), Context(draft)
    sampler = TokenSampler(settings, V)
    stats = DraftStats()
    counts = np.zeros([V] * 4)
    for _ in range(n_draws):
        toks = [t for t, _ in speculative_tokens(ctx, dctx, prompt, sampler, draft_tokens=2,
                                                 max_tokens=4, keep=8, stats=stats)]
        counts[tuple(toks)] += 1
    assert 0.2 < stats.accepted / stats.proposed < 0.95  # every path is taken, often
    assert counts[exact == 0].sum() == 0  # nothing the filters rule out
    for axes in ((0, 3), (0, 1)):  # keep tokens (2, 3), then (3, 4)
        p, q, c = (a.sum(axis=axes) for a in (exact, drafty, counts))
        stat, dof = chi_square(c, p)
        assert dof >= 10  # enough cells to say something
        assert stat < chi2_critical(dof), (axes, stat, dof)
        assert chi_square(q * n_draws, p)[0] > 10 * chi2_critical(dof)  # the draft alone fails
        # total variation: E ~ sum sqrt(p (1 - p) / (2 pi n)) over the cells (0.03-0.05 here)
        tv = 0.5 * np.abs(c / n_draws - p).sum()
        assert tv < 2.5 * np.sqrt(p * (1 - p) / (2 * np.pi * n_draws)).sum(), tv


# --------------------------------------------------------------------------- refusals, CLI


def test_a_draft_with_another_vocabulary_is_refused(pair, tiny_model):
    other = tiny_model(2, vocab_size=300)
    with pytest.raises(MlxgptError, match="share the model's tokenizer"):
        run(pair[0], "x", max_tokens=5, draft_model=other)
    with pytest.raises(MlxgptError, match="draft_tokens must be at least 1"):
        run(pair[0], "x", max_tokens=5, draft_model=pair[1], draft_tokens=0)


def test_cli_generate_with_a_draft_matches_without(tmp_path, model_folder, tiny_model, cli_ok,
                                                   cli, refused):
    main = model_folder(tmp_path, seed=0)
    draft = model_folder(tmp_path, seed=1, n_layer=1)
    args = ["generate", "--model", main, "--prompt", "Once", "-n", "40", "--temp", "0",
            "--ignore-eos"]
    plain = cli_ok(*args, "--quiet")
    drafted = cli_ok(*args, "--draft-model", draft, "--draft-tokens", "3")
    assert drafted.stdout == plain.stdout
    assert "draft: " in drafted.stderr and "accepted" in drafted.stderr
    gpt2_draft = model_folder(tmp_path, tokenizer="gpt2", n_layer=1)
    refused(cli(*args, "--draft-model", gpt2_draft), "share the model's tokenizer")
    ids_draft = save_model(tiny_model(1, n_layer=1), tmp_path / "ids", IdTokenizer(257))
    refused(cli(*args, "--draft-model", ids_draft), "tokenizer is not the model's")
    refused(cli(*args, "--draft-model", draft, "--draft-tokens", "0"), "--draft-tokens")
    refused(cli("chat", "--model", main, "--draft-model", gpt2_draft, input="hi\n"),
            "share the model's tokenizer")


# --------------------------------------------------------------------------- draft_tokens="auto"


def test_auto_drafts_while_the_rounds_pay():
    # prior: 1 + .7 + .49 + .343 + .2401 = 2.77 tokens a round of 4
    assert dl.expected_tokens([], 4) == pytest.approx(2.7731)
    assert dl.drafting_pays(dl.DraftCosts(plain=1.0, round=2.5), [], 4)
    assert not dl.drafting_pays(dl.DraftCosts(plain=1.0, round=3.0), [], 4)
    # what the rounds gave soon outweighs the prior: 8 rounds of 5 tokens -> ~4.6 a round
    assert dl.expected_tokens([5] * 8, 4) == pytest.approx((40 + 2 * 2.7731) / 10, rel=1e-4)
    assert dl.drafting_pays(dl.DraftCosts(plain=1.0, round=3.0), [5] * 8, 4)
    assert not dl.drafting_pays(dl.DraftCosts(plain=1.0, round=2.5), [1] * 8, 4)  # all rejected


@pytest.mark.parametrize("round_s, drafts", [(100.0, False), (1e-3, True)])
def test_auto_output_is_the_models_own_drafted_or_not(pair, monkeypatch, round_s, drafts):
    main, good, _ = pair
    monkeypatch.setattr(spec_mod, "costs_for",
                        lambda *a: dl.DraftCosts(plain=1.0, round=round_s))
    plain, _ = run(main, PROMPTS[2], max_tokens=50, sampling=GREEDY)
    got, r = run(main, PROMPTS[2], max_tokens=50, sampling=GREEDY, draft_model=good,
                 draft_tokens="auto")
    assert got == plain
    assert (r.drafted_tokens > 0) == drafts
    assert (r.undrafted_tokens == 0) == drafts  # never drafting: all but the first without it
    assert drafts or r.undrafted_tokens == 49
    sampled = SamplingSettings(temperature=1.0, seed=5)
    a, _ = run(main, PROMPTS[0], max_tokens=30, sampling=sampled, draft_model=good,
               draft_tokens="auto")
    b, _ = run(main, PROMPTS[0], max_tokens=30, sampling=sampled, draft_model=good,
               draft_tokens="auto")
    assert a == b  # the same seed, the same text


def test_timing_a_round_leaves_the_generation_as_it_was(pair):
    main, good, _ = pair
    prompt = list(b"undo me")

    def generate(trials):
        ctx, dctx = Context(main), Context(good)
        sampler = TokenSampler(SamplingSettings(temperature=1.0, seed=2), 257)
        spec = spec_mod.Speculator(ctx, dctx, sampler, keep=32, slide=True, logprobs=False,
                                   stats=DraftStats())
        out = [spec.start(prompt)[0]]
        for k in trials:
            before = (list(spec.seq), ctx.tokens, spec.stats.rounds)
            made = spec.trial(k)
            assert made == spec_mod.PLAIN_TRIAL if k == 0 else 1 <= made <= k + 1
            assert (list(spec.seq), ctx.tokens, spec.stats.rounds) == before
        for _ in range(6):
            out += [t for t, _ in spec.round(3)]
        return out

    assert generate([0, 2, 4, 0]) == generate([])


def test_measured_costs_are_kept_per_model_pair(pair, tmp_path, monkeypatch):
    main, good, poor = pair
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path))
    calls = []

    def trial(k):
        calls.append(k)
        return 4 if k == 0 else 1

    first = dl.costs_for(main, good, trial, 4, True)
    assert sorted(set(calls)) == [0, 4] and first.plain > 0 and first.round > 0
    n = len(calls)
    assert dl.costs_for(main, good, trial, 4, True) == first and len(calls) == n  # read back
    dl.costs_for(main, poor, trial, 4, True)  # another pair: measured again
    dl.costs_for(main, good, trial, 4, False)  # sampling: measured apart
    assert len(calls) == 3 * n
    (tmp_path / dl.COSTS_FILE).write_text("not json")  # a damaged file is measured over
    assert dl.costs_for(main, good, trial, 4, True).plain > 0 and len(calls) == 4 * n


def test_cli_takes_auto_and_refuses_other_words(tmp_path, model_folder, cli_ok, cli, refused):
    main = model_folder(tmp_path, seed=0)
    draft = model_folder(tmp_path, seed=1, n_layer=1)
    args = ["generate", "--model", main, "--prompt", "Once", "-n", "30", "--temp", "0",
            "--ignore-eos"]
    plain = cli_ok(*args, "--quiet")
    assert cli_ok(*args, "--quiet", "--draft-model", draft, "--draft-tokens", "auto").stdout \
        == plain.stdout
    refused(cli(*args, "--draft-model", draft, "--draft-tokens", "many"),
            "--draft-tokens must be a whole number or 'auto'")


def test_auto_pausing_after_the_window_slid_keeps_the_models_text(pair, monkeypatch):
    main, good, _ = pair  # 64 positions: 150 tokens slide the window several times
    monkeypatch.setattr(spec_mod, "costs_for", lambda *a: dl.DraftCosts(plain=1.0, round=1.0))
    # penalties look back 60 tokens, more than the 4 kept when the window slides
    settings = SamplingSettings(temperature=0, repetition_penalty=3.0, penalty_window=60)
    for kw in ({"sampling": GREEDY}, {"sampling": settings, "window_keep": 4}):
        plain, _ = run(main, PROMPTS[2], max_tokens=150, context="slide", **kw)
        for pays in range(4, 40, 3):  # rounds that pay; then pauses, tried again, pauses...
            calls = iter(range(10**6))
            monkeypatch.setattr(spec_mod, "drafting_pays",
                                lambda *a, calls=calls, pays=pays: (next(calls) + 1) % pays != 0)
            got, r = run(main, PROMPTS[2], max_tokens=150, context="slide", draft_model=good,
                         draft_tokens="auto", **kw)
            assert r.undrafted_tokens >= spec_mod.PAUSE and r.drafted_tokens > 0
            assert got == plain, (kw, pays)


def test_auto_pauses_then_tries_the_draft_again(pair, monkeypatch):
    main, good, _ = pair
    seen = []

    def pays(costs, made, k):
        seen.append(list(made))
        return len(seen) != 3  # the third check says no

    monkeypatch.setattr(spec_mod, "costs_for", lambda *a: dl.DraftCosts(plain=1.0, round=1.0))
    monkeypatch.setattr(spec_mod, "drafting_pays", pays)
    _, r = run(main, PROMPTS[2], max_tokens=60, sampling=GREEDY, draft_model=good,
               draft_tokens="auto")
    assert r.undrafted_tokens == spec_mod.PAUSE  # one pause, then drafting again
    assert seen[0] == [] and len(seen[2]) == 2 and seen[3] == []  # counted afresh after it
    assert r.drafted_tokens > 8
