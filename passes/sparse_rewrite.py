"""Replace matmul / conv2d calls with constant sparse weights by block-sparse kernel calls.

    matmul(x, W) + b          ->  sparse_matmul(reshape(x, [M, D]); W^T in BSR, b)     [M, N]
    conv2d(x, W) + b, 1x1     ->  sparse_matmul(reshape(x, [B, Ci, H*W]); ..., images=B)
    conv2d(x, W) + b, kh x kw ->  sparse_matmul(im2col(x) [B, Ci*kh*kw, OH*OW]; ..., images=B)

then reshaped to the call's output shape. W^T is [N, D] for a matmul and [O, Ci*kh*kw] (OIHW
flattened) for a conv; the sparsity pattern is baked into the kernel, the block values and
the bias are constants. Runs on the imported module, before legalization (`call_rewrite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..lowering import FIXED_LAYOUT
from ..schedules.sparse_matmul import kernel_data, sparse_matmul
from ..sparse_format import BlockSparse
from .call_rewrite import Replacement, add_kernel, rewrite_calls
from .conv_columns import conv_columns
from .find_candidates import Candidate


def weight_t(c: Candidate) -> np.ndarray:
    """float32 W^T [N, K] of a matmul ([D, N] weight) or conv2d (OIHW, flattened per output)."""
    return np.ascontiguousarray(c.weight.T if c.op == "matmul" else c.weight.reshape(c.weight.shape[0], -1), np.float32)


def check(c: Candidate) -> str | None:
    """Why this call cannot take a sparse kernel, or None."""
    if not c.static:
        return "dynamic shape (bind it with --input-shape)"
    if c.dtype != "float32":
        return f"dtype {c.dtype} (float32 only)"
    if not c.const_weight:
        return "weight is not a constant"
    if c.op == "matmul" and len(c.weight_shape) != 2:
        return f"batched constant weight {'x'.join(map(str, c.weight_shape))} (2-D weights only)"
    if c.op == "conv2d" and (c.conv.groups != 1 or c.conv.layouts != ("NCHW", "OIHW", "NCHW")):
        return f"grouped or non-NCHW conv (groups {c.conv.groups}, layouts {'/'.join(c.conv.layouts)})"
    return None


def _fixed(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    return func.with_attr(FIXED_LAYOUT, True)


@dataclass
class SparseLayer:
    """One call to rewrite: its candidate, the (possibly pruned) weight in BSR, and the bias
    float32 [N] (zeros when the call has none)."""

    candidate: Candidate
    weight: BlockSparse
    bias: np.ndarray

    def emit(self, bb: relax.BlockBuilder, x: relax.Expr, lanes: int) -> relax.Expr:
        """The kernel call(s) for input x, in the call's output shape (bias included)."""
        c, w = self.candidate, self.weight
        consts = [relax.const(kernel_data(w)), relax.const(self.bias.astype(np.float32))]
        n = w.shape[0]
        if c.op == "matmul":
            m = int(np.prod(c.input_shape[:-1]))
            if len(c.input_shape) != 2:
                x = bb.emit(relax.op.reshape(x, (m, c.input_shape[-1])))
            kernel = add_kernel(bb, _fixed(sparse_matmul(w, m, lanes=lanes)), "sparse_matmul")
            y = relax.call_tir(kernel, [x, *consts], relax.TensorType((m, n), "float32"))
            return y if len(c.output_shape) == 2 else relax.op.reshape(bb.emit(y), c.output_shape)
        x, geom = conv_columns(bb, c, x)
        pixels = geom.out_height * geom.out_width
        kernel = add_kernel(bb, _fixed(sparse_matmul(w, pixels, images=geom.batch, lanes=lanes)), "sparse_conv2d")
        y = bb.emit(relax.call_tir(kernel, [x, *consts], relax.TensorType((geom.batch, n, pixels), "float32")))
        return relax.op.reshape(y, c.output_shape)


def rewrite_sparse(mod: tvm.IRModule, layers: list[SparseLayer], lanes: int) -> tvm.IRModule:
    """``mod`` with each layer's call replaced; `lanes`: float32 lanes of the target."""
    return rewrite_calls(mod, [Replacement(layer.candidate, lambda bb, x, layer=layer: layer.emit(bb, x, lanes),
                                           "sparse_out") for layer in layers])
