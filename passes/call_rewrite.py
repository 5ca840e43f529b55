"""Replace matmul/conv2d bindings of ``main`` by other calls (lookup-add, sparse), folding bias adds.

Each `Replacement` names the binding of the call (``Candidate.var``) and emits its new
computation for the rewritten input. When the candidate's single reader is a bias add
(``Candidate.bias_var``), the new call already includes the bias: the add's binding takes
the new result. Dense weights left unused are removed afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .find_candidates import Candidate


def add_kernel(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """Add a TE-made PrimFunc (whose global symbol is "main") under its own name."""
    return bb.add_func(func.without_attr("global_symbol"), name)


@dataclass(frozen=True)
class Replacement:
    """emit(bb, x) -> the new (unbound) computation of the call in its output shape, bias included
    when the candidate has a folded bias add."""

    candidate: Candidate
    emit: Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]
    name: str  # of the bound result when the bias add takes it


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, replacements: list[Replacement]) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.replacements = {r.candidate.var: r for r in replacements}
        self.folded = {r.candidate.bias_var: r.candidate.var for r in replacements if r.candidate.bias_var}
        self.results: dict[str, relax.Var] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        name = binding.var.name
        if name in self.replacements:
            r = self.replacements[name]
            y = r.emit(self.builder_, self.visit_expr(binding.value.args[0]))
            if r.candidate.bias_var:  # the add binding takes the result
                self.results[name] = self.builder_.emit(y, r.name)
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


def rewrite_calls(mod: tvm.IRModule, replacements: list[Replacement]) -> tvm.IRModule:
    """``mod`` with each replacement's call rewritten, then dead code (the dense weights) removed."""
    if not replacements:
        return mod
    mod = _Rewriter(mod, replacements).rewrite()
    return tvm.transform.Sequential([relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()])(mod)
