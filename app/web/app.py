"""The dashboard application: FastAPI + Jinja2 + htmx over a read-only store, with an optional model worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from saescope.precompute.store import Store, StoreError

from ..errors import AppError, validation_message
from ..settings import SERVE, VERSION
from ..worker.client import WorkerClient
from . import api, chat, live, maps, pages, patching
from .cache import PageCache, cacheable_paths
from .lookups import warm_up
from .templates import STATIC, page

log = logging.getLogger(__name__)


class CachedStatic(StaticFiles):
    """Static files whose URLs carry a content hash (?v=...), so they may be cached for a year."""

    async def get_response(self, path: str, scope) -> Response:
        resp = await super().get_response(path, scope)
        if resp.status_code == 200:
            resp.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return resp


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith(("/api/", "/live/api")) or "application/json" in request.headers.get("accept", "") \
        and "text/html" not in request.headers.get("accept", "")


def _render_error(request: Request, err: AppError) -> Response:
    if _wants_json(request):
        return JSONResponse(err.as_json(), status_code=err.status)
    return page(request, "error.html", {"status": err.status, "title": err.title, "message": err.message,
                                        "link": err.link}, status=err.status)


DESCRIPTION = "Features of sparse autoencoders: precomputed dashboards and live inspection."


def create_app(store_path: Path | str, worker_url: str | None = None, cache: bool = False, prewarm: bool = False,
               explain_worker_down: Callable[[], str | None] | None = None, worker_secret: str | None = None):
    """The dashboard ASGI app; with cache=True wrapped in a whole-response cache for the precomputed pages,
    which prewarm=True fills in the background with every feature page's default view."""
    store = Store(store_path)
    cached: PageCache | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = None
        # what every page reads besides its own rows (vocabularies, map indexes), off the event loop: not pages
        warm = asyncio.get_running_loop().run_in_executor(None, warm_up, store)
        n_features = sum(s.d_sae for s in store.saes())
        if cached is not None and prewarm and n_features <= SERVE.prewarm_max_features:
            paths = [f"/sae/{s.sae_id}/feature/{i}" for s in store.saes() for i in range(s.d_sae)]
            task = asyncio.get_running_loop().create_task(cached.prewarm(paths))
        elif cached is not None and prewarm:
            log.info("%d features: pages are rendered when first asked for (pre-rendering stops at %d)", n_features,
                     SERVE.prewarm_max_features)
        yield
        if task is not None:  # let the page being rendered finish before the store closes under it
            cached.stop()
            await asyncio.wait([task], timeout=SERVE.shutdown_wait_s)
        await asyncio.wait([warm], timeout=SERVE.shutdown_wait_s)
        store.close()

    app = FastAPI(title="saescope", version=VERSION, lifespan=lifespan, description=DESCRIPTION)
    app.state.store = store
    app.state.worker = (WorkerClient(worker_url, explain_down=explain_worker_down, secret=worker_secret)
                        if worker_url else None)
    app.mount("/static", CachedStatic(directory=STATIC), name="static")
    app.include_router(pages.router)
    app.include_router(live.router)
    app.include_router(api.router)
    app.include_router(maps.router)
    app.include_router(patching.router)
    app.include_router(chat.router)

    @app.exception_handler(AppError)
    async def app_error(request: Request, err: AppError):
        return _render_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, err: RequestValidationError):
        return _render_error(request, AppError(validation_message(err.errors()), 422))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        msg = f"no page at {request.url.path}" if err.status_code == 404 else str(err.detail)
        return _render_error(request, AppError(msg, err.status_code, link=("/", "all SAEs")))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, err: StoreError):
        log.error("store error on %s: %s", request.url.path, err)
        return _render_error(request, AppError(str(err), 500, title="Damaged store"))

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _render_error(request, AppError("something went wrong on the server; the log has the details", 500))

    if cache:
        cached = PageCache(app, SERVE.cache_bytes, cacheable_paths(pages.router, live.router, api.router, maps.router))
        return cached
    return app
