"""An exported artifact runs in a process where only tvm and numpy can be imported."""

import json
import subprocess
import sys

import numpy as np
from conftest import ort_run, random_feeds

import lut_compiler

# Runs in the fresh process: forbid everything of ours and of the model tooling.
DEPLOY_SCRIPT = r"""
import importlib.abc, sys
BLOCKED = {"lut_compiler", "onnx", "onnxruntime", "onnxslim", "torch", "transformers", "sklearn"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not available in deployment")
        return None
sys.meta_path.insert(0, Block())

import json, numpy as np, tvm
from tvm import relax
artifact, feeds_path, out_path = sys.argv[1:]
manifest = json.load(open(f"{artifact}/manifest.json"))
lib = tvm.runtime.load_module(f"{artifact}/{manifest['library']}")
vm = relax.VirtualMachine(lib, tvm.cpu())
feeds = np.load(feeds_path)
result = vm[manifest["entry"]](*[tvm.runtime.tensor(feeds[i["name"]]) for i in manifest["inputs"]])
values = [result] if len(manifest["outputs"]) == 1 else list(result)
np.savez(out_path, **{o["name"]: v.numpy() for o, v in zip(manifest["outputs"], values)})
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "a blocked module got imported"
"""


def test_artifact_runs_with_plain_tvm(models, target, tmp_path):
    shapes = {"ids": (2, 10)}
    model = lut_compiler.compile(models["encoder"], lut_compiler.CompileConfig(input_shapes=shapes), target=target,
                                 progress=False)
    out_dir = model.export(tmp_path / "artifact")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "ids", "shape": [2, 10], "dtype": "int64"}]
    assert manifest["outputs"] == [{"name": "out", "shape": [2, 10, 64], "dtype": "float32"}]
    assert manifest["target"]["mcpu"] == str(target.attrs["mcpu"])
    assert manifest["config"]["input_shapes"] == {"ids": [2, 10]}
    assert {"apache-tvm", "onnx", "python"} <= set(manifest["versions"])

    feeds = random_feeds(model.inputs, seed=7)
    np.savez(tmp_path / "feeds.npz", **feeds)
    subprocess.run([sys.executable, "-c", DEPLOY_SCRIPT, str(out_dir), str(tmp_path / "feeds.npz"),
                    str(tmp_path / "out.npz")], check=True, cwd=tmp_path, timeout=300)
    got = np.load(tmp_path / "out.npz")["out"]
    np.testing.assert_allclose(got, ort_run(models["encoder"], feeds)[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got, model.run(feeds)["out"])


def test_export_replaces_an_existing_artifact(models, target, tmp_path):
    config = lut_compiler.CompileConfig(input_shapes={"x": (4, 48)})
    model = lut_compiler.compile(models["mlp"], config, target=target, progress=False)
    out = tmp_path / "out"
    model.export(out)
    model.export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so"]
    loaded = lut_compiler.load(out)
    feeds = random_feeds(loaded.inputs, seed=1)
    np.testing.assert_array_equal(loaded.run(feeds)["out"], model.run(feeds)["out"])


def test_lut_artifact_runs_with_plain_tvm(models, target, tmp_path):
    """Codebooks and tables are embedded: the lookup-add model needs nothing but tvm either."""
    config = lut_compiler.CompileConfig(input_shapes={"x": (3, 48)}, lut=lut_compiler.LutConfig(holdout=0.0))
    rng = np.random.default_rng(11)
    samples = [{"x": rng.standard_normal((3, 48)).astype(np.float32)} for _ in range(8)]
    model = lut_compiler.compile(models["mlp"], config, target=target, progress=False, calibration=samples)
    out_dir = model.export(tmp_path / "artifact")
    assert json.loads((out_dir / "manifest.json").read_text())["lut"]["flops_replaced"] == 1.0

    np.savez(tmp_path / "feeds.npz", **samples[0])
    subprocess.run([sys.executable, "-c", DEPLOY_SCRIPT, str(out_dir), str(tmp_path / "feeds.npz"),
                    str(tmp_path / "out.npz")], check=True, cwd=tmp_path, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["out"], model.run(samples[0])["out"])
