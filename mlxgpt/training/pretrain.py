"""``mlxgpt pretrain`` as a library call: a GPT trained from scratch on your own text.

Settings are layered: built-in defaults < ``preset`` < config file (JSON, or YAML when PyYAML is
installed) < explicit options. The run folder RUN_DIR::

    RUN_DIR/model/     the model at the lowest validation loss: an ordinary model folder
                       (``mlxgpt generate --model RUN_DIR/model``, chat, finetune, export)
    RUN_DIR/last/      model folder + optimizer state + step: what --resume continues from
    RUN_DIR/run.json   the settings of the run (a resume reuses them)
    RUN_DIR/tokenizer/ with ``tokenizer="bpe:N"``: the BPE trained on the corpus before the model
                       (a resume reads it back; every model folder also carries a copy)
    RUN_DIR/log.jsonl  every logged step and evaluation; RUN_DIR/loss.png, the loss curve
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoints import folder as mlx_folder
from ..checkpoints.files import (
    atomic_dir,
    atomic_write_text,
    check_apart,
    check_writable,
    read_json,
)
from ..checks import check_int, check_types
from ..core.config import GPTConfig
from ..core.gpt2 import GPT
from ..data.corpus import TokenBatches, read_corpus, split_tokens, tokenize_corpus, train_tokenizer
from ..errors import MlxgptError
from ..tokenizers import Tokenizer, byte_tokenizer, gpt2_tokenizer, tokenizer_from_hf_folder
from ..tokenizers.train import check_vocab_size
from .config import TrainConfig, TrainResult
from .distributed import is_rank0, rank0_echo
from .loop import train
from .loss import lm_loss
from .state import recover_run, run_folder

RUN_FILE = "run.json"
MODEL_DIR = "model"
LAST_DIR = "last"
TOKENIZER_DIR = "tokenizer"

# Model sizes (and the training settings that suit them). "nano" is nanoGPT's CPU "baby"
# shakespeare_char run, "small" its shakespeare_char config, "gpt2" GPT-2 small (124M).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3,
                 min_lr=1e-4, warmup=100, steps=2000, beta2=0.99, dropout=0.0),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, lr=1e-3,
                  min_lr=1e-4, warmup=100, steps=5000, beta2=0.99, dropout=0.2),
    # 8 x 1024 tokens per step as 2 micro-batches of 4: the same step in half the memory
    # (a micro-batch of 8 needs ~30 GiB on the CPU, mostly the 50257-way logits).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=4, grad_accum=2,
                 lr=6e-4, min_lr=6e-5, warmup=700, steps=10000, beta2=0.95, dropout=0.0,
                 tokenizer="gpt2"),
}


@dataclass
class PretrainSettings(TrainConfig):
    """Everything a pretraining run needs: the optimisation settings of :class:`TrainConfig`
    (pretraining's own defaults where they differ), the data, the model's shape and the run's
    files; names match the CLI options (``-`` -> ``_``)."""

    steps: int = 2000
    beta2: float = 0.99  # nanoGPT's for small models (fine-tuning keeps 0.95)
    data: str | None = None
    out: str | None = None
    tokenizer: str = "byte"
    preset: str | None = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    max_tokens: int | None = None  # when given, sets steps = max_tokens / tokens per step
    dropout: float = 0.0
    val_fraction: float = 0.1
    cache_dir: str | None = None
    sample_prompt: str = "\n"
    sample_tokens: int = 200

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum

    def train_config(self) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig.from_dict({k: v for k, v in asdict(self).items() if k in names})


SETTING_NAMES = {f.name for f in fields(PretrainSettings)}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a JSON or YAML file (keys like the options: ``n-layer`` or ``n_layer``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxgptError(f"{p}: cannot read config file ({getattr(e, 'strerror', None) or e})"
                          ) from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MlxgptError(f"{p}: reading YAML needs PyYAML (pip install pyyaml); "
                              f"or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MlxgptError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MlxgptError(f"{p}: not valid JSON ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MlxgptError(f"{p}: expected a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - SETTING_NAMES)
    if unknown:
        raise MlxgptError(f"{p}: unknown setting(s) {', '.join(unknown)}")
    check_types(PretrainSettings, data, str(p))  # {"steps": "100"} is refused, key named
    return data


def resolve_settings(
    flags: dict[str, Any], config_file: str | None = None, base: dict[str, Any] | None = None
) -> PretrainSettings:
    """defaults < base (a resumed run's settings) < preset < config file < flags."""
    from_file = read_config_file(config_file) if config_file else {}
    merged: dict[str, Any] = dict(base or {})
    preset = flags.get("preset") or from_file.get("preset") or merged.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise MlxgptError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        if not base:  # a resumed run keeps its own settings; the preset only names them
            merged.update(PRESETS[preset])
        merged["preset"] = preset
    merged.update(from_file)
    merged.update(flags)
    try:
        s = PretrainSettings(**merged)
    except TypeError as e:
        raise MlxgptError(f"bad settings: {e}") from None
    if s.max_tokens is not None:
        if s.max_tokens < 1:
            raise MlxgptError("max-tokens must be positive")
        s.steps = max(1, math.ceil(s.max_tokens / s.tokens_per_step))
    if s.tokenizer not in ("byte", "gpt2"):
        n = bpe_size(s.tokenizer)
        try:
            check_vocab_size(n)
        except MlxgptError as e:
            raise MlxgptError(f"--tokenizer {s.tokenizer}: {e}") from None
    for name in ("batch_size", "block_size"):
        if getattr(s, name) < 1:
            raise MlxgptError(f"{name.replace('_', '-')} must be at least 1")
    # Every range (the seed's, the model's sizes) is checked before the data is read.
    s.train_config()
    check_int(s.sample_tokens, "sample-tokens", 0)
    GPTConfig(vocab_size={"byte": 257, "gpt2": 50257}.get(s.tokenizer) or bpe_size(s.tokenizer),
              n_positions=s.block_size, n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
              dropout=s.dropout)
    s.warmup = min(s.warmup, s.steps)
    return s


def bpe_size(name: str) -> int:
    """N of a tokenizer named "bpe:N"."""
    kind, _, n = str(name).partition(":")
    if kind != "bpe" or not n.strip().isdigit():
        raise MlxgptError(f"unknown tokenizer {name!r} (choose byte, gpt2 or bpe:N, e.g. bpe:8192)")
    return int(n)


def make_tokenizer(s: PretrainSettings, *, resume: bool, echo: Callable[[str], None],
                   progress: bool = True) -> Tokenizer:
    """byte, gpt2, or ``bpe:N``: trained on the corpus for a new run (``save_tokenizer`` keeps
    it in RUN_DIR/tokenizer), read back from there when the run resumes."""
    if s.tokenizer == "byte":
        return byte_tokenizer()
    if s.tokenizer == "gpt2":
        return gpt2_tokenizer()
    folder = Path(s.out) / TOKENIZER_DIR
    if resume:
        tok = tokenizer_from_hf_folder(folder) if folder.is_dir() else None
        if tok is None:
            raise MlxgptError(f"cannot resume: the run's tokenizer ({folder}) is missing")
        return tok
    corpus = read_corpus(s.data)
    echo(f"tokenizer: training {s.tokenizer} on {corpus.n_bytes / 1e6:,.2f} MB")
    # Every rank trains (the trainer is deterministic); only rank 0 saves it, with run.json.
    run = train_tokenizer(corpus, bpe_size(s.tokenizer), progress=progress and is_rank0())
    note = (f", {run.short_by:,} fewer than asked (the text has no more pairs to merge)"
            if run.short_by else "")
    echo(f"tokenizer: {run.tokenizer.vocab_size:,} ids in {run.seconds:.1f} s "
         f"({run.mb_per_min:,.0f} MB/min){note}")
    return run.tokenizer


def save_tokenizer(s: PretrainSettings, tokenizer: Tokenizer) -> None:
    """RUN_DIR/tokenizer for a trained (bpe:N) tokenizer; byte and gpt2 need none."""
    if s.tokenizer not in ("byte", "gpt2"):
        with atomic_dir(Path(s.out) / TOKENIZER_DIR) as tmp:
            tokenizer.save(tmp)


def init_weights(model: GPT, seed: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights and embeddings, residual projections scaled by
    1/sqrt(2 * n_layer), zero biases, unit LayerNorm gains."""
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    keys = mx.random.split(mx.random.key(seed), len(params))
    std_proj = 0.02 / math.sqrt(2 * model.config.n_layer)
    new = []
    for i, (name, p) in enumerate(params):
        if name.endswith("bias"):
            v = mx.zeros_like(p)
        elif ".ln_" in name or name.startswith("ln_f"):
            v = mx.ones_like(p)
        else:
            std = std_proj if name.endswith("c_proj.weight") else 0.02
            v = std * mx.random.normal(p.shape, key=keys[i])
        new.append((name, v.astype(p.dtype)))
    model.load_weights(new)
    mx.eval(model.parameters())


def build_model(s: PretrainSettings, vocab_size: int) -> GPT:
    cfg = GPTConfig(vocab_size=vocab_size, n_positions=s.block_size, n_embd=s.n_embd,
                    n_layer=s.n_layer, n_head=s.n_head, dropout=s.dropout)
    model = GPT(cfg)
    init_weights(model, s.seed)
    return model


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, n_tokens: int,
                temperature: float = 0.8, seed: int = 0) -> str:
    """A short continuation of ``prompt`` (what training prints at each evaluation)."""
    from ..generation.generate import generate
    from ..generation.sample import SamplingSettings

    return generate(model, tokenizer, prompt, max_tokens=n_tokens,
                    sampling=SamplingSettings(temperature=temperature, seed=seed))


def prepare_run(flags: dict[str, Any], config_file: str | None, resume: bool) -> PretrainSettings:
    """Settings for a new run, or those of the run being resumed with ``flags`` on top."""
    out = flags.get("out")
    if not out:
        raise MlxgptError("--out RUN_DIR is required")
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise MlxgptError(f"--out {run} is a file; RUN_DIR must be a folder (new, or a run's)")
    if is_rank0():  # a checkpoint caught mid-replacement by a kill is put back first
        recover_run(run)
    if resume:
        saved = read_json(run / RUN_FILE) if (run / RUN_FILE).is_file() else None
        if saved is None:
            raise MlxgptError(f"cannot resume: {run / RUN_FILE} not found "
                              f"(not a pretraining run folder)")
        fixed = ("tokenizer", "n_layer", "n_head", "n_embd", "block_size")
        changed = [k for k in fixed if k in flags and flags[k] != saved.get(k)]
        if changed:
            raise MlxgptError(f"cannot resume with a different {changed[0].replace('_', '-')} "
                              f"(the run used {saved.get(changed[0])})")
        s = resolve_settings(flags, config_file, base=saved)
    else:
        s = resolve_settings(flags, config_file)
        # Under mlx.launch only rank 0 checks (and later writes): the others would see its files.
        if is_rank0() and run.exists() and any(run.iterdir()):
            raise MlxgptError(f"{run} already exists and is not empty; continue it with "
                              f"--resume or choose another --out")
    if not s.data:
        raise MlxgptError("--data PATH is required (a text file or a folder of .txt files)")
    check_apart(run, {"--data": s.data})
    return s


def pretrain(
    s: PretrainSettings,
    *,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Tokenize the corpus (cached), build or restore the model, train, write RUN_DIR.

    Under ``mlx.launch`` every process runs this; only rank 0 writes files and messages.
    """
    rank0 = is_rank0()
    say = rank0_echo(echo)
    out = Path(s.out)
    if rank0:
        check_writable(out)  # fail now, not after tokenizing; it leaves nothing behind
    tokenizer = make_tokenizer(s, resume=resume, echo=say, progress=progress)
    tokens = tokenize_corpus(s.data, tokenizer, s.cache_dir, progress=progress)
    train_tok, val_tok = split_tokens(tokens.tokens, s.val_fraction, s.block_size, str(s.data))
    say(f"data: {tokens.n_tokens:,} tokens ({s.tokenizer}) -> {len(train_tok):,} train, "
        f"{0 if val_tok is None else len(val_tok):,} val; cache {tokens.path}")
    train_data = TokenBatches(train_tok, s.batch_size, s.block_size, s.seed)
    val_data = (TokenBatches(val_tok, s.batch_size, s.block_size, s.seed + 1)
                if val_tok is not None else None)

    model = build_model(s, tokenizer.vocab_size)
    n = model.n_params
    say(f"model: {s.n_layer} layers, {s.n_head} heads, {s.n_embd} wide, block {s.block_size}: "
        f"{n / 1e6:.2f}M parameters; {s.tokens_per_step:,} tokens per step, {s.steps} steps")
    with run_folder(out, resume=resume, write=rank0):  # a failure before a checkpoint: no trace
        return _train(s, out, model, tokenizer, train_data, val_data, tokens, resume=resume,
                      progress=progress, say=say, should_stop=should_stop)


def _train(s: PretrainSettings, out: Path, model: GPT, tokenizer: Tokenizer,
           train_data: TokenBatches, val_data: TokenBatches | None, tokens: Any, *,
           resume: bool, progress: bool, say: Callable[[str], None],
           should_stop: Callable[[int], bool] | None) -> TrainResult:
    """Write the run's files and train: what :func:`pretrain` does once the data is good."""
    rank0 = is_rank0()
    if not resume and rank0:
        save_tokenizer(s, tokenizer)
        atomic_write_text(out / RUN_FILE, json.dumps(asdict(s), indent=2) + "\n")
    extra = {"trained_by": "mlxgpt pretrain", "data": str(s.data)}

    def save(m: nn.Module, folder: Path) -> None:
        mlx_folder.write_model_files(m, folder, tokenizer, extra=extra)

    def sample(m: nn.Module) -> str:
        return sample_text(m, tokenizer, s.sample_prompt, s.sample_tokens, seed=s.seed)

    result = train(model, lm_loss, train_data, s.train_config(), out, save_weights=save,
                   load_weights=mlx_folder.restore_weights, val_data=val_data,
                   sample=sample if s.sample_tokens else None,
                   resume=resume, last_name=LAST_DIR, best_name=MODEL_DIR, progress=progress,
                   fingerprint={"data": tokens.meta.get("n_tokens"), "file": tokens.path.name},
                   echo=say, should_stop=should_stop)
    if val_data is None and not result.interrupted and rank0:
        mlx_folder.save_model(model, out / MODEL_DIR, tokenizer, force=True, extra=extra)
    return result
