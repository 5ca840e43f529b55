"""Calibration capture: padding tokens (attention_mask == 0) never reach codebooks or int8 scales."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lut_compiler.calibration import activation_absmax, capture, mask_input
from lut_compiler.config import LutConfig
from lut_compiler.lut import plan
from lut_compiler.onnx_import import import_onnx

PAD = 1000.0  # padding rows hold this value; real rows are standard normal


def _masked_matmul(path, mask: str = "attention_mask") -> str:
    """y[B, S, 4] = (x[B, S, 8] @ W) * mask[B, S, None], mask an int64 [B, S] input."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Unsqueeze", [mask, "axes"], ["m3"]),
         helper.make_node("Cast", ["m3"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["xw", "mf"], ["y"])], "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 4])], [w, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return str(path)


def _samples(batch: int, seq: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(batch * 100 + seq)
    samples = []
    for _ in range(count):
        mask = (np.arange(seq)[None, :] < rng.integers(1, seq + 1, size=(batch, 1))).astype(np.int64)
        x = np.where(mask[..., None] == 1, rng.standard_normal((batch, seq, 8)), PAD).astype(np.float32)
        samples.append({"x": x, "attention_mask": mask})
    return samples


def test_padding_rows_are_left_out_of_capture_and_ranges(tmp_path):
    path = _masked_matmul(tmp_path / "masked.onnx")
    for batch, seq in [(1, 16), (3, 7)]:
        imported = import_onnx(path, {"x": (batch, seq, 8), "attention_mask": (batch, seq)})
        samples = _samples(batch, seq, count=6)
        assert mask_input(samples) == "attention_mask"
        plans = [p for p in plan(imported, LutConfig()) if p.replaced]
        assert len(plans) == 1
        rows = capture(imported.onnx_model, samples, plans, rows_per_layer=10_000, seed=1, progress=False)
        sub = rows[plans[0].candidate.var]
        real = sum(int(s["attention_mask"].sum()) for s in samples)
        assert len(sub) == real and np.abs(sub).max() < PAD
        peak = activation_absmax(imported.onnx_model, samples, [plans[0].candidate], progress=False)
        expected = max(np.abs(s["x"][s["attention_mask"] == 1]).max() for s in samples)
        assert peak[plans[0].candidate.var] == np.float32(expected)


def test_without_a_mask_input_every_row_counts(tmp_path):
    path = _masked_matmul(tmp_path / "segments.onnx", mask="segments")
    imported = import_onnx(path, {"x": (2, 5, 8), "segments": (2, 5)})
    samples = [{"x": s["x"], "segments": s["attention_mask"]} for s in _samples(2, 5, count=3)]
    assert mask_input(samples) is None
    plans = [p for p in plan(imported, LutConfig()) if p.replaced]
    sub = capture(imported.onnx_model, samples, plans, rows_per_layer=10_000, seed=1, progress=False)
    assert len(sub[plans[0].candidate.var]) == 3 * 2 * 5
    peak = activation_absmax(imported.onnx_model, samples, [plans[0].candidate], progress=False)
    assert peak[plans[0].candidate.var] == PAD
