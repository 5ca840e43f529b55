"""Replace matmul / conv2d calls by int8 dense kernel calls (quantize, then int8 x int8 sums).

    matmul(x, W) + b  ->  int8_matmul(quantize_rows(reshape(x, [M, K])); Wq packed, colsum, scale, b)  [M, N]
    conv2d(x, W) + b  ->  int8_matmul(quantize_nchw(columns(x)); ..., images=B)  [B, N, OH*OW]

then reshaped to the call's output shape; columns are `conv_columns` (a reshape for 1x1
convs, else im2col). Weights are int8 per output channel (`lut_compiler.int8`), activations
uint8 with one calibrated scale per layer. Runs on the imported module, before legalization
(`call_rewrite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..schedules.int8_matmul import column_sums, int8_matmul, pack_weights, quantize_nchw, quantize_rows
from .call_rewrite import Replacement, add_kernel, rewrite_calls
from .conv_columns import conv_columns
from .find_candidates import Candidate


@dataclass
class Int8Layer:
    """One call as int8: Wq int8 [N, K] (W^T quantized per row n with w_scale float32 [N]),
    the activation scale x_scale (x ~ (xq - 128) * x_scale) and bias float32 [N]."""

    candidate: Candidate
    wq: np.ndarray
    w_scale: np.ndarray
    x_scale: float
    bias: np.ndarray

    def emit(self, bb: relax.BlockBuilder, x: relax.Expr, isa: str) -> relax.Expr:
        """The quantize and kernel calls for input x, in the call's output shape (bias included)."""
        c = self.candidate
        n, k = self.wq.shape
        inv_scale = relax.const(np.array([1.0 / self.x_scale], np.float32))
        consts = [relax.const(pack_weights(self.wq, isa)), relax.const(column_sums(self.wq)),
                  relax.const((self.w_scale * np.float32(self.x_scale)).astype(np.float32)),
                  relax.const(self.bias.astype(np.float32))]
        if c.op == "matmul":
            m = int(np.prod(c.input_shape[:-1]))
            if len(c.input_shape) != 2:
                x = bb.emit(relax.op.reshape(x, (m, k)))
            xq = bb.emit(relax.call_tir(add_kernel(bb, quantize_rows(m, k), "quantize_rows"), [x, inv_scale],
                                        relax.TensorType((m, k), "uint8")))
            y = relax.call_tir(add_kernel(bb, int8_matmul(m, k, n, isa), "int8_matmul"), [xq, *consts],
                               relax.TensorType((m, n), "float32"))
            return y if len(c.output_shape) == 2 else relax.op.reshape(bb.emit(y), c.output_shape)
        cols, geom = conv_columns(bb, c, x)
        pixels = geom.out_height * geom.out_width
        xq = bb.emit(relax.call_tir(add_kernel(bb, quantize_nchw(geom.batch, k, pixels), "quantize_nchw"),
                                    [cols, inv_scale], relax.TensorType((geom.batch * pixels, k), "uint8")))
        y = bb.emit(relax.call_tir(add_kernel(bb, int8_matmul(pixels, k, n, isa, images=geom.batch), "int8_conv2d"),
                                   [xq, *consts], relax.TensorType((geom.batch, n, pixels), "float32")))
        return relax.op.reshape(y, c.output_shape)


def rewrite_int8(mod: tvm.IRModule, layers: list[Int8Layer], isa: str) -> tvm.IRModule:
    """``mod`` with each layer's call replaced; `isa`: `schedules.int8_matmul.int8_isa(target)`."""
    return rewrite_calls(mod, [Replacement(layer.candidate, lambda bb, x, layer=layer: layer.emit(bb, x, isa),
                                           "int8_out") for layer in layers])
