"""Exact co-occurrence read chunk by chunk (precompute/cooccur.py), checked against Python sets."""

from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import pytest
import torch

from saescope.precompute.cooccur import cooccurrence, cooccurrence_from_chunks
from tests.helpers import jaccard_reference


def check(res, want: dict[int, list[tuple]], n: int) -> None:
    for a, cands in want.items():
        k = len(cands)
        assert res.ids[a].tolist() == [b for _, b, _ in cands] + [-1] * (n - k), a
        assert res.jaccard[a, :k].tolist() == [np.float32(-j) for j, _, _ in cands], a
        assert res.counts[a, :k].tolist() == [i for _, _, i in cands], a
        assert (res.jaccard[a, k:] == 0).all() and (res.counts[a, k:] == 0).all(), a


def reader(tok: np.ndarray, feat: np.ndarray, seed: int = 0):
    """read(t0, t1) over in-memory activations, each chunk shuffled; records its calls."""
    rng = np.random.default_rng(seed)
    calls = []

    def read(t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((t0, t1))
        sel = np.flatnonzero((tok >= t0) & (tok < t1))
        sel = sel[rng.permutation(sel.size)]
        return tok[sel].astype(np.int64), feat[sel].astype(np.int32)

    return read, calls


@pytest.fixture(scope="module")
def skewed():
    """37 features over tokens 0..149 of 170 (the rest silent): skewed, repeated pairs, feature 20 never active,
    features 35 and 36 on the same 40 tokens (a Jaccard tie for everyone who meets both)."""
    rng = np.random.default_rng(2)
    d_sae, n = 37, 6
    tok = rng.integers(0, 150, 900).astype(np.int64)
    feat = (rng.zipf(1.6, 900) % d_sae).astype(np.int32)
    feat[feat == 20] = 21
    feat[:40], tok[:40] = 36, np.arange(40)
    feat[40:80], tok[40:80] = 35, np.arange(40)
    assert len(set(zip(tok.tolist(), feat.tolist()))) < tok.size  # repeats are there
    return tok, feat, d_sae, n, jaccard_reference(tok, feat, d_sae, n)


# chunk sizes that do not divide 170, one token a chunk, everything in one; budgets from one row of C a block
# with every chunk's rows read per block (groups of single chunks), through uneven blocks with rows read in groups
# of several chunks, to all of X's rows resident, reduced row by row in several blocks ("fused") or in one
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize("block_bytes", [1, 1000, 2400, "fused", 2**28])
def test_chunked_equals_sets_and_the_in_memory_wrapper(skewed, chunk_tokens, block_bytes, tmp_path, caplog):
    tok, feat, d_sae, n, want = skewed
    read, calls = reader(tok, feat)
    if block_bytes == "fused":  # twice X's rows (int32 features + int64 token offsets): they just fit
        block_bytes = 2 * (4 * len(set(zip(tok.tolist(), feat.tolist()))) + 8 * 171)
    with caplog.at_level(logging.INFO, logger="saescope.precompute.cooccur"):
        res = cooccurrence_from_chunks(read, 170, d_sae, n=n, chunk_tokens=chunk_tokens, block_bytes=block_bytes,
                                       temp_dir=tmp_path)
    if block_bytes <= 2400:  # a dense block of C, X's rows read in groups of chunks
        blocks, groups = map(int, re.search(r"(\d+) dense blocks of \d+ rows x (\d+) row groups", caplog.text).groups())
        assert blocks > 1 and (groups > 1 or chunk_tokens == 1000)
    else:  # X's rows resident, C's rows formed and reduced one at a time
        blocks = int(re.search(r"resident, (\d+) blocks row by row", caplog.text).group(1))
        assert blocks > 1 or block_bytes == 2**28 or chunk_tokens > 7
    bounds = list(range(0, 170, chunk_tokens)) + [170]
    assert calls == list(itertools.pairwise(bounds))  # one pass, in order, every token once
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone
    assert res.ids.shape == res.jaccard.shape == res.counts.shape == (d_sae, n)
    assert res.ids.dtype == np.int32 and res.jaccard.dtype == np.float32 and res.counts.dtype == np.int32
    check(res, want, n)
    assert (res.ids[20] == -1).all() and not (res.ids == 20).any()  # never active: no partners, nobody's partner
    assert (res.ids != np.arange(d_sae)[:, None]).all()  # never its own partner
    mem = cooccurrence(tok, feat, d_sae, n=n, block_bytes=block_bytes, chunk_tokens=chunk_tokens)
    for got, exp in zip(res, mem):
        np.testing.assert_array_equal(got, exp)


def test_ties_go_to_the_lower_index_across_blocks_and_chunks():
    """Features 3, 9, 14, 20 and 27 fire on the same tokens; 1 fires on half of them. Every twin has four partners
    of Jaccard 1, and n = 2 keeps the two lowest; feature 1 sees five equal partners."""
    d_sae, n = 30, 2
    twins = [3, 9, 14, 20, 27]
    tok = np.repeat(np.arange(0, 60, 3), len(twins)).astype(np.int64)
    feat = np.tile(twins, 20).astype(np.int32)
    tok = np.concatenate([tok, np.arange(0, 60, 6)])
    feat = np.concatenate([feat, np.full(10, 1, np.int32)])
    want = jaccard_reference(tok, feat, d_sae, n)
    assert want[27] == [(-1.0, 3, 20), (-1.0, 9, 20)] and want[1] == [(-0.5, 3, 10), (-0.5, 9, 10)]
    for chunk_tokens, block_bytes in [(5, 1), (13, 4 * d_sae * 7), (100, 2**20)]:
        read, _ = reader(tok, feat, seed=chunk_tokens)
        check(cooccurrence_from_chunks(read, 60, d_sae, n=n, chunk_tokens=chunk_tokens, block_bytes=block_bytes),
              want, n)


def test_ties_in_sparse_rows_where_partners_are_met_out_of_order(caplog):
    """3,000 features, few partners each: rows of C list the partners they touch, in the order met (token by
    token). Feature 0 fires on tokens 0..3; it meets 2900, 2000, 700 and 5 in that order, each once, each active
    on one token: four partners of Jaccard 1/4, to be ranked 5, 700, 2000, 2900."""
    d_sae = 3000
    tok = np.array([0, 1, 2, 3, 0, 1, 2, 3], dtype=np.int64)
    feat = np.array([0, 0, 0, 0, 2900, 2000, 700, 5], dtype=np.int32)
    for n in (1, 2, 4, 6):
        want = jaccard_reference(tok, feat, d_sae, n, which=[0, 5, 2900])
        assert [b for _, b, _ in want[0]] == [5, 700, 2000, 2900][:n]
        with caplog.at_level(logging.INFO, logger="saescope.precompute.cooccur"):
            res = cooccurrence(tok, feat, d_sae, n=n)
        assert re.search(r"resident, 1 blocks row by row \(1 sparse\)", caplog.text)
        check(res, want, n)


@pytest.mark.parametrize("d_sae, n_tok, l0, block_bytes, how", [
    (300, 3000, 12, 4 * 300 * 23, r"\d+ dense blocks"),  # X's rows read per block of 23 rows of C
    (300, 3000, 12, 2**28, r"resident, 1 blocks row by row \(0 sparse\)"),  # most features meet: whole rows scanned
    (2000, 400, 6, 2**28, r"resident, 1 blocks row by row \(1 sparse\)"),  # few partners each: only those scanned
])
def test_larger_random_corpora_on_a_sample_of_features(d_sae, n_tok, l0, block_bytes, how, caplog):
    """Feature frequencies spread over two orders of magnitude."""
    rng = np.random.default_rng(5)
    n = 10
    p = rng.lognormal(0, 1.2, d_sae)
    tok = np.repeat(np.arange(n_tok), l0).astype(np.int64)
    feat = rng.choice(d_sae, tok.size, p=p / p.sum()).astype(np.int32)
    sample = list(range(0, d_sae, d_sae // 23))
    want = jaccard_reference(tok, feat, d_sae, n, which=sample)
    assert any(len(c) == n for c in want.values())  # full lists (ties at the cut too, likely)
    read, _ = reader(tok, feat)
    with caplog.at_level(logging.INFO, logger="saescope.precompute.cooccur"):
        res = cooccurrence_from_chunks(read, n_tok, d_sae, n=n, chunk_tokens=700, block_bytes=block_bytes)
    assert re.search(how, caplog.text), caplog.text
    check(res, want, n)


def test_nothing_to_pair():
    """No tokens, tokens without activations, and n above the number of other features: all padding."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int32))
    for n_tokens in (0, 10):
        res = cooccurrence_from_chunks(lambda t0, t1: empty, n_tokens, 4, n=3, chunk_tokens=4)
        assert (res.ids == -1).all() and (res.jaccard == 0).all() and (res.counts == 0).all()
    res = cooccurrence(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2]), 3, n=5)  # only 2 others exist
    check(res, jaccard_reference(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2]), 3, 5), 5)
    assert res.ids[2].tolist() == [0, 1, -1, -1, -1] and res.jaccard[0, :2].tolist() == [1.0, 0.5]


def test_bad_input_says_what_is_allowed():
    def rd(tok, feat):
        return lambda t0, t1: (np.asarray(tok), np.asarray(feat))

    with pytest.raises(ValueError, match=r"read\(0, 4\) must return token_index in \[0, 4\); got 2\.\.5"):
        cooccurrence_from_chunks(rd([2, 5], [0, 1]), 8, 4, chunk_tokens=4)
    with pytest.raises(ValueError, match=r"read\(0, 8\): feature ids must be in \[0, 4\); got 0\.\.4"):
        cooccurrence_from_chunks(rd([2, 5], [0, 4]), 8, 4)
    with pytest.raises(ValueError, match="read.*integer arrays; got float64"):
        cooccurrence_from_chunks(rd([2.0], [0]), 8, 4)
    with pytest.raises(ValueError, match="read.*1-D arrays of the same length"):
        cooccurrence_from_chunks(rd([2, 3], [0]), 8, 4)
    for kwargs, msg in [({"n": 0}, "n must be >= 1; got 0"), ({"d_sae": 1}, "at least 2 features; got d_sae=1"),
                        ({"n_tokens": -1}, r"n_tokens must be in \[0, 2147483647\]"),
                        ({"chunk_tokens": 0}, "chunk_tokens must be >= 1; got 0"),
                        ({"block_bytes": 0}, "block_bytes must be >= 1; got 0")]:
        args = {"n_tokens": 8, "d_sae": 4} | kwargs
        with pytest.raises(ValueError, match=msg):
            cooccurrence_from_chunks(rd([], []), **args)
    with pytest.raises(ValueError, match=r"feature ids must be in \[0, 4\); got 0\.\.4"):
        cooccurrence(np.array([0, 1]), np.array([0, 4]), 4)
    with pytest.raises(ValueError, match=r"token_index must be >= 0"):
        cooccurrence(np.array([-1, 1]), np.array([0, 1]), 4)


# ---------------------------------------------------------------- co-occurrence


def check_close(res, want, n):
    """check() with a float tolerance on the Jaccard values."""
    for a, cands in want.items():
        k = len(cands)
        assert res.ids[a].tolist() == [b for _, b, _ in cands] + [-1] * (n - k), a
        np.testing.assert_allclose(res.jaccard[a, :k], [-j for j, _, _ in cands], rtol=1e-6)
        assert res.counts[a, :k].tolist() == [i for _, _, i in cands]
        assert (res.jaccard[a, k:] == 0).all() and (res.counts[a, k:] == 0).all()


@pytest.mark.parametrize("block_bytes", [1, 32 * 37 * 5, 2**28])  # one column per block .. all in one block
def test_cooccurrence_equals_brute_force(block_bytes):
    from saescope.precompute.cooccur import cooccurrence

    rng = np.random.default_rng(2)
    d_sae, n_tok, n = 37, 150, 6
    tok = rng.integers(0, n_tok, 900).astype(np.int64)
    feat = (rng.zipf(1.6, 900) % d_sae).astype(np.int32)  # skewed, with repeated (token, feature) pairs
    feat[:40], tok[:40] = 36, np.arange(40)  # features 35 and 36 fire on the same tokens: ties in Jaccard
    feat[40:80], tok[40:80] = 35, np.arange(40)
    res = cooccurrence(tok, feat, d_sae, n=n, block_bytes=block_bytes)
    assert res.ids.shape == res.jaccard.shape == res.counts.shape == (d_sae, n)
    assert res.ids.dtype == np.int32 and res.jaccard.dtype == np.float32
    assert res.ids[35, 0] == 36 and res.jaccard[35, 0] == pytest.approx(
        40 / len(set(tok[feat == 35].tolist()) | set(tok[feat == 36].tolist())))
    check_close(res, jaccard_reference(tok, feat, d_sae, n), n)


def test_cooccurrence_of_real_sae_codes(demo_sae):
    """Codes of the demo TopK SAE on inputs built from its own decoder directions, checked on a sample."""
    from saescope.precompute.cooccur import cooccurrence

    g = torch.Generator().manual_seed(3)
    d_sae = demo_sae.cfg.d_sae
    picks = torch.randint(0, 64, (256, 3), generator=g)  # few directions, so features really co-occur
    x = demo_sae.W_dec.detach()[picks].sum(1) * 4 + demo_sae.b_dec.detach()  # (256, d_in)
    with torch.no_grad():
        z = demo_sae.encode(x + 0.1 * torch.randn(x.shape, generator=g))  # (256, d_sae)
    tok, feat = (t.numpy() for t in torch.nonzero(z > 0, as_tuple=True))
    res = cooccurrence(tok.astype(np.int64), feat.astype(np.int32), d_sae, n=8)
    active = np.unique(feat)
    sample = list(active[np.linspace(0, len(active) - 1, 12).astype(int)])
    brute = jaccard_reference(tok, feat, d_sae, 8, which=sample)
    assert any(len(c) == 8 for c in brute.values())
    check_close(res, brute, 8)
    silent = np.setdiff1d(np.arange(d_sae), active)[:3]
    assert (res.ids[silent] == -1).all()


def test_cooccurrence_rejects_bad_input():
    from saescope.precompute.cooccur import cooccurrence

    with pytest.raises(ValueError, match=r"feature ids must be in \[0, 4\)"):
        cooccurrence(np.array([0, 1]), np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="same length"):
        cooccurrence(np.array([0, 1]), np.array([0]), 4)
    with pytest.raises(ValueError, match="integer"):
        cooccurrence(np.array([0.0]), np.array([0]), 4)
