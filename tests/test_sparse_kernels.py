"""Block-sparse weights (lut_compiler/sparse_format.py) and the sparse matmul kernel
(schedules/sparse_matmul.py) against its NumPy reference: every block shape, both forms, empty
and full block rows, an all-zero weight, sizes that are not multiples of a vector; every legal
knob combination on a small shape; the pattern baked into the PrimFunc (structural hash);
the MetaSchedule design space and tuning (marker `tuning`)."""

import functools
import zlib

import numpy as np
import pytest
import tvm
import tvm_ffi
from lut_cases import compile_funcs
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms

from lut_compiler.config import TuneConfig
from lut_compiler.schedules.default_cpu import default_schedule, default_schedule_pass
from lut_compiler.schedules.sparse_matmul import (
    SparseKnobs,
    apply_knobs,
    default_knobs,
    encode_table,
    find_kernel,
    kernel_data,
    knob_space,
    scheduled_knobs,
    sparse_matmul,
    sparse_matmul_ref,
    table_width,
)
from lut_compiler.sparse_format import BLOCKS, detect_block, prune_magnitude, to_block_sparse, worth_sparse
from lut_compiler.target import resolve_target
from lut_compiler.tuning import apply_database, load_cpu_tensor_intrinsics, tune

TARGET = resolve_target("host")


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _weight(rng, n: int, k: int, block, density: float, empty_rows=(), full_rows=()) -> np.ndarray:
    """W^T [N, K] with random (bn, bk) blocks kept at `density`; block rows `empty_rows` all
    zero, `full_rows` all stored."""
    bn, bk = block
    mask = rng.random((n // bn, k // bk)) < density
    mask[list(empty_rows)] = False
    mask[list(full_rows)] = True
    dense = rng.standard_normal((n, k)).astype("float32")
    return dense * np.kron(mask, np.ones(block)).astype("float32")


# ---------------------------------------------------------------- format


@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip(block):
    rng = _rng("round trip", block)
    w_t = _weight(rng, 32, 16, block, 0.3, empty_rows=[0], full_rows=[1])
    sparse = to_block_sparse(w_t, block)
    np.testing.assert_array_equal(sparse.dense(), w_t)
    bn, bk = block
    assert sparse.data.shape == (sparse.nnzb, bn, bk) and sparse.indptr.shape == (32 // bn + 1,)
    assert sparse.indptr[1] == 0 and sparse.indptr[2] == 16 // bk  # empty row 0, full row 1
    assert sparse.density == sparse.block_mask().mean()
    zero = to_block_sparse(np.zeros((32, 16), "float32"), block)
    assert zero.nnzb == 0 and zero.density == 0 and not zero.dense().any()


def test_detect_block():
    rng = _rng("detect")
    for block in BLOCKS:
        w_t = _weight(rng, 64, 32, block, 0.4)
        assert detect_block(w_t) == block
    assert detect_block(np.zeros((48, 8))) == (16, 1)  # an all-zero matrix fits any block
    w_t = _weight(rng, 64, 32, (16, 1), 0.4)
    w_t[3, 5] = w_t[4, 5] = 0.0  # zeros inside a stored block do not change the structure
    w_t[:, 5] = np.where(w_t[:, 5] != 0, w_t[:, 5], 0.0)
    assert detect_block(w_t) == (16, 1)
    w_t = _weight(rng, 24, 32, (8, 1), 0.4)  # 24 rows: (16, 1) does not divide them
    assert detect_block(w_t) == (8, 1)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.9, 1.0])
def test_prune_magnitude_exact_sparsity(block, sparsity):
    rng = _rng("prune", block, sparsity)
    w_t = rng.standard_normal((48, 32)).astype("float32") + 0.1
    pruned = prune_magnitude(w_t, sparsity, block)
    sparse = to_block_sparse(pruned, block)
    blocks = 48 // block[0] * (32 // block[1])
    assert blocks - sparse.nnzb == round(sparsity * blocks)
    kept = sparse.block_mask()
    tiles = np.linalg.norm(w_t.reshape(48 // block[0], block[0], -1, block[1]), axis=(1, 3))
    if 0 < sparse.nnzb < blocks:  # every dropped block is no larger than every kept one
        assert tiles[~kept].max() <= tiles[kept].min()
    np.testing.assert_array_equal(pruned[pruned != 0], w_t[pruned != 0])


def test_worth_sparse_and_errors():
    rng = _rng("threshold")
    assert worth_sparse(_weight(rng, 32, 32, (16, 1), 0.1), (16, 1))
    assert not worth_sparse(_weight(rng, 32, 32, (16, 1), 0.9), (16, 1))
    with pytest.raises(ValueError, match="does not divide"):
        to_block_sparse(np.ones((10, 8)), (4, 1))
    with pytest.raises(ValueError, match="sparsity"):
        prune_magnitude(np.ones((8, 8)), 1.5, (1, 1))


def test_encode_table_round_trip():
    values = np.array([0, 1, 127, 128, 16383, 12345])
    width = table_width(values.max())
    assert width == 2 and table_width(0) == 1 and table_width(1 << 14) == 3
    raw = np.frombuffer(encode_table(values, width).encode("ascii"), np.uint8).reshape(-1, width).astype(int)
    np.testing.assert_array_equal((raw << (7 * np.arange(width))).sum(1), values)
    with pytest.raises(ValueError, match="out of range"):
        encode_table([1 << 14], 2)


# ---------------------------------------------------------------- kernels


@functools.lru_cache
def _sparse(n: int, k: int, block, density: float, seed: str, empty=(), full=()):
    w_t = _weight(_rng(seed, n, k, block, density), n, k, block, density, empty, full)
    return to_block_sparse(w_t, block)


def _run(lib, name: str, w, x: np.ndarray, bias: np.ndarray, images) -> np.ndarray:
    n = w.shape[0]
    rows = x.shape[0] if images is None else x.shape[2]
    y = tvm.runtime.empty((rows, n) if images is None else (images, n, rows), "float32")
    lib[name](*[tvm.runtime.tensor(a) for a in (x, kernel_data(w), bias)], y)
    return y.numpy()


def _inputs(rng, w, rows: int, images):
    k = w.shape[1]
    x = rng.standard_normal((rows, k) if images is None else (images, k, rows)).astype("float32")
    return x, rng.standard_normal(w.shape[0]).astype("float32")


def _check(out, w, x, bias, images, msg=""):
    np.testing.assert_allclose(out, sparse_matmul_ref(w, x, bias, images), rtol=1e-4, atol=1e-4, err_msg=msg)


# (N, K, rows, images, density, empty block rows, full block rows)
CASES = [
    (64, 48, 32, None, 0.2, (0,), (1,)),
    (48, 40, 20, None, 0.3, (), ()),  # M = 20: not a multiple of 8
    (32, 64, 49, 2, 0.1, (1,), (0,)),  # 7x7 pixels, two images
    (16, 32, 9, 1, 0.5, (), ()),  # 3x3 pixels: less than a vector
    (32, 16, 16, None, 0.0, (), ()),  # all-zero weight
    (16, 16, 28, 1, 1.0, (), ()),  # fully dense
]


@pytest.mark.parametrize("block", BLOCKS)
def test_default_schedule_matches_reference(block):
    funcs, weights = {}, {}
    for i, (n, k, rows, images, density, empty, full) in enumerate(CASES):
        w = weights[i] = _sparse(n, k, block, density, "cases", empty, full)
        funcs[f"c{i}"] = func = default_schedule(sparse_matmul(w, rows, images), TARGET).mod["main"]
        knobs = scheduled_knobs(func)  # LutKernels applied the default knobs
        kernel = find_kernel(s_tir.Schedule(sparse_matmul(w, rows, images)))
        assert knobs == default_knobs(*kernel.shape)
    lib = compile_funcs(funcs, TARGET)
    for i, (n, k, rows, images, *_) in enumerate(CASES):
        x, bias = _inputs(_rng("x", i, block), weights[i], rows, images)
        _check(_run(lib, f"c{i}", weights[i], x, bias, images), weights[i], x, bias, images, f"case {i}")


@pytest.mark.parametrize("images", [None, 2], ids=["linear", "nchw"])
def test_every_legal_knob_combination(images):
    n, k, rows, block = 16, 24, 8, (4, 1)
    w = _sparse(n, k, block, 0.4, "grid", (0,), (1,))
    kernel = find_kernel(s_tir.Schedule(sparse_matmul(w, rows, images)))
    grid = knob_space(*kernel.shape).grid()
    assert {g.n_tile for g in grid} == {1, 2, 4} and {g.p_tile for g in grid} == {4, 8}
    assert {g.parallel for g in grid} == {"rows", "tiles", "none"} and len(grid) == 54
    funcs = {}
    for i, knobs in enumerate(grid):
        sch = s_tir.Schedule(sparse_matmul(w, rows, images))
        apply_knobs(sch, knobs)
        funcs[f"k{i}"] = sch.mod["main"]
    lib = compile_funcs(funcs, TARGET)
    x, bias = _inputs(_rng("grid x"), w, rows, images)
    for i, knobs in enumerate(grid):
        _check(_run(lib, f"k{i}", w, x, bias, images), w, x, bias, images, str(knobs))


def test_illegal_knobs_are_refused():
    w = _sparse(16, 16, (4, 1), 0.5, "illegal")
    sch = s_tir.Schedule(sparse_matmul(w, 16, None))
    with pytest.raises(ValueError, match="n_tile=3"):
        apply_knobs(sch, SparseKnobs(3, 8, 1, "rows"))
    with pytest.raises(ValueError, match="p_tile=5"):
        apply_knobs(sch, SparseKnobs(4, 5, 1, "rows"))


def test_pattern_is_in_the_workload_hash():
    """Same shape and block count, another pattern: another workload (tuning record); the
    same pattern: the same workload. The pattern is no argument: only x, data, bias, y."""
    rng = _rng("hash")
    w_t = _weight(rng, 32, 32, (16, 1), 0.3)
    a = to_block_sparse(w_t, (16, 1))
    b = to_block_sparse(w_t[:, ::-1].copy(), (16, 1))  # columns mirrored: same counts
    assert a.nnzb == b.nnzb and not np.array_equal(a.indices, b.indices)
    fa, fa2, fb = (sparse_matmul(w, 64, None) for w in (a, to_block_sparse(w_t.copy(), (16, 1)), b))
    assert tvm_ffi.structural_hash(fa) == tvm_ffi.structural_hash(fa2)
    assert tvm_ffi.structural_hash(fa) != tvm_ffi.structural_hash(fb)
    assert [p.name for p in fa.params] == ["x", "data", "bias", "y"]
    other_values = to_block_sparse(w_t * 2, (16, 1))  # values are a runtime argument
    assert tvm_ffi.structural_hash(sparse_matmul(other_values, 64, None)) == tvm_ffi.structural_hash(fa)
    assert tvm_ffi.structural_equal(tvm.ir.load_json(tvm.ir.save_json(fb)), fb)  # the database's JSON


def test_design_space_samples_legal_knobs():
    w = _sparse(32, 32, (16, 1), 0.3, "space")
    rows = 32
    func = sparse_matmul(w, rows, None)
    space = knob_space(*find_kernel(s_tir.Schedule(func)).shape)
    load_cpu_tensor_intrinsics(TARGET)  # else TuneContext imports every intrinsic: 20-95 s
    context = ms.TuneContext(tvm.IRModule({"main": func}), target=TARGET, space_generator="post-order-apply",
                             rand_state=0)
    spaces = context.generate_design_space()
    assert len(spaces) == len(space.n_tiles) * len(space.parallels)
    knobs = [scheduled_knobs(sch.mod["main"]) for sch in spaces]
    assert set(knobs) <= set(space.grid())
    lib = compile_funcs({f"s{i}": sch.mod["main"] for i, sch in enumerate(spaces)}, TARGET)
    x, bias = _inputs(_rng("space x"), w, rows, None)
    for i, k in enumerate(knobs):
        _check(_run(lib, f"s{i}", w, x, bias, None), w, x, bias, None, str(k))


# ---------------------------------------------------------------- in a Relax module, tuned


def _module(w, rows: int, bias: np.ndarray):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, w.shape[1]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            kernel = bb.add_func(sparse_matmul(w, rows).without_attr("global_symbol"), "sparse_matmul")
            args = [x, relax.const(kernel_data(w)), relax.const(bias)]
            out = bb.emit_output(relax.call_tir(kernel, args, relax.TensorType((rows, w.shape[0]), "float32")))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with TARGET:
        return tvm.transform.Sequential(passes)(bb.get())


@pytest.mark.tuning
def test_metaschedule_tunes_the_real_pattern(tmp_path):
    rng = _rng("tune")
    w = _sparse(64, 64, (16, 1), 0.2, "tune", (1,), (2,))
    rows = 32
    bias = rng.standard_normal(64).astype("float32")
    mod = _module(w, rows, bias)
    report = tune(mod, TARGET, TuneConfig(trials_per_task=6, work_dir=str(tmp_path)), progress=False)
    assert [t.name for t in report.tasks] == ["sparse_matmul"] and report.tasks[0].best_us is not None
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    records = [r for r in database.get_all_tuning_records() if find_kernel(s_tir.Schedule(r.workload.mod))]
    sampled = [r for r in records if any(i.kind.name == "SampleCategorical" for i in r.trace.decisions)]
    assert len(records) >= 2 and sampled  # the measured default and sampled candidates
    tuned = apply_database(mod, TARGET, str(tmp_path))
    assert scheduled_knobs(tuned["sparse_matmul"]) is not None
    x = rng.standard_normal((rows, 64)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(default_schedule_pass(TARGET)(tuned), TARGET), tvm.cpu())
    _check(vm["main"](tvm.runtime.tensor(x)).numpy(), w, x, bias, None)
