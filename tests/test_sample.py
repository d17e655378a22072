"""Sampling: each filter and penalty on known logits, seeds, and the draws' distribution."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxgpt.errors import MlxgptError
from mlxgpt.generation.sample import (
    SamplingSettings,
    TokenSampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    bias_vector,
)

NEG = -math.inf


def kept(logits) -> list[int]:
    """Indices of the finite entries of a (1, V) array."""
    return [i for i, v in enumerate(np.array(logits)[0].tolist()) if v != NEG]


def log_probs(*p) -> mx.array:
    return mx.array([[math.log(x) for x in p]])


def test_top_k_keeps_the_k_largest():
    logits = mx.array([[1.0, 5.0, 3.0, 2.0, 4.0]])
    assert kept(apply_top_k(logits, 2)) == [1, 4]
    assert kept(apply_top_k(logits, 1)) == [1]
    out = np.array(apply_top_k(logits, 3))[0]
    assert out[1] == 5.0 and out[4] == 4.0 and out[2] == 3.0  # kept values are unchanged
    assert kept(apply_top_k(logits, 0)) == [0, 1, 2, 3, 4]  # 0 = off
    assert kept(apply_top_k(logits, 10)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_nucleus_including_the_crossing_token():
    logits = log_probs(0.1, 0.5, 0.1, 0.3)
    assert kept(apply_top_p(logits, 0.7)) == [1, 3]  # 0.5 < 0.7, then 0.3 crosses it
    assert kept(apply_top_p(logits, 0.5)) == [1]  # 0.5 reaches p exactly: nothing more
    assert kept(apply_top_p(logits, 0.51)) == [1, 3]
    nucleus = kept(apply_top_p(logits, 0.85))  # 0.8 < 0.85: one of the two 0.1s joins
    assert len(nucleus) == 3 and {1, 3} < set(nucleus)
    assert kept(apply_top_p(logits, 0.05)) == [1]  # the most likely token always stays
    assert kept(apply_top_p(logits, 1.0)) == [0, 1, 2, 3]
    # Rows are independent.
    two = mx.concatenate([log_probs(0.6, 0.3, 0.1), log_probs(0.1, 0.2, 0.7)])
    out = np.array(apply_top_p(two, 0.8))
    assert np.isfinite(out).tolist() == [[True, True, False], [False, True, True]]


def test_min_p_is_relative_to_the_top_token():
    logits = log_probs(0.5, 0.3, 0.1, 0.1)
    assert kept(apply_min_p(logits, 0.25)) == [0, 1]  # threshold 0.125
    assert kept(apply_min_p(logits, 0.19)) == [0, 1, 2, 3]  # threshold 0.095
    assert kept(apply_min_p(logits, 0.61)) == [0]  # 0.3 < 0.305
    assert kept(apply_min_p(logits, 0.0)) == [0, 1, 2, 3]


def test_penalties_on_known_logits():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5]])
    recent = mx.array([[0, 1, 0]])  # token 0 twice, token 1 once
    np.testing.assert_allclose(
        np.array(apply_penalties(logits, recent, repetition=2.0)), [[1.0, -4.0, 1.0, 0.5]]
    )
    np.testing.assert_allclose(
        np.array(apply_penalties(logits, recent, presence=0.5)), [[1.5, -2.5, 1.0, 0.5]]
    )
    np.testing.assert_allclose(
        np.array(apply_penalties(logits, recent, frequency=0.5)), [[1.0, -2.5, 1.0, 0.5]]
    )
    np.testing.assert_allclose(
        np.array(apply_penalties(logits, recent, 2.0, 0.5, 0.25)),
        [[1.0 - 0.5 - 0.5, -4.0 - 0.5 - 0.25, 1.0, 0.5]],
    )


def test_penalties_change_the_greedy_choice():
    s = TokenSampler(SamplingSettings(temperature=0, frequency_penalty=2.0), 3)
    logits = mx.array([[3.0, 2.0, 0.0]])
    assert s(logits, mx.array([[1, 1]])).item() == 0
    assert s(logits, mx.array([[0, 2]])).item() == 1  # 3 - 2 < 2
    assert s(logits, None).item() == 0


def test_logit_bias_and_greedy():
    s = TokenSampler(SamplingSettings(temperature=0), 4)
    logits = mx.array([[0.0, 3.0, 1.0, 2.0]])
    assert s(logits).item() == 1
    biased = TokenSampler(SamplingSettings(temperature=0, logit_bias={2: 5.0, 1: -100}), 4)
    assert biased(logits).item() == 2
    np.testing.assert_allclose(np.array(bias_vector({2: 5.0, 0: -1.0}, 4)), [-1, 0, 5, 0])
    with pytest.raises(MlxgptError, match="not in 0..3"):
        bias_vector({7: 1.0}, 4)


def test_temperature_scales_before_the_filters():
    # At temperature 2 the probabilities flatten, so min-p keeps more tokens.
    s_cold = TokenSampler(SamplingSettings(temperature=1.0, min_p=0.25), 3)
    s_hot = TokenSampler(SamplingSettings(temperature=2.0, min_p=0.25), 3)
    logits = mx.array([[2.0, 0.0, -1.0]])
    assert kept(s_cold.process(logits)) == [0]  # relative probabilities 1, 0.135, 0.05
    assert kept(s_hot.process(logits)) == [0, 1]  # relative probabilities 1, 0.37, 0.22
    np.testing.assert_allclose(np.array(s_hot.process(logits))[0, :2], [1.0, 0.0])


def test_seed_reproduces_draws():
    logits = mx.zeros((1, 1000))
    a = TokenSampler(SamplingSettings(temperature=1, seed=7), 1000)
    b = TokenSampler(SamplingSettings(temperature=1, seed=7), 1000)
    seq_a = [a(logits).item() for _ in range(20)]
    seq_b = [b(logits).item() for _ in range(20)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 10  # the key advances between calls
    c = TokenSampler(SamplingSettings(temperature=1, seed=8), 1000)
    assert [c(logits).item() for _ in range(20)] != seq_a


def test_draws_follow_the_filtered_distribution():
    # p = (0.4, 0.3, 0.2, 0.1); top-p 0.6 keeps {0, 1} renormalised to (4/7, 3/7).
    n = 20000
    logits = mx.broadcast_to(log_probs(0.4, 0.3, 0.2, 0.1), (n, 4))
    s = TokenSampler(SamplingSettings(temperature=1.0, top_p=0.6, seed=0), 4)
    counts = np.bincount(np.array(s(logits)), minlength=4) / n
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 4 / 7) < 0.02
    # Without filters the draws follow softmax(logits / T).
    s = TokenSampler(SamplingSettings(temperature=0.5, seed=1), 4)
    counts = np.bincount(np.array(s(logits)), minlength=4) / n
    p = np.array([0.4, 0.3, 0.2, 0.1]) ** 2
    np.testing.assert_allclose(counts, p / p.sum(), atol=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 1}, {"top_k": -1},
     {"repetition_penalty": 0}, {"penalty_window": 0}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(MlxgptError, match="sampling:"):
        SamplingSettings(**kwargs)
