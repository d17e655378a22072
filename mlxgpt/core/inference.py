"""A model prepared for generation (:func:`mlxgpt.core.backend.prepare_for_inference`): a type of
its own, so that a model whose weights were laid out anew for decoding is never trained or saved
by mistake, and the model it came from is never changed.

It offers the forward surface generation and serving use (:mod:`.model`: ``config``,
``kernels``, ``hidden``, ``logits``, ``__call__``, ``layers``, ``final_norm``, ``head``,
``n_params``, plus ``state`` and ``parameters()`` for ``mx.compile`` and ``mx.eval``) over its own
copy of the module tree. Anything else (``trainable_parameters``, ``save_weights``,
``weight_prefix``, ``train``, ``update``...) is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxgptError


class InferenceOnly(MlxgptError, AttributeError):
    """What a prepared model says when asked for more than generation: one line for the user,
    and still an AttributeError (``hasattr`` and ``getattr`` with a default keep working)."""


def clone_modules(value: Any) -> Any:
    """A copy of a module tree: new modules, lists and dicts, the same arrays (MLX arrays are
    values: laying a weight out anew makes a new one, so the original tree never changes)."""
    if isinstance(value, nn.Module):
        new = type(value).__new__(type(value))
        # plain attributes (config, kernels, the training flag); the frozen-names set copied
        new.__dict__.update({k: set(v) if isinstance(v, set) else v
                             for k, v in value.__dict__.items()})
        dict.update(new, {k: clone_modules(v) for k, v in value.items()})
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(clone_modules(v) for v in value)
    if isinstance(value, dict):
        return {k: clone_modules(v) for k, v in value.items()}
    return value


class InferenceModel:
    """A model for generation only; see the module doc. ``layouts``: the weight layout each part
    was given (``{"layers": "blocks", "head": "one-block"}``; empty: MLX's own)."""

    def __init__(self, module: nn.Module, layouts: Mapping[str, str] | None = None):
        self.module = module
        self.layouts = dict(layouts or {})

    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def kernels(self) -> Any:
        return self.module.kernels

    @property
    def layers(self) -> list[nn.Module]:
        return self.module.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.module.final_norm

    @property
    def head(self) -> nn.Module:
        return self.module.head

    @property
    def n_params(self) -> int:
        return self.module.n_params

    @property
    def state(self) -> dict:
        """The arrays a compiled step reads (``mx.compile(..., inputs=model.state)``)."""
        return self.module.state

    def parameters(self) -> dict:
        return self.module.parameters()

    def hidden(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        return self.module.hidden(tokens, cache)

    def logits(self, x: mx.array) -> mx.array:
        return self.module.logits(x)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        return self.module(tokens, cache)

    def __getattr__(self, name: str) -> Any:
        # only for names the class lacks: what training, saving and other edits reach for
        if name.startswith("__") or name == "module":
            raise AttributeError(name)
        raise InferenceOnly(f"a model prepared for inference has no {name}: it generates only; "
                            "train or save the model it was prepared from")
