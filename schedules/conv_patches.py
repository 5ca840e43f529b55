"""Convolution geometry and im2col patches for product-quantized (LUT) convolutions.

A conv2d (NCHW input x [B, Ci, H, W], OIHW weight [O, Ci, kh, kw], groups=1) is a matmul
over receptive fields: patches(x) [B*OH*OW, Ci*kh*kw] @ W.reshape(O, Ci*kh*kw).T, rows
ordered (b, oh, ow), columns (ci, r, s). Product quantization splits the columns into
C = Ci / group sub-spaces of V = group*kh*kw consecutive columns: `group` input channels
times the kh x kw patch, element (j, r, s) of a sub-space at j*kh*kw + r*kw + s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one conv2d and its LUT sub-spaces.

    padding is (top, left, bottom, right); group is input channels per sub-space.
    """

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    out_height: int
    out_width: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    group: int = 1

    @classmethod
    def of(
        cls,
        input_shape: tuple[int, int, int, int],
        out_channels: int,
        kernel: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        dilation: tuple[int, int] = (1, 1),
        group: int = 1,
    ) -> ConvGeometry:
        """The geometry of a conv2d on an NCHW input, output size from the conv formula."""
        b, ci, h, w = input_shape
        oh, ow = _out_size(h, w, kernel, stride, padding, dilation)
        return cls(b, ci, h, w, out_channels, oh, ow, tuple(kernel), tuple(stride), tuple(padding),
                   tuple(dilation), group)

    def __post_init__(self) -> None:
        if self.group < 1 or self.in_channels % self.group:
            raise ValueError(
                f"group {self.group} must divide in_channels {self.in_channels}"
            )
        if min(*self.kernel, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"kernel, stride and dilation must be >= 1 and padding >= 0, got kernel "
                f"{self.kernel}, stride {self.stride}, dilation {self.dilation}, padding {self.padding}"
            )
        expected = _out_size(self.height, self.width, self.kernel, self.stride, self.padding, self.dilation)
        if (self.out_height, self.out_width) != expected or min(expected) < 1:
            raise ValueError(
                f"output {self.out_height}x{self.out_width} does not match the conv formula: input "
                f"{self.height}x{self.width}, kernel {self.kernel}, stride {self.stride}, padding "
                f"{self.padding}, dilation {self.dilation} give {expected[0]}x{expected[1]}"
            )

    @property
    def subspace_len(self) -> int:
        """V: elements of one sub-space (group channels x kh x kw)."""
        return self.group * self.kernel[0] * self.kernel[1]

    @property
    def codebooks(self) -> int:
        """C: sub-spaces per receptive field."""
        return self.in_channels // self.group

    @property
    def rows(self) -> int:
        """Receptive fields (output pixels): batch x out_height x out_width."""
        return self.batch * self.out_height * self.out_width


def _out_size(h, w, kernel, stride, padding, dilation) -> tuple[int, int]:
    top, left, bottom, right = padding
    oh = (h + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def patches(x: np.ndarray, geom: ConvGeometry, rows: np.ndarray | None = None) -> np.ndarray:
    """im2col: x float32 [B, Ci, H, W] -> [B*OH*OW, Ci*kh*kw] (or only `rows` of it), zero
    padded, rows ordered (b, oh, ow) and columns (ci, r, s)."""
    if x.shape != (geom.batch, geom.in_channels, geom.height, geom.width):
        raise ValueError(f"input shape {x.shape} does not match the geometry {geom}")
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    top, left, bottom, right = geom.padding
    padded = np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)])
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw][:, :, : geom.out_height, : geom.out_width]
    if rows is None:  # [B, Ci, OH, OW, kh, kw] -> [B, OH, OW, Ci, kh, kw]
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(geom.rows, -1)
    b, oh, ow = np.unravel_index(rows, (geom.batch, geom.out_height, geom.out_width))
    return windows[b, :, oh, ow].reshape(len(rows), -1)
