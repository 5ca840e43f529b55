"""MetaSchedule tuning records real measurements, speeds kernels up, and is never repeated."""

import json

import numpy as np
import onnx
import pytest
import tvm
from conftest import ort_run, random_feeds
from onnx import TensorProto, helper, numpy_helper

import lut_compiler
from lut_compiler.onnx_import import import_onnx

pytestmark = pytest.mark.tuning


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """y = relu(x @ W + b), x: float32[32, 256], W: [256, 384]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 384])],
        [numpy_helper.from_array(rng.standard_normal((256, 384)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(384).astype(np.float32), "b")],
    )
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_tuning_records_and_reuses(dense_model, target, tmp_path):
    config = lut_compiler.CompileConfig(tune=lut_compiler.TuneConfig(trials_per_task=6, work_dir=str(tmp_path)))
    first = lut_compiler.compile(dense_model, config, target=target, progress=False)
    tuning = first.record["tuning"]
    assert tuning["new_trials"] >= 6
    assert all(t["best_us"] is not None and t["best_us"] > 0 for t in tuning["tasks"])
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 6  # one line per successfully measured candidate
    # The default CPU schedule is measured and recorded too (a trace with no sampled decisions),
    # so the applied best is never slower than the untuned default.
    defaults = [r for r in records if "SamplePerfectTile" not in r and "SampleCategorical" not in r]
    assert len(defaults) == len(tuning["tasks"])
    ledger = json.loads((tmp_path / "trials.json").read_text())
    assert list(ledger.values()) == [6] * len(tuning["tasks"])

    feeds = random_feeds(first.inputs, seed=3)
    np.testing.assert_allclose(first.run(feeds)["y"], ort_run(dense_model, feeds)[0], rtol=1e-4, atol=1e-4)

    again = lut_compiler.compile(dense_model, config, target=target, progress=False)
    assert again.record["tuning"]["new_trials"] == 0
    assert again.record["phases"]["tune"] < first.record["phases"]["tune"]
    np.testing.assert_allclose(again.run(feeds)["y"], first.run(feeds)["y"], rtol=1e-6, atol=1e-6)

    # More budget tunes only the difference.
    config.tune.trials_per_task = 8
    more = lut_compiler.compile(dense_model, config, target=target, progress=False)
    assert 0 < more.record["tuning"]["new_trials"] <= 2 * len(tuning["tasks"])

    # The tuned kernel beats the stock pipeline's unscheduled one by a wide margin.
    stock = tvm.compile(import_onnx(dense_model).mod, target)
    vm = tvm.relax.VirtualMachine(stock, tvm.cpu())
    x = tvm.runtime.tensor(feeds["x"])
    stock_s = np.median(vm.time_evaluator("main", tvm.cpu(), number=5, repeat=5)(x).results)
    tuned_s = np.median(first.time(feeds, number=20, repeat=5))
    assert tuned_s * 3 < stock_s, (tuned_s, stock_s)


def test_lut_kernels_are_tuned(dense_model, target, tmp_path):
    """The encode and lookup-add kernels go through MetaSchedule like any other kernel."""
    rng = np.random.default_rng(4)
    samples = [{"x": rng.standard_normal((32, 256)).astype(np.float32)} for _ in range(4)]
    config = lut_compiler.CompileConfig(tune=lut_compiler.TuneConfig(trials_per_task=4, work_dir=str(tmp_path)),
                                        lut=lut_compiler.LutConfig())
    model = lut_compiler.compile(dense_model, config, target=target, progress=False, calibration=samples)
    tasks = {t["name"]: t for t in model.record["tuning"]["tasks"]}
    assert any("lut_encode" in name for name in tasks) and any("lut_lookup_add" in name for name in tasks)
    assert all(t["best_us"] is not None for t in tasks.values())
    untuned = lut_compiler.compile(dense_model, lut_compiler.CompileConfig(lut=lut_compiler.LutConfig()),
                                   target=target, progress=False, calibration=samples)
    np.testing.assert_allclose(model.run(samples[0])["y"], untuned.run(samples[0])["y"], rtol=1e-5, atol=1e-5)
