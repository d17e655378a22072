"""Prompt cache files: the keys and values of a long prefix, read once and saved, so generation
continues after it without reading it again.

A cache file is safetensors:

- tensors ``tokens`` (N,) int32, the prefix's ids, and ``keys.{i}`` / ``values.{i}``
  (1, H, N, D) for each layer i, in the dtype the model ran in;
- metadata ``format`` (``mlxgpt-prompt-cache``), ``version``, ``config`` (the model's
  architecture as JSON), ``tokenizer`` (:func:`~.identity.tokenizer_digest`), ``n_tokens``,
  ``dtype``, ``model`` (where it came from, for messages) and ``checksum``: SHA-256 over the
  rest of the metadata and every tensor's name, dtype, shape and bytes
  (:func:`content_checksum`).

A file whose contents do not match its checksum is refused as damaged before anything else is
compared. The checksum guards against accidents (a flipped bit, a truncated copy, an edit); it
is no signature: a file someone crafted with a valid checksum is input like a prompt.

The model's identity is its config, its tokenizer and its weights. The first two are compared
as stored. The weights are checked by what they compute: on loading, the model reads the last
cached token again after the others and its keys and values must match the file's to the
rounding of the two precisions. Other weights give other keys (unless they differ only where no
cached key or value depends on them, the last block's MLP, the final norm or an untied head,
which leave the cache valid). The file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from ..checkpoints.files import atomic_save_safetensors
from ..checks import shown
from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from .cache import KVCache
from .context import PREFILL_STEP, Context
from .identity import tokenizer_digest

FORMAT = "mlxgpt-prompt-cache"
VERSION = 2  # 2: with a checksum
CHECKSUM = "checksum"
# Largest relative difference (to the row's largest magnitude) between the file's keys/values of
# the last cached token and this model's, by the coarser of the two precisions.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def architecture(model: Model) -> dict:
    """The config fields that decide what the model computes (not dropout)."""
    d = asdict(model.config)
    d.pop("dropout", None)
    return d


def dtype_name(a: mx.array) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


@dataclass
class PromptCache:
    """A prefix's token ids and each layer's keys and values, (1, H, N, D) each."""

    tokens: list[int]
    kv: list[tuple[mx.array, mx.array]]
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)


# --------------------------------------------------------------------------- making and saving


def make_prompt_cache(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], *,
                      source: str = "", prefill_step: int = PREFILL_STEP) -> PromptCache:
    """Read ``prompt`` (text or ids) with ``model``; its cache, labelled with the model's
    identity (``source`` names the model in messages)."""
    ids = (tokenizer.encode_prompt(prompt) if isinstance(prompt, str)
           else [int(i) for i in prompt])
    if not ids:
        raise MlxgptError("nothing to cache: the prompt is empty")
    n_pos = model.config.n_positions
    if len(ids) > n_pos:
        raise MlxgptError(f"the prompt is {len(ids)} tokens; the model's context is {n_pos}")
    ctx = Context(model, prefill_step)
    ctx.prefill(ids)
    kv = ctx.kv()
    mx.eval(kv)
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(architecture(model), sort_keys=True),
        "tokenizer": tokenizer_digest(tokenizer),
        "n_tokens": str(len(ids)),
        "dtype": dtype_name(kv[0][0]),
        "model": source,
    }
    return PromptCache(ids, kv, meta)


def content_checksum(arrays: dict[str, mx.array], meta: dict[str, str]) -> str:
    """SHA-256 (hex) of a cache file's contents: the metadata but the checksum itself, then each
    tensor in name order with its dtype and shape, so any change to either is seen."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM},
                        sort_keys=True).encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"\0{name}\0{dtype_name(a)}\0{tuple(a.shape)}\0".encode())
        data = memoryview(a)  # the values as stored (bfloat16 included), row-major
        h.update(data if data.c_contiguous else data.tobytes())
    return h.hexdigest()


def save_prompt_cache(cache: PromptCache, path: str | os.PathLike) -> Path:
    """Write ``cache`` to ``path`` (a .safetensors file, with its checksum), atomically."""
    path = Path(path)
    arrays = {"tokens": mx.array(cache.tokens, mx.int32)}
    for i, (k, v) in enumerate(cache.kv):
        arrays[f"keys.{i}"], arrays[f"values.{i}"] = k, v
    mx.eval(arrays)
    meta = dict(cache.meta)
    meta[CHECKSUM] = content_checksum(arrays, meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path, arrays, meta)
    except OSError as e:
        raise MlxgptError(f"cannot write {path}: {e.strerror or e}") from None
    return path


# --------------------------------------------------------------------------- loading


def load_prompt_cache(path: str | os.PathLike, model: Model, tokenizer: Tokenizer) -> PromptCache:
    """Read a cache file and check that ``model`` and ``tokenizer`` made it (one-line errors
    for another model, another tokenizer, or a damaged file or one that is not a prompt
    cache)."""
    path = Path(path)
    if not path.is_file():
        raise MlxgptError(f"{path}: prompt cache file not found")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError on truncated or foreign files
        raise MlxgptError(f"{path}: not a readable prompt cache (damaged, or another kind of "
                          f"file: {e})") from None
    if not isinstance(arrays, dict):
        raise MlxgptError(f"{path}: not an mlxgpt prompt cache (made by `mlxgpt cache-prompt`)")
    damaged = MlxgptError(f"{path}: the file's contents differ from the checksum stored in it "
                          "(damaged file)")
    # A file with a checksum is one of ours: a wrong format or version in it is damage too.
    intact = CHECKSUM in meta and meta[CHECKSUM] == content_checksum(arrays, meta)
    if meta.get("format") != FORMAT:
        if CHECKSUM in meta and not intact:
            raise damaged
        raise MlxgptError(f"{path}: not an mlxgpt prompt cache (made by `mlxgpt cache-prompt`)")
    if meta.get("version") == "1":
        raise MlxgptError(f"{path}: a prompt cache from an older mlxgpt (version 1, without a "
                          f"checksum); make it again with `mlxgpt cache-prompt`")
    if meta.get("version") != str(VERSION) and intact:
        raise MlxgptError(f"{path}: prompt cache version {shown(meta.get('version'))} is not "
                          f"supported (this mlxgpt reads version {VERSION})")
    # The specific damage where it is simple to name (a layer's tensors missing), then any.
    tokens, kv = _read_tokens(path, arrays, meta), _read_kv(path, arrays, model, intact)
    if not intact:
        raise damaged
    cache = PromptCache(tokens, kv, meta)
    check_prompt_cache(cache, model, tokenizer, str(path))
    return cache


def _read_tokens(path: Path, arrays: dict[str, mx.array], meta: dict[str, str]) -> list[int]:
    tokens = arrays.get("tokens")
    if tokens is None or tokens.ndim != 1 or not mx.issubdtype(tokens.dtype, mx.integer):
        raise MlxgptError(f"{path}: the prompt cache has no token ids (damaged file)")
    if meta.get("n_tokens") != str(tokens.size) or tokens.size == 0:
        raise MlxgptError(f"{path}: the prompt cache's token count does not match its ids "
                          "(damaged file)")
    return tokens.tolist()


def _read_kv(path: Path, arrays: dict[str, mx.array], model: Model,
             intact: bool = True) -> list[tuple[mx.array, mx.array]]:
    kv = []
    for i in range(model.config.n_layer):
        k, v = arrays.get(f"keys.{i}"), arrays.get(f"values.{i}")
        if k is None or v is None:  # an intact file made by a model with fewer layers
            raise MlxgptError(f"{path}: the prompt cache lacks layer {i}'s keys or values "
                              f"({'made by another model' if intact else 'damaged file'})")
        kv.append((k, v))
    return kv


def check_prompt_cache(cache: PromptCache, model: Model, tokenizer: Tokenizer,
                       name: str = "the prompt cache") -> None:
    """Refuse a cache that ``model`` with ``tokenizer`` did not make (see the module doc)."""
    made_by = cache.meta.get("model") or "another model"
    mine = architecture(model)
    try:
        theirs = json.loads(cache.meta.get("config", ""))
    except json.JSONDecodeError:
        theirs = None
    if not isinstance(theirs, dict):
        raise MlxgptError(f"{name}: no model config in the file (damaged file)")
    diff = [k for k in sorted(mine) if theirs.get(k) != mine[k]]
    if diff:
        k = diff[0]
        raise MlxgptError(f"{name} was made by another model ({made_by}: {k} {theirs.get(k)}, "
                          f"this model's {mine[k]})")
    if cache.meta.get("tokenizer") != tokenizer_digest(tokenizer):
        raise MlxgptError(f"{name} was made with another tokenizer (by {made_by})")
    n, cfg = len(cache.tokens), model.config
    if n > cfg.n_positions:
        raise MlxgptError(f"{name}: {n} cached tokens do not fit the model's context")
    if not all(0 <= t < cfg.vocab_size for t in cache.tokens):
        raise MlxgptError(f"{name}: token ids outside the vocabulary (damaged file)")
    want = (1, cfg.n_kv_head, n, cfg.head_dim)
    for k, v in cache.kv:
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise MlxgptError(f"{name}: keys/values of shape {tuple(k.shape)}, expected {want} "
                              "(damaged file)")
    worst = fingerprint_difference(cache, model)
    tol = max(TOLERANCE.get(cache.meta.get("dtype", ""), TOLERANCE["bfloat16"]),
              TOLERANCE.get(dtype_name(model.final_norm.weight), TOLERANCE["bfloat16"]))
    if not worst <= tol:  # also catches NaN
        raise MlxgptError(f"{name} was made by another model ({made_by}): this model's keys "
                          f"and values differ from the file's (relative difference "
                          f"{worst:.2g} > {tol:g})")


def fingerprint_difference(cache: PromptCache, model: Model) -> float:
    """Read the last cached token again after the others; the largest relative difference
    between its keys/values and the file's, over layers."""
    n = len(cache)
    dtype = model.final_norm.weight.dtype
    caches = [KVCache(k[..., : n - 1, :].astype(dtype), v[..., : n - 1, :].astype(dtype), n - 1)
              for k, v in cache.kv]
    model.hidden(mx.array([cache.tokens[-1:]], mx.int32), caches)
    diffs = []
    for c, (k, v) in zip(caches, cache.kv, strict=True):
        for mine, theirs in ((c.keys[..., n - 1, :], k[..., n - 1, :]),
                             (c.values[..., n - 1, :], v[..., n - 1, :])):
            theirs = theirs.astype(mx.float32)
            scale = mx.maximum(mx.max(mx.abs(theirs)), 1e-6)
            diffs.append(mx.max(mx.abs(mine.astype(mx.float32) - theirs)) / scale)
    return mx.max(mx.stack(diffs)).item()
