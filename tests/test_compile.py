"""Import + compile (default schedules, no tuning) matches ONNX Runtime on several shapes."""

import numpy as np
import pytest
from conftest import ort_run, random_feeds

import lut_compiler

CASES = [
    ("mlp", {"x": (1, 48)}), ("mlp", {"x": (5, 48)}), ("mlp", {"x": (64, 48)}),
    ("cnn", {"image": (1, 3, 20, 20)}), ("cnn", {"image": (3, 3, 16, 24)}), ("cnn", {"image": (2, 3, 9, 9)}),
    ("encoder", {"ids": (1, 8)}), ("encoder", {"ids": (2, 12)}), ("encoder", {"ids": (3, 17)}),
]


@pytest.mark.parametrize("name,shapes", CASES, ids=[f"{n}-{'x'.join(map(str, next(iter(s.values()))))}" for n, s in CASES])
def test_matches_onnxruntime(models, target, name, shapes):
    model = lut_compiler.compile(models[name], lut_compiler.CompileConfig(input_shapes=shapes), target=target,
                                 progress=False)
    for seed in (0, 1):
        feeds = random_feeds(model.inputs, seed)
        expected = ort_run(models[name], feeds)
        got = model.run(feeds)
        assert list(got) == ["out"]
        np.testing.assert_allclose(got["out"], expected[0], rtol=1e-4, atol=1e-4)


def test_every_kernel_is_scheduled(models, target, tmp_path):
    """No kernel is left as the naive single-threaded loop nest the stock pipeline emits."""
    config = lut_compiler.CompileConfig(input_shapes={"x": (8, 48)}, dump_ir=str(tmp_path))
    lut_compiler.compile(models["mlp"], config, target=target, progress=False)
    scheduled = (tmp_path / "7_schedule.py").read_text()
    assert scheduled.count("T.prim_func") == scheduled.count('"tirx.is_scheduled": True')
    assert "T.parallel" in scheduled and "T.vectorized" in scheduled


def test_run_rejects_wrong_feeds(models, target):
    model = lut_compiler.compile(models["mlp"], lut_compiler.CompileConfig(input_shapes={"x": (2, 48)}),
                                 target=target, progress=False)
    good = np.zeros((2, 48), np.float32)
    with pytest.raises(lut_compiler.errors.FeedError, match="missing x"):
        model.run({"y": good})
    with pytest.raises(lut_compiler.errors.FeedError, match=r"expected x: float32\[2x48\], got x: float64\[2x48\]"):
        model.run({"x": good.astype(np.float64)})
    with pytest.raises(lut_compiler.errors.FeedError, match=r"got x: float32\[3x48\]"):
        model.run({"x": np.zeros((3, 48), np.float32)})
