"""The house rules, checked: dependencies point one way, only the store touches duckdb, every default is
defined once, every cached route says so, and the store schema drives its SQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package: the checkout's
    app/ and precompute/ are saescope.app and saescope.precompute)."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(("saescope",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
    return out


def _py(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_precompute_never_imports_app():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m == "saescope.app" or m.startswith("saescope.app."))
                 for p in _py("precompute")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_store_imports_duckdb():
    offenders = [str(p.relative_to(ROOT)) for p in _py("app") + _py("precompute")
                 if any(m.split(".")[0] == "duckdb" for m in _imports(p)) and "precompute/store" not in str(p)]
    assert offenders == []


def test_relative_import_resolution_catches_a_violation(tmp_path):
    """The checker itself: a relative import that climbs out of precompute/ into app/ is seen as app."""
    p = ROOT / "precompute" / "saes" / "_probe_tmp.py"
    p.write_text("from ...app import settings\n")
    try:
        assert "saescope.app" in _imports(p)
    finally:
        p.unlink()


LIMIT_LINE = re.compile(r"Query\(|Field\(|Form\(|maxlength=|max=|min=|port|timeout|def \w+\(.*=")


def test_serving_defaults_are_written_once():
    """Where a route, wire model, template or signature states a limit or default, it reads app/settings.py:
    none of the settings' numbers is written down there again."""
    from saescope.app.settings import MAP, SERVE, WORKER

    literals = {str(v) for obj in (SERVE, WORKER, MAP) for v in vars(obj).values()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 8}
    offenders = []
    for p in _py("app") + sorted((ROOT / "templates").glob("*.html")):
        if p.name == "settings.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not LIMIT_LINE.search(line) or "status" in line:
                continue
            for lit in literals:
                if re.search(rf"(?<![\w.]){re.escape(lit)}(?![\w.])", line):
                    offenders.append(f"{p.relative_to(ROOT)}:{n}: {lit}")
    assert offenders == []


def test_every_route_declares_whether_it_is_cached():
    """Pages of precomputed data opt in with @cacheable; live routes never do."""
    from saescope.app.web import api, live, live_api, pages

    cached = {r.path for router in (pages.router, api.router) for r in router.routes
              if getattr(r.endpoint, "cacheable", False)}
    assert {"/", "/sae/{sae_id}", "/sae/{sae_id}/feature/{index}", "/sae/{sae_id}/search"} <= cached
    assert not any(getattr(r.endpoint, "cacheable", False) for r in (*live.router.routes, *live_api.router.routes))
    assert "/sae/{sae_id}/random" not in cached


def test_store_schema_drives_create_insert_and_reader():
    from saescope.precompute.store import SAEInfo
    from saescope.precompute.store.schema import FEATURES, SAES, STORE_TABLES

    assert [f.name for f in SAEInfo.__dataclass_fields__.values()] == SAES.names
    for t in STORE_TABLES:
        sql = t.create_sql()
        assert all(re.search(rf"\b{c.name} {re.escape(c.sql)}", sql) for c in t.cols), t.name
    ins = FEATURES.insert_sql("src")
    assert ins.startswith("INSERT INTO features (sae_id, feature,") and "SELECT *" not in ins
    src = "\n".join(p.read_text() for p in _py("precompute/store"))
    assert not re.search(r"INSERT INTO \w+ SELECT \*", src) and not re.search(r"INSERT INTO \w+ VALUES", src)


@pytest.mark.parametrize("module", ["saescope.app.worker.client"])
def test_worker_client_is_typed_with_the_wire_models(module):
    import importlib
    import inspect

    from pydantic import BaseModel

    client = importlib.import_module(module).WorkerClient
    for name in ("tokenize", "activations", "top_features", "token_features"):
        sig = inspect.signature(getattr(client, name), eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        assert issubclass(params[0].annotation, BaseModel) and issubclass(sig.return_annotation, BaseModel), name
