"""Dense int8 matmul (uint8 activations x int8 weights, int32 sums), TensorIR + NumPy.

    linear (`images` None): Y[m, n] = float32(sum_k Xq[m, k] Wq[n, k] - 128 colsum[n]) * scale[n] + bias[n]
                                                           Xq uint8 [M, K], Y float32 [M, N]
    conv (`images` = B, rows = P pixels): the same sums for the pixel-major rows Xq [B * P, K]
        (`quantize_nchw` writes them from an NCHW [B, K, P] activation: a 1x1 conv, or a kxk
        conv after an im2col), written NCHW: Y float32 [B, N, P].

Activations are quantized asymmetric with zero point 128 (`quantize_rows`: Xq = clip(round(x
* inv_scale) + 128, 0, 255), inv_scale = 1 / sx in float32: a multiply, not a division, and
the reference does the same); weights per output channel symmetric, Wq int8 [N, K];
colsum[n] = sum_k Wq[n, k] and scale[n] = sx * sw[n] are compile-time constants, so
sum_k Xq Wq - 128 colsum = sum_k (Xq - 128) Wq = sum_k round(x / sx) Wq exactly.

Inner product by ISA (`int8_isa(target)`), a tensor intrinsic over one quad of K and a vector
of outputs, C[i] += sum_{k < 4} A[k] B[i, k] with A the 4 uint8 of one row (broadcast) and
B 4 int8 weights for each of the `LANES[isa]` outputs:
- "vnni" (avx512vnni): one VPDPBUSD zmm (16 outputs x 4 K).
- "avx512bw": VPMADDUBSW + VPMADDWD (x 1) + VPADDD on zmm (16 x 4).
- "avx2": the same three on ymm (8 x 4).
(`INTRINSICS`, registered at import: TVM's own VNNI one does not compile with the LLVM 22 of
the 0.27 wheel, see there.)
- "generic": no intrinsic: the int32 loop nest, vectorized by LLVM as it can.

Saturation bound: VPMADDUBSW adds two u8 x s8 products into a saturating int16. With weights in
[-64, 63] (7 bits, `weight_bits` = 7 on "avx2" and "avx512bw"): 255 * 63 * 2 = 32130 <= 32767
and 255 * (-64) * 2 = -32640 >= -32768, so no pair saturates and VPMADDWD (x 1, into int32)
sums pairs exactly. (Full int8: 255 * 127 * 2 = 64770 would saturate.) VPDPBUSD and the
generic loop accumulate in int32 without an int16 step: full int8 [-128, 127]. The int32 sums
hold |sum| <= 255 * 128 * K: exact for K < 65793. float32(sum - 128 colsum) is exact while
|sum_k (Xq - 128) Wq| <= 128 * 128 * K <= 2^24 (K <= 1024 with 8-bit weights, K <= 2048
with 7-bit ones); beyond that it is the correctly rounded float32 of the exact integer.

Layouts (`pack_weights`, once at compile time): Wq [N, K] -> int8 [N_pad / L, K_pad / 4, L,
4], L = LANES[isa] outputs per intrinsic: the 4 weights of one output and one quad of K
contiguous, the L outputs of a vector next to each other (one 32- or 64-byte load per quad).
N_pad = N rounded up to L, K_pad = K rounded up to K_ALIGN (16: a quad times the largest
unroll), both padded with zero weights. When K < K_pad, or when the rows have no divisor for
a register tile (`padded_rows`: M = 37 -> 40), the kernel copies Xq into an [M_pad, K_pad]
buffer padded with zeros ("x_pad", once per call); otherwise that block is inlined away.

Loop nest (`Int8Knobs`: row tile R, column tile C = V vectors of L outputs, K block, unroll,
parallel loop): "cols": parallel column tiles -> K blocks -> row tiles -> quads of the block
(`unroll` per unrolled iteration) -> R rows (unrolled) -> V vectors (unrolled) -> intrinsic.
The R x V int32 accumulators stay in registers over a K block; the [M, C] strip of sums is
kept per column tile (its W panel, C x K-block bytes, stays in L1 across all row tiles) and
the epilogue (- 128 colsum, float, * scale + bias) writes the strip after the last K block.
"rows_cols": column and row tiles fused in parallel, the whole K in one block, the epilogue
per tile. "none": "cols" on one thread (small products only). Elementwise ops that FuseOps
fuses after the kernel (residual add, activation) are inlined into the epilogue.

Speed (default knobs, M = 128, (K, N) in {(384, 384), (384, 1536), (1536, 384)}, Zen 4, 2
threads, through the Relax VM): VNNI 410-440 GMAC/s (the kernel alone ~450: VPDPBUSD zmm's 64
MAC/cycle/core), 4.0-4.5x the repo's fp32 dense default schedule and ONNX Runtime's fp32
MatMul; the AVX2 path (built for znver3) 175-195 GMAC/s, 2.0-2.3x fp32 dense built for the
same AVX2 target (its ceiling: 32 MAC/cycle/core, two multiplies per 32, vs 16 fp32 FMAs).

The reduction block carries `schedule_rule = "int8_matmul"`: untuned builds get `default_knobs`
(`schedule_int8_matmul`, in default_cpu.LutKernels), MetaSchedule calls the global function
"s_tir.meta_schedule.cpu.int8_matmul" (`int8_design_space`, the same knobs sampled).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.s_tir.schedule import ExprRV, SBlockRV
from tvm.script import tirx as T
from tvm.target.codegen import llvm_cpu_has_features

from .kernel_blocks import first_illegal, unscheduled_block

SCHEDULE_RULE = "int8_matmul"
RULE_FUNCTION = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
ISA_ANNOTATION = "int8.isa"  # on the dot block: the ISA the kernel was made for
KNOB_ANNOTATION = "int8."  # + knob name: the knobs of a scheduled kernel, on its root block
ZERO_POINT = 128
ISAS = ("vnni", "avx512bw", "avx2", "generic")
LANES = {"vnni": 16, "avx512bw": 16, "avx2": 8, "generic": 8}  # int32 outputs per intrinsic
QUAD = 4  # K per intrinsic
UNROLLS = (1, 2, 4)  # quads per unrolled iteration
K_ALIGN = QUAD * max(UNROLLS)
WEIGHT_RANGE = {7: (-64, 63), 8: (-128, 127)}  # by weight_bits: exact for the kernel
# Multiply-adds below which one thread is faster than waking the pool (`default_knobs`), and
# below which tuning tries one thread too (`knob_space`).
MIN_PARALLEL_WORK = 1 << 19
SERIAL_WORK = 1 << 22


# ---------------------------------------------------------------- ISA


def int8_isa(target: tvm.target.Target) -> str:
    """The inner product the kernel uses on `target` (see the module docstring)."""
    if llvm_cpu_has_features(["avx512vnni"], target):
        return "vnni"
    if llvm_cpu_has_features(["avx512bw"], target):
        return "avx512bw"
    if llvm_cpu_has_features(["avx2"], target):
        return "avx2"
    return "generic"


def isa_weight_bits(isa: str) -> int:
    """7 where VPMADDUBSW's int16 pairs could saturate ("avx2", "avx512bw"), else 8."""
    _check_isa(isa)
    return 7 if isa in ("avx2", "avx512bw") else 8


def weight_bits(target: tvm.target.Target) -> int:
    """Bits of the int8 weights the kernel sums exactly on `target`: 7 ([-64, 63]) with
    AVX2 / AVX-512BW, 8 ([-128, 127]) with VNNI or the generic loop (`weight_range`)."""
    return isa_weight_bits(int8_isa(target))


def weight_range(bits: int) -> tuple[int, int]:
    """Smallest and largest weight of `bits` bits (symmetric quantizers use +-max(|lo|, hi) - ...)."""
    if bits not in WEIGHT_RANGE:
        raise ValueError(f"bits must be one of {sorted(WEIGHT_RANGE)}, got {bits}")
    return WEIGHT_RANGE[bits]


def _check_isa(isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")


def _check_images(images: int | None) -> None:
    if images is not None and (isinstance(images, bool) or not isinstance(images, (int, np.integer)) or images < 1):
        raise ValueError(f"images must be None (linear form) or an int >= 1 (conv form), got {images!r}")


# ---------------------------------------------------------------- tensor intrinsics


def _dot_desc(lanes: int) -> tirx.PrimFunc:
    """C[i] += sum_{k < 4} A[k] B[i, k] for `lanes` outputs i: uint8 A, int8 B, int32 C."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _dot_pmadd(lanes: int) -> tirx.PrimFunc:
    """`_dot_desc(lanes)` with VPMADDUBSW + VPMADDWD (x 1) + VPADDD: ymm (8 lanes, AVX2) or
    zmm (16, AVX-512BW)."""
    bytes_, pairs = 4 * lanes, 2 * lanes
    pmaddubsw, pmaddwd = {8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
                          16: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")}[lanes]

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # The row's 4 bytes in every 32-bit lane; u8 x s8 pairs -> saturating int16 (exact
            # for 7-bit weights); pairs of int16 -> int32 (x 1). No locals: TVMScript would
            # make each a buffer.
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(pmaddwd),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(pmaddubsw),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                                  dtype=f"uint8x{bytes_}"),
                    B.vload([0, 0], dtype=f"int8x{bytes_}"),
                    dtype=f"int16x{pairs}",
                ),
                T.broadcast(T.int16(1), pairs),
                dtype=f"int32x{lanes}",
            )

    return impl


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # VPDPBUSD: C += the 4 u8 x s8 products of each 32-bit lane, in int32 (no saturation).
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


# TVM 0.27 has VNNI and AVX-512BW versions of these (tvm/s_tir/tensor_intrin/x86.py), but its
# "dot_16x4_vnni" passes the bytes as <16 x i32>, which the bundled LLVM 22 rejects ("Call
# parameter type does not match function signature": llvm.x86.avx512.vpdpbusd.512 now takes
# <64 x i8>), and both live in a package whose import parses every target's intrinsics (the
# tuning module avoids it): replaying a tuned trace (Tensorize by name) in a fresh process
# would need it. Registered here at import instead, with the same description.
INTRINSICS = {"vnni": "int8_matmul.dot_16x4_vnni", "avx512bw": "int8_matmul.dot_16x4_avx512bw",
              "avx2": "int8_matmul.dot_8x4_avx2"}
TensorIntrin.register(INTRINSICS["vnni"], _dot_desc(16), _dot_16x4_vnni, override=True)
TensorIntrin.register(INTRINSICS["avx512bw"], _dot_desc(16), _dot_pmadd(16), override=True)
TensorIntrin.register(INTRINSICS["avx2"], _dot_desc(8), _dot_pmadd(8), override=True)


# ---------------------------------------------------------------- layouts and quantizers


def padded_k(k: int) -> int:
    """K of the packed weights: a multiple of K_ALIGN."""
    return -(-k // K_ALIGN) * K_ALIGN


def padded_rows(total: int) -> int:
    """Rows of the sums: the rows (M, or B * P) themselves when at most 8 or when they have a
    divisor from 4 to 8 (a register tile of 4 to 8 rows), else rounded up to a multiple of 4
    (37 -> 40, 127 -> 128; the x_pad block adds the zero rows)."""
    if total <= 8 or any(total % d == 0 for d in range(4, 9)):
        return total
    return -(-total // 4) * 4


def padded_n(n: int, isa: str) -> int:
    """N of the packed weights: a multiple of the intrinsic's outputs."""
    return -(-n // LANES[isa]) * LANES[isa]


def pack_weights(wq: np.ndarray, isa: str) -> np.ndarray:
    """int8 Wq [N, K] -> int8 [N_pad / L, K_pad / 4, L, 4] (module docstring), zero padded.
    Refuses weights outside the ISA's exact range (`isa_weight_bits`)."""
    _check_isa(isa)
    if wq.dtype != np.int8 or wq.ndim != 2:
        raise ValueError(f"need int8 weights [N, K], got {wq.dtype} {list(wq.shape)}")
    lo, hi = weight_range(isa_weight_bits(isa))
    if wq.size and (wq.min() < lo or wq.max() > hi):
        raise ValueError(f"weights in [{wq.min()}, {wq.max()}] exceed [{lo}, {hi}], the exact range on {isa}")
    n, k = wq.shape
    lanes = LANES[isa]
    padded = np.zeros((padded_n(n, isa), padded_k(k)), np.int8)
    padded[:n, :k] = wq
    return np.ascontiguousarray(padded.reshape(-1, lanes, padded.shape[1] // QUAD, QUAD).transpose(0, 2, 1, 3))


def column_sums(wq: np.ndarray) -> np.ndarray:
    """colsum int32 [N] = sum_k Wq[n, k] (the zero point's correction, times 128)."""
    return wq.astype(np.int32).sum(1, dtype=np.int32)


def _quantize(x: tirx.Expr, inv_scale: tirx.Expr) -> tirx.Expr:
    """uint8(clip(round(x * inv_scale), -128, 127) + 128); T.round is LLVM's nearbyint: half
    to even, as np.round."""
    q = T.max(T.min(T.round(x * inv_scale), T.float32(127)), T.float32(-128))
    return T.Cast("uint8", q + T.float32(ZERO_POINT))


def quantize_rows(rows: int, k: int) -> tirx.PrimFunc:
    """(x f32 [rows, K], inv_scale f32 [1]) -> xq uint8 [rows, K] = clip(round(x * inv_scale)
    + 128, 0, 255), round half to even (as NumPy). Scheduled by the default rules."""
    i64 = T.int64

    @T.prim_func(s_tir=True)
    def main(
        x: T.Buffer((i64(rows), i64(k)), "float32"),
        inv_scale: T.Buffer((i64(1),), "float32"),
        xq: T.Buffer((i64(rows), i64(k)), "uint8"),
    ):
        T.func_attr({"tirx.noalias": True})
        for m, c in T.grid(i64(rows), i64(k)):
            with T.sblock("quantize"):
                vm, vc = T.axis.remap("SS", [m, c])
                xq[vm, vc] = _quantize(x[vm, vc], inv_scale[0])

    return main


def quantize_nchw(images: int, k: int, pixels: int) -> tirx.PrimFunc:
    """The conv form's quantizer: (x f32 [B, K, P], inv_scale f32 [1]) -> xq uint8 [B * P, K]
    (pixel-major rows, xq[b * P + p, c] = quantized x[b, c, p])."""
    _check_images(images)
    i64 = T.int64

    @T.prim_func(s_tir=True)
    def main(
        x: T.Buffer((i64(images), i64(k), i64(pixels)), "float32"),
        inv_scale: T.Buffer((i64(1),), "float32"),
        xq: T.Buffer((i64(images * pixels), i64(k)), "uint8"),
    ):
        T.func_attr({"tirx.noalias": True})
        for b, p, c in T.grid(i64(images), i64(pixels), i64(k)):
            with T.sblock("quantize"):
                vb, vp, vc = T.axis.remap("SSS", [b, p, c])
                xq[vb * pixels + vp, vc] = _quantize(x[vb, vc, vp], inv_scale[0])

    return main


def quantize_ref(x: np.ndarray, inv_scale: float) -> np.ndarray:
    """NumPy `quantize_rows` (any shape; `quantize_nchw` is this on x.transpose(0, 2, 1))."""
    q = np.round(x.astype(np.float32) * np.float32(inv_scale))
    return (np.clip(q, -128, 127) + ZERO_POINT).astype(np.uint8)


# ---------------------------------------------------------------- kernel and reference


def int8_matmul(rows: int, k: int, n: int, isa: str, images: int | None = None) -> tirx.PrimFunc:
    """The kernel for `isa` (`int8_isa(target)`).

    Linear form (`images` None, `rows` = M): (x uint8 [M, K], w int8 (`pack_weights(Wq, isa)`),
    colsum int32 [N] (`column_sums`), scale f32 [N], bias f32 [N]) -> y f32 [M, N].
    Conv form (`images` = B, `rows` = P pixels): x uint8 [B * P, K] (`quantize_nchw`), the same
    weights -> y f32 [B, N, P].

    Blocks: "x_pad" (x with K_pad - K zero columns; a plain copy, inlined by the schedule, when
    K = K_pad), "dot" (int32 sums [B * P or M, N_pad] over quads and their 4 K: the intrinsic's
    shape), "out" (- 128 colsum, float, scale, bias).
    """
    _check_isa(isa)
    _check_images(images)
    if rows < 1 or k < 1 or n < 1:
        raise ValueError(f"need rows, k and n >= 1, got {rows}, {k}, {n}")
    i64 = T.int64
    lanes = LANES[isa]
    total = rows * (images or 1)
    total_pad, k_pad, n_pad = padded_rows(total), padded_k(k), padded_n(n, isa)
    conv = images is not None
    out_shape = (i64(images), i64(n), i64(rows)) if conv else (i64(rows), i64(n))

    @T.prim_func(s_tir=True)
    def main(
        x: T.Buffer((i64(total), i64(k)), "uint8"),
        w: T.Buffer((i64(n_pad // lanes), i64(k_pad // QUAD), i64(lanes), i64(QUAD)), "int8"),
        colsum: T.Buffer((i64(n),), "int32"),
        scale: T.Buffer((i64(n),), "float32"),
        bias: T.Buffer((i64(n),), "float32"),
        y: T.Buffer(out_shape, "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xp = T.sblock_alloc_buffer((i64(total_pad), i64(k_pad)), "uint8")
        acc = T.sblock_alloc_buffer((i64(total_pad), i64(n_pad)), "int32")
        for m, c in T.grid(i64(total_pad), i64(k_pad)):
            with T.sblock("x_pad"):
                vm, vc = T.axis.remap("SS", [m, c])
                T.sblock_attr({"schedule_rule": "None"})
                if k_pad == k and total_pad == total:
                    xp[vm, vc] = x[vm, vc]
                else:
                    xp[vm, vc] = T.if_then_else(
                        vm < i64(total) and vc < i64(k), x[T.min(vm, i64(total - 1)), T.min(vc, i64(k - 1))], T.uint8(0)
                    )
        for m, no, nv, kq, k4 in T.grid(i64(total_pad), i64(n_pad // lanes), i64(lanes), i64(k_pad // QUAD), i64(QUAD)):
            with T.sblock("dot"):
                vm, vno, vnv, vkq, vk4 = T.axis.remap("SSSRR", [m, no, nv, kq, k4])
                T.sblock_attr({"schedule_rule": SCHEDULE_RULE, ISA_ANNOTATION: isa})
                with T.init():
                    acc[vm, vno * lanes + vnv] = 0
                acc[vm, vno * lanes + vnv] = acc[vm, vno * lanes + vnv] + T.Cast(
                    "int32", xp[vm, vkq * QUAD + vk4]
                ) * T.Cast("int32", w[vno, vkq, vnv, vk4])
        for m, c in T.grid(i64(total), i64(n)):
            with T.sblock("out"):
                vm, vc = T.axis.remap("SS", [m, c])
                T.sblock_attr({"schedule_rule": "None"})
                if conv:
                    y[vm // rows, vc, vm % rows] = (
                        T.Cast("float32", acc[vm, vc] - colsum[vc] * ZERO_POINT) * scale[vc] + bias[vc]
                    )
                else:
                    y[vm, vc] = T.Cast("float32", acc[vm, vc] - colsum[vc] * ZERO_POINT) * scale[vc] + bias[vc]

    return main


def int8_sums_ref(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """Exact sum_k (Xq - 128) Wq as int64 [rows, N] (rows of xq as the kernel takes them)."""
    return (xq.astype(np.int64) - ZERO_POINT) @ wq.astype(np.int64).T


def int8_matmul_ref(
    xq: np.ndarray, wq: np.ndarray, scale: np.ndarray, bias: np.ndarray, images: int | None = None
) -> np.ndarray:
    """NumPy, from the unpacked Wq int8 [N, K]: linear xq uint8 [M, K] -> float32 [M, N]; conv
    xq [B * P, K] -> float32 [B, N, P]; float32(exact integer sum) * scale + bias in float64
    (the kernel's float32 epilogue is within 2^-22 relative of it)."""
    out = int8_sums_ref(xq, wq).astype(np.float32).astype(np.float64) * scale + bias
    if images is not None:
        out = out.reshape(images, -1, out.shape[1]).transpose(0, 2, 1)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------- knobs


def vector_registers(isa: str) -> int:
    """SIMD registers: 16 ymm (AVX2, generic), 32 zmm (AVX-512)."""
    return 16 if LANES[isa] == 8 else 32


def tile_fits(isa: str, row_tile: int, col_vectors: int) -> bool:
    """Whether an R x V tile fits the registers: R * V accumulators, the V weight vectors of
    a quad (reused by all R rows), one broadcast row and one product. (With R * V + V = 15 of
    16 ymm LLVM spilled accumulators inside the K loop.)"""
    return row_tile * col_vectors + col_vectors + 2 <= vector_registers(isa)


@dataclass(frozen=True)
class Int8Knobs:
    """Schedule of `int8_matmul`.

    row_tile: rows per register tile (divides the rows, M or B * P).
    col_tile: outputs per register tile (a multiple of LANES[isa] dividing N_pad).
    k_block: K per block (a multiple of 16 dividing K_pad; K_pad: no blocking).
    unroll: quads per iteration of the unrolled K loop.
    parallel: "cols" (column tiles in parallel), "rows_cols" (row and column tiles fused in
        parallel; no K blocking) or "none".
    """

    row_tile: int
    col_tile: int
    k_block: int
    unroll: int
    parallel: str

    def check(self, rows: int, k: int, n: int, isa: str, images: int | None = None) -> str | None:
        """Why these knobs are illegal (None if legal); arguments as in `knob_space`."""
        space = knob_space(rows, k, n, isa, images)
        allowed = {"row_tile": space.row_tiles, "col_tile": space.col_tiles.get(self.row_tile, ()),
                   "k_block": space.k_blocks.get(self.parallel, ()), "unroll": space.unrolls,
                   "parallel": space.parallels}
        return first_illegal(self, allowed)


@dataclass(frozen=True)
class KnobSpace:
    """Legal values of each knob; col_tiles depends on row_tile (register budget), k_blocks
    on parallel."""

    row_tiles: tuple[int, ...]
    col_tiles: dict[int, tuple[int, ...]]
    k_blocks: dict[str, tuple[int, ...]]
    unrolls: tuple[int, ...]
    parallels: tuple[str, ...]

    def grid(self) -> list[Int8Knobs]:
        """Every legal combination (what `int8_design_space` can sample)."""
        return [Int8Knobs(r, c, kb, u, p) for r in self.row_tiles for p in self.parallels
                for c, kb, u in itertools.product(self.col_tiles[r], self.k_blocks[p], self.unrolls)]


def _total_rows(rows: int, images: int | None) -> int:
    return rows * (images or 1)


def knob_space(rows: int, k: int, n: int, isa: str, images: int | None = None) -> KnobSpace:
    """Legality filters: row tiles divide the padded rows (`padded_rows` of M, or of B * P)
    and are at most 16; column tiles are 1 to 8 vectors of LANES[isa] outputs dividing N_pad,
    R x V `tile_fits`; K blocks are K_pad or 128, 256, 512 dividing it ("rows_cols": K_pad
    only); unroll 1, 2, 4 (they divide every block: K_ALIGN); one thread only below
    SERIAL_WORK multiply-adds."""
    _check_isa(isa)
    _check_images(images)
    total = padded_rows(_total_rows(rows, images))
    lanes = LANES[isa]
    vectors = padded_n(n, isa) // lanes
    row_tiles = tuple(r for r in range(1, min(total, 16) + 1) if total % r == 0 and tile_fits(isa, r, 1))
    col_tiles = {r: tuple(v * lanes for v in range(1, 9) if vectors % v == 0 and tile_fits(isa, r, v))
                 for r in row_tiles}
    k_pad = padded_k(k)
    blocks = (k_pad,) + tuple(b for b in (512, 256, 128) if b < k_pad and k_pad % b == 0)
    work = total * padded_n(n, isa) * k_pad
    parallels = ("cols", "rows_cols") + (("none",) if work < SERIAL_WORK else ())
    k_blocks = {p: blocks if p != "rows_cols" else (k_pad,) for p in parallels}
    return KnobSpace(row_tiles, col_tiles, k_blocks, UNROLLS, parallels)


def default_knobs(rows: int, k: int, n: int, isa: str, images: int | None = None) -> Int8Knobs:
    """The tile with the most accumulators within 4 rows x 2 vectors (ymm) or 4 rows x 3
    vectors (zmm), then more rows; no K blocking; 2 quads per unrolled iteration; one thread
    below MIN_PARALLEL_WORK. zmm: row and column tiles in parallel; ymm: column tiles if there
    are at least 8 (else row tiles too). Measured at M = 128, (K, N) in {(384, 384), (384,
    1536), (1536, 384)} against every R >= 2 tile, K block and parallel loop (Zen 4, 2
    threads): within 3% of the best with VNNI, within 5% with AVX2 (4 x 48 "rows_cols" there
    was up to 7% slower)."""
    space = knob_space(rows, k, n, isa, images)
    lanes = LANES[isa]
    max_rows, max_vectors = (4, 2) if lanes == 8 else (4, 3)
    tiles = [(r, c) for r in space.row_tiles if r <= max_rows for c in space.col_tiles[r] if c <= max_vectors * lanes]
    row_tile, col_tile = max(tiles, key=lambda t: (t[0] * t[1], t[0]))
    k_pad = padded_k(k)
    work = padded_rows(_total_rows(rows, images)) * padded_n(n, isa) * k_pad
    if work < MIN_PARALLEL_WORK and "none" in space.parallels:
        parallel = "none"
    elif lanes == 16 or padded_n(n, isa) // col_tile < 8:
        parallel = "rows_cols"
    else:
        parallel = "cols"
    return Int8Knobs(row_tile, col_tile, k_pad, 2, parallel)


# ---------------------------------------------------------------- schedule


@dataclass(frozen=True)
class _Kernel:
    """The blocks and shape of an `int8_matmul` kernel inside a schedule."""

    dot: SBlockRV
    pad: SBlockRV
    out: SBlockRV
    rows: int
    k: int
    n: int
    isa: str
    images: int | None

    @property
    def shape(self) -> tuple:
        """The arguments of `knob_space`, `default_knobs` and `Int8Knobs.check`."""
        return self.rows, self.k, self.n, self.isa, self.images

    @property
    def padded(self) -> bool:
        """Whether x_pad adds zero columns or rows (else it is a plain copy, inlined)."""
        total = _total_rows(self.rows, self.images)
        return padded_k(self.k) != self.k or padded_rows(total) != total


def _kernel(sch: s_tir.Schedule, dot: SBlockRV) -> _Kernel | None:
    """The kernel around its reduction block, shape read from its buffers: x [rows, K], y [M,
    N] (linear) or [B, N, P] (conv)."""
    producers, consumers = sch.get_producers(dot), sch.get_consumers(dot)
    if len(producers) != 1 or len(consumers) != 1:
        return None
    isa = str(sch.get(dot).annotations[ISA_ANNOTATION])
    x = sch.get(producers[0]).reads[0].source
    y = sch.get(consumers[0]).writes[0].source
    k = int(x.shape[1])
    dims = [int(d) for d in y.shape]
    if len(dims) == 2:
        rows, n, images = dims[0], dims[1], None
    else:
        images, n, rows = dims
    return _Kernel(dot, producers[0], consumers[0], rows, k, n, isa, images)


def find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """The unscheduled int8 matmul in `sch`, found by its block annotation."""
    block = unscheduled_block(sch, SCHEDULE_RULE, KNOB_ANNOTATION + "row_tile")
    return _kernel(sch, block) if block is not None else None


def apply_knobs(sch: s_tir.Schedule, knobs: Int8Knobs) -> None:
    """Schedule the int8 matmul in `sch` with `knobs` (checked first)."""
    kernel = find_kernel(sch)
    if kernel is None:
        raise ValueError("no unscheduled int8_matmul kernel in this schedule")
    reason = knobs.check(*kernel.shape)
    if reason is not None:
        raise ValueError(f"illegal knobs {knobs}: {reason}")
    lanes = LANES[kernel.isa]
    _schedule(sch, kernel, knobs.row_tile, knobs.col_tile // lanes, knobs.k_block // QUAD, knobs.unroll,
              knobs.parallel)


def scheduled_knobs(func: tirx.PrimFunc) -> Int8Knobs | None:
    """The knobs a scheduled (default or tuned) int8 matmul was built with."""
    annotations = func.body.block.annotations if isinstance(func.body, s_tir.SBlockRealize) else {}
    names = ("row_tile", "col_vectors", "k_quads", "unroll", "parallel", "lanes")
    values = {name: annotations.get(KNOB_ANNOTATION + name) for name in names}
    if any(v is None for v in values.values()):
        return None
    lanes = int(values["lanes"])
    return Int8Knobs(int(values["row_tile"]), int(values["col_vectors"]) * lanes, int(values["k_quads"]) * QUAD,
                     int(values["unroll"]), str(values["parallel"]))


Factor = int | ExprRV


def _schedule(sch: s_tir.Schedule, kernel: _Kernel, row_tile: int, col_vectors: Factor, block_quads: Factor,
              unroll: Factor, parallel: str) -> None:
    """The loop nest of the module docstring. Row tile and parallel loop are structural; the
    column tile, K block and unroll may be sampled random variables (MetaSchedule): the loop
    structure, and so the trace, does not depend on their values."""
    lanes = LANES[kernel.isa]
    _inline_consumers(sch, kernel.out)
    others = _other_blocks(sch, kernel)
    if not kernel.padded:
        sch.compute_inline(kernel.pad)
    m, no, nv, kq, k4 = sch.get_loops(kernel.dot)
    m_o, m_t = sch.split(m, [None, row_tile])
    n_o, n_t = sch.split(no, [None, col_vectors])
    k_o, k_i = sch.split(kq, [None, block_quads])
    k_io, k_iu = sch.split(k_i, [None, unroll])
    if parallel == "rows_cols":
        sch.reorder(n_o, m_o, k_o, k_io, k_iu, m_t, n_t, nv, k4)
        tile = sch.fuse(n_o, m_o)
        sch.parallel(tile)
    else:
        sch.reorder(n_o, k_o, m_o, k_io, k_iu, m_t, n_t, nv, k4)
        tile = n_o
        if parallel == "cols":
            sch.parallel(n_o)
    sch.reverse_compute_at(kernel.out, tile, preserve_unit_loops=True)
    for loop in (k_iu, m_t, n_t):
        sch.unroll(loop)
    if kernel.isa in INTRINSICS:
        init = sch.decompose_reduction(kernel.dot, k_o)
        sch.tensorize(nv, INTRINSICS[kernel.isa])
    else:  # generic: int32 multiply-adds over the vector of outputs, the quad unrolled
        sch.reorder(k4, nv)
        sch.unroll(k4)
        sch.vectorize(nv)
        init = sch.decompose_reduction(kernel.dot, k_o)
    sch.vectorize(sch.get_loops(init)[-1])  # one vector of zeros per (row, vector)
    _schedule_output(sch, kernel)
    if kernel.padded:
        _schedule_pad(sch, kernel)
    _parallel_blocks(sch, others)

    root = sch.get_sblock("root")
    sch.annotate(root, "schedule_rule", "None")  # keep MetaSchedule's stock rules off the kernel
    # In the schedule's units (vectors, quads): sampled values are random variables.
    annotations = {"row_tile": row_tile, "col_vectors": col_vectors, "k_quads": block_quads, "unroll": unroll,
                   "parallel": parallel, "lanes": lanes}
    for name, value in annotations.items():
        sch.annotate(root, KNOB_ANNOTATION + name, value)


def _inline_consumers(sch: s_tir.Schedule, out: SBlockRV) -> None:
    """Elementwise ops FuseOps put after the kernel (residual add, activation, ...) inlined
    into its epilogue, as long as they can be."""
    while len(consumers := sch.get_consumers(out)) == 1:
        try:
            sch.reverse_compute_inline(consumers[0])
        except s_tir.schedule.ScheduleError:
            return


def _other_blocks(sch: s_tir.Schedule, kernel: _Kernel) -> list[str]:
    """Names of the root blocks that are not the kernel's (FuseOps' producers, e.g. the
    quantizer; its consumers are inlined)."""
    own = [sch.get(b).name_hint for b in (kernel.dot, kernel.pad, kernel.out)]
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return [name for name in names if name not in own]


def _parallel_blocks(sch: s_tir.Schedule, names: list[str]) -> None:
    """The outer loop of each block in parallel where legal; LLVM vectorizes the rest."""
    for name in names:
        loops = sch.get_loops(sch.get_sblock(name))
        try:
            sch.parallel(loops[0])
        except (s_tir.schedule.ScheduleError, IndexError):
            pass


def _schedule_output(sch: s_tir.Schedule, kernel: _Kernel) -> None:
    """The epilogue of a strip or tile: its columns vectorized (a scatter in the conv form,
    whose output is channel-major)."""
    *_, m, c = sch.get_loops(kernel.out)
    sch.vectorize(c)


def _schedule_pad(sch: s_tir.Schedule, kernel: _Kernel) -> None:
    """x with zero columns up to K_pad: rows in parallel, columns vectorized (32 bytes)."""
    m, c = sch.get_loops(kernel.pad)
    _, c_i = sch.split(c, [None, 32 if padded_k(kernel.k) % 32 == 0 else K_ALIGN])
    sch.vectorize(c_i)
    if _total_rows(kernel.rows, kernel.images) * kernel.k >= MIN_PARALLEL_WORK // 8:
        sch.parallel(m)


# ---------------------------------------------------------------- default and tuned schedules


def schedule_int8_matmul(sch: s_tir.Schedule, _lanes: int = 0, _min_parallel_work: int = 0) -> bool:
    """Default schedule (`default_knobs`) if `sch` holds an int8 matmul, else False (`sch`
    untouched). The signature of the other `schedule_*` in default_cpu.LutKernels; the ISA
    comes from the kernel's annotation, the parallel threshold is MIN_PARALLEL_WORK."""
    kernel = find_kernel(sch)
    if kernel is None:
        return False
    apply_knobs(sch, default_knobs(*kernel.shape))
    return True


def int8_design_space(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule design space of the int8 matmul whose reduction block is `block`: one
    space per structural choice (row tile x parallel loop), in each the column tile, the K
    block and the unroll factor sampled with `sample_categorical` from `knob_space` (in the
    trace and in the root block's `int8.*` annotations)."""
    kernel = _kernel(sch, block)
    if kernel is None:
        return [sch]
    space = knob_space(*kernel.shape)
    lanes = LANES[kernel.isa]
    spaces = []
    for row_tile, parallel in itertools.product(space.row_tiles, space.parallels):
        new = sch.copy()
        k = _kernel(new, block)
        col_vectors = _sample(new, [c // lanes for c in space.col_tiles[row_tile]])
        block_quads = _sample(new, [b // QUAD for b in space.k_blocks[parallel]])
        unroll = _sample(new, list(space.unrolls))
        _schedule(new, k, row_tile, col_vectors, block_quads, unroll, parallel)
        spaces.append(new)
    return spaces


def _sample(sch: s_tir.Schedule, values: list[int]) -> ExprRV:
    return sch.sample_categorical(values, [1.0 / len(values)] * len(values))


# MetaSchedule's ApplyCustomRule calls "s_tir.meta_schedule.<target key>.<schedule_rule>" for
# a block annotated with schedule_rule; llvm targets have the key "cpu".
@tvm.register_global_func(RULE_FUNCTION, override=True)
def _metaschedule_rule(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    return int8_design_space(sch, block)
