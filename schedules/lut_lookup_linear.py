"""Product-quantization lookup-add of a matmul (LUT-NN / MADDNESS), TensorIR + NumPy.

With codes uint8 [M, C] (from `lut_encode_linear`), tables T [C, K, N] (int8, or float32
for debugging), per-column scale and bias float32 [N]:

    Y[m, n] = float32(sum_c acc(T[c, code[m, c], n])) * scale[n] + bias[n]     Y float32 [M, N]

acc is int32 for int8 tables (exact; so is its float32 value while C * 128 <= 2^24) and
float32 for float32 tables. Codes must be < K.

`schedule_lookup_add` is the default CPU schedule of both lookup-adds (linear and conv),
applied by `default_cpu.LutKernels`.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.s_tir.dlight.analysis import IterInfo, SBlockInfo, normalize_prim_func

from .lut_encode_linear import check_centroids, i64, vector_tile, vectorize_innermost

ACCUMULATOR = {"int8": "int32", "float32": "float32"}


def table_accumulator(table_dtype: str) -> str:
    """Accumulation dtype of a table dtype (int8 -> int32, float32 -> float32)."""
    if table_dtype not in ACCUMULATOR:
        raise ValueError(f"table dtype must be one of {sorted(ACCUMULATOR)}, got {table_dtype!r}")
    return ACCUMULATOR[table_dtype]


def lookup_add_linear(rows: int, codebooks: int, centroids: int, cols: int, table_dtype: str) -> tirx.PrimFunc:
    """(codes uint8 [rows, C], tables [C, K, N], scale f32 [N], bias f32 [N]) -> out f32 [rows, N]."""
    check_centroids(codebooks, centroids)
    acc_dtype = table_accumulator(table_dtype)
    codes = te.placeholder(i64(rows, codebooks), "uint8", "codes")
    tables = te.placeholder(i64(codebooks, centroids, cols), table_dtype, "tables")
    scale = te.placeholder(i64(cols), "float32", "scale")
    bias = te.placeholder(i64(cols), "float32", "bias")
    c = te.reduce_axis(i64(0, codebooks), "c")
    acc = te.compute(
        i64(rows, cols),
        lambda m, n: te.sum(tables[c, codes[m, c].astype("int64"), n].astype(acc_dtype), axis=c),
        name="acc",
    )
    out = te.compute(
        i64(rows, cols), lambda m, n: acc[m, n].astype("float32") * scale[n] + bias[n], name="out"
    )
    return te.create_prim_func([codes, tables, scale, bias, out])


def lookup_sums_ref(codes: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """NumPy: codes [..., C] -> sum_c T[c, code[..., c], :] [..., N] in the accumulator dtype."""
    gathered = tables[np.arange(tables.shape[0]), codes.astype(np.intp)]  # [..., C, N]
    return gathered.sum(-2, dtype=table_accumulator(str(tables.dtype)))


def lookup_add_linear_ref(codes: np.ndarray, tables: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NumPy lookup-add: codes uint8 [M, C], tables [C, K, N] -> float32 [M, N]."""
    return lookup_sums_ref(codes, tables).astype("float32") * scale + bias


def schedule_lookup_add(sch: s_tir.Schedule, lanes: int, min_parallel_work: int) -> bool:
    """Default CPU schedule of a lookup-add (linear or conv) and its fused injective consumers
    (relu, residual add); False if `sch` holds something else (then discard `sch`).

    Loop nest: parallel (rows x column tiles) -> the row axis of the output's innermost
    dimension, if not the columns (conv: ow) -> codebooks -> column tile (vectorized: one
    load of a table row slice per code); the epilogue runs per parallel iteration.
    """
    blocks = normalize_prim_func(sch)
    if not blocks or len(blocks) < 2 or not all(b.is_injective() for b in blocks[1:]):
        return False
    main = blocks[0]
    table = _gathered_table(sch.get(main.block_rv))
    if table is None or not all(isinstance(d, int) for d in main.dom()):
        return False
    vec = next((it for it in main.iters if it.kind == "S" and table.indices[-1].same_as(it.var)), None)
    reduction = [it.loop_rv for it in main.iters if it.kind == "R"]
    if vec is None or len(reduction) != 1:
        return False
    for block in blocks[1:-1]:
        sch.compute_inline(block.block_rv)
    consumer = blocks[-1].block_rv
    inner_row = _row_of_output_innermost(sch, main, consumer, vec)
    tile = vector_tile(vec.dom, lanes)
    vec_loops = sch.split(vec.loop_rv, [None, tile]) if tile else [vec.loop_rv]
    outer = [it.loop_rv for it in main.iters if it.kind == "S" and it not in (vec, inner_row)]
    outer += vec_loops[:-1]
    if not outer:
        return False
    inner = [inner_row.loop_rv] if inner_row is not None else []
    sch.reorder(*outer, *inner, reduction[0], vec_loops[-1])
    parallel = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if math.prod(main.dom()) >= min_parallel_work:
        sch.parallel(parallel)
    sch.reverse_compute_at(consumer, parallel)
    vectorize_innermost(sch, consumer, lanes)
    if tile:
        sch.vectorize(vec_loops[1])
    sch.decompose_reduction(main.block_rv, reduction[0])
    return True


def _gathered_table(block: s_tir.SBlock) -> tirx.Expr | None:
    """The table load of a block `acc = acc + cast(table[..., code[...], ...])`."""
    store = block.body
    if block.init is None or not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return None
    term = store.value.b
    while isinstance(term, tirx.Cast):
        term = term.value
    accumulator = store.value.a
    if not (_is_load(accumulator) and accumulator.source.same_as(store.buffer) and _is_load(term)):
        return None
    gathered = any(_contains_load(index) for index in term.indices)
    return term if gathered else None


def _is_load(expr: tirx.Expr) -> bool:
    return isinstance(expr, tvm.ir.TensorLoad)


def _contains_load(expr: tirx.Expr) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, found.append))
    return bool(found)


def _row_of_output_innermost(
    sch: s_tir.Schedule, main: SBlockInfo, consumer: s_tir.schedule.SBlockRV, vec: IterInfo
) -> IterInfo | None:
    """The iter of `main` that the consumer's innermost output index reads it with, unless
    that is `vec` (conv: ow, since the output is NCHW)."""
    acc = sch.get(main.block_rv).writes[0]
    last = sch.get(consumer).writes[0].region[-1].min
    read = next((r for r in sch.get(consumer).reads if r.source.same_as(acc.source)), None)
    if read is None:
        return None
    position = next((i for i, r in enumerate(read.region) if r.min.same_as(last)), None)
    if position is None:
        return None
    var = acc.region[position].min
    return next((it for it in main.iters if it is not vec and var.same_as(it.var)), None)
