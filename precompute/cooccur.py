"""Co-occurring features: for each feature, the features that fire on the same tokens most often.

Exact Jaccard over active token positions, J(a, b) = |A ∩ B| / (|A| + |B| - |A ∩ B|), where A is the set of
tokens (ctx * T + pos) on which feature a is active. All intersection sizes come from one sparse product
C = Xᵀ X with X the (tokens, d_sae) binary CSR matrix of activity. C can be nearly dense (a TopK SAE with
L0 = 90 puts 8,100 pairs on every token), so it is formed one block of columns at a time, C[:, j0:j1] =
Xᵀ X[:, j0:j1], and each block is reduced to its top-n partners before the next is formed: memory is
bounded by `block_bytes`, not by d_sae².

Ranking: by Jaccard, descending; ties broken by the lower feature index; a feature is never its own
partner. Features with fewer than n co-occurring partners are padded with id -1, Jaccard 0, count 0.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

BLOCK_BYTES = 256 * 2**20  # working memory for one dense block of C (~32 bytes per entry)


class CoOccurrence(NamedTuple):
    ids: np.ndarray  # (d_sae, n) int32, partner feature ids, best first; -1 = no further partner
    jaccard: np.ndarray  # (d_sae, n) float32
    counts: np.ndarray  # (d_sae, n) int32, |A ∩ B|: tokens on which both fire


def activity_matrix(token_index: np.ndarray, feature: np.ndarray, d_sae: int,
                    n_tokens: int | None = None) -> sp.csr_matrix:
    """Parallel arrays of (token, feature) activations -> (n_tokens, d_sae) binary CSR (duplicates count once)."""
    token_index = np.asarray(token_index)
    feature = np.asarray(feature)
    if token_index.shape != feature.shape or token_index.ndim != 1:
        raise ValueError(f"token_index and feature must be 1-D arrays of the same length; got shapes "
                         f"{token_index.shape} and {feature.shape}")
    if not (np.issubdtype(token_index.dtype, np.integer) and np.issubdtype(feature.dtype, np.integer)):
        raise ValueError(f"token_index and feature must be integer arrays; got {token_index.dtype} and {feature.dtype}")
    if feature.size:
        if feature.min() < 0 or feature.max() >= d_sae:
            raise ValueError(f"feature ids must be in [0, {d_sae}); got {feature.min()}..{feature.max()}")
        if token_index.min() < 0:
            raise ValueError(f"token_index must be >= 0 (ctx * T + pos); got {token_index.min()}")
    need = int(token_index.max()) + 1 if token_index.size else 0
    n_tokens = need if n_tokens is None else n_tokens
    if n_tokens < need:
        raise ValueError(f"n_tokens={n_tokens} but token_index reaches {need - 1}")
    x = sp.csr_matrix((np.ones(feature.size, dtype=np.int32), (token_index.astype(np.int64), feature.astype(np.int32))),
                      shape=(n_tokens, d_sae))  # duplicates are summed here ...
    x.sum_duplicates()
    x.data[:] = 1  # ... and reset to 1: activity is a set, not a multiset
    return x


def _top_in_block(c: np.ndarray, n_active: np.ndarray, cols: np.ndarray, n: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """c: (d_sae, b) intersection counts for the features `cols` -> top-n (b, n) ids, Jaccard, counts."""
    d_sae, b = c.shape
    union = n_active[:, None] + n_active[None, cols] - c  # (d_sae, b)
    jac = np.divide(c, union, out=np.zeros(c.shape, dtype=np.float64), where=union > 0)  # (d_sae, b)
    jac[cols, np.arange(b)] = -1.0  # never a feature's own partner
    m = min(n, d_sae - 1)
    # the m-th largest value of each column; everything >= it (ties included) is a candidate
    kth = -np.partition(-jac, m - 1, axis=0)[m - 1]  # (b,)
    rows, bcol = np.nonzero((jac >= kth[None, :]) & (jac > 0))  # candidates, few per column
    order = np.lexsort((rows, -jac[rows, bcol], bcol))  # by column, then Jaccard desc, then lower index
    rows, bcol = rows[order], bcol[order]
    start = np.searchsorted(bcol, np.arange(b))  # first candidate of each column
    rank = np.arange(len(bcol)) - start[bcol]
    keep = rank < n
    ids = np.full((b, n), -1, dtype=np.int32)
    jv = np.zeros((b, n), dtype=np.float32)
    cnt = np.zeros((b, n), dtype=np.int32)
    r, k, col = rows[keep], rank[keep], bcol[keep]
    ids[col, k] = r
    jv[col, k] = jac[r, col]
    cnt[col, k] = c[r, col]
    return ids, jv, cnt


def cooccurrence(token_index: np.ndarray, feature: np.ndarray, d_sae: int, n: int = 10,
                 block_bytes: int = BLOCK_BYTES) -> CoOccurrence:
    """Top-n co-occurring features of every feature by exact Jaccard over active token positions.

    token_index: (nnz,) int64, ctx * T + pos of each activation; feature: (nnz,) int32, the active feature.
    Pass every nonzero activation of the corpus (memory-mapped arrays are fine).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if d_sae < 2:
        raise ValueError(f"co-occurrence needs at least 2 features; got d_sae={d_sae}")
    t0 = time.perf_counter()
    x = activity_matrix(token_index, feature, d_sae)  # (n_tokens, d_sae) CSR
    if x.shape[0] >= 2**31:
        raise ValueError(f"{x.shape[0]} tokens exceed the int32 counts used here (limit 2**31 - 1)")
    n_active = np.asarray(x.sum(axis=0)).ravel().astype(np.int64)  # (d_sae,) |A|
    nnz, n_tokens = x.nnz, x.shape[0]
    xc = x.tocsc()  # (n_tokens, d_sae); column blocks are cheap slices of CSC
    del x
    xt = xc.T  # (d_sae, n_tokens) CSR, a view of the same arrays
    b = int(max(1, min(d_sae, block_bytes // (32 * d_sae))))
    ids = np.empty((d_sae, n), dtype=np.int32)
    jac = np.empty((d_sae, n), dtype=np.float32)
    cnt = np.empty((d_sae, n), dtype=np.int32)
    for j0 in range(0, d_sae, b):
        j1 = min(d_sae, j0 + b)
        c = (xt @ xc[:, j0:j1]).toarray()  # (d_sae, j1 - j0) int32: |A ∩ B| for B in this block
        ids[j0:j1], jac[j0:j1], cnt[j0:j1] = _top_in_block(c, n_active, np.arange(j0, j1), n)
    log.info("co-occurrence: %d activations, %d tokens, %d features, blocks of %d, %.1f s",
             nnz, n_tokens, d_sae, b, time.perf_counter() - t0)
    return CoOccurrence(ids, jac, cnt)
