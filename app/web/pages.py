"""HTML pages of the precomputed store. Each route takes its parameters (the dataclasses of views.py, shared with
the JSON twin in api.py), asks its data function in views.py, and renders the answer as a page or one block."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from saescope.precompute.store import Store

from ..settings import SERVE
from .cache import cacheable
from saescope.precompute.store.explanations import explained_features

from .lookups import check_index, url
from .templates import ENV, is_htmx, page
from .tokens import vocab_html, window
from .views import (FeatureListParams, ListParams, SearchParams, compare_view, feature_view, features_view, list_view,
                    search_view)

router = APIRouter()
S = SERVE


def store_of(request: Request) -> Store:
    return request.app.state.store


@router.get("/", response_class=HTMLResponse)
@cacheable
def home(request: Request, qsort: str = "sae_id", qorder: str = "asc"):  # checked by quality_table
    from saescope.precompute.config import EMBEDDED
    from saescope.precompute.saes import TRANSCODER_REGISTRY

    from .quality import next_order, quality_table  # the quality table and plots (app/web/quality.py)

    store = store_of(request)
    saes = store.saes()
    q = quality_table(store, qsort, qorder)
    graph_url = None
    stored = [g for g in store.graphs() if g.prompt == EMBEDDED.graph_prompt]
    if stored:  # the example graph `saescope demo` stored: drawn without the worker
        graph_url = f"/graph/{stored[0].slug}"
    elif any(s.architecture in TRANSCODER_REGISTRY for s in saes):  # a live example graph (the /graph page)
        graph_url = "/graph?" + urlencode({"prompt": EMBEDDED.graph_prompt})
    return page(request, "home.html", {"saes": saes, "quality": q, "quality_by_id": {r.sae_id: r for r in q.rows},
                                       "quality_sort_url": lambda col: url("/", qsort=col, qorder=next_order(q, col))
                                       + "#quality", "graph_url": graph_url, "graph_prompt": EMBEDDED.graph_prompt},
                block="quality")


@router.get("/sae/{sae_id}", response_class=HTMLResponse)
@cacheable
def sae_page(request: Request, sae_id: str, p: Annotated[FeatureListParams, Depends()]):
    v = features_view(store_of(request), sae_id, p)
    params = p.link_params()
    base = f"/sae/{sae_id}"
    return page(request, "sae.html", {
        "sae": v.sae, "rows": v.rows, "pager": v.pager, "params": params, "compared": v.compared,
        "score_hist": v.score_hist, "n_scored": v.n_scored,
        "quality": store_of(request).quality().get(sae_id), "contrasts": store_of(request).contrasts(sae_id),
        "prev_url": v.pager.prev_url(base, **params), "next_url": v.pager.next_url(base, **params),
        "sort_url": lambda col: url(base, **{**params, "sort": col, "order": _next_order(p.sort, p.order, col)}),
    }, block="list")


def _next_order(sort: str, order: str, col: str) -> str:
    """Clicking the current sort column flips it; a new column starts descending (index: ascending)."""
    if col == sort:
        return "asc" if order == "desc" else "desc"
    return "asc" if col == "index" else "desc"


@router.get("/sae/{sae_id}/random")
def random_feature(request: Request, sae_id: str):
    store = store_of(request)
    store.require_sae(sae_id)
    return RedirectResponse(f"/sae/{sae_id}/feature/{store.random_feature(sae_id)}", status_code=302)


@router.get("/sae/{sae_id}/feature/{index}", response_class=HTMLResponse)
@cacheable
def feature_page(request: Request, sae_id: str, index: int,
                 left: int = Query(S.show_left, ge=0, le=S.max_show), right: int = Query(S.show_right, ge=0, le=S.max_show),
                 samples: Literal["interval", "quantile"] | None = None):
    store = store_of(request)
    # a sample tab: as a fragment for htmx, inside the whole page otherwise (works without JS)
    tab_only = bool(samples) and is_htmx(request) and request.headers.get("HX-Target") != "examples"
    kinds = ((samples,) if tab_only else ("top", samples)) if samples else ("top",)
    v = feature_view(store, sae_id, index, kinds, near=not is_htmx(request))
    sae = v.sae
    html = vocab_html(store, sae.model_key)
    special = frozenset(sae.params.get("special_token_ids", ()))
    ctx = {"sae": sae, "f": v.f, "view": v, "left": left, "right": right, "samples": samples, "others": v.others,
           "base": f"/sae/{sae_id}/feature/{index}", "map_near": v.map_near}
    ctx["near"] = {} if is_htmx(request) else store.features_by_index(  # top-token chips of neighbours (issue 17)
        sae_id, [j for j, _ in v.f.neighbours] + [j for j, _ in (v.f.cooc or [])])
    if samples:
        ctx["groups"] = [(g, [window(e, left, right, html, special) for e in g.examples]) for g in v.groups[samples]]
        if tab_only:
            return page(request, "feature.html", {**ctx, "top": None}, block="samples")
    ctx["top"] = [window(e, left, right, html, special) for e in v.examples["top"]]
    return page(request, "feature.html", ctx, block="examples")


@router.get("/sae/{sae_id}/feature/{index}/chips", response_class=HTMLResponse, include_in_schema=False)
@cacheable
def feature_chips(request: Request, sae_id: str, index: int):
    """A fragment: the feature's first top-activating tokens as chips (the steering page's edit rows fetch it)."""
    store = store_of(request)
    check_index(store.require_sae(sae_id), index)
    row = store.features_by_index(sae_id, [index]).get(index)
    return HTMLResponse(str(ENV.globals["m"].chips(row.top_tokens, 6)) if row and row.top_tokens else "")


@router.get("/sae/{sae_id}/list", response_class=HTMLResponse)
@cacheable
def list_page(request: Request, sae_id: str, p: Annotated[ListParams, Depends()],
              drop: int | None = Query(None, ge=0)):
    """A named list of features with a note each, living entirely in its URL: the link is the list."""
    v = list_view(store_of(request), sae_id, p)
    if drop is not None:  # the form's remove button: the same list without that item, at its canonical URL
        keep = [it for i, it in enumerate(v.items) if i != drop]
        q = urlencode([("name", p.name)] * bool(p.name) + [x for it in keep for x in (("f", it.index), ("note", it.note))])
        return RedirectResponse(f"/sae/{sae_id}/list" + (f"?{q}" if q else ""), status_code=303)
    return page(request, "list.html", {"sae": v.sae, "name": v.name, "items": v.items, "query": request.url.query})


@router.get("/sae/{sae_id}/compare/{other}", response_class=HTMLResponse)
@cacheable
def compare_page(request: Request, sae_id: str, other: str, page_: int = Query(1, alias="page", ge=1),
                 size: int = Query(S.page_size, ge=1, le=S.max_page_size)):
    """Each feature of one SAE with its best match (decoder cosine) in another SAE of the same width."""
    v = compare_view(store_of(request), sae_id, other, page_, size)
    base = f"/sae/{sae_id}/compare/{other}"
    return page(request, "compare.html", {
        "sae": v.sae, "other": v.other, "rows": v.rows, "pager": v.pager,
        "prev_url": v.pager.prev_url(base, size=size), "next_url": v.pager.next_url(base, size=size)}, block="list")


@router.get("/sae/{sae_id}/search", response_class=HTMLResponse)
@cacheable
def search_page(request: Request, sae_id: str, p: Annotated[SearchParams, Depends()]):
    v = search_view(store_of(request), sae_id, p)
    if v.index is not None:
        return RedirectResponse(f"/sae/{sae_id}/feature/{v.index}", status_code=303)
    base = f"/sae/{sae_id}/search"
    keep = dict(q=v.q, by=p.by, size=p.size)
    return page(request, "search.html", {
        "sae": v.sae, "q": v.q, "by": p.by, "mode": v.mode, "hits": v.hits, "pager": v.pager, "segments": v.segments,
        "prev_url": v.pager.prev_url(base, **keep) if v.pager else None,
        "next_url": v.pager.next_url(base, **keep) if v.pager else None,
        "n_explained": len(explained_features(store_of(request), sae_id)) if v.mode == "explanation" else None,
    }, block="results")
