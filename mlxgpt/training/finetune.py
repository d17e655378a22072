"""``mlxgpt finetune`` and ``mlxgpt fuse`` as library calls: LoRA (or full) fine-tuning.

Fine-tuning runs through the shared loop of :mod:`mlxgpt.training.loop`; this module only
decides what trains (the LoRA matrices, or everything with ``full``), what a checkpoint holds
(an adapter folder, or a model folder) and how the data is batched (:mod:`mlxgpt.data.examples`).

The output folder OUT::

    OUT/adapters.safetensors, OUT/adapter_config.json   the result: best by validation loss
                                                        (the last step without validation)
    OUT/last/      adapter + optimizer state + step     what --resume continues from
    OUT/best/      adapter at the lowest validation loss
    OUT/log.jsonl, OUT/loss.png                         the training log and its plot

With ``full`` the result and checkpoints are model folders instead (OUT is then a model folder
that ``--model OUT`` takes). Classifiers (``--task classify``) are :mod:`.classify`'s, built on
the same pieces (:func:`prepare_model`, :func:`prepare_out`).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..atomicio import MARKER, atomic_file, remove
from ..checkpoints import folder as mlx_folder
from ..checkpoints.adapters.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    apply_lora,
    base_identity,
    count_parameters,
    fuse,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from ..checkpoints.files import check_apart, check_output, check_writable, named, read_marker
from ..checkpoints.load import load
from ..checkpoints.quantize import model_quantization, quantize
from ..core.model import Model
from ..data.examples import Batches, encode_records, find_splits, record_kind
from ..errors import MlxgptError
from ..tokenizers.bpe import TIKTOKEN_FILE
from ..tokenizers.hf_files import HF_CONFIG_FILE, HF_TOKENIZER_FILE, MERGES_FILE, VOCAB_FILE
from .config import TrainConfig, TrainResult
from .distributed import is_rank0, rank0_echo
from .evaluate import greedy_text
from .loop import train
from .loss import lm_loss
from .optim import OPTIMIZER_FILE
from .runlog import LOG_FILE, PLOT_FILE
from .state import STATE_FILE, recover_run, run_folder

# What a finetune run writes into OUT (a full one's tokenizer files too, _TOKENIZER_FILES).
_RUN_ENTRIES = ("last", "best", LOG_FILE, PLOT_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG,
                mlx_folder.CONFIG_FILE, mlx_folder.WEIGHTS_FILE, mlx_folder.HEAD_CONFIG,
                mlx_folder.HEAD_WEIGHTS)
_TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, HF_CONFIG_FILE, HF_TOKENIZER_FILE, TIKTOKEN_FILE)


@dataclass
class FinetuneOptions:
    model: str
    data: str
    out: str
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)  # None: full fine-tuning
    # Training settings as a function of the number of train batches per epoch (so a default
    # of "one pass over the data" can be resolved once the data is read).
    train: Callable[[int], TrainConfig] = lambda n_batches: TrainConfig(steps=n_batches)
    mask_prompt: bool = False
    val_fraction: float | None = None  # None: 0.1 for a single file, no split for a folder
    batch_size: int = 4
    max_seq_len: int | None = None  # None: the model's context length
    dtype: str | None = None
    quantize: int | None = None  # quantize the base to this many bits first (QLoRA)
    group_size: int = 64
    grad_checkpoint: bool = False  # recompute block activations in backward: less memory
    seed: int = 0  # data order and split (the training seed is in the TrainConfig)
    resume: bool = False
    force: bool = False


class _Checkpointed:
    """Mixed into a block's class: the block keeps only its inputs for the backward pass and
    recomputes the rest. Array arguments (a Llama block's rotary cos/sin) pass through the
    checkpoint; a cache, or evaluation, takes the plain call."""

    def __call__(self, x: mx.array, *args: Any) -> mx.array:
        plain = super().__call__  # type: ignore[misc]
        if not self.training or any(not isinstance(a, mx.array) for a in args if a is not None):
            return plain(x, *args)

        def inner(params: Any, x: mx.array, *args: mx.array) -> mx.array:
            self.update(params)
            return plain(x, *args)

        arrays = [a for a in args if a is not None]  # no cache while training
        return mx.checkpoint(inner)(self.trainable_parameters(), x, *arrays)


@functools.cache
def _checkpointed(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})


def grad_checkpoint(model: Model) -> Model:
    """Trade compute for memory: activations inside each block are recomputed when the
    backward pass needs them (about one more forward pass of work). In place; returns model."""
    for block in model.layers:
        # same parameters and names, another __call__
        block.__class__ = _checkpointed(type(block))
        if hasattr(block, "drop"):
            block.drop = None  # see finetune(): recomputation needs deterministic blocks
    return model


def steps_per_epoch(n_batches: int, grad_accum: int = 1) -> int:
    return max(1, n_batches // grad_accum)


def finetune(opts: FinetuneOptions, echo: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune ``opts.model`` on ``opts.data``; see the module docstring for what is written."""
    out = Path(opts.out)
    # Under mlx.launch only rank 0 touches the output folder and prints.
    rank0 = is_rank0()
    echo = rank0_echo(echo)
    # OUT is only checked here: the run's folder is made, or an old run replaced, once the
    # model and the data have been read (run_folder).
    replace = prepare_out(out, resume=opts.resume, force=opts.force, write=rank0, clear=False,
                          inputs={"--model": opts.model, "--data": opts.data})
    model, tokenizer, lora, quant = prepare_model(opts, echo)
    report_trainable(model, quant, echo)

    train_data, val_data, sample = load_data(opts, model, tokenizer, echo, opts.seed)
    cfg = opts.train(len(train_data))
    if val_data is not None:
        cfg.eval_batches = min(cfg.eval_batches, len(val_data))
    if lora is not None:
        def save(m: nn.Module, folder: Path) -> None:
            save_adapter(m, folder, lora)

        restore = restore_adapter
    else:
        def save(m: nn.Module, folder: Path) -> None:
            mlx_folder.write_model_files(m, folder, tokenizer)

        restore = mlx_folder.restore_weights

    with run_folder(out, resume=opts.resume, replace=replace, write=rank0) as run_dir:
        result = train(model, lm_loss, train_data, cfg, run_dir, save_weights=save,
                       load_weights=restore, val_data=val_data, sample=sample,
                       resume=opts.resume, shown_dir=out,
                       fingerprint={"data": str(opts.data), "lora": str(lora)}, echo=echo)
        # A stopped run is a checkpoint to resume, not a result: nothing is published.
        if rank0 and not result.interrupted:
            publish(run_dir, "best" if (run_dir / "best").is_dir() else "last")
    tok_s = result.tokens / result.elapsed if result.elapsed else 0.0
    echo(f"{'stopped' if result.interrupted else 'done'} at step {result.step}: "
         f"{tok_s:,.0f} tokens/s, peak memory {result.peak_memory / 2**30:.2f} GiB")
    if not result.interrupted:
        what = "adapter" if lora is not None else "model"
        best = f" (best val loss {result.best_val_loss:.4f})" if result.best_val_loss else ""
        echo(f"{what} written to {out}{best}")
    return result


def prepare_model(opts: FinetuneOptions, echo: Callable[[str], None], *, frozen: bool = False
                  ) -> tuple[Model, Any, LoRAConfig | None, dict[str, int] | None]:
    """Load the base and make what trains trainable: LoRA layers (``opts.lora``), every weight
    (``opts.lora`` None), or nothing (``frozen``: a caller adds what trains). Returns (model,
    tokenizer, the LoRA config or None, the base's quantization or None)."""
    model, tokenizer = load(opts.model, dtype=opts.dtype)
    if opts.quantize:
        quantize(model, opts.quantize, opts.group_size)
    quant = model_quantization(model)
    lora = None if frozen else opts.lora
    if lora is None and quant and not frozen:
        raise MlxgptError("full fine-tuning needs a float model; use LoRA on a quantized one")

    if lora is not None:
        if opts.resume:  # the adapter's shape comes from the checkpoint being continued
            lora = read_adapter_config(Path(opts.out) / "last")
        lora.base = base_identity(model.config, opts.model, quant)
        apply_lora(model, lora, seed=opts.seed)
    elif frozen:
        model.freeze()
    else:
        model.unfreeze()
    if opts.grad_checkpoint:
        # The recomputed forward pass would draw other dropout masks than the first one.
        if lora is not None and lora.dropout > 0:
            raise MlxgptError("--grad-checkpoint needs --dropout 0 (recomputed activations "
                              "would use other dropout masks)")
        if any(getattr(b, "drop", None) is not None for b in model.layers):
            echo(f"note: --grad-checkpoint turns off the model's residual dropout "
                 f"({model.config.dropout}) for this run")
        grad_checkpoint(model)
    return model, tokenizer, lora, quant


def report_trainable(model: nn.Module, quant: dict[str, int] | None,
                     echo: Callable[[str], None]) -> None:
    trainable, total = count_parameters(model)
    echo(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
         + (f", base quantized to {quant['bits']} bits" if quant else ""))


def restore_adapter(model: nn.Module, folder: Path) -> None:
    """Load a checkpoint's adapter weights into a model that has its LoRA layers (resume)."""
    weights = mlx_folder.read_weights(Path(folder) / ADAPTER_WEIGHTS, model.weight_prefix)
    model.load_weights(list(weights.items()), strict=False)


def prepare_out(out: Path, *, resume: bool, force: bool, write: bool = True,
                clear: bool = True, inputs: dict[str, Any] | None = None) -> bool:
    """Check OUT before anything is read: it is apart from the ``inputs`` (label -> path), and
    a new run does not mix into an old one. Returns True when ``force`` starts over in OUT
    holding a run, which must be mlxgpt's and hold nothing else: :func:`run_folder` then
    replaces it once the new run has a checkpoint. ``clear`` (for callers that train straight
    into OUT instead) removes the old run's entries now.

    ``write=False`` (ranks other than 0) only checks, and never clears or creates anything.
    """
    check_apart(out, inputs or {})
    if out.exists() and not out.is_dir():
        raise MlxgptError(f"{out} exists and is not a folder")
    if write:
        recover_run(out)  # a checkpoint caught mid-replacement by a kill is put back first
    if resume:
        if not (out / "last").is_dir():
            raise MlxgptError(f"cannot resume: no checkpoint at {out / 'last'}")
        return False
    leftovers = [e for e in _RUN_ENTRIES if (out / e).exists()]
    if not leftovers:
        others = sorted(e.name for e in out.iterdir()) if out.is_dir() else []
        if others:  # a user's folder: a run mixed into it could not be replaced or told apart
            raise MlxgptError(f"{out} holds {named(others)} and no fine-tuning run; choose an "
                              "empty or new --out")
        if write:
            check_writable(out)
        return False
    if not (read_marker(out) or {}).get("run") and not any(
            (out / d / STATE_FILE).is_file() for d in ("last", "best")):
        raise MlxgptError(f"{out} holds {named(leftovers)} but no fine-tuning run; choose "
                          f"another --out")
    if not force:
        raise MlxgptError(f"{out} already holds a fine-tuning run "
                          "(use --resume to continue it or --force to start over)")
    # Starting over replaces the whole folder: nothing but the run's own files may be there.
    known = {*_RUN_ENTRIES, *_TOKENIZER_FILES, MARKER, *(
        f.name for d in ("last", "best") if (out / d).is_dir() for f in (out / d).iterdir())}
    foreign = sorted(e.name for e in out.iterdir() if e.name not in known)
    if foreign:
        raise MlxgptError(f"{out} holds {named(foreign)} besides its fine-tuning run; --force "
                          f"replaces the whole folder: move {'them' if len(foreign) > 1 else 'it'}"
                          f" away or choose another --out")
    if write:
        check_writable(out)
        if clear:
            for e in leftovers:
                remove(out / e)
    return True


def publish(out: Path, name: str) -> None:
    """Copy checkpoint ``name``'s adapter (or model) files to OUT's top level, atomically."""
    src = out / name
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in (OPTIMIZER_FILE, STATE_FILE, MARKER):
            with atomic_file(out / f.name) as tmp:
                shutil.copyfile(f, tmp)


def load_data(
    opts: FinetuneOptions, model: nn.Module, tokenizer: Any, echo: Callable[[str], None],
    seed: int = 0,
) -> tuple[Batches, Batches | None, Callable[[nn.Module], str] | None]:
    """Train and validation batches, and a sample function showing one validation answer."""
    path = Path(opts.data)
    val_fraction = opts.val_fraction
    if val_fraction is None:
        val_fraction = 0.0 if path.is_dir() else 0.1
    splits = find_splits(path, val_fraction, seed=seed)
    max_len = min(opts.max_seq_len or model.config.n_positions, model.config.n_positions)
    pad = tokenizer.eot_id or 0
    data: dict[str, Batches] = {}
    for name in ("train", "valid"):
        if name not in splits:
            continue
        examples, stats = encode_records(splits[name], tokenizer, mask_prompt=opts.mask_prompt,
                                         max_len=max_len)
        if not examples:
            raise MlxgptError(f"{opts.data}: no {name} example has a token to learn from")
        note = "".join(f", {v} {k}" for k, v in stats.items() if v)
        echo(f"{name}: {len(examples)} examples, "
             f"{sum(e.n_targets for e in examples):,} target tokens{note}")
        data[name] = Batches(examples, opts.batch_size, seed=seed, pad_id=pad,
                             max_width=model.config.n_positions)
    sample = None
    valid = splits.get("valid")
    if valid and record_kind(valid[0][1]) == "completion":
        first = valid[0][1]
        n = len(tokenizer.encode(first["completion"])) + 8
        prompt_ids = tokenizer.encode_prompt(first["prompt"])[-(model.config.n_positions - n - 1):]

        def sample(m: nn.Module) -> str:
            got = greedy_text(m, tokenizer, prompt_ids, n)
            return f"...{first['prompt'][-40:]!r} -> {got!r} (label {first['completion']!r})"

    return data["train"], data.get("valid"), sample


def fuse_adapter(model_path: str, adapter: str, out: str, *, requantize: bool = False,
                 force: bool = False, dtype: str | None = None) -> Path:
    """Fold an adapter into its base and write a plain model folder."""
    check_output(out, force=force, inputs={"--model": model_path, "--adapter": adapter})
    model, tokenizer = load(model_path, dtype=dtype)
    quant = model_quantization(model)
    if requantize and not quant:
        raise MlxgptError("--requantize needs a quantized base model (this one is float)")
    load_adapter(model, adapter)
    fuse(model, requantize=requantize)
    mx.eval(model.parameters())
    extra = {"fused_from": {"model": str(model_path), "adapter": str(adapter)}}
    return mlx_folder.save_model(model, out, tokenizer, force=force,
                                 quantization=quant if requantize else None, extra=extra)
