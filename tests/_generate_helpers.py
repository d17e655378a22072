"""Small random model folders for the generation and chat tests."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlxgpt.checkpoints.folder import save_model
from mlxgpt import GPT, GPTConfig
from mlxgpt.tokenizers import byte_tokenizer, gpt2_tokenizer


def random_model(vocab_size: int, n_positions: int = 64, seed: int = 0, **kw) -> GPT:
    mx.random.seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, n_positions=n_positions,
                    **{"n_embd": 32, "n_layer": 2, "n_head": 2, **kw})
    model = GPT(cfg)
    model.eval()
    mx.eval(model.parameters())
    return model


def byte_model_folder(tmp: Path, n_positions: int = 64, seed: int = 0) -> Path:
    """A random model over the byte tokenizer (vocab 257): every UTF-8 byte is one token."""
    return save_model(random_model(257, n_positions, seed), Path(tmp) / f"byte-{n_positions}",
                      byte_tokenizer())


def gpt2_model_folder(tmp: Path, n_positions: int = 128, seed: int = 0) -> Path:
    """A random model with GPT-2's real tokenizer (vocab 50257), tiny otherwise."""
    return save_model(random_model(50257, n_positions, seed), Path(tmp) / f"gpt2-{n_positions}",
                      gpt2_tokenizer())
