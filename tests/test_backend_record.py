"""The backend record (mlxgpt/core/backend.py): one value per device holding every device
decision, resolved lazily; the loaders, models and training read it; ``import mlxgpt`` measures
nothing; a model prepared for inference is a new object of its own type."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxgpt
from mlxgpt.checkpoints.folder import load_model, save_model
from mlxgpt.core import backend as bk
from mlxgpt.core.backend import ARITHMETIC, FUSED, Backend, backend, prepare_for_inference
from mlxgpt.core.inference import InferenceModel
from mlxgpt.cpu import layout, parallel
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.context import Context
from mlxgpt.generation.decode import generate_tokens
from mlxgpt.generation.sample import SamplingSettings, TokenSampler
from mlxgpt.tokenizers import byte_tokenizer
from mlxgpt.training.loss import lm_loss

GPU = mx.gpu  # a record for a GPU can be built (and read) on any machine
PROMPT = [5, 17, 200, 3, 99, 42]


@pytest.fixture
def fresh_records(monkeypatch):
    """Records made anew for the test (the process's own stay as they were)."""
    monkeypatch.setattr(bk, "_records", {})


def tokens_of(model, n: int = 20) -> list[int]:
    sampler = TokenSampler(SamplingSettings(temperature=0), 257)
    return [t for t, _ in generate_tokens(Context(model), PROMPT, sampler, max_tokens=n)]


# --------------------------------------------------------------------------- the record


def test_the_record_on_this_cpu():
    record = backend()
    assert record is backend() is backend(mx.Device(mx.cpu))  # one per device and process
    assert record.on_cpu and record.device == mx.cpu
    assert record.dtype == mx.float32
    assert record.kernels in (FUSED, ARITHMETIC) and record.kernels is bk.cpu_kernels()
    assert any(name in record.blas for name in ("OpenBLAS", "BLIS", "MKL", "reference BLAS"))
    assert record.layout in ("measured", *layout.LAYOUTS)
    assert isinstance(record.keep_quantized, bool)
    assert record.cpu_streams(processes=2) == 1  # processes on one machine share its cores
    setup = record.compute_setup(record.kernels)
    assert setup["device"] == str(mx.default_device()) and setup["model_ops"] == record.kernels.name
    assert setup["blas"] in record.blas
    labels = [label for label, _ in record.describe()]
    assert labels[:2] == ["dtype", "blas"] and {"model ops", "quantized", "layout", "training",
                                                "train pass"} <= set(labels)


def test_a_gpu_record_keeps_mlx_s_own_choices(monkeypatch):
    monkeypatch.delenv(parallel.STREAMS_ENV, raising=False)
    record = Backend(GPU)
    assert not record.on_cpu and record.dtype == mx.float16 and record.kernels is FUSED
    assert record.keep_quantized and record.layout is None and record.blas is None
    assert record.cpu_streams() == 1  # no split: the batch runs on the GPU
    assert "GPU" in record.native_error and record.train_pass == "MLX's graph (GPU)"
    assert "blas" not in record.compute_setup(FUSED)


def test_the_record_measures_nothing_until_a_field_is_read(monkeypatch, fresh_records):
    def timed(*args):
        raise AssertionError("measured")

    for name in ("cpu_kernels", "quantized_seconds"):
        monkeypatch.setattr(bk, name, timed)
    monkeypatch.setattr(layout, "layout_seconds", timed)
    record = backend()  # built, and the fields that need no measurement read
    assert record.dtype == mx.float32 and record.on_cpu and record.blas
    assert record.layout in ("measured", *layout.LAYOUTS)
    for field in ("kernels", "keep_quantized"):  # each measures when read, not before
        with pytest.raises(AssertionError, match="measured"):
            getattr(record, field)


def test_importing_mlxgpt_starts_no_process_and_measures_nothing(tmp_path):
    code = """
import subprocess

started = []


class NoProcess(subprocess.Popen):
    def __init__(self, args, *rest, **kw):
        started.append(args)
        raise AssertionError("a process started at import")


subprocess.Popen = NoProcess
import mlxgpt
from mlxgpt.core import backend
from mlxgpt.cpu import layout, native

caches = [backend.cpu_kernels, backend._kernel_seconds, backend.quantized_seconds,
          layout.layout_seconds, native._loaded]
print(len(started), [f.cache_info().currsize for f in caches], len(backend._records))
"""
    env = {**os.environ, "MLXGPT_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "[0,", "0,", "0,", "0,", "0]", "0"], run.stdout
    assert not (tmp_path / "cache").exists()  # nothing measured, so nothing kept


def test_keep_quantized_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path))
    timed: list[tuple[float, float]] = []

    def measure(seconds):
        def run():
            timed.append(seconds)
            return seconds
        return run

    monkeypatch.setattr(bk, "_time_quantized", measure((1e-3, 2e-3)))
    bk.quantized_seconds.cache_clear()
    try:
        assert Backend(mx.cpu).keep_quantized is True and len(timed) == 1
        (entry,) = json.loads((tmp_path / bk.QUANTIZED_CACHE).read_text()).values()
        assert entry["quantized"] == 1e-3 and entry["setup"]["mlx"] == mx.__version__
        bk.quantized_seconds.cache_clear()  # as a new process would: read, not timed
        assert Backend(mx.cpu).keep_quantized is True and len(timed) == 1
        # mlxgpt info --calibrate times again, and later processes read the new answer
        monkeypatch.setattr(bk, "_time_quantized", measure((3e-3, 2e-3)))
        assert bk.calibrate_quantized().startswith("quantized matmuls: dequantized")
        bk.quantized_seconds.cache_clear()
        assert Backend(mx.cpu).keep_quantized is False and len(timed) == 2
        assert Backend(mx.cpu, force_quantized=True).keep_quantized is True  # a caller's choice
    finally:
        bk.quantized_seconds.cache_clear()


def test_cpu_streams_follow_the_record_not_the_process(monkeypatch):
    monkeypatch.delenv(parallel.STREAMS_ENV, raising=False)
    assert parallel.stream_count(False) == 1 and parallel.stream_count(True, 2) == 1
    assert parallel.stream_count(True) == parallel.cpu_cores() == backend().cpu_streams()


# --------------------------------------------------------------------------- the loaders


def test_loaders_follow_the_record_they_are_given(tmp_path, tiny_model):
    half = tiny_model()
    half.set_dtype(mx.float16)
    folder = save_model(half, tmp_path / "half", byte_tokenizer())
    on_cpu, _ = mlxgpt.load(folder)
    assert on_cpu.ln_f.weight.dtype == mx.float32  # the CPU's record upcasts half precision
    assert on_cpu.kernels is backend().kernels
    on_gpu, _ = mlxgpt.load(folder, backend=Backend(GPU))
    assert on_gpu.ln_f.weight.dtype == mx.float16 and on_gpu.kernels is FUSED


def test_a_quantized_gguf_stays_quantized_as_the_record_says(tmp_path):
    pytest.importorskip("gguf")
    from _llama_helpers import random_llama, write_llama_gguf

    path = write_llama_gguf(random_llama({"num_key_value_heads": 2}), tmp_path / "q4.gguf",
                            default="Q4_0")
    for keep in (True, False):
        model, _ = mlxgpt.load(path, backend=Backend(mx.cpu, force_quantized=keep))
        layer = dict(model.named_modules())["model.layers.0.mlp.up_proj"]
        assert isinstance(layer, nn.QuantizedLinear) is keep, keep
    measured, _ = mlxgpt.load(path)  # the record of this machine: its measurement decides
    layer = dict(measured.named_modules())["model.layers.0.mlp.up_proj"]
    assert isinstance(layer, nn.QuantizedLinear) is backend().keep_quantized


# --------------------------------------------------------------------------- prepared models


@pytest.mark.parametrize("chosen", ["blocks", "one-block"])
def test_a_prepared_model_is_new_and_the_original_untouched(chosen, tiny_model, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv(layout.LAYOUT_ENV, chosen)  # a layout other than MLX's own
    model = tiny_model(3)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    plain = tokens_of(model)
    prepared = prepare_for_inference(model)
    assert isinstance(prepared, InferenceModel) and not isinstance(prepared, nn.Module)
    assert prepared.layouts == {"layers": chosen, "head": chosen}
    assert "blocks" in prepared.module.h[0].mlp.c_fc and "blocks" in prepared.module.wte
    assert prepare_for_inference(prepared) is prepared
    # the original: the same modules, names and values, and it still trains and saves
    assert type(model.h[0].mlp.c_fc) is nn.Linear and type(model.wte) is nn.Embedding
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(np.array_equal(np.array(after[k]), v) for k, v in before.items())
    assert tokens_of(prepared) == plain == tokens_of(model)
    x = mx.array([PROMPT[:-1]])
    y = mx.array([PROMPT[1:]])
    (loss, _), grads = nn.value_and_grad(model, lm_loss)(model, x, y)
    assert set(dict(tree_flatten(grads))) == set(before)
    reloaded = load_model(save_model(model, tmp_path / "orig"))
    assert tokens_of(reloaded) == plain
    # the prepared one refuses, in one line, to train or be saved
    with pytest.raises(MlxgptError, match="has no trainable_parameters: it generates only"):
        nn.value_and_grad(prepared, lm_loss)(prepared, x, y)
    with pytest.raises(MlxgptError, match=r"for inference has no \w+: it generates only"):
        save_model(prepared, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()
    assert not hasattr(prepared, "update")  # still an AttributeError for hasattr


def test_other_families_and_gpus_keep_mlx_s_layout(tiny_model):
    model = tiny_model(4)
    prepared = prepare_for_inference(model, Backend(GPU))
    assert prepared.layouts == {} and type(prepared.module.h[0].mlp.c_fc) is nn.Linear
    assert prepared.module is not model and tokens_of(prepared) == tokens_of(model)
