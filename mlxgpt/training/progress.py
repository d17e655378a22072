"""What the person at the terminal sees and does during training: the progress bar, and Ctrl-C
(the first one stops the run after the current step, with a checkpoint; a second one aborts)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def _fmt_rate(rate: float) -> str:
    return f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.1f}"


class Progress:
    """A one-line progress bar on stderr: step, loss, speed, ETA (plain lines when not a tty).
    ``unit`` names what the loss counts: tokens ("tok") or, for a classifier, examples ("ex")."""

    def __init__(self, total: int, start: int, enabled: bool = True, stream=None,
                 unit: str = "tok"):
        self.total, self.start, self.enabled, self.unit = total, start, enabled, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = max(1, (total - start) // 20)  # non-tty: about 20 lines per run
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.first, self.first_step = True, start

    def update(self, step: int, loss: float, tokens: int) -> None:
        # The first step includes compilation: measure speed from the end of it.
        if self.first:
            self.first, self.t0, self.start = False, time.perf_counter(), step
        else:
            self.tokens += tokens
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        done = step - self.start
        rate = self.tokens / dt if dt > 0 else 0.0
        eta = dt / done * (self.total - step) if done else 0.0
        width = 24
        fill = int(width * step / self.total)
        line = (f"step {step}/{self.total} [{'#' * fill}{'.' * (width - fill)}] loss {loss:.4f} "
                f"| {_fmt_rate(rate)} {self.unit}/s | ETA {_fmt_time(eta) if done else '?'}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif (step - self.first_step) % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")

    def clear(self) -> None:
        """Clear the bar's line so that a message can be printed in its place."""
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop after this step; a second one aborts."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
