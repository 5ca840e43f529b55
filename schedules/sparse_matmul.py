"""Constant block-sparse weight times dense activation, TensorIR + NumPy, pattern baked in.

The weight is W^T [N, K] in block-sparse rows (`lut_compiler.sparse_format.BlockSparse`,
blocks (bn, bk)). Two forms:

    linear (`images` None): Y[m, n] = sum_k X[m, k] W^T[n, k] + bias[n]    X [M, K], Y [M, N]
    NCHW   (`images` = B):  Y[b, n, p] = sum_k W^T[n, k] X[b, k, p] + bias[n]
                                                                           X [B, K, P], Y [B, N, P]

(a 1x1 conv; a 3x3 conv after an im2col). Both vectorize along the dense dimension (P, or M):
each stored block adds data[blk, nn, kk] * X[b, col * bk + kk, p-tile] into an (n-tile x
p-tile) register tile, for every block shape. The linear form first transposes X into X^T
[K, M] (its rows are then contiguous) and writes Y from the transposed tile.

The sparsity pattern is a compile-time constant baked into the PrimFunc: `indptr` and
`indices` are byte strings (7 bits per byte, little-endian, `encode_table`) bound to buffers
with `DeclBuffer(data=StringImm)`, which LLVM emits as constant globals (TVM 0.27 has no
AllocateConst any more, and the TVMScript parser does not take a string there: the kernel is
written with the tables as parameters, then `_embed` binds them). So MetaSchedule's runner,
which fills the arguments with random data, still measures the real pattern, and two weights
of one shape with different patterns are different workloads (structural hash). The block
values `data` stay a runtime argument: random values time the same, the function stays small
(JSON database, build time), and Relax keeps them as an ordinary constant.

Loop nest: block rows i have up to `count_extent` blocks; the reduction loop j runs to that
static extent and skips j >= count(i) (a data-dependent extent would break the affine block
bindings that reorder and compute_at need). Rows far longer than the others therefore cost
compare-and-branch iterations in every row. Schedule (`SparseKnobs`): parallel block rows
[x tiles] -> n-tile -> p-tile -> j (unrolled by `unroll`) -> kk -> n-tile rows (unrolled) ->
p-tile (vectorized); the output tile (+ bias) is written after the j loop.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import ExprRV, SBlockRV
from tvm.script import tirx as T

from lut_compiler.sparse_format import BlockSparse
from .kernel_blocks import first_illegal, unscheduled_block

SCHEDULE_RULE = "sparse_matmul"
RULE_FUNCTION = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
LANES_ANNOTATION = "sparse.lanes"  # on the spmm block: float32 lanes of the target it was made for
KNOB_ANNOTATION = "sparse."  # + knob name: the knobs of a scheduled kernel, on its root block
UNROLLS = (1, 2, 4)  # the reduction extent is padded to a multiple of each
# Multiply-adds below which one thread is faster than waking the pool.
MIN_PARALLEL_WORK = 1 << 16


# ---------------------------------------------------------------- constant tables


def table_width(max_value: int) -> int:
    """Bytes per value of a table whose values are in [0, max_value] (7 bits per byte)."""
    return max(1, -(-int(max_value).bit_length() // 7))


def encode_table(values: np.ndarray, width: int) -> str:
    """int values -> `width` characters each, 7 bits per character, least significant first
    (ASCII only, so the string survives TVM's JSON and printing unchanged)."""
    values = np.asarray(values, np.int64)
    if len(values) and (values.min() < 0 or values.max() >= 1 << (7 * width)):
        raise ValueError(f"values out of range for width {width}")
    digits = (values[:, None] >> (7 * np.arange(width))) & 127
    return digits.astype(np.uint8).tobytes().decode("ascii")


def _decode(table: tirx.Buffer, index: tirx.Expr, width: int) -> tirx.Expr:
    """Value `index` of a table from `encode_table`, as int64."""
    value = T.Cast("int64", table[index * width])
    for c in range(1, width):
        value = value + (T.Cast("int64", table[index * width + c]) << (7 * c))
    return value


def _embed(func: tirx.PrimFunc, tables: dict[str, str]) -> tirx.PrimFunc:
    """Drop the parameters named in `tables` and bind each to its string, declared at the top
    of the root block (LLVM: a private constant global)."""
    decls = [tirx.DeclBuffer(p, data=tvm.ir.StringImm(tables[p.name])) for p in func.params if p.name in tables]
    realize = func.body
    root = realize.block
    root = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, tirx.SeqStmt([*decls, root.body]),
                        root.init, root.alloc_buffers, root.match_buffers, root.annotations)
    params = [p for p in func.params if p.name not in tables]
    return tirx.PrimFunc(params, s_tir.SBlockRealize(realize.iter_values, realize.predicate, root),
                         func.ret_type, func.attrs)


def count_extent(w: BlockSparse) -> int:
    """Static extent of the reduction over a block row's blocks: the longest row, rounded up to
    a multiple of every unroll factor (at least one multiple)."""
    longest = int(np.diff(w.indptr).max()) if len(w.indptr) > 1 else 0
    step = math.lcm(*UNROLLS)
    return max(step, -(-longest // step) * step)


def kernel_data(w: BlockSparse) -> np.ndarray:
    """The kernel's `data` argument: w.data, or one zero block when nothing is stored."""
    return w.data if w.nnzb else np.zeros((1, *w.block), np.float32)


# ---------------------------------------------------------------- kernel and reference


def sparse_matmul(w: BlockSparse, rows: int, images: int | None = None, lanes: int = 8) -> tirx.PrimFunc:
    """The kernel for weight `w` (W^T [N, K], pattern baked in).

    Linear form (`images` None, `rows` = M): (x f32 [M, K], data f32 [max(nnzb, 1), bn, bk]
    (`kernel_data`), bias f32 [N]) -> y f32 [M, N].
    NCHW form (`images` = B, `rows` = P pixels): (x f32 [B, K, P], data, bias) -> y f32
    [B, N, P].
    `lanes`: float32 lanes of the target (8 AVX2, 16 AVX-512): sizes the knob space.
    """
    if images is not None and (isinstance(images, bool) or not isinstance(images, (int, np.integer)) or images < 1):
        raise ValueError(f"images must be None (linear form) or an int >= 1 (NCHW form), got {images!r}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    i64 = T.int64
    n, k = w.shape
    bn, bk = w.block
    blocks = max(w.nnzb, 1)
    linear = images is None
    batch = 1 if linear else images
    jext = count_extent(w)
    ptr_width, col_width = table_width(w.nnzb), table_width(max(k // bk - 1, 0))
    tables = {"indptr_t": encode_table(w.indptr, ptr_width),
              "indices_t": encode_table(w.indices if w.nnzb else [0], col_width)}
    ptr_bytes, col_bytes = len(tables["indptr_t"]), len(tables["indices_t"])

    def start(indptr_t, i):
        return _decode(indptr_t, i, ptr_width)

    def count(indptr_t, i):
        return _decode(indptr_t, i + 1, ptr_width) - _decode(indptr_t, i, ptr_width)

    def column(indptr_t, indices_t, i, j):
        return _decode(indices_t, start(indptr_t, i) + j, col_width)

    if linear:
        @T.prim_func(s_tir=True)
        def main(
            x: T.Buffer((i64(rows), i64(k)), "float32"),
            data: T.Buffer((i64(blocks), i64(bn), i64(bk)), "float32"),
            bias: T.Buffer((i64(n),), "float32"),
            y: T.Buffer((i64(rows), i64(n)), "float32"),
            indptr_t: T.Buffer((i64(ptr_bytes),), "uint8"),
            indices_t: T.Buffer((i64(col_bytes),), "uint8"),
        ):
            T.func_attr({"tirx.noalias": True})
            xt = T.sblock_alloc_buffer((i64(1), i64(k), i64(rows)), "float32")
            acc = T.sblock_alloc_buffer((i64(1), i64(n), i64(rows)), "float32")
            for kx, m in T.grid(i64(k), i64(rows)):
                with T.sblock("transpose"):
                    vk, vm = T.axis.remap("SS", [kx, m])
                    T.sblock_attr({"schedule_rule": "None"})
                    xt[0, vk, vm] = x[vm, vk]
            for b, i, j, nn, p, kk in T.grid(i64(batch), i64(n // bn), i64(jext), i64(bn), i64(rows), i64(bk)):
                with T.sblock("spmm"):
                    vb, vi, vj, vnn, vp, vkk = T.axis.remap("SSRSSR", [b, i, j, nn, p, kk])
                    T.sblock_attr({"schedule_rule": SCHEDULE_RULE, LANES_ANNOTATION: lanes})
                    with T.init():
                        acc[vb, vi * bn + vnn, vp] = T.float32(0)
                    if vj < count(indptr_t, vi):
                        acc[vb, vi * bn + vnn, vp] = acc[vb, vi * bn + vnn, vp] + data[start(indptr_t, vi) + vj, vnn, vkk] * xt[
                            vb, column(indptr_t, indices_t, vi, vj) * bk + vkk, vp
                        ]
            for m, c in T.grid(i64(rows), i64(n)):
                with T.sblock("out"):
                    vm, vc = T.axis.remap("SS", [m, c])
                    T.sblock_attr({"schedule_rule": "None"})
                    y[vm, vc] = acc[0, vc, vm] + bias[vc]
    else:
        @T.prim_func(s_tir=True)
        def main(
            x: T.Buffer((i64(batch), i64(k), i64(rows)), "float32"),
            data: T.Buffer((i64(blocks), i64(bn), i64(bk)), "float32"),
            bias: T.Buffer((i64(n),), "float32"),
            y: T.Buffer((i64(batch), i64(n), i64(rows)), "float32"),
            indptr_t: T.Buffer((i64(ptr_bytes),), "uint8"),
            indices_t: T.Buffer((i64(col_bytes),), "uint8"),
        ):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer((i64(batch), i64(n), i64(rows)), "float32")
            for b, i, j, nn, p, kk in T.grid(i64(batch), i64(n // bn), i64(jext), i64(bn), i64(rows), i64(bk)):
                with T.sblock("spmm"):
                    vb, vi, vj, vnn, vp, vkk = T.axis.remap("SSRSSR", [b, i, j, nn, p, kk])
                    T.sblock_attr({"schedule_rule": SCHEDULE_RULE, LANES_ANNOTATION: lanes})
                    with T.init():
                        acc[vb, vi * bn + vnn, vp] = T.float32(0)
                    if vj < count(indptr_t, vi):
                        acc[vb, vi * bn + vnn, vp] = acc[vb, vi * bn + vnn, vp] + data[start(indptr_t, vi) + vj, vnn, vkk] * x[
                            vb, column(indptr_t, indices_t, vi, vj) * bk + vkk, vp
                        ]
            for b, c, p in T.grid(i64(batch), i64(n), i64(rows)):
                with T.sblock("out"):
                    vb, vc, vp = T.axis.remap("SSS", [b, c, p])
                    T.sblock_attr({"schedule_rule": "None"})
                    y[vb, vc, vp] = acc[vb, vc, vp] + bias[vc]

    return _embed(main, tables)


def sparse_matmul_ref(w: BlockSparse, x: np.ndarray, bias: np.ndarray, images: int | None = None) -> np.ndarray:
    """NumPy, from the block-sparse weight: linear x [M, K] -> [M, N]; NCHW x [B, K, P] ->
    [B, N, P]; float32 (float64 sums)."""
    w_t = w.dense().astype(np.float64)
    if images is None:
        out = x.astype(np.float64) @ w_t.T + bias
    else:
        out = np.einsum("nk,bkp->bnp", w_t, x.astype(np.float64)) + bias[:, None]
    return out.astype(np.float32)


# ---------------------------------------------------------------- knobs


def accumulator_budget(lanes: int) -> int:
    """Vector registers the output tile may take: 12 of AVX2's 16 (the X vectors and a
    broadcast weight need the rest), 24 of AVX-512's 32."""
    return 12 if lanes <= 8 else 24


@dataclass(frozen=True)
class SparseKnobs:
    """Schedule of `sparse_matmul`.

    n_tile: rows of a block row per register tile (divides bn).
    p_tile: dense-dimension elements (P, or M) per register tile (divides it; vectorized).
    unroll: blocks per iteration of the unrolled reduction loop.
    parallel: "rows" (images x block rows in parallel), "tiles" (x the n and p tiles too) or
        "none".
    """

    n_tile: int
    p_tile: int
    unroll: int
    parallel: str

    def check(self, w_block: tuple[int, int], rows: int, images: int | None, lanes: int, work: int) -> str | None:
        """Why these knobs are illegal (None if legal); arguments as in `knob_space`."""
        space = knob_space(w_block, rows, images, lanes, work)
        allowed = {"n_tile": space.n_tiles, "p_tile": space.p_tiles.get(self.n_tile, ()), "unroll": space.unrolls,
                   "parallel": space.parallels}
        return first_illegal(self, allowed)


@dataclass(frozen=True)
class KnobSpace:
    """Legal values of each knob; p_tiles depends on n_tile (register budget)."""

    n_tiles: tuple[int, ...]
    p_tiles: dict[int, tuple[int, ...]]
    unrolls: tuple[int, ...]
    parallels: tuple[str, ...]

    def grid(self) -> list[SparseKnobs]:
        """Every legal combination (what `sparse_design_space` can sample)."""
        return [SparseKnobs(n, p, u, par) for n in self.n_tiles
                for p, u, par in itertools.product(self.p_tiles[n], self.unrolls, self.parallels)]


def knob_space(w_block: tuple[int, int], rows: int, images: int | None, lanes: int, work: int) -> KnobSpace:
    """Legality filters: n tiles divide bn, p tiles divide `rows` (P or M) with at least half
    a vector (or all of `rows`) and at most 8 vectors, and the tile fits
    `accumulator_budget`; serial only below MIN_PARALLEL_WORK multiply-adds (`work`)."""
    bn = w_block[0]
    budget = accumulator_budget(lanes)
    wide = [d for d in range(1, min(rows, 8 * lanes) + 1) if rows % d == 0 and (2 * d >= lanes or d == rows)]
    p_tiles = {t: tuple(d for d in wide if t * -(-d // lanes) <= budget) for t in range(1, bn + 1) if bn % t == 0}
    p_tiles = {t: ps for t, ps in p_tiles.items() if ps}
    parallels = ("rows", "tiles") + (("none",) if work < MIN_PARALLEL_WORK else ())
    return KnobSpace(tuple(p_tiles), p_tiles, UNROLLS, parallels)


def default_knobs(w_block: tuple[int, int], rows: int, images: int | None, lanes: int, work: int) -> SparseKnobs:
    """The tile with the most accumulators within the budget, preferring p tiles of 1-2
    vectors and then taller n tiles; 2 blocks per unrolled iteration; block rows in parallel
    when there are at least 8 (else the tiles too), serial below MIN_PARALLEL_WORK."""
    space = knob_space(w_block, rows, images, lanes, work)

    def score(tile):
        n, p = tile
        return n * -(-p // lanes), p <= 2 * lanes, n, p

    n_tile, p_tile = max(((n, p) for n in space.n_tiles for p in space.p_tiles[n]), key=score)
    return SparseKnobs(n_tile, p_tile, 2, "none" if "none" in space.parallels else "rows")


# ---------------------------------------------------------------- schedule


@dataclass(frozen=True)
class _Kernel:
    """The blocks and shape of a `sparse_matmul` kernel inside a schedule."""

    spmm: SBlockRV
    out: SBlockRV
    transpose: SBlockRV | None
    block: tuple[int, int]
    rows: int
    images: int | None
    lanes: int
    block_rows: int
    work: int

    @property
    def shape(self) -> tuple:
        """The arguments of `knob_space`, `default_knobs` and `SparseKnobs.check`."""
        return self.block, self.rows, self.images, self.lanes, self.work


def _kernel(sch: s_tir.Schedule, spmm: SBlockRV) -> _Kernel | None:
    """The kernel around its reduction block, shape read from its buffers."""
    consumers, producers = sch.get_consumers(spmm), sch.get_producers(spmm)
    if len(consumers) != 1 or len(producers) > 1:
        return None
    block = sch.get(spmm)
    lanes = int(block.annotations[LANES_ANNOTATION])
    y = sch.get(consumers[0]).writes[0].source
    data = next(r.source for r in block.reads if r.source.name == "data")
    batch, n, rows = (int(d) for d in block.writes[0].source.shape)
    bn, bk = (int(d) for d in data.shape[1:])
    images = None if len(y.shape) == 2 else batch
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(spmm)]
    work = math.prod(extents)  # upper bound on the multiply-adds (padded rows included)
    return _Kernel(spmm, consumers[0], producers[0] if producers else None, (bn, bk), rows, images, lanes,
                   n // bn, work)


def find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """The unscheduled sparse matmul in `sch`, found by its block annotation."""
    block = unscheduled_block(sch, SCHEDULE_RULE, KNOB_ANNOTATION + "n_tile")
    return _kernel(sch, block) if block is not None else None


def apply_knobs(sch: s_tir.Schedule, knobs: SparseKnobs) -> None:
    """Schedule the sparse matmul in `sch` with `knobs` (checked first)."""
    kernel = find_kernel(sch)
    if kernel is None:
        raise ValueError("no unscheduled sparse_matmul kernel in this schedule")
    reason = knobs.check(*kernel.shape)
    if reason is not None:
        raise ValueError(f"illegal knobs {knobs}: {reason}")
    _schedule(sch, kernel, knobs.n_tile, knobs.p_tile, knobs.unroll, knobs.parallel)


def scheduled_knobs(func: tirx.PrimFunc) -> SparseKnobs | None:
    """The knobs a scheduled (default or tuned) sparse matmul was built with."""
    annotations = func.body.block.annotations if isinstance(func.body, s_tir.SBlockRealize) else {}
    values = {f.name: annotations.get(KNOB_ANNOTATION + f.name) for f in fields(SparseKnobs)}
    if any(v is None for v in values.values()):
        return None
    return SparseKnobs(**{k: v if k == "parallel" else int(v) for k, v in values.items()})


Factor = int | ExprRV


def _schedule(sch: s_tir.Schedule, kernel: _Kernel, n_tile: int, p_tile: Factor, unroll: Factor,
              parallel: str) -> None:
    """The loop nest of the module docstring. n tile and parallel loop are structural; p tile
    and unroll may be sampled random variables (MetaSchedule)."""
    b, i, j, nn, p, kk = sch.get_loops(kernel.spmm)
    n_o, n_i = sch.split(nn, [None, n_tile])
    p_o, p_i = sch.split(p, [None, p_tile])
    j_o, j_i = sch.split(j, [None, unroll])
    sch.reorder(b, i, n_o, p_o, j_o, j_i, kk, n_i, p_i)
    sch.reverse_compute_at(kernel.out, p_o, preserve_unit_loops=True)
    if parallel == "rows":
        sch.parallel(sch.fuse(b, i))
    elif parallel == "tiles":
        sch.parallel(sch.fuse(b, i, n_o, p_o))
    for loop in (j_i, kk, n_i):
        sch.unroll(loop)
    sch.vectorize(p_i)
    sch.decompose_reduction(kernel.spmm, j_o)
    _schedule_output(sch, kernel)
    if kernel.transpose is not None:
        _schedule_transpose(sch, kernel)

    root = sch.get_sblock("root")
    sch.annotate(root, "schedule_rule", "None")  # keep MetaSchedule's stock rules off the kernel
    knobs = {"n_tile": n_tile, "p_tile": p_tile, "unroll": unroll, "parallel": parallel}
    for name, value in knobs.items():
        sch.annotate(root, KNOB_ANNOTATION + name, value)


def _schedule_output(sch: s_tir.Schedule, kernel: _Kernel) -> None:
    """The tile's output (+ bias): NCHW rows of p contiguous floats (vectorized, n unrolled);
    linear: rows of n_tile contiguous floats from the transposed tile (unrolled)."""
    loops = sch.get_loops(kernel.out)
    first, second = loops[-2:]
    sch.unroll(first)
    if kernel.images is None:
        sch.unroll(second)
    else:
        sch.vectorize(second)


def _schedule_transpose(sch: s_tir.Schedule, kernel: _Kernel) -> None:
    """X [M, K] -> X^T [K, M]: tiles of 8 k x (a vector of) m, k tiles in parallel."""
    kx, m = sch.get_loops(kernel.transpose)
    k_tile = 8 if int(sch.get(kx).extent) % 8 == 0 else 1
    m_tile = max(d for d in range(1, kernel.lanes + 1) if kernel.rows % d == 0)
    k_o, k_i = sch.split(kx, [None, k_tile])
    m_o, m_i = sch.split(m, [None, m_tile])
    sch.reorder(k_o, m_o, k_i, m_i)
    if kernel.work >= MIN_PARALLEL_WORK:
        sch.parallel(k_o)
    sch.unroll(k_i)
    sch.vectorize(m_i)


# ---------------------------------------------------------------- default and tuned schedules


def schedule_sparse_matmul(sch: s_tir.Schedule, _lanes: int = 0, _min_parallel_work: int = 0) -> bool:
    """Default schedule (`default_knobs`) if `sch` holds a sparse matmul, else False (`sch`
    untouched). The signature of the other `schedule_*` in default_cpu.LutKernels; lanes come
    from the kernel's annotation, the parallel threshold is MIN_PARALLEL_WORK."""
    kernel = find_kernel(sch)
    if kernel is None:
        return False
    apply_knobs(sch, default_knobs(*kernel.shape))
    return True


def sparse_design_space(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule design space of the sparse matmul whose reduction block is `block`: one
    space per structural choice (n tile x parallel loop), in each the p tile and the unroll
    factor sampled with `sample_categorical` from `knob_space` (in the trace and in the root
    block's `sparse.*` annotations)."""
    kernel = _kernel(sch, block)
    if kernel is None:
        return [sch]
    space = knob_space(*kernel.shape)
    spaces = []
    for n_tile, parallel in itertools.product(space.n_tiles, space.parallels):
        new = sch.copy()
        k = _kernel(new, block)
        p_tiles = list(space.p_tiles[n_tile])
        p_tile = new.sample_categorical(p_tiles, [1.0 / len(p_tiles)] * len(p_tiles))
        unroll = new.sample_categorical(list(space.unrolls), [1.0 / len(space.unrolls)] * len(space.unrolls))
        _schedule(new, k, n_tile, p_tile, unroll, parallel)
        spaces.append(new)
    return spaces


# MetaSchedule's ApplyCustomRule calls "s_tir.meta_schedule.<target key>.<schedule_rule>" for
# a block annotated with schedule_rule; llvm targets have the key "cpu".
@tvm.register_global_func(RULE_FUNCTION, override=True)
def _metaschedule_rule(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    return sparse_design_space(sch, block)
