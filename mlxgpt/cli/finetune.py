"""``mlxgpt finetune``, ``mlxgpt fuse`` and ``mlxgpt eval``: LoRA fine-tuning and evaluation."""

import sys

import click

from mlxgpt.cli.options import at_least_0, dtype_option, int_range, positive, seed_range
from mlxgpt.errors import MlxgptError


@click.command()
@click.option("--model", required=True, help="Base model: a model folder, HF folder or hub id.")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Folder with train.jsonl [valid.jsonl test.jsonl], or one .jsonl file.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Adapter folder to write (a model folder with --full, a classifier folder "
                   "with --task classify; checkpoints, log and plot go there too).")
@click.option("--task", type=click.Choice(["lm", "classify"]), default="lm", show_default=True,
              help='lm: learn to write the data; classify: a classifier head trained on '
                   '{"text", "label"} lines.')
@click.option("--lm-weight", type=float,
              help="classify: weight of the auxiliary language-model loss [default: 0.5].")
@click.option("--head-only", is_flag=True,
              help="classify: train the head alone (the GPT stays frozen).")
@click.option("--val-fraction", type=float,
              help="Hold out this share of a single file for validation [default: 0.1 for a "
                   "file, none for a folder without valid.jsonl].")
@click.option("--mask-prompt", is_flag=True,
              help="Loss on completions / assistant turns only.")
@click.option("--rank", default=8, show_default=True, callback=positive, help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True,
              help="LoRA alpha; the update is scaled by alpha / rank.")
@click.option("--dropout", default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--targets",
              help="Layers to adapt, a comma list: GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj; "
                   "Llama's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (or "
                   "q, k, v, o, gate, up, down) [default: all].")
@click.option("--layers",
              help="Blocks to adapt: all, 0,1,2, 8-11 or last:4 [default: the last 16, every "
                   "block of a smaller model].")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]),
              help="lora: low-rank updates; dora: LoRA plus learned row magnitudes; full: every "
                   "weight [default: lora].")
@click.option("--full", is_flag=True, help="Short for --fine-tune-type full.")
@click.option("--quantize", type=click.Choice(["4", "8"]),
              help="Quantize the base to this many bits first (QLoRA; the base stays quantized).")
@click.option("--grad-checkpoint", is_flag=True,
              help="Recompute activations in the backward pass: much less memory, ~30% slower.")
@click.option("--steps", type=int, callback=positive,
              help="Optimizer steps [default: one pass over the data].")
@click.option("--batch-size", default=4, show_default=True, callback=positive)
@click.option("--grad-accum", default=1, show_default=True, callback=positive)
@click.option("--lr", type=float,
              help="Peak learning rate [default: 2e-4 LoRA, 2e-5 full, 1e-3 head only].")
@click.option("--min-lr", type=float, help="Learning rate at the end [default: lr / 10].")
@click.option("--warmup", type=int, callback=at_least_0,
              help="Warmup steps [default: 5% of steps, at most 100].")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--grad-clip", default=1.0, show_default=True)
@click.option("--max-seq-len", type=int, callback=int_range(2),
              help="Cut examples to this many tokens (2 at least: a token and the next).")
@click.option("--eval-every", default=100, show_default=True, callback=at_least_0,
              help="0: only at the end.")
@click.option("--eval-batches", default=25, show_default=True, callback=positive)
@click.option("--save-every", default=100, show_default=True, callback=at_least_0)
@click.option("--log-every", default=10, show_default=True, callback=positive)
@click.option("--seed", default=0, show_default=True, callback=seed_range)
@click.option("--train-pass", type=click.Choice(["auto", "native", "mlx"]), default="auto",
              show_default=True,
              help="native: the C pass (full fine-tuning of a float32 GPT-2 on the CPU), or an "
                   "error; mlx: MLX's graph; auto: native where it applies. The run prints "
                   "which and why.")
@dtype_option()
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True,
              help="Start over in an --out that holds a run (replaced once the new run has a "
                   "checkpoint).")
def finetune(model, data, out, task, lm_weight, head_only, val_fraction, mask_prompt, rank,
             alpha, dropout, targets, layers, fine_tune_type, full, quantize, grad_checkpoint,
             steps, batch_size, grad_accum, lr, min_lr, warmup, weight_decay, grad_clip,
             max_seq_len, eval_every, eval_batches, save_every, log_every, seed, train_pass,
             dtype, resume, force):
    """Fine-tune a model on JSONL data with LoRA (or DoRA, or --full).

    Lines are {"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}...]};
    with --task classify, {"text", "label"}.
    """
    from mlxgpt.checkpoints.adapters.lora import LoRAConfig
    from mlxgpt.training.config import TrainConfig
    from mlxgpt.training.finetune import FinetuneOptions, steps_per_epoch
    from mlxgpt.training.finetune import finetune as finetune_lm

    classify = task == "classify"
    if not classify and (head_only or lm_weight is not None):
        raise MlxgptError(f"--{'head-only' if head_only else 'lm-weight'} needs --task classify")
    if classify and mask_prompt:
        raise MlxgptError("--mask-prompt does not apply to --task classify")
    if full and fine_tune_type not in (None, "full"):
        raise MlxgptError(f"choose one of --full and --fine-tune-type {fine_tune_type}")
    kind = "full" if full else (fine_tune_type or "lora")
    if head_only and (full or fine_tune_type):
        raise MlxgptError(f"choose one of --{'full' if full else 'fine-tune-type'} and "
                          "--head-only")
    full = kind == "full"
    lora = None if (full or head_only) else LoRAConfig(
        rank=rank, alpha=alpha, dropout=dropout, targets=targets, layers=layers,
        dora=kind == "dora")
    if lr is None:  # a head alone on frozen features takes a larger step
        lr = 1e-3 if head_only else (2e-5 if full else 2e-4)
    common = dict(model=model, data=data, out=out, lora=lora, val_fraction=val_fraction,
                  batch_size=batch_size, max_seq_len=max_seq_len, dtype=dtype,
                  quantize=int(quantize) if quantize else None, grad_checkpoint=grad_checkpoint,
                  seed=seed, resume=resume, force=force)
    if classify:
        from mlxgpt.training.classify import ClassifyOptions, finetune_classifier

        opts = ClassifyOptions(**common, head_only=head_only,
                               lm_weight=0.5 if lm_weight is None else lm_weight)
        run = finetune_classifier
    else:
        opts, run = FinetuneOptions(**common, mask_prompt=mask_prompt), finetune_lm

    def make_config(n_batches: int) -> TrainConfig:
        n = steps or steps_per_epoch(n_batches, grad_accum)
        return TrainConfig(
            steps=n, lr=lr, min_lr=min_lr if min_lr is not None else lr / 10,
            warmup=warmup if warmup is not None else min(100, n // 20),
            weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=grad_accum,
            eval_every=eval_every, eval_batches=eval_batches, save_every=save_every,
            log_every=log_every, seed=seed, train_pass=train_pass)

    opts.train = make_config
    if run(opts, echo=click.echo).interrupted:
        sys.exit(130)  # like pretrain: a stopped run is not a finished one


@click.command()
@click.option("--model", required=True, help="Base model the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(), help="Adapter folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Model folder to write.")
@click.option("--requantize", is_flag=True,
              help="Quantize the fused layers again like the (quantized) base. Adds rounding "
                   "error on top of the adapter's update; without it the result is exact fp.")
@dtype_option()
@click.option("--force", is_flag=True,
              help="Replace --out if it exists and mlxgpt wrote it (once the new one is "
                   "complete).")
def fuse(model, adapter, out, requantize, dtype, force):
    """Fold a LoRA adapter into its base model and write a plain model folder."""
    from mlxgpt.training.finetune import fuse_adapter

    if requantize:
        click.echo("warning: re-quantizing the fused weights loses part of what the adapter "
                   "learned (quantization error); omit --requantize for an exact model",
                   err=True)
    path = fuse_adapter(model, adapter, out, requantize=requantize, force=force, dtype=dtype)
    click.echo(f"wrote {path}")


@click.command()
@click.option("--model", required=True, help="Model folder, HF folder or hub id.")
@click.option("--adapter", type=click.Path(), help="LoRA adapter folder to apply.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A .jsonl file (any form) or a text file.")
@click.option("--task", type=click.Choice(["loss", "classify"]), default="loss",
              show_default=True,
              help="loss: loss and perplexity; classify: accuracy of a classifier on "
                   '{"text", "label"} lines, or of the generated completion.')
@click.option("--mask-prompt", is_flag=True, help="Loss on completions / assistant turns only.")
@click.option("--batch-size", default=8, show_default=True, callback=positive)
@click.option("--limit", type=int, callback=positive, help="Use only the first N examples.")
@dtype_option()
def evaluate(model, adapter, data, task, mask_prompt, batch_size, limit, dtype):
    """Loss and perplexity, or classification accuracy, of a model (with an adapter) on data."""
    from mlxgpt.checkpoints.load import is_classifier, load, load_classifier
    from mlxgpt.training.evaluate import evaluate_loss, generated_labels, read_eval_records

    if task == "classify" and is_classifier(model):
        from mlxgpt.training.classify import evaluate_classifier, read_labelled

        if adapter:
            raise MlxgptError("--adapter: a classifier folder has its adapter fused in already")
        records = read_labelled(data)[: limit or None]
        clf, tokenizer = load_classifier(model, dtype=dtype)
        click.echo(evaluate_classifier(clf, tokenizer, records, batch_size=batch_size).report())
        return

    m, tokenizer = load(model, dtype=dtype, adapter=adapter)
    records = read_eval_records(data)[: limit or None]
    if task == "loss":
        r = evaluate_loss(m, tokenizer, records, mask_prompt=mask_prompt, batch_size=batch_size)
        click.echo(f"loss: {r['loss']:.4f}\nperplexity: {r['perplexity']:.3f}\n"
                   f"tokens: {r['tokens']}")
        if "bits_per_byte" in r:
            click.echo(f"bits per byte: {r['bits_per_byte']:.4f}")
        return

    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty and (done % 10 == 0 or done == total):
            click.echo(f"\r{done}/{total}", nl=done == total, err=True)

    click.echo(generated_labels(m, tokenizer, records, progress=progress).report())
