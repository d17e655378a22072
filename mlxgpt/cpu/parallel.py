"""Use every core of the CPU inside one process: batch rows split over one CPU stream per core.

MLX's CPU backend runs each stream's ops on that stream's own thread, and everything but the
BLAS calls (LayerNorm, softmax, GELU, reductions, copies, the optimizer) on that one thread. A
training step on one stream therefore leaves all cores but one idle for much of the step, however
many threads OpenBLAS has. Splitting the batch's rows over one stream per core, each stream with
its own compiled function and one BLAS thread, runs the whole step on every core.

Measured (2 cores of an Intel Xeon, OpenBLAS 0.3.21 SkylakeX kernels, ``tools/bench_train.py``,
same run): 6/6/384 1,261 -> 1,989 tokens/s, 4/4/128 8,534 -> 11,012 (one stream with 2 BLAS
threads -> two streams with one each).

Two things make that work. MLX orders a graph breadth-first only up to
:data:`BFS_WIDTH` arrays wide (``MLX_BFS_MAX_WIDTH``, default 20) and keeps at most ten tasks in
flight, so with its default the ops of one stream's half are queued before the other's and the
streams take turns; :func:`configure` widens it when the training code is imported
(:mod:`mlxgpt.training.step`), before a run first evaluates anything (a process that evaluates
before importing it keeps MLX's width, 20: set ``MLX_BFS_MAX_WIDTH=200`` for it). And each
stream needs its own compiled function (MLX caches a trace per Python function, streams
included): :func:`on_stream` makes one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

STREAMS_ENV = "MLXGPT_CPU_STREAMS"  # how many CPU streams training uses; 1 turns this off
BFS_ENV = "MLX_BFS_MAX_WIDTH"
# Wide enough that the two halves of a step interleave (200 and 5,000 measured the same on the
# 4/4/128 config; 20 serialises them).
BFS_WIDTH = "200"


def configure() -> None:
    """Widen MLX's breadth-first evaluation order unless the user set it (MLX reads it once, at
    its first evaluation: :mod:`mlxgpt.training.step` calls this when it is imported)."""
    os.environ.setdefault(BFS_ENV, BFS_WIDTH)


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def stream_count(on_cpu: bool, processes: int = 1) -> int:
    """How many CPU streams to split a training batch over: one per core when MLX computes on
    the CPU (``on_cpu``: the caller's backend record says) and this is the only process (several
    processes on one machine already share its cores); ``MLXGPT_CPU_STREAMS`` decides when
    set."""
    if os.environ.get(STREAMS_ENV):
        try:
            return max(1, int(os.environ[STREAMS_ENV]))
        except ValueError:
            from ..errors import MlxgptError

            raise MlxgptError(f"{STREAMS_ENV} must be a whole number, not "
                              f"{os.environ[STREAMS_ENV]!r}") from None
    if not on_cpu or processes > 1:
        return 1
    return cpu_cores()


def new_streams(n: int) -> list[Any]:
    """``n`` new CPU streams (each runs on its own thread), or none when ``n`` is 1."""
    import mlx.core as mx

    return [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else []


def on_stream(fn: Callable[..., Any], stream: Any) -> Callable[..., Any]:
    """``fn`` with its ops on ``stream``: a new function object, so mx.compile traces it apart."""
    import mlx.core as mx

    def run(*args: Any) -> Any:
        with mx.stream(stream):
            return fn(*args)

    return run


def on_streams(fn: Callable[..., Any], streams: Sequence[Any]) -> list[Callable[..., Any]]:
    """One copy of ``fn`` per stream (:func:`on_stream`), or ``[fn]`` without streams."""
    return [on_stream(fn, s) for s in streams] or [fn]


def split_rows(batch: Sequence[Any], parts: int) -> list[tuple[Any, ...]]:
    """The arrays of ``batch`` cut along their rows into at most ``parts`` near-equal pieces."""
    rows = batch[0].shape[0]
    parts = max(1, min(parts, rows))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [tuple(a[lo:hi] for a in batch) for lo, hi in zip(bounds, bounds[1:], strict=False)]
