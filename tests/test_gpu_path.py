"""The code path GPUs take, checked on the CPU.

On MLX's CPU backend the model uses the arithmetic-only kernels of ``mlxgpt/ops.py``; on a GPU
(Metal, CUDA) it uses ``mx.fast.scaled_dot_product_attention`` and MLX's own GELU. This machine
has no GPU, so these tests switch ``ops.use_fast_math`` off and run that path here: the same
parity with transformers (fp32 logits within 1e-4 at every position, through the KV cache too),
the same greedy tokens through the compiled decode step, and the same training gradients as the
CPU path (1e-5: two exact formulations of one function in float32).
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
from mlxgpt import ops
from mlxgpt.generate import Context, generate_tokens
from mlxgpt.sample import SamplingSettings, TokenSampler

CONFIG = SMALL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("gpu-path"), CONFIG, seed=3)
    return folder, hf_model(folder)


def _switch_to_gpu_path(monkeypatch) -> None:
    def not_on_this_path(*args, **kwargs):
        raise AssertionError("the CPU kernels ran on the GPU path")

    monkeypatch.setattr(ops, "use_fast_math", lambda: False)
    monkeypatch.setattr(ops, "attention", not_on_this_path)
    monkeypatch.setattr(ops, "gelu_tanh", not_on_this_path)


@pytest.fixture
def gpu_path(monkeypatch):
    _switch_to_gpu_path(monkeypatch)


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], (2, n))


def test_logits_match_transformers_on_the_gpu_path(checkpoint, gpu_path):
    folder, reference = checkpoint
    model, _ = mlxgpt.load(str(folder))
    x = tokens(40)
    ref = hf_logits(reference, x)
    assert np.abs(np.array(model(mx.array(x))) - ref).max() <= 1e-4
    cache = model.make_cache()
    steps = [np.array(model(mx.array(x[:, t : t + 1]), cache)) for t in range(x.shape[1])]
    assert np.abs(np.concatenate(steps, axis=1) - ref).max() <= 1e-4


def test_greedy_decoding_matches_transformers_on_the_gpu_path(checkpoint, gpu_path):
    folder, reference = checkpoint
    model, _ = mlxgpt.load(str(folder))  # a fresh model: its compiled step is traced here
    prompt = [int(t) for t in tokens(12, seed=1)[0]]
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                 pad_token_id=0)[0, len(prompt) :].tolist()
    sampler = TokenSampler(SamplingSettings(temperature=0.0), CONFIG["vocab_size"])
    ours = [t for t, _ in generate_tokens(Context(model), prompt, sampler, max_tokens=40)]
    assert ours == ref


def test_training_gradients_agree_between_the_two_paths(checkpoint, monkeypatch):
    folder, _ = checkpoint
    model, _ = mlxgpt.load(str(folder))
    x = mx.array(tokens(33, seed=2))

    def loss(m):
        logits = m(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")

    cpu_loss, cpu_grads = nn.value_and_grad(model, loss)(model)
    _switch_to_gpu_path(monkeypatch)
    gpu_loss, gpu_grads = nn.value_and_grad(model, loss)(model)
    assert abs(cpu_loss.item() - gpu_loss.item()) <= 1e-5
    flat_cpu, flat_gpu = dict(tree_flatten(cpu_grads)), dict(tree_flatten(gpu_grads))
    assert flat_cpu.keys() == flat_gpu.keys()
    for k in flat_cpu:
        np.testing.assert_allclose(np.array(flat_gpu[k]), np.array(flat_cpu[k]), rtol=0,
                                   atol=1e-5, err_msg=k)
