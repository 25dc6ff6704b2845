"""The JSON API: one endpoint per page, plus a Neuronpedia-compatible feature export. Schemas are pydantic."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, create_model

from precompute.store.schema import SAES

from ..settings import SERVE
from .cache import cacheable
from .lookups import feature_list, feature_or_404, sae_or_404
from .pages import store_of

S = SERVE

router = APIRouter(prefix="/api", tags=["store"])


# the SAE's public fields, typed and described by the store's column spec (paths and internal keys left out)
SAEOut = create_model("SAEOut", **{c.name: (c.py, Field(description=c.doc)) for c in SAES.cols
                                   if c.name not in ("model_path", "model_key", "sae_path", "params",
                                                     "density_hist", "density_hist_lo", "density_hist_hi")})


class FeatureSummary(BaseModel):
    index: int = Field(description="feature index")
    density: float = Field(description="share of counted tokens where the feature is active")
    max_act: float = Field(description="largest activation seen")
    mean_act: float = Field(description="mean activation over active tokens")
    n_active: int = Field(description="number of active tokens")
    top_tokens: list[str] = Field(description="tokens at the maximum of the top examples, strongest first, deduplicated")


class FeatureList(BaseModel):
    total: int = Field(description="features matching the filters")
    page: int = Field(description="1-based page number")
    size: int = Field(description="page size")
    features: list[FeatureSummary] = Field(description="this page of features")


class ExampleOut(BaseModel):
    tokens: list[str] = Field(description="the whole context's token strings")
    values: list[float] = Field(description="the feature's activation on every token of the context")
    pos: int = Field(description="index of the marked token (max for top examples, the sampled token otherwise)")
    value: float = Field(description="activation at the marked token")
    ctx_id: int = Field(description="context id within the store")


class GroupOut(BaseModel):
    kind: str = Field(description="interval (equal-width) or quantile (equal-count)")
    group: int = Field(description="0-based group number, higher = stronger")
    lo: float = Field(description="lower activation bound of the group")
    hi: float = Field(description="upper activation bound of the group")
    n_tokens: int = Field(description="active tokens in the group")
    share: float = Field(description="share of all active tokens in the group")
    examples: list[ExampleOut] = Field(description="sampled examples")


class FeatureOut(FeatureSummary):
    sae_id: str = Field(description="SAE id")
    hist: list[int] = Field(description="activation histogram counts over [hist_lo, hist_hi]")
    hist_lo: float = Field(description="lowest active value")
    hist_hi: float = Field(description="highest active value")
    logit_pos: list[tuple[str, float]] = Field(description="most promoted tokens with their logit effect")
    logit_neg: list[tuple[str, float]] = Field(description="most suppressed tokens with their logit effect")
    logit_hist: list[int] = Field(description="histogram of logit effects over the vocabulary")
    logit_hist_lo: float = Field(description="smallest logit effect")
    logit_hist_hi: float = Field(description="largest logit effect")
    neighbours: list[tuple[int, float]] = Field(description="nearest features by decoder cosine similarity")
    explanations: list[str] = Field(description="explanations recorded for the feature")
    top_examples: list[ExampleOut] = Field(description="top-activating examples, at most one per context")
    intervals: list[GroupOut] = Field(description="equal-width interval samples")
    quantiles: list[GroupOut] = Field(description="equal-count quantile samples")


class SearchOut(BaseModel):
    q: str = Field(description="the query")
    mode: str = Field(description="token or explanation")
    total: int = Field(description="matching features")
    hits: list[dict] = Field(description="index, score, density, max_act, matched, top_tokens per hit")


def _ex(e) -> ExampleOut:
    return ExampleOut(tokens=e.tokens, values=e.acts, pos=e.pos, value=e.value, ctx_id=e.ctx_id)


def _groups(store, sae_id, index, kind) -> list[GroupOut]:
    return [GroupOut(kind=g.kind, group=g.grp, lo=g.lo, hi=g.hi, n_tokens=g.n_tokens, share=g.share,
                     examples=[_ex(e) for e in g.examples]) for g in store.groups(sae_id, index, kind)]


@router.get("/saes", response_model=list[SAEOut], summary="SAEs in the store")
@cacheable
def api_saes(request: Request):
    return [SAEOut(**{k: getattr(s, k) for k in SAEOut.model_fields}) for s in store_of(request).saes()]


@router.get("/saes/{sae_id}/features", response_model=FeatureList, summary="features of an SAE (the SAE page)")
@cacheable
def api_features(request: Request, sae_id: str, sort: Literal["index", "density", "max"] = "index",
                 order: Literal["asc", "desc"] = "asc", page: int = Query(1, ge=1), size: int = Query(S.page_size, ge=1, le=S.max_page_size),
                 show: Literal["all", "live", "dead", "dense"] = "all", min_density: float | None = Query(None, ge=0, le=1),
                 max_density: float | None = Query(None, ge=0, le=1)):
    store = store_of(request)
    sae_or_404(store, sae_id)
    pg, rows = feature_list(store, sae_id, sort, order, page, size, show, min_density, max_density)
    return FeatureList(total=pg.total, page=page, size=size, features=[FeatureSummary(**r.__dict__) for r in rows])


@router.get("/saes/{sae_id}/features/{index}", response_model=FeatureOut, summary="one feature (the feature page)")
@cacheable
def api_feature(request: Request, sae_id: str, index: int):
    store = store_of(request)
    _, f = feature_or_404(store, sae_id, index)
    return FeatureOut(**{k: getattr(f, k) for k in FeatureOut.model_fields if hasattr(f, k)},
                      top_examples=[_ex(e) for e in store.examples(sae_id, index, "top")],
                      intervals=_groups(store, sae_id, index, "interval"),
                      quantiles=_groups(store, sae_id, index, "quantile"))


@router.get("/saes/{sae_id}/features/{index}/neuronpedia", summary="one feature in Neuronpedia's JSON field names")
@cacheable
def api_neuronpedia(request: Request, sae_id: str, index: int) -> dict:
    store = store_of(request)
    sae, f = feature_or_404(store, sae_id, index)
    n = len(f.hist)
    step = (f.hist_hi - f.hist_lo) / n if n else 0.0
    ln = len(f.logit_hist)
    lstep = (f.logit_hist_hi - f.logit_hist_lo) / ln if ln else 0.0

    def act(e, extra: dict) -> dict:
        return {"tokens": e.tokens, "values": e.acts, "maxValue": max(e.acts) if e.acts else 0.0,
                "maxValueTokenIndex": max(range(len(e.acts)), key=e.acts.__getitem__) if e.acts else 0,
                "minValue": min(e.acts) if e.acts else 0.0, **extra}

    activations = [act(e, {"bin_min": -1, "bin_max": -1, "bin_contains": -1, "qualifying_token_index": e.pos})
                   for e in store.examples(sae_id, index, "top")]
    for g in store.groups(sae_id, index, "interval"):
        activations += [act(e, {"bin_min": g.lo, "bin_max": g.hi, "bin_contains": g.share,
                                "qualifying_token_index": e.pos}) for e in g.examples]
    layer = sae.hook.split(".")[1] if sae.hook.startswith("blocks.") else sae.hook
    return {
        "modelId": sae.model_id, "layer": f"{layer}-{sae.sae_id}", "index": str(index), "sourceSetName": sae.sae_id,
        "hookName": sae.hook, "maxActApprox": f.max_act, "frac_nonzero": f.density,
        "pos_str": [t for t, _ in f.logit_pos], "pos_values": [v for _, v in f.logit_pos],
        "neg_str": [t for t, _ in f.logit_neg], "neg_values": [v for _, v in f.logit_neg],
        "freq_hist_data_bar_heights": f.hist, "freq_hist_data_bar_values": [f.hist_lo + step * (i + 0.5) for i in range(n)],
        "logits_hist_data_bar_heights": f.logit_hist,
        "logits_hist_data_bar_values": [f.logit_hist_lo + lstep * (i + 0.5) for i in range(ln)],
        "topkCosSimIndices": [j for j, _ in f.neighbours], "topkCosSimValues": [s for _, s in f.neighbours],
        "explanations": [{"description": e} for e in f.explanations], "activations": activations,
    }


@router.get("/saes/{sae_id}/search", response_model=SearchOut, summary="search features by token text or explanation")
@cacheable
def api_search(request: Request, sae_id: str, q: str = Query(..., min_length=1, max_length=S.max_query_chars),
               by: Literal["token", "explanation"] = "token", page: int = Query(1, ge=1),
               size: int = Query(S.search_page_size, ge=1, le=S.max_search_page_size)):
    store = store_of(request)
    sae_or_404(store, sae_id)
    fn = store.search_tokens if by == "token" else store.search_explanations
    hits, total = fn(sae_id, q, size, (page - 1) * size)
    return SearchOut(q=q, mode=by, total=total, hits=[h.__dict__ for h in hits])
