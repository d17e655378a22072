"""Fused-friendly math for MLX's CPU backend: exp, softmax, tanh-GELU and causal attention.

Why: on the CPU backend MLX evaluates ``exp``/``tanh`` one element at a time through libm
(about 10 ns per element here), and compiled graphs cannot fuse them with their neighbours.
Attention softmax, GELU and the loss's log-sum-exp then cost more than all the matmuls of a
small GPT. The versions below use only multiply/add/compare/bit operations, which ``mx.compile``
fuses into one vectorised loop (about 1 ns per element), and give explicit gradients so the
backward pass is just as cheap. They agree with the exact functions to ~1e-6 relative
(``exp``) and ~4e-7 absolute (``tanh``), well inside the model's 1e-4 parity with PyTorch.

:mod:`mlxgpt.core.backend` chooses them for the CPU; on a GPU the built-in kernels (and
``mx.fast.scaled_dot_product_attention``) are faster and are used instead.
"""

from __future__ import annotations

import math

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 = HI + LO (Cody-Waite)
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float to an integer
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def fence(x: mx.array) -> mx.array:
    """``x`` unchanged (no copy: it is contiguous), ending the fused kernel that computes it.

    Why: ``mx.compile`` fuses elementwise chains at most 11 operations deep. Where a long chain
    (a polynomial) is cut at that depth, the cut often falls on a broadcast scalar constant,
    which then enters the next kernel as a stride-0 input: that kernel runs MLX's strided,
    scalar loop. Cutting the chain ourselves, at full-size contiguous values, keeps every piece
    on the contiguous loop the C++ compiler vectorises (GELU forward 2.9x faster, measured).
    """
    return mx.contiguous(x)


def _horner(x: mx.array, coeffs: tuple[float, ...]) -> mx.array:
    """coeffs[0] x^n + ... + coeffs[n], fenced every few steps (see :func:`fence`)."""
    p = x * coeffs[0] + coeffs[1]
    for i, c in enumerate(coeffs[2:], 1):
        if i % 3 == 0:
            p = fence(p)
        p = x * p + c
    return p


_EXP_TAYLOR = (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0)


def exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 88 (larger x is not needed here: inputs are max-shifted).

    exp(x) = 2**k * exp(r) with k = round(x / ln 2), |r| <= ln(2)/2; exp(r) by its Taylor
    polynomial (degree 7, relative error < 1e-8 before rounding); 2**k built in the exponent
    bits. Inputs below about -87 (k <= -126) give exactly 0, never a subnormal or tiny normal
    number: products of such a number (backward passes multiply probabilities by small
    gradients) would be subnormal, and x86 CPUs compute with subnormals many times slower
    (measured: a tiny LoRA step 0.54 s instead of 0.06 s).
    """
    # Alone in its kernel: fused, max's NaN branch would keep the whole chain off the vector loop
    x = fence(mx.maximum(x, -100.0))  # keeps k in int32 range (masked scores are -1e30, -inf)
    k = (x * _LOG2E + _ROUND) - _ROUND
    r = fence((x - k * _LN2_HI) - k * _LN2_LO)
    p = fence(_horner(r, _EXP_TAYLOR))
    # 2**k as exponent bits e = k + 127, or 0 when e <= 1 (2**k * p could be subnormal):
    # e = relu(k + 126) + min(relu(k + 126), 1), with relu(a) = (a + |a|) / 2, exact on these
    # small integers, and vectorised where max/min are not.
    a = _relu(k + 126.0)
    e = a - _relu(a - 1.0) + a
    two_k = mx.view(mx.left_shift(e.astype(mx.int32), 23), mx.float32)
    return p * two_k


def _sigmoid(x: mx.array) -> mx.array:
    """sigmoid(x) with :func:`exp` of -|x| only (always in its range): s for x >= 0 and e * s
    below, s = 1 / (1 + e), e = exp(-|x|); the choice by arithmetic on sign(x), which
    vectorises where a select may not."""
    e = exp(-mx.abs(x))
    s = 1.0 / (1.0 + e)
    t = (mx.sign(x) + 1.0) * 0.5  # 1 above zero, 0 below, 1/2 at zero (where e = 1)
    return s * (t + (1.0 - t) * e)


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) (SwiGLU's gate). Its own gradient rule: :func:`exp` builds 2**k from bits
    (``mx.view``), which has no derivative in MLX."""
    return x * _sigmoid(x)


@silu.vjp
def _silu_vjp(primal, cotangent, output):
    s = _sigmoid(primal)  # a single-input function gets its input, not a tuple
    return cotangent * (s * (1.0 + primal * (1.0 - s)))


def _relu(a: mx.array) -> mx.array:
    return (a + mx.abs(a)) * 0.5


def _softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (any float dtype; computed in float32), no gradient rule."""
    xf = x.astype(mx.float32)
    e = exp(xf - xf.max(axis=-1, keepdims=True))
    return (e * (1.0 / e.sum(axis=-1, keepdims=True))).astype(x.dtype)


softmax = mx.custom_function(_softmax)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    p, g = output, cotangent
    return p * (g - (g * p).sum(axis=-1, keepdims=True))


_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)
_TANH_CLAMP = 7.90531110763549805


def tanh(x: mx.array) -> mx.array:
    """tanh as a rational function of degree 13/6 (Eigen's float approximation), |err| < 4e-7."""
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = fence(x * x)
    p, q = fence(_horner(x2, _TANH_P)), fence(_horner(x2, _TANH_Q))
    return fence(x * p / q)


@mx.custom_function
def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's tanh-approximate GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xf = x.astype(mx.float32)
    t = tanh(_SQRT_2_OVER_PI * (xf + 0.044715 * (xf * xf * xf)))
    return (0.5 * xf * (1.0 + t)).astype(x.dtype)


@gelu_tanh.vjp
def _gelu_tanh_vjp(primal, cotangent, output):
    x = primal.astype(mx.float32)  # a single-input function gets its input, not a tuple
    x2 = x * x
    t = tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x2 * x)))
    d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_SQRT_2_OVER_PI * (1.0 + 0.134145 * x2))
    return (cotangent * d).astype(primal.dtype)


CHUNK = 64  # query rows per block of causal attention
KEEP_WEIGHTS_BYTES = 64 << 20  # keep attention weights for the backward pass up to this size


def _causal_blocks(T: int, S: int) -> list[tuple[int, int, int]]:
    """(first query, end query, keys seen) per block: query i sees keys 0 .. i + S - T."""
    return [(t0, min(T, t0 + CHUNK), min(S, min(T, t0 + CHUNK) + S - T))
            for t0 in range(0, T, CHUNK)]


def _block_weights(q: mx.array, k: mx.array, t0: int, t1: int, n: int,
                   offset: int) -> tuple[mx.array, mx.array]:
    """Unnormalised attention weights of queries t0..t1 over keys 0..n (B, H, t1 - t0, n),
    and 1 / their row sums (B, H, t1 - t0, 1), the factor that normalises them; q pre-scaled.

    In half precision the weights come normalised (factor 1): an unnormalised product with v
    sums up to n values of v and could overflow float16.
    """
    scores = (q[:, :, t0:t1] @ k[:, :, :n].swapaxes(-1, -2)).astype(mx.float32)
    allowed = mx.arange(n)[None, :] <= (mx.arange(t0, t1) + offset)[:, None]
    scores = mx.where(allowed, scores, -1e30)
    e = exp(scores - scores.max(axis=-1, keepdims=True))
    inv = 1.0 / e.sum(axis=-1, keepdims=True)
    if q.dtype != mx.float32:
        return (e * inv).astype(q.dtype), mx.array(1.0, q.dtype)
    return e, inv


@mx.custom_function
def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, ...]:
    """Causal softmax(q k^T) v for q (B, H, T, D) already scaled, k and v (B, H, S, D).

    Returns (output (B, H, T, D), *kept): use ``[0]``. Computed in blocks of CHUNK queries,
    each over only the keys it may see (about half the work of the full T x S product at long
    contexts), normalising after the product with v (a (T, D) multiply instead of (T, S)).
    Where every block's weights fit in KEEP_WEIGHTS_BYTES they are outputs too (``kept``), and
    the backward pass uses them; otherwise it recomputes each block's weights, so training
    memory grows with T, not T^2 (FlashAttention's trade: one extra matmul per block).
    """
    T, S = q.shape[2], k.shape[2]
    outs, kept = [], []
    for t0, t1, n in _causal_blocks(T, S):
        e, inv = _block_weights(q, k, t0, t1, n, S - T)
        outs.append((e @ v[:, :, :n]) * inv)
        kept += [e, inv]
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    keep = sum(e.size for e in kept[::2]) * q.itemsize <= KEEP_WEIGHTS_BYTES
    return (y, *kept) if keep else (y,)


@causal_attention.vjp
def _causal_attention_vjp(primals, cotangents, outputs):
    q, k, v = primals
    y, kept = outputs[0], outputs[1:]
    T, S = q.shape[2], k.shape[2]
    dq, dk, dv = [], None, None
    # the last block sees every key: starting from it, dk and dv need no zero-filled buffer
    for i, (t0, t1, n) in reversed(list(enumerate(_causal_blocks(T, S)))):
        e, inv = kept[2 * i:2 * i + 2] if kept else _block_weights(q, k, t0, t1, n, S - T)
        g = cotangents[0][:, :, t0:t1] * inv  # (B, H, c, D): the normalisation moved onto g
        rows = (g * y[:, :, t0:t1]).sum(axis=-1, keepdims=True)  # = sum(p * dp) per row / sum
        ds = e * (g @ v[:, :, :n].swapaxes(-1, -2) - rows)  # (B, H, c, n)
        dq.append(ds @ k[:, :, :n])
        dk_n, dv_n = ds.swapaxes(-1, -2) @ q[:, :, t0:t1], e.swapaxes(-1, -2) @ g  # (B, H, n, D)
        if dk is None:
            dk, dv = dk_n, dv_n
        else:
            dk[:, :, :n] += dk_n
            dv[:, :, :n] += dv_n
    return (dq[0] if len(dq) == 1 else mx.concatenate(dq[::-1], axis=2)), dk, dv


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
              mask: str | mx.array | None = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` with this module's softmax.

    q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D). ``mask``: None, ``"causal"`` (query i
    sees keys up to i + S - T, so it is right after a KV cache too; see
    :func:`causal_attention`), a boolean array (True = attend) or an additive float array,
    broadcastable to (B, H, T, S). Grouped-query attention: k and v may have fewer heads (H a
    multiple of theirs), each shared by consecutive query heads, as the fused kernel takes them.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    if K != H and T == 1 and not isinstance(mask, str):
        # Decoding with grouped heads: MLX's own kernel takes them without copying keys and
        # values, and one query's softmax is too small for libm's exp to matter (measured on
        # SmolLM2: 23 tokens/s against 18 with the arithmetic path under BLIS).
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if K != H:
        k, v = mx.repeat(k, H // K, axis=1), mx.repeat(v, H // K, axis=1)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        return causal_attention(q * scale, k, v)[0]
    scores = _masked((q * scale) @ k.swapaxes(-1, -2), mask)  # (B, H, T, S)
    return softmax(scores) @ v


def _masked(scores: mx.array, mask: mx.array | None) -> mx.array:
    if mask is None:
        return scores
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(-1e30, scores.dtype))
    return scores + mask.astype(scores.dtype)
