"""Direct logit effects of each decoder direction, and nearest features by decoder cosine, in chunks.

logit effect of feature f = (W_dec[f] * g) @ W_U, where g is the final norm's elementwise gain. The norm's
data-dependent scale (1/rms) is left out, so values are effects up to one positive factor per token position;
the ranking of tokens is exact. The full (d_sae, vocab) matrix is never held: features go in chunks.

Speed (issue 10, 65,536 features; issue 19): the matmuls are the floor; everything else is kept to few passes over
each chunk: the top and bottom tokens by torch.topk (largest=False for the bottom: no negated copy), then one
compiled kernel per row (`_row_stats`, numba, cached on disk) for min, max, the float64 sum and the histogram
(two passes over a row that stays in cache), the same float32 arithmetic as the torch ops it replaced
(sub, mul by bins / max(hi - lo, 1e-12), clamp, truncate) and the mean as the float64 sum / vocab.
Neighbours use the symmetry of the cosine matrix: each block of it is formed once and read by both its rows
and its columns, half the multiply-adds of row chunks. Values equal the row-chunk computation bit for bit
(a block of a matrix product is the product of the blocks; tests/test_large_sae.py checks against brute force).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

class Cancelled(Exception):
    """Raised at the next chunk once the `stop` event given to logit_effects / nearest_features is set."""


def _check(stop) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled


LOGIT_BLOCK_BYTES = 32 * 2**20  # one float32 (chunk, vocab) block of effects: 170 features of a 49,152 vocabulary
LOGIT_METHOD = ("W_dec[f] * final_norm_gain @ W_U (direct path; the final norm's gain is folded in, "
                "its per-token 1/rms scale is not, so values are relative; no logit soft-capping)")


@numba.njit(cache=True, nogil=True)
def _row_stats(L, bins, hist, lo_out, hi_out, mean_out):
    """Per row of the float32 block L (c, vocab): min, max, mean (float64 sum / vocab, as float32) and the histogram
    bin counts of trunc(clamp((x - min) * (bins / max(max - min, 1e-12)), 0, bins - 1)), all in float32 arithmetic
    (bins / d formed as torch does for a number over a tensor: (1 / d) * bins, two roundings)."""
    vocab = L.shape[1]
    top = np.float32(bins - 1)
    for r in range(L.shape[0]):
        row = L[r]
        lo = row[0]
        hi = row[0]
        acc = 0.0
        for x in row:
            if x < lo:
                lo = x
            if x > hi:
                hi = x
            acc += np.float64(x)
        d = np.float32(hi - lo)
        if d < np.float32(1e-12):
            d = np.float32(1e-12)
        scale = np.float32(np.float32(np.float32(1.0) / d) * np.float32(bins))  # torch's bins / t: 1/t * bins
        h = hist[r]
        h[:] = 0
        for x in row:
            b = np.float32(np.float32(x - lo) * scale)
            if b < np.float32(0.0):
                b = np.float32(0.0)
            if b > top:
                b = top
            h[np.int64(b)] += 1
        lo_out[r] = lo
        hi_out[r] = hi
        mean_out[r] = np.float32(acc / vocab)


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, gain: torch.Tensor | None, n: int = 10, bins: int = 50,
                  chunk: int | None = None, stop=None) -> dict[str, np.ndarray]:
    """W_dec (d_sae, d), W_U (d, vocab), gain (d,) -> top/bottom n tokens and a histogram per feature.

    chunk: features per (chunk, vocab) block; None sizes it to LOGIT_BLOCK_BYTES (larger blocks multiply faster).
    stop: an optional threading.Event; once set, the next chunk raises Cancelled.

    Histogram: `bins` equal-width bins over [min, max] of the feature's effects; bin of x =
    trunc(clamp((x - min) * (bins / (max - min)), 0, bins - 1)) in float32.
    """
    assert bins <= 256, f"bins={bins}: bin indices are kept as uint8 (at most 256 bins)"
    d_sae = W_dec.shape[0]
    chunk = chunk or max(1, LOGIT_BLOCK_BYTES // (4 * W_U.shape[1]))
    W = W_dec.float() * (gain.float() if gain is not None else 1.0)
    W_U = W_U.float()
    out = {"pos_ids": np.zeros((d_sae, n), np.int32), "pos_vals": np.zeros((d_sae, n), np.float32),
           "neg_ids": np.zeros((d_sae, n), np.int32), "neg_vals": np.zeros((d_sae, n), np.float32),
           "hist": np.zeros((d_sae, bins), np.int64), "hist_lo": np.zeros(d_sae, np.float32),
           "hist_hi": np.zeros(d_sae, np.float32), "mean": np.zeros(d_sae, np.float32)}
    for s in range(0, d_sae, chunk):
        _check(stop)
        L = W[s:s + chunk] @ W_U  # (c, vocab)
        top, bot = L.topk(n, dim=-1), L.topk(n, dim=-1, largest=False)
        out["pos_ids"][s:s + chunk], out["pos_vals"][s:s + chunk] = top.indices.numpy(), top.values.numpy()
        out["neg_ids"][s:s + chunk], out["neg_vals"][s:s + chunk] = bot.indices.numpy(), bot.values.numpy()
        _row_stats(L.numpy(), bins, out["hist"][s:s + chunk], out["hist_lo"][s:s + chunk],
                   out["hist_hi"][s:s + chunk], out["mean"][s:s + chunk])
    return out


@torch.no_grad()
def nearest_features(W_dec: torch.Tensor, n: int = 10, chunk: int = 4096, stop=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-n other features by cosine similarity of decoder rows: (d_sae, n) ids and similarities, best first.

    Block (i, j) of the cosine matrix (j >= i) is formed once; its rows update the candidates of block i's
    features and its columns those of block j's. Ties in similarity are ordered by the lower feature index.
    stop: an optional threading.Event; once set, the next block raises Cancelled.
    """
    Wn = W_dec.float() / W_dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (d_sae, d)
    d_sae = Wn.shape[0]
    n = min(n, d_sae - 1)
    if n <= 0:
        return np.zeros((d_sae, 0), np.int32), np.zeros((d_sae, 0), np.float32)
    ids, sims = np.zeros((d_sae, n), np.int32), np.zeros((d_sae, n), np.float32)
    starts = range(0, d_sae, chunk)
    cands: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in starts}  # block -> (sims, ids)

    def top(S: torch.Tensor, col0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of each row of the block S (columns = features col0..), ties by the lower index."""
        k = min(n, S.shape[1])
        t = S.topk(min(k + 1, S.shape[1]), dim=-1)  # one more, to see ties at the k-th place
        v, i = t.values[:, :k], t.indices[:, :k]
        if t.values.shape[1] > k:
            tied = (t.values[:, k] == t.values[:, k - 1]).nonzero().flatten()
            if len(tied):  # topk breaks those ties arbitrarily: take them by the lower index
                o = torch.sort(S[tied], dim=1, descending=True, stable=True).indices[:, :k]
                v, i = v.clone(), i.clone()
                v[tied], i[tied] = S[tied].gather(1, o), o
        return v, i + col0

    for s in starts:
        A = Wn[s:s + chunk]
        for t in range(s, d_sae, chunk):
            _check(stop)
            S = A @ Wn[t:t + chunk].T  # (ca, cb)
            if t == s:
                rows = torch.arange(S.shape[0])
                S[rows, rows] = -float("inf")  # never one's own neighbour
            cands[s].append(top(S, t))
            if t != s:
                cands[t].append(top(S.T.contiguous(), s))  # topk along the rows of a copy: 2-3x faster
        # every block of rows s.. has been seen (columns < s earlier, as the other side): merge its candidates
        v = torch.cat([c[0] for c in cands[s]], dim=1)  # (ca, n * blocks)
        i = torch.cat([c[1] for c in cands[s]], dim=1)
        del cands[s]
        order = torch.sort(i, dim=1, stable=True).indices  # lower id first ...
        v, i = v.gather(1, order), i.gather(1, order)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :n]  # ... then by similarity
        ids[s:s + chunk], sims[s:s + chunk] = i.gather(1, order).numpy(), v.gather(1, order).numpy()
    return ids, sims
