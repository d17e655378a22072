"""``mlxgpt.load``: any model reference -> (model, tokenizer).

A reference is an mlxgpt model folder, a Hugging Face GPT-2 folder or a hub id (found through
:mod:`.hub`); an mlxgpt folder is read by :mod:`.folder`, a Hugging Face one converted in memory
by :mod:`.hf` (nothing is written). The dtype follows the device unless asked: the CPU has no fast
half-precision matmul, so half-precision weights are upcast to float32 there; a GPU keeps what is
stored.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..core.backend import on_cpu
from ..core.model import GPT
from ..tokenizers import Tokenizer, load_tokenizer
from . import folder as mlx_folder
from .hf import load_hf
from .hub import resolve_source

_HALF = (mx.float16, mx.bfloat16)


def load(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: str | None = None,
    adapter: str | os.PathLike | None = None,
    revision: str | None = None,
) -> tuple[GPT, Tokenizer]:
    """Load a model and its tokenizer.

    ``dtype``: None/"auto" follows the device (see module doc); "float32", "float16" or
    "bfloat16" casts floating-point weights (quantized weights stay quantized).
    ``adapter``: a LoRA adapter folder applied on top.
    """
    explicit = mlx_folder.parse_dtype(dtype)
    folder = resolve_source(path_or_hub_id, revision)
    if mlx_folder.is_model_folder(folder):
        model = mlx_folder.load_model(folder, explicit)
        tokenizer = load_tokenizer(folder, mlx_folder.read_folder_meta(folder).get("tokenizer"))
    else:
        model, tokenizer = load_hf(folder, explicit)
    if explicit is None and on_cpu():
        model.set_dtype(mx.float32, lambda t: t in _HALF)
    if adapter is not None:
        from ..training.lora import load_adapter  # only adapter users pay for importing LoRA

        model = load_adapter(model, adapter)
    return model, tokenizer
