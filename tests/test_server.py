"""The dashboard through the in-process ASGI client, on real stores built once per session."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient

from saescope.app.web.format import fmt, pct
from saescope.app.web.tokens import visible
from saescope.app.web.app import create_app
from saescope.precompute.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(demo_store):
    store = Store(demo_store)
    sae = store.saes()[0]
    client = TestClient(create_app(demo_store, worker_url=None))
    yield client, store, sae
    store.close()


def test_home_lists_the_sae_with_provenance(demo):
    client, store, sae = demo
    r = client.get("/")
    assert r.status_code == 200
    assert sae.sae_id in r.text and "HuggingFaceTB/SmolLM2-135M-Instruct" in r.text
    assert "blocks.9.hook_resid_post" in r.text and "4,096" in r.text and "<svg" in r.text
    assert pct(sae.dead_share) in r.text


def test_sae_page_paginates_sorts_and_filters(demo):
    client, store, sae = demo
    r = client.get(f"/sae/{sae.sae_id}?page=2&size=50")
    assert r.status_code == 200
    idx = [int(x) for x in re.findall(rf'href="/sae/{sae.sae_id}/feature/(\d+)">\d+</a></td>', r.text)]
    assert idx == list(range(50, 100))
    assert "51–100 of 4,096" in r.text
    r = client.get(f"/sae/{sae.sae_id}?sort=max&order=desc&size=5")
    best = store.features(sae.sae_id, sort="max", desc=True, limit=1)[0]
    first = int(re.search(rf'/sae/{sae.sae_id}/feature/(\d+)">', r.text.split("<tbody>")[1]).group(1))
    assert first == best.index and fmt(best.max_act) in r.text
    for tok in best.top_tokens[:3]:
        assert html.escape(visible(tok), quote=False) in r.text
    r = client.get(f"/sae/{sae.sae_id}?min_density=0.01&show=live")
    n = store.count_features(sae.sae_id, min_density=0.01, dead=False)
    assert f"of {n:,}" in r.text
    dense = client.get(f"/api/saes/{sae.sae_id}/features", params={"show": "dense", "size": 500}).json()
    assert dense["total"] == n and all(f["density"] >= 0.01 for f in dense["features"])
    # htmx asks for the list block only; the answer varies on HX-Request
    r = client.get(f"/sae/{sae.sae_id}?page=2", headers={"HX-Request": "true"})
    assert "<html" not in r.text and "<table" in r.text and r.headers["vary"] == "HX-Request"


def test_random_feature_redirects_to_a_live_feature(demo):
    client, store, sae = demo
    r = client.get(f"/sae/{sae.sae_id}/random", follow_redirects=False)
    assert r.status_code == 302
    index = int(r.headers["location"].rsplit("/", 1)[1])
    assert store.feature(sae.sae_id, index).n_active > 0


def _live_feature(store, sae):
    return store.features(sae.sae_id, sort="density", desc=True, limit=1)[0].index


def test_feature_page_shows_stored_values_and_links(demo):
    client, store, sae = demo
    i = _live_feature(store, sae)
    f = store.feature(sae.sae_id, i)
    r = client.get(f"/sae/{sae.sae_id}/feature/{i}")
    assert r.status_code == 200
    assert f'<dd id="max-act">{fmt(f.max_act, 4)}</dd>' in r.text
    assert f'<dd id="density">{pct(f.density)}</dd>' in r.text
    for j, _ in f.neighbours:
        assert f'href="/sae/{sae.sae_id}/feature/{j}"' in r.text
    assert f'href="/sae/{sae.sae_id}/feature/{i + 1}" rel="next"' in r.text
    t, v = f.logit_pos[0]
    assert html.escape(visible(t), quote=False) in r.text and f"{v:+.3f}" in r.text
    assert r.text.count('class="ex"') == len(store.examples(sae.sae_id, i, "top"))
    ex = store.examples(sae.sae_id, i, "top")[0]
    assert f'data-tip="{html.escape(visible(ex.tokens[ex.pos]))} → {fmt(ex.value, 4)}"' in r.text
    assert "provenance" in r.text.lower() and sae.logit_method.split(" (")[0] in r.text


def test_context_width_and_samples_are_fragments(demo):
    client, store, sae = demo
    i = _live_feature(store, sae)
    narrow = client.get(f"/sae/{sae.sae_id}/feature/{i}?left=1&right=0", headers={"HX-Request": "true"})
    assert "<html" not in narrow.text and "Top activations" in narrow.text
    n_top = len(store.examples(sae.sae_id, i, "top"))
    # each example shows at most left + 1 + right tokens
    assert narrow.text.count('class="tok') <= 2 * n_top
    wide = client.get(f"/sae/{sae.sae_id}/feature/{i}?left=10&right=3", headers={"HX-Request": "true"})
    assert wide.text.count('class="tok') > narrow.text.count('class="tok')
    s = client.get(f"/sae/{sae.sae_id}/feature/{i}?samples=quantile", headers={"HX-Request": "true"})
    groups = store.groups(sae.sae_id, i, "quantile")
    assert s.text.count('<h3 class="group">') == len(groups) and "equal-count" in s.text
    g = groups[0]
    assert f"{pct(g.share)} of active tokens" in s.text
    # a shared link with a sample tab renders the full page, whose placeholder loads that tab
    full = client.get(f"/sae/{sae.sae_id}/feature/{i}?samples=quantile&left=3")
    assert "<html" in full.text and "samples=quantile" in full.text and 'value="3"' in full.text


@pytest.mark.slow  # runs `saescope import-explanations` as a subprocess
def test_search_by_index_token_and_explanation(demo, demo_store, tmp_path):
    client, store, sae = demo
    r = client.get(f"/sae/{sae.sae_id}/search?q=17", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sae/{sae.sae_id}/feature/17"
    f = store.feature(sae.sae_id, _live_feature(store, sae))
    word = next(t.strip() for t in f.top_tokens if len(t.strip()) >= 3)
    r = client.get(f"/sae/{sae.sae_id}/search", params={"q": word})
    assert r.status_code == 200
    hits, total = store.search_tokens(sae.sae_id, word, 25, 0)
    assert total > 0 and f"of {total:,}" in r.text
    assert f'href="/sae/{sae.sae_id}/feature/{hits[0].index}"' in r.text
    assert all(word.lower() in (h.matched.lower()) for h in hits)
    if total > 1:
        r2 = client.get(f"/sae/{sae.sae_id}/search", params={"q": word, "size": 1, "page": 2})
        assert f'href="/sae/{sae.sae_id}/feature/{hits[1].index}"' in r2.text
    # explanations: full-text once they exist
    copy = tmp_path / "expl.duckdb"
    shutil.copyfile(demo_store, copy)
    src = tmp_path / "np_export.json"  # Neuronpedia's explanation export field names
    src.write_text(json.dumps([{"modelId": "x", "layer": "9-x", "index": "7", "description": "file descriptors and sockets"},
                               {"modelId": "x", "layer": "9-x", "index": "9", "description": "descriptors of files"}]))
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "saescope.app.cli", "import-explanations", str(copy), str(src), "--sae-id", sae.sae_id],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "added 2 explanations" in r.stdout, r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"feature": 99999, "text": "x"}\n')
    r = subprocess.run([sys.executable, "-m", "saescope.app.cli", "import-explanations", str(copy), str(bad), "--sae-id", sae.sae_id],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "outside 0..4095" in r.stderr
    c2 = TestClient(create_app(copy))
    r = c2.get(f"/sae/{sae.sae_id}/search", params={"q": "descriptors", "by": "explanation"})
    assert "/feature/7" in r.text and "/feature/9" in r.text
    r = c2.get(f"/sae/{sae.sae_id}/search", params={"q": "file sockets", "by": "explanation"})
    assert "/feature/7" in r.text and "/feature/9\"" not in r.text
    assert "file descriptors and sockets" in c2.get(f"/sae/{sae.sae_id}/feature/7").text


def test_errors_are_clear_pages_and_json(demo):
    client, store, sae = demo
    r = client.get("/sae/nope")
    assert r.status_code == 404 and "valid: " + sae.sae_id in r.text and "<html" in r.text
    r = client.get(f"/sae/{sae.sae_id}/feature/4096")
    assert r.status_code == 404 and "features 0 to 4095" in r.text and f'href="/sae/{sae.sae_id}"' in r.text
    r = client.get(f"/sae/{sae.sae_id}?page=0")
    assert r.status_code == 422 and "page must be greater than or equal to 1" in r.text
    r = client.get(f"/sae/{sae.sae_id}?sort=bogus")
    assert r.status_code == 422 and "sort must be 'index', 'density', 'max' or 'score' (got 'bogus')" in html.unescape(r.text)
    r = client.get(f"/sae/{sae.sae_id}?page=999")  # past the end: an empty page linking back (issue 17, #10)
    assert r.status_code == 200 and "page 999 is past the end" in r.text and "fill 82 pages" in r.text and "page=82" in r.text
    r = client.get(f"/sae/{sae.sae_id}/feature/abc")
    assert r.status_code == 422 and "index" in r.text
    r = client.get(f"/api/saes/{sae.sae_id}/features/99999")
    assert r.status_code == 404 and r.json()["error"]["message"].endswith("features 0 to 4095")
    r = client.get(f"/api/saes/{sae.sae_id}/features?size=100000")
    assert r.status_code == 422 and "size" in r.json()["error"]["message"]
    r = client.get("/no/such/page")
    assert r.status_code == 404 and "Traceback" not in r.text


def test_api_mirrors_pages(demo):
    client, store, sae = demo
    saes = client.get("/api/saes").json()
    assert saes[0]["sae_id"] == sae.sae_id and saes[0]["d_sae"] == 4096
    page = client.get(f"/api/saes/{sae.sae_id}/features", params={"sort": "max", "order": "desc", "size": 3}).json()
    assert page["total"] == 4096 and page["features"][0]["max_act"] >= page["features"][1]["max_act"]
    i = _live_feature(store, sae)
    f = client.get(f"/api/saes/{sae.sae_id}/features/{i}").json()
    assert f["max_act"] == pytest.approx(store.feature(sae.sae_id, i).max_act)
    assert len(f["top_examples"]) == len(store.examples(sae.sae_id, i, "top")) and f["intervals"] and f["quantiles"]
    top = f["top_examples"][0]
    assert top["values"][top["pos"]] == pytest.approx(top["value"]) == pytest.approx(f["max_act"])


def test_neuronpedia_export_uses_their_field_names(demo):
    client, store, sae = demo
    i = _live_feature(store, sae)
    d = client.get(f"/api/saes/{sae.sae_id}/features/{i}/neuronpedia").json()
    for key in ("modelId", "layer", "index", "activations", "pos_str", "pos_values", "neg_str", "neg_values",
                "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "maxActApprox",
                "topkCosSimIndices", "topkCosSimValues"):
        assert key in d, key
    a = d["activations"][0]
    assert set(a) >= {"tokens", "values", "maxValue", "maxValueTokenIndex"}
    assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] == pytest.approx(d["maxActApprox"])
    assert len(d["freq_hist_data_bar_heights"]) == len(d["freq_hist_data_bar_values"]) == 50
    assert d["layer"] == f"9-{sae.sae_id}" and d["index"] == str(i)


def test_static_files_are_cache_busted(demo):
    client, *_ = demo
    page = client.get("/").text
    m = re.search(r'src="(/static/htmx-2\.0\.4\.min\.js\?v=[0-9a-f]{10})"', page)
    assert m, "htmx is vendored with its version in the file name and a content hash in the URL"
    r = client.get(m.group(1))
    assert r.status_code == 200 and "immutable" in r.headers["cache-control"]


def test_openapi_document_is_current(demo):
    client, *_ = demo
    doc = client.get("/openapi.json").json()
    for path in ("/api/saes", "/api/saes/{sae_id}/features/{index}", "/api/saes/{sae_id}/search", "/api/inspect"):
        assert path in doc["paths"], path
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == doc, "docs/openapi.json is stale: regenerate with `python -m saescope.app.openapi`"
    from saescope.app.openapi import worker_doc

    worker = json.loads((ROOT / "docs" / "worker-openapi.json").read_text())
    assert worker == worker_doc(), "docs/worker-openapi.json is stale: regenerate with `python -m saescope.app.openapi`"
    for path in ("/health", "/tokenize", "/activations", "/top_features", "/token_features"):
        assert path in worker["paths"], path


@pytest.fixture(scope="module")
def hostile(tiny_store, tmp_path_factory):
    """A copy of the tiny store whose vocabulary holds hostile and awkward token strings."""
    copy = tmp_path_factory.mktemp("hostile") / "h.duckdb"
    shutil.copyfile(tiny_store, copy)
    with Store(tiny_store) as s:
        ex = s.examples("tiny", 3, "top")[0]
        key = s.sae("tiny").model_key
    ids = ex.token_ids[max(0, ex.pos - 4):ex.pos + 1]
    evil = ["<script>alert(1)</script>", 'say "hi" & \'bye\'', "bell\x07", "\\xe2\\x80", "line\nbreak"]
    con = duckdb.connect(str(copy))
    for tid, s_ in zip(reversed(ids), evil):
        con.execute("UPDATE vocab SET token = ? WHERE model_key = ? AND token_id = ?", [s_, key, tid])
    con.close()
    return copy, evil


def test_hostile_token_strings_render_escaped_and_visible(hostile):
    path, evil = hostile
    client = TestClient(create_app(path))
    r = client.get("/sae/tiny/feature/3?left=6&right=0")
    assert r.status_code == 200
    assert "<script>alert(1)" not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert "say &#34;hi&#34; &amp; &#39;bye&#39;" in r.text
    assert "bell\\x07" in r.text and "\x07" not in r.text  # a control byte is shown, never emitted raw
    assert "\\xe2\\x80" in r.text and "line↵break" in r.text
    j = client.get("/api/saes/tiny/features/3").json()
    assert "<script>alert(1)</script>" in j["top_examples"][0]["tokens"]  # JSON keeps the exact string


def test_page_cache_serves_identical_pages_and_never_caches_live_routes(demo_store):
    client = TestClient(create_app(demo_store, worker_url=None, cache=True))
    sid = client.get("/api/saes").json()[0]["sae_id"]
    first = client.get(f"/sae/{sid}/feature/12")
    second = client.get(f"/sae/{sid}/feature/12")
    assert "x-cache" not in first.headers and second.headers["x-cache"] == "hit"
    assert second.text == first.text and second.headers["vary"] == "HX-Request"
    frag = client.get(f"/sae/{sid}/feature/12", headers={"HX-Request": "true"})
    assert "x-cache" not in frag.headers and "<html" not in frag.text  # htmx fragments are cached apart
    gz = client.get(f"/sae/{sid}/feature/12", headers={"Accept-Encoding": "gzip"})
    assert gz.headers["content-encoding"] == "gzip" and gz.text == first.text
    for _ in range(2):
        r = client.get("/inspect", params={"prompt": "x"})
        assert "x-cache" not in r.headers
        r = client.get(f"/sae/{sid}/random", follow_redirects=False)
        assert "x-cache" not in r.headers
    assert client.get(f"/sae/{sid}/feature/99999").status_code == 404  # errors are not cached either
    assert "x-cache" not in client.get(f"/sae/{sid}/feature/99999").headers


# ---------------------------------------------------------------- the tiny store's pages
@pytest.fixture(scope="module")
def tiny_client(tiny_store):
    return TestClient(create_app(tiny_store))


def test_samples_render_without_javascript_and_pages_have_the_live_region(tiny_client, tiny_store):
    """Before: ?samples=quantile without htmx headers gave the whole page with the "loading…" placeholder, whose
    content only htmx could fetch; and app.js announced into #tok-live, which no template defined."""
    with Store(tiny_store) as store:
        index = store.features("tiny", sort="density", desc=True, limit=1)[0].index
        groups = store.groups("tiny", index, "quantile")
    assert groups
    r = tiny_client.get(f"/sae/tiny/feature/{index}?samples=quantile")
    assert r.status_code == 200 and "<html" in r.text
    assert "loading…" not in r.text
    for g in groups:
        assert re.search(rf'<h3 class="group">quantile {g.grp + 1}:', r.text), g.grp
    for url in ("/", "/sae/tiny", f"/sae/tiny/feature/{index}", f"/sae/tiny/feature/{index}?samples=interval",
                "/sae/tiny/search?q=the", "/inspect", "/sae/tiny/feature/100000", "/nowhere"):
        page = tiny_client.get(url)
        assert page.text.count('id="tok-live"') == 1, url


def test_home_page_shows_the_verify_badge(tiny_store):
    import html

    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app

    with Store(tiny_store) as s:
        v = s.sae("tiny").verify
    page = TestClient(create_app(tiny_store, worker_url=None)).get("/")
    assert page.status_code == 200
    text = html.unescape(page.text)
    shown = f"{v['max_rel_diff']:.0e}" if v["max_rel_diff"] else "0"
    assert f"verified: max rel. diff {shown} on 8 contexts" in text
    assert f"saescope verify {tiny_store} --sae tiny --sample 8 --seed 0" in text
    api = TestClient(create_app(tiny_store, worker_url=None)).get("/api/saes")  # the JSON twin: the same record
    assert api.status_code == 200 and [x["verify"]["command"] for x in api.json()] == [v["command"]]

