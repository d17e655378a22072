"""Tokenizers: GPT-2 ids identical to tiktoken's, round trips, streaming, Hugging Face files."""

import hashlib
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from mlxgpt.errors import MlxgptError
from mlxgpt.tokenizers import (
    EOT,
    BPETokenizer,
    IdTokenizer,
    byte_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    read_tiktoken_ranks,
    tokenizer_from_hf_folder,
)

ROOT = Path(__file__).resolve().parents[1]
# tiktoken's published SHA-256 of GPT-2's ranks (r50k_base.tiktoken, in tiktoken_ext/openai_public)
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's published GPT-2 split pattern (r50k_pat_str in tiktoken_ext/openai_public), written
# here so the reference shares nothing with mlxgpt's code
TIKTOKEN_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare.txt"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'll see; we've won.",
    'def f(x):\n\treturn {"a": [x ** 2 for x in range(10)]}  # comment\n\n\nclass A:\n    pass\n',
    "中文分词测试：今天天气很好。我们去公园散步吧！",
    "Emoji: 😀😃🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ✨ stars",
    "Accents: café naïve résumé Ångström Ελληνικά Русский текст العربية हिन्दी",
    "   leading spaces,   runs   of   spaces,\t\ttabs,\n\n\nnewlines \r\n and trailing   ",
    " " * 40 + "\n" * 7 + "\t" * 5,
    "numbers 1234567890 12,345.67 0x1F 1e-5",
    "a<|endoftext|>b <|endoftext|> <|endoftext|><|endoftext|> end",
    "",
    "x",
]
SPECIAL_TEXT = "Before<|endoftext|> after <|endoftext|>"


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded random strings from a pool mixing scripts, emoji, digits, punctuation, spaces."""
    pool = "aZ09 \t\n\r.,;'\"!?-_<|>()[]{}ßéñø中文字日本語한국어😀🎉👍🏽\u200d\u00a0ÅΩж"
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """GPT-2 as tiktoken builds it (its ``gpt2``/``r50k_base`` encoding): the shipped ranks
    file, checked by tiktoken against the published hash, tiktoken's pattern and special token;
    nothing from mlxgpt's code."""
    from importlib.resources import as_file, files

    with as_file(files("mlxgpt").joinpath("assets", "gpt2.tiktoken")) as ranks:
        mergeable_ranks = load_tiktoken_bpe(str(ranks), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=TIKTOKEN_GPT2_PATTERN,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return SHAKESPEARE.read_text()[:20000] if SHAKESPEARE.is_file() else TEXTS[1] * 200


# --------------------------------------------------------------------------- GPT-2


def test_packaged_ranks_are_gpt2():
    from importlib.resources import files

    data = files("mlxgpt").joinpath("assets", "gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == RANKS_SHA256
    tok = gpt2_tokenizer()
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2_tokenizer() is tok  # cached


def test_gpt2_ids_match_tiktoken(reference, corpus_text):
    tok = gpt2_tokenizer()
    for text in [*TEXTS, corpus_text, *_random_texts(300)]:
        # allow_special=False: "<|endoftext|>" is ordinary text
        assert tok.encode(text) == reference.encode(text, disallowed_special=()), text
        assert tok.encode(text, allow_special=True) == reference.encode(
            text, allowed_special="all"
        ), text


def test_gpt2_endoftext_handling():
    tok = gpt2_tokenizer()
    plain = tok.encode(SPECIAL_TEXT)
    special = tok.encode(SPECIAL_TEXT, allow_special=True)
    assert 50256 not in plain
    assert special.count(50256) == 2
    assert tok.decode(plain) == tok.decode(special) == SPECIAL_TEXT
    assert tok.decode([50256]) == EOT


@pytest.mark.parametrize("make", [gpt2_tokenizer, byte_tokenizer], ids=["gpt2", "byte"])
def test_round_trip(make, corpus_text):
    tok = make()
    for text in [*TEXTS, corpus_text, *_random_texts(100, seed=1)]:
        for allow in (False, True):
            ids = tok.encode(text, allow_special=allow)
            assert tok.decode(ids) == text
            assert tok.decode_bytes(ids) == text.encode()


def test_decode_accepts_arrays():
    tok = gpt2_tokenizer()
    ids = tok.encode("array input")
    assert tok.decode(np.array(ids)) == tok.decode(mx.array(ids)) == "array input"


def test_bad_ids_are_refused():
    for tok in (gpt2_tokenizer(), byte_tokenizer(), IdTokenizer(10)):
        for bad in (-1, tok.vocab_size):
            with pytest.raises(MlxgptError, match="not in the tokenizer's vocabulary"):
                tok.decode([0, bad])


# --------------------------------------------------------------------------- streaming


def _streamed(tok, ids) -> list[str]:
    dec = tok.stream_decoder()
    return [dec.add(i) for i in ids] + [dec.flush()]


def test_stream_equals_full_decode(corpus_text):
    tok = gpt2_tokenizer()
    split_chars = 0
    for text in [*TEXTS, corpus_text[:3000], *_random_texts(100, seed=2)]:
        ids = tok.encode(text, allow_special=True)
        pieces = _streamed(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # never a broken character
        split_chars += sum(not _is_utf8(tok.token_bytes(i)) for i in ids)
    assert split_chars > 20  # the texts really have characters split across tokens


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_holds_back_split_character_and_keeps_spaces():
    tok = gpt2_tokenizer()
    ids = tok.encode(" 😀")
    assert len(ids) >= 2  # the emoji's 4 bytes span tokens
    pieces = _streamed(tok, ids)
    assert "".join(pieces) == " 😀"
    assert all(p in ("", " ", " 😀", "😀") for p in pieces)
    assert _streamed(tok, tok.encode(" Hello world"))[:2] == [" Hello", " world"]


def test_stream_of_invalid_bytes_matches_decode():
    """Random token sequences (GPT-2 tokens that are partial UTF-8, raw bytes): the streamed
    pieces carry the same U+FFFD replacements as decoding all at once."""
    rng = random.Random(3)
    gpt2, byte = gpt2_tokenizer(), byte_tokenizer()
    partial = [i for i in range(50256) if not _is_utf8(gpt2.token_bytes(i))]
    assert len(partial) > 100
    pool = partial + gpt2.encode("a é 中 😀 x")
    saw_replacement = False
    for _ in range(300):
        for tok, ids in (
            (gpt2, [rng.choice(pool) for _ in range(rng.randint(1, 8))]),
            (byte, [rng.randrange(257) for _ in range(rng.randint(1, 12))]),
        ):
            full = tok.decode(ids)
            assert "".join(_streamed(tok, ids)) == full
            saw_replacement |= "\ufffd" in full
    assert saw_replacement


def test_stream_decoder_is_reusable_after_flush():
    tok = byte_tokenizer()
    dec = tok.stream_decoder()
    assert dec.add(0xE4) == "" and dec.flush() == "\ufffd"
    assert [dec.add(b) for b in "中".encode()] == ["", "", "中"]


# --------------------------------------------------------------------------- HF files


def _hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_gpt2_save_and_hf_round_trip(tmp_path, corpus_text):
    tok = gpt2_tokenizer()
    meta = tok.save(tmp_path)
    assert meta == {"type": "gpt2"}
    assert json.loads(json.dumps(meta)) == meta
    packaged = Path(__file__).resolve().parents[1] / "mlxgpt" / "assets" / "gpt2.tiktoken"
    assert (tmp_path / "tokenizer.tiktoken").read_bytes() == packaged.read_bytes()
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[:6] == ["#version: 0.2", "Ġ t", "Ġ a", "h e", "i n", "r e"]
    assert len(merges) == 50001
    assert load_tokenizer(tmp_path, meta) is tok
    assert tokenizer_from_hf_folder(tmp_path) is tok  # GPT-2's vocabulary is recognised

    from transformers import GPT2TokenizerFast

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # a model folder
    for hf in (_hf_tokenizer(tmp_path), GPT2TokenizerFast.from_pretrained(str(tmp_path))):
        for text in [*TEXTS, corpus_text[:5000], *_random_texts(50, seed=4)]:
            ids = tok.encode(text, allow_special=True)
            assert hf.encode(text) == ids, text
            assert hf.decode(ids) == tok.decode(ids)


@pytest.fixture(scope="module", params=["bytelevel", "split"])
def trained(request, corpus_text, tmp_path_factory):
    """A small byte-level BPE trained by Hugging Face tokenizers: special tokens first, so ids
    differ from merge ranks; "split" uses a custom pre-tokenizer regex."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    if request.param == "split":
        regex = r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<pad>", EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([corpus_text, "\n".join(TEXTS[3:6]) * 20], trainer)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save(str(folder / "tokenizer.json"))
    return hf, folder


def test_hf_tokenizer_json_matches_tokenizers(trained, corpus_text):
    hf, folder = trained
    tok = tokenizer_from_hf_folder(folder)
    assert isinstance(tok, BPETokenizer) and tok.name == "bpe"
    assert tok._rank_to_id is not None  # ids differ from merge ranks: the mapping is exercised
    # The trainer stops short of 700 on a small corpus (no shared/ folder): compare to its size.
    expected = (hf.get_vocab_size(), 1, {"<pad>": 0, EOT: 1})
    assert (tok.vocab_size, tok.eot_id, tok.special_tokens) == expected
    for text in [*TEXTS, corpus_text[:5000], *_random_texts(100, seed=5)]:
        ids = tok.encode(text, allow_special=True)
        assert ids == hf.encode(text).ids, text
        assert tok.decode(ids) == text
        assert "".join(_streamed(tok, ids)) == text
    assert 1 not in tok.encode(SPECIAL_TEXT)


def test_bpe_save_round_trip(trained, tmp_path, corpus_text):
    _, folder = trained
    tok = tokenizer_from_hf_folder(folder)
    meta = tok.save(tmp_path)
    assert meta["type"] == "bpe" and meta["special_tokens"] == {"<pad>": 0, EOT: 1}
    meta = json.loads(json.dumps(meta))  # as stored in config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "mlxgpt": meta}))
    reloaded = load_tokenizer(tmp_path, meta)
    from_files = tokenizer_from_hf_folder(tmp_path)
    hf = _hf_tokenizer(tmp_path)
    for text in [*TEXTS, corpus_text[:3000], *_random_texts(50, seed=6)]:
        ids = tok.encode(text, allow_special=True)
        assert reloaded.encode(text, allow_special=True) == ids
        assert from_files.encode(text, allow_special=True) == ids
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == tok.decode(ids)


def test_vocab_merges_with_ids_not_in_merge_order(tmp_path):
    """A hand-made vocab.json/merges.txt whose ids do not follow merge order."""
    byte_chars = json.loads(json.dumps(_gpt2_byte_chars()))
    vocab = {c: 300 - i for i, c in enumerate(byte_chars)}  # bytes numbered backwards
    vocab.update({"ab": 3, "abc": 1, "Ġab": 2, EOT: 0})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab c\nĠ ab\n")
    tok = tokenizer_from_hf_folder(tmp_path)
    assert tok.encode("abc abx") == [1, 2, vocab["x"]]
    assert tok.encode(EOT, allow_special=True) == [0] and tok.eot_id == 0
    assert tok.decode([1, 2, 0]) == "abc ab" + EOT
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))  # no config: name the class
    assert hf.encode("abc abx abcab") == tok.encode("abc abx abcab")


def test_inconsistent_merges_warn(tmp_path):
    """'abc' made by 'a bc' while 'a b' ranks first: HF never reaches 'abc' but tiktoken would."""
    vocab = {c: i for i, c in enumerate(_gpt2_byte_chars())} | {"ab": 256, "bc": 257, "abc": 258}
    _vocab_files(tmp_path, json.dumps(vocab), "a b\nb c\na bc\n")
    with pytest.warns(UserWarning, match="not self-consistent"):
        tokenizer_from_hf_folder(tmp_path)


def _gpt2_byte_chars() -> list[str]:
    from mlxgpt.tokenizers.hf_files import byte_to_char

    return [byte_to_char()[b] for b in range(256)]


# --------------------------------------------------------------------------- byte, ids


def test_byte_tokenizer(tmp_path):
    tok = byte_tokenizer()
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.encode("a" + EOT, allow_special=True) == [97, 256]
    assert tok.encode("a" + EOT) == list(("a" + EOT).encode())
    meta = tok.save(tmp_path)
    assert meta == {"type": "byte"}
    assert load_tokenizer(tmp_path, meta) is tok
    assert tokenizer_from_hf_folder(tmp_path) is tok  # recognised from its HF files
    hf = _hf_tokenizer(tmp_path)
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text, allow_special=True)


def test_id_tokenizer(tmp_path):
    tok = IdTokenizer(100)
    with pytest.raises(MlxgptError, match="no tokenizer"):
        tok.encode("hello")
    assert tok.decode([5, 42]) == "<5><42>"
    assert "".join(_streamed(tok, [5, 42])) == "<5><42>"
    assert tok.eot_id is None
    meta = tok.save(tmp_path)
    assert meta == {"type": "ids", "vocab_size": 100} and list(tmp_path.iterdir()) == []
    assert load_tokenizer(tmp_path, meta).vocab_size == 100
    # A folder with neither a description nor tokenizer files works on ids only.
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 123}))
    bare = load_tokenizer(tmp_path, None)
    assert isinstance(bare, IdTokenizer) and bare.vocab_size == 123
    assert tokenizer_from_hf_folder(tmp_path) is None


# --------------------------------------------------------------------------- bad files


def _vocab_files(folder: Path, vocab: str, merges: str) -> None:
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


BYTE_VOCAB = json.dumps({c: i for i, c in enumerate(_gpt2_byte_chars())} | {"ab": 256})


@pytest.mark.parametrize(
    "files, message",
    [
        ({"vocab.json": '{"a": 0', "merges.txt": ""}, "vocab.json: not valid JSON"),
        ({"vocab.json": "[1, 2]", "merges.txt": ""}, "non-empty JSON object"),
        ({"vocab.json": '{"a": "x"}', "merges.txt": ""}, "expected an integer"),
        ({"vocab.json": BYTE_VOCAB, "merges.txt": "a b c\n"}, "merge 1 .* not two tokens"),
        ({"vocab.json": BYTE_VOCAB, "merges.txt": "a b\nq z\n"}, "merge 2 .* not in the vocab"),
        ({"vocab.json": '{"a": 0, "b": 1}', "merges.txt": ""}, "lacks 254 of the 256 bytes"),
        ({"vocab.json": BYTE_VOCAB}, "no merges.txt"),
        ({"tokenizer.json": '{"model": {"type": "BPE"'}, "tokenizer.json: not valid JSON"),
        ({"tokenizer.json": '{"model": {"type": "WordPiece", "vocab": {}}}'}, "not a BPE"),
        (
            {
                "tokenizer.json": json.dumps(
                    {
                        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                        "pre_tokenizer": {"type": "Whitespace"},
                    }
                )
            },
            "unsupported pre_tokenizer",
        ),
    ],
)
def test_bad_files_error_cleanly(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(MlxgptError, match=message) as err:
        tokenizer_from_hf_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_more_bad_input(tmp_path):
    (tmp_path / "merges.txt").write_bytes(b"\xff\xfe bad")
    (tmp_path / "vocab.json").write_text(BYTE_VOCAB)
    with pytest.raises(MlxgptError, match="merges.txt: cannot read"):
        tokenizer_from_hf_folder(tmp_path)
    with pytest.raises(MlxgptError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path, {"type": "wordpiece"})
    with pytest.raises(MlxgptError, match="tokenizer files .* missing"):
        load_tokenizer(tmp_path / "nowhere", {"type": "bpe"})
    with pytest.raises(MlxgptError, match="line 2 is not"):
        read_tiktoken_ranks(b"IQ== 0\nnot-base64!! x\n", "bad.tiktoken")
