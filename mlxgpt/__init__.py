"""mlxgpt: run, fine-tune and train GPT models (the GPT-2 and Llama families) on MLX.

    >>> from mlxgpt import load, generate, stream_generate
    >>> model, tokenizer = load("path/to/model")   # an mlxgpt or Hugging Face folder, or a hub id
    >>> print(generate(model, tokenizer, "Once upon a time", max_tokens=50))
    >>> for r in stream_generate(model, tokenizer, "Hello"):
    ...     print(r.text, end="", flush=True)
    >>> batch_generate(model, tokenizer, ["Hello", "The sea"], max_tokens=20)  # decoded together
    >>> clf, tokenizer = load_classifier("path/to/classifier")   # finetune --task classify
    >>> classify(clf, tokenizer, ["A gorgeous, witty film."])     # [Prediction(label, prob)]

The package's parts: ``core`` (config, model, backend choices), ``cpu`` (BLAS, arithmetic-only
kernels, weight layouts), ``checkpoints`` (model folders, Hugging Face conversion, quantization),
``tokenizers``, ``generation`` (KV cache, sampling, streaming, chat), ``data`` (corpora and JSONL
examples), ``training`` (the loop, LoRA, pretrain/finetune/eval), ``cli``.
"""

from __future__ import annotations

from mlxgpt.cpu import blas

# The one thing importing mlxgpt does: load the BLAS MLX's CPU matmuls will use, which must
# happen before mlx is first imported (mlxgpt/cpu/blas.py; it starts no process). Everything
# else is decided on first need (MLX's CPU streams: when training code is imported).
blas.preload()

from mlxgpt.checkpoints.load import load, load_classifier  # noqa: E402
from mlxgpt.core.classifier import GPTClassifier  # noqa: E402
from mlxgpt.core.config import GPTConfig  # noqa: E402
from mlxgpt.core.llama import LlamaConfig  # noqa: E402
from mlxgpt.core.model import GPT, Llama  # noqa: E402
from mlxgpt.errors import MlxgptError  # noqa: E402
from mlxgpt.generation.batch import batch_generate  # noqa: E402
from mlxgpt.generation.classify import classify  # noqa: E402
from mlxgpt.generation.generate import generate, stream_generate  # noqa: E402

__all__ = ["GPT", "GPTClassifier", "GPTConfig", "Llama", "LlamaConfig", "MlxgptError",
           "batch_generate", "classify", "generate", "load", "load_classifier", "stream_generate"]

