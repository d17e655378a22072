"""Random-init Hugging Face GPT-2 checkpoints for tests (no network).

    folder = make_hf_checkpoint(tmp_path, {"n_layer": 2, "n_embd": 48, "n_head": 3}, fmt="bin")
    model = hf_model(folder)            # transformers.GPT2LMHeadModel, eval mode, fp32
    ref = hf_logits(model, tokens)      # numpy (B, T, V)

Every parameter is random, LayerNorm gains and all biases included (transformers initialises
those to 1 and 0, which would hide a missing bias or a swapped gain).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

SMALL = {"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 101, "n_positions": 64}


def random_hf_model(config_kwargs: dict[str, Any], seed: int = 0):
    """A transformers GPT2LMHeadModel with every parameter random, in eval mode."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    kwargs = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **config_kwargs}
    config = transformers.GPT2Config(**kwargs)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model


def save_hf_checkpoint(model, folder: Path, fmt: str = "safetensors", *,
                       legacy_keys: bool = False) -> Path:
    """Save ``model`` as a Hugging Face folder.

    fmt: "safetensors" (save_pretrained), "sharded" (save_pretrained with small shards) or
    "bin" (torch.save of the state dict, as older checkpoints are: with an explicit
    ``lm_head.weight`` even when tied). ``legacy_keys`` (bin only): keys without the
    ``transformer.`` prefix plus the ``attn.bias``/``attn.masked_bias`` buffers, like the
    original GPT-2 ``pytorch_model.bin``.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder, max_shard_size=max(total // 3, 1024))
        assert (folder / "model.safetensors.index.json").exists()
    elif fmt == "bin":
        model.config.save_pretrained(folder)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:  # tied: one storage, as torch.save(model) writes
            state["lm_head.weight"] = state["transformer.wte.weight"]
        if legacy_keys:
            n = model.config.n_positions
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            for i in range(model.config.n_layer):
                state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
                state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return folder


def make_hf_checkpoint(tmp_path: Path, config_kwargs: dict[str, Any] | None = None,
                       fmt: str = "safetensors", seed: int = 0, *, name: str | None = None,
                       legacy_keys: bool = False, tokenizer: bool = False) -> Path:
    """Build a random GPT-2 (``config_kwargs`` over GPT2Config defaults) and save it under
    ``tmp_path``; returns the folder. ``tokenizer``: also write GPT-2's vocab.json + merges.txt."""
    kwargs = SMALL if config_kwargs is None else config_kwargs
    folder = Path(tmp_path) / (name or f"hf-{fmt}-{seed}")
    save_hf_checkpoint(random_hf_model(kwargs, seed), folder, fmt, legacy_keys=legacy_keys)
    if tokenizer:
        write_gpt2_tokenizer_files(folder)
    return folder


def write_gpt2_tokenizer_files(folder: Path) -> None:
    """GPT-2's vocab.json + merges.txt (from mlxgpt's packaged ranks), as the hub ships them."""
    import tempfile

    from mlxgpt.tokenizers import gpt2_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gpt2_tokenizer().save(Path(tmp))
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(Path(tmp) / f, Path(folder) / f)


def hf_model(folder: Path):
    """Load a Hugging Face folder with transformers (fp32, eval)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Reference logits (B, T, V) as float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens, dtype=np.int64)))
    return out.logits.float().numpy()


def populate_hf_cache(cache_dir: Path, repo_id: str, src: Path, revision: str = "main",
                      commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``src``'s files out as huggingface_hub's cache does (blobs, a snapshot of symlinks,
    refs/<revision>), so hub look-ups of ``repo_id`` succeed offline. Returns the snapshot."""
    import hashlib

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def is_conv1d(name: str) -> bool:
    """Whether mlxgpt parameter ``name`` is a Conv1D weight (transposed in Hugging Face's)."""
    return any(name.endswith(f"{m}.weight") for m in ("c_attn", "c_proj", "c_fc"))


def hf_name(name: str) -> str:
    """The Hugging Face GPT2LMHeadModel parameter name of mlxgpt parameter ``name``."""
    return name if name.startswith("lm_head") else "transformer." + name
