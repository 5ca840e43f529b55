"""Lookup-add with byte-shuffle table lookups (VPSHUFB), vectorized across rows, TensorIR + NumPy.

Same math as `lut_lookup_linear` with K = 16 centroids and int8 tables T [C, 16, N]:

    Y[m, n] = float32(sum_c T[c, code[m, c], n]) * scale[n] + bias[n]          Y float32 [M, N]

and a conv form (`images` = B) whose rows are the P = OH * OW output pixels of each of B
images and whose output is NCHW (spatial dims flattened; the caller reshapes to [B, N, OH, OW]):

    Y[b, n, p] = float32(sum_c T[c, code[b, p, c], n]) * scale[n] + bias[n]    Y float32 [B, N, P]

MADDNESS / T-MAC style: the 16-entry table T[c, :, n] fits one 128-bit lane, so VPSHUFB looks
it up for a whole vector of rows at once (32 rows per 2 shuffles with AVX2 ymm, 64 with
AVX-512BW zmm: `lanes`), indexed by the codes of codebook c for those rows.

Layouts (made once: at compile time, or by the encoder):
- codes_p uint8 [C2, rows_padded], C2 = ceil(C / 2): 4-bit codes packed two per byte (codebook
  2j in the low nibble, 2j + 1 in the high one, 0 past C; `pack_codes`), transposed (rows
  contiguous), rows_padded = rows rounded up to `lanes` (`padded_rows`). Pad rows may hold any
  byte (their sums are computed and never stored); `lut_encode_rows.encode_rows` writes this
  layout (0 in pad rows). Conv form (written by `lut_encode_conv_rows.encode_conv_rows`):
  codes_p uint8 [C2, B * padded_rows(P, lanes)], each image's pixels padded separately, image
  b's pixel p in column b * padded_rows(P, lanes) + p: no row vector holds pixels of two
  images, so each vector's results go to one contiguous run of one output plane.
- tables_l uint8 [N, C, lanes] (`shuffle_tables`): T[c, :, n] + 128 (0..255), repeated in every
  128-bit lane (N*C*lanes bytes: 2x the int8 tables with AVX2, 4x with AVX-512). Column-major
  ([N, C, ...]) so that the tables of a column tile are contiguous: with [C, N, lanes] the C
  tables of one column sit N*lanes bytes apart, a multiple of 4 KiB, all in one L1 set (that
  layout ran 2x slower).

Exact sums in uint16 without widening instructions: the kernel first unpacks index =
uint16(code) | 0x8000 (once per call, [C, rows_padded]: the nibbles are unpacked there, not
in the shuffle loop, whose two shuffle pipes are its bound). Seen as bytes, each 16-bit word is (code,
0x80), and VPSHUFB writes 0 for an index byte with bit 7 set, so VPSHUFB(table, index words of
`lanes / 2` rows) returns T + 128 of those rows already zero-extended to uint16. Per `lanes`
lookups: two shuffles and two VPADDW. (Sign-extending int8 shuffle results instead costs a
VPEXTRACTI128 and two VPMOVSXBW per shuffle, all on Zen 3's two shuffle pipes: 2x slower.)

Bound: a uint16 block accumulator adds at most B biased lookups of at most 255 each, so
0 <= sum <= 255 * B <= 65535 for B <= 257 (`MAX_BLOCK`): exact. After each block of B
codebooks the uint16 sums are added into int32 (at most 255 * C: no overflow below C = 8.4 M);
the epilogue subtracts 128 * C (exact in int32) and converts to float32 (exact while
|sum| <= 2^24, i.e. C <= 131072), then multiplies by scale and adds bias.

Schedule: `ShuffleKnobs` (row tile, column tile, codebook block, unroll, parallel loop) with
legality filters (`knob_space`, `ShuffleKnobs.check`), `default_knobs` for untuned builds
(`schedule_lookup_add_shuffle`, applied by `default_cpu.LutKernels`) and a MetaSchedule
design space (`shuffle_design_space`) that samples the same knobs. The kernel's reduction
block carries the annotation `schedule_rule = "lut_lookup_shuffle"`: MetaSchedule's
post-order-apply space generator (its first rule, ApplyCustomRule) then calls the global
function "s_tir.meta_schedule.cpu.lut_lookup_shuffle" (registered below) for that block; the
other blocks carry `schedule_rule = "None"`, and the scheduled root block too, so that no stock
rule touches the kernel.

Loop nest (`apply_knobs`), after the index pass: parallel column tiles [x row tiles] -> row
tiles -> codebook blocks -> codebooks of the block (partly unrolled) -> column tile (unrolled)
-> row vectors of the tile (unrolled) -> {2 shuffles, uint16 adds over `lanes` rows
(vectorized)}; after each block the uint16 tile is added into an int32 tile, and after the
last block the output tile is written. Linear form: Y is row-major, so each row gets `col_tile`
contiguous floats (gathered from the int32 tile, whose rows are contiguous). Conv form: the
pixels of one output channel are contiguous in Y as in the int32 tile, so each (row vector,
column) of the tile is `lanes` contiguous loads, converts, multiply-adds and stores (the last
vector of an image: its P % lanes pixels; whole and partial vectors are two branches of the
output block, each a vectorized loop). Row tiles only need to divide all images' row vectors:
a tile may hold vectors of two images, each vector writes into its own image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import ExprRV, SBlockRV
from tvm.script import tirx as T
from tvm.target.codegen import llvm_cpu_has_features

from .kernel_blocks import first_illegal, unscheduled_block

CENTROIDS = 16
TABLE_OFFSET = 128
# Largest codebook block whose uint16 sums cannot overflow: 255 * B <= 65535.
MAX_BLOCK = 65535 // 255  # 257
SHUFFLE_INTRINSIC = {32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}
# Block annotations: MetaSchedule's ApplyCustomRule looks up "s_tir.meta_schedule.<target key>.<rule>".
SCHEDULE_RULE = "lut_lookup_shuffle"
RULE_FUNCTION = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
# Lookups below which one thread is faster than waking the pool (`default_knobs`), and
# below which tuning tries one thread too (`knob_space`).
MIN_PARALLEL_LOOKUPS = 1 << 18
SERIAL_LOOKUPS = 1 << 20


def shuffle_lanes(target: tvm.target.Target) -> int | None:
    """Rows per shuffle on `target`: 64 with AVX-512BW, 32 with AVX2, None otherwise (then
    use `lut_lookup_linear`)."""
    if llvm_cpu_has_features(["avx512bw"], target):
        return 64
    if llvm_cpu_has_features(["avx2"], target):
        return 32
    return None


def padded_rows(rows: int, lanes: int) -> int:
    """Rows of codes_t: `rows` rounded up to a whole number of shuffle vectors."""
    return -(-rows // lanes) * lanes


def total_row_vectors(rows: int, lanes: int, images: int | None = None) -> int:
    """Shuffle vectors of codes_t's columns: linear form (`images` None) rows padded to whole
    vectors; conv form each image's `rows` pixels padded separately, `images` times."""
    return (images or 1) * (padded_rows(rows, lanes) // lanes)


def _check_images(images: int | None) -> None:
    if images is not None and (isinstance(images, bool) or not isinstance(images, (int, np.integer)) or images < 1):
        raise ValueError(f"images must be None (linear form) or an int >= 1 (conv form), got {images!r}")


def _check_lanes(lanes: int) -> None:
    if lanes not in SHUFFLE_INTRINSIC:
        raise ValueError(f"lanes must be one of {sorted(SHUFFLE_INTRINSIC)}, got {lanes}")


def shuffle_tables(tables: np.ndarray, lanes: int) -> np.ndarray:
    """int8 tables [C, 16, N] -> uint8 [N, C, lanes]: T + 128, repeated in every 128-bit lane."""
    _check_lanes(lanes)
    if tables.dtype != np.int8 or tables.ndim != 3 or tables.shape[1] != CENTROIDS:
        raise ValueError(f"need int8 tables [C, {CENTROIDS}, N], got {tables.dtype} {list(tables.shape)}")
    biased = (tables.astype(np.int16) + TABLE_OFFSET).astype(np.uint8).transpose(2, 0, 1)  # [N, C, 16]
    return np.ascontiguousarray(np.tile(biased, (1, 1, lanes // CENTROIDS)))


def packed_codebooks(codebooks: int) -> int:
    """C2: bytes of packed codes per row (two 4-bit codes per byte)."""
    return -(-codebooks // 2)


def pack_codes(codes_t: np.ndarray) -> np.ndarray:
    """uint8 [C, R] (codes in bits 0-3; higher bits are dropped) -> uint8 [C2, R]: codebook 2j
    in the low nibble of row j, 2j + 1 in the high one (0 past C)."""
    nibbles = np.zeros((2 * packed_codebooks(len(codes_t)), codes_t.shape[1]), np.uint8)
    nibbles[: len(codes_t)] = codes_t & 15
    return nibbles[0::2] | nibbles[1::2] << 4


def unpack_codes(codes_p: np.ndarray, codebooks: int) -> np.ndarray:
    """uint8 [C2, R] -> uint8 [C, R] (`pack_codes` inverted)."""
    return np.stack([codes_p & 15, codes_p >> 4], 1).reshape(-1, codes_p.shape[1])[:codebooks]


def lookup_add_shuffle(rows: int, codebooks: int, cols: int, lanes: int, images: int | None = None) -> tirx.PrimFunc:
    """Linear form (`images` None): (codes_p uint8 [C2, rows_padded] (`pack_codes`), tables_l
    uint8 [N, C, lanes] from `shuffle_tables`, scale f32 [N], bias f32 [N]) -> out f32 [rows,
    N]; rows_padded = `padded_rows(rows, lanes)`.

    Conv form (`images` = B >= 1, `rows` = OH * OW pixels per image): codes_p uint8 [C2, B *
    rows_padded] (image b's pixel p in column b * rows_padded + p), same tables, scale and bias
    -> out f32 [B, N, rows] (NCHW, spatial dims flattened).

    Blocks: "index" (the unpacked uint16 codes | 0x8000), "lookup" (two shuffles: the uint16 lookups of
    one table for one vector of rows), "acc" (their int32 sums over codebooks; the schedule
    sums blocks of codebooks in uint16 first), "out" (offset, float, scale, bias; in the conv
    form one block per row vector and column, so that a row tile's outputs follow from its
    accumulators, holding a vectorized loop over the vector's pixels). The workload has no
    vector constants: MetaSchedule's FLOP estimate fails on Broadcast.
    """
    _check_lanes(lanes)
    _check_images(images)
    if rows < 1 or codebooks < 1 or cols < 1:
        raise ValueError(f"need rows, codebooks and cols >= 1, got {rows}, {codebooks}, {cols}")
    i64 = T.int64
    conv = images is not None
    per_image = padded_rows(rows, lanes) // lanes  # row vectors of one image (conv form)
    full, tail = divmod(rows, lanes)  # whole row vectors and pixels of the last one, per image
    out_shape = (i64(images), i64(cols), i64(rows)) if conv else (i64(rows), i64(cols))
    half = lanes // 2
    row_vectors = total_row_vectors(rows, lanes, images)
    bytes_t, words_t = f"int8x{lanes}", f"uint16x{half}"
    intrinsic = SHUFFLE_INTRINSIC[lanes]
    offset = TABLE_OFFSET * codebooks

    def shuffle(table: tirx.Expr, index: tirx.Expr) -> tirx.Expr:
        """VPSHUFB of `lanes` table bytes by `lanes / 2` index words -> `lanes / 2` uint16 lookups."""
        as_bytes = [tirx.reinterpret(bytes_t, v) for v in (table, index)]
        return tirx.reinterpret(words_t, tirx.call_llvm_pure_intrin(bytes_t, intrinsic, *as_bytes))

    @T.macro(hygienic=False)
    def store_pixels(vr, vn, vv, first, count):
        """Conv form: `count` pixels of row vector vr, column vn, from pixel `first` of its image."""
        for i in T.vectorized(i64(count)):
            out[vr // per_image, vn, first + i] = (
                T.Cast("float32", acc[vr, vn, vv * lanes + i] - offset) * scale[vn] + bias[vn]
            )

    @T.prim_func(s_tir=True)
    def main(
        codes_p: T.Buffer((i64(packed_codebooks(codebooks)), i64(row_vectors * lanes)), "uint8"),
        tables_l: T.Buffer((i64(cols), i64(codebooks), i64(lanes)), "uint8"),
        scale: T.Buffer((i64(cols),), "float32"),
        bias: T.Buffer((i64(cols),), "float32"),
        out: T.Buffer(out_shape, "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        index = T.sblock_alloc_buffer((i64(codebooks), i64(row_vectors * lanes)), "uint16")
        # lookups of row vector r, column n, codebook c at [r, n, c * lanes: (c + 1) * lanes]
        lookups = T.sblock_alloc_buffer((i64(row_vectors), i64(cols), i64(codebooks * lanes)), "uint16")
        acc = T.sblock_alloc_buffer((i64(row_vectors), i64(cols), i64(lanes)), "int32")
        for c, m in T.grid(i64(codebooks), i64(row_vectors * lanes)):
            with T.sblock("index"):
                vc, vm = T.axis.remap("SS", [c, m])
                T.sblock_attr({"schedule_rule": "None"})
                index[vc, vm] = T.Cast("uint16", (codes_p[vc // 2, vm] >> T.Cast("uint8", vc % 2 * 4)) & T.uint8(15)) | T.uint16(
                    0x8000
                )
        for r, n, c in T.grid(i64(row_vectors), i64(cols), i64(codebooks)):
            with T.sblock("lookup"):
                vr, vn, vc = T.axis.remap("SSS", [r, n, c])
                T.reads(index[vc, vr * lanes : vr * lanes + lanes], tables_l[vn, vc, 0:lanes])
                T.writes(lookups[vr, vn, vc * lanes : vc * lanes + lanes])
                T.sblock_attr({"schedule_rule": "None"})
                # No Python locals here: TVMScript would turn each into a buffer.
                lookups[vr, vn, T.ramp(vc * lanes, i64(1), half)] = shuffle(
                    tables_l[vn, vc, T.ramp(i64(0), i64(1), lanes)], index[vc, T.ramp(vr * lanes, i64(1), half)]
                )
                lookups[vr, vn, T.ramp(vc * lanes + half, i64(1), half)] = shuffle(
                    tables_l[vn, vc, T.ramp(i64(0), i64(1), lanes)], index[vc, T.ramp(vr * lanes + half, i64(1), half)]
                )
        for r, n, i, c in T.grid(i64(row_vectors), i64(cols), i64(lanes), i64(codebooks)):
            with T.sblock("acc"):
                vr, vn, vi, vc = T.axis.remap("SSSR", [r, n, i, c])
                T.sblock_attr({"schedule_rule": SCHEDULE_RULE})
                with T.init():
                    acc[vr, vn, vi] = 0
                acc[vr, vn, vi] = acc[vr, vn, vi] + T.Cast("int32", lookups[vr, vn, vc * lanes + vi])
        if not conv:
            for m, n in T.grid(i64(rows), i64(cols)):
                with T.sblock("out"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    T.sblock_attr({"schedule_rule": "None"})
                    out[vm, vn] = T.Cast("float32", acc[vm // lanes, vn, vm % lanes] - offset) * scale[vn] + bias[vn]
        # Conv: row vector r is vector r % per_image of image r // per_image. One block per
        # (row vector, column) writes its pixels in one vectorized loop: all `lanes` of them, or
        # the `tail` of an image's last vector (a predicate on the lane would scalarize the
        # stores). The unit block var v: reverse_compute_at needs every dimension of a read
        # region to start at a block var.
        if conv:
            for r, n, v in T.grid(i64(row_vectors), i64(cols), i64(1)):
                with T.sblock("out"):
                    vr, vn, vv = T.axis.remap("SSS", [r, n, v])
                    T.reads(acc[vr, vn, vv * lanes : vv * lanes + lanes], scale[vn], bias[vn])
                    T.writes(
                        out[vr // per_image, vn, vr % per_image * lanes : T.min(vr % per_image * lanes + lanes, rows)]
                    )
                    T.sblock_attr({"schedule_rule": "None"})
                    if full == per_image:  # whole vectors only
                        store_pixels(vr, vn, vv, vr % per_image * lanes, lanes)
                    elif full == 0:  # one partial vector per image
                        store_pixels(vr, vn, vv, 0, tail)
                    elif vr % per_image < full:
                        store_pixels(vr, vn, vv, vr % per_image * lanes, lanes)
                    else:
                        store_pixels(vr, vn, vv, full * lanes, tail)

    return main


def lookup_add_shuffle_ref(
    codes_t: np.ndarray, tables: np.ndarray, scale: np.ndarray, bias: np.ndarray, rows: int,
    images: int | None = None,
) -> np.ndarray:
    """NumPy: codes_t uint8 [C, >= rows] (unpacked: the kernel takes `pack_codes(codes_t)`),
    int8 tables [C, 16, N] (not laid out) -> float32 [rows, N]; the integer sums are exact
    (int32), then float32(sum) * scale + bias. Conv form (`images` = B): codes_t [C, B *
    rows_padded] (any rows_padded >= rows) -> float32 [B, N, rows]."""
    codebooks = tables.shape[0]
    if images is None:
        codes = codes_t[:, :rows]
    else:
        codes = codes_t.reshape(codebooks, images, -1)[:, :, :rows].reshape(codebooks, images * rows)
    gathered = tables[np.arange(codebooks)[:, None], codes.astype(np.intp)]  # [C, rows (x B), N]
    out = gathered.sum(0, dtype=np.int32).astype(np.float32) * scale + bias
    return out if images is None else np.ascontiguousarray(out.reshape(images, rows, -1).transpose(0, 2, 1))


# ---------------------------------------------------------------- knobs


def vector_registers(lanes: int) -> int:
    """SIMD registers of the ISA whose shuffle has `lanes` bytes: 16 ymm (AVX2), 32 zmm."""
    return 16 if lanes == 32 else 32


def max_col_tile(lanes: int, row_vectors: int) -> int:
    """Columns per tile whose accumulators fit the registers: each (row vector, column) needs
    two uint16 accumulators (its two halves of rows), each row vector its two index vectors,
    and one table and one shuffle result are live besides."""
    return max((vector_registers(lanes) - 2 - 2 * row_vectors) // (2 * row_vectors), 1)


def block_candidates(codebooks: int) -> tuple[int, ...]:
    """Codebook blocks: the fewest equal blocks of at most 255, and 64 and 128 (all <= C)."""
    balanced = -(-codebooks // -(-codebooks // 255))
    return tuple(sorted({min(codebooks, b) for b in (64, 128, balanced)}))


@dataclass(frozen=True)
class ShuffleKnobs:
    """Schedule of `lookup_add_shuffle`.

    row_vectors: row tile in shuffle vectors (row tile = row_vectors * lanes rows).
    col_tile: output columns per tile (their uint16 accumulators stay in registers).
    block: codebooks summed in uint16 before widening to int32 (<= MAX_BLOCK).
    unroll: codebooks per iteration of the unrolled codebook loop.
    parallel: "cols" (column tiles in parallel, row tiles serial inside: a column tile's
        tables stay in L1 across all rows), "rows_cols" (both fused in parallel) or "none".
    """

    row_vectors: int
    col_tile: int
    block: int
    unroll: int
    parallel: str

    def check(self, rows: int, codebooks: int, cols: int, lanes: int, images: int | None = None) -> str | None:
        """Why these knobs are illegal for the shape (None if legal); `images` as in
        `lookup_add_shuffle`."""
        space = knob_space(rows, codebooks, cols, lanes, images)
        allowed = {
            "row_vectors": space.row_vectors,
            "col_tile": space.col_tiles.get(self.row_vectors, ()),
            "block": space.blocks,
            "unroll": space.unrolls,
            "parallel": space.parallels,
        }
        return first_illegal(self, allowed)


@dataclass(frozen=True)
class KnobSpace:
    """Legal values of each knob; col_tiles depends on row_vectors (register budget)."""

    row_vectors: tuple[int, ...]
    col_tiles: dict[int, tuple[int, ...]]
    blocks: tuple[int, ...]
    unrolls: tuple[int, ...]
    parallels: tuple[str, ...]

    def grid(self) -> list[ShuffleKnobs]:
        """Every legal combination (what `shuffle_design_space` can sample)."""
        return [
            ShuffleKnobs(r, t, b, u, p)
            for r in self.row_vectors
            for t, b, u, p in itertools.product(self.col_tiles[r], self.blocks, self.unrolls, self.parallels)
        ]


def knob_space(rows: int, codebooks: int, cols: int, lanes: int, images: int | None = None) -> KnobSpace:
    """Legality filters: row tiles divide the row vectors (1 or 2 vectors; conv form: all
    images' vectors, `total_row_vectors`; a tile may span two images, each vector belongs to
    one), column tiles divide N and fit the register budget (`max_col_tile`), codebook blocks
    are <= MAX_BLOCK (uint16 sums exact), unroll in {1, 2, 4}; serial only below
    SERIAL_LOOKUPS lookups."""
    _check_lanes(lanes)
    _check_images(images)
    row_vectors = total_row_vectors(rows, lanes, images)
    rvs = tuple(r for r in (1, 2) if row_vectors % r == 0)
    col_tiles = {r: tuple(t for t in range(1, max_col_tile(lanes, r) + 1) if cols % t == 0) for r in rvs}
    blocks = tuple(b for b in block_candidates(codebooks) if 1 <= b <= MAX_BLOCK)
    lookups = (images or 1) * rows * codebooks * cols
    parallels = ("cols", "rows_cols") + (("none",) if lookups < SERIAL_LOOKUPS else ())
    return KnobSpace(rvs, col_tiles, blocks, (1, 2, 4), parallels)


def default_knobs(rows: int, codebooks: int, cols: int, lanes: int, images: int | None = None) -> ShuffleKnobs:
    """One row vector, the widest column tile up to 4 (AVX2) or 8 (AVX-512), the fewest
    blocks, 2 codebooks per unrolled iteration; serial below MIN_PARALLEL_LOOKUPS lookups,
    else column tiles in parallel when there are at least 8 of them (else row tiles too)."""
    space = knob_space(rows, codebooks, cols, lanes, images)
    col_tile = max(t for t in space.col_tiles[1] if t <= lanes // 8)
    if (images or 1) * rows * codebooks * cols < MIN_PARALLEL_LOOKUPS:
        parallel = "none"
    else:
        parallel = "cols" if cols // col_tile >= 8 else "rows_cols"
    return ShuffleKnobs(1, col_tile, max(space.blocks), 2, parallel)


# ---------------------------------------------------------------- schedule

KNOB_ANNOTATION = "lut_shuffle."  # + knob name: the knobs of a scheduled kernel, on its root block


@dataclass(frozen=True)
class _Kernel:
    """The blocks and shape of a `lookup_add_shuffle` kernel inside a schedule (`images`
    None for the linear form)."""

    acc: SBlockRV
    lookup: SBlockRV
    index: SBlockRV
    out: SBlockRV
    rows: int
    codebooks: int
    cols: int
    lanes: int
    images: int | None

    @property
    def shape(self) -> tuple:
        """The arguments of `knob_space`, `default_knobs` and `ShuffleKnobs.check`."""
        return self.rows, self.codebooks, self.cols, self.lanes, self.images


def _kernel(sch: s_tir.Schedule, acc: SBlockRV) -> _Kernel | None:
    """The kernel around its reduction block `acc`, shape read from the buffers: out [rows, N]
    (linear form) or [B, N, rows] (conv form)."""
    producers, consumers = sch.get_producers(acc), sch.get_consumers(acc)
    if len(producers) != 1 or len(consumers) != 1:
        return None
    lookup, out = producers[0], consumers[0]
    index = sch.get_producers(lookup)
    reads = sch.get(lookup).reads
    output = [int(d) for d in sch.get(out).writes[0].source.shape]
    if len(index) != 1 or len(reads) != 2 or len(reads[1].source.shape) != 3 or len(output) not in (2, 3):
        return None
    cols, codebooks, lanes = (int(d) for d in reads[1].source.shape)
    rows, images = (output[0], None) if len(output) == 2 else (output[2], output[0])
    return _Kernel(acc, lookup, index[0], out, rows, codebooks, cols, lanes, images)


def find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """The unscheduled shuffle lookup-add in `sch`, found by its block annotation."""
    block = unscheduled_block(sch, SCHEDULE_RULE, KNOB_ANNOTATION + "block")
    return _kernel(sch, block) if block is not None else None


def apply_knobs(sch: s_tir.Schedule, knobs: ShuffleKnobs) -> None:
    """Schedule the shuffle lookup-add in `sch` with `knobs` (checked first)."""
    kernel = find_kernel(sch)
    if kernel is None:
        raise ValueError("no unscheduled lookup_add_shuffle kernel in this schedule")
    reason = knobs.check(*kernel.shape)
    if reason is not None:
        raise ValueError(f"illegal knobs {knobs}: {reason}")
    _schedule(sch, kernel, knobs.row_vectors, [None, knobs.col_tile], knobs.block, knobs.unroll, knobs.parallel)


def scheduled_knobs(func: tirx.PrimFunc) -> ShuffleKnobs | None:
    """The knobs a scheduled (default or tuned) shuffle lookup-add was built with."""
    annotations = func.body.block.annotations if isinstance(func.body, s_tir.SBlockRealize) else {}
    values = {f.name: annotations.get(KNOB_ANNOTATION + f.name) for f in fields(ShuffleKnobs)}
    if any(v is None for v in values.values()):
        return None
    return ShuffleKnobs(**{k: v if k == "parallel" else int(v) for k, v in values.items()})


Factor = int | ExprRV


def _schedule(
    sch: s_tir.Schedule,
    kernel: _Kernel,
    row_vectors: int,
    col_factors: list[Factor | None],
    block: Factor,
    unroll: Factor,
    parallel: str,
) -> None:
    """The loop nest of the module docstring. Row tile and parallel loop are structural;
    column tile, block and unroll may be sampled random variables (MetaSchedule): the loop
    structure, and so the trace, must not depend on their values."""
    r, n, lane, c = sch.get_loops(kernel.acc)
    n_o, n_i = sch.split(n, col_factors)
    r_o, r_i = sch.split(r, [None, row_vectors])
    c_b, c_i = sch.split(c, [None, block])
    c_o, c_u = sch.split(c_i, [None, unroll])
    sch.reorder(n_o, r_o, c_b, c_o, c_u, n_i, r_i, lane)
    partial = sch.rfactor(c_b, 0)  # the sums of one block: [blocks, row vectors, N, lanes] ...
    sch.unsafe_set_dtype(partial, 0, "uint16")  # ... in uint16, exact (see MAX_BLOCK)
    n_o, r_o, c_b, c_o, c_u, n_i, r_i, lane = sch.get_loops(partial)
    sch.reverse_compute_at(kernel.acc, c_b, preserve_unit_loops=True)  # int32 += block sums
    sch.compute_at(kernel.lookup, r_i, preserve_unit_loops=True)
    sch.reverse_compute_at(kernel.out, r_o, preserve_unit_loops=True)
    # (Global scope for the tiles: with "local" scope LLVM kept them in memory.)

    sch.vectorize(lane)
    for loop in (r_i, n_i, c_u):
        sch.unroll(loop)
    _, w_r, w_n, w_i = sch.get_loops(kernel.acc)[3:]  # under n_o, r_o, c_b (and a unit loop)
    sch.vectorize(w_i)
    sch.unroll(w_r)
    sch.unroll(w_n)
    _schedule_epilogue(sch, kernel)
    # The index: once for all column tiles, before them.
    _, m = sch.get_loops(kernel.index)
    sch.vectorize(sch.split(m, [None, kernel.lanes])[1])

    if parallel == "cols":
        sch.parallel(n_o)
    elif parallel == "rows_cols":
        sch.parallel(sch.fuse(n_o, r_o))
    sch.decompose_reduction(partial, c_o)
    sch.decompose_reduction(kernel.acc, c_b)

    root = sch.get_sblock("root")
    # Keep MetaSchedule's stock rules (ParallelizeVectorizeUnroll on the root) off the kernel.
    sch.annotate(root, "schedule_rule", "None")
    knobs = {"row_vectors": row_vectors, "col_tile": col_factors[-1], "block": block, "unroll": unroll,
             "parallel": parallel}
    for name, value in knobs.items():
        sch.annotate(root, KNOB_ANNOTATION + name, value)


def _schedule_epilogue(sch: s_tir.Schedule, kernel: _Kernel) -> None:
    """Linear form: each row gets col_tile contiguous floats (vectorized: a strided gather from
    the int32 tile), 8 rows unrolled. Measured no faster: unrolling all rows (and columns);
    a float tile vectorized over rows and then transposed by LLVM's shuffles.

    Conv form: the int32 tile's rows are contiguous in the output too, so each (row vector,
    column) is one contiguous load, convert, multiply-add and store of `lanes` floats (the
    partial last vector of an image: `rows % lanes` floats), the loop over the pixels is
    vectorized in the workload already; row vectors and columns of the tile unrolled."""
    if kernel.images is None:
        _, _, m, n = sch.get_loops(kernel.out)  # under n_o, r_o
        m_i = sch.split(m, [None, 8])[1]
        sch.unroll(m_i)
        sch.vectorize(n)
        return
    _, _, r, n, _ = sch.get_loops(kernel.out)  # under n_o, r_o; the unit loop of v
    sch.unroll(r)
    sch.unroll(n)


# ---------------------------------------------------------------- default and tuned schedules


def schedule_lookup_add_shuffle(sch: s_tir.Schedule, _lanes: int = 0, _min_parallel_work: int = 0) -> bool:
    """Default schedule (`default_knobs`) if `sch` holds a shuffle lookup-add, else False
    (`sch` untouched). The signature of the other `schedule_*` in default_cpu.LutKernels;
    the lanes come from the kernel, the parallel threshold is MIN_PARALLEL_LOOKUPS."""
    kernel = find_kernel(sch)
    if kernel is None:
        return False
    apply_knobs(sch, default_knobs(*kernel.shape))
    return True


def shuffle_design_space(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule design space of the shuffle lookup-add whose reduction block is `block`.

    One design space per structural choice (row tile x parallel loop); in each, the column
    tile is sampled with `sample_perfect_tile` (divisors of N up to the register budget) and
    the codebook block and unroll factor with `sample_categorical`, all from `knob_space`:
    every decision is in the trace (and in the root block's `lut_shuffle.*` annotations),
    and the evolutionary search mutates the column tile.
    """
    kernel = _kernel(sch, block)
    if kernel is None:
        return [sch]
    space = knob_space(*kernel.shape)
    spaces = []
    for row_vectors, parallel in itertools.product(space.row_vectors, space.parallels):
        new = sch.copy()
        k = _kernel(new, block)
        max_cols = max(space.col_tiles[row_vectors])
        cols = new.sample_perfect_tile(new.get_loops(k.acc)[1], n=2, max_innermost_factor=max_cols)
        block_size = new.sample_categorical(list(space.blocks), _uniform(space.blocks))
        unroll = new.sample_categorical(list(space.unrolls), _uniform(space.unrolls))
        _schedule(new, k, row_vectors, list(cols), block_size, unroll, parallel)
        spaces.append(new)
    return spaces


def _uniform(values) -> list[float]:
    return [1.0 / len(values)] * len(values)


# MetaSchedule's ApplyCustomRule calls "s_tir.meta_schedule.<target key>.<schedule_rule>" for
# a block annotated with schedule_rule; llvm targets have the key "cpu".
@tvm.register_global_func(RULE_FUNCTION, override=True)
def _metaschedule_rule(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    return shuffle_design_space(sch, block)
