"""The OpenAI API's request and response shapes: JSON in -> a checked :class:`Job`, results ->
JSON out. No HTTP and no model here.

Every problem with a request is an :class:`APIError` (status, message, the parameter at fault),
which the app turns into OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MlxgptError
from ..generation.batch import SequenceRequest, TokenEvent
from ..generation.sample import SamplingSettings
from ..tokenizers import Tokenizer
from ..tokenizers.transcript import ROLES, chat_prompt

MAX_N = 16  # choices per request
MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = {"completion": 5, "chat": 20}  # as OpenAI
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI: 16; chat: until done (see README)


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# --------------------------------------------------------------------------- requests


def parse_body(raw: bytes) -> Any:
    """The request body as JSON; a 400 for anything that is not (hostile input included:
    nesting deeper than the recursion limit, an integer past Python's digit limit)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None
    except ValueError:  # Python's limit on the digits of an integer (4300 by default)
        raise bad("the request body holds an integer with too many digits") from None


# Parameters each endpoint takes; any other key is refused (a typo must not pass silently).
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user",
          "top_k", "min_p", "repetition_penalty"}  # the last three: extensions (as vLLM's)
COMPLETION_KEYS = COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}


@dataclass
class Job:
    """A checked request: one :class:`SequenceRequest` per choice, and how to answer."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list[int]
    choices: list[SequenceRequest]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token and k alternatives
    schema: dict | None = None  # response_format: None (text), {} (any object) or a schema
    json_mode: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, lo: float, hi: float, default: float | None,
            integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if not lo <= value <= hi:
        raise bad(f"'{key}' must be in [{lo}, {hi}], got {value}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false", key)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings", "stop")
    return [s for s in stops if s]


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise bad("'logit_bias' must map token ids to numbers", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias': {key!r} is not a token id", "logit_bias") from None
        if not 0 <= tok < vocab_size:
            raise bad(f"'logit_bias': token id {tok} is not in 0..{vocab_size - 1}",
                      "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise bad(f"'logit_bias': the bias of {tok} must be a number in [-100, 100]",
                      "logit_bias")
        out[tok] = float(value)
    return out


def _prompt_ids(body: dict, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """A completion's prompt: text, or token ids (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                        for t in prompt):
        bad_ids = [t for t in prompt if not 0 <= t < vocab_size]
        if bad_ids:
            raise bad(f"'prompt': token id {bad_ids[0]} is not in 0..{vocab_size - 1}", "prompt")
        return list(prompt)
    if isinstance(prompt, list):
        raise bad("'prompt': send one prompt per request (several choices: 'n')", "prompt")
    raise bad("'prompt' must be a string or a list of token ids", "prompt")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise bad(f"'messages[{i}]' must be an object with 'role' and 'content'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ROLES:
            raise bad(f"'messages[{i}].role' {m['role']!r} is not one of "
                      f"{', '.join(ROLES)}", "messages")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"'messages[{i}].content' must be text (this model reads text only)", "messages")


def _response_format(body: dict) -> tuple[dict | None, bool]:
    """(schema, json mode): (None, False) for text, ({}, True) any object, (schema, True)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None, False
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                           "json_schema"):
        raise bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                  "response_format")
    if fmt["type"] == "text":
        return None, False
    if fmt["type"] == "json_object":
        return None, True
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise bad("'response_format.json_schema.schema' must be a JSON schema object",
                  "response_format")
    from ..generation.constrain import check_nesting

    try:  # before anything recursive (the server's cache key, the compiler) reads it
        check_nesting(spec["schema"])
    except MlxgptError as e:
        raise bad(str(e), "response_format") from None
    return spec["schema"], True


def parse_request(kind: str, body: Any, tokenizer: Tokenizer, *, vocab_size: int,
                  n_positions: int, context: str) -> Job:
    """Check a completions (``kind="completion"``) or chat request; a :class:`Job`.

    ``context`` is the server's policy for a prompt longer than the model's context: "stop"
    refuses it, "slide" keeps its most recent tokens.
    """
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    allowed = CHAT_KEYS if kind == "chat" else COMPLETION_KEYS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unknown parameter '{unknown[0]}'", unknown[0], "unknown_parameter")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model")

    if kind == "chat":
        messages = _messages(body)
        try:
            ids, stops = chat_prompt(tokenizer, messages)  # the model's template may refuse
        except MlxgptError as e:
            raise bad(str(e), "messages") from None
        stops = list(stops)
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        schema, json_mode = _response_format(body)
        logprobs = None
        if _flag(body, "logprobs"):
            logprobs = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS["chat"], 0, True)
        elif body.get("top_logprobs") is not None:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        if body.get("echo"):
            raise bad("'echo' is not supported", "echo")
        if body.get("suffix"):
            raise bad("'suffix' is not supported (GPT-2 does not fill in the middle)", "suffix")
        if body.get("best_of") not in (None, 1):
            raise bad("'best_of' is not supported", "best_of")
        ids = _prompt_ids(body, tokenizer, vocab_size)
        stops, max_key, schema, json_mode = [], "max_tokens", None, False
        logprobs = _number(body, "logprobs", 0, MAX_TOP_LOGPROBS["completion"], None, True)
    if not ids:
        if tokenizer.eot_id is None:
            raise bad("the prompt is empty", "prompt")
        ids = [tokenizer.eot_id]
    if len(ids) >= n_positions and context == "stop":
        raise bad(f"the prompt is {len(ids)} tokens; this model's context is {n_positions} "
                  "tokens, and the reply needs at least one", "messages" if kind == "chat"
                  else "prompt", "context_length_exceeded")

    max_tokens = _number(body, max_key, 1, 1 << 20, DEFAULT_MAX_TOKENS[kind], True)
    n = _number(body, "n", 1, MAX_N, 1, True)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise bad("'stream_options' takes only 'include_usage', with 'stream': true",
                  "stream_options")
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, None, True)
    try:
        sampling = [SamplingSettings(
            temperature=_number(body, "temperature", 0, 2, 1.0),
            top_p=_number(body, "top_p", 0, 1, 1.0) or 1e-9,  # 0: the most likely token only
            top_k=_number(body, "top_k", 0, vocab_size, 0, True),
            min_p=_number(body, "min_p", 0, 0.999, 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 0.01, 10, 1.0),
            presence_penalty=_number(body, "presence_penalty", -2, 2, 0.0),
            frequency_penalty=_number(body, "frequency_penalty", -2, 2, 0.0),
            logit_bias=_logit_bias(body, vocab_size),
            seed=None if seed is None else (seed + i) % (1 << 63),
        ) for i in range(n)]
    except MlxgptError as e:
        raise bad(str(e).removeprefix("sampling: ")) from None
    stops += _stops(body)
    choices = [SequenceRequest(list(ids), max_tokens=max_tokens, sampling=s, stop=stops,
                               logprobs=logprobs, context=context) for s in sampling]
    return Job(kind, model, ids, choices, stream=stream,
               include_usage=bool(options and options.get("include_usage")),
               logprobs=logprobs, schema=schema, json_mode=json_mode)


# --------------------------------------------------------------------------- responses

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ChoiceText:
    """One choice's text as it streams. A chat reply is trimmed: the model writes a space after
    ``Assistant:`` and may end its turn with a newline. Trailing whitespace is held back until
    more text follows, so the streamed pieces join to exactly the non-streamed text."""

    def __init__(self, trim: bool):
        self.trim = trim
        self.started = False
        self.held = ""

    def add(self, text: str, last: bool = False) -> str:
        if not self.trim:
            return text
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text, self.held = self.held + text, ""
        if last:
            return text.rstrip()
        body = text.rstrip()
        self.held = text[len(body):]
        return body


def logprob_entry(kind: str, event: TokenEvent, text: str, offset: int,
                  token_text: Callable[[int], str]) -> dict[str, Any]:
    """One token's log-probabilities in the endpoint's format (``offset``: the token's
    character offset in the choice's text, for completions)."""
    top = event.top_logprobs or []
    if kind == "chat":
        def item(tok: int, lp: float) -> dict[str, Any]:
            s = token_text(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        entry = item(event.token, event.logprob)
        entry["top_logprobs"] = [item(t, lp) for t, lp in top]
        return entry
    return {"token": token_text(event.token), "logprob": event.logprob,
            "top": {token_text(t): lp for t, lp in top}, "offset": offset}


def completion_logprobs(entries: list[dict[str, Any]], with_top: bool) -> dict[str, Any]:
    """Completions' column format from per-token entries."""
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [e["top"] for e in entries] if with_top else None,
        "text_offset": [e["offset"] for e in entries],
    }


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0, drafted: int = 0,
          accepted: int = 0) -> dict[str, Any]:
    """The usage field; with a draft model (``drafted`` > 0) its accepted and rejected
    tokens, in the fields OpenAI gives predicted outputs."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if drafted:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def envelope(job: Job, chunk: bool) -> dict[str, Any]:
    """The fields every response and chunk of ``job`` carries."""
    if job.kind == "chat":
        obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
    else:
        obj, prefix = "text_completion", "cmpl-"
    return {"id": prefix + job.id, "object": obj, "created": job.created, "model": job.model,
            "system_fingerprint": None}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
