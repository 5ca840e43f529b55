"""``mlp``: a 64 -> 256 -> 256 -> 10 ReLU MLP trained on scikit-learn's 8x8 digits.

Input ``x`` float32 [batch, 64] (pixels in [0, 1]); output ``logits`` float32
[batch, 10]. Trained in about two seconds, exported with torch's dynamo exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data, train

ACCURACY_FLOOR = 0.95  # on the 360 held-out digits
SEED = 0


def build(path: Path) -> None:
    """Train the MLP and write it to ``path`` as ONNX."""
    import torch

    torch.manual_seed(SEED)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    x, y = data.digits_8x8("train")
    train.fit(net, x, y, epochs=30, batch_size=64, lr=3e-3, seed=SEED)
    acc = train.accuracy(net, *data.digits_8x8("test"))
    if acc < ACCURACY_FLOOR:
        raise RuntimeError(f"mlp reached test accuracy {acc:.4f} < {ACCURACY_FLOOR}")
    train.export_classifier(net, path, x[:2], "x", dynamo=True)
    train.set_metadata(path, dataset="sklearn load_digits", test_accuracy=f"{acc:.4f}")
    train.check_against_torch(path, net, sample_inputs(batch=4), atol=1e-5)


def sample_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """``x``: ``batch`` real held-out digits, float32 [batch, 64]."""
    x, _ = data.digits_8x8("test")
    return {"x": x[data.pick(len(x), batch, seed)]}


def labelled_data(split: str = "test") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feeds {"x": float32 [N, 64]} and int64 labels [N] of one split."""
    x, y = data.digits_8x8(split)
    return {"x": x}, y
