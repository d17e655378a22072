"""The one loop that runs the model (on one thread: the main thread under ``mlxgpt serve``):
requests wait in a bounded queue, join the batch as rows free up, and their tokens go back to
the event loop that asked.

The HTTP side never touches the model: it submits sequences (:meth:`Engine.submit`), reads their
events from an asyncio queue, and cancels them (:meth:`Engine.cancel`) when a client leaves; the
engine drops a cancelled row before its next step.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..core.model import Model
from ..errors import MlxgptError
from ..generation.batch import BatchGenerator, SequenceRequest
from ..generation.batch_speculative import SpeculativeBatchGenerator
from ..tokenizers import Tokenizer


class QueueFull(Exception):
    """More sequences wait than the queue holds (the server answers 429)."""


@dataclass(eq=False)  # compared by identity
class Handle:
    """One submitted sequence: its events arrive on ``queue`` as (index, item), item a
    :class:`~mlxgpt.generation.batch.TokenEvent` or an exception."""

    index: int
    request: SequenceRequest
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    uid: int | None = None
    done: bool = False
    cancelled: bool = field(default=False)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass


class Engine:
    """Owns the model and a :class:`BatchGenerator` (with ``draft``: a
    :class:`~mlxgpt.generation.batch_speculative.SpeculativeBatchGenerator`, ``draft_tokens``
    a round); runs it on its own thread."""

    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int = 16,
                 max_queue: int = 64, prefix_cache: int = 8, draft: Model | None = None,
                 draft_tokens: int = 4):
        self.generator = BatchGenerator(model, tokenizer, max_batch, prefix_cache) \
            if draft is None else SpeculativeBatchGenerator(
                model, tokenizer, draft, draft_tokens, max_batch, prefix_cache)
        self.max_queue = max_queue
        self.waiting: deque[Handle] = deque()
        self.running: dict[int, Handle] = {}  # uid -> handle
        self.to_cancel: list[Handle] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.thread: threading.Thread | None = None
        self.looping = False  # run() is looping, on some thread

    def start(self) -> Engine:
        """Run on a thread of its own (embedding the app elsewhere; ``mlxgpt serve`` runs the
        engine on the main thread, see :func:`mlxgpt.serve.app.serve`)."""
        if not self.looping:
            self.looping = True
            self.thread = threading.Thread(target=self.run, name="mlxgpt-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything and end the loop (and its thread, if it has one)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None and self.thread.is_alive() \
                and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def load(self) -> dict[str, Any]:
        out: dict[str, Any] = {"running": len(self.running), "waiting": len(self.waiting),
                               "max_batch": self.generator.max_batch,
                               "max_queue": self.max_queue}
        stats = getattr(self.generator, "stats", None)
        if stats is not None:  # speculative decoding: how the draft did since the start
            out["draft"] = {"draft_tokens": self.generator.k, "proposed": stats.proposed,
                            "accepted": stats.accepted, "acceptance": stats.acceptance}
        return out

    def submit(self, requests: list[SequenceRequest],
               loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, list[Handle]]:
        """Queue sequences (all or none); one asyncio queue receives all their events."""
        queue: asyncio.Queue = asyncio.Queue()
        handles = [Handle(i, r, queue, loop) for i, r in enumerate(requests)]
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(handles) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting "
                                f"(the queue holds {self.max_queue})")
            self.waiting.extend(handles)
            self.cond.notify()
        return queue, handles

    def cancel(self, handles: list[Handle]) -> None:
        """Forget these sequences (their client left); their rows free up before the next
        step."""
        with self.cond:
            for h in handles:
                if not h.done and not h.cancelled:
                    h.cancelled = True
                    self.to_cancel.append(h)
            self.cond.notify()

    # -- the engine thread

    def run(self, alive: Callable[[], bool] | None = None) -> None:
        """The engine loop, in the calling thread, until :meth:`stop` (or ``alive()`` turns
        false: the HTTP side is gone)."""
        self.looping = True
        gen = self.generator
        while True:
            with self.cond:
                while not (self.stopping or self.waiting or self.to_cancel or gen.active):
                    self.cond.wait(timeout=0.5)
                    if alive is not None and not alive():
                        self.stopping = True
                if self.stopping:
                    break
                cancelled, self.to_cancel = self.to_cancel, []
                for h in cancelled:
                    if h in self.waiting:
                        self.waiting.remove(h)
            try:
                self._cycle(cancelled)
            except Exception as e:  # a bug must not take the server down: fail what runs
                traceback.print_exc(file=sys.stderr)
                self._fail_all(MlxgptError(f"generation failed: {e}"))
        self._fail_all(MlxgptError("the server is shutting down"), waiting=True)
        mx.synchronize()  # nothing queued by async_eval outlives the loop
        self.looping = False

    def _cycle(self, cancelled: list[Handle]) -> None:
        """Drop cancelled rows, admit waiting sequences while rows are free, take one step."""
        gen = self.generator
        for h in cancelled:
            if h.uid is not None and self.running.pop(h.uid, None) is not None:
                gen.remove(h.uid)
            h.done = True
        with self.cond:
            admit = [self.waiting.popleft()
                     for _ in range(min(len(self.waiting), gen.max_batch - gen.active))]
        for h in admit:
            try:
                h.uid = gen.add(h.request)
            except MlxgptError as e:
                h.done = True
                h.put(e)
                continue
            self.running[h.uid] = h
        for event in gen.step():
            h = self.running.get(event.uid)
            if h is None:
                continue
            if event.finish_reason is not None:
                del self.running[event.uid]
                h.done = True
            h.put(event)
        self.steps += 1

    def _fail_all(self, error: Exception, waiting: bool = False) -> None:
        for h in list(self.running.values()):
            self.generator.remove(h.uid)
            h.done = True
            h.put(error)
        self.running.clear()
        if waiting:
            with self.cond:
                left, self.waiting = list(self.waiting), deque()
            for h in left:
                h.done = True
                h.put(error)
