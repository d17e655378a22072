"""Text classifiers with a head (``mlxgpt finetune --task classify``, ``mlxgpt eval --task
classify`` on a classifier, ``mlxgpt classify``) as library calls.

The model is :class:`~mlxgpt.core.classifier.GPTClassifier`: a linear layer on the final hidden
state of each text's last token, on a model of any family (GPT-2, Llama). Rows are padded with
end-of-text (a chat model's end-of-turn) and each row's length says where its text ends.
Training follows Radford et al. (2018), "Improving Language Understanding by Generative
Pre-Training": the loss is the classification cross-entropy (mean over examples) plus
``lm_weight`` (0.5 there and by default) times the language-model loss on the texts (mean over
their tokens, end-of-text included), from the same forward pass. What trains: LoRA (or DoRA)
adapters + the head (default), every weight + the head (``lora=None``), or the head alone
(``head_only``: the model is frozen, so the LM term, which could only train the model, is left
out). Each micro-batch's loss is weighted by its examples when batches are combined.

Data: ``{"text": ..., "label": ...}`` lines (labels are strings; the label set is the training
split's, sorted). Texts are cut to the model's context, keeping their beginning. Validation
batches carry no LM targets, so the validation loss, which picks the best checkpoint, is the
classification cross-entropy alone; each evaluation also shows the validation accuracy.

The output folder OUT::

    OUT/config.json, model.safetensors, tokenizer files   a classifier folder: the GPT (LoRA
    OUT/classifier.safetensors, classifier.json           fused in) and the head, from the best
                                                          checkpoint (the last without validation)
    OUT/last/    what trains (adapter + head, head, or everything) + optimizer + step: --resume
    OUT/best/    what trains, at the lowest validation loss
    OUT/log.jsonl, OUT/loss.png
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..atomicio import make_temp_dir, remove, write_error
from ..checkpoints import folder as mlx_folder
from ..checkpoints.adapters.lora import fuse, save_adapter
from ..checkpoints.files import mlx_write_failure
from ..checkpoints.quantize import float_dtype, model_quantization
from ..core.classifier import GPTClassifier
from ..data.examples import (
    LabelledBatches,
    check_labelled_record,
    encode_labelled,
    find_splits,
    read_jsonl,
)
from ..errors import MlxgptError
from ..generation.classify import example_probabilities
from .config import TrainResult
from .distributed import is_rank0, rank0_echo
from .evaluate import confusion_lines, macro_f1
from .finetune import FinetuneOptions, prepare_model, prepare_out, report_trainable, restore_adapter
from .loop import train
from .loss import hidden_lm_loss
from .state import run_folder
from .step import LossFn

Records = Sequence[tuple[str, dict[str, Any]]]


@dataclass
class ClassifyOptions(FinetuneOptions):
    """:class:`FinetuneOptions` (``mask_prompt`` aside) plus the classifier's own."""

    lm_weight: float = 0.5  # weight of the auxiliary language-model loss
    head_only: bool = False  # train the head alone (``lora`` is then ignored)


# --------------------------------------------------------------------------- the loss


def classify_loss(lm_weight: float = 0.5) -> LossFn:
    """``loss(clf, inputs, [targets, mask,] lengths, labels) -> (loss, examples)``: mean
    cross-entropy of the labels, plus ``lm_weight`` times the LM loss when the batch carries
    LM targets (see the module docstring)."""

    def loss(clf: GPTClassifier, inputs: mx.array, *rest: mx.array) -> tuple[mx.array, mx.array]:
        *lm, lengths, labels = rest  # lm: (targets, mask), or nothing (validation)
        h = clf.transformer.hidden(inputs)  # (B, T, C), read by both losses
        logits = clf.pooled_logits(h, lengths).astype(mx.float32)  # (B, L)
        value = nn.losses.cross_entropy(logits, labels).mean()
        if lm and lm_weight:
            value = value + lm_weight * hidden_lm_loss(clf.transformer, h, *lm)[0]
        return value, mx.array(labels.shape[0], mx.float32)

    return loss


# --------------------------------------------------------------------------- training


def finetune_classifier(opts: ClassifyOptions,
                        echo: Callable[[str], None] = print) -> TrainResult:
    """Train a classifier on ``opts.data``; see the module docstring for what is written."""
    if not (math.isfinite(opts.lm_weight) and opts.lm_weight >= 0):
        raise MlxgptError(f"--lm-weight must be 0 or more, got {opts.lm_weight}")
    out = Path(opts.out)
    rank0 = is_rank0()
    echo = rank0_echo(echo)
    splits = read_splits(opts)  # bad data stops the run before the model is read
    labels = label_set(splits, opts.data)
    # OUT is only checked here: a run over an old one (--force) trains in a folder of its own
    # that replaces the old run once it ends (run_folder), as finetune's does.
    replace = prepare_out(out, resume=opts.resume, force=opts.force, write=rank0, clear=False,
                          inputs={"--model": opts.model, "--data": opts.data})
    if opts.resume and (had := mlx_folder.read_labels(out / "last")) != labels:
        raise MlxgptError(f"cannot resume: {out / 'last'} has the labels {', '.join(had)}, "
                          f"the data {', '.join(labels)}")
    model, tokenizer, lora, quant = prepare_model(opts, echo, frozen=opts.head_only)
    clf = GPTClassifier(model, labels, key=mx.random.key(opts.seed))
    clf.score.weight = clf.score.weight.astype(float_dtype(model))
    report_trainable(clf, quant, echo)
    lm_weight = opts.lm_weight
    if opts.head_only and lm_weight:
        echo("note: --head-only freezes the GPT, so the LM loss (it trains only the GPT) is "
             "left out")
        lm_weight = 0.0
    echo("loss: label cross-entropy" + (f" + {lm_weight:g} x LM loss" if lm_weight else "")
         + "; validation loss: label cross-entropy alone")

    train_data, val_data = labelled_batches(opts, splits, labels, model, tokenizer, echo)
    cfg = opts.train(len(train_data))
    sample = None
    if val_data is not None:
        cfg.eval_batches = min(cfg.eval_batches, len(val_data))

        def sample(m: nn.Module) -> str:
            right, total = accuracy(m, (val_data.batch(i) for i in range(cfg.eval_batches)))
            return f"val accuracy {right / total:.4f} ({total} examples)"

    save, restore = checkpoint_functions(opts, lora, tokenizer)
    mode = ("head-only" if opts.head_only else "full" if lora is None
            else "dora" if lora.dora else "lora")
    with run_folder(out, resume=opts.resume, replace=replace, write=rank0) as run_dir:
        result = train(clf, classify_loss(lm_weight), train_data, cfg, run_dir,
                       save_weights=save, load_weights=restore, val_data=val_data,
                       sample=sample, resume=opts.resume, shown_dir=out,
                       fingerprint={"data": str(opts.data), "lora": str(lora), "mode": mode,
                                    "labels": labels, "lm_weight": lm_weight},
                       echo=echo, unit="ex")
        # A stopped run is a checkpoint to resume, not a result: nothing is published.
        if rank0 and not result.interrupted:
            publish_classifier(clf, run_dir, restore, fuse_lora=lora is not None,
                               tokenizer=tokenizer,
                               extra={"finetuned_from": str(opts.model), "training": mode})
    ex_s = result.tokens / result.elapsed if result.elapsed else 0.0  # counts are examples
    echo(f"{'stopped' if result.interrupted else 'done'} at step {result.step}: "
         f"{ex_s:,.1f} examples/s, peak memory {result.peak_memory / 2**30:.2f} GiB")
    if not result.interrupted:
        best = f" (best val loss {result.best_val_loss:.4f})" if result.best_val_loss else ""
        echo(f"classifier written to {out}{best}")
    return result


def read_splits(opts: ClassifyOptions) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Train (and valid) ``{"text", "label"}`` records of ``opts.data``, every line checked."""
    path = Path(opts.data)
    val_fraction = opts.val_fraction
    if val_fraction is None:
        val_fraction = 0.0 if path.is_dir() else 0.1
    return find_splits(path, val_fraction, seed=opts.seed, check=check_labelled_record)


def label_set(splits: dict[str, list], data: str | os.PathLike) -> tuple[str, ...]:
    """The labels of the training records, sorted (at least two); the validation records'
    labels must be among them."""
    labels = tuple(sorted({rec["label"] for _, rec in splits["train"]}))
    source = Path(data) / "train.jsonl" if Path(data).is_dir() else Path(data)
    if len(labels) < 2:
        raise MlxgptError(f"{source}: every example has the label {labels[0]!r}; a classifier "
                          "needs at least two labels")
    for where, rec in splits.get("valid", []):
        if rec["label"] not in labels:
            raise MlxgptError(f"{where}: label {rec['label']!r} is not in {source.name} "
                              f"(its labels: {', '.join(map(repr, labels))})")
    return labels


def labelled_batches(
    opts: ClassifyOptions, splits: dict[str, list], labels: Sequence[str], model: nn.Module,
    tokenizer: Any, echo: Callable[[str], None],
) -> tuple[LabelledBatches, LabelledBatches | None]:
    """Train batches (with LM targets) and validation batches (without)."""
    n_pos = model.config.n_positions
    max_len = min(opts.max_seq_len or n_pos, n_pos)
    data: dict[str, LabelledBatches] = {}
    for name in ("train", "valid"):
        if name not in splits:
            continue
        examples, cut = encode_labelled(splits[name], tokenizer, labels, max_len=max_len)
        counts = Counter(e.label for e in examples)
        note = f", {cut} cut to {max_len} tokens" if cut else ""
        echo(f"{name}: {len(examples)} examples ("
             + ", ".join(f"{label} {counts[i]}" for i, label in enumerate(labels)) + f"){note}")
        data[name] = LabelledBatches(examples, opts.batch_size, lm=name == "train",
                                     seed=opts.seed, pad_id=tokenizer.eot_id or 0,
                                     max_width=n_pos)
    return data["train"], data.get("valid")


def checkpoint_functions(opts: ClassifyOptions, lora: Any, tokenizer: Any) -> tuple[
        Callable[[GPTClassifier, Path], None], Callable[[GPTClassifier, Path], None]]:
    """(save, restore) of what trains: adapter + head, the head, or the whole classifier."""
    if opts.head_only:
        return mlx_folder.write_head, mlx_folder.restore_head
    if lora is not None:
        def save(clf: GPTClassifier, folder: Path) -> None:
            save_adapter(clf.transformer, folder, lora)
            mlx_folder.write_head(clf, folder)

        def restore(clf: GPTClassifier, folder: Path) -> None:
            restore_adapter(clf.transformer, folder)
            mlx_folder.restore_head(clf, folder)

        return save, restore

    def save_all(clf: GPTClassifier, folder: Path) -> None:
        mlx_folder.write_classifier_files(clf, folder, tokenizer)

    def restore_all(clf: GPTClassifier, folder: Path) -> None:
        mlx_folder.restore_weights(clf.transformer, folder)
        mlx_folder.restore_head(clf, folder)

    return save_all, restore_all


def publish_classifier(clf: GPTClassifier, out: Path,
                       restore: Callable[[GPTClassifier, Path], None], *, fuse_lora: bool,
                       tokenizer: Any, extra: dict[str, Any]) -> None:
    """Write the best (or last) checkpoint as a classifier folder at OUT's top level, LoRA
    fused in; each file is replaced whole."""
    restore(clf, out / ("best" if (out / "best").is_dir() else "last"))
    if fuse_lora:
        fuse(clf.transformer)
    try:
        # .publish.tmp-PID-*: what a killed run leaves is removed by the next (recover_run)
        tmp = make_temp_dir(out / "publish")
        try:
            mlx_folder.write_classifier_files(clf, tmp, tokenizer, extra=extra,
                                              quantization=model_quantization(clf.transformer))
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        finally:
            remove(tmp)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) or mlx_write_failure(e):  # a full disk: one line
            raise write_error(e, out) from None
        raise


# --------------------------------------------------------------------------- accuracy


def accuracy(clf: GPTClassifier, batches: Any) -> tuple[int, int]:
    """(right, total) over ``(inputs, lengths, labels)`` batches."""
    right = total = 0
    for inputs, lengths, labels in batches:
        right += int((mx.argmax(clf(inputs, lengths), axis=-1) == labels).sum().item())
        total += labels.shape[0]
    return right, total


# --------------------------------------------------------------------------- evaluation


@dataclass
class HeadEvaluation:
    """Gold and predicted label ids of a classifier on labelled data."""

    labels: tuple[str, ...]
    gold: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(g == p for g, p in zip(self.gold, self.predicted, strict=True)) / max(
            len(self.gold), 1)

    @property
    def macro_f1(self) -> float:
        return macro_f1(self.gold, self.predicted)

    def majority(self) -> tuple[str, float]:
        """The commonest gold label and its share: what always answering it scores."""
        label, n = Counter(self.gold).most_common(1)[0]
        return self.labels[label], n / len(self.gold)

    def report(self) -> str:
        label, share = self.majority()
        table: dict[str, Counter] = {name: Counter() for name in self.labels}
        for g, p in zip(self.gold, self.predicted, strict=True):
            table[self.labels[g]][self.labels[p]] += 1
        return "\n".join([
            f"examples: {len(self.gold)}",
            f"accuracy: {self.accuracy:.4f}",
            f"macro-F1: {self.macro_f1:.4f}",
            f"majority baseline: {share:.4f} (always {label!r})",
            "",
            "confusion (rows: label, columns: predicted):",
            *confusion_lines(self.labels, self.labels, table),
        ])


def read_labelled(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``{"text", "label"}`` records of a ``.jsonl`` file, every line checked."""
    if Path(path).suffix != ".jsonl":
        raise MlxgptError(f'{path}: a classifier is evaluated on a .jsonl file of '
                          '{"text", "label"} lines')
    return read_jsonl(path, check_labelled_record)


def evaluate_classifier(clf: GPTClassifier, tokenizer: Any, records: Records, *,
                        batch_size: int = 16) -> HeadEvaluation:
    """Predict every record's label; a label the head does not know is refused."""
    if not records:
        raise MlxgptError("no examples to evaluate")
    examples, _ = encode_labelled(records, tokenizer, clf.labels, max_len=clf.config.n_positions)
    probs = example_probabilities(clf, tokenizer, examples, batch_size)
    return HeadEvaluation(clf.labels, [e.label for e in examples], probs.argmax(-1).tolist())
