"""Shuffle lookup-add (schedules/lut_lookup_shuffle.py: VPSHUFB across rows) against its NumPy
reference, bit-exact: every legal knob combination on a small shape, a grid of shapes with the
default knobs, uint16-block overflow edges; its assembly (ymm here, zmm cross-compiled for
znver4, never run); the conv form (NCHW output, each image padded to whole vectors): every legal
knob combination on four shapes, default knobs, pad columns, vector stores in its epilogue, its
MetaSchedule design space; the transposed encoder; MetaSchedule tuning (marker `tuning`)."""

import functools
import itertools
import json
import re
import zlib

import numpy as np
import pytest
import tvm
from lut_cases import compile_funcs
from tvm import relax, s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from lut_compiler.config import TuneConfig
from lut_compiler.schedules.default_cpu import default_schedule, default_schedule_pass
from lut_compiler.schedules.lut_encode_rows import encode_rows, encode_rows_ref
from lut_compiler.schedules.lut_lookup_shuffle import (
    MAX_BLOCK,
    ShuffleKnobs,
    apply_knobs,
    default_knobs,
    find_kernel,
    knob_space,
    lookup_add_shuffle,
    lookup_add_shuffle_ref,
    pack_codes,
    packed_codebooks,
    padded_rows,
    scheduled_knobs,
    shuffle_lanes,
    shuffle_tables,
)
from lut_compiler.target import resolve_target
from lut_compiler.tuning import apply_database, load_cpu_tensor_intrinsics, tune

TARGET = resolve_target("host")
LANES = shuffle_lanes(TARGET)
ZNVER4 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2})
needs_avx2 = pytest.mark.skipif(LANES is None, reason="the host has no AVX2: shuffle kernels cannot run here")
# Encoder codes: optimal up to float32 rounding of the distances, nearly all equal the reference
# (as in test_lut_kernels.py).


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _inputs(rng, rows: int, codebooks: int, cols: int, lanes: int, tables: np.ndarray | None = None,
            images: int | None = None):
    """codes_t with random bytes (not only codes < 16) in the pad rows (conv form: in each
    image's pad columns), int8 tables in [-128, 127]."""
    codes_t = rng.integers(0, 256, (codebooks, images or 1, padded_rows(rows, lanes))).astype("uint8")
    codes_t[:, :, :rows] = rng.integers(0, 16, (codebooks, images or 1, rows))
    codes_t = codes_t.reshape(codebooks, -1)
    if tables is None:
        tables = rng.integers(-128, 128, (codebooks, 16, cols)).astype("int8")
    return codes_t, tables


@functools.lru_cache
def _kernel(rows: int, codebooks: int, cols: int, lanes: int, images: int | None = None) -> tirx.PrimFunc:
    return lookup_add_shuffle(rows, codebooks, cols, lanes, images)  # parsing TVMScript takes ~0.1 s


def _scheduled(
    rows: int, codebooks: int, cols: int, lanes: int, knobs: ShuffleKnobs | None, images: int | None = None
) -> tirx.PrimFunc:
    func = _kernel(rows, codebooks, cols, lanes, images)
    if knobs is None:  # the untuned path: default_cpu.LutKernels
        return default_schedule(func, TARGET).mod["main"]
    sch = s_tir.Schedule(func)
    apply_knobs(sch, knobs)
    return sch.mod["main"]


def _compile(funcs: dict[str, tirx.PrimFunc], target=TARGET):
    return compile_funcs(funcs, target)


def _run(lib, name: str, codes_t, tables, rows: int, lanes: int, scale=None, bias=None, images=None,
         packed: bool = False) -> np.ndarray:
    """The kernel on codes_t (unpacked uint8 [C, R]; `packed`: already [C2, R])."""
    cols = tables.shape[-1]
    scale = np.ones(cols, "float32") if scale is None else scale
    bias = np.zeros(cols, "float32") if bias is None else bias
    out = tvm.runtime.empty((rows, cols) if images is None else (images, cols, rows), "float32")
    args = (codes_t if packed else pack_codes(codes_t), shuffle_tables(tables, lanes), scale, bias)
    lib[name](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


def _sums(codes_t, tables, rows: int, images: int | None = None) -> np.ndarray:
    cols = tables.shape[-1]
    return lookup_add_shuffle_ref(codes_t, tables, np.ones(cols, "float32"), np.zeros(cols, "float32"), rows, images)


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
    rows, codebooks, cols = LANES + LANES // 2 + 2, 70, 8  # 50 (AVX2) or 98 (AVX-512) rows: two row vectors
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
@pytest.mark.parametrize("images", [None, 2], ids=["linear", "conv"])
@pytest.mark.parametrize("fill", [127, -128, "alternating"])
def test_uint16_blocks_do_not_overflow(fill, images):
    """Extreme tables over 510 codebooks summed in blocks of 255 (the largest candidate) and
    in one block of 128 plus a tail; linear form and conv form (40 pixels per image)."""
    rows, codebooks, cols = 40, 510, 8
    if fill == "alternating":  # +127 in even codebooks, -128 in odd ones
        tables = np.where(np.arange(codebooks)[:, None, None] % 2 == 0, 127, -128)
        tables = np.broadcast_to(tables, (codebooks, 16, cols)).astype("int8")
    else:
        tables = np.full((codebooks, 16, cols), fill, "int8")
    assert max(knob_space(rows, codebooks, cols, LANES, images).blocks) == 255
    knobs = [ShuffleKnobs(1, 4, 255, 2, "cols"), ShuffleKnobs(1, 8 // 2, 128, 4, "none")]
    lib = _compile({f"k{i}": _scheduled(rows, codebooks, cols, LANES, k, images) for i, k in enumerate(knobs)})
    codes_t, tables = _inputs(_rng("edges", fill, images), rows, codebooks, cols, LANES, tables, images)
    sums = tables.astype(np.int64).sum(0)[0].astype("float32")  # [N]: equal in every row
    shape = (rows, cols) if images is None else (images, cols, rows)
    expected = np.broadcast_to(sums if images is None else sums[:, None], shape)
    for i in range(len(knobs)):
        np.testing.assert_array_equal(_run(lib, f"k{i}", codes_t, tables, rows, LANES, images=images), expected)


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


# ---------------------------------------------------------------- conv form: NCHW output

# pixels per image, codebooks, cols, images. 7x7 and 14x14 pixels end in a partial vector; with
# 14 x 2 the 14 row vectors (7 per image) make row tiles of 2 that span two images.
CONV_GRID_SHAPES = [(49, 9, 8, 2), (196, 64, 64, 2), (49, 64, 64, 1), (196, 9, 8, 1)]
# also whole vectors only (8x8), less than one vector (3x3), two codebook blocks, 28x28
CONV_SHAPES = [*CONV_GRID_SHAPES, (64, 16, 48, 3), (9, 300, 8, 2), (784, 64, 64, 1), (196, 128, 128, 1), (1, 1, 8, 1)]


def test_conv_reference_is_the_linear_reference_per_image():
    rng = _rng("conv reference")
    rows, codebooks, cols, images = 49, 9, 8, 3
    codes_t, tables = _inputs(rng, rows, codebooks, cols, 32, images=images)
    scale, bias = rng.random(cols).astype("float32"), rng.standard_normal(cols).astype("float32")
    out = lookup_add_shuffle_ref(codes_t, tables, scale, bias, rows, images)
    assert out.shape == (images, cols, rows) and out.flags.c_contiguous
    padded = padded_rows(rows, 32)
    for b in range(images):
        image = codes_t[:, b * padded : (b + 1) * padded]
        np.testing.assert_array_equal(out[b], lookup_add_shuffle_ref(image, tables, scale, bias, rows).T)


def test_conv_kernel_shapes():
    func = lookup_add_shuffle(49, 9, 8, 32, images=2)
    shapes = [[int(d) for d in p.ty.shape] for p in func.params]
    assert shapes == [[5, 2 * 64], [8, 9, 32], [8], [8], [2, 8, 49]]  # 9 codes packed in 5 bytes; images padded to 64 columns
    kernel = find_kernel(s_tir.Schedule(func))
    assert kernel.shape == (49, 9, 8, 32, 2)
    assert find_kernel(s_tir.Schedule(lookup_add_shuffle(49, 9, 8, 32))).shape == (49, 9, 8, 32, None)
    for images in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="images must be"):
            lookup_add_shuffle(49, 9, 8, 32, images=images)


def test_conv_knob_space_filters():
    one, two = knob_space(196, 64, 64, 32, images=1), knob_space(196, 64, 64, 32, images=2)
    assert one.row_vectors == (1,)  # 196 pixels: 7 vectors of 32
    assert two.row_vectors == (1, 2)  # 14 vectors: tiles of 2 divide all images' vectors
    assert knob_space(49, 9, 8, 64, images=2).row_vectors == (1, 2)  # AVX-512: one vector per image
    assert one.col_tiles == {1: (1, 2, 4)} and two.blocks == (64,)
    assert "none" in one.parallels and "none" not in two.parallels  # 0.8 M and 1.6 M lookups
    assert ShuffleKnobs(2, 2, 64, 1, "cols").check(196, 64, 64, 32, images=1) == "row_vectors=2 not in [1]"
    assert ShuffleKnobs(2, 2, 64, 1, "cols").check(196, 64, 64, 32, images=2) is None
    # the images count towards the lookups that decide on threads
    assert default_knobs(49, 64, 8, 32, images=1).parallel == "none"
    assert default_knobs(49, 64, 8, 32, images=16).parallel != "none"
    for shape in CONV_SHAPES:
        assert default_knobs(*shape[:3], 32, shape[3]).check(*shape[:3], 32, shape[3]) is None


def test_conv_illegal_knobs_are_refused():
    sch = s_tir.Schedule(lookup_add_shuffle(196, 4, 8, 32, images=1))
    with pytest.raises(ValueError, match="row_vectors=2"):
        apply_knobs(sch, ShuffleKnobs(2, 1, 4, 1, "none"))  # 7 row vectors


@needs_avx2
@pytest.mark.parametrize("rows,codebooks,cols,images", CONV_GRID_SHAPES)
def test_conv_every_legal_knob_combination_is_exact(rows, codebooks, cols, images):
    """The whole grid `shuffle_design_space` samples from, random bytes in every pad column."""
    grid = knob_space(rows, codebooks, cols, LANES, images).grid()
    lib = _compile({f"k{i}": _scheduled(rows, codebooks, cols, LANES, k, images) for i, k in enumerate(grid)})
    codes_t, tables = _inputs(_rng("conv grid", rows, codebooks, cols, images), rows, codebooks, cols, LANES,
                              images=images)
    expected = _sums(codes_t, tables, rows, images)
    for i, knobs in enumerate(grid):
        out = _run(lib, f"k{i}", codes_t, tables, rows, LANES, images=images)
        np.testing.assert_array_equal(out, expected, err_msg=str(knobs))


@needs_avx2
def test_conv_default_schedule_is_exact_on_shapes():
    funcs = {}
    for i, (rows, codebooks, cols, images) in enumerate(CONV_SHAPES):
        funcs[f"s{i}"] = func = _scheduled(rows, codebooks, cols, LANES, None, images)
        assert scheduled_knobs(func) == default_knobs(rows, codebooks, cols, LANES, images)  # LutKernels applied them
    lib = _compile(funcs)
    for i, (rows, codebooks, cols, images) in enumerate(CONV_SHAPES):
        rng = _rng("conv shapes", rows, codebooks, cols, images)
        codes_t, tables = _inputs(rng, rows, codebooks, cols, LANES, images=images)
        np.testing.assert_array_equal(_run(lib, f"s{i}", codes_t, tables, rows, LANES, images=images),
                                      _sums(codes_t, tables, rows, images))
        scale, bias = rng.random(cols).astype("float32") + 0.5, rng.standard_normal(cols).astype("float32")
        out = _run(lib, f"s{i}", codes_t, tables, rows, LANES, scale, bias, images)
        expected = lookup_add_shuffle_ref(codes_t, tables, scale, bias, rows, images)
        # float32(sum) is exact; only the multiply-add may round differently (FMA)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@needs_avx2
def test_conv_pad_columns_do_not_matter():
    """Any byte in an image's pad columns (0, 0xFF, bit 7 set, random) gives the same output."""
    rows, codebooks, cols, images = 49, 64, 8, 2
    knobs = [default_knobs(rows, codebooks, cols, LANES, images), ShuffleKnobs(2, 2, 64, 4, "rows_cols")]
    lib = _compile({f"k{i}": _scheduled(rows, codebooks, cols, LANES, k, images) for i, k in enumerate(knobs)})
    rng = _rng("conv pads")
    codes_t, tables = _inputs(rng, rows, codebooks, cols, LANES, images=images)
    expected = _sums(codes_t, tables, rows, images)
    packed = pack_codes(codes_t)
    pads = np.ones(packed.shape, bool).reshape(len(packed), images, -1)
    pads[:, :, :rows] = False
    pads = pads.reshape(packed.shape)
    for fill in (0, 0xFF, 0x8F, rng.integers(0, 256, int(pads.sum()))):
        filled = packed.copy()
        filled[pads] = fill
        for i in range(len(knobs)):
            out = _run(lib, f"k{i}", filled, tables, rows, LANES, images=images, packed=True)
            np.testing.assert_array_equal(out, expected)


def _conv_asm(target, lanes: int) -> str:
    rows, codebooks, cols, images = 196, 64, 64, 2
    sch = s_tir.Schedule(lookup_add_shuffle(rows, codebooks, cols, lanes, images))
    apply_knobs(sch, default_knobs(rows, codebooks, cols, lanes, images))
    return tvm.compile(sch.mod, target).mod.inspect_source("asm")


def _assert_vector_epilogue(asm: str, register: str, lanes: int, col_tile: int) -> None:
    """Every column of a tile converts, multiply-adds and stores its whole row vectors as full
    registers (14 x 14 pixels: a partial vector of 4 per image besides); no scalar conversion."""
    per_register = {"ymm": 8, "zmm": 16}[register]
    whole = col_tile * lanes // per_register
    assert len(re.findall(rf"vcvtdq2ps\s+%{register}\d+, %{register}", asm)) >= whole
    assert len(re.findall(rf"vfmadd\w+ps\s+[^\n]*%{register}", asm)) >= whole
    assert len(re.findall(rf"vmov[au]ps\s+%{register}\d+, -?\d*\(", asm)) >= whole  # stores to memory
    assert not re.search(r"vcvtsi2ss", asm)


@needs_avx2
def test_conv_host_assembly_stores_vectors():
    asm = _conv_asm(TARGET, LANES)
    register = "ymm" if LANES == 32 else "zmm"
    assert re.search(rf"vpshufb\s+%{register}\d+, %{register}\d+, %{register}\d+", asm)
    _assert_vector_epilogue(asm, register, LANES, default_knobs(196, 64, 64, LANES, 2).col_tile)


def test_conv_znver4_cross_compile_uses_zmm():
    asm = _conv_asm(ZNVER4, 64)  # compiled only: this machine may lack AVX-512
    assert len(re.findall(r"vpshufb\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)) >= 8
    _assert_vector_epilogue(asm, "zmm", 64, default_knobs(196, 64, 64, 64, 2).col_tile)


@needs_avx2
def test_conv_design_space_samples_legal_knobs():
    """MetaSchedule's post-order-apply space generator calls the custom rule for the conv form
    too: one space per (row tile, parallel loop), sampled knobs legal, and exact."""
    rows, codebooks, cols, images = 196, 64, 64, 2
    mod = tvm.IRModule({"main": _kernel(rows, codebooks, cols, LANES, images)})
    space = knob_space(rows, codebooks, cols, LANES, images)
    sampled = {}
    load_cpu_tensor_intrinsics(TARGET)  # else TuneContext imports every intrinsic: 20-95 s
    for seed in range(3):
        context = ms.TuneContext(mod, target=TARGET, space_generator="post-order-apply", rand_state=seed)
        spaces = context.generate_design_space()
        assert len(spaces) == len(space.row_vectors) * len(space.parallels)
        for sch in spaces:
            sampled[scheduled_knobs(sch.mod["main"])] = sch.mod["main"]
    assert set(sampled) <= set(space.grid())
    assert {(k.row_vectors, k.parallel) for k in sampled} == set(itertools.product(space.row_vectors, space.parallels))
    knobs = list(sampled)
    lib = _compile({f"k{i}": sampled[k] for i, k in enumerate(knobs)})
    codes_t, tables = _inputs(_rng("conv space"), rows, codebooks, cols, LANES, images=images)
    expected = _sums(codes_t, tables, rows, images)
    for i, k in enumerate(knobs):
        out = _run(lib, f"k{i}", codes_t, tables, rows, LANES, images=images)
        np.testing.assert_array_equal(out, expected, err_msg=str(k))


# ---------------------------------------------------------------- in a Relax module, tuned


def _shuffle_module(rows: int, dim: int, codebooks: int, cols: int, rng):
    """main(x) = lookup_add_shuffle(encode_rows(x)) with unit scale and zero bias (so the
    outputs are the integer sums, exactly)."""
    padded = padded_rows(rows, LANES)
    centroids = rng.standard_normal((codebooks, 16, dim // codebooks)).astype("float32")
    tables = rng.integers(-128, 128, (codebooks, 16, cols)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, dim), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            encode = encode_rows(rows, dim, codebooks, 16, LANES).without_attr("global_symbol")
            lookup = lookup_add_shuffle(rows, codebooks, cols, LANES).without_attr("global_symbol")
            enc, look = bb.add_func(encode, "lut_encode_t"), bb.add_func(lookup, "lut_shuffle")
            args = [x, relax.const(centroids), relax.const(np.square(centroids).sum(-1))]
            codes_t = bb.emit(relax.call_tir(enc, args, relax.TensorType((packed_codebooks(codebooks), padded), "uint8")))
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
    codes_t = encode_rows_ref(x, centroids, padded_rows(rows, LANES))
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
    codes_t = encode_rows_ref(x, centroids, padded_rows(rows, LANES))
    np.testing.assert_array_equal(_run_module(tuned, x), _sums(codes_t, tables, rows))


def _conv_lookup_module(rows: int, codebooks: int, cols: int, images: int, tables: np.ndarray):
    """main(codes_p) = the conv-form lookup-add [B, N, rows] with unit scale and zero bias."""
    codes = relax.Var("codes_p", relax.TensorType((packed_codebooks(codebooks), images * padded_rows(rows, LANES)), "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [codes]):
        with bb.dataflow():
            lookup = lookup_add_shuffle(rows, codebooks, cols, LANES, images).without_attr("global_symbol")
            look = bb.add_func(lookup, "lut_shuffle_conv")
            consts = [shuffle_tables(tables, LANES), np.ones(cols, "float32"), np.zeros(cols, "float32")]
            out_type = relax.TensorType((images, cols, rows), "float32")
            out = bb.emit_output(relax.call_tir(look, [codes, *map(relax.const, consts)], out_type))
        bb.emit_func_output(out)
    return bb.get()


@needs_avx2
@pytest.mark.tuning
def test_metaschedule_samples_the_conv_knobs(tmp_path):
    rng = _rng("tune conv")
    rows, codebooks, cols, images = 196, 32, 48, 2
    codes_t, tables = _inputs(rng, rows, codebooks, cols, LANES, images=images)
    mod = _conv_lookup_module(rows, codebooks, cols, images, tables)
    report = tune(mod, TARGET, TuneConfig(trials_per_task=6, work_dir=str(tmp_path)), progress=False)
    assert [t.name for t in report.tasks] == ["lut_shuffle_conv"] and report.tasks[0].best_us is not None

    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    records = [r for r in database.get_all_tuning_records() if find_kernel(s_tir.Schedule(r.workload.mod))]
    sampled = [r for r in records if any(i.kind.name.startswith("Sample") for i in r.trace.decisions)]
    assert len(records) >= 2 and sampled  # the measured default and sampled candidates
    space = knob_space(rows, codebooks, cols, LANES, images)
    for record in sampled:
        sch = s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        assert scheduled_knobs(sch.mod["main"]) in space.grid()

    tuned = apply_database(mod, TARGET, str(tmp_path))
    assert scheduled_knobs(tuned["lut_shuffle_conv"]) is not None
    np.testing.assert_array_equal(_run_module(tuned, pack_codes(codes_t)), _sums(codes_t, tables, rows, images))
