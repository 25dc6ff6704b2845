"""The worker's HTTP API: JSON in and out (pydantic wire models), errors in the project's one format."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import hmac

from ..errors import AppError, validation_message
from ..settings import VERSION, WORKER
from . import interventions
from .batcher import Engine
from .wire import (AblateOut, AttributeIn, AttributeOut, EditsIn, ExplainIn, ExplainOut, FeatureActsIn,
                   FeatureActsOut, FeatureHit, HealthOut, SAEDesc, ScoreOut, SteerIn, SteerOut, TokenFeaturesIn,
                   TokenFeaturesOut, TokenizeIn, TokenizeOut, TopFeaturesIn, TopFeaturesOut)

DESCRIPTION = ("Live SAE feature activations over a small JSON API, with dynamic batching; feature explanations "
               "and an OpenAI-compatible chat route (/v1/chat/completions) for the worker's own model.")
log = logging.getLogger(__name__)


def chat_backend(engine: Engine):
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

        def chat_batch(self, conversations, max_tokens):
            with engine.model_lock:
                return inner.chat_batch(conversations, max_tokens)

    return Locked()


def chat_model_name(engine: Engine) -> str:
    """The model name of the chat route: a local folder's name, or the hub id."""
    from pathlib import Path

    return Path(engine.lm.name).name if Path(engine.lm.name).exists() else engine.lm.name


def _explain(backend, body: ExplainIn) -> ExplainOut:
    """explain_feature (and score_explanation when asked) on the material the request carries."""
    import time

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


def create_worker_app(engine: Engine, secret: str | None = None) -> FastAPI:
    """The worker's ASGI app. With `secret`, every request must carry `Authorization: Bearer <secret>`."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield

    app = FastAPI(title="saescope model worker", version=VERSION, lifespan=lifespan, description=DESCRIPTION)
    chat = chat_backend(engine)

    @app.exception_handler(AppError)
    async def app_error(request: Request, err: AppError):
        return JSONResponse(err.as_json(), status_code=err.status)

    if secret:
        expected = f"Bearer {secret}".encode()

        @app.middleware("http")
        async def require_secret(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                why = "no Authorization header" if not given else "a wrong shared secret"
                err = AppError(f"this worker requires its shared secret (got {why}); send 'Authorization: Bearer "
                               "<secret>' (the dashboard does so when started with the same --worker-secret or "
                               "SAESCOPE_WORKER_SECRET)", 401)
                return JSONResponse(err.as_json(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad(request: Request, err: RequestValidationError):
        return JSONResponse(AppError(validation_message(err.errors()), 422).as_json(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        msg = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return JSONResponse(AppError(msg, err.status_code).as_json(), status_code=err.status_code)

    @app.get("/health", response_model=HealthOut)
    async def health() -> HealthOut:
        return HealthOut(status="ok", model=engine.lm.name, device=engine.lm.device,
                         saes=[SAEDesc(sae_id=k, hook=s.cfg.hook_name, d_sae=s.cfg.d_sae) for k, s in engine.saes.items()],
                         queued=engine.queue.qsize() if engine.queue else 0, max_prompt_tokens=engine.max_prompt_tokens,
                         max_batch=engine.max_batch, batches=engine.batches, requests=engine.requests,
                         chat_model=chat_model_name(engine) if chat is not None else None)

    @app.post("/tokenize", response_model=TokenizeOut)
    async def tokenize(body: TokenizeIn) -> TokenizeOut:
        ids = engine.tokenize(body.sae_id, body.text)
        return TokenizeOut(tokens=engine.strs(ids), ids=ids.tolist())

    @app.post("/activations", response_model=FeatureActsOut)
    async def activations(body: FeatureActsIn) -> FeatureActsOut:
        sae = engine.sae(body.sae_id)
        if body.feature >= sae.cfg.d_sae:
            raise AppError(f"feature {body.feature} does not exist: {body.sae_id} has features 0 to {sae.cfg.d_sae - 1}", 404)
        ids, z = await engine.encode(body)
        v = z[:, body.feature]
        return FeatureActsOut(tokens=engine.strs(ids), values=v.tolist(), max_value=float(v.max()), max_pos=int(v.argmax()))

    @app.post("/top_features", response_model=TopFeaturesOut)
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

    @app.post("/token_features", response_model=TokenFeaturesOut)
    async def token_features(body: TokenFeaturesIn) -> TokenFeaturesOut:
        ids, z = await engine.encode(body)
        k = min(body.k, z.shape[1])
        top = z.topk(k, dim=1)
        per = [[FeatureHit(index=int(i), value=float(v), pos=t) for v, i in zip(vals, idx) if v > 0]
               for t, (vals, idx) in enumerate(zip(top.values, top.indices))]
        return TokenFeaturesOut(tokens=engine.strs(ids), per_token=per)

    @app.post("/steer", response_model=SteerOut, summary="steered and default continuations side by side")
    async def steer(body: SteerIn) -> SteerOut:
        return await interventions.steer(engine, body)

    @app.post("/ablate", response_model=AblateOut, summary="per-token effect of editing features on the next token")
    async def ablate(body: EditsIn) -> AblateOut:
        return await interventions.ablate(engine, body)

    @app.post("/attribute", response_model=AttributeOut, summary="features behind one next-token prediction")
    async def attribute(body: AttributeIn) -> AttributeOut:
        return await interventions.attribute(engine, body)

    @app.post("/explain", response_model=ExplainOut, summary="explain one feature from its stored examples with "
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

    from .graph_route import make_graph_router

    app.include_router(make_graph_router(engine))

    if chat is not None or engine is None:  # any OpenAI client can chat with the worker's model (greedy, unsteered)
        from saescope.precompute.explain.openai_route import make_chat_router

        app.include_router(make_chat_router(chat, model_name=chat_model_name(engine) if engine else "MODEL",
                                            max_tokens_limit=WORKER.chat_max_tokens))

    return app
