"""The hostile-input probe set: every command and the server fed bad input, and what came back.

    python tools/probe.py              # all cases; exit status 1 on any traceback, 500 or loss
    python tools/probe.py --json out.json

Each case is run as a user would run it and judged:

- ``clean``: refused with exactly one ``Error:`` line and a non-zero exit status (commands), or
  a 4xx with an OpenAI-style error body (the server);
- ``traceback``: a Python traceback anywhere in the output (or the server's log);
- ``http 500``: the server answered 5xx;
- ``data loss``: a file that existed before the case is gone or changed afterwards (each case
  gets the same sentinel files: a model folder, a user's notes, a data file);
- ``accepted``: the bad input was taken as if it were good (a finding, not a crash).

Most command cases run in this process (click's runner); a few, and the server's, as real
subprocesses. The counts go in docs/development.md; CI runs this as its own step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx
from click.testing import CliRunner

from mlxgpt.checkpoints.folder import save_model
from mlxgpt.cli import main as cli_main
from mlxgpt.tokenizers import gpt2_tokenizer


@dataclass
class Outcome:
    case: str
    category: str
    verdict: str
    detail: str = ""


@dataclass
class World:
    """The files every case starts from: a small model folder (GPT-2's tokenizer), a user's
    notes folder, JSONL and text data, odd files."""

    root: Path
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256, checked after a case

    def path(self, name: str) -> Path:
        return self.root / name

    def snapshot(self) -> None:
        self.files = {str(p): _digest(p) for p in self.root.rglob("*") if p.is_file()}

    def lost(self) -> list[str]:
        return [p for p, d in self.files.items()
                if not Path(p).is_file() or _digest(Path(p)) != d]


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def build_world(root: Path) -> World:
    w = World(root)
    mx.random.seed(0)
    model = mlxgpt.GPT(mlxgpt.GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                        n_head=2))
    mx.eval(model.parameters())
    save_model(model, root / "model", gpt2_tokenizer())
    # and a BPE of its own (the first 300 of GPT-2's ids: its files and config are read)
    small = mlxgpt.GPT(mlxgpt.GPTConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=1,
                                        n_head=2))
    mx.eval(small.parameters())
    save_model(small, root / "model-bpe", _small_bpe())
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes\n")
    (root / "data.jsonl").write_text("".join(
        json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}."}) + "\n" for i in range(20)))
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 300)
    (root / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (root / "empty.jsonl").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 10)
    (root / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(40)))
    (root / "text.gguf").write_text("hello")
    (root / "plain.file").write_text("not a model")
    (root / "bad.safetensors").write_bytes(b"\x00" * 64)
    (root / "types.json").write_text(json.dumps({"steps": "100"}))
    return w


def _small_bpe():
    from mlxgpt.tokenizers.hf_files import to_hf
    from mlxgpt.tokenizers.load import build_bpe

    gpt2 = gpt2_tokenizer()
    vocab = {to_hf(gpt2.token_bytes(i)): i for i in range(299)}
    merges = [(to_hf(a), to_hf(b)) for a, b in gpt2.merges[:299 - 256]]
    return build_bpe(vocab, merges, {"<|endoftext|>": 299}, gpt2.pattern, Path("probe"))


def bad_folder(w: World, name: str, edit: Callable[[dict], None] | None = None,
               files: dict[str, str] | None = None) -> Path:
    """A copy of the BPE model folder with config.json edited or files replaced."""
    dst = w.path("bad") / name
    if not dst.exists():
        shutil.copytree(w.path("model-bpe"), dst)
        if edit is not None:
            cfg = json.loads((dst / "config.json").read_text())
            edit(cfg)
            (dst / "config.json").write_text(json.dumps(cfg))
        for f, text in (files or {}).items():
            (dst / f).unlink(missing_ok=True)
            if text.startswith("->"):
                (dst / f).symlink_to(text[2:])
            else:
                (dst / f).write_text(text)
    return dst


# --------------------------------------------------------------------------- command cases


def cli_cases(w: World) -> list[tuple[str, str, list[str], str | None]]:
    """(name, category, argv, stdin)."""
    m, d, t = str(w.path("model")), str(w.path("data.jsonl")), str(w.path("text.txt"))
    out = str(w.path("out"))
    gen = ["generate", "-m", m, "-p", "hi", "-n", "2"]
    ft = ["finetune", "--model", m, "--data", d, "--steps", "1", "--out", out]
    pre = ["pretrain", "--data", t, "--steps", "1", "--out", out, "--preset", "nano"]

    def folder(name, edit=None, files=None):
        return str(bad_folder(w, name, edit, files))

    cases = [
        ("seed -1", "options", [*gen, "--seed", "-1"], None),
        ("seed 2**64", "options", [*gen, "--seed", str(2**64)], None),
        ("max tokens 0", "options", [*gen[:-2], "-n", "0"], None),
        ("max tokens -5", "options", [*gen[:-2], "-n", "-5"], None),
        ("top-p 0", "options", [*gen, "--top-p", "0"], None),
        ("top-p 1.5", "options", [*gen, "--top-p", "1.5"], None),
        ("temperature -1", "options", [*gen, "--temp", "-1"], None),
        ("logit bias x", "options", [*gen, "--logit-bias", "x"], None),
        ("logit bias id out of vocab", "options", [*gen, "--logit-bias", "99999999=1"], None),
        ("penalty window -3", "options", [*gen, "--penalty-window", "-3"], None),
        ("model missing", "models", ["generate", "-m", str(w.path("missing")), "-p", "a"], None),
        ("model is a plain file", "models", ["generate", "-m", str(w.path("plain.file")),
                                             "-p", "a"], None),
        ("prompt cache garbage", "integrity", [*gen, "--prompt-cache",
                                               str(w.path("bad.safetensors"))], None),
        ("chat seed -1", "options", ["chat", "-m", m, "--seed", "-1"], "hi\n"),
        ("chat max tokens 0", "options", ["chat", "-m", m, "-n", "0"], "hi\n"),
        ("tokenizer vocab 99999999999", "options",
         ["tokenizer", "train", "--data", t, "--vocab-size", "99999999999", "--out", out], None),
        ("tokenizer vocab 0", "options",
         ["tokenizer", "train", "--data", t, "--vocab-size", "0", "--out", out], None),
        ("tokenizer data missing", "options",
         ["tokenizer", "train", "--data", str(w.path("none.txt")), "--vocab-size", "300",
          "--out", out], None),
        ("pretrain bpe:99999999999", "options", [*pre, "--tokenizer", "bpe:99999999999"], None),
        ("pretrain eval-every -1", "options", [*pre, "--eval-every", "-1"], None),
        ("pretrain n-embd 1e9", "options",
         ["pretrain", "--data", t, "--steps", "1", "--out", out, "--n-embd", "1000000000",
          "--n-head", "1"], None),
        ("pretrain out is a file", "data loss",
         ["pretrain", "--data", t, "--steps", "1", "--out", str(w.path("plain.file"))], None),
        ("pretrain config types", "options",
         ["pretrain", "--data", t, "--out", out, "--config", str(w.path("types.json"))], None),
        ("pretrain steps 0", "options", [*pre[:-2], "--steps", "0", "--preset", "nano"], None),
        ("pretrain binary data", "options",
         ["pretrain", "--data", str(w.path("binary.txt")), "--steps", "1", "--out", out], None),
        ("finetune batch 0", "options", [*ft, "--batch-size", "0"], None),
        ("finetune batch -2", "options", [*ft, "--batch-size", "-2"], None),
        ("finetune grad-accum 0", "options", [*ft, "--grad-accum", "0"], None),
        ("eval limit -1", "options", ["eval", "--model", m, "--data", d, "--limit", "-1"], None),
        ("finetune max-seq-len -5", "options", [*ft, "--max-seq-len", "-5"], None),
        ("finetune deep JSONL", "options",
         ["finetune", "--model", m, "--data", str(w.path("deep.jsonl")), "--steps", "1",
          "--out", out], None),
        ("finetune empty data", "options",
         ["finetune", "--model", m, "--data", str(w.path("empty.jsonl")), "--steps", "1",
          "--out", out], None),
        ("finetune model missing", "models",
         ["finetune", "--model", str(w.path("missing")), "--data", d, "--out", out,
          "--force"], None),
        ("finetune out = model --force", "data loss",
         ["finetune", "--model", m, "--data", d, "--steps", "1", "--out", m, "--force"], None),
        ("finetune out = notes --force", "data loss",
         [*ft[:-2], "--out", str(w.path("notes")), "--force"], None),
        ("eval deep JSONL", "options", ["eval", "--model", m, "--data", str(w.path("deep.jsonl"))],
         None),
        ("eval batch 0", "options", ["eval", "--model", m, "--data", d, "--batch-size", "0"],
         None),
        ("convert notes folder", "models", ["convert", str(w.path("notes")), out], None),
        ("convert over notes --force", "data loss",
         ["convert", m, str(w.path("notes")), "--force"], None),
        ("export onto itself", "data loss", ["export", m, m, "--force"], None),
        ("convert garbage gguf", "models", ["convert", str(w.path("garbage.gguf")), out], None),
        ("convert text as gguf", "models", ["convert", str(w.path("text.gguf")), out], None),
        ("config mlxgpt oops", "metadata",
         ["generate", "-m", folder("mlxgpt-oops", lambda c: c.update(mlxgpt="oops")), "-p", "a"],
         None),
        ("config special tokens list", "metadata",
         ["generate", "-m", folder("special-list", lambda c: c["mlxgpt"]["tokenizer"].update(
             special_tokens=["x"])), "-p", "a"], None),
        ("config vocab lots", "metadata",
         ["generate", "-m", folder("vocab-lots", lambda c: c.update(vocab_size="lots")),
          "-p", "a"], None),
        ("config epsilon abc", "metadata",
         ["generate", "-m", folder("eps-abc", lambda c: c.update(layer_norm_epsilon="abc")),
          "-p", "a"], None),
        ("config tie no", "metadata",
         ["generate", "-m", folder("tie-no", lambda c: c.update(tie_word_embeddings="no")),
          "-p", "a"], None),
        ("config quantization bits x", "metadata",
         ["generate", "-m", folder("bits-x", lambda c: c.update(
             quantization={"bits": "x", "group_size": 64})), "-p", "a"], None),
        ("config n_embd 1e9", "metadata",
         ["generate", "-m", folder("embd-1e9", lambda c: c.update(n_embd=10**9)), "-p", "a"],
         None),
        ("config n_positions 1e12", "metadata",
         ["generate", "-m", folder("pos-1e12", lambda c: c.update(n_positions=10**12)),
          "-p", "a"], None),
        ("config nested deep", "metadata",
         ["generate", "-m", folder("deep", files={"config.json": "[" * 50_000 + "]" * 50_000}),
          "-p", "a"], None),
        ("tokenizer_config [1]", "metadata",
         ["generate", "-m", folder("tokcfg-list", files={"tokenizer_config.json": "[1]"}),
          "-p", "a"], None),
        ("merges.txt symlink out", "integrity",
         ["generate", "-m", folder("symlink", files={"merges.txt": "->/etc/hostname"}),
          "-p", "a"], None),
        ("weights truncated", "metadata",
         ["generate", "-m", folder("trunc", files={"model.safetensors": "xx"}), "-p", "a"],
         None),
        ("fuse without adapter", "models", ["fuse", "--model", m, "--adapter",
                                            str(w.path("missing")), "--out", out], None),
        ("classify missing model", "models",
         ["classify", "--model", str(w.path("missing")), "hello"], None),
        ("serve port 70000", "options", ["serve", "-m", m, "--port", "70000"], None),
        ("serve max-body 0", "options", ["serve", "-m", m, "--max-body", "0"], None),
        ("serve api key file missing", "options",
         ["serve", "-m", m, "--api-key-file", str(w.path("missing"))], None),
        ("fetch unknown", "models", ["fetch", "nope"], None),
        ("unknown option", "options", ["info", "--bogus"], None),
    ]
    return cases


def run_cli(w: World, name: str, category: str, argv: list[str], stdin: str | None) -> Outcome:
    w.snapshot()
    shutil.rmtree(w.path("out"), ignore_errors=True)
    r = CliRunner().invoke(cli_main, argv, input=stdin)
    text = r.output
    lost = w.lost()
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    if lost:
        return Outcome(name, category, "data loss", ", ".join(lost))
    if "Traceback" in text or (r.exception is not None
                               and not isinstance(r.exception, SystemExit)):
        return Outcome(name, category, "traceback", repr(r.exception)[:200])
    if r.exit_code != 0 and len(errors) == 1:
        return Outcome(name, category, "clean", errors[0][:160])
    if r.exit_code == 0:
        return Outcome(name, category, "accepted", text.strip()[-160:])
    return Outcome(name, category, "unclear", text.strip()[-160:])


# --------------------------------------------------------------------------- server cases


def deep(n: int) -> str:
    return "[" * n + "]" * n


def nested_schema_body(n: int) -> bytes:
    """A chat request whose response_format schema nests objects ``n`` deep (written as text:
    Python's json cannot write it)."""
    schema = ('{"type": "object", "properties": {"a": ' * n + '{"type": "string"}'
              + '}, "required": ["a"]}' * n)
    return (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
            b'"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
            b'"schema": ' + schema.encode() + b"}}}")


def chat(extra: dict) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def server_cases() -> list[tuple[str, str, str, bytes | None]]:
    """(name, method, path, body)."""
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    fmt = lambda s: {"response_format": {"type": "json_schema",  # noqa: E731
                                         "json_schema": {"name": "x", "schema": s}}}
    return [
        ("body nested 10000", "POST", "/v1/chat/completions",
         b'{"messages": ' + deep(10_000).encode() + b"}"),
        ("integer of 5000 digits", "POST", "/v1/completions",
         b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"),
        ("schema nested 900", "POST", "/v1/chat/completions", nested_schema_body(900)),
        ("schema nested 2000", "POST", "/v1/chat/completions", nested_schema_body(2000)),
        ("schema minimum 1e40", "POST", "/v1/chat/completions",
         j(chat(fmt({"type": "object", "properties": {"n": {"type": "integer",
                                                           "minimum": 1e40}}})))),
        ("schema unknown keyword", "POST", "/v1/chat/completions",
         j(chat(fmt({"type": "object", "patternProperties": {}})))),
        ("response_format bogus", "POST", "/v1/chat/completions",
         j(chat({"response_format": {"type": "bogus"}}))),
        ("max_tokens -1", "POST", "/v1/completions", j({"prompt": "a", "max_tokens": -1})),
        ("max_tokens string", "POST", "/v1/completions", j({"prompt": "a", "max_tokens": "x"})),
        ("temperature string", "POST", "/v1/chat/completions", j(chat({"temperature": "hot"}))),
        ("temperature nan", "POST", "/v1/completions",
         b'{"prompt": "a", "temperature": NaN}'),
        ("messages not a list", "POST", "/v1/chat/completions", j({"messages": "hi"})),
        ("unknown role", "POST", "/v1/chat/completions",
         j({"messages": [{"role": "wizard", "content": "hi"}]})),
        ("content not text", "POST", "/v1/chat/completions",
         j({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        ("n 1000", "POST", "/v1/completions", j({"prompt": "a", "n": 1000})),
        ("top_logprobs 100", "POST", "/v1/chat/completions",
         j(chat({"logprobs": True, "top_logprobs": 100}))),
        ("ten stop strings", "POST", "/v1/completions", j({"prompt": "a", "stop": ["x"] * 10})),
        ("token ids out of vocab", "POST", "/v1/completions", j({"prompt": [10**9]})),
        ("prompt nested lists", "POST", "/v1/completions", j({"prompt": [[[1]]]})),
        ("empty body", "POST", "/v1/completions", b""),
        ("invalid UTF-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}'),
        ("body not an object", "POST", "/v1/completions", b"[1, 2]"),
        ("body of 5 MB", "POST", "/v1/completions",
         j({"prompt": "a" * (5 << 20)})),
        ("unknown parameter", "POST", "/v1/completions", j({"prompt": "a", "bogus": 1})),
        ("model not a string", "POST", "/v1/completions", j({"prompt": "a", "model": 3})),
        ("stream yes", "POST", "/v1/completions", j({"prompt": "a", "stream": "yes"})),
        ("seed 2**70", "POST", "/v1/completions", j({"prompt": "a", "seed": 2**70})),
        ("logit_bias not numeric", "POST", "/v1/completions",
         j({"prompt": "a", "logit_bias": {"5": "x"}})),
        ("logit_bias huge id", "POST", "/v1/completions",
         j({"prompt": "a", "logit_bias": {str(10**12): 1}})),
        ("GET a POST route", "GET", "/v1/completions", None),
        ("unknown path", "GET", "/v2/bogus", None),
    ]


def run_server_cases(w: World, timeout: float) -> list[Outcome]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = w.path("server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlxgpt", "serve", "--model",
                             str(w.path("model")), "--port", str(port), "--log-level",
                             "warning"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    outcomes = []
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start: " + w.path("server.log").read_text())
            time.sleep(0.2)
        for name, method, path, body in server_cases():
            try:
                r = httpx.request(method, base + path, content=body, timeout=60,
                                  headers={"Content-Type": "application/json"})
                status, text = r.status_code, r.text
            except httpx.HTTPError as e:
                outcomes.append(Outcome(name, "server", "unclear", repr(e)[:160]))
                continue
            if status >= 500:
                verdict = "http 500"
            elif 400 <= status < 500:
                verdict = "clean"
            else:
                verdict = "accepted"
            outcomes.append(Outcome(name, "server", verdict, f"{status} {text[:120]}"))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    if "Traceback" in w.path("server.log").read_text():
        outcomes.append(Outcome("server log", "server", "traceback",
                                w.path("server.log").read_text()[-300:]))
    return outcomes


# --------------------------------------------------------------------------- subprocess cases


def run_process_cases(w: World) -> list[Outcome]:
    """What only a real process shows: a killed pretrain resumes, a native abort never
    happens."""
    outcomes = []
    env = {**os.environ, "MLXGPT_CACHE_DIR": str(w.path("cache"))}
    run = w.path("killed-run")
    cmd = [sys.executable, "-m", "mlxgpt", "pretrain", "--data", str(w.path("text.txt")),
           "--out", str(run), "--preset", "nano", "--steps", "400", "--save-every", "20",
           "--eval-every", "0", "--quiet"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(20)
    p.kill()
    p.wait()
    try:  # wherever the kill caught it, the run goes on from its last checkpoint
        step = json.loads((run / "last" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        step = 0
    r = subprocess.run([*cmd[:cmd.index("--steps")], "--steps", str(step + 5),
                        *cmd[cmd.index("--steps") + 2:], "--resume"], env=env,
                       capture_output=True, text=True)
    text = r.stdout + r.stderr
    verdict = ("traceback" if "Traceback" in text else
               "clean" if r.returncode == 0 else "data loss")
    outcomes.append(Outcome("kill -9 pretrain, then --resume", "data loss", verdict,
                            text.strip()[-160:]))
    r = subprocess.run([sys.executable, "-m", "mlxgpt", "tokenizer", "train", "--data",
                        str(w.path("text.txt")), "--vocab-size", "99999999999", "--out",
                        str(w.path("tok"))], env=env, capture_output=True, text=True)
    text = r.stdout + r.stderr
    verdict = ("traceback" if "Traceback" in text or r.returncode < 0 else
               "clean" if r.returncode == 1 and text.count("Error:") == 1 else "unclear")
    outcomes.append(Outcome("tokenizer vocab 1e11 (process)", "options", verdict,
                            text.strip()[-160:]))
    return outcomes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-process", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxgpt-probe-") as tmp:
        w = build_world(Path(tmp))
        outcomes = [run_cli(w, *c) for c in cli_cases(w)]
        if not args.no_server:
            outcomes += run_server_cases(w, timeout=120)
        if not args.no_process:
            outcomes += run_process_cases(w)
    for o in outcomes:
        print(f"{o.verdict:10s} {o.category:10s} {o.case:34s} {o.detail[:110]}")
    counts = Counter(o.verdict for o in outcomes)
    summary = {"cases": len(outcomes), **{k: counts.get(k, 0) for k in
               ("clean", "traceback", "http 500", "data loss", "accepted", "unclear")}}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary,
                                         "cases": [o.__dict__ for o in outcomes]}, indent=2))
    return 1 if summary["traceback"] or summary["http 500"] or summary["data loss"] else 0


if __name__ == "__main__":
    sys.exit(main())
