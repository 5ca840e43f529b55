"""The int8 dense path end to end: quantized layers against NumPy, every matmul/conv of a model
rewritten into quantize + int8 kernel calls computing what the torch fake-quant view
computes, and staying close to the fp32 model (ONNX Runtime) at several shapes."""

import numpy as np
import pytest
import torch
from conftest import ort_run, random_feeds

from lut_compiler.calibration import activation_absmax
from lut_compiler.int8 import Int8Module, int8_layer
from lut_compiler.lowering import legalize, schedule
from lut_compiler.onnx_import import import_onnx
from lut_compiler.passes.find_candidates import find_candidates
from lut_compiler.passes.int8_rewrite import rewrite_int8
from lut_compiler.passes.sparse_rewrite import check, weight_t
from lut_compiler.schedules.int8_matmul import int8_isa, weight_bits
from lut_compiler.torch_view import OnnxModule


@pytest.mark.parametrize("bits", [7, 8])
def test_int8_layer_quantizes_per_channel_and_its_module_is_the_fake_quant_matmul(models, bits):
    imported = import_onnx(str(models["mlp"]), {"x": (3, 48)})
    c = next(c for c in find_candidates(imported.mod, imported.weight_users) if check(c) is None)
    layer = int8_layer(c, x_absmax=2.5, bits=bits)
    q = 2 ** (bits - 1) - 1
    w_t = weight_t(c)
    assert layer.wq.dtype == np.int8 and np.abs(layer.wq).max() == q
    np.testing.assert_allclose(layer.wq * layer.w_scale[:, None], w_t, atol=float(layer.w_scale.max()) / 2 + 1e-7)
    assert layer.x_scale == pytest.approx(2.5 / 127)
    x = np.random.default_rng(bits).standard_normal((5, w_t.shape[1])).astype(np.float32) * 2
    xq = np.clip(np.round(x * np.float32(1 / layer.x_scale)), -128, 127)
    expected = (xq * layer.x_scale) @ (layer.wq.astype(np.float64) * layer.w_scale[:, None]).T
    with torch.no_grad():
        got = Int8Module(layer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _int8_model(path, shapes, target, tmp_path, seed: int):
    import tvm
    from tvm import relax

    imported = import_onnx(str(path), shapes)
    candidates = [c for c in find_candidates(imported.mod, imported.weight_users) if check(c) is None]
    samples = [random_feeds(imported.inputs, seed=seed + i) for i in range(4)]
    absmax = activation_absmax(imported.onnx_model, samples, candidates, progress=False)
    layers = [int8_layer(c, absmax[c.var], weight_bits(target)) for c in candidates]
    mod = rewrite_int8(imported.mod, layers, int8_isa(target))
    vm = relax.VirtualMachine(tvm.compile(schedule(legalize(mod, target, False), target, str(tmp_path), False), target),
                              tvm.cpu())
    view = OnnxModule(imported.onnx_model, {layer.candidate.name: Int8Module(layer) for layer in layers})
    return imported, layers, vm, view


@pytest.mark.parametrize("name, shapes", [
    ("mlp", {"x": (1, 48)}), ("mlp", {"x": (7, 48)}),
    ("cnn", {"image": (1, 3, 20, 20)}), ("cnn", {"image": (2, 3, 12, 16)}),
])
def test_int8_model_computes_the_fake_quant_view_and_stays_near_fp32(models, target, tmp_path, name, shapes):
    import tvm

    imported, layers, vm, view = _int8_model(models[name], shapes, target, tmp_path, seed=3)
    assert len(layers) >= 3 and all(layer.wq.dtype == np.int8 for layer in layers)
    feeds = random_feeds(imported.inputs, seed=99)  # not a calibration sample
    got = vm["main"](*[tvm.runtime.tensor(feeds[s.name]) for s in imported.inputs]).numpy()
    with torch.no_grad():
        expected = view(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * scale)
    fp32 = ort_run(models[name], feeds)[0]
    cosine = np.sum(got * fp32) / (np.linalg.norm(got) * np.linalg.norm(fp32))
    assert cosine > 0.99, cosine
