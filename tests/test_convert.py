"""mlxgpt convert / export: formats, options, tokenizers, the .bin reader, and bad input.

Numerical parity with transformers is in test_parity.py; here the converted models are
compared with the source weights or with each other.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _hf_helpers import SMALL, make_hf_checkpoint, read_config  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import mlxgpt  # noqa: E402
from mlxgpt.checkpoints.folder import load_model  # noqa: E402
from mlxgpt.checkpoints.hub import resolve_source  # noqa: E402
from mlxgpt.checkpoints.torch_pickle import load_torch_bin  # noqa: E402


@pytest.fixture
def assert_refused(refused):
    """The standard refusal (see conftest), and nothing left where the output would go."""

    def check(result, match: str, out: Path | None = None) -> None:
        refused(result, match)
        if out is not None:
            assert not out.exists()
            assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]

    return check


@pytest.fixture
def assert_convert_refused(cli, assert_refused):
    def check(src: Path, tmp_path: Path, match: str) -> None:
        out = tmp_path / "out"
        assert_refused(cli("convert", src, out), match, out)

    return check


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    """Valid small HF folders (safetensors and .bin); tests copy them before changing them."""
    tmp = tmp_path_factory.mktemp("src")
    return {fmt: make_hf_checkpoint(tmp, SMALL, fmt) for fmt in ("safetensors", "bin")}


@pytest.fixture
def src(small_src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(small_src["safetensors"], dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    cfg = read_config(folder)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- working conversions


def test_cli_convert_prints_summary_and_loads(src, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("convert", src, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}:") and "parameters" in result.stdout
    assert "token ids only" in result.stderr  # vocab 101 and no tokenizer files: a warning
    model, tok = mlxgpt.load(str(out))
    assert tok.name == "ids" and tok.vocab_size == 101
    weights = load_file(src / "model.safetensors")
    # Conv1D weights arrive transposed into MLX's (out, in) layout.
    np.testing.assert_array_equal(np.array(model.h[1].attn.c_attn.weight),
                                  weights["transformer.h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(np.array(model.wte.weight), weights["transformer.wte.weight"])


def test_bin_and_safetensors_give_the_same_model(small_src, tmp_path, cli):
    for fmt, folder in small_src.items():
        assert cli("convert", folder, tmp_path / fmt).exit_code == 0
    a, b = (load_model(tmp_path / fmt) for fmt in small_src)
    tokens = mx.array([[1, 5, 7, 100]])
    np.testing.assert_array_equal(np.array(a(tokens)), np.array(b(tokens)))


def test_gpt2_vocab_without_tokenizer_files_gets_gpt2_bpe(tmp_path, cli):
    src = make_hf_checkpoint(tmp_path, {"n_layer": 1, "n_embd": 16, "n_head": 2,
                                        "n_positions": 8})  # vocab_size defaults to 50257
    result = cli("convert", src, tmp_path / "out")
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert read_config(tmp_path / "out")["mlxgpt"]["tokenizer"]["type"] == "gpt2"
    _, tok = mlxgpt.load(str(tmp_path / "out"))
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]


def test_tokenizer_files_in_source_are_used(tmp_path, cli):
    src = make_hf_checkpoint(tmp_path, {"n_layer": 1, "n_embd": 16, "n_head": 2,
                                        "n_positions": 8}, tokenizer=True)
    assert cli("convert", src, tmp_path / "out").exit_code == 0
    _, tok = mlxgpt.load(str(tmp_path / "out"))
    assert tok.name == "gpt2" and tok.decode(tok.encode("naïve 😀")) == "naïve 😀"


def test_dtype_option_and_auto_dtype_on_load(src, tmp_path, cli):
    out = tmp_path / "fp16"
    assert cli("convert", src, out, "--dtype", "float16").exit_code == 0
    assert read_config(out)["torch_dtype"] == "float16"
    assert load_model(out).wte.weight.dtype == mx.float16
    model, _ = mlxgpt.load(str(out))  # auto: the stored dtype on a GPU, float32 on the CPU
    want = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    assert model.h[0].mlp.c_fc.weight.dtype == want
    model, _ = mlxgpt.load(str(out), dtype="bfloat16")
    assert model.h[0].mlp.c_fc.weight.dtype == mx.bfloat16


def test_quantize_skips_layers_not_divisible_by_group(tmp_path, cli):
    cfg = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_inner": 96, "vocab_size": 70,
           "n_positions": 8}
    src = make_hf_checkpoint(tmp_path, cfg)
    result = cli("convert", src, tmp_path / "q", "--quantize", "8", "--group-size", "64")
    assert result.exit_code == 0 and "8-bit (group 64" in result.stdout
    assert read_config(tmp_path / "q")["quantization"] == {"group_size": 64, "bits": 8}
    model = load_model(tmp_path / "q")
    assert "scales" in model.h[0].attn.c_attn and "scales" in model.wte
    assert "scales" not in model.h[0].mlp.c_proj  # input width 96
    assert model.h[0].mlp.c_proj.weight.dtype == mx.float32


def test_bfloat16_bin_keeps_its_bits(tmp_path, cli):
    src = make_hf_checkpoint(tmp_path, SMALL, "bin")
    state = torch.load(src / "pytorch_model.bin")
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, src / "pytorch_model.bin")
    assert cli("convert", src, tmp_path / "out").exit_code == 0
    model = load_model(tmp_path / "out")
    assert model.wpe.weight.dtype == mx.bfloat16
    want = state["transformer.wpe.weight"].to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(np.array(model.wpe.weight.view(mx.int16)), want)


def test_sharded_bin(small_src, tmp_path, cli):
    src = tmp_path / "src"
    shutil.copytree(small_src["bin"], src)
    state = torch.load(src / "pytorch_model.bin")
    (src / "pytorch_model.bin").unlink()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, src / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert cli("convert", src, tmp_path / "a").exit_code == 0
    assert cli("convert", small_src["bin"], tmp_path / "b").exit_code == 0
    tokens = mx.array([[3, 1, 4, 1, 5]])
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    np.testing.assert_array_equal(np.array(a(tokens)), np.array(b(tokens)))


def test_converting_a_model_folder_is_refused(src, tmp_path, cli, assert_refused):
    assert cli("convert", src, tmp_path / "m").exit_code == 0
    assert_refused(cli("convert", tmp_path / "m", tmp_path / "again"), "already an mlxgpt model",
                   tmp_path / "again")


def test_force_replaces_a_folder_mlxgpt_wrote(src, tmp_path, cli, refused):
    out = tmp_path / "out"
    assert cli("convert", src, out, "--dtype", "float16").exit_code == 0
    assert cli("convert", src, out, "--force").exit_code == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")  # not mlxgpt's: --force refuses, deletes nothing
    refused(cli("convert", src, mine, "--force"), "notes.txt")
    assert (mine / "notes.txt").read_text() == "mine"


def test_export_writes_hf_folder_with_tokenizer(tmp_path, cli):
    src = make_hf_checkpoint(tmp_path, {"n_layer": 1, "n_embd": 16, "n_head": 2,
                                        "n_positions": 8})
    assert cli("convert", src, tmp_path / "m").exit_code == 0
    result = cli("export", tmp_path / "m", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= files
    cfg = read_config(tmp_path / "hf")
    assert "mlxgpt" not in cfg and cfg["model_type"] == "gpt2"
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    original = load_file(src / "model.safetensors")
    assert set(exported) == set(original)  # same HF keys, tied head not stored
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v)
    from transformers import GPT2TokenizerFast

    hf_tok = GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("Hello, world!") == [15496, 11, 995, 0]


def test_resolve_source_local_folder(src):
    assert resolve_source(str(src)) == src


# --------------------------------------------------------------------------- the .bin reader


def test_torch_bin_reader_matches_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "f32": torch.randn(3, 5),
        "transposed": torch.randn(5, 3).t(),  # non-contiguous strides
        "offset_view": base[1:, 2:5],  # storage offset + strides into a shared storage
        "shared": base,
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(-1e4),
        "param": torch.nn.Parameter(torch.ones(2)),
        "empty": torch.zeros(0, 3),
    }
    torch.save(state, tmp_path / "x.bin")
    got = load_torch_bin(tmp_path / "x.bin")
    assert set(got) == set(state)
    for k, t in state.items():
        t = t.detach()
        if t.dtype == torch.bfloat16:
            assert got[k].dtype == mx.bfloat16
            np.testing.assert_array_equal(np.array(got[k].view(mx.int16)),
                                          t.view(torch.int16).numpy())
        else:
            np.testing.assert_array_equal(np.array(got[k]), t.numpy())


class _Exploit:
    """Pickles to a call of ``func(arg)``: what a malicious checkpoint does."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _write_bin(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "nested", "torch-internal"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, small_src, how, cli, assert_refused):
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    shutil.copytree(small_src["bin"], src)
    if how == "os.system":
        payload, name = _Exploit(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    elif how == "builtins.exec":
        # protocol 2 (what torch.save uses) writes Python 2's name for the builtins module
        payload, name = _Exploit(builtins.exec, f"open({str(marker)!r}, 'w')"), "__builtin__.exec"
    elif how == "nested":  # a valid-looking state dict with one poisoned entry
        payload = {"wte.weight": _Exploit(os.system, f"touch {marker}")}
        name = f"{os.system.__module__}.system"
    pickled = (b"\x80\x02ctorch.storage\n_load_from_bytes\nq\x00." if how == "torch-internal"
               else pickle.dumps(payload, protocol=2))
    if how == "torch-internal":
        name = "torch.storage._load_from_bytes"
    _write_bin(src / "pytorch_model.bin", pickled)
    out = tmp_path / "out"
    result = cli("convert", src, out)
    assert_refused(result, f"asks for {name}", out)
    assert not marker.exists()


def test_legacy_non_zip_bin_is_refused(tmp_path, small_src, assert_convert_refused):
    src = tmp_path / "src"
    shutil.copytree(small_src["bin"], src)
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    assert_convert_refused(src, tmp_path, "not a zip-format PyTorch checkpoint")


# --------------------------------------------------------------------------- bad input


def test_missing_weights_file(src, tmp_path, assert_convert_refused):
    (src / "model.safetensors").unlink()
    assert_convert_refused(src, tmp_path, "no weights file")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_weights_file(small_src, tmp_path, fmt, assert_convert_refused):
    src = tmp_path / "src"
    shutil.copytree(small_src[fmt], src)
    path = src / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    match = "cannot read weights" if fmt == "safetensors" else "truncated"
    assert_convert_refused(src, tmp_path, match)


def test_wrong_tensor_shape(src, tmp_path, assert_convert_refused):
    weights = load_file(src / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] = np.zeros((48, 100), np.float32)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    assert_convert_refused(
        src, tmp_path, "tensor h.0.mlp.c_fc.weight has shape (100, 48), expected (192, 48)"
    )


def test_missing_tensor(src, tmp_path, assert_convert_refused):
    weights = load_file(src / "model.safetensors")
    del weights["transformer.ln_f.bias"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    assert_convert_refused(src, tmp_path, "missing tensor ln_f.bias")


def test_vocab_size_not_matching_weights(src, tmp_path, assert_convert_refused):
    edit_config(src, vocab_size=102)
    assert_convert_refused(src, tmp_path, "wte.weight has shape (101, 48)")


def test_missing_config_key(src, tmp_path, assert_convert_refused):
    edit_config(src, n_layer=None)
    assert_convert_refused(src, tmp_path, "missing key(s) n_layer")


def test_unknown_config_key(src, tmp_path, assert_convert_refused):
    edit_config(src, rotary_dim=16)
    assert_convert_refused(src, tmp_path, "unknown key(s) rotary_dim")


@pytest.mark.parametrize("change,match", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
])
def test_unsupported_config_option(src, tmp_path, change, match, assert_convert_refused):
    edit_config(src, **change)
    assert_convert_refused(src, tmp_path, match)


def test_missing_config_file(src, tmp_path, assert_convert_refused):
    (src / "config.json").unlink()
    assert_convert_refused(src, tmp_path, "no config.json")


def test_source_not_found(tmp_path, assert_convert_refused):
    assert_convert_refused(tmp_path / "nowhere", tmp_path, "no such folder")


def test_existing_output_refused_without_force(src, tmp_path, cli, assert_refused):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(cli("convert", src, out), "already exists (use --force")
    assert (out / "keep.txt").read_text() == "mine"
    assert_refused(cli("export", out, out), "already exists (use --force")


def test_failed_forced_conversion_leaves_old_folder(src, tmp_path, cli, assert_refused):
    out = tmp_path / "out"
    assert cli("convert", src, out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(b"garbage")
    assert_refused(cli("convert", src, out, "--force"), "cannot read weights")
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_of_non_model_folder(src, tmp_path, cli, assert_refused):
    assert_refused(cli("export", src, tmp_path / "hf"), "not an mlxgpt model folder",
                   tmp_path / "hf")
