"""Logit parity with transformers' GPT2LMHeadModel on the same (random) weights.

fp32: max |diff| <= 1e-4 at every position. Reduced precision is compared with the fp32
reference relative to the logits' standard deviation sigma, against a bound derived from the
dtype's precision (see ``REDUCED``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from _hf_helpers import (  # noqa: E402
    hf_logits,
    hf_model,
    make_hf_checkpoint,
    populate_hf_cache,
    random_hf_model,
    save_hf_checkpoint,
)

import mlxgpt  # noqa: E402
from mlxgpt.checkpoints.convert import convert  # noqa: E402
from mlxgpt.checkpoints.folder import build_model, load_model  # noqa: E402
from mlxgpt.checkpoints.hf import export  # noqa: E402
from mlxgpt.checkpoints.quantize import dequantized_weights  # noqa: E402
from mlxgpt.generation.context import Context  # noqa: E402

FP32_TOL = 1e-4
BIG_T = 32  # tokens in the 124M comparison: every position is compared, keep it short


def mlx_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(tokens, dtype=mx.int32)).astype(mx.float32))


def cached_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) computed one token at a time through generation's decode path: the KV
    cache and the compiled forward of :class:`Context` (one context per row)."""
    rows = []
    for row in tokens:
        ctx = Context(model)
        ids = [int(t) for t in row]
        steps = [ctx.prefill(ids[:1])] + [ctx.step(mx.array([t], mx.int32)) for t in ids[1:]]
        rows.append(np.concatenate([np.array(s.astype(mx.float32)) for s in steps]))
    return np.stack(rows)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------- GPT-2 124M shape


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A random GPT-2 124M-shape checkpoint as model.safetensors and as a legacy .bin, its
    reference logits on one sequence, and its fp32 conversion."""
    tmp = tmp_path_factory.mktemp("gpt2-124m")
    hf = random_hf_model({}, seed=0)  # GPT2Config defaults = GPT-2 124M's shape
    st = save_hf_checkpoint(hf, tmp / "hf-st", "safetensors")
    binf = save_hf_checkpoint(hf, tmp / "hf-bin", "bin", legacy_keys=True)
    tokens = np.random.default_rng(0).integers(0, 50257, (1, BIG_T))
    ref = hf_logits(hf, tokens)
    del hf
    fp32 = tmp / "mlx-fp32"
    convert(st, fp32)
    return SimpleNamespace(tmp=tmp, st=st, bin=binf, tokens=tokens, ref=ref, fp32=fp32)


@pytest.mark.slow
def test_gpt2_124m_fp32_from_safetensors(big):
    model = load_model(big.fp32)
    assert model.n_params == 124_439_808
    out = mlx_logits(model, big.tokens)
    assert max_diff(out, big.ref) <= FP32_TOL
    assert max_diff(cached_logits(model, big.tokens), out) <= FP32_TOL


@pytest.mark.slow
def test_gpt2_124m_fp32_from_pytorch_bin(big):
    folder = big.tmp / "mlx-fp32-bin"
    convert(big.bin, folder)
    assert max_diff(mlx_logits(load_model(folder), big.tokens), big.ref) <= FP32_TOL


# Bounds for reduced precision, relative to sigma (std of the reference logits).
# eps is the rms relative error the format puts on one weight:
#   float16/bfloat16: rounding to a p-bit significand, unit roundoff u = 2^-p, relative error
#   uniform in [-u, u] -> rms u/sqrt(3) (u = 2^-11 fp16, 2^-8 bf16).
#   b-bit affine quantization, group g: step = range/(2^b - 1) with range ~ 4.9 sigma_w for
#   g = 64 Gaussian weights (2 x E[max of 64 normals]); error uniform in a step -> rms
#   step/sqrt(12).
# Weight errors add up independently through the layers, so the logit error is a few eps:
# measured on this shape (tools/convert_check.py) rms ~5.3 eps for half precision (activations are
# rounded too) and ~2.6 eps for quantized (fp32 activations); the max over all 1.6M logits is
# ~5x the rms, as for Gaussian noise. Bounds keep a >2x margin: rms <= k_rms * eps and
# max <= k_max * eps. A layout bug (a swapped transpose, a wrong group) makes the error
# comparable to sigma itself, far above every bound but 4-bit's max, which is why 4-bit is
# also held to a correlation.
def _quant_eps(bits: int, group_range: float = 4.9) -> float:
    return group_range / (2**bits - 1) / math.sqrt(12)


REDUCED = {  # name: (convert options, eps, k_rms, k_max)
    "float16": ({"dtype": "float16"}, 2**-11 / math.sqrt(3), 12, 72),
    "bfloat16": ({"dtype": "bfloat16"}, 2**-8 / math.sqrt(3), 12, 72),
    "8bit": ({"quantize_bits": 8, "group_size": 64}, _quant_eps(8), 6, 36),
    "4bit": ({"quantize_bits": 4, "group_size": 64}, _quant_eps(4), 6, 36),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REDUCED))
def test_gpt2_124m_reduced_precision(big, name):
    opts, eps, k_rms, k_max = REDUCED[name]
    folder = big.tmp / f"mlx-{name}"
    convert(big.st, folder, **opts)
    model = load_model(folder)  # stored dtype, as a GPU runs it (no CPU upcast)
    out = mlx_logits(model, big.tokens)
    sigma = float(big.ref.std())
    err = np.abs(out - big.ref)
    rms = float(np.sqrt((err**2).mean()))
    assert rms <= k_rms * eps * sigma, f"rms {rms / sigma / eps:.1f} eps"
    assert err.max() <= k_max * eps * sigma, f"max {err.max() / sigma / eps:.1f} eps"
    assert np.corrcoef(out.ravel(), big.ref.ravel())[0, 1] >= 0.95
    if "quantize_bits" in opts:
        # The quantized kernels compute exactly the dequantized weights' product.
        dense = build_model(model.config, dequantized_weights(model))
        assert max_diff(mlx_logits(dense, big.tokens), out) <= FP32_TOL


@pytest.mark.slow
def test_gpt2_124m_export_round_trip(big):
    out = big.tmp / "hf-export"
    export(big.fp32, out)
    assert max_diff(hf_logits(hf_model(out), big.tokens), big.ref) <= FP32_TOL


# --------------------------------------------------------------------------- odd small shapes

ODD = {
    # 3 heads, MLP width set, vocabulary not a multiple of 64, a different LayerNorm epsilon
    "3heads-ninner": {"n_layer": 2, "n_embd": 48, "n_head": 3, "n_inner": 40, "vocab_size": 101,
                      "n_positions": 24, "layer_norm_epsilon": 1e-3},
    # untied output head, exact (erf) GELU, 5 heads of 12
    "untied-gelu": {"n_layer": 3, "n_embd": 60, "n_head": 5, "vocab_size": 517, "n_positions": 20,
                    "activation_function": "gelu", "tie_word_embeddings": False},
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("shape", list(ODD))
def test_odd_shapes(tmp_path, shape, fmt):
    cfg = ODD[shape]
    src = make_hf_checkpoint(tmp_path, cfg, fmt, seed=1, legacy_keys=fmt == "bin")
    hf = random_hf_model(cfg, seed=1)
    convert(src, tmp_path / "mlx")
    model = load_model(tmp_path / "mlx")
    assert ("lm_head" in model) == (not cfg.get("tie_word_embeddings", True))
    tokens = np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, cfg["n_positions"]))
    out = mlx_logits(model, tokens)
    assert max_diff(out, hf_logits(hf, tokens)) <= FP32_TOL
    assert max_diff(cached_logits(model, tokens), out) <= FP32_TOL


def test_quantized_export_round_trip(tmp_path):
    """A quantized folder exports dequantized; transformers reproduces the quantized logits."""
    cfg = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 96, "vocab_size": 300,
           "n_positions": 16}
    src = make_hf_checkpoint(tmp_path, cfg, "safetensors")
    convert(src, tmp_path / "q", quantize_bits=4, group_size=64)
    model = load_model(tmp_path / "q")
    assert "scales" not in model.h[0].mlp.c_proj  # input width 96: not a multiple of 64
    assert "scales" in model.h[0].mlp.c_fc
    export(tmp_path / "q", tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, 300, (1, 16))
    assert max_diff(hf_logits(hf_model(tmp_path / "hf"), tokens), mlx_logits(model, tokens)) \
        <= FP32_TOL


# --------------------------------------------------------------------------- hub code path


@pytest.fixture
def hub_cache(tmp_path):
    """An HF cache holding "acme/tiny-gpt2" at main (seed 0) and at tag v1 (seed 1)."""
    cfg = ODD["3heads-ninner"]
    cache = tmp_path / "hf-home" / "hub"
    for seed, ref, commit in ((0, "main", "a" * 40), (1, "v1", "b" * 40)):
        src = make_hf_checkpoint(tmp_path, cfg, "safetensors", seed=seed)
        populate_hf_cache(cache, "acme/tiny-gpt2", src, revision=ref, commit=commit)
    tokens = np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, cfg["n_positions"]))
    refs = {seed: hf_logits(random_hf_model(cfg, seed=seed), tokens) for seed in (0, 1)}
    return SimpleNamespace(home=tmp_path / "hf-home", cache=cache, tokens=tokens, refs=refs)


def test_convert_hub_id_offline_from_cache(tmp_path, hub_cache):
    """The real CLI, with HF_HUB_OFFLINE=1 and the cache location taken from the environment."""
    env = {**os.environ, "HF_HOME": str(hub_cache.home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "converted"
    run = subprocess.run([sys.executable, "-m", "mlxgpt", "convert", "acme/tiny-gpt2", str(out)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert max_diff(mlx_logits(load_model(out), hub_cache.tokens), hub_cache.refs[0]) <= FP32_TOL


def test_load_hub_id_with_revision(monkeypatch, hub_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = mlxgpt.load("acme/tiny-gpt2", revision="v1")
    assert max_diff(mlx_logits(model, hub_cache.tokens), hub_cache.refs[1]) <= FP32_TOL
    with pytest.raises(mlxgpt.MlxgptError, match="not in the Hugging Face cache"):
        mlxgpt.load("acme/not-cached")


def test_mlxgpt_load_reads_hf_folder_in_memory(tmp_path):
    cfg = ODD["3heads-ninner"]
    src = make_hf_checkpoint(tmp_path, cfg, "bin", legacy_keys=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    model, tok = mlxgpt.load(str(src))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], (1, 8))
    assert max_diff(mlx_logits(model, tokens), hf_logits(random_hf_model(cfg), tokens)) <= FP32_TOL
    assert tok.name == "ids"


# --------------------------------------------------------------------------- every BLAS


def _blas_settings() -> list[tuple[str, dict[str, str]]]:
    """Every BLAS mlxgpt may load here: OpenBLAS with each kernel set this CPU can run, and BLIS."""
    from mlxgpt.cpu import blas

    out = []
    if blas.find_openblas() and blas.best_kernel_set():
        flags = blas.cpu_flags()
        for core in ("Prescott", "Haswell", "SkylakeX"):
            if blas.runs_on(core, flags):
                out.append((f"openblas-{core}", {blas.LIBRARY_ENV: "openblas",
                                                 blas.CORETYPE_ENV: core}))
    if blas.find_blis():
        out.append(("blis", {blas.LIBRARY_ENV: "blis"}))
    return out


BLAS_SETTINGS = _blas_settings()


@pytest.mark.slow
@pytest.mark.parametrize("name,env", BLAS_SETTINGS, ids=[n for n, _ in BLAS_SETTINGS])
def test_parity_holds_with_every_blas_and_kernel_set(name, env):
    """The fp32 parity tests (logits, KV-cached decoding, one training step against PyTorch)
    pass with each library and kernel set mlxgpt may load, each in a fresh process (the BLAS is
    chosen when mlxgpt is first imported)."""
    here = os.path.dirname(__file__)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{here}/test_parity.py::test_odd_shapes",
         f"{here}/test_train.py::test_one_step_matches_pytorch",
         f"{here}/test_info.py::test_info_names_versions_device_and_blas"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]
