"""Replace each learned layer by its encode + lookup-add calls, with constants embedded.

    matmul(x, W) + b  ->  lut_lookup_add(lut_encode(x, P, |P|^2), T, s, b)
    conv2d(x, W) + b  ->  lut_lookup_add_conv(lut_encode_conv(x, P, |P|^2), T, s, b)

Runs on the imported module, before legalization, once codebooks are learned. An add that
is the only reader of the call and adds a per-channel constant is folded into the
lookup-add's bias; the dense weight becomes dead and is removed. Everything else is left
for the normal pipeline (legalization, fusion, MetaSchedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..schedules.lut_lookup_shuffle import shuffle_tables


def add_kernel(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """Add a TE-made PrimFunc (whose global symbol is "main") under its own name."""
    return bb.add_func(func.without_attr("global_symbol"), name)


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


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, layers: list) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.layers = {layer.plan.candidate.var: layer for layer in layers}
        self.folded = {layer.plan.candidate.bias_var: layer.plan.candidate.var
                       for layer in layers if layer.plan.candidate.bias_var}
        self.results: dict[str, relax.Var] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        name = binding.var.name
        if name in self.layers:
            layer = self.layers[name]
            x = self.visit_expr(binding.value.args[0])
            y = layer.plan.rule.emit(self.builder_, x, layer.plan, LayerConstants.of(layer))
            if layer.plan.candidate.bias_var:  # the add binding takes the result
                self.results[name] = self.builder_.emit(y, "lut_out")
            else:
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(y)))
        elif name in self.folded:
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.results[self.folded[name]]))
        else:
            super().visit_var_binding_(binding)

    def rewrite(self) -> tvm.IRModule:
        main = self.mod_.get_global_var("main")
        self.builder_.update_func(main, self.visit_expr(self.mod_["main"]))
        return self.builder_.get()


def rewrite_lut(mod: tvm.IRModule, layers: list) -> tvm.IRModule:
    """``layers``: LutLayer per replaced call (``lut_compiler.codebooks``)."""
    if not layers:
        return mod
    mod = _Rewriter(mod, layers).rewrite()
    return tvm.transform.Sequential([relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()])(mod)
