"""The worker's HTTP API: JSON in and out (pydantic wire models), errors in the project's one format.

create_worker_app assembles it: error handlers, the shared-secret check, and one router per module:
activations (/health, /tokenize, /activations, /top_features, /token_features), interventions (/steer, /ablate,
/attribute), contrast (/contrast, /search_all), explain (/explain and the OpenAI-compatible chat route of app/worker/chat.py).
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import AppError, validation_message
from ...settings import VERSION
from ..batcher import Engine
from . import activations, contrast, explain, graph, interventions

DESCRIPTION = ("Live SAE feature activations over a small JSON API, with dynamic batching; feature explanations "
               "and an OpenAI-compatible chat route (/v1/chat/completions) for the worker's own model.")


def create_worker_app(engine: Engine, secret: str | None = None) -> FastAPI:
    """The worker's ASGI app. With `secret`, every request must carry `Authorization: Bearer <secret>`.
    engine=None builds the app for its OpenAPI document only."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield

    app = FastAPI(title="saescope model worker", version=VERSION, lifespan=lifespan, description=DESCRIPTION)
    chat = explain.chat_backend(engine)

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

    app.include_router(activations.make_router(engine, chat_model=explain.chat_model_name(engine)
                                               if chat is not None else None))
    app.include_router(interventions.make_router(engine))
    app.include_router(explain.make_router(engine, chat))
    graph_router = graph.make_graph_router(engine)  # POST /graph (+ /graph/intervene): attribution graphs
    app.state.graph_cache = graph_router.graph_cache  # the unpruned graphs it keeps (LRU)
    app.include_router(graph_router)
    app.include_router(contrast.make_router(engine))  # POST /contrast, POST /search_all
    if chat is not None or engine is None:  # any OpenAI client can chat with the worker's model (greedy, unsteered)
        app.include_router(explain.make_chat_routes(engine, chat))
    return app
