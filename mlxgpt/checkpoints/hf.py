"""Hugging Face GPT-2 and Llama folders <-> mlxgpt models.

Llama checkpoints (``LlamaForCausalLM``) carry mlxgpt's own names and layout: reading one is a
key copy (a tied head's ``lm_head.weight`` dropped). For GPT-2:

In: ``config.json`` with ``model.safetensors``, sharded safetensors
(``model.safetensors.index.json``) or ``pytorch_model.bin`` (read by :mod:`.torch_pickle`, never
unpickled with code execution). Hugging Face keeps Conv1D weights as ``(in, out)``; MLX's Linear
wants ``(out, in)``, so those four per block are transposed. Out (:func:`export`): a Hugging
Face folder that ``transformers`` loads.

Classifiers: a ``GPT2ForSequenceClassification`` folder (``transformer.*`` + ``score.weight``,
labels in ``id2label``) or a ``LlamaForSequenceClassification`` one (``model.*`` +
``score.weight``) is read by :func:`load_hf_classifier`, and an mlxgpt classifier folder is
exported as its family's, with ``pad_token_id`` set to end-of-text (or the end-of-turn token,
which mlxgpt never makes from text) so that ``transformers`` finds each row's last real token.
Such a checkpoint has no LM head: its model's head is tied to the embedding. Loaded as a plain
language model, such a folder gives its model (the head is left out).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..checks import check_bool
from ..core.backend import Kernels
from ..core.classifier import GPTClassifier
from ..core.config import GPTConfig
from ..core.llama import LlamaConfig
from ..core.model import Model, ModelConfig
from ..errors import MlxgptError, warn
from ..tokenizers import (
    IdTokenizer,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_from_hf_folder,
)
from . import folder as mlx_folder
from .files import atomic_dir, check_output, read_json
from .hub import SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX
from .quantize import dequantized_weights, float_dtype
from .torch_pickle import load_torch_bin

GPT2_VOCAB = 50257

# Blocks' Hugging Face Conv1D layers: stored (in, out), transposed to MLX's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older checkpoints carry next to the weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
SCORE = "score.weight"  # the head of Hugging Face's sequence classifiers
CLASSIFIER_ARCHS = {"gpt2": "GPT2ForSequenceClassification",
                    "llama": "LlamaForSequenceClassification"}


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


def hf_to_mlx(raw_cfg: dict[str, Any], hf: dict[str, mx.array]) -> tuple[ModelConfig, dict]:
    """Hugging Face config + tensors -> the family's config + MLX-layout weights (unprefixed
    keys).

    GPT-2: ``lm_head.weight`` equal to ``wte`` (or absent) means tied; a different one is kept as
    an untied head, as ``transformers`` does.
    """
    if not hf:
        raise MlxgptError("the weights file holds no tensors")
    if isinstance(raw_cfg, dict) and raw_cfg.get("model_type") == "llama":
        return _llama_from_hf(raw_cfg, hf)
    weights: dict[str, mx.array] = {}
    for key, value in hf.items():
        key = key.removeprefix("transformer.")
        if key.endswith(_BUFFERS) or key == SCORE:  # the head: see load_hf_classifier
            continue
        if key.endswith(_CONV1D) and value.ndim == 2:
            value = value.T  # (in, out) -> (out, in)
        weights[key] = value
    head = weights.pop("lm_head.weight", None)
    wte = weights.get("wte.weight")
    # A sequence classifier keeps no LM head: its model's head is the embedding.
    tie = check_bool(raw_cfg.get("tie_word_embeddings", True), "config: tie_word_embeddings") \
        or (head is None and SCORE in hf)
    if head is not None and tie:
        same = wte is not None and head.shape == wte.shape and bool(mx.array_equal(head, wte))
        tie = same
    if not tie:
        if head is None:
            raise MlxgptError("config unties the output head, but lm_head.weight is missing")
        weights["lm_head.weight"] = head
    cfg = GPTConfig.from_dict({**raw_cfg, "tie_word_embeddings": tie})
    return cfg, weights


def _llama_from_hf(raw_cfg: dict[str, Any], hf: dict[str, mx.array]) -> tuple[LlamaConfig, dict]:
    """A ``LlamaForCausalLM`` checkpoint: its keys are the model's; a tied head (the config's
    ``tie_word_embeddings``, as transformers reads it) drops ``lm_head.weight``. A
    ``LlamaForSequenceClassification`` has the same ``model.*`` keys, a head (left out here)
    and no LM head (tied)."""
    if SCORE in hf and "lm_head.weight" not in hf:
        raw_cfg = {**raw_cfg, "tie_word_embeddings": True}
    cfg = LlamaConfig.from_dict(raw_cfg)
    weights = {k: v for k, v in hf.items()
               if not k.endswith(".rotary_emb.inv_freq") and k != SCORE}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        raise MlxgptError("config unties the output head, but lm_head.weight is missing")
    return cfg, weights


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype`` (None: the embedding's dtype; float64 -> float32)."""
    if dtype is None:
        first = weights.get("wte.weight", weights.get("model.embed_tokens.weight",
                                                       next(iter(weights.values()))))
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


def load_hf(folder: Path, dtype: mx.Dtype | None = None,
            kernels: Kernels | None = None) -> tuple[Model, Tokenizer]:
    """A Hugging Face GPT-2 folder -> (model, tokenizer), in memory (``kernels``: the
    backend's, default the default device's)."""
    model, tokenizer, _, _ = _load_hf(folder, dtype, kernels)
    return model, tokenizer


def _load_hf(folder: Path, dtype: mx.Dtype | None,
             kernels: Kernels | None = None) -> tuple[Model, Tokenizer, dict, dict]:
    """(model, tokenizer, raw config, raw tensors) of a Hugging Face GPT-2 folder."""
    if not (folder / "config.json").is_file():
        raise MlxgptError(f"{folder}: no config.json (not a model folder)")
    raw_cfg = read_json(folder / "config.json")
    hf = read_hf_weights(folder)
    cfg, weights = hf_to_mlx(raw_cfg, hf)
    weights = cast_floats(weights, dtype)
    model = mlx_folder.build_model(cfg, weights, source=str(folder), kernels=kernels)
    return model, hf_tokenizer(folder, cfg.vocab_size), raw_cfg, hf


def is_hf_classifier(folder: Path) -> bool:
    """True for a Hugging Face folder whose config names a sequence classifier of a family
    mlxgpt runs (:data:`CLASSIFIER_ARCHS`)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    return isinstance(archs, list) and any(a in CLASSIFIER_ARCHS.values() for a in archs)


def load_hf_classifier(folder: Path, dtype: mx.Dtype | None = None,
                       kernels: Kernels | None = None) -> tuple[GPTClassifier, Tokenizer]:
    """A Hugging Face GPT2ForSequenceClassification or LlamaForSequenceClassification folder
    -> (classifier, tokenizer).

    Labels come from ``id2label`` (``LABEL_<i>`` where it has none, as ``transformers``).
    """
    model, tokenizer, raw_cfg, hf = _load_hf(folder, dtype, kernels)
    score = hf.get(SCORE)
    if score is None or score.ndim != 2 or score.shape[1] != model.config.n_embd:
        raise MlxgptError(f"{folder}: not a sequence classifier (no {SCORE} of shape "
                          f"(labels, {model.config.n_embd}))")
    id2label = raw_cfg.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise MlxgptError(f"{folder / 'config.json'}: id2label must be an object")
    n = score.shape[0]
    if int(raw_cfg.get("num_labels", n)) != n:
        raise MlxgptError(f"{folder / 'config.json'}: num_labels={raw_cfg['num_labels']}, but "
                          f"{SCORE} has {n} rows")
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(n)]
    clf = GPTClassifier(model, labels)
    clf.score.weight = score.astype(float_dtype(model))
    clf.eval()
    mx.eval(clf.parameters())
    return clf, tokenizer


# --------------------------------------------------------------------------- export


def mlx_to_hf(model: Model) -> dict[str, mx.array]:
    """The model's weights under Hugging Face keys and layout (GPT2LMHeadModel's, or
    LlamaForCausalLM's, which are the model's own)."""
    if model.config.model_type == "llama":
        return dequantized_weights(model)
    out = {}
    for key, value in dequantized_weights(model).items():
        if key.endswith(_CONV1D):
            value = value.T  # (out, in) -> (in, out)
        out[key if key == "lm_head.weight" else f"transformer.{key}"] = value
    return out


def classifier_to_hf(clf: GPTClassifier, tokenizer: Tokenizer) -> tuple[dict, dict[str, Any]]:
    """A classifier's weights and config as Hugging Face's sequence classifier of its family
    (GPT2ForSequenceClassification, LlamaForSequenceClassification)."""
    weights = mlx_to_hf(clf.transformer)
    weights.pop("lm_head.weight", None)  # an untied LM head has no place in the classifier
    weights[SCORE] = clf.score.weight
    cfg = clf.config.to_dict()
    eot = tokenizer.eot_id if tokenizer.eot_id is not None else cfg.get("eos_token_id")
    cfg.update(architectures=[CLASSIFIER_ARCHS[clf.config.model_type]],
               num_labels=len(clf.labels),
               id2label={str(i): label for i, label in enumerate(clf.labels)},
               label2id={label: i for i, label in enumerate(clf.labels)}, pad_token_id=eot,
               tie_word_embeddings=True)  # no LM head is stored: nothing to untie
    return weights, cfg


def export(model_path: str | os.PathLike, out_dir: str | os.PathLike, *,
           force: bool = False) -> Path:
    """Write an mlxgpt model folder as a Hugging Face folder of its family (quantized ->
    dequantized); a classifier folder becomes a GPT2ForSequenceClassification or
    LlamaForSequenceClassification folder.

    The tokenizer's files (``vocab.json`` + ``merges.txt`` for BPE) come along; a model that
    works on token ids only is exported without them.
    """
    folder = Path(model_path)
    out = Path(out_dir)
    check_output(out, force=force, inputs={"MODEL": folder}, out_label="OUT")
    if not mlx_folder.is_model_folder(folder):
        raise MlxgptError(f"{folder}: not an mlxgpt model folder")
    tok = load_tokenizer(folder, mlx_folder.read_folder_meta(folder).get("tokenizer"))
    classifier = mlx_folder.is_classifier_folder(folder)
    if classifier:
        weights, cfg = classifier_to_hf(mlx_folder.load_classifier_folder(folder), tok)
    else:
        model = mlx_folder.load_model(folder)
        weights, cfg = mlx_to_hf(model), model.config.to_dict()
    first = next(v for v in weights.values() if mx.issubdtype(v.dtype, mx.floating))
    cfg["torch_dtype"] = str(first.dtype).removeprefix("mlx.core.")
    with atomic_dir(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / SAFETENSORS), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if isinstance(tok, IdTokenizer):
            warn("the model has no tokenizer; exported without tokenizer files")
        else:
            tok.save(tmp)  # vocab.json + merges.txt + tokenizer_config.json, what HF reads
            if classifier:
                _pad_with_eos(tmp / "tokenizer_config.json")
    return out


def _pad_with_eos(path: Path) -> None:
    """Give a classifier's tokenizer its padding token (end-of-text, as ``pad_token_id``), so
    that transformers' tokenizer and pipelines can pad batches."""
    if not path.is_file():
        return
    tok_cfg = read_json(path)
    if tok_cfg.get("eos_token") and not tok_cfg.get("pad_token"):
        tok_cfg["pad_token"] = tok_cfg["eos_token"]
        path.write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
