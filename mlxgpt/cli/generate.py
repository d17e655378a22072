"""``mlxgpt generate``: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys

import click

from mlxgpt.cli.options import load_model, model_options, sampling_options, sampling_settings


@click.command()
@model_options
@click.option("--prompt", "-p", default=None,
              help='Prompt text, or "-" to read it from stdin (default: start of a document).')
@sampling_options
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at <|endoftext|>.")
@click.option("--context", type=click.Choice(["slide", "stop"]), default="slide",
              show_default=True,
              help="At the model's context limit: slide the window (re-read the most recent "
                   "tokens) or stop.")
@click.option("--window-keep", type=int, default=None,
              help="Tokens kept when the window slides (default: half the context).")
@click.option("--quiet", "-q", is_flag=True, help="No statistics line on stderr.")
def generate(model, adapter, dtype, prompt, stop, ignore_eos, context, window_keep, quiet,
             **opts) -> None:
    """Continue a prompt and stream the text to stdout."""
    from mlxgpt.generation.generate import format_rate, stream_generate

    max_tokens = opts.pop("max_tokens")
    sampling = sampling_settings(opts)
    if prompt == "-":
        prompt = sys.stdin.read()
    m, tok = load_model(model, adapter, dtype)
    final = None
    for r in stream_generate(
        m, tok, prompt or "", max_tokens=max_tokens, sampling=sampling, stop=stop,
        stop_at_eos=not ignore_eos, context=context, window_keep=window_keep,
    ):
        if r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        final = r
    sys.stdout.write("\n")
    if not quiet and final is not None:
        click.echo(
            f"[prompt {final.prompt_tokens} tokens, {format_rate(final.prompt_tps)} | "
            f"generated {final.generation_tokens} tokens, {format_rate(final.generation_tps)} | "
            f"first token {final.ttft * 1000:.0f} ms | peak memory {final.peak_memory_gb:.2f} GB"
            f" | finish: {final.finish_reason}]",
            err=True,
        )
