"""Shared by the LUT kernel tests: conv geometries, the check of encoder codes, compiling
many kernels at once."""

import numpy as np
import tvm

# A chosen code may miss the float64 nearest centroid by float32 rounding of the distances
# only: relative to the magnitude of ||x||^2 + ||P_k||^2.
DISTANCE_RTOL = 1e-5
MIN_EQUAL_CODES = 0.99

CONVS = {
    # name: (input NCHW, out channels, kernel, stride, padding (t, l, b, r), dilation, group, K)
    "3x3_pad1": ((2, 8, 9, 9), 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 16),
    "3x3_stride2": ((1, 6, 11, 11), 10, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 8),
    "asymmetric_pad": ((1, 4, 7, 10), 5, (3, 3), (1, 1), (0, 1, 2, 0), (1, 1), 1, 16),
    "dilation2": ((1, 5, 12, 9), 7, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, 8),
    "1x1_group4": ((2, 16, 6, 5), 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 16),
    "nonsquare": ((1, 6, 8, 13), 9, (3, 2), (1, 2), (1, 0, 1, 1), (1, 1), 2, 8),
}


def assert_codes(codes: np.ndarray, sub: np.ndarray, centroids: np.ndarray, reference: np.ndarray) -> None:
    """codes uint8 [..., C] of sub-vectors sub float32 [..., C, V] with centroids [C, K, V]:
    every code is the nearest centroid up to float32 rounding (in float64 distances), and
    nearly all equal the NumPy reference's (rounding may flip near-ties)."""
    sub64, p64 = sub.astype("float64"), centroids.astype("float64")
    distances = np.square(sub64[..., None, :] - p64).sum(-1)  # [..., C, K]
    chosen = np.take_along_axis(distances, codes[..., None].astype(np.intp), -1)[..., 0]
    scale = np.square(sub64).sum(-1) + np.square(p64).sum(-1).max(-1)
    assert (chosen - distances.min(-1) <= DISTANCE_RTOL * (1 + scale)).all()
    assert (codes == reference).mean() >= MIN_EQUAL_CODES


def compile_funcs(funcs: dict, target):
    """One library for many PrimFuncs (one LLVM run), each callable by its key."""
    return tvm.compile(tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()}), target)
