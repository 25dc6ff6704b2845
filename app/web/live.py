"""Live pages through the model worker: inspect, steer, "try your own text", "explain this feature" and the worker
notice. Their data functions live in live_views.py (shared with the JSON twins in live_api.py).

When the worker is down these routes say so plainly; every precomputed page keeps working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse

from ..errors import AppError
from ..settings import SERVE, WORKER
from .edits import edit_fields
from .live_views import (Edits, GenerationParams, Prompt, Selection, ablate_feature, attribute, client_of,
                         explain_request, feature_activations, inspect_data, note_down, parse_selection, search_all,
                         steer_state, store_of, strip, worker_status)
from .lookups import check_index, sae_or_first
from .templates import ENV, page

router = APIRouter()
S, W = SERVE, WORKER


@router.get("/inspect", response_class=HTMLResponse)
def inspect_page(request: Request, sae: str | None = None, prompt: Prompt = "",
                 pos: int | None = Query(None, ge=0), ablate: int | None = Query(None, ge=0),
                 why: int | None = Query(None, ge=0), target: int | None = Query(None, ge=0),
                 color: int | None = Query(None, ge=0), sel: Selection = None):
    """A prompt's features (live); ablate=F adds the per-token effect of removing feature F; why=P explains the
    prediction after token P (target=ID for another token than the top one); color=F colours the token strip by
    feature F's activation instead of each token's strongest feature; sel=3,5 (the tokens selected by click /
    shift-click) ranks the features of every SAE in the store at those positions."""
    store = store_of(request)
    info = sae_or_first(store, sae)
    positions = parse_selection(sel)
    ctx = {"saes": store.saes(), "sae": info, "prompt": prompt, "pos": pos, "worker": worker_status(request.app),
           "result": None, "error": None, "ablate": ablate, "why": why, "target": target, "ablation": None,
           "attribution": None, "color": color, "sel": positions or [], "across": None, "across_error": None}
    for given in (ablate, color):
        if given is not None:
            check_index(info, given)
    target_block = request.headers.get("HX-Target")
    if prompt.strip() and positions and target_block == "search-all":  # only the selection changed
        try:
            ctx["across"] = search_all(request, prompt, positions)
        except AppError as err:
            ctx["across_error"] = err
        return page(request, "inspect.html", ctx, block="across")
    if prompt.strip():
        try:
            if positions and target_block != "token-detail":  # a token's detail keeps the selection in its URL only
                try:
                    ctx["across"] = search_all(request, prompt, positions)
                except AppError as err:
                    if err.status == 503:
                        raise
                    ctx["across_error"] = err
            ctx["result"] = inspect_data(request, info, prompt, pos)
            if color is not None:  # the strip coloured by one feature, relative to its stored max
                res, acts = ctx["result"], feature_activations(request, info, color, prompt)
                stored = store.feature(info.sae_id, color)
                res["toks"] = strip(acts.tokens, acts.values, pos)
                res["vmax"] = max(acts.max_value, stored.max_act if stored else 0.0)
            if ablate is not None:
                ctx["ablation"] = ablate_feature(request, info, prompt, ablate)
            if why is not None:
                attr = attribute(request, info, prompt, why, target)
                ctx["attribution"] = attr
                ctx["attr_rows"] = store.features_by_index(info.sae_id, [a.feature for a in attr.features])
        except AppError as err:
            if err.status == 404:
                raise
            ctx["error"] = err
            note_down(ctx, err)
    block = "detail" if pos is not None and target_block == "token-detail" else "result"
    return page(request, "inspect.html", ctx, block=block)


@router.get("/live/status", response_class=HTMLResponse)
def live_status(request: Request):
    """A fragment (#worker-status): empty when the worker answers, else the one notice saying why, which asks
    again every SERVE.worker_poll_s (htmx) until the worker is back; then the header HX-Trigger: worker-up lets
    a live page re-run its form by itself (pages stay cacheable: they load this fragment)."""
    st = worker_status(request.app)
    resp = HTMLResponse(str(ENV.globals["m"].worker_notice(st)))
    if st["up"]:
        resp.headers["HX-Trigger"] = "worker-up"
    return resp


@router.post("/live/activations", response_class=HTMLResponse)
def live_activations(request: Request, sae: str = Form(...), feature: int = Form(..., ge=0),
                     text: str = Form("", max_length=S.max_prompt_chars), ablate: bool = Form(False)):
    store = store_of(request)
    info = store.require_sae(sae)
    check_index(info, feature)
    if not text.strip():
        raise AppError("type some text first", 422)
    try:
        out = feature_activations(request, info, feature, text)
        ablation = ablate_feature(request, info, text, feature) if ablate else None
    except AppError as err:
        return page(request, "live_result.html", {"error": err}, status=200)
    f = store.feature(sae, feature)
    vmax = max(out.max_value, f.max_act if f else 0.0)
    return page(request, "live_result.html", {"toks": strip(out.tokens, out.values, out.max_pos),
                                               "out": out, "vmax": vmax, "stored_max": f.max_act if f else None,
                                               "ablation": ablation, "feature": feature,
                                               "error": None})


@router.post("/live/explain", response_class=HTMLResponse)
def live_explain(request: Request, sae: str = Form(...), feature: int = Form(..., ge=0), score: bool = Form(False)):
    """The feature page's "explain this feature": its stored examples explained by the worker's model (not saved);
    score=true also scores the explanation (detection, fuzzing). The answer shows the command that saves one."""
    store = store_of(request)
    info = store.require_sae(sae)
    check_index(info, feature)
    macros = ENV.get_template("_explanation.html").module
    save = f"saescope explain STORE --sae {info.sae_id} --features {feature}"
    try:
        body = explain_request(store, sae, feature, score)
    except ValueError:  # pydantic: no top example
        return HTMLResponse(str(macros.live_result(None, "this feature has no stored examples to explain")))
    try:
        out = client_of(request).explain(body)
    except AppError as err:
        return HTMLResponse(str(macros.live_result(None, err.message)))
    return HTMLResponse(str(macros.live_result(out, None, info.sae_id, feature, save)))


@router.get("/steer", response_class=HTMLResponse)
def steer_page(request: Request, g: Annotated[GenerationParams, Depends()], sae: str | None = None,
               prompt: Prompt = "", edit: Edits = [],  # noqa: B006  (FastAPI copies query defaults)
               feature: int | None = Query(None, ge=0), mode: Literal["add", "orthogonal", "cap", "clamp", "ablate"] = "add",
               value: float = Query(0.0, ge=-W.max_abs_value, le=W.max_abs_value)):
    """Default and steered continuations side by side; the URL holds the whole state, so a link reproduces it.
    Edits come as edit=FEATURE:MODE:VALUE (repeatable), or as feature/mode/value from a feature page's form."""
    if feature is not None:
        edit = [*edit, f"{feature}:{mode}:{value:g}"]
    info = sae_or_first(store_of(request), sae)
    ctx = steer_state(request, info, prompt, edit, g)
    ctx["edit_forms"] = [(e, edit_fields(e)) for e in (ctx["edits"] or [""])]  # the edit rows, :unit included
    return page(request, "steer.html", ctx, block="result", status=ctx["status"])
