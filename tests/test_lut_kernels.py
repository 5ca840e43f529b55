"""LUT kernels (encode, lookup-add; linear and conv) compiled with the default CPU schedule
against their NumPy references; im2col patches against torch's conv2d; the kernels inside a
fused Relax module; MetaSchedule tuning of them (marker `tuning`)."""

import zlib

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax, tirx

from lut_cases import CONVS, MIN_EQUAL_CODES, assert_codes
from lut_compiler.config import TuneConfig
from lut_compiler.schedules.conv_patches import ConvGeometry, patches
from lut_compiler.schedules.default_cpu import default_schedule, default_schedule_pass
from lut_compiler.schedules.lut_encode_conv import encode_conv, encode_conv_ref
from lut_compiler.schedules.lut_encode_linear import encode_linear, encode_linear_ref
from lut_compiler.schedules.lut_lookup_conv import lookup_add_conv, lookup_add_conv_ref
from lut_compiler.schedules.lut_lookup_linear import lookup_add_linear, lookup_add_linear_ref, lookup_sums_ref
from lut_compiler.target import resolve_target
from lut_compiler.tuning import apply_database, tune

TARGET = resolve_target("host")


def _geometry(name: str) -> tuple[ConvGeometry, int]:
    shape, out, kernel, stride, padding, dilation, group, k = CONVS[name]
    return ConvGeometry.of(shape, out, kernel, stride, padding, dilation, group), k


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype("float32")


def _kernel(func: tirx.PrimFunc):
    """`func` with its default schedule, compiled: called with the inputs, returns the output
    (the last parameter)."""
    lib = tvm.compile(tvm.IRModule({"main": default_schedule(func, TARGET).mod["main"]}), TARGET)
    out = func.params[-1].ty

    def run(*inputs: np.ndarray) -> np.ndarray:
        result = tvm.runtime.empty([int(d) for d in out.shape], str(out.dtype))
        lib["main"](*[tvm.runtime.tensor(a) for a in inputs], result)
        return result.numpy()

    return run


def _sq_norms(centroids: np.ndarray) -> np.ndarray:
    return np.square(centroids).sum(-1)


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize(
    "rows,dim,codebooks,k",
    [(128, 384, 96, 16), (7, 36, 9, 8), (33, 20, 5, 16), (5, 27, 3, 8), (3, 16, 16, 16), (17, 24, 3, 256)],
)
def test_encode_linear(rows, dim, codebooks, k):
    rng = _rng("encode", rows, dim, codebooks, k)
    x, centroids = _normal(rng, rows, dim), _normal(rng, codebooks, k, dim // codebooks)
    codes = _kernel(encode_linear(rows, dim, codebooks, k))(x, centroids, _sq_norms(centroids))
    assert codes.dtype == np.uint8 and codes.shape == (rows, codebooks)
    sub = x.reshape(rows, codebooks, -1)
    assert_codes(codes, sub, centroids, encode_linear_ref(x, centroids))


def test_encode_ties_go_to_the_first_centroid():
    rng = _rng("ties")
    rows, codebooks, k, v = 64, 8, 16, 4
    x, centroids = _normal(rng, rows, codebooks * v), _normal(rng, codebooks, k, v)
    centroids[:, 2] *= 0.01  # the nearest to 0 ...
    centroids[:, 9] = centroids[:, 2]  # ... and its duplicate: identical distances
    x[:5] = 0
    x[5:10] = (centroids[:, 2] + 1e-3 * _normal(rng, 5, codebooks, v)).reshape(5, -1)
    codes = _kernel(encode_linear(rows, codebooks * v, codebooks, k))(x, centroids, _sq_norms(centroids))
    assert (codes[:10] == 2).all() and (codes != 9).all()
    assert (codes == encode_linear_ref(x, centroids)).mean() >= MIN_EQUAL_CODES


@pytest.mark.parametrize("name", CONVS)
def test_encode_conv(name):
    geom, k = _geometry(name)
    rng = _rng("encode_conv", name)
    x = _normal(rng, geom.batch, geom.in_channels, geom.height, geom.width)
    centroids = _normal(rng, geom.codebooks, k, geom.subspace_len)
    codes = _kernel(encode_conv(geom, k))(x, centroids, _sq_norms(centroids))
    assert codes.shape == (geom.batch, geom.out_height, geom.out_width, geom.codebooks)
    fields = patches(x, geom)
    sub = fields.reshape(geom.batch, geom.out_height, geom.out_width, geom.codebooks, -1)
    assert_codes(codes, sub, centroids, encode_conv_ref(x, centroids, geom))
    linear = _kernel(encode_linear(geom.rows, fields.shape[1], geom.codebooks, k))
    same = linear(fields, centroids, _sq_norms(centroids))
    np.testing.assert_array_equal(codes.reshape(geom.rows, -1), same)


# ---------------------------------------------------------------- im2col patches


@pytest.mark.parametrize("name", CONVS)
def test_patches_times_weight_is_the_conv(name):
    geom, _ = _geometry(name)
    rng = _rng("patches", name)
    x = _normal(rng, geom.batch, geom.in_channels, geom.height, geom.width)
    w = _normal(rng, geom.out_channels, geom.in_channels, *geom.kernel)
    fields = patches(x, geom)
    assert fields.shape == (geom.rows, geom.in_channels * geom.kernel[0] * geom.kernel[1])
    out = (fields @ w.reshape(geom.out_channels, -1).T).reshape(geom.batch, geom.out_height, geom.out_width, -1)
    top, left, bottom, right = geom.padding
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    expected = torch.nn.functional.conv2d(padded, torch.from_numpy(w), stride=geom.stride, dilation=geom.dilation)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected.numpy(), rtol=1e-4, atol=1e-4)
    rows = rng.choice(geom.rows, size=min(7, geom.rows), replace=False)
    np.testing.assert_array_equal(patches(x, geom, rows), fields[rows])


def test_geometry():
    geom = ConvGeometry.of((2, 8, 9, 7), 12, (3, 3), (2, 1), (1, 0, 1, 2), group=4)
    assert (geom.out_height, geom.out_width) == (5, 7)
    assert (geom.subspace_len, geom.codebooks, geom.rows) == (36, 2, 70)
    with pytest.raises(ValueError, match="group 3 must divide in_channels 8"):
        ConvGeometry.of((1, 8, 9, 9), 4, (3, 3), group=3)
    with pytest.raises(ValueError, match="does not match the conv formula"):
        ConvGeometry(1, 8, 9, 9, 4, 9, 9, (3, 3))
    with pytest.raises(ValueError, match="does not match the geometry"):
        patches(np.zeros((1, 8, 9, 8), "float32"), ConvGeometry.of((1, 8, 9, 9), 4, (3, 3)))


# ---------------------------------------------------------------- lookup-add


def _tables(rng, codebooks: int, k: int, cols: int, dtype: str) -> np.ndarray:
    if dtype == "int8":
        return rng.integers(-128, 128, (codebooks, k, cols)).astype("int8")
    return _normal(rng, codebooks, k, cols)


@pytest.mark.parametrize(
    "rows,codebooks,k,cols,dtype",
    [(128, 96, 16, 384, "int8"), (128, 96, 16, 384, "float32"), (7, 5, 8, 10, "int8"), (33, 13, 16, 19, "float32"),
     (1, 24, 16, 100, "int8"), (61, 3, 8, 1000, "float32"), (5, 7, 16, 17, "int8")],
)
def test_lookup_add_linear(rows, codebooks, k, cols, dtype):
    rng = _rng("lookup", rows, codebooks, k, cols, dtype)
    codes = rng.integers(0, k, (rows, codebooks)).astype("uint8")
    tables = _tables(rng, codebooks, k, cols, dtype)
    scale, bias = rng.random(cols).astype("float32") + 0.5, _normal(rng, cols)
    func = _kernel(lookup_add_linear(rows, codebooks, k, cols, dtype))
    out = func(codes, tables, scale, bias)
    expected = lookup_add_linear_ref(codes, tables, scale, bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    if dtype == "int8":  # unit scale, zero bias: the integer sums themselves, bit-exact
        ones, zeros = np.ones(cols, "float32"), np.zeros(cols, "float32")
        sums = func(codes, tables, ones, zeros)
        np.testing.assert_array_equal(sums, lookup_sums_ref(codes, tables).astype("float32"))


@pytest.mark.parametrize("codebooks", [1, 96, 300])
@pytest.mark.parametrize("fill", [127, -128, "alternating"])
def test_lookup_add_int8_edges_are_exact(codebooks, fill):
    rows, k, cols = 5, 16, 24
    rng = _rng("edges", codebooks, fill)
    if fill == "alternating":  # +127 in even codebooks, -128 in odd ones
        tables = np.where(np.arange(codebooks)[:, None, None] % 2 == 0, 127, -128)
        tables = np.broadcast_to(tables, (codebooks, k, cols)).astype("int8")
    else:
        tables = np.full((codebooks, k, cols), fill, "int8")
    codes = rng.integers(0, k, (rows, codebooks)).astype("uint8")
    ones, zeros = np.ones(cols, "float32"), np.zeros(cols, "float32")
    out = _kernel(lookup_add_linear(rows, codebooks, k, cols, "int8"))(codes, tables, ones, zeros)
    expected = tables.astype(np.int64).sum(0)[0]  # every code hits the same value per codebook
    np.testing.assert_array_equal(out, np.broadcast_to(expected.astype("float32"), (rows, cols)))


@pytest.mark.parametrize("dtype", ["int8", "float32"])
@pytest.mark.parametrize("name", CONVS)
def test_lookup_add_conv(name, dtype):
    geom, k = _geometry(name)
    rng = _rng("lookup_conv", name, dtype)
    codes = rng.integers(0, k, (geom.batch, geom.out_height, geom.out_width, geom.codebooks)).astype("uint8")
    tables = _tables(rng, geom.codebooks, k, geom.out_channels, dtype)
    scale, bias = rng.random(geom.out_channels).astype("float32") + 0.5, _normal(rng, geom.out_channels)
    out = _kernel(lookup_add_conv(geom, k, dtype))(codes, tables, scale, bias)
    assert out.shape == (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
    expected = lookup_add_conv_ref(codes, tables, scale, bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    linear = _kernel(lookup_add_linear(geom.rows, geom.codebooks, k, geom.out_channels, dtype))
    rows = linear(codes.reshape(geom.rows, -1), tables, scale, bias)
    transposed = rows.reshape(geom.batch, geom.out_height, geom.out_width, -1).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(out, transposed)


# ---------------------------------------------------------------- in a Relax module


def _lut_module(x_shape, encode, lookup, out_shape, consts) -> tvm.IRModule:
    """main(x, y) = relu(lookup(encode(x, P, Pn), T, s, b) + y)."""
    centroids, tables, scale, bias = consts
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    y = relax.Var("y", relax.TensorType(out_shape, "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            enc = bb.add_func(encode.without_attr("global_symbol"), "lut_encode")
            look = bb.add_func(lookup.without_attr("global_symbol"), "lut_lookup_add")
            codes_type = relax.TensorType([int(d) for d in encode.params[-1].ty.shape], "uint8")
            args = [x, relax.const(centroids), relax.const(_sq_norms(centroids))]
            codes = bb.emit(relax.call_tir(enc, args, codes_type))
            args = [codes, relax.const(tables), relax.const(scale), relax.const(bias)]
            out = bb.emit(relax.call_tir(look, args, relax.TensorType(out_shape, "float32")))
            out = bb.emit_output(relax.op.nn.relu(bb.emit(relax.op.add(out, y))))
        bb.emit_func_output(out)
    return bb.get()


def _fused(mod: tvm.IRModule) -> tvm.IRModule:
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with TARGET:
        return tvm.transform.Sequential(passes)(mod)


def _loop_kinds(func: tirx.PrimFunc) -> set:
    kinds = set()
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda loop: kinds.add(loop.kind)))
    return kinds


def _linear_case():
    rng = _rng("relax_linear")
    rows, dim, codebooks, k, cols = 128, 64, 16, 16, 40
    consts = (_normal(rng, codebooks, k, dim // codebooks), rng.integers(-128, 128, (codebooks, k, cols)).astype("int8"),
              rng.random(cols).astype("float32"), _normal(rng, cols))
    mod = _lut_module((rows, dim), encode_linear(rows, dim, codebooks, k),
                      lookup_add_linear(rows, codebooks, k, cols, "int8"), (rows, cols), consts)
    x, y = _normal(rng, rows, dim), _normal(rng, rows, cols) * 100
    codes = encode_linear_ref(x, consts[0])
    return mod, x, y, np.maximum(lookup_add_linear_ref(codes, *consts[1:]) + y, 0)


def _conv_case():
    geom, k = ConvGeometry.of((1, 16, 14, 14), 32, (3, 3), padding=(1, 1, 1, 1)), 16
    rng = _rng("relax_conv")
    out_shape = (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
    consts = (_normal(rng, geom.codebooks, k, geom.subspace_len), _normal(rng, geom.codebooks, k, geom.out_channels),
              rng.random(geom.out_channels).astype("float32"), _normal(rng, geom.out_channels))
    mod = _lut_module((geom.batch, geom.in_channels, geom.height, geom.width), encode_conv(geom, k),
                      lookup_add_conv(geom, k, "float32"), out_shape, consts)
    x, y = _normal(rng, geom.batch, geom.in_channels, geom.height, geom.width), _normal(rng, *out_shape)
    codes = encode_conv_ref(x, consts[0], geom)
    return mod, x, y, np.maximum(lookup_add_conv_ref(codes, *consts[1:]) + y, 0)


@pytest.mark.parametrize("case", [_linear_case, _conv_case], ids=["linear", "conv"])
def test_fused_in_relax_module(case):
    mod, x, y, expected = case()
    mod = _fused(mod)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert set(funcs) == {"lut_encode", "fused_lut_lookup_add_add_relu"}
    mod = default_schedule_pass(TARGET)(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert {tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED} <= _loop_kinds(func), gv.name_hint
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.tuning
def test_metaschedule_tunes_lut_kernels(tmp_path):
    mod, x, y, expected = _linear_case()
    mod = _fused(mod)
    report = tune(mod, TARGET, TuneConfig(trials_per_task=4, work_dir=str(tmp_path)), progress=False)
    assert {t.name for t in report.tasks} == {"lut_encode", "fused_lut_lookup_add_add_relu"}
    assert all(t.best_us is not None and t.new_trials >= 1 for t in report.tasks)
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= len(report.tasks) + 2  # the measured defaults and sampled candidates
    tuned = apply_database(mod, TARGET, str(tmp_path))
    assert all(f.attrs.get("tirx.is_scheduled", False) for f in tuned.functions.values() if isinstance(f, tirx.PrimFunc))
    vm = relax.VirtualMachine(tvm.compile(default_schedule_pass(TARGET)(tuned), TARGET), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
