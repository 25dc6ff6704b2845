"""The feature map: its JSON payload, its page, the feature page's map neighbourhood, and a real browser that
hovers, clicks, zooms and pans it.

The map coordinates come from precompute.featuremap.build_feature_map (UMAP) of the tiny SAE's decoder,
written into a copy of the tiny store with duckdb, as the precompute step will write them.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlparse

import duckdb
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from saescope.app.web.app import create_app
from saescope.app.settings import MAP
from saescope.app.web.maps import map_payload
from saescope.app.web.tokens import visible
from saescope.precompute.featuremap import QUANT_MAX, build_feature_map, decode_coords
from saescope.precompute.saes import load_sae
from saescope.precompute.store import Store
from tests.conftest import ARTIFACTS, free_port
from tests.helpers import start_process, stop_process

SAE = "tiny"
EVIL = '<img src=x onerror="window.__xss=1">&amp;'  # a token string as untrusted as they come


def _read(path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def mapped(tiny_store, tiny_sae_dir, tmp_path_factory) -> dict:
    """A copy of the tiny store with a real feature map, and the most isolated live feature's first top token
    replaced by markup (escaping is checked wherever that token is shown)."""
    sae = load_sae(tiny_sae_dir)
    coords = build_feature_map(sae.W_dec)  # (d_sae, 2) float32 in [0, 1]
    out = tmp_path_factory.mktemp("mapstore") / "mapped.duckdb"
    shutil.copy(tiny_store, out)
    con = duckdb.connect(str(out))
    try:
        con.executemany("UPDATE features SET map_x = ?, map_y = ? WHERE sae_id = ? AND feature = ?",
                        [[float(x), float(y), SAE, i] for i, (x, y) in enumerate(coords)])
        live = [r[0] for r in con.execute("SELECT feature FROM features WHERE sae_id = ? AND n_active > 0",
                                          [SAE]).fetchall()]
        d = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1) + np.eye(len(coords)) * 9  # (n, n)
        target = int(max(live, key=lambda i: d[i].min()))  # the live feature farthest from any other point
        tok_id, model_key = con.execute("""SELECT f.top_token_ids[1], s.model_key
                                           FROM features f JOIN saes s USING (sae_id)
                                           WHERE f.sae_id = ? AND f.feature = ?""", [SAE, target]).fetchone()
        con.execute("UPDATE vocab SET token = ? WHERE model_key = ? AND token_id = ?", [EVIL, model_key, tok_id])
    finally:
        con.close()
    stored = np.array(_read(out, "SELECT map_x, map_y FROM features WHERE sae_id = ? ORDER BY feature", [SAE]))
    return {"path": out, "coords": stored, "target": target, "d_sae": len(coords)}


@pytest.fixture(scope="module")
def client(mapped):
    return TestClient(create_app(mapped["path"], worker_url=None))


# ---------------------------------------------------------------- the JSON payload
def test_payload_decodes_to_the_stored_coordinates_every_feature_once(client, mapped):
    p = client.get(f"/api/saes/{SAE}/map").json()
    n = mapped["d_sae"]
    assert p["n"] == n == p["d_sae"] and p["features"] is None  # point i is feature i: each feature exactly once
    xy = decode_coords(p)  # (n, 2)
    assert np.abs(xy - mapped["coords"]).max() <= 0.5 / QUANT_MAX + 1e-6
    assert len(np.unique(np.rint(xy * QUANT_MAX), axis=0)) == n  # no two features collapsed onto one point

    rows = _read(mapped["path"], "SELECT density, max_act FROM features WHERE sae_id = ? ORDER BY feature", [SAE])
    dens = np.array([r[0] for r in rows])
    mx = np.array([r[1] for r in rows])
    dc = np.frombuffer(base64.b64decode(p["colors"]["density"]["codes"]), np.uint8)
    mc = np.frombuffer(base64.b64decode(p["colors"]["max_act"]["codes"]), np.uint8)
    assert dc.shape == mc.shape == (n,)
    live = dens > 0
    assert (dc[~live] == 0).all() and (dc[live] >= 1).all()
    assert dc[np.argmax(dens)] == 255 and dc[np.flatnonzero(live)[np.argmin(dens[live])]] == 1
    lo, hi = math.log10(dens[live].min()), math.log10(dens[live].max())
    assert p["colors"]["density"]["lo"] == pytest.approx(lo) and p["colors"]["density"]["hi"] == pytest.approx(hi)
    for i in np.flatnonzero(live):  # each code is the 1..255 step of log10 density between the extremes
        want = 1 + (math.log10(dens[i]) - lo) / (hi - lo) * 254
        assert abs(dc[i] - want) <= 0.5 + 1e-9, i
    for i in range(n):  # max activation: linear over [0, max]
        want = 0 if mx[i] <= 0 else 1 + mx[i] / mx.max() * 254
        assert abs(mc[i] - want) <= 0.5 + 1e-6, i
    order = np.argsort(dens[live], kind="stable")
    assert (np.diff(dc[live][order].astype(int)) >= 0).all()  # monotone in density


def test_payload_keeps_feature_ids_when_some_features_have_no_point():
    feats = [0, 3, 7, 8, 20]
    pts = {"feature": feats, "x": [0.0, 0.25, 0.5, 0.75, 1.0], "y": [1.0, 0.5, 0.1, 0.2, 0.0],
           "density": [0.0, 1e-4, 1e-2, 1e-3, 0.5], "max_act": [0.0, 1.0, 2.0, 3.0, 4.0]}
    p = map_payload("s", 21, pts).model_dump()
    ids = np.frombuffer(base64.b64decode(p["features"]), "<u4")
    assert ids.tolist() == feats
    assert np.allclose(decode_coords(p), np.column_stack([pts["x"], pts["y"]]), atol=0.5 / QUANT_MAX)
    codes = np.frombuffer(base64.b64decode(p["colors"]["max_act"]["codes"]), np.uint8)
    assert codes.tolist() == [0, 65, 128, 191, 255]  # 0 for no activation, else 1 + round(v / 4 * 254)


@pytest.mark.parametrize("n", [4096, 65536])
def test_payload_size(n, record_property):
    """Page weight of the map's data (reported; the bound is the base64 arithmetic, not a guess)."""
    g = np.random.default_rng(n)
    xy = g.random((n, 2))
    dens = np.where(g.random(n) < 0.1, 0.0, 10 ** g.uniform(-6, -1, n))
    pts = {"feature": list(range(n)), "x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "density": dens.tolist(),
           "max_act": g.gamma(2.0, 3.0, n).tolist()}
    p = map_payload("s", n, pts)
    body = p.model_dump_json().encode()
    assert np.abs(decode_coords(p.model_dump()) - xy).max() <= 0.5 / QUANT_MAX + 1e-6  # decode_coords gives float32
    b64 = lambda k: 4 * math.ceil(k / 3)  # noqa: E731
    assert len(p.xy) == b64(4 * n) and all(len(c.codes) == b64(n) for c in p.colors.values())
    assert len(body) <= b64(4 * n) + 2 * b64(n) + 1024
    gz = len(gzip.compress(body, compresslevel=5))
    record_property("payload_bytes", len(body))
    record_property("payload_gzip_bytes", gz)
    print(f"\nmap payload at {n:,} features: {len(body):,} bytes JSON, {gz:,} bytes gzipped")


# ---------------------------------------------------------------- the page
def test_map_page_echoes_the_view(client, mapped):
    r = client.get(f"/sae/{SAE}/map?color=max_act&x=0.4&y=0.6&zoom=3&f=5")
    assert r.status_code == 200
    canvas = re.search(r"<canvas id=\"map\"[^>]*>", r.text).group(0)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', canvas))
    assert attrs["sae"] == SAE and attrs["color"] == "max_act" and attrs["f"] == "5"
    assert float(attrs["x"]) == 0.4 and float(attrs["y"]) == 0.6 and float(attrs["zoom"]) == 3.0
    assert attrs["given"] == "x,y,zoom" and float(attrs["max-zoom"]) == MAP.max_zoom
    assert re.search(r'<option value="max_act" selected>', r.text)
    assert f"{mapped['d_sae']:,} features" in r.text and "/static/map.js?v=" in r.text
    assert 'href="/sae/tiny/feature/5"' in r.text
    # the SAE page links to it
    assert f'href="/sae/{SAE}/map"' in client.get(f"/sae/{SAE}").text


@pytest.mark.parametrize("query, status, words", [
    ("zoom=0.5", 422, ["zoom", "greater than or equal to 1"]),
    ("zoom=1000", 422, ["zoom", f"less than or equal to {MAP.max_zoom:g}"]),
    ("color=rainbow", 422, ["color", "'density' or 'max_act'"]),
    ("x=1.5", 422, ["x", "less than or equal to 1"]),
    ("f=-1", 422, ["f", "greater than or equal to 0"]),
    ("f=96", 404, ["feature 96 does not exist", "0 to 95"]),
])
def test_bad_view_params_say_what_is_allowed(client, query, status, words):
    r = client.get(f"/sae/{SAE}/map?{query}")
    assert r.status_code == status, r.text
    text = r.text.replace("&#39;", "'")
    assert all(w in text for w in words), (words, text[-800:])


def test_unknown_sae_is_404_on_page_and_api(client):
    assert client.get("/sae/nope/map").status_code == 404
    r = client.get("/api/saes/nope/map")
    assert r.status_code == 404 and "valid: tiny" in r.json()["error"]["message"]


def test_the_precomputed_map_has_every_feature_once(tiny_store):
    """precompute builds the map by default: the tiny store's own map is served with one point per feature."""
    p = TestClient(create_app(tiny_store, worker_url=None)).get(f"/api/saes/{SAE}/map").json()
    stored = np.array(_read(tiny_store, "SELECT map_x, map_y FROM features WHERE sae_id = ? ORDER BY feature", [SAE]))
    assert p["n"] == p["d_sae"] == len(stored) and p["features"] is None
    assert np.abs(decode_coords(p) - stored).max() <= 0.5 / QUANT_MAX + 1e-6


def test_a_store_without_a_map_says_how_to_build_one(tiny_store, tmp_path):
    bare = tmp_path / "nomap.duckdb"  # as `saescope precompute --no-map` (or an older saescope) leaves it
    shutil.copy(tiny_store, bare)
    con = duckdb.connect(str(bare))
    con.execute("UPDATE features SET map_x = NULL, map_y = NULL")
    con.close()
    c = TestClient(create_app(bare, worker_url=None))
    assert c.get(f"/api/saes/{SAE}/map").json()["n"] == 0
    html = c.get(f"/sae/{SAE}/map").text
    assert 'id="no-map"' in html and "saescope precompute" in html and f"--out {bare}" in html
    assert "<canvas id=\"map\"" not in html
    assert 'class="map-near"' not in c.get(f"/sae/{SAE}/feature/0").text  # no neighbourhood without a map


def test_the_map_routes_are_cached(mapped):
    c = TestClient(create_app(mapped["path"], worker_url=None, cache=True))
    for url in (f"/api/saes/{SAE}/map", f"/sae/{SAE}/map?zoom=2"):
        assert c.get(url).headers.get("x-cache") is None
        assert c.get(url).headers.get("x-cache") == "hit"


# ---------------------------------------------------------------- the feature page's neighbourhood
class _SVG(HTMLParser):
    """The links, circles and titles inside svg.map-near."""

    def __init__(self):
        super().__init__()
        self.inside, self.links, self.titles, self._title = False, [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "map-near" in a.get("class", ""):
            self.inside = True
        elif self.inside and tag == "a":
            self.links.append(a)
        elif self.inside and tag == "title":
            self._title = ""

    def handle_data(self, data):
        if self._title is not None:
            self._title += data

    def handle_endtag(self, tag):
        if tag == "title" and self._title is not None:
            self.titles.append(self._title)
            self._title = None
        elif tag == "svg":
            self.inside = False


def test_feature_page_shows_its_map_neighbourhood(client, mapped):
    i = mapped["target"]
    html = client.get(f"/sae/{SAE}/feature/{i}").text
    svg = _SVG()
    svg.feed(html)
    k = MAP.neighbourhood_k
    assert len(svg.links) == len(svg.titles) == k + 1
    got = [int(a["href"].rsplit("/", 1)[1]) for a in svg.links]
    xy = mapped["coords"]
    d2 = ((xy - xy[i]) ** 2).sum(1)  # brute force: the k + 1 nearest by Euclidean distance, itself included
    want = sorted(range(len(xy)), key=lambda j: (d2[j], j))[: k + 1]
    assert sorted(got) == sorted(want) and len(set(got)) == k + 1
    me = [a for a in svg.links if "me" in a.get("class", "")]
    assert [a["href"] for a in me] == [f"/sae/{SAE}/feature/{i}"] and me[0]["aria-current"] == "page"
    with Store(mapped["path"]) as s:
        top = s.feature(SAE, i).top_tokens
    assert top[0] == EVIL
    title = svg.titles[got.index(i)]
    assert title.startswith(f"feature {i} · ") and EVIL in title  # the parser unescaped it: it was text
    assert "<img src=x" not in html and "&lt;img src=x" in html
    link = re.search(r'href="(/sae/tiny/map\?[^"]+)"', html).group(1).replace("&amp;", "&")
    q = parse_qs(urlparse(link).query)
    assert q["f"] == [str(i)] and abs(float(q["x"][0]) - xy[i, 0]) < 1e-4 and abs(float(q["y"][0]) - xy[i, 1]) < 1e-4
    assert client.get(link).status_code == 200


# ---------------------------------------------------------------- a real browser

@pytest.fixture(scope="module")
def server(mapped, tmp_path_factory):
    copy = tmp_path_factory.mktemp("mapserve") / "served.duckdb"
    shutil.copy(mapped["path"], copy)
    port = free_port()
    log = (copy.parent / "serve.log").open("w")  # a file, not a pipe nobody drains (a full pipe blocks the server)
    base = f"http://127.0.0.1:{port}"
    try:
        proc = start_process([sys.executable, "-m", "saescope.app.cli", "serve", str(copy), "--no-worker", "--no-prewarm",
                              "--port", str(port)], ready=f"{base}/", timeout=60, stdout=log, stderr=subprocess.STDOUT)
    except RuntimeError as err:
        pytest.fail(f"server did not come up ({err}): {(copy.parent / 'serve.log').read_text()[-2000:]}")
    yield base
    stop_process(proc)
    log.close()
    print(f"\nserver log: {copy.parent / 'serve.log'}")


def _view(page) -> dict:
    q = parse_qs(urlparse(page.url).query)
    return {k: v[0] for k, v in q.items()}


@pytest.mark.browser
def test_browser_hover_click_zoom_and_pan(server, browser, mapped):
    i = mapped["target"]
    with Store(mapped["path"]) as s:
        top = s.feature(SAE, i).top_tokens
    payload = httpx.get(f"{server}/api/saes/{SAE}/map").json()
    x, y = (float(v) for v in decode_coords(payload)[i])
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{server}/sae/{SAE}/map")
        page.wait_for_function("window.saescopeMap && window.saescopeMap.ready")
        assert page.evaluate("saescopeMap.n") == mapped["d_sae"]
        page.locator("#map").scroll_into_view_if_needed()
        t = page.evaluate("saescopeMap.transform()")
        px, py = t["left"] + t["ox"] + x * t["scale"], t["top"] + t["oy"] + y * t["scale"]
        page.mouse.move(px - 20, py - 20)
        page.mouse.move(px, py)
        page.wait_for_selector(f"#map-tip.loaded[data-feature='{i}']")
        chips = page.eval_on_selector_all("#map-tip code.chip", "cs => cs.map(c => c.textContent)")
        assert chips == [visible(tok) for tok in top[:8]] and chips[0] == EVIL
        assert page.eval_on_selector("#map-tip", "t => t.querySelector('img')") is None
        assert page.evaluate("window.__xss") is None
        page.screenshot(path=str(ARTIFACTS / "map.png"))
        page.mouse.click(px, py)
        page.wait_for_url(f"**/sae/{SAE}/feature/{i}")
        assert page.locator("svg.map-near a.me").get_attribute("href") == f"/sae/{SAE}/feature/{i}"
        page.locator("section.map-near").screenshot(path=str(ARTIFACTS / "map-neighbourhood.png"))

        # wheel zoom about the pointer: the URL follows (replaceState, no new history entry)
        page.goto(f"{server}/sae/{SAE}/map?color=max_act&f={i}")
        page.wait_for_function("window.saescopeMap && window.saescopeMap.ready")
        page.locator("#map").scroll_into_view_if_needed()
        v0 = page.evaluate("({...saescopeMap.view})")
        assert abs(v0["x"] - x) < 1e-6 and abs(v0["y"] - y) < 1e-6  # f without x/y: centred on the feature
        t = page.evaluate("saescopeMap.transform()")
        w2, h2 = t["ox"] + x * t["scale"], t["oy"] + y * t["scale"]  # the canvas centre (the feature is centred)
        # a pointer on the map's inner side of the feature, so that zooming about it never hits the view's clamp;
        # whole pixels: wheel events carry integer clientX/Y
        cx = round(t["left"] + w2 + (150 if x < 0.5 else -150))
        cy = round(t["top"] + h2 + (100 if y < 0.5 else -100))
        rx, ry = cx - t["left"], cy - t["top"]
        page.mouse.move(cx, cy)
        mx, my = (rx - t["ox"]) / t["scale"], (ry - t["oy"]) / t["scale"]  # the map point under the pointer
        page.mouse.wheel(0, -300)
        page.wait_for_function("new URLSearchParams(location.search).get('zoom') > 1")
        z = float(_view(page)["zoom"])
        assert z > 1 and _view(page)["color"] == "max_act" and _view(page)["f"] == str(i)
        t2 = page.evaluate("saescopeMap.transform()")
        assert abs(t2["ox"] + mx * t2["scale"] - rx) < 0.01 and abs(t2["oy"] + my * t2["scale"] - ry) < 0.01

        # keyboard: + zooms, arrows pan
        page.focus("#map")
        page.keyboard.press("+")
        page.wait_for_function(f"new URLSearchParams(location.search).get('zoom') > {z + 1e-3}")
        before = float(_view(page)["x"])
        page.keyboard.press("ArrowRight")
        page.wait_for_function(f"Number(new URLSearchParams(location.search).get('x')) !== {before}")
        assert float(_view(page)["x"]) > before

        # drag pans the other way
        t = page.evaluate("saescopeMap.transform()")
        vx = page.evaluate("saescopeMap.view.x")
        page.mouse.move(t["left"] + 500, t["top"] + 300)
        page.mouse.down()
        page.mouse.move(t["left"] + 560, t["top"] + 300, steps=4)
        page.mouse.up()
        assert page.evaluate("saescopeMap.view.x") == pytest.approx(vx - 60 / t["scale"], abs=1e-6)

        # a shared link reproduces the view
        page.wait_for_function("new URLSearchParams(location.search).get('x') == "
                               "String(+saescopeMap.view.x.toFixed(4))")
        url, shared = page.url, _view(page)
        other = ctx.new_page()
        other.goto(url)
        other.wait_for_function("window.saescopeMap && window.saescopeMap.ready")
        v = other.evaluate("({...saescopeMap.view})")
        assert v["x"] == float(shared["x"]) and v["y"] == float(shared["y"]) and v["zoom"] == float(shared["zoom"])
        assert v["color"] == "max_act" and v["f"] == i and other.input_value("#map-color") == "max_act"
        other.close()
    finally:
        ctx.close()
    assert errors == []


@pytest.mark.browser
def test_browser_draws_and_hit_tests_65536_points(server, browser):
    """The same page with a synthetic 65,536-point payload routed in: one draw, grid hit-testing finds the point
    under the pointer (its tooltip names it). Draw time is reported, not asserted."""
    from scipy.spatial import cKDTree

    n = 65536
    g = np.random.default_rng(7)
    xy = np.clip(np.concatenate([g.normal(0.5, 0.15, (n - 64, 2)), g.random((64, 2))]), 0, 1)  # dense core, sparse rim
    pts = {"feature": list(range(n)), "x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(),
           "density": (10 ** g.uniform(-6, -1, n)).tolist(), "max_act": g.gamma(2.0, 3.0, n).tolist()}
    body = map_payload(SAE, n, pts).model_dump_json()
    q = decode_coords(json.loads(body)).astype(np.float64)  # what the browser will see
    dist, _ = cKDTree(q).query(q, k=2)
    target = int(np.argmax(dist[:, 1]))  # the most isolated point: unambiguous under the pointer
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route(f"**/api/saes/{SAE}/map", lambda route: route.fulfill(status=200, body=body,
                                                                     content_type="application/json"))
    try:
        t0 = time.perf_counter()
        page.goto(f"{server}/sae/{SAE}/map")
        page.wait_for_function("window.saescopeMap && window.saescopeMap.ready && saescopeMap.drawMs !== undefined")
        ready_s = time.perf_counter() - t0
        assert page.evaluate("saescopeMap.n") == n
        assert page.evaluate("document.querySelectorAll('main *').length") < 100  # no DOM node per point
        page.locator("#map").scroll_into_view_if_needed()
        t = page.evaluate("saescopeMap.transform()")
        px, py = t["left"] + t["ox"] + q[target, 0] * t["scale"], t["top"] + t["oy"] + q[target, 1] * t["scale"]
        page.mouse.move(px, py)
        page.wait_for_selector(f"#map-tip[data-feature='{target}']:not([hidden])")
        page.mouse.move(t["left"] + t["ox"] + 0.5 * t["scale"], t["top"] + t["oy"] + 0.5 * t["scale"])  # the core
        page.wait_for_function(f"document.querySelector('#map-tip').dataset.feature !== '{target}'")
        page.mouse.wheel(0, -600)
        page.wait_for_function("new URLSearchParams(location.search).get('zoom') > 1")
        draw_ms = page.evaluate("saescopeMap.drawMs")
        page.screenshot(path=str(ARTIFACTS / "map-65536.png"))
        print(f"\n65,536 points: page ready in {ready_s:.2f} s, one full redraw {draw_ms:.1f} ms (headless, busy CPU)")
    finally:
        ctx.close()
    assert errors == []


def test_exact_knn_equals_brute_force_with_ties():
    """The kNN graph handed to umap-learn: self first, then by cosine descending, ties to the lower index."""
    from saescope.precompute.featuremap import _unit_rows, exact_knn

    rng = np.random.default_rng(0)
    u = _unit_rows(rng.standard_normal((700, 32)).astype(np.float32))
    u[5] = u[9]
    u[100] = u[9]  # three identical directions: ties at every rank they hold
    idx, dist = exact_knn(u, 6, chunk_bytes=4 * 700 * 50)  # 50 rows per block: blocks do not divide 700
    S = u.astype(np.float64) @ u.T.astype(np.float64)
    for r in range(len(u)):
        want = [j for j in np.lexsort((np.arange(len(u)), -S[r])) if j != r][:5]
        assert idx[r, 0] == r and dist[r, 0] == 0
        assert list(idx[r, 1:]) == want, r
        np.testing.assert_allclose(dist[r, 1:], 1 - S[r, want], atol=1e-6)


def test_umap_jit_cache_leaves_numbas_cache_folder_alone(tmp_path):
    """cache_umap_jit gives umap-learn's functions a disk cache in saescope's folder without moving the cache of
    kernels created later (a process-wide CACHE_DIR made co-occurrence's kernels compile again in every run).
    In a fresh process: numba's caches are made once per process."""
    import os
    import subprocess
    import sys

    code = """
import numba
from saescope.precompute import featuremap
featuremap.cache_umap_jit()
assert numba.config.CACHE_DIR == "", numba.config.CACHE_DIR
import umap.layouts
from numba.core.dispatcher import Dispatcher
print(next(f for f in vars(umap.layouts).values() if isinstance(f, Dispatcher)
           and f.__module__ == "umap.layouts")._cache._cache_path)
from saescope.precompute import cooccur
print(cooccur._sort_chunk._cache._cache_path)
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["SAESCOPE_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    umap_path, ours = out.stdout.split()
    assert umap_path.startswith(str(tmp_path / "numba")), umap_path
    assert not ours.startswith(str(tmp_path)), ours
