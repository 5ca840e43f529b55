"""The bad-input corpus: every case is one ``error:`` line naming the problem, the exit code of
its family (usage 2, input 3, internal 1), no traceback, and nothing left in the output place."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import lutc_here
from test_onnx_import import unsupported_model

from lut_compiler.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE


def _relu(opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _resize_with_axes() -> onnx.ModelProto:
    """Resize with `axes` and `keep_aspect_ratio_policy` (opset 18): valid ONNX the frontend cannot convert."""
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", axes=[2, 3],
                            keep_aspect_ratio_policy="not_smaller")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [numpy_helper.from_array(np.array([16, 12], np.int64), "sizes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _external_data_model(path) -> None:
    """The MLP-like x @ W with W in an external file, which is then deleted."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(np.ones((64, 64), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    os.remove(path.parent / "weights.bin")


def _model_cases(models, tmp_path) -> dict:
    """case -> (compile arguments, text the error line must contain)."""
    files = {name: tmp_path / f"{name}.onnx" for name in ("empty", "garbage", "truncated", "unsupported",
                                                          "attribute", "old", "new")}
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(np.random.default_rng(0).bytes(2000))
    data = models["mlp"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 3])
    onnx.save(unsupported_model(), files["unsupported"])
    onnx.save(_resize_with_axes(), files["attribute"])
    onnx.save(_relu(5), files["old"])
    onnx.save(_relu(99), files["new"])
    (tmp_path / "external").mkdir()
    _external_data_model(tmp_path / "external" / "model.onnx")
    mlp = [models["mlp"], "--input-shape", "x=1x48"]
    return {
        "missing": ([tmp_path / "missing.onnx"], "not found"),
        "empty": ([files["empty"]], "no graph nodes"),
        "garbage": ([files["garbage"]], "ONNX"),
        "truncated": ([files["truncated"]], "ONNX"),
        "unsupported-op": ([files["unsupported"]], "unsupported ONNX operator(s): Celu"),
        "unsupported-attribute": ([files["attribute"]], "failed at operator Resize"),
        "opset-too-old": ([files["old"]], "uses ONNX opset 5; supported: 7 to"),
        "opset-too-new": ([files["new"]], "uses ONNX opset 99"),
        "external-data-missing": ([tmp_path / "external" / "model.onnx"], "external data file 'weights.bin'"),
        "unbound-dims": ([models["encoder"]], "dynamic input shape"),
        "bad-binding": ([models["mlp"], "--input-shape", "x=1x2x3"], "does not fit"),
        "unknown-cpu": ([*mlp, "--target", "nocpu"], "unknown CPU 'nocpu'"),
        "target-not-json": ([*mlp, "--target", '{"kind": "llvm",'], "target is not valid JSON"),
        "target-not-cpu": ([*mlp, "--target", '{"kind": "cuda"}'], "only CPU (llvm) targets"),
        "target-bad-value": ([*mlp, "--target", '{"kind": "llvm", "mcpu": "znver4", "num-cores": "two"}'],
                             "invalid target"),
    }


MODEL_CASES = ["missing", "empty", "garbage", "truncated", "unsupported-op", "unsupported-attribute", "opset-too-old",
               "opset-too-new", "external-data-missing", "unbound-dims", "bad-binding", "unknown-cpu",
               "target-not-json", "target-not-cpu", "target-bad-value"]


def _assert_one_line(code: int, err: str, family: int, message: str) -> None:
    lines = err.strip().splitlines()
    assert code == family and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def _assert_nothing_left(directory, out) -> None:
    assert not out.exists()
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no staging dir or probe


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_or_target(models, tmp_path, capfd, case):
    args, message = _model_cases(models, tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = lutc_here(capfd, "compile", *args, "-o", out)
    _assert_one_line(code, err, EXIT_INPUT, message)
    _assert_nothing_left(tmp_path, out)


CALIBRATION_CASES = {
    "wrong-name": ({"input": np.ones((4, 1, 48), np.float32)}, "calibration inputs do not match the model (missing x; unknown input)"),
    "wrong-shape": ({"x": np.ones((4, 1, 40), np.float32)}, "x"),
    "wrong-dtype": ({"x": np.ones((4, 1, 48), np.int32)}, "int32"),
    "nan": ({"x": np.full((4, 1, 48), np.nan, np.float32)}, "contains NaN"),
    "not-npz": (None, "not a readable .npz"),
}


@pytest.mark.parametrize("case", sorted(CALIBRATION_CASES))
def test_bad_calibration_data(models, tmp_path, capfd, case):
    arrays, message = CALIBRATION_CASES[case]
    calib = tmp_path / "calib.npz"
    if arrays is None:
        calib.write_text("not a zip file")
    else:
        np.savez(calib, **arrays)
    out = tmp_path / "out"
    code, _, err = lutc_here(capfd, "compile", models["mlp"], "--input-shape", "x=1x48", "--lut", "--calib", calib,
                             "-o", out, "-q")
    _assert_one_line(code, err, EXIT_INPUT, message)
    _assert_nothing_left(tmp_path, out)


@pytest.mark.parametrize("args, message", [
    (["--calib", "c.npz"], "--calib is only used with"),
    (["--lut"], "needs calibration data (--calib DATA.npz)"),
    (["--trials", "4", "--preset", "quick"], "give --trials or --preset, not both"),
])
def test_usage_errors(models, tmp_path, capfd, args, message):
    out = tmp_path / "out"
    code, _, err = lutc_here(capfd, "compile", models["mlp"], "--input-shape", "x=1x48", "-o", out, *args)
    _assert_one_line(code, err, EXIT_USAGE, message)
    _assert_nothing_left(tmp_path, out)


@contextlib.contextmanager
def _tmpfs(path, options: str):
    """A tmpfs mounted at `path` (root only; the test is skipped where mounting is not allowed)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        yield tmp_path / "ro"
        return
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as path:
        yield path


def test_read_only_output(models, read_only_dir, capfd):
    out = read_only_dir / "out"
    code, _, err = lutc_here(capfd, "compile", models["mlp"], "--input-shape", "x=1x48", "-o", out)
    _assert_one_line(code, err, EXIT_INPUT, f"cannot write into {read_only_dir}")
    assert list(read_only_dir.iterdir()) == []


def test_full_disk_leaves_no_half_written_artifact(models, tmp_path, capfd):
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    with _tmpfs(tmp_path / "tiny", "size=64k") as disk:  # model.so alone is ~120 KB
        out = disk / "out"
        code, _, err = lutc_here(capfd, "compile", models["mlp"], "--input-shape", "x=1x48", "-o", out)
        _assert_one_line(code, err, EXIT_INPUT, f"cannot write {out}: No space left on device")
        assert list(disk.iterdir()) == []


def test_internal_errors_are_one_line_and_exit_1(models, tmp_path, capfd, monkeypatch):
    from lut_compiler import pipeline

    def broken(*_args, **_kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(pipeline, "legalize", broken)
    code, _, err = lutc_here(capfd, "compile", models["mlp"], "--input-shape", "x=1x48", "-o", tmp_path / "out")
    _assert_one_line(code, err, EXIT_INTERNAL, "internal error (KeyError: 'a bug of ours'); rerun with --debug")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lut_compiler.cli", "--debug", "compile", str(tmp_path / "no.onnx"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" in done.stderr and "ModelLoadError" in done.stderr


def test_manifest_refuses_a_foreign_library(models, tmp_path, capfd):
    out = tmp_path / "out"
    assert lutc_here(capfd, "compile", models["mlp"], "--input-shape", "x=1x48", "-o", out, "-q")[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["library_sha256"]) == 64
    with open(out / "model.so", "ab") as f:  # e.g. a copy interrupted half way
        f.write(b"\0")
    np.savez(tmp_path / "feeds.npz", x=np.ones((1, 48), np.float32))
    code, _, err = lutc_here(capfd, "run", out, "--inputs", tmp_path / "feeds.npz", "--output", tmp_path / "r.npz")
    _assert_one_line(code, err, EXIT_INPUT, "is not the library")
