"""Product-quantization lookup-add of a conv2d (LUT-NN / MADDNESS), TensorIR + NumPy.

With codes uint8 [B, OH, OW, C] (from `lut_encode_conv`), tables T [C, K, O] (int8, or
float32 for debugging), per-output-channel scale and bias float32 [O]:

    Y[b, o, oh, ow] = float32(sum_c acc(T[c, code[b, oh, ow, c], o])) * scale[o] + bias[o]

written NCHW (Y float32 [B, O, OH, OW]); acc as in `lut_lookup_linear` (int32 for int8
tables, float32 for float32 tables). Codes must be < K.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from .conv_patches import ConvGeometry
from .lut_encode_linear import check_centroids, i64
from .lut_lookup_linear import lookup_sums_ref, table_accumulator


def lookup_add_conv(geom: ConvGeometry, centroids: int, table_dtype: str) -> tirx.PrimFunc:
    """(codes uint8 [B, OH, OW, C], tables [C, K, O], scale f32 [O], bias f32 [O])
    -> out f32 [B, O, OH, OW]."""
    check_centroids(geom.codebooks, centroids)
    acc_dtype = table_accumulator(table_dtype)
    pixels = (geom.batch, geom.out_height, geom.out_width)
    codes = te.placeholder(i64(*pixels, geom.codebooks), "uint8", "codes")
    tables = te.placeholder(i64(geom.codebooks, centroids, geom.out_channels), table_dtype, "tables")
    scale = te.placeholder(i64(geom.out_channels), "float32", "scale")
    bias = te.placeholder(i64(geom.out_channels), "float32", "bias")
    c = te.reduce_axis(i64(0, geom.codebooks), "c")
    acc = te.compute(
        i64(*pixels, geom.out_channels),
        lambda b, oh, ow, o: te.sum(tables[c, codes[b, oh, ow, c].astype("int64"), o].astype(acc_dtype), axis=c),
        name="acc",
    )
    out = te.compute(
        i64(geom.batch, geom.out_channels, geom.out_height, geom.out_width),
        lambda b, o, oh, ow: acc[b, oh, ow, o].astype("float32") * scale[o] + bias[o],
        name="out",
    )
    return te.create_prim_func([codes, tables, scale, bias, out])


def lookup_add_conv_ref(codes: np.ndarray, tables: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NumPy lookup-add: codes uint8 [B, OH, OW, C], tables [C, K, O] -> float32 [B, O, OH, OW]."""
    out = lookup_sums_ref(codes, tables).astype("float32") * scale + bias
    return out.transpose(0, 3, 1, 2)
