"""Evidence pages (issue 22): model diffs and check runs kept next to the store.

    STORE.diffs/<name>/    folders written by `saescope diff --out` (diff.json, features.parquet/.csv, examples.json)
    STORE.checks/<name>.json   results written by `saescope check` (its default --out)

/diffs, /diffs/{name} (features that changed most both ways, side-by-side examples; JSON and CSV export),
/checks, /checks/{name} (each check's verdict, numbers and evidence texts). The context builders are shared with
the offline HTML report (app/web/report.py), which renders the same templates into static files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from saescope.precompute.config import DIFF
from saescope.precompute.diff import Diff, read_diff
from saescope.precompute.store import Store

from ..errors import AppError, echo
from ..settings import SERVE
from .templates import page
from .tokens import Tok, strip_html

# not in the OpenAPI document (docs/openapi.json lists pages.router, live, api, maps): add this router to
# app/openapi.py dashboard_doc and regenerate to publish it
router = APIRouter(include_in_schema=False)
NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a file name on every filesystem (longer ones are no run)
FeatureHref = Callable[[int], "str | None"]


def diffs_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".diffs")


def checks_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".checks")


def sae_of_path(store: Store, sae_path: str) -> str | None:
    """The store's SAE read from this file (so diff and check rows can link to its feature pages), if any."""
    for s in store.saes():
        if s.sae_path == sae_path:
            return s.sae_id
    return None


def strip_pair(tokens: list[str], a: list[float], b: list[float], pos: int, left: int = SERVE.show_left,
               right: int = SERVE.show_right):
    """Two token strips of one context around `pos`, coloured on one scale (the larger max of the two)."""
    lo, hi = max(0, pos - left), min(len(tokens), pos + right + 1)
    vmax = max(max(a[lo:hi], default=0.0), max(b[lo:hi], default=0.0))
    strip = lambda acts: strip_html([Tok(tokens[i], acts[i], i == pos) for i in range(lo, hi)], vmax, lo > 0,
                                    hi < len(tokens))
    return strip(a), strip(b)


def diff_context(d: Diff, href: FeatureHref, n: int | None = None) -> dict[str, Any]:
    n = n or len(d.meta["up"])
    def item(f: int) -> dict[str, Any]:
        ex = []
        for e in d.examples.get(str(f), []):
            sa, sb = strip_pair(e["tokens"], e["acts_a"], e["acts_b"], e["pos"])
            ex.append({"ctx": e["ctx"], "diff": e["diff"], "a": sa, "b": sb, "a_val": e["acts_a"][e["pos"]],
                       "b_val": e["acts_b"][e["pos"]]})
        return {"f": f, "row": d.row(f), "href": href(f), "examples": ex}
    return {"meta": d.meta, "up": [item(f) for f in d.meta["up"][:n]], "down": [item(f) for f in d.meta["down"][:n]]}


def checks_context(run: dict[str, Any], href: Callable[[int, str], "str | None"]) -> dict[str, Any]:
    """href(feature, sae_id): the link to a feature's page, or None."""
    results = []
    for r in run["results"]:
        ev = []
        for e in r.get("evidence", []):
            if "acts" in e and "tokens" in e:
                vmax = max(e["acts"], default=0.0)
                mark = e.get("position") if e.get("max_act", 0) > 0 else None
                toks = [Tok(t, v, i == mark) for i, (t, v) in enumerate(zip(e["tokens"], e["acts"]))]
                ev.append({**e, "strip": strip_html(toks, vmax)})
            else:
                ev.append(e)
        feats = r["expected"].get("features") or ([r["expected"]["feature"]] if "feature" in r["expected"] else [])
        results.append({**r, "evidence": ev, "features": [(f, href(f, r["sae_id"])) for f in feats]})
    return {"run": run, "results": results}


def _store(request: Request) -> Store:
    return request.app.state.store


def _diff_or_404(store: Store, name: str) -> Diff:
    folder = diffs_dir(store.path) / name
    if not NAME.fullmatch(name) or not (folder / "diff.json").is_file():
        have = ", ".join(list_diffs(store.path)) or "none"
        raise AppError(f"there is no diff {echo(name)} next to this store; diffs: {have}", 404, link=("/diffs", "all diffs"))
    return read_diff(folder)


def list_diffs(store_path: Path) -> list[str]:
    d = diffs_dir(store_path)
    return sorted(p.name for p in d.iterdir() if (p / "diff.json").is_file()) if d.is_dir() else []


def list_checks(store_path: Path) -> list[str]:
    d = checks_dir(store_path)
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def live_href(store: Store, sae_path: str) -> FeatureHref:
    sae_id = sae_of_path(store, sae_path)
    return (lambda f: f"/sae/{sae_id}/feature/{f}") if sae_id else (lambda f: None)


@router.get("/diffs", response_class=HTMLResponse)
def diffs_page(request: Request):
    store = _store(request)
    return page(request, "evidence_index.html", {"layout": "base.html", "diffs": [(n, f"/diffs/{n}") for n in list_diffs(store.path)],
                                                 "checks": [(n, f"/checks/{n}") for n in list_checks(store.path)]})


@router.get("/checks", response_class=HTMLResponse)
def checks_index(request: Request):
    return diffs_page(request)


@router.get("/diffs/{name}", response_class=HTMLResponse)
def diff_page(request: Request, name: str, n: int = Query(DIFF.n_rank, ge=1, le=DIFF.n_rank)):
    store = _store(request)
    d = _diff_or_404(store, name)
    ctx = diff_context(d, live_href(store, d.meta["sae"]["path"]), n)
    return page(request, "diff.html", {**ctx, "layout": "base.html", "name": name,
                                       "json_url": f"/diffs/{name}/diff.json", "csv_url": f"/diffs/{name}/features.csv"})


@router.get("/diffs/{name}/{file}")
def diff_file(request: Request, name: str, file: str):
    store = _store(request)
    d = _diff_or_404(store, name)
    if file not in ("diff.json", "features.csv", "features.parquet", "examples.json"):
        raise AppError(f"no file {echo(file)} in a diff; files: diff.json, features.csv, features.parquet, examples.json", 404)
    return FileResponse(d.path / file)


@router.get("/checks/{name}", response_class=HTMLResponse)
def check_page(request: Request, name: str):
    store = _store(request)
    p = checks_dir(store.path) / f"{name}.json"
    if not NAME.fullmatch(name) or not p.is_file():
        have = ", ".join(list_checks(store.path)) or "none"
        raise AppError(f"there is no check run {echo(name)} next to this store; runs: {have}", 404, link=("/checks", "all runs"))
    run = json.loads(p.read_text())
    saes = {s.sae_id for s in store.saes()}

    def href(f: int, sae_id: str) -> str | None:
        return f"/sae/{sae_id}/feature/{f}" if sae_id in saes else None
    ctx = checks_context(run, href)
    return page(request, "checks.html", {**ctx, "layout": "base.html", "name": name})
