"""The worker's reading routes: health, tokenize, and feature activations through the batching engine."""

from __future__ import annotations

from fastapi import APIRouter

from ...errors import AppError
from ..batcher import Engine
from ..wire import (FeatureActsIn, FeatureActsOut, FeatureHit, HealthOut, SAEDesc, TokenFeaturesIn, TokenFeaturesOut,
                    TokenizeIn, TokenizeOut, TopFeaturesIn, TopFeaturesOut)


def make_router(engine: Engine, chat_model: str | None = None) -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=HealthOut)
    async def health() -> HealthOut:
        return HealthOut(status="ok", model=engine.lm.name, device=engine.lm.device,
                         saes=[SAEDesc(sae_id=k, hook=s.cfg.hook_name, d_sae=s.cfg.d_sae) for k, s in engine.saes.items()],
                         queued=engine.queue.qsize() if engine.queue else 0, max_prompt_tokens=engine.max_prompt_tokens,
                         max_batch=engine.max_batch, batches=engine.batches, requests=engine.requests,
                         chat_model=chat_model)

    @router.post("/tokenize", response_model=TokenizeOut)
    async def tokenize(body: TokenizeIn) -> TokenizeOut:
        ids = engine.tokenize(body.sae_id, body.text)
        return TokenizeOut(tokens=engine.strs(ids), ids=ids.tolist())

    @router.post("/activations", response_model=FeatureActsOut)
    async def activations(body: FeatureActsIn) -> FeatureActsOut:
        sae = engine.sae(body.sae_id)
        if body.feature >= sae.cfg.d_sae:
            raise AppError(f"feature {body.feature} does not exist: {body.sae_id} has features 0 to {sae.cfg.d_sae - 1}", 404)
        ids, z = await engine.encode(body)
        v = z[:, body.feature]
        return FeatureActsOut(tokens=engine.strs(ids), values=v.tolist(), max_value=float(v.max()), max_pos=int(v.argmax()))

    @router.post("/top_features", response_model=TopFeaturesOut)
    async def top_features(body: TopFeaturesIn) -> TopFeaturesOut:
        ids, z = await engine.encode(body)
        pos = body.positions if body.positions is not None else list(range(len(ids)))
        bad = [p for p in pos if not 0 <= p < len(ids)]
        if bad or not pos:
            raise AppError(f"positions {bad or pos} are outside the prompt's {len(ids)} tokens (0 to {len(ids) - 1})", 422)
        sub = z[pos]  # (P, d_sae)
        mx, arg = sub.max(0)  # per feature: max over positions
        k = min(body.k, int((mx > 0).sum()))
        top = mx.topk(k) if k else None
        hits = [FeatureHit(index=int(i), value=float(v), pos=int(pos[int(arg[i])]))
                for v, i in zip(top.values, top.indices)] if top is not None else []
        tmax, targ = z.max(1)
        return TopFeaturesOut(tokens=engine.strs(ids), features=hits, token_max=tmax.tolist(),
                              token_argmax=[int(a) if m > 0 else -1 for m, a in zip(tmax, targ)])

    @router.post("/token_features", response_model=TokenFeaturesOut)
    async def token_features(body: TokenFeaturesIn) -> TokenFeaturesOut:
        ids, z = await engine.encode(body)
        k = min(body.k, z.shape[1])
        top = z.topk(k, dim=1)
        per = [[FeatureHit(index=int(i), value=float(v), pos=t) for v, i in zip(vals, idx) if v > 0]
               for t, (vals, idx) in enumerate(zip(top.values, top.indices))]
        return TokenFeaturesOut(tokens=engine.strs(ids), per_token=per)

    return router
