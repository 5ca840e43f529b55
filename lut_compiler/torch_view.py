"""A differentiable torch view of an ONNX graph, with chosen layers replaced.

`OnnxModule` runs the simplified, shape-bound graph (`ImportedModel.onnx_model`, what ONNX
Runtime runs for calibration) node by node with torch ops; initializers are buffers. A
node named in `replace` (a MatMul, Gemm or Conv with a constant weight) is computed by the
given module from the node's first input instead, plus the node's own bias input (Gemm C,
Conv B) when it has one: a following Add node adds a MatMul's bias as in the graph.

Only the ops the compiler's models use are implemented; any other raises a one-line
UnsupportedModelError naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from .errors import UnsupportedModelError

Op = Callable[..., object]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


# ---------------------------------------------------------------- ops: (attrs, *inputs) -> output(s)

_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq,
           "Less": torch.lt, "Greater": torch.gt, "And": torch.logical_and, "Or": torch.logical_or,
           "Max": torch.maximum, "Min": torch.minimum}
_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
          "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Not": torch.logical_not,
          "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Identity": lambda x: x}

for _name, _fn in _BINARY.items():
    OPS[_name] = lambda a, x, y, _fn=_fn: _fn(x, y)
for _name, _fn in _UNARY.items():
    OPS[_name] = lambda a, x, _fn=_fn: _fn(x)


@op("Div")
def _div(a, x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


@op("MatMul")
def _matmul(a, x, w):
    return torch.matmul(x, w)


@op("Gemm")
def _gemm(a, x, w, c=None):
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y if c is None else y + a.get("beta", 1.0) * c


def _conv_padding(a, spatial: int) -> tuple[int, ...]:
    pads = a.get("pads", [0] * 2 * spatial)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedModelError(f"auto_pad={a['auto_pad']!r} (the simplified graph should have explicit pads)")
    return tuple(pads)


@op("Conv")
def _conv(a, x, w, b=None):
    top, left, bottom, right = _conv_padding(a, 2)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, w, b, stride=a.get("strides", 1), dilation=a.get("dilations", 1), groups=a.get("group", 1))


@op("MaxPool", "AveragePool")
def _pool(a, x):
    top, left, bottom, right = _conv_padding(a, 2)
    kernel, stride = a["kernel_shape"], a.get("strides", 1)
    if a.get("ceil_mode", 0):
        raise UnsupportedModelError("pooling with ceil_mode=1")
    if "dilations" in a and any(d != 1 for d in a["dilations"]):
        raise UnsupportedModelError("dilated pooling")
    if (top, left) != (bottom, right):
        fill = float("-inf") if a.get("_op") == "MaxPool" else 0.0
        x, top, left = F.pad(x, (left, right, top, bottom), value=fill), 0, 0
    if a.get("_op") == "MaxPool":
        return F.max_pool2d(x, kernel, stride, (top, left))
    return F.avg_pool2d(x, kernel, stride, (top, left), count_include_pad=bool(a.get("count_include_pad", 0)))


@op("GlobalAveragePool")
def _gap(a, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("BatchNormalization")
def _batchnorm(a, x, scale, bias, mean, var):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


@op("LayerNormalization")
def _layernorm(a, x, scale, bias=None):
    axis = a.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, a.get("epsilon", 1e-5))


def _axes(a, axes_input, rank: int) -> list[int] | None:
    axes = _ints(axes_input) if axes_input is not None else a.get("axes")
    return None if axes is None else [ax % rank for ax in axes]


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2")
def _reduce(a, x, axes=None):
    dims = _axes(a, axes, x.dim())
    keep = bool(a.get("keepdims", 1))
    if dims is None:
        if a.get("noop_with_empty_axes", 0):
            return x
        dims = list(range(x.dim()))
    kind = a["_op"]
    if kind == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if kind == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if kind == "ReduceL2":
        return torch.sqrt((x * x).sum(dim=dims, keepdim=keep))
    reduce = torch.amax if kind == "ReduceMax" else torch.amin
    return reduce(x, dim=dims, keepdim=keep)


@op("Softmax")
def _softmax(a, x):
    return torch.softmax(x, dim=a.get("axis", -1))


@op("Reshape")
def _reshape(a, x, shape):
    dims = _ints(shape)
    dims = [x.shape[i] if d == 0 and not a.get("allowzero", 0) else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def _flatten(a, x):
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis  # in [-r, r]: r flattens everything into rows
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@op("Transpose")
def _transpose(a, x):
    return x.permute(a.get("perm", list(range(x.dim()))[::-1]))


@op("Unsqueeze")
def _unsqueeze(a, x, axes=None):
    axes = _ints(axes) if axes is not None else a["axes"]
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


@op("Squeeze")
def _squeeze(a, x, axes=None):
    axes = _ints(axes) if axes is not None else a.get("axes")
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


@op("Concat")
def _concat(a, *xs):
    return torch.cat(xs, dim=a["axis"])


@op("Split")
def _split(a, x, split=None):
    axis = a.get("axis", 0)
    sizes = _ints(split) if split is not None else a.get("split")
    if sizes is None:
        parts = a.get("num_outputs") or a["_outputs"]
        sizes = [x.shape[axis] // parts] * parts
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(a, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise UnsupportedModelError(f"Slice with step {st}")
        n = x.shape[ax]
        s, e = max(0, min(n, s + n if s < 0 else s)), max(0, min(n, e + n if e < 0 else e))
        index[ax % x.dim()] = slice(s, e)
    return x[tuple(index)]


@op("Gather")
def _gather(a, x, indices):
    axis = a.get("axis", 0) % x.dim()
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.index_select(x, axis, idx.reshape(-1)).reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@op("Cast")
def _cast(a, x):
    return x.to(_TORCH_DTYPES[a["to"]])


@op("Where")
def _where(a, cond, x, y):
    return torch.where(cond.bool(), x, y)


@op("Expand")
def _expand(a, x, shape):
    target = torch.broadcast_shapes(x.shape, tuple(_ints(shape)))
    return x.expand(target)


@op("Shape")
def _shape(a, x):
    return torch.tensor(list(x.shape), dtype=torch.int64)


@op("ConstantOfShape")
def _constant_of_shape(a, shape):
    value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    return torch.full(tuple(_ints(shape)), float(value.reshape(-1)[0]), dtype=_TORCH_DTYPES[a["value"].data_type]
                      if "value" in a else torch.float32)


@op("Constant")
def _constant(a):
    return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())


@op("Clip")
def _clip(a, x, low=None, high=None):
    return torch.clamp(x, low if low is not None else a.get("min"), high if high is not None else a.get("max"))


@op("Gelu")
def _gelu(a, x):
    return F.gelu(x, approximate="tanh" if a.get("approximate", b"none") in (b"tanh", "tanh") else "none")


_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.FLOAT16: torch.float16,
}


# ---------------------------------------------------------------- the module


class OnnxModule(nn.Module):
    """forward(**inputs) -> list of the graph's outputs (torch tensors), differentiable.

    replace: ONNX node name -> module computing that node from its first input.
    taps: names of intermediate tensors returned after the graph's outputs (settable).
    """

    def __init__(self, model: onnx.ModelProto, replace: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        replace = replace or {}
        graph = model.graph
        self.nodes = list(graph.node)
        names = {n.name for n in self.nodes}
        missing = sorted(set(replace) - names)
        if missing:
            raise ValueError(f"no ONNX node named {missing[0]!r} to replace")
        unsupported = sorted({n.op_type for n in self.nodes if n.op_type not in OPS and n.name not in replace})
        if unsupported:
            raise UnsupportedModelError(f"the torch view does not implement ONNX op(s) {', '.join(unsupported)}")
        self.buffer_names = {}
        for i, init in enumerate(graph.initializer):
            attr = f"init_{i}"
            self.register_buffer(attr, torch.from_numpy(numpy_helper.to_array(init).copy()), persistent=False)
            self.buffer_names[init.name] = attr
        self.replaced = nn.ModuleDict({f"node_{i}": replace[n.name] for i, n in enumerate(self.nodes) if n.name in replace})
        self.slots = {n.name: f"node_{i}" for i, n in enumerate(self.nodes) if n.name in replace}
        self.attrs = [dict(_attrs(n), _op=n.op_type, _outputs=len(n.output)) for n in self.nodes]
        self.outputs = [o.name for o in graph.output]
        self.taps: list[str] = []

    def forward(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        env = {name: getattr(self, attr) for name, attr in self.buffer_names.items()}
        env.update(inputs)
        for node, attrs in zip(self.nodes, self.attrs):
            args = [env[i] if i else None for i in node.input]
            if node.name in self.slots:
                out = self.replaced[self.slots[node.name]](args[0])
                bias = args[2] if node.op_type in ("Gemm", "Conv") and len(args) > 2 else None
                if bias is not None:
                    beta = attrs.get("beta", 1.0) if node.op_type == "Gemm" else 1.0
                    out = out + beta * (bias.reshape(1, -1, 1, 1) if node.op_type == "Conv" else bias)
                results = (out,)
            else:
                result = OPS[node.op_type](attrs, *args)
                results = result if isinstance(result, tuple) else (result,)
            env.update(zip(node.output, results))
        return [env[name] for name in self.outputs + self.taps]
