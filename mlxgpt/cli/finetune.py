"""``mlxgpt finetune``, ``mlxgpt fuse`` and ``mlxgpt eval``: LoRA fine-tuning and evaluation."""

import sys

import click

from mlxgpt.cli.options import dtype_option


@click.command()
@click.option("--model", required=True, help="Base model: a model folder, HF folder or hub id.")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Folder with train.jsonl [valid.jsonl test.jsonl], or one .jsonl file.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Adapter folder to write (checkpoints, log and plot go there too).")
@click.option("--val-fraction", type=float,
              help="Hold out this share of a single file for validation [default: 0.1 for a "
                   "file, none for a folder without valid.jsonl].")
@click.option("--mask-prompt", is_flag=True,
              help="Loss on completions / assistant turns only.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True,
              help="LoRA alpha; the update is scaled by alpha / rank.")
@click.option("--dropout", default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--targets", default="c_attn", show_default=True,
              help="Layers to adapt: comma list of c_attn, attn.c_proj, c_fc, mlp.c_proj, or all.")
@click.option("--layers", default="all", show_default=True,
              help="Blocks to adapt: all, 0,1,2, 8-11 or last:4.")
@click.option("--full", is_flag=True, help="Full fine-tuning (every weight) instead of LoRA.")
@click.option("--quantize", type=click.Choice(["4", "8"]),
              help="Quantize the base to this many bits first (QLoRA; the base stays quantized).")
@click.option("--grad-checkpoint", is_flag=True,
              help="Recompute activations in the backward pass: much less memory, ~30% slower.")
@click.option("--steps", type=int, help="Optimizer steps [default: one pass over the data].")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--lr", type=float, help="Peak learning rate [default: 2e-4 LoRA, 2e-5 full].")
@click.option("--min-lr", type=float, help="Learning rate at the end [default: lr / 10].")
@click.option("--warmup", type=int, help="Warmup steps [default: 5% of steps, at most 100].")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--grad-clip", default=1.0, show_default=True)
@click.option("--max-seq-len", type=int, help="Cut examples to this many tokens.")
@click.option("--eval-every", default=100, show_default=True, help="0: only at the end.")
@click.option("--eval-batches", default=25, show_default=True)
@click.option("--save-every", default=100, show_default=True)
@click.option("--log-every", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@dtype_option()
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a run.")
def finetune(model, data, out, val_fraction, mask_prompt, rank, alpha, dropout, targets, layers,
             full, quantize, grad_checkpoint, steps, batch_size, grad_accum, lr, min_lr, warmup,
             weight_decay, grad_clip, max_seq_len, eval_every, eval_batches, save_every,
             log_every, seed, dtype, resume, force):
    """Fine-tune a model on JSONL data with LoRA (or --full).

    Lines are {"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}...]}.
    """
    from mlxgpt.training.config import TrainConfig
    from mlxgpt.training.finetune import FinetuneOptions, steps_per_epoch
    from mlxgpt.training.finetune import finetune as run
    from mlxgpt.training.lora import LoRAConfig, parse_targets

    lora = None if full else LoRAConfig(rank=rank, alpha=alpha, dropout=dropout,
                                        targets=parse_targets(targets), layers=layers)
    lr = lr if lr is not None else (2e-5 if full else 2e-4)
    opts = FinetuneOptions(model=model, data=data, out=out, lora=lora, mask_prompt=mask_prompt,
                           val_fraction=val_fraction, batch_size=batch_size,
                           max_seq_len=max_seq_len, dtype=dtype,
                           quantize=int(quantize) if quantize else None,
                           grad_checkpoint=grad_checkpoint,
                           seed=seed, resume=resume, force=force)

    def make_config(n_batches: int) -> TrainConfig:
        n = steps or steps_per_epoch(n_batches, grad_accum)
        return TrainConfig(
            steps=n, lr=lr, min_lr=min_lr if min_lr is not None else lr / 10,
            warmup=warmup if warmup is not None else min(100, n // 20),
            weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=grad_accum,
            eval_every=eval_every, eval_batches=eval_batches, save_every=save_every,
            log_every=log_every, seed=seed)

    opts.train = make_config
    run(opts, echo=click.echo)


@click.command()
@click.option("--model", required=True, help="Base model the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(), help="Adapter folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Model folder to write.")
@click.option("--requantize", is_flag=True,
              help="Quantize the fused layers again like the (quantized) base. Adds rounding "
                   "error on top of the adapter's update; without it the result is exact fp.")
@dtype_option()
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
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
              help="loss: loss and perplexity; classify: accuracy of the generated completion.")
@click.option("--mask-prompt", is_flag=True, help="Loss on completions / assistant turns only.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--limit", type=int, help="Use only the first N examples.")
@dtype_option()
def evaluate(model, adapter, data, task, mask_prompt, batch_size, limit, dtype):
    """Loss and perplexity, or classification accuracy, of a model (with an adapter) on data."""
    from mlxgpt.checkpoints.load import load
    from mlxgpt.training.evaluate import classify, evaluate_loss, read_eval_records

    m, tokenizer = load(model, dtype=dtype, adapter=adapter)
    records = read_eval_records(data)[: limit or None]
    if task == "loss":
        r = evaluate_loss(m, tokenizer, records, mask_prompt=mask_prompt, batch_size=batch_size)
        click.echo(f"loss: {r['loss']:.4f}\nperplexity: {r['perplexity']:.3f}\n"
                   f"tokens: {r['tokens']}")
        return

    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty and (done % 10 == 0 or done == total):
            click.echo(f"\r{done}/{total}", nl=done == total, err=True)

    click.echo(classify(m, tokenizer, records, progress=progress).report())
