"""The ``lutc`` contract: compile/run/inspect work; wrong feeds are one ``error:`` line (the rest of
the bad-input corpus: test_bad_inputs)."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ort_run

from lut_compiler.cli import main


def lutc(*args, cwd=None):
    """The real console script in a fresh process."""
    return subprocess.run([sys.executable, "-m", "lut_compiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def lutc_here(capfd, *args):
    """The same entry point in this process (fast); returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def test_compile_and_run_cnn(models, tmp_path):
    out = tmp_path / "cnn"
    done = lutc("compile", models["cnn"], "-o", out, "--input-shape", "image=2x3x20x20", "-q")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [2, 3, 20, 20]

    feeds = {"image": np.random.default_rng(5).standard_normal((2, 3, 20, 20)).astype(np.float32)}
    np.savez(tmp_path / "feeds.npz", **feeds)
    done = lutc("run", out, "--inputs", tmp_path / "feeds.npz", "--output", tmp_path / "res.npz")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "res.npz") as result:
        assert result.files == ["out"]
        np.testing.assert_allclose(result["out"], ort_run(models["cnn"], feeds)[0], rtol=1e-4, atol=1e-4)


def test_inspect_lists_layers(models):
    done = lutc("inspect", models["cnn"], "--input-shape", "image=1x3x20x20")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if " conv2d " in line or " matmul " in line]
    names = [row.split()[0] for row in rows]
    assert names == ["/stem/stem.0/Conv", "/block/block.0/Conv", "/block/block.2/Conv", "/down/Conv", "/proj/Conv",
                     "/head/Gemm"]
    assert all(row.endswith("lookup-add") for row in rows)
    assert "image: float32[1x3x20x20]" in done.stdout


def test_run_with_wrong_feeds(models, tmp_path, capfd):
    out = tmp_path / "mlp"
    assert lutc_here(capfd, "compile", models["mlp"], "-o", out, "--input-shape", "x=3x48", "-q")[0] == 0
    np.savez(tmp_path / "feeds.npz", x=np.zeros((3, 48)))  # float64
    code, _, err = lutc_here(capfd, "run", out, "--inputs", tmp_path / "feeds.npz", "--output", tmp_path / "res.npz")
    assert code == 3
    assert err.strip().splitlines() == ["error: input mismatch: expected x: float32[3x48], got x: float64[3x48]"]
    assert not (tmp_path / "res.npz").exists()
    (tmp_path / "bad.npz").write_text("not a zip")
    code, _, err = lutc_here(capfd, "run", out, "--inputs", tmp_path / "bad.npz", "--output", tmp_path / "res.npz")
    assert code == 3 and "not a readable .npz" in err
    code, _, err = lutc_here(capfd, "run", tmp_path / "nothing", "--inputs", tmp_path / "feeds.npz", "--output",
                             tmp_path / "res.npz")
    assert code == 3 and "manifest.json not found" in err


@pytest.mark.parametrize("command", ["compile", "tune", "run", "inspect", "bench"])
def test_help(command, capfd):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: lutc {command}" in capfd.readouterr().out
