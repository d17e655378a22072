"""Hugging Face GPT-2 folders <-> mlxgpt models.

In: ``config.json`` with ``model.safetensors``, sharded safetensors
(``model.safetensors.index.json``) or ``pytorch_model.bin`` (read by :mod:`.torch_pickle`, never
unpickled with code execution). Hugging Face keeps Conv1D weights as ``(in, out)``; MLX's Linear
wants ``(out, in)``, so those four per block are transposed. Out (:func:`export`): a Hugging
Face folder that ``transformers`` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..core.config import GPTConfig
from ..core.model import GPT
from ..errors import MlxgptError, warn
from ..tokenizers import (
    IdTokenizer,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_from_hf_folder,
)
from . import folder as mlx_folder
from .files import atomic_dir, read_json
from .hub import SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX
from .quantize import dequantized_weights
from .torch_pickle import load_torch_bin

GPT2_VOCAB = 50257

# Blocks' Hugging Face Conv1D layers: stored (in, out), transposed to MLX's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older checkpoints carry next to the weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def read_hf_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a Hugging Face folder, keys as stored (``transformer.`` prefix or not)."""
    if (folder / SAFETENSORS).exists():
        return mlx_folder.load_safetensors(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).exists():
        return _read_sharded(folder, SAFETENSORS_INDEX, mlx_folder.load_safetensors)
    if (folder / TORCH_BIN).exists():
        return load_torch_bin(folder / TORCH_BIN)
    if (folder / TORCH_BIN_INDEX).exists():
        return _read_sharded(folder, TORCH_BIN_INDEX, load_torch_bin)
    raise MlxgptError(
        f"{folder}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})"
    )


def _read_sharded(folder: Path, index_name: str, read) -> dict[str, mx.array]:
    index = read_json(folder / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MlxgptError(f"{folder / index_name}: no weight_map")
    shards = set(weight_map.values())
    for shard in shards:  # plain file names next to the index, nothing else
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise MlxgptError(f"{folder / index_name}: bad shard name {shard!r}")
    weights: dict[str, mx.array] = {}
    for shard in sorted(shards):
        weights.update(read(folder / shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise MlxgptError(f"{folder / index_name}: tensor {missing[0]} is in no shard")
    return weights


def hf_to_mlx(raw_cfg: dict[str, Any], hf: dict[str, mx.array]) -> tuple[GPTConfig, dict]:
    """Hugging Face GPT-2 config + tensors -> GPTConfig + MLX-layout weights (unprefixed keys).

    ``lm_head.weight`` equal to ``wte`` (or absent) means tied; a different one is kept as an
    untied head, as ``transformers`` does.
    """
    if not hf:
        raise MlxgptError("the weights file holds no tensors")
    weights: dict[str, mx.array] = {}
    for key, value in hf.items():
        key = key.removeprefix("transformer.")
        if key.endswith(_BUFFERS):
            continue
        if key.endswith(_CONV1D) and value.ndim == 2:
            value = value.T  # (in, out) -> (out, in)
        weights[key] = value
    head = weights.pop("lm_head.weight", None)
    wte = weights.get("wte.weight")
    tie = bool(raw_cfg.get("tie_word_embeddings", True))
    if head is not None and tie:
        same = wte is not None and head.shape == wte.shape and bool(mx.array_equal(head, wte))
        tie = same
    if not tie:
        if head is None:
            raise MlxgptError("config unties the output head, but lm_head.weight is missing")
        weights["lm_head.weight"] = head
    cfg = GPTConfig.from_dict({**raw_cfg, "tie_word_embeddings": tie})
    return cfg, weights


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype`` (None: the embedding's dtype; float64 -> float32)."""
    if dtype is None:
        first = weights.get("wte.weight", next(iter(weights.values())))
        dtype = first.dtype if first.dtype in mlx_folder.DTYPES.values() else mx.float32
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}


def hf_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The source's tokenizer; without files GPT-2 BPE for a 50257-token vocabulary, else
    token ids only (with a warning)."""
    tok = tokenizer_from_hf_folder(folder)
    if tok is None and vocab_size == GPT2_VOCAB:
        tok = gpt2_tokenizer()
    if tok is None:
        warn(f"{folder} has no tokenizer files and its vocabulary ({vocab_size}) is not GPT-2's; "
             "the model will work on token ids only")
        tok = IdTokenizer(vocab_size)
    elif tok.vocab_size > vocab_size:
        warn(f"tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}")
    return tok


def load_hf(folder: Path, dtype: mx.Dtype | None = None) -> tuple[GPT, Tokenizer]:
    """A Hugging Face GPT-2 folder -> (model, tokenizer), in memory."""
    if not (folder / "config.json").is_file():
        raise MlxgptError(f"{folder}: no config.json (not a model folder)")
    raw_cfg = read_json(folder / "config.json")
    hf = read_hf_weights(folder)
    cfg, weights = hf_to_mlx(raw_cfg, hf)
    weights = cast_floats(weights, dtype)
    model = mlx_folder.build_model(cfg, weights, source=str(folder))
    return model, hf_tokenizer(folder, cfg.vocab_size)


# --------------------------------------------------------------------------- export


def mlx_to_hf(model: GPT) -> dict[str, mx.array]:
    """The model's weights under Hugging Face GPT2LMHeadModel keys and layout."""
    out = {}
    for key, value in dequantized_weights(model).items():
        if key.endswith(_CONV1D):
            value = value.T  # (out, in) -> (in, out)
        out[key if key == "lm_head.weight" else f"transformer.{key}"] = value
    return out


def export(model_path: str | os.PathLike, out_dir: str | os.PathLike, *,
           force: bool = False) -> Path:
    """Write an mlxgpt model folder as a Hugging Face GPT-2 folder (quantized -> dequantized).

    The tokenizer's files (``vocab.json`` + ``merges.txt`` for BPE) come along; a model that
    works on token ids only is exported without them.
    """
    folder = Path(model_path)
    out = Path(out_dir)
    if out.exists() and not force:
        raise MlxgptError(f"{out} already exists (use --force to replace it)")
    if not mlx_folder.is_model_folder(folder):
        raise MlxgptError(f"{folder}: not an mlxgpt model folder")
    model = mlx_folder.load_model(folder)
    tok = load_tokenizer(folder, mlx_folder.read_folder_meta(folder).get("tokenizer"))
    weights = mlx_to_hf(model)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(weights["transformer.wte.weight"].dtype).removeprefix("mlx.core.")
    with atomic_dir(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / SAFETENSORS), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if isinstance(tok, IdTokenizer):
            warn("the model has no tokenizer; exported without tokenizer files")
        else:
            tok.save(tmp)  # vocab.json + merges.txt + tokenizer_config.json, what HF reads
    return out
