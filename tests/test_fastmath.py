"""The CPU's arithmetic-only kernels (mlxgpt/cpu/fastmath.py): exp's edges, and causal attention
with its weights kept for the backward pass or recomputed, against MLX's exact functions."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxgpt.cpu import fastmath


def test_exp_is_exact_zero_below_the_normal_range_and_accurate_above():
    x = mx.concatenate([mx.linspace(-86.5, 88.0, 100_001),
                        mx.array([-87.5, -88.0, -100.0, -1e30, -float("inf")])])
    got = np.array(fastmath.exp(x)).astype(np.float64)
    want = np.exp(np.array(x).astype(np.float64))
    ok = want > 1e-37  # clear of the cut at about -87
    assert (np.abs(got[ok] - want[ok]) / want[ok]).max() < 2e-7
    assert (got[-5:] == 0.0).all()  # never a subnormal, never NaN from -inf or masked scores
    tiny = np.finfo(np.float32).tiny
    assert ((got == 0.0) | (got >= tiny)).all()


def _reference(q, k, v, scale):
    T, S = q.shape[2], k.shape[2]
    mask = mx.arange(S)[None, :] <= (mx.arange(T) + S - T)[:, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize("T,S", [(64, 64), (150, 150), (70, 200)])
@pytest.mark.parametrize("keep", [True, False])
def test_causal_attention_matches_exact_with_kept_or_recomputed_weights(T, S, keep, monkeypatch):
    """One block and several (CHUNK 64), queries after cached keys (S > T); the backward pass
    from kept weights and from recomputed ones alike, within 2e-5 of MLX's exact attention."""
    if not keep:
        monkeypatch.setattr(fastmath, "KEEP_WEIGHTS_BYTES", 0)
    keys = mx.random.split(mx.random.key(1), 4)
    q = mx.random.normal((2, 3, T, 16), key=keys[0])
    k, v = (mx.random.normal((2, 3, S, 16), key=keys[i]) for i in (1, 2))
    g = mx.random.normal((2, 3, T, 16), key=keys[3])
    n_out = len(fastmath.causal_attention(q * 0.25, k, v))
    assert n_out == (1 + 2 * len(fastmath._causal_blocks(T, S)) if keep else 1)

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v, 0.25) * g).sum()

    fast = lambda q, k, v, s: fastmath.attention(q, k, v, s, "causal")  # noqa: E731
    assert mx.abs(fast(q, k, v, 0.25) - _reference(q, k, v, 0.25)).max().item() < 2e-5
    got = mx.grad(loss(fast), argnums=[0, 1, 2])(q, k, v)
    want = mx.grad(loss(_reference), argnums=[0, 1, 2])(q, k, v)
    for a, b in zip(got, want, strict=True):
        assert mx.abs(a - b).max().item() < 2e-5 * max(1.0, mx.abs(b).max().item())


def test_causal_attention_in_half_precision_does_not_overflow():
    """1,024 keys of value 200 all weighted alike: unnormalised, their sum would be 204,800,
    past float16's 65,504; the half-precision path normalises before the product."""
    q = mx.zeros((1, 1, 1024, 8), mx.float16)
    kv = mx.full((1, 1, 1024, 8), 200.0, mx.float16)
    y = fastmath.attention(q, mx.zeros_like(q), kv, 1.0, "causal")
    assert mx.abs(y.astype(mx.float32) - 200.0).max().item() <= 0.25  # float16 steps 0.125 at 200


def test_silu_matches_mlx_over_the_whole_range():
    import mlx.nn as nn

    x = mx.concatenate([mx.linspace(-200, 200, 100001),
                        mx.array([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4])])
    got, want = np.array(fastmath.silu(x)), np.array(nn.silu(x))
    assert not np.isnan(got).any()
    assert np.abs(got - want).max() < 1e-5
    assert np.allclose(got, want, rtol=1e-5, atol=1e-30)


def test_grouped_attention_equals_repeated_heads():
    rng = np.random.default_rng(0)
    q = mx.array(rng.normal(size=(2, 6, 1, 8)).astype(np.float32))
    k, v = (mx.array(rng.normal(size=(2, 2, 9, 8)).astype(np.float32)) for _ in range(2))
    mask = mx.arange(9) < 7  # a cache's boolean mask
    full = fastmath.attention(q, mx.repeat(k, 3, axis=1), mx.repeat(v, 3, axis=1), 0.3, mask)
    grouped = fastmath.attention(q, k, v, 0.3, mask)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    assert np.abs(np.array(grouped) - np.array(full)).max() < 1e-6
    assert np.abs(np.array(grouped) - np.array(fused)).max() < 1e-5


def test_silu_gradient_matches_mlx():
    import mlx.nn as nn

    x = mx.linspace(-30, 30, 2001)
    got = mx.grad(lambda a: fastmath.silu(a).sum())(x)
    want = mx.grad(lambda a: nn.silu(a).sum())(x)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-5
