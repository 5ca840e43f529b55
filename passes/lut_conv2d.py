"""nn.conv2d(x, W) [+ b] -> lut_lookup_add_conv(lut_encode_conv(x), T, s, b).

x [B, Ci, H, W] float32 (NCHW), W [O, Ci, kh, kw] a constant (OIHW), groups = 1. A sub-space
is `group` consecutive input channels times the kh x kw patch (V = group x kh x kw, C = Ci /
group): LUT-NN's V = 9 for 3x3 kernels, V = 4 (4 channels) for 1x1. The encoder reads the
receptive fields directly, without an im2col buffer. Runs on the imported module, before
legalization; the lookup-add folds the following bias add (``lut_rewrite``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..config import LutConfig
from ..schedules.conv_patches import ConvGeometry, patches
from ..schedules.lut_encode_conv import encode_conv
from ..schedules.lut_encode_conv_rows import encode_conv_rows, image_rows
from ..schedules.lut_lookup_conv import lookup_add_conv
from ..schedules.lut_lookup_shuffle import lookup_add_shuffle, packed_codebooks
from .find_candidates import Candidate
from .lut_matmul import shuffle_lanes as matmul_shuffle_lanes
from .call_rewrite import add_kernel


def default_subspace_len(c: Candidate, cfg: LutConfig) -> int:
    kh, kw = c.weight_shape[2:]
    return cfg.pointwise_subspace if kh * kw == 1 else cfg.spatial_channels * kh * kw


def check(c: Candidate, v: int) -> str | None:
    """Why this conv cannot use V-long sub-spaces, or None."""
    attrs = c.conv
    if attrs.layouts != ("NCHW", "OIHW", "NCHW"):
        return f"layout {'/'.join(attrs.layouts)} (NCHW/OIHW only)"
    if attrs.groups != 1:
        kind = "depthwise" if attrs.groups == c.input_shape[1] else "grouped"
        return f"{kind} conv (groups={attrs.groups})"
    ci, kh, kw = c.weight_shape[1:]
    if v % (kh * kw):
        return f"V={v} is not a multiple of the {kh}x{kw} patch"
    if ci % (v // (kh * kw)):
        return f"in_channels={ci} is not a multiple of {v // (kh * kw)} channels per sub-space"
    return None


def geometry(c: Candidate, v: int) -> ConvGeometry:
    b, ci, h, w = c.input_shape
    o, _, kh, kw = c.weight_shape
    a = c.conv
    return ConvGeometry(b, ci, h, w, o, c.output_shape[2], c.output_shape[3], (kh, kw),
                        a.strides, a.padding, a.dilation, v // (kh * kw))


def codebooks(c: Candidate, v: int) -> int:
    kh, kw = c.weight_shape[2:]
    return c.weight_shape[1] * kh * kw // v


def num_rows(c: Candidate) -> int:
    """Receptive fields (output pixels): B x OH x OW."""
    return c.output_shape[0] * c.output_shape[2] * c.output_shape[3]


def subvectors(activation: np.ndarray, c: Candidate, v: int, rows: np.ndarray) -> np.ndarray:
    """The chosen receptive fields, float32 [len(rows), C, V]."""
    return patches(activation, geometry(c, v), rows).reshape(len(rows), -1, v)


def weight_matrix(c: Candidate) -> np.ndarray:
    """float32 [C*V, O]: W flattened in the (channel, r, s) order of the sub-vectors."""
    return c.weight.reshape(c.weight.shape[0], -1).T


def shuffle_lanes(plan, cfg: LutConfig, target: tvm.target.Target) -> int | None:
    """Pixels per VPSHUFB if this layer should use the shuffle lookup-add on ``target``
    (the rule of ``lut_matmul.shuffle_lanes``, counting the output pixels of one image)."""
    _, _, oh, ow = plan.candidate.output_shape
    return matmul_shuffle_lanes(plan, cfg, target, oh * ow)


def kernels(plan, table_dtype: str) -> tuple[tvm.tirx.PrimFunc, tvm.tirx.PrimFunc]:
    """(encode, lookup-add) PrimFuncs of a planned layer: codes [B, OH, OW, C] for the generic
    lookup-add; transposed, padded per image [C, B * HWp] for the shuffle one (NCHW output)."""
    geom = geometry(plan.candidate, plan.subspace_len)
    if plan.lanes:
        pixels = geom.out_height * geom.out_width
        return (encode_conv_rows(geom, plan.centroids, plan.lanes),
                lookup_add_shuffle(pixels, plan.codebooks, geom.out_channels, plan.lanes, images=geom.batch))
    return encode_conv(geom, plan.centroids), lookup_add_conv(geom, plan.centroids, table_dtype)


def emit(bb: relax.BlockBuilder, x: relax.Expr, plan, consts) -> relax.Expr:
    """Encode + lookup-add calls for x; returns the unbound NCHW result."""
    b, o, oh, ow = plan.candidate.output_shape
    encode, lookup = kernels(plan, consts.table_dtype)
    if plan.lanes:
        codes_shape = (packed_codebooks(plan.codebooks), b * image_rows(geometry(plan.candidate, plan.subspace_len), plan.lanes))
    else:
        codes_shape = (b, oh, ow, plan.codebooks)
    codes = bb.emit(relax.call_tir(add_kernel(bb, encode, "lut_encode_conv"), [x, consts.centroids, consts.sq_norms],
                                   relax.TensorType(codes_shape, "uint8")), "lut_codes")
    out_shape = (b, o, oh * ow) if plan.lanes else (b, o, oh, ow)
    y = relax.call_tir(add_kernel(bb, lookup, "lut_lookup_add_conv"), [codes, consts.tables, consts.scale, consts.bias],
                       relax.TensorType(out_shape, "float32"))
    return relax.op.reshape(bb.emit(y), (b, o, oh, ow)) if plan.lanes else y
