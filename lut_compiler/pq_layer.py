"""Differentiable product quantization of one layer (LUT-NN), in torch.

For sub-vectors x [R, C, V] (matmul rows, or conv receptive fields), centroids P [C, K, V]
and the layer's weight W [C*V, N]:

    dist[r, c, k] = ||P[c, k]||^2 - 2 x[r, c] . P[c, k]      (what the encode kernel compares)
    forward:  one-hot of argmin_k dist (first k on ties)     = what the compiled model computes
    backward: gradient of softmax(-dist * t), t = softplus(theta) + 1 (straight-through)
    tables T = P . W (+ F, a fixed fitted correction) [C, K, N], fake-quantized per column to int8 like `codebooks.quantize_tables`
        (s[n] = max |T[:, :, n]| / 127, T_q = clip(round(T / s), -127, 127); the rounding is
        straight-through)
    y[r, n] = s[n] * sum_c T_q[c, code[r, c], n] (+ b[n])      (the layer's own bias: the graph adds it;
                                                                b: an optional learned shift)

so the forward pass computes what encode + lookup-add compute on the same centroids (the
sums of int8 entries are exact in float32 up to 2^24 / 127 codebooks).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MAX_INT8 = 127.0


class PQLayer(nn.Module):
    """Sub-vectors float32 [R, C, V] -> float32 [R, N]: argmin codes, table lookups, sums.

    centroids [C, K, V] (trainable), weight [C*V, N] (a buffer unless `train_weight`),
    table_dtype "int8" (fake-quantized tables) or "float32", correction [C, K, N] (a fixed
    buffer added to P . W: `codebooks.fit_correction`; None: none), shift (an output shift
    b [N] that the compiler adds to the layer's bias; None: none) and train_shift (b trains,
    from zero when not given).
    """

    def __init__(self, centroids: np.ndarray, weight: np.ndarray, table_dtype: str = "int8",
                 train_weight: bool = False, correction: np.ndarray | None = None,
                 shift: np.ndarray | None = None, train_shift: bool = False) -> None:
        super().__init__()
        c, k, v = centroids.shape
        if weight.shape[0] != c * v:
            raise ValueError(f"weight has {weight.shape[0]} rows, centroids need C*V = {c * v}")
        self.centroids = nn.Parameter(torch.from_numpy(np.array(centroids, np.float32)))
        w = torch.from_numpy(np.array(weight, np.float32)).reshape(c, v, -1)
        if train_weight:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        fitted = None if correction is None else torch.from_numpy(np.array(correction, np.float32))
        self.register_buffer("correction", fitted)  # None: not in the state dict
        if shift is None and train_shift:
            shift = np.zeros(weight.shape[1], np.float32)
        self.shift = None if shift is None else nn.Parameter(torch.from_numpy(np.array(shift, np.float32)),
                                                             requires_grad=train_shift)
        # t = softplus(theta) + 1 starts at 2
        self.theta = nn.Parameter(torch.tensor(float(np.log(np.e - 1.0))))
        self.table_dtype = table_dtype

    @property
    def temperature(self) -> torch.Tensor:
        return F.softplus(self.theta) + 1.0

    def distances(self, sub: torch.Tensor) -> torch.Tensor:
        """[R, C, K] = ||P||^2 - 2 x . P (||x||^2 dropped: it does not change the argmin)."""
        norms = (self.centroids * self.centroids).sum(-1)
        return norms - 2.0 * torch.einsum("rcv,ckv->rck", sub, self.centroids)

    def assignment(self, sub: torch.Tensor) -> torch.Tensor:
        """[R, C, K]: hard one-hot values, soft-assignment gradients."""
        dist = self.distances(sub)
        hard = F.one_hot(dist.argmin(-1), dist.shape[-1]).to(dist.dtype)
        soft = torch.softmax(-dist * self.temperature, dim=-1)
        return hard + soft - soft.detach()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_q [C, K, N], scale [N]): int8 values as float (straight-through rounding), or
        the float tables with scale 1."""
        tables = torch.einsum("ckv,cvn->ckn", self.centroids, self.weight)
        if self.correction is not None:
            tables = tables + self.correction
        if self.table_dtype == "float32":
            return tables, torch.ones(tables.shape[-1], dtype=tables.dtype, device=tables.device)
        peak = tables.detach().abs().amax(dim=(0, 1))
        scale = torch.where(peak > 0, peak / MAX_INT8, torch.ones_like(peak))
        scaled = tables / scale
        quantized = torch.clamp(scaled + (torch.round(scaled) - scaled).detach(), -MAX_INT8, MAX_INT8)
        return quantized, scale

    def forward(self, sub: torch.Tensor) -> torch.Tensor:
        tables, scale = self.tables()
        out = torch.einsum("rck,ckn->rn", self.assignment(sub), tables) * scale
        return out if self.shift is None else out + self.shift

    def codes(self, sub: torch.Tensor) -> torch.Tensor:
        """uint8 codes [R, C] the forward pass uses."""
        return self.distances(sub).argmin(-1).to(torch.uint8)

    def exported(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(centroids f32 [C, K, V], tables int8|f32 [C, K, N], scale f32 [N], shift f32 [N]) for
        the compiler: the same tables, scale and shift (zeros without one) the forward pass uses."""
        with torch.no_grad():
            tables, scale = self.tables()
            dtype = np.int8 if self.table_dtype == "int8" else np.float32
            shift = np.zeros(len(scale), np.float32) if self.shift is None else self.shift.numpy().copy()
            return (self.centroids.numpy().copy(), tables.numpy().astype(dtype), scale.numpy().astype(np.float32),
                    shift)


class PQLinear(nn.Module):
    """x [..., D] -> PQLayer over D = C*V -> [..., N]."""

    def __init__(self, pq: PQLayer) -> None:
        super().__init__()
        self.pq = pq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, _, v = self.pq.centroids.shape
        rows = x.reshape(-1, c, v)
        return self.pq(rows).reshape(*x.shape[:-1], -1)


class PQConv2d(nn.Module):
    """x [B, Ci, H, W] -> receptive fields (unfold: (ci, r, s) order) -> PQLayer -> [B, N, OH, OW]."""

    def __init__(self, pq: PQLayer, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> None:
        super().__init__()
        self.pq = pq
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        top, left, bottom, right = padding
        self.pad = (left, right, top, bottom)  # F.pad order: last dim first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad)
        b, _, h, w = x.shape
        oh = (h - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        ow = (w - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        fields = F.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)  # [B, Ci*kh*kw, L]
        c, _, v = self.pq.centroids.shape
        out = self.pq(fields.transpose(1, 2).reshape(-1, c, v))  # [B*L, N]
        return out.reshape(b, oh * ow, -1).transpose(1, 2).reshape(b, -1, oh, ow)
