"""Shuffle lookup-add (schedules/lut_lookup_shuffle.py: VPSHUFB across rows) against its NumPy
reference, bit-exact: every legal knob combination on a small shape, a grid of shapes with the
default knobs, uint16-block overflow edges; its assembly (ymm here, zmm cross-compiled for
znver4, never run); the transposed encoder; MetaSchedule tuning (marker `tuning`)."""

import functools
import json
import re
import zlib

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from lut_compiler.config import TuneConfig
from lut_compiler.schedules.default_cpu import default_schedule, default_schedule_pass
from lut_compiler.schedules.lut_encode_linear import encode_linear, encode_linear_ref, schedule_encode
from lut_compiler.schedules.lut_lookup_shuffle import (
    MAX_BLOCK,
    ShuffleKnobs,
    apply_knobs,
    default_knobs,
    find_kernel,
    knob_space,
    lookup_add_shuffle,
    lookup_add_shuffle_ref,
    padded_rows,
    scheduled_knobs,
    shuffle_lanes,
    shuffle_tables,
)
from lut_compiler.target import resolve_target
from lut_compiler.tuning import apply_database, tune

TARGET = resolve_target("host")
LANES = shuffle_lanes(TARGET)
ZNVER4 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2})
needs_avx2 = pytest.mark.skipif(LANES is None, reason="the host has no AVX2: shuffle kernels cannot run here")
# Encoder codes: optimal up to float32 rounding of the distances, nearly all equal the reference
# (as in test_lut_kernels.py).
DISTANCE_RTOL = 1e-5
MIN_EQUAL_CODES = 0.99


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _inputs(rng, rows: int, codebooks: int, cols: int, lanes: int, tables: np.ndarray | None = None):
    """codes_t with random bytes (not only codes < 16) in the pad rows, int8 tables in [-128, 127]."""
    codes_t = rng.integers(0, 256, (codebooks, padded_rows(rows, lanes))).astype("uint8")
    codes_t[:, :rows] = rng.integers(0, 16, (codebooks, rows))
    if tables is None:
        tables = rng.integers(-128, 128, (codebooks, 16, cols)).astype("int8")
    return codes_t, tables


@functools.lru_cache
def _kernel(rows: int, codebooks: int, cols: int, lanes: int) -> tirx.PrimFunc:
    return lookup_add_shuffle(rows, codebooks, cols, lanes)  # parsing TVMScript takes ~0.1 s


def _scheduled(rows: int, codebooks: int, cols: int, lanes: int, knobs: ShuffleKnobs | None) -> tirx.PrimFunc:
    func = _kernel(rows, codebooks, cols, lanes)
    if knobs is None:  # the untuned path: default_cpu.LutKernels
        return default_schedule(func, TARGET).mod["main"]
    sch = s_tir.Schedule(func)
    apply_knobs(sch, knobs)
    return sch.mod["main"]


def _compile(funcs: dict[str, tirx.PrimFunc], target=TARGET):
    """One library for many kernels (one LLVM run)."""
    return tvm.compile(tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()}), target)


def _run(lib, name: str, codes_t, tables, rows: int, lanes: int, scale=None, bias=None) -> np.ndarray:
    cols = tables.shape[-1]
    scale = np.ones(cols, "float32") if scale is None else scale
    bias = np.zeros(cols, "float32") if bias is None else bias
    out = tvm.runtime.empty((rows, cols), "float32")
    args = (codes_t, shuffle_tables(tables, lanes), scale, bias)
    lib[name](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


def _sums(codes_t, tables, rows: int) -> np.ndarray:
    cols = tables.shape[-1]
    return lookup_add_shuffle_ref(codes_t, tables, np.ones(cols, "float32"), np.zeros(cols, "float32"), rows)


# ---------------------------------------------------------------- reference and layouts


def test_reference_matches_the_generic_lookup_add():
    from lut_compiler.schedules.lut_lookup_linear import lookup_add_linear_ref

    rng = _rng("reference")
    rows, codebooks, cols = 37, 11, 9
    codes_t, tables = _inputs(rng, rows, codebooks, cols, 32)
    scale, bias = rng.random(cols).astype("float32"), rng.standard_normal(cols).astype("float32")
    expected = lookup_add_linear_ref(np.ascontiguousarray(codes_t[:, :rows].T), tables, scale, bias)
    np.testing.assert_array_equal(lookup_add_shuffle_ref(codes_t, tables, scale, bias, rows), expected)


@pytest.mark.parametrize("lanes", [32, 64])
def test_shuffle_tables_layout(lanes):
    tables = _rng("layout").integers(-128, 128, (3, 16, 5)).astype("int8")
    laid = shuffle_tables(tables, lanes)
    assert laid.shape == (5, 3, lanes) and laid.dtype == np.uint8
    for lane in range(lanes // 16):  # every 128-bit lane holds T[c, :, n] + 128
        in_lane = laid[:, :, 16 * lane : 16 * (lane + 1)].astype(int) - 128
        np.testing.assert_array_equal(in_lane, tables.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="int8 tables"):
        shuffle_tables(tables.astype("int16"), lanes)


# ---------------------------------------------------------------- knobs


def test_knob_space_filters():
    space = knob_space(rows=100, codebooks=300, cols=48, lanes=32)
    assert space.row_vectors == (1, 2)  # 128 padded rows: 4 vectors
    assert space.col_tiles == {1: (1, 2, 3, 4, 6), 2: (1, 2)}  # divisors of 48 within the registers
    assert all(b <= MAX_BLOCK for b in space.blocks) and 150 in space.blocks  # two equal blocks
    assert knob_space(7, 1, 8, 32).row_vectors == (1,) and knob_space(7, 1, 8, 32).blocks == (1,)
    assert knob_space(64, 8, 8, 64).col_tiles[1] == (1, 2, 4, 8)  # AVX-512: 32 registers
    assert "none" not in knob_space(128, 96, 384, 32).parallels  # 4.7 M lookups: always threads
    assert ShuffleKnobs(2, 4, 150, 1, "cols").check(100, 300, 48, 32) == "col_tile=4 not in [1, 2]"
    assert ShuffleKnobs(1, 4, 300, 1, "cols").check(100, 300, 48, 32).startswith("block=300")
    assert ShuffleKnobs(1, 4, 150, 1, "cols").check(100, 300, 48, 32) is None
    assert default_knobs(100, 300, 48, 32).check(100, 300, 48, 32) is None


def test_illegal_knobs_are_refused():
    sch = s_tir.Schedule(lookup_add_shuffle(32, 4, 8, 32))
    with pytest.raises(ValueError, match="row_vectors=2"):
        apply_knobs(sch, ShuffleKnobs(2, 1, 4, 1, "none"))  # one row vector only


# ---------------------------------------------------------------- numerics on the host


@needs_avx2
def test_every_legal_knob_combination_is_exact():
    """The whole grid `shuffle_design_space` samples from, on one small shape: two row vectors
    (pad rows included), two codebook blocks (64 + a 6-codebook tail) and 8 columns."""
    rows, codebooks, cols = 50, 70, 8
    grid = knob_space(rows, codebooks, cols, LANES).grid()
    assert {k.block for k in grid} == {64, 70} and {k.row_vectors for k in grid} == {1, 2}
    lib = _compile({f"k{i}": _scheduled(rows, codebooks, cols, LANES, k) for i, k in enumerate(grid)})
    codes_t, tables = _inputs(_rng("grid"), rows, codebooks, cols, LANES)
    expected = _sums(codes_t, tables, rows)
    for i, knobs in enumerate(grid):
        np.testing.assert_array_equal(_run(lib, f"k{i}", codes_t, tables, rows, LANES), expected, err_msg=str(knobs))


SHAPES = [  # rows, codebooks, cols: rows not a multiple of 32, 1 codebook, C > 255 (two blocks)
    (32, 16, 48), (128, 96, 384), (100, 300, 8), (7, 1, 8), (7, 300, 48),
    (100, 96, 48), (128, 1, 384), (32, 300, 384), (128, 16, 8),
]


@needs_avx2
def test_default_schedule_is_exact_on_shapes():
    funcs = {}
    for i, (rows, codebooks, cols) in enumerate(SHAPES):
        funcs[f"s{i}"] = func = _scheduled(rows, codebooks, cols, LANES, None)
        assert scheduled_knobs(func) == default_knobs(rows, codebooks, cols, LANES)  # LutKernels applied them
    lib = _compile(funcs)
    for i, (rows, codebooks, cols) in enumerate(SHAPES):
        rng = _rng("shapes", rows, codebooks, cols)
        codes_t, tables = _inputs(rng, rows, codebooks, cols, LANES)
        np.testing.assert_array_equal(_run(lib, f"s{i}", codes_t, tables, rows, LANES), _sums(codes_t, tables, rows))
        scale, bias = rng.random(cols).astype("float32") + 0.5, rng.standard_normal(cols).astype("float32")
        out = _run(lib, f"s{i}", codes_t, tables, rows, LANES, scale, bias)
        expected = lookup_add_shuffle_ref(codes_t, tables, scale, bias, rows)
        # float32(sum) is exact; only the multiply-add may round differently (FMA)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@needs_avx2
@pytest.mark.parametrize("fill", [127, -128, "alternating"])
def test_uint16_blocks_do_not_overflow(fill):
    """Extreme tables over 510 codebooks summed in blocks of 255 (the largest candidate) and
    in one block of 128 plus a tail."""
    rows, codebooks, cols = 40, 510, 8
    if fill == "alternating":  # +127 in even codebooks, -128 in odd ones
        tables = np.where(np.arange(codebooks)[:, None, None] % 2 == 0, 127, -128)
        tables = np.broadcast_to(tables, (codebooks, 16, cols)).astype("int8")
    else:
        tables = np.full((codebooks, 16, cols), fill, "int8")
    assert max(knob_space(rows, codebooks, cols, LANES).blocks) == 255
    knobs = [ShuffleKnobs(1, 4, 255, 2, "cols"), ShuffleKnobs(1, 8 // 2, 128, 4, "none")]
    lib = _compile({f"k{i}": _scheduled(rows, codebooks, cols, LANES, k) for i, k in enumerate(knobs)})
    codes_t, tables = _inputs(_rng("edges", fill), rows, codebooks, cols, LANES, tables)
    expected = np.broadcast_to(tables.astype(np.int64).sum(0)[0].astype("float32"), (rows, cols))
    for i in range(len(knobs)):
        np.testing.assert_array_equal(_run(lib, f"k{i}", codes_t, tables, rows, LANES), expected)


# ---------------------------------------------------------------- assembly and targets


def _asm(target, lanes: int) -> str:
    rows, codebooks, cols = 100, 96, 48
    sch = s_tir.Schedule(lookup_add_shuffle(rows, codebooks, cols, lanes))
    apply_knobs(sch, default_knobs(rows, codebooks, cols, lanes))
    return tvm.compile(sch.mod, target).mod.inspect_source("asm")


@needs_avx2
def test_host_assembly_shuffles_ymm():
    asm = _asm(TARGET, LANES)
    register = "ymm" if LANES == 32 else "zmm"
    assert re.search(rf"vpshufb\s+%{register}\d+, %{register}\d+, %{register}\d+", asm)
    assert re.search(rf"vpaddw\s+%{register}", asm)


def test_znver4_cross_compile_shuffles_zmm():
    assert shuffle_lanes(ZNVER4) == 64
    asm = _asm(ZNVER4, 64)  # compiled only: this machine may lack AVX-512
    assert len(re.findall(r"vpshufb\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)) >= 8
    assert re.search(r"vpaddw\s+%zmm", asm)


def test_lanes_by_target():
    generic = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    avx2 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    assert shuffle_lanes(generic) is None
    assert shuffle_lanes(avx2) == 32
    assert shuffle_lanes(ZNVER4) == 64


# ---------------------------------------------------------------- transposed encoder


def _assert_codes(codes: np.ndarray, sub: np.ndarray, centroids: np.ndarray, reference: np.ndarray) -> None:
    """Every code is the nearest centroid up to float32 rounding, nearly all equal the reference."""
    sub64, p64 = sub.astype("float64"), centroids.astype("float64")
    distances = np.square(sub64[..., None, :] - p64).sum(-1)  # [M, C, K]
    chosen = np.take_along_axis(distances, codes[..., None].astype(np.intp), -1)[..., 0]
    scale = np.square(sub64).sum(-1) + np.square(p64).sum(-1).max(-1)
    assert (chosen - distances.min(-1) <= DISTANCE_RTOL * (1 + scale)).all()
    assert (codes == reference).mean() >= MIN_EQUAL_CODES


@pytest.mark.parametrize(
    "rows,dim,codebooks,k,padded", [(128, 384, 96, 16, 128), (100, 64, 16, 16, 128), (7, 36, 9, 16, 64)]
)
def test_transposed_encode(rows, dim, codebooks, k, padded):
    rng = _rng("encode_t", rows, dim, codebooks)
    x = rng.standard_normal((rows, dim)).astype("float32")
    centroids = rng.standard_normal((codebooks, k, dim // codebooks)).astype("float32")
    func = encode_linear(rows, dim, codebooks, k, transposed_rows=padded)
    assert schedule_encode(s_tir.Schedule(func), 8, 1 << 16)  # the default rule handles the variant
    lib = _compile({"main": default_schedule(func, TARGET).mod["main"]})
    codes_t = tvm.runtime.empty((codebooks, padded), "uint8")
    norms = np.square(centroids).sum(-1)
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, centroids, norms)], codes_t)
    codes_t = codes_t.numpy()
    reference = encode_linear_ref(x, centroids, transposed_rows=padded)
    assert reference.shape == (codebooks, padded) and not reference[:, rows:].any()
    assert not codes_t[:, rows:].any()  # zero pad rows
    _assert_codes(codes_t[:, :rows].T, x.reshape(rows, codebooks, -1), centroids, reference[:, :rows].T)
    np.testing.assert_array_equal(reference[:, :rows].T, encode_linear_ref(x, centroids))


def test_transposed_encode_rejects_too_few_rows():
    with pytest.raises(ValueError, match="transposed_rows 4 < rows 7"):
        encode_linear(7, 36, 9, 16, transposed_rows=4)


# ---------------------------------------------------------------- in a Relax module, tuned


def _shuffle_module(rows: int, dim: int, codebooks: int, cols: int, rng):
    """main(x) = lookup_add_shuffle(encode_linear_t(x)) with unit scale and zero bias (so the
    outputs are the integer sums, exactly)."""
    padded = padded_rows(rows, LANES)
    centroids = rng.standard_normal((codebooks, 16, dim // codebooks)).astype("float32")
    tables = rng.integers(-128, 128, (codebooks, 16, cols)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, dim), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            encode = encode_linear(rows, dim, codebooks, 16, padded).without_attr("global_symbol")
            lookup = lookup_add_shuffle(rows, codebooks, cols, LANES).without_attr("global_symbol")
            enc, look = bb.add_func(encode, "lut_encode_t"), bb.add_func(lookup, "lut_shuffle")
            args = [x, relax.const(centroids), relax.const(np.square(centroids).sum(-1))]
            codes_t = bb.emit(relax.call_tir(enc, args, relax.TensorType((codebooks, padded), "uint8")))
            consts = [shuffle_tables(tables, LANES), np.ones(cols, "float32"), np.zeros(cols, "float32")]
            out_type = relax.TensorType((rows, cols), "float32")
            out = bb.emit_output(relax.call_tir(look, [codes_t, *map(relax.const, consts)], out_type))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with TARGET:
        mod = tvm.transform.Sequential(passes)(bb.get())
    return mod, centroids, tables


def _run_module(mod, x) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(default_schedule_pass(TARGET)(mod), TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@needs_avx2
def test_untuned_module_is_exact():
    rng = _rng("module")
    rows, dim, codebooks, cols = 70, 64, 16, 24
    mod, centroids, tables = _shuffle_module(rows, dim, codebooks, cols, rng)
    x = rng.standard_normal((rows, dim)).astype("float32")
    codes_t = encode_linear_ref(x, centroids, padded_rows(rows, LANES))
    np.testing.assert_array_equal(_run_module(mod, x), _sums(codes_t, tables, rows))


@needs_avx2
@pytest.mark.tuning
def test_metaschedule_samples_the_knobs(tmp_path):
    rng = _rng("tune")
    rows, dim, codebooks, cols = 100, 128, 32, 48
    mod, centroids, tables = _shuffle_module(rows, dim, codebooks, cols, rng)
    report = tune(mod, TARGET, TuneConfig(trials_per_task=6, work_dir=str(tmp_path)), progress=False)
    assert {t.name for t in report.tasks} == {"lut_encode_t", "lut_shuffle"}
    assert all(t.best_us is not None for t in report.tasks)

    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    records = [r for r in database.get_all_tuning_records() if find_kernel(s_tir.Schedule(r.workload.mod))]
    sampled = [r for r in records if any(i.kind.name.startswith("Sample") for i in r.trace.decisions)]
    assert len(records) >= 2 and sampled  # the measured default and sampled candidates
    space = knob_space(rows, codebooks, cols, LANES)
    for record in sampled:
        kinds = {inst.kind.name: decision for inst, decision in record.trace.decisions.items()}
        assert {"SamplePerfectTile", "SampleCategorical"} <= set(kinds)
        sch = s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        knobs = scheduled_knobs(sch.mod["main"])
        assert knobs.check(rows, codebooks, cols, LANES) is None and knobs in space.grid()
        assert knobs.col_tile == int(kinds["SamplePerfectTile"][-1])
    with open(tmp_path / "database_tuning_record.json") as f:
        assert any("SampleCategorical" in json.dumps(json.loads(line)) for line in f)

    tuned = apply_database(mod, TARGET, str(tmp_path))
    assert scheduled_knobs(tuned["lut_shuffle"]) is not None
    x = rng.standard_normal((rows, dim)).astype("float32")
    codes_t = encode_linear_ref(x, centroids, padded_rows(rows, LANES))
    np.testing.assert_array_equal(_run_module(tuned, x), _sums(codes_t, tables, rows))
