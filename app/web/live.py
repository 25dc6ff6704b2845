"""Live inspection through the model worker: the inspect page, "try your own text", and their JSON twins.

When the worker is down these routes say so plainly; every precomputed page keeps working.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse
from markupsafe import escape

from ..errors import AppError, echo
from ..settings import SERVE, WORKER
from ..worker.client import DOWN_HINT, WorkerClient
from ..worker.wire import (AblateOut, AttributeIn, AttributeOut, EditIn, EditsIn, ExampleIn, ExplainIn,
                           FeatureActsIn, FeatureActsOut, SteerIn, SteerOut, TopFeaturesIn, TopFeaturesOut)
from . import steering
from .lookups import check_index, sae_or_404, sae_or_first
from .pages import store_of
from .templates import ENV, page
from .tokens import Tok

router = APIRouter()
S, W = SERVE, WORKER
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
                 pos: int | None = Query(None, ge=0), ablate: int | None = Query(None, ge=0),
                 why: int | None = Query(None, ge=0), target: int | None = Query(None, ge=0)):
    """A prompt's features (live); ablate=F adds the per-token effect of removing feature F; why=P explains the
    prediction after token P (target=ID for another token than the top one)."""
    store = store_of(request)
    info = sae_or_first(store, sae)
    sae_id = info.sae_id
    ctx = {"saes": store.saes(), "sae": info, "prompt": prompt, "pos": pos, "worker": worker_status(request.app),
           "result": None, "error": None, "ablate": ablate, "why": why, "target": target, "ablation": None,
           "attribution": None}
    if ablate is not None:
        check_index(info, ablate)
    if prompt.strip():
        try:
            ctx["result"] = inspect_data(request, sae_id, prompt, pos)
            client = _client(request)
            if ablate is not None:
                ctx["ablation"] = client.ablate(EditsIn(sae_id=sae_id, text=prompt,
                                                        edits=[EditIn(feature=ablate, mode="ablate")]))
            if why is not None:
                attr = client.attribute(AttributeIn(sae_id=sae_id, text=prompt, position=why, target=target))
                ctx["attribution"] = attr
                ctx["attr_rows"] = store.features_by_index(sae_id, [a.feature for a in attr.features])
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
                     text: str = Form("", max_length=MAX_PROMPT_CHARS), ablate: bool = Form(False)):
    store = store_of(request)
    info = sae_or_404(store, sae)
    check_index(info, feature)
    if not text.strip():
        raise AppError("type some text first", 422)
    try:
        client = _client(request)
        out = client.activations(FeatureActsIn(sae_id=sae, text=text, feature=feature))
        ablation = client.ablate(EditsIn(sae_id=sae, text=text, edits=[EditIn(feature=feature, mode="ablate")])) \
            if ablate else None
    except AppError as err:
        return page(request, "live_result.html", {"error": err}, status=200)
    f = store.feature(sae, feature)
    vmax = max(out.max_value, f.max_act if f else 0.0)
    return page(request, "live_result.html", {"toks": _strip(out.tokens, out.values, out.max_pos),
                                               "out": out, "vmax": vmax, "stored_max": f.max_act if f else None,
                                               "ablation": ablation, "feature": feature,
                                               "error": None})


def explain_request(store, sae_id: str, index: int) -> ExplainIn:
    """The feature's stored top and quantile examples (cut to the explainer's windows) as a worker request."""
    from saescope.precompute.explain import ExplainConfig
    from saescope.precompute.explain.prompts import window
    from saescope.precompute.explain.run import material_from_store

    cfg = ExplainConfig()
    m = material_from_store(store, sae_id, index, 0)
    cut = lambda ex: ExampleIn(**{k: list(v) for k, v in vars(window(ex, cfg.left, cfg.right)).items()})  # noqa: E731
    n = W.max_explain_examples
    return ExplainIn(top=[cut(e) for e in m.top[:n]], quantiles=[[cut(e) for e in g[:n]] for g in m.quantiles[:n]],
                     max_tokens=W.explain_max_tokens)


@router.post("/live/explain", response_class=HTMLResponse)
def live_explain(request: Request, sae: str = Form(...), feature: int = Form(..., ge=0)):
    """The feature page's "explain this feature": its stored examples explained by the worker's model (not saved)."""
    store = store_of(request)
    info = sae_or_404(store, sae)
    check_index(info, feature)
    macros = ENV.get_template("_explanation.html").module
    try:
        body = explain_request(store, sae, feature)
    except ValueError:  # pydantic: no top example
        return HTMLResponse(str(macros.live_result(None, "this feature has no stored examples to explain")))
    try:
        out = _client(request).explain(body)
    except AppError as err:
        return HTMLResponse(str(macros.live_result(None, err.message)))
    return HTMLResponse(str(macros.live_result(out, None)))


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


# ---------------------------------------------------------------- interventions: steer, ablate, attribute
EDIT_RE = re.compile(r"^(\d{1,9})(?::(ablate|clamp|add|orthogonal|cap))?(?::(-?[0-9.]+(?:e-?\d+)?))?(:unit)?$")


def parse_edits(specs: list[str], info) -> list[EditIn]:
    """URL edits 'FEATURE:MODE:VALUE[:unit]' (e.g. 123:add:8, 45:clamp:0.5, 7:ablate, 9:orthogonal:3, 9:cap:0,
    123:add:20:unit steers along the unit decoder direction) -> checked wire edits."""
    if not specs:
        raise AppError("give at least one edit, e.g. edit=123:add:8 (feature 123, steering coefficient 8)", 422)
    if len(specs) > W.max_edits:
        raise AppError(f"{len(specs)} edits given; the limit is {W.max_edits}", 422)
    out = []
    for spec in specs:
        m = EDIT_RE.match(spec.strip())
        if not m:
            raise AppError(f"edit {echo(spec)} is not FEATURE:MODE:VALUE with MODE one of ablate, clamp, add, "
                           "orthogonal, cap (e.g. 123:add:8, 9:cap:0 or 7:ablate; :unit after a steering edit "
                           "normalizes the direction)", 422)
        feature, mode, value = int(m.group(1)), m.group(2) or "add", float(m.group(3) or 0)
        check_index(info, feature)
        if not math.isfinite(value) or abs(value) > W.max_abs_value:
            raise AppError(f"edit {echo(spec)}: value must be a number from -{W.max_abs_value:g} to "
                           f"{W.max_abs_value:g}", 422)
        if m.group(4) and mode not in ("add", "orthogonal", "cap"):
            raise AppError(f"edit {echo(spec)}: :unit applies to the steering modes add, orthogonal, cap", 422)
        out.append(EditIn(feature=feature, mode=mode, value=value, normalize=bool(m.group(4))))
    return out


def _steer_state(request: Request, sae: str | None, prompt: str, edit: list[str], n: int, temperature: float,
                 seed: int) -> dict:
    store = store_of(request)
    info = sae_or_first(store, sae)
    ctx = {"sae": info, "saes": store.saes(), "prompt": prompt, "edits": edit, "n": n, "temperature": temperature,
           "seed": seed, "worker": worker_status(request.app), "result": None, "error": None, "rows": {}}
    if prompt.strip() and edit:
        try:
            parsed = parse_edits(edit, info)
            out = _client(request).steer(SteerIn(sae_id=info.sae_id, text=prompt, edits=parsed, max_new_tokens=n,
                                                 temperature=temperature, seed=seed))
            ctx["result"] = out
            ctx["rows"] = store.features_by_index(info.sae_id, out.watch)
            # new tokens highlighted by the first steered feature's activation (read before the edit)
            lead = out.watch[0]
            ctx["lead"], ctx["vmax"] = lead, (store.feature(info.sae_id, lead).max_act or 1.0)
            ctx["steered_toks"] = [Tok(t, a[0], False) for t, a in zip(out.steered.tokens, out.steered.feature_acts)]
            ctx["default_toks"] = [Tok(t, a[0], False) for t, a in zip(out.default.tokens, out.default.feature_acts)]
            ctx.update(steering.steer_extras(request, store, info.sae_id, parsed, out))
        except AppError as err:
            if err.status == 404:
                raise
            ctx["error"] = err
    return ctx


@router.get("/steer", response_class=HTMLResponse)
def steer_page(request: Request, sae: str | None = None, prompt: str = Query("", max_length=MAX_PROMPT_CHARS),
               edit: list[str] = Query([], max_length=W.max_edits),
               n: int = Query(W.default_new_tokens, ge=1, le=W.max_new_tokens),
               temperature: float = Query(0.0, ge=0.0, le=W.max_temperature), seed: int = Query(0, ge=0, le=W.max_seed),
               feature: int | None = Query(None, ge=0),
               mode: Literal["add", "orthogonal", "cap", "clamp", "ablate"] = "add",
               value: float = Query(0.0, ge=-W.max_abs_value, le=W.max_abs_value)):
    """Default and steered continuations side by side; the URL holds the whole state, so a link reproduces it.
    Edits come as edit=FEATURE:MODE:VALUE (repeatable), or as feature/mode/value from a feature page's form."""
    if feature is not None:
        edit = [*edit, f"{feature}:{mode}:{value:g}"]
    ctx = _steer_state(request, sae, prompt, edit, n, temperature, seed)
    return page(request, "steer.html", ctx, block="result")


@router.get("/api/steer", tags=["live"], summary="steer generation with features (live): default and steered text")
def api_steer(request: Request, sae: str, prompt: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS),
              edit: list[str] = Query(..., max_length=W.max_edits),
              n: int = Query(W.default_new_tokens, ge=1, le=W.max_new_tokens),
              temperature: float = Query(0.0, ge=0.0, le=W.max_temperature), seed: int = Query(0, ge=0, le=W.max_seed)) -> SteerOut:
    info = sae_or_404(store_of(request), sae)
    return _client(request).steer(SteerIn(sae_id=sae, text=prompt, edits=parse_edits(edit, info), max_new_tokens=n,
                                          temperature=temperature, seed=seed))


@router.get("/api/ablate", tags=["live"], summary="per-token change of the next token's log-prob and KL when "
            "features are edited (live)")
def api_ablate(request: Request, sae: str, prompt: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS),
               edit: list[str] = Query(..., max_length=W.max_edits)) -> AblateOut:
    info = sae_or_404(store_of(request), sae)
    return _client(request).ablate(EditsIn(sae_id=sae, text=prompt, edits=parse_edits(edit, info)))


@router.get("/api/attribute", tags=["live"], summary="features behind one next-token prediction, with the linear "
            "estimate checked against true ablation (live)")
def api_attribute(request: Request, sae: str, prompt: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS),
                  position: int | None = Query(None, ge=0), target: int | None = Query(None, ge=0)) -> AttributeOut:
    sae_or_404(store_of(request), sae)
    return _client(request).attribute(AttributeIn(sae_id=sae, text=prompt, position=position, target=target))
