"""Model folders on disk: ``config.json`` + ``model.safetensors`` + the tokenizer's files.

Weights are stored in MLX layout (Linear ``(out, in)``) under mlx-lm's names (each family's
``weight_prefix``: ``model.h.0...`` for GPT-2, Hugging Face's own ``model.layers.0...`` for
Llama), so mlx-lm can load an mlxgpt folder as it is. ``config.json`` holds the family's Hugging
Face keys, ``quantization`` when quantized (mlx-lm's form: ``{group_size, bits}`` for most layers,
and ``{"<module path>": {group_size, bits}}`` for those that differ), and an ``mlxgpt`` section
(format version, tokenizer description). Every write is atomic (:mod:`.files`).
This module reads and writes mlxgpt's own format only; Hugging Face folders are :mod:`.hf`'s.

A classifier folder (:class:`~mlxgpt.core.classifier.GPTClassifier`) is a model folder (its
GPT, which loads as a plain language model too) plus the head: ``classifier.safetensors``
(``score.weight``, ``(labels, n_embd)``) and ``classifier.json`` (the labels, in id order).
Training checkpoints carry the same two head files next to an adapter or alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checks import check_links, shown
from ..core.backend import Kernels
from ..core.classifier import GPTClassifier
from ..core.model import FAMILIES, Model, ModelConfig, build, config_from_dict
from ..errors import MlxgptError
from .files import atomic_dir, read_json
from .quantize import float_dtype, model_quantization, quantize_as_stored

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
KEY_PREFIX = "model."  # GPT-2's weight_prefix (the adapters' too)
HEAD_WEIGHTS = "classifier.safetensors"
HEAD_CONFIG = "classifier.json"
HEAD_FORMAT = "mlxgpt-classifier"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(name: str | None) -> mx.Dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise MlxgptError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


# --------------------------------------------------------------------------- reading


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """Load a safetensors file, turning MLX's low-level errors into one clear line."""
    if not Path(path).is_file():
        raise MlxgptError(f"{path}: weights file not found")
    check_links(Path(path).parent, [Path(path).name])
    try:
        return mx.load(str(path))
    except Exception as e:  # mx.load raises RuntimeError/ValueError on truncated or bad files
        raise MlxgptError(f"{path}: cannot read weights ({e})") from None


def read_weights(path: Path, prefix: str = KEY_PREFIX) -> dict[str, mx.array]:
    """A weights file's tensors under the model's own names (the family's prefix removed)."""
    return {k.removeprefix(prefix): v for k, v in load_safetensors(path).items()}


def restore_weights(model: nn.Module, folder: Path) -> None:
    """Load a model folder's weights into ``model`` (same shape, checked), e.g. on resume."""
    weights = read_weights(Path(folder) / WEIGHTS_FILE, model.weight_prefix)
    check_weights(model, weights, str(Path(folder) / WEIGHTS_FILE))
    model.load_weights(list(weights.items()))


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by mlxgpt (or mlx-lm's GPT-2 layout). Every loader asks this
    first, so a folder whose files link outside it is refused here (:func:`check_links`)."""
    p = Path(path)
    if p.is_dir():
        check_links(p)
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        return False
    try:
        cfg = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(cfg, dict) and "mlxgpt" in cfg


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Refuse missing, unexpected or wrongly shaped tensors with one line naming the first."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MlxgptError(f"{source}: missing tensor {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise MlxgptError(f"{source}: unexpected tensor {unexpected[0]}{more}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise MlxgptError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, "
                f"expected {tuple(expected[k].shape)}"
            )


def build_model(
    cfg: ModelConfig,
    weights: dict[str, mx.array],
    quantization: dict[str, Any] | None = None,
    source: str = "weights",
    kernels: Kernels | None = None,
) -> Model:
    """A model with the given (unprefixed, MLX-layout) weights, quantized layers where stored;
    ``kernels``: the backend's (default: the default device's)."""
    model = build(cfg, kernels)
    if quantization:
        quantize_as_stored(model, weights, quantization)
    check_weights(model, weights, source)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_model(path: str | os.PathLike, dtype: mx.Dtype | None = None,
               kernels: Kernels | None = None) -> Model:
    """Load an mlxgpt model folder. ``dtype`` casts floating weights (not quantized ones);
    ``kernels`` as for :func:`build_model`."""
    folder = Path(path)
    if not folder.is_dir():
        raise MlxgptError(f"{folder}: not a model folder")
    check_links(folder)
    raw = read_json(folder / CONFIG_FILE)
    cfg = config_from_dict(raw)
    weights = read_weights(folder / WEIGHTS_FILE, FAMILIES[cfg.model_type][1].weight_prefix)
    quant = raw.get("quantization")
    if dtype is not None:
        # Quantized weights are integers and keep their layout; float tensors are cast.
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    return build_model(cfg, weights, quant, source=str(folder / WEIGHTS_FILE), kernels=kernels)


def save_model(
    model: Model,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    force: bool = False,
    quantization: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and its tokenizer's files) as a model folder, atomically."""
    with atomic_dir(out_dir, force=force) as tmp:
        write_model_files(model, tmp, tokenizer, quantization=quantization, extra=extra)
    return Path(out_dir)


def write_model_files(
    model: Model,
    folder: Path,
    tokenizer: Any = None,
    *,
    quantization: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write config, weights and tokenizer into an existing (temporary) folder."""
    cfg = model.config.to_dict()
    meta: dict[str, Any] = {"format": FORMAT_VERSION}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.save(folder)
    if extra:
        meta.update(extra)
    cfg["mlxgpt"] = meta
    quantization = quantization or model_quantization(model)  # a GGUF's layers as they came
    if quantization:
        cfg["quantization"] = dict(quantization)
    weights = {model.weight_prefix + k: v for k, v in tree_flatten(model.parameters())}
    first = next(iter(weights.values()))
    cfg["torch_dtype"] = str(first.dtype).removeprefix("mlx.core.")
    mx.save_safetensors(str(folder / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def read_folder_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``mlxgpt`` section of a model folder's config (tokenizer description, extras)."""
    meta = read_json(Path(path) / CONFIG_FILE).get("mlxgpt", {})
    if not isinstance(meta, dict):
        raise MlxgptError(f"{Path(path) / CONFIG_FILE}: \"mlxgpt\" must be an object, "
                          f"got {shown(meta)}")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise MlxgptError(f"{Path(path) / CONFIG_FILE}: mlxgpt.tokenizer must be an object, "
                          f"got {shown(tokenizer)}")
    return meta


DEFAULT_SHIPPED = "shakespeare"  # what generate uses without --model
CHAT_SHIPPED = "english-chat"  # what chat uses: it replies in turn (models/README.md)


def shipped_models() -> dict[str, Path]:
    """The model folders that ship in ``mlxgpt.models``, by name (``--model NAME`` finds them)."""
    from importlib import resources

    try:
        root = resources.files("mlxgpt.models")
        found = (Path(str(p)) for p in root.iterdir() if p.is_dir())
        return {p.name: p for p in sorted(found) if is_model_folder(p)}
    except (ModuleNotFoundError, OSError):
        return {}


def shipped_model(name: str = DEFAULT_SHIPPED) -> Path:
    """The shipped model used when no ``--model`` is given: ``name`` (or the first one by name
    if an install lacks it)."""
    found = shipped_models()
    if not found:
        raise MlxgptError(
            "no --model given and no model ships with this install: pass --model PATH "
            "(an mlxgpt or Hugging Face GPT-2 folder, or a hub id such as gpt2), "
            "or train one with `mlxgpt pretrain`"
        )
    return found.get(name) or next(iter(found.values()))


# --------------------------------------------------------------------------- classifiers


def is_classifier_folder(path: str | os.PathLike) -> bool:
    """True for a model folder that also holds a classifier head."""
    return is_model_folder(path) and (Path(path) / HEAD_CONFIG).is_file()


def write_head(clf: GPTClassifier, folder: Path) -> None:
    """Write the head's two files (weights, labels) into an existing (temporary) folder."""
    mx.save_safetensors(str(Path(folder) / HEAD_WEIGHTS), {"score.weight": clf.score.weight},
                        metadata={"format": "mlx"})
    meta = {"format": HEAD_FORMAT, "version": 1, "labels": list(clf.labels)}
    (Path(folder) / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_labels(folder: str | os.PathLike) -> tuple[str, ...]:
    """The labels of the head in ``folder``, in id order."""
    path = Path(folder) / HEAD_CONFIG
    labels = read_json(path).get("labels")
    if (not isinstance(labels, list) or len(labels) < 2
            or not all(isinstance(x, str) for x in labels)):
        raise MlxgptError(f"{path}: needs \"labels\", a list of two or more strings")
    return tuple(labels)


def restore_head(clf: GPTClassifier, folder: str | os.PathLike) -> None:
    """Load the head weights in ``folder`` into ``clf`` (same labels and shape, checked)."""
    path = Path(folder) / HEAD_WEIGHTS
    labels = read_labels(folder)
    if labels != clf.labels:
        raise MlxgptError(f"{folder}: the head's labels ({', '.join(labels)}) are not "
                          f"({', '.join(clf.labels)})")
    weights = load_safetensors(path)
    w, want = weights.get("score.weight"), clf.score.weight
    if w is None or len(weights) != 1:
        raise MlxgptError(f"{path}: expected one tensor, score.weight")
    if tuple(w.shape) != tuple(want.shape):
        raise MlxgptError(f"{path}: score.weight has shape {tuple(w.shape)}, "
                          f"expected {tuple(want.shape)}")
    clf.score.weight = w.astype(want.dtype)


def write_classifier_files(clf: GPTClassifier, folder: Path, tokenizer: Any = None,
                           **kwargs: Any) -> None:
    """A classifier folder's files (:func:`write_model_files` options apply to the GPT)."""
    write_model_files(clf.transformer, folder, tokenizer, **kwargs)
    write_head(clf, folder)


def save_classifier(clf: GPTClassifier, out_dir: str | os.PathLike, tokenizer: Any = None, *,
                    force: bool = False, **kwargs: Any) -> Path:
    """Write ``clf`` as a classifier folder, atomically."""
    with atomic_dir(out_dir, force=force) as tmp:
        write_classifier_files(clf, tmp, tokenizer, **kwargs)
    return Path(out_dir)


def load_classifier_folder(path: str | os.PathLike, dtype: mx.Dtype | None = None,
                           kernels: Kernels | None = None) -> GPTClassifier:
    """Load a classifier folder (see the module docstring), in eval mode."""
    gpt = load_model(path, dtype, kernels)
    clf = GPTClassifier(gpt, read_labels(path))
    clf.score.weight = clf.score.weight.astype(dtype or float_dtype(gpt))
    restore_head(clf, path)
    clf.eval()
    mx.eval(clf.parameters())
    return clf
