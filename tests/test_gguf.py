"""GGUF out and in: ``mlxgpt export --format gguf`` and ``mlxgpt convert model.gguf``.

Files are checked with the ``gguf`` package's reader (keys, tensor names and types), round trips
compare weights and tokenizer ids, and llama.cpp itself (``llama-cpp-python``) tokenizes and
decodes the exported files: its greedy continuations must equal mlxgpt's for f32 and f16, and
q8_0's agree within the bounds measured by ``tools/gguf_agreement.py`` (README, "GGUF"). Tests
that need llama.cpp skip when ``llama_cpp`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

gguf = pytest.importorskip("gguf")

import mlxgpt  # noqa: E402
from mlxgpt.checkpoints import gguf as mlx_gguf  # noqa: E402
from mlxgpt.checkpoints.folder import (  # noqa: E402
    load_model,
    save_classifier,
    save_model,
    shipped_model,
)
from mlxgpt.checkpoints.gguf import read_gguf, write_gguf  # noqa: E402
from mlxgpt.checkpoints.quantize import dequantized_weights, quantize  # noqa: E402
from mlxgpt.core.classifier import GPTClassifier  # noqa: E402
from mlxgpt.tokenizers import (  # noqa: E402
    EOT,
    BPETokenizer,
    IdTokenizer,
    byte_tokenizer,
    gpt2_tokenizer,
    tokenizer_from_hf_folder,
)

_spec = importlib.util.spec_from_file_location(
    "gguf_agreement", Path(__file__).resolve().parents[1] / "tools" / "gguf_agreement.py")
agreement = importlib.util.module_from_spec(_spec)
sys.modules["gguf_agreement"] = agreement
_spec.loader.exec_module(agreement)

T = gguf.GGMLQuantizationType
TEXTS = [
    "Hello world! The king said to them,\n  hello 123 don't.",
    "  leading spaces, tabs\tand\nnew\n\nlines   ",
    "I'll say WE'RE they've you'd 12345 67.8 3,000",
    "unicode: naïve café — 日本語 😀 ünïcödé\u00a0nbsp",
    "<|endoftext|> written as text, and code: def f(x):\n    return x ** 2\n",
]


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def tiny(tiny_model, **config):
    return agreement.randomize_norms(tiny_model(**config))


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


# --------------------------------------------------------------------------- the file


def test_file_has_llama_cpp_gpt2_keys_tensors_and_vocabulary(tmp_path, tiny_model):
    model = tiny(tiny_model, vocab_size=50257)
    info = write_gguf(model, gpt2_tokenizer(), tmp_path / "m.gguf", "f16")
    assert info.dtype == "f16" and info.tokenizer == "gpt2"
    kv, tensors = fields(tmp_path / "m.gguf")
    assert kv["general.architecture"] == "gpt2" and kv["general.file_type"] == 1
    assert (kv["gpt2.context_length"], kv["gpt2.embedding_length"], kv["gpt2.feed_forward_length"],
            kv["gpt2.block_count"], kv["gpt2.attention.head_count"]) == (64, 32, 128, 2, 2)
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == 50257 and tokens[50256] == EOT and tokens[220] == "Ġ"
    assert tokens[464] == "The" and tokens[262] == "Ġthe"  # GPT-2's own numbering
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {1}
    merges = kv["tokenizer.ggml.merges"]
    assert merges[:2] == ["Ġ t", "Ġ a"] and len(merges) == 50000
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == 50256
    assert kv["tokenizer.ggml.add_bos_token"] is False
    blk = [f"blk.{i}.{n}.{leaf}" for i in range(2) for leaf in ("weight", "bias") for n in
           ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]
    assert set(tensors) == {"token_embd.weight", "position_embd.weight", "output_norm.weight",
                            "output_norm.bias", *blk}  # tied: no output.weight
    assert tensors["blk.1.attn_qkv.weight"].shape.tolist() == [32, 96]  # ggml order: (in, out)
    assert tensors["blk.1.ffn_down.weight"].shape.tolist() == [128, 32]
    assert tensors["token_embd.weight"].tensor_type == T.F16
    assert tensors["position_embd.weight"].tensor_type == T.F32
    assert tensors["blk.0.attn_norm.bias"].tensor_type == T.F32


def test_q8_0_types_and_rows_that_cannot_be_blocked(tmp_path, tiny_model):
    model = tiny(tiny_model, n_embd=48, n_head=2)  # rows of 48: not Q8_0's blocks of 32
    info = write_gguf(model, byte_tokenizer(), tmp_path / "q.gguf", "q8_0")
    _, tensors = fields(tmp_path / "q.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q8_0  # rows of 192
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == T.F16
    assert tensors["position_embd.weight"].tensor_type == T.F32
    # wte and, per block, attn_qkv, attn_output and ffn_up read rows of 48
    assert info.kept_f16 == 7 and "7 tensors kept f16" in info.line()


def test_byte_vocabulary_gets_one_inert_merge_and_comes_back(tmp_path, tiny_model):
    write_gguf(tiny(tiny_model, vocab_size=300), byte_tokenizer(), tmp_path / "b.gguf", "f32")
    kv, _ = fields(tmp_path / "b.gguf")
    assert kv["tokenizer.ggml.merges"] == [mlx_gguf.INERT_MERGE]
    tokens = kv["tokenizer.ggml.tokens"]
    assert tokens[256] == EOT and tokens[299] == "[PAD299]" and len(tokens) == 300
    assert kv["tokenizer.ggml.token_type"][299] == gguf.TokenType.UNUSED
    model, tok = read_gguf(tmp_path / "b.gguf")
    assert tok is byte_tokenizer() and model.config.vocab_size == 300


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_f32_round_trip_through_the_cli_is_exact(tmp_path, model_folder, cli_ok, tokenizer):
    folder = model_folder(tmp_path, tokenizer)
    out = cli_ok("export", "--format", "gguf", folder, tmp_path / "m.gguf", "--dtype", "f32")
    assert out.stdout.startswith(f"wrote {tmp_path / 'm.gguf'}: GGUF f32")
    cli_ok("convert", tmp_path / "m.gguf", tmp_path / "back")
    a, b = load_model(folder), load_model(tmp_path / "back")
    assert a.config == b.config
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    tok_a, tok_b = mlxgpt.load(folder)[1], mlxgpt.load(tmp_path / "back")[1]
    assert tok_b is (gpt2_tokenizer() if tokenizer == "gpt2" else byte_tokenizer())
    assert [tok_b.encode(t) for t in TEXTS] == [tok_a.encode(t) for t in TEXTS]


def test_f16_round_trip_is_the_f16_rounding(tmp_path, tiny_model):
    model = tiny(tiny_model)
    write_gguf(model, byte_tokenizer(), tmp_path / "h.gguf", "f16")
    back, _ = read_gguf(tmp_path / "h.gguf")
    assert back.wte.weight.dtype == mx.float16  # every matrix F16: read as float16
    want = {k: v.astype(np.float16) for k, v in params(model).items()}
    for k, v in params(back).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    wider, _ = read_gguf(tmp_path / "h.gguf", mx.float32)
    np.testing.assert_array_equal(np.array(wider.h[1].mlp.c_fc.weight),
                                  want["h.1.mlp.c_fc.weight"].astype(np.float32))


def test_q8_0_round_trip_is_within_one_quantization_step(tmp_path, tiny_model):
    model = tiny(tiny_model)
    write_gguf(model, byte_tokenizer(), tmp_path / "q.gguf", "q8_0")
    back, _ = read_gguf(tmp_path / "q.gguf")
    assert back.wte.weight.dtype == mx.float32  # Q8_0 values are exact in float32
    want, got = params(model), params(back)
    for k, w in want.items():
        if w.ndim == 1 or k == "wpe.weight":
            np.testing.assert_array_equal(got[k], w, err_msg=k)  # kept F32
            continue
        blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)  # per block of 32
        step = np.broadcast_to(blocks / 127, blocks.shape[:-1] + (32,)).reshape(w.shape)
        err = np.abs(got[k] - w)
        # half a step (rounding) + up to 127 steps x the float16 scale's relative error
        assert (err <= step * (0.5 + 127 * 2**-11)).all(), k
        assert err.max() > 0, k  # it was quantized


def test_shipped_english_round_trips_weights_and_tokenizer(tmp_path, cli_ok):
    cli_ok("export", "--format", "gguf", "english", tmp_path / "en.gguf")  # f16: as stored
    cli_ok("convert", tmp_path / "en.gguf", tmp_path / "back")
    a, b = load_model(shipped_model("english")), load_model(tmp_path / "back")
    assert replace(a.config, dropout=0.0) == b.config  # dropout is training's, not GGUF's
    assert b.wte.weight.dtype == mx.float16
    pa, pb = params(a), params(b)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa) and pa.keys() == pb.keys()
    tok_a, tok_b = mlxgpt.load("english")[1], mlxgpt.load(tmp_path / "back")[1]
    assert tok_b.vocab_size == 8192 and tok_b.eot_id == 8191
    assert [tok_b.encode(t) for t in TEXTS] == [tok_a.encode(t) for t in TEXTS]
    assert tok_b.encode(EOT, allow_special=True) == [8191]


def test_untied_output_and_a_copied_embedding(tmp_path, tiny_model):
    model = tiny(tiny_model, tie_word_embeddings=False)
    write_gguf(model, byte_tokenizer(), tmp_path / "u.gguf", "f32")
    _, tensors = fields(tmp_path / "u.gguf")
    assert "output.weight" in tensors
    back, _ = read_gguf(tmp_path / "u.gguf")
    assert not back.config.tie_word_embeddings
    np.testing.assert_array_equal(np.array(back.lm_head.weight), np.array(model.lm_head.weight))
    model.lm_head.weight = model.wte.weight  # an output tensor that copies the embedding
    write_gguf(model, byte_tokenizer(), tmp_path / "c.gguf", "f32")
    assert read_gguf(tmp_path / "c.gguf")[0].config.tie_word_embeddings


def test_quantized_model_is_dequantized(tmp_path, tiny_model):
    model = tiny(tiny_model, n_embd=64)
    quantize(model, 8, 64)
    write_gguf(model, byte_tokenizer(), tmp_path / "q.gguf", "f32")
    back, _ = read_gguf(tmp_path / "q.gguf")
    want = {k: np.array(v) for k, v in dequantized_weights(model).items()}
    got = params(back)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------------------- refusals


def no_output_left(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir()
                                     if p.name.startswith(f".{out.name}")]


def test_export_refusals(tmp_path, tiny_model, model_folder, cli, refused):
    folder = model_folder(tmp_path, "byte")
    out = tmp_path / "m.gguf"
    out.write_text("keep")
    refused(cli("export", "--format", "gguf", folder, out), "already exists")
    assert out.read_text() == "keep"
    refused(cli("export", folder, tmp_path / "hf", "--dtype", "f16"), "--dtype applies")
    refused(cli("export", "--format", "gguf", tmp_path / "nope", tmp_path / "x.gguf"), "nope")
    cases = {
        "ids": (tiny_model(), IdTokenizer(257), "no tokenizer"),
        "erf": (tiny_model(activation_function="gelu"), byte_tokenizer(), "tanh GELU"),
        "pattern": (tiny_model(), BPETokenizer("bpe", {bytes([i]): i for i in range(256)},
                                               r"\w+|\s+", {EOT: 256}), "own pattern"),
    }
    for name, (model, tok, match) in cases.items():
        save_model(model, tmp_path / name, tok)
        refused(cli("export", "--format", "gguf", tmp_path / name, tmp_path / f"{name}.gguf"),
                match)
        assert no_output_left(tmp_path / f"{name}.gguf")
    save_classifier(GPTClassifier(tiny_model(), ("neg", "pos")), tmp_path / "clf",
                    byte_tokenizer())
    refused(cli("export", "--format", "gguf", tmp_path / "clf", tmp_path / "c.gguf"),
            "classifier")


def test_failed_write_leaves_nothing(tmp_path, model_folder, cli, refused, monkeypatch):
    def full_disk(self, *args, **kwargs):
        self.fout[0].write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    out = tmp_path / "m.gguf"
    refused(cli("export", "--format", "gguf", model_folder(tmp_path), out), "No space left")
    assert no_output_left(out)


def write_variant(tmp_path: Path, tiny_model, monkeypatch, **patches) -> Path:
    """A small valid GGUF written with some of the writer's steps replaced."""
    with monkeypatch.context() as m:
        for target, value in patches.items():
            obj, attr = (gguf.GGUFWriter, target) if hasattr(gguf.GGUFWriter, target) \
                else (mlx_gguf, target)
            m.setattr(obj, attr, value)
        write_gguf(tiny_model(), byte_tokenizer(), tmp_path / "v.gguf", "f32", force=True)
    return tmp_path / "v.gguf"


def test_convert_refusals(tmp_path, tiny_model, cli, refused, monkeypatch):
    def convert_refused(src: Path, match: str) -> None:
        refused(cli("convert", src, tmp_path / "out"), match)
        assert no_output_left(tmp_path / "out")

    falcon = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    falcon.write_header_to_file()
    falcon.write_kv_data_to_file()
    falcon.write_tensors_to_file()
    falcon.close()
    convert_refused(tmp_path / "falcon.gguf", "architecture 'falcon'")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(40)))
    convert_refused(tmp_path / "junk.gguf", "not a readable GGUF file")
    (tmp_path / "text.gguf").write_text("hello")
    convert_refused(tmp_path / "text.gguf", "not a readable GGUF file")
    convert_refused(tmp_path / "missing.gguf", "no such file")
    q4 = write_variant(tmp_path, tiny_model, monkeypatch,
                       _tensor_type=lambda g, name, shape, dtype:
                       T.Q4_0 if len(shape) == 2 else T.F32)
    convert_refused(q4, "is Q4_0; mlxgpt reads F32, F16 and Q8_0")
    pre = write_variant(tmp_path, tiny_model, monkeypatch, add_tokenizer_pre=lambda self, p:
                        self.add_string("tokenizer.ggml.pre", "llama3"))
    convert_refused(pre, "pre-tokeniser 'llama3'")
    refused(cli("convert", pre, tmp_path / "out", "--revision", "main"), "--revision")
    real = mlx_gguf.gguf_vocab

    def one_more(tok, n, *rest):
        v = real(tok, n, *rest)
        return {**v, "tokens": [*v["tokens"], "x"], "types": [*v["types"], 1]}

    convert_refused(write_variant(tmp_path, tiny_model, monkeypatch, gguf_vocab=one_more),
                    "258 tokens but 257 embedding rows")


# --------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def shipped_gguf(tmp_path_factory):
    """The shipped models' f16 GGUF files (their stored precision)."""
    tmp = tmp_path_factory.mktemp("gguf")
    return {name: write_gguf(*mlxgpt.load(name), tmp / f"{name}.gguf", "f16").path
            for name in ("shakespeare", "english")}


def test_llama_cpp_tokenizes_and_decodes_like_mlxgpt(llama_cpp, shipped_gguf, tmp_path,
                                                     tiny_model):
    write_gguf(tiny_model(vocab_size=50257), gpt2_tokenizer(), tmp_path / "g.gguf", "f16")
    files = {**shipped_gguf, "gpt2": tmp_path / "g.gguf"}
    toks = {"shakespeare": byte_tokenizer(), "english": mlxgpt.load("english")[1],
            "gpt2": gpt2_tokenizer()}
    for name, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        tok = toks[name]
        for text in TEXTS:
            ids = tok.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, (name, text)
            assert llm.detokenize(ids) == tok.decode_bytes(ids), (name, text)
        eot = llm.tokenize(f"a{EOT}b".encode(), add_bos=False, special=True)
        assert eot == tok.encode(f"a{EOT}b", allow_special=True), name
        assert llm.token_eos() == tok.eot_id
        llm.close()


def test_llama_cpp_reads_a_vocabulary_numbered_unlike_gpt2(llama_cpp, tmp_path, tiny_model):
    """Hugging Face files with <|endoftext|> at id 0 and every other id one higher (mlxgpt maps
    ranks to ids; the GGUF lists tokens by id)."""
    src = json.loads((shipped_model("english") / "vocab.json").read_text(encoding="utf-8"))
    vocab = {s: (0 if s == EOT else i + 1) for s, i in src.items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(shipped_model("english") / "merges.txt", hf / "merges.txt")
    tok = tokenizer_from_hf_folder(hf)
    assert tok.name == "bpe" and tok.eot_id == 0 and tok.encode("The") == [318]
    write_gguf(tiny_model(vocab_size=8192), tok, tmp_path / "v.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids) == tok.decode_bytes(ids), text
    llm.close()
    back = read_gguf(tmp_path / "v.gguf")[1]
    assert [back.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


# q8_0 bounds: tools/gguf_agreement.py's measurement on these prompts, with some margin
# (8 prompts x 32 tokens: shakespeare 227/256, english 256/256; README, "GGUF").
Q8_BOUND = {"shakespeare": 0.80, "english": 0.95}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ["shakespeare", "english"])
def test_llama_cpp_greedy_equals_mlxgpt_on_shipped_models(llama_cpp, tmp_path, name, dtype):
    model, tok = mlxgpt.load(name)
    a = agreement.measure(name, model, tok, dtype, agreement.PROMPTS[:4], 24, tmp_path)
    if dtype == "q8_0":
        assert a.tokens_agreed >= Q8_BOUND[name] * a.tokens, a.row()
    else:
        assert a.prompts_equal == a.prompts, a.row()


def test_llama_cpp_greedy_equals_mlxgpt_on_english_chat(llama_cpp, tmp_path):
    model, tok = mlxgpt.load("english-chat")
    a = agreement.measure("english-chat", model, tok, "f16", agreement.PROMPTS[3:5], 24, tmp_path)
    assert a.prompts_equal == a.prompts, a.row()


@pytest.mark.slow
def test_llama_cpp_greedy_equals_mlxgpt_on_gpt2_124m_shape(llama_cpp, tmp_path):
    for dtype in ("f32", "f16"):
        model, tok = agreement.random_gpt2_shape()
        a = agreement.measure("gpt2-shape", model, tok, dtype, agreement.PROMPTS[:2], 12,
                              tmp_path)
        assert a.prompts_equal == a.prompts, a.row()
