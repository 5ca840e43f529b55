"""im2col for the sparse conv path, TensorIR (TE) + NumPy.

x float32 [B, Ci, H, W] -> patches float32 [B, Ci*kh*kw, OH*OW] (groups = 1):

    patches[b, ci*kh*kw + r*kw + s, oh*OW + ow] = x[b, ci, oh*sh + r*dh - top, ow*sw + s*dw - left]

(0 outside x). A kh x kw conv with OIHW weight W is then the NCHW form of
`sparse_matmul.sparse_matmul` with W.reshape(O, Ci*kh*kw) as W^T, `images` = B, on the patches.

Two stages: `pad` (x zero padded, [B, Ci, H + top + bottom, W + left + right]) and `im2col`, a
gather without conditions. `schedule_im2col` (default CPU schedule, applied by
`default_cpu.LutKernels`): per image x channel (parallel) the padded plane (it stays in cache),
then per (r, s, oh) a row of OW output pixels, vectorized.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import s_tir, te, tirx

from .conv_patches import ConvGeometry, patches
from .lut_encode_linear import i64

OUT_WIDTH_ANNOTATION = "im2col.out_width"  # on the gather block: OW (`schedule_im2col` finds the kernel by it)


def im2col(geom: ConvGeometry) -> tirx.PrimFunc:
    """(x f32 [B, Ci, H, W]) -> patches f32 [B, Ci*kh*kw, OH*OW] for `geom` (its out_channels and
    group are ignored)."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    top, left, bottom, right = geom.padding
    b, ci, h, w = geom.batch, geom.in_channels, geom.height, geom.width
    oh, ow = geom.out_height, geom.out_width
    x = te.placeholder(i64(b, ci, h, w), "float32", name="x")

    def padded(n, c, y, z):
        inside = tirx.all(y >= top, y < top + h, z >= left, z < left + w)
        return tirx.if_then_else(inside, x[n, c, y - top, z - left], tirx.const(0.0, "float32"))

    pad = te.compute(i64(b, ci, h + top + bottom, w + left + right), padded, name="pad")

    def gather(n, row, col):
        c, r, s = row // (kh * kw), row // kw % kh, row % kw
        return pad[n, c, col // ow * sh + r * dh, col % ow * sw + s * dw]

    out = te.compute(i64(b, ci * kh * kw, oh * ow), gather, name="im2col", attrs={OUT_WIDTH_ANNOTATION: ow})
    return te.create_prim_func([x, out])


def im2col_ref(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """NumPy: x float32 [B, Ci, H, W] -> float32 [B, Ci*kh*kw, OH*OW]."""
    rows = patches(x, geom)  # [B*OH*OW, Ci*kh*kw]
    return np.ascontiguousarray(rows.reshape(geom.batch, geom.out_height * geom.out_width, -1).transpose(0, 2, 1))


def _find(sch: s_tir.Schedule) -> tuple[s_tir.schedule.SBlockRV, s_tir.schedule.SBlockRV] | None:
    """(pad, gather) blocks of an unscheduled `im2col` kernel, found by the gather's annotation."""
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except (RuntimeError, ValueError):  # no root block
        return None
    if len(blocks) != 2 or OUT_WIDTH_ANNOTATION not in sch.get(blocks[1]).annotations:
        return None
    if len(sch.get_loops(blocks[1])) != 3:  # already scheduled
        return None
    return blocks[0], blocks[1]


def schedule_im2col(sch: s_tir.Schedule, lanes: int, min_parallel_work: int) -> bool:
    """Default CPU schedule of `im2col`; False (`sch` untouched) if `sch` holds something else.

    Loops: images x channels (parallel from `min_parallel_work` output elements) -> the padded
    plane of that channel -> kh*kw -> oh -> ow (vectorized whole up to 4 vectors, else by the
    largest dividing tile of at most 2 vectors).
    """
    found = _find(sch)
    if found is None:
        return False
    pad, gather = found
    n, row, col = sch.get_loops(gather)
    channels = int(sch.get(sch.get_loops(pad)[1]).extent)
    out_width = int(sch.get(gather).annotations[OUT_WIDTH_ANNOTATION])
    image_channel = sch.fuse(n, sch.split(row, [channels, None])[0])
    ow = sch.split(col, [None, out_width])[1]
    if math.prod(int(d) for d in sch.get(gather).writes[0].source.shape) >= min_parallel_work:
        sch.parallel(image_channel)
    sch.compute_at(pad, image_channel)
    if out_width > 4 * lanes:
        ow = sch.split(ow, [None, max(t for t in range(1, 2 * lanes + 1) if out_width % t == 0)])[1]
    sch.vectorize(ow)
    return True
