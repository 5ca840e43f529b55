"""The per-layer plan end to end on a digits MLP (real data, labels): every option measured,
the validation metric within the budget, the held-out drop close to it, a zero budget
keeping the model exact on validation; the CLI prints the plan and refuses plans without a
budget."""

import numpy as np
import pytest
from test_cli import lutc_here

import lut_compiler
from lut_compiler.config import AutoConfig, Budget, CompileConfig
from lut_compiler.planner import Option, plan


BATCH = 128  # rows per sample: MiniLM's, where lookup-add wins (its tables are read once per 32-row vector)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 64 -> 512 -> 512 -> 10 MLP trained on half of scikit-learn's digits training split;
    the other half and the test split (1024 digits, 8 samples of 128) calibrate."""
    import torch
    from torch_models import export

    from lut_compiler.zoo.data import digits_8x8
    from lut_compiler.zoo.train import fit

    x, y = digits_8x8("train")
    x_test, y_test = digits_8x8("test")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    fit(model, x[:700], y[:700], epochs=30, batch_size=64, lr=3e-3, seed=0)
    path = export(model, torch.from_numpy(x[:BATCH]), tmp_path_factory.mktemp("auto") / "mlp.onnx", "x", {0: "batch"})
    calib_x, calib_y = np.concatenate([x[700:], x_test]), np.concatenate([y[700:], y_test])
    n = len(calib_y) // BATCH * BATCH
    return path, {"x": calib_x[:n]}, calib_y[:n]


def _plan(digits, budget: Budget, **auto):
    path, feeds, labels = digits
    config = CompileConfig(input_shapes={"x": (BATCH, 64)}, auto=AutoConfig(budget=budget, **auto))
    return lut_compiler.compile(path, config, progress=False, calibration=feeds, labels=labels)


def test_plan_keeps_the_budget_and_measures_every_option(digits):
    model = _plan(digits, Budget("accuracy", 2.0), prune=0.7)
    rep = model.record["auto"]
    rows = rep["layers"]
    assert len(rows) == 3 and all(r["ms"]["dense"] > 0 for r in rows)
    for r in rows:
        assert set(r["ms"]) == {"dense", *r["cost"]} and {"lut", "int8"} <= set(r["cost"]), r
        assert r["choice"] in r["ms"]
    assert any("sparse" in r["cost"] for r in rows)  # the 10-wide head takes no 16x1 blocks, the others do
    assert rep["validation_samples"] == 2  # a quarter of the 6 samples not held out (256 digits)
    assert (rep["fp32"] - rep["planned"]) * 100 <= 2.0 + 1e-9
    planned = sum(r["ms"][r["choice"]] for r in rows)
    assert rep["layers_ms"]["planned"] == pytest.approx(planned, abs=1e-3)
    # the choice is the planner's optimum of the measured table (which option wins is the
    # machine's business: timings are not asserted), re-planned only if over budget
    options = {r["name"]: [Option("dense", r["ms"]["dense"])] + [Option(k, r["ms"][k], c) for k, c in r["cost"].items()]
               for r in rows}
    if rep["replans"] == 0:
        best = plan(options, 2.0)
        assert planned == pytest.approx(sum(o.ms for o in best.values()), abs=1e-3)
    assert rep["layers_ms"]["planned"] <= rep["layers_ms"]["dense"]
    held = rep["accuracy"]
    assert held["samples"] == 2
    drop = (held["accuracy"]["fp32"] - held["accuracy"]["model"]) * 100
    assert drop <= 2.0 + 2.0, held  # validation and held-out differ by sampling: 256 digits, 0.4 points each


def test_every_kind_rewritten_computes_the_planned_torch_view(digits, target, tmp_path, monkeypatch):
    """With timings that make sparse, lookup-add and int8 each win one layer (so the test does
    not depend on this machine's speeds), the rewritten model computes what the torch view
    of the plan computes."""
    import torch
    import tvm
    from tvm import relax

    from lut_compiler import auto
    from lut_compiler.lowering import legalize, schedule
    from lut_compiler.onnx_import import import_onnx
    from lut_compiler.torch_view import OnnxModule

    def fake_time(vms, input_shape, *_args, **_kwargs):
        winner = "sparse" if input_shape[-1] == 64 else "lut" if "sparse" in vms else "int8"
        return {kind: 1.0 if kind == winner else 5.0 for kind in vms}, {}

    monkeypatch.setattr(auto, "build_vms", lambda mods, *_args: mods)
    monkeypatch.setattr(auto, "time_vms", fake_time)
    path, feeds, labels = digits
    imported = import_onnx(str(path), {"x": (BATCH, 64)})
    mod, result = auto.apply_auto(imported, AutoConfig(Budget("accuracy", 100.0), prune=0.5), feeds, target,
                                  lut_compiler.TuneConfig(), labels, progress=False)
    assert [layer.choice for layer in result.layers] == ["sparse", "lut", "int8"]
    vm = relax.VirtualMachine(tvm.compile(schedule(legalize(mod, target, True), target, str(tmp_path), True),
                                          target), tvm.cpu())
    view = OnnxModule(imported.onnx_model, {layer.candidate.name: layer.module(layer.choice)
                                            for layer in result.layers}).eval()
    x = result.samples[result.held_out[0]]["x"]
    with torch.no_grad():
        expected = view(x=torch.from_numpy(x))[0].numpy()
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def test_zero_budget_keeps_validation_exact(digits):
    model = _plan(digits, Budget("accuracy", 0.0), kinds=("lut",))
    rep = model.record["auto"]
    assert rep["planned"] == rep["fp32"]
    assert all(r["choice"] == "dense" or r["cost"][r["choice"]] <= 0 for r in rep["layers"])


def test_cli_prints_the_plan_and_needs_a_budget(digits, tmp_path, capfd):
    path, feeds, labels = digits
    np.savez(tmp_path / "calib.npz", **feeds)
    np.save(tmp_path / "labels.npy", labels)
    args = ["compile", path, "-o", tmp_path / "out", "--input-shape", f"x={BATCH}x64", "--calib", tmp_path / "calib.npz",
            "--auto", "-q"]
    code, _, err = lutc_here(capfd, *args)
    assert code == 2 and "--auto needs an accuracy budget" in err
    assert not (tmp_path / "out").exists()
    code, out, err = lutc_here(capfd, *args, "--labels", tmp_path / "labels.npy", "--max-drop", "1.0",
                               "--auto-kinds", "lut")
    assert code == 0, err
    assert "planned layers:" in out and "choice" in out and "held-out samples" in out
    code, _, err = lutc_here(capfd, *args, "--max-drop", "1.0", "--lut")
    assert code == 2 and "drop --lut" in err
