"""GPT's recipe on a real pretrained model: SmolLM2-135M-Instruct on the VADER movie-review split.

The rows of the recipe table (issue 27, deliverable 3) that fit a few CPU cores, on the split of
``tools/sentiment_example.py --format text-label`` (8,572 train / 500 valid / 1,000 test):

- ``majority``: always the commonest training label;
- ``bow``: the bag-of-words logistic regression of ``tools/sentiment_recipe.py`` (its functions,
  imported; all 8,572 training snippets as in docs/recipe.md), with macro-F1 added;
- ``zeroshot``: SmolLM2 through its chat template (the question and the review as the user
  turn, then the assistant cue); the label is the one whose first token is likelier as the
  reply's first token (``positive``/``Positive`` against ``negative``/``Negative``, log-sum-exp
  of each pair), not parsed from generated text. Also reported: the same scores with the
  decision threshold chosen on the valid split (the prompt's bias towards one label removed);
- ``fewshot``: the instruction as the system turn and ``--shots`` labelled training snippets
  (balanced, seeded) as earlier user and assistant turns, then the snippet, read as above. The
  shared prefix (system turn and shots) is read once into a prompt cache
  (:func:`~mlxgpt.generation.prompt_cache.make_prompt_cache`) whose keys and values every batch
  of snippets continues from, so each snippet reads only its own tokens;
- ``head``: a classifier head on frozen SmolLM2: the final hidden state (after the final norm) at
  each snippet's last real token, as ``GPTClassifier.pooled_logits`` reads it, computed once and
  cached (``OUT/cache/hidden-*.npz``); a bias-free linear layer (``GPTClassifier.score``'s shape)
  trained on it with cross-entropy and full-batch AdamW, the weight decay and step count chosen
  on the valid split. The trained head is put into a real ``GPTClassifier`` over the model and
  its logits on test snippets are compared with the cached-feature ones;
- ``head-meanlast``: the same head on [last token; mean over tokens] (2 x 576 features: a probe,
  not loadable as ``GPTClassifier.score``), the pooling of the issue's transformers anchor;
- ``head-lora``, ``head-full``: ``mlxgpt finetune --task classify`` on the first
  ``--train-limit`` training snippets (one pass, batch 8: the fixed budget of every fine-tuned
  row), LoRA (rank 8, every projection of the last 16 blocks, the defaults) or every weight,
  the classifier head read at the last real token; run as a user runs it (the command is
  printed and recorded), then ``mlxgpt eval --task classify``'s numbers on test;
- ``prompt-lora``: ``mlxgpt finetune --mask-prompt`` with LoRA on the same snippets as chats
  (``tools/sentiment_example.py --format chat``: the zero-shot row's question as the user turn,
  the label as the assistant's reply, through SmolLM2's template), then ``mlxgpt eval --task
  classify`` with the adapter: the likelier of the two replies (end-of-turn included);
- ``trainspeed`` (not a row): the measured speed of a full fine-tuning step (forward, backward
  through every weight, AdamW) on batches of training snippets, for costing the rows.

Everything SmolLM2 computes is cached under ``OUT/cache`` (keyed by the texts and the prompt),
so a rerun only retrains heads and prints. Each row's wall time is the time measured when its
expensive part was computed (kept in the cache), plus the rest; model loading is counted apart.

    python tools/sentiment_example.py --out data/sentiment-head --format text-label
    python tools/smollm2_recipe.py --data data/sentiment-head --out runs/smollm2-recipe \\
        --only majority,bow,zeroshot,fewshot,head,head-meanlast,trainspeed \\
        --train-limit 4000 --shots 8
    python tools/smollm2_recipe.py --data data/sentiment-head --out runs/smollm2-recipe \\
        --only head-lora,prompt-lora,head-full --train-limit 4000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlxgpt  # first: it preloads the fast BLAS before mlx is imported

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxgpt.core.classifier import GPTClassifier
from mlxgpt.generation.cache import KVCache
from mlxgpt.generation.context import common_prefix
from mlxgpt.generation.prompt_cache import make_prompt_cache
from mlxgpt.tokenizers.transcript import chat_prompt
from mlxgpt.training.evaluate import macro_f1

# isort: split
sys.path.insert(0, str(Path(__file__).parent))  # the bag of words lives in a sibling tool
from sentiment_example import QUESTION, report_values, write_splits  # noqa: E402
from sentiment_example import mlxgpt as mlxgpt_command  # noqa: E402
from sentiment_example import record as data_record  # noqa: E402
from sentiment_recipe import bow_matrix, features, logistic_regression, read  # noqa: E402

ROWS = ("majority", "bow", "zeroshot", "fewshot", "head", "head-meanlast", "head-lora",
        "head-full", "prompt-lora", "trainspeed")
# The fine-tuned rows: `mlxgpt finetune` options (one pass over the training snippets in batches
# of 8; learning rates set before any run, not tuned on test).
FINETUNED = {
    "head-lora": ("text-label", ["--task", "classify", "--fine-tune-type", "lora", "--lr", "5e-4"]),
    "head-full": ("text-label", ["--task", "classify", "--full", "--lr", "5e-5"]),
    "prompt-lora": ("chat", ["--mask-prompt", "--fine-tune-type", "lora", "--lr", "5e-4"]),
}
FINETUNE_BATCH = 8
LABELS = ("negative", "positive")  # sorted, as finetune --task classify orders them
SYSTEM = ("Classify the sentiment of the movie review as positive or negative. "
          "Answer with one word: positive or negative.")
# Prompt styles (see prompt_ids), each row's chosen on the first 120 valid snippets (accuracy and
# AUC of the log-odds; test unseen): zero-shot "user" 0.675 / 0.860 against "system" 0.558 /
# 0.802; 8-shot "system" 0.500 / 0.884 against "user" 0.492 / 0.848.
STYLE = {"zeroshot": "user", "fewshot": "system"}
# sentiment_recipe.bag_of_words' L2 grid: the same selection, so its 0.796 is reproduced.
BOW_L2 = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
# Head: AdamW's decoupled weight decay (per unit of lr) and the step counts tried on valid.
HEAD_LR = 3e-3
HEAD_WD = (0.0, 0.1, 1.0, 10.0)
HEAD_STEPS = (25, 50, 100, 200, 400, 800, 1600, 3200)
FEATURE_BATCH = 32  # snippets per forward when computing hidden states (sorted by length)
PROMPT_BATCH = 16  # prompts per forward after the shared prefix
CURVE = (500, 1000, 2000)  # smaller training sets the heads are also trained on


# --------------------------------------------------------------------------- bookkeeping


def padded(rows: list[list[int]], pad: int) -> tuple[mx.array, mx.array]:
    """Token rows right-padded to the longest: (B, T) ids and (B,) real lengths."""
    width = max(len(r) for r in rows)
    return mx.array([r + [pad] * (width - len(r)) for r in rows]), mx.array([len(r) for r in rows])


def digest(*parts: Any) -> str:
    """A short key for what a cached result was computed from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached(path: Path, key: str, compute: Callable[[], dict[str, np.ndarray]]
           ) -> tuple[dict[str, np.ndarray], float, bool]:
    """``compute()``'s arrays, from ``path`` when it holds them for ``key``; also the seconds
    the computation took when it ran (kept in the file) and whether it came from the file."""
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in f.files}, float(f["seconds"]), True
    t0 = time.perf_counter()
    arrays = compute()
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.array(key), seconds=np.array(seconds), **arrays)
    return arrays, seconds, False


def metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[float, float]:
    """Accuracy and macro-F1 (the mean over labels of each label's F1)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()), macro_f1(t.tolist(), p.tolist())


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return (f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs "
                f"({platform.machine()})")
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


class Split:
    """One split's texts and label ids."""

    def __init__(self, path: Path, limit: int | None = None):
        texts, labels = read(path)
        self.texts, self.labels = texts[:limit], labels[:limit]
        unknown = set(self.labels) - set(LABELS)
        if unknown:
            raise SystemExit(f"{path}: labels {sorted(unknown)} are not {LABELS}")
        self.y = np.array([LABELS.index(lab) for lab in self.labels])


# --------------------------------------------------------------------------- baselines


def majority(train: Split, test: Split) -> tuple[np.ndarray, str]:
    top = Counter(train.y.tolist()).most_common(1)[0][0]
    return np.full(len(test.y), top), f'always "{LABELS[top]}" (the commonest training label)'


def bag_of_words(train: Split, valid: Split, test: Split) -> tuple[np.ndarray, str]:
    """sentiment_recipe's bag of words (its features, matrix and regression), keeping the test
    predictions for macro-F1."""
    counts = Counter(f for t in train.texts for f in set(features(t)))
    vocab = {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= 2))}
    xtr, xva, xte = (bow_matrix(s.texts, vocab) for s in (train, valid, test))
    best: tuple[float, float, np.ndarray] | None = None
    for l2 in BOW_L2:
        w = logistic_regression(xtr, train.y.astype(np.float32), l2)
        acc = float(((xva @ w > 0) == valid.y).mean())
        if best is None or acc > best[0]:
            best = (acc, l2, w)
    assert best is not None
    acc, l2, w = best
    note = (f"{len(vocab):,} unigram+bigram features, {len(train.y):,} training snippets, "
            f"L2 {l2:g} chosen on valid (valid accuracy {acc:.4f})")
    return (xte @ w > 0).astype(int), note


# --------------------------------------------------------------------------- prompting


def label_token_ids(tokenizer: Any) -> list[list[int]]:
    """For each label, the single tokens its reply may start with (lower case and capitalised,
    as the first thing after the assistant cue)."""
    out = []
    for label in LABELS:
        ids = []
        for spelling in (label, label.capitalize()):
            tok = tokenizer.encode(spelling)
            if len(tok) != 1:
                raise SystemExit(f"{spelling!r} is {len(tok)} tokens; this tool needs one")
            ids.append(tok[0])
        out.append(ids)
    if set(out[0]) & set(out[1]):
        raise SystemExit("the labels share a first token")
    return out


def pick_shots(train: Split, k: int, seed: int) -> list[tuple[str, str]]:
    """k training snippets, as balanced as k allows, in a seeded random order (neither label
    always last, which the model could copy)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(len(LABELS)):
        pool = np.flatnonzero(train.y == c)
        n = k // len(LABELS) + (c < k % len(LABELS))
        chosen += rng.choice(pool, n, replace=False).tolist()
    rng.shuffle(chosen)
    return [(train.texts[i], train.labels[i]) for i in chosen]


def prompt_ids(tokenizer: Any, shots: Sequence[tuple[str, str]], text: str,
               style: str) -> list[int]:
    """The chat: with ``style`` "system" the instruction is the system turn and every review a
    user turn of its own; with "user" the instruction heads every user turn and the template's
    default system turn stays (SmolLM2's own)."""
    if style == "system":
        messages, ask = [{"role": "system", "content": SYSTEM}], "Review: {}"
    else:
        messages, ask = [], QUESTION + "\n\nReview: {}"
    for shot_text, label in shots:
        messages += [{"role": "user", "content": ask.format(shot_text)},
                     {"role": "assistant", "content": label}]
    messages.append({"role": "user", "content": ask.format(text)})
    return chat_prompt(tokenizer, messages)[0]


def label_scores(model: Any, tokenizer: Any, prompts: list[list[int]]) -> dict[str, np.ndarray]:
    """Per prompt: the log-odds of "positive" over "negative" as the reply's first token, and the
    probability the model puts on the label tokens at all.

    The prefix all prompts share is read once (a prompt cache); its keys and values are then
    repeated for a batch of prompts, each of which reads only its own tokens, right-padded
    (the causal mask keeps padding out of real positions) and read at its own last token."""
    ids = label_token_ids(tokenizer)
    shared = min(min(common_prefix(prompts[0], p) for p in prompts),
                 min(len(p) for p in prompts) - 1)  # every prompt keeps a token of its own
    t0 = time.perf_counter()
    prefix = make_prompt_cache(model, tokenizer, prompts[0][:shared])
    prefix_s = time.perf_counter() - t0
    rests = [p[shared:] for p in prompts]
    order = np.argsort([len(r) for r in rests], kind="stable")  # little padding per batch
    margin, mass = np.zeros(len(prompts)), np.zeros(len(prompts))
    pad = tokenizer.eot_id or 0
    for start in range(0, len(order), PROMPT_BATCH):
        rows = order[start : start + PROMPT_BATCH]
        batch, lengths = padded([rests[i] for i in rows], pad)
        caches = [KVCache(mx.repeat(k, len(rows), axis=0), mx.repeat(v, len(rows), axis=0),
                          shared) for k, v in prefix.kv]
        h = model.hidden(batch, caches)  # (B, T, C), positions continuing the prefix
        logits = model.logits(h[mx.arange(len(rows)), lengths - 1])  # (B, V)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        per_label = mx.stack([mx.logsumexp(logp[:, mx.array(i)], axis=-1) for i in ids], 1)
        per_label = np.array(per_label)  # (B, labels)
        margin[rows] = per_label[:, 1] - per_label[:, 0]
        mass[rows] = np.exp(per_label).sum(axis=1)
    return {"margin": margin, "mass": mass, "shared_tokens": np.array(shared),
            "read_tokens": np.array(sum(len(r) for r in rests)), "prefix_s": np.array(prefix_s)}


def prompted_row(name: str, model: Any, tokenizer: Any, shots: list[tuple[str, str]],
                 valid: Split, test: Split, cache: Path, source: str
                 ) -> tuple[np.ndarray, str, dict[str, Any], float, float]:
    """Test predictions by label probabilities; the valid split only picks the threshold of
    the calibrated variant reported next to the row. Also the seconds the scoring took when it
    ran (valid and test) and the part of them spent in this run (not cached)."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    split_s: dict[str, float] = {}
    fresh = 0.0
    for split in (valid, test):
        sname = "valid" if split is valid else "test"
        prompts = [prompt_ids(tokenizer, shots, t, STYLE[name]) for t in split.texts]
        key = digest(source, prompts)
        arrays, s, hit = cached(cache / f"{name}-{sname}.npz", key,
                                lambda p=prompts: label_scores(model, tokenizer, p))
        print(f"  {name} {sname}: {len(prompts)} prompts, "
              f"{'cached' if hit else 'read'} in {s:.0f} s", flush=True)
        scores[sname], split_s[sname] = arrays, s
        fresh += 0.0 if hit else s
    te, va = scores["test"], scores["valid"]
    pred = (te["margin"] > 0).astype(int)
    # Calibrated: the log-odds threshold that is best on valid (the prompt's label bias removed).
    cands = np.unique(va["margin"])
    accs = [((va["margin"] > c - 1e-9) == valid.y).mean() for c in cands]
    thr = float(cands[int(np.argmax(accs))]) - 1e-9
    cal_acc, cal_f1 = metrics(test.y, (te["margin"] > thr).astype(int))
    n = len(test.y)
    extra = {
        "calibrated": {"threshold": thr, "accuracy": cal_acc, "macro_f1": cal_f1},
        "label_mass_mean": float(te["mass"].mean()),
        "predicted_positive": float(pred.mean()),
        "shared_prefix_tokens": int(te["shared_tokens"]),
        "tokens_read_per_test_snippet": float(te["read_tokens"]) / n,
        "prefix_read_s": float(te["prefix_s"]),
        "test_scoring_s": split_s["test"],
        "valid_scoring_s": split_s["valid"],
        "prompt_tokens_per_s": float(te["read_tokens"]) / split_s["test"],
        "prompt_style": STYLE[name],
        "example_prompt": tokenizer.decode(prompt_ids(tokenizer, shots, test.texts[0],
                                                      STYLE[name])),
        "shots": [{"text": t, "label": lab} for t, lab in shots],
    }
    note = (f"{len(shots)} shots; " if shots else "") + f"prompt style {STYLE[name]}; " + (
        f"label tokens {' / '.join(LABELS)} compared after the assistant cue; "
        f"prefix of {extra['shared_prefix_tokens']} tokens read once, "
        f"{extra['tokens_read_per_test_snippet']:.1f} tokens read per snippet; "
        f"mean P(label tokens) {extra['label_mass_mean']:.3f}; "
        f"{100 * extra['predicted_positive']:.1f}% predicted positive; "
        f"with the threshold chosen on valid: accuracy {cal_acc:.4f}, macro-F1 {cal_f1:.4f}")
    return pred, note, extra, split_s["valid"] + split_s["test"], fresh


# --------------------------------------------------------------------------- frozen features


def hidden_features(model: Any, tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """Each text's final hidden state at its last real token, and the mean over its tokens.

    Texts go in batches of similar length, right-padded; the causal mask keeps the padding out
    of every real position, and each row is read at its own length (SmolLM2's pad id is also
    its end-of-turn token, so no pad id can mark the end)."""
    toks = [tokenizer.encode(t)[: model.config.n_positions] for t in texts]
    if any(not t for t in toks):
        raise SystemExit("an empty snippet has no last token")
    order = np.argsort([len(t) for t in toks], kind="stable")
    last = np.zeros((len(toks), model.config.n_embd), np.float32)
    mean = np.zeros_like(last)
    pad = tokenizer.eot_id or 0
    for start in range(0, len(order), FEATURE_BATCH):
        rows = order[start : start + FEATURE_BATCH]
        batch, lengths = padded([toks[i] for i in rows], pad)
        width = batch.shape[1]
        h = model.hidden(batch)  # (B, T, C)
        real = (mx.arange(width)[None, :] < lengths[:, None])[..., None]  # (B, T, 1)
        lt = h[mx.arange(len(rows)), lengths - 1]
        mn = (h * real).sum(axis=1) / lengths[:, None]
        mx.eval(lt, mn)
        last[rows], mean[rows] = np.array(lt), np.array(mn)
    return {"last": last, "mean": mean, "tokens": np.array([len(t) for t in toks])}


def train_head(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """A bias-free linear head (labels x features, as GPTClassifier.score) by full-batch AdamW
    on the cross-entropy from zeros; weight decay and step count chosen by valid accuracy
    (ties: lower valid loss). The problem is convex, so there is no seed to report."""
    x, y, xv, yv = mx.array(xtr), mx.array(ytr), mx.array(xva), mx.array(yva)

    def loss(params: dict[str, mx.array], a: mx.array, b: mx.array) -> mx.array:
        return nn.losses.cross_entropy(a @ params["weight"].T, b, reduction="mean")

    step = mx.value_and_grad(loss)
    best: tuple[float, float, float, int, np.ndarray] | None = None
    grid = []
    for wd in HEAD_WD:
        params = {"weight": mx.zeros((len(LABELS), xtr.shape[1]))}
        opt = optim.AdamW(HEAD_LR, weight_decay=wd, bias_correction=True)
        for t in range(1, HEAD_STEPS[-1] + 1):
            _, g = step(params, x, y)
            opt.update(params, g)
            mx.eval(params, opt.state)
            if t in HEAD_STEPS:
                logits = xv @ params["weight"].T
                acc = float((logits.argmax(axis=1) == yv).mean())
                vloss = float(nn.losses.cross_entropy(logits, yv, reduction="mean"))
                grid.append({"weight_decay": wd, "steps": t, "valid_accuracy": acc,
                             "valid_loss": vloss})
                if best is None or (acc, -vloss) > (best[0], -best[1]):
                    best = (acc, vloss, wd, t, np.array(params["weight"]))
    assert best is not None
    acc, vloss, wd, steps, w = best
    return w, {"optimizer": f"AdamW lr {HEAD_LR:g}, full batch, bias correction",
               "weight_decay": wd, "steps": steps, "valid_accuracy": acc,
               "valid_loss": vloss, "grid": grid}


def classifier_check(model: Any, tokenizer: Any, weight: np.ndarray, texts: list[str],
                     feats: np.ndarray) -> float:
    """The trained head inside a real GPTClassifier over the model: the largest difference
    between its logits (batched, right-padded, explicit lengths) and the cached features'."""
    clf = GPTClassifier(model, LABELS)
    clf.score.weight = mx.array(weight)
    batch, lengths = padded([tokenizer.encode(t) for t in texts], tokenizer.eot_id or 0)
    logits = np.array(clf(batch, lengths))
    return float(np.abs(logits - feats @ weight.T).max())


# --------------------------------------------------------------------------- training speed


def train_speed(model: Any, tokenizer: Any, texts: list[str], batch: int = 8, steps: int = 4
                ) -> dict[str, Any]:
    """Seconds per full fine-tuning step of the language model (next-token loss, backward
    through every weight, AdamW) on ``batch`` training snippets each, after one warm-up step.
    The weights are changed: run last."""
    toks = [tokenizer.encode(t) for t in texts[: batch * (steps + 1)]]
    pad = tokenizer.eot_id or 0

    def loss(m: Any, inp: mx.array, tgt: mx.array, mask: mx.array) -> mx.array:
        ce = nn.losses.cross_entropy(m(inp), tgt, reduction="none")
        return (ce * mask).sum() / mask.sum()

    step = nn.value_and_grad(model, loss)
    opt = optim.AdamW(1e-5)
    times, trained = [], 0
    for s in range(steps + 1):
        rows = toks[s * batch : (s + 1) * batch]
        width = max(len(t) for t in rows)
        arr = np.array([t + [pad] * (width - len(t)) for t in rows])
        mask = np.array([[1] * (len(t) - 1) + [0] * (width - len(t)) for t in rows], np.float32)
        t0 = time.perf_counter()
        _, g = step(model, mx.array(arr[:, :-1]), mx.array(arr[:, 1:]), mx.array(mask))
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state)
        if s:  # the first step compiles and allocates
            times.append(time.perf_counter() - t0)
            trained += int(mask.sum())
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"batch": batch, "steps": steps, "seconds_per_step": float(np.mean(times)),
            "trained_tokens_per_s": trained / sum(times), "trainable_params": n_params}


# --------------------------------------------------------------------------- main


def write_split_folder(folder: Path, fmt: str, splits: dict[str, Split]) -> Path:
    """The splits as ``mlxgpt finetune`` data in ``fmt`` (sentiment_example's records)."""
    write_splits(folder, {name: [data_record(t, lab, fmt)
                                 for t, lab in zip(split.texts, split.labels, strict=True)]
                          for name, split in splits.items()})
    return folder


def run_mlxgpt(args: list[str]) -> tuple[str, float]:
    """``mlxgpt ARGS`` as a user runs it (sentiment_example's runner): stdout and seconds."""
    t0 = time.perf_counter()
    out = mlxgpt_command(*args)
    return out, time.perf_counter() - t0


def finetuned_row(row: str, model: str, out: Path, splits: dict[str, Split],
                  seed: int) -> tuple[float, float, float, str, dict]:
    """Train one fine-tuned row through the CLI (unless the same command trained it before)
    and score it on test; see the module docstring."""
    fmt, options = FINETUNED[row]
    data = write_split_folder(out / "data" / f"{fmt}-{len(splits['train'].y)}", fmt, splits)
    folder = out / row
    cmd = ["finetune", "--model", model, "--data", str(data), "--out", str(folder),
           "--batch-size", str(FINETUNE_BATCH), "--seed", str(seed), *options, "--force"]
    # The training's command, time and output, kept beside it: a rerun (another row, a failed
    # evaluation) reuses a finished training of the same command.
    trained = out / f"{row}.finetune.json"
    previous = json.loads(trained.read_text()) if trained.is_file() else {}
    if previous.get("command") == shlex.join(cmd) and folder.is_dir():
        log, train_s = previous["log"], previous["seconds"]
        print(f"  {row}: trained before ({train_s:.0f} s), reusing {folder}", flush=True)
    else:
        log, train_s = run_mlxgpt(cmd)
        trained.write_text(json.dumps({"command": shlex.join(cmd), "seconds": train_s,
                                       "log": log, "load_avg_1m": os.getloadavg()[0]}))
    test = str(data / "test.jsonl")
    if fmt == "text-label":  # the classifier folder
        report, eval_s = run_mlxgpt(["eval", "--task", "classify", "--model", str(folder),
                                     "--data", test])
        keys = ("accuracy", "macro-F1")
    else:  # the base model with the adapter: the likelier reply is the label
        report, eval_s = run_mlxgpt(["eval", "--task", "classify", "--model", model,
                                     "--adapter", str(folder), "--data", test])
        keys = ("label accuracy", "label macro-F1")
    values = report_values(report)
    acc, f1 = (float(values[k]) for k in keys)
    extra = {"finetune": shlex.join(cmd), "finetune_s": train_s, "finetune_log": log,
             "eval_s": eval_s, "eval_report": report}
    note = (f"`mlxgpt {shlex.join(cmd)}` ({train_s:.0f} s), then `mlxgpt eval --task classify` "
            f"on test ({eval_s:.0f} s): {', '.join(f'{k} {values[k]}' for k in keys)}")
    return acc, f1, train_s + eval_s, note, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="tools/sentiment_example.py "
                    "--format text-label output")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows, of {','.join(ROWS)}")
    ap.add_argument("--train-limit", type=int, default=4000,
                    help="the first N training snippets for the SmolLM2 rows")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="which snippets are the shots")
    args = ap.parse_args()
    rows = [r for r in args.only.split(",") if r]
    bad = set(rows) - set(ROWS)
    if bad:
        ap.error(f"unknown rows {sorted(bad)} (rows: {', '.join(ROWS)})")
    cache = args.out / "cache"
    train_all = Split(args.data / "train.jsonl")
    train = Split(args.data / "train.jsonl", args.train_limit)
    valid, test = Split(args.data / "valid.jsonl"), Split(args.data / "test.jsonl")

    def command(row: str) -> str:
        return "python tools/smollm2_recipe.py " + shlex.join(
            ["--data", str(args.data), "--out", str(args.out), "--model", args.model,
             "--only", row, "--train-limit", str(args.train_limit), "--shots", str(args.shots),
             "--seed", str(args.seed)])

    results_path = args.out / "results.json"
    results: dict[str, Any] = (json.loads(results_path.read_text())
                               if results_path.is_file() else {"rows": {}})
    results.update({"cpu": cpu_name(), "mlx": mx.__version__, "python": platform.python_version(),
                    "split": {"train": len(train_all.y), "train_used": len(train.y),
                              "valid": len(valid.y), "test": len(test.y)}})
    loaded: dict[str, Any] = {}

    def model_and_tokenizer() -> tuple[Any, Any]:
        if not loaded:
            t0 = time.perf_counter()
            loaded["m"], loaded["t"] = mlxgpt.load(args.model)
            results["model_load_s"] = time.perf_counter() - t0
        return loaded["m"], loaded["t"]

    def record(row: str, title: str, pred: np.ndarray | tuple[float, float], seconds: float,
               note: str, **extra: Any) -> None:
        acc, f1 = pred if isinstance(pred, tuple) else metrics(test.y, pred)
        results["rows"][row] = {"title": title, "accuracy": acc, "macro_f1": f1,
                                "wall_s": seconds, "command": command(row), "note": note,
                                "load_avg_1m": os.getloadavg()[0], **extra}
        print(f"{row}: test accuracy {acc:.4f}, macro-F1 {f1:.4f}, {seconds:.0f} s\n"
              f"  {note}\n  $ {command(row)}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    if "majority" in rows:
        t0 = time.perf_counter()
        pred, note = majority(train_all, test)
        record("majority", "majority class", pred, time.perf_counter() - t0, note)
    if "bow" in rows:
        t0 = time.perf_counter()
        pred, note = bag_of_words(train_all, valid, test)
        record("bow", "bag-of-words logistic regression", pred, time.perf_counter() - t0, note)
    for row, k in (("zeroshot", 0), ("fewshot", args.shots)):
        if row in rows:
            model, tok = model_and_tokenizer()
            t0 = time.perf_counter()
            shots = pick_shots(train, k, args.seed) if k else []
            pred, note, extra, computed, fresh = prompted_row(row, model, tok, shots, valid,
                                                              test, cache, args.model)
            title = ("SmolLM2 zero-shot (chat template)" if not k
                     else f"SmolLM2 {k}-shot (chat template, prefix cached)")
            # The scoring's measured time (from the cache if it ran before), plus the rest of
            # this run; it counts valid (500, for the calibrated threshold) and test (1,000).
            rest = time.perf_counter() - t0 - fresh
            record(row, title, pred, computed + rest, note, **extra)
    head_rows = [r for r in ("head", "head-meanlast") if r in rows]
    if head_rows:
        model, tok = model_and_tokenizer()
        feats, feat_s = {}, 0.0
        for name, split in (("train", train), ("valid", valid), ("test", test)):
            arrays, s, hit = cached(cache / f"hidden-{name}.npz", digest(args.model, split.texts),
                                    lambda sp=split: hidden_features(model, tok, sp.texts))
            print(f"  hidden states {name}: {len(split.texts)} snippets, "
                  f"{'cached' if hit else 'computed'} in {s:.0f} s", flush=True)
            feats[name], feat_s = arrays, feat_s + s
        n_tokens = sum(int(feats[n]["tokens"].sum()) for n in feats)
        for row in head_rows:
            t0 = time.perf_counter()

            def x(name: str, row: str = row) -> np.ndarray:
                f = feats[name]
                return f["last"] if row == "head" else np.concatenate([f["last"], f["mean"]], 1)

            w, info = train_head(x("train"), train.y, x("valid"), valid.y)
            pred = (x("test") @ w.T).argmax(axis=1)
            np.savez(args.out / f"{row}-weight.npz", weight=w, labels=np.array(LABELS))
            extra: dict[str, Any] = {"head": info, "features_s": feat_s,
                                     "feature_tokens": n_tokens,
                                     "feature_tokens_per_s": n_tokens / feat_s,
                                     "mean_tokens_per_snippet": float(
                                         feats["train"]["tokens"].mean())}
            check = ""
            if row == "head":
                diff = classifier_check(model, tok, w, test.texts[:32], x("test")[:32])
                extra["gptclassifier_max_abs_logit_diff"] = diff
                check = (f"; as GPTClassifier.score, its logits on 32 test snippets within "
                         f"{diff:.1e}")
            head_s = time.perf_counter() - t0
            extra["head_train_s"] = head_s
            # How accuracy grows with the training snippets (their first n, the same selection
            # on valid): whether more labelled data would reach a target. Not in the wall time.
            curve = {}
            for n in CURVE:
                if n < len(train.y):
                    wn, _ = train_head(x("train")[:n], train.y[:n], x("valid"), valid.y)
                    curve[n] = metrics(test.y, (x("test") @ wn.T).argmax(axis=1))[0]
            curve[len(train.y)] = metrics(test.y, pred)[0]
            extra["test_accuracy_by_train_size"] = curve
            check += "; test accuracy by training snippets: " + ", ".join(
                f"{n:,} {a:.3f}" for n, a in curve.items())
            pool = "last token" if row == "head" else "[last token; mean] (1,152 features)"
            note = (f"frozen hidden states at the {pool} of {len(train.y):,} training snippets "
                    f"({feat_s:.0f} s for all three splits, {n_tokens / feat_s:.0f} tokens/s), "
                    f"{info['optimizer']}, weight decay {info['weight_decay']:g}, "
                    f"{info['steps']} steps (valid accuracy {info['valid_accuracy']:.4f}; "
                    f"{head_s:.0f} s){check}")
            title = ("SmolLM2 + classifier head, head only (frozen last-token states)"
                     if row == "head" else "SmolLM2 frozen [last; mean] states + linear probe")
            record(row, title, pred, feat_s + head_s, note, **extra)
    titles = {"head-lora": "SmolLM2 + classifier head, LoRA",
              "head-full": "SmolLM2 + classifier head, full fine-tune",
              "prompt-lora": "SmolLM2 prompt/completion LoRA (chat template, label replies)"}
    for row in FINETUNED:
        if row in rows:
            acc, f1, seconds, note, extra = finetuned_row(
                row, args.model, args.out, {"train": train, "valid": valid, "test": test},
                args.seed)
            record(row, titles[row], (acc, f1), seconds, note, **extra)
    if "trainspeed" in rows:
        model, tok = model_and_tokenizer()
        speed = train_speed(model, tok, train.texts)
        results["trainspeed"] = {**speed, "command": command("trainspeed"),
                                 "load_avg_1m": os.getloadavg()[0]}
        print(f"trainspeed: full fine-tuning, batch {speed['batch']}: "
              f"{speed['seconds_per_step']:.1f} s/step, "
              f"{speed['trained_tokens_per_s']:.0f} trained tokens/s\n"
              f"  $ {command('trainspeed')}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nCPU: {results['cpu']}; MLX {results['mlx']}")
    print("| row | test accuracy | macro-F1 | wall time |\n|---|---|---|---|")
    for row in ROWS:
        if row in results["rows"]:
            r = results["rows"][row]
            print(f"| {r['title']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} "
                  f"| {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
