"""A classifier's predictions (``mlxgpt classify``, :func:`mlxgpt.classify`): each text's likeliest
label and every label's probability, texts cut to the context and batched as in training
(:mod:`mlxgpt.training.classify` trains the head)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from ..core.classifier import GPTClassifier
from ..data.examples import Example, LabelledBatches, text_example
from ..errors import MlxgptError


class Prediction(NamedTuple):
    label: str
    probability: float


def classify(clf: GPTClassifier, tokenizer: Any, texts: Sequence[str], *,
             batch_size: int = 16) -> list[Prediction]:
    """The likeliest label of each text, with its probability."""
    probs = probabilities(clf, tokenizer, texts, batch_size=batch_size)
    return [Prediction(clf.labels[i], float(probs[k, i])) for k, i in enumerate(probs.argmax(-1))]


def probabilities(clf: GPTClassifier, tokenizer: Any, texts: Sequence[str], *,
                  batch_size: int = 16) -> np.ndarray:
    """Each label's probability for each text: (texts, labels), labels in ``clf.labels``'
    order. Texts are cut to the context as in training."""
    examples = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise MlxgptError(f"text {i + 1} is empty")
        examples.append(text_example(tokenizer, text, clf.config.n_positions)[0])
    return example_probabilities(clf, tokenizer, examples, batch_size)


def example_probabilities(clf: GPTClassifier, tokenizer: Any, examples: Sequence[Example],
                   batch_size: int) -> np.ndarray:
    """(examples, labels) probabilities of encoded examples (evaluation passes its own)."""
    if not examples:
        return np.zeros((0, len(clf.labels)), np.float32)
    batches = LabelledBatches(examples, batch_size, lm=False, pad_id=tokenizer.eot_id or 0,
                              max_width=clf.config.n_positions)
    forward = mx.compile(lambda t, n: mx.softmax(clf(t, n).astype(mx.float32), axis=-1),
                         inputs=clf.state)
    return np.concatenate([np.array(forward(t, n)) for t, n, _ in batches.epoch()])
