"""A fuzz of every route, the dashboard's and the worker's: hostile values in every parameter never give a 5xx,
and no response repeats more than 1 kB of what was sent.

Routes and their parameters are read from the apps themselves (FastAPI's routes and the worker's OpenAPI
document), so a route added later is fuzzed without editing this file. Values: odd digits (`²`, `①`), numbers past
INT64, NaN/inf, malformed edit strings, bidi and control characters, markup, and a 100,000-character string.
"""

from __future__ import annotations

import itertools
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from saescope.app.web.app import create_app

pytestmark = pytest.mark.slow

LONG = "A" * 100_000
LONG_URL = "A" * 60_000  # httpx refuses URLs over 64 kB: in a path or query string the long value is 60,000 characters
HOSTILE = ["", " ", "\u00b2", "\u2460", "-1", "0", "999999999999999999", "99999999999999999999999", "1e309", "nan",
           "-inf", "1.2.3", "..5", "3:add:.", "3:add:1.2.3", "1:steer:nan", "\u202eabc", "\x00\x1b[31m",
           "<script>alert(1)</script>", "{{7*7}}", "../../etc/passwd", LONG]
ECHO_LIMIT = 1000


def _no_echo(body: str) -> bool:
    return "A" * (ECHO_LIMIT + 1) not in body


def _routes(app) -> list[tuple[str, str, list[str], list[str], list[str]]]:
    """(method, path, path params, query params, form/body params) of every API route of the app."""
    def walk(routes, prefix=""):
        for r in routes:
            sub = getattr(r, "original_router", None)  # an included router (FastAPI >= 0.16x keeps it whole)
            if sub is not None:
                yield from walk(sub.routes, prefix + getattr(getattr(r, "include_context", None), "prefix", ""))
            elif isinstance(r, APIRoute):
                yield r

    out = []
    for r in walk(app.routes):
        if r.path.startswith("/static"):
            continue
        d = r.dependant
        for m in sorted(r.methods - {"HEAD"}):
            out.append((m, r.path, [p.alias for p in d.path_params], [p.alias for p in d.query_params],
                        [p.alias for p in d.body_params]))
    return out


@pytest.fixture(scope="module")
def served(tiny_store, tiny_worker):
    app = create_app(tiny_store, worker_url=tiny_worker)
    yield app, tiny_worker

VALID = {"sae": "tiny", "sae_id": "tiny", "feature": "3", "index": "3", "prompt": "The file is closed.",
         "text": "The file is closed.", "q": "the", "other": "tiny"}


def test_every_dashboard_route_survives_hostile_values(served):
    app, _ = served
    routes = _routes(app)
    assert len(routes) >= 20, routes  # the whole app, not a stub
    failures, n = [], 0
    with TestClient(app, raise_server_exceptions=False) as client:
        for method, path, pparams, qparams, bparams in routes:
            base_path = {p: VALID.get(p, "3") for p in pparams}
            for target, value in itertools.product(pparams + qparams + bparams, HOSTILE):
                if target in pparams and value in ("", "../../etc/passwd"):
                    continue  # not a path this route can be reached by
                pv = dict(base_path)
                q = {p: VALID[p] for p in qparams if p in VALID}
                b = {p: VALID[p] for p in bparams if p in VALID}
                if target not in bparams and value is LONG:
                    value = LONG_URL
                if target in pparams:
                    pv[target] = value
                elif target in qparams:
                    q[target] = value
                else:
                    b[target] = value
                url = path.format(**{k: quote(v, safe="") for k, v in pv.items()})
                r = client.request(method, url, params=q, data=b if method == "POST" else None)
                n += 1
                if r.status_code >= 500 and r.status_code != 503:  # 503: the worker is busy or down, by design
                    failures.append(f"{method} {path} {target}={value[:20]!r}: {r.status_code} {r.text[:200]}")
                elif not _no_echo(r.text):
                    failures.append(f"{method} {path} {target}=LONG: echoed {len(r.text):,} bytes ({r.status_code})")
    assert n > 500 and failures == [], "\n".join(failures[:40])


def _worker_routes(base: str) -> list[tuple[str, str, dict]]:
    spec = httpx.get(f"{base}/openapi.json").json()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body and "$ref" in body:
                body = spec["components"]["schemas"][body["$ref"].split("/")[-1]]
            out.append((method.upper(), path, body or {}))
    return out


WORKER_VALID = {"sae_id": "tiny", "text": "The file is closed.", "prompt": "The file is closed.", "feature": 3,
                "k": 5, "model": "local", "messages": [{"role": "user", "content": "hi"}]}
JSON_HOSTILE = HOSTILE + [-1, 0, 10**19, 1e308, None, [], {}, [LONG], {"x": LONG}]


def test_every_worker_route_survives_hostile_values(served):
    _, base = served
    routes = _worker_routes(base)
    assert any(p == "/top_features" for _, p, _ in routes)
    failures, n = [], 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for method, path, schema in routes:
            if method != "POST":
                continue
            props = list(schema.get("properties", {}))
            valid = {p: WORKER_VALID[p] for p in props if p in WORKER_VALID}
            for field, value in itertools.product(props, JSON_HOSTILE):
                try:
                    r = client.post(path, json={**valid, field: value})
                except httpx.TransportError as err:  # the worker died or dropped the connection: name the request
                    pytest.fail(f"{path} {field}={str(value)[:40]!r}: {type(err).__name__}: {err}")
                n += 1
                if r.status_code >= 500 and r.status_code != 503:
                    failures.append(f"{path} {field}={str(value)[:20]!r}: {r.status_code} {r.text[:200]}")
                elif not _no_echo(r.text):
                    failures.append(f"{path} {field}=LONG: echoed {len(r.text):,} bytes ({r.status_code})")
    assert n > 100 and failures == [], "\n".join(failures[:40])
