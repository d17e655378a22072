"""Whether the draft should keep proposing tokens (``--draft-tokens auto``), from what this
machine measures.

Speculative decoding pays where reading k + 1 tokens costs the model little more than reading
one, and where the draft is cheap and often right. Whether it does depends on the machine: on a
2-core AMD EPYC (Zen 3), the shipped english + english-draft pair with 4 drafts a round
decoded greedily at 0.93x the speed without a draft with BLIS, and 1.27x with OpenBLAS. So
with "auto" a generation drafts (AUTO_MAX tokens a round) only while

    tokens a round gives / seconds a round takes  >  1 / seconds a token takes without a draft

- the seconds: a round and a few tokens without the draft, run on the generation itself and
  undone (:func:`measure`; everything counted: the draft catching up and proposing, the
  model's verifying forward, sampling, accepting), kept on disk per model pair, compute setup
  and greedy or sampled decoding (:func:`costs_for`), so that the same seed gives the same
  text on this machine every time (whether a round drafts decides which random numbers a
  sampled token uses);
- the tokens a round gives: this generation's latest rounds (accepted drafts + one of the
  model's own each), starting from a prior of drafts accepted with probability :data:`PRIOR`
  each in turn, counted as :data:`PRIOR_ROUNDS` rounds. (Acceptance comes in runs, so rounds
  are counted as they come rather than modelled draft by draft.)

The tokens a round gives are counted over the last :data:`RECENT_ROUNDS` rounds. When drafting
stops paying, :data:`PAUSE` tokens are decoded without the draft and drafting is tried again,
judged by the prior alone at first; when the prior alone does not pay (the costs rule drafting
out whatever the text), the rest of the generation is decoded without the draft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..atomicio import cached_json
from ..cachedir import cache_root
from ..core.backend import backend

PRIOR, PRIOR_ROUNDS = 0.7, 2  # what is assumed of a draft before it has proposed anything
RECENT_ROUNDS = 8  # rounds whose tokens count
PAUSE = 32  # tokens decoded without the draft before it is tried again
COSTS_FILE = "draft_costs.json"
REPEATS = 5  # timings of each (after one to compile); the median counts


@dataclasses.dataclass(frozen=True)
class DraftCosts:
    """Seconds per token decoded without the draft, and per round with the draft."""

    plain: float
    round: float


def expected_tokens(made: Sequence[int], k: int) -> float:
    """Tokens a round with k drafts gives: as the rounds ``made`` (tokens each) gave them, with
    the prior counted in."""
    prior = sum(PRIOR**i for i in range(k + 1))
    return (sum(made) + prior * PRIOR_ROUNDS) / (len(made) + PRIOR_ROUNDS)


def drafting_pays(costs: DraftCosts, made: Sequence[int], k: int) -> bool:
    """Whether rounds of k drafts make more tokens per second than decoding without them."""
    return expected_tokens(made, k) * costs.plain > costs.round


def measure(trial: Callable[[int], int], k: int) -> DraftCosts:
    """Time ``trial(0)`` (decoding a few tokens without the draft; returns how many) and
    ``trial(k)`` (a round with k drafts); each is undone by ``trial`` itself."""
    def seconds(drafts: int) -> float:
        trial(drafts)  # the first call may compile
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            made = trial(drafts)
            times.append((time.perf_counter() - t) / (made if drafts == 0 else 1))
        return statistics.median(times)

    return DraftCosts(plain=seconds(0), round=seconds(k))


def costs_for(model: nn.Module, draft: nn.Module, trial: Callable[[int], int], k: int,
              greedy: bool) -> DraftCosts:
    """The costs of this model pair on this machine, greedy or sampling (a sampled round draws
    and tests each draft: it costs more): read from the cache folder ($MLXGPT_CACHE_DIR, else
    ~/.cache/mlxgpt) or measured (:func:`measure`) and kept there."""
    return cached_json(cache_root() / COSTS_FILE, _key(model, draft, k, greedy),
                       lambda e: DraftCosts(plain=float(e["plain"]), round=float(e["round"])),
                       lambda: dataclasses.asdict(measure(trial, k)))


def _key(model: nn.Module, draft: nn.Module, k: int, greedy: bool) -> str:
    """The pair (configs, dtypes), the round timed and what decides their speed here."""
    from ..cpu import blas

    def model_id(m: nn.Module) -> dict:
        dtypes = sorted({str(v.dtype) for _, v in tree_flatten(m.parameters())})
        return {"config": m.config.to_dict(), "dtypes": dtypes}

    facts = {"model": model_id(model), "draft": model_id(draft), "k": k, "greedy": greedy,
             "setup": backend().compute_setup(model.kernels), "cpu": blas.cpu_model(),
             "threads": blas.blas_threads()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]
