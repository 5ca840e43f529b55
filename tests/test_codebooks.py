"""The least-squares table correction against NumPy's lstsq, and what it buys on held-out rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lut_compiler.codebooks import fit_correction, kmeans, make_tables, quantize_tables, snr_db
from lut_compiler.pq_layer import PQLayer
from lut_compiler.schedules.lut_encode_linear import encode_linear_ref
from lut_compiler.schedules.lut_lookup_linear import lookup_add_linear_ref


def _onehot(codes: np.ndarray, k: int) -> np.ndarray:
    rows, c = codes.shape
    a = np.zeros((rows, c * k))
    a[np.arange(rows)[:, None], codes + np.arange(c) * k] = 1
    return a


@pytest.mark.parametrize("rows,c,k,n", [(200, 5, 8, 7), (40, 6, 16, 5), (97, 3, 4, 11)])
@pytest.mark.parametrize("ridge", [0.05, 1.0])
def test_fit_correction_is_the_ridge_solution(rows, c, k, n, ridge):
    """Both normal-equation forms (C*K <= rows, and C*K > rows) give the ridge least-squares
    solution, computed here as lstsq of the system stacked with sqrt(lam) I."""
    rng = np.random.default_rng(rows + c)
    codes = rng.integers(0, k, (rows, c)).astype(np.uint8)
    tables = rng.standard_normal((c, k, n)).astype(np.float32)
    outputs = rng.standard_normal((rows, n)).astype(np.float32)
    got = fit_correction(tables, codes, outputs, ridge)
    a = _onehot(codes, k)
    lam = ridge * c * k
    stacked = np.vstack([a, np.sqrt(lam) * np.eye(c * k)])
    target = np.vstack([outputs - a @ tables.reshape(c * k, n), np.zeros((c * k, n))])
    expected = np.linalg.lstsq(stacked, target, rcond=None)[0].reshape(c, k, n)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_tables_are_closer_on_held_out_rows(seed):
    """Correlated sub-spaces (what a layer's input looks like): the fitted int8 tables give a
    higher output SNR than centroids x weights on rows the fit never saw."""
    rng = np.random.default_rng(seed)
    c, k, v, n = 8, 16, 4, 24
    mix = rng.standard_normal((c * v, c * v)) / np.sqrt(c * v)
    x = (rng.standard_normal((3000, c * v)) @ mix + 0.3).astype(np.float32)
    w = rng.standard_normal((c * v, n)).astype(np.float32)
    train, held = x[:2000], x[2000:]
    centroids = np.stack([kmeans(train.reshape(-1, c, v)[:, i], k, seed + i, 30) for i in range(c)])
    tables = make_tables(centroids, w)
    fitted = tables + fit_correction(tables, encode_linear_ref(train, centroids), train @ w, 0.2)
    held_codes = encode_linear_ref(held, centroids)
    zero = np.zeros(n, np.float32)
    plain = snr_db(held @ w, lookup_add_linear_ref(held_codes, *quantize_tables(tables), zero))
    fit = snr_db(held @ w, lookup_add_linear_ref(held_codes, *quantize_tables(fitted), zero))
    assert fit > plain + 0.5, (plain, fit)


def test_pq_layer_adds_the_correction():
    """The torch PQ layer (what learning trains) computes lookup-add on P.W + F."""
    rng = np.random.default_rng(3)
    sub = rng.standard_normal((30, 4, 2)).astype(np.float32)
    centroids = rng.standard_normal((4, 16, 2)).astype(np.float32)
    weight = rng.standard_normal((8, 6)).astype(np.float32)
    correction = rng.standard_normal((4, 16, 6)).astype(np.float32)
    pq = PQLayer(centroids, weight, "int8", correction=correction)
    tables, scale = quantize_tables(make_tables(centroids, weight) + correction)
    codes = encode_linear_ref(sub.reshape(len(sub), -1), centroids)
    with torch.no_grad():
        got = pq(torch.from_numpy(sub)).numpy()
    np.testing.assert_allclose(got, lookup_add_linear_ref(codes, tables, scale, np.zeros(6, np.float32)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pq.exported()[1], tables)
