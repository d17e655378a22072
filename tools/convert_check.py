"""Conversion time and logit parity per dtype on a random GPT-2 124M-shape checkpoint.

    python tools/convert_check.py [--seq 64] [--seed 0] [--workdir DIR]

Builds a random-init transformers GPT2LMHeadModel with GPT-2 124M's shape (every parameter
random), saves it as model.safetensors and as a legacy pytorch_model.bin, times
``mlxgpt.checkpoints.convert.convert`` on each (read, transpose, build, write a 500 MB folder;
the first conversion also pays for warming the page cache), then converts to float16, bfloat16,
8-bit and 4-bit and compares logits with transformers' fp32 forward on one random sequence.
Half-precision folders are evaluated in their stored dtype
(``mlxgpt.checkpoints.folder.load_model``,
as a GPU runs them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (preloads the fast BLAS before mlx)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the random-checkpoint helpers live with the tests

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from _hf_helpers import hf_logits, random_hf_model, save_hf_checkpoint  # noqa: E402

from mlxgpt.checkpoints.convert import convert  # noqa: E402
from mlxgpt.checkpoints.folder import load_model  # noqa: E402
from mlxgpt.cpu import blas  # noqa: E402

VARIANTS = {  # name -> convert() options
    "float32": {},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
    "8-bit g64": {"quantize_bits": 8, "group_size": 64},
    "4-bit g64": {"quantize_bits": 4, "group_size": 64},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64, help="tokens in the compared sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, blas: {blas.blas_in_use()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        hf = random_hf_model({}, seed=args.seed)
        print(f"random GPT-2 124M-shape model built in {time.perf_counter() - t0:.1f} s")
        save_hf_checkpoint(hf, work / "hf-st", "safetensors")
        save_hf_checkpoint(hf, work / "hf-bin", "bin", legacy_keys=True)

        print("\nconversion time (fp32 folder):")
        for src in ("hf-st", "hf-bin", "hf-st", "hf-bin"):
            s = convert(work / src, work / "out", force=True)
            print(f"  {src:7s} {s.seconds:5.2f} s   ({s.line()})")

        tokens = np.random.default_rng(args.seed).integers(0, 50257, (1, args.seq))
        ref = hf_logits(hf, tokens)[0]  # (T, V)
        sigma = float(ref.std())
        print(f"\nlogits vs transformers fp32 (T={args.seq}, logit std {sigma:.3f}):")
        print(f"  {'variant':10s} {'max|diff|':>10s} {'/std':>9s} {'rms/std':>9s} {'top-1':>6s}")
        for name, opts in VARIANTS.items():
            folder = work / f"out-{name.replace(' ', '')}"
            convert(work / "hf-st", folder, force=True, **opts)
            model = load_model(folder)
            out = np.array(model(mx.array(tokens)).astype(mx.float32))[0]
            diff = np.abs(out - ref)
            top1 = float((out.argmax(-1) == ref.argmax(-1)).mean())
            rms = float(np.sqrt((diff**2).mean()))
            print(f"  {name:10s} {diff.max():10.2e} {diff.max() / sigma:9.2e} "
                  f"{rms / sigma:9.2e} {top1:6.1%}")


if __name__ == "__main__":
    main()
