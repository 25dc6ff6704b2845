"""The live JSON twins (tag "live"): the worker's answers for a prompt, through the same data functions and
parameters as the live pages (live_views.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from ..settings import SERVE
from ..errors import AppError
from ..worker.wire import AblateOut, AttributeOut, FeatureActsOut, SearchAllOut, SteerOut, TopFeaturesOut
from . import live_views as lv
from .live_views import RequiredEdits, GenerationParams, RequiredPrompt, Selection, store_of

router = APIRouter(prefix="/api", tags=["live"])
S = SERVE


@router.get("/inspect", summary="top features of a prompt (live, through the model worker)")
def api_inspect(request: Request, sae: str, prompt: RequiredPrompt,
                k: int = Query(S.inspect_k, ge=1, le=S.max_inspect_k), pos: int | None = Query(None, ge=0)) -> TopFeaturesOut:
    return lv.top_features(request, store_of(request).require_sae(sae), prompt, k, pos)


@router.get("/saes/{sae_id}/features/{index}/activations",
            summary="one feature's activation on every token of a text (live)")
def api_feature_live(request: Request, sae_id: str, index: int,
                     text: Annotated[str, Query(min_length=1, max_length=S.max_prompt_chars)]) -> FeatureActsOut:
    return lv.feature_activations(request, store_of(request).require_sae(sae_id), index, text)


@router.get("/steer", summary="steer generation with features (live): default and steered text")
def api_steer(request: Request, sae: str, prompt: RequiredPrompt, edit: RequiredEdits,
              g: Annotated[GenerationParams, Depends()]) -> SteerOut:
    return lv.steer(request, store_of(request).require_sae(sae), prompt, edit, g)


@router.get("/ablate", summary="per-token change of the next token's log-prob and KL when features are edited (live)")
def api_ablate(request: Request, sae: str, prompt: RequiredPrompt,
               edit: RequiredEdits) -> AblateOut:
    return lv.ablate(request, store_of(request).require_sae(sae), prompt, edit)


@router.get("/attribute", summary="features behind one next-token prediction, with the linear estimate checked "
            "against true ablation (live)")
def api_attribute(request: Request, sae: str, prompt: RequiredPrompt,
                  position: int | None = Query(None, ge=0), target: int | None = Query(None, ge=0)) -> AttributeOut:
    return lv.attribute(request, store_of(request).require_sae(sae), prompt, position, target)


@router.get("/search_all", summary="a prompt's top features across every SAE of the store at chosen token positions "
            "(live, one forward pass; features whose largest activation is on BOS left out)")
def api_search_all(request: Request, prompt: RequiredPrompt, sel: Selection = None) -> SearchAllOut:
    positions = lv.parse_selection(sel)
    if not positions:
        raise AppError("give sel: the token positions to rank by, comma-separated (e.g. sel=3,5)", 422)
    return lv.search_all(request, prompt, positions)["out"]
