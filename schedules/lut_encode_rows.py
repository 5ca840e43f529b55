"""Product-quantization encode vectorized across rows, codes transposed, TensorIR + NumPy.

The encoder of the shuffle lookup-add (`lut_lookup_shuffle`), same math as
`lut_encode_linear` (first k wins ties):

    codes_t[c, m] = argmin_k (Pn[c, k] - 2 * x[m, cV:(c+1)V] . P[c, k])     (0 in pad rows)

x float32 [M, D], centroids P float32 [C, K, V], Pn = ||P[c, k]||^2 float32 [C, K]; the codes
leave packed two per byte, codes_p uint8 [ceil(C / 2), rows_padded] (rows contiguous: what the
shuffle lookup reads, `lut_lookup_shuffle.pack_codes`).

Vectorized across rows, not across centroids: a tile of `row_vectors` float vectors of rows
(8 rows per AVX2 ymm, 16 per AVX-512 zmm) goes through one codebook at a time. Its V
sub-vector columns are transposed into V row vectors ("xt", a strided read), then for each
centroid k the distances of all rows of the tile are V + 1 fused multiply-adds against the
broadcast scalars P[c, k, :] and Pn[c, k], and a compare, a min and a blend update the running
(min, argmin) vectors: no horizontal reduction, each broadcast centroid scalar serves the whole tile, and
all of it stays in registers (the tile's x columns, distances, minima and indices). The
codes of the tile are then stored contiguously into codes_t; one vectorized pass packs them
at the end (codes_p).

Knobs (`EncodeKnobs`): row tile, centroid block, parallel row tiles; a MetaSchedule design
space through the same custom-rule mechanism as the shuffle lookup (block annotation
schedule_rule = "lut_encode_rows").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir.schedule import ExprRV, LoopRV, SBlockRV

from .lut_encode_linear import check_centroids, encode_linear_ref, i64
from .lut_lookup_shuffle import packed_codebooks, padded_rows

SCHEDULE_RULE = "lut_encode_rows"
RULE_FUNCTION = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
KNOB_ANNOTATION = "lut_encode."  # + knob name, on the root block of a scheduled encoder
LANES_ANNOTATION = "lut_encode.lanes"  # float32 per vector, on the argmin block
Factor = int | ExprRV
# Sub-vector elements (rows x D) below which one thread beats waking the pool.
MIN_PARALLEL_ELEMENTS = 1 << 15


def float_lanes(shuffle_lanes: int) -> int:
    """float32 per vector on the ISA whose byte shuffle has `shuffle_lanes` lanes (32 -> 8, 64 -> 16)."""
    if shuffle_lanes not in (32, 64):
        raise ValueError(f"shuffle_lanes must be 32 or 64, got {shuffle_lanes}")
    return shuffle_lanes // 4


def _first_min() -> te.CommReducer:
    """(index, value) reducer: a new value replaces the running one only if strictly smaller,
    so scanning k upwards keeps the first k of ties (the schedule never reorders k)."""

    def combine(acc, new):
        better = new[1] < acc[1]
        return tirx.Select(better, new[0], acc[0]), tirx.Select(better, new[1], acc[1])

    def identity(index_dtype, value_dtype):
        return tirx.const(0, index_dtype), tirx.max_value(value_dtype)

    return te.comm_reducer(combine, identity, name="first_min")


def encode_rows(rows: int, dim: int, codebooks: int, centroids: int, shuffle_lanes: int) -> tirx.PrimFunc:
    """(x f32 [rows, dim], centroids f32 [C, K, V], centroid_sq_norms f32 [C, K])
    -> codes_p uint8 [ceil(C / 2), rows_padded] (`pack_codes` of the codes), V = dim / C,
    rows_padded = `padded_rows(rows, shuffle_lanes)`, pad rows 0; float vectors are
    shuffle_lanes / 4 wide (8 AVX2, 16 AVX-512), kept in the argmin block's annotations.

    Blocks: "xt" (x transposed per sub-space: [C, V, rows_padded], pad rows read the last
    row), "dot", "nearest" (the first argmin over k of Pn - 2 dot, annotated with the
    schedule rule), "codes_t" (uint8 [C, rows_padded]), "codes_p" (`pack_block`).
    """
    check_centroids(codebooks, centroids)
    if dim % codebooks:
        raise ValueError(f"{codebooks} codebooks do not divide dim {dim}")
    lanes, rows_padded = float_lanes(shuffle_lanes), padded_rows(rows, shuffle_lanes)
    v_len = dim // codebooks
    x = te.placeholder(i64(rows, dim), "float32", "x")
    p = te.placeholder(i64(codebooks, centroids, v_len), "float32", "centroids")
    pn = te.placeholder(i64(codebooks, centroids), "float32", "centroid_sq_norms")
    last = tirx.IntImm("int64", rows - 1)
    xt = te.compute(i64(codebooks, v_len, rows_padded), lambda c, v, m: x[tirx.min(m, last), c * v_len + v], name="xt")
    v = te.reduce_axis(i64(0, v_len), "v")
    dot = te.compute(
        i64(codebooks, centroids, rows_padded), lambda c, k, m: te.sum(xt[c, v, m] * p[c, k, v], axis=v), name="dot"
    )
    k = te.reduce_axis(i64(0, centroids), "k")
    first_min = _first_min()
    index, _ = te.compute(
        i64(codebooks, rows_padded),
        lambda c, m: first_min((k.var.astype("int32"), pn[c, k] - 2.0 * dot[c, k, m]), axis=k),
        name="nearest",
        attrs={"schedule_rule": SCHEDULE_RULE, LANES_ANNOTATION: lanes},
    )
    codes_t = te.compute(
        i64(codebooks, rows_padded),
        lambda c, m: tirx.if_then_else(m <= last, index[c, m].astype("uint8"), tirx.const(0, "uint8")),
        name="codes_t",
    )
    return te.create_prim_func([x, p, pn, pack_block(codes_t)])


def pack_block(codes_t: te.Tensor) -> te.Tensor:
    """codes_p[j, m] = codes_t[2j, m] | codes_t[2j + 1, m] << 4 (0 past C): uint8 [C, R] ->
    uint8 [ceil(C / 2), R]."""
    codebooks, rows = (int(d) for d in codes_t.shape)
    last = tirx.IntImm("int64", codebooks - 1)

    def high(j, m):
        if codebooks % 2 == 0:
            return codes_t[2 * j + 1, m] << tirx.const(4, "uint8")
        odd = codes_t[tirx.min(2 * j + 1, last), m] << tirx.const(4, "uint8")
        return tirx.if_then_else(2 * j + 1 <= last, odd, tirx.const(0, "uint8"))

    return te.compute(i64(packed_codebooks(codebooks), rows), lambda j, m: codes_t[2 * j, m] | high(j, m), name="codes_p")


def encode_rows_ref(x: np.ndarray, centroids: np.ndarray, rows_padded: int) -> np.ndarray:
    """NumPy: x float32 [M, D], centroids [C, K, V] -> codes_t uint8 [C, rows_padded] (pad
    rows 0), unpacked: the kernel writes `pack_codes` of it."""
    codes_t = np.zeros((len(centroids), rows_padded), np.uint8)
    codes_t[:, : len(x)] = encode_linear_ref(x, centroids).T
    return codes_t


# ---------------------------------------------------------------- knobs


@dataclass(frozen=True)
class EncodeKnobs:
    """Schedule of `encode_rows`.

    row_vectors: rows per tile in float vectors (the tile's x columns, distances, minima and
        indices take about (V + 3) * row_vectors registers).
    k_block: centroids whose distances are computed together (independent FMA chains).
    parallel: row tiles in parallel (else one thread).
    """

    row_vectors: int
    k_block: int
    parallel: bool

    def check(self, rows_padded: int, v_len: int, centroids: int, lanes: int) -> str | None:
        """Why these knobs are illegal for the shape (None if legal)."""
        space = knob_space(rows_padded, v_len, centroids, lanes)
        for name, values in (("row_vectors", space[0]), ("k_block", space[1])):
            if getattr(self, name) not in values:
                return f"{name}={getattr(self, name)} not in {list(values)}"
        return None


def knob_space(rows_padded: int, v_len: int, centroids: int, lanes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(row_vectors, k_block) legal values: row tiles of 1, 2, 4 vectors that divide the
    padded rows and whose x columns, minima and indices ((V + 2) vectors per row vector)
    fit the 16 (AVX2) / 32 (AVX-512) vector registers, 1 always; centroid blocks 2, 4, 8, 16
    that divide K (K itself if none does)."""
    registers = 16 if lanes <= 8 else 32
    tiles = tuple(r for r in (1, 2, 4) if rows_padded % (r * lanes) == 0 and (r == 1 or (v_len + 2) * r <= registers))
    return tiles, tuple(b for b in (2, 4, 8, 16) if centroids % b == 0) or (centroids,)


def default_knobs(rows: int, rows_padded: int, dim: int, v_len: int, centroids: int, lanes: int) -> EncodeKnobs:
    """One row vector and blocks of up to 8 centroids (measured on Zen 3 AVX2: 8 FMA chains
    hide the FMA latency, more spill), parallel above MIN_PARALLEL_ELEMENTS."""
    _, blocks = knob_space(rows_padded, v_len, centroids, lanes)
    return EncodeKnobs(1, max(b for b in blocks if b <= 8) if min(blocks) <= 8 else min(blocks), rows * dim >= MIN_PARALLEL_ELEMENTS)


# ---------------------------------------------------------------- schedule


@dataclass(frozen=True)
class _Kernel:
    """The blocks and shape of an `encode_rows` kernel inside a schedule."""

    xt: SBlockRV
    dot: SBlockRV
    nearest: SBlockRV
    codes: SBlockRV
    packed: SBlockRV
    rows: int
    rows_padded: int
    dim: int
    v_len: int
    centroids: int
    lanes: int


def _kernel(sch: s_tir.Schedule, nearest: SBlockRV) -> _Kernel | None:
    producers, consumers = sch.get_producers(nearest), sch.get_consumers(nearest)
    if len(producers) != 1 or len(consumers) != 1:
        return None
    dot, codes = producers[0], consumers[0]
    packed = sch.get_consumers(codes)
    if len(packed) != 1:
        return None
    xt = [b for b in sch.get_producers(dot) if sch.get(b).name_hint == "xt"]
    if len(xt) != 1:
        return None
    x = sch.get(xt[0]).reads[0].source
    codebooks, v_len, rows_padded = (int(d) for d in sch.get(xt[0]).writes[0].source.shape)
    centroids = int(sch.get(dot).writes[0].source.shape[1])
    rows, dim = (int(d) for d in x.shape)
    lanes = int(sch.get(nearest).annotations[LANES_ANNOTATION])
    return _Kernel(xt[0], dot, nearest, codes, packed[0], rows, rows_padded, dim, v_len, centroids, lanes)


def find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """The unscheduled row-vectorized encoder in `sch`, found by its block annotation."""
    try:
        root = sch.get_sblock("root")
    except (RuntimeError, ValueError):
        return None
    if KNOB_ANNOTATION + "row_vectors" in sch.get(root).annotations:
        return None
    for block in sch.get_child_blocks(root):
        if sch.get(block).annotations.get("schedule_rule") == SCHEDULE_RULE:
            return _kernel(sch, block)
    return None


def apply_knobs(sch: s_tir.Schedule, knobs: EncodeKnobs) -> None:
    """Schedule the encoder in `sch` with `knobs` (checked first)."""
    kernel = find_kernel(sch)
    if kernel is None:
        raise ValueError("no unscheduled encode_rows kernel in this schedule")
    reason = knobs.check(kernel.rows_padded, kernel.v_len, kernel.centroids, kernel.lanes)
    if reason is not None:
        raise ValueError(f"illegal knobs {knobs}: {reason}")
    _schedule(sch, kernel, knobs.row_vectors, knobs.k_block, knobs.parallel)


def schedule_tile(
    sch: s_tir.Schedule, dot: SBlockRV, nearest: SBlockRV, anchor: LoopRV, m_i: LoopRV, lanes: int, k_block: Factor
) -> tuple[LoopRV, LoopRV]:
    """The distance + argmin of one row tile, shared by both encoders: `anchor` is the loop
    of the codes block whose inner loop `m_i` spans the tile (`m_i` gets vectorized).

    Under `anchor`, per block of `k_block` centroids: the block's distances (V FMAs each,
    the block's centroids interleaved: k_block independent FMA chains hide the FMA latency),
    then per centroid compare, min, blend into the running (min, argmin) (the FMA with -2
    and Pn fused in). Returns the loops to decompose the reductions at (dot's V loop, the
    argmin's centroid-block loop), after any `parallel`."""

    def vectors(loop) -> None:
        outer, inner = sch.split(loop, [None, lanes])
        sch.unroll(outer)
        sch.vectorize(inner)

    sch.compute_at(nearest, anchor)
    m_n, k = sch.get_loops(nearest)[-2:]
    sch.reorder(k, m_n)
    k_o, k_i = sch.split(k, [None, k_block])
    sch.compute_at(dot, k_o, preserve_unit_loops=True)  # V = 1 keeps its unit loop
    d_k, m_d, v = sch.get_loops(dot)[-3:]
    sch.reorder(v, d_k, m_d)
    sch.unroll(v)
    sch.unroll(d_k)
    vectors(m_d)
    sch.unroll(k_i)
    vectors(m_n)
    vectors(m_i)
    return v, k_o


def _schedule(sch: s_tir.Schedule, kernel: _Kernel, row_vectors: int, k_block: Factor, parallel: bool) -> None:
    """Row tiles (parallel) -> codebooks -> {xt: V row vectors (a strided gather);
    `schedule_tile`; the tile's codes}; then the packing (`shuffle_lanes` bytes per vector).
    `k_block` may be a sampled variable (MetaSchedule): the loop structure does not depend on
    its value."""
    c, m = sch.get_loops(kernel.codes)
    m_o, m_i = sch.split(m, [None, row_vectors * kernel.lanes])
    sch.reorder(m_o, c, m_i)
    j, m = sch.get_loops(kernel.packed)
    sch.vectorize(sch.split(m, [None, kernel.lanes * 4])[1])
    v, k_o = schedule_tile(sch, kernel.dot, kernel.nearest, c, m_i, kernel.lanes, k_block)
    sch.compute_at(kernel.xt, c)
    v_x, m_x = sch.get_loops(kernel.xt)[-2:]
    sch.unroll(v_x)
    sch.vectorize(m_x)
    if parallel:  # before the decompositions: `parallel` needs whole reduction blocks
        sch.parallel(m_o)
        sch.parallel(j)
    sch.decompose_reduction(kernel.dot, v)
    sch.decompose_reduction(kernel.nearest, k_o)
    mark_scheduled(sch, row_vectors, k_block, parallel)


def mark_scheduled(sch: s_tir.Schedule, row_vectors: int, k_block: Factor, parallel: bool) -> None:
    """Record the knobs on the root block (`scheduled_knobs` reads them) and keep
    MetaSchedule's stock rules off the scheduled encoder."""
    root = sch.get_sblock("root")
    sch.annotate(root, "schedule_rule", "None")
    for name, value in (("row_vectors", row_vectors), ("k_block", k_block), ("parallel", int(parallel))):
        sch.annotate(root, KNOB_ANNOTATION + name, value)


def schedule_encode_rows(sch: s_tir.Schedule, _lanes: int = 0, _min_parallel_work: int = 0) -> bool:
    """Default schedule (`default_knobs`) if `sch` holds a row-vectorized encoder, else False
    (`sch` untouched). The signature of the other `schedule_*` in default_cpu.LutKernels;
    the lanes come from the kernel, the parallel threshold is MIN_PARALLEL_ELEMENTS."""
    kernel = find_kernel(sch)
    if kernel is None:
        return False
    apply_knobs(sch, default_knobs(kernel.rows, kernel.rows_padded, kernel.dim, kernel.v_len, kernel.centroids, kernel.lanes))
    return True


def encode_design_space(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule design space of the encoder whose argmin block is `block`: one space per
    (row tile, parallel), the centroid block sampled with `sample_categorical`."""
    kernel = _kernel(sch, block)
    if kernel is None:
        return [sch]
    tiles, blocks = knob_space(kernel.rows_padded, kernel.v_len, kernel.centroids, kernel.lanes)
    spaces = []
    for row_vectors, parallel in itertools.product(tiles, (True, False)):
        new = sch.copy()
        k_block = new.sample_categorical(list(blocks), [1.0 / len(blocks)] * len(blocks))
        _schedule(new, _kernel(new, block), row_vectors, k_block, parallel)
        spaces.append(new)
    return spaces


def scheduled_knobs(func: tirx.PrimFunc) -> EncodeKnobs | None:
    """The knobs a scheduled encoder (linear or conv) was built with."""
    annotations = func.body.block.annotations if isinstance(func.body, s_tir.SBlockRealize) else {}
    values = {f.name: annotations.get(KNOB_ANNOTATION + f.name) for f in fields(EncodeKnobs)}
    if any(v is None for v in values.values()):
        return None
    return EncodeKnobs(int(values["row_vectors"]), int(values["k_block"]), bool(int(values["parallel"])))


# MetaSchedule's ApplyCustomRule calls "s_tir.meta_schedule.<target key>.<schedule_rule>".
@tvm.register_global_func(RULE_FUNCTION, override=True)
def _metaschedule_rule(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    return encode_design_space(sch, block)
