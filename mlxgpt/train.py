"""One training loop for pretraining and fine-tuning (and data-parallel runs of both).

    from mlxgpt.train import TrainConfig, train

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
``progress`` (the bar), ``should_stop(step) -> bool`` (stop like Ctrl-C after that step).

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
ONE ``mx.distributed.all_sum`` per step (:func:`all_sum_tree`); only rank 0 writes files or prints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import ops
from .checkpoint import atomic_dir, atomic_write_text
from .errors import MlxgptError

Batch = tuple[mx.array, ...]
LossFn = Callable[..., tuple[mx.array, mx.array]]  # (model, *batch) -> (mean loss, n tokens)
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


class BatchSource(Protocol):
    def batch(self, index: int) -> Batch:
        """Micro-batch number ``index``: the same arrays every time it is asked for."""


@dataclass
class TrainConfig:
    """Optimisation settings. ``steps`` counts optimizer updates (each ``grad_accum`` batches)."""

    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here at the last step
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay, on weights with 2+ dimensions only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1
    eval_every: int = 250  # 0: evaluate at the end only
    eval_batches: int = 20
    save_every: int = 0  # 0: save "last" at every evaluation
    log_every: int = 10
    seed: int = 1337
    compile: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise MlxgptError(f"{name.replace('_', '-')} must be at least 1")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise MlxgptError(f"{name.replace('_', '-')} must not be negative")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise MlxgptError(f"need 0 <= min-lr <= lr and lr > 0 (lr={self.lr}, "
                              f"min-lr={self.min_lr})")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise MlxgptError("weight-decay and grad-clip must not be negative")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    step: int  # optimizer steps done (including those before a resume)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) this run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float | None = None
    tokens: int = 0  # tokens trained on, all ranks, including before a resume
    elapsed: float = 0.0  # seconds of training, including before a resume
    interrupted: bool = False
    checkpoint: Path | None = None  # the last checkpoint written


# --------------------------------------------------------------------------- schedule, optimizer


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``.

    Written with array ops so it runs inside the compiled step (``step`` is the optimizer's
    update count before this update, as MLX optimizers pass it).
    """
    lr, min_lr, warmup = cfg.lr, cfg.min_lr, cfg.warmup
    decay = max(1, cfg.steps - warmup)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = lr * (s + 1) / (warmup + 1)
        ratio = mx.clip((s - warmup) / decay, 0.0, 1.0)
        cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + mx.cos(math.pi * ratio))
        return mx.where(s < warmup, warm, cos)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW (bias-corrected, like PyTorch's); no weight decay on biases, norms and other 1-D."""
    sched = lr_schedule(cfg)
    betas = [cfg.beta1, cfg.beta2]
    no_decay = optim.AdamW(sched, betas=betas, weight_decay=0.0, bias_correction=True)
    decay = optim.AdamW(sched, betas=betas, weight_decay=cfg.weight_decay, bias_correction=True)
    return optim.MultiOptimizer([no_decay, decay], filters=[lambda path, p: p.ndim < 2])


# --------------------------------------------------------------------------- distributed


def world() -> mx.distributed.Group:
    """The process group: size 1 unless launched by ``mlx.launch`` (or MPI)."""
    return mx.distributed.init()


def all_sum_tree(tree: Any, group: mx.distributed.Group) -> Any:
    """Sum a tree of arrays over all ranks with ONE fused all_sum (not one per tensor).

    This is the single place where ranks exchange gradients.
    """
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    vec = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
    vec = mx.distributed.all_sum(vec, group=group)
    out, start = [], 0
    for k, v in flat:
        out.append((k, vec[start : start + v.size].reshape(v.shape).astype(v.dtype)))
        start += v.size
    return tree_unflatten(out)


def shard(batch: Batch, group: mx.distributed.Group) -> Batch:
    """This rank's rows of a global batch (every rank draws the same global batch)."""
    n = group.size()
    if n == 1:
        return batch
    rows = batch[0].shape[0]
    if rows % n:
        raise MlxgptError(f"the batch of {rows} rows does not divide across {n} processes; "
                          f"use a batch size that is a multiple of {n}")
    r, per = group.rank(), rows // n
    return tuple(a[r * per : (r + 1) * per] for a in batch)


def check_ranks_agree(fingerprint: dict[str, Any], group: mx.distributed.Group) -> None:
    """Refuse to start when ranks disagree on model, data or settings (compared by hash)."""
    if group.size() == 1:
        return
    import hashlib

    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).digest()
    mine = mx.array(np.frombuffer(digest, dtype=np.uint8).astype(np.int32))
    every = np.array(mx.distributed.all_gather(mine[None], group=group))  # (ranks, 32)
    if not (every == every[0]).all():
        bad = [i for i in range(len(every)) if not (every[i] == every[0]).all()]
        raise MlxgptError(f"processes disagree on the model, data or settings "
                          f"(rank 0 vs rank {bad[0]}); every rank must get the same inputs")


# --------------------------------------------------------------------------- the compiled step


class _Stepper:
    """Builds the compiled training and evaluation functions for one model and optimizer.

    Fast path (grad_accum 1, one process): loss, gradients, clipping and the AdamW update in
    one compiled function. Otherwise: a compiled micro-step that accumulates ``n * grad`` and a
    compiled update that all-sums across ranks and divides by the token count.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, opt: optim.Optimizer,
                 cfg: TrainConfig, group: mx.distributed.Group):
        self.model, self.opt, self.cfg, self.group = model, opt, cfg, group
        # Keep freed buffers for the next step. MLX's CPU allocator caches only 32 MB by
        # default, so a step's big activations went back to the OS and every step paid for
        # fresh zeroed pages (a third of the step time at 6/6/384, block 256). On Metal the
        # cache limit already equals the memory limit; this changes nothing there.
        mx.set_cache_limit(max(mx.get_memory_limit(), 1 << 30))
        self.state = [model.state, opt.state, mx.random.state]
        value_grad = nn.value_and_grad(model, loss_fn)
        clip = cfg.grad_clip

        def update(grads: Any) -> mx.array:
            if clip > 0:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = mx.sqrt(sum(mx.sum(g * g) for _, g in tree_flatten(grads)))
            opt.update(model, grads)
            return norm

        def fused(*batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            (loss, n), grads = value_grad(model, *batch)
            return loss, n.astype(mx.float32), update(grads)

        def micro(acc: dict[str, Any], *batch: mx.array) -> dict[str, Any]:
            (loss, n), grads = value_grad(model, *batch)
            n = n.astype(mx.float32)
            return {
                "loss": acc["loss"] + loss * n,
                "n": acc["n"] + n,
                "grads": tree_map(lambda a, g: a + g * n, acc["grads"], grads),
            }

        def apply(acc: dict[str, Any]) -> tuple[mx.array, mx.array, mx.array]:
            acc = all_sum_tree(acc, group)
            n = mx.maximum(acc["n"], 1.0)
            grads = tree_map(lambda g: g / n, acc["grads"])
            return acc["loss"] / n, acc["n"], update(grads)

        def evaluate(*batch: mx.array) -> tuple[mx.array, mx.array]:
            loss, n = loss_fn(model, *batch)
            n = n.astype(mx.float32)
            return loss * n, n

        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if cfg.compile else None
        self.fast = cfg.grad_accum == 1 and group.size() == 1
        self._fused = wrap(fused) if wrap else fused
        self._micro = wrap(micro) if wrap else micro
        self._apply = wrap(apply) if wrap else apply
        self._eval = mx.compile(evaluate, inputs=model.state) if cfg.compile else evaluate

    def step(self, batches: Sequence[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        """One optimizer update over this rank's shards of ``grad_accum`` micro-batches.

        Returns (mean loss, tokens, gradient norm before clipping), all ranks together.
        """
        if self.fast:
            return self._fused(*batches[0])
        zeros = tree_map(mx.zeros_like, self.model.trainable_parameters())
        acc = {"loss": mx.array(0.0), "n": mx.array(0.0), "grads": zeros}
        for b in batches:
            acc = self._micro(acc, *b)
        return self._apply(acc)

    def eval_loss(self, data: BatchSource, n_batches: int) -> float:
        """Token-weighted mean loss over ``data.batch(0..n_batches-1)``, all ranks together."""
        total = mx.zeros((2,))
        for i in range(n_batches):
            loss_sum, n = self._eval(*shard(data.batch(i), self.group))
            total = total + mx.stack([loss_sum, n])
            mx.eval(total)
        total = all_sum_tree(total, self.group)
        loss_sum, n = total.tolist()
        return loss_sum / max(n, 1.0)


def lm_loss(model: nn.Module, inputs: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Next-token cross-entropy, mean over all B*T positions, and the count B*T."""
    logits = model(inputs)  # (B, T, V)
    if ops.use_fast_math():  # CPU: log-sum-exp without libm's exp (see mlxgpt/ops.py)
        loss = ops.cross_entropy(logits, targets).mean()
    else:
        loss = nn.losses.cross_entropy(logits, targets, reduction="mean")
    return loss, mx.array(targets.size, dtype=mx.float32)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The dropout RNG seed of optimizer step ``step`` on ``rank``: a pure function, so resume
    is exact; ranks differ so their rows do not share dropout masks."""
    key = [seed, step] if rank == 0 else [seed, step, rank]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


# --------------------------------------------------------------------------- checkpoints


def save_optimizer(opt: optim.Optimizer, path: Path) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(opt.state)))


def load_optimizer(opt: optim.Optimizer, path: Path) -> None:
    """Restore optimizer state saved by :func:`save_optimizer` into ``opt`` (initialised)."""
    try:
        saved = mx.load(str(path))
    except Exception as e:
        raise MlxgptError(f"{path}: cannot read optimizer state ({e})") from None
    current = dict(tree_flatten(opt.state))
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
        raise MlxgptError(f"{path}: optimizer state does not match the model being trained")
    opt.state = tree_unflatten(list(saved.items()))


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The resume information of a checkpoint folder, or a one-line error saying what is wrong."""
    path = folder / STATE_FILE
    if not folder.is_dir():
        raise MlxgptError(f"cannot resume: no checkpoint at {folder}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlxgptError(f"cannot resume: {path} not found (not a training checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxgptError(f"cannot resume: {path} is corrupt ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise MlxgptError(f"cannot resume: {path} is corrupt (no step)")
    if not (folder / OPTIMIZER_FILE).is_file():
        raise MlxgptError(f"cannot resume: {folder / OPTIMIZER_FILE} not found")
    return state


# --------------------------------------------------------------------------- progress, log, plot


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


class Progress:
    """A one-line progress bar on stderr: step, loss, tokens/s, ETA (plain lines when not a tty)."""

    def __init__(self, total: int, start: int, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
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
        tok_s = self.tokens / dt if dt > 0 else 0.0
        eta = dt / done * (self.total - step) if done else 0.0
        width = 24
        fill = int(width * step / self.total)
        line = (f"step {step}/{self.total} [{'#' * fill}{'.' * (width - fill)}] loss {loss:.4f} "
                f"| {tok_s / 1000:.1f}k tok/s | ETA {_fmt_time(eta) if done else '?'}")
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


class JsonlLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _record_step(line) is not None and _record_step(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(log_path: Path, out_path: Path, title: str = "") -> str | None:
    """Write the loss curve PNG (train + val vs step). Returns a note when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install 'mlxgpt[plot]')"
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return "no losses logged: no loss plot"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], lw=1, alpha=0.8, label="train")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return None


class _StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop after this step; a second one aborts."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
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


# --------------------------------------------------------------------------- the loop


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
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps; see the module docstring."""
    run_dir = Path(run_dir)
    group = world()
    rank0 = group.rank() == 0
    check_ranks_agree({"cfg": asdict(cfg), "fingerprint": fingerprint or {},
                       "params": [(k, v.shape) for k, v in tree_flatten(model.parameters())]},
                      group)
    say = (echo or (lambda s: print(s, file=sys.stderr))) if rank0 else (lambda s: None)

    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    start, best, tokens, elapsed = 0, None, 0, 0.0
    last_dir = run_dir / last_name
    if resume:
        state = read_trainer_state(last_dir)
        load_weights(model, last_dir)
        load_optimizer(opt, last_dir / OPTIMIZER_FILE)
        start, best = state["step"], state.get("best_val_loss")
        tokens, elapsed = state.get("tokens", 0), state.get("elapsed", 0.0)
        if start >= cfg.steps:
            raise MlxgptError(f"{last_dir} is already at step {start}; "
                              f"ask for more --steps to continue")
        say(f"resuming from {last_dir} at step {start}")
    micro_index = start * cfg.grad_accum
    shard(train_data.batch(micro_index), group)  # a batch that does not divide fails here
    mx.eval(model.parameters(), opt.state)
    stepper = _Stepper(model, loss_fn, opt, cfg, group)
    result = TrainResult(step=start, best_val_loss=best, tokens=tokens, elapsed=elapsed)

    if rank0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MlxgptError(f"cannot write to {run_dir}: {e.strerror or e}") from None
    log = JsonlLog(run_dir / LOG_FILE, rank0, start if resume else None)

    def checkpoint(name: str, with_optimizer: bool) -> Path:
        out = run_dir / name
        if rank0:
            meta = {"step": result.step, "best_val_loss": result.best_val_loss,
                    "tokens": result.tokens, "elapsed": round(result.elapsed, 3),
                    "micro_batches": micro_index, "world_size": group.size(),
                    "config": asdict(cfg)}
            with atomic_dir(out, force=True) as tmp:
                save_weights(model, tmp)
                if with_optimizer:
                    save_optimizer(opt, tmp / OPTIMIZER_FILE)
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        result.checkpoint = out
        return out

    def run_eval() -> None:
        model.eval()
        val = stepper.eval_loss(val_data, cfg.eval_batches)
        text = sample(model) if (sample and rank0) else None
        model.train()
        result.val_losses.append((result.step, val))
        recent = [v for s, v in result.losses[-max(1, cfg.eval_every or cfg.steps):]]
        train_loss = sum(recent) / len(recent) if recent else float("nan")
        improved = result.best_val_loss is None or val < result.best_val_loss
        bar.clear()
        say(f"step {result.step}: train {train_loss:.4f}  val {val:.4f}"
            + ("  (best)" if improved else ""))
        if text is not None:
            say("  sample: " + text.replace("\n", "\n          "))
        log.write({"step": result.step, "val_loss": round(val, 6),
                   "train_loss": round(train_loss, 6), **({"sample": text} if text else {})})
        if improved:
            result.best_val_loss = val
            checkpoint(best_name, with_optimizer=False)

    model.train()
    bar = Progress(cfg.steps, start, enabled=rank0 and progress)
    window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
    with _StopFlag() as stop:
        while result.step < cfg.steps:
            t0 = time.perf_counter()
            batches = [shard(train_data.batch(micro_index + k), group)
                       for k in range(cfg.grad_accum)]
            mx.random.seed(step_seed(cfg.seed, result.step, group.rank()))
            loss, ntok, gnorm = stepper.step(batches)
            mx.eval(loss, ntok, gnorm, stepper.state)
            loss_v, ntok_v = loss.item(), int(ntok.item())
            micro_index += cfg.grad_accum
            result.step += 1
            result.tokens += ntok_v
            dt = time.perf_counter() - t0
            result.elapsed += dt
            result.losses.append((result.step, loss_v))
            if not math.isfinite(loss_v):
                bar.close()
                checkpoint(last_name, with_optimizer=True)
                raise MlxgptError(f"loss is {loss_v} at step {result.step}; lower --lr "
                                  f"(checkpoint kept in {run_dir / last_name})")
            bar.update(result.step, loss_v, ntok_v)
            window_loss, window_n = window_loss + loss_v, window_n + 1
            window_tokens, window_time = window_tokens + ntok_v, window_time + dt
            if result.step % cfg.log_every == 0 or result.step == cfg.steps:
                lr = float(lr_schedule(cfg)(mx.array(result.step - 1)).item())
                log.write({"step": result.step, "loss": round(window_loss / window_n, 6),
                           "lr": lr, "grad_norm": round(float(gnorm.item()), 6),
                           "tokens": result.tokens,
                           "tok_per_s": round(window_tokens / max(window_time, 1e-9), 1),
                           "elapsed": round(result.elapsed, 3)})
                window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
            last = result.step == cfg.steps
            if val_data is not None and (last or (cfg.eval_every and
                                                  result.step % cfg.eval_every == 0)):
                run_eval()
            save_every = cfg.save_every or cfg.eval_every
            if last or (save_every and result.step % save_every == 0):
                checkpoint(last_name, with_optimizer=True)
            if (stop.set or (should_stop and should_stop(result.step))) and not last:
                bar.close()
                checkpoint(last_name, with_optimizer=True)
                result.interrupted = True
                say(f"stopped at step {result.step}; checkpoint in {run_dir / last_name} "
                    f"(continue with --resume)")
                return result
    bar.close()
    if rank0:
        note = plot_losses(run_dir / LOG_FILE, run_dir / PLOT_FILE)
        if note:
            say(note)
    return result
