"""HTML pages. Each route: parse the URL, ask the store (or the worker), render a page or one of its blocks."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from saescope.precompute.store import Store

from ..errors import AppError
from ..settings import SERVE
from .cache import cacheable
from .lookups import (check_index, feature_list, feature_list_items, feature_or_404, pager, sae_or_404,
                      score_histogram, url)
from .maps import neighbourhood
from .templates import is_htmx, page
from .tokens import vocab_html, window

router = APIRouter()
S = SERVE


def store_of(request: Request) -> Store:
    return request.app.state.store


@router.get("/", response_class=HTMLResponse)
@cacheable
def home(request: Request):
    from urllib.parse import urlencode

    from saescope.precompute.config import EMBEDDED
    from saescope.precompute.saes import TRANSCODER_REGISTRY

    saes = store_of(request).saes()
    graph_url = None
    if any(s.architecture in TRANSCODER_REGISTRY for s in saes):  # a ready example graph (the /graph page)
        graph_url = "/graph?" + urlencode({"prompt": EMBEDDED.graph_prompt})
    return page(request, "home.html", {"saes": saes, "graph_url": graph_url, "graph_prompt": EMBEDDED.graph_prompt})


@router.get("/sae/{sae_id}", response_class=HTMLResponse)
@cacheable
def sae_page(request: Request, sae_id: str,
             sort: Literal["index", "density", "max", "score"] = "index", order: Literal["asc", "desc"] = "asc",
             page_: int = Query(1, alias="page", ge=1), size: int = Query(S.page_size, ge=1, le=S.max_page_size),
             show: Literal["all", "live", "dead", "dense"] = "all",
             min_density: float | None = Query(None, ge=0, le=1), max_density: float | None = Query(None, ge=0, le=1),
             min_score: float | None = Query(None, ge=0, le=1)):
    store = store_of(request)
    sae = sae_or_404(store, sae_id)
    pg, rows = feature_list(store, sae_id, sort, order, page_, size, show, min_density, max_density, min_score)
    params = dict(sort=sort, order=order, size=size, show=show, min_density=min_density, max_density=max_density,
                  min_score=min_score)
    base = f"/sae/{sae_id}"
    hist, n_scored = score_histogram(store, sae_id)
    return page(request, "sae.html", {
        "sae": sae, "rows": rows, "pager": pg, "params": params, "compared": store.compared_with(sae_id), "score_hist": hist, "n_scored": n_scored,
        "prev_url": url(base, **params, page=pg.page - 1) if pg.page > 1 else None,
        "next_url": url(base, **params, page=pg.page + 1) if pg.page < pg.pages else None,
        "sort_url": lambda col: url(base, **{**params, "sort": col, "order": _next_order(sort, order, col)}),
    }, block="list")


def _next_order(sort: str, order: str, col: str) -> str:
    """Clicking the current sort column flips it; a new column starts descending (index: ascending)."""
    if col == sort:
        return "asc" if order == "desc" else "desc"
    return "asc" if col == "index" else "desc"


@router.get("/sae/{sae_id}/random")
def random_feature(request: Request, sae_id: str):
    store = store_of(request)
    sae_or_404(store, sae_id)
    return RedirectResponse(f"/sae/{sae_id}/feature/{store.random_feature(sae_id)}", status_code=302)


@router.get("/sae/{sae_id}/feature/{index}", response_class=HTMLResponse)
@cacheable
def feature_page(request: Request, sae_id: str, index: int,
                 left: int = Query(S.show_left, ge=0, le=S.max_show), right: int = Query(S.show_right, ge=0, le=S.max_show),
                 samples: Literal["interval", "quantile"] | None = None):
    store = store_of(request)
    sae, f = feature_or_404(store, sae_id, index)
    ctx = {"sae": sae, "f": f, "left": left, "right": right, "samples": samples, "others": store.cross(sae_id, index),
           "base": f"/sae/{sae_id}/feature/{index}"}
    ctx["map_near"] = None if is_htmx(request) else neighbourhood(store, sae, f)  # the map around it (SVG)
    html = vocab_html(store, sae.model_key)
    special = frozenset(sae.params.get("special_token_ids", ()))
    tab_only = bool(samples) and is_htmx(request) and request.headers.get("HX-Target") != "examples"
    kinds = ((samples,) if tab_only else ("top", samples)) if samples else ("top",)
    examples = store.examples_by_kind(sae_id, index, kinds)  # every kind shown, in one query
    if samples:  # a sample tab: as a fragment for htmx, inside the whole page otherwise (works without JS)
        ctx["groups"] = [(g, [window(e, left, right, html, special) for e in g.examples])
                         for g in store.groups_by_kind(sae_id, index, (samples,), examples=examples)[samples]]
        if tab_only:
            return page(request, "feature.html", {**ctx, "top": None}, block="samples")
    ctx["top"] = [window(e, left, right, html, special) for e in examples["top"]]
    return page(request, "feature.html", ctx, block="examples")


@router.get("/sae/{sae_id}/list", response_class=HTMLResponse)
@cacheable
def list_page(request: Request, sae_id: str, name: str = Query("", max_length=S.max_query_chars),
              f: list[int] = Query([], max_length=S.max_list), note: list[str] = Query([], max_length=S.max_list),
              drop: int | None = Query(None, ge=0)):
    """A named list of features with a note each, living entirely in its URL: the link is the list."""
    store = store_of(request)
    sae = sae_or_404(store, sae_id)
    items = feature_list_items(store, sae, f, note)
    if drop is not None:  # the form's remove button: the same list without that item, at its canonical URL
        keep = [it for i, it in enumerate(items) if i != drop]
        q = urlencode([("name", name)] * bool(name) + [p for it in keep for p in (("f", it.index), ("note", it.note))])
        return RedirectResponse(f"/sae/{sae_id}/list" + (f"?{q}" if q else ""), status_code=303)
    query = request.url.query
    return page(request, "list.html", {"sae": sae, "name": name, "items": items, "query": query})


@router.get("/sae/{sae_id}/compare/{other}", response_class=HTMLResponse)
@cacheable
def compare_page(request: Request, sae_id: str, other: str, page_: int = Query(1, alias="page", ge=1),
                 size: int = Query(S.page_size, ge=1, le=S.max_page_size)):
    """Each feature of one SAE with its best match (decoder cosine) in another SAE of the same width."""
    store = store_of(request)
    sae, oth = sae_or_404(store, sae_id), sae_or_404(store, other)
    if other not in store.compared_with(sae_id):
        have = ", ".join(store.compared_with(sae_id)) or "none"
        raise AppError(f"{sae_id} was not compared with {other} (SAEs precomputed in one run with the same width are); "
                       f"compared with: {have}", 404, link=(f"/sae/{sae_id}", f"browse {sae_id}"))
    pg = pager(page_, size, sae.d_sae)
    rows = store.best_matches(sae_id, other, size, pg.offset)
    base = f"/sae/{sae_id}/compare/{other}"
    return page(request, "compare.html", {
        "sae": sae, "other": oth, "rows": rows, "pager": pg,
        "prev_url": url(base, size=size, page=pg.page - 1) if pg.page > 1 else None,
        "next_url": url(base, size=size, page=pg.page + 1) if pg.page < pg.pages else None}, block="list")


@router.get("/sae/{sae_id}/search", response_class=HTMLResponse)
@cacheable
def search_page(request: Request, sae_id: str, q: str = Query("", max_length=S.max_query_chars),
                by: Literal["auto", "index", "token", "explanation"] = "auto",
                page_: int = Query(1, alias="page", ge=1),
                size: int = Query(S.search_page_size, ge=1, le=S.max_search_page_size)):
    store = store_of(request)
    sae = sae_or_404(store, sae_id)
    q = q.strip()
    hits, total, mode = [], 0, by
    if q:
        if by in ("auto", "index") and q.lstrip("#").isdigit():
            index = int(q.lstrip("#"))
            check_index(sae, index)
            return RedirectResponse(f"/sae/{sae_id}/feature/{index}", status_code=303)
        if by == "index":
            raise AppError(f"{q!r} is not a feature index; give a whole number from 0 to {sae.d_sae - 1}", 422)
        offset = (page_ - 1) * size
        if by in ("auto", "token"):
            hits, total = store.search_tokens(sae_id, q, size, offset)
            mode = "token"
        if by == "explanation" or (by == "auto" and total == 0):
            hits, total = store.search_explanations(sae_id, q, size, offset)
            mode = "explanation"
    if mode == "explanation":  # the matched words of each hit's explanation, for <mark> (escaped by the template)
        from saescope.precompute.store.search import highlight

        segments = {h.index: highlight(h.matched, q) for h in hits}
    else:
        segments = {}
    pg = pager(page_, size, total) if q else None
    base = f"/sae/{sae_id}/search"
    return page(request, "search.html", {
        "sae": sae, "q": q, "by": by, "mode": mode, "hits": hits, "pager": pg, "segments": segments,
        "prev_url": url(base, q=q, by=by, size=size, page=pg.page - 1) if pg and pg.page > 1 else None,
        "next_url": url(base, q=q, by=by, size=size, page=pg.page + 1) if pg and pg.page < pg.pages else None,
    }, block="results")
