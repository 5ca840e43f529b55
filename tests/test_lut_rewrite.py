"""The lookup-add rewrite end to end: eligibility reasons, selection, IR after the pass,
numerics against ONNX Runtime, calibration data validation and the accuracy report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from conftest import ort_run
from test_cli import lutc
from torch import nn
from torch_models import CNN, MLP, Encoder, export

import lut_compiler
from lut_compiler.calibration import load_samples
from lut_compiler.config import CompileConfig, LayerOverride, LutConfig
from lut_compiler.errors import CalibrationError
from lut_compiler.lut import apply_lut, plan
from lut_compiler.onnx_import import import_onnx
from lut_compiler.target import resolve_target
from lut_compiler.tensor_spec import TensorSpec


class Mixed(nn.Module):
    """One layer of each kind the rewrite must refuse, and two it must take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # eligible, V = 9
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.odd = nn.Linear(10, 6)  # D = 10 is not a multiple of V = 4
        self.head = nn.Linear(8, 3)  # eligible

    def forward(self, x):
        x = self.depthwise(self.grouped(self.conv(x)))  # [B, 8, 5, 2]
        t = x.flatten(2)  # [B, 8, 10]
        attn = t @ t.transpose(1, 2)  # activation x activation [B, 8, 8]
        return self.head(attn) + self.odd(t)[..., :3].mean(-1, keepdim=True)


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    torch.manual_seed(0)
    return export(Mixed(), torch.randn(1, 4, 5, 2), tmp_path_factory.mktemp("mixed") / "mixed.onnx", "x", {0: "batch"})


def _plans(path, shapes, cfg=None):
    return plan(import_onnx(path, shapes), cfg or LutConfig())


def test_eligibility_reasons(mixed_model):
    plans = {p.candidate.name.split("_output")[0]: p for p in _plans(mixed_model, {"x": (2, 4, 5, 2)})}
    reasons = {name: p.reason for name, p in plans.items()}
    assert reasons["/conv/Conv"] is None and plans["/conv/Conv"].subspace_len == 9
    assert plans["/conv/Conv"].codebooks == 4
    assert reasons["/grouped/Conv"] == "grouped conv (groups=2)"
    assert reasons["/depthwise/Conv"] == "depthwise conv (groups=8)"
    assert reasons["/odd/MatMul"] == "D=10 is not a multiple of V=4" and plans["/odd/MatMul"].codebooks == 0
    assert reasons["/head/MatMul"] is None and plans["/head/MatMul"].codebooks == 2
    attention = [p for p in plans.values() if not p.candidate.const_weight]
    assert len(attention) == 1
    assert attention[0].reason.startswith("weight is not a constant (activation x activation matmul")


def test_overrides_and_selection(mixed_model):
    shapes = {"x": (1, 4, 5, 2)}
    cfg = LutConfig(overrides={"odd": LayerOverride(subspace_len=5, centroids=8)})
    odd = next(p for p in _plans(mixed_model, shapes, cfg) if p.candidate.name.startswith("/odd/"))
    assert (odd.reason, odd.subspace_len, odd.codebooks, odd.centroids) == (None, 5, 2, 8)

    last = [p.candidate.name for p in _plans(mixed_model, shapes, LutConfig(layers="last:1")) if p.replaced]
    assert last == ["/head/MatMul_output_0"]
    by_name = [p.candidate.name for p in _plans(mixed_model, shapes, LutConfig(layers="conv")) if p.replaced]
    assert by_name == ["/conv/Conv"]
    skipped = next(p for p in _plans(mixed_model, shapes, LutConfig(layers="conv")) if p.candidate.name.startswith("/head/"))
    assert skipped.reason == "not selected (layers=conv)"


def test_inspect_prints_decisions(mixed_model):
    done = lutc("inspect", mixed_model, "--input-shape", "x=1x4x5x2")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0].split("_output")[0]: line for line in done.stdout.splitlines()
            if " conv2d " in line or " matmul " in line}
    assert rows["/conv/Conv"].split()[6:9] == ["9", "4", "lookup-add"]
    assert rows["/grouped/Conv"].split()[6:8] == ["-", "-"]
    assert rows["/grouped/Conv"].endswith("dense: grouped conv (groups=2)")
    assert rows["/odd/MatMul"].endswith("dense: D=10 is not a multiple of V=4")
    assert "2 replaced by lookup-add" in done.stdout

    done = lutc("inspect", mixed_model, "--input-shape", "x=1x4x5x2", "--lut-override", "odd=5:8", "--lut-v", "2")
    rows = {line.split()[0].split("_output")[0]: line.split() for line in done.stdout.splitlines()
            if " conv2d " in line or " matmul " in line}
    assert rows["/odd/MatMul"][6:9] == ["5", "2", "lookup-add"]
    assert rows["/head/MatMul"][6:9] == ["2", "4", "lookup-add"]


def _grid_samples(shape, count, seed):
    """Samples whose every layer sees at most 16 distinct sub-vectors: codebooks are exact."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _compile_lut(path, shape, samples, cfg, name="x", labels=None):
    config = CompileConfig(input_shapes={name: shape}, lut=cfg)
    return lut_compiler.compile(path, config, progress=False, calibration=samples, labels=labels)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 3, 2, 2), (1, 3, 3, 5)])
def test_cnn_exact_with_float_tables(tmp_path, shape):
    """<= 16 receptive fields per layer: k-means is exact, so float tables reproduce the model."""
    torch.manual_seed(1)
    path = export(CNN(), torch.randn(1, 3, 4, 4), tmp_path / "cnn.onnx", "x", {0: "batch", 2: "h", 3: "w"})
    samples = _grid_samples(shape, 1, seed=sum(shape))
    model = _compile_lut(path, shape, samples, LutConfig(table_dtype="float32", holdout=0.0))
    report = model.record["lut"]
    assert [r["replaced"] for r in report["layers"]] == [True] * 6
    assert report["measured_on_calibration"]
    np.testing.assert_allclose(model.run(samples[0])["out"], ort_run(path, samples[0])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_int8_tables_close_to_exact(tmp_path, batch):
    torch.manual_seed(2)
    path = export(MLP(), torch.randn(2, 48), tmp_path / "mlp.onnx", "x", {0: "batch"})
    samples = _grid_samples((batch, 48), 16 // batch, seed=batch)
    exact = _compile_lut(path, (batch, 48), samples, LutConfig(table_dtype="float32", holdout=0.0,
                                                               task="classification"))
    int8 = _compile_lut(path, (batch, 48), samples, LutConfig(holdout=0.0))
    for feeds in samples[:3]:
        ref = ort_run(path, feeds)[0]
        np.testing.assert_allclose(exact.run(feeds)["out"], ref, rtol=1e-4, atol=1e-4)
    assert exact.record["lut"]["outputs"][0]["top1_agreement"] == 1.0
    assert "top1_agreement" not in int8.record["lut"]["outputs"][0]  # no labels, task auto: not a classifier
    layers = int8.record["lut"]["layers"]
    assert all(r["table_dtype"] == "int8" and r["snr_db"] > 30 for r in layers)
    assert int8.record["lut"]["outputs"][0]["sqnr_db"] > 25


def test_encoder_keeps_attention_dense(tmp_path):
    torch.manual_seed(3)
    path = export(Encoder(), torch.randint(0, 100, (1, 4)), tmp_path / "enc.onnx", "ids", {0: "batch", 1: "seq"})
    rng = np.random.default_rng(4)
    samples = [{"ids": rng.integers(0, 100, (1, 4)).astype(np.int64)}]
    model = _compile_lut(path, (1, 4), samples, LutConfig(table_dtype="float32", holdout=0.0), name="ids")
    layers = model.record["lut"]["layers"]
    assert sum(r["replaced"] for r in layers) == 8  # qkv, out, ff x 2 per layer
    assert all(r["reason"].startswith("weight is not a constant") for r in layers if not r["replaced"])
    np.testing.assert_allclose(model.run(samples[0])["out"], ort_run(path, samples[0])[0], rtol=1e-4, atol=1e-4)


def test_rewritten_ir(tmp_path):
    """Each replaced layer is two call_tir (encode, lookup-add); weights and bias adds are gone."""
    torch.manual_seed(5)
    path = export(CNN(), torch.randn(1, 3, 6, 6), tmp_path / "cnn.onnx", "x", {0: "batch"})
    imported = import_onnx(path, {"x": (1, 3, 6, 6)})
    samples = _grid_samples((1, 3, 6, 6), 4, seed=0)
    mod, result = apply_lut(imported, LutConfig(layers="last:2", kernel="generic"), samples, resolve_target("host"),
                            progress=False)
    calls = [b.value for block in mod["main"].body.blocks for b in block.bindings if isinstance(b.value, tvm.relax.Call)]
    names = [c.op.name if isinstance(c.op, tvm.ir.Op) else "call_tir" for c in calls]
    kernels = sorted(c.args[0].name_hint for c in calls if getattr(c.op, "name", "") == "relax.call_tir")
    assert kernels == ["lut_encode", "lut_encode_conv", "lut_lookup_add", "lut_lookup_add_conv"]
    assert names.count("relax.nn.conv2d") == 4 and "relax.matmul" not in names
    assert len(result.layers) == 2
    before = sum(isinstance(b.value, tvm.relax.Call) and b.value.op.name == "relax.add"
                 for block in imported.mod["main"].body.blocks for b in block.bindings)
    after = names.count("relax.add")
    assert before - after == 2  # both bias adds folded into the lookup-add


def _specs():
    return [TensorSpec("x", (2, 8), "float32")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"y": np.zeros((4, 8), np.float32)}, "calibration inputs do not match the model (missing x; unknown y)"),
        ({"x": np.zeros((4, 7), np.float32)}, "calibration input 'x' has shape 4x7"),
        ({"x": np.zeros((3, 8), np.float32)}, "calibration input 'x' has shape 3x8"),
        ([{"x": np.zeros((2, 8), np.float64)}], "calibration sample 0: input 'x' is float64[2x8], expected float32[2x8]"),
        ({"x": np.full((4, 8), np.nan, np.float32)}, "calibration sample 0: input 'x' contains NaN"),
        ([{"x": np.zeros((2, 8), np.float32)}, {"x": np.full((2, 8), np.inf, np.float32)}], "sample 1: input 'x' contains inf"),
        ([], "calibration data holds no samples"),
    ],
)
def test_bad_calibration_data(data, message):
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_samples(data, _specs())


def test_calibration_sources():
    rows = np.arange(48, dtype=np.float32).reshape(6, 8)
    concatenated = load_samples({"x": rows}, _specs())
    stacked = load_samples({"x": rows.reshape(3, 2, 8)}, _specs())

    class Reader:  # onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            self.items = iter([{"x": rows[:2]}, {"x": rows[2:4]}, {"x": rows[4:]}])

        def get_next(self):
            return next(self.items, None)

    for samples in (concatenated, stacked, load_samples(Reader(), _specs())):
        assert len(samples) == 3
        np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), rows)


def test_cli_lut_on_real_digits(tmp_path):
    """lutc compile --lut on the bundled digits MLP: report printed and stored, accuracy held."""
    from lut_compiler import zoo

    path = zoo.get_model("mlp")
    feeds, labels = zoo.labelled_data("mlp", "test")
    np.savez(tmp_path / "calib.npz", **feeds)
    np.save(tmp_path / "labels.npy", labels)
    out = tmp_path / "out"
    done = lutc("compile", path, "-o", out, "--input-shape", "x=1x64", "--lut", "--calib", tmp_path / "calib.npz",
                "--labels", tmp_path / "labels.npy", "--lut-layers", "last:1", "-q")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "manifest.json").read_text())["lut"]
    assert [r["replaced"] for r in report["layers"]] == [False, False, True]
    assert report["held_out_samples"] == 72 and not report["measured_on_calibration"]
    assert report["outputs"][0]["top1_agreement"] >= 0.95
    assert report["accuracy"]["lut"] >= report["accuracy"]["fp32"] - 0.03
    assert "accuracy (logits): fp32" in done.stdout and "SNR dB" in done.stdout


def test_cli_lut_needs_good_calibration(tmp_path, models):
    out = tmp_path / "out"
    done = lutc("compile", models["mlp"], "-o", out, "--input-shape", "x=1x48", "--lut")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: the lookup-add rewrite needs calibration")
    np.savez(tmp_path / "bad.npz", x=np.full((4, 48), np.nan, np.float32))
    done = lutc("compile", models["mlp"], "-o", out, "--input-shape", "x=1x48", "--lut", "--calib", tmp_path / "bad.npz")
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == ["error: calibration sample 0: input 'x' contains NaN"]
    done = lutc("compile", models["mlp"], "-o", out, "--input-shape", "x=1x48", "--calib", tmp_path / "bad.npz")
    assert done.returncode == 2 and done.stderr.strip() == "error: --calib is only used with --lut, --prune or --auto"
    np.savez(tmp_path / "good.npz", x=np.ones((4, 48), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
    done = lutc("compile", models["mlp"], "-o", out, "--input-shape", "x=1x48", "--lut", "--calib",
                tmp_path / "good.npz", "--labels", tmp_path / "labels.npy", "-q")
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == ["error: 3 labels do not split evenly over 4 calibration samples"]
    assert not out.exists()


@pytest.mark.parametrize("rows", [40, 64])
def test_shuffle_kernel_matches_generic(tmp_path, rows):
    """On an AVX2 host, kernel="shuffle" emits the VPSHUFB lookup-add; it computes what the generic one does."""
    torch.manual_seed(6)
    path = export(MLP(), torch.randn(2, 48), tmp_path / "mlp.onnx", "x", {0: "batch"})
    samples = _grid_samples((rows, 48), 4, seed=rows)
    models = {k: _compile_lut(path, (rows, 48), samples, LutConfig(kernel=k, holdout=0.0)) for k in ("shuffle", "generic")}
    imported = import_onnx(path, {"x": (rows, 48)})
    mod, _ = apply_lut(imported, LutConfig(kernel="shuffle"), samples, resolve_target("host"), progress=False)
    kernels = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any("lookup_add" in k for k in kernels)
    shuffled = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and "pshuf" in f.script()]
    assert len(shuffled) == 3  # one per layer
    for feeds in samples[:2]:
        np.testing.assert_allclose(models["shuffle"].run(feeds)["out"], models["generic"].run(feeds)["out"],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 9, 9), (1, 3, 12, 10)])
def test_shuffle_conv_matches_generic(tmp_path, shape):
    """Convs (3x3 padded, strided, 1x1) as the row-vectorized conv encoder + NCHW shuffle
    lookup-add (pixels padded per image) compute what the generic kernels do."""
    torch.manual_seed(7)
    path = export(CNN(), torch.randn(1, 3, 6, 6), tmp_path / "cnn.onnx", "x", {0: "batch", 2: "h", 3: "w"})
    samples = [{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(4)]
    cfg = {k: LutConfig(kernel=k, holdout=0.0, layers="/(stem|block|down|proj)") for k in ("shuffle", "generic")}
    models = {k: _compile_lut(path, shape, samples, c) for k, c in cfg.items()}
    imported = import_onnx(path, {"x": shape})
    mod, _ = apply_lut(imported, cfg["shuffle"], samples, resolve_target("host"), progress=False)
    lookups = [f for gv, f in mod.functions_items() if "lookup_add" in gv.name_hint]
    assert len(lookups) == 4 and all("pshuf" in f.script() for f in lookups)  # the block's two convs share one
    for feeds in samples[:2]:
        np.testing.assert_allclose(models["shuffle"].run(feeds)["out"], models["generic"].run(feeds)["out"],
                                   rtol=1e-5, atol=1e-5)
