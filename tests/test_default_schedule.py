"""Default CPU schedules: every kernel kind compiles, runs and matches NumPy; the pass marks
every PrimFunc scheduled, leaves tuned ones alone, and tiles matmuls (parallel + vector)."""

import math
import zlib

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.target import Target

from lut_compiler.schedules.default_cpu import (
    Injective,
    MatmulLike,
    cpu_knobs,
    default_schedule_pass,
)

TARGET = Target(
    {
        "kind": "llvm",
        "mtriple": "x86_64-linux-gnu",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": 2,
    }
)
RTOL = ATOL = 1e-4


def _fuse(mod: tvm.IRModule) -> tvm.IRModule:
    """The stock Relax lowering up to (not including) scheduling."""
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(mod)


def _relax_function(inputs: list[np.ndarray], body) -> tvm.IRModule:
    """`main(*inputs) = body(bb, *vars)` as a Relax module (fp32 inputs)."""
    bb = relax.BlockBuilder()
    params = [
        relax.Var(f"x{i}", relax.TensorType(a.shape, "float32")) for i, a in enumerate(inputs)
    ]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run_scheduled(mod: tvm.IRModule, inputs: list[np.ndarray]) -> np.ndarray:
    mod = default_schedule_pass(TARGET)(_fuse(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def _rng(*key) -> np.random.Generator:
    """A generator seeded by the test case, the same in every run."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype("float32")


def _conv2d_nchw(x, w, stride, padding, groups=1):
    """NumPy conv2d: x (N, C, H, W), w (F, C / groups, KH, KW) -> (N, F, OH, OW)."""
    x = np.pad(x, [(0, 0), (0, 0), (padding, padding), (padding, padding)])
    f, cg, kh, kw = w.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # (N, C, OH, OW, KH, KW)
    n, _, oh, ow = windows.shape[:4]
    windows = windows.reshape(n, groups, cg, oh, ow, kh, kw)
    w = w.reshape(groups, f // groups, cg, kh, kw)
    out = np.einsum("ngchwyx,gfcyx->ngfhw", windows, w)
    return out.reshape(n, f, oh, ow)


# ---------------------------------------------------------------- numerics per kernel kind


@pytest.mark.parametrize(
    "m,k,n", [(7, 33, 10), (64, 128, 48), (1, 384, 100), (61, 96, 1000), (17, 1, 19)]
)
def test_dense_bias_relu(m, k, n):
    rng = _rng("dense", m, k, n)
    x, w, b = _normal(rng, m, k), _normal(rng, k, n, scale=k**-0.5), _normal(rng, n)

    def body(bb, x):
        y = bb.emit(relax.op.matmul(x, relax.const(w)))
        return relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(b))))

    out = _run_scheduled(_relax_function([x], body), [x])
    np.testing.assert_allclose(out, np.maximum(x @ w + b, 0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("b,m,k,n", [(12, 128, 64, 128), (3, 7, 33, 10)])
def test_batch_matmul(b, m, k, n):
    rng = _rng("bmm", b, m, k, n)
    x, y = _normal(rng, b, m, k), _normal(rng, b, k, n, scale=k**-0.5)
    out = _run_scheduled(_relax_function([x, y], lambda bb, x, y: relax.op.matmul(x, y)), [x, y])
    np.testing.assert_allclose(out, x @ y, rtol=RTOL, atol=ATOL)


CONVS = {
    # name: (C, H, W, F, kernel, stride, padding, groups)
    "3x3_s1": (16, 15, 15, 24, 3, 1, 1, 1),
    "3x3_s1_odd": (5, 9, 13, 7, 3, 1, 1, 1),
    "3x3_s2": (16, 15, 15, 24, 3, 2, 1, 1),
    "3x3_s2_large": (32, 28, 28, 64, 3, 2, 1, 1),
    "1x1": (32, 14, 14, 48, 1, 1, 0, 1),
    "depthwise": (32, 14, 14, 32, 3, 1, 1, 32),
    "depthwise_s2": (24, 15, 15, 24, 3, 2, 1, 24),
    "1x1_one_channel": (1, 5, 5, 3, 1, 1, 0, 1),  # unit reduction: no multiply-accumulate left
}


@pytest.mark.parametrize("name", CONVS)
def test_conv2d_bias_relu(name):
    c, h, w_, f, kernel, stride, padding, groups = CONVS[name]
    rng = _rng("conv", name)
    x = _normal(rng, 1, c, h, w_)
    w = _normal(rng, f, c // groups, kernel, kernel, scale=(c // groups * kernel * kernel) ** -0.5)
    b = _normal(rng, 1, f, 1, 1)

    def body(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), stride, padding, groups=groups))
        return relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(b))))

    out = _run_scheduled(_relax_function([x], body), [x])
    expected = np.maximum(_conv2d_nchw(x, w, stride, padding, groups) + b, 0)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("m,n", [(7, 10), (128, 128), (12, 1000)])
def test_softmax(m, n):
    x = _normal(_rng("softmax", m, n), m, n)
    out = _run_scheduled(_relax_function([x], lambda bb, x: relax.op.nn.softmax(x)), [x])
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(-1, keepdims=True), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("m,n", [(7, 33), (128, 384)])
def test_layer_norm(m, n):
    rng = _rng("layer_norm", m, n)
    x, gamma, beta = _normal(rng, m, n), _normal(rng, n), _normal(rng, n)

    def body(bb, x):
        return relax.op.nn.layer_norm(x, relax.const(gamma), relax.const(beta), axes=[-1])

    out = _run_scheduled(_relax_function([x], body), [x])
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, normed * gamma + beta, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("m,n", [(7, 10), (128, 1536), (3, 1001)])
def test_add_gelu(m, n):
    rng = _rng("gelu", m, n)
    x, y = _normal(rng, m, n), _normal(rng, m, n)
    body = lambda bb, x, y: relax.op.nn.gelu(bb.emit(relax.op.add(x, y)))  # noqa: E731
    out = _run_scheduled(_relax_function([x, y], body), [x, y])
    s = (x + y).astype("float64")
    expected = 0.5 * s * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


def test_scalar_operand():
    """A 0-d operand (as MiniLM's attention scale arrives) in an elementwise kernel."""
    rng = _rng("scalar")
    x, scale = _normal(rng, 4, 40), np.array(0.125, dtype="float32")
    out = _run_scheduled(_relax_function([x, scale], lambda bb, x, s: relax.op.multiply(x, s)), [x, scale])
    np.testing.assert_allclose(out, x * scale, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("b,s,h,d", [(1, 128, 12, 32), (2, 7, 3, 5)])
def test_reshape_transpose(b, s, h, d):
    x = _normal(_rng("transpose", b, s, h, d), b, s, h * d)

    def body(bb, x):
        heads = bb.emit(relax.op.reshape(x, (b, s, h, d)))
        return relax.op.permute_dims(heads, [0, 2, 3, 1])

    out = _run_scheduled(_relax_function([x], body), [x])
    np.testing.assert_array_equal(out, x.reshape(b, s, h, d).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("s,h,d", [(128, 12, 32), (7, 3, 5)])
def test_attention_block(s, h, d):
    """Head split (reshape + transpose), scaled q @ k^T, softmax, @ v, head merge."""
    rng = _rng("attention", s, h, d)
    q, k, v = (_normal(rng, 1, s, h * d) for _ in range(3))

    def split(bb, t):
        return bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(t, (1, s, h, d))), [0, 2, 1, 3]))

    def body(bb, q, k, v):
        keys_t = bb.emit(relax.op.permute_dims(split(bb, k), [0, 1, 3, 2]))
        scores = bb.emit(relax.op.matmul(split(bb, q), keys_t))
        scaled = bb.emit(relax.op.multiply(scores, relax.const(d**-0.5, "float32")))
        probs = bb.emit(relax.op.nn.softmax(scaled))
        heads = bb.emit(relax.op.matmul(probs, split(bb, v)))
        return relax.op.reshape(bb.emit(relax.op.permute_dims(heads, [0, 2, 1, 3])), (1, s, h * d))

    out = _run_scheduled(_relax_function([q, k, v], body), [q, k, v])
    heads = [t.reshape(1, s, h, d).transpose(0, 2, 1, 3) for t in (q, k, v)]
    scores = heads[0] @ heads[1].transpose(0, 1, 3, 2) * d**-0.5
    e = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (e / e.sum(-1, keepdims=True)) @ heads[2]
    expected = expected.transpose(0, 2, 1, 3).reshape(1, s, h * d)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- structure after the pass


def _prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {
        gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
    }


def _loop_kinds(func: tirx.PrimFunc) -> set:
    kinds = set()
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda loop: kinds.add(loop.kind)), order="post")
    return kinds


def _mlp_module() -> tvm.IRModule:
    rng = _rng("mlp")
    x, w1, w2 = _normal(rng, 64, 128), _normal(rng, 128, 256), _normal(rng, 256, 32)

    def body(bb, x):
        hidden = bb.emit(relax.op.nn.relu(bb.emit(relax.op.matmul(x, relax.const(w1)))))
        return relax.op.nn.softmax(bb.emit(relax.op.matmul(hidden, relax.const(w2))))

    return _relax_function([x], body)


def test_every_prim_func_is_marked_scheduled():
    mod = default_schedule_pass(TARGET)(_fuse(_mlp_module()))
    funcs = _prim_funcs(mod)
    assert len(funcs) >= 2
    assert all(bool(f.attrs.get("tirx.is_scheduled", False)) for f in funcs.values())


def test_matmul_gets_parallel_and_vectorized_loops():
    funcs = _prim_funcs(default_schedule_pass(TARGET)(_fuse(_mlp_module())))
    kinds = _loop_kinds(funcs["fused_matmul_relu"])
    assert tirx.ForKind.PARALLEL in kinds
    assert tirx.ForKind.VECTORIZED in kinds
    assert tirx.ForKind.UNROLLED in kinds


def test_already_scheduled_prim_func_is_left_alone():
    mod = _fuse(_mlp_module())
    gv = mod.get_global_var("fused_matmul_relu")
    tuned = mod[gv].with_attr("tirx.is_scheduled", True)
    mod[gv] = tuned
    after = default_schedule_pass(TARGET)(mod)
    tvm.ir.assert_structural_equal(after[gv], tuned)


def test_matmul_rule_declines_softmax_and_injective_declines_matmul():
    funcs = _prim_funcs(_fuse(_mlp_module()))
    with TARGET:
        assert MatmulLike().apply(funcs["softmax"], TARGET, False) is None
        assert Injective().apply(funcs["fused_matmul_relu"], TARGET, False) is None


def test_vector_width_comes_from_the_target():
    avx512 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"})
    avx2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    assert cpu_knobs(avx512).lanes("float32") == 16
    assert cpu_knobs(avx2).lanes("float32") == 8
    assert cpu_knobs(TARGET).num_cores == 2
