"""Feature map, cross-SAE matches and SAELens release resolution, each against brute force (co-occurrence:
tests/test_cooccur.py)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch


# ---------------------------------------------------------------- feature map
@pytest.fixture(scope="module")
def small_map(demo_sae):
    """Two builds of the map of 240 real decoder rows, 20 of them left out of the fit by the mask."""
    from saescope.precompute.featuremap import MapParams, build_feature_map

    w = demo_sae.W_dec.detach()[:240]  # (240, 576)
    mask = np.ones(240, dtype=bool)
    mask[::12] = False
    params = MapParams(n_epochs=60)
    return w.numpy(), mask, build_feature_map(w, mask, params), build_feature_map(w, mask, params)


def test_map_is_deterministic_and_covers_every_feature(small_map):
    w, mask, xy, xy2 = small_map
    assert xy.shape == (len(w), 2) and xy.dtype == np.float32
    assert np.array_equal(xy, xy2), "two builds with the same seed must give identical coordinates"
    assert np.isfinite(xy).all() and xy.min() >= 0 and xy.max() <= 1
    # one scale for both axes: the longer axis spans exactly [0, 1], the shorter one is centred
    span = xy.max(0) - xy.min(0)
    assert math.isclose(float(span.max()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(xy[:, span.argmin()].min() + xy[:, span.argmin()].max()), 1.0, rel_tol=1e-5)
    # every feature is its own point (no two features collapsed onto one position)
    assert len({tuple(p) for p in xy.tolist()}) == len(w)


def test_masked_features_sit_at_the_weighted_mean_of_their_nearest_fitted_features(small_map):
    w, mask, xy, _ = small_map
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    fitted = np.flatnonzero(mask)
    for i in np.flatnonzero(~mask):
        cos = sorted(((float(unit[i] @ unit[j]), int(j)) for j in fitted), reverse=True)[:5]
        wts = np.array([max(c, 0.0) + 1e-6 for c, _ in cos])
        expect = (wts[:, None] * xy[[j for _, j in cos]].astype(np.float64)).sum(0) / wts.sum()
        np.testing.assert_allclose(xy[i], expect, atol=1e-5)


def test_map_rejects_bad_input():
    from saescope.precompute.featuremap import build_feature_map

    with pytest.raises(ValueError, match="mask must have shape"):
        build_feature_map(np.ones((10, 4), np.float32), mask=np.ones(9, bool))
    with pytest.raises(ValueError, match="2-D"):
        build_feature_map(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="at least 4"):
        build_feature_map(np.eye(10, dtype=np.float32), mask=np.arange(10) < 2)


def test_map_neighbours_equal_brute_force():
    from saescope.precompute.featuremap import map_neighbours

    rng = np.random.default_rng(0)
    xy = rng.random((300, 2)).astype(np.float32)
    xy[7] = xy[3]  # an exact tie: both at distance 0 from each other
    xy[11] = xy[3]
    ids, dist = map_neighbours(xy, k=6)
    for f in range(len(xy)):
        d = [(float(np.hypot(*(xy[f].astype(np.float64) - xy[g]))), g) for g in range(len(xy)) if g != f]
        d.sort()
        assert ids[f].tolist() == [g for _, g in d[:6]]
        np.testing.assert_allclose(dist[f], [x for x, _ in d[:6]], atol=1e-6)
    one, _ = map_neighbours(xy, k=3, features=np.array([3]))
    assert one.tolist() == [[7, 11, ids[3][2]]]
    with pytest.raises(ValueError, match="k must be"):
        map_neighbours(xy, k=300)


def test_coords_payload_round_trips():
    from saescope.precompute.featuremap import decode_coords, encode_coords

    xy = np.random.default_rng(1).random((1000, 2)).astype(np.float32)
    xy[0] = (0, 1)
    payload = encode_coords(xy)
    assert len(json.dumps(payload)) < 1000 * 4 * 4 / 3 + 100  # 4 bytes a point, base64
    back = decode_coords(json.loads(json.dumps(payload)))
    assert back.shape == xy.shape
    assert np.abs(back - xy).max() <= 0.5 / 65535 + 1e-7
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        encode_coords(xy * 2)


# ---------------------------------------------------------------- cross-SAE matches
def test_cross_sae_matches_equal_brute_force_cosine(demo_sae):
    from saescope.precompute.compare import best_match, mutual_best, nearest_across

    g = torch.Generator().manual_seed(4)
    a = demo_sae.W_dec.detach()[:300]  # (300, 576)
    perm = torch.randperm(400, generator=g)
    b = demo_sae.W_dec.detach()[:400][perm] * 3 + 0.01 * torch.randn(400, 576, generator=g)  # (400, 576)
    m = nearest_across(a, b, n=5, chunk_bytes=4 * 400 * 64)  # several chunks
    an, bn = a.double().numpy(), b.double().numpy()
    for i in range(0, 300, 7):
        cos = [(float(an[i] @ bn[j] / np.linalg.norm(an[i]) / np.linalg.norm(bn[j])), j) for j in range(400)]
        cos.sort(key=lambda t: (-t[0], t[1]))
        assert m.ids[i].tolist() == [j for _, j in cos[:5]]
        np.testing.assert_allclose(m.cos[i].numpy(), [c for c, _ in cos[:5]], atol=1e-5)
    ids, cos = best_match(a, b)
    inv = torch.argsort(perm)  # row j of the original sits at inv[j] in b
    assert torch.equal(ids.long(), inv[:300])
    assert (cos > 0.99).all()
    back, _ = best_match(b, a)
    assert mutual_best(ids, back).all()
    with pytest.raises(ValueError, match="d_in 576 vs 32"):
        nearest_across(a, torch.ones(4, 32))


# ---------------------------------------------------------------- SAELens releases
@pytest.fixture(scope="module")
def registry():
    from saescope.precompute import releases

    releases.load_registry.cache_clear()
    regs, source = releases.load_registry(prefer_installed=False)
    with gzip.open(releases.VENDORED, "rt") as f:
        assert json.load(f)["source"].startswith(releases.VENDORED_FROM)
    return regs, source


def _vendored_only(monkeypatch):
    from saescope.precompute import releases

    releases.load_registry.cache_clear()
    monkeypatch.setattr(releases, "_installed_yaml", lambda: None)


def test_known_releases_resolve(registry, monkeypatch):
    from saescope.precompute.releases import resolve_release

    _vendored_only(monkeypatch)
    regs, _ = registry
    # published facts of SAELens's registry
    r = resolve_release("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    assert r.hub_ref == "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    assert (r.reader, r.hook_name, r.conversion) == ("gemmascope", "blocks.12.hook_resid_post", "gemma_2")
    assert r.neuronpedia_id == "gemma-2-2b/12-gemmascope-res-16k"
    r = resolve_release("gemma-scope-2b-pt-mlp-canonical/layer_3/width_16k/canonical")
    assert r.hook_name == "blocks.3.hook_mlp_out"
    r = resolve_release("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert (r.repo_id, r.path, r.reader, r.hook_name) == (
        "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", "saelens", None)
    assert any("center_writing_weights" in n for n in r.notes)
    # every readable entry resolves to its registry row
    for name, rel in regs.items():
        for row in rel.get("saes", [])[:2]:
            if rel["conversion"] == "gemma_2" and ("embedding" in row[0] or "att" in rel["repo_id"]):
                continue
            r = resolve_release(f"{name}/{row[0]}")
            path = row[1] if len(row) > 1 and row[1] is not None else row[0]
            assert r.hub_ref == f"{rel['repo_id']}/{path}".rstrip("/")


def test_release_errors_name_the_choices(monkeypatch):
    from saescope.precompute.releases import ReleaseError, looks_like_release, resolve_release

    _vendored_only(monkeypatch)
    with pytest.raises(ReleaseError, match="did you mean: gemma-scope-2b-pt-res"):
        resolve_release("gemma-scope-2b-pt-rs/layer_1/width_16k/canonical")
    with pytest.raises(ReleaseError, match=r"unknown SAE id 'layer_99.*valid: layer_0/width_16k/canonical.*\(58 in all\)"):
        resolve_release("gemma-scope-2b-pt-res-canonical/layer_99/width_16k/canonical")
    with pytest.raises(ReleaseError, match="needs an SAE id"):
        resolve_release("gpt2-small-res-jb")
    with pytest.raises(ReleaseError, match="hook_z"):
        resolve_release("gemma-scope-2b-pt-att-canonical/layer_0/width_16k/canonical")
    with pytest.raises(ReleaseError, match="conversion 'gemma_3', which saescope does not read"):
        resolve_release("gemma-scope-2-4b-pt-transcoders-all/layer_0_width_16k_l0_big")
    assert looks_like_release("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert looks_like_release("gemma-scope-2b-pt-rs/x")  # a typo gets the release error, not a hub lookup
    assert not looks_like_release("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")


def test_offline_fetch_says_what_to_download(monkeypatch):
    import huggingface_hub.constants

    from saescope.precompute.releases import fetch_release, resolve_release

    _vendored_only(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real library, offline
    r = resolve_release("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    with pytest.raises(FileNotFoundError) as err:
        fetch_release(r)
    msg = str(err.value)
    assert "gemma-scope-2b-pt-res-canonical" in msg and "google/gemma-scope-2b-pt-res" in msg
    assert 'hf download google/gemma-scope-2b-pt-res --include "layer_12/width_16k/average_l0_82/*"' in msg
    assert "--hook blocks.12.hook_resid_post" in msg
