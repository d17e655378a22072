"""Training byte-level BPE tokenizers: the numbering, ids identical to Hugging Face (the trainer,
transformers) and tiktoken, ``mlxgpt tokenizer train``, and ``pretrain --tokenizer bpe:N``."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from test_tokenizer import TEXTS as BASE_TEXTS

import mlxgpt
from mlxgpt.tokenizers import EOT, GPT2_PATTERN, BPETokenizer, tokenizer_from_hf_folder
from mlxgpt.tokenizers.base import text_pieces
from mlxgpt.tokenizers.hf_files import byte_to_char, to_hf
from mlxgpt.tokenizers.train import train_bpe

pytest.importorskip("tokenizers")

# test_tokenizer's texts (minus the special-token one: a trained BPE encodes it as text here)
# plus contractions, dates, other digits and odd whitespace
TEXTS = [t for t in BASE_TEXTS if EOT not in t] + [
    "They're here, you'd think. DON'T SHOUT. O'Neil's 'quoted' words' end'",
    "numbers 2024-01-02 ١٢٣ ⅷ",
    "odd spaces:\u00a0\u2003\u3000\u2028\u0085\x0b\x0c| \u200b \ufeff end",
]
POOL = "aZ09 \t\n\r.,;'\"!?-_<|>()[]{}ßéñø中文字日本語한국어😀🎉👍🏽\u200d\u00a0ÅΩж'sllve"
N = 600


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def corpus_text() -> str:
    """About 100 KB of mixed text: prose, code, scripts, emoji, digits, whitespace runs."""
    rng = random.Random(1)
    lines = [*TEXTS, *random_texts(300, seed=2)]
    return "\n".join(rng.choice(lines) for _ in range(2500))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[BPETokenizer, Path]:
    tok = train_bpe([corpus_text()], N)
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(folder)
    return tok, folder


def hf_trained(texts: list[str], vocab_size: int):
    """The Hugging Face trainer run directly, as mlxgpt runs it (its own numbering)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def check_texts(seed: int) -> list[str]:
    return [*TEXTS, corpus_text()[:20000], *random_texts(200, seed=seed)]


# --------------------------------------------------------------------------- the tokenizer


def test_n_ids_bytes_first_endoftext_last(trained):
    tok, folder = trained
    assert (tok.vocab_size, tok.eot_id, tok.special_tokens) == (N, N - 1, {EOT: N - 1})
    import mlxgpt.models  # the tokenizer files of the shipped model folder: the same set

    shipped = Path(mlxgpt.models.__file__).parent / "shakespeare"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in shipped.iterdir() if p.name not in ("config.json", "model.safetensors"))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == N and vocab[EOT] == N - 1
    assert sorted(vocab.values()) == list(range(N))
    assert all(vocab[byte_to_char()[b]] == b for b in range(256))  # byte b has id b
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + N - 257
    # merge k makes id 256 + k: ids are merge ranks, as tiktoken needs
    for k, line in enumerate(merges[1:]):
        a, b = line.split(" ")
        assert vocab[a + b] == 256 + k
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["eos_token"] == EOT


def test_round_trip_and_reload(trained):
    tok, folder = trained
    again = tokenizer_from_hf_folder(folder)
    assert again.name == "bpe" and again.vocab_size == N and again._rank_to_id is None
    for text in check_texts(seed=3):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert again.encode(text) == ids
        assert tok.encode_batch([text, text]) == [ids, ids]
    assert tok.encode(EOT, allow_special=True) == [N - 1]
    assert N - 1 not in tok.encode(EOT)


def test_ids_equal_transformers(trained):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    tok, folder = trained
    for hf in (GPT2TokenizerFast.from_pretrained(str(folder)),
               AutoTokenizer.from_pretrained(str(folder))):
        assert len(hf) == N and hf.eos_token_id == N - 1
        for text in [*check_texts(seed=4), "a<|endoftext|>b <|endoftext|>"]:
            ids = tok.encode(text, allow_special=True)  # transformers matches added tokens
            assert hf.encode(text) == ids, text
            assert hf.decode(ids) == tok.decode(ids)


def test_ids_equal_the_trainers_own_encoding(trained):
    """The trainer's merges, renumbered bytes-first, give its own splits under tiktoken."""
    tok, _ = trained
    hf = hf_trained([corpus_text()], N)
    hf_merges = json.loads(hf.to_str())["model"]["merges"]
    assert [" ".join(m) if isinstance(m, list) else m for m in hf_merges] == [
        f"{to_hf(a)} {to_hf(b)}" for a, b in tok.merges]
    ours = {to_hf(tok.token_bytes(i)): i for i in range(N - 1)}
    for text in check_texts(seed=5):
        assert tok.encode(text) == [ours[t] for t in hf.encode(text).tokens], text


def test_training_on_pieces_equals_training_on_the_whole_text():
    whole = corpus_text()
    pieces = [p.decode() for p in text_pieces(whole.encode(), size=3000)]
    assert len(pieces) > 20 and "".join(pieces) == whole
    assert train_bpe(pieces, N).merges == train_bpe([whole], N).merges


def test_text_pieces_keep_gpt2_pre_tokens():
    regex = pytest.importorskip("regex")
    rng = random.Random(7)
    seps = ["\n", "\n\n", " \n", "  \n", "\r\n", "\n ", "\n  ", "\n\t", "\n\u00a0", "\n\u3000",
            "\n\u2028", "\n\u0085", "\n'", "\n's", "\n中", "\n😀", "\nx", "\n1", "\n."]
    for _ in range(30):
        text = "".join(rng.choice(seps) + rng.choice(["ab", "'ll", "  ", "é", "9", "", "--"])
                       for _ in range(400))
        data = text.encode()
        pieces = text_pieces(data, size=rng.randint(1, 50))
        assert b"".join(pieces) == data
        split = [t for p in pieces for t in regex.findall(GPT2_PATTERN, p.decode())]
        assert split == regex.findall(GPT2_PATTERN, text)


def test_bad_sizes_and_unmergeable_text():
    with pytest.raises(mlxgpt.MlxgptError, match="more than 257"):
        train_bpe(["abc"], 257)
    with pytest.raises(mlxgpt.MlxgptError, match="nothing to merge"):
        train_bpe(["a\nb\nc,d"], 300)  # every pre-token is one byte
    small = train_bpe(["abcabc abd"], 10_000)  # the data supports a few merges only
    assert 257 < small.vocab_size == 257 + len(small.merges) < 300
    assert small.eot_id == small.vocab_size - 1
    assert small.decode(small.encode("abcabc abd")) == "abcabc abd"


# --------------------------------------------------------------------------- mlxgpt tokenizer train


@pytest.fixture
def corpus_files(tmp_path: Path) -> list[Path]:
    text = corpus_text()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[: len(text) // 2], encoding="utf-8")
    b.write_text(text[len(text) // 2 :], encoding="utf-8")
    return [a, b]


def test_cli_trains_and_writes_the_folder(tmp_path, corpus_files, cli_ok):
    out = tmp_path / "tok"
    r = cli_ok("tokenizer", "train", "--data", *corpus_files, "--vocab-size", N, "--out", out,
               "--quiet")
    assert f"tokenizer: {N} ids (256 bytes, {N - 257} merges, <|endoftext|> = {N - 1})" in r.output
    assert "MB/min" in r.output and "bytes per token" in r.output
    tok = tokenizer_from_hf_folder(out)
    assert tok.vocab_size == N
    assert tok.merges == train_bpe([p.read_bytes().decode() for p in corpus_files], N).merges
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "tok"]
    # a folder of .txt files is a corpus too; --force replaces
    r = cli_ok("tokenizer", "train", "--data", tmp_path, "--vocab-size", 300, "--out", out,
               "--force")
    assert tokenizer_from_hf_folder(out).vocab_size == 300


def test_cli_says_when_the_data_is_short_of_merges(tmp_path, cli_ok):
    small = tmp_path / "small.txt"
    small.write_text("abcabc abd abcabc\n")
    r = cli_ok("tokenizer", "train", "--data", small, "--vocab-size", 5000, "--out",
               tmp_path / "tok")
    assert "no more pairs to merge" in r.output
    assert tokenizer_from_hf_folder(tmp_path / "tok").vocab_size < 5000


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, corpus_files, cli, refused):
    out = tmp_path / "out" / "tok"
    good = ["--data", corpus_files[0], "--out", out]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    cases = [
        (["--data", tmp_path / "missing.txt", "--vocab-size", N, "--out", out],
         "no such file or folder"),
        (["--data", empty, "--vocab-size", N, "--out", out], "the corpus is empty"),
        (["--data", latin1, "--vocab-size", N, "--out", out], "not UTF-8 text"),
        ([*good, "--vocab-size", 257], "more than 257"),
        ([*good, "--vocab-size", -5], "more than 257"),
        (good, "--vocab-size N is required"),
        (["--vocab-size", N, "--out", out], "--data FILE is required"),
        (["--data", corpus_files[0], "--vocab-size", N], "--out DIR is required"),
    ]
    for args, message in cases:
        refused(cli("tokenizer", "train", *args), message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # an existing folder is kept as it was unless --force
    out.mkdir(parents=True)
    (out / "keep").write_text("mine")
    refused(cli("tokenizer", "train", *good, "--vocab-size", N), "already exists")
    assert [p.name for p in out.parent.iterdir()] == ["tok"]
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_cli_without_tokenizers_says_how_to_install(tmp_path, corpus_files, cli, refused,
                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    r = cli("tokenizer", "train", "--data", corpus_files[0], "--vocab-size", N, "--out",
            tmp_path / "tok")
    refused(r, "pip install 'mlxgpt[tokenizer]'")
    assert not list(tmp_path.glob("*tok*"))  # neither the folder nor its temporary


# --------------------------------------------------------------------------- pretrain bpe:N

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-batches", "1", "--log-every", "1", "--quiet"]


@pytest.fixture
def bpe_run(tmp_path, corpus_files, cli_ok) -> tuple[Path, str]:
    out = tmp_path / "run"
    r = cli_ok("pretrain", *TINY, "--cache-dir", tmp_path / "cache", "--data", corpus_files[0],
               "--out", out, "--tokenizer", "bpe:400", "--steps", "2", "--eval-every", "0")
    return out, r.output


def test_pretrain_bpe_folders_load_and_generate(bpe_run, cli_ok):
    out, output = bpe_run
    assert "tokenizer: training bpe:400" in output and "MB/min" in output
    trained = tokenizer_from_hf_folder(out / "tokenizer")
    assert trained.vocab_size == 400
    for folder in (out / "model", out / "last"):
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (out / "tokenizer" / name).read_bytes()
        model, tok = mlxgpt.load(str(folder))
        assert tok.name == "bpe" and tok.vocab_size == model.config.vocab_size == 400
        ids = tok.encode("ROMEO: café 😀")
        assert ids == trained.encode("ROMEO: café 😀")
        assert model(mx.array([ids])).shape == (1, len(ids), 400)
    r = cli_ok("generate", "-m", out / "model", "-p", "The ", "-n", "5", "--seed", "0")
    assert "generated" in r.output and r.stdout.strip()


def test_pretrain_bpe_resume_reuses_the_tokenizer(bpe_run, tmp_path, cli_ok):
    out, _ = bpe_run
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "tokenizer").iterdir()}
    r = cli_ok("pretrain", "--cache-dir", tmp_path / "cache", "--out", out, "--resume",
               "--steps", "3", "--quiet")
    assert "training bpe" not in r.output and "done: 3 steps" in r.output
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "tokenizer").iterdir()}
    assert after == before
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1  # same tokens, reused


def test_pretrain_bad_tokenizer_names(tmp_path, corpus_files, cli, refused):
    for name, message in [("bpe:abc", "unknown tokenizer"), ("wordpiece", "unknown tokenizer"),
                          ("bpe:100", "more than 257")]:
        r = cli("pretrain", *TINY, "--data", corpus_files[0], "--out", tmp_path / "run",
                "--tokenizer", name)
        refused(r, message)
    assert not (tmp_path / "run").exists()


def test_pretrain_bpe_on_bad_data_writes_nothing(tmp_path, cli, refused):
    short = tmp_path / "short.txt"
    short.write_text("too short for one block, too short")
    r = cli("pretrain", *TINY, "--cache-dir", tmp_path / "cache", "--data", short, "--out",
            tmp_path / "run", "--tokenizer", "bpe:300")
    refused(r, "too small")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_mlx_lm_and_transformers_load_the_model_folder(bpe_run):
    """mlx-lm and transformers read the pretrained folder: same ids, same logits."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from transformers import AutoTokenizer

    out, _ = bpe_run
    ours, tok = mlxgpt.load(str(out / "model"))
    theirs, their_tok = mlx_lm_utils.load(str(out / "model"))
    hf = AutoTokenizer.from_pretrained(str(out / "model"))
    text = "It's 3 o'clock,  café 😀\n\n  ROMEO:"
    ids = tok.encode(text)
    assert their_tok.encode(text) == ids and hf.encode(text) == ids
    x = mx.array([ids[:16]])  # the model's context (--block-size 16)
    assert mx.allclose(ours(x), theirs(x), atol=1e-4).item()
