"""``mlxgpt.load``: any model reference -> (model, tokenizer).

A reference is an mlxgpt model folder, a Hugging Face GPT-2 or Llama folder, a GGUF file or a
hub id (found through :mod:`.hub`); an mlxgpt folder is read by :mod:`.folder`, a Hugging Face
one converted in memory by :mod:`.hf` (nothing is written). The dtype follows the backend record
(:class:`mlxgpt.core.backend.Backend`) unless asked: the CPU has no fast half-precision matmul, so
half-precision weights are upcast to float32 there; a GPU keeps what is stored. The record also
gives the model its kernels and says whether quantized GGUF layers stay quantized.

``load_classifier`` does the same for classifiers: an mlxgpt classifier folder or a Hugging Face
``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification`` folder ->
(GPTClassifier, tokenizer).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ..core.backend import Backend
from ..core.backend import backend as current_backend
from ..core.classifier import GPTClassifier
from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer, load_tokenizer
from . import folder as mlx_folder
from .hf import is_hf_classifier, load_hf, load_hf_classifier
from .hub import resolve_source

_HALF = (mx.float16, mx.bfloat16)


def load(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: str | None = None,
    adapter: str | os.PathLike | None = None,
    revision: str | None = None,
    backend: Backend | None = None,
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer.

    ``dtype``: None/"auto" follows the backend (see module doc); "float32", "float16" or
    "bfloat16" casts floating-point weights (quantized weights stay quantized).
    ``adapter``: a LoRA or DoRA adapter folder (mlxgpt's or mlx-lm's) applied on top.
    ``backend``: the device's record (default: MLX's default device's).
    """
    backend = backend or current_backend()
    explicit = mlx_folder.parse_dtype(dtype)
    folder = resolve_source(path_or_hub_id, revision)
    if folder.is_file():  # a GGUF file
        from .gguf import read_gguf

        model, tokenizer = read_gguf(folder, explicit, backend)
    elif mlx_folder.is_model_folder(folder):
        model = mlx_folder.load_model(folder, explicit, backend.kernels)
        tokenizer = load_tokenizer(folder, mlx_folder.read_folder_meta(folder).get("tokenizer"))
    else:
        model, tokenizer = load_hf(folder, explicit, backend.kernels)
    if explicit is None:
        _upcast_half(model, backend)
    if adapter is not None:
        from .adapters.lora import load_adapter  # only adapter users pay for importing LoRA

        model = load_adapter(model, adapter)
    return model, tokenizer


def is_classifier(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> bool:
    """True when the reference is an mlxgpt classifier folder or a Hugging Face sequence
    classifier checkpoint (GPT-2's or Llama's)."""
    folder = resolve_source(path_or_hub_id, revision)
    return mlx_folder.is_classifier_folder(folder) or is_hf_classifier(folder)


def load_classifier(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: str | None = None,
    revision: str | None = None,
    backend: Backend | None = None,
) -> tuple[GPTClassifier, Tokenizer]:
    """Load a classifier and its tokenizer (``dtype`` and ``backend`` as for :func:`load`), in
    eval mode."""
    backend = backend or current_backend()
    explicit = mlx_folder.parse_dtype(dtype)
    folder = resolve_source(path_or_hub_id, revision)
    if mlx_folder.is_classifier_folder(folder):
        clf = mlx_folder.load_classifier_folder(folder, explicit, backend.kernels)
        tokenizer = load_tokenizer(folder, mlx_folder.read_folder_meta(folder).get("tokenizer"))
    elif is_hf_classifier(folder):
        clf, tokenizer = load_hf_classifier(folder, explicit, backend.kernels)
    else:
        raise MlxgptError(f"{path_or_hub_id}: not a classifier (no {mlx_folder.HEAD_CONFIG}; "
                          "make one with `mlxgpt finetune --task classify`)")
    if explicit is None:
        _upcast_half(clf, backend)
    return clf, tokenizer


def _upcast_half(model: nn.Module, backend: Backend) -> None:
    """Half-precision weights to the backend's float32 where it has no fast half-precision
    matmul (the CPU); a GPU keeps what is stored."""
    if backend.dtype == mx.float32:
        model.set_dtype(mx.float32, lambda t: t in _HALF)
