"""Lookup-add with byte-shuffle table lookups (VPSHUFB), vectorized across rows, TensorIR + NumPy.

Same math as `lut_lookup_linear` with K = 16 centroids and int8 tables T [C, 16, N]:

    Y[m, n] = float32(sum_c T[c, code[m, c], n]) * scale[n] + bias[n]          Y float32 [M, N]

MADDNESS / T-MAC style: the 16-entry table T[c, :, n] fits one 128-bit lane, so one VPSHUFB
looks it up for `lanes` rows at once (32 with AVX2 ymm, 64 with AVX-512BW zmm), indexed by
the codes of codebook c for those rows.

Layouts (all made once, at compile time or by the encoder):
- codes_t uint8 [C, rows_padded]: codes transposed (rows contiguous), rows_padded = rows
  rounded up to `lanes` (`padded_rows`). Pad codes may be ANY byte (VPSHUFB reads only bits
  0-3 and 7 of an index, and pad rows are computed but never stored); `encode_linear_t` writes 0.
- tables_l uint8 [N, C, lanes] (`shuffle_tables`): T[c, :, n] + 128 (so 0..255), repeated in
  every 128-bit lane. Column-major ([N, C, ...], not [C, N, ...]) so that the tables of one
  column tile are contiguous: with [C, N, lanes] the C tables of one column sit N*lanes bytes
  apart, a multiple of 4 KiB, and all map to the same L1 set.

Exact integer sums in 16 bits, without sign extensions: each codes vector is split into two
index vectors, A = codes | 0x8000 and B = (codes >> 8) | 0x8000 per 16-bit word. Index bytes
with bit 7 set make VPSHUFB write 0, so VPSHUFB(table, A) holds T + 128 of the even rows
zero-extended to uint16 and VPSHUFB(table, B) those of the odd rows: two shuffles and two
VPADDW per `lanes` lookups, no widening instructions (sign-extending int8 lookups costs a
VPEXTRACTI128 and two VPMOVSXBW per shuffle, all on the two shuffle pipes of Zen 3, which made
that variant 2x slower). A and B are made once per codes vector and reused by the whole
column tile.

Bound: the uint16 block accumulators add at most B biased lookups of at most 255 each, so
0 <= sum <= 255 * B <= 65535 for B <= 257 (`MAX_BLOCK`): exact. After each block of B
codebooks the uint16 sums are widened into int32 (C * 255 < 2^31 for any C here); the
epilogue subtracts 128 * C (exact in int32) and converts to float32 (exact while
|sum| <= 2^24, i.e. C <= 131072).

Schedule: `ShuffleKnobs` (row tile, column tile, codebook block, unroll, parallel loop) with
legality filters (`ShuffleKnobs.check`, `knob_space`), `default_knobs` for untuned builds
(`schedule_lookup_add_shuffle`, applied by `default_cpu.LutKernels`) and a MetaSchedule design
space (`shuffle_design_space`) that samples the same knobs. The kernel's reduction block carries
the annotation `schedule_rule = "lut_lookup_shuffle"`: MetaSchedule's post-order-apply space
generator (its first rule, ApplyCustomRule) then calls the global function
"s_tir.meta_schedule.cpu.lut_lookup_shuffle" (registered below) for that block; the kernel's
other blocks carry `schedule_rule = "None"` so that no stock rule touches them.

Loop nest (`apply_knobs`): parallel column tiles [x row tiles] -> row tiles -> codebook blocks ->
codebooks in the block (partly unrolled) -> column tile (unrolled) -> row vectors of the tile
(unrolled) -> {2 shuffles, uint16 accumulate over `lanes` (vectorized)}; after each block the
uint16 tile is added into an int32 tile, and after the last one the output tile is written:
Y is row-major, so each row gets `col_tile` contiguous floats.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import ExprRV, LoopRV, SBlockRV
from tvm.script import tirx as T
from tvm.target.codegen import llvm_cpu_has_features

CENTROIDS = 16
TABLE_OFFSET = 128
# Largest codebook block whose uint16 sums cannot overflow: 255 * B <= 65535.
MAX_BLOCK = 65535 // 255 + 2  # 257, since 255 * 257 = 65535
SHUFFLE_INTRINSIC = {32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}
# Block annotations: MetaSchedule's ApplyCustomRule looks up "s_tir.meta_schedule.<target key>.<rule>".
SCHEDULE_RULE = "lut_lookup_shuffle"
RULE_FUNCTION = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
# Lookups below which one thread is faster than waking the pool (used by `default_knobs`).
MIN_PARALLEL_LOOKUPS = 1 << 18


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


def lookup_add_shuffle(rows: int, codebooks: int, cols: int, lanes: int) -> tirx.PrimFunc:
    """(codes_t uint8 [C, rows_padded], tables_l uint8 [N, C, lanes] from `shuffle_tables`,
    scale f32 [N], bias f32 [N]) -> out f32 [rows, N]; rows_padded = `padded_rows(rows, lanes)`.

    Blocks: "lookup" (the two shuffles of one codes vector and one table: `lanes` uint16
    lookups, even rows then odd rows), "acc" (their int32 sum over codebooks; the schedule
    accumulates blocks of codebooks in uint16 first) and "out" (offset, float, scale, bias).
    """
    _check_lanes(lanes)
    if rows < 1 or codebooks < 1 or cols < 1:
        raise ValueError(f"need rows, codebooks and cols >= 1, got {rows}, {codebooks}, {cols}")
    half = lanes // 2
    row_vectors = padded_rows(rows, lanes) // lanes
    bytes_t, words_t = f"int8x{lanes}", f"uint16x{half}"
    intrinsic = SHUFFLE_INTRINSIC[lanes]
    offset = TABLE_OFFSET * codebooks
    i64 = T.int64

    @T.prim_func(s_tir=True)
    def main(
        codes_t: T.Buffer((i64(codebooks), i64(row_vectors * lanes)), "uint8"),
        tables_l: T.Buffer((i64(cols), i64(codebooks), i64(lanes)), "uint8"),
        scale: T.Buffer((i64(cols),), "float32"),
        bias: T.Buffer((i64(cols),), "float32"),
        out: T.Buffer((i64(rows), i64(cols)), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # lookups of row vector r, column n, codebook c at [r, n, c * lanes: (c + 1) * lanes]
        lookups = T.sblock_alloc_buffer((i64(row_vectors), i64(cols), i64(codebooks * lanes)), "uint16")
        # sums of rows (2 i + parity) at [i, n, parity]
        acc = T.sblock_alloc_buffer((i64(row_vectors * half), i64(cols), i64(2)), "int32")
        for r, n, c in T.grid(i64(row_vectors), i64(cols), i64(codebooks)):
            with T.sblock("lookup"):
                vr, vn, vc = T.axis.remap("SSS", [r, n, c])
                T.reads(codes_t[vc, vr * lanes : vr * lanes + lanes], tables_l[vn, vc, 0:lanes])
                T.writes(lookups[vr, vn, vc * lanes : vc * lanes + lanes])
                T.sblock_attr({"schedule_rule": "None"})
                table = T.reinterpret(bytes_t, tables_l[vn, vc, T.ramp(i64(0), i64(1), lanes)])
                pairs = T.reinterpret(words_t, codes_t[vc, T.ramp(vr * lanes, i64(1), lanes)])
                high = T.broadcast(T.uint16(0x8000), half)
                even = T.reinterpret(bytes_t, pairs | high)
                odd = T.reinterpret(bytes_t, T.shift_right(pairs, T.broadcast(T.uint16(8), half)) | high)
                lookups[vr, vn, T.ramp(vc * lanes, i64(1), half)] = T.reinterpret(
                    words_t, T.call_llvm_pure_intrin(bytes_t, intrinsic, table, even)
                )
                lookups[vr, vn, T.ramp(vc * lanes + half, i64(1), half)] = T.reinterpret(
                    words_t, T.call_llvm_pure_intrin(bytes_t, intrinsic, table, odd)
                )
        for r, n, p, i, c in T.grid(i64(row_vectors), i64(cols), i64(2), i64(half), i64(codebooks)):
            with T.sblock("acc"):
                vr, vn, vp, vi, vc = T.axis.remap("SSSSR", [r, n, p, i, c])
                T.sblock_attr({"schedule_rule": SCHEDULE_RULE})
                with T.init():
                    acc[vr * half + vi, vn, vp] = 0
                acc[vr * half + vi, vn, vp] = acc[vr * half + vi, vn, vp] + T.Cast(
                    "int32", lookups[vr, vn, vc * lanes + vp * half + vi]
                )
        for m, n in T.grid(i64(rows), i64(cols)):
            with T.sblock("out"):
                vm, vn = T.axis.remap("SS", [m, n])
                T.sblock_attr({"schedule_rule": "None"})
                out[vm, vn] = T.Cast("float32", acc[vm // 2, vn, vm % 2] - offset) * scale[vn] + bias[vn]

    return main


def lookup_add_shuffle_ref(
    codes_t: np.ndarray, tables: np.ndarray, scale: np.ndarray, bias: np.ndarray, rows: int
) -> np.ndarray:
    """NumPy: codes_t uint8 [C, >= rows], int8 tables [C, 16, N] (not laid out) -> float32
    [rows, N]; the integer sums are exact (int32), then float32(sum) * scale + bias."""
    codebooks = tables.shape[0]
    gathered = tables[np.arange(codebooks)[:, None], codes_t[:, :rows].astype(np.intp)]  # [C, rows, N]
    return gathered.sum(0, dtype=np.int32).astype(np.float32) * scale + bias


# ---------------------------------------------------------------- knobs


def vector_registers(lanes: int) -> int:
    """SIMD registers of the ISA whose shuffle has `lanes` bytes: 16 ymm (AVX2), 32 zmm."""
    return 16 if lanes == 32 else 32


def max_col_tile(lanes: int, row_vectors: int) -> int:
    """Columns per tile whose accumulators stay in registers: each (row vector, column) needs
    two uint16 accumulators; each row vector its two index vectors; plus a table and a result."""
    return max((vector_registers(lanes) - 2 - 2 * row_vectors) // (2 * row_vectors), 1)


@dataclass(frozen=True)
class ShuffleKnobs:
    """Schedule of `lookup_add_shuffle`.

    row_vectors: row tile in shuffle vectors (row tile = row_vectors * lanes rows).
    col_tile: output columns per tile (their uint16 accumulators live in registers).
    block: codebooks summed in uint16 before widening to int32 (<= MAX_BLOCK).
    unroll: codebooks per iteration of the unrolled codebook loop.
    parallel: "cols" (column tiles in parallel, row tiles serial inside: a column tile's
        tables stay in L1 for all rows), "rows_cols" (both fused in parallel) or "none".
    """

    row_vectors: int
    col_tile: int
    block: int
    unroll: int
    parallel: str

    def check(self, rows: int, codebooks: int, cols: int, lanes: int) -> str | None:
        """Why these knobs are illegal for the shape (None if legal)."""
        space = knob_space(rows, codebooks, cols, lanes)
        for knob in fields(self):
            value = getattr(self, knob.name)
            if knob.name == "col_tile":
                allowed = space.col_tiles[self.row_vectors] if self.row_vectors in space.col_tiles else ()
            else:
                allowed = getattr(space, {"row_vectors": "row_vectors", "block": "blocks", "unroll": "unrolls",
                                          "parallel": "parallels"}[knob.name])
            if value not in allowed:
                return f"{knob.name}={value!r} not in {list(allowed)}"
        return None


@dataclass(frozen=True)
class KnobSpace:
    """Legal values of each knob; col_tiles depends on row_vectors (register budget)."""

    row_vectors: tuple[int, ...]
    col_tiles: dict[int, tuple[int, ...]]
    blocks: tuple[int, ...]
    unrolls: tuple[int, ...]
    parallels: tuple[str, ...]

    def grid(self) -> list[ShuffleKnobs]:
        """Every legal combination."""
        return [
            ShuffleKnobs(r, t, b, u, p)
            for r in self.row_vectors
            for t, b, u, p in itertools.product(self.col_tiles[r], self.blocks, self.unrolls, self.parallels)
        ]


def block_candidates(codebooks: int) -> tuple[int, ...]:
    """Codebook blocks: the fewest equal blocks of at most 255, and 64 and 128 (all <= C)."""
    balanced = -(-codebooks // -(-codebooks // 255))
    return tuple(sorted({min(codebooks, b) for b in (64, 128, balanced)}))


def knob_space(rows: int, codebooks: int, cols: int, lanes: int) -> KnobSpace:
    """Legality filters: row tiles and column tiles divide the (padded) shape, column tiles fit
    the register budget (`max_col_tile`), blocks are <= MAX_BLOCK (uint16 sums exact)."""
    _check_lanes(lanes)
    row_vectors = padded_rows(rows, lanes) // lanes
    rvs = tuple(r for r in (1, 2) if row_vectors % r == 0)
    col_tiles = {r: tuple(t for t in range(1, max_col_tile(lanes, r) + 1) if cols % t == 0) for r in rvs}
    blocks = tuple(b for b in block_candidates(codebooks) if 1 <= b <= MAX_BLOCK)
    return KnobSpace(rvs, col_tiles, blocks, (1, 2, 4), ("cols", "rows_cols", "none"))


def default_knobs(rows: int, codebooks: int, cols: int, lanes: int, cores: int = 2) -> ShuffleKnobs:
    """One row vector, the widest column tile up to 4, one block if C <= 255 (else equal
    blocks), LLVM's unrolling; column tiles in parallel when there are enough of them."""
    space = knob_space(rows, codebooks, cols, lanes)
    col_tile = max(t for t in space.col_tiles[1] if t <= 4)
    block = max(space.blocks)
    if rows * codebooks * cols < MIN_PARALLEL_LOOKUPS:
        parallel = "none"
    else:
        parallel = "cols" if cols // col_tile >= 4 * cores else "rows_cols"
    return ShuffleKnobs(1, col_tile, block, 1, parallel)


# ---------------------------------------------------------------- schedule


@dataclass(frozen=True)
class _Kernel:
    """The blocks and shape of a `lookup_add_shuffle` kernel inside a schedule."""

    acc: SBlockRV
    lookup: SBlockRV
    out: SBlockRV
    rows: int
    codebooks: int
    cols: int
    lanes: int


def _annotated_block(sch: s_tir.Schedule) -> SBlockRV | None:
    for block in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
        if sch.get(block).annotations.get("schedule_rule") == SCHEDULE_RULE:
            return block
    return None


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except (s_tir.schedule.ScheduleError, RuntimeError, ValueError):
        return False
    return True


def _kernel(sch: s_tir.Schedule, acc: SBlockRV) -> _Kernel | None:
    """Read the shape from the blocks around the annotated reduction `acc`; None if the
    function is not a (possibly fused) shuffle lookup-add."""
    producers, consumers = sch.get_producers(acc), sch.get_consumers(acc)
    if len(producers) != 1 or len(consumers) != 1:
        return None
    lookup, out = producers[0], consumers[0]
    tables = sch.get(lookup).reads[1].source
    codes = sch.get(lookup).reads[0].source
    output = sch.get(out).writes[0].source
    if len(tables.shape) != 3 or len(codes.shape) != 2 or len(output.shape) != 2:
        return None
    cols, codebooks, lanes = (int(d) for d in tables.shape)
    return _Kernel(acc, lookup, out, int(output.shape[0]), codebooks, cols, lanes)


def find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """The shuffle lookup-add in `sch` (by its block annotation), or None."""
    acc = _annotated_block(sch)
    return _kernel(sch, acc) if acc is not None else None


def apply_knobs(sch: s_tir.Schedule, knobs: ShuffleKnobs) -> None:
    """Schedule the shuffle lookup-add in `sch` with `knobs` (checked first)."""
    kernel = find_kernel(sch)
    if kernel is None:
        raise ValueError("no lookup_add_shuffle kernel in this schedule")
    reason = knobs.check(kernel.rows, kernel.codebooks, kernel.cols, kernel.lanes)
    if reason is not None:
        raise ValueError(f"illegal knobs {knobs}: {reason}")
    _schedule(sch, kernel, knobs.row_vectors, [None, knobs.col_tile], knobs.block, knobs.unroll, knobs.parallel)


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
    column tile, block and unroll may be sampled random variables (MetaSchedule)."""
    half = kernel.lanes // 2
    r, n, p, i, c = sch.get_loops(kernel.acc)
    lane = sch.fuse(p, i)
    n_o, n_i = sch.split(n, col_factors)
    r_o, r_i = sch.split(r, [None, row_vectors])
    c_b, c_i = sch.split(c, [None, block])
    c_o, c_u = sch.split(c_i, [None, unroll])
    sch.reorder(n_o, r_o, c_b, c_o, c_u, n_i, r_i, lane)
    partial = sch.rfactor(c_b, 0)  # the uint16 sums of one block: [block, rows/2, N, 2]
    sch.unsafe_set_dtype(partial, 0, "uint16")  # exact: see MAX_BLOCK
    n_o, r_o, c_b, c_o, c_u, n_i, r_i, lane = sch.get_loops(partial)
    sch.reverse_compute_at(kernel.acc, c_b)  # widen into int32 after each block
    sch.compute_at(kernel.lookup, r_i)
    sch.reverse_compute_at(kernel.out, r_o)
    # Even/odd rows of a row vector contiguous: [row vector, n, parity, i].
    sch.transform_layout(kernel.acc, ("write", 0), lambda m2, n_, p_: (m2 // half, n_, p_, m2 % half))
    sch.transform_layout(partial, ("write", 0), lambda b, m2, n_, p_: (b, m2 // half, n_, p_, m2 % half))
    for blk in (kernel.lookup, partial, kernel.acc):
        sch.set_scope(blk, 0, "local")

    sch.vectorize(lane)
    sch.unroll(r_i)
    sch.unroll(n_i)
    sch.unroll(c_u)
    widen = sch.get_loops(kernel.acc)[3:]  # r, n, parity, i under n_o, r_o, c_b
    sch.vectorize(sch.fuse(*widen[2:]))
    for loop in widen[:2]:
        sch.unroll(loop)
    _schedule_epilogue(sch, kernel)

    if parallel == "cols":
        sch.parallel(n_o)
    elif parallel == "rows_cols":
        sch.parallel(sch.fuse(n_o, r_o))
    sch.decompose_reduction(partial, c_o)
    sch.decompose_reduction(kernel.acc, c_b)


def _schedule_epilogue(sch: s_tir.Schedule, kernel: _Kernel) -> None:
    """Output tile: rows x col_tile contiguous floats per row, 8 rows unrolled."""
    m, n = sch.get_loops(kernel.out)[-2:]
    m_o, m_i = sch.split(m, [None, 8])
    sch.unroll(m_i)
    sch.vectorize(n)


# ---------------------------------------------------------------- default and tuned schedules


def schedule_lookup_add_shuffle(sch: s_tir.Schedule, _lanes: int = 0, min_parallel_work: int = 0) -> bool:
    """Default schedule (`default_knobs`) if `sch` holds a shuffle lookup-add, else False
    (`sch` untouched). Signature of the other `schedule_*` functions in default_cpu.LutKernels."""
    kernel = find_kernel(sch)
    if kernel is None:
        return False
    knobs = default_knobs(kernel.rows, kernel.codebooks, kernel.cols, kernel.lanes)
    apply_knobs(sch, knobs)
    return True


def shuffle_design_space(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule design space of the shuffle lookup-add whose reduction is `block`.

    One design space per structural choice (row tile x parallel loop); in each, the column
    tile is sampled with `sample_perfect_tile` (divisors of N up to the register budget), the
    codebook block and the unroll factor with `sample_categorical`, all from `knob_space`, so
    that every decision is recorded in the trace (and the column tile is mutated by the
    evolutionary search).
    """
    kernel = _kernel(sch, block)
    if kernel is None:
        return [sch]
    space = knob_space(kernel.rows, kernel.codebooks, kernel.cols, kernel.lanes)
    spaces = []
    for row_vectors, parallel in itertools.product(space.row_vectors, space.parallels):
        new = sch.copy()
        acc = _annotated_block(new)
        k = _kernel(new, acc)
        n = new.get_loops(k.acc)[1]
        col_factors = new.sample_perfect_tile(n, n=2, max_innermost_factor=max(space.col_tiles[row_vectors]))
        block_rv = new.sample_categorical(list(space.blocks), _uniform(space.blocks))
        unroll_rv = new.sample_categorical(list(space.unrolls), _uniform(space.unrolls))
        _schedule(new, k, row_vectors, list(col_factors), block_rv, unroll_rv, parallel)
        # Keep the stock rules (e.g. ParallelizeVectorizeUnroll on the root) off this kernel.
        new.annotate(new.get_sblock("root"), "schedule_rule", "None")
        spaces.append(new)
    return spaces


def _uniform(values) -> list[float]:
    return [1.0 / len(values)] * len(values)


@tvm.register_global_func(RULE_FUNCTION, override=True)
def _metaschedule_rule(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    return shuffle_design_space(sch, block)
