"""GPT-2 in MLX: the only module that knows the architecture.

Module names mirror the Hugging Face GPT-2 checkpoint (``wte``, ``wpe``, ``h.{i}.attn.c_attn``,
``ln_f``...), so loading a converted checkpoint is a key-by-key copy. Linear weights use MLX's
``(out, in)`` layout; Hugging Face's Conv1D ``(in, out)`` weights are transposed by the converter.

Shapes: B batch, T new tokens, S cached + new tokens, C = n_embd, H = n_head, D = C // H, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import ops
from .errors import MlxgptError

# Activations GPT-2 checkpoints declare that this model computes exactly.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
_ACTIVATIONS = (*_TANH_GELU, "gelu")

# Hugging Face config keys that carry no meaning for inference/training here (bookkeeping,
# generation defaults, the classification head) and are accepted as they are.
_IGNORED_HF_KEYS = frozenset(
    """
    architectures model_type transformers_version torch_dtype dtype _name_or_path n_ctx use_cache
    initializer_range attn_pdrop embd_pdrop resid_pdrop summary_type summary_use_proj
    summary_activation summary_proj_to_labels summary_first_dropout task_specific_params
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id id2label label2id
    num_labels problem_type output_attentions output_hidden_states return_dict torchscript
    use_return_dict output_scores return_dict_in_generate chunk_size_feed_forward is_decoder
    is_encoder_decoder tokenizer_class prefix finetuning_task pruned_heads tf_legacy_loss
    use_bfloat16 cross_attention_hidden_size tie_encoder_decoder add_bias_logits max_length
    min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens gradient_checkpointing quantization mlxgpt
    """.split()
)

# Keys whose only supported value is the one given; anything else changes the math.
_REQUIRED_VALUES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


@dataclass
class GPTConfig:
    """GPT-2 hyper-parameters, named as in Hugging Face's ``config.json``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    dropout: float = 0.0  # training only: embedding and residual dropout (not attention)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise MlxgptError(f"config: {name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise MlxgptError(
                f"config: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise MlxgptError(f"config: n_inner must be a positive integer, got {self.n_inner!r}")
        if self.activation_function not in _ACTIVATIONS:
            raise MlxgptError(
                f"config: activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MlxgptError(f"config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Read a Hugging Face GPT-2 ``config.json`` dict; refuse what the model cannot compute."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise MlxgptError(f"config: model_type {d.get('model_type')!r} is not gpt2")
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in d]
        if missing:
            raise MlxgptError(f"config: missing key(s) {', '.join(missing)}")
        unknown = sorted(k for k in d if k not in names and k not in _IGNORED_HF_KEYS
                         and k not in _REQUIRED_VALUES)
        if unknown:
            raise MlxgptError(f"config: unknown key(s) {', '.join(unknown)}")
        for key, value in _REQUIRED_VALUES.items():
            if key in d and bool(d[key]) != value:
                raise MlxgptError(f"config: {key}={d[key]!r} is not supported by mlxgpt")
        if "dropout" not in d:
            # Hugging Face keeps three dropout rates; use the residual one for training.
            d = {**d, "dropout": float(d.get("resid_pdrop", 0.0) or 0.0)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise MlxgptError(f"config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face GPT-2 ``config.json`` keys (loadable by ``transformers``)."""
        d = asdict(self)
        dropout = d.pop("dropout")
        d.update(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            n_ctx=self.n_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=0.0,
            # <|endoftext|>: 50256 for GPT-2's vocabulary, the last id (256) for the byte one.
            bos_token_id=min(50256, self.vocab_size - 1),
            eos_token_id=min(50256, self.vocab_size - 1),
        )
        return d


def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU (Hugging Face ``gelu_new``), written out to match the reference exactly."""
    if ops.use_fast_math():  # CPU: the same function without libm's tanh (see mlxgpt/ops.py)
        return ops.gelu_tanh(x)
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def gelu_erf(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0)))


class KVCache:
    """Keys and values of past positions for one layer, in a buffer grown in fixed steps.

    Growing in steps (rather than concatenating every token) keeps decode at one slice-update
    per layer per token. ``trim`` rolls back, so a chat can drop tokens it did not keep.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # (B, H, capacity, D)
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v (B, H, T, D); return all cached keys and values (B, H, S, D)."""
        prev, t = self.offset, k.shape[2]
        if self.keys is None or prev + t > self.keys.shape[2]:
            b, h, _, d = k.shape
            n_steps = (self.step + t - 1) // self.step
            grow_k = mx.zeros((b, h, n_steps * self.step, d), k.dtype)
            grow_v = mx.zeros((b, h, n_steps * self.step, v.shape[3]), v.dtype)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], grow_v], axis=2)
        self.offset += t
        self.keys[..., prev : self.offset, :] = k
        self.values[..., prev : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> None:
        """Forget the last n positions."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        return self.keys, self.values


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.scale = cfg.head_dim**-0.5
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)  # 3 x (B, T, C)
        q, k, v = (a.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3) for a in (q, k, v))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, H, S, D)
        # "causal" aligns the last query with the last key, so it is right with a cache too.
        mask = "causal" if T > 1 else None
        if hasattr(cache, "attention_mask"):
            # A cache that hands back a fixed-size buffer (generate's compiled decode step)
            # says which of its keys are real.
            mask = cache.attention_mask(T)
        if ops.use_fast_math():  # CPU: softmax without libm's exp (see mlxgpt/ops.py)
            y = ops.attention(q, k, v, self.scale, mask)
        else:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden_dim)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd)
        self.act = gelu_tanh if cfg.activation_function in _TANH_GELU else gelu_erf

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        a = self.attn(self.ln_1(x), cache)
        if self.drop is not None:
            a = self.drop(a)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if self.drop is not None:
            m = self.drop(m)
        return x + m


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = [Block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def hidden(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Final hidden states (B, T, C) for token ids (B, T)."""
        T = tokens.shape[1]
        offset = cache[0].offset if cache else 0  # an int, or a scalar array inside mx.compile
        if isinstance(offset, int) and offset + T > self.config.n_positions:
            raise ValueError(
                f"positions {offset}..{offset + T - 1} exceed n_positions={self.config.n_positions}"
            )
        x = self.wte(tokens) + self.wpe(offset + mx.arange(T))  # (B, T, C)
        if self.drop is not None:
            x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache else None)
        return self.ln_f(x)

    def logits(self, x: mx.array) -> mx.array:
        """Hidden states (..., C) -> logits (..., V) through the tied (or explicit) head."""
        if "lm_head" in self:
            return self.lm_head(x)
        return self.wte.as_linear(x)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Token ids (B, T) -> logits (B, T, V). With a cache, positions continue from it."""
        return self.logits(self.hidden(tokens, cache))

    @property
    def n_params(self) -> int:
        """Parameter count, counting the tied embedding once (as GPT-2's 124M does)."""
        from mlx.utils import tree_flatten

        return sum(v.size for _, v in tree_flatten(self.parameters()))
