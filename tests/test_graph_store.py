"""Stored attribution graphs: `saescope graph STORE --prompt/--import`, the graphs table, /graph/SLUG (no worker),
/graph/SLUG.json, the upload form, the home page's example link, and the stored page in Chromium."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from saescope.precompute.circuits.export import load_graph_json

PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def tc_store(make_store, tiny_lm_dir, tmp_path_factory):
    """A store precomputed with two transcoders of the tiny model (layers 0 and 2) and their folders."""
    from test_circuits import _write_saelens

    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline import SAESpec

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    root = tmp_path_factory.mktemp("store_tc")
    folders = _write_saelens(root, lm, [0, 2], seed=9)
    path = make_store(saes=[SAESpec(folders[0], sae_id="tc0"), SAESpec(folders[1], sae_id="tc2")], feature_map=False)
    return path, folders, lm


@pytest.fixture()
def store_copy(tc_store, tmp_path):
    out = tmp_path / "graphs.duckdb"
    shutil.copyfile(tc_store[0], out)
    return out


def _cli(argv, capsys):
    from saescope.app.cli import main

    code = main(argv)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def computed(tc_store, tmp_path_factory):
    """The tiny store with the graph of PROMPT computed and stored by the CLI (slug 'cat')."""
    from saescope.app.cli import main

    out = tmp_path_factory.mktemp("computed") / "g.duckdb"
    shutil.copyfile(tc_store[0], out)
    assert main(["graph", str(out), "--prompt", PROMPT, "--slug", "cat"]) == 0
    return out


def test_cli_computes_checks_and_stores_the_graph(computed, tc_store):
    """The stored graph is what the library computes with the same model and transcoders, with its checks."""
    from saescope.precompute.circuits.run import circuit
    from saescope.precompute.circuits.transcoders import load_transcoders
    from saescope.precompute.store import Store

    _, folders, lm = tc_store
    with Store(computed) as s:
        row = s.graph("cat")
        listed = s.graphs()
    assert [g.slug for g in listed] == ["cat"] and listed[0].graph == ""
    gf = load_graph_json(row.graph)
    assert gf.to_json() == json.loads(row.graph)
    direct = circuit(lm, load_transcoders(folders, lm.n_layers), PROMPT, check=True)
    want = direct.to_json()
    assert {(lk["source"], lk["target"]) for lk in gf.links} == {(lk["source"], lk["target"]) for lk in want["links"]}
    w = {(lk["source"], lk["target"]): lk["weight"] for lk in want["links"]}
    assert all(abs(lk["weight"] - w[(lk["source"], lk["target"])]) <= 1e-5 * max(1.0, abs(lk["weight"])) for lk in gf.links)
    s = gf.metadata["saescope"]
    assert row.sae_ids == {"0": "tc0", "2": "tc2"} and s["sae_ids"] == {"0": "tc0", "2": "tc2"}
    assert abs(row.replacement_score - direct.scores[0]) < 1e-6 and abs(row.completeness_score - direct.scores[1]) < 1e-6
    assert row.n_nodes == len(gf.nodes) and row.n_links == len(gf.links) and row.prompt == PROMPT
    assert len(s["node_checks"]) == len(direct.node_checks) > 0
    for got, c in zip(s["node_checks"], direct.node_checks):
        assert abs(got["estimate"] - c.estimate) <= 1e-4 * max(1.0, abs(c.estimate))
        assert abs(got["true"] - c.true) <= 1e-4 * max(1.0, abs(c.true))
    assert row.source.startswith("computed with")


def test_cli_refuses_bad_requests(store_copy, tiny_store, capsys):
    code, out = _cli(["graph", str(store_copy), "--prompt", "word " * 200], capsys)
    assert code == 2 and "at most 64" in out.err
    code, out = _cli(["graph", str(store_copy), "--prompt", PROMPT, "--target", "two words"], capsys)
    assert code == 2 and "exactly one token" in out.err
    code, out = _cli(["graph", str(store_copy), "--prompt", PROMPT, "--slug", "bad slug!"], capsys)
    assert code == 2 and "letters, digits" in out.err
    code, out = _cli(["graph", str(store_copy), "--prompt", PROMPT, "--transcoders", "nope"], capsys)
    assert code == 2 and "unknown transcoder 'nope'" in out.err and "tc0" in out.err
    code, out = _cli(["graph", str(tiny_store), "--prompt", PROMPT], capsys)
    assert code == 2 and "no transcoders" in out.err


def _ct_file(tmp_path, computed):
    """A circuit-tracer-style file: the stored graph plus keys other writers add (qParams, a top-level extra)."""
    from saescope.precompute.store import Store

    with Store(computed) as s:
        data = json.loads(s.graph("cat").graph)
    ids = [n["node_id"] for n in data["nodes"]]
    data["qParams"] = {"pinnedIds": ids[:2], "supernodes": [["group", ids[0], ids[1]]], "linkType": "both",
                       "clickedId": ids[0], "sg_pos": ""}
    data["metadata"]["slug"] = "from-ct"
    data["metadata"]["info"] = {"creator_name": "someone <b>", "generator": {"name": "circuit-tracer"}}
    data["extra_key"] = [1, 2, {"x": None}]
    f = tmp_path / "graph.json"
    f.write_text(json.dumps(data))
    return f, data


def test_import_round_trips_unchanged(computed, store_copy, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app
    from saescope.precompute.store import Store

    f, data = _ct_file(tmp_path, computed)
    code, out = _cli(["graph", str(store_copy), "--import", str(f)], capsys)
    assert code == 0, out.err
    assert "stored graph 'from-ct'" in out.out
    with Store(store_copy) as s:
        row = s.graph("from-ct")
    assert json.loads(row.graph) == data and row.sae_ids == {"0": "tc0", "2": "tc2"}
    assert row.source == "imported from graph.json"
    # a second import of the same slug is refused unless --replace; --slug names it otherwise
    code, out = _cli(["graph", str(store_copy), "--import", str(f)], capsys)
    assert code == 2 and "already has a graph 'from-ct'" in out.err and "--replace" in out.err
    assert _cli(["graph", str(store_copy), "--import", str(f), "--replace"], capsys)[0] == 0
    assert _cli(["graph", str(store_copy), "--import", str(f), "--slug", "other"], capsys)[0] == 0
    with Store(store_copy) as s:
        assert sorted(g.slug for g in s.graphs()) == ["from-ct", "other"]
        assert json.loads(s.graph("other").graph) == data
    client = TestClient(create_app(store_copy, worker_url=None))
    r = client.get("/graph/from-ct.json")
    assert r.status_code == 200 and r.json() == data
    assert 'filename="from-ct.json"' in r.headers["content-disposition"]
    client.app.state.store.close()  # DuckDB shares one open database per path within a process


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object with metadata, nodes and links"),
    ('{"metadata": {"prompt": "x", "prompt_tokens": ["x"]}, "links": []}', "the file has no 'nodes'"),
    ('{"metadata": {"prompt_tokens": ["x"]}, "nodes": [], "links": []}', "metadata has no 'prompt'"),
    ('{"metadata": {"prompt": "x", "prompt_tokens": ["x"]}, "nodes": [{"node_id": "a", "feature_type": "embedding", '
     '"ctx_idx": 0, "layer": "E"}], "links": [{"source": "a", "target": "b", "weight": 1}]}',
     "links[0].target 'b' is not a node_id of any node"),
    ('{"metadata": {"prompt": "x", "prompt_tokens": ["x"]}, "nodes": [{"node_id": "a", "feature_type": "embedding", '
     '"ctx_idx": 3, "layer": "E"}], "links": []}', "nodes[0].ctx_idx is 3; metadata.prompt_tokens has 1 tokens"),
    ('{"metadata": {"prompt": "x", "prompt_tokens": ["x"]}, "nodes": [{"node_id": "a", "feature_type": "embedding", '
     '"ctx_idx": 0, "layer": "E"}, {"node_id": "a", "feature_type": "embedding", "ctx_idx": 0, "layer": "E"}], '
     '"links": []}', "nodes[1].node_id 'a' appears twice"),
    ('{"metadata": {"prompt": "x", "prompt_tokens": ["x"]}, "nodes": [{"node_id": "a", "feature_type": "embedding", '
     '"ctx_idx": 0, "layer": "E"}], "links": [{"source": "a", "target": "a", "weight": NaN}]}',
     "links[0].weight is nan; expected a finite number"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_graph_json_exits_2_naming_the_problem(store_copy, tmp_path, capsys, text, message):
    f = tmp_path / "bad.json"
    f.write_text(text)
    code, out = _cli(["graph", str(store_copy), "--import", str(f)], capsys)
    assert code == 2 and message in out.err and "bad.json" in out.err, out.err


@pytest.mark.parametrize("text,message", BAD[:3] + BAD[4:6])
def test_bad_upload_is_a_422_naming_the_problem(tc_store, text, message):
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app

    client = TestClient(create_app(tc_store[0], worker_url=None))
    r = client.post("/graph/upload", files={"file": ("bad.json", text.encode(), "application/json")})
    assert r.status_code == 422 and message in r.text.replace("&#39;", "'"), r.text[-2000:]


def test_stored_graph_page_without_worker(computed):
    """/graph/SLUG draws the stored graph with its checks and feature cards; no worker is configured at all."""
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app
    from saescope.precompute.store import Store

    with Store(computed) as s:
        data = json.loads(s.graph("cat").graph)
    client = TestClient(create_app(computed, worker_url=None))
    first = data["nodes"][0]["node_id"]
    r = client.get("/graph/cat", params={"pinned": first, "selected": first, "groups": f"g:{first}"})
    assert r.status_code == 200, r.text
    html = r.text
    ids = re.findall(r'<g class="node [^"]*" data-id="([^"]+)"', html)
    assert sorted(ids) == sorted(n["node_id"] for n in data["nodes"])
    assert html.count('<line class="link') == len(data["links"])
    assert re.search(rf'class="node [^"]*pinned[^"]*selected[^"]*" data-id="{re.escape(first)}"', html)
    assert 'id="replacement-score"' in html and f'{data["metadata"]["saescope"]["replacement_score"]:.3f}' in html
    rows = re.findall(r'<table class="checks" id="node-checks">(.*?)</table>', html, re.S)[0].count("<tr class=")
    assert rows == len(data["metadata"]["saescope"]["node_checks"])
    blob = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', html, re.S).group(1))
    feat = [n for n in blob["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feat and all(f"tc{n['layer']}/{n['node_id'].split('_')[1]}" in blob["cards"] for n in feat)
    assert 'href="/graph/cat.json"' in html
    assert client.get("/graph").status_code == 200 and 'href="/graph/cat"' in client.get("/graph").text
    r = client.get("/graph/nope")
    assert r.status_code == 404 and "no stored graph" in r.text and "cat" in r.text
    assert client.get("/graph/nope.json").status_code == 404
    # interventions need the worker: the stored graph is still drawn and the page says why not
    r = client.get("/graph/cat", params={"edit": f"{feat[0]['node_id']}:scale:2"})
    assert r.status_code == 200 and 'id="intervention-error"' in r.text and "--no-worker" in r.text
    r = client.get("/graph/cat", params={"edit": "1_2:scale:2"})
    assert r.status_code == 422 and "NODE:scale:K" in r.text


def test_upload_form_shows_the_file(computed, tmp_path):
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app

    f, data = _ct_file(tmp_path, computed)
    client = TestClient(create_app(computed, worker_url=None))
    assert 'id="upload-form"' in client.get("/graph").text
    r = client.post("/graph/upload", files={"file": ("mine.json", f.read_bytes(), "application/json")},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/graph/upload/")
    page = client.get(r.headers["location"])
    assert page.status_code == 200 and "mine.json" in page.text
    ids = re.findall(r'<g class="node [^"]*" data-id="([^"]+)"', page.text)
    assert sorted(ids) == sorted(n["node_id"] for n in data["nodes"])
    assert "someone <b>" not in page.text  # nothing of the file's free text is rendered unescaped
    assert client.get("/graph/upload/0123456789abcdef").status_code == 404


def test_home_links_to_the_stored_example(computed, tc_store, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app
    from saescope.precompute.config import EMBEDDED

    live = TestClient(create_app(tc_store[0], worker_url=None)).get("/").text
    assert '/graph?prompt=' in live  # transcoders, no stored example: the live graph
    f, data = _ct_file(tmp_path, computed)
    data["metadata"]["prompt"] = EMBEDDED.graph_prompt
    f.write_text(json.dumps(data))
    out = tmp_path / "ex.duckdb"
    shutil.copyfile(computed, out)
    assert _cli(["graph", str(out), "--import", str(f), "--slug", EMBEDDED.graph_slug], capsys)[0] == 0
    home = TestClient(create_app(out, worker_url=None)).get("/").text
    assert f'href="/graph/{EMBEDDED.graph_slug}"' in home and '/graph?prompt=' not in home


@pytest.mark.slow
@pytest.mark.browser
def test_stored_graph_in_chromium(computed, browser):
    """Chromium opens a stored graph (no worker), clicks a node, pins two into a supernode, reloads: same view."""
    import threading
    import time

    import httpx
    import uvicorn

    from conftest import ARTIFACTS, free_port
    from saescope.app.web.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(computed, worker_url=None), host="127.0.0.1", port=port,
                                           log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(base + "/", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        pg = ctx.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(base + "/graph/cat")
        nodes = pg.locator("g.node.cross-layer-transcoder")
        assert nodes.count() >= 2
        a, c = nodes.nth(0).get_attribute("data-id"), nodes.nth(1).get_attribute("data-id")
        nodes.nth(0).click()
        pg.wait_for_selector("#node-card h2")
        assert a in pg.inner_text("#node-card") and "strongest" in pg.inner_text("#node-card")
        assert "feature page of tc" in pg.inner_text("#node-card")
        nodes.nth(0).click(modifiers=["Shift"])
        nodes.nth(1).click(modifiers=["Shift"])
        assert pg.locator("#pinned-list li").count() == 2
        pg.once("dialog", lambda d: d.accept("my supernode"))
        pg.click("#group-btn")
        assert f"my supernode: {a}, {c}" in pg.inner_text("#group-list")
        # an intervention is written into the URL too
        pg.fill("#edit-scale", "3")
        pg.click("#add-scale")
        assert pg.locator("#edit-list li").count() == 1
        url = pg.url
        assert "/graph/cat?" in url and "groups=" in url and "selected=" in url and "edit=" in url
        pg.goto(url)
        pg.wait_for_selector("#node-card h2")
        assert a in pg.inner_text("#node-card")
        assert f"my supernode: {a}, {c}" in pg.inner_text("#group-list")
        assert pg.locator(f'g.node.selected[data-id="{a}"]').count() == 1
        assert pg.locator("#edit-list li").count() == 1 and f"{a}:scale:3" in pg.inner_text("#edit-list")
        assert pg.locator("#intervention-error").count() == 1  # no worker: said, the graph still drawn
        assert not errors, errors
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "stored_graph_page.png"), full_page=True)
    finally:
        ctx.close()
        server.should_exit = True
        th.join(timeout=10)


@pytest.mark.slow
def test_graph_on_the_embedded_default_adds_every_demo_layer(tmp_path, default_model_dir):
    """`saescope graph` (and so the demo's stored example) on a store of the embedded default with one transcoder
    dashboard: the graph covers all 30 layers with the committed demo transcoders (as the worker's graphs do), the
    stored row links only the store's own transcoder, and the file's metadata names every layer's."""
    from saescope.app.cli.graph import compute_graph
    from saescope.precompute.embedded import demo_transcoder_dirs
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    out = tmp_path / "d.duckdb"
    run_precompute(PrecomputeSpec(out=out, tokens=2048, progress=False, feature_map=False, eval_tokens=0,
                                  saes=[SAESpec(str(demo_transcoder_dirs()[2]), sae_id="tc2")]))
    row = compute_graph(out, "import numpy as", slug="ex", max_feature_nodes=64)
    assert row["sae_ids"] == {"2": "tc2"}
    meta = json.loads(row["graph"])["metadata"]["saescope"]
    assert len(meta["sae_ids"]) == 30 and meta["sae_ids"]["2"] == "tc2" and meta["sae_ids"]["0"] == "demo-transcoder-L0"
    assert meta["feature_layers"] == list(range(30))
