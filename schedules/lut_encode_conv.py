"""Product-quantization encode of a conv2d input (LUT-NN / MADDNESS), TensorIR + NumPy.

The receptive field of output pixel (b, oh, ow) of x float32 [B, Ci, H, W] (zero padded,
see `conv_patches.ConvGeometry`) is split into C = Ci / group sub-spaces of V =
group*kh*kw elements; element (j, r, s) of sub-space c is
x[b, c*group + j, oh*sh + r*dh - top, ow*sw + s*dw - left], at j*kh*kw + r*kw + s. Then

    code[b, oh, ow, c] = argmin_k (Pn[c, k] - 2 * field(b, oh, ow, c) . P[c, k])

as in `lut_encode_linear`, with centroids P float32 [C, K, V], Pn float32 [C, K] and codes
uint8 [B, OH, OW, C]. The kernel reads x directly (no im2col buffer).
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from .conv_patches import ConvGeometry, patches
from .lut_encode_linear import check_centroids, i64, nearest_codes, nearest_codes_ref


def encode_conv(geom: ConvGeometry, centroids: int) -> tirx.PrimFunc:
    """(x f32 [B, Ci, H, W], centroids f32 [C, K, V], centroid_sq_norms f32 [C, K])
    -> codes uint8 [B, OH, OW, C]."""
    check_centroids(geom.codebooks, centroids)
    (kh, kw), (sh, sw), (dh, dw), group = geom.kernel, geom.stride, geom.dilation, geom.group
    top, left = geom.padding[:2]
    x = te.placeholder(i64(geom.batch, geom.in_channels, geom.height, geom.width), "float32", "x")
    p = te.placeholder(i64(geom.codebooks, centroids, geom.subspace_len), "float32", "centroids")
    pn = te.placeholder(i64(geom.codebooks, centroids), "float32", "centroid_sq_norms")
    j, r, s = (te.reduce_axis(i64(0, n), name) for n, name in ((group, "j"), (kh, "r"), (kw, "s")))

    def dot(b, oh, ow, c, k):
        h, w = oh * sh + r * dh - top, ow * sw + s * dw - left
        inside = tirx.all(h >= 0, h < geom.height, w >= 0, w < geom.width)
        pixel = tirx.if_then_else(inside, x[b, c * group + j, h, w], tirx.const(0, "float32"))
        return te.sum(pixel * p[c, k, j * (kh * kw) + r * kw + s], axis=[j, r, s])

    shape = i64(geom.batch, geom.out_height, geom.out_width, geom.codebooks, centroids)
    return te.create_prim_func([x, p, pn, nearest_codes(te.compute(shape, dot, name="dot"), pn)])


def encode_conv_ref(x: np.ndarray, centroids: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """NumPy encode: x float32 [B, Ci, H, W], centroids [C, K, V] -> codes uint8 [B, OH, OW, C]."""
    fields = patches(x, geom).reshape(geom.batch, geom.out_height, geom.out_width, geom.codebooks, -1)
    return nearest_codes_ref(fields, centroids)
