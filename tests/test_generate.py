"""Generation: parity with transformers, streaming text, stop strings, the context limit, CLI."""

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from _hf_helpers import SMALL, random_hf_model, save_hf_checkpoint

import mlxgpt
from mlxgpt.checkpoints.folder import shipped_model
from mlxgpt.core.backend import prepare_for_inference
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.context import Context
from mlxgpt.generation.decode import StopMatcher, generate_tokens
from mlxgpt.generation.generate import generate, stream_generate
from mlxgpt.generation.sample import SamplingSettings, TokenSampler
from mlxgpt.tokenizers import byte_tokenizer, gpt2_tokenizer

GREEDY = SamplingSettings(temperature=0)
PROMPT = [5, 17, 42, 3, 99, 0, 64, 23]


def greedy(n_vocab: int) -> TokenSampler:
    return TokenSampler(GREEDY, n_vocab)


def full_forward_greedy(model, ids, n):
    """Reference decoding without any cache: the whole sequence through the model each step."""
    seq = list(ids)
    for _ in range(n):
        seq.append(mx.argmax(model(mx.array([seq]))[0, -1]).item())
    return seq[len(ids):]


# --------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    import torch

    hf = random_hf_model({**SMALL, "n_positions": 128})
    with torch.no_grad():  # larger weights: greedy decoding then wanders instead of repeating
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    folder = save_hf_checkpoint(hf, tmp_path_factory.mktemp("hf"))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    def reference(prompt, n, use_cache):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=use_cache)
        return out[0, len(prompt):].tolist()

    model, tok = mlxgpt.load(str(folder))
    return reference, model, folder


def test_greedy_matches_transformers_with_kv_cache(hf_pair):
    reference, model, _ = hf_pair
    ref = reference(PROMPT, 80, use_cache=True)
    ours = [t for t, _ in generate_tokens(Context(model), PROMPT, greedy(101), max_tokens=80)]
    assert ours == ref
    assert len(set(ref)) > 5  # a real sequence, not one token repeated


def test_greedy_matches_transformers_without_cache(hf_pair):
    reference, model, _ = hf_pair
    ref = reference(PROMPT, 70, use_cache=False)
    assert full_forward_greedy(model, PROMPT, 70) == ref


def test_greedy_matches_with_inference_layout_and_small_prefill_chunks(hf_pair):
    reference, _, folder = hf_pair
    ref = reference(PROMPT * 4, 64, use_cache=True)
    fast = prepare_for_inference(mlxgpt.load(str(folder))[0])
    ctx = Context(fast, prefill_step=5)  # the 32-token prompt is read in 7 chunks
    ours = [t for t, _ in generate_tokens(ctx, PROMPT * 4, greedy(101), max_tokens=64)]
    assert ours == ref


def test_logprobs_are_the_model_log_softmax(hf_pair):
    _, model, _ = hf_pair
    out = list(generate_tokens(Context(model), PROMPT, greedy(101), max_tokens=3, logprobs=True))
    logits = model(mx.array([PROMPT + [out[0][0], out[1][0]]]))[0, len(PROMPT) - 1 :]
    expect = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i, (tok, lp) in enumerate(out):
        assert lp == pytest.approx(expect[i, tok].item(), abs=1e-5)


# --------------------------------------------------------------------------- the KV context


def test_sync_reuses_the_common_prefix_and_matches_a_fresh_forward(tiny_model):
    model = tiny_model(vocab_size=101, n_positions=64)
    ctx = Context(model)
    a = [1, 2, 3, 4, 5, 6]
    ctx.sync(a)
    b = [1, 2, 3, 9, 8]
    logits = ctx.sync(b)
    assert ctx.tokens == b
    ref = model(mx.array([b]))[0, -1]
    np.testing.assert_allclose(np.array(logits[0]), np.array(ref), atol=1e-5)
    # Everything cached already: the last token is read again for its logits.
    again = ctx.sync(b)
    np.testing.assert_allclose(np.array(again[0]), np.array(ref), atol=1e-5)
    # Growing past one buffer step keeps the earlier keys/values.
    long = list(range(60))
    ctx.sync(long[:10])
    for t in long[10:]:
        logits = ctx.step(mx.array([t], mx.int32))
    np.testing.assert_allclose(np.array(logits[0]), np.array(model(mx.array([long]))[0, -1]),
                               atol=1e-4)


def test_context_refuses_to_overflow(tiny_model):
    model = tiny_model(vocab_size=101, n_positions=16)
    ctx = Context(model)
    with pytest.raises(MlxgptError, match="do not fit"):
        ctx.prefill(list(range(17)))
    ctx.prefill(list(range(16)))
    with pytest.raises(MlxgptError, match="context is full"):
        ctx.step(mx.array([1], mx.int32))


# --------------------------------------------------------------------------- the context limit


def sliding_reference(model, prompt, n, keep):
    """Greedy decoding with the documented window policy, each step a full forward pass."""
    n_pos = model.config.n_positions
    window = list(prompt) if len(prompt) <= n_pos else list(prompt)[-keep:]
    out = []
    for _ in range(n):
        y = mx.argmax(model(mx.array([window]))[0, -1]).item()
        out.append(y)
        window = window[-(keep - 1):] + [y] if len(window) == n_pos else window + [y]
    return out


@pytest.mark.parametrize("keep", [None, 5])
def test_generation_slides_past_n_positions(keep, tiny_model):
    model = tiny_model(vocab_size=101, n_positions=24)
    n = 70  # crosses the 24-position limit several times
    ours = [t for t, _ in generate_tokens(Context(model), PROMPT, greedy(101), max_tokens=n,
                                          window_keep=keep)]
    assert ours == sliding_reference(model, PROMPT, n, keep or 12)


def test_a_long_prompt_is_cut_to_the_window_or_refused(tiny_model):
    model = tiny_model(vocab_size=101, n_positions=24)
    prompt = list(range(40))
    ours = [t for t, _ in generate_tokens(Context(model), prompt, greedy(101), max_tokens=10)]
    assert ours == sliding_reference(model, prompt, 10, 12)
    with pytest.raises(MlxgptError, match="context is 24"):
        next(generate_tokens(Context(model), prompt, greedy(101), context="stop"))


def test_stop_policy_ends_with_length_at_the_limit(tiny_model):
    model = tiny_model(vocab_size=257, n_positions=24)
    rs = list(stream_generate(model, byte_tokenizer(), "abcdefgh", max_tokens=100,
                              sampling=GREEDY, stop_at_eos=False, context="stop"))
    assert rs[-1].finish_reason == "length"
    assert rs[-1].generation_tokens == 24 - 8 + 1  # the last token is sampled, not read


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_streamed_pieces_join_to_the_full_decode(tokenizer, tiny_model):
    if tokenizer == "byte":
        tok, model = byte_tokenizer(), tiny_model(vocab_size=257, n_positions=512)
        # "é" is C3 A9, "€" E2 82 AC: push the model towards their bytes, one token each.
        bias = {0xC3: 6.0, 0xA9: 6.0, 0xE2: 5.0, 0x82: 5.0, 0xAC: 5.0}
    else:
        tok, model = gpt2_tokenizer(), tiny_model(vocab_size=50257, n_positions=512)
        # Byte-fallback tokens: pieces of multi-byte characters (e.g. id 156 = byte 0xE2).
        bias = {i: 5.0 for i in range(128, 188)}
    settings = SamplingSettings(temperature=1.0, seed=3, logit_bias=bias)
    rs = list(stream_generate(model, tok, "Hi", max_tokens=300, sampling=settings,
                              stop_at_eos=False))
    pieces, ids = [r.text for r in rs], [r.token for r in rs[:-1]]
    full = tok.decode(ids)
    assert "".join(pieces) == full
    assert len(ids) == 300
    multibyte = [c for c in full if ord(c) > 127 and c != "\ufffd"]
    assert multibyte, "the test should see whole multi-byte characters"
    assert len(multibyte) > sum(1 for p in pieces if any(ord(c) > 127 for c in p)) / 10


def test_stop_strings_never_leak_even_split_across_tokens(tiny_model):
    tok, model = byte_tokenizer(), tiny_model(vocab_size=257, n_positions=256)
    # Make "a", "b" and "c" likely, so "abc" is bound to appear: one byte per token.
    settings = SamplingSettings(temperature=1.0, seed=0,
                                logit_bias={ord("a"): 6.0, ord("b"): 6.0, ord("c"): 6.0})
    plain = generate(model, tok, "x", max_tokens=200, sampling=settings, stop_at_eos=False)
    cut = plain.find("abc")
    assert cut >= 0
    rs = list(stream_generate(model, tok, "x", max_tokens=200, sampling=settings,
                              stop=["abc", "zzzz"], stop_at_eos=False))
    shown = ""
    for r in rs:
        shown += r.text
        assert "abc" not in shown
    assert shown == plain[:cut]
    assert rs[-1].finish_reason == "stop"


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["\nUser:", "END"])
    assert m.feed("Hello\n") == ("Hello", False)  # "\n" could start "\nUser:"
    assert m.feed("Us") == ("", False)
    assert m.feed("ually") == ("\nUsually", False)
    assert m.feed(" E") == (" ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Dless") == ("", True)
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)


def test_eos_ends_generation_without_its_text(tiny_model):
    tok, model = byte_tokenizer(), tiny_model(vocab_size=257, n_positions=64)
    settings = SamplingSettings(temperature=0, logit_bias={256: 50.0})
    rs = list(stream_generate(model, tok, "hi", max_tokens=10, sampling=settings))
    assert rs[-1].finish_reason == "eos" and "".join(r.text for r in rs) == ""
    assert rs[-1].generation_tokens == 1


def test_seeded_generation_is_reproducible(tiny_model):
    tok, model = byte_tokenizer(), tiny_model(vocab_size=257, n_positions=128)
    s = SamplingSettings(temperature=1.0, top_k=50, top_p=0.9, seed=11)
    a = generate(model, tok, "Once", max_tokens=60, sampling=s, stop_at_eos=False)
    b = generate(model, tok, "Once", max_tokens=60, sampling=s, stop_at_eos=False)
    c = generate(model, tok, "Once", max_tokens=60, sampling=dataclasses.replace(s, seed=12),
                 stop_at_eos=False)
    assert a == b and a != c


def test_penalties_apply_over_the_generated_window(tiny_model):
    # With a huge frequency penalty over a window of 20, no token repeats within 20 steps.
    model = tiny_model(vocab_size=101, n_positions=128)
    s = SamplingSettings(temperature=0, frequency_penalty=1e4, penalty_window=20)
    out = [t for t, _ in generate_tokens(Context(model), [1], TokenSampler(s, 101),
                                         max_tokens=60)]
    window = [1] + out
    for i in range(len(out)):
        recent = window[max(0, i + 1 - 20): i + 1]
        assert out[i] not in recent
    plain = [t for t, _ in generate_tokens(Context(model), [1], greedy(101), max_tokens=60)]
    assert len(set(plain)) < len(set(out))  # greedy alone repeats


def test_no_rate_from_nothing_or_from_a_near_zero_time(tiny_model):
    from mlxgpt.generation.generate import format_rate, rate

    assert rate(2, 1e-9) is None and rate(0, 1.0) is None and rate(30, 2.0) == 15.0
    assert format_rate(None) == "- tok/s" and format_rate(15.0) == "15.0 tok/s"
    model = tiny_model()
    one = list(stream_generate(model, byte_tokenizer(), "Hi", max_tokens=1))[-1]
    assert one.generation_tokens == 1 and one.generation_tps is None  # one token: no rate
    with pytest.raises(MlxgptError, match="max_tokens must be a positive number"):
        generate(model, byte_tokenizer(), "Hi", max_tokens=0)


def test_summary_reports_speed_and_memory(tiny_model):
    tok, model = byte_tokenizer(), tiny_model(vocab_size=257, n_positions=64)
    r = list(stream_generate(model, tok, "hello", max_tokens=8, sampling=GREEDY,
                             stop_at_eos=False))[-1]
    assert (r.prompt_tokens, r.generation_tokens, r.finish_reason) == (5, 8, "length")
    assert r.prompt_tps > 0 and r.generation_tps > 0 and r.ttft > 0 and r.peak_memory_gb > 0


# --------------------------------------------------------------------------- CLI


def test_cli_generate_streams_and_matches_the_library(tmp_path, model_folder, mlxgpt_process):
    folder = model_folder(tmp_path)
    p = mlxgpt_process("generate", "-m", str(folder), "-p", "Hello", "-n", "20", "--temp", "0",
                       "--ignore-eos")
    assert p.returncode == 0, p.stderr
    model, tok = mlxgpt.load(str(folder))
    expect = generate(model, tok, "Hello", max_tokens=20, sampling=GREEDY, stop_at_eos=False)
    assert p.stdout == expect + "\n"
    assert "tok/s" in p.stderr and "finish: length" in p.stderr
    # The prompt from stdin, and every sampling option at once: the library's text with them.
    options = ["--top-k", "5", "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.2",
               "--presence-penalty", "0.1", "--frequency-penalty", "0.1", "--penalty-window", "8",
               "--logit-bias", "65=2", "--seed", "1", "--stop", "zz", "--context", "stop", "-q"]
    p = mlxgpt_process("generate", "-m", folder, "-p", "-", "-n", "30", *options, stdin="Hello")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    settings = SamplingSettings(top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                                presence_penalty=0.1, frequency_penalty=0.1, penalty_window=8,
                                logit_bias={65: 2.0}, seed=1)
    expect = generate(model, tok, "Hello", max_tokens=30, sampling=settings, stop=["zz"],
                      context="stop")
    assert p.stdout == expect + "\n"
    assert expect != generate(model, tok, "Hello", max_tokens=30,
                              sampling=SamplingSettings(seed=1))


@pytest.fixture(scope="module")
def byte_folder(tmp_path_factory, model_folder):
    return model_folder(tmp_path_factory.mktemp("generate"))  # byte tokenizer, 64 positions


def cli_text(cli_ok, folder, *args) -> str:
    out = cli_ok("generate", "-m", folder, "-p", "Hello", "-n", "40", "--ignore-eos", "-q", *args)
    return out.stdout[:-1]  # generate ends its output with a newline


# (option arguments, the library's setting, the setting to differ from): at temperature 1,
# seed 1 (each option last on the command line, so --temp and --seed override those)
OPTION_CASES = [
    (["--top-k", "3"], {"top_k": 3}, {}),
    (["--top-p", "0.3"], {"top_p": 0.3}, {}),
    (["--min-p", "0.5"], {"min_p": 0.5}, {}),
    (["--repetition-penalty", "2"], {"repetition_penalty": 2.0}, {}),
    (["--presence-penalty", "1.5"], {"presence_penalty": 1.5}, {}),
    (["--frequency-penalty", "1"], {"frequency_penalty": 1.0}, {}),
    (["--frequency-penalty", "1", "--penalty-window", "4"],
     {"frequency_penalty": 1.0, "penalty_window": 4}, {"frequency_penalty": 1.0}),
    (["--logit-bias", "65=4"], {"logit_bias": {65: 4.0}}, {}),
    (["--seed", "2"], {"seed": 2}, {}),
    (["--temp", "0.5"], {"temperature": 0.5}, {}),
]


@pytest.mark.parametrize("args, setting, without", OPTION_CASES,
                         ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_cli_sampling_option_changes_the_text_as_the_library_does(byte_folder, cli_ok, args,
                                                                  setting, without):
    model, tok = mlxgpt.load(str(byte_folder))
    sampled = {"temperature": 1.0, "seed": 1}

    def lib(**kw) -> str:
        return generate(model, tok, "Hello", max_tokens=40, stop_at_eos=False,
                        sampling=SamplingSettings(**{**sampled, **kw}))

    expect = lib(**setting)
    assert expect != lib(**without)  # the option matters here
    assert cli_text(cli_ok, byte_folder, "--temp", "1", "--seed", "1", *args) == expect


def test_cli_stop_cuts_the_text_before_the_stop_string(byte_folder, cli_ok):
    letters = [f"{ord(c)}=3" for c in "abcdefghijklmnopqrstuvwxyz"]
    args = ["--temp", "1", "--seed", "1", *(a for b in letters for a in ("--logit-bias", b))]
    full = cli_text(cli_ok, byte_folder, *args)
    # three letters from the middle of the text, at their first occurrence (not the start)
    k = next(i for i in range(len(full) // 3, len(full) - 3)
             if full[i:i + 3].isalpha() and full[i:i + 3].isascii()
             and full.find(full[i:i + 3]) > 0)
    stop = full[k:k + 3]
    out = cli_ok("generate", "-m", byte_folder, "-p", "Hello", "-n", "40", "--ignore-eos",
                 *args, "--stop", "zzzz", "--stop", stop)
    assert out.stdout == full[:full.find(stop)] + "\n"
    assert "finish: stop" in out.stderr


def test_cli_context_window_and_eos_options_take_effect(byte_folder, cli_ok):
    model, tok = mlxgpt.load(str(byte_folder))  # 64 positions
    base = ["generate", "-m", byte_folder, "-p", "abcdefgh", "-n", "100", "--temp", "0",
            "--frequency-penalty", "0.5", "--ignore-eos"]
    settings = SamplingSettings(temperature=0, frequency_penalty=0.5)

    def lib(**kw) -> str:
        return generate(model, tok, "abcdefgh", max_tokens=100, sampling=settings,
                        stop_at_eos=False, **kw)

    slide = cli_ok(*base)
    assert "generated 100 tokens" in slide.stderr and "finish: length" in slide.stderr
    assert slide.stdout == lib() + "\n"
    stop = cli_ok(*base, "--context", "stop")
    assert "generated 57 tokens" in stop.stderr  # 64 positions - 8 prompt tokens + 1
    assert stop.stdout == lib(context="stop") + "\n" != slide.stdout
    keep = cli_ok(*base, "--window-keep", "5")
    assert keep.stdout == lib(window_keep=5) + "\n" != slide.stdout
    # <|endoftext|> (id 256) made certain: it ends the text unless --ignore-eos
    eos = ["generate", "-m", byte_folder, "-p", "a", "-n", "5", "--temp", "0",
           "--logit-bias", "256=50"]
    ended = cli_ok(*eos)
    assert ended.stdout == "\n" and "finish: eos" in ended.stderr
    ignored = cli_ok(*eos, "--ignore-eos")
    assert "generated 5 tokens" in ignored.stderr and "finish: length" in ignored.stderr


def test_cli_generate_bad_input_is_one_line(tmp_path, cli, refused, model_folder):
    folder = model_folder(tmp_path)
    for args, why in ((["--top-p", "0"], "top_p must be in (0, 1]"),
                      (["--logit-bias", "x"], "--logit-bias: expected ID=BIAS"),
                      (["--logit-bias", "999=1"], "token id 999 is not in 0..256"),
                      (["-n", "-5"], "--max-tokens must be at least 1, got -5"),
                      (["-n", "0"], "--max-tokens must be at least 1, got 0")):
        refused(cli("generate", "-m", folder, "-p", "a", "-n", "2", *args), why)
    refused(cli("chat", "-m", folder, "-n", "0", input="hi\n"), "--max-tokens must be at least 1")
    refused(cli("generate", "-m", tmp_path / "missing", "-p", "a"), "no such folder")


def no_fetching(tmp_path: Path) -> dict[str, str]:
    """An environment where SmolLM2 (the default model) is not cached and cannot be fetched:
    an empty mlxgpt cache, the hub offline, pip without an index."""
    import os

    return {**os.environ, "MLXGPT_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "nothing")}


def test_without_a_model_or_smollm2_the_shipped_one_is_used(tmp_path, mlxgpt_process):
    import mlxgpt.models

    folder = shipped_model()
    assert folder.parent == Path(mlxgpt.models.__file__).parent and folder.name == "shakespeare"
    p = mlxgpt_process("generate", "-p", "ROMEO:", "-n", "8", "--seed", "0",
                       env=no_fetching(tmp_path))
    assert p.returncode == 0 and len(p.stdout.strip()) > 0, p.stderr
    note = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(note) == 1 and "using the small shipped model shakespeare" in note[0]
    assert "mlxgpt fetch smollm2" in note[0] and "Traceback" not in p.stderr


def test_chat_without_smollm2_talks_to_the_shipped_dialogue_model(tmp_path, mlxgpt_process):
    from mlxgpt.checkpoints.folder import CHAT_SHIPPED

    assert shipped_model(CHAT_SHIPPED).name == "english-chat"
    p = mlxgpt_process("chat", "--temp", "0", "-n", "40", stdin="Hello! Who are you?\n/stats\n",
                       env=no_fetching(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "using the small shipped model english-chat" in p.stderr
    # it replied in turn: the reply ended at the turn boundary, not at the token limit
    assert "finish: eos" in p.stdout or "finish: stop" in p.stdout, p.stdout


def test_without_a_model_or_a_shipped_one_the_fix_is_named(tmp_path, monkeypatch):
    from importlib import resources

    monkeypatch.setattr(resources, "files", lambda package: tmp_path)  # an install without one
    with pytest.raises(MlxgptError, match="no --model given") as e:
        shipped_model()
    assert "--model PATH" in str(e.value) and "mlxgpt pretrain" in str(e.value)


# --------------------------------------------------------------------------- CPU layout


def test_blocked_layers_compute_what_the_plain_ones_do():
    import mlx.nn as nn

    from mlxgpt.cpu.layout import BlockedEmbedding, BlockedLinear, block_width, to_blocks

    assert block_width(768, 3072) == 1024 and block_width(768, 50257) == 1289
    assert block_width(3072, 768) == 256 and block_width(768, 768) == 768
    mx.random.seed(0)
    lin = nn.Linear(768, 3001)  # 3 blocks of 1001 (the last with 2 zero columns)
    assert to_blocks(lin.weight).shape == (3, 768, 1001)
    for shape in [(1, 1, 768), (2, 5, 768), (7, 768)]:
        x = mx.random.normal(shape)
        np.testing.assert_allclose(np.array(BlockedLinear(lin)(x)), np.array(lin(x)),
                                   atol=2e-5)
    nobias = nn.Linear(3072, 700, bias=False)
    x = mx.random.normal((1, 1, 3072))
    np.testing.assert_allclose(np.array(BlockedLinear(nobias)(x)), np.array(nobias(x)),
                               atol=2e-5)
    emb = nn.Embedding(5003, 768)
    blocked = BlockedEmbedding(emb)
    ids = mx.array([[0, 1, 1288, 1289, 5002], [17, 4000, 2, 3, 4]])
    assert mx.array_equal(blocked(ids), emb(ids))  # lookups are exact
    h = mx.random.normal((2, 3, 768))
    np.testing.assert_allclose(np.array(blocked.as_linear(h)), np.array(emb.as_linear(h)),
                               atol=2e-5)


@pytest.mark.parametrize("layout", ["measured", "plain", "one-block", "blocks", 100_000])
def test_every_layout_generates_the_same_tokens(layout, tiny_model, monkeypatch):
    from mlxgpt.cpu.layout import LAYOUT_ENV, block_weights, prepare_layouts

    model = tiny_model(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    plain = [t for t, _ in generate_tokens(Context(model), PROMPT, greedy(50257),
                                           max_tokens=30)]
    if isinstance(layout, int):
        block_weights(model, layout)
        chosen = {"layers": "blocks", "head": "blocks"}
    else:  # what the commands do: timed here, or named by MLXGPT_LAYOUT
        if layout != "measured":
            monkeypatch.setenv(LAYOUT_ENV, layout)
        chosen = prepare_layouts(model)
        assert layout == "measured" or set(chosen.values()) == {layout}
    assert ("blocks" in model.wte) == (chosen["head"] != "plain")
    assert ("blocks" in model.h[0].mlp.c_fc) == (chosen["layers"] != "plain")
    fast = [t for t, _ in generate_tokens(Context(model), PROMPT, greedy(50257),
                                          max_tokens=30)]
    assert fast == plain


def test_layout_choice_is_timed_and_a_bad_name_refused(monkeypatch):
    from mlxgpt.cpu.layout import LAYOUT_ENV, LAYOUTS, choose_layout, layout_seconds

    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    for chain in (True, False):
        seconds = layout_seconds(64, 256, chain)
        assert set(seconds) <= set(LAYOUTS) and all(0 < s < 1 for s in seconds.values())
        assert choose_layout(64, 256, chain) == min(seconds, key=seconds.get)
    monkeypatch.setenv(LAYOUT_ENV, "diagonal")
    with pytest.raises(MlxgptError, match="MLXGPT_LAYOUT='diagonal'"):
        choose_layout(64, 256)


def test_cli_generate_applies_an_adapter(tmp_path, model_folder, cli_ok):
    from mlxgpt.checkpoints.adapters.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    folder = model_folder(tmp_path)
    model, tok = mlxgpt.load(str(folder))
    cfg = LoRAConfig(rank=4)
    apply_lora(model, cfg)
    mx.random.seed(1)
    for _, layer in lora_modules(model):  # a trained-looking adapter: B is not zero
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    save_adapter(model, tmp_path / "adapter", cfg)
    args = ["generate", "-m", str(folder), "-p", "Hello", "-n", "16", "--temp", "0",
            "--ignore-eos", "-q"]
    plain = cli_ok(*args)
    tuned = cli_ok(*args, "--adapter", tmp_path / "adapter")
    expect = generate(model, tok, "Hello", max_tokens=16, sampling=GREEDY, stop_at_eos=False)
    assert tuned.stdout == expect + "\n" != plain.stdout
