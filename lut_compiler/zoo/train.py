"""Seeded training, export and export checks shared by the zoo's builders.

torch is imported inside the functions: importing the zoo must not need it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def fit(model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Train ``model`` in place with AdamW and a one-cycle schedule on (x, y); leaves it in eval mode.

    Runs on one thread: the result then does not depend on the core count, and
    on a busy 2-core machine one thread trained 5-8x faster than two (OpenMP
    workers spin against the other load).
    """
    import torch
    import torch.nn.functional as F

    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(ys) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(ys), generator=order).split(batch_size):
                loss = F.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on float32 ``x`` against int64 ``y``."""
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


OPSET = 20  # every zoo export; pinned so a torch upgrade cannot change the graphs silently


def export(model, args: tuple, path: Path, **options) -> None:
    """``torch.onnx.export`` at ``OPSET`` with its warnings silenced.

    They are about the legacy exporter's deprecation, tracing and constant
    folding; every caller instead checks the file against torch on shapes other
    than the traced ones.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, opset_version=OPSET, **options)


def export_classifier(model, path: Path, example: np.ndarray, input_name: str, *, dynamo: bool) -> None:
    """Export a classifier: ``input_name`` [batch, ...] -> ``logits`` [batch, 10], batch dynamic."""
    import torch

    names = {"input_names": [input_name], "output_names": ["logits"]}
    if dynamo:
        dims = ({0: torch.export.Dim("batch")},)
        # external_data=False: one self-contained file (the default writes weights to "<path>.data")
        export(
            model, (torch.from_numpy(example),), path,
            dynamo=True, dynamic_shapes=dims, external_data=False, verbose=False, **names,
        )
    else:
        axes = {input_name: {0: "batch"}, "logits": {0: "batch"}}
        export(model, (torch.from_numpy(example),), path, dynamo=False, dynamic_axes=axes, **names)


def check_against_torch(path: Path, model, feeds: dict[str, np.ndarray], atol: float) -> None:
    """Raise if ONNX Runtime on ``path`` differs from ``model(*feeds.values())`` by more than ``atol``."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        out = model(*(torch.from_numpy(v) for v in feeds.values()))
    expected = out if isinstance(out, tuple) else (out,)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for ref, val in zip(expected, got, strict=True):
        err = float(np.abs(ref.numpy() - val).max())
        if err > atol:
            raise RuntimeError(f"{path.name}: ONNX Runtime differs from torch by {err:.3g} > {atol:.3g}")


def set_metadata(path: Path, **props: str) -> None:
    """Store string properties (dataset, accuracy) in the ONNX file's ``metadata_props``."""
    import onnx

    model = onnx.load(path)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)
