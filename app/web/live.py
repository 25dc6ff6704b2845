"""Live inspection through the model worker: the inspect page, "try your own text", and their JSON twins.

When the worker is down these routes say so plainly; every precomputed page keeps working.
"""

from __future__ import annotations

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse
from markupsafe import escape

from ..errors import AppError
from ..settings import SERVE
from ..worker.client import DOWN_HINT, WorkerClient
from ..worker.wire import FeatureActsIn, FeatureActsOut, TopFeaturesIn, TopFeaturesOut
from .lookups import check_index, sae_or_404
from .pages import store_of
from .templates import page
from .tokens import Tok

router = APIRouter()
S = SERVE
MAX_PROMPT_CHARS = S.max_prompt_chars


def worker_status(app) -> dict:
    client = app.state.worker
    if client is None:
        return {"up": False, "message": "Live inspection is off: this server was started with --no-worker."}
    h, why = client.health()
    if h is None:
        return {"up": False, "message": DOWN_HINT.format(why=why)}
    return {"up": True, "message": "", "health": h}


def _client(request: Request) -> WorkerClient:
    st = worker_status(request.app)
    if not st["up"]:
        raise AppError(st["message"], 503, title="Model worker unavailable")
    return request.app.state.worker


def _strip(tokens: list[str], values: list[float], mark: int | None = None) -> list[Tok]:
    return [Tok(t, v, i == mark) for i, (t, v) in enumerate(zip(tokens, values))]


def inspect_data(request: Request, sae_id: str, prompt: str, pos: int | None) -> dict:
    store = store_of(request)
    sae = sae_or_404(store, sae_id)
    client = _client(request)
    top = client.top_features(TopFeaturesIn(sae_id=sae_id, text=prompt, k=S.inspect_k))
    n = len(top.tokens)
    if pos is not None and not 0 <= pos < n:
        raise AppError(f"pos {pos} is outside the prompt's {n} tokens (0 to {n - 1})", 422)
    rows = store.features_by_index(sae_id, [h.index for h in top.features])
    detail = None
    if pos is not None:
        d = client.top_features(TopFeaturesIn(sae_id=sae_id, text=prompt, k=S.token_detail_k, positions=[pos]))
        detail = {"pos": pos, "token": top.tokens[pos], "features": d.features,
                  "rows": store.features_by_index(sae_id, [h.index for h in d.features])}
    vmax = max(top.token_max) if top.token_max else 0.0
    return {"sae": sae, "top": top, "rows": rows, "detail": detail, "vmax": vmax,
            "toks": _strip(top.tokens, top.token_max, pos)}


@router.get("/inspect", response_class=HTMLResponse)
def inspect_page(request: Request, sae: str | None = None, prompt: str = Query("", max_length=MAX_PROMPT_CHARS),
                 pos: int | None = Query(None, ge=0)):
    store = store_of(request)
    saes = store.saes()
    if not saes:
        raise AppError("this store holds no SAE to inspect with", 404)
    sae_id = sae or saes[0].sae_id
    info = sae_or_404(store, sae_id)
    ctx = {"saes": saes, "sae": info, "prompt": prompt, "pos": pos, "worker": worker_status(request.app),
           "result": None, "error": None}
    if prompt.strip():
        try:
            ctx["result"] = inspect_data(request, sae_id, prompt, pos)
        except AppError as err:
            if err.status == 404:
                raise
            ctx["error"] = err
    block = "detail" if pos is not None and request.headers.get("HX-Target") == "token-detail" else "result"
    return page(request, "inspect.html", ctx, block=block)


@router.get("/live/status", response_class=HTMLResponse)
def live_status(request: Request):
    """A fragment: empty when the worker answers, a plain notice when it does not (pages stay cacheable)."""
    st = worker_status(request.app)
    return HTMLResponse("" if st["up"] else f'<p class="notice" role="status">{escape(st["message"])}</p>')


@router.post("/live/activations", response_class=HTMLResponse)
def live_activations(request: Request, sae: str = Form(...), feature: int = Form(..., ge=0),
                     text: str = Form("", max_length=MAX_PROMPT_CHARS)):
    store = store_of(request)
    info = sae_or_404(store, sae)
    check_index(info, feature)
    if not text.strip():
        raise AppError("type some text first", 422)
    try:
        out = _client(request).activations(FeatureActsIn(sae_id=sae, text=text, feature=feature))
    except AppError as err:
        return page(request, "live_result.html", {"error": err}, status=200)
    f = store.feature(sae, feature)
    vmax = max(out.max_value, f.max_act if f else 0.0)
    return page(request, "live_result.html", {"toks": _strip(out.tokens, out.values, out.max_pos),
                                               "out": out, "vmax": vmax, "stored_max": f.max_act if f else None,
                                               "error": None})


@router.get("/api/inspect", tags=["live"], summary="top features of a prompt (live, through the model worker)")
def api_inspect(request: Request, sae: str, prompt: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS),
                k: int = Query(S.inspect_k, ge=1, le=S.max_inspect_k), pos: int | None = Query(None, ge=0)) -> TopFeaturesOut:
    sae_or_404(store_of(request), sae)
    return _client(request).top_features(TopFeaturesIn(sae_id=sae, text=prompt, k=k,
                                                       positions=[pos] if pos is not None else None))


@router.get("/api/saes/{sae_id}/features/{index}/activations", tags=["live"],
            summary="one feature's activation on every token of a text (live)")
def api_feature_live(request: Request, sae_id: str, index: int,
                     text: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS)) -> FeatureActsOut:
    check_index(sae_or_404(store_of(request), sae_id), index)
    return _client(request).activations(FeatureActsIn(sae_id=sae_id, text=text, feature=index))
