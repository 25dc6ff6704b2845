"""Shared feature lists: the list lives entirely in its URL, renders, exports as JSON/CSV, and round-trips."""

from __future__ import annotations

import csv
import io
from urllib.parse import parse_qsl, urlencode, urlparse

import pytest
from fastapi.testclient import TestClient

from saescope.app.settings import SERVE
from saescope.app.web.app import create_app
from saescope.precompute.store import Store


@pytest.fixture(scope="module")
def client(tiny_store):
    return TestClient(create_app(tiny_store, worker_url=None, cache=True))


ITEMS = [(7, "fires on <b>bold</b> & 'quotes'"), (3, ""), (50, "third one")]


def _q(name: str, items) -> str:
    return urlencode([("name", name)] + [p for i, n in items for p in (("f", i), ("note", n))])


def test_a_list_url_round_trips_through_the_page(client, tiny_store):
    q = _q("my <list>", ITEMS)
    r = client.get(f"/sae/tiny/list?{q}")
    assert r.status_code == 200
    assert "my &lt;list&gt;" in r.text and "<b>bold</b>" not in r.text  # user text is escaped
    # the page's own form, submitted as is, reproduces the same list (name, ids, notes, order)
    import re

    fields = re.findall(r'<input (?:type="hidden" )?name="(name|f|note)" value="([^"]*)"', r.text)
    import html

    again = urlencode([(k, html.unescape(v)) for k, v in fields])
    assert sorted(parse_qsl(again, keep_blank_values=True)) == sorted(parse_qsl(q, keep_blank_values=True))
    j = client.get(f"/api/saes/tiny/list?{q}").json()
    with Store(tiny_store) as s:
        for got, (i, note) in zip(j["features"], ITEMS):
            f = s.feature("tiny", i)
            assert got["index"] == i and got["note"] == note
            assert got["density"] == f.density and got["max_act"] == f.max_act
            assert f"activation histogram of {i}" in r.text
    assert j["name"] == "my <list>"


def test_csv_export_and_removing_an_item(client):
    q = _q("x", ITEMS)
    r = client.get(f"/api/saes/tiny/list?{q}&format=csv")
    assert r.headers["content-type"].startswith("text/csv") and 'filename="x.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(int(r["index"]), r["note"]) for r in rows] == ITEMS
    d = client.get(f"/sae/tiny/list?{q}&drop=1", follow_redirects=False)
    assert d.status_code == 303
    left = parse_qsl(urlparse(d.headers["location"]).query, keep_blank_values=True)
    assert [v for k, v in left if k == "f"] == ["7", "50"] and [v for k, v in left if k == "note"] == [ITEMS[0][1], "third one"]


def test_bad_lists_say_what_is_wrong(client):
    assert client.get("/sae/tiny/list?f=1&f=2&note=a").status_code == 422
    assert "one note per feature" in client.get("/api/saes/tiny/list?f=1&f=2&note=a").json()["error"]["message"]
    r = client.get("/api/saes/tiny/list?f=9999")
    assert r.status_code == 404 and "features 0 to 95" in r.json()["error"]["message"]
    many = urlencode([("f", 1)] * (SERVE.max_list + 1))
    assert client.get(f"/api/saes/tiny/list?{many}").status_code == 422
    assert client.get("/sae/tiny/list").status_code == 200  # an empty list is a page that says how to fill it
