"""Dense int8 matmul (schedules/int8_matmul.py) against its NumPy reference: the integer sums
bit-exact (unit scale, zero bias: the output is float32 of the exact int32 sum) and the
float epilogue within 1e-6 of a float64 reference, for every ISA this host can run (VNNI,
AVX-512BW, AVX2, the generic loop), several shapes (K not a multiple of 4 or of the K block,
N not a multiple of the column tile, M = 1, the conv form); every knob combination on a
small shape; saturation edges at the largest K; the quantizers; the assembly (VPMADDUBSW
for znver3, VPDPBUSD for znver4, compiled only); the design space and MetaSchedule tuning
(marker `tuning`)."""

import functools
import re
import zlib

import numpy as np
import pytest
import tvm
from lut_cases import compile_funcs
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms

from lut_compiler.config import TuneConfig
from lut_compiler.schedules.default_cpu import default_schedule, default_schedule_pass
from lut_compiler.schedules.int8_matmul import (
    ISAS,
    LANES,
    Int8Knobs,
    apply_knobs,
    column_sums,
    default_knobs,
    find_kernel,
    int8_isa,
    int8_matmul,
    int8_matmul_ref,
    int8_sums_ref,
    isa_weight_bits,
    knob_space,
    pack_weights,
    padded_k,
    padded_rows,
    quantize_nchw,
    quantize_ref,
    quantize_rows,
    scheduled_knobs,
    weight_bits,
    weight_range,
)
from lut_compiler.target import resolve_target
from lut_compiler.tuning import apply_database, load_cpu_tensor_intrinsics, tune

TARGET = resolve_target("host")
HOST_ISA = int8_isa(TARGET)
# ISAS runs from the richest to none: the host runs its own and every one after it.
RUNNABLE = ISAS[ISAS.index(HOST_ISA):]


def _cpu(mcpu: str):
    return resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": 2})


ZNVER3, ZNVER4 = _cpu("znver3"), _cpu("znver4")
# The float epilogue (float32 convert, multiply, add) against float64: a few float32 roundings.
RTOL = 1e-6


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _weights(rng, n: int, k: int, isa: str) -> np.ndarray:
    lo, hi = weight_range(isa_weight_bits(isa))
    return rng.integers(lo, hi + 1, (n, k)).astype(np.int8)


@functools.lru_cache
def _kernel(rows: int, k: int, n: int, isa: str, images: int | None = None):
    return int8_matmul(rows, k, n, isa, images)


def _scheduled(rows, k, n, isa, images=None, knobs: Int8Knobs | None = None):
    func = _kernel(rows, k, n, isa, images)
    if knobs is None:  # the untuned path: default_cpu.LutKernels
        return default_schedule(func, TARGET).mod["main"]
    sch = s_tir.Schedule(func)
    apply_knobs(sch, knobs)
    return sch.mod["main"]


def _run(lib, name, xq, wq, isa, scale, bias, images=None) -> np.ndarray:
    n = wq.shape[0]
    shape = (xq.shape[0], n) if images is None else (images, n, xq.shape[0] // images)
    y = tvm.runtime.empty(shape, "float32")
    args = (xq, pack_weights(wq, isa), column_sums(wq), scale, bias)
    lib[name](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _nchw(a: np.ndarray, images: int | None) -> np.ndarray:
    """[B * P, N] -> [B, N, P] (conv form), else unchanged."""
    return a if images is None else a.reshape(images, -1, a.shape[1]).transpose(0, 2, 1)


def _check(lib, name, xq, wq, isa, images=None, rng=None, msg=""):
    """Unit scale and zero bias: equal to float32 of the exact sums; random scale and bias:
    within RTOL of the float64 epilogue, relative to the size of its terms."""
    n = wq.shape[0]
    out = _run(lib, name, xq, wq, isa, np.ones(n, np.float32), np.zeros(n, np.float32), images)
    np.testing.assert_array_equal(out, _nchw(int8_sums_ref(xq, wq).astype(np.float32), images), err_msg=f"sums {msg}")
    rng = rng or _rng("epilogue", msg)
    scale = (rng.random(n) * 1e-3 + 1e-5).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ref = int8_matmul_ref(xq, wq, scale, bias, images)
    size = np.abs(xq.astype(np.int64) - 128) @ np.abs(wq.astype(np.int64)).T * scale.astype(np.float64) + np.abs(bias)
    out = _run(lib, name, xq, wq, isa, scale, bias, images)
    error = np.abs(out - ref)
    assert (error <= RTOL * _nchw(size, images)).all(), f"epilogue {msg}: max error {error.max()}"


# ---------------------------------------------------------------- layout, ranges, ISA


def test_isa_and_weight_bits_by_target():
    generic = _cpu("x86-64")
    skylake = _cpu("skylake-avx512")
    assert [int8_isa(t) for t in (ZNVER4, skylake, ZNVER3, generic)] == ["vnni", "avx512bw", "avx2", "generic"]
    assert [weight_bits(t) for t in (ZNVER4, skylake, ZNVER3, generic)] == [8, 7, 7, 8]
    assert weight_range(7) == (-64, 63) and weight_range(8) == (-128, 127)
    # the bound of the module docstring: no VPMADDUBSW pair saturates with 7-bit weights
    lo, hi = weight_range(7)
    assert 255 * hi * 2 <= 32767 and 255 * lo * 2 >= -32768 and 255 * 127 * 2 > 32767


@pytest.mark.parametrize("isa", ISAS)
def test_pack_weights_layout(isa):
    rng = _rng("pack", isa)
    n, k = 21, 37
    wq = _weights(rng, n, k, isa)
    packed = pack_weights(wq, isa)
    lanes = LANES[isa]
    assert packed.shape == (-(-n // lanes), padded_k(k) // 4, lanes, 4) and packed.dtype == np.int8
    dense = packed.transpose(0, 2, 1, 3).reshape(packed.shape[0] * lanes, -1)  # [N_pad, K_pad]
    np.testing.assert_array_equal(dense[:n, :k], wq)
    assert not dense[n:].any() and not dense[:, k:].any()
    np.testing.assert_array_equal(column_sums(wq), wq.astype(np.int64).sum(1))


def test_padded_rows():
    assert [padded_rows(m) for m in range(1, 9)] == list(range(1, 9))  # no padding of tiny M
    assert [padded_rows(m) for m in (37, 49, 98, 127, 128, 11)] == [40, 49, 98, 128, 128, 12]
    assert knob_space(37, 64, 32, "avx2").row_tiles == (1, 2, 4, 5, 8, 10)


def test_pack_weights_refuses_saturating_weights():
    wq = np.full((8, 8), 64, np.int8)
    for isa in ("avx2", "avx512bw"):
        with pytest.raises(ValueError, match="exact range"):
            pack_weights(wq, isa)
        pack_weights(wq - 1, isa)
    pack_weights(np.full((8, 8), -128, np.int8), "vnni")
    with pytest.raises(ValueError, match="int8 weights"):
        pack_weights(wq.astype(np.int16), "vnni")


def test_quantizers_match_reference():
    rows, k, images, pixels = 9, 70, 2, 10
    inv_scale = np.float32(1 / 0.037)
    rng = _rng("quantize")
    x = (rng.standard_normal((rows, k)) * 3).astype(np.float32)
    x[0, :8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000, -1000, 0], np.float32) / inv_scale  # ties, clipping
    xc = (rng.standard_normal((images, k, pixels)) * 3).astype(np.float32)
    funcs = {"rows": default_schedule(quantize_rows(rows, k), TARGET).mod["main"],
             "nchw": default_schedule(quantize_nchw(images, k, pixels), TARGET).mod["main"]}
    lib = compile_funcs(funcs, TARGET)
    scale = tvm.runtime.tensor(np.array([inv_scale], np.float32))
    out = tvm.runtime.empty((rows, k), "uint8")
    lib["rows"](tvm.runtime.tensor(x), scale, out)
    expected = quantize_ref(x, inv_scale)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert list(expected[0, :8]) == [128, 130, 130, 128, 126, 255, 0, 128]  # half to even, clipped
    out = tvm.runtime.empty((images * pixels, k), "uint8")
    lib["nchw"](tvm.runtime.tensor(xc), scale, out)
    np.testing.assert_array_equal(out.numpy(), quantize_ref(xc.transpose(0, 2, 1), inv_scale).reshape(-1, k))


# ---------------------------------------------------------------- kernels, default schedule

# (rows, K, N, images): K not a multiple of 4 or 16 (padded), N not a multiple of 8 or 16,
# M = 1, a K with several blocks, M = 37 (padded to 40 rows), conv forms (3x3 pixels, two
# images of 7x7)
SHAPES = [(1, 40, 24, None), (7, 33, 13, None), (16, 384, 40, None), (32, 1030, 48, None), (37, 100, 100, None),
          (9, 24, 20, 1), (49, 66, 16, 2)]


@pytest.mark.parametrize("isa", RUNNABLE)
def test_default_schedule_matches_reference(isa):
    funcs = {}
    for i, (rows, k, n, images) in enumerate(SHAPES):
        funcs[f"s{i}"] = func = _scheduled(rows, k, n, isa, images)
        assert scheduled_knobs(func) == default_knobs(rows, k, n, isa, images)  # LutKernels applied them
    lib = compile_funcs(funcs, TARGET)
    for i, (rows, k, n, images) in enumerate(SHAPES):
        rng = _rng("shapes", isa, i)
        xq = rng.integers(0, 256, (rows * (images or 1), k)).astype(np.uint8)
        _check(lib, f"s{i}", xq, _weights(rng, n, k, isa), isa, images, rng, f"{isa} {SHAPES[i]}")


def _grid_shape(isa: str) -> tuple[int, int, int]:
    """Small, yet every knob has two or more values: 4 rows, two K blocks, two column vectors."""
    return 4, 256, 2 * LANES[isa]


@pytest.mark.parametrize("isa", [i for i in ("vnni", "avx2") if i in RUNNABLE])
def test_every_legal_knob_combination(isa):
    rows, k, n = _grid_shape(isa)
    space = knob_space(rows, k, n, isa)
    grid = space.grid()
    assert space.row_tiles == (1, 2, 4) and space.k_blocks["cols"] == (256, 128) and len(space.parallels) == 3
    assert {g.col_tile for g in grid} == {LANES[isa], 2 * LANES[isa]} and len(grid) == 6 * 5 * 3
    lib = compile_funcs({f"k{i}": _scheduled(rows, k, n, isa, knobs=g) for i, g in enumerate(grid)}, TARGET)
    rng = _rng("grid", isa)
    xq = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    wq = _weights(rng, n, k, isa)
    for i, knobs in enumerate(grid):
        _check(lib, f"k{i}", xq, wq, isa, msg=str(knobs))


def test_illegal_knobs_are_refused():
    sch = s_tir.Schedule(_kernel(8, 64, 32, "avx2"))
    with pytest.raises(ValueError, match="col_tile=12"):
        apply_knobs(sch, Int8Knobs(4, 12, 64, 1, "cols"))
    with pytest.raises(ValueError, match="col_tile=32"):  # 4 x 4 accumulators + 4 weights: spills
        apply_knobs(sch, Int8Knobs(4, 32, 64, 1, "cols"))
    with pytest.raises(ValueError, match="row_tile=3"):
        apply_knobs(sch, Int8Knobs(3, 8, 64, 1, "cols"))
    assert Int8Knobs(4, 8, 64, 1, "rows_cols").check(8, 1024, 32, "avx2") == "k_block=64 not in [1024]"


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("sign", ["max", "min"])
def test_saturation_edges_at_the_largest_k(isa, sign):
    """All Xq = 255 against all weights at the top or bottom of the ISA's range (the largest
    int16 pairs VPMADDUBSW sees), and Xq = 0 (the largest negative offsets), K = 2048."""
    rows, k, n = 4, 2048, 2 * LANES[isa]
    lo, hi = weight_range(isa_weight_bits(isa))
    wq = np.full((n, k), hi if sign == "max" else lo, np.int8)
    lib = compile_funcs({"d": _scheduled(rows, k, n, isa),
                         "b": _scheduled(rows, k, n, isa, knobs=Int8Knobs(2, n, 512, 4, "none"))}, TARGET)
    for fill in (255, 0):
        xq = np.full((rows, k), fill, np.uint8)
        expected = np.float32((fill - 128) * int(wq[0, 0]) * k)
        for name in ("d", "b"):
            out = _run(lib, name, xq, wq, isa, np.ones(n, np.float32), np.zeros(n, np.float32))
            assert (out == expected).all(), (name, fill, out[0, 0], expected)


# ---------------------------------------------------------------- assembly


def _asm(isa: str, target) -> str:
    rows, k, n = 16, 128, 64
    return tvm.compile(tvm.IRModule({"main": _scheduled(rows, k, n, isa, knobs=default_knobs(rows, k, n, isa))}),
                       target).mod.inspect_source("asm")


def test_assembly_by_isa():
    """Compiled only: not every host has AVX-512 or VNNI."""
    avx2 = _asm("avx2", ZNVER3)
    assert re.search(r"vpmaddubsw\s+%ymm\d+, %ymm\d+, %ymm\d+", avx2)
    assert re.search(r"vpmaddwd\s+[^\n]*%ymm", avx2) and "zmm" not in avx2
    vnni = _asm("vnni", ZNVER4)
    assert len(re.findall(r"vpdpbusd\s+[^\n]*%zmm", vnni)) >= 16 and "vpmaddubsw" not in vnni
    avx512bw = _asm("avx512bw", _cpu("skylake-avx512"))
    assert re.search(r"vpmaddubsw\s+%zmm\d+, %zmm\d+, %zmm\d+", avx512bw) and "vpdpbusd" not in avx512bw


# ---------------------------------------------------------------- MetaSchedule


def test_design_space_samples_legal_knobs():
    isa = HOST_ISA if HOST_ISA != "generic" else "avx2"
    rows, k, n = 8, 256, 2 * LANES[isa]
    func = _kernel(rows, k, n, isa)
    space = knob_space(rows, k, n, isa)
    load_cpu_tensor_intrinsics(TARGET)  # else TuneContext imports every intrinsic: 20-95 s
    context = ms.TuneContext(tvm.IRModule({"main": func}), target=TARGET, space_generator="post-order-apply",
                             rand_state=0)
    spaces = context.generate_design_space()
    assert len(spaces) == len(space.row_tiles) * len(space.parallels)
    knobs = [scheduled_knobs(sch.mod["main"]) for sch in spaces]
    assert set(knobs) <= set(space.grid()) and len({k.row_tile for k in knobs}) == len(space.row_tiles)
    if isa not in RUNNABLE:
        return
    lib = compile_funcs({f"s{i}": sch.mod["main"] for i, sch in enumerate(spaces)}, TARGET)
    rng = _rng("space")
    xq = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    wq = _weights(rng, n, k, isa)
    for i, kn in enumerate(knobs):
        _check(lib, f"s{i}", xq, wq, isa, msg=str(kn))


def _module(rows: int, k: int, wq: np.ndarray, scale: np.ndarray, bias: np.ndarray, isa: str):
    """main(xq) = the int8 matmul with its constants, legalized and fused as the pipeline does."""
    n = wq.shape[0]
    bb = relax.BlockBuilder()
    x = relax.Var("xq", relax.TensorType((rows, k), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            kernel = bb.add_func(int8_matmul(rows, k, n, isa).without_attr("global_symbol"), "int8_matmul")
            consts = [pack_weights(wq, isa), column_sums(wq), scale, bias]
            out = bb.emit_output(relax.call_tir(kernel, [x, *map(relax.const, consts)],
                                                relax.TensorType((rows, n), "float32")))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with TARGET:
        return tvm.transform.Sequential(passes)(bb.get())


def test_untuned_module_with_quantizer_and_fused_epilogue():
    """relu(int8_matmul(quantize_rows(x)) + r) as the pipeline builds it: whatever FuseOps
    puts around the kernel, the untuned build is scheduled and matches the reference."""
    isa = HOST_ISA
    rows, k, n = 24, 96, 40
    rng = _rng("module")
    wq = _weights(rng, n, k, isa)
    scale = (rng.random(n) * 1e-3 + 1e-5).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    inv_scale = np.float32(1 / 0.02)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, k), "float32"))
    r = relax.Var("r", relax.TensorType((rows, n), "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            quantize = bb.add_func(quantize_rows(rows, k).without_attr("global_symbol"), "quantize_rows")
            xq = bb.emit(relax.call_tir(quantize, [x, relax.const(np.array([inv_scale]))],
                                        relax.TensorType((rows, k), "uint8")))
            kernel = bb.add_func(int8_matmul(rows, k, n, isa).without_attr("global_symbol"), "int8_matmul")
            consts = [pack_weights(wq, isa), column_sums(wq), scale, bias]
            y = bb.emit(relax.call_tir(kernel, [xq, *map(relax.const, consts)], relax.TensorType((rows, n), "float32")))
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(y, r)))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(), default_schedule_pass(TARGET)]
    with TARGET:
        mod = tvm.transform.Sequential(passes)(bb.get())
    kernels = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and scheduled_knobs(f)]
    assert len(kernels) == 1
    xs = (rng.standard_normal((rows, k)) * 1.5).astype(np.float32)
    rs = rng.standard_normal((rows, n)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(rs)).numpy()
    xq_ref = quantize_ref(xs, inv_scale)
    expected = np.maximum(int8_matmul_ref(xq_ref, wq, scale, bias) + rs, 0)
    size = np.abs(xq_ref.astype(np.int64) - 128) @ np.abs(wq.astype(np.int64)).T * scale + np.abs(bias) + np.abs(rs)
    assert (np.abs(got - expected) <= RTOL * size).all()


@pytest.mark.tuning
def test_metaschedule_tunes_the_kernel(tmp_path):
    isa = HOST_ISA
    rows, k, n = 32, 256, 64
    rng = _rng("tune")
    wq = _weights(rng, n, k, isa)
    scale, bias = np.ones(n, np.float32), np.zeros(n, np.float32)
    mod = _module(rows, k, wq, scale, bias, isa)
    report = tune(mod, TARGET, TuneConfig(trials_per_task=4, work_dir=str(tmp_path)), progress=False)
    assert [t.name for t in report.tasks] == ["int8_matmul"] and report.tasks[0].best_us is not None
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    records = [r for r in database.get_all_tuning_records() if find_kernel(s_tir.Schedule(r.workload.mod))]
    sampled = [r for r in records if any(i.kind.name == "SampleCategorical" for i in r.trace.decisions)]
    assert len(records) >= 2 and sampled  # the measured default and sampled candidates
    space = knob_space(rows, k, n, isa)
    for record in sampled:
        sch = s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        assert scheduled_knobs(sch.mod["main"]) in space.grid()
    tuned = apply_database(mod, TARGET, str(tmp_path))
    assert scheduled_knobs(tuned["int8_matmul"]) is not None
    xq = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    vm = relax.VirtualMachine(tvm.compile(default_schedule_pass(TARGET)(tuned), TARGET), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(xq)).numpy()
    np.testing.assert_array_equal(out, int8_sums_ref(xq, wq).astype(np.float32))
