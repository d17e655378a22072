"""The HTTP side of ``mlxgpt serve``: a Starlette app speaking the OpenAI API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health``. Requests are checked by
:mod:`mlxgpt.serve.protocol` and run by the :class:`~mlxgpt.serve.engine.Engine` thread; this
module only translates between the two and watches the client: one that disconnects frees its
rows at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import MlxgptError
from ..generation.batch import TokenEvent
from ..tokenizers import Tokenizer
from .engine import Engine, Handle, QueueFull
from .protocol import (
    FINISH,
    APIError,
    ChoiceText,
    Job,
    bad,
    completion_logprobs,
    envelope,
    logprob_entry,
    parse_request,
    sse,
    usage,
)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait
CONSTRAINTS_KEPT = 32  # compiled response_format schemas kept for reuse


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    context: str = "stop"  # a prompt past the context: "stop" refuses it, "slide" cuts it
    json_whitespace: int = 0  # whitespace bytes per gap in response_format JSON (0: compact)


def error_response(e: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Server:
    """The routes, bound to one engine and model."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, config: ServerConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        model = engine.generator.model
        self.vocab_size = model.config.vocab_size
        self.n_positions = model.config.n_positions
        self.constraints: OrderedDict[str, Any] = OrderedDict()

    # -- routes

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.engine.load})

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_id, "object": "model", "created": 0,
            "owned_by": "mlxgpt"}]})

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    # -- the work

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", kind="authentication_error")

    async def generate(self, request: Request, kind: str) -> Response:
        self.authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})") from None
        job = parse_request(kind, body, self.tokenizer, vocab_size=self.vocab_size,
                            n_positions=self.n_positions, context=self.config.context)
        job.model = self.config.model_id
        if job.json_mode:
            await run_in_threadpool(self.constrain, job)
        try:
            queue, handles = self.engine.submit(job.choices, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later",
                           code="rate_limit_exceeded", kind="rate_limit_error") from None
        if job.stream:
            return StreamingResponse(self.stream(job, queue, handles),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(self.collect(job, queue, handles))
        gone = asyncio.ensure_future(disconnected(request))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client left: free its rows
            self.engine.cancel(handles)
            collect.cancel()
            return Response(status_code=499)
        gone.cancel()
        return JSONResponse(collect.result())

    def constrain(self, job: Job) -> None:
        """Give each choice its response_format constraint (schemas compiled once, kept)."""
        from ..generation.constrain import JsonConstraint

        key = json.dumps(job.schema, sort_keys=True)
        try:
            constraint = self.constraints.get(key)
            if constraint is None:
                constraint = JsonConstraint(self.tokenizer, job.schema, self.vocab_size,
                                            whitespace=self.config.json_whitespace)
                self.constraints[key] = constraint
                if len(self.constraints) > CONSTRAINTS_KEPT:
                    self.constraints.popitem(last=False)
            self.constraints.move_to_end(key)
            for choice in job.choices:
                budget = choice.max_tokens
                if self.config.context == "stop":  # the reply ends where the context does
                    budget = min(budget, self.n_positions - len(job.prompt_ids))
                choice.constraint = constraint.start(budget)
        except MlxgptError as e:
            raise bad(f"response_format: {e}", "response_format") from None

    async def events(self, queue: asyncio.Queue, handles: list[Handle]
                     ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every choice finished; cancels what is left if the
        consumer stops early (a client that left)."""
        left = len(handles)
        try:
            while left:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise APIError(500, str(item), kind="server_error")
                if item.finish_reason is not None:
                    left -= 1
                yield index, item
        finally:
            self.engine.cancel(handles)

    async def collect(self, job: Job, queue: asyncio.Queue, handles: list[Handle]
                      ) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = [Choice(job, self.tokenizer, i) for i in range(len(handles))]
        async for index, event in self.events(queue, handles):
            choices[index].add(event)
        out = envelope(job, chunk=False)
        out["choices"] = [c.whole() for c in choices]
        out["usage"] = self.usage(job, choices)
        return out

    async def stream(self, job: Job, queue: asyncio.Queue, handles: list[Handle]
                     ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per token and choice, then usage if asked, [DONE]."""
        choices = [Choice(job, self.tokenizer, i) for i in range(len(handles))]
        head = envelope(job, chunk=True)
        try:
            if job.kind == "chat":  # the role comes first, as OpenAI sends it
                for i in range(len(choices)):
                    yield sse({**head, "choices": [{"index": i, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]})
            async for index, event in self.events(queue, handles):
                piece = choices[index].add(event)
                if piece is not None:
                    yield sse({**head, "choices": [piece]})
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": self.usage(job, choices)})
        except APIError as e:
            yield sse(e.body())
        yield sse("[DONE]")

    @staticmethod
    def usage(job: Job, choices: list[Choice]) -> dict[str, Any]:
        cached = min((c.cached for c in choices), default=0)
        return usage(len(job.prompt_ids), sum(c.tokens for c in choices), cached)


class Choice:
    """One choice's text, log-probabilities and finish reason, built from its events."""

    def __init__(self, job: Job, tokenizer: Tokenizer, index: int):
        self.job, self.tokenizer, self.index = job, tokenizer, index
        self.text = ChoiceText(trim=job.kind == "chat")
        self.parts: list[str] = []
        self.length = 0  # characters so far
        self.logprobs: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.tokens = self.cached = 0

    def add(self, event: TokenEvent) -> dict[str, Any] | None:
        """Take one event; the streamed chunk's choice for it (None: nothing to send)."""
        text = self.text.add(event.text, last=event.finish_reason is not None)
        entry = None
        if self.job.logprobs is not None and event.token is not None:
            entry = logprob_entry(self.job.kind, event, text, self.length, self.token_text)
            self.logprobs.append(entry)
        self.parts.append(text)
        self.length += len(text)
        if event.finish_reason is not None:
            self.finish = FINISH[event.finish_reason]
            self.tokens, self.cached = event.generation_tokens, event.cached_tokens
        if not text and entry is None and self.finish is None:
            return None
        return self.piece(event, text, entry)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def piece(self, event: TokenEvent, text: str, entry: dict | None) -> dict[str, Any]:
        if self.job.kind == "chat":
            lp = {"content": [entry]} if entry is not None else None
            delta = {"content": text} if text or self.finish is None else {}
            return {"index": self.index, "delta": delta, "logprobs": lp,
                    "finish_reason": self.finish}
        lp = completion_logprobs([entry], self.job.logprobs > 0) if entry is not None else None
        return {"index": self.index, "text": text, "logprobs": lp,
                "finish_reason": self.finish}

    def whole(self) -> dict[str, Any]:
        text = "".join(self.parts)
        if self.job.kind == "chat":
            lp = {"content": self.logprobs} if self.job.logprobs is not None else None
            return {"index": self.index, "message": {"role": "assistant", "content": text,
                                                "refusal": None},
                    "logprobs": lp, "finish_reason": self.finish}
        lp = None
        if self.job.logprobs is not None:
            lp = completion_logprobs(self.logprobs, self.job.logprobs > 0)
        return {"index": self.index, "text": text, "logprobs": lp,
                "finish_reason": self.finish}


async def disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine, tokenizer: Tokenizer, config: ServerConfig) -> Starlette:
    """The ASGI app; starts the engine with the app and stops it at shutdown."""
    server = Server(engine, tokenizer, config)

    async def api_error(request: Request, e: APIError) -> Response:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
        return error_response(e, headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        return error_response(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()  # a thread of its own, unless serve() runs it on the main thread
        yield
        engine.stop(timeout=10)

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: api_error, HTTPException: http_error})


def serve(engine: Engine, tokenizer: Tokenizer, config: ServerConfig, host: str = "127.0.0.1",
          port: int = 8080, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run the server until SIGINT / SIGTERM: it then stops accepting, lets running requests
    finish for up to ``shutdown_timeout`` seconds, cancels the rest and returns.

    The model runs on the main thread and uvicorn's event loop on another: MLX work done on a
    thread that ends before the process can abort it at exit (``std::terminate``, seen with
    MLX 0.32 in one exit of four), and the main thread is also where signals arrive."""
    import signal

    import uvicorn

    app = create_app(engine, tokenizer, config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_timeout))
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn listens only on the main thread
        signal.signal(sig, server.handle_exit)
    engine.looping = True  # the lifespan must not start a thread for it
    http = threading.Thread(target=server.run, name="mlxgpt-http", daemon=True)
    http.start()
    engine.run(alive=http.is_alive)
    http.join()
    if not server.started:
        raise MlxgptError(f"could not serve on {host}:{port} (see uvicorn's message above)")
