"""``mlxgpt generate``: continue a prompt, streaming the text to stdout.

The sampling options are shared with ``mlxgpt chat`` (:func:`sampling_options`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from mlxgpt.errors import MlxgptError


def sampling_options(f: Callable) -> Callable:
    """The options that make a :class:`mlxgpt.sample.SamplingSettings` (and max tokens)."""
    from mlxgpt.sample import SamplingSettings

    d = SamplingSettings()  # the library's defaults are the CLI's
    options = [
        click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
                     help="Most tokens to generate."),
        click.option("--temp", "temperature", type=float, default=d.temperature, show_default=True,
                     help="Temperature; 0 is greedy."),
        click.option("--top-k", type=int, default=d.top_k, show_default=True,
                     help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=d.top_p, show_default=True,
                     help="Nucleus: keep tokens up to this probability mass (1: off)."),
        click.option("--min-p", type=float, default=d.min_p, show_default=True,
                     help="Drop tokens below min-p times the top probability (0: off)."),
        click.option("--repetition-penalty", type=float, default=d.repetition_penalty,
                     show_default=True,
                     help="Divide the positive logits of recent tokens (1: off)."),
        click.option("--presence-penalty", type=float, default=d.presence_penalty,
                     show_default=True,
                     help="Subtract from the logit of every recent token."),
        click.option("--frequency-penalty", type=float, default=d.frequency_penalty,
                     show_default=True,
                     help="Subtract per occurrence among recent tokens."),
        click.option("--penalty-window", type=int, default=d.penalty_window, show_default=True,
                     help="How many recent tokens the penalties look at."),
        click.option("--logit-bias", multiple=True, metavar="ID=BIAS",
                     help="Add BIAS to token ID's logit (repeatable; -100 bans a token)."),
        click.option("--seed", type=int, default=None, help="Random seed: same seed, same text."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def model_options(f: Callable) -> Callable:
    options = [
        click.option("--model", "-m", default=None,
                     help="Model folder, Hugging Face folder or hub id (default: the shipped "
                          "model)."),
        click.option("--adapter", default=None, help="LoRA adapter folder to apply."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     default="auto", show_default=True, help="Weight precision."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_settings(opts: dict):
    """SamplingSettings from the parsed options (consumes their keys)."""
    from mlxgpt.sample import SamplingSettings

    bias = {}
    for item in opts.pop("logit_bias", ()):
        tok, sep, val = item.partition("=")
        try:
            bias[int(tok)] = float(val)
        except ValueError:
            raise MlxgptError(f"--logit-bias: expected ID=BIAS, got {item!r}") from None
        if not sep:
            raise MlxgptError(f"--logit-bias: expected ID=BIAS, got {item!r}")
    names = set(SamplingSettings.names()) - {"logit_bias"}
    return SamplingSettings(logit_bias=bias, **{k: opts.pop(k) for k in names})


def load_model(model: str | None, adapter: str | None, dtype: str):
    """(model, tokenizer) from --model, or the model that ships with mlxgpt."""
    import mlxgpt
    from mlxgpt.generate import prepare_for_inference, shipped_model

    path = model if model is not None else str(shipped_model())
    m, tok = mlxgpt.load(path, dtype=None if dtype == "auto" else dtype, adapter=adapter)
    return prepare_for_inference(m), tok


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
    from mlxgpt.generate import stream_generate

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
            f"[prompt {final.prompt_tokens} tokens, {final.prompt_tps:.1f} tok/s | "
            f"generated {final.generation_tokens} tokens, {final.generation_tps:.1f} tok/s | "
            f"first token {final.ttft * 1000:.0f} ms | peak memory {final.peak_memory_gb:.2f} GB"
            f" | finish: {final.finish_reason}]",
            err=True,
        )
