"""Product-quantization codebooks and lookup tables for one layer (LUT-NN, MADDNESS).

    sub-vectors [rows, C, V] --k-means per sub-space--> centroids P [C, K, V]
    tables T[c, k, n] = P[c, k] . W[cV:(c+1)V, n] (+ F[c, k, n])        float32 [C, K, N]
    int8: s[n] = max_{c,k} |T[c, k, n]| / 127, T_q = round(T / s)       int8 [C, K, N]
    layer output Y[m, n] = s[n] * sum_c T_q[c, code[m, c], n] + b[n]    (s = 1 for float32 tables)

k-means is scikit-learn's, seeded per sub-space and run on one thread, so codebooks are
the same on every machine. With `LutConfig.table_fit`, the tables get a least-squares
correction F (MADDNESS fits its tables to the layer outputs the same way): with A the
one-hot codes [rows, C*K] of the training rows and Y their exact outputs,
F = argmin |Y - A (P.W + F)|^2 + lam |F|^2, lam = table_fit * C * K (ridge toward P.W),
so each table entry also absorbs the error its codes make in the other sub-spaces.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from .config import LutConfig
from .passes.lut_plan import LayerPlan
from .schedules.lut_encode_linear import encode_linear_ref
from .schedules.lut_lookup_linear import lookup_add_linear_ref


@dataclass
class LutLayer:
    """What replaces one layer: centroids f32 [C, K, V], tables int8|f32 [C, K, N],
    per-column scale f32 [N], bias f32 [N] (the layer's own, plus a learned shift with
    `LearnConfig.train_bias`); snr_db of its output on held-out rows; correction f32
    [C, K, N]: the part F of the float tables P.W + F that is not centroids x weights (the
    table fit, and the change of trained weights; None: neither)."""

    plan: LayerPlan
    centroids: np.ndarray = field(repr=False)
    tables: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    snr_db: float | None = None
    correction: np.ndarray | None = field(default=None, repr=False)

    def forward(self, sub: np.ndarray) -> np.ndarray:
        """NumPy reference of encode + lookup-add: sub-vectors [rows, C, V] -> float32 [rows, N]."""
        codes = encode_linear_ref(sub.reshape(len(sub), -1), self.centroids)
        return lookup_add_linear_ref(codes, self.tables, self.scale, self.bias)

    @property
    def own_bias(self) -> np.ndarray:
        """float32 [N]: the bias of the replaced ONNX node (zeros without one)."""
        bias = self.plan.candidate.bias
        return np.zeros_like(self.bias) if bias is None else bias.astype(np.float32)

    def dense(self, sub: np.ndarray) -> np.ndarray:
        """The exact layer on the same rows: float32 [rows, N]."""
        w = self.plan.rule.weight_matrix(self.plan.candidate)
        return sub.reshape(len(sub), -1) @ w + self.own_bias


def kmeans(vectors: np.ndarray, k: int, seed: int, iters: int) -> np.ndarray:
    """k centroids float32 [k, V] of vectors [rows, V]; every row is a centroid when rows <= k."""
    if len(vectors) <= k:
        return np.resize(vectors, (k, vectors.shape[1])).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(vectors)
    return fit.cluster_centers_.astype(np.float32)


def make_tables(centroids: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float32 [C, K, N] from centroids [C, K, V] and the weight matrix [C*V, N]."""
    c, _, v = centroids.shape
    return np.einsum("ckv,cvn->ckn", centroids, weight.reshape(c, v, -1), optimize=True).astype(np.float32)


def fit_correction(tables: np.ndarray, codes: np.ndarray, outputs: np.ndarray, ridge: float) -> np.ndarray:
    """F float32 [C, K, N] minimizing |Y - A (T + F)|^2 + lam |F|^2 (lam = ridge * C * K) for
    float tables T [C, K, N], codes uint8 [rows, C] (A: their one-hot [rows, C*K]) and exact
    outputs Y [rows, N]. Solved in the smaller of the two normal-equation forms (C*K or rows)."""
    c, k, n = tables.shape
    rows = len(codes)
    onehot = np.zeros((rows, c * k), np.float32)  # counts in float32 are exact up to 2^24
    onehot[np.arange(rows)[:, None], codes.astype(np.int64) + np.arange(c) * k] = 1.0
    residual = outputs.astype(np.float32) - onehot @ tables.reshape(c * k, n)
    lam = ridge * c * k
    if c * k <= rows:
        gram = (onehot.T @ onehot).astype(np.float64) + lam * np.eye(c * k)
        fit = np.linalg.solve(gram, onehot.T @ residual)
    else:
        gram = (onehot @ onehot.T).astype(np.float64) + lam * np.eye(rows)
        fit = onehot.T @ np.linalg.solve(gram, residual).astype(np.float32)
    return fit.reshape(c, k, n).astype(np.float32)


def quantize_tables(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [C, K, N], scale f32 [N]) with symmetric per-column scales; |T_q| <= 127."""
    peak = np.abs(tables).max(axis=(0, 1))
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(tables / scale), -127, 127).astype(np.int8), scale


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); inf when exact."""
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def learn_layer(plan: LayerPlan, train: np.ndarray, held: np.ndarray, cfg: LutConfig) -> LutLayer:
    """Codebooks (and with `cfg.table_fit` the table correction) from ``train`` sub-vectors
    [rows, C, V]; SNR measured on ``held`` ones."""
    candidate = plan.candidate
    with threadpool_limits(1):
        centroids = np.stack([kmeans(train[:, c], plan.centroids, cfg.seed + c, cfg.kmeans_iters)
                              for c in range(plan.codebooks)])
    weight = plan.rule.weight_matrix(candidate)
    tables = make_tables(centroids, weight)
    correction = None
    if cfg.table_fit is not None:
        rows = train.reshape(len(train), -1)
        codes = encode_linear_ref(rows, centroids)
        correction = fit_correction(tables, codes, rows @ weight, cfg.table_fit)
        tables = tables + correction
    if cfg.table_dtype == "int8":
        tables, scale = quantize_tables(tables)
    else:
        scale = np.ones(tables.shape[-1], np.float32)
    bias = candidate.bias if candidate.bias is not None else np.zeros(tables.shape[-1], np.float32)
    layer = LutLayer(plan, centroids, tables, scale, bias.astype(np.float32), correction=correction)
    layer.snr_db = round(snr_db(layer.dense(held), layer.forward(held)), 2)
    return layer
