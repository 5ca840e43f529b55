"""Int8 dense layers: weights quantized per output channel, activations with one calibrated
scale per layer, and the torch module computing what the int8 kernel computes.

Weights: W^T [N, K] -> Wq = clip(round(W^T / w_scale[n]), -q, q), w_scale[n] = max_k
|W^T[n, k]| / q, q = 2^(bits - 1) - 1 (bits from the target: 7 where the kernel sums int16
pairs, `schedules.int8_matmul.weight_bits`). Activations: x_scale = max |x| / 127 over the
calibration samples (min-max), xq = clip(round(x / x_scale), -128, 127) (+ 128 in the kernel).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .passes.find_candidates import Candidate
from .passes.int8_rewrite import Int8Layer
from .passes.sparse_rewrite import weight_t


def int8_layer(c: Candidate, x_absmax: float, bits: int) -> Int8Layer:
    """The call quantized: per-channel weights at `bits`, activation scale from its max |x|."""
    w_t = weight_t(c)
    q = 2 ** (bits - 1) - 1
    w_scale = np.maximum(np.abs(w_t).max(axis=1), 1e-30).astype(np.float32) / np.float32(q)
    wq = np.clip(np.round(w_t / w_scale[:, None]), -q, q).astype(np.int8)
    bias = c.bias if c.bias is not None else np.zeros(w_t.shape[0], np.float32)
    return Int8Layer(c, wq, w_scale, max(float(x_absmax), 1e-30) / 127.0, bias.astype(np.float32))


class Int8Module(nn.Module):
    """The layer's ONNX node as the int8 kernel computes it (no bias: the graph adds it):
    x fake-quantized with x_scale, times the dequantized weights; linear x [..., K] or conv
    x [B, Ci, H, W] (padding top, left, bottom, right)."""

    def __init__(self, layer: Int8Layer) -> None:
        super().__init__()
        c = layer.candidate
        weight = torch.from_numpy(layer.wq.astype(np.float32) * layer.w_scale[:, None])
        self.register_buffer("weight", weight if c.op == "matmul" else weight.reshape(c.weight_shape))
        self.x_scale, self.conv = layer.x_scale, c.conv
        self.inv_scale = float(np.float32(1.0 / layer.x_scale))  # the kernel multiplies by this float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(torch.round(x * self.inv_scale), -128, 127) * self.x_scale
        if self.conv is None:
            return x @ self.weight.T
        top, left, bottom, right = self.conv.padding
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, stride=tuple(self.conv.strides),
                        dilation=tuple(self.conv.dilation))
