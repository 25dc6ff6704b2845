"""The dashboard application: FastAPI + Jinja2 + htmx over a read-only store, with an optional model worker."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import api, live, pages
from .cache import PageCache
from .errors import AppError
from .store import Store
from .templating import STATIC, page
from .worker_client import WorkerClient

log = logging.getLogger(__name__)


class CachedStatic(StaticFiles):
    """Static files whose URLs carry a content hash (?v=...), so they may be cached for a year."""

    async def get_response(self, path: str, scope) -> Response:
        resp = await super().get_response(path, scope)
        if resp.status_code == 200:
            resp.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return resp


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = e["loc"][-1] if e.get("loc") else "input"
        got = e.get("input")
        msg = e.get("msg", "is invalid").removeprefix("Value error, ")
        if e.get("type") == "literal_error":
            msg = msg.replace("Input should be", "must be")
        else:
            msg = msg.replace("Input should be", "must be").replace("Field required", "is required")
        parts.append(f"{where} {msg}" + (f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""))
    return "; ".join(parts)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith(("/api/", "/live/api")) or "application/json" in request.headers.get("accept", "") \
        and "text/html" not in request.headers.get("accept", "")


def _render_error(request: Request, err: AppError) -> Response:
    if _wants_json(request):
        return JSONResponse(err.as_json(), status_code=err.status)
    return page(request, "error.html", {"status": err.status, "title": err.title, "message": err.message,
                                        "link": err.link}, status=err.status)


def create_app(store_path: Path | str, worker_url: str | None = None, cache: bool = False, prewarm: bool = False):
    """The dashboard ASGI app; with cache=True wrapped in a whole-response cache for the precomputed pages,
    which prewarm=True fills in the background with every feature page's default view."""
    store = Store(store_path)
    cached: PageCache | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = None
        if cached is not None and prewarm:
            paths = [f"/sae/{s.sae_id}/feature/{i}" for s in store.saes() for i in range(s.d_sae)]
            task = asyncio.get_running_loop().create_task(cached.prewarm(paths))
        yield
        if task is not None:
            task.cancel()
        store.close()

    app = FastAPI(title="saescope", version="0.1.0", lifespan=lifespan,
                  description="Features of sparse autoencoders: precomputed dashboards and live inspection.")
    app.state.store = store
    app.state.worker = WorkerClient(worker_url) if worker_url else None
    app.mount("/static", CachedStatic(directory=STATIC), name="static")
    app.include_router(pages.router)
    app.include_router(live.router)
    app.include_router(api.router)

    @app.exception_handler(AppError)
    async def app_error(request: Request, err: AppError):
        return _render_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, err: RequestValidationError):
        return _render_error(request, AppError(_validation_message(err), 422))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        msg = f"no page at {request.url.path}" if err.status_code == 404 else str(err.detail)
        return _render_error(request, AppError(msg, err.status_code, link=("/", "all SAEs")))

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _render_error(request, AppError("something went wrong on the server; the log has the details", 500))

    if cache:
        cached = PageCache(app)
        return cached
    return app
