"""The model families mlxgpt runs, and the one small interface the rest of the code uses.

A family is one file (:mod:`.gpt2`, :mod:`.llama`): a config class named as the Hugging Face
``config.json`` and a model class named as the checkpoint. ``model_type`` picks the family.
Every model offers the same surface, so generation, serving and training never ask which:

- ``config``: ``model_type``, ``vocab_size``, ``n_positions`` (the context), ``n_layer``,
  ``n_embd``, ``n_head``, ``n_kv_head`` and ``head_dim`` (the KV cache's shape);
- ``hidden(tokens (B, T), cache) -> (B, T, C)`` and ``logits(h) -> (..., V)``;
  ``model(tokens, cache)`` is both;
- a cache is a list with one object per layer holding ``offset`` and
  ``update_and_fetch(k, v) -> (keys, values, mask)`` (:class:`~mlxgpt.generation.cache.KVCache`);
  ``offset`` may be an int, a scalar array (inside ``mx.compile``) or (B,) per-row positions;
- ``layers`` (the blocks), ``final_norm``, ``head``, ``n_params``, ``kernels`` and
  ``weight_prefix`` (the key prefix of the family's weights in a model folder).

A third family is one more file and one more line in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any, Union

from ..errors import MlxgptError
from .backend import Kernels
from .config import GPTConfig
from .gpt2 import GPT, Cache
from .llama import Llama, LlamaConfig

Model = Union[GPT, Llama]  # noqa: UP007 (a runtime alias for type hints)
ModelConfig = Union[GPTConfig, LlamaConfig]  # noqa: UP007

# model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type, type]] = {"gpt2": (GPTConfig, GPT), "llama": (LlamaConfig, Llama)}

__all__ = ["FAMILIES", "GPT", "Cache", "Llama", "Model", "ModelConfig", "build", "config_from_dict"]


def config_from_dict(d: Any) -> ModelConfig:
    """A Hugging Face ``config.json`` dict -> the config of its family (``model_type``;
    GPT-2 when absent, as older GPT-2 folders have it)."""
    if not isinstance(d, dict):
        raise MlxgptError(f"config: expected a JSON object, got {type(d).__name__}")
    kind = d.get("model_type", "gpt2")
    if kind not in FAMILIES:
        raise MlxgptError(f"config: model_type {kind!r} is not supported "
                          f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[kind][0].from_dict(d)


def build(cfg: ModelConfig, kernels: Kernels | None = None) -> Model:
    """A new model of ``cfg``'s family (random weights)."""
    return FAMILIES[cfg.model_type][1](cfg, kernels)
