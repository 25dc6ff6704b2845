"""Contrasts: a stored one (`saescope contrast`, precompute/contrast.py) and a live one (two small sets typed into
the page, computed by the worker's POST /contrast), each with its JSON twin. Both render one result (the macro
in templates/_contrast.html) from the same (run, features, texts) rows, so a stored contrast's page equals the
live page for the same texts."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup

from saescope.precompute.contrast import check_live_sets
from saescope.precompute.errors import UserError
from saescope.precompute.store import SAEInfo, Store
from saescope.precompute.store.read import ContrastFeature, ContrastRun

from ..errors import AppError, echo
from ..settings import WORKER
from ..worker.wire import ContrastIn
from .cache import cacheable
from .live_views import client_of, note_down, worker_status
from .pages import store_of
from .templates import page
from .tokens import Tok, strip_html, vocab_html

router = APIRouter()
W = WORKER
# a side's texts in the URL: one text per line, or the parameter repeated
SideTexts = Annotated[list[str], Query(max_length=W.max_contrast_texts,
                                       description=f"texts of one side, one per line (or the parameter repeated): "
                                       f"1 to {W.max_contrast_texts}, each at most {W.max_contrast_chars} characters")]


def contrast_result(store: Store, sae: SAEInfo, run, feats: dict[str, list], texts: dict[str, list[list[int]]]) -> dict:
    """What the result shows, from a contrast's rows: per listed feature and side, its top texts as token strips
    shaded by the feature's activation on each token (relative to the largest of them), escaped."""
    vocab = vocab_html(store, sae.model_key)
    special = frozenset(sae.params.get("special_token_ids", ()))

    def html(i: int) -> str:
        return vocab[i] if 0 <= i < len(vocab) else f"&lt;id {i}&gt;"

    strips: dict[tuple[str, int], list[Markup]] = {}
    for side, fs in feats.items():
        for f in fs:
            acts = f.top_acts or [[] for _ in f.top_texts]  # stores from before the highlighting: plain text
            vmax = max((v for row in acts for v in row), default=0.0)
            out = []
            for i, row in zip(f.top_texts, acts):
                ids = texts[side][i]
                vals = row if len(row) == len(ids) else [0.0] * len(ids)
                best = max(range(len(vals)), key=vals.__getitem__) if vals and max(vals) > 0 else -1
                out.append(strip_html([Tok("", v, j == best, html(t), t in special) for j, (t, v) in
                                       enumerate(zip(ids, vals))], vmax))
            strips[(side, f.feature)] = out
    rows = store.features_by_index(sae.sae_id, [f.feature for side in feats.values() for f in side])
    return {"sae": sae, "run": run, "feats": feats, "strips": strips, "rows": rows}


# ---------------------------------------------------------------- stored
def _contrast_or_404(request: Request, sae_id: str, name: str):
    store = store_of(request)
    sae = store.require_sae(sae_id)
    found = store.contrast(sae_id, name)
    if found is None:
        have = store.contrasts(sae_id)
        raise AppError(f"{sae_id} has no stored contrast {echo(name)}; stored: {', '.join(have) or 'none'} "
                       f"(make one with `saescope contrast STORE --sae {sae_id} --a A.txt --b B.txt --name NAME`)", 404)
    return store, sae, found


@router.get("/sae/{sae_id}/contrast/{name}", response_class=HTMLResponse)
@cacheable
def contrast_page(request: Request, sae_id: str, name: str):
    store, sae, (run, feats, texts) = _contrast_or_404(request, sae_id, name)
    return page(request, "contrast.html", contrast_result(store, sae, run, feats, texts))


def contrast_json(run, feats: dict[str, list], texts: dict[str, list]) -> dict:
    return {"run": vars(run), "features": {s: [vars(f) for f in fs] for s, fs in feats.items()},
            "n_texts": {s: len(t) for s, t in texts.items()}}


@router.get("/api/saes/{sae_id}/contrast/{name}", summary="a stored contrast: ranked features of both sides, probes")
@cacheable
def api_contrast(request: Request, sae_id: str, name: str) -> dict:
    store, sae, (run, feats, texts) = _contrast_or_404(request, sae_id, name)
    return contrast_json(run, feats, texts)


# ---------------------------------------------------------------- live
def side_texts(given: list[str]) -> list[str]:
    """A side's texts from the URL: every non-blank line of every value (as `saescope contrast` reads a .txt)."""
    return [ln for v in given for ln in v.splitlines() if ln.strip()]


def live_contrast(request: Request, sae: SAEInfo, a: list[str], b: list[str], reduce: str, top: int):
    """(run, feats, texts) of a live contrast, shaped like a stored one; the sets are checked before the worker
    is asked, so bad input is a 422 naming the limit even while it is down."""
    try:
        check_live_sets(a, b, W.max_contrast_texts, W.max_contrast_chars)
    except UserError as err:
        raise AppError(str(err), 422) from err
    out = client_of(request).contrast(ContrastIn(sae_id=sae.sae_id, a=a, b=b, reduce=reduce, top=top))
    run = ContrastRun(sae_id=sae.sae_id, name="live", a_source="typed", b_source="typed", n_a=out.n_a, n_b=out.n_b,
                      reduce=out.reduce, probe=out.probe, created="")
    feats: dict[str, list] = {"a": [], "b": []}
    for f in out.features:
        feats[f.side].append(ContrastFeature(sae_id=sae.sae_id, name="live", **f.model_dump()))
    return run, feats, out.token_ids


def _refill(texts: list[str]) -> str:
    """A side's texts for the form again: a text over the length limit (refused, the error says so) is shown cut
    (its start and its length), never repeated whole."""
    cut = W.max_contrast_chars
    return "\n".join(t if len(t) <= cut else f"{t[:80]}… (cut: {len(t):,} characters; at most {cut:,})" for t in texts)


@router.get("/sae/{sae_id}/contrast", response_class=HTMLResponse)
def contrast_live_page(request: Request, sae_id: str, a: SideTexts = [], b: SideTexts = [],  # noqa: B006
                       reduce: Literal["max", "mean"] = "max",
                       top: int = Query(W.contrast_top, ge=1, le=W.max_contrast_top)):
    """Two sets of texts typed into the page (one per line), the features separating them; the URL holds both
    sets, so a link reproduces the contrast."""
    store = store_of(request)
    sae = store.require_sae(sae_id)
    ta, tb = side_texts(a), side_texts(b)
    ctx = {"sae": sae, "a_text": _refill(ta), "b_text": _refill(tb), "reduce": reduce, "top": top,
           "worker": worker_status(request.app), "error": None, "result": None,
           "stored": store.contrasts(sae_id)}
    status = 200
    if a or b:
        try:
            ctx["result"] = contrast_result(store, sae, *live_contrast(request, sae, ta, tb, reduce, top))
        except AppError as err:
            if err.status == 404:
                raise
            ctx["error"], status = err, err.status if err.status < 500 else 200
            note_down(ctx, err)
    return page(request, "contrast_live.html", ctx, block="result", status=status)


@router.get("/api/saes/{sae_id}/contrast", summary="a live contrast of two small sets of texts (through the model "
            "worker): ranked features of both sides, probes", tags=["live"])
def api_contrast_live(request: Request, sae_id: str, a: SideTexts = [], b: SideTexts = [],  # noqa: B006
                      reduce: Literal["max", "mean"] = "max",
                      top: int = Query(W.contrast_top, ge=1, le=W.max_contrast_top)) -> dict:
    store = store_of(request)
    sae = store.require_sae(sae_id)
    return contrast_json(*live_contrast(request, sae, side_texts(a), side_texts(b), reduce, top))
