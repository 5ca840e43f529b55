"""Product-quantization encode of a matmul input (LUT-NN / MADDNESS), TensorIR + NumPy.

x float32 [M, D] is split into C sub-spaces of V = D / C columns; each sub-space row is
replaced by the index of its nearest of K centroids (K <= 256):

    code[m, c] = argmin_k ||x[m, cV:(c+1)V] - P[c, k]||^2
               = argmin_k (Pn[c, k] - 2 * x[m, cV:(c+1)V] . P[c, k])     (first k wins ties)

with centroids P float32 [C, K, V], Pn = ||P[c, k]||^2 float32 [C, K] passed in
precomputed, and codes uint8 [M, C].

`schedule_encode` is the default CPU schedule of both encodes (linear and conv), applied by
`default_cpu.LutKernels`.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import s_tir, te, tirx
from tvm.s_tir.dlight.analysis import IterInfo, SBlockInfo, normalize_prim_func


def i64(*dims: int) -> tuple[tirx.IntImm, ...]:
    """int64 extents: TE PrimFuncs with int32 shapes break FuseTIR once fused."""
    return tuple(tirx.IntImm("int64", d) for d in dims)


def vector_tile(extent: int, lanes: int) -> int | None:
    """The largest divisor of `extent` of at most two vectors; None if that is 1 or fills
    less than half a vector."""
    tile = max(t for t in range(1, min(extent, 2 * lanes) + 1) if extent % t == 0)
    return tile if tile > 1 and 2 * tile >= min(extent, lanes) else None


def vectorize_innermost(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Vectorize the innermost loop of `block` by its `vector_tile` (else LLVM may)."""
    loop = sch.get_loops(block)[-1]
    tile = vector_tile(int(sch.get(loop).extent), lanes)
    if tile is not None:
        sch.vectorize(sch.split(loop, [None, tile])[1])


def check_centroids(codebooks: int, centroids: int) -> None:
    if codebooks < 1 or not 1 <= centroids <= 256:
        raise ValueError(f"need C >= 1 codebooks and 1 <= K <= 256 centroids, got C={codebooks}, K={centroids}")


def _argmin() -> te.CommReducer:
    """(index, value) reducer keeping the smaller value, the smaller index on ties (so the
    result does not depend on the reduction order)."""

    def combine(a, b):
        keep = tirx.Or(a[1] < b[1], tirx.And(a[1] == b[1], a[0] < b[0]))
        return tirx.Select(keep, a[0], b[0]), tirx.Select(keep, a[1], b[1])

    def identity(index_dtype, value_dtype):
        return tirx.max_value(index_dtype), tirx.max_value(value_dtype)

    return te.comm_reducer(combine, identity, name="argmin")


def nearest_codes(dot: te.Tensor, centroid_sq_norms: te.Tensor) -> te.Tensor:
    """codes[..., c] = uint8(argmin_k (Pn[c, k] - 2 * dot[..., c, k])) for dot [..., C, K]."""
    k = te.reduce_axis((tirx.IntImm("int64", 0), dot.shape[-1]), "k")
    argmin = _argmin()
    index, _ = te.compute(
        dot.shape[:-1],
        lambda *i: argmin(
            (k.var.astype("int32"), centroid_sq_norms[i[-1], k] - 2.0 * dot[(*i, k)]), axis=k
        ),
        name="nearest",
    )
    return te.compute(dot.shape[:-1], lambda *i: index[i].astype("uint8"), name="codes")


def encode_linear(rows: int, dim: int, codebooks: int, centroids: int) -> tirx.PrimFunc:
    """(x f32 [rows, dim], centroids f32 [C, K, V], centroid_sq_norms f32 [C, K])
    -> codes uint8 [rows, C], V = dim / C."""
    check_centroids(codebooks, centroids)
    if dim % codebooks:
        raise ValueError(f"{codebooks} codebooks do not divide dim {dim}")
    v_len = dim // codebooks
    x = te.placeholder(i64(rows, dim), "float32", "x")
    p = te.placeholder(i64(codebooks, centroids, v_len), "float32", "centroids")
    pn = te.placeholder(i64(codebooks, centroids), "float32", "centroid_sq_norms")
    v = te.reduce_axis(i64(0, v_len), "v")
    dot = te.compute(
        i64(rows, codebooks, centroids),
        lambda m, c, k: te.sum(x[m, c * v_len + v] * p[c, k, v], axis=v),
        name="dot",
    )
    codes = nearest_codes(dot, pn)
    return te.create_prim_func([x, p, pn, codes])


def nearest_codes_ref(sub: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """NumPy: sub float32 [..., C, V] -> codes uint8 [..., C], same formula in float32."""
    norms = np.einsum("ckv,ckv->ck", centroids, centroids)
    scores = norms - 2 * np.einsum("...cv,ckv->...ck", sub, centroids)
    return scores.argmin(-1).astype("uint8")


def encode_linear_ref(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """NumPy encode: x float32 [M, D], centroids [C, K, V] -> codes uint8 [M, C]."""
    c, _, v = centroids.shape
    return nearest_codes_ref(x.reshape(len(x), c, v), centroids)


def schedule_encode(sch: s_tir.Schedule, lanes: int, min_parallel_work: int) -> bool:
    """Default CPU schedule of an encode (linear or conv) and its fused injective consumers;
    False if `sch` holds something else (then discard `sch`).

    Per row (parallel): the dot products for all (c, k), vectorized over k (the centroids
    read from a copy with k innermost); then the argmin over k per codebook; then the codes
    (after all rows if a fused consumer is not elementwise).
    """
    blocks = normalize_prim_func(sch)
    if not blocks or len(blocks) < 3 or not all(b.is_injective() for b in blocks[2:]):
        return False
    dot, nearest = blocks[:2]
    spatial = [it for it in dot.iters if it.kind == "S"]
    centroids = _read_indexed_by(sch, dot, spatial[-1])
    rows = [it.loop_rv for it in nearest.iters if it.kind == "S"][:-1]  # all but the codebook
    if (
        len(sch.get(nearest.block_rv).writes) != 2  # (index, value) argmin
        or dot.is_injective()  # V = 1: no reduction loop left
        or centroids is None
        or not rows
        or not all(isinstance(d, int) for d in dot.dom())
    ):
        return False
    for block in blocks[2:-1]:
        sch.compute_inline(block.block_rv)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    if math.prod(dot.dom()) >= min_parallel_work:
        sch.parallel(row)
    if blocks[-1].is_elementwise(sch):
        sch.reverse_compute_at(blocks[-1].block_rv, row)
    sch.compute_at(dot.block_rv, row)
    loops = sch.get_loops(dot.block_rv)
    reduction = loops[len(loops) - (len(dot.iters) - len(spatial)) :]
    sch.reorder(*reduction, loops[-len(reduction) - 1])  # k innermost
    read, k = centroids
    copy = sch.cache_read(dot.block_rv, read, "global")
    sch.transform_layout(copy, ("write", 0), lambda *i: [*i[:k], *i[k + 1 :], i[k]])
    vectorize_innermost(sch, dot.block_rv, lanes)
    sch.decompose_reduction(dot.block_rv, reduction[0])
    return True


def _read_indexed_by(sch: s_tir.Schedule, block: SBlockInfo, it: IterInfo) -> tuple[int, int] | None:
    """(read index, dimension) of the first read of `block` whose index there is `it`."""
    for index, read in enumerate(sch.get(block.block_rv).reads):
        for dim, extent in enumerate(read.region):
            if extent.min.same_as(it.var):
                return index, dim
    return None
