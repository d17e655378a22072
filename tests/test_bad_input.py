"""Bad input, denial of service and integrity (issue 25): every wrong value is one ``Error:``
line and exit status 1 before anything uses it; no input makes tokenizer work quadratic; a
damaged prompt cache is refused as damaged; a model folder cannot make mlxgpt read (and quote)
a file outside it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import pytest

import mlxgpt
from mlxgpt.checkpoints.folder import save_model
from mlxgpt.core.config import MAX_SIZES, GPTConfig
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.chat import ChatSession, ChatSettings
from mlxgpt.generation.prompt_cache import (
    CHECKSUM,
    content_checksum,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlxgpt.generation.sample import SamplingSettings, TokenSampler
from mlxgpt.tokenizers import bpe, byte_tokenizer, tokenizer_from_hf_folder
from mlxgpt.training.config import TrainConfig

GOOD_LINE = '{"text": "hello there, a line to learn from"}\n'


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model_folder):
    return model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(GOOD_LINE * 6)
    return path


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(cfg))


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_out_of_range_is_one_line_everywhere(seed, tmp_path, folder, data, cli,
                                                    refused):
    want = f"--seed must be in 0..{2**64 - 1}, got {seed}"
    refused(cli("generate", "--model", folder, "-p", "hi", "-n", 2, "--seed", seed), want)
    refused(cli("chat", "--model", folder, "--seed", seed, input="hi\n"), want)
    refused(cli("finetune", "--model", folder, "--data", data, "--out", tmp_path / "ft",
                "--seed", seed), want)
    (tmp_path / "text.txt").write_text("some text to train on " * 20)
    refused(cli("pretrain", "--data", tmp_path / "text.txt", "--out", tmp_path / "pt",
                "--seed", seed), "seed must be in 0..")
    (tmp_path / "cfg.json").write_text(json.dumps({"seed": seed}))
    refused(cli("pretrain", "--data", tmp_path / "text.txt", "--out", tmp_path / "pt",
                "--config", tmp_path / "cfg.json"), "seed must be in 0..")
    assert not (tmp_path / "pt").exists() and not (tmp_path / "ft").exists()
    with pytest.raises(MlxgptError, match="seed must be in"):
        SamplingSettings(seed=seed)


def test_the_largest_seed_works():
    sampler = TokenSampler(SamplingSettings(seed=2**64 - 1), 10)
    assert sampler(mx.zeros((1, 10))).shape == (1,)


def test_set_seed_in_the_chat_says_why_and_the_chat_goes_on(folder, cli_ok):
    out = cli_ok("chat", "--model", folder, "-n", 3,
                 input="/set seed -1\n/set seed 7\nhello\n/set\n")
    assert "Error: sampling: seed must be in 0.." in out.stderr
    assert "seed = 7" in out.stdout and "seed=7" in out.stdout  # applied, and a reply came


# --------------------------------------------------------------------------- vocabulary sizes


def test_a_huge_vocabulary_is_refused_before_the_trainer_runs(tmp_path, cli, refused,
                                                              monkeypatch):
    # Hugging Face's trainer aborts the whole process on such a size: it must never see it.
    def trainer_reached(*args, **kwargs):
        raise AssertionError("the tokenizer trainer was called")

    import mlxgpt.data.corpus
    import mlxgpt.training.pretrain

    monkeypatch.setattr(mlxgpt.data.corpus, "train_tokenizer", trainer_reached)
    monkeypatch.setattr(mlxgpt.training.pretrain, "train_tokenizer", trainer_reached)
    text = tmp_path / "small.txt"
    text.write_text("hello world " * 50)
    want = "the vocabulary size must be in 258..1048576"
    refused(cli("tokenizer", "train", "--data", text, "--vocab-size", 99999999999,
                "--out", tmp_path / "tok"), want)
    refused(cli("pretrain", "--data", text, "--out", tmp_path / "run",
                "--tokenizer", "bpe:99999999999"), want)
    assert not (tmp_path / "tok").exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- model metadata


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, tiny_model):
    """A model folder with a trained BPE tokenizer (vocab.json, merges.txt, its description)."""
    pytest.importorskip("tokenizers")
    from mlxgpt.tokenizers.train import train_bpe

    tok = train_bpe(["the cat sat on the mat, the hat sat on the cat. " * 20], 300)
    return save_model(tiny_model(vocab_size=tok.vocab_size), tmp_path_factory.mktemp("b") / "m",
                      tok)


def generate_with(cli, folder: Path):
    return cli("generate", "--model", folder, "-p", "hi", "-n", 2)


@pytest.mark.parametrize(("changes", "want"), [
    ({"mlxgpt": "oops"}, '"mlxgpt" must be an object'),
    ({"mlxgpt.tokenizer": ["byte"]}, "mlxgpt.tokenizer must be an object"),
    ({"vocab_size": "lots"}, "config: vocab_size must be an integer"),
    ({"layer_norm_epsilon": "abc"}, "config: layer_norm_epsilon must be a number"),
    ({"tie_word_embeddings": "no"}, "config: tie_word_embeddings must be true or false"),
    ({"scale_attn_weights": "no"}, "config: scale_attn_weights must be true or false"),
    ({"quantization": {"group_size": 64, "bits": "x"}}, "has bits 'x'"),
    ({"quantization": {"group_size": 64, "bits": 4.0}}, "has bits 4.0"),
    ({"n_embd": 10**9}, "config: n_embd must be in 1..65536, got 1000000000"),
    ({"n_positions": 10**12}, "config: n_positions must be in 1..16777216"),
    ({"vocab_size": 10**10}, "config: vocab_size must be in 1..4194304"),
    ({"n_inner": 10**9}, "config: n_inner must be in 1..262144"),
    ({"n_layer": 1000, "n_embd": 65536, "n_head": 1}, "parameters; mlxgpt builds at most"),
])
def test_malformed_model_metadata_is_one_line(tmp_path, folder, cli, refused, changes, want):
    broken = copy_folder(folder, tmp_path / "broken")
    edit_config(broken, **changes)
    refused(generate_with(cli, broken), want)


@pytest.mark.parametrize(("changes", "want"), [
    ({"mlxgpt.tokenizer.special_tokens": ["<|endoftext|>"]},
     "special tokens must be an object"),
    ({"mlxgpt.tokenizer.special_tokens": {"<|endoftext|>": "x"}}, "has id 'x'"),
    ({"mlxgpt.tokenizer.eot_id": "last"}, "mlxgpt.tokenizer.eot_id must be an integer"),
    ({"mlxgpt.tokenizer.pattern": 5}, "mlxgpt.tokenizer.pattern must be a string"),
])
def test_a_malformed_tokenizer_description_is_one_line(tmp_path, bpe_folder, cli, refused,
                                                       changes, want):
    broken = copy_folder(bpe_folder, tmp_path / "broken")
    edit_config(broken, **changes)
    refused(generate_with(cli, broken), want)


def test_malformed_tokenizer_files_are_one_line(tmp_path, bpe_folder, cli, refused):
    broken = copy_folder(bpe_folder, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("[1]")
    refused(generate_with(cli, broken), "tokenizer_config.json: expected a JSON object, got list")
    (broken / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(generate_with(cli, broken), "nested too deeply")
    broken = copy_folder(bpe_folder, tmp_path / "huge-id")
    vocab = json.loads((broken / "vocab.json").read_text())
    vocab["hat"] = 10**15  # an id sizes the id table: refused, not allocated
    (broken / "vocab.json").write_text(json.dumps(vocab))
    refused(generate_with(cli, broken), "has id 1000000000000000, expected an integer in 0..")


def test_sizes_are_bounded_in_both_families():
    with pytest.raises(MlxgptError, match="n_embd must be in 1..65536"):
        GPTConfig(n_embd=10**9, n_head=1)
    with pytest.raises(MlxgptError, match="hidden_size must be in 1..65536"):
        mlxgpt.LlamaConfig(hidden_size=2**20, num_attention_heads=2**10)
    with pytest.raises(MlxgptError, match="max_position_embeddings must be in"):
        mlxgpt.LlamaConfig(max_position_embeddings=10**12)
    with pytest.raises(MlxgptError, match="hidden_size must be an integer"):
        mlxgpt.LlamaConfig.from_dict({"model_type": "llama", "vocab_size": 10,
                                      "hidden_size": "lots", "intermediate_size": 8,
                                      "num_hidden_layers": 1, "num_attention_heads": 2})
    assert MAX_SIZES["n_embd"] >= 16384 and MAX_SIZES["vocab_size"] >= 262144  # real models fit


def test_pretrain_refuses_a_model_too_large_before_reading_the_data(tmp_path, cli, refused):
    text = tmp_path / "t.txt"
    text.write_text("abc " * 100)
    refused(cli("pretrain", "--data", text, "--out", tmp_path / "run", "--n-embd", 10**9,
                "--n-head", 1), "config: n_embd must be in 1..65536, got 1000000000")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("method", "value", "want"), [
    ("add_head_count", "twelve", "head_count is 'twelve', not an integer"),
    ("add_embedding_length", 10**9, "n_embd must be in 1..65536"),
    ("add_context_length", 10**12, "n_positions must be in 1..16777216"),
])
def test_a_gpt2_gguf_with_bad_metadata_is_one_line(tmp_path, tiny_model, cli, refused,
                                                   monkeypatch, method, value, want):
    gguf = pytest.importorskip("gguf")
    from mlxgpt.checkpoints.gguf import write_gguf

    real = getattr(gguf.GGUFWriter, method)
    key = {"add_head_count": "attention.head_count", "add_embedding_length": "embedding_length",
           "add_context_length": "context_length"}[method]

    def wrong(self, _):
        if isinstance(value, str):
            self.add_string(f"{self.arch}.{key}", value)
        else:
            self.add_uint64(f"{self.arch}.{key}", value)

    monkeypatch.setattr(gguf.GGUFWriter, method, wrong)
    write_gguf(tiny_model(), byte_tokenizer(), tmp_path / "m.gguf", "f32")
    monkeypatch.setattr(gguf.GGUFWriter, method, real)
    refused(cli("generate", "--model", tmp_path / "m.gguf", "-p", "hi", "-n", 1), want)


# --------------------------------------------------------------------------- options and data


@pytest.mark.parametrize(("args", "want"), [
    (["--batch-size", 0], "--batch-size must be at least 1, got 0"),
    (["--batch-size", -2], "--batch-size must be at least 1, got -2"),
    (["--grad-accum", 0], "--grad-accum must be at least 1, got 0"),
    (["--max-seq-len", -5], "--max-seq-len must be at least 2, got -5"),
    (["--steps", 0], "--steps must be at least 1, got 0"),
    (["--eval-every", -1], "--eval-every must be at least 0, got -1"),
    (["--rank", 0], "--rank must be at least 1, got 0"),
])
def test_finetune_options_out_of_range_are_refused_before_anything(tmp_path, folder, data, cli,
                                                                   refused, args, want):
    out = tmp_path / "ft"
    refused(cli("finetune", "--model", folder, "--data", data, "--out", out, *args), want)
    assert not out.exists()


def test_eval_limit_below_one_is_refused_not_a_dropped_example(folder, data, cli, refused):
    refused(cli("eval", "--model", folder, "--data", data, "--limit", -1),
            "--limit must be at least 1, got -1")
    refused(cli("eval", "--model", folder, "--data", data, "--limit", 0), "--limit must be")


def test_deeply_nested_jsonl_is_one_line(tmp_path, folder, cli, refused):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(GOOD_LINE + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(cli("eval", "--model", folder, "--data", deep), "deep.jsonl:2: JSON nested too deeply")
    refused(cli("finetune", "--model", folder, "--data", deep, "--out", tmp_path / "ft"),
            "deep.jsonl:2: JSON nested too deeply")


@pytest.mark.parametrize(("setting", "want"), [
    ({"steps": "100"}, "steps must be an integer, got '100'"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"n_layer": 2.5}, "n_layer must be an integer, got 2.5"),
    ({"dropout": True}, "dropout must be a number, got True"),
    ({"tokenizer": 8}, "tokenizer must be a string, got 8"),
])
def test_pretrain_config_values_of_the_wrong_type_are_named(tmp_path, cli, refused, setting,
                                                            want):
    (tmp_path / "t.txt").write_text("abc " * 100)
    (tmp_path / "cfg.json").write_text(json.dumps(setting))
    line = refused(cli("pretrain", "--data", tmp_path / "t.txt", "--out", tmp_path / "run",
                       "--config", tmp_path / "cfg.json"), want)
    assert "cfg.json" in line


def test_library_edges_check_types_and_ranges():
    with pytest.raises(MlxgptError, match="steps must be an integer"):
        TrainConfig(steps="100")
    with pytest.raises(MlxgptError, match="beta2 must be in 0..1"):
        TrainConfig(beta2=2.0)
    with pytest.raises(MlxgptError, match="compile must be true or false"):
        TrainConfig(compile="yes")
    from mlxgpt.data.examples import Batches, Example

    with pytest.raises(MlxgptError, match="batch size must be at least 1, got 0"):
        Batches([Example([1, 2], [1, 1])], 0)
    with pytest.raises(MlxgptError, match="top_k must be an integer"):
        SamplingSettings(top_k="5")


def test_a_system_text_longer_than_the_context_is_said(folder, tiny_model, cli, refused):
    refused(cli("chat", "--model", folder, "--system", "x" * 100, input="hi\n"),
            "the system text takes 112 of the model's 64 positions")
    chat = ChatSession(tiny_model(), byte_tokenizer(), ChatSettings(max_tokens=4))
    "".join(chat.reply("hello"))
    with pytest.raises(MlxgptError, match="this message takes"):
        "".join(chat.reply("y" * 80))
    assert [m.content for m in chat.messages if m.role == "user"] == ["hello"]  # kept as it was
    chat.system = "s" * 50
    with pytest.raises(MlxgptError, match="the system text and this message take"):
        "".join(chat.reply("tell me more"))


def test_a_message_too_long_in_the_chat_does_not_end_it(folder, cli_ok):
    out = cli_ok("chat", "--model", folder, "-n", 3, input="y" * 80 + "\nhi\n")
    assert "Error: this message takes" in out.stderr
    assert len(out.stdout.strip().splitlines()) == 1  # "hi" was answered


# --------------------------------------------------------------------------- BPE is not quadratic


def repeated_run_ranks(n: int) -> dict[bytes, int]:
    """A vocabulary for runs of one letter: the bytes, then "a" * 2**k (what a trainer makes of
    a long run), then a run of ``n`` as a single token: BPE must rebuild it from the rest."""
    ranks = {bytes([b]): b for b in range(256)}
    k = 2
    while k < n:
        ranks[b"a" * k] = len(ranks)
        k *= 2
    ranks[b"a" * n] = len(ranks)
    return ranks


def test_merge_recovery_takes_linearly_many_lookups_in_the_token_length():
    counts = {}
    for n in (1_000, 4_000, 16_000, 64_000):
        ranks = repeated_run_ranks(n)
        parts, counts[n] = bpe._bpe_parts(b"a" * n, ranks, ranks[b"a" * n])
        assert b"".join(parts) == b"a" * n
        assert counts[n] <= 3 * n  # (the scan over every pair per merge made ~n**2 / 2)
    assert counts[64_000] / counts[1_000] < 64 * 1.1  # linear, not quadratic growth


def test_loading_a_crafted_vocabulary_does_linear_work(tmp_path, monkeypatch):
    """Runs of every length up to 250 (a 36 KB vocab.json, 36 s to open before): the lookups of
    the whole load stay within 3 per byte of the tokens."""
    from mlxgpt.tokenizers.hf_files import to_hf

    counted = []
    real = bpe._bpe_parts

    def counting(token, ranks, below):
        parts, lookups = real(token, ranks, below)
        counted.append(lookups)
        return parts, lookups

    monkeypatch.setattr(bpe, "_bpe_parts", counting)
    vocab = {to_hf(bytes([b])): b for b in range(256)}
    merges = []
    for k in range(2, 251):
        vocab[to_hf(b"a" * k)] = len(vocab)
        merges.append(f"{to_hf(b'a' * (k - 1))} {to_hf(b'a')}")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    with pytest.warns(UserWarning, match="not self-consistent"):  # tiktoken pairs runs its way
        tok = tokenizer_from_hf_folder(tmp_path)
    assert tok.vocab_size == 256 + 249
    assert counted and sum(counted) <= 3 * sum(range(2, 251))


# --------------------------------------------------------------------------- prompt caches


@pytest.fixture()
def cache_file(tmp_path, tiny_model):
    model, tok = tiny_model(n_positions=128), byte_tokenizer()
    path = save_prompt_cache(make_prompt_cache(model, tok, "A shared preamble, read once. " * 3),
                             tmp_path / "c.safetensors")
    return model, tok, path


def rewrite(path: Path, out: Path, change) -> Path:
    """The file with ``change(arrays)`` applied and its metadata (checksum included) kept."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    change(arrays)
    mx.save_safetensors(str(out), arrays, metadata=meta)
    return out


def test_damaged_prompt_caches_are_refused_as_damaged(tmp_path, cache_file):
    model, tok, path = cache_file
    load_prompt_cache(path, model, tok)  # intact

    def noise_in_last_layer(a):  # earlier positions only: the last one is what is recomputed
        k = a["keys.1"]
        a["keys.1"] = mx.concatenate([k[..., :-1, :] + mx.random.normal(k[..., :-1, :].shape),
                                      k[..., -1:, :]], axis=2)

    def other_tokens(a):
        a["tokens"] = mx.concatenate([a["tokens"][:-1][::-1], a["tokens"][-1:]])

    for name, change in [("noise", noise_in_last_layer), ("tokens", other_tokens)]:
        bad = rewrite(path, tmp_path / f"{name}.safetensors", change)
        with pytest.raises(MlxgptError, match=r"differ from the checksum.*\(damaged file\)"):
            load_prompt_cache(bad, model, tok)


def test_every_flipped_byte_is_reported_as_damage(tmp_path, cache_file):
    model, tok, path = cache_file
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    # every byte of the header's metadata and tensor table, and a sample of the tensors' bytes
    positions = [*range(8, header), *rng.sample(range(header, len(data)), 300)]
    flipped = tmp_path / "flipped.safetensors"
    for pos in positions:
        flipped.write_bytes(data[:pos] + bytes([data[pos] ^ 0x20]) + data[pos + 1:])
        try:
            load_prompt_cache(flipped, model, tok)
        except MlxgptError as e:
            assert "damaged" in str(e) and "another model" not in str(e), (pos, str(e))
        else:  # only bytes that change nothing may pass: JSON layout, a key's letter case...
            arrays, meta = mx.load(str(flipped), return_metadata=True)
            assert meta[CHECKSUM] == content_checksum(arrays, meta), pos


def test_a_cache_from_an_older_mlxgpt_is_made_again(tmp_path, cache_file):
    model, tok, path = cache_file
    arrays, meta = mx.load(str(path), return_metadata=True)
    del meta[CHECKSUM]
    mx.save_safetensors(str(tmp_path / "v1.safetensors"), arrays, metadata={**meta,
                                                                            "version": "1"})
    with pytest.raises(MlxgptError, match="make it again with `mlxgpt cache-prompt`"):
        load_prompt_cache(tmp_path / "v1.safetensors", model, tok)


def test_the_docs_say_what_the_checksum_does_not_guard():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text()
    assert "checksum" in doc and "user's own input" in doc


# --------------------------------------------------------------------------- symbolic links


SECRET = "TOP-SECRET contents of another file\nsecond line\n"


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json", "config.json",
                                  "model.safetensors", "tokenizer_config.json"])
def test_links_out_of_a_model_folder_are_refused_without_quoting(tmp_path, bpe_folder, cli,
                                                                 refused, name):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    linked = copy_folder(bpe_folder, tmp_path / "linked")
    (linked / name).unlink()
    (linked / name).symlink_to(secret)
    result = cli("generate", "--model", linked, "-p", "hi", "-n", 1)
    refused(result, f"{name}: a link to a file outside the model folder")
    assert "TOP-SECRET" not in result.output and "second line" not in result.output


def test_links_inside_the_folder_and_the_hub_cache_layout_still_load(tmp_path, bpe_folder):
    from _hf_helpers import populate_hf_cache

    inside = copy_folder(bpe_folder, tmp_path / "inside")
    (inside / "merges.txt").rename(inside / "merges-v1.txt")
    (inside / "merges.txt").symlink_to("merges-v1.txt")
    mlxgpt.load(inside)
    snapshot = populate_hf_cache(tmp_path / "hub", "someone/tiny", bpe_folder)
    assert (snapshot / "config.json").is_symlink()
    mlxgpt.load(snapshot)


def test_error_messages_quote_at_most_a_little_of_a_file(tmp_path, bpe_folder, cli, refused):
    broken = copy_folder(bpe_folder, tmp_path / "broken")
    (broken / "merges.txt").write_text("#version: 0.2\n" + "x" * 5000 + "\n")
    line = refused(generate_with(cli, broken), "merges.txt: merge 1")
    assert len(line) < 300


def test_a_config_nested_too_deeply_is_one_line(tmp_path, cli, refused, model_folder):
    folder = model_folder(tmp_path)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(cli("generate", "-m", folder, "-p", "a", "-n", "2"), "nested too deeply")


def test_a_hugging_face_config_with_tie_no_is_refused(tmp_path, cli, refused):
    from _hf_helpers import make_hf_checkpoint

    src = make_hf_checkpoint(tmp_path, {"n_layer": 1, "n_embd": 16, "n_head": 2,
                                        "n_positions": 8})
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "no"}))
    refused(cli("convert", src, tmp_path / "out"), "tie_word_embeddings must be true or false")
