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
@click.option("--force", is_flag=True,
              help="Replace OUT_DIR if it exists and mlxgpt wrote it (once the new one is "
                   "complete).")
def convert(source, out_dir, revision, dtype, bits, group_size, force):
    """Convert a Hugging Face GPT-2 checkpoint or a GGUF file into an mlxgpt model folder.

    SOURCE is a local Hugging Face folder (model.safetensors, sharded safetensors or
    pytorch_model.bin), a hub id such as "gpt2" (HF_HUB_OFFLINE=1 uses the local cache only)
    or a GPT-2 GGUF file (F32, F16 or Q8_0 tensors, e.g. from llama.cpp).
    A GPT2ForSequenceClassification checkpoint becomes a classifier folder.
    """
    from mlxgpt.checkpoints.convert import convert as run

    summary = run(source, out_dir, revision=revision, dtype=dtype,
                  quantize_bits=int(bits) if bits else None, group_size=int(group_size),
                  force=force)
    click.echo(summary.line())


@click.command()
@click.argument("model")
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf",
              show_default=True,
              help="hf: a Hugging Face GPT-2 folder; gguf: one GGUF file llama.cpp runs.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]),
              help="GGUF weight type (default: f32 for float32 models, else f16).")
@click.option("--force", is_flag=True,
              help="Replace OUT if it exists and mlxgpt wrote it (once the new one is complete).")
def export(model, out, fmt, dtype, force):
    """Write an mlxgpt model out as a Hugging Face GPT-2 folder or a GGUF file.

    --format hf (default): OUT is a folder transformers' GPT2LMHeadModel.from_pretrained loads
    (a classifier folder: GPT2ForSequenceClassification). --format gguf: OUT is a file
    llama.cpp runs (architecture gpt2); MODEL may also be a Hugging Face folder or a shipped
    model's name. Quantized models are dequantized.
    """
    if fmt == "gguf":
        from mlxgpt.checkpoints.files import check_apart
        from mlxgpt.checkpoints.gguf import export_gguf

        check_apart(out, {"MODEL": model}, out_label="OUT")
        click.echo(export_gguf(model, out, dtype, force=force).line())
        return
    from mlxgpt.checkpoints.hf import export as run
    from mlxgpt.errors import MlxgptError

    if dtype is not None:
        raise MlxgptError("--dtype applies to --format gguf (a Hugging Face folder keeps the "
                          "model's dtype)")

    click.echo(f"wrote {run(model, out, force=force)}")
