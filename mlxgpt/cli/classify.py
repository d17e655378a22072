"""``mlxgpt classify``: label texts with a classifier (``mlxgpt finetune --task classify``)."""

import sys

import click

from mlxgpt.cli.options import dtype_option, positive
from mlxgpt.errors import MlxgptError


@click.command()
@click.option("--model", "-m", required=True,
              help="Classifier folder, or a Hugging Face GPT2ForSequenceClassification folder "
                   "or hub id.")
@click.argument("texts", nargs=-1)
@click.option("--batch-size", default=16, show_default=True, callback=positive)
@dtype_option()
def classify(model, texts, batch_size, dtype):
    """Print "LABEL<TAB>PROBABILITY" for each TEXT; "-" reads texts from stdin, one a line."""
    from mlxgpt.checkpoints.load import load_classifier
    from mlxgpt.generation.classify import classify as run

    if not texts:
        raise MlxgptError("give one or more TEXT arguments, or - to read texts from stdin")
    items = []
    for text in texts:
        if text != "-":
            items.append(text)
            continue
        for n, line in enumerate(sys.stdin.read().splitlines(), 1):
            if not line.strip():
                raise MlxgptError(f"stdin line {n}: empty text")
            items.append(line)
    clf, tokenizer = load_classifier(model, dtype=dtype)
    for p in run(clf, tokenizer, items, batch_size=batch_size):
        click.echo(f"{p.label}\t{p.probability:.4f}")
