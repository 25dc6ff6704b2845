"""The house rules, checked: dependencies point one way, only the store touches duckdb, every default is
defined once, every cached route says so, and the store schema drives its SQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package: the checkout's
    app/ and precompute/ are saescope.app and saescope.precompute). `source` stands in for the file's text."""
    tree = ast.parse(path.read_text() if source is None else source)
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


def test_relative_import_resolution_catches_a_violation():
    """The checker itself: a relative import that climbs out of precompute/ into app/ is seen as app (checked on
    source text placed, in thought only, at precompute/saes/probe.py: nothing is written into the checkout)."""
    assert "saescope.app" in _imports(ROOT / "precompute" / "saes" / "probe.py", "from ...app import settings\n")
    assert "saescope.precompute.saes.base" in _imports(ROOT / "precompute" / "saes" / "probe.py", "from .base import SAE\n")


LIMIT_LINE = re.compile(r"Query\(|Field\(|Form\(|maxlength=|max=|min=|\bport|timeout|def \w+\(.*=|: (int|float) = |MAX_")


def _settings_literals(*objs) -> set[str]:
    return {str(v) for obj in objs for v in vars(obj).values()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 8}


def _literal_offenders(files: list[Path], literals: set[str], skip: str) -> list[str]:
    offenders = []
    for p in files:
        if p.name == skip:
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not LIMIT_LINE.search(line) or "status" in line:
                continue
            for lit in literals:
                if re.search(rf"(?<![\w.]){re.escape(lit)}(?![\w.])", line):
                    offenders.append(f"{p.relative_to(ROOT)}:{n}: {lit}")
    return offenders


def _numeric(node: ast.AST) -> bool:
    """A number written down: 50, -1.5, 64 * 2**20."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _numeric(node.operand)
    if isinstance(node, ast.BinOp):
        return _numeric(node.left) and _numeric(node.right)
    return False


def _named_literals(path: Path, names: set[str]) -> list[str]:
    """`name = 50`, `name: int = 50`, `def f(name=50)` and `MAX_NAME = 50` where name is a config setting's name."""
    found = []

    def check(name: str, value: ast.AST | None, line: int) -> None:
        if value is not None and _numeric(value) and name.lower().lstrip("_") in names:
            found.append(f"{path.name}:{line}: {name}")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            check(node.target.id, node.value, node.lineno)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    check(t.id, node.value, node.lineno)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            for arg, d in zip(pos[len(pos) - len(a.defaults):], a.defaults):
                check(arg.arg, d, node.lineno)
            for arg, d in zip(a.kwonlyargs, a.kw_defaults):
                check(arg.arg, d, node.lineno)
    return found


def test_library_defaults_and_limits_are_written_once():
    """precompute/ gives none of the settings of precompute/config.py (EMBEDDED, PRECOMPUTE, TRAIN, EXPLAIN,
    LIMITS) a number of its own: a parameter, field or MAX_ constant named like a setting reads it from there
    (intervene.py's MAX_EDITS = 16 and ExplainConfig.n_test = 50 were such second definitions)."""
    from dataclasses import fields

    from saescope.precompute import config

    every = {f.name for obj in (config.EMBEDDED, config.PRECOMPUTE, config.TRAIN, config.EXPLAIN, config.LIMITS)
             for f in fields(obj)}
    # the limits, the explainer's knobs, and every max_*; generic names (seed, k, batch_size) are many things
    names = ({f.name for f in fields(config.LIMITS)} | {f.name for f in fields(config.EXPLAIN)} - {"seed"}
             | {n for n in every if n.startswith("max_")})
    offenders = [o for p in _py("precompute") if p.name != "config.py" for o in _named_literals(p, names)]
    assert offenders == []


def test_the_library_scan_sees_a_second_definition(tmp_path):
    """The scanner itself, on the two kinds of duplicate the issue found."""
    p = tmp_path / "probe.py"
    p.write_text("MAX_EDITS = 16\nclass C:\n    n_test: int = 50\ndef f(seed=0, top_k: int = 20, other=3): pass\n")
    got = _named_literals(p, {"max_edits", "n_test", "top_k"})
    assert sorted(g.split(": ")[1] for g in got) == ["MAX_EDITS", "n_test", "top_k"]


def test_serving_defaults_are_written_once():
    """Where a route, wire model, template or signature states a limit or default, it reads app/settings.py:
    none of the settings' numbers is written down there again."""
    from saescope.app.settings import MAP, SERVE, WORKER

    literals = _settings_literals(SERVE, WORKER, MAP)
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


def test_hooks_go_through_the_public_api_of_models():
    """interventions/ (and everything else) use HookedLM's hook API: no private name of models.py is imported."""
    offenders = []
    for p in _py("app") + _py("precompute"):
        if p.name == "models.py":
            continue
        pkg = ".".join(("saescope",) + p.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("models"):
                mod = node.module if not node.level else ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                                                  + [node.module])
                if mod == "saescope.precompute.models":
                    offenders += [f"{p.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_the_library_serves_no_http():
    """precompute/ is the library both processes use: web frameworks (FastAPI, Starlette) live in app/ only (the
    chat router moved from precompute/explain/ to app/worker/chat.py)."""
    offenders = [str(p.relative_to(ROOT)) for p in _py("precompute")
                 if any(m.split(".")[0] in ("fastapi", "starlette", "uvicorn") for m in _imports(p))]
    assert offenders == []
