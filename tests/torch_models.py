"""Small random-weight torch models exported to ONNX with a dynamic batch dim.

Used where a test needs many shapes fast; the real trained models live in
``lut_compiler.zoo``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 48, hidden: int = 96, d_out: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Conv stem, a residual block, a strided 1x1-projected block, pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(16, 32, 1, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.relu(self.down(x) + self.proj(x))
        return self.head(x.mean(dim=(2, 3)))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + GELU feed-forward, shapes taken from the input."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.out((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.norm2(x))


class Encoder(nn.Module):
    """Token embeddings and two transformer encoder layers."""

    def __init__(self, vocab: int = 100, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.Sequential(EncoderLayer(d, heads), EncoderLayer(d, heads))

    def forward(self, ids):
        return self.layers(self.embed(ids))


def export(model: nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamic: dict[int, str]) -> Path:
    """Export with the TorchScript exporter (opset 17); dims in ``dynamic`` stay symbolic."""
    torch.manual_seed(0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=["out"],
                          dynamic_axes={input_name: dynamic}, opset_version=17, dynamo=False)
    return path


def export_all(directory: Path) -> dict[str, Path]:
    """Seeded exports of the three models; returns name -> path."""
    torch.manual_seed(0)
    return {
        "mlp": export(MLP(), torch.randn(2, 48), directory / "mlp.onnx", "x", {0: "batch"}),
        "cnn": export(CNN(), torch.randn(2, 3, 20, 20), directory / "cnn.onnx", "image",
                      {0: "batch", 2: "height", 3: "width"}),
        "encoder": export(Encoder(), torch.randint(0, 100, (2, 12)), directory / "encoder.onnx", "ids",
                          {0: "batch", 1: "seq"}),
    }
