"""The sparse phase end to end: weights already sparse in the ONNX file are detected with their
block structure, the layers are measured dense vs sparse and rewritten when sparse wins; the
compiled model equals ONNX Runtime on the same (pruned) model at several batch sizes; pruning
by the compiler equals pruning the file; the artifact runs with plain TVM; the CLI prints the
decisions."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from conftest import ort_run, random_feeds
from onnx import numpy_helper
from test_deploy import DEPLOY_SCRIPT

import lut_compiler
from lut_compiler.config import SparseConfig
from lut_compiler.sparse_format import prune_magnitude

ALWAYS = 1e-3  # min_speedup that keeps every measured layer sparse (the rewrite itself under test)
NEVER = 1e6


def _prune_file(path, out, sparsity: float, block=(16, 1)):
    """A copy of the ONNX model whose Gemm/MatMul/Conv weight initializers are pruned (as W^T
    [N, K], by `prune_magnitude`) where `block` divides them: a model with sparse weights."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        as_wt = {"Conv": lambda a: a.reshape(a.shape[0], -1), "Gemm": (lambda a: a) if trans_b else (lambda a: a.T),
                 "MatMul": lambda a: a.T}[node.op_type]
        w_t = as_wt(w)
        if w.ndim not in (2, 4) or w_t.shape[0] % block[0] or w_t.shape[1] % block[1]:
            continue
        pruned = prune_magnitude(w_t, sparsity, block)
        back = pruned.reshape(w.shape) if node.op_type == "Conv" else (pruned if node.op_type == "Gemm" and trans_b
                                                                         else pruned.T)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(back, w.dtype), node.input[1]))
    onnx.save(model, str(out))
    return out


def _compile(path, shapes, sparse: SparseConfig, target, **kwargs):
    config = lut_compiler.CompileConfig(input_shapes=shapes, sparse=sparse)
    return lut_compiler.compile(str(path), config, target=target, progress=False, **kwargs)


@pytest.mark.parametrize("name, shapes, sparsity", [
    ("mlp", [{"x": (1, 48)}, {"x": (5, 48)}], 0.9),
    ("cnn", [{"image": (1, 3, 20, 20)}, {"image": (2, 3, 12, 16)}], 0.8),
    ("encoder", [{"ids": (1, 12)}], 0.9),
])
def test_sparse_weights_are_detected_and_match_ort(models, target, tmp_path, name, shapes, sparsity):
    pruned = _prune_file(models[name], tmp_path / "pruned.onnx", sparsity)
    for i, shape in enumerate(shapes):
        model = _compile(pruned, shape, SparseConfig(min_speedup=ALWAYS), target)
        rows = model.record["sparse"]["layers"]
        sparse = [r for r in rows if r["sparse"]]
        assert sparse and all(r["block"] == "16x1" and abs(r["sparsity"] - sparsity) < 0.02 for r in sparse)
        assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in sparse)
        dense_reasons = ("min_sparsity", "does not divide", "not a constant")  # unpruned, N=10, attention
        assert all(any(why in r["reason"] for why in dense_reasons) for r in rows if not r["sparse"])
        feeds = random_feeds(model.inputs, seed=i)
        got = model.run(feeds)["out"]
        np.testing.assert_allclose(got, ort_run(pruned, feeds)[0], rtol=1e-4, atol=1e-4)


def test_dense_kept_unless_sparse_is_measured_faster(models, target, tmp_path):
    pruned = _prune_file(models["mlp"], tmp_path / "pruned.onnx", 0.9)
    model = _compile(pruned, {"x": (4, 48)}, SparseConfig(min_speedup=NEVER), target)
    report = model.record["sparse"]
    measured = [r for r in report["layers"] if r["sparse_ms"] is not None]
    assert measured and not any(r["sparse"] for r in report["layers"]) and report["flops_sparse"] == 0
    assert all("< min_speedup" in r["reason"] for r in measured)
    feeds = random_feeds(model.inputs, seed=3)
    np.testing.assert_allclose(model.run(feeds)["out"], ort_run(pruned, feeds)[0], rtol=1e-4, atol=1e-4)


def test_pruning_by_the_compiler_equals_pruning_the_file(models, target, tmp_path):
    """--prune 0.5 on the dense model computes the model whose file was pruned the same way,
    and reports its agreement with the unpruned fp32 model on the held-out calibration samples."""
    rng = np.random.default_rng(11)
    calib = {"x": rng.standard_normal((10, 2, 48)).astype("float32")}
    sparse = SparseConfig(sparsity=0.5, min_speedup=ALWAYS)
    model = _compile(models["mlp"], {"x": (2, 48)}, sparse, target, calibration=calib)
    report = model.record["sparse"]
    assert report["accuracy"]["samples"] == 2 and 0 < report["accuracy"]["outputs"][0]["cosine"] < 1
    assert all(r["pruned"] for r in report["layers"] if r["sparse"])
    pruned = _prune_file(models["mlp"], tmp_path / "pruned.onnx", 0.5)
    feeds = random_feeds(model.inputs, seed=5)
    np.testing.assert_allclose(model.run(feeds)["out"], ort_run(pruned, feeds)[0], rtol=1e-4, atol=1e-4)


def test_sparse_artifact_runs_with_plain_tvm(models, target, tmp_path):
    pruned = _prune_file(models["cnn"], tmp_path / "pruned.onnx", 0.9)
    model = _compile(pruned, {"image": (1, 3, 16, 16)}, SparseConfig(min_speedup=ALWAYS), target)
    out_dir = model.export(tmp_path / "artifact")
    assert json.loads((out_dir / "manifest.json").read_text())["config"]["sparse"]["min_speedup"] == ALWAYS
    feeds = random_feeds(model.inputs, seed=9)
    np.savez(tmp_path / "feeds.npz", **feeds)
    subprocess.run([sys.executable, "-c", DEPLOY_SCRIPT, str(out_dir), str(tmp_path / "feeds.npz"),
                    str(tmp_path / "out.npz")], check=True, cwd=tmp_path, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["out"], model.run(feeds)["out"])


@pytest.mark.tuning
def test_tuned_sparse_kernels_with_weight_prepack_build_and_match_ort(models, target, tmp_path):
    """Tuning with weight prepacking (the default) must not rewrite the layout of the sparse
    kernels' block values: that once moved their reads before the pattern tables and failed
    to build (MiniLM, 16 trials)."""
    from lut_compiler.lowering import FIXED_LAYOUT, legalize
    from lut_compiler.onnx_import import import_onnx
    from lut_compiler.sparse import apply_sparse

    pruned = _prune_file(models["encoder"], tmp_path / "pruned.onnx", 0.9)
    imported = import_onnx(str(pruned), {"ids": (2, 12)})
    mod, _ = apply_sparse(imported.mod, imported.weight_users, SparseConfig(min_speedup=0), target,
                          lut_compiler.TuneConfig(), progress=False)
    kernels = [f for f in legalize(mod, target, True).functions.values()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and FIXED_LAYOUT in f.attrs]
    assert kernels and all("layout_free_buffers" not in f.attrs for f in kernels)
    pruned = _prune_file(models["mlp"], tmp_path / "pruned_mlp.onnx", 0.9)
    tune = lut_compiler.TuneConfig(trials_per_task=4, work_dir=str(tmp_path / "tuning"))
    config = lut_compiler.CompileConfig(input_shapes={"x": (8, 48)}, tune=tune, sparse=SparseConfig(min_speedup=0))
    model = lut_compiler.compile(str(pruned), config, target=target, progress=False)
    feeds = random_feeds(model.inputs, seed=21)
    np.testing.assert_allclose(model.run(feeds)["out"], ort_run(pruned, feeds)[0], rtol=1e-4, atol=1e-4)


def test_cli_prints_the_decisions(models, tmp_path):
    pruned = _prune_file(models["mlp"], tmp_path / "pruned.onnx", 0.9)
    lutc = [sys.executable, "-m", "lut_compiler.cli", "compile", str(pruned), "--input-shape", "x=2x48", "-q"]
    done = subprocess.run([*lutc, "-o", str(tmp_path / "out"), "--sparse", "--sparse-min-speedup", "0.001"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "sparse ms" in done.stdout and "16x1" in done.stdout and "layers sparse" in done.stdout
    for bad, message in ((["--prune", "1.5"], "sparsity must be in (0, 1)"),
                         (["--prune", "0.5", "--sparse-block", "0x4"], "expected ROWSxCOLS")):
        done = subprocess.run([*lutc, "-o", str(tmp_path / "bad"), *bad], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr and not (tmp_path / "bad").exists()


def test_finetune_recovers_agreement_and_the_compiled_model_computes_it(models, target, tmp_path):
    """70% pruning, then a fine-tune of the kept blocks on calibration samples: the held-out
    agreement with fp32 improves over pruning alone, the pattern is unchanged, and the
    rewritten module computes the fine-tuned torch forward pass."""
    import torch
    import tvm
    from tvm import relax

    from lut_compiler.config import LearnConfig
    from lut_compiler.lowering import legalize, schedule
    from lut_compiler.onnx_import import import_onnx
    from lut_compiler.sparse import apply_sparse
    from lut_compiler.sparse_finetune import masked_module
    from lut_compiler.torch_view import OnnxModule

    rng = np.random.default_rng(4)
    calib = {"x": rng.standard_normal((40, 4, 48)).astype("float32")}
    pruned = SparseConfig(sparsity=0.7, min_speedup=ALWAYS)
    tuned = SparseConfig(sparsity=0.7, min_speedup=ALWAYS, finetune=LearnConfig(epochs=20, minutes=1, lr=3e-3, batch=4))
    before = _compile(models["mlp"], {"x": (4, 48)}, pruned, target, calibration=calib).record["sparse"]
    after = _compile(models["mlp"], {"x": (4, 48)}, tuned, target, calibration=calib).record["sparse"]
    assert after["finetune"]["loss"][-1] < after["finetune"]["loss"][0]
    assert after["accuracy"]["samples"] == 8  # 20% of 40 held out
    assert after["accuracy"]["outputs"][0]["sqnr_db"] > before["accuracy"]["outputs"][0]["sqnr_db"] + 1.0

    imported = import_onnx(str(models["mlp"]), {"x": (4, 48)})
    samples = [{"x": calib["x"][i]} for i in range(40)]
    args = (imported.mod, imported.weight_users)
    _, plain = apply_sparse(*args, pruned, target, lut_compiler.TuneConfig(), progress=False)
    unmeasured = SparseConfig(sparsity=0.7, min_speedup=0, finetune=tuned.finetune)  # every layer, no timing
    mod, result = apply_sparse(*args, unmeasured, target, lut_compiler.TuneConfig(), progress=False,
                               onnx_model=imported.onnx_model, samples=samples)
    assert len(result.layers) == len(plain.layers) == 2  # the 10-wide head does not take 16x1 blocks
    assert [d.dense_ms for d in result.decisions if d.sparse] == [None, None]
    for old, new in zip(plain.layers, result.layers):
        np.testing.assert_array_equal(new.weight.indices, old.weight.indices)
        np.testing.assert_array_equal(new.weight.indptr, old.weight.indptr)
        assert not np.array_equal(new.weight.data, old.weight.data)
    lowered = schedule(legalize(mod, target, False), target, str(tmp_path), False)
    vm = relax.VirtualMachine(tvm.compile(lowered, target), tvm.cpu())
    view = OnnxModule(imported.onnx_model, {layer.candidate.name: masked_module(layer) for layer in result.layers})
    x = rng.standard_normal((4, 48)).astype("float32")
    with torch.no_grad():
        expected = view(x=torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected, rtol=1e-4, atol=1e-4)
