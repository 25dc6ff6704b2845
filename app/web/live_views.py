"""The live data functions, shared by the live pages (live.py) and their JSON twins (live_api.py): the worker's
state, one function per worker question (checked against the store first), and the parameters both declare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Query, Request

from saescope.precompute.store import SAEInfo, Store

from ..errors import AppError, echo
from ..settings import SERVE, WORKER
from ..worker.client import DOWN_HINT, WorkerClient
from ..worker.wire import (AblateOut, AttributeIn, AttributeOut, EditIn, EditsIn, ExampleIn, ExplainIn,
                           FeatureActsIn, FeatureActsOut, SearchAllIn, SearchAllOut, SteerIn, SteerOut, TopFeaturesIn, TopFeaturesOut)
from .edits import parse_edits
from .lookups import check_index
from .tokens import Tok

S, W = SERVE, WORKER
Prompt = Annotated[str, Query(max_length=S.max_prompt_chars)]  # a page's prompt ("" shows the empty form)
RequiredPrompt = Annotated[str, Query(min_length=1, max_length=S.max_prompt_chars)]  # a JSON twin's prompt


def store_of(request: Request) -> Store:
    return request.app.state.store


def worker_status(app) -> dict:
    client = app.state.worker
    if client is None:  # for good: no polling
        return {"up": False, "poll": False, "message": "Live inspection is off: this server was started with --no-worker."}
    h, why = client.health()
    if h is None:
        return {"up": False, "poll": True, "message": DOWN_HINT.format(why=why)}
    return {"up": True, "poll": False, "message": "", "health": h}


def client_of(request: Request) -> WorkerClient:
    st = worker_status(request.app)
    if not st["up"]:
        raise AppError(st["message"], 503, title="Model worker unavailable")
    return request.app.state.worker


def note_down(ctx: dict, err: AppError) -> None:
    """A request that found the worker gone (while its health answer was still cached as up): the page's one
    worker notice says so, and polls, instead of a second copy of the message in the result."""
    if err.status == 503 and err.title == "Model worker unavailable" and ctx["worker"]["up"]:
        ctx["worker"] = {"up": False, "poll": True, "message": err.message}


def strip(tokens: list[str], values: list[float], mark: int | None = None) -> list[Tok]:
    return [Tok(t, v, i == mark) for i, (t, v) in enumerate(zip(tokens, values))]


# ---------------------------------------------------------------- reading: top features, one feature's activations
def top_features(request: Request, sae: SAEInfo, prompt: str, k: int, pos: int | None = None) -> TopFeaturesOut:
    return client_of(request).top_features(TopFeaturesIn(sae_id=sae.sae_id, text=prompt, k=k,
                                                         positions=[pos] if pos is not None else None))


def feature_activations(request: Request, sae: SAEInfo, feature: int, text: str) -> FeatureActsOut:
    check_index(sae, feature)
    return client_of(request).activations(FeatureActsIn(sae_id=sae.sae_id, text=text, feature=feature))


def inspect_data(request: Request, sae: SAEInfo, prompt: str, pos: int | None) -> dict:
    """The inspect page's result: the prompt's top features, and one token's when pos is given."""
    store = store_of(request)
    top = top_features(request, sae, prompt, S.inspect_k)
    n = len(top.tokens)
    if pos is not None and not 0 <= pos < n:
        raise AppError(f"pos {pos} is outside the prompt's {n} tokens (0 to {n - 1})", 422)
    rows = store.features_by_index(sae.sae_id, [h.index for h in top.features])
    detail = None
    if pos is not None:
        d = top_features(request, sae, prompt, S.token_detail_k, pos)
        detail = {"pos": pos, "token": top.tokens[pos], "features": d.features,
                  "rows": store.features_by_index(sae.sae_id, [h.index for h in d.features])}
    vmax = max(top.token_max) if top.token_max else 0.0
    return {"sae": sae, "top": top, "rows": rows, "detail": detail, "vmax": vmax,
            "toks": strip(top.tokens, top.token_max, pos)}


# ---------------------------------------------------------------- search across every SAE
SEL_DOC = (f"token positions to rank by, comma-separated (e.g. 3,5,7; at most {W.max_search_positions}); "
           "the inspect page's click / shift-click selection")
Selection = Annotated[str | None, Query(max_length=W.max_search_positions * 6, description=SEL_DOC)]


def parse_selection(sel: str | None) -> list[int] | None:
    """sel=3,5,7 -> [3, 5, 7] (order kept, repeats dropped); None or blank -> None; anything else is a 422 that
    says what is allowed."""
    if sel is None or not sel.strip():
        return None
    parts = [p.strip() for p in sel.split(",") if p.strip()]
    bad = [p for p in parts if not (p.isascii() and p.isdigit() and len(p) <= 6)]
    if bad:
        raise AppError(f"sel must be token positions separated by commas (e.g. 3,5,7); got {echo(bad[0])}", 422)
    out = list(dict.fromkeys(int(p) for p in parts))
    if len(out) > W.max_search_positions:
        raise AppError(f"sel names {len(out)} positions; at most {W.max_search_positions}", 422)
    return out


def search_all(request: Request, prompt: str, positions: list[int]) -> dict:
    """The prompt's top features across every SAE of the store at the chosen positions (one forward pass in the
    worker), with each hit's stored top tokens."""
    store = store_of(request)
    ids = [s.sae_id for s in store.saes()]
    out: SearchAllOut = client_of(request).search_all(SearchAllIn(text=prompt, positions=positions,
                                                                  top=S.search_top, sae_ids=ids))
    rows = {sid: store.features_by_index(sid, [h.feature for h in out.hits if h.sae_id == sid]) for sid in ids}
    return {"out": out, "rows": rows, "positions": out.positions}


# ---------------------------------------------------------------- interventions
@dataclass
class GenerationParams:
    """How a steered continuation is generated (the /steer page and /api/steer)."""

    n: Annotated[int, Query(ge=1, le=W.max_new_tokens, description="new tokens")] = W.default_new_tokens
    temperature: Annotated[float, Query(ge=0.0, le=W.max_temperature, description="0 = greedy")] = 0.0
    seed: Annotated[int, Query(ge=0, le=W.max_seed)] = 0


EDITS_DOC = "FEATURE:MODE:VALUE, repeatable (e.g. 123:add:8, 45:clamp:0.5, 7:ablate)"
Edits = Annotated[list[str], Query(max_length=W.max_edits, description=EDITS_DOC)]  # a page's edits (may be none)
RequiredEdits = Annotated[list[str], Query(min_length=1, max_length=W.max_edits, description=EDITS_DOC)]


def steer(request: Request, sae: SAEInfo, prompt: str, edits: list[str], g: GenerationParams) -> SteerOut:
    parsed = parse_edits(edits, sae)  # before the worker is asked: a bad edit is a 422 even when it is down
    return client_of(request).steer(SteerIn(sae_id=sae.sae_id, text=prompt, edits=parsed, max_new_tokens=g.n,
                                            temperature=g.temperature, seed=g.seed))


def ablate(request: Request, sae: SAEInfo, prompt: str, edits: list[str]) -> AblateOut:
    parsed = parse_edits(edits, sae)
    return client_of(request).ablate(EditsIn(sae_id=sae.sae_id, text=prompt, edits=parsed))


def ablate_feature(request: Request, sae: SAEInfo, prompt: str, feature: int) -> AblateOut:
    check_index(sae, feature)
    return client_of(request).ablate(EditsIn(sae_id=sae.sae_id, text=prompt,
                                             edits=[EditIn(feature=feature, mode="ablate")]))


def attribute(request: Request, sae: SAEInfo, prompt: str, position: int | None, target: int | None) -> AttributeOut:
    return client_of(request).attribute(AttributeIn(sae_id=sae.sae_id, text=prompt, position=position, target=target))


def steer_state(request: Request, sae: SAEInfo, prompt: str, edit: list[str], g: GenerationParams) -> dict:
    """The steer page's state: the form (from the URL) and, with a prompt and edits, both continuations."""
    store = store_of(request)
    ctx = {"sae": sae, "saes": store.saes(), "prompt": prompt, "edits": edit, "n": g.n, "temperature": g.temperature,
           "seed": g.seed, "worker": worker_status(request.app), "result": None, "error": None, "rows": {},
           "status": 200, "diverge": None, "edit_rows": store.features_by_index(sae.sae_id, edit_features(edit))}
    if prompt.strip() and edit:
        try:
            parse_edits(edit, sae)
        except AppError as err:  # the form is shown again with what is wrong, as a 4xx
            if err.status == 404:
                raise
            ctx["error"], ctx["status"] = err, err.status
            ctx["edits"] = [e for e in edit if len(e) <= W.max_edit_chars]  # never refill an overlong item
            return ctx
        try:
            out = steer(request, sae, prompt, edit, g)
        except AppError as err:
            if err.status == 404:
                raise
            ctx["error"] = err
            note_down(ctx, err)
            return ctx
        ctx["result"] = out
        ctx["rows"] = store.features_by_index(sae.sae_id, out.watch)
        # new tokens highlighted by the first steered feature's activation (read before the edit)
        lead = out.watch[0]
        ctx["lead"], ctx["vmax"] = lead, (store.feature(sae.sae_id, lead).max_act or 1.0)
        ctx["steered_toks"] = [Tok(t, a[0], False) for t, a in zip(out.steered.tokens, out.steered.feature_acts)]
        ctx["default_toks"] = [Tok(t, a[0], False) for t, a in zip(out.default.tokens, out.default.feature_acts)]
        ctx["diverge"] = first_difference(out.default.tokens, out.steered.tokens)
        for toks in (ctx["steered_toks"], ctx["default_toks"]):  # mark where the two continuations part
            if ctx["diverge"] is not None and ctx["diverge"] < len(toks):
                toks[ctx["diverge"]].extra = "diverge"
        from . import steering  # log-prob strips, the KL plot, suggested strengths and presets

        ctx.update(steering.steer_extras(request, store, sae.sae_id, parse_edits(edit, sae), out, ctx["diverge"]))
    return ctx


def edit_features(specs: list[str]) -> list[int]:
    """The feature numbers the edit rows name, read leniently (for their top-token chips; parse_edits checks)."""
    heads = (s.split(":", 1)[0].strip() for s in specs[:W.max_edits])
    return [int(h) for h in heads if h.isascii() and h.isdigit() and len(h) < 10]


def first_difference(a: list[str], b: list[str]) -> int | None:
    """The first position where two token lists differ (the shorter one's end counts), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- explaining a feature
def explain_request(store: Store, sae_id: str, index: int, score: bool = False) -> ExplainIn:
    """The feature's stored top and quantile examples (cut to the explainer's windows) as a worker request; with
    score, also stored contexts where the feature is 0, so the worker can score the explanation."""
    from saescope.precompute.explain import ExplainConfig
    from saescope.precompute.explain.prompts import window
    from saescope.precompute.explain.run import material_from_store

    cfg = ExplainConfig()
    n = W.max_explain_examples
    m = material_from_store(store, sae_id, index, min(cfg.n_test, n) if score else 0)
    cut = lambda ex: ExampleIn(**{k: list(v) for k, v in vars(window(ex, cfg.left, cfg.right)).items()})  # noqa: E731
    return ExplainIn(top=[cut(e) for e in m.top[:n]], quantiles=[[cut(e) for e in g[:n]] for g in m.quantiles[:n]],
                     non_activating=[list(c) for c in m.non_activating[:n]] if score else [], score=score,
                     max_tokens=cfg.explain_max_tokens)  # the budget `saescope explain` uses (the sentence is whole)
