"""Exploration data in a real store, checked against brute force: co-occurrence, centred logit effects, the
feature map, and cross-SAE matches between two SAEs precomputed in one run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from saescope.app.web.app import create_app
from saescope.precompute.store import Store
from tests.conftest import TINY_ARGS


@pytest.fixture(scope="module")
def active_sets(tiny_store, tiny_lm_dir, tiny_sae_dir, small_corpus):
    """feature -> set of token indices where it is active, recomputed here for every streamed context."""
    from saescope.precompute.data import iter_dataset_contexts
    from saescope.precompute.encode import encode_batch
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    lm, sae = load_model(str(tiny_lm_dir), "cpu", "float32"), load_sae(str(tiny_sae_dir))
    T = TINY_ARGS["context_len"]
    n = TINY_ARGS["tokens"] // T
    ctxs = np.stack(list(itertools.islice(iter_dataset_contexts(str(small_corpus), "text", lm.tokenizer, T, True), n)))
    z = encode_batch(lm, sae, ctxs, sae.cfg.hook_name).numpy()  # (n, T, d_sae)
    sets: dict[int, set[int]] = {f: set() for f in range(sae.cfg.d_sae)}
    for c, p, f in zip(*np.nonzero(z)):
        sets[int(f)].add(int(c) * T + int(p))
    return sets, lm, sae


def test_cooccurrence_equals_a_brute_force_jaccard(tiny_store, active_sets):
    sets, _, _ = active_sets
    with Store(tiny_store) as s:
        checked = 0
        for f in range(0, 96, 7):
            feat = s.feature("tiny", f)
            if not sets[f]:
                assert feat.cooc == []
                continue
            jac = {g: len(sets[f] & sets[g]) / len(sets[f] | sets[g]) for g in sets if g != f and sets[g]}
            want = sorted(((-j, g) for g, j in jac.items() if j > 0))[: len(feat.cooc)]
            assert [g for g, _ in feat.cooc] == [g for _, g in want], f
            np.testing.assert_allclose([j for _, j in feat.cooc], [-j for j, _ in want], rtol=1e-6)
            checked += 1
        assert checked >= 5


def test_centred_logit_effects_and_the_map_are_stored(tiny_store, active_sets):
    _, lm, sae = active_sets
    W = sae.W_dec.detach().float() * lm.final_norm_gain()
    L = (W @ lm.unembedding()).double()  # (d_sae, vocab), brute force
    with Store(tiny_store) as s:
        for f in (0, 5, 50):
            feat = s.feature("tiny", f)
            assert feat.logit_mean == pytest.approx(float(L[f].mean()), rel=1e-4, abs=1e-6)
        pts = s.map_points("tiny")
    assert pts["feature"] == list(range(96))  # every feature exactly once
    xy = np.array([pts["x"], pts["y"]])
    assert np.isfinite(xy).all() and xy.min() >= 0 and xy.max() <= 1
    r = TestClient(create_app(tiny_store)).get("/sae/tiny/feature/5")
    assert 'id="logit-note"' in r.text and "centred" in r.text and 'id="cooccurring"' in r.text


@pytest.fixture(scope="module")
def matched_saes(tmp_path_factory, make_store, tiny_sae_dir):
    """The tiny SAE ("a") and a TopK SAE ("b") whose first 40 decoder rows are nearly the tiny SAE's, in one store."""
    from saescope.precompute.pipeline import SAESpec
    from saescope.precompute.saes import SAEConfig, load_sae, save_saelens
    from saescope.precompute.saes.topk import TopKSAE

    torch.manual_seed(3)
    other = TopKSAE(SAEConfig(architecture="topk", d_in=64, d_sae=80, k=6, hook_name="blocks.2.hook_resid_post",
                              model_name="tiny"))
    base = load_sae(str(tiny_sae_dir))
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
        other.W_dec[:40] = base.W_dec[:40] + 0.05 * torch.randn(40, 64)  # half the features nearly shared
        other.W_enc.mul_(15.0)
    d = tmp_path_factory.mktemp("other")
    save_saelens(other, d)
    out = make_store(saes=[SAESpec(str(tiny_sae_dir), None, "a"), SAESpec(str(d), None, "b")], tokens=64 * 8,
                     feature_map=False)
    return out, base, other


def test_cross_sae_matches_equal_a_brute_force_cosine(matched_saes):
    out, a, b = matched_saes
    A = torch.nn.functional.normalize(a.W_dec.detach().float(), dim=-1)
    B = torch.nn.functional.normalize(b.W_dec.detach().float(), dim=-1)
    cos = A @ B.T  # (96, 80)
    with Store(out) as s:
        assert s.compared_with("a") == ["b"] and s.compared_with("b") == ["a"]
        for f in (0, 17, 39, 95):
            (other, matches), = s.cross("a", f)
            want = cos[f].topk(len(matches))
            assert other == "b" and [j for j, _ in matches] == want.indices.tolist()
            np.testing.assert_allclose([c for _, c in matches], want.values.numpy(), rtol=1e-5)
        rows = s.best_matches("a", "b", 96, 0)
    best_ab, best_ba = cos.argmax(1), cos.argmax(0)
    assert [r[1] for r in rows] == best_ab.tolist()
    assert [r[3] for r in rows] == [bool(best_ba[best_ab[f]] == f) for f in range(96)]
    assert sum(r[3] for r in rows) >= 35  # the shared half is found both ways
    client = TestClient(create_app(out))
    page = client.get("/sae/a/compare/b?size=100")
    assert page.status_code == 200 and page.text.count("mutual") >= 35
    assert 'id="other-saes"' in client.get("/sae/a/feature/3").text
    assert client.get("/sae/a/compare/zzz").status_code == 404


# ---------------------------------------------------------------- the feature page and its JSON twin
import html as _html  # noqa: E402
import re  # noqa: E402

# every <h2> of the feature page -> the JSON keys holding what it shows (None: a live form, no stored data).
# A new section on the page fails this test until its data is in the JSON too.
SECTION_KEYS = {"Top activations": ["top_examples"], "Samples across the range": ["intervals", "quantiles"],
                "Try your own text": None, "Map neighbourhood": ["map_neighbourhood"], "Steer with this feature": None,
                "Nearest features": ["neighbours"], "Co-occurring features": ["cooc"],
                "In the other SAEs": ["other_saes"], "Provenance": ["sae_id"]}


def _section(page: str, start: str) -> str:
    i = page.index(start)
    return page[i: page.index("</section>", i)]


def _links(block: str, sae: str) -> list[int]:
    return [int(j) for j in re.findall(rf'href="/sae/{sae}/feature/(\d+)"', block)]


def check_feature_twins(client: TestClient, sae: str, index: int) -> dict:
    """The feature page and /api/saes/{sae}/features/{index} show the same data, section by section."""
    page = client.get(f"/sae/{sae}/feature/{index}?samples=interval").text
    j = client.get(f"/api/saes/{sae}/features/{index}").json()
    for h2 in re.findall(r"<h2>([^<]+)", page):
        assert h2.strip() in SECTION_KEYS, f"section {h2!r} on the page has no JSON twin"
        for key in SECTION_KEYS[h2.strip()] or ():
            assert key in j, (h2, key)
    assert page.count('<li class="ex">', page.index('id="top-examples"'), page.index('id="samples"')) \
        == len(j["top_examples"])
    for table, raw, centred in (("logit-pos", "logit_pos", "logit_pos_centred"),
                                ("logit-neg", "logit_neg", "logit_neg_centred")):
        block = page[page.index(f'<table id="{table}"'): page.index("</table>", page.index(f'<table id="{table}"'))]
        shown = re.findall(r'<td class="num">([^<]+)</td><td class="num (?:pos|neg)">([^<]+)</td>', block)
        assert shown == [(f"{v:+.3f}", f"{c:+.3f}") for (_, v), (_, c) in zip(j[raw], j[centred])]
        assert [c for _, c in j[centred]] == pytest.approx([v - j["logit_mean"] for _, v in j[raw]], abs=1e-6)
    near = _section(page, "<h2>Nearest features")
    assert _links(near, sae) == [n for n, _ in j["neighbours"]]
    if j["cooc"]:
        co = _section(page, 'id="cooccurring"')
        assert _links(co, sae) == [n for n, _ in j["cooc"]]
        assert re.findall(r'muted">(\d\.\d{3})<', co) == [f"{s:.3f}" for _, s in j["cooc"]]
    if j["other_saes"]:
        other = _section(page, 'id="other-saes"')
        for o in j["other_saes"]:
            assert _links(other, o["sae_id"]) == [n for n, _ in o["matches"]]
    else:
        assert 'id="other-saes"' not in page
    if j["map_neighbourhood"]:
        m = j["map_neighbourhood"]
        block = _section(page, '<section class="map-near" id="map-near">')
        assert _links(block, sae) == [p["index"] for p in m["points"]] and m["points"][-1]["me"]
        assert _html.escape(m["map_url"]) in block
        drawn = re.findall(r'<circle cx="([^"]+)" cy="([^"]+)"', block)
        assert [(float(x), float(y)) for x, y in drawn] == [(p["cx"], p["cy"]) for p in m["points"]]
    else:
        assert 'class="map-near"' not in page
    return j


def test_feature_json_carries_every_section_of_the_page(tiny_store):
    client = TestClient(create_app(tiny_store))
    live = [r["index"] for r in client.get("/api/saes/tiny/features?show=live&size=3").json()["features"]]
    for f in live:
        j = check_feature_twins(client, "tiny", f)
        assert j["cooc"] and j["map_neighbourhood"] and j["map_xy"] is not None  # the tiny store has both
        with Store(tiny_store) as s:
            feat = s.feature("tiny", f)
        assert [tuple(c) for c in j["cooc"]] == [(a, pytest.approx(b)) for a, b in feat.cooc]


def test_feature_json_carries_the_cross_sae_matches(matched_saes):
    out, a, b = matched_saes
    client = TestClient(create_app(out))
    A = torch.nn.functional.normalize(a.W_dec.detach().float(), dim=-1)
    B = torch.nn.functional.normalize(b.W_dec.detach().float(), dim=-1)
    for f in (3, 17):
        j = check_feature_twins(client, "a", f)
        (o,) = j["other_saes"]
        want = (A[f] @ B.T).topk(len(o["matches"]))  # brute force, as in the test above
        assert o["sae_id"] == "b" and [m for m, _ in o["matches"]] == want.indices.tolist()
