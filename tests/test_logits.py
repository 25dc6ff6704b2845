"""precompute/logits.py: logit effects and nearest decoder neighbours (chunked for large SAEs) equal brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.precompute.logits import logit_effects, nearest_features


def _brute_neighbours(W: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every cosine in float32 through one full matrix product; best first, ties by the lower index."""
    Wt = torch.from_numpy(W)
    Wn = Wt / Wt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    S = (Wn @ Wn.T).numpy().astype(np.float64)  # (d_sae, d_sae); float32 values, exactly representable
    np.fill_diagonal(S, -np.inf)
    ids = np.stack([np.lexsort((np.arange(len(S)), -row))[:n] for row in S])
    return ids, np.take_along_axis(S, ids, 1).astype(np.float32)


@pytest.mark.parametrize("d_sae,chunk", [(300, 64), (257, 300), (130, 13)])
def test_nearest_features_equal_brute_force_with_ties(d_sae, chunk):
    g = np.random.default_rng(d_sae)
    W = g.standard_normal((d_sae, 24)).astype(np.float32)
    W[5] = W[200 % d_sae]  # duplicate directions: a cosine of 1 tied between two features
    W[7] = 3 * W[200 % d_sae]
    W[11] = 0  # a zero row: cosine 0 with everything, so its whole list is ties (lowest ids win)
    W[12, :] = W[13, :] * 2
    ids, sims = nearest_features(torch.from_numpy(W), n=10, chunk=chunk)
    want_ids, want_sims = _brute_neighbours(W, 10)
    np.testing.assert_array_equal(sims, want_sims)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids[11].tolist() == list(range(10))  # the zero row's ties, lowest ids first (itself excluded)
    assert ids.dtype == np.int32 and sims.dtype == np.float32


def test_nearest_features_of_a_tiny_sae():
    W = torch.randn(3, 8)
    ids, sims = nearest_features(W, n=10)  # n is capped at d_sae - 1
    assert ids.shape == sims.shape == (3, 2) and set(ids[0].tolist()) == {1, 2}


@pytest.mark.parametrize("chunk", [7, 64, None])
def test_logit_effects_equal_brute_force(chunk):
    g = np.random.default_rng(3)
    d_sae, d, vocab, n, bins = 40, 16, 500, 5, 50
    W = torch.from_numpy(g.standard_normal((d_sae, d)).astype(np.float32))
    W_U = torch.from_numpy(g.standard_normal((d, vocab)).astype(np.float32))
    gain = torch.from_numpy((g.random(d) + 0.5).astype(np.float32))
    W[3] = 0  # every effect 0: one bin, min = max
    out = logit_effects(W, W_U, gain, n=n, bins=bins, chunk=chunk)
    chunk = chunk or d_sae  # None: blocks of LOGIT_BLOCK_BYTES, far more than these 40 rows
    # float32 products depend on the BLAS kernel picked for the block's shape (last-bit differences), so the
    # reference forms them in the same row blocks; everything after the product is checked exactly
    Ln = np.concatenate([((W[s:s + chunk] * gain) @ W_U).numpy() for s in range(0, d_sae, chunk)])
    exact = (W.double() * gain.double()) @ W_U.double()
    np.testing.assert_allclose(Ln, exact.numpy(), rtol=0, atol=1e-4)
    for f in range(d_sae):
        row = Ln[f]
        order = np.lexsort((np.arange(vocab), -row))
        if f != 3:  # (no ties among random effects: ids are then unambiguous)
            np.testing.assert_array_equal(out["pos_ids"][f], order[:n])
            np.testing.assert_array_equal(out["neg_ids"][f], np.lexsort((np.arange(vocab), row))[:n])
        np.testing.assert_array_equal(out["pos_vals"][f], row[order[:n]])
        np.testing.assert_array_equal(out["neg_vals"][f], np.sort(row)[:n])
        assert out["mean"][f] == np.float32(row.astype(np.float64).sum() / vocab)
        lo, hi = row.min(), row.max()
        assert out["hist_lo"][f] == lo and out["hist_hi"][f] == hi
        # the bin rule, in float32 one step at a time: trunc(clamp((x - lo) * (bins / max(hi - lo, 1e-12))))
        scale = np.float32(bins) / np.maximum(np.float32(hi - lo), np.float32(1e-12))
        b = np.clip((row - lo) * scale, 0, bins - 1).astype(np.int64)
        np.testing.assert_array_equal(out["hist"][f], np.bincount(b, minlength=bins))
        assert out["hist"][f].sum() == vocab
    assert out["hist"][3][0] == vocab
