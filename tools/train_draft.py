"""Pretrain a model with the tokenizer of an existing one (a draft for speculative decoding).

``mlxgpt pretrain`` trains its own BPE (``--tokenizer bpe:N``); a draft model must share its
model's ids, so this runs the same command with the tokenizer of ``--tokenizer-from MODEL``
instead (it is copied into RUN_DIR/tokenizer and every model folder, so --resume works too).
Every other option is ``mlxgpt pretrain``'s:

    python tools/train_draft.py --tokenizer-from english -- --data data/english/prose.txt \\
        --out runs/english-draft --n-layer 2 --n-head 2 --n-embd 128 --block-size 256 ...
"""

from __future__ import annotations

import argparse
import sys

import mlxgpt
import mlxgpt.training.pretrain as pretrain_run
from mlxgpt.cli import main as mlxgpt_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-from", required=True, help="Model whose tokenizer to use.")
    ap.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                    help="-- then mlxgpt pretrain's options (without --tokenizer).")
    args = ap.parse_args()
    rest = [a for a in args.pretrain_args if a != "--"]
    if "--tokenizer" in rest:
        sys.exit("Error: --tokenizer comes from --tokenizer-from")
    _, tokenizer = mlxgpt.load(args.tokenizer_from)
    # pretrain trains a BPE for "bpe:N" and keeps it in RUN_DIR/tokenizer; hand it this one.
    pretrain_run.make_tokenizer = lambda settings, **_: tokenizer
    mlxgpt_cli(["pretrain", "--tokenizer", f"bpe:{tokenizer.vocab_size}", *rest],
               prog_name="mlxgpt")


if __name__ == "__main__":
    main()
