"""The dashboard application: FastAPI + Jinja2 + htmx over a read-only store, with an optional model worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from saescope.precompute.store import Store, StoreError

from saescope.precompute.errors import UnknownSAE, UserError

from ..errors import AppError, echo, validation_message
from ..settings import SERVE, VERSION
from ..worker.client import WorkerClient
from . import api, chat, contrast_pages, graph, live, live_api, maps, pages, patching
from . import diff as diff_pages
from .cache import PageCache, PageCacheMiddleware, cacheable_paths
from .lookups import warm_up, way_back
from .templates import STATIC, page, static_url

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
    links = [err.link] if err.link else []
    if err.status in (404, 422):  # a dead end: offer the SAE and the nearest feature the URL could have meant
        links += [ln for ln in way_back(request.app.state.store, request.url.path) if ln[0] not in {u for u, _ in links}]
    return page(request, "error.html", {"status": err.status, "title": err.title, "message": err.message,
                                        "link": err.link, "links": links}, status=err.status)


# Swagger UI for /docs, vendored from the npm package swagger-ui-dist 5.35.0 (Apache-2.0, static/swagger-ui-LICENSE.txt)
SWAGGER_JS, SWAGGER_CSS, SWAGGER_ICON = ("swagger-ui-bundle-5.35.0.js", "swagger-ui-5.35.0.css",
                                         "swagger-ui-favicon-32x32.png")
DESCRIPTION = "Features of sparse autoencoders: precomputed dashboards and live inspection."


ROUTERS = (pages.router, live.router, live_api.router, api.router, maps.router, graph.router, contrast_pages.router,
           patching.router, chat.router)


def create_app(store_path: Path | str, worker_url: str | None = None, cache: bool = False, prewarm: bool = False,
               explain_worker_down: Callable[[], str | None] | None = None,
               worker_secret: str | None = None) -> FastAPI:
    """The dashboard's FastAPI app; with cache=True a whole-response cache of the precomputed pages sits in front
    of its routes as middleware (kept at app.state.page_cache), which prewarm=True fills in the background with
    every feature page's default view."""
    store = Store(store_path)
    cached = PageCache(SERVE.cache_bytes, cacheable_paths(*ROUTERS)) if cache else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = None
        # what every page reads besides its own rows (vocabularies, map indexes), off the event loop: not pages
        warm = asyncio.get_running_loop().run_in_executor(None, warm_up, store)
        n_features = sum(s.d_sae for s in store.saes())
        if cached is not None and prewarm and n_features <= SERVE.prewarm_max_features:
            paths = [f"/sae/{s.sae_id}/feature/{i}" for s in store.saes() for i in range(s.d_sae)]
            task = asyncio.get_running_loop().create_task(cached.prewarm(paths, _app))
        elif cached is not None and prewarm:
            log.info("%d features: pages are rendered when first asked for (pre-rendering stops at %d)", n_features,
                     SERVE.prewarm_max_features)
        yield
        if task is not None:  # let the page being rendered finish before the store closes under it
            cached.stop()
            await asyncio.wait([task], timeout=SERVE.shutdown_wait_s)
        await asyncio.wait([warm], timeout=SERVE.shutdown_wait_s)
        store.close()

    # docs_url=None: /docs below serves Swagger UI from static/ (vendored swagger-ui-dist), so it works offline
    app = FastAPI(title="saescope", version=VERSION, lifespan=lifespan, description=DESCRIPTION, docs_url=None,
                  redoc_url=None)
    app.state.store = store
    app.state.worker = (WorkerClient(worker_url, explain_down=explain_worker_down, secret=worker_secret)
                        if worker_url else None)
    app.mount("/static", CachedStatic(directory=STATIC), name="static")
    app.state.page_cache = cached

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="saescope API",
                                   swagger_js_url=static_url(SWAGGER_JS), swagger_css_url=static_url(SWAGGER_CSS),
                                   swagger_favicon_url=static_url(SWAGGER_ICON))

    for router in ROUTERS:
        app.include_router(router)
    app.include_router(diff_pages.router)  # evidence pages: /diffs, /checks (HTML; not in the OpenAPI document)
    if cached is not None:
        app.add_middleware(PageCacheMiddleware, cache=cached)

    @app.exception_handler(AppError)
    async def app_error(request: Request, err: AppError):
        return _render_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, err: RequestValidationError):
        return _render_error(request, AppError(validation_message(err.errors()), 422))

    @app.exception_handler(UnknownSAE)
    async def unknown_sae(request: Request, err: UnknownSAE):
        return _render_error(request, AppError(str(err), 404, link=("/", "all SAEs")))

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        return _render_error(request, AppError(str(err), 422))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        msg = f"no page at {echo(request.url.path)}" if err.status_code == 404 else echo(str(err.detail))
        return _render_error(request, AppError(msg, err.status_code, link=("/", "all SAEs")))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, err: StoreError):
        log.error("store error on %s: %s", request.url.path, err)
        return _render_error(request, AppError(str(err), 500, title="Damaged store"))

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _render_error(request, AppError("something went wrong on the server; the log has the details", 500))

    return app
