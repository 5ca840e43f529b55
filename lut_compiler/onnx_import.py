"""ONNX -> Relax: load, check, bind dynamic dims, simplify, import.

Stock ``from_onnx`` fails on real exports (a BERT attention-mask subgraph, CNNs
whose padding is a Pad subgraph); binding every dim to a static value and running
a graph simplifier (onnxslim) first makes both import and match ONNX Runtime.
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import re
import warnings
from collections import defaultdict
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .artifact import quiet_native_stderr
from .errors import ModelLoadError, ShapeError, UnsupportedModelError
from .tensor_spec import TensorSpec

MIN_OPSET = 7  # the oldest default-domain opset ONNX Runtime (the reference) runs

ModelSource = str | os.PathLike | bytes | onnx.ModelProto


@dataclass(frozen=True)
class WeightUser:
    """The ONNX node that reads a weight, and its activation (first) input."""

    node: str
    activation: str


@dataclass
class ImportedModel:
    """A model ready for the compiler.

    mod: Relax IRModule with weights embedded as constants, static shapes.
    onnx_model: the simplified, shape-bound ONNX graph (what ORT comparisons run).
    weight_users: digest of each weight's bytes -> the ONNX node using it (its name, and
        the activation tensor it multiplies, which calibration reads with ONNX Runtime).
    """

    mod: "tvm.IRModule"  # noqa: F821
    onnx_model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weight_users: dict[str, WeightUser]
    sha256: str


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Read and check an ONNX model; every failure is a one-line ModelLoadError."""
    if isinstance(source, onnx.ModelProto):
        model, label = source, "model"
    elif isinstance(source, bytes):
        model, label = _parse(source, "model bytes"), "model bytes"
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        model = _parse(path.read_bytes(), label)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        for tensor in external:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not (path.parent / location).is_file():
                raise ModelLoadError(f"{label}: external data file {location!r} of tensor {tensor.name!r} not found "
                                     f"next to the model")
        if external:
            onnx.load_external_data_for_model(model, str(path.parent))
    if not model.graph.node:
        raise ModelLoadError(f"{label} has no graph nodes (empty or truncated ONNX file)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise ModelLoadError(f"{label} uses ONNX opset {opset}; supported: {MIN_OPSET} to {newest} "
                             "(onnx.version_converter can convert it)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise ModelLoadError(f"{label} fails the ONNX checker: {_first_line(err)}") from None
    return model


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    try:
        return onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"{label} is not a valid ONNX file: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: older exporters also list initializers as graph inputs."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def bind_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Return a copy whose inputs all have static shapes (user bindings applied)."""
    inputs = {i.name: i for i in graph_inputs(model)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ShapeError(f"--input-shape names unknown input(s) {', '.join(unknown)}; model inputs: {', '.join(inputs)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    unbound = []
    for value in graph_inputs(model):
        dims = _dims(value)
        if value.name in shapes:
            shape = tuple(shapes[value.name])
            if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                raise ShapeError(f"input {value.name!r} has shape {_fmt(dims)}; the binding {_fmt(shape)} does not fit it")
            if any(s <= 0 for s in shape):
                raise ShapeError(f"input {value.name!r}: dimensions must be positive, got {_fmt(shape)}")
        elif all(isinstance(d, int) for d in dims):
            shape = tuple(dims)
        else:
            unbound.append(f"{value.name} {_fmt(dims)}")
            continue
        _set_shape(value, shape)
    if unbound:
        example = unbound[0].split(" ")[0]
        raise ShapeError(
            f"dynamic input shape(s) {'; '.join(unbound)}: bind them, e.g. --input-shape {example}=1x128"
        )
    # Drop stale intermediate shapes (they may name the old symbolic dims).
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def _fmt(dims) -> str:
    return "[" + "x".join(str(d) for d in dims) + "]"


def _set_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    tensor_type = value.type.tensor_type
    tensor_type.ClearField("shape")
    for d in shape:
        tensor_type.shape.dim.add().dim_value = int(d)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: shape inference, constant folding (shape subgraphs become constants), dead code."""
    import onnxslim

    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            slim = onnxslim.slim(model)
        except Exception as err:  # the simplifier is best effort; import may still work
            warnings.warn(f"onnxslim failed, importing the unsimplified graph: {_first_line(err)}")
            return model
    return slim if slim is not None else model


def check_supported(model: onnx.ModelProto) -> None:
    """Raise one UnsupportedModelError listing every op the Relax frontend lacks."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If", "Constant"}
    missing: dict[str, list[str]] = defaultdict(list)
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing[op].append(node.name or "<unnamed>")
    if missing:
        parts = []
        for op, names in sorted(missing.items()):
            shown = ", ".join(repr(n) for n in names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{op} (node {shown})")
        raise UnsupportedModelError(f"unsupported ONNX operator(s): {'; '.join(parts)}")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def weight_digest(array) -> str:
    """Key that identifies a weight by content (Relax constants lose their names)."""
    return hashlib.sha1(array.tobytes()).hexdigest() + str(tuple(array.shape))


def _weight_users(model: onnx.ModelProto) -> dict[str, WeightUser]:
    from onnx import numpy_helper

    users = {}
    for node in model.graph.node:
        for name in node.input[1:2]:  # the weight operand of MatMul/Gemm/Conv
            users.setdefault(name, WeightUser(node.name or node.output[0], node.input[0]))
    return {
        weight_digest(numpy_helper.to_array(init)): users[init.name]
        for init in model.graph.initializer
        if init.name in users
    }


def import_onnx(source: ModelSource, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ImportedModel:
    """Load, bind shapes, simplify and convert an ONNX model to Relax."""
    from tvm.relax.frontend.onnx import from_onnx

    original = load_model(source)
    sha256 = hashlib.sha256(original.SerializeToString()).hexdigest()
    model = simplify(bind_shapes(original, input_shapes or {}))
    check_supported(model)
    said, failure = io.StringIO(), None  # the frontend prints the operator it failed on
    with quiet_native_stderr():  # and a failed conversion leaves C++ warnings when collected
        try:
            with warnings.catch_warnings(), redirect_stdout(said):
                warnings.simplefilter("ignore")
                mod = from_onnx(model, keep_params_in_input=False)
        except Exception as err:
            failure = _first_line(err)
        gc.collect()
    if failure is not None:
        failed = re.search(r"Error converting operator (\w+)", said.getvalue())
        where = f" at operator {failed.group(1)}" if failed else ""
        raise UnsupportedModelError(f"ONNX import into Relax failed{where}: {failure}")
    inputs = [
        TensorSpec(i.name, tuple(_dims(i)), onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name)
        for i in graph_inputs(model)
    ]
    return ImportedModel(mod, model, inputs, _output_specs(mod, model), _weight_users(model), sha256)


def _output_specs(mod, model: onnx.ModelProto) -> list[TensorSpec]:
    """Output names from ONNX, static shapes and dtypes from the Relax signature."""
    from tvm import relax

    ret = mod["main"].ret_ty if hasattr(mod["main"], "ret_ty") else mod["main"].ret_struct_info
    types = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = [o.name for o in model.graph.output]
    if len(types) != len(names):
        raise UnsupportedModelError(f"model has {len(names)} outputs but Relax returns {len(types)}")
    specs = []
    for name, ty in zip(names, types):
        shape = [int(d) if isinstance(d, int) else getattr(d, "value", None) for d in ty.shape]
        if any(d is None for d in shape):
            raise ShapeError(f"output {name!r} has a data-dependent shape {ty.shape}; only static outputs are supported")
        specs.append(TensorSpec(name, tuple(shape), str(ty.dtype)))
    return specs
