"""POST /contrast (features separating two small sets of texts) and POST /search_all (a prompt's top features
across every SAE at chosen positions): each one computation of the library in a thread, under the model lock."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter

from saescope.precompute import contrast as ct
from saescope.precompute.errors import UserError
from saescope.precompute.search_all import search_all

from ...errors import AppError
from ...settings import WORKER
from ..batcher import Engine
from ..wire import ContrastFeatureOut, ContrastIn, ContrastOut, SearchAllIn, SearchAllOut, SearchHitOut


def make_router(engine: Engine) -> APIRouter:
    router = APIRouter()

    async def run(fn, what: str):
        def locked():
            with engine.model_lock:
                return fn()
        try:
            return await asyncio.wait_for(asyncio.to_thread(locked), timeout=WORKER.contrast_timeout_s)
        except UserError as err:
            raise AppError(str(err), 422) from err
        except asyncio.TimeoutError as err:
            raise AppError(f"no {what} within {WORKER.contrast_timeout_s:.0f} s (the worker is busy); retry "
                           "with fewer texts", 504) from err

    @router.post("/contrast", response_model=ContrastOut, summary="features of one SAE that separate two small sets "
                 "of texts (AUROC, mean difference), with sparse probes")
    async def contrast(body: ContrastIn) -> ContrastOut:
        sae = engine.sae(body.sae_id)
        try:
            ct.check_live_sets(body.a, body.b, WORKER.max_contrast_texts, WORKER.max_contrast_chars)
        except UserError as err:
            raise AppError(str(err), 422) from err
        max_tokens = min(WORKER.max_contrast_tokens, engine.max_prompt_tokens)
        t0 = time.perf_counter()
        c = await run(lambda: ct.compute(engine.lm, sae, sae.cfg.hook_name, body.a, body.b, sae.cfg.prepend_bos,
                                         body.reduce, body.top, max_tokens), "contrast")
        f = c.features
        feats = [ContrastFeatureOut(**{k: f[k][i] for k in f}) for i in range(len(f["feature"]))]
        ids = {s: [t for side, t in zip(c.texts["side"], c.texts["token_ids"]) if side == s] for s in ("a", "b")}
        return ContrastOut(**c.run, features=feats, token_ids=ids,
                           tokens={s: [engine.strs(t) for t in v] for s, v in ids.items()},
                           seconds=time.perf_counter() - t0)

    @router.post("/search_all", response_model=SearchAllOut, summary="a prompt's top features across every SAE at "
                 "chosen token positions (one forward pass)")
    async def search(body: SearchAllIn) -> SearchAllOut:
        names = body.sae_ids or list(engine.saes)
        saes = [(k, engine.sae(k), engine.sae(k).cfg.hook_name) for k in dict.fromkeys(names)]
        ids = engine.tokenize(names[0], body.text)
        bad = [p for p in body.positions if not 0 <= p < len(ids)]
        if bad:
            raise AppError(f"position {bad[0]} is outside the prompt's {len(ids)} tokens (0 to {len(ids) - 1})", 422)
        hits = await run(lambda: search_all(engine.lm, saes, ids.tolist(), body.positions, body.top),
                         "search across SAEs")
        special = set(engine.lm.tokenizer.all_special_ids)
        return SearchAllOut(tokens=engine.strs(ids), positions=[p for p in dict.fromkeys(body.positions)
                                                                 if int(ids[p]) not in special],
                            hits=[SearchHitOut(sae_id=h.sae_id, feature=h.feature, value=h.score, pos=h.position)
                                  for h in hits])

    return router
