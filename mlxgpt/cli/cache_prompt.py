"""``mlxgpt cache-prompt``: read a long prefix once and save its KV cache for ``generate``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from mlxgpt.cli.options import load_model, model_options
from mlxgpt.errors import MlxgptError


@click.command("cache-prompt")
@model_options
@click.option("--prompt", "-p", "prompt_file", required=True, metavar="FILE",
              help='The prefix: a UTF-8 text file, or "-" for stdin.')
@click.option("--out", "-o", required=True, metavar="CACHE.safetensors",
              help="The cache file to write (replaced if it exists).")
def cache_prompt(model, adapter, dtype, prompt_file, out) -> None:
    """Read a prompt once and save its keys and values (with the token ids and the model's
    identity) for `mlxgpt generate --prompt-cache CACHE`, which then continues after it without
    reading it again. A cache works only with the model (weights, config, tokenizer, adapter)
    that made it."""
    from mlxgpt.generation.prompt_cache import make_prompt_cache, save_prompt_cache

    text = read_text(prompt_file)
    m, tok = load_model(model, adapter, dtype)
    source = model or "the default model"
    if adapter:
        source += f" + {adapter}"
    start = time.perf_counter()
    cache = make_prompt_cache(m, tok, text, source=source)
    seconds = time.perf_counter() - start
    path = save_prompt_cache(cache, out)
    left = m.config.n_positions - len(cache)
    click.echo(f"cached {len(cache)} tokens (read in {seconds:.2f} s) -> {path} "
               f"({path.stat().st_size / 1e6:.1f} MB); {left} positions left for the prompt and "
               "the reply")


def read_text(source: str) -> str:
    """The text of a file, or of stdin for "-"."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MlxgptError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MlxgptError(f"{source}: cannot read it as UTF-8 text ({e})") from None
