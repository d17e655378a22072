"""The HTTP side of ``mlxgpt serve``: a Starlette app speaking the OpenAI API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health``. Requests are checked by
:mod:`mlxgpt.serve.protocol` and run by the :class:`~mlxgpt.serve.engine.Engine` thread; this
module only translates between the two and watches the client: one that disconnects frees its
rows at once.

Hostile or broken clients: a body is read incrementally and refused past ``max_body`` bytes
(413) or ``request_timeout`` seconds (408, and the same limit on the request's headers, see
:func:`timed_h11`); JSON parsing and tokenizing run on worker threads, so a big request does not
stall the others; on a shutdown that must cut requests, each ends with a 503 (a stream: an
error event, then ``[DONE]``).
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
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import MlxgptError
from ..generation.batch import TokenEvent
from ..generation.decode import constraint_budget
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
    parse_body,
    parse_request,
    sse,
    usage,
)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait
CONSTRAINTS_KEPT = 32  # compiled response_format schemas kept for reuse
DEFAULT_MAX_BODY = 4 << 20  # bytes of a request body (a 128k-token prompt is under 1 MB)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds a client gets to send a request's headers, and its body
CUT_GRACE_S = 2.0  # after the cut, how long uvicorn waits for the cut responses to go out
CLOSE = {"Connection": "close"}  # after a 408 / 413: the rest of that request is not wanted


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    context: str = "stop"  # a prompt past the context: "stop" refuses it, "slide" cuts it
    json_whitespace: int = 0  # whitespace bytes per gap in response_format JSON (0: compact)
    max_body: int = DEFAULT_MAX_BODY  # bytes; a larger request body gets 413
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds to send the body; then 408


def error_response(e: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down and this request ran past its shutdown "
                    "timeout; retry later", code="server_shutting_down", kind="server_error")


class Server:
    """The routes, bound to one engine and model."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, config: ServerConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        model = engine.generator.model
        self.vocab_size = model.config.vocab_size
        self.n_positions = model.config.n_positions
        self.constraints: OrderedDict[str, Any] = OrderedDict()
        # Submitted requests by id(queue), for the cut at shutdown (see begin_shutdown).
        self.inflight: dict[int, tuple[asyncio.Queue, list[Handle]]] = {}
        self.reading: set[asyncio.Task] = set()  # requests still reading their bodies
        self.closing = False  # cut: new requests get 503
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts
        self._cut: asyncio.TimerHandle | None = None

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
            raw = await self.read_body(request)
        except ClientDisconnect:  # it left halfway through its body: nobody to answer
            return Response(status_code=499)
        # Off the event loop: parsing and tokenizing a big body must not stall other clients.
        job = await run_in_threadpool(self.parse, kind, raw)
        if job.json_mode:
            await run_in_threadpool(self.constrain, job)
        if self.closing:
            raise shutting_down()
        try:
            queue, handles = self.engine.submit(job.choices, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later",
                           code="rate_limit_exceeded", kind="rate_limit_error") from None
        self.track(queue, handles)
        if job.stream:
            return StreamingResponse(self.stream(job, queue, handles),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(self.collect(job, queue, handles))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            left = not collect.done()
            if left:  # the client left (or this task was cancelled): free its rows
                self.engine.cancel(handles)
                collect.cancel()
        if left:
            return Response(status_code=499)
        return JSONResponse(collect.result())  # an APIError (the cut: 503) is raised here

    async def read_body(self, request: Request) -> bytes:
        """The body, read as it arrives: 413 past ``max_body`` bytes (the declared length is
        checked first, so a large body is refused before it is read), 408 past
        ``request_timeout`` seconds (a slow client must not hold a connection for ever)."""
        limit, timeout = self.config.max_body, self.config.request_timeout
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        parts: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # chunked, or a length that lied
                    raise too_large(limit)
                parts.append(chunk)

        task = asyncio.current_task()
        if task is not None:
            self.reading.add(task)
        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise APIError(408, f"the request body did not arrive within {timeout:g} s",
                           code="request_timeout") from None
        finally:
            self.reading.discard(task)  # type: ignore[arg-type]
        return b"".join(parts)

    def parse(self, kind: str, raw: bytes) -> Job:
        """The body as a checked job (JSON, then the prompt tokenized): on a worker thread."""
        job = parse_request(kind, parse_body(raw), self.tokenizer, vocab_size=self.vocab_size,
                            n_positions=self.n_positions, context=self.config.context)
        job.model = self.config.model_id
        return job

    # -- shutdown

    def track(self, queue: asyncio.Queue, handles: list[Handle]) -> None:
        # Forget finished requests here too: a stream whose client left before its first
        # chunk never runs events(), which is what normally forgets it.
        stale = [k for k, (_, hs) in self.inflight.items()
                 if all(h.done or h.cancelled for h in hs)]
        for k in stale:
            del self.inflight[k]
        self.inflight[id(queue)] = (queue, handles)

    def begin_shutdown(self, timeout: float) -> None:
        """The server began a graceful shutdown: requests still running ``timeout`` seconds
        from now are cut. Safe to call from another thread (a signal handler)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing runs
                loop.call_soon_threadsafe(self._arm_cut, timeout)

    def _arm_cut(self, timeout: float) -> None:
        if self._cut is None:
            self._cut = asyncio.get_running_loop().call_later(max(timeout, 0), self.cut)

    def cut(self) -> None:
        """End every running request now with a 503: a stream gets an error event and
        ``[DONE]``, a whole response the JSON error; their rows are freed."""
        self.closing = True
        error = shutting_down()
        for queue, handles in self.inflight.values():
            queue.put_nowait((0, error))
            self.engine.cancel(handles)
        self.inflight.clear()
        for task in self.reading:  # CancelGuard answers them with the same 503
            task.cancel()

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
            for choice in job.choices:  # budgets as the library's (generate, chat) are
                choice.constraint = constraint.start(constraint_budget(
                    choice.max_tokens, len(job.prompt_ids), self.n_positions,
                    self.config.context))
        except MlxgptError as e:
            msg = str(e)  # the compiler's messages mostly name response_format already
            raise bad(msg if msg.startswith("response_format") else f"response_format: {msg}",
                      "response_format") from None

    async def events(self, queue: asyncio.Queue, handles: list[Handle]
                     ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every choice finished; cancels what is left if the
        consumer stops early (a client that left)."""
        left = len(handles)
        try:
            while left:
                index, item = await queue.get()
                if isinstance(item, APIError):  # the cut at shutdown
                    raise item
                if isinstance(item, Exception):
                    raise APIError(500, str(item), kind="server_error")
                if item.finish_reason is not None:
                    left -= 1
                yield index, item
        finally:
            self.inflight.pop(id(queue), None)
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
        return usage(len(job.prompt_ids), sum(c.tokens for c in choices), cached,
                     drafted=sum(c.drafted for c in choices),
                     accepted=sum(c.accepted for c in choices))


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
        self.drafted = self.accepted = 0  # with --draft-model: the draft's tokens for it

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
            self.drafted, self.accepted = event.drafted_tokens, event.accepted_tokens
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


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} "
                    "bytes (mlxgpt serve --max-body)", code="request_too_large")


class CancelGuard:
    """The outermost layer of each request. uvicorn cancels the requests still running when
    its graceful-shutdown timeout passes (mlxgpt's own cut, :meth:`Server.cut`, normally ends
    them first); one cancelled here still ends properly: a 503, or for a stream an error event
    and ``[DONE]``, and no CancelledError traceback in the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = {"started": False, "stream": False, "finished": False}

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["started"] = True
                sent["stream"] = any(k.lower() == b"content-type"
                                     and v.startswith(b"text/event-stream")
                                     for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            error = shutting_down()
            # The task is ending anyway: a second cancellation or a gone client only means
            # the goodbye is not delivered.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                if not sent["started"]:
                    await error_response(error, CLOSE)(scope, receive, send)
                elif not sent["finished"]:
                    tail = sse(error.body()) + sse("[DONE]") if sent["stream"] else ""
                    await send({"type": "http.response.body", "body": tail.encode(),
                                "more_body": False})


def timed_h11(timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a limit on the time a client takes to send a request's
    headers (uvicorn has none: a client that stops halfway through them, or connects and sends
    nothing, holds its connection for ever). Past ``timeout`` seconds it gets a 408 and the
    connection is closed; the body's own limit is :meth:`Server.read_body`'s."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n" \
        b"connection: close\r\ncontent-length: %d\r\n\r\n"
    body = json.dumps(APIError(408, f"the request headers did not arrive within {timeout:g} s",
                               code="request_timeout").body()).encode()

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _busy(self) -> bool:  # a request's headers are in: its cycle runs
            return self.cycle is not None and not self.cycle.response_complete

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self._busy() or self.transport.is_closing():
                return
            self.transport.write(head % len(body) + body)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout, self._expire)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._busy():
                self._disarm()
            elif self._header_timer is None and not self.transport.is_closing():
                # bytes of a next request (or of a refused body) arrive: they get the limit
                self._header_timer = self.loop.call_later(timeout, self._expire)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


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
        if e.status in (408, 413):  # the rest of that body is not read
            headers = CLOSE
        return error_response(e, headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        return error_response(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        server.loop = asyncio.get_running_loop()  # for begin_shutdown, called from a signal
        engine.start()  # a thread of its own, unless serve() runs it on the main thread
        yield
        engine.stop(timeout=10)

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(CancelGuard)],
                    exception_handlers={APIError: api_error, HTTPException: http_error})
    app.state.server = server
    return app


def serve(engine: Engine, tokenizer: Tokenizer, config: ServerConfig, host: str = "127.0.0.1",
          port: int = 8080, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run the server until SIGINT / SIGTERM: it then stops accepting, lets running requests
    finish for up to ``shutdown_timeout`` seconds, ends the rest with a 503 (streams: an error
    event and ``[DONE]``) and returns.

    The model runs on the main thread and uvicorn's event loop on another: MLX work done on a
    thread that ends before the process can abort it at exit (``std::terminate``, seen with
    MLX 0.32 in one exit of four), and the main thread is also where signals arrive."""
    import signal

    import uvicorn

    app = create_app(engine, tokenizer, config)
    # uvicorn's own deadline comes after mlxgpt's cut, so the cut responses get out first
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=timed_h11(config.request_timeout),
        timeout_graceful_shutdown=shutdown_timeout + CUT_GRACE_S))

    def on_signal(sig: int, frame: Any) -> None:
        server.handle_exit(sig, frame)
        app.state.server.begin_shutdown(shutdown_timeout)

    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn listens only on the main thread
        signal.signal(sig, on_signal)
    engine.looping = True  # the lifespan must not start a thread for it
    http = threading.Thread(target=server.run, name="mlxgpt-http", daemon=True)
    http.start()
    engine.run(alive=http.is_alive)
    http.join()
    if not server.started:
        raise MlxgptError(f"could not serve on {host}:{port} (see uvicorn's message above)")
