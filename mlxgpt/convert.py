"""Hugging Face GPT-2 checkpoints <-> mlxgpt model folders.

In: a hub id (through ``huggingface_hub``, so ``HF_HUB_OFFLINE`` and the local Hugging Face cache
are honoured) or a local folder with ``config.json`` and ``model.safetensors``, sharded
safetensors (``model.safetensors.index.json``) or ``pytorch_model.bin`` (read by
:mod:`mlxgpt.torch_pickle`, never unpickled with code execution). Hugging Face keeps Conv1D
weights as ``(in, out)``; MLX's Linear wants ``(out, in)``, so those four per block are transposed.
Out: an mlxgpt model folder (:mod:`mlxgpt.checkpoint`), optionally cast or quantized, or, with
:func:`export`, a Hugging Face folder that ``transformers`` loads.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import checkpoint as ckpt
from .errors import MlxgptError
from .model import GPT, GPTConfig
from .tokenizer import (
    IdTokenizer,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_from_hf_folder,
)
from .torch_pickle import load_torch_bin

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json"]
GPT2_VOCAB = 50257

# Blocks' Hugging Face Conv1D layers: stored (in, out), transposed to MLX's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older checkpoints carry next to the weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
QUANT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- finding the source


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for ``source``: the folder itself, or a hub id's snapshot in the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise MlxgptError(f"{source}: --revision applies to hub ids, not local folders")
        return path
    if path.exists():
        raise MlxgptError(f"{source}: expected a model folder, got a file")
    if not _HUB_ID.match(str(source)):
        raise MlxgptError(f"{source}: no such folder")
    return hub_snapshot(str(source), revision)


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the cache) the files a conversion needs; safetensors before .bin."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf_errors

    meta = ["config.json", *TOKENIZER_FILES]
    weights_st = [SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors"]
    weights_bin = [TORCH_BIN, TORCH_BIN_INDEX, "pytorch_model-*-of-*.bin"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=meta + weights_st))
        if not any((folder / f).exists() for f in (SAFETENSORS, SAFETENSORS_INDEX)):
            folder = Path(snapshot_download(repo_id, revision=revision,
                                            allow_patterns=meta + weights_bin))
    except hf_errors.LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise MlxgptError(
                f"{repo_id}: not a local folder, and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
            ) from None
        raise MlxgptError(
            f"{repo_id}: not a local folder, not in the Hugging Face cache, and the hub "
            "cannot be reached"
        ) from None
    except hf_errors.GatedRepoError:
        raise MlxgptError(f"{repo_id}: gated repository; log in first (`hf auth login`)") from None
    except hf_errors.RepositoryNotFoundError:
        raise MlxgptError(f"{repo_id}: no such local folder or Hugging Face repository") from None
    except hf_errors.RevisionNotFoundError:
        raise MlxgptError(f"{repo_id}: revision {revision!r} not found") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxgptError(f"{repo_id}: cannot fetch from the Hugging Face hub ({first})") from None
    return folder


# --------------------------------------------------------------------------- reading HF folders


def read_hf_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a Hugging Face folder, keys as stored (``transformer.`` prefix or not)."""
    if (folder / SAFETENSORS).exists():
        return ckpt.load_safetensors(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).exists():
        return _read_sharded(folder, SAFETENSORS_INDEX, ckpt.load_safetensors)
    if (folder / TORCH_BIN).exists():
        return load_torch_bin(folder / TORCH_BIN)
    if (folder / TORCH_BIN_INDEX).exists():
        return _read_sharded(folder, TORCH_BIN_INDEX, load_torch_bin)
    raise MlxgptError(
        f"{folder}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})"
    )


def _read_sharded(folder: Path, index_name: str, read) -> dict[str, mx.array]:
    index = ckpt.read_json(folder / index_name)
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
        dtype = first.dtype if first.dtype in ckpt.DTYPES.values() else mx.float32
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
    raw_cfg = ckpt.read_json(folder / "config.json")
    hf = read_hf_weights(folder)
    cfg, weights = hf_to_mlx(raw_cfg, hf)
    weights = cast_floats(weights, dtype)
    model = ckpt.build_model(cfg, weights, source=str(folder))
    return model, hf_tokenizer(folder, cfg.vocab_size)


# --------------------------------------------------------------------------- quantization


def quantize(model: GPT, bits: int, group_size: int = 64) -> tuple[dict[str, int] | None, int]:
    """Quantize Linear/Embedding layers in place; returns (config entry, layers quantized).

    A layer whose input width is not a multiple of ``group_size`` stays in floating point
    (MLX quantizes rows in groups); the config entry is None when no layer could be quantized.
    """
    check_quant_options(bits, group_size)
    done = []

    def predicate(path: str, module: nn.Module) -> bool:
        ok = hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
        if ok:
            done.append(path)
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    if not done:
        warn(f"no layer has an input width divisible by {group_size}; nothing was quantized")
        return None, 0
    mx.eval(model.parameters())
    return {"group_size": group_size, "bits": bits}, len(done)


def check_quant_options(bits: int, group_size: int) -> None:
    if bits not in QUANT_BITS:
        raise MlxgptError(f"--quantize must be one of {', '.join(map(str, QUANT_BITS))}")
    if group_size not in GROUP_SIZES:
        raise MlxgptError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}")


def dequantized_weights(model: GPT) -> dict[str, mx.array]:
    """The model's parameters with quantized layers turned back into floating-point weights."""
    flat = dict(tree_flatten(model.parameters()))
    q = {path: m for path, m in model.named_modules()
         if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    out = {}
    for key, value in flat.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in q and leaf in ("scales", "biases"):
            continue
        if prefix in q and leaf == "weight":
            m = q[prefix]
            value = mx.dequantize(value, flat[f"{prefix}.scales"], flat.get(f"{prefix}.biases"),
                                  group_size=m.group_size, bits=m.bits)
        out[key] = value
    return out


def float_dtype(model: GPT) -> mx.Dtype:
    """The dtype of the model's floating-point parameters (scales, for quantized layers)."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


# --------------------------------------------------------------------------- convert


@dataclass
class Summary:
    out_dir: Path
    n_params: int
    dtype: str
    size_bytes: int
    seconds: float
    quantization: dict[str, int] | None = None
    quantized_layers: int = 0
    tokenizer: str | None = None

    def line(self) -> str:
        q = ""
        if self.quantization:
            q = (f", {self.quantization['bits']}-bit (group {self.quantization['group_size']}, "
                 f"{self.quantized_layers} layers)")
        tok = self.tokenizer or "none (token ids only)"
        n = f"{self.n_params / 1e6:.1f}M" if self.n_params >= 100_000 else f"{self.n_params:,}"
        return (f"wrote {self.out_dir}: {n} parameters, {self.dtype}{q}, "
                f"tokenizer {tok}, {self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s")


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
) -> Summary:
    """Convert a Hugging Face GPT-2 checkpoint (folder or hub id) into an mlxgpt model folder."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not force:  # fail before any download or reading
        raise MlxgptError(f"{out} already exists (use --force to replace it)")
    target = ckpt.parse_dtype(dtype)
    if quantize_bits is not None:
        check_quant_options(quantize_bits, group_size)  # before any download or reading
    folder = resolve_source(source, revision)
    if ckpt.is_model_folder(folder):
        raise MlxgptError(f"{source}: already an mlxgpt model folder (load it as it is)")
    model, tok = load_hf(folder, target)
    n_params = model.n_params  # before quantization packs the weights
    quant, n_quant = None, 0
    if quantize_bits is not None:
        quant, n_quant = quantize(model, quantize_bits, group_size)
    ckpt.save_model(model, out, tok, force=force, quantization=quant,
                    extra={"source": str(source) if revision is None else f"{source}@{revision}"})
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    dtype_name = str(float_dtype(model)).removeprefix("mlx.core.")
    return Summary(out, n_params, dtype_name, size, time.perf_counter() - t0, quant, n_quant,
                   getattr(tok, "name", None))


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
    if not ckpt.is_model_folder(folder):
        raise MlxgptError(f"{folder}: not an mlxgpt model folder")
    model = ckpt.load_model(folder)
    tok = load_tokenizer(folder, ckpt.read_folder_meta(folder).get("tokenizer"))
    weights = mlx_to_hf(model)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(weights["transformer.wte.weight"].dtype).removeprefix("mlx.core.")
    with ckpt.atomic_dir(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / SAFETENSORS), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if isinstance(tok, IdTokenizer):
            warn("the model has no tokenizer; exported without tokenizer files")
        else:
            tok.save(tmp)  # vocab.json + merges.txt + tokenizer_config.json, what HF reads
    return out
