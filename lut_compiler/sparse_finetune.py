"""Short distillation fine-tune of pruned weights (the LUT path's training loop, `distill`).

Each pruned layer's ONNX node is computed by a masked module whose weight trains and whose
zero blocks stay zero (the mask multiplies the weight, so their gradient is zero too); the
fp32 model is the teacher. The sparsity pattern, and so the compiled kernels, do not change:
only the stored block values do.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .calibration import Feeds
from .config import LearnConfig
from .distill import distill
from .passes.sparse_rewrite import SparseLayer
from .sparse_format import BlockSparse
from .torch_view import OnnxModule


class MaskedLinear(nn.Module):
    """x [..., D] -> x @ (W * mask) [..., N]; W^T and mask [N, D] (no bias: the graph adds it)."""

    def __init__(self, w_t: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(np.array(w_t, np.float32)))
        self.register_buffer("mask", self.weight.detach() != 0)

    def masked(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.masked().T


class MaskedConv2d(MaskedLinear):
    """x [B, Ci, H, W] -> conv2d with (W * mask) reshaped to OIHW; padding (top, left, bottom, right)."""

    def __init__(self, w_t: np.ndarray, weight_shape: tuple[int, ...], stride, padding, dilation) -> None:
        super().__init__(w_t)
        self.shape, self.stride, self.dilation = tuple(weight_shape), tuple(stride), tuple(dilation)
        top, left, bottom, right = padding
        self.pad = (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.masked().reshape(self.shape)
        return F.conv2d(F.pad(x, self.pad), weight, stride=self.stride, dilation=self.dilation)


def masked_module(layer: SparseLayer) -> MaskedLinear:
    c = layer.candidate
    w_t = layer.weight.dense()
    if c.op == "matmul":
        return MaskedLinear(w_t)
    return MaskedConv2d(w_t, c.weight_shape, c.conv.strides, c.conv.padding, c.conv.dilation)


def finetune(onnx_model, layers: list[SparseLayer], samples: list[Feeds], cfg: LearnConfig,
             labels: np.ndarray | None = None, seed: int = 0,
             progress: bool = True) -> tuple[list[SparseLayer], dict]:
    """`layers` with their stored blocks fine-tuned on `samples` (labels int [S, batch]) and
    what the training did (`distill`'s stats). Nodes are found by the candidates' names."""
    modules = {layer.candidate.name: masked_module(layer) for layer in layers}
    student = OnnxModule(onnx_model, modules)
    key = [f"{layer.candidate.name}:{layer.weight.nnzb}x{layer.weight.block}" for layer in layers]
    stats = distill(onnx_model, student, samples, cfg, labels, seed, progress, key, "fine-tune pruned")
    tuned = []
    for layer in layers:
        w_t = student.replaced[student.slots[layer.candidate.name]].masked().detach().numpy()
        tuned.append(replace(layer, weight=replace(layer.weight, data=_blocks(w_t, layer.weight))))
    return tuned, stats


def _blocks(w_t: np.ndarray, pattern: BlockSparse) -> np.ndarray:
    """The blocks of W^T [N, K] at `pattern`'s stored positions, float32 [nnzb, bn, bk]."""
    bn, bk = pattern.block
    rows = np.repeat(np.arange(len(pattern.indptr) - 1), np.diff(pattern.indptr))
    tiles = w_t.reshape(w_t.shape[0] // bn, bn, w_t.shape[1] // bk, bk).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles[rows, pattern.indices], np.float32)
