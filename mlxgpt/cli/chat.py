"""``mlxgpt chat``: talk to a model in the terminal (or one turn per line of piped input)."""

from __future__ import annotations

import click

from mlxgpt.cli.generate import draft_options, load_draft_model
from mlxgpt.cli.options import (
    json_constraint_for,
    json_options,
    load_model,
    model_options,
    read_json_schema,
    sampling_options,
    sampling_settings,
)


@click.command()
@model_options
@click.option("--system", default=None, help="System text written above the conversation.")
@sampling_options
@draft_options
@json_options
def chat(model, adapter, dtype, system, draft_model, draft_tokens, json_schema, json_object,
         json_whitespace, **opts) -> None:
    """Chat with a model: streamed replies, /help for commands.

    With stdin not a terminal each input line is one turn and only the replies are printed.
    With --json-schema (or --json-object) every reply is such a JSON document.
    """
    from mlxgpt.checkpoints.folder import CHAT_SHIPPED
    from mlxgpt.cli.repl import run_repl
    from mlxgpt.generation.chat import ChatSession, ChatSettings

    max_tokens = opts.pop("max_tokens")
    settings = ChatSettings(max_tokens=max_tokens, sampling=sampling_settings(opts))
    constrained, schema = read_json_schema(json_schema, json_object)
    m, tok = load_model(model, adapter, dtype, default=CHAT_SHIPPED)
    constraint = json_constraint_for(m, tok, constrained, schema, json_whitespace)
    draft = load_draft_model(draft_model, m, tok, dtype)
    session = ChatSession(m, tok, settings, system=system, draft_model=draft,
                          draft_tokens=draft_tokens, json_schema=constraint)
    session.check_room()  # a system text too long for the context: said now, not per turn
    run_repl(session)
