"""``mlxgpt convert`` (Hugging Face -> model folder) and ``mlxgpt export`` (the way back)."""

import click

from mlxgpt.cli.options import dtype_option


@click.command()
@click.argument("source")
@click.argument("out_dir")
@click.option("--revision", help="Hub revision (branch, tag or commit) for a hub id.")
@dtype_option(auto=False, help="Cast floating-point weights (default: as stored).")
@click.option("--quantize", "bits", type=click.Choice(["4", "8"]),
              help="Quantize Linear and Embedding layers to this many bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64",
              show_default=True, help="Quantization group size.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def convert(source, out_dir, revision, dtype, bits, group_size, force):
    """Convert a Hugging Face GPT-2 checkpoint into an mlxgpt model folder.

    SOURCE is a local Hugging Face folder (model.safetensors, sharded safetensors or
    pytorch_model.bin) or a hub id such as "gpt2" (HF_HUB_OFFLINE=1 uses the local cache only).
    A GPT2ForSequenceClassification checkpoint becomes a classifier folder.
    """
    from mlxgpt.checkpoints.convert import convert as run

    summary = run(source, out_dir, revision=revision, dtype=dtype,
                  quantize_bits=int(bits) if bits else None, group_size=int(group_size),
                  force=force)
    click.echo(summary.line())


@click.command()
@click.argument("model")
@click.argument("out_dir")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def export(model, out_dir, force):
    """Write an mlxgpt model folder back out as a Hugging Face GPT-2 folder.

    transformers' GPT2LMHeadModel.from_pretrained(OUT_DIR) loads it (a classifier folder:
    GPT2ForSequenceClassification); quantized models are dequantized.
    """
    from mlxgpt.checkpoints.hf import export as run

    click.echo(f"wrote {run(model, out_dir, force=force)}")
