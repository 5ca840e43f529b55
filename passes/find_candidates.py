"""Find every matmul and conv2d in a Relax module, with shapes, FLOPs, weight and bias.

Runs on the imported module, before legalization. A weight counts as constant
when it is a Relax constant or ``permute_dims`` of one (the importer's Gemm form).
A bias is the constant of the single ``add`` that consumes the call (``reshape(const)``
for convolutions), when it broadcasts along the output channels only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst

from ..onnx_import import WeightUser, weight_digest

OPS = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}


@dataclass(frozen=True)
class ConvAttrs:
    """conv2d attributes: padding is (top, left, bottom, right)."""

    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    layouts: tuple[str, str, str]  # data, kernel, out


@dataclass
class Candidate:
    """One matmul/conv2d call. Shapes are empty when not static; flops counts a multiply-add as 2.

    var: name of the Relax variable bound to the call (unique in ``main``).
    weight: the constant weight, matmul as [D, N] and conv2d as OIHW; None for activations.
    bias: float32 [N] folded from the consuming add, bound to the variable ``bias_var``.
    activation: the ONNX tensor holding the call's input (None when not traced to one).
    """

    name: str
    op: str
    var: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: str
    flops: int
    const_weight: bool
    conv: ConvAttrs | None = None
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    bias_var: str | None = None
    activation: str | None = None

    @property
    def static(self) -> bool:
        return bool(self.input_shape and self.weight_shape and self.output_shape)


def _shape(expr: relax.Expr) -> tuple[int, ...]:
    """Static shape, or () when any dimension is symbolic."""
    dims = expr.ty.shape
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return ()
    return tuple(int(d) for d in dims)


def _weight(expr: relax.Expr, bound: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(stored constant, weight as the call reads it) for a constant or ``permute_dims(constant)``."""
    expr = bound.get(expr, expr)
    if isinstance(expr, GenericConst):
        value = expr.value.numpy()
        return value, value
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.permute_dims"):
        inner = bound.get(expr.args[0], expr.args[0])
        if isinstance(inner, GenericConst):
            value = inner.value.numpy()
            axes = expr.attrs.axes
            return value, value.transpose([int(a) for a in axes]) if axes is not None else value.T
    return None


def _bias_const(expr: relax.Expr, bound: dict) -> np.ndarray | None:
    """A constant or ``reshape(constant)``, in the shape the add reads."""
    expr = bound.get(expr, expr)
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.reshape"):
        inner = bound.get(expr.args[0], expr.args[0])
        if isinstance(inner, GenericConst) and _shape(expr):
            return inner.value.numpy().reshape(_shape(expr))
    return expr.value.numpy() if isinstance(expr, GenericConst) else None


def _flops(op: str, x: tuple, w: tuple, out: tuple) -> int:
    """matmul: K per output; conv2d (OIHW weight, any groups): I/groups x kh x kw per output."""
    if not (x and w and out):
        return 0
    per_output = x[-1] if op == "matmul" else w[1] * w[2] * w[3]
    return 2 * int(np.prod(out)) * per_output


def _conv_attrs(call: relax.Call) -> ConvAttrs:
    a = call.attrs
    ints = lambda xs: tuple(int(v) for v in xs)  # noqa: E731
    return ConvAttrs(ints(a.strides), ints(a.padding), ints(a.dilation), int(a.groups),
                     (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)))


def _bias(add: relax.Call, var: relax.Var, out_shape: tuple, op: str, bound: dict) -> np.ndarray | None:
    """The bias vector of ``add(var, b)`` when b varies only along the output channel axis."""
    other = add.args[1] if add.args[0].same_as(var) else add.args[0]
    value = _bias_const(other, bound)
    if not out_shape or value is None or value.dtype != np.float32 or value.ndim > len(out_shape):
        return None
    axis = len(out_shape) - 1 if op == "matmul" else 1
    expected = [1] * len(out_shape)
    expected[axis] = out_shape[axis]
    if [1] * (len(out_shape) - value.ndim) + list(value.shape) != expected:
        return None
    return value.reshape(out_shape[axis])


def _uses(func: relax.Function) -> dict:
    """Variable -> the calls that read it (as (bound var, call))."""
    uses: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for arg in getattr(binding.value, "args", []) or []:
                if isinstance(arg, relax.Var):
                    uses.setdefault(arg, []).append((binding.var, binding.value))
    for var in relax.analysis.free_vars(func.body.body):
        uses.setdefault(var, []).append((None, None))  # returned: not foldable
    return uses


def find_candidates(mod: tvm.IRModule, weight_users: dict[str, WeightUser] | None = None) -> list[Candidate]:
    """Matmul/conv2d calls of ``mod["main"]`` in program order.

    weight_users: weight digest -> ONNX node, to name calls as the user knows them and
        to find the ONNX tensor that holds each call's input activation.
    """
    weight_users = weight_users or {}
    func = mod["main"]
    uses = _uses(func)
    add_op = tvm.ir.Op.get("relax.add")
    bindings = [b for block in func.body.blocks for b in block.bindings]
    bound = {b.var: b.value for b in bindings}
    found = []
    for binding in bindings:
        call = binding.value
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or call.op.name not in OPS:
            continue
        op = OPS[call.op.name]
        x, w = call.args[0], call.args[1]
        weight = _weight(w, bound)
        user = weight_users.get(weight_digest(weight[0])) if weight is not None else None
        name = user.node if user else binding.var.name
        xs, ws, out = _shape(x), _shape(w), _shape(binding.var)
        candidate = Candidate(
            name, op, binding.var.name, xs, ws, out, str(binding.var.ty.dtype),
            _flops(op, xs, ws, out), weight is not None,
            conv=_conv_attrs(call) if op == "conv2d" else None, weight=None if weight is None else weight[1],
            activation=user.activation if user else None,
        )
        users = uses.get(binding.var, [])
        if len(users) == 1 and users[0][1] is not None and users[0][1].op == add_op:
            candidate.bias = _bias(users[0][1], binding.var, out, op, bound)
            candidate.bias_var = users[0][0].name if candidate.bias is not None else None
        found.append(candidate)
    return found


def select(eligible: list[Candidate], layers: str) -> set[str]:
    """Vars of the candidates a selection picks: "all", "last:N" (program order) or a regex
    searched in layer names."""
    if layers == "all":
        return {c.var for c in eligible}
    if layers.startswith("last:"):
        n = int(layers[5:])
        return {c.var for c in eligible[len(eligible) - n:]} if n else set()
    return {c.var for c in eligible if re.search(layers, c.name)}
