"""Shared fixtures: exported test models, the host target, ONNX Runtime references."""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from torch_models import export_all  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """name -> path of the small exported torch models (dynamic batch)."""
    return export_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def three_kernels(tmp_path_factory):
    """x [16, 96] -> 128 -> 160 -> 48, relu between: three kernels of different shapes."""
    rng = np.random.default_rng(0)
    dims, nodes, weights = [96, 128, 160, 48], [], []
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        src, out = "x" if i == 0 else f"h{i}", "y" if i == 2 else f"h{i + 1}"
        nodes.append(helper.make_node("MatMul", [src, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu" if i < 2 else "Identity", [f"m{i}"], [out]))
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) / 8, f"W{i}"))
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 48])], weights)
    path = tmp_path_factory.mktemp("three") / "three.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="session")
def target():
    from lut_compiler.target import resolve_target

    return resolve_target("host")


def ort_run(path, feeds: dict) -> list[np.ndarray]:
    """Reference outputs from ONNX Runtime on the original (unsimplified) model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def random_feeds(specs, seed: int) -> dict[str, np.ndarray]:
    """Seeded random inputs: normal floats, token ids in [0, 100) for integer inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if np.dtype(spec.dtype).kind in "iu":
            feeds[spec.name] = rng.integers(0, 100, spec.shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return feeds
