"""ONNX loading, shape binding and support checks: every failure is one clear line."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lut_compiler.errors import ModelLoadError, ShapeError, UnsupportedModelError
from lut_compiler.onnx_import import bind_shapes, import_onnx, load_model


def unsupported_model() -> onnx.ModelProto:
    """Valid ONNX (passes the checker) using two ops Relax's frontend lacks: Celu and Det."""
    graph = helper.make_graph(
        [helper.make_node("Celu", ["x"], ["c"], name="celu_1"), helper.make_node("Det", ["c"], ["y"], name="det_1")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(tmp_path / "nope.onnx")


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a valid ONNX file|fails the ONNX checker|no graph nodes"):
        load_model(path)


def test_truncated_model(models, tmp_path):
    data = models["mlp"].read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_unsupported_ops_listed_in_one_error():
    with pytest.raises(UnsupportedModelError) as err:
        import_onnx(unsupported_model())
    message = str(err.value)
    assert "Celu (node 'celu_1')" in message and "Det (node 'det_1')" in message
    assert "\n" not in message


def test_unbound_dynamic_dims_are_rejected(models):
    with pytest.raises(ShapeError, match=r"ids \[batchxseq\].*--input-shape ids=1x128"):
        import_onnx(models["encoder"])


@pytest.mark.parametrize(
    "shapes,message",
    [
        ({"ids": (1, 2, 3)}, "does not fit"),
        ({"ids": (0, 8)}, "must be positive"),
        ({"ids": (1, 8), "mask": (1, 8)}, "unknown input"),
    ],
)
def test_bad_bindings(models, shapes, message):
    with pytest.raises(ShapeError, match=message):
        import_onnx(models["encoder"], shapes)


def test_binding_contradicting_a_static_dim(models):
    model = bind_shapes(load_model(models["cnn"]), {"image": (1, 3, 8, 8)})
    with pytest.raises(ShapeError, match="does not fit"):
        bind_shapes(model, {"image": (1, 4, 8, 8)})


def test_import_gives_static_specs(models):
    imported = import_onnx(models["encoder"], {"ids": (2, 12)})
    assert [(s.name, s.shape, s.dtype) for s in imported.inputs] == [("ids", (2, 12), "int64")]
    assert [(s.name, s.shape, s.dtype) for s in imported.outputs] == [("out", (2, 12, 64), "float32")]
    dims = [d.dim_value for d in imported.onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 12]
