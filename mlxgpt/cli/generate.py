"""``mlxgpt generate``: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from mlxgpt.cli.options import (
    json_constraint_for,
    json_options,
    load_model,
    model_options,
    positive,
    read_json_schema,
    sampling_options,
    sampling_settings,
)
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.speculative import AUTO, DEFAULT_DRAFT_TOKENS


def draft_count(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    """--draft-tokens: 'auto' or a whole number of at least 1."""
    if value == AUTO:
        return value
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise MlxgptError(f"--draft-tokens must be a whole number or {AUTO!r}, got {value!r}") \
            from None
    return positive(ctx, param, count)


def draft_options(f: Callable) -> Callable:
    """``--draft-model`` / ``--draft-tokens``: speculative decoding (generate and chat)."""
    f = click.option("--draft-tokens", default=DEFAULT_DRAFT_TOKENS, show_default=True,
                     callback=draft_count,
                     help="Tokens the draft model proposes per step, or 'auto': 4 for as "
                          "long as that is faster on this machine than decoding without the "
                          "draft (timings kept per model pair).")(f)
    return click.option(
        "--draft-model", default=None,
        help="A smaller model with the same tokenizer that proposes tokens for the model to "
             "check (speculative decoding): the same text greedily, the same distribution when "
             "sampling, faster when the draft is often right (e.g. english-draft for english).",
    )(f)


def load_draft_model(ref: str | None, model, tokenizer, dtype: str):
    """The draft for --draft-model (None without one); refused if its tokenizer differs."""
    if ref is None:
        return None
    from mlxgpt.generation.speculative import load_draft

    return load_draft(ref, model, tokenizer, dtype)


@click.command()
@model_options
@click.option("--prompt", "-p", default=None,
              help='Prompt text, or "-" to read it from stdin (default: start of a document; '
                   "with --prompt-cache: right after the cached prefix).")
@click.option("--prompt-cache", default=None, metavar="CACHE",
              help="A file from `mlxgpt cache-prompt` made with this model: its prefix is not "
                   "read again and --prompt follows it (encoded on its own, so start it with "
                   "the space or newline the text would have).")
@sampling_options
@draft_options
@json_options
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at <|endoftext|>.")
@click.option("--context", type=click.Choice(["slide", "stop"]), default="slide",
              show_default=True,
              help="At the model's context limit: slide the window (re-read the most recent "
                   "tokens) or stop.")
@click.option("--window-keep", type=int, default=None, callback=positive,
              help="Tokens kept when the window slides (default: half the context).")
@click.option("--quiet", "-q", is_flag=True, help="No statistics line on stderr.")
def generate(model, adapter, dtype, prompt, prompt_cache, draft_model, draft_tokens,
             json_schema, json_object, json_whitespace, stop, ignore_eos, context, window_keep,
             quiet, **opts) -> None:
    """Continue a prompt and stream the text to stdout."""
    from mlxgpt.generation.generate import format_rate, stream_generate

    max_tokens = opts.pop("max_tokens")
    sampling = sampling_settings(opts)
    constrained, schema = read_json_schema(json_schema, json_object)
    if prompt == "-":
        prompt = sys.stdin.read()
    m, tok = load_model(model, adapter, dtype)
    constraint = json_constraint_for(m, tok, constrained, schema, json_whitespace)
    draft = load_draft_model(draft_model, m, tok, dtype)
    final = None
    for r in stream_generate(
        m, tok, prompt or "", max_tokens=max_tokens, sampling=sampling, stop=stop,
        stop_at_eos=not ignore_eos, context=context, window_keep=window_keep,
        draft_model=draft, draft_tokens=draft_tokens, prompt_cache=prompt_cache,
        json_schema=constraint,
    ):
        if r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        final = r
    sys.stdout.write("\n")
    if not quiet and final is not None:
        cached = f", {final.cached_tokens} cached" if final.cached_tokens else ""
        drafted = ""
        if final.acceptance is not None:
            drafted = (f" | draft: {final.accepted_tokens}/{final.drafted_tokens} accepted "
                       f"({final.acceptance:.0%})")
        if final.undrafted_tokens:
            drafted += (f"{',' if drafted else ' | draft:'} {final.undrafted_tokens} tokens "
                        f"without it (slower than without it here)")
        click.echo(
            f"[prompt {final.prompt_tokens} tokens{cached}, {format_rate(final.prompt_tps)} | "
            f"generated {final.generation_tokens} tokens, {format_rate(final.generation_tps)} | "
            f"first token {final.ttft * 1000:.0f} ms | peak memory {final.peak_memory_gb:.2f} GB"
            f"{drafted} | finish: {final.finish_reason}]",
            err=True,
        )
