"""The dashboard's client for the model worker: short timeouts, and one plain message when it is not there."""

from __future__ import annotations

import threading
import time

import httpx

from .errors import AppError

DOWN_HINT = ("the model worker is unavailable ({why}); precomputed pages still work. Live inspection comes back by "
             "itself once the worker answers again (it is started by `saescope serve`, or run `saescope worker --store STORE`).")


class WorkerClient:
    def __init__(self, url: str, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=1.0))
        self._health: tuple[float, dict | None, str] = (0.0, None, "not checked yet")
        self._lock = threading.Lock()

    def health(self, max_age_s: float = 2.0) -> tuple[dict | None, str]:
        """(health JSON or None, why it is down); cached for max_age_s so pages stay fast."""
        t, h, why = self._health
        if time.monotonic() - t < max_age_s:
            return h, why
        try:
            r = self._client.get("/health", timeout=1.0)
            r.raise_for_status()
            res: tuple[dict | None, str] = (r.json(), "")
        except httpx.HTTPError as err:
            res = (None, _why(err, self.url))
        with self._lock:
            self._health = (time.monotonic(), *res)
        return res

    def post(self, path: str, body: dict) -> dict:
        try:
            r = self._client.post(path, json=body)
        except httpx.HTTPError as err:
            self._health = (0.0, None, "")
            raise AppError(DOWN_HINT.format(why=_why(err, self.url)), 503, title="Model worker unavailable") from err
        if r.status_code >= 400:
            try:
                e = r.json()["error"]
                raise AppError(e["message"], r.status_code, title=e.get("title"))
            except (ValueError, KeyError, TypeError):
                raise AppError(f"the model worker answered {r.status_code}", 502) from None
        return r.json()


def _why(err: Exception, url: str) -> str:
    if isinstance(err, httpx.ConnectError):
        return f"nothing answers at {url}"
    if isinstance(err, httpx.TimeoutException):
        return f"{url} did not answer in time"
    if isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)):
        return f"{url} closed the connection mid-request (did it crash?)"
    return f"{type(err).__name__} talking to {url}"
