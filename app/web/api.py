"""The JSON API: one endpoint per page, plus a Neuronpedia-compatible feature export. Schemas are pydantic."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from saescope.precompute.export import neuronpedia_api_feature
from saescope.precompute.store.schema import SAES

from ..settings import SERVE
from .cache import cacheable
from .lookups import feature_or_404
from .pages import store_of
from .views import (APISearchParams, FeatureListParams, FeatureView, ListParams, feature_view, features_view, list_csv,
                    list_filename, list_view, search_view)
from .quality import QualityOut

S = SERVE

router = APIRouter(prefix="/api", tags=["store"])


# the SAE's public fields, typed and described by the store's column spec (paths and internal keys left out)
SAEOut = create_model("SAEOut", **{c.name: (c.py, Field(description=c.doc)) for c in SAES.cols
                                   if c.name not in ("model_path", "model_key", "sae_path", "params",
                                                     "density_hist", "density_hist_lo", "density_hist_hi")},
                      quality=(QualityOut | None, Field(None, description="quality metrics (SAELens/SAEBench "
                                                        "definitions, precompute/quality.py); None if not computed")))


class FeatureSummary(BaseModel):
    index: int = Field(description="feature index")
    density: float = Field(description="share of counted tokens where the feature is active")
    max_act: float = Field(description="largest activation seen")
    mean_act: float = Field(description="mean activation over active tokens")
    n_active: int = Field(description="number of active tokens")
    top_tokens: list[str] = Field(description="tokens at the maximum of the top examples, strongest first, deduplicated")
    score: float | None = Field(None, description="best explanation score: mean of its detection and fuzzing balanced "
                                "accuracies (0.5 = chance); None when no explanation is scored")


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


class ExplanationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from the store's Explanation rows

    text: str = Field(description="the explanation")
    source: str | None = Field(None, description="where it came from: an imported file's name or 'saescope explain'")
    llm: str | None = Field(None, description="the LLM that wrote it (None for imported ones)")
    prompt_version: str | None = Field(None, description="version of saescope's explainer prompts")
    created: str | None = Field(None, description="when it was written (UTC)")
    score_detection: float | None = Field(None, description="detection balanced accuracy (0.5 = chance)")
    score_fuzzing: float | None = Field(None, description="fuzzing balanced accuracy (0.5 = chance)")
    n_scored: int | None = Field(None, description="snippets with a parsed judgement over both methods "
                                 "(None: not scored; 0: the judge's answers were unparsable)")


class CrossOut(BaseModel):
    sae_id: str = Field(description="the other SAE (of the same width, precomputed in the same run)")
    matches: list[tuple[int, float]] = Field(description="its features nearest to this one by decoder cosine")


class NearPointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from maps.NearPoint

    index: int = Field(description="feature index")
    cx: float = Field(description="x in the neighbourhood drawing's viewBox")
    cy: float = Field(description="y in the neighbourhood drawing's viewBox")
    title: str = Field(description="the point's label: feature and top tokens")
    me: bool = Field(description="whether this point is the feature itself")


class NeighbourhoodOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from maps.Neighbourhood

    points: list[NearPointOut] = Field(description="the nearest features on the map, the feature itself last")
    width: int = Field(description="viewBox width")
    height: int = Field(description="viewBox height")
    map_url: str = Field(description="the full map, centred on the feature")


class FeatureOut(FeatureSummary):
    sae_id: str = Field(description="SAE id")
    hist: list[int] = Field(description="activation histogram counts over [hist_lo, hist_hi]")
    hist_lo: float = Field(description="lowest active value")
    hist_hi: float = Field(description="highest active value")
    logit_pos: list[tuple[str, float]] = Field(description="most promoted tokens with their logit effect")
    logit_neg: list[tuple[str, float]] = Field(description="most suppressed tokens with their logit effect")
    logit_mean: float = Field(description="mean logit effect over the vocabulary (centred effect = raw - logit_mean)")
    logit_pos_centred: list[tuple[str, float]] = Field(description="logit_pos with logit_mean subtracted")
    logit_neg_centred: list[tuple[str, float]] = Field(description="logit_neg with logit_mean subtracted")
    logit_hist: list[int] = Field(description="histogram of logit effects over the vocabulary")
    logit_hist_lo: float = Field(description="smallest logit effect")
    logit_hist_hi: float = Field(description="largest logit effect")
    neighbours: list[tuple[int, float]] = Field(description="nearest features by decoder cosine similarity")
    cooc: list[tuple[int, float]] = Field(description="co-occurring features by Jaccard over active tokens "
                                          "([] when not computed)")
    other_saes: list[CrossOut] = Field(description="nearest decoder directions in each SAE it was compared with")
    map_xy: tuple[float, float] | None = Field(description="position on the feature map (None: no map)")
    map_neighbourhood: NeighbourhoodOut | None = Field(description="the map around the feature, as the page draws it")
    explanations: list[str] = Field(description="explanations recorded for the feature")
    explanation_rows: list[ExplanationOut] = Field([], description="the explanations with provenance and scores")
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


def _groups(groups) -> list[GroupOut]:
    return [GroupOut(kind=g.kind, group=g.grp, lo=g.lo, hi=g.hi, n_tokens=g.n_tokens, share=g.share,
                     examples=[_ex(e) for e in g.examples]) for g in groups]


@router.get("/saes", response_model=list[SAEOut], summary="SAEs in the store")
@cacheable
def api_saes(request: Request):
    q = store_of(request).quality()
    return [SAEOut(**{k: getattr(s, k) for k in SAEOut.model_fields if k != "quality"},
                   quality=QualityOut(**vars(q[s.sae_id])) if s.sae_id in q else None) for s in store_of(request).saes()]


@router.get("/saes/{sae_id}/features", response_model=FeatureList, summary="features of an SAE (the SAE page)")
@cacheable
def api_features(request: Request, sae_id: str, p: Annotated[FeatureListParams, Depends()]):
    v = features_view(store_of(request), sae_id, p)
    return FeatureList(total=v.pager.total, page=p.page, size=p.size,
                       features=[FeatureSummary(**r.__dict__) for r in v.rows])


def feature_out(v: FeatureView) -> FeatureOut:
    """The feature page's view as JSON: every section the page shows."""
    f = v.f
    return FeatureOut(**{k: getattr(f, k) for k in FeatureOut.model_fields if hasattr(f, k)},
                      logit_pos_centred=v.logit_pos_centred, logit_neg_centred=v.logit_neg_centred,
                      other_saes=[CrossOut(sae_id=o, matches=m) for o, m in v.others],
                      map_neighbourhood=NeighbourhoodOut.model_validate(v.map_near) if v.map_near else None,
                      top_examples=[_ex(e) for e in v.examples["top"]],
                      intervals=_groups(v.groups["interval"]), quantiles=_groups(v.groups["quantile"]))


@router.get("/saes/{sae_id}/features/{index}", response_model=FeatureOut, summary="one feature (the feature page)")
@cacheable
def api_feature(request: Request, sae_id: str, index: int):
    return feature_out(feature_view(store_of(request), sae_id, index))


@router.get("/saes/{sae_id}/features/{index}/neuronpedia", summary="one feature in Neuronpedia's JSON field names")
@cacheable
def api_neuronpedia(request: Request, sae_id: str, index: int) -> dict:
    store = store_of(request)
    sae, f = feature_or_404(store, sae_id, index)
    return neuronpedia_api_feature(store, sae, f)


class ListEntry(FeatureSummary):
    note: str = Field(description="the note given for this feature in the list")


class FeatureListOut(BaseModel):
    sae_id: str = Field(description="SAE id")
    name: str = Field(description="the list's name")
    features: list[ListEntry] = Field(description="the listed features in the list's order")


@router.get("/saes/{sae_id}/list", summary="a shared feature list (from its URL) as JSON or CSV",
            responses={200: {"content": {"text/csv": {}}}})
@cacheable
def api_list(request: Request, sae_id: str, p: Annotated[ListParams, Depends()],
             format: Literal["json", "csv"] = "json"):
    v = list_view(store_of(request), sae_id, p)
    if format == "csv":  # cells a spreadsheet would run as formulas are neutralised (views.csv_cell)
        return Response(list_csv(v), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{list_filename(v)}"'})
    return FeatureListOut(sae_id=sae_id, name=v.name,
                          features=[ListEntry(**v.rows[it.index].__dict__, note=it.note) for it in v.items])


@router.get("/saes/{sae_id}/search", response_model=SearchOut, summary="search features by token text or explanation")
@cacheable
def api_search(request: Request, sae_id: str, p: Annotated[APISearchParams, Depends()]):
    v = search_view(store_of(request), sae_id, p)
    return SearchOut(q=p.q, mode=v.mode, total=v.total, hits=[h.__dict__ for h in v.hits])
