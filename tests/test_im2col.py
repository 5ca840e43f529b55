"""im2col (schedules/im2col.py) against its NumPy reference over padding, stride, dilation,
non-square and batched geometries, with the default CPU schedule; and im2col followed by the
NCHW sparse matmul equal to a direct NumPy convolution (what the sparse conv rewrite relies on)."""

import numpy as np
import pytest
import tvm
from tvm import s_tir

from lut_compiler.schedules.conv_patches import ConvGeometry
from lut_compiler.schedules.default_cpu import default_schedule
from lut_compiler.schedules.im2col import OUT_WIDTH_ANNOTATION, im2col, im2col_ref, schedule_im2col
from lut_compiler.schedules.sparse_matmul import kernel_data, sparse_matmul
from lut_compiler.sparse_format import prune_magnitude, to_block_sparse
from lut_compiler.target import resolve_target

TARGET = resolve_target("host")

# (input NCHW, out channels, kernel, stride, padding (top, left, bottom, right), dilation)
GEOMETRIES = {
    "3x3 pad 1": ((1, 8, 12, 12), 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "stride 2": ((1, 8, 13, 13), 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "dilation 2": ((1, 4, 11, 11), 16, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    "asymmetric pads": ((1, 4, 9, 10), 16, (3, 3), (1, 1), (0, 1, 2, 0), (1, 1)),
    "non-square": ((1, 4, 7, 40), 16, (3, 5), (1, 2), (1, 2, 1, 2), (1, 1)),
    "batch 2": ((2, 4, 10, 10), 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
}


def _geometry(name: str) -> ConvGeometry:
    shape, out_channels, kernel, stride, padding, dilation = GEOMETRIES[name]
    return ConvGeometry.of(shape, out_channels, kernel, stride, padding, dilation)


def _run(func, *args: np.ndarray) -> np.ndarray:
    """Compile `func` with its default CPU schedule and run it; returns its output."""
    lib = tvm.compile(default_schedule(func, TARGET).mod, TARGET)
    out = func.params[-1].ty
    result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], str(out.dtype)))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), result)
    return result.numpy()


def conv_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Direct NCHW convolution: x [B, Ci, H, W], w [O, Ci, kh, kw] -> [B, O, OH, OW] (float64 sums)."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    top, left, bottom, right = geom.padding
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (top, bottom), (left, right)])
    out = np.zeros((geom.batch, w.shape[0], geom.out_height, geom.out_width)) + bias[:, None, None]
    for r in range(kh):
        for s in range(kw):
            window = xp[:, :, r * dh: r * dh + sh * (geom.out_height - 1) + 1: sh,
                        s * dw: s * dw + sw * (geom.out_width - 1) + 1: sw]
            out += np.einsum("oc,bchw->bohw", w[:, :, r, s], window)
    return out.astype(np.float32)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_im2col(name):
    geom = _geometry(name)
    x = np.random.default_rng(len(name)).standard_normal((geom.batch, geom.in_channels, geom.height, geom.width))
    x = x.astype("float32")
    got = _run(im2col(geom), x)
    assert got.shape == (geom.batch, geom.in_channels * geom.kernel[0] * geom.kernel[1],
                         geom.out_height * geom.out_width)
    np.testing.assert_array_equal(got, im2col_ref(x, geom))


def test_reference_layout():
    """Row ci*kh*kw + r*kw + s, column oh*OW + ow, zeros in the padding."""
    geom = _geometry("asymmetric pads")
    x = np.arange(geom.batch * geom.in_channels * geom.height * geom.width, dtype="float32").reshape(
        geom.batch, geom.in_channels, geom.height, geom.width) + 1
    ref = im2col_ref(x, geom)
    kh, kw = geom.kernel
    ci, r, s, oh, ow = 2, 2, 1, 3, 4
    y, z = oh + r - geom.padding[0], ow + s - geom.padding[1]
    assert ref[0, ci * kh * kw + r * kw + s, oh * geom.out_width + ow] == x[0, ci, y, z]
    assert ref[0, 0, 0] == 0  # top padding row (top = 0, left = 1: column -1)


def test_default_schedule():
    """The default CPU pipeline gives im2col its own schedule: parallel channels, vectorized
    output rows (the stock injective rule inlines the padding and scalarizes on its condition)."""
    geom = ConvGeometry.of((1, 64, 28, 28), 64, (3, 3), padding=(1, 1, 1, 1))
    sch = default_schedule(im2col(geom), TARGET)
    kinds = [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock("im2col"))]
    assert kinds[0] == tvm.tirx.ForKind.PARALLEL
    assert kinds[-1] == tvm.tirx.ForKind.VECTORIZED
    assert OUT_WIDTH_ANNOTATION in sch.get(sch.get_sblock("im2col")).annotations
    assert not schedule_im2col(s_tir.Schedule(sch.mod["main"]), 8, 1 << 16)  # only unscheduled kernels


@pytest.mark.parametrize("name", ["3x3 pad 1", "stride 2", "batch 2"])
@pytest.mark.parametrize("block", [(1, 1), (16, 1)])
def test_sparse_conv(name, block):
    """im2col, then sparse_matmul(W.reshape(O, -1) as W^T, images=B) == the convolution."""
    geom = _geometry(name)
    rng = np.random.default_rng(7)
    (kh, kw), out_channels = geom.kernel, geom.out_channels
    w = rng.standard_normal((out_channels, geom.in_channels, kh, kw)).astype("float32")
    w_t = prune_magnitude(w.reshape(out_channels, -1), 0.8, block)
    bias = rng.standard_normal(out_channels).astype("float32")
    x = rng.standard_normal((geom.batch, geom.in_channels, geom.height, geom.width)).astype("float32")
    sparse = to_block_sparse(w_t, block)
    pixels = geom.out_height * geom.out_width
    cols = _run(im2col(geom), x)
    y = _run(sparse_matmul(sparse, pixels, images=geom.batch), cols, kernel_data(sparse), bias)
    expected = conv_ref(x, w_t.reshape(w.shape), bias, geom)
    np.testing.assert_allclose(y.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
