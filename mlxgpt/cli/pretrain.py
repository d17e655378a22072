"""``mlxgpt pretrain``: train a small GPT from scratch on your own text."""

from __future__ import annotations

import sys

import click

from mlxgpt.training.pretrain import PRESETS, prepare_run
from mlxgpt.training.pretrain import pretrain as run_pretrain


def _opt(*names: str, type=None, help: str = ""):
    return click.option(*names, type=type, default=None, help=help)


@click.command()
@_opt("--data", help="A UTF-8 text file or a folder of .txt files.")
@_opt("--out", help="Run folder: RUN_DIR/model is the trained model, RUN_DIR/last the checkpoint.")
@_opt("--config", "config_file", help="Settings file (JSON, or YAML with PyYAML); flags override.")
@_opt("--preset", type=click.Choice(sorted(PRESETS)),
      help="nano (4/4/128, block 64), small (6/6/384, block 256), gpt2 (124M).")
@_opt("--tokenizer", help="byte: 257 ids, one per byte (default); gpt2: GPT-2's BPE; bpe:N: a "
      "byte-level BPE of N ids trained on --data first (pip install 'mlxgpt[tokenizer]').")
@_opt("--n-layer", type=int, help="Transformer blocks.")
@_opt("--n-head", type=int, help="Attention heads.")
@_opt("--n-embd", type=int, help="Width.")
@_opt("--block-size", type=int, help="Context length in tokens.")
@_opt("--batch-size", type=int, help="Sequences per micro-batch (all processes together).")
@_opt("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@_opt("--lr", type=float, help="Peak learning rate.")
@_opt("--min-lr", type=float, help="Learning rate at the end of the cosine decay.")
@_opt("--warmup", type=int, help="Linear warmup steps.")
@_opt("--steps", type=int, help="Optimizer steps.")
@_opt("--max-tokens", type=int, help="Train on this many tokens (sets --steps).")
@_opt("--weight-decay", type=float, help="AdamW weight decay (not on biases and norms).")
@_opt("--grad-clip", type=float, help="Max gradient norm (0: off).")
@_opt("--dropout", type=float, help="Dropout rate.")
@_opt("--eval-every", type=int, help="Evaluate (and save best) every N steps (0: at the end).")
@_opt("--eval-batches", type=int, help="Validation batches per evaluation.")
@_opt("--save-every", type=int, help="Save RUN_DIR/last every N steps (0: at each evaluation).")
@_opt("--log-every", type=int, help="Write a log record every N steps.")
@_opt("--val-fraction", type=float, help="Share of the tokens held out for validation.")
@_opt("--seed", type=int, help="Random seed (initialisation, batches, dropout).")
@_opt("--cache-dir", help="Where tokenized corpora are cached (default ~/.cache/mlxgpt).")
@_opt("--train-pass", type=click.Choice(["auto", "native", "mlx"]),
      help="auto (default): the native C pass where it applies (CPU, float32), else MLX's "
      "graph; native: it or an error; mlx: MLX's graph. The run prints which and why.")
@click.option("--resume", is_flag=True, help="Continue RUN_DIR from RUN_DIR/last.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pretrain(resume: bool, quiet: bool, config_file: str | None, **options) -> None:
    """Train a GPT from scratch on your text: mlxgpt pretrain --data FILE --out RUN_DIR."""
    from mlxgpt.training.distributed import is_rank0

    flags = {k: v for k, v in options.items() if v is not None}
    settings = prepare_run(flags, config_file, resume)
    result = run_pretrain(settings, resume=resume, progress=not quiet,
                          echo=lambda m: click.echo(m, err=True))
    if not is_rank0():  # under mlx.launch, rank 0 reports for everyone
        sys.exit(130 if result.interrupted else 0)
    tok_s = result.tokens / result.elapsed if result.elapsed else 0.0
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss else ""
    if result.interrupted:
        click.echo(f"stopped at step {result.step}{best}; continue with: mlxgpt pretrain "
                   f"--out {settings.out} --resume")
        sys.exit(130)

    click.echo(f"done: {result.step} steps, {result.tokens:,} tokens, {tok_s:,.0f} tokens/s, "
               f"peak memory {result.peak_memory / 2**30:.2f} GiB{best}; "
               f"model in {settings.out}/model")
