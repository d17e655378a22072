"""Options shared by several commands, defined once: model, dtype, sampling, JSON output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlxgpt.checks import SEED_MAX, check_int
from mlxgpt.errors import MlxgptError, warn
from mlxgpt.generation.sample import SamplingSettings

if TYPE_CHECKING:
    from mlxgpt.core.model import Model
    from mlxgpt.generation.constrain import JsonConstraint
    from mlxgpt.tokenizers import Tokenizer

DTYPES = ["float32", "float16", "bfloat16"]


def dtype_option(auto: bool = True, help: str = "Weight precision.") -> Callable:
    """``--dtype``: with ``auto`` (the default choice) the device decides (float32 on the CPU)."""
    if auto:
        return click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
                            show_default=True, help=help)
    return click.option("--dtype", type=click.Choice(DTYPES), help=help)


def int_range(lo: int | None = None, hi: int | None = None) -> Callable:
    """A click callback refusing an integer option outside ``lo..hi`` with the one-line error
    every bad input gets (click's own range check exits 2 with a usage screen)."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is None:
            return value
        return check_int(value, param.opts[0] if param.opts else str(param.name), lo, hi)

    return check


positive = int_range(1)  # a count: at least 1
at_least_0 = int_range(0)
seed_range = int_range(0, SEED_MAX)  # what MLX's random keys take


def sampling_options(f: Callable) -> Callable:
    """The options that make a :class:`SamplingSettings` (and max tokens)."""

    d = SamplingSettings()  # the library's defaults are the CLI's
    options = [
        click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
                     callback=positive, help="Most tokens to generate."),
        click.option("--temp", "temperature", type=float, default=d.temperature, show_default=True,
                     help="Temperature; 0 is greedy."),
        click.option("--top-k", type=int, default=d.top_k, show_default=True, callback=at_least_0,
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
                     callback=positive, help="How many recent tokens the penalties look at."),
        click.option("--logit-bias", multiple=True, metavar="ID=BIAS",
                     help="Add BIAS to token ID's logit (repeatable; -100 bans a token)."),
        click.option("--seed", type=int, default=None, callback=seed_range,
                     help="Random seed: same seed, same text."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def json_options(f: Callable) -> Callable:
    """``--json-schema`` / ``--json-object`` / ``--json-whitespace`` (generate and chat)."""
    options = [
        click.option("--json-schema", default=None, metavar="FILE_OR_JSON",
                     help="Write JSON this schema accepts (a file, or the schema itself as "
                          "JSON): each token is one that keeps the text a prefix of such a "
                          "document, and the output ends when it is complete. The server's "
                          "response_format subset."),
        click.option("--json-object", is_flag=True,
                     help="Write one JSON object (any keys and values)."),
        click.option("--json-whitespace", type=int, default=0, show_default=True,
                     callback=int_range(0, 16),
                     help="Whitespace bytes allowed between the tokens of the JSON (0: "
                          "compact, as `mlxgpt serve` writes it; a small model otherwise "
                          "pads)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def read_json_schema(value: str | None, json_object: bool) -> tuple[bool, dict | None]:
    """(constrained, schema) from --json-schema / --json-object, read before any model loads:
    the schema is the option's text when that starts with "{", else the file it names; None
    with --json-object (any object)."""
    if value is not None and json_object:
        raise MlxgptError("give --json-schema or --json-object, not both")
    if value is None:
        return json_object, None
    if value.lstrip().startswith("{"):
        try:
            schema: Any = json.loads(value)
        except RecursionError:
            raise MlxgptError("--json-schema: not valid JSON (nested too deeply)") from None
        except json.JSONDecodeError as e:
            raise MlxgptError(f"--json-schema: not valid JSON ({e})") from None
    else:
        from mlxgpt.checkpoints.files import read_json

        if not Path(value).is_file():
            raise MlxgptError(f"--json-schema: no file {value!r} (give a schema file, or the "
                              "schema's JSON, which starts with '{')")
        try:
            schema = read_json(Path(value))
        except MlxgptError as e:  # its messages start with the file's name
            raise MlxgptError(f"--json-schema {e}") from None
    if not isinstance(schema, dict):
        raise MlxgptError("--json-schema: a schema is a JSON object")
    return True, schema


def json_constraint_for(model: Model, tokenizer: Tokenizer, constrained: bool,
                        schema: dict | None, whitespace: int) -> JsonConstraint | None:
    """The compiled constraint (None when not ``constrained``): one ``--json-schema:`` line
    for a schema mlxgpt cannot follow."""
    if not constrained:
        return None
    from mlxgpt.generation.generate import json_constraint

    return json_constraint(tokenizer, model.config.vocab_size, schema, whitespace,
                           name="--json-schema")


def model_options(f: Callable) -> Callable:
    options = [
        click.option("--model", "-m", default=None,
                     help="Model folder, Hugging Face folder, GGUF file, hub id, a shipped "
                          "model's name, or smollm2 (the default: SmolLM2-135M-Instruct, "
                          "fetched on first use)."),
        click.option("--adapter", default=None, help="LoRA adapter folder to apply."),
        dtype_option(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_settings(opts: dict):
    """SamplingSettings from the parsed options (consumes their keys)."""
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


def default_model(shipped: str | None = None) -> str:
    """What ``chat``, ``generate`` and ``serve`` use without --model: SmolLM2-135M-Instruct,
    fetched on first use; where it cannot be had, the shipped model named ``shipped``, saying
    so in one line."""
    from mlxgpt.checkpoints.fetch import DEFAULT_CHAT, fetch
    from mlxgpt.checkpoints.folder import DEFAULT_SHIPPED, shipped_model

    try:
        return str(fetch(DEFAULT_CHAT))
    except MlxgptError as e:
        fallback = shipped_model(shipped or DEFAULT_SHIPPED)
        warn(f"{e}; using the small shipped model {fallback.name} instead "
             f"(`mlxgpt fetch {DEFAULT_CHAT}` gets the real one)")
        return str(fallback)


def load_model(model: str | None, adapter: str | None, dtype: str, default: str | None = None):
    """(model, tokenizer) for inference from --model, or :func:`default_model` (with the shipped
    model named ``default`` where SmolLM2 cannot be had)."""
    from mlxgpt.checkpoints.load import load
    from mlxgpt.core.backend import prepare_for_inference

    path = model if model is not None else default_model(default)
    m, tok = load(path, dtype=dtype, adapter=adapter)
    return prepare_for_inference(m), tok  # the loaded model goes: only the prepared one is kept
