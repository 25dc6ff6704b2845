"""Co-occurring features: for each feature, the features that fire on the same tokens most often.

Exact Jaccard over active token positions, J(a, b) = |A ∩ B| / (|A| + |B| - |A ∩ B|), where A is the set of
tokens (ctx * T + pos) on which feature a is active. The intersection sizes are the entries of C = Xᵀ X, X the
(tokens, d_sae) binary activity matrix.

Memory does not grow with the number of tokens. One pass over the activations (`read(t0, t1)`, `chunk_tokens`
tokens a call) spills two compact layouts of X to a temporary folder as raw files: its rows (the int32 features of
each token, token order) and, chunk by chunk, its columns (the int32 tokens of each feature, feature order), with
int64 offsets. C can be nearly dense (a TopK SAE with L0 = 90 puts 8,100 pairs on every token) and d_sae² is too
big to hold, so C is formed by rows, C[a, :] = Σ over the tokens t of A of X[t, :], and each row is reduced to its
top-n partners at once. That costs the products made (Σ over tokens of L0²), never nnz(X) per block of rows.
  - X's rows fit in half of `block_bytes` (the common case): they are read once; the features' tokens are read
    block by block within the rest; each worker thread forms one row of C at a time in a (d_sae,) counter and
    reduces it, scanning either the whole row or, when rows are sparse (large SAEs), only the partners it touched.
  - Otherwise a dense (b, d_sae) int32 block of C takes half the budget and X's rows are read again for each
    block, in groups of chunks that fit the other half.
Peak working memory: about `block_bytes`, plus one chunk of activations while spilling (the caller's arrays and
~8 bytes each), plus the (d_sae, n) results. Files are read with np.fromfile, never memory-mapped (mapped pages
count as resident). The loops are numba kernels (numba comes with umap-learn) on numba's threads.

Ranking: by Jaccard (the float64 quotient), descending; ties broken by the lower feature index; a feature is never
its own partner. Features with fewer than n co-occurring partners are padded with id -1, Jaccard 0, count 0.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np
from .errors import UserError

log = logging.getLogger(__name__)

BLOCK_BYTES = 128 * 2**20  # working memory of pass 2: X's rows and features' tokens, or a dense block of C
CHUNK_TOKENS = 65_536  # tokens per read() call (at L0 80: ~5M activations, ~100 MB while spilled)
_MAX_TOKENS = 2**31 - 1  # counts and token ids are int32
_SPARSE_ROWS = 0.5  # rows of C with fewer products than this times d_sae list the partners they touch
_PARALLEL_WORK = 2**22  # below this many steps a kernel runs on one thread (waking the others costs ms on busy cores)

Read = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


class CoOccurrence(NamedTuple):
    ids: np.ndarray  # (d_sae, n) int32, partner feature ids, best first; -1 = no further partner
    jaccard: np.ndarray  # (d_sae, n) float32
    counts: np.ndarray  # (d_sae, n) int32, |A ∩ B|: tokens on which both fire


# ---------------------------------------------------------------- kernels
@numba.njit(cache=True, nogil=True)
def _sort_chunk(tok, feat, t0, w, d_sae):  # pragma: no cover - compiled
    """Activations of tokens [t0, t0 + w) in any order -> rows: (w + 1,) int64 offsets and the features of each
    token ascending, repeats dropped; columns: (d_sae,) int64 counts and the tokens of each feature ascending."""
    m = tok.size
    ptr = np.zeros(w + 1, np.int64)
    for i in range(m):
        ptr[tok[i] - t0 + 1] += 1
    for t in range(w):
        ptr[t + 1] += ptr[t]
    rows = np.empty(m, np.int32)
    pos = ptr[:w].copy()
    for i in range(m):
        t = tok[i] - t0
        rows[pos[t]] = feat[i]
        pos[t] += 1
    out = 0  # sort each token's features and drop repeats, compacting in place
    for t in range(w):
        seg = np.sort(rows[ptr[t]:ptr[t + 1]])
        ptr[t] = out
        last = -1
        for v in seg:
            if v != last:
                rows[out] = v
                out += 1
                last = v
    ptr[w] = out
    fcnt = np.zeros(d_sae, np.int64)
    for i in range(out):
        fcnt[rows[i]] += 1
    fpos = np.zeros(d_sae, np.int64)
    for f in range(1, d_sae):
        fpos[f] = fpos[f - 1] + fcnt[f - 1]
    cols = np.empty(out, np.int32)
    for t in range(w):  # tokens in order, so each feature's tokens come out ascending
        for j in range(ptr[t], ptr[t + 1]):
            f = rows[j]
            cols[fpos[f]] = t0 + t
            fpos[f] += 1
    return ptr, rows[:out], fcnt, cols


@numba.njit(cache=True, nogil=True, parallel=True)
def _accumulate(c, col_ptr, col_tok, tok_base, row_ptr, row_feat):  # pragma: no cover - compiled
    """c[r, :] += the rows of X at the tokens col_tok[col_ptr[k, r]:col_ptr[k, r + 1]] of every chunk k
    (token t is row t - tok_base of row_ptr/row_feat)."""
    for r in numba.prange(c.shape[0]):
        for k in range(col_ptr.shape[0]):
            for i in range(col_ptr[k, r], col_ptr[k, r + 1]):
                t = col_tok[i] - tok_base
                for j in range(row_ptr[t], row_ptr[t + 1]):
                    c[r, row_feat[j]] += 1


@numba.njit(cache=True, nogil=True)
def _offer(best, ids, cnt, k, v, f, x):  # pragma: no cover - compiled
    """Offer partner f (Jaccard v, count x) to a top list of k <= n entries sorted by (v desc, f asc); -> new k."""
    n = best.size
    if k == n:
        if v < best[n - 1] or (v == best[n - 1] and f > ids[n - 1]):
            return k
        p = n - 1
    else:
        p = k
        k += 1
    while p > 0 and (best[p - 1] < v or (best[p - 1] == v and ids[p - 1] > f)):
        best[p] = best[p - 1]
        ids[p] = ids[p - 1]
        cnt[p] = cnt[p - 1]
        p -= 1
    best[p] = v
    ids[p] = f
    cnt[p] = x
    return k


@numba.njit(cache=True, nogil=True, parallel=True)
def _top_n(c, n_active, j0, ids, jac, cnt):  # pragma: no cover - compiled
    """Rows of dense counts c (features j0..) -> top-n partners in ids/jac/cnt (prefilled -1/0/0); the Jaccard
    values compared are exact float64 quotients."""
    b, d = c.shape
    n = ids.shape[1]
    for r in numba.prange(b):
        a, ids_r, cnt_r, c_r = j0 + r, ids[r], cnt[r], c[r]  # row views made once (each costs a refcount)
        best = np.empty(n, np.float64)
        k = 0
        for f in range(d):
            x = c_r[f]
            if x == 0 or f == a:
                continue
            v = x / (n_active[a] + n_active[f] - x)
            if k < n or v > best[n - 1]:  # (a later f never wins a tie here: f ascends)
                k = _offer(best, ids_r, cnt_r, k, v, f, x)
        jac[r, :k] = best[:k]


@numba.njit(cache=True, nogil=True, parallel=True)
def _fused(col_ptr, col_tok, tok_base, row_ptr, row_feat, n_active, j0, ids, jac, cnt, workers,
           sparse):  # pragma: no cover - compiled
    """_accumulate and _top_n in one, a row at a time, for rows of X that are all in memory: each worker keeps one
    (d_sae,) row of counts, hot in cache. sparse: also list the partners a row touches and scan only those (for
    rows with few partners: large SAEs); else scan the whole row (partners are most features)."""
    b, n, d = ids.shape[0], ids.shape[1], n_active.size
    for w in numba.prange(workers):
        acc = np.zeros(d, np.int32)  # (d_sae,) |A ∩ B| of the current row, back to 0 after it
        touched = np.empty(d if sparse else 0, np.int32)
        best = np.empty(n, np.float64)
        for r in range(w, b, workers):
            a, m = j0 + r, 0
            for kk in range(col_ptr.shape[0]):
                for i in range(col_ptr[kk, r], col_ptr[kk, r + 1]):
                    t = col_tok[i] - tok_base
                    if sparse:
                        for j in range(row_ptr[t], row_ptr[t + 1]):
                            f = row_feat[j]
                            if acc[f] == 0:
                                touched[m] = f
                                m += 1
                            acc[f] += 1
                    else:
                        for j in range(row_ptr[t], row_ptr[t + 1]):
                            acc[row_feat[j]] += 1
            k, ids_r, cnt_r = 0, ids[r], cnt[r]
            for q in range(m if sparse else d):
                f = touched[q] if sparse else q
                x = acc[f]
                if x == 0:
                    continue
                acc[f] = 0
                if f == a:
                    continue
                v = x / (n_active[a] + n_active[f] - x)
                if k < n or v > best[n - 1] or (v == best[n - 1] and f < ids_r[n - 1]):
                    k = _offer(best, ids_r, cnt_r, k, v, f, x)
            jac[r, :k] = best[:k]


@contextmanager
def _threads(work: int) -> Iterator[None]:
    """Run the parallel kernels inside on one thread when `work` is small."""
    before = numba.get_num_threads()
    if work < _PARALLEL_WORK:
        numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


# ---------------------------------------------------------------- pass 1: spill X to disk, chunk by chunk
_FILES = {"rows": np.int32, "tok_off": np.int64, "cols": np.int32, "feat_off": np.int64}


@dataclass
class _Spill:
    """X on disk, raw arrays. rows: the features of each token (token, then feature order); tok_off: (n_tokens + 1,)
    offsets into rows. cols: chunk by chunk, the tokens of each feature (feature, then token order); feat_off:
    (n_chunks, d_sae + 1) offsets into cols. Chunk k covers tokens [tok_bounds[k], tok_bounds[k + 1]) and entries
    [nnz_bounds[k], nnz_bounds[k + 1]) of both rows and cols."""

    folder: Path
    d_sae: int
    tok_bounds: list[int] = field(default_factory=lambda: [0])
    nnz_bounds: list[int] = field(default_factory=lambda: [0])
    n_active: np.ndarray | None = None  # (d_sae,) int64, |A|

    def read(self, name: str, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """`count` entries of file `name` from entry `start`, into `out` (of that size) when given."""
        a = np.empty(count, dtype=_FILES[name]) if out is None else out
        with open(self.folder / f"{name}.bin", "rb") as f:
            f.seek(start * a.itemsize)
            got = f.readinto(memoryview(a).cast("B"))
        assert got == a.nbytes, f"{name}: short read ({got} of {a.nbytes} bytes at entry {start})"
        return a

    def row_bytes(self, k0: int, k1: int) -> int:
        """Memory of the rows of chunks k0..k1-1: int32 features + int64 token offsets."""
        return 4 * (self.nnz_bounds[k1] - self.nnz_bounds[k0]) + 8 * (self.tok_bounds[k1] - self.tok_bounds[k0] + 1)

    def rows(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of X for the tokens of chunks k0..k1-1: (tokens + 1,) int64 offsets from 0, (nnz,) int32 features."""
        t0, t1 = self.tok_bounds[k0], self.tok_bounds[k1]
        s0, s1 = self.nnz_bounds[k0], self.nnz_bounds[k1]
        ptr = self.read("tok_off", t0, t1 - t0 + 1)
        ptr -= s0
        return ptr, self.read("rows", s0, s1 - s0)

    def cols(self, k0: int, k1: int, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of features j0..j1-1 in chunks k0..k1-1: (k1 - k0, j1 - j0 + 1) int64 offsets into the
        (m,) int32 token ids of those chunks, one after the other."""
        offs = np.empty((k1 - k0, j1 - j0 + 1), dtype=np.int64)
        for k in range(k0, k1):
            self.read("feat_off", k * (self.d_sae + 1) + j0, j1 - j0 + 1, out=offs[k - k0])
        sizes = offs[:, -1] - offs[:, 0]
        toks = np.empty(int(sizes.sum()), dtype=np.int32)
        at = np.cumsum(sizes) - sizes  # where each chunk's tokens go in `toks`
        for i, k in enumerate(range(k0, k1)):
            self.read("cols", int(offs[i, 0]), int(sizes[i]), out=toks[at[i]:at[i] + sizes[i]])
        offs += (at - offs[:, 0])[:, None]
        return offs, toks


def _spill(read: Read, n_tokens: int, d_sae: int, chunk_tokens: int, folder: Path) -> _Spill:
    x = _Spill(folder, d_sae, n_active=np.zeros(d_sae, dtype=np.int64))
    with ExitStack() as stack:
        out = {name: stack.enter_context(open(folder / f"{name}.bin", "wb")) for name in _FILES}
        np.zeros(1, dtype=np.int64).tofile(out["tok_off"])
        for t0 in range(0, n_tokens, chunk_tokens):
            t1 = min(n_tokens, t0 + chunk_tokens)
            tok, feat = _checked_pairs(*read(t0, t1), d_sae, where=f"read({t0}, {t1}): ")
            if tok.size and (tok.min() < t0 or tok.max() >= t1):
                raise UserError(f"read({t0}, {t1}) must return token_index in [{t0}, {t1}); got "
                                 f"{tok.min()}..{tok.max()}")
            s = x.nnz_bounds[-1]
            tok, feat = np.ascontiguousarray(tok, dtype=np.int64), np.ascontiguousarray(feat, dtype=np.int32)
            ptr, rows, fcnt, cols = _sort_chunk(tok, feat, t0, t1 - t0, d_sae)
            del tok, feat
            rows.tofile(out["rows"])
            (ptr[1:] + s).tofile(out["tok_off"])
            cols.tofile(out["cols"])
            offs = np.empty(d_sae + 1, dtype=np.int64)
            offs[0] = s
            np.cumsum(fcnt, out=offs[1:])
            offs[1:] += s
            offs.tofile(out["feat_off"])
            x.n_active += fcnt
            x.tok_bounds.append(t1)
            x.nnz_bounds.append(s + rows.size)
    return x


# ---------------------------------------------------------------- pass 2: C one block of rows at a time
def _plan_groups(x: _Spill, budget: int) -> list[tuple[int, int]]:
    """Consecutive chunks whose rows fit `budget` bytes together (a chunk that alone exceeds it is a group)."""
    groups, k0, n_chunks = [], 0, len(x.tok_bounds) - 1
    for k in range(1, n_chunks + 1):
        if k - 1 > k0 and x.row_bytes(k0, k) > budget:
            groups.append((k0, k - 1))
            k0 = k - 1
    if n_chunks:
        groups.append((k0, n_chunks))
    return groups


def _fused_blocks(x: _Spill, budget: int) -> list[tuple[int, int]]:
    """Feature ranges whose tokens (int32) and per-chunk offsets (int64) fit `budget` bytes (at least one each)."""
    blocks, j0, used = [], 0, 0
    for f, cost in enumerate((4 * x.n_active + 8 * (len(x.tok_bounds) - 1)).tolist()):
        if f > j0 and used + cost > budget:
            blocks.append((j0, f))
            j0, used = f, 0
        used += cost
    return [*blocks, (j0, x.d_sae)]


def _reduce(x: _Spill, n: int, block_bytes: int) -> tuple[CoOccurrence, str]:
    """-> the result and how it was formed (for the log)."""
    d_sae, n_chunks = x.d_sae, len(x.tok_bounds) - 1
    ids = np.full((d_sae, n), -1, dtype=np.int32)
    jac = np.zeros((d_sae, n), dtype=np.float32)
    cnt = np.zeros((d_sae, n), dtype=np.int32)
    if n_chunks == 0:
        return CoOccurrence(ids, jac, cnt), "no tokens"
    all_rows = x.row_bytes(0, n_chunks)
    if all_rows <= block_bytes // 2:
        # X's rows fit: read them once; per block of features, their tokens (the rest of the budget), reduced row
        # by row (`_fused`: no dense block of C)
        row_ptr, row_feat = x.rows(0, n_chunks)
        blocks = _fused_blocks(x, block_bytes - all_rows - 8 * d_sae * numba.get_num_threads())
        n_sparse = 0
        for j0, j1 in blocks:
            col_ptr, col_tok = x.cols(0, n_chunks, j0, j1)
            if not col_tok.size:
                continue  # silent features have no partners (already padded)
            products = col_tok.size * row_feat.size // max(1, row_ptr.size - 1)  # about
            sparse = products < _SPARSE_ROWS * (j1 - j0) * d_sae
            n_sparse += sparse
            with _threads(products):
                _fused(col_ptr, col_tok, 0, row_ptr, row_feat, x.n_active, j0, ids[j0:j1], jac[j0:j1], cnt[j0:j1],
                       numba.get_num_threads(), sparse)
        return CoOccurrence(ids, jac, cnt), f"X's rows resident, {len(blocks)} blocks row by row ({n_sparse} sparse)"
    # else: a dense (b, d_sae) int32 block of C in half the budget, X's rows read per block in groups of chunks
    # that fit the other half
    groups = _plan_groups(x, block_bytes // 2)
    b = int(max(1, min(d_sae, block_bytes // 2 // (4 * d_sae))))  # rows of C per block
    c = np.empty((b, d_sae), dtype=np.int32)  # (b, d_sae) |A ∩ B| for the features A of this block
    resident = x.rows(*groups[0]) if len(groups) == 1 else None  # one chunk too big for the half: read it once
    n_blocks = 0
    for j0 in range(0, d_sae, b):
        j1 = min(d_sae, j0 + b)
        if not x.n_active[j0:j1].any():
            continue  # silent features have no partners (already padded)
        n_blocks += 1
        cb = c[: j1 - j0]
        cb[:] = 0
        for k0, k1 in groups:
            col_ptr, col_tok = x.cols(k0, k1, j0, j1)  # the tokens of features j0..j1-1 in these chunks
            if col_tok.size:
                row_ptr, row_feat = resident if resident is not None else x.rows(k0, k1)
                with _threads(col_tok.size * row_feat.size // max(1, row_ptr.size - 1)):
                    _accumulate(cb, col_ptr, col_tok, x.tok_bounds[k0], row_ptr, row_feat)
                del row_ptr, row_feat
        with _threads(cb.size):
            _top_n(cb, x.n_active, j0, ids[j0:j1], jac[j0:j1], cnt[j0:j1])
    return CoOccurrence(ids, jac, cnt), f"{n_blocks} dense blocks of {b} rows x {len(groups)} row groups"


# ---------------------------------------------------------------- entry points
def _checked_pairs(token_index: np.ndarray, feature: np.ndarray, d_sae: int,
                   where: str = "") -> tuple[np.ndarray, np.ndarray]:
    token_index = np.asarray(token_index)
    feature = np.asarray(feature)
    if token_index.shape != feature.shape or token_index.ndim != 1:
        raise UserError(f"{where}token_index and feature must be 1-D arrays of the same length; got shapes "
                         f"{token_index.shape} and {feature.shape}")
    if not (np.issubdtype(token_index.dtype, np.integer) and np.issubdtype(feature.dtype, np.integer)):
        raise UserError(f"{where}token_index and feature must be integer arrays; got {token_index.dtype} and "
                         f"{feature.dtype}")
    if feature.size:
        lo, hi = int(feature.min()), int(feature.max())
        if lo < 0 or hi >= d_sae:
            raise UserError(f"{where}feature ids must be in [0, {d_sae}); got {lo}..{hi}")
        if token_index.min() < 0:
            raise UserError(f"{where}token_index must be >= 0 (ctx * T + pos); got {token_index.min()}")
    return token_index, feature


def _check_sizes(n_tokens: int, d_sae: int, n: int, chunk_tokens: int, block_bytes: int) -> None:
    if n < 1:
        raise UserError(f"n must be >= 1; got {n}")
    if d_sae < 2:
        raise UserError(f"co-occurrence needs at least 2 features; got d_sae={d_sae}")
    if not 0 <= n_tokens <= _MAX_TOKENS:
        raise UserError(f"n_tokens must be in [0, {_MAX_TOKENS}] (int32 counts and token ids); got {n_tokens}")
    if chunk_tokens < 1:
        raise UserError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    if block_bytes < 1:
        raise UserError(f"block_bytes must be >= 1; got {block_bytes}")


def cooccurrence_from_chunks(read: Read, n_tokens: int, d_sae: int, n: int = 10, chunk_tokens: int = CHUNK_TOKENS,
                             block_bytes: int = BLOCK_BYTES, temp_dir: Path | None = None) -> CoOccurrence:
    """Top-n co-occurring features of every feature by exact Jaccard over active token positions.

    read(t0, t1) -> (token_index int64, feature int32): every activation with t0 <= token_index < t1, in any
    order (a repeated (token, feature) pair counts once). It is called once per chunk of `chunk_tokens` tokens,
    in order, over [0, n_tokens). The spilled layout (~8 bytes per activation) lives in a temporary folder
    under `temp_dir` (the system's default when None) and is removed at the end.
    """
    _check_sizes(n_tokens, d_sae, n, chunk_tokens, block_bytes)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cooccur-", dir=temp_dir) as folder:
        x = _spill(read, n_tokens, d_sae, chunk_tokens, Path(folder))
        t_spill = time.perf_counter() - t
        res, how = _reduce(x, n, block_bytes)
    log.info("co-occurrence: %d activations, %d tokens, %d features; %d chunks read in %.1f s; %s; %.1f s in all",
             x.nnz_bounds[-1], n_tokens, d_sae, len(x.tok_bounds) - 1, t_spill, how, time.perf_counter() - t)
    return res


def cooccurrence(token_index: np.ndarray, feature: np.ndarray, d_sae: int, n: int = 10,
                 block_bytes: int = BLOCK_BYTES, chunk_tokens: int = CHUNK_TOKENS,
                 temp_dir: Path | None = None) -> CoOccurrence:
    """cooccurrence_from_chunks over activations held in memory (a thin wrapper for tests and small callers).

    token_index: (nnz,) int64, ctx * T + pos of each activation; feature: (nnz,) int32, the active feature.
    """
    token_index, feature = _checked_pairs(token_index, feature, d_sae)
    n_tokens = int(token_index.max()) + 1 if token_index.size else 0
    _check_sizes(n_tokens, d_sae, n, chunk_tokens, block_bytes)
    if token_index.size and (np.diff(token_index) < 0).any():
        order = np.argsort(token_index, kind="stable")
        token_index, feature = token_index[order], feature[order]
        del order

    def read(t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        i0, i1 = np.searchsorted(token_index, [t0, t1])
        return token_index[i0:i1], feature[i0:i1]

    return cooccurrence_from_chunks(read, n_tokens, d_sae, n, chunk_tokens, block_bytes, temp_dir)
