"""Block-sparse (BSR) weights: the format of the sparse kernels (schedules/sparse_matmul.py).

A weight W [K, N] (Y = X W) is stored transposed, W^T [N, K], as block rows of shape
(bn, bk): block row i covers rows i*bn .. (i+1)*bn of W^T, and its stored blocks are the
(bn, bk) tiles of those rows that hold a nonzero. (1, 1) blocks are CSR (unstructured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Candidate block shapes (bn, bk), largest first: `detect_block` returns the first that fits.
BLOCKS = ((16, 1), (8, 1), (4, 1), (1, 4), (1, 1))


@dataclass(frozen=True)
class BlockSparse:
    """W^T [N, K] in block-sparse row format.

    block: (bn, bk), dividing (N, K).
    shape: (N, K).
    data: float32 [nnzb, bn, bk], the stored blocks in row-major block order.
    indices: int32 [nnzb], block column (k // bk) of each stored block.
    indptr: int32 [N / bn + 1], block row i holds blocks indptr[i] .. indptr[i + 1].
    """

    block: tuple[int, int]
    shape: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def nnzb(self) -> int:
        return len(self.indices)

    @property
    def density(self) -> float:
        """Stored blocks / all blocks (the fraction of multiply-adds the kernel does)."""
        bn, bk = self.block
        return self.nnzb / max(self.shape[0] // bn * (self.shape[1] // bk), 1)

    def block_mask(self) -> np.ndarray:
        """bool [N / bn, K / bk]: which blocks are stored."""
        bn, bk = self.block
        mask = np.zeros((self.shape[0] // bn, self.shape[1] // bk), bool)
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        mask[rows, self.indices] = True
        return mask

    def dense(self) -> np.ndarray:
        """float32 W^T [N, K]."""
        bn, bk = self.block
        n, k = self.shape
        tiles = np.zeros((n // bn, k // bk, bn, bk), np.float32)
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        tiles[rows, self.indices] = self.data
        return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3).reshape(n, k))


def _check_block(w_t: np.ndarray, block: tuple[int, int]) -> None:
    if w_t.ndim != 2:
        raise ValueError(f"need a 2-d W^T [N, K], got shape {list(w_t.shape)}")
    bn, bk = block
    if bn < 1 or bk < 1 or w_t.shape[0] % bn or w_t.shape[1] % bk:
        raise ValueError(f"block {block} does not divide W^T {list(w_t.shape)}")


def _tiles(w_t: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[N / bn, K / bk, bn, bk] view of W^T's blocks."""
    bn, bk = block
    n, k = w_t.shape
    return w_t.reshape(n // bn, bn, k // bk, bk).transpose(0, 2, 1, 3)


def to_block_sparse(w_t: np.ndarray, block: tuple[int, int]) -> BlockSparse:
    """W^T [N, K] -> BlockSparse with (bn, bk) = `block`, all-zero blocks dropped."""
    _check_block(w_t, block)
    tiles = _tiles(np.asarray(w_t, np.float32), block)
    mask = (tiles != 0).any((2, 3))
    rows, cols = np.nonzero(mask)  # row-major: sorted by block row, then column
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    return BlockSparse(tuple(block), tuple(w_t.shape), np.ascontiguousarray(tiles[rows, cols]),
                       cols.astype(np.int32), indptr)


def fits(w_t: np.ndarray, block: tuple[int, int]) -> bool:
    """Whether every zero of W^T lies in an all-zero block (`block` divides the shape)."""
    bn, bk = block
    if w_t.shape[0] % bn or w_t.shape[1] % bk:
        return False
    tiles = _tiles(w_t, block)
    nonzero_blocks = (tiles != 0).any((2, 3))
    return int(nonzero_blocks.sum()) * bn * bk == int(np.count_nonzero(w_t))


def detect_block(w_t: np.ndarray) -> tuple[int, int]:
    """The largest block of `BLOCKS` whose zero blocks hold all zeros of W^T (its true block
    structure); (1, 1) (CSR) when no larger one does."""
    return next(b for b in BLOCKS if fits(w_t, b))


def worth_sparse(w_t: np.ndarray, block: tuple[int, int], min_sparsity: float = 0.7) -> bool:
    """Whether at least `min_sparsity` of W^T's blocks are all zero (below it the dense kernel
    wins: the sparse one's multiply-adds are no cheaper)."""
    _check_block(w_t, block)
    return 1.0 - to_block_sparse(w_t, block).density >= min_sparsity


def prune_magnitude(w_t: np.ndarray, sparsity: float, block: tuple[int, int]) -> np.ndarray:
    """W^T [N, K] with the round(sparsity * blocks) blocks of lowest L2 norm zeroed (ties:
    the lower block index first); float32."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    _check_block(w_t, block)
    out = np.array(w_t, np.float32)
    tiles = _tiles(out, block)  # a view: zeroing tiles zeroes `out`
    norms = np.sqrt(np.square(tiles.astype(np.float64)).sum((2, 3))).ravel()
    drop = np.argsort(norms, kind="stable")[: int(round(sparsity * norms.size))]
    rows, cols = np.unravel_index(drop, tiles.shape[:2])
    tiles[rows, cols] = 0
    return out
