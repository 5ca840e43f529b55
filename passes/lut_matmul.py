"""matmul(x, W) [+ b] -> reshape(lut_lookup_add(lut_encode(reshape(x, [M, D])), T, s, b), out).

x [..., D] float32, W [D, N] a constant (or permute_dims of one, the importer's Gemm form).
D splits into C = D / V sub-spaces of length V. With K = 16 and int8 tables on a target with
AVX2 / AVX-512BW the lookup-add is the VPSHUFB kernel (codes transposed [C, M'], tables
laid out at compile time), else the generic one. Runs on the imported module, before
legalization; the lookup-add folds the following bias add (``lut_rewrite``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..config import LutConfig
from ..schedules.lut_encode_linear import encode_linear
from ..schedules.lut_encode_rows import encode_rows
from ..schedules.lut_lookup_linear import lookup_add_linear
from ..schedules.lut_lookup_shuffle import CENTROIDS, lookup_add_shuffle, packed_codebooks, padded_rows
from ..schedules.lut_lookup_shuffle import shuffle_lanes as target_lanes
from .find_candidates import Candidate
from .call_rewrite import add_kernel


def default_subspace_len(c: Candidate, cfg: LutConfig) -> int:
    return cfg.linear_subspace


def check(c: Candidate, v: int) -> str | None:
    """Why this matmul cannot use V-long sub-spaces, or None."""
    if len(c.weight_shape) != 2:
        return f"batched constant weight {'x'.join(map(str, c.weight_shape))} (2-D weights only)"
    if c.weight_shape[0] % v:
        return f"D={c.weight_shape[0]} is not a multiple of V={v}"
    return None


def codebooks(c: Candidate, v: int) -> int:
    return c.weight_shape[0] // v if len(c.weight_shape) == 2 else 0


def num_rows(c: Candidate) -> int:
    """Rows M of the [M, D] matrix the layer multiplies."""
    return int(np.prod(c.input_shape[:-1]))


def subvectors(activation: np.ndarray, c: Candidate, v: int, rows: np.ndarray) -> np.ndarray:
    """The chosen rows of the layer input, float32 [len(rows), C, V]."""
    d = c.weight_shape[0]
    return activation.reshape(-1, d)[rows].reshape(len(rows), d // v, v)


def weight_matrix(c: Candidate) -> np.ndarray:
    """float32 [C*V, N]: what the sub-vectors multiply."""
    return c.weight


def shuffle_lanes(plan, cfg: LutConfig, target: tvm.target.Target, rows: int | None = None) -> int | None:
    """Rows per VPSHUFB if this layer should use the shuffle lookup-add on ``target``, else
    None: K = 16, int8 tables, and ``cfg.kernel`` "shuffle", or "auto" with at least one
    shuffle's worth of rows (``rows``, default the layer's M)."""
    lanes = target_lanes(target)
    if cfg.kernel == "generic" or lanes is None or plan.centroids != CENTROIDS or cfg.table_dtype != "int8":
        return None
    rows = num_rows(plan.candidate) if rows is None else rows
    return lanes if cfg.kernel == "shuffle" or rows >= lanes else None


def kernels(plan, table_dtype: str) -> tuple[tvm.tirx.PrimFunc, tvm.tirx.PrimFunc]:
    """(encode, lookup-add) PrimFuncs of a planned layer: codes [M, C] for the generic
    lookup-add, transposed and padded [C, M'] for the shuffle one."""
    c = plan.candidate
    m, d, n = num_rows(c), c.weight_shape[0], c.weight_shape[1]
    if plan.lanes:
        return (encode_rows(m, d, plan.codebooks, plan.centroids, plan.lanes),
                lookup_add_shuffle(m, plan.codebooks, n, plan.lanes))
    return (encode_linear(m, d, plan.codebooks, plan.centroids),
            lookup_add_linear(m, plan.codebooks, plan.centroids, n, table_dtype))


def emit(bb: relax.BlockBuilder, x: relax.Expr, plan, consts) -> relax.Expr:
    """Encode + lookup-add calls for x; returns the unbound result in the matmul's output shape."""
    c = plan.candidate
    m, d, n = num_rows(c), c.weight_shape[0], c.weight_shape[1]
    if len(c.input_shape) != 2:
        x = bb.emit(relax.op.reshape(x, (m, d)))
    encode, lookup = kernels(plan, consts.table_dtype)
    codes_shape = (packed_codebooks(plan.codebooks), padded_rows(m, plan.lanes)) if plan.lanes else (m, plan.codebooks)
    codes = bb.emit(relax.call_tir(add_kernel(bb, encode, "lut_encode"), [x, consts.centroids, consts.sq_norms],
                                   relax.TensorType(codes_shape, "uint8")), "lut_codes")
    y = relax.call_tir(add_kernel(bb, lookup, "lut_lookup_add"), [codes, consts.tables, consts.scale, consts.bias],
                       relax.TensorType((m, n), "float32"))
    if len(c.output_shape) != 2:
        y = relax.op.reshape(bb.emit(y), c.output_shape)
    return y
