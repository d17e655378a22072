"""The Llama family in MLX (Llama, SmolLM, TinyLlama, ...): the only module that knows its
architecture.

Module names mirror Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj``, ``model.norm``, ``lm_head``), so a checkpoint loads by a
key-by-key copy; the Linear layout ``(out, in)`` is Hugging Face's too. Differences from GPT-2
(:mod:`.gpt2`): RMSNorm, rotary positions instead of a position table, a SwiGLU MLP,
grouped-query attention (fewer key/value heads than query heads), no biases unless the config
asks. The cache protocol, ``hidden``/``logits`` and the kernels are GPT-2's (see
:mod:`.model`).

Shapes: B batch, T new tokens, S cached + new tokens, C = hidden_size, H query heads,
K key/value heads, D = head_dim, F = intermediate_size, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checks import check_bool, check_int, check_number
from ..errors import MlxgptError
from .backend import Kernels, backend
from .config import HF_BOOKKEEPING, MAX_SIZES, check_params
from .gpt2 import Cache

# config.json keys that do not change the computation (bookkeeping, generation defaults):
# those every Hugging Face config may carry, and Llama's own.
_IGNORED_HF_KEYS = HF_BOOKKEEPING | frozenset(
    """
    pretraining_tp attention_dropout transformers.js_config quantization_config
    is_llama_config rope_interleaved
    """.split()
)
ROPE_TYPES = ("default", "linear", "llama3")
# Each size field -> the GPT-2 field whose upper bound it shares.
_BOUNDS = {"vocab_size": "vocab_size", "hidden_size": "n_embd", "intermediate_size": "n_inner",
           "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
           "num_key_value_heads": "n_head", "head_dim": "head_dim",
           "max_position_embeddings": "n_positions"}


@dataclass
class LlamaConfig:
    """Llama hyper-parameters, named as in Hugging Face's ``config.json``."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    model_type: str = field(default="llama", init=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) \
                and isinstance(self.hidden_size, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name, bound in _BOUNDS.items():  # GPT-2's bounds (see MAX_SIZES)
            check_int(getattr(self, name), f"config: {name}", 1, MAX_SIZES[bound])
        check_params(self.vocab_size, self.hidden_size, self.num_hidden_layers,
                     self.hidden_size * self.head_dim * 2 * (self.num_attention_heads
                                                             + self.num_key_value_heads)
                     + 3 * self.hidden_size * self.intermediate_size,
                     untied_head=self.tie_word_embeddings is not True)
        if self.num_attention_heads % self.num_key_value_heads:
            raise MlxgptError(f"config: num_attention_heads ({self.num_attention_heads}) is not "
                              f"a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise MlxgptError(f"config: head_dim must be even for rotary positions, "
                              f"got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            check_number(getattr(self, name), f"config: {name}", 0, above=True)
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            check_bool(getattr(self, name), f"config: {name}")
        if self.hidden_act != "silu":
            raise MlxgptError(f"config: hidden_act {self.hidden_act!r} is not supported (silu)")
        rope_inv_freq(self)  # refuses an unknown or malformed rope_scaling

    # The names the rest of mlxgpt uses for every family (GPT-2's, see .config.GPTConfig).
    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face Llama ``config.json`` dict; refuse what the model cannot
        compute."""
        if d.get("model_type") != "llama":
            raise MlxgptError(f"config: model_type {d.get('model_type')!r} is not llama")
        d = dict(d)
        # transformers 5 writes rope_parameters {"rope_type", "rope_theta", ...}
        params = d.pop("rope_parameters", None)
        if isinstance(params, dict):
            d.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                d["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        names = {f.name for f in fields(cls) if f.init}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise MlxgptError(f"config: missing key(s) {', '.join(missing)}")
        unknown = sorted(k for k in d if k not in names and k not in _IGNORED_HF_KEYS)
        if unknown:
            raise MlxgptError(f"config: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise MlxgptError(f"config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face Llama ``config.json`` keys (loadable by ``transformers`` and mlx-lm)."""
        d = asdict(self)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama")
        return d


def rope_inv_freq(cfg: LlamaConfig) -> mx.array:
    """The rotary frequencies (D/2,), float32, with the config's scaling (as transformers'
    ``ROPE_INIT_FUNCTIONS``: default, linear, llama3)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (mx.arange(0, d, 2, dtype=mx.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if not isinstance(s, dict):
        raise MlxgptError(f"config: rope_scaling must be an object or null, got {s!r}")
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise MlxgptError(f"config: rope scaling {kind!r} is not supported "
                          f"({', '.join(ROPE_TYPES)})")
    try:
        if kind == "linear":
            return inv / float(s["factor"])
        if kind == "llama3":
            factor, low, high = (float(s[k]) for k in ("factor", "low_freq_factor",
                                                       "high_freq_factor"))
            old = float(s["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = mx.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            return mx.where(medium, smoothed, scaled)
    except (KeyError, TypeError, ValueError) as e:
        raise MlxgptError(f"config: rope_scaling {s!r} is incomplete ({e})") from None
    return inv


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Hugging Face's rotary embedding (halves, not interleaved pairs): x (B, H, T, D)."""
    x1, x2 = mx.split(x, 2, axis=-1)
    return x * cos + mx.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, kernels: Kernels):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (cfg.n_head, cfg.n_kv_head, cfg.head_dim)
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_head * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_head * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_head * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.attend = kernels.attention

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array,
                 cache: Cache | None = None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = self.k_proj(x).reshape(B, T, self.n_kv_head, -1).transpose(0, 2, 1, 3)  # (B, K, T, D)
        v = self.v_proj(x).reshape(B, T, self.n_kv_head, -1).transpose(0, 2, 1, 3)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            mask = "causal" if T > 1 else None
        else:
            k, v, mask = cache.update_and_fetch(k, v)  # (B, K, S, D)
        y = self.attend(q, k, v, self.scale, mask)  # (B, H, T, D); K < H: grouped
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, kernels: Kernels):
        super().__init__()
        self.act = kernels.silu
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-RMSNorm block."""

    def __init__(self, cfg: LlamaConfig, kernels: Kernels):
        super().__init__()
        self.self_attn = Attention(cfg, kernels)
        self.mlp = MLP(cfg, kernels)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array,
                 cache: Cache | None = None) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, kernels: Kernels):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, kernels) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class Llama(nn.Module):
    """``LlamaForCausalLM``: the model and its head (tied to the embedding or its own)."""

    weight_prefix = ""  # parameter names are Hugging Face's (and mlx-lm's) as they are

    def __init__(self, cfg: LlamaConfig, kernels: Kernels | None = None):
        super().__init__()
        self.config = cfg
        self.kernels = kernels or backend().kernels
        self.model = LlamaModel(cfg, self.kernels)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq = rope_inv_freq(cfg)  # (D/2,); "_": not a parameter

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def hidden(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        """Final hidden states (B, T, C) for token ids (B, T)."""
        T = tokens.shape[1]
        # an int, a scalar array inside mx.compile, or (B,) per-row offsets (a batch of sequences)
        offset = cache[0].offset if cache else 0
        if isinstance(offset, mx.array) and offset.ndim == 1:
            offset = offset[:, None, None]  # (B, 1, 1): each row's positions (B, 1, T)
        positions = (offset + mx.arange(T)).astype(mx.float32)  # (T,) or (B, 1, T)
        freqs = positions[..., None] * self._inv_freq  # (..., T, D/2), float32 as transformers
        angles = mx.concatenate([freqs, freqs], axis=-1)  # (..., T, D)
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache[i] if cache else None)
        return self.model.norm(x)

    def logits(self, x: mx.array) -> mx.array:
        """Hidden states (..., C) -> logits (..., V) through the tied (or explicit) head."""
        head = self.head
        return head.as_linear(x) if head is self.model.embed_tokens else head(x)

    @property
    def head(self) -> nn.Module:
        """The output projection: ``lm_head``, or the tied input embedding."""
        return self.lm_head if "lm_head" in self else self.model.embed_tokens

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        """Token ids (B, T) -> logits (B, T, V). With a cache, positions continue from it."""
        return self.logits(self.hidden(tokens, cache))

    @property
    def n_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        return sum(v.size for _, v in tree_flatten(self.parameters()))
