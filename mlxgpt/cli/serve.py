"""``mlxgpt serve``: an OpenAI-compatible HTTP server (completions, chat, streaming, JSON)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import click

from mlxgpt.cli.options import default_model, load_model, model_options, positive
from mlxgpt.errors import MlxgptError


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; mind --api-key).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.option("--max-batch", type=int, default=16, show_default=True, callback=positive,
              help="Most sequences decoded together (each choice of each request is one).")
@click.option("--max-queue", type=int, default=64, show_default=True, callback=positive,
              help="Most sequences waiting for a row; beyond it requests get 429.")
@click.option("--api-key", default=None, envvar="MLXGPT_API_KEY",
              help="Require 'Authorization: Bearer KEY'. A key given on the command line is "
                   "visible to other users in `ps`: --api-key-file or the MLXGPT_API_KEY "
                   "environment variable keeps it out.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="Read the API key from this file (surrounding whitespace stripped; it wins "
                   "over MLXGPT_API_KEY). Unlike --api-key, it does not show in `ps`.")
@click.option("--context", type=click.Choice(["stop", "slide"]), default="stop",
              show_default=True,
              help="A prompt longer than the model's context: refuse it (400) or keep its most "
                   "recent tokens; a reply that reaches the limit ends (stop) or slides.")
@click.option("--prefix-cache", type=int, default=8, show_default=True,
              help="Recent sequences whose KV cache a new request sharing their start reuses.")
@click.option("--prompt-cache", "prompt_caches", multiple=True, metavar="CACHE",
              help="A file from `mlxgpt cache-prompt` made with this model (repeatable): its "
                   "prefix is kept in the prefix cache for the server's life, so a request "
                   "starting with it does not read it again.")
@click.option("--draft-model", default=None,
              help="A smaller model with the same tokenizer (and at least the model's context) "
                   "that proposes tokens for every row the server decodes (speculative "
                   "decoding): the same text greedily, the same distribution when sampling, "
                   "faster when the draft is often right. /health reports its acceptance.")
@click.option("--draft-tokens", type=int, default=4, show_default=True, callback=positive,
              help="Tokens the draft model proposes per row and step.")
@click.option("--json-whitespace", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Whitespace bytes allowed between the tokens of response_format JSON "
                   "(0: compact; a small model otherwise pads).")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGINT/SIGTERM, seconds running requests get to finish; then each gets "
                   "a 503 (a stream: an error event and [DONE]).")
@click.option("--max-body", type=int, default=4 * 1024 * 1024, show_default=True,
              help="Largest request body in bytes; a larger one gets 413.")
@click.option("--request-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client gets to send a request's headers, and then as many for "
                   "its body; past them it gets 408.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info",
                                                "debug"]), default="info", show_default=True)
def serve(model, adapter, dtype, host, port, max_batch, max_queue, api_key, api_key_file,
          context, prefix_cache, prompt_caches, draft_model, draft_tokens, json_whitespace,
          shutdown_timeout, max_body, request_timeout, log_level) -> None:
    """Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models."""
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MlxgptError(f"mlxgpt serve needs {' and '.join(missing)}: "
                          "pip install 'mlxgpt[serve]'")
    if not 0 <= port <= 65535:
        raise MlxgptError(f"--port must be in 0..65535, got {port}")
    if max_body < 1:
        raise MlxgptError(f"--max-body must be at least 1 (bytes), got {max_body}")
    if not (math.isfinite(request_timeout) and request_timeout > 0):
        raise MlxgptError(f"--request-timeout must be more than 0 (seconds), got "
                          f"{request_timeout}")
    if not (math.isfinite(shutdown_timeout) and shutdown_timeout >= 0):
        raise MlxgptError(f"--shutdown-timeout must be at least 0 (seconds), got "
                          f"{shutdown_timeout}")
    api_key = _api_key(api_key, api_key_file, click.get_current_context())
    from mlxgpt.checkpoints.folder import CHAT_SHIPPED
    from mlxgpt.serve.app import ServerConfig, serve
    from mlxgpt.serve.engine import Engine

    model = model or default_model(CHAT_SHIPPED)
    m, tok = load_model(model, adapter, dtype)
    name = Path(model).name
    draft = None
    if draft_model is not None:
        from mlxgpt.cli.generate import load_draft_model

        draft = load_draft_model(draft_model, m, tok, dtype)
    engine = Engine(m, tok, max_batch=max_batch, max_queue=max_queue, prefix_cache=prefix_cache,
                    draft=draft, draft_tokens=draft_tokens)
    if prompt_caches:
        from mlxgpt.generation.prompt_cache import load_prompt_cache

        for path in prompt_caches:  # each checked to be this model's before it is served
            cache = load_prompt_cache(path, m, tok)
            engine.generator.prefixes.pin(cache.tokens, cache.kv)
            click.echo(f"prompt cache {path}: {len(cache)} tokens kept", err=True)
    drafted = "" if draft is None else f", draft {Path(draft_model).name} x{draft_tokens}"
    click.echo(f"serving {name} on http://{host}:{port}/v1 (max batch {max_batch}, "
               f"context {m.config.n_positions} tokens, policy {context}{drafted})", err=True)
    config = ServerConfig(model_id=name, api_key=api_key, context=context,
                          json_whitespace=json_whitespace, max_body=max_body,
                          request_timeout=request_timeout)
    serve(engine, tok, config,
          host=host, port=port, shutdown_timeout=shutdown_timeout, log_level=log_level)


def _api_key(key: str | None, path: Path | None, ctx: click.Context) -> str | None:
    """The key to require: --api-key-file (read here), else --api-key / MLXGPT_API_KEY."""
    if path is not None:
        if key is not None and ctx.get_parameter_source("api_key") is not \
                click.core.ParameterSource.ENVIRONMENT:
            raise MlxgptError("give --api-key or --api-key-file, not both")
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise MlxgptError(f"--api-key-file {path}: cannot read it ({why})") from None
        if not key:
            raise MlxgptError(f"--api-key-file {path} is empty")
        if "\n" in key or "\r" in key:
            raise MlxgptError(f"--api-key-file {path} holds more than one line; the key is one")
        return key
    if key is not None and not key.strip():
        raise MlxgptError("--api-key is empty (give a key, or leave the option out)")
    return key
