"""Where a model reference points: a local folder, or a hub id's snapshot in the Hugging Face
cache (fetched through ``huggingface_hub``, so ``HF_HUB_OFFLINE`` and the cache are honoured)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import MlxgptError
from .fetch import KNOWN, fetch
from .folder import shipped_models

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    """True for an existing file that starts with GGUF's magic."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder (or GGUF file) for ``source``: the folder or GGUF file itself, a shipped
    model's name, a known model's name (fetched on first use, :mod:`.fetch`), or a hub id's
    snapshot in the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir() or is_gguf(path):
        if revision:
            raise MlxgptError(f"{source}: --revision applies to hub ids, not local files")
        return path
    if path.exists():
        raise MlxgptError(f"{source}: expected a model folder or a GGUF file, got another file")
    shipped = shipped_models().get(str(source))
    if shipped is not None:  # a model that ships with mlxgpt, by name ("english")
        return shipped
    if str(source) in KNOWN and revision is None:  # a pretrained model mlxgpt fetches
        return fetch(str(source))
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
