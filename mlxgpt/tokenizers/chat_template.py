"""A model's own chat template (Hugging Face's ``chat_template``, a Jinja string from
``tokenizer_config.json`` or a GGUF's ``tokenizer.chat_template``), rendered as
``transformers``' ``apply_chat_template`` renders it.

Templates come with checkpoints, so they are untrusted: they run in Jinja's immutable sandbox
(no attribute access to Python internals, no mutation of the values passed in), with the same
environment ``transformers`` gives them: ``trim_blocks``, ``lstrip_blocks``, loop controls, a
``tojson`` that does not escape HTML, ``raise_exception`` and ``strftime_now``; the variables are
``messages``, ``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..errors import MlxgptError
from .base import Tokenizer


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The template compiled in the sandbox (cached per source string)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MlxgptError("chat templates need jinja2: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise MlxgptError(f"the model's chat template does not compile ({e})") from None


def special_token_strings(tokenizer: Tokenizer) -> dict[str, str]:
    """``bos_token`` and ``eos_token`` as the template sees them (the end of turn for a chat
    model whose eos is its end-of-turn token)."""
    by_id = {i: s for s, i in getattr(tokenizer, "special_tokens", {}).items()}
    out = {}
    for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eot_id)):
        if i is not None:
            out[name] = by_id.get(i) or tokenizer.decode([i])
    return out


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = True) -> str:
    """Messages (``{"role", "content"}`` dicts) -> the prompt text the model was trained on."""
    if not tokenizer.chat_template:
        raise MlxgptError("the model has no chat template")
    import jinja2

    template = compile_template(tokenizer.chat_template)
    try:
        return template.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               **special_token_strings(tokenizer))
    except jinja2.exceptions.SecurityError as e:
        raise MlxgptError(f"the chat template tried something unsafe ({e})") from None
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError,
            AttributeError, IndexError) as e:
        raise MlxgptError(f"the chat template failed on these messages ({e})") from None
