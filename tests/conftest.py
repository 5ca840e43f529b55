"""Shared fixtures: exported test models, the host target, ONNX Runtime references."""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from torch_models import export_all  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """name -> path of the small exported torch models (dynamic batch)."""
    return export_all(tmp_path_factory.mktemp("models"))


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
