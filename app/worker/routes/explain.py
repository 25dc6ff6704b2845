"""The worker's explanation routes: /explain (a feature from its stored examples) and the OpenAI-compatible chat
route (app/worker/chat.py), both with the worker's own model under the engine's model lock."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import APIRouter

from ...errors import AppError
from ...settings import WORKER
from ..batcher import Engine
from ..wire import ExplainIn, ExplainOut, ScoreOut

log = logging.getLogger(__name__)


def chat_backend(engine: Engine | None):
    """The worker's model as a ChatBackend whose every call holds the engine's model lock (the model is shared with
    the batcher and the interventions), or None when its tokenizer has no chat template."""
    from saescope.precompute.explain.backends import ChatBackend, LocalChatBackend

    if engine is None:  # app.openapi writes the document without a model
        return None
    try:
        inner = LocalChatBackend.from_loaded(engine.lm.model, engine.lm.tokenizer, f"worker:{engine.lm.name}",
                                             device=str(engine.lm.device))
    except ValueError as err:
        log.info("no chat route: %s", err)
        return None

    class Locked(ChatBackend):
        name = inner.name

        def chat_batch(self, conversations, max_tokens, max_time_s=None):
            with engine.model_lock:
                return inner.chat_batch(conversations, max_tokens, max_time_s=max_time_s)

    return Locked()


def chat_model_name(engine: Engine | None) -> str:
    """The model name of the chat route: a local folder's name, or the hub id."""
    if engine is None:
        return "MODEL"
    return Path(engine.lm.name).name if Path(engine.lm.name).exists() else engine.lm.name


def _explain(backend, body: ExplainIn) -> ExplainOut:
    """explain_feature (and score_explanation when asked) on the material the request carries."""
    from saescope.precompute.explain import Example, ExplainConfig, FeatureMaterial, explain_feature, score_explanation

    t0 = time.perf_counter()
    try:
        material = FeatureMaterial(top=[Example(e.tokens, e.acts) for e in body.top],
                                   quantiles=[[Example(e.tokens, e.acts) for e in g] for g in body.quantiles],
                                   non_activating=body.non_activating)
        cfg = ExplainConfig(explain_max_tokens=body.max_tokens)
        text, prov = explain_feature(backend, material, cfg, body.seed)
    except ValueError as err:
        raise AppError(str(err), 422) from err
    if "error" in prov:
        raise AppError(prov["error"], 422)
    scores, why = [], None
    if body.score and text:
        try:
            res = score_explanation(backend, text, material, cfg, body.seed)
            scores = [ScoreOut(method=r.method, balanced_accuracy=r.balanced_accuracy, n_examples=r.n_examples,
                               n_judged=r.n_judged) for r in res.values()]
        except ValueError as err:
            why = str(err)
    return ExplainOut(explanation=text, parsed=prov["parsed"], llm=prov["llm"], prompt_version=prov["prompt_version"],
                      n_examples=prov["n_examples"], scores=scores, score_error=why,
                      seconds=time.perf_counter() - t0)


def make_router(engine: Engine, chat) -> APIRouter:
    router = APIRouter()

    @router.post("/explain", response_model=ExplainOut, summary="explain one feature from its stored examples with "
                 "this worker's model")
    async def explain(body: ExplainIn) -> ExplainOut:
        if chat is None:
            raise AppError(f"this worker's model ({engine.lm.name}) has no chat template, so it cannot explain "
                           "features; use `saescope explain --llm URL` with an instruct model", 422)
        try:  # the backend takes the model lock for each generation; the thread keeps the event loop free
            return await asyncio.wait_for(asyncio.to_thread(_explain, chat, body), timeout=WORKER.explain_timeout_s)
        except asyncio.TimeoutError as err:
            raise AppError(f"no explanation within {WORKER.explain_timeout_s:.0f} s (the worker is busy or the "
                           "model slow); retry shortly", 504) from err

    return router


def make_chat_routes(engine: Engine | None, chat) -> APIRouter:
    """/v1/chat/completions and /v1/models for the worker's model: max_tokens and wall time capped by LIMITS."""
    from ..chat import make_chat_router

    return make_chat_router(chat, model_name=chat_model_name(engine), max_tokens_limit=WORKER.chat_max_tokens,
                            time_limit_s=WORKER.generation_time_s)
