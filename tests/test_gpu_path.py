"""The code path GPUs take, checked on the CPU.

A model built on MLX's CPU backend takes the arithmetic-only kernels of
:mod:`mlxgpt.cpu.fastmath`; on a GPU (Metal, CUDA) it takes the fused ones
(``mx.fast.scaled_dot_product_attention``, MLX's own GELU and exp): :mod:`mlxgpt.core.backend`
decides once, when the model is built. This machine has no GPU, so these tests build the model
with the fused kernels and run that path here: the same parity with transformers (fp32 logits
within 1e-4 at every position, through generation's KV cache and compiled decode step too), the
same greedy tokens, and the same training gradients as the CPU path (1e-5: two exact
formulations of one function in float32).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from _hf_helpers import SMALL, hf_logits, hf_model, make_hf_checkpoint
from mlx.utils import tree_flatten

import mlxgpt
from mlxgpt.core.backend import ARITHMETIC, FUSED, Kernels
from mlxgpt.generation.context import Context
from mlxgpt.generation.decode import generate_tokens
from mlxgpt.generation.sample import SamplingSettings, TokenSampler
from mlxgpt.training.loss import lm_loss

CONFIG = SMALL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("gpu-path"), CONFIG, seed=3)
    return folder, hf_model(folder)


def load_with(folder, kernels: Kernels) -> mlxgpt.GPT:
    """The checkpoint as a model built with ``kernels``."""
    loaded, _ = mlxgpt.load(str(folder))
    model = mlxgpt.GPT(loaded.config, kernels)
    model.update(loaded.parameters())
    model.eval()
    assert model.kernels is kernels
    assert all(b.attn.attend is kernels.attention and b.mlp.act is kernels.gelu_tanh
               for b in model.h)
    return model


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], (2, n))


def test_models_get_the_kernels_the_backend_measured_faster(checkpoint, monkeypatch):
    from mlxgpt.core import backend

    model, _ = mlxgpt.load(str(checkpoint[0]))
    assert model.kernels is backend.backend().kernels is backend.cpu_kernels()
    seconds = backend._kernel_seconds()
    assert model.kernels is min(seconds, key=seconds.get)
    for name, kernels in (("fused", FUSED), ("arithmetic", ARITHMETIC)):
        monkeypatch.setenv(backend.KERNELS_ENV, name)
        backend.cpu_kernels.cache_clear()
        assert mlxgpt.GPT(model.config).kernels is kernels
    monkeypatch.setenv(backend.KERNELS_ENV, "magic")
    backend.cpu_kernels.cache_clear()
    with pytest.raises(mlxgpt.MlxgptError, match="choose fused or arithmetic"):
        mlxgpt.GPT(model.config)
    monkeypatch.delenv(backend.KERNELS_ENV)
    backend.cpu_kernels.cache_clear()


def test_logits_match_transformers_on_the_gpu_path(checkpoint):
    folder, reference = checkpoint
    model = load_with(folder, FUSED)
    x = tokens(40)
    ref = hf_logits(reference, x)
    assert np.abs(np.array(model(mx.array(x))) - ref).max() <= 1e-4
    for row in range(x.shape[0]):  # one token at a time through generation's decode path
        ctx = Context(model)
        ids = [int(t) for t in x[row]]
        steps = [ctx.prefill(ids[:1])] + [ctx.step(mx.array([t], mx.int32)) for t in ids[1:]]
        assert np.abs(np.concatenate([np.array(s) for s in steps]) - ref[row]).max() <= 1e-4


def test_greedy_decoding_matches_transformers_on_the_gpu_path(checkpoint):
    folder, reference = checkpoint
    model = load_with(folder, FUSED)
    prompt = [int(t) for t in tokens(12, seed=1)[0]]
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                 pad_token_id=0)[0, len(prompt) :].tolist()
    sampler = TokenSampler(SamplingSettings(temperature=0.0), CONFIG["vocab_size"])
    ours = [t for t, _ in generate_tokens(Context(model), prompt, sampler, max_tokens=40)]
    assert ours == ref


def test_training_gradients_agree_between_the_two_paths(checkpoint):
    folder, _ = checkpoint
    x = mx.array(tokens(33, seed=2))
    results = []
    for kernels in (ARITHMETIC, FUSED):
        model = load_with(folder, kernels)
        results.append(nn.value_and_grad(model, lm_loss)(model, x[:, :-1], x[:, 1:]))
    ((cpu_loss, _), cpu_grads), ((gpu_loss, _), gpu_grads) = results
    assert abs(cpu_loss.item() - gpu_loss.item()) <= 1e-5
    flat_cpu, flat_gpu = dict(tree_flatten(cpu_grads)), dict(tree_flatten(gpu_grads))
    assert flat_cpu.keys() == flat_gpu.keys()
    for k in flat_cpu:
        np.testing.assert_allclose(np.array(flat_gpu[k]), np.array(flat_cpu[k]), rtol=0,
                                   atol=1e-5, err_msg=k)
