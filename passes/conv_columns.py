"""A conv2d's input as the columns a matmul kernel multiplies: [B, Ci * kh * kw, OH * OW].

    1x1, stride 1, no padding:  reshape(x, [B, Ci, H * W])       (no copy)
    otherwise:                  im2col(x)                        (`schedules/im2col.py`)

Shared by the rewrites whose kernels take a conv as a matmul (sparse, int8).
"""

from __future__ import annotations

from tvm import relax

from ..schedules.conv_patches import ConvGeometry
from ..schedules.im2col import im2col
from .call_rewrite import add_kernel
from .find_candidates import Candidate


def geometry(c: Candidate) -> ConvGeometry:
    o, _, kh, kw = c.weight_shape
    a = c.conv
    return ConvGeometry.of(c.input_shape, o, (kh, kw), a.strides, a.padding, a.dilation)


def pointwise(geom: ConvGeometry) -> bool:
    """1x1, stride 1, no padding: the input already is the kernel's [B, K, P] operand."""
    return geom.kernel == (1, 1) and geom.stride == (1, 1) and geom.padding == (0, 0, 0, 0)


def conv_columns(bb: relax.BlockBuilder, c: Candidate, x: relax.Expr) -> tuple[relax.Expr, ConvGeometry]:
    """(the columns float32 [B, K, P] of conv2d call `c` on input x, its geometry)."""
    geom = geometry(c)
    pixels = geom.out_height * geom.out_width
    if pointwise(geom):
        return bb.emit(relax.op.reshape(x, (geom.batch, geom.in_channels, pixels))), geom
    k = geom.in_channels * geom.kernel[0] * geom.kernel[1]
    cols = relax.TensorType((geom.batch, k, pixels), "float32")
    return bb.emit(relax.call_tir(add_kernel(bb, im2col(geom), "im2col"), [x], cols), "im2col"), geom
