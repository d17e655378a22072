"""``mlxgpt.load``: any model reference -> (model, tokenizer).

A reference is an mlxgpt model folder, a Hugging Face GPT-2 folder or a hub id; the last two are
converted in memory (nothing is written). The dtype follows the device unless asked: the CPU has
no fast half-precision matmul, so half-precision weights are upcast to float32 there; a GPU
keeps what is stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from . import checkpoint as ckpt
from .convert import load_hf, resolve_source
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

_HALF = (mx.float16, mx.bfloat16)


def resolve_model(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder holding a model: the folder given, or a hub id's cached snapshot."""
    return resolve_source(path_or_hub_id, revision)


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
    explicit = ckpt.parse_dtype(dtype)
    folder = resolve_model(path_or_hub_id, revision)
    if ckpt.is_model_folder(folder):
        model = ckpt.load_model(folder, explicit)
        tokenizer = load_tokenizer(folder, ckpt.read_folder_meta(folder).get("tokenizer"))
    else:
        model, tokenizer = load_hf(folder, explicit)
    if explicit is None and mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32, lambda t: t in _HALF)
    if adapter is not None:
        from .lora import load_adapter  # only adapter users pay for importing LoRA

        model = load_adapter(model, adapter)
    return model, tokenizer
