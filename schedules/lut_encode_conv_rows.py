"""Product-quantization encode of a conv2d input, vectorized across output pixels, codes
transposed per image: the encoder of the NCHW shuffle lookup-add, TensorIR + NumPy.

Same codes as `lut_encode_conv` (receptive fields split into C = Ci / group sub-spaces of
V = group*kh*kw elements, first k wins ties), laid out as codes_t [C, B * HWp]: image b's pixel
p = oh*OW + ow at column b*HWp + p, HWp = OH*OW rounded up to the shuffle width
(`lut_lookup_shuffle.padded_rows`), pad columns 0; and packed two per byte on the way out,
codes_p uint8 [ceil(C / 2), B * HWp] (`lut_lookup_shuffle.pack_codes`).

Codebook by codebook (the parallel loop): the codebook's `group` input channels are copied
zero-padded ("pad_zero" then "pad": [B, group, H + pads, W + pads], no bounds checks), then its V shifted planes are copied
into rows-contiguous sub-vector columns ("xt", [V, B, HWp], the im2col of this one sub-space
only: V * B * HWp floats, contiguous loads along ow for stride 1). Then, per float vector of
pixels, as in `lut_encode_rows`: for each centroid k, V fused multiply-adds against the
broadcast P[c, k, :], then compare, min and blend into the running (min, argmin), all in
registers (`lut_encode_rows.schedule_tile`); the codes are stored contiguously. After all
codebooks, one vectorized pass packs them.

Knobs: `lut_encode_rows.EncodeKnobs` (row tile, centroid block; `parallel` here is the
codebook loop; `lut_encode_rows.scheduled_knobs` reads them back); a MetaSchedule design space through the custom rule "lut_encode_conv_rows"
on the argmin block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV
from tvm.script import tirx as T

from .conv_patches import ConvGeometry
from .lut_encode_conv import encode_conv_ref
from .lut_encode_linear import check_centroids
from .lut_lookup_shuffle import packed_codebooks, padded_rows
from .lut_encode_rows import (
    KNOB_ANNOTATION,
    LANES_ANNOTATION,
    EncodeKnobs,
    Factor,
    float_lanes,
    knob_space,
    mark_scheduled,
    schedule_tile,
)
from .lut_encode_rows import default_knobs as rows_default_knobs

SCHEDULE_RULE = "lut_encode_conv_rows"
RULE_FUNCTION = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
# Codes (pixels x codebooks) below which one thread beats waking the pool.
MIN_PARALLEL_CODES = 1 << 12


def image_rows(geom: ConvGeometry, shuffle_lanes: int) -> int:
    """HWp: output pixels per image rounded up to a whole number of shuffle vectors."""
    return padded_rows(geom.out_height * geom.out_width, shuffle_lanes)


def encode_conv_rows(geom: ConvGeometry, centroids: int, shuffle_lanes: int) -> tirx.PrimFunc:
    """(x f32 [B, Ci, H, W], centroids f32 [C, K, V], centroid_sq_norms f32 [C, K])
    -> codes_p uint8 [ceil(C / 2), B * HWp] (`image_rows`; `pack_codes` of the codes);
    `shuffle_lanes` bytes per shuffle of the target (32 AVX2, 64 AVX-512): float vectors are
    shuffle_lanes / 4 wide.

    Blocks under the codebook loop: "pad_zero", "pad", "xt", "xt_pad" (zero sub-vectors in the pad
    pixels), then per vector of pixels "dot" (reduction over V), "nearest" (the first argmin
    over k, annotated with the schedule rule) and "codes_t" (uint8 [C, B * HWp]); after it
    "codes_p" (two codebooks per byte, low nibble first; 0 past C).
    """
    check_centroids(geom.codebooks, centroids)
    lanes = float_lanes(shuffle_lanes)
    b_n, ci_n, h_n, w_n = geom.batch, geom.in_channels, geom.height, geom.width
    oh_n, ow_n, (kh, kw), (sh, sw), (dh, dw) = geom.out_height, geom.out_width, geom.kernel, geom.stride, geom.dilation
    top, left, bottom, right = geom.padding
    g, c_n, v_n, k_n = geom.group, geom.codebooks, geom.subspace_len, centroids
    hp, wp = h_n + top + bottom, w_n + left + right
    pixels, hwp = oh_n * ow_n, image_rows(geom, shuffle_lanes)
    pad_pixels, rows_p = hwp - pixels, b_n * hwp
    patch = kh * kw
    i64 = T.int64
    big = T.float32(3.4028234663852886e38)

    @T.prim_func(s_tir=True)
    def main(
        x: T.Buffer((i64(b_n), i64(ci_n), i64(h_n), i64(w_n)), "float32"),
        p: T.Buffer((i64(c_n), i64(k_n), i64(v_n)), "float32"),
        pn: T.Buffer((i64(c_n), i64(k_n)), "float32"),
        codes_p: T.Buffer((i64(packed_codebooks(c_n)), i64(rows_p)), "uint8"),
    ):
        T.func_attr({"tirx.noalias": True})
        codes_t = T.sblock_alloc_buffer((i64(c_n), i64(rows_p)), "uint8")
        xp = T.sblock_alloc_buffer((i64(b_n), i64(ci_n), i64(hp), i64(wp)), "float32")
        xt = T.sblock_alloc_buffer((i64(c_n), i64(v_n), i64(b_n), i64(hwp)), "float32")
        dot = T.sblock_alloc_buffer((i64(c_n), i64(k_n), i64(rows_p)), "float32")
        near_i = T.sblock_alloc_buffer((i64(c_n), i64(rows_p)), "int32")
        near_v = T.sblock_alloc_buffer((i64(c_n), i64(rows_p)), "float32")
        for c in range(i64(c_n)):
            for b, j, h, w in T.grid(i64(b_n), i64(g), i64(hp), i64(wp)):
                with T.sblock("pad_zero"):
                    vc, vb, vj, vh, vw = T.axis.remap("SSSSS", [c, b, j, h, w])
                    T.sblock_attr({"schedule_rule": "None"})
                    xp[vb, vc * g + vj, vh, vw] = T.float32(0)
            for b, j, h, w in T.grid(i64(b_n), i64(g), i64(h_n), i64(w_n)):
                with T.sblock("pad"):
                    vc, vb, vj, vh, vw = T.axis.remap("SSSSS", [c, b, j, h, w])
                    T.sblock_attr({"schedule_rule": "None"})
                    xp[vb, vc * g + vj, vh + top, vw + left] = x[vb, vc * g + vj, vh, vw]
            for v, b, oh, ow in T.grid(i64(v_n), i64(b_n), i64(oh_n), i64(ow_n)):
                with T.sblock("xt"):
                    vc, vv, vb, voh, vow = T.axis.remap("SSSSS", [c, v, b, oh, ow])
                    T.sblock_attr({"schedule_rule": "None"})
                    xt[vc, vv, vb, voh * ow_n + vow] = xp[
                        vb, vc * g + vv // patch, voh * sh + vv % patch // kw * dh, vow * sw + vv % kw * dw
                    ]
            if pad_pixels > 0:  # evaluated when parsing
                for v, b, q in T.grid(i64(v_n), i64(b_n), i64(pad_pixels)):
                    with T.sblock("xt_pad"):
                        vc, vv, vb, vq = T.axis.remap("SSSS", [c, v, b, q])
                        T.sblock_attr({"schedule_rule": "None"})
                        xt[vc, vv, vb, pixels + vq] = T.float32(0)
            for k, m, v in T.grid(i64(k_n), i64(rows_p), i64(v_n)):  # the loop order of lut_encode_rows
                with T.sblock("dot"):
                    vc, vk, vm, vv = T.axis.remap("SSSR", [c, k, m, v])
                    T.sblock_attr({"schedule_rule": "None"})
                    with T.init():
                        dot[vc, vk, vm] = T.float32(0)
                    dot[vc, vk, vm] = dot[vc, vk, vm] + xt[vc, vv, vm // hwp, vm % hwp] * p[vc, vk, vv]
            for m, k in T.grid(i64(rows_p), i64(k_n)):
                with T.sblock("nearest"):
                    vc, vm, vk = T.axis.remap("SSR", [c, m, k])
                    T.sblock_attr({"schedule_rule": SCHEDULE_RULE, LANES_ANNOTATION: lanes})
                    with T.init():
                        near_i[vc, vm] = 0
                        near_v[vc, vm] = big
                    # the distance is repeated: TVMScript would turn a local into a buffer
                    near_i[vc, vm] = T.Select(
                        pn[vc, vk] - T.float32(2) * dot[vc, vk, vm] < near_v[vc, vm], T.Cast("int32", vk), near_i[vc, vm]
                    )
                    near_v[vc, vm] = T.min(pn[vc, vk] - T.float32(2) * dot[vc, vk, vm], near_v[vc, vm])
            for m in range(i64(rows_p)):
                with T.sblock("codes_t"):
                    vc, vm = T.axis.remap("SS", [c, m])
                    T.sblock_attr({"schedule_rule": "None"})
                    codes_t[vc, vm] = T.if_then_else(vm % hwp < pixels, T.Cast("uint8", near_i[vc, vm]), T.uint8(0))
        for j, m in T.grid(i64(packed_codebooks(c_n)), i64(rows_p)):
            with T.sblock("codes_p"):
                vj, vm = T.axis.remap("SS", [j, m])
                T.sblock_attr({"schedule_rule": "None"})
                codes_p[vj, vm] = codes_t[vj * 2, vm] | T.if_then_else(
                    vj * 2 + 1 < c_n, codes_t[T.min(vj * 2 + 1, c_n - 1), vm] << T.uint8(4), T.uint8(0)
                )

    return main


def encode_conv_rows_ref(x: np.ndarray, centroids: np.ndarray, geom: ConvGeometry, shuffle_lanes: int) -> np.ndarray:
    """NumPy: x float32 [B, Ci, H, W], centroids [C, K, V] -> codes_t uint8 [C, B * HWp], pad
    0, unpacked: the kernel writes `pack_codes` of it."""
    codes = encode_conv_ref(x, centroids, geom).reshape(geom.batch, -1, geom.codebooks)  # [B, OH*OW, C]
    hwp = image_rows(geom, shuffle_lanes)
    codes_t = np.zeros((geom.codebooks, geom.batch, hwp), np.uint8)
    codes_t[:, :, : codes.shape[1]] = codes.transpose(2, 0, 1)
    return codes_t.reshape(geom.codebooks, -1)


# ---------------------------------------------------------------- schedule (knobs: lut_encode_rows.EncodeKnobs)


@dataclass(frozen=True)
class _Kernel:
    """The blocks of an `encode_conv_rows` kernel inside a schedule, and its shape."""

    blocks: dict[str, SBlockRV]
    codebooks: int
    rows_padded: int
    v_len: int
    centroids: int
    lanes: int


BLOCKS = ("pad_zero", "pad", "xt", "dot", "nearest", "codes_t", "codes_p")  # + "xt_pad" if HWp > OH*OW


def find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """The unscheduled conv encoder in `sch`, found by its argmin block's annotation."""
    try:
        root = sch.get_sblock("root")
        blocks = {name: sch.get_sblock(name) for name in BLOCKS}
    except (RuntimeError, ValueError):
        return None
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(root)}
    if "xt_pad" in names:
        blocks["xt_pad"] = sch.get_sblock("xt_pad")
    nearest = sch.get(blocks["nearest"])
    if KNOB_ANNOTATION + "k_block" in sch.get(root).annotations or nearest.annotations.get("schedule_rule") != SCHEDULE_RULE:
        return None
    codebooks, v_len, batch, image = (int(d) for d in sch.get(blocks["xt"]).writes[0].source.shape)
    rows_padded = batch * image
    centroids = int(sch.get(blocks["dot"]).writes[0].source.shape[1])
    return _Kernel(blocks, codebooks, rows_padded, v_len, centroids, int(nearest.annotations[LANES_ANNOTATION]))


def default_knobs(kernel: _Kernel) -> EncodeKnobs:
    """`lut_encode_rows.default_knobs`; parallel (over codebooks) from MIN_PARALLEL_CODES codes."""
    knobs = rows_default_knobs(0, kernel.rows_padded, 0, kernel.v_len, kernel.centroids, kernel.lanes)
    return replace(knobs, parallel=kernel.codebooks * kernel.rows_padded >= MIN_PARALLEL_CODES)


def apply_knobs(sch: s_tir.Schedule, knobs: EncodeKnobs) -> None:
    """Schedule the conv encoder in `sch` with `knobs` (checked first)."""
    kernel = find_kernel(sch)
    if kernel is None:
        raise ValueError("no unscheduled encode_conv_rows kernel in this schedule")
    reason = knobs.check(kernel.rows_padded, kernel.v_len, kernel.centroids, kernel.lanes)
    if reason is not None:
        raise ValueError(f"illegal knobs {knobs}: {reason}")
    _schedule(sch, kernel, knobs.row_vectors, knobs.k_block, knobs.parallel)


def _schedule(sch: s_tir.Schedule, kernel: _Kernel, row_vectors: int, k_block: Factor, parallel: bool) -> None:
    """Codebooks (parallel) -> {copies, vectorized along their innermost loop; row tiles ->
    `lut_encode_rows.schedule_tile` -> the tile's codes}; then the packing (parallel over
    codebook pairs, vectorized)."""
    blocks = kernel.blocks
    j, m = sch.get_loops(blocks["codes_p"])
    sch.vectorize(sch.split(m, [None, kernel.lanes * 4])[1])
    if parallel:
        sch.parallel(j)
    c, m = sch.get_loops(blocks["codes_t"])
    m_o, m_i = sch.split(m, [None, row_vectors * kernel.lanes])
    v, k_o = schedule_tile(sch, blocks["dot"], blocks["nearest"], m_o, m_i, kernel.lanes, k_block)
    for copy in ("pad_zero", "pad", "xt", "xt_pad"):
        if copy in blocks:
            sch.vectorize(sch.get_loops(blocks[copy])[-1])
    if parallel:  # before the decompositions: `parallel` needs whole reduction blocks
        sch.parallel(c)
    sch.decompose_reduction(blocks["dot"], v)
    sch.decompose_reduction(blocks["nearest"], k_o)
    mark_scheduled(sch, row_vectors, k_block, parallel)


def schedule_encode_conv_rows(sch: s_tir.Schedule, _lanes: int = 0, _min_parallel_work: int = 0) -> bool:
    """Default schedule (`default_knobs`) if `sch` holds this encoder, else False (`sch`
    untouched); the signature of the other `schedule_*` in default_cpu.LutKernels."""
    kernel = find_kernel(sch)
    if kernel is None:
        return False
    apply_knobs(sch, default_knobs(kernel))
    return True


def encode_conv_design_space(sch: s_tir.Schedule, _block: SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule design space: one space per (row tile, parallel), the centroid block sampled."""
    kernel = find_kernel(sch)
    if kernel is None:
        return [sch]
    tiles, k_blocks = knob_space(kernel.rows_padded, kernel.v_len, kernel.centroids, kernel.lanes)
    spaces = []
    for row_vectors, parallel in itertools.product(tiles, (True, False)):
        new = sch.copy()
        k_block = new.sample_categorical(list(k_blocks), [1.0 / len(k_blocks)] * len(k_blocks))
        _schedule(new, find_kernel(new), row_vectors, k_block, parallel)
        spaces.append(new)
    return spaces


# MetaSchedule's ApplyCustomRule calls "s_tir.meta_schedule.<target key>.<schedule_rule>".
@tvm.register_global_func(RULE_FUNCTION, override=True)
def _metaschedule_rule(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    return encode_conv_design_space(sch, block)
