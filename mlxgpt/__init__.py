"""mlxgpt: run, fine-tune and train GPT (GPT-2 family) models on MLX.

    >>> import mlxgpt
    >>> model, tokenizer = mlxgpt.load("path/to/model")   # or a hub id such as "gpt2"
    >>> logits = model(mx.array([tokenizer.encode("Hello")]))   # (1, T, vocab)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlxgpt import _blas

_blas.preload()  # must run before mlx is first imported; see mlxgpt/_blas.py

from mlxgpt.errors import MlxgptError  # noqa: E402
from mlxgpt.model import GPT, GPTConfig, KVCache  # noqa: E402

if TYPE_CHECKING:
    from mlxgpt.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "MlxgptError", "load"]


def load(path_or_hub_id: str, *, dtype: str | None = None, adapter: str | None = None,
         revision: str | None = None) -> tuple[GPT, Tokenizer]:
    """Load a model and its tokenizer: an mlxgpt folder, a Hugging Face folder or a hub id.

    Returns ``(model, tokenizer)``. Hugging Face sources are converted in memory.
    """
    from mlxgpt.loading import load as _load

    return _load(path_or_hub_id, dtype=dtype, adapter=adapter, revision=revision)
