"""GPT-2 hyper-parameters and the Hugging Face ``config.json`` keys they are read from.

:class:`GPTConfig` names its fields as Hugging Face's GPT-2 config does, reads a ``config.json``
dict (refusing keys it does not know and options that would change the math) and writes one
that ``transformers`` loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..checks import check_bool, check_int, check_number
from ..errors import MlxgptError

# Activations GPT-2 checkpoints declare that this model computes exactly.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
_ACTIVATIONS = (*TANH_GELU, "gelu")

# Hugging Face config keys that carry no meaning for inference/training here (bookkeeping,
# generation defaults, the classification head) and are accepted as they are.
HF_BOOKKEEPING = frozenset(
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

# Upper bounds on a model's sizes: far above any released model, low enough that a mistyped or
# hostile config is refused before anything tries to allocate terabytes. The Llama family's
# fields share them (hidden_size is a width, intermediate_size an MLP width).
MAX_SIZES = {
    "vocab_size": 2**22,
    "n_positions": 2**24,
    "n_embd": 2**16,
    "n_layer": 2**10,
    "n_head": 2**12,
    "n_inner": 2**18,
    "head_dim": 2**12,
}
MAX_PARAMS = 2**40  # ~1.1e12 parameters


def check_params(vocab: int, width: int, layers: int, per_layer: int, extra: int = 0,
                 untied_head: bool = False) -> None:
    """Refuse a config whose parameter count (roughly: embeddings, blocks, a separate position
    table or head) passes :data:`MAX_PARAMS`, each size being within its bound."""
    n = vocab * width * (2 if untied_head else 1) + layers * per_layer + extra
    if n > MAX_PARAMS:
        raise MlxgptError(f"config: a model of this shape has about {n:.2g} parameters; "
                          f"mlxgpt builds at most {MAX_PARAMS:.2g}")


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
            check_int(getattr(self, name), f"config: {name}", 1, MAX_SIZES[name])
        if self.n_embd % self.n_head:
            raise MlxgptError(
                f"config: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None:
            check_int(self.n_inner, "config: n_inner", 1, MAX_SIZES["n_inner"])
        check_number(self.layer_norm_epsilon, "config: layer_norm_epsilon", 0, above=True)
        check_bool(self.tie_word_embeddings, "config: tie_word_embeddings")
        check_number(self.dropout, "config: dropout")
        check_params(self.vocab_size, self.n_embd, self.n_layer,
                     4 * self.n_embd**2 + 2 * self.n_embd * self.hidden_dim,
                     self.n_positions * self.n_embd, not self.tie_word_embeddings)
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
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def model_type(self) -> str:
        return "gpt2"

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
        unknown = sorted(k for k in d if k not in names and k not in HF_BOOKKEEPING
                         and k not in _REQUIRED_VALUES)
        if unknown:
            raise MlxgptError(f"config: unknown key(s) {', '.join(unknown)}")
        for key, value in _REQUIRED_VALUES.items():
            if key in d and check_bool(d[key], f"config: {key}") != value:
                raise MlxgptError(f"config: {key}={d[key]!r} is not supported by mlxgpt")
        if "dropout" not in d:
            # Hugging Face keeps three dropout rates; use the residual one for training.
            d = {**d, "dropout": check_number(d.get("resid_pdrop") or 0.0, "config: resid_pdrop",
                                              0, 1)}
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
