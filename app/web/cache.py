"""An in-memory cache of whole GET responses for the precomputed pages, with optional background pre-rendering.

The store is opened read-only and never changes while it is served, so a rendered page is valid for the life
of the process. A route is cached only when it says so with @cacheable (pages of precomputed data); live
routes (/inspect, /live, random, the live API) do not, so a new page is uncached until it opts in. Bodies are kept gzipped
(sent as-is to clients that accept gzip, as browsers do); the cache is bounded in bytes, least-recently-used
pages go first. Hits are answered without leaving the event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar


log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)


def cacheable(endpoint: F) -> F:
    """Declare a GET route's response a pure function of its URL and the (read-only) store: the cache keeps it."""
    endpoint.cacheable = True  # type: ignore[attr-defined]
    return endpoint


def cacheable_paths(*routers) -> list[re.Pattern]:
    """The path patterns of every GET route that declared itself @cacheable in these routers."""
    return [r.path_regex for router in routers for r in router.routes
            if getattr(getattr(r, "endpoint", None), "cacheable", False) and "GET" in getattr(r, "methods", ())]


def cache_key(scope) -> tuple:
    """What a cached response depends on: the URL, whether htmx asked for a fragment (and which), JSON or HTML."""
    headers = dict(scope["headers"])
    return (scope["path"], scope["query_string"], headers.get(b"hx-request"), headers.get(b"hx-target"),
            b"json" in headers.get(b"accept", b""))


def _scope(path: str) -> dict:
    """A plain GET request for `path`, as a browser without htmx would send it (used to pre-render pages)."""
    return {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(b"host", b"prewarm")], "scheme": "http", "server": ("prewarm", 80),
            "client": ("127.0.0.1", 0), "http_version": "1.1", "root_path": "", "asgi": {"version": "3.0"}}


class PageCache:
    """The cached pages (gzipped, LRU, bounded in bytes) and their counters; served by PageCacheMiddleware, which
    create_app installs on the FastAPI app and keeps at app.state.page_cache."""

    def __init__(self, max_bytes: int, paths: list[re.Pattern]):
        """`paths`: patterns of the cacheable routes (see cacheable_paths)."""
        self.app = None  # the ASGI app below the cache, set by PageCacheMiddleware
        self.paths = paths
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self.prewarmed = False
        self._stopping = False
        self._pages: OrderedDict[tuple, tuple[int, list, bytes]] = OrderedDict()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/_cache":
            body = json.dumps({"pages": len(self._pages), "bytes": self.bytes, "hits": self.hits,
                               "misses": self.misses, "prewarmed": self.prewarmed}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] != "http" or scope["method"] != "GET" or not self.is_cacheable(scope):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = cache_key(scope)
        gz_ok = b"gzip" in headers.get(b"accept-encoding", b"")
        hit = self._pages.get(key)
        if hit is not None:
            self._pages.move_to_end(key)
            self.hits += 1
            status, hdrs, body = hit
            if gz_ok:
                hdrs = hdrs + [(b"content-encoding", b"gzip"), (b"content-length", str(len(body)).encode())]
            else:
                body = gzip.decompress(body)
                hdrs = hdrs + [(b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": hdrs + [(b"x-cache", b"hit")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.misses += 1
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body") and start.get("status") == 200:
                    hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    self._put(key, start["status"], hdrs, b"".join(chunks))
            await send(message)

        await self.app(scope, receive, capture)

    def is_cacheable(self, scope) -> bool:
        """Whether the route this request reaches declared itself @cacheable."""
        return any(p.match(scope["path"]) for p in self.paths)

    def _put(self, key: tuple, status: int, headers: list, body: bytes) -> None:
        body = gzip.compress(body, compresslevel=5)
        if len(body) > self.max_bytes // 8:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self.bytes -= len(old[2])
        self._pages[key] = (status, headers, body)
        self.bytes += len(body)
        while self.bytes > self.max_bytes and self._pages:
            _, (_, _, gone) = self._pages.popitem(last=False)
            self.bytes -= len(gone)

    def stop(self) -> None:
        """Ask a running prewarm to end after the page it is rendering."""
        self._stopping = True

    async def prewarm(self, paths: list[str], app=None) -> None:
        """Render `paths` through the app in the background (one at a time, yielding in between). `app`: the
        FastAPI app, put in each request's scope as Starlette does for real requests (routes read request.app)."""
        t0 = time.time()
        for done, path in enumerate(paths):
            if self._stopping:
                return
            if self.bytes > 0.8 * self.max_bytes:  # a huge SAE: keep room for pages people actually open
                log.info("pre-rendering stopped after %d of %d pages: the cache is 80%% full", done, len(paths))
                break
            scope = _scope(path)
            if app is not None:
                scope["app"] = app

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(_message):
                return None

            if cache_key(scope) not in self._pages:
                await self(scope, receive, send)  # through the cache, into the app below it
            await asyncio.sleep(0.002)  # leave room for real requests
        self.prewarmed = True
        log.info("pre-rendered %d pages in %.0f s (%.0f MB cached)", len(paths), time.time() - t0, self.bytes / 2**20)


class PageCacheMiddleware:
    """ASGI middleware answering cacheable GETs from a PageCache (app.add_middleware(PageCacheMiddleware, cache=...))."""

    def __init__(self, app, cache: PageCache):
        self.app = app
        self.cache = cache
        cache.app = app

    async def __call__(self, scope, receive, send):
        await self.cache(scope, receive, send)
