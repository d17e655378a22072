"""Data parallelism under ``mlx.launch``: the process group, batch shards, the one gradient
all-sum per step, and rank 0 as the only process that writes or prints.

Every rank draws the same global batch and takes its rows (:func:`shard`); gradients and the
token counts that weight them are summed in ONE ``mx.distributed.all_sum`` over a flattened
buffer (:func:`all_sum_tree`), so the global batch size and learning-rate schedule mean the same
as on one process.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MlxgptError

Batch = tuple[mx.array, ...]


def world() -> mx.distributed.Group:
    """The process group: size 1 unless launched by ``mlx.launch`` (or MPI)."""
    return mx.distributed.init()


def all_sum_tree(tree: Any, group: mx.distributed.Group) -> Any:
    """Sum a tree of arrays over all ranks with ONE fused all_sum (not one per tensor).

    This is the single place where ranks exchange gradients.
    """
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    vec = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
    vec = mx.distributed.all_sum(vec, group=group)
    out, start = [], 0
    for k, v in flat:
        out.append((k, vec[start : start + v.size].reshape(v.shape).astype(v.dtype)))
        start += v.size
    return tree_unflatten(out)


def shard(batch: Batch, group: mx.distributed.Group) -> Batch:
    """This rank's rows of a global batch (every rank draws the same global batch)."""
    n = group.size()
    if n == 1:
        return batch
    rows = batch[0].shape[0]
    if rows % n:
        raise MlxgptError(f"the batch of {rows} rows does not divide across {n} processes; "
                          f"use a batch size that is a multiple of {n}")
    r, per = group.rank(), rows // n
    return tuple(a[r * per : (r + 1) * per] for a in batch)


def check_ranks_agree(fingerprint: dict[str, Any], group: mx.distributed.Group) -> None:
    """Refuse to start when ranks disagree on model, data or settings (compared by hash)."""
    if group.size() == 1:
        return
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).digest()
    mine = mx.array(np.frombuffer(digest, dtype=np.uint8).astype(np.int32))
    every = np.array(mx.distributed.all_gather(mine[None], group=group))  # (ranks, 32)
    if not (every == every[0]).all():
        bad = [i for i in range(len(every)) if not (every[i] == every[0]).all()]
        raise MlxgptError(f"processes disagree on the model, data or settings "
                          f"(rank 0 vs rank {bad[0]}); every rank must get the same inputs")


def is_rank0() -> bool:
    return world().rank() == 0


def rank0_echo(echo: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """``echo`` (default: a line on stderr) on rank 0; on the other ranks, silence."""
    if not is_rank0():
        return lambda _: None
    return echo or (lambda s: print(s, file=sys.stderr))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The dropout RNG seed of optimizer step ``step`` on ``rank``: a pure function, so resume
    is exact; ranks differ so their rows do not share dropout masks."""
    key = [seed, step] if rank == 0 else [seed, step, rank]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
