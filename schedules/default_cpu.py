"""Default CPU schedules for PrimFuncs nobody tuned.

`default_schedule_pass(target)` runs after FuseTIR and before `tvm.compile` (after
MetaSchedule's database is applied, if any): every PrimFunc not marked `tirx.is_scheduled`
gets the schedule of the first rule in `default_rules(target)` that accepts it.
"""

import math
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import (
    IterInfo,
    SBlockInfo,
    collect_vars_used_in_prim_expr,
    get_sblock_info,
    normalize_prim_func,
)
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features

from .im2col import schedule_im2col
from .int8_matmul import schedule_int8_matmul
from .lut_encode_linear import schedule_encode
from .lut_encode_conv_rows import schedule_encode_conv_rows
from .lut_encode_rows import schedule_encode_rows
from .lut_lookup_linear import schedule_lookup_add
from .lut_lookup_shuffle import schedule_lookup_add_shuffle
from .sparse_matmul import schedule_sparse_matmul

_ScheduleError = s_tir.schedule.ScheduleError
# Loop iterations (multiply-adds, elements) below which waking the thread pool costs more
# than it saves (a few microseconds here).
_MIN_PARALLEL_WORK = 1 << 16


@dataclass(frozen=True)
class CpuKnobs:
    """What the schedules need to know about the CPU.

    vector_bits: SIMD register width (512 AVX-512, 256 AVX2, 128 otherwise).
    vector_registers: SIMD registers per core (32 AVX-512, 16 otherwise).
    num_cores: threads the runtime will use for `parallel` loops.
    """

    vector_bits: int
    vector_registers: int
    num_cores: int

    def lanes(self, dtype: str) -> int:
        """Elements of `dtype` in one SIMD register."""
        return max(self.vector_bits // tvm.DataType(dtype).bits, 1)


def cpu_knobs(target: Target) -> CpuKnobs:
    """Read SIMD width, register count and core count from an llvm target."""
    cores = int(target.attrs.get("num-cores", 1) or 1)
    if llvm_cpu_has_features(["avx512f"], target):
        return CpuKnobs(512, 32, cores)
    if llvm_cpu_has_features(["avx2"], target):
        return CpuKnobs(256, 16, cores)
    return CpuKnobs(128, 16, cores)


class Guarded(ScheduleRule):
    """Wraps a rule so that it declines (None) instead of failing when a primitive refuses:
    the next rule then gets the function."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        try:
            return self.rule.apply(func, target, tunable)
        except RuntimeError:  # ScheduleError and InternalError from TVM
            return None


def _extent(sch: s_tir.Schedule, loop: LoopRV) -> int:
    return int(sch.get(loop).extent)


def _write_dtype(sch: s_tir.Schedule, block: SBlockRV) -> str:
    return str(sch.get(block).writes[0].source.dtype)


def _vectorize_innermost(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> LoopRV | None:
    """Split the innermost loop of `block` by a tile dividing it and vectorize the inner part;
    return the outer part. None (loop untouched, LLVM vectorizes it) without such a tile."""
    loop = sch.get_loops(block)[-1]
    tile = _dividing_vector_tile(_extent(sch, loop), lanes)
    if tile is None or tile == 1:
        return None
    outer, inner = sch.split(loop, [None, tile])
    sch.vectorize(inner)
    return outer


def _parallel_vectorize_spatial(sch: s_tir.Schedule, block: SBlockRV, knobs: CpuKnobs) -> None:
    """Vectorize the innermost loop of a spatial root block, parallel the fused outer loops.
    A transpose also gets its transposed loop tiled inside, so reads stay in cache lines."""
    lanes = knobs.lanes(_write_dtype(sch, block))
    work = math.prod(_extent(sch, loop) for loop in sch.get_loops(block))
    transposed = _transposed_loop(sch, block)
    vectorized = _vectorize_innermost(sch, block, lanes) is not None
    if vectorized and transposed is not None:
        tile = _dividing_vector_tile(_extent(sch, transposed), lanes) or 1
        inner = sch.split(transposed, [None, tile])[1]
        sch.reorder(sch.get_loops(block)[-2], inner)
    # kept serial: the innermost scalar loop (LLVM vectorizes it) or the transposed tile
    serial = 0 if vectorized and transposed is None else 1
    loops = [l for l in sch.get_loops(block) if sch.get(l).kind != tirx.ForKind.VECTORIZED]
    outer = loops[: len(loops) - serial]
    if outer and work >= _MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _transposed_loop(sch: s_tir.Schedule, block: SBlockRV) -> LoopRV | None:
    """The loop whose iter is the innermost index of a read, if not the innermost loop."""
    info = get_sblock_info(sch, block)
    innermost = info.iters[-1]
    for region in sch.get(block).reads:
        if not region.region:  # a scalar (0-d buffer) has no innermost index
            continue
        last = region.region[-1].min
        if _expr_uses(last, innermost):
            continue
        match = [it for it in info.iters if last.same_as(it.var)]
        if match:
            return match[0].loop_rv
    return None


def _dividing_vector_tile(extent: int, lanes: int) -> int | None:
    """The divisor of `extent` (at most two registers) that fills its registers best; None
    when none fills half a register."""

    def fill(tile: int) -> float:
        return tile / (-(-tile // lanes) * lanes)

    divisors = [t for t in range(1, min(extent, 2 * lanes) + 1) if extent % t == 0]
    best = max(divisors, key=lambda t: (fill(t), t))
    return best if fill(best) >= 0.5 else None


def _is_multiply_accumulate(block: s_tir.SBlock) -> bool:
    """C[...] = C[...] + a * b, where a and b may be casts."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return False
    terms = [store.value.a, store.value.b]
    accumulator = [
        t for t in terms if isinstance(t, tvm.ir.TensorLoad) and t.source.same_as(store.buffer)
    ]
    products = [t for t in terms if isinstance(t, tirx.Mul)]
    return len(accumulator) == 1 and len(products) == 1


class MatmulLike(ScheduleRule):
    """One multiply-accumulate reduction (dense, batch matmul, conv2d) with injective
    producers (padding) and consumers (bias, activation).

    Loop nest: parallel (fused outer spatial tiles) -> row tiles -> reduction loops ->
    register tile (rows unrolled x lanes vectorized); the epilogue runs per register tile.
    The operand loaded as vectors is packed per parallel iteration and reused by all rows.
    Einsums (matmuls) whose shape the tile does not divide are padded; others (conv) take
    tiles that divide their shape.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        main = _matmul_like_block(sch)
        if main is None:
            return None
        knobs = cpu_knobs(target)
        tiling = _ideal_tiling(sch, main, knobs)
        if not tiling.divides(main) and not _try_pad_einsum(sch, main, tiling):
            tiling = _dividing_tiling(sch, main, knobs)
        blocks = normalize_prim_func(sch)
        main = _matmul_like_block(sch, blocks)
        index = [b.name for b in blocks].index(main.name)
        consumer = _inline_epilogue(sch, main.block_rv, blocks[index + 1 :])
        prologue = [
            b.block_rv
            for b in blocks[:index]
            if not (b.is_elementwise(sch) and _try_inline(sch, b.block_rv))
        ]
        _tile_matmul(sch, main, tiling, consumer, prologue, knobs)
        return sch


def _matmul_like_block(
    sch: s_tir.Schedule, blocks: list[SBlockInfo] | None = None
) -> SBlockInfo | None:
    """The only reduction block of the function if it is a multiply-accumulate."""
    blocks = blocks if blocks is not None else normalize_prim_func(sch)
    if blocks is None:
        return None
    reductions = [b for b in blocks if not b.is_injective()]
    if len(reductions) != 1 or not _is_matmul_like(sch, reductions[0]):
        return None
    return reductions[0]


def _is_matmul_like(sch: s_tir.Schedule, block: SBlockInfo) -> bool:
    kinds = block.dom_kind()
    return (
        set(kinds) == {"S", "R"}
        and all(isinstance(d, int) for d in block.dom())
        and _is_multiply_accumulate(sch.get(block.block_rv))
    )


def _inline_epilogue(sch: s_tir.Schedule, main: SBlockRV, blocks: list[SBlockInfo]) -> SBlockRV:
    """Inline a chain of injective consumers into its last block and return that block
    (a fresh write-back block when there is no consumer)."""
    if not blocks:
        return sch.cache_write(main, 0, "global")
    for block in blocks[:-1]:
        sch.compute_inline(block.block_rv)
    return blocks[-1].block_rv


def _tile_matmul(
    sch: s_tir.Schedule,
    main: SBlockInfo,
    tiling: "_Tiling",
    consumer: SBlockRV,
    prologue: list[SBlockRV],
    knobs: CpuKnobs,
) -> None:
    """Tile `main`, place its epilogue per register tile and its producers per parallel tile."""
    block = main.block_rv
    vec = main.iters[tiling.vec]
    row = main.iters[tiling.row] if tiling.row is not None else None
    other_iters = [it for it in main.iters if it.kind == "S" and it not in (vec, row)]
    parallel_extent = math.prod(it.dom for it in other_iters) * -(-vec.dom // tiling.vec_tile)
    # Enough column tiles to keep the cores busy: row tiles run serially inside and share
    # the packed vector operand; otherwise row tiles join the parallel loop.
    rows_serial = row is not None and parallel_extent >= 4 * knobs.num_cores
    if rows_serial:
        prologue = _im2col_strided_operand(sch, main, vec, row, prologue)

    vec_outer, vec_inner = sch.split(vec.loop_rv, [None, tiling.vec_tile])
    row_outer, row_inner = (
        sch.split(row.loop_rv, [None, tiling.row_tile]) if row else (None, None)
    )
    others = [it.loop_rv for it in other_iters]
    reduction = [it.loop_rv for it in main.iters if it.kind == "R"]
    inner = _present(row_inner, vec_inner)
    sch.reorder(*others, vec_outer, *_present(row_outer), *reduction, *inner)
    parallel = sch.fuse(*others, vec_outer)
    if row is not None and not rows_serial:
        parallel = sch.fuse(parallel, row_outer)
    if math.prod(main.dom()) >= _MIN_PARALLEL_WORK:
        sch.parallel(parallel)
    _epilogue_per_tile(sch, consumer, row_outer if rows_serial else parallel, tiling, knobs)
    if row_inner is not None:
        sch.unroll(row_inner)
    sch.vectorize(vec_inner)
    sch.decompose_reduction(block, reduction[0])

    if rows_serial:
        prologue = _pack_vector_operand(sch, main, vec, row, prologue)
    tile_iters = [it for it in main.iters if it.kind == "S" and it.dom > 1]
    tile_iters = [it for it in tile_iters if not (rows_serial and it is row)]
    for producer in reversed(prologue):
        if _reads_per_tile(sch, block, producer, tile_iters):
            sch.compute_at(producer, parallel)
            _vectorize_innermost(sch, producer, knobs.lanes(_write_dtype(sch, producer)))
        else:
            _parallel_vectorize_spatial(sch, producer, knobs)


def _epilogue_per_tile(
    sch: s_tir.Schedule, consumer: SBlockRV, loop: LoopRV, tiling: "_Tiling", knobs: CpuKnobs
) -> None:
    """Compute the epilogue right after each register tile; at root if its indexing (e.g. a
    fused transpose) does not allow it."""
    try:
        sch.reverse_compute_at(consumer, loop)
    except _ScheduleError:
        _parallel_vectorize_spatial(sch, consumer, knobs)
        return
    _vectorize_innermost(sch, consumer, tiling.vec_tile)


def _present(*loops: LoopRV | None) -> list[LoopRV]:
    return [loop for loop in loops if loop is not None]


def _producer(sch: s_tir.Schedule, blocks: list[SBlockRV], buffer: tirx.Buffer) -> SBlockRV | None:
    return next((b for b in blocks if sch.get(b).writes[0].source.same_as(buffer)), None)


def _read_index(sch: s_tir.Schedule, block: SBlockRV, buffer: tirx.Buffer) -> int:
    return [r.source.same_as(buffer) for r in sch.get(block).reads].index(True)


def _im2col_strided_operand(
    sch: s_tir.Schedule,
    main: SBlockInfo,
    vec: IterInfo,
    row: IterInfo,
    prologue: list[SBlockRV],
) -> list[SBlockRV]:
    """If the operand loaded as vectors is read with a stride (strided conv), read it through
    an im2col copy instead, its producer (padding) inlined there. Returns the new prologue."""
    operand = _vector_operand(sch, main, vec, row)
    if operand is None:
        return prologue
    index = _read_index(sch, main.block_rv, operand)
    if _unit_stride(sch.get(main.block_rv).reads[index], vec):
        return prologue
    producer = _producer(sch, prologue, operand)
    copy = _im2col_copy(sch, main, index, vec)
    if producer is not None and _try_inline(sch, producer):
        prologue = [p for p in prologue if not p.same_as(producer)]
    return prologue + [copy]


def _pack_vector_operand(
    sch: s_tir.Schedule,
    main: SBlockInfo,
    vec: IterInfo,
    row: IterInfo,
    prologue: list[SBlockRV],
) -> list[SBlockRV]:
    """Add a copy of the operand loaded as vectors unless a prologue block produces it: per
    parallel tile it becomes a packed panel that all row tiles share. Returns the prologue."""
    operand = _vector_operand(sch, main, vec, row)
    if operand is None or _producer(sch, prologue, operand) is not None:
        return prologue
    index = _read_index(sch, main.block_rv, operand)
    return prologue + [sch.cache_read(main.block_rv, index, "global")]


def _unit_stride(region: tirx.BufferRegion, vec: IterInfo) -> bool:
    """Whether `vec` indexes only the last dimension of `region`, with stride 1."""
    *outer, last = [r.min for r in region.region]
    coefficients = tvm.sym.detect_linear_equation(last, [vec.var])
    return (
        len(coefficients) == 2
        and isinstance(coefficients[0], tirx.IntImm)
        and coefficients[0].value == 1
        and not any(_expr_uses(e, vec) for e in outer)
    )


def _im2col_copy(
    sch: s_tir.Schedule, main: SBlockInfo, index: int, vec: IterInfo
) -> SBlockRV:
    """Copy read `index` of `main` into a buffer indexed by the iters it uses: spatial ones,
    then reduction ones, then `vec` (contiguous); the copy loops follow that order."""
    region = sch.get(main.block_rv).reads[index]
    used = [i for i, it in enumerate(main.iters) if it is vec or _uses(region, it)]
    vec_position = main.iters.index(vec)
    order = [i for i in used if main.iters[i].kind == "S" and i != vec_position]
    order += [i for i in used if main.iters[i].kind == "R"] + [vec_position]
    layout = tirx.IndexMap.from_func(
        lambda *iters: [iters[i] for i in order], ndim=len(main.iters)
    )
    copy = sch.reindex_cache_read(main.block_rv, index, "global", layout)
    loop_order = [used.index(i) for i in order]
    sch.transform_block_layout(
        copy, tirx.IndexMap.from_func(lambda *iters: [iters[i] for i in loop_order], ndim=len(used))
    )
    return copy


def _try_inline(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    try:
        sch.compute_inline(block)
    except _ScheduleError:
        return False
    return True


def _reads_per_tile(
    sch: s_tir.Schedule, block: SBlockRV, producer: SBlockRV, tile_iters: list[IterInfo]
) -> bool:
    """Whether `block` reads the producer's output with every parallel tile iter, so that
    computing it per tile repeats no work (except halos)."""
    buffer = sch.get(producer).writes[0].source
    region = next((r for r in sch.get(block).reads if r.source.same_as(buffer)), None)
    return region is not None and all(_uses(region, it) for it in tile_iters)


@dataclass(frozen=True)
class _Tiling:
    """Register tile of a matmul-like block; `vec` and `row` are positions in its iters."""

    vec: int
    row: int | None
    vec_tile: int
    row_tile: int

    def divides(self, main: SBlockInfo) -> bool:
        """Whether the tile divides the block's iteration domain."""
        rows = main.iters[self.row].dom if self.row is not None else 1
        return main.iters[self.vec].dom % self.vec_tile == 0 and rows % self.row_tile == 0

    def padding(self, main: SBlockInfo) -> list[int]:
        """Per-iter padding multiples for `pad_einsum`."""
        tiles = {self.vec: self.vec_tile, self.row: self.row_tile}
        return [tiles.get(i, 1) for i in range(len(main.iters))]


def _ideal_tiling(sch: s_tir.Schedule, main: SBlockInfo, knobs: CpuKnobs) -> _Tiling:
    """Two vector registers wide (one for a short axis), as many rows as accumulators allow;
    without a row axis (matrix-vector) as wide as the accumulators allow."""
    lanes = knobs.lanes(_write_dtype(sch, main.block_rv))
    vec = _vector_axis(sch, main)
    row = _row_axis(sch, main, vec)
    vectors = 2 if row else _max_rows(knobs, 1)  # without rows, accumulate along the vector
    vec_tile = min(vectors, -(-vec.dom // lanes)) * lanes
    rows = _max_rows(knobs, vec_tile // lanes)
    row_tile = min(row.dom, rows) if row else 1
    if row and row.dom % row_tile:
        row_tile = next((t for t in range(rows, rows // 2, -1) if row.dom % t == 0), rows)
    return _Tiling(main.iters.index(vec), _index(main, row), vec_tile, row_tile)


def _dividing_tiling(sch: s_tir.Schedule, main: SBlockInfo, knobs: CpuKnobs) -> _Tiling:
    """Tiles that divide the domain: predicated tails inside the reduction loop are slow."""
    lanes = knobs.lanes(_write_dtype(sch, main.block_rv))
    vec = _vector_axis(sch, main)
    row = _row_axis(sch, main, vec)
    vec_tile = _dividing_vector_tile(vec.dom, lanes) or lanes
    rows = _max_rows(knobs, -(-vec_tile // lanes))
    row_tile = max(t for t in range(1, rows + 1) if row.dom % t == 0) if row else 1
    return _Tiling(main.iters.index(vec), _index(main, row), vec_tile, row_tile)


def _index(main: SBlockInfo, it: IterInfo | None) -> int | None:
    return main.iters.index(it) if it is not None else None


def _max_rows(knobs: CpuKnobs, vectors_per_row: int) -> int:
    """Rows of the register tile: accumulators may take all but 4 vector registers (the
    vector operand and a broadcast need the rest); more than 8 rows gains nothing."""
    return max(min(8, (knobs.vector_registers - 4) // vectors_per_row), 1)


def _try_pad_einsum(sch: s_tir.Schedule, main: SBlockInfo, tiling: _Tiling) -> bool:
    """Pad an einsum's domain to multiples of the tile (copies of the operands, cropped output)."""
    try:
        sch.pad_einsum(main.block_rv, tiling.padding(main))
    except _ScheduleError:
        return False
    return True


def _vector_axis(sch: s_tir.Schedule, main: SBlockInfo) -> IterInfo:
    """The spatial iter indexing the innermost output dimension (contiguous stores)."""
    last_index = sch.get(main.block_rv).writes[0].region[-1].min
    spatial = [it for it in main.iters if it.kind == "S"]
    return next((it for it in spatial if last_index.same_as(it.var)), spatial[-1])


def _row_axis(sch: s_tir.Schedule, main: SBlockInfo, vec: IterInfo) -> IterInfo | None:
    """A second spatial iter for the register tile, preferably one the vector operand does
    not depend on, so that all rows share its vector loads."""
    candidates = [it for it in main.iters if it.kind == "S" and it is not vec and it.dom > 1]
    for region in sch.get(main.block_rv).reads:
        free = [it for it in candidates if not _uses(region, it) and _uses(region, vec)]
        if free:
            return free[-1]
    return (candidates or [None])[-1]


def _vector_operand(
    sch: s_tir.Schedule, main: SBlockInfo, vec: IterInfo, row: IterInfo | None
) -> tirx.Buffer | None:
    """The buffer read with `vec` but not with `row`: loaded as vectors, reused by all rows."""
    output = sch.get(main.block_rv).writes[0].source
    for region in sch.get(main.block_rv).reads:
        if region.source.same_as(output):
            continue
        if _uses(region, vec) and (row is None or not _uses(region, row)):
            return region.source
    return None


def _uses(region: tirx.BufferRegion, it: IterInfo) -> bool:
    return any(_expr_uses(r.min, it) for r in region.region)


def _expr_uses(expr: tirx.Expr, it: IterInfo) -> bool:
    return any(v.same_as(it.var) for v in collect_vars_used_in_prim_expr(expr))


class Injective(ScheduleRule):
    """Only spatial blocks (elementwise, broadcast, transpose, reshape): inline producers into
    their consumers; per remaining block vectorize the innermost loop (tiling a transposed
    loop inside it) and parallel the fused outer loops."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or not all(b.is_injective() for b in blocks):
            return None
        if not all(isinstance(d, int) for b in blocks for d in b.dom()):
            return None
        if any(sch.get(b.block_rv).init is not None for b in blocks):
            return None  # a reduction over unit extents: inlining into it breaks its init
        knobs = cpu_knobs(target)
        for block in dlight.base.try_inline(sch, blocks):
            _parallel_vectorize_spatial(sch, block.block_rv, knobs)
        return sch


class Fallback(ScheduleRule):
    """Anything else (pooling, argmax, plain sums, ...): parallel the outermost loop of each
    root block where that is legal; LLVM vectorizes what it can."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule:
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            try:
                sch.parallel(sch.get_loops(block)[0])
            except (_ScheduleError, IndexError):
                pass
        return sch


class LutKernels(ScheduleRule):
    """Product-quantization kernels (schedules/lut_*.py) with their fused injective ops; each
    kernel file holds the schedule, which declines (False) other functions."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        lanes = cpu_knobs(target).lanes("float32")
        for schedule in (schedule_lookup_add_shuffle, schedule_encode_rows, schedule_encode_conv_rows, schedule_encode,
                         schedule_lookup_add, schedule_sparse_matmul, schedule_im2col, schedule_int8_matmul):
            sch = s_tir.Schedule(func)
            if schedule(sch, lanes, _MIN_PARALLEL_WORK):
                return sch
        return None


def default_rules(target: Target) -> list[ScheduleRule]:
    """Rules tried in order; the first that returns a schedule wins."""
    rules = [LutKernels(), dlight.cpu.GEMV(), MatmulLike(), dlight.cpu.Reduction(), Injective(), Fallback()]
    return [Guarded(rule) for rule in rules]


def default_schedule(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    """The schedule `default_schedule_pass` gives `func` (its trace replays on `func`)."""
    with target:
        for rule in default_rules(target):
            space = rule.apply(func, target, False)
            if space is not None:
                return space[0] if isinstance(space, list) else space
    raise AssertionError("Fallback accepts every function")


def default_schedule_pass(target: Target) -> tvm.transform.Pass:
    """Schedule every PrimFunc not marked `tirx.is_scheduled` for the llvm `target`."""
    apply_rules = dlight.ApplyDefaultSchedule(*default_rules(target))

    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return apply_rules(mod)

    return tvm.transform.module_pass(transform, opt_level=0, name="DefaultCpuSchedule")
