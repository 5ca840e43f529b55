"""Find every matmul and conv2d in a Relax module, with shapes, FLOPs and weight kind.

Runs on the imported module, before legalization. A weight counts as constant
when it is a Relax constant or ``permute_dims`` of one (the importer's Gemm form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst

from ..onnx_import import weight_digest

OPS = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}


@dataclass
class Candidate:
    """One matmul/conv2d call. Shapes are static; flops counts a multiply-add as 2."""

    name: str
    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    flops: int
    const_weight: bool


def _shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _resolve_const(expr: relax.Expr, bound: dict) -> GenericConst | None:
    """The constant behind a weight operand: itself, or under permute_dims."""
    expr = bound.get(expr, expr)
    if isinstance(expr, GenericConst):
        return expr
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.permute_dims"):
        inner = bound.get(expr.args[0], expr.args[0])
        return inner if isinstance(inner, GenericConst) else None
    return None


def _flops(op: str, x: tuple, w: tuple, out: tuple) -> int:
    """matmul: K per output; conv2d (OIHW weight, any groups): I/groups x kh x kw per output."""
    per_output = x[-1] if op == "matmul" else w[1] * w[2] * w[3]
    return 2 * int(np.prod(out)) * per_output


def find_candidates(mod: tvm.IRModule, weight_names: dict[str, str] | None = None) -> list[Candidate]:
    """Matmul/conv2d calls of ``mod["main"]`` in program order.

    weight_names: weight digest -> ONNX node name, to name calls as the user knows them.
    """
    weight_names = weight_names or {}
    bound: dict = {}
    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            bound[binding.var] = binding.value
            call = binding.value
            if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or call.op.name not in OPS:
                continue
            op = OPS[call.op.name]
            x, w = call.args[0], call.args[1]
            const = _resolve_const(w, bound)
            name = binding.var.name
            if const is not None:
                name = weight_names.get(weight_digest(const.value.numpy()), name)
            xs, ws, out = _shape(x), _shape(w), _shape(binding.var)
            found.append(Candidate(name, op, xs, ws, out, _flops(op, xs, ws, out), const is not None))
    return found


def table(candidates: list[Candidate]) -> str:
    """One row per candidate, plus the total."""
    def fmt(shape):
        return "x".join(map(str, shape))

    width = max([len(c.name) for c in candidates] + [5])
    rows = [f"{'layer':<{width}} {'op':<7} {'input':<16} {'weight':<16} {'output':<16} {'MFLOP':>9}  weight"]
    for c in candidates:
        rows.append(
            f"{c.name:<{width}} {c.op:<7} {fmt(c.input_shape):<16} {fmt(c.weight_shape):<16} "
            f"{fmt(c.output_shape):<16} {c.flops / 1e6:>9.2f}  {'constant' if c.const_weight else 'activation'}"
        )
    total = sum(c.flops for c in candidates)
    const = sum(c.flops for c in candidates if c.const_weight)
    rows.append(f"{len(candidates)} matmul/conv layers, {total / 1e6:.1f} MFLOP, {const / max(total, 1):.0%} with constant weights")
    return "\n".join(rows)
