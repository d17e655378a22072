"""``mlxgpt tokenizer train``: learn a byte-level BPE tokenizer (GPT-2's kind) from your text."""

from __future__ import annotations

import click

from mlxgpt.errors import MlxgptError


@click.group()
def tokenizer() -> None:
    """Tokenizers: mlxgpt tokenizer train --data FILE --vocab-size N --out DIR."""


@tokenizer.command()
@click.option("--data", multiple=True, metavar="FILE",
              help="UTF-8 text files or folders of .txt files (--data a.txt b.txt ...).")
@click.argument("more_data", nargs=-1, metavar="[FILE]...")
@click.option("--vocab-size", type=int, default=None,
              help="Ids in all: the 256 bytes, the merges and <|endoftext|> (the last id).")
@click.option("--out", default=None, help="Folder for vocab.json, merges.txt and "
              "tokenizer_config.json (Hugging Face's GPT-2 files).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(data: tuple[str, ...], more_data: tuple[str, ...], vocab_size: int | None,
          out: str | None, force: bool, quiet: bool) -> None:
    """Train a byte-level BPE of --vocab-size ids on --data and save it into --out."""
    from mlxgpt.checkpoints.files import atomic_dir
    from mlxgpt.data.corpus import count_tokens, read_corpus, train_tokenizer
    from mlxgpt.tokenizers.train import check_vocab_size

    paths = [*data, *more_data]
    if not paths:
        raise MlxgptError("--data FILE is required (UTF-8 text files or folders of .txt files)")
    if vocab_size is None:
        raise MlxgptError("--vocab-size N is required (more than 257, e.g. 8192)")
    if not out:
        raise MlxgptError("--out DIR is required")
    check_vocab_size(vocab_size)
    corpus = read_corpus(paths)  # bad input fails before anything is trained or written
    n_files = len(corpus.files)
    with atomic_dir(out, force=force) as tmp:  # the folder appears complete, or not at all
        click.echo(f"training a {vocab_size:,}-id BPE on {corpus.n_bytes / 1e6:,.2f} MB "
                   f"({n_files} file{'s' if n_files != 1 else ''})", err=True)
        run = train_tokenizer(corpus, vocab_size, progress=not quiet)
        run.tokenizer.save(tmp)
    tok = run.tokenizer
    click.echo(f"trained in {run.seconds:.1f} s ({run.mb_per_min:,.0f} MB/min)", err=True)
    if run.short_by:
        click.echo(f"note: the text has no more pairs to merge: {tok.vocab_size:,} ids, "
                   f"{run.short_by:,} fewer than --vocab-size", err=True)
    n_tokens = count_tokens(tok, corpus)
    click.echo(f"tokenizer: {tok.vocab_size:,} ids (256 bytes, {len(tok.merges):,} merges, "
               f"<|endoftext|> = {tok.eot_id}) in {out}; the data is {n_tokens:,} tokens, "
               f"{corpus.n_bytes / max(n_tokens, 1):.2f} bytes per token")
