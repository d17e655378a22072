"""Prompt cache files: generation after a cached prefix is generation after reading it, and a
cache from another model, another tokenizer, or a damaged file is refused in one line."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_map

import mlxgpt
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.generate import stream_generate
from mlxgpt.generation.prompt_cache import (
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlxgpt.generation.sample import SamplingSettings

GREEDY = SamplingSettings(temperature=0)
PREFIX = "A long preamble that every request shares, read once. " * 3  # 162 bytes
CONFIG = {"n_positions": 256}


def tokens_and_final(model, tok, prompt, **kw):
    rs = list(stream_generate(model, tok, prompt, max_tokens=30, sampling=GREEDY,
                              stop_at_eos=False, **kw))
    return [r.token for r in rs[:-1]], rs[-1]


@pytest.fixture()
def folder_and_cache(tmp_path, model_folder, cli_ok):
    folder = model_folder(tmp_path, **CONFIG)
    (tmp_path / "prefix.txt").write_text(PREFIX)
    cache = tmp_path / "prefix.safetensors"
    out = cli_ok("cache-prompt", "--model", folder, "--prompt", tmp_path / "prefix.txt",
                 "--out", cache)
    assert f"cached {len(PREFIX)} tokens" in out.output and cache.is_file()
    return folder, cache


def test_generation_after_the_cache_is_generation_after_the_prefix(folder_and_cache):
    folder, cache = folder_and_cache
    model, tok = mlxgpt.load(folder)
    for suffix in ("Then", ""):
        want, plain = tokens_and_final(model, tok, PREFIX + suffix)
        got, final = tokens_and_final(model, tok, suffix, prompt_cache=cache)
        assert got == want
        assert final.cached_tokens == len(PREFIX) and final.prompt_tokens == plain.prompt_tokens


def test_the_file_holds_ids_keys_values_and_identity(folder_and_cache):
    folder, cache = folder_and_cache
    arrays, meta = mx.load(str(cache), return_metadata=True)
    assert arrays["tokens"].tolist() == list(PREFIX.encode())
    assert arrays["keys.0"].shape == (1, 2, len(PREFIX), 16)  # (1, H, N, D)
    assert meta["format"] == "mlxgpt-prompt-cache" and meta["n_tokens"] == str(len(PREFIX))
    assert json.loads(meta["config"])["n_layer"] == 2 and len(meta["tokenizer"]) == 64
    assert not list(Path(cache).parent.glob(".*tmp*"))  # written through a temporary file


def test_the_api_makes_saves_and_reuses_a_cache(tmp_path, tiny_model):
    model, tok = tiny_model(0, **CONFIG), mlxgpt.tokenizers.byte_tokenizer()
    cache = make_prompt_cache(model, tok, PREFIX)
    path = save_prompt_cache(cache, tmp_path / "c.safetensors")
    loaded = load_prompt_cache(path, model, tok)
    assert loaded.tokens == cache.tokens
    want, _ = tokens_and_final(model, tok, PREFIX + " go")
    assert tokens_and_final(model, tok, " go", prompt_cache=loaded)[0] == want
    assert tokens_and_final(model, tok, " go", prompt_cache=cache)[0] == want
    draft = tiny_model(1, n_layer=1, **CONFIG)  # a draft reads the prefix itself
    assert tokens_and_final(model, tok, " go", prompt_cache=cache, draft_model=draft)[0] == want


def test_cli_generate_continues_from_the_cache(folder_and_cache, cli_ok):
    folder, cache = folder_and_cache
    args = ["generate", "--model", folder, "-n", "20", "--temp", "0", "--ignore-eos"]
    plain = cli_ok(*args, "--prompt", PREFIX + "Then", "--quiet")
    cached = cli_ok(*args, "--prompt", "Then", "--prompt-cache", cache)
    assert cached.stdout == plain.stdout
    assert f"{len(PREFIX)} cached" in cached.stderr


def test_a_cache_from_another_model_or_tokenizer_is_refused(tmp_path, folder_and_cache,
                                                            model_folder, tiny_model, cli,
                                                            refused):
    folder, cache = folder_and_cache
    args = ["generate", "-n", "5", "--prompt-cache", cache, "--model"]
    other_weights = model_folder(tmp_path, seed=7, **CONFIG)
    line = refused(cli(*args, other_weights), "was made by another model")
    assert "differ" in line
    other_shape = model_folder(tmp_path, seed=0, name="wide", n_embd=64, **CONFIG)
    refused(cli(*args, other_shape), "n_embd 32, this model's 64")
    gpt2_tok = model_folder(tmp_path, tokenizer="gpt2", **CONFIG)
    refused(cli(*args, gpt2_tok), "was made by another model")  # its vocabulary differs
    # same weights and shapes, another tokenizer: caught by the tokenizer digest
    model, _ = mlxgpt.load(folder)
    ids_only = mlxgpt.checkpoints.folder.save_model(
        model, tmp_path / "ids", mlxgpt.tokenizers.IdTokenizer(257))
    refused(cli("generate", "-n", "5", "--prompt-cache", cache, "--model", ids_only,
                "--prompt", ""), "another tokenizer")


def test_slightly_changed_weights_are_caught(folder_and_cache):
    """A small change (weights x (1 + 1e-3 noise)) changes the keys beyond float32
    rounding; the same model passes (its difference is rounding: well below the tolerance)."""
    folder, cache = folder_and_cache
    model, tok = mlxgpt.load(folder)
    load_prompt_cache(cache, model, tok)  # the model that made it
    mx.random.seed(0)
    model.update(tree_map(lambda a: a * (1 + 1e-3 * mx.random.normal(a.shape)),
                          model.parameters()))
    with pytest.raises(MlxgptError, match="was made by another model"):
        load_prompt_cache(cache, model, tok)


def test_damaged_or_foreign_files_are_refused(tmp_path, folder_and_cache, cli, refused):
    folder, cache = folder_and_cache
    args = ["generate", "--model", folder, "-n", "5", "--prompt-cache"]
    data = cache.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    refused(cli(*args, cut), "not a readable prompt cache")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    refused(cli(*args, junk), "not a readable prompt cache")
    refused(cli(*args, Path(folder) / "model.safetensors"), "not an mlxgpt prompt cache")
    refused(cli(*args, tmp_path / "missing.safetensors"), "not found")
    arrays, meta = mx.load(str(cache), return_metadata=True)
    del arrays["values.1"]
    mx.save_safetensors(str(tmp_path / "partial.safetensors"), arrays, metadata=meta)
    refused(cli(*args, tmp_path / "partial.safetensors"), "lacks layer 1")
    arrays, meta = mx.load(str(cache), return_metadata=True)
    arrays["keys.0"] = arrays["keys.0"] + 1.0
    mx.save_safetensors(str(tmp_path / "edited.safetensors"), arrays, metadata=meta)
    refused(cli(*args, tmp_path / "edited.safetensors"), "differ")


def test_cache_prompt_refuses_bad_input(tmp_path, model_folder, cli, refused):
    folder = model_folder(tmp_path)  # 64 positions
    (tmp_path / "long.txt").write_text("x" * 100)
    (tmp_path / "empty.txt").write_text("")
    args = ["cache-prompt", "--model", folder, "--out", tmp_path / "c.safetensors", "--prompt"]
    refused(cli(*args, tmp_path / "long.txt"), "the model's context is 64")
    refused(cli(*args, tmp_path / "empty.txt"), "the prompt is empty")
    refused(cli(*args, tmp_path / "nope.txt"), "file not found")
    assert not (tmp_path / "c.safetensors").exists()
