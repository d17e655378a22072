"""One training loop for pretraining and fine-tuning (and data-parallel runs of both).

    from mlxgpt.training.loop import TrainConfig, train

    result = train(
        model,            # nn.Module; only model.trainable_parameters() train (freeze the rest)
        loss_fn,          # (model, *batch) -> (mean loss over counted tokens, n counted tokens)
        train_data,       # .batch(i) -> tuple of arrays, each (B, ...): a PURE function of i
        TrainConfig(steps=2000, lr=1e-3, ...),
        run_dir,          # log.jsonl, loss.png, last/ and best/ checkpoints go here
        save_weights=lambda model, folder: ...,   # write what a checkpoint keeps into folder
        load_weights=lambda model, folder: ...,   # read it back into model (for resume)
        val_data=val,     # optional: .batch(i) for i < cfg.eval_batches, the same set every eval
        sample=lambda model: "text",  # optional: shown and logged at every evaluation
        resume=False,     # True: continue from run_dir/last exactly where it stopped
    )
    # result.step, .losses [(step, loss)], .val_losses, .best_val_loss, .interrupted, ...

Other keyword arguments: ``last_name``/``best_name`` (checkpoint folder names), ``fingerprint``
(JSON-able facts every rank must agree on, e.g. the data hash), ``echo`` (where messages go),
``progress`` (the bar), ``should_stop(step) -> bool`` (stop like Ctrl-C after that step),
``shown_dir`` (the run folder messages name, where ``run_dir`` is a temporary one that will
replace it). A failed write (disk full, no permission) is one line, a ``WriteError``.

Batch sources are indexed, not iterated: micro-batch ``i`` (``i = step * grad_accum + k``) is
``train_data.batch(i)``, so "data position + RNG state" is just ``i`` and a resumed run draws
exactly the batches the uninterrupted run would have. Dropout randomness is re-seeded from
``(seed, step)`` before every step for the same reason. Together with the saved optimizer state
this makes a stopped-and-resumed run produce the same losses as one that never stopped.

Checkpoints (written atomically, rank 0 only):

- ``run_dir/<last_name>/``: ``save_weights`` output + ``optimizer.safetensors`` +
  ``trainer_state.json`` -- everything ``resume`` needs. Written every ``save_every`` steps, at the
  end, and when Ctrl-C stops the run.
- ``run_dir/<best_name>/``: ``save_weights`` output + ``trainer_state.json`` at the lowest
  validation loss so far (only when ``val_data`` is given).

Gradients: ``loss_fn`` returns a per-token mean ``l`` and a count ``n``; micro-batches (and ranks)
are combined as ``sum(n_i * grad l_i) / sum(n_i)``, the token-weighted mean, so grad_accum=2 with
batch B equals batch 2B, and N processes with B/N rows each equal one process with B rows.
Under ``mlx.launch`` every rank takes its rows of each global batch and the sums are reduced in
ONE ``mx.distributed.all_sum`` per step (:mod:`.distributed`); only rank 0 writes files or prints.

The parts live beside this module: the compiled step and evaluation (:mod:`.step`), the loss
(:mod:`.loss`), the optimizer (:mod:`.optim`), checkpoints (:mod:`.state`), the log and plot
(:mod:`.runlog`), the progress bar and Ctrl-C (:mod:`.progress`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..atomicio import WriteError, write_error
from ..core.backend import backend
from ..errors import MlxgptError
from .config import TrainConfig, TrainResult
from .distributed import Batch, check_ranks_agree, rank0_echo, shard, step_seed, world
from .native_pass import choose_train_pass
from .optim import OPTIMIZER_FILE, load_optimizer, lr_schedule, make_optimizer
from .progress import Progress, StopFlag
from .runlog import LOG_FILE, PLOT_FILE, JsonlLog, plot_losses
from .state import read_trainer_state, write_checkpoint
from .step import Evaluator, LossFn, Stepper


class BatchSource(Protocol):
    def batch(self, index: int) -> Batch:
        """Micro-batch number ``index``: the same arrays every time it is asked for."""


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: BatchSource,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    save_weights: Callable[[nn.Module, Path], None],
    load_weights: Callable[[nn.Module, Path], None],
    val_data: BatchSource | None = None,
    sample: Callable[[nn.Module], str] | None = None,
    resume: bool = False,
    last_name: str = "last",
    best_name: str = "best",
    fingerprint: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[int], bool] | None = None,
    shown_dir: str | os.PathLike | None = None,
    unit: str = "tok",
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps; see the module docstring. ``unit``
    names what ``loss_fn`` counts, for the progress bar ("tok", or "ex" for examples)."""
    run = _Run(model, loss_fn, cfg, Path(run_dir), save_weights, last_name, best_name,
               rank0_echo(echo), fingerprint or {}, Path(shown_dir or run_dir))
    try:
        if resume:
            run.restore(load_weights)
        run.start(train_data, progress, unit)
        with StopFlag() as stop:
            while run.result.step < cfg.steps:
                run.train_step(train_data)
                last = run.result.step == cfg.steps
                if val_data is not None and (last or run.due(cfg.eval_every)):
                    run.evaluate(val_data, sample)
                if last or run.due(cfg.save_every or cfg.eval_every):
                    run.save(last_name)
                if not last and (stop.set or (should_stop and should_stop(run.result.step))):
                    return run.stop_early()
        return run.finish()
    except OSError as e:  # the log, a checkpoint: one line, not a traceback
        if isinstance(e, WriteError):
            raise
        raise write_error(e, e.filename or run.shown_dir) from None


class _Run:
    """The state of one training run and the things ``train`` does to it, each a method."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, run_dir: Path,
                 save_weights: Callable[[nn.Module, Path], None], last_name: str,
                 best_name: str, say: Callable[[str], None], fingerprint: dict[str, Any],
                 shown_dir: Path):
        self.model, self.loss_fn, self.cfg, self.run_dir = model, loss_fn, cfg, run_dir
        self.shown_dir = shown_dir
        self.save_weights, self.last_name, self.best_name = save_weights, last_name, best_name
        self.say = say
        self.group = world()
        self.rank0 = self.group.rank() == 0
        check_ranks_agree({"cfg": asdict(cfg), "fingerprint": fingerprint,
                           "params": [(k, v.shape) for k, v in tree_flatten(model.parameters())]},
                          self.group)
        self.opt = make_optimizer(cfg)
        self.opt.init(model.trainable_parameters())
        self.result = TrainResult(step=0)
        self.resumed = False
        self.window: list[tuple[float, int, float]] = []  # (loss, tokens, seconds) since logged
        self.backend = backend()  # the device's record: the pass, the streams, the setup
        self.compute = self.backend.compute_setup(getattr(model, "kernels", None))
        # the native C pass or MLX's graph, decided once (they round differently; --train-pass
        # native where it cannot run: an error here, before anything is written)
        self.train_pass = choose_train_pass(model, loss_fn, cfg.train_pass,
                                            backend=self.backend)
        self.compute["train_pass"] = self.train_pass.name
        say(self.train_pass.line())

    @property
    def micro_index(self) -> int:
        """The first micro-batch of the next step: batches are indexed, so this is the data
        position."""
        return self.result.step * self.cfg.grad_accum

    def due(self, every: int) -> bool:
        return bool(every) and self.result.step % every == 0

    # -- setting up

    def restore(self, load_weights: Callable[[nn.Module, Path], None]) -> None:
        """Continue from ``run_dir/<last_name>``: weights, optimizer, step and counters."""
        folder = self.run_dir / self.last_name
        state = read_trainer_state(folder)
        load_weights(self.model, folder)
        load_optimizer(self.opt, folder / OPTIMIZER_FILE)
        self.result = TrainResult(step=state["step"], best_val_loss=state.get("best_val_loss"),
                                  tokens=state.get("tokens", 0), elapsed=state.get("elapsed", 0.0))
        if self.result.step >= self.cfg.steps:
            raise MlxgptError(f"{folder} is already at step {self.result.step}; "
                              f"ask for more --steps to continue")
        self.resumed = True
        self.say(f"resuming from {folder} at step {self.result.step}")
        saved = state.get("compute")
        changed = [f"{k} {v} -> {self.compute.get(k)}" for k, v in saved.items()
                   if self.compute.get(k) != v] if isinstance(saved, dict) else []
        if changed:
            self.say(f"note: this run computes differently from the checkpoint's ("
                     f"{'; '.join(changed)}): losses can differ from an uninterrupted run's "
                     f"in their last digits")

    def start(self, train_data: BatchSource, progress: bool, unit: str) -> None:
        shard(train_data.batch(self.micro_index), self.group)  # a batch that does not divide
        mx.eval(self.model.parameters(), self.opt.state)
        self.stepper = Stepper(self.model, self.loss_fn, self.opt, self.cfg, self.group,
                               self.train_pass, self.backend)
        self.evaluator = Evaluator(self.model, self.loss_fn, compile=self.cfg.compile,
                                   group=self.group, native=self.stepper.native,
                                   train_pass=self.train_pass.name, backend=self.backend)
        if self.rank0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MlxgptError(f"cannot write to {self.run_dir}: {e.strerror or e}") from None
        self.log = JsonlLog(self.run_dir / LOG_FILE, self.rank0,
                            self.result.step if self.resumed else None)
        self.bar = Progress(self.cfg.steps, self.result.step, enabled=self.rank0 and progress,
                            unit=unit)
        self.model.train()

    # -- a step

    def train_step(self, train_data: BatchSource) -> None:
        t0 = time.perf_counter()
        batches = [shard(train_data.batch(self.micro_index + k), self.group)
                   for k in range(self.cfg.grad_accum)]
        mx.random.seed(step_seed(self.cfg.seed, self.result.step, self.group.rank()))
        mx.reset_peak_memory()
        loss, ntok, gnorm = self.stepper.step(batches)
        mx.eval(loss, ntok, gnorm, self.stepper.state)
        # Kept per step: evaluation and samples (stream_generate) reset MLX's counter too.
        self.result.peak_memory = max(self.result.peak_memory,
                                      mx.get_peak_memory() + self.stepper.host_bytes())
        loss_v, ntok_v = loss.item(), int(ntok.item())
        r = self.result
        r.step += 1
        r.tokens += ntok_v
        dt = time.perf_counter() - t0
        r.elapsed += dt
        r.losses.append((r.step, loss_v))
        if not math.isfinite(loss_v):
            self.bar.close()
            self.save(self.last_name)
            kept = (f"checkpoint kept in {self.run_dir / self.last_name}"
                    if self.shown_dir == self.run_dir else f"{self.shown_dir} is left as it was")
            raise MlxgptError(f"loss is {loss_v} at step {r.step}; lower --lr ({kept})")
        self.bar.update(r.step, loss_v, ntok_v)
        self.window.append((loss_v, ntok_v, dt))
        if self.due(self.cfg.log_every) or r.step == self.cfg.steps:
            self._log_window(float(gnorm.item()))

    def _log_window(self, grad_norm: float) -> None:
        losses, tokens, seconds = zip(*self.window, strict=True)
        r = self.result
        lr = float(lr_schedule(self.cfg)(mx.array(r.step - 1)).item())
        self.log.write({"step": r.step, "loss": round(sum(losses) / len(losses), 6), "lr": lr,
                        "grad_norm": round(grad_norm, 6), "tokens": r.tokens,
                        "tok_per_s": round(sum(tokens) / max(sum(seconds), 1e-9), 1),
                        "elapsed": round(r.elapsed, 3)})
        self.window = []

    # -- evaluation and checkpoints

    def evaluate(self, val_data: BatchSource, sample: Callable[[nn.Module], str] | None) -> None:
        """Validation loss (the same batches every time), a sample, and the best checkpoint."""
        cfg, r = self.cfg, self.result
        self.model.eval()
        val, _ = self.evaluator(val_data.batch(i) for i in range(cfg.eval_batches))
        text = sample(self.model) if (sample and self.rank0) else None
        self.model.train()
        r.val_losses.append((r.step, val))
        recent = [v for _, v in r.losses[-max(1, cfg.eval_every or cfg.steps):]]
        train_loss = sum(recent) / len(recent) if recent else float("nan")
        improved = r.best_val_loss is None or val < r.best_val_loss
        self.bar.clear()
        self.say(f"step {r.step}: train {train_loss:.4f}  val {val:.4f}"
                 + ("  (best)" if improved else ""))
        if text is not None:
            self.say("  sample: " + text.replace("\n", "\n          "))
        self.log.write({"step": r.step, "val_loss": round(val, 6),
                        "train_loss": round(train_loss, 6), **({"sample": text} if text else {})})
        if improved:
            r.best_val_loss = val
            self.save(self.best_name, with_optimizer=False)

    def save(self, name: str, with_optimizer: bool = True) -> None:
        r = self.result
        out = self.run_dir / name
        if self.rank0:
            meta = {"step": r.step, "best_val_loss": r.best_val_loss, "tokens": r.tokens,
                    "elapsed": round(r.elapsed, 3), "micro_batches": self.micro_index,
                    "world_size": self.group.size(), "config": asdict(self.cfg),
                    "compute": self.compute}
            write_checkpoint(out, self.model, self.save_weights, meta,
                             self.opt if with_optimizer else None)
        r.checkpoint = out

    # -- the end

    def stop_early(self) -> TrainResult:
        self.bar.close()
        self.save(self.last_name)
        self.result.interrupted = True
        self.say(f"stopped at step {self.result.step}; checkpoint in "
                 f"{self.shown_dir / self.last_name} (continue with --resume)")
        return self.result

    def finish(self) -> TrainResult:
        self.bar.close()
        if self.rank0:
            try:
                note = plot_losses(self.run_dir / LOG_FILE, self.run_dir / PLOT_FILE)
            except OSError as e:  # the run is saved; a missing plot is no reason to fail it
                note = f"note: no loss plot ({e.strerror or e})"
            if note:
                self.say(note)
        return self.result
