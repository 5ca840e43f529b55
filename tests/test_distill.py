"""Centroid learning: the PQ layer against NumPy, the torch view against ONNX Runtime,
distillation reducing its loss, and the compiled model computing the trained forward pass."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ort_run
from torch_models import CNN, MLP, Encoder, export

import lut_compiler
from lut_compiler.codebooks import make_tables, quantize_tables
from lut_compiler.config import CompileConfig, LearnConfig, LutConfig
from lut_compiler.distill import distill, distillation_loss, learn_centroids, student_view
from lut_compiler.errors import UnsupportedModelError
from lut_compiler.lut import apply_lut
from lut_compiler.onnx_import import import_onnx
from lut_compiler.pq_layer import PQLayer
from lut_compiler.schedules.lut_encode_linear import encode_linear_ref
from lut_compiler.schedules.lut_lookup_linear import lookup_add_linear_ref
from lut_compiler.target import resolve_target
from lut_compiler.torch_view import OnnxModule


def _pq_case(seed: int, rows=64, c=6, k=16, v=4, n=10):
    rng = np.random.default_rng(seed)
    sub = rng.standard_normal((rows, c, v)).astype(np.float32)
    return sub, rng.standard_normal((c, k, v)).astype(np.float32), rng.standard_normal((c * v, n)).astype(np.float32)


@pytest.mark.parametrize("table_dtype", ["int8", "float32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pq_layer_forward_is_the_numpy_lookup_add(table_dtype, seed):
    sub, centroids, weight = _pq_case(seed, rows=50 + seed * 13)
    pq = PQLayer(centroids, weight, table_dtype)
    tables = make_tables(centroids, weight)
    tables, scale = quantize_tables(tables) if table_dtype == "int8" else (tables, np.ones(weight.shape[1], np.float32))
    codes = encode_linear_ref(sub.reshape(len(sub), -1), centroids)
    expected = lookup_add_linear_ref(codes, tables, scale, np.zeros(weight.shape[1], np.float32))
    with torch.no_grad():
        got = pq(torch.from_numpy(sub)).numpy()
        np.testing.assert_array_equal(pq.codes(torch.from_numpy(sub)).numpy(), codes)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    exported = pq.exported()
    assert exported[1].dtype == tables.dtype
    np.testing.assert_allclose(exported[1], tables, rtol=1e-5, atol=1e-6)  # int8: equal
    np.testing.assert_allclose(exported[2], scale, rtol=1e-6)


def test_pq_layer_shift_is_added_and_trains_only_when_asked():
    """A given shift is added to the output and exported; only train_shift gives it gradients."""
    sub, centroids, weight = _pq_case(3)
    x = torch.from_numpy(sub)
    plain = PQLayer(centroids, weight)
    shift = np.random.default_rng(4).standard_normal(weight.shape[1]).astype(np.float32)
    fixed = PQLayer(centroids, weight, shift=shift)
    with torch.no_grad():
        np.testing.assert_allclose(fixed(x).numpy(), plain(x).numpy() + shift, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fixed.exported()[3], shift)
    assert plain.shift is None and not plain.exported()[3].any() and not fixed.shift.requires_grad
    trained = PQLayer(centroids, weight, train_shift=True)
    trained(x).sum().backward()
    np.testing.assert_allclose(trained.shift.grad.numpy(), np.full(weight.shape[1], len(sub)), rtol=1e-6)


def test_pq_layer_gradients_are_the_soft_assignments():
    """Straight-through: the backward pass is that of softmax(-dist * t), t = softplus(theta) + 1."""
    sub, centroids, weight = _pq_case(2)
    pq = PQLayer(centroids, weight, "float32")
    x = torch.from_numpy(sub)
    grad = torch.randn(len(sub), weight.shape[1], generator=torch.Generator().manual_seed(0))
    pq(x).backward(grad)
    g_centroids, g_theta = pq.centroids.grad.clone(), pq.theta.grad.clone()
    assert g_centroids.abs().sum() > 0 and g_theta.abs() > 0

    ref = PQLayer(centroids, weight, "float32")  # the soft path alone, by hand
    dist = ref.distances(x)
    soft = torch.softmax(-dist * (torch.nn.functional.softplus(ref.theta) + 1), -1)
    tables = torch.einsum("ckv,cvn->ckn", ref.centroids, ref.weight)
    hard = torch.nn.functional.one_hot(dist.argmin(-1), 16).float()
    # d/dP of <grad, (hard + soft - soft.detach()) . T(P)>: the soft term's and the tables' gradients
    (torch.einsum("rck,ckn->rn", soft, tables.detach()) * grad).sum().backward(retain_graph=True)
    (torch.einsum("rck,ckn->rn", hard, tables) * grad).sum().backward()
    np.testing.assert_allclose(g_centroids.numpy(), ref.centroids.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(g_theta), float(ref.theta.grad), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,shape", [("mlp", (3, 48)), ("cnn", (2, 3, 11, 9)), ("encoder", (2, 7))])
def test_torch_view_matches_onnxruntime(models, name, shape):
    imported = import_onnx(models[name], {imported_name(name): shape})
    rng = np.random.default_rng(len(shape))
    feeds = {imported_name(name): rng.integers(0, 100, shape).astype(np.int64) if name == "encoder"
             else rng.standard_normal(shape).astype(np.float32)}
    view = OnnxModule(imported.onnx_model)
    with torch.no_grad():
        got = view(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for out, ref in zip(got, ort_run(models[name], feeds)):
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


def imported_name(name: str) -> str:
    return {"mlp": "x", "cnn": "image", "encoder": "ids"}[name]


def test_unsupported_op_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    with pytest.raises(UnsupportedModelError, match="does not implement ONNX op.s. Hardmax"):
        OnnxModule(helper.make_model(graph))
    assert onnx  # imported for the helper


def _cnn_case(tmp_path, samples=12):
    torch.manual_seed(11)
    path = export(CNN(), torch.randn(1, 3, 8, 8), tmp_path / "cnn.onnx", "x", {0: "batch"})
    rng = np.random.default_rng(12)
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(samples)]
    return path, feeds


def test_learning_reduces_the_distillation_loss(tmp_path):
    """A few epochs on a small CNN (every conv and the head replaced) in seconds."""
    path, feeds = _cnn_case(tmp_path)
    imported = import_onnx(path, {"x": (2, 3, 8, 8)})
    _, result = apply_lut(imported, LutConfig(holdout=0.0), feeds, resolve_target("host"), progress=False)
    kmeans = result.layers

    def loss(layers) -> float:
        student, teacher = student_view(imported.onnx_model, layers), OnnxModule(imported.onnx_model)
        with torch.no_grad():
            return float(sum(distillation_loss(student(x=torch.from_numpy(f["x"])), teacher(x=torch.from_numpy(f["x"])))
                             for f in feeds))

    learned, stats = learn_centroids(imported.onnx_model, kmeans, feeds, LearnConfig(epochs=8, lr=3e-3, batch=4),
                                     progress=False)
    assert stats["epochs"] == 8 and len(stats["loss"]) == 8 and stats["loss"][-1] < stats["loss"][0]
    assert loss(learned) < 0.7 * loss(kmeans)
    assert all(not np.array_equal(a.centroids, b.centroids) for a, b in zip(learned, kmeans))


def test_layer_loss_also_matches_the_replaced_layers_outputs(tmp_path):
    """layer_loss > 0: the loss adds the replaced layers' own outputs (so it starts higher
    than the output loss alone), training still lowers it, and the view returns only the
    graph's outputs afterwards."""
    path, feeds = _cnn_case(tmp_path)
    imported = import_onnx(path, {"x": (2, 3, 8, 8)})
    _, result = apply_lut(imported, LutConfig(holdout=0.0), feeds, resolve_target("host"), progress=False)
    first = {}
    for weight in (0.0, 1.0):
        cfg = LearnConfig(epochs=4, lr=3e-3, batch=4, layer_loss=weight)
        student = student_view(imported.onnx_model, result.layers)
        stats = distill(imported.onnx_model, student, feeds, cfg, None, 0, False, ["k"], "test")
        assert stats["loss"][-1] < stats["loss"][0] and student.taps == []
        assert len(student(x=torch.from_numpy(feeds[0]["x"]))) == 1
        first[weight] = stats["loss"][0]
    assert first[1.0] > first[0.0]


def _assert_compiled_is_the_view(model, path, cfg: LutConfig, feeds, seed: int):
    """On fresh inputs, the compiled CNN equals the torch view with the layers `apply_lut`
    makes of `cfg` (the same ones the compile made); returns apply_lut's result."""
    imported = import_onnx(path, {"x": (2, 3, 8, 8)})
    _, result = apply_lut(imported, cfg, feeds, resolve_target("host"), progress=False)
    student = student_view(imported.onnx_model, result.layers)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
        with torch.no_grad():
            expected = student(x=torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(model.run({"x": x})["out"], expected, rtol=1e-4, atol=1e-4)
    return result


def test_compiled_model_computes_the_trained_forward_pass(tmp_path):
    """Learned centroids flow into the same rewrite and kernels; on held-out inputs the
    compiled model equals the student's torch forward pass (int8 tables, shuffle kernels)."""
    path, feeds = _cnn_case(tmp_path, samples=10)
    ckpt = tmp_path / "learn.pt"
    cfg = LutConfig(holdout=0.3, learn=LearnConfig(epochs=3, lr=3e-3, batch=4, checkpoint=str(ckpt)))
    model = lut_compiler.compile(path, CompileConfig(input_shapes={"x": (2, 3, 8, 8)}, lut=cfg), progress=False,
                                 calibration=feeds)
    assert ckpt.exists()
    result = _assert_compiled_is_the_view(model, path, cfg, feeds, seed=99)  # apply_lut resumes: no training
    assert [r["replaced"] for r in model.record["lut"]["layers"]].count(True) == 6
    assert model.record["lut"]["learn"][0]["epochs"] == 3 and result.refined["learn"][0]["resumed_from"] == 3
    # the checkpoint holds fitted tables (the default): a run with plain tables starts anew
    imported = import_onnx(path, {"x": (2, 3, 8, 8)})
    _, plain = apply_lut(imported, replace(cfg, table_fit=None), feeds, resolve_target("host"), progress=False)
    assert plain.refined["learn"][0]["resumed_from"] == 0 and all(layer.correction is None for layer in plain.layers)


def test_trained_weights_and_bias_reach_the_compiled_model(tmp_path):
    """With the replaced layers' weights and output shifts training too, the compiled model
    still equals the student's forward pass, and the shifts moved the layers' biases."""
    path, feeds = _cnn_case(tmp_path, samples=10)
    learn = LearnConfig(epochs=3, lr=3e-3, batch=4, train_weights=True, train_bias=True,
                        checkpoint=str(tmp_path / "learn.pt"))
    cfg = LutConfig(holdout=0.3, learn=learn)
    model = lut_compiler.compile(path, CompileConfig(input_shapes={"x": (2, 3, 8, 8)}, lut=cfg), progress=False,
                                 calibration=feeds)
    result = _assert_compiled_is_the_view(model, path, cfg, feeds, seed=98)
    assert result.refined["learn"][0]["resumed_from"] == 3
    own = [layer.plan.candidate.bias for layer in result.layers]
    assert all(b is None or b.shape == layer.bias.shape for b, layer in zip(own, result.layers))
    assert all(not np.allclose(layer.bias, 0 if b is None else b) for b, layer in zip(own, result.layers))
    # the checkpoint of this run (bias trained) is not resumed by a run that does not train the bias
    imported = import_onnx(path, {"x": (2, 3, 8, 8)})
    _, other = apply_lut(imported, replace(cfg, learn=replace(learn, train_bias=False)), feeds,
                         resolve_target("host"), progress=False)
    assert other.refined["learn"][0]["resumed_from"] == 0


# ---------------------------------------------------------------- layer choice under a budget


def test_greedy_choice_on_a_known_metric():
    """Additive losses per layer (points): dropping the most sensitive first keeps the set that
    fits, later layers kept on ties; layers that only work together are all kept."""
    from lut_compiler.config import Budget
    from lut_compiler.layer_choice import choose_layers

    cost = {"a": 0.002, "b": 0.009, "c": 0.005, "d": 0.005}  # accuracy lost alone (fractions)
    layers = [[x] for x in cost]  # one variant each
    choice = choose_layers(lambda chosen, bound=False: 0.9 - sum(cost[x] for x in chosen), layers, Budget("accuracy", 1.0),
                           progress=False)
    assert choice.kept == [True, False, False, True]  # a (0.2) + d (0.5, later than c) = 0.7 points; + c or b: over
    assert choice.baseline == pytest.approx(0.9) and choice.final == pytest.approx(0.893)
    assert choice.sensitivity == pytest.approx([0.002, 0.009, 0.005, 0.005])
    # co-adapted (learned together): each alone costs 2 points, all four together nothing
    together = choose_layers(lambda chosen, bound=False: 0.9 if len(chosen) in (0, 4) else 0.88, layers, Budget("accuracy", 1.0),
                             progress=False)
    assert together.kept == [True] * 4 and together.final == pytest.approx(0.9)
    # with FLOPs, cost per FLOP ranks the layers: b costs the most but is 10 of the 13 FLOPs
    knapsack = choose_layers(lambda chosen, bound=False: 0.9 - sum(cost[x] for x in chosen), layers,
                             Budget("accuracy", 1.0), flops=[1, 10, 1, 1], progress=False)
    assert knapsack.kept == [False, True, False, False]  # c, d (tie: earlier first), a dropped; d or c back: over


def test_choice_steps_costly_layers_to_finer_variants_before_dense():
    """Variants coarse to fine (V, V/2): the most costly current variant steps finer (or to
    dense when it has none); steps that would break the budget again are not undone."""
    from lut_compiler.config import Budget
    from lut_compiler.layer_choice import choose_layers

    cost = {"a4": 0.002, "a2": 0.001, "b4": 0.009, "b2": 0.003, "c4": 0.0065, "d4": 0.0055, "d2": 0.002}
    variants = [["a4", "a2"], ["b4", "b2"], ["c4"], ["d4", "d2"]]
    evaluated = []

    def metric(chosen, bound=False):
        evaluated.append(tuple(chosen))
        return 0.9 - sum(cost[x] for x in chosen)

    choice = choose_layers(metric, variants, Budget("accuracy", 1.0), progress=False)
    # all coarse 2.25 points -> b finer 1.65 -> c dense 1.05 -> d finer 0.7; c or b back: over
    assert choice.variant == [0, 1, None, 1] and choice.kept == [True, True, False, True]
    assert choice.final == pytest.approx(0.893)
    assert choice.sensitivity == pytest.approx([0.002, 0.009, 0.0065, 0.0055])
    whole = [c for c in evaluated if len(c) > 1]  # all coarse, bisection over the 7 steps, c and b back, final
    assert len(whole) == 1 + 3 + 2 + 1


def test_budget_is_checked_one_standard_error_below_the_mean(tmp_path):
    """Metric(bound=True): the mean cosine over validation rows less the standard error of
    the per-row difference to fp32 (NumPy on the torch views' outputs); fp32 has no error."""
    from lut_compiler.layer_choice import Metric

    path, feeds = _cnn_case(tmp_path)
    imported = import_onnx(path, {"x": (2, 3, 8, 8)})
    _, result = apply_lut(imported, LutConfig(holdout=0.0), feeds, resolve_target("host"), progress=False)
    metric = Metric(imported.onnx_model, feeds[:5], None, "cosine")
    teacher, student = OnnxModule(imported.onnx_model), student_view(imported.onnx_model, result.layers)
    cos = []
    with torch.no_grad():
        for f in feeds[:5]:
            a, b = (m(x=torch.from_numpy(f["x"]))[0].numpy().reshape(2, -1) for m in (student, teacher))
            cos += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    cos = np.array(cos)
    assert metric(result.layers) == pytest.approx(cos.mean(), abs=1e-5)
    assert metric(result.layers, bound=True) == pytest.approx(cos.mean() - (cos - 1).std(ddof=1) / np.sqrt(10), abs=1e-5)
    assert metric([], bound=True) == metric([]) == pytest.approx(1.0)


def test_budget_keeps_the_validation_cosine(tmp_path):
    """--min-cosine: the chosen layers keep the validation cosine above the bound; the rest
    stay dense with the reason; the report shows it."""
    from lut_compiler.config import Budget

    path, feeds = _cnn_case(tmp_path, samples=16)
    cfg = LutConfig(holdout=0.25, budget=Budget("cosine", 0.995))
    model = lut_compiler.compile(path, CompileConfig(input_shapes={"x": (2, 3, 8, 8)}, lut=cfg), progress=False,
                                 calibration=feeds)
    report = model.record["lut"]
    budget = report["budget"]
    assert budget["metric"] == "cosine" and budget["validation_samples"] == 3  # a quarter of 12 training samples
    assert budget["chosen"] >= 0.995 and set(budget["sensitivity"]) == {r["name"] for r in report["layers"]}
    kept = [r for r in report["layers"] if r["replaced"]]
    dropped = [r for r in report["layers"] if not r["replaced"]]
    assert kept and dropped and all("over the cosine budget" in r["reason"] for r in dropped)
    loose = lut_compiler.compile(path, CompileConfig(input_shapes={"x": (2, 3, 8, 8)},
                                                     lut=LutConfig(holdout=0.25, budget=Budget("cosine", -1.0))),
                                 progress=False, calibration=feeds)
    assert all(r["replaced"] for r in loose.record["lut"]["layers"])


def test_finer_subspaces_keep_more_layers_within_the_budget(tmp_path):
    """finer=1: a layer over the budget at V may stay replaced at V/2 (the 1x1 projection or
    the head: V 4 -> 2; 3x3 convs have odd V = 9 and no finer variant) instead of dense; the budget
    holds on validation and the compiled model computes the torch view of the chosen layers."""
    from lut_compiler.config import Budget

    path, feeds = _cnn_case(tmp_path, samples=16)
    shapes = {"x": (2, 3, 8, 8)}
    replaced = {}
    for finer in (0, 1):
        # plain tables: with this budget the 1x1 projection or the head fits only at V/2
        cfg = LutConfig(holdout=0.25, budget=Budget("cosine", 0.9995), finer=finer, table_fit=None)
        model = lut_compiler.compile(path, CompileConfig(input_shapes=shapes, lut=cfg), progress=False,
                                     calibration=feeds)
        report = model.record["lut"]
        replaced[finer] = {r["name"]: r["V"] for r in report["layers"] if r["replaced"]}
        assert report["budget"]["chosen"] >= 0.9995
        assert report["budget"]["finer"] == {n: v for n, v in replaced[finer].items() if v == 2}
    assert set(replaced[0]) < set(replaced[1]) and 2 in replaced[1].values()
    _assert_compiled_is_the_view(model, path, cfg, feeds, seed=5)


def test_cli_finer_option(tmp_path, capfd):
    """--lut-finer N: the report names the layers at a finer V; a negative N is a one-line usage error."""
    from test_cli import lutc_here

    path, feeds = _cnn_case(tmp_path, samples=16)
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds]))
    args = ["compile", path, "-o", tmp_path / "out", "--input-shape", "x=2x3x8x8", "--lut", "--calib",
            tmp_path / "calib.npz", "--min-cosine", "0.9985", "--lut-finer"]
    code, _, err = lutc_here(capfd, *args, "-1")
    assert code == 2 and "finer must be >= 0" in err and not (tmp_path / "out").exists()
    code, out, err = lutc_here(capfd, *args, "1")
    assert code == 0, err
    assert re.search(r"at a finer V to fit the budget: /(proj/Conv|head/Gemm) \(V=2\)", out)


def test_budget_with_learning_shares_the_time_budget(tmp_path, monkeypatch):
    """--learn with a budget: learning on every layer gets at most half the minutes, learning
    again on the kept layers what is left; the kept layers still meet the bound on validation."""
    import lut_compiler.lut as lut_phase
    from lut_compiler.config import Budget

    minutes, learn = [], lut_phase.learn_centroids

    def recording(onnx_model, layers, samples, cfg, *args):
        minutes.append((len(layers), cfg.minutes))
        return learn(onnx_model, layers, samples, cfg, *args)

    monkeypatch.setattr(lut_phase, "learn_centroids", recording)
    path, feeds = _cnn_case(tmp_path, samples=16)
    cfg = LutConfig(holdout=0.25, budget=Budget("cosine", 0.995), learn=LearnConfig(epochs=2, lr=3e-3, batch=4))
    model = lut_compiler.compile(path, CompileConfig(input_shapes={"x": (2, 3, 8, 8)}, lut=cfg), progress=False,
                                 calibration=feeds)
    report = model.record["lut"]
    kept = sum(r["replaced"] for r in report["layers"])
    assert minutes[0] == (6, 5.0) and 0 < kept < 6 and report["budget"]["chosen"] >= 0.995
    assert len(minutes) == 2 and minutes[1][0] == kept  # the second run gets what the first left of 10 minutes
    assert minutes[1][1] == pytest.approx(10.0 - report["learn"][0]["seconds"] / 60)
    assert [run["layers"] for run in report["learn"]] == [6, kept]


def test_torch_view_edge_ops_match_onnxruntime():
    """Flatten at axis = rank, ReduceL2, Gather with a scalar index, Split, Where, Expand."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=3),  # [2, 3, 4] -> [24, 1]
        helper.make_node("ReduceL2", ["x", "ax"], ["n"], keepdims=1),
        helper.make_node("Gather", ["x", "i"], ["g"], axis=1),  # scalar index: [2, 4]
        helper.make_node("Split", ["x", "sp"], ["s0", "s1"], axis=2),
        helper.make_node("Greater", ["x", "zero"], ["pos"]),
        helper.make_node("Where", ["pos", "x", "n"], ["w"]),
        helper.make_node("Expand", ["g", "shape"], ["e"]),
    ]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "ax"), numpy_helper.from_array(np.array(1, np.int64), "i"),
             numpy_helper.from_array(np.array([1, 3], np.int64), "sp"), numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.array([3, 2, 4], np.int64), "shape")]
    outs = ["f", "n", "g", "s0", "s1", "w", "e"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(outs, {"x": x})
    with torch.no_grad():
        got = OnnxModule(model)(x=torch.from_numpy(x))
    for name, g, e in zip(outs, got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-6, atol=1e-6, err_msg=name)
