"""Replace each learned layer by its encode + lookup-add calls, with constants embedded.

    matmul(x, W) + b  ->  lut_lookup_add(lut_encode(x, P, |P|^2), T, s, b)
    conv2d(x, W) + b  ->  lut_lookup_add_conv(lut_encode_conv(x, P, |P|^2), T, s, b)

Runs on the imported module, before legalization, once codebooks are learned
(`call_rewrite`: a per-channel bias add is folded into the lookup-add's bias, the dense
weight becomes dead and is removed). Everything else is left for the normal pipeline
(legalization, fusion, MetaSchedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..schedules.lut_lookup_shuffle import shuffle_tables
from .call_rewrite import Replacement, rewrite_calls


@dataclass(frozen=True)
class LayerConstants:
    """What a layer's kernels read: centroids f32 [C, K, V], their squared norms f32 [C, K],
    tables int8|f32 [C, K, N], per-column scale f32 [N] and bias f32 [N]."""

    centroids: relax.Expr
    sq_norms: relax.Expr
    tables: relax.Expr
    scale: relax.Expr
    bias: relax.Expr
    table_dtype: str

    @classmethod
    def of(cls, layer) -> LayerConstants:
        """The layer's constants; shuffle kernels get their table layout here, once."""
        sq_norms = np.square(layer.centroids).sum(-1).astype(np.float32)
        lanes = layer.plan.lanes
        tables = shuffle_tables(layer.tables, lanes) if lanes else layer.tables
        return cls(relax.const(layer.centroids), relax.const(sq_norms), relax.const(tables),
                   relax.const(layer.scale), relax.const(layer.bias), str(layer.tables.dtype))


def rewrite_lut(mod: tvm.IRModule, layers: list) -> tvm.IRModule:
    """``layers``: LutLayer per replaced call (``lut_compiler.codebooks``)."""

    def replacement(layer) -> Replacement:
        plan = layer.plan
        return Replacement(plan.candidate, lambda bb, x: plan.rule.emit(bb, x, plan, LayerConstants.of(layer)), "lut_out")

    return rewrite_calls(mod, [replacement(layer) for layer in layers])
