"""The worker's intervention routes: steering, ablation on text, attribution, activation patching (app/worker/interventions.py runs them)."""

from __future__ import annotations

from fastapi import APIRouter

from .. import interventions
from ..batcher import Engine
from ..wire import AblateOut, AttributeIn, AttributeOut, ChatSteerIn, ChatSteerOut, EditsIn, PatchIn, PatchOut, SteerIn, SteerOut


def make_router(engine: Engine) -> APIRouter:
    router = APIRouter()

    @router.post("/steer", response_model=SteerOut, summary="steered and default continuations side by side")
    async def steer(body: SteerIn) -> SteerOut:
        return await interventions.steer(engine, body)

    @router.post("/steer_chat", response_model=ChatSteerOut, summary="default and steered assistant replies to a "
                 "conversation (the model's chat template applied)")
    async def steer_chat(body: ChatSteerIn) -> ChatSteerOut:
        return await interventions.steer_chat(engine, body)

    @router.post("/ablate", response_model=AblateOut, summary="per-token effect of editing features on the next token")
    async def ablate(body: EditsIn) -> AblateOut:
        return await interventions.ablate(engine, body)

    @router.post("/attribute", response_model=AttributeOut, summary="features behind one next-token prediction")
    async def attribute(body: AttributeIn) -> AttributeOut:
        return await interventions.attribute(engine, body)

    @router.post("/patch", response_model=PatchOut, summary="activation patching of SAE latents from a "
                 "counterfactual prompt, real patches next to the attribution-patching estimate")
    async def patch(body: PatchIn) -> PatchOut:
        return await interventions.patch(engine, body)

    return router
