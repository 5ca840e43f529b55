"""The row-vectorized encoders (schedules/lut_encode_rows.py, lut_encode_conv_rows.py):
codes against the NumPy reference for every legal knob combination, ties, pad rows, the
default schedule, the MetaSchedule design space, and an AVX-512 cross-compile."""

import itertools
import zlib

import numpy as np
import pytest
import tvm
from tvm import s_tir, tirx

from lut_cases import CONVS, assert_codes, compile_funcs
from lut_compiler.schedules.conv_patches import ConvGeometry, patches
from lut_compiler.schedules.default_cpu import default_schedule
from lut_compiler.schedules.lut_encode_conv_rows import apply_knobs as conv_apply_knobs
from lut_compiler.schedules.lut_encode_conv_rows import (
    encode_conv_design_space,
    encode_conv_rows,
    encode_conv_rows_ref,
    image_rows,
)
from lut_compiler.schedules.lut_encode_rows import (
    EncodeKnobs,
    apply_knobs,
    default_knobs,
    encode_design_space,
    encode_rows,
    encode_rows_ref,
    find_kernel,
    knob_space,
    scheduled_knobs,
)
from lut_compiler.schedules.lut_lookup_shuffle import pack_codes, packed_codebooks, unpack_codes
from lut_compiler.target import resolve_target

TARGET = resolve_target("host")
LANES = 8  # float32 per AVX2 vector; AVX-512 is cross-compiled only
ZNVER4 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2})


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _inputs(rows: int, dim: int, codebooks: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng("encode_rows", rows, dim, codebooks, k)
    x = rng.standard_normal((rows, dim)).astype("float32")
    return x, rng.standard_normal((codebooks, k, dim // codebooks)).astype("float32")


def _scheduled(rows, dim, codebooks, k, padded, knobs: EncodeKnobs | None, shuffle_lanes=32) -> tirx.PrimFunc:
    func = encode_rows(rows, dim, codebooks, k, shuffle_lanes)
    if knobs is None:
        return default_schedule(func, TARGET).mod["main"]
    sch = s_tir.Schedule(func)
    apply_knobs(sch, knobs)
    return sch.mod["main"]


def _compile(funcs: dict[str, tirx.PrimFunc]):
    return compile_funcs(funcs, TARGET)


def _encode(lib, name: str, x: np.ndarray, centroids: np.ndarray, padded: int) -> np.ndarray:
    """The encoder's packed codes, unpacked: uint8 [C, padded]."""
    codes_p = tvm.runtime.empty((packed_codebooks(len(centroids)), padded), "uint8")
    norms = np.square(centroids).sum(-1)
    lib[name](*[tvm.runtime.tensor(a) for a in (x, centroids, norms)], codes_p)
    return _unpack(codes_p.numpy(), len(centroids))


def _unpack(codes_p: np.ndarray, codebooks: int) -> np.ndarray:
    """Unpacked codes, checking the packing: a lone last codebook leaves its high nibble 0."""
    codes_t = unpack_codes(codes_p, codebooks)
    np.testing.assert_array_equal(pack_codes(codes_t), codes_p)
    return codes_t


def _check(codes_t: np.ndarray, x: np.ndarray, centroids: np.ndarray) -> None:
    rows, (codebooks, padded) = len(x), codes_t.shape
    reference = encode_rows_ref(x, centroids, padded)
    assert not codes_t[:, rows:].any()  # pad rows are 0
    assert_codes(codes_t[:, :rows].T, x.reshape(rows, codebooks, -1), centroids, reference[:, :rows].T)


def test_every_legal_knob_combination():
    """The whole grid the design space samples: rows not a multiple of a vector (pad rows),
    row tiles of 1 and 2 vectors, every centroid block, serial and parallel."""
    rows, dim, codebooks, k, padded = 50, 48, 12, 16, 64
    tiles, blocks = knob_space(padded, dim // codebooks, k, LANES)
    assert tiles == (1, 2) and blocks == (2, 4, 8, 16)  # V = 4: 4 vectors of rows would spill
    grid = [EncodeKnobs(r, b, p) for r, b, p in itertools.product(tiles, blocks, (True, False))]
    lib = _compile({f"k{i}": _scheduled(rows, dim, codebooks, k, padded, knobs) for i, knobs in enumerate(grid)})
    x, centroids = _inputs(rows, dim, codebooks, k)
    for i in range(len(grid)):
        _check(_encode(lib, f"k{i}", x, centroids, padded), x, centroids)


SHAPES = [  # rows, dim, codebooks, K, padded rows
    (128, 384, 96, 16, 128), (100, 64, 16, 16, 128), (7, 36, 9, 16, 32), (33, 20, 5, 8, 64), (64, 27, 3, 4, 64),
    (32, 1536, 384, 16, 32), (40, 16, 16, 16, 64),
]


def test_default_schedule_on_shapes():
    funcs = {}
    for i, (rows, dim, codebooks, k, padded) in enumerate(SHAPES):
        funcs[f"s{i}"] = func = _scheduled(rows, dim, codebooks, k, padded, None)
        assert scheduled_knobs(func) == default_knobs(rows, padded, dim, dim // codebooks, k, LANES)
    lib = _compile(funcs)
    for i, (rows, dim, codebooks, k, padded) in enumerate(SHAPES):
        x, centroids = _inputs(rows, dim, codebooks, k)
        _check(_encode(lib, f"s{i}", x, centroids, padded), x, centroids)


def test_ties_go_to_the_first_centroid():
    rows, codebooks, k, v = 64, 8, 16, 4
    x, centroids = _inputs(rows, codebooks * v, codebooks, k)
    centroids[:, 2] *= 0.01  # the nearest to 0 ...
    centroids[:, 9] = centroids[:, 2]  # ... and its duplicate: identical distances
    x[:5] = 0
    x[5:10] = (centroids[:, 2] + 1e-3 * _rng("ties").standard_normal((5, codebooks, v))).reshape(5, -1)
    lib = _compile({"main": _scheduled(rows, codebooks * v, codebooks, k, rows, EncodeKnobs(2, 16, False))})
    codes_t = _encode(lib, "main", x, centroids, rows)
    assert (codes_t[:, :10] == 2).all() and (codes_t != 9).all()


def test_illegal_knobs_and_shapes_are_refused():
    sch = s_tir.Schedule(encode_rows(50, 48, 12, 16, 32))
    with pytest.raises(ValueError, match="row_vectors=4 not in"):
        apply_knobs(sch, EncodeKnobs(4, 4, True))
    with pytest.raises(ValueError, match="k_block=3 not in"):
        apply_knobs(sch, EncodeKnobs(1, 3, True))
    with pytest.raises(ValueError, match="shuffle_lanes must be 32 or 64"):
        encode_rows(50, 48, 12, 16, 16)
    with pytest.raises(ValueError, match="do not divide"):
        encode_rows(50, 48, 10, 16, 32)


def test_design_space_samples_legal_knobs():
    """One space per (row tile, parallel), the centroid block sampled; all exact."""
    rows, dim, codebooks, k, padded = 50, 48, 12, 16, 64
    func = encode_rows(rows, dim, codebooks, k, 32)
    sampled = {}
    for seed in range(1, 9):
        sch = s_tir.Schedule(func, seed=seed)
        kernel = find_kernel(sch)
        for space in encode_design_space(sch, kernel.nearest):
            sampled[scheduled_knobs(space.mod["main"])] = space.mod["main"]
    tiles, blocks = knob_space(padded, dim // codebooks, k, LANES)
    assert {(s.row_vectors, s.parallel) for s in sampled} == set(itertools.product(tiles, (True, False)))
    assert {s.k_block for s in sampled} <= set(blocks) and len({s.k_block for s in sampled}) > 1
    names = {f"k{i}": f for i, f in enumerate(sampled.values())}
    lib = _compile(names)
    x, centroids = _inputs(rows, dim, codebooks, k)
    for name in names:
        _check(_encode(lib, name, x, centroids, padded), x, centroids)


def test_znver4_cross_compile_uses_zmm():
    """16 floats per vector on AVX-512: fused multiply-adds on zmm registers (compiled only)."""
    func = _scheduled(64, 64, 16, 16, 64, None, shuffle_lanes=64)
    asm = tvm.tirx.build(tvm.IRModule({"main": func}), target=ZNVER4).inspect_source("asm")
    assert "vfmadd" in asm and "zmm" in asm


# ---------------------------------------------------------------- conv


def _conv_inputs(name: str):
    shape, out, kernel, stride, padding, dilation, group, k = CONVS[name]
    geom = ConvGeometry.of(shape, out, kernel, stride, padding, dilation, group)
    rng = _rng("encode_conv_rows", name)
    x = rng.standard_normal(shape).astype("float32")
    return geom, k, x, rng.standard_normal((geom.codebooks, k, geom.subspace_len)).astype("float32")


def _check_conv(codes_t: np.ndarray, x: np.ndarray, centroids: np.ndarray, geom: ConvGeometry) -> None:
    hwp, pixels = image_rows(geom, 32), geom.out_height * geom.out_width
    assert codes_t.shape == (geom.codebooks, geom.batch * hwp)
    per_image = codes_t.reshape(geom.codebooks, geom.batch, hwp)
    assert not per_image[:, :, pixels:].any()  # pad pixels are 0
    codes = per_image[:, :, :pixels].transpose(1, 2, 0).reshape(-1, geom.codebooks)  # [B*OH*OW, C]
    sub = patches(x, geom).reshape(len(codes), geom.codebooks, -1)
    reference = encode_conv_rows_ref(x, centroids, geom, 32).reshape(geom.codebooks, geom.batch, hwp)
    assert_codes(codes, sub, centroids, reference[:, :, :pixels].transpose(1, 2, 0).reshape(-1, geom.codebooks))


@pytest.mark.parametrize("name", CONVS)
def test_conv_every_legal_knob_combination(name):
    """Padding, stride, dilation, asymmetric and non-square kernels, groups, batch 2, pad
    pixels: every (row tile, centroid block, parallel) the design space can pick."""
    geom, k, x, centroids = _conv_inputs(name)
    func = encode_conv_rows(geom, k, 32)
    tiles, blocks = knob_space(geom.batch * image_rows(geom, 32), geom.subspace_len, k, LANES)
    grid = [EncodeKnobs(r, b, p) for r, b, p in itertools.product(tiles, blocks, (True, False))]
    funcs = {}
    for i, knobs in enumerate(grid):
        sch = s_tir.Schedule(func)
        conv_apply_knobs(sch, knobs)
        funcs[f"k{i}"] = sch.mod["main"]
    funcs["default"] = default_schedule(func, TARGET).mod["main"]
    assert scheduled_knobs(funcs["default"]) is not None  # LutKernels scheduled it
    lib = _compile(funcs)
    for name in funcs:
        codes_p = tvm.runtime.empty((packed_codebooks(geom.codebooks), geom.batch * image_rows(geom, 32)), "uint8")
        lib[name](*[tvm.runtime.tensor(a) for a in (x, centroids, np.square(centroids).sum(-1))], codes_p)
        _check_conv(_unpack(codes_p.numpy(), geom.codebooks), x, centroids, geom)


def test_conv_design_space_and_znver4():
    geom, k, x, centroids = _conv_inputs("3x3_pad1")
    func = encode_conv_rows(geom, k, 32)
    sampled = set()
    for seed in range(1, 9):
        sch = s_tir.Schedule(func, seed=seed)
        for space in encode_conv_design_space(sch, sch.get_sblock("nearest")):
            sampled.add(scheduled_knobs(space.mod["main"]))
    tiles, blocks = knob_space(geom.batch * image_rows(geom, 32), geom.subspace_len, k, LANES)
    assert {(s.row_vectors, s.parallel) for s in sampled} == set(itertools.product(tiles, (True, False)))
    assert {s.k_block for s in sampled} <= set(blocks)
    wide = default_schedule(encode_conv_rows(geom, k, 64), ZNVER4).mod["main"]  # 16 floats per vector
    asm = tvm.tirx.build(tvm.IRModule({"main": wide}), target=ZNVER4).inspect_source("asm")
    assert "vfmadd" in asm and "zmm" in asm
