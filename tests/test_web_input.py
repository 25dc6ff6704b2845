"""The web layer's input rules (app/web/lookups.py, edits.py, views.py, app.py's error handlers), against hostile
input: no 5xx, a 4xx that names what is allowed, no echo longer than errors.echo() allows, and a CSV export a
spreadsheet will not run."""

from __future__ import annotations

import csv
import html
import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from saescope.app.errors import ECHO_CHARS
from saescope.app.settings import SERVE, WORKER
from saescope.app.web.app import create_app

SAE = "tiny"
HUGE = "A" * 100_000


@pytest.fixture(scope="module")
def client(tiny_store):
    return TestClient(create_app(tiny_store, worker_url=None))


def _message(r) -> str:
    return r.json()["error"]["message"] if r.headers["content-type"].startswith("application/json") else r.text


def asgi_request(app, method: str, path: str, params: dict, accept: str) -> tuple[int, bytes]:
    """One request straight into the ASGI app (httpx refuses URLs over 64 kB, a raw HTTP client does not)."""
    import asyncio
    import concurrent.futures
    from urllib.parse import quote, urlencode

    body = urlencode(params).encode() if method == "post" else b""
    headers = [(b"host", b"test"), (b"accept", accept.encode())]
    if method == "post":
        headers += [(b"content-type", b"application/x-www-form-urlencoded"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": method.upper(), "path": path, "raw_path": quote(path).encode(),
             "query_string": urlencode(params, doseq=True).encode() if method == "get" else b"", "headers": headers,
             "scheme": "http", "server": ("test", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
             "root_path": "", "asgi": {"version": "3.0"}}
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    out: dict = {"status": 0, "body": b""}

    async def receive():
        return sent.pop() if sent else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    # a thread of its own: a session fixture (Playwright's sync API) may hold a running loop in this one
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, app(scope, receive, send)).result()
    return out["status"], out["body"]


# ---------------------------------------------------------------- issue 17 #1: digits that int() refuses
@pytest.mark.parametrize("q", ["²", "①", "#²", "٣"])  # superscript two, circled one, Arabic-Indic three
def test_unicode_digits_are_a_text_query_not_a_crash(client, q):
    assert "²".isdigit() and "①".isdigit()  # what made str.isdigit() the wrong rule
    r = client.get(f"/sae/{SAE}/search", params={"q": q})
    assert r.status_code == 200, r.text[:500]
    r = client.get(f"/sae/{SAE}/search", params={"q": q, "by": "index"})
    assert r.status_code == 422 and "not a feature index" in r.text
    assert client.get(f"/api/saes/{SAE}/search", params={"q": q}).status_code == 200


def test_ascii_digits_still_jump_to_the_feature(client):
    r = client.get(f"/sae/{SAE}/search", params={"q": "#7"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sae/{SAE}/feature/7"


# ---------------------------------------------------------------- issue 17 #2: page numbers
@pytest.mark.parametrize("path", [f"/sae/{SAE}/search?q=the", f"/api/saes/{SAE}/search?q=the", f"/sae/{SAE}",
                                  f"/api/saes/{SAE}/features"])
def test_a_huge_page_number_is_a_4xx_naming_the_range_not_a_damaged_store(client, path):
    r = client.get(path + ("&" if "?" in path else "?") + "page=999999999999999999")
    assert r.status_code == 422, r.text[:500]
    msg = _message(r)
    assert f"from 1 to {SERVE.max_page:,}" in msg and "amaged" not in msg


def test_a_page_past_the_end_is_an_empty_page_that_links_back(client):
    total = client.get(f"/api/saes/{SAE}/features", params={"size": 10}).json()["total"]
    last = -(-total // 10)
    r = client.get(f"/sae/{SAE}", params={"size": 10, "page": last + 5})
    assert r.status_code == 200 and f"fill {last} page" in r.text and f"page={last}" in r.text
    j = client.get(f"/api/saes/{SAE}/features", params={"size": 10, "page": last + 5}).json()
    assert j["total"] == total and j["features"] == []
    r = client.get(f"/sae/{SAE}/search", params={"q": "e", "page": SERVE.max_page})
    assert r.status_code == 200 and "past the end" in r.text


# ---------------------------------------------------------------- issue 17 #3, #7: one strict edit parser
@pytest.mark.parametrize("value", [".", "1.2.3", "..5", "1e", "e5", "nan", "inf", "--1", "1,5"])
def test_malformed_edit_values_are_a_4xx_naming_the_format(client, value):
    edit = f"3:add:{value}"
    for path in ("/steer", "/api/steer", "/api/ablate"):
        r = client.get(path, params={"sae": SAE, "prompt": "hi", "edit": edit})
        assert r.status_code == 422, (path, value, r.status_code)
        msg = _message(r)
        assert "FEATURE:MODE:VALUE" in msg and "ablate, clamp, add" in msg, msg[:500]


def test_the_edit_parser_reads_every_valid_form_as_float_does(tiny_store):
    from saescope.app.web.edits import parse_edit
    from saescope.precompute.store import Store

    with Store(tiny_store) as store:
        sae = store.require_sae(SAE)
    for spec, (feature, mode, value) in {"3:add:8": (3, "add", "8"), "45:clamp:0.5": (45, "clamp", "0.5"),
                                         "7:ablate": (7, "ablate", "0"), "7": (7, "add", "0"),
                                         "3:add:.5": (3, "add", ".5"), "3:add:5.": (3, "add", "5."),
                                         "3:clamp:-1.5e-3": (3, "clamp", "-1.5e-3"), "3:add:+2E2": (3, "add", "+2E2"),
                                         " 3:add:1 ": (3, "add", "1")}.items():
        e = parse_edit(spec, sae)
        assert (e.feature, e.mode, e.value) == (feature, mode, float(value)), spec


def test_edit_rows_read_every_valid_form_losslessly(client, tiny_store):
    """The steer page's rows (edit_fields) hold every part of an edit, :unit included: the edit a row writes back
    (FEATURE:ablate, else FEATURE:MODE:VALUE plus :unit, as static/app.js builds it) parses to the same edit."""
    import re

    from saescope.app.web.edits import edit_fields, parse_edit
    from saescope.precompute.store import Store

    with Store(tiny_store) as store:
        sae = store.require_sae(SAE)
    specs = ["3:add:8", "3:add:8:unit", "45:clamp:0.5", "7:ablate", "7", "7:unit", "3:add:.5", "3:add:5.:unit",
             "3:clamp:-1.5e-3", "3:add:+2E2", " 3:cap:1:unit ", "3:orthogonal:0.25:unit", "3:12", "3:12:unit"]
    for spec in specs:
        ef = edit_fields(spec)
        assert ef is not None, spec
        assert re.fullmatch(r"-?(\d+(\.\d+)?|\.\d+)([eE][+-]?\d+)?", ef.value) or ef.value == "", (spec, ef)
        back = f"{ef.feature}:ablate" if ef.mode == "ablate" else \
            f"{ef.feature}:{ef.mode}:{ef.value or 0}" + (":unit" if ef.unit else "")
        assert parse_edit(back, sae) == parse_edit(spec, sae), (spec, back)
    assert edit_fields("3:boost:1") is None and edit_fields("") == edit_fields("  ")
    # the page renders them: a ticked unit box for :unit edits, the raw box kept for one it cannot read
    r = client.get("/steer", params=[("sae", SAE), ("prompt", "hi"), ("edit", "3:add:8:unit"), ("edit", "4:clamp:1")])
    rows = re.findall(r'<div class="edit-row"( data-raw-only)?>(.*?)</div>', r.text, re.S)
    assert [("checked" in body.split('class="e-unit"')[1].split(">")[0]) for _, body in rows] == [True, False]
    assert 'name="edit" value="3:add:8:unit"' in rows[0][1] and 'class="e-value"' in rows[0][1]
    bad = client.get("/steer", params=[("sae", SAE), ("prompt", "hi"), ("edit", "3:boost:1")])
    assert bad.status_code == 422 and '<div class="edit-row" data-raw-only>' in bad.text
    assert 'value="3:boost:1"' in bad.text


def test_edit_items_are_bounded_in_length_and_count(client):
    status, body = asgi_request(client.app, "get", "/steer", {"sae": SAE, "prompt": "hi", "edit": HUGE}, "text/html")
    assert status == 422 and len(body) < 20_000 and HUGE[:ECHO_CHARS + 1].encode() not in body  # was 200, 102 kB
    assert f"at most {WORKER.max_edit_chars} characters" in body.decode()
    for path in ("/api/steer", "/api/ablate"):
        status, body = asgi_request(client.app, "get", path, {"sae": SAE, "prompt": "hi", "edit": HUGE},
                                    "application/json")
        assert status == 422 and len(body) < 1000, path
    many = [f"{i}:add:1" for i in range(WORKER.max_edits + 1)]
    for path in ("/steer", "/api/steer", "/api/ablate"):
        r = client.get(path, params={"sae": SAE, "prompt": "hi", "edit": many})
        assert r.status_code == 422 and str(WORKER.max_edits) in _message(r), path


def test_a_valid_edit_reaches_the_worker_check(client):
    """A well-formed edit passes the parser; without a worker the answer is the worker notice (503), not a 422."""
    r = client.get("/api/steer", params={"sae": SAE, "prompt": "hi", "edit": "3:add:.5"})
    assert r.status_code == 503 and "worker" in r.json()["error"]["message"]


# ---------------------------------------------------------------- issue 17 #6: no unbounded echo
ECHO_ROUTES = [
    ("get", "/inspect", {"sae": HUGE, "prompt": "hi"}),
    ("get", "/steer", {"sae": HUGE, "prompt": "hi", "edit": "3:add:1"}),
    ("post", "/live/activations", {"sae": HUGE, "feature": 1, "text": "hi"}),
    ("post", "/live/explain", {"sae": HUGE, "feature": 1}),
    ("get", "/api/inspect", {"sae": HUGE, "prompt": "hi"}),
    ("get", "/api/steer", {"sae": HUGE, "prompt": "hi", "edit": "3:add:1"}),
    ("get", "/api/ablate", {"sae": HUGE, "prompt": "hi", "edit": "3:ablate"}),
    ("get", "/api/attribute", {"sae": HUGE, "prompt": "hi"}),
    ("get", f"/sae/{HUGE}", {}),
    ("get", f"/sae/{HUGE}/feature/1", {}),
    ("get", f"/sae/{HUGE}/search", {"q": "x"}),
    ("get", f"/api/saes/{HUGE}/features", {}),
    ("get", f"/api/saes/{HUGE}/features/1", {}),
    ("get", f"/api/saes/{HUGE}/map", {}),
    ("get", f"/no/such/{HUGE}", {}),
]


@pytest.mark.parametrize("method, path, params", ECHO_ROUTES, ids=[f"{m} {p[:24]}" for m, p, _ in ECHO_ROUTES])
def test_a_100k_character_id_is_a_4xx_of_under_1kb(client, method, path, params):
    status, body = asgi_request(client.app, method, path, params, "application/json")  # the message alone
    assert 400 <= status < 500, (path[:40], status, body[:300])
    assert len(body) < 1000, (path[:40], len(body))
    status, body = asgi_request(client.app, method, path, params, "text/html")  # the error page around it
    assert 400 <= status < 500 and HUGE[:ECHO_CHARS + 1].encode() not in body


def test_an_unknown_sae_names_the_valid_ones(client):
    r = client.get("/api/inspect", params={"sae": "nope", "prompt": "hi"})
    assert r.status_code == 404 and f"valid: {SAE}" in r.json()["error"]["message"]


# ---------------------------------------------------------------- issue 17 #9: CSV injection
def test_the_csv_export_neutralises_formula_cells(client):
    notes = ['=HYPERLINK("http://evil.example","x")', "+SUM(1+1)", "-2+3", "@cmd", "\tlead", "\rlead", "plain", ""]
    params = [("name", "=1+1"), ("format", "csv")] + [p for i, n in enumerate(notes) for p in (("f", i), ("note", n))]
    r = client.get(f"/api/saes/{SAE}/list", params=params)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
    assert [row["note"] for row in rows] == ["'" + n if n[:1] in ("=", "+", "-", "@", "\t", "\r") else n for n in notes]
    assert {row["list"] for row in rows} == {"'=1+1"}
    assert [int(row["index"]) for row in rows] == list(range(len(notes)))  # numbers are left as they are
    j = client.get(f"/api/saes/{SAE}/list", params=[p for p in params if p != ("format", "csv")]).json()
    assert [e["note"] for e in j["features"]] == notes  # JSON keeps the exact text


# ---------------------------------------------------------------- create_app
def test_create_app_always_returns_the_fastapi_app_with_the_cache_inside(tiny_store):
    plain, cached = create_app(tiny_store), create_app(tiny_store, cache=True)
    assert isinstance(plain, FastAPI) and isinstance(cached, FastAPI)
    assert plain.state.page_cache is None and cached.state.page_cache is not None
    c = TestClient(cached)
    c.get(f"/sae/{SAE}/feature/2")
    assert c.get(f"/sae/{SAE}/feature/2").headers["x-cache"] == "hit"
    assert c.get("/_cache").json()["hits"] == cached.state.page_cache.hits == 1


# ---------------------------------------------------------------- short echoes
LONG = 60_000  # the HTTP client refuses URLs over 65,536 characters; request bodies carry 100,000



@pytest.mark.parametrize("url, param", [("/sae/tiny/search", "q"), ("/inspect", "prompt"),
                                        ("/api/saes/tiny/search", "q"), ("/api/inspect", "prompt")])
def test_a_422_never_echoes_a_whole_input(client, url, param):
    """Before: the 422 repeated the whole rejected value, so a 100,000-character prompt came back as ~100 kB."""
    huge = client.get(url, params={param: "x" * LONG, "sae": "tiny"})
    assert huge.status_code == 422
    assert "x" * 200 not in huge.text
    assert f"{LONG:,}" in html.unescape(huge.text), huge.text[-1500:]
    # the same refusal for a value just over the limit: only the stated length differs (digits, not the value)
    small = client.get(url, params={param: "x" * 5_000, "sae": "tiny"})
    assert small.status_code == 422 and "5,000" in html.unescape(small.text)
    assert abs(len(huge.content) - len(small.content)) < 10
    if url.startswith("/api/"):
        assert len(huge.content) < 2048 and f"{LONG:,}-character" in huge.json()["error"]["message"]


def test_a_100k_prompt_in_a_body_gets_a_short_422(client, worker_client):
    r = client.post("/live/activations", data={"sae": "tiny", "feature": "1", "text": "z" * 100_000},
                         headers={"accept": "application/json"})
    assert r.status_code == 422 and len(r.content) < 2048, len(r.content)
    msg = r.json()["error"]["message"]
    assert "100,000-character" in msg and "text" in msg
    page_ = client.post("/live/activations", data={"sae": "tiny", "feature": "1", "text": "z" * 100_000})
    assert page_.status_code == 422 and "z" * 200 not in page_.text and "100,000" in page_.text
    # the worker's own refusal, which the dashboard passes on
    r = worker_client.post("/activations", json={"sae_id": "tiny", "text": "w" * 100_000, "feature": 1})
    assert r.status_code == 422 and len(r.content) < 2048, len(r.content)
    assert "100,000-character" in r.json()["error"]["message"]

