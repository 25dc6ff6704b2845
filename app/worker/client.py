"""The dashboard's client for the model worker: typed with the wire models, short timeouts, and one plain
message when the worker is not there (naming why, when the supervisor knows)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from ..errors import AppError
from ..settings import SERVE, WORKER
from .wire import (AblateOut, AttributeIn, ContrastIn, ContrastOut, SearchAllIn, SearchAllOut, AttributeOut, ChatSteerIn, ChatSteerOut, EditsIn, ExplainIn, ExplainOut, FeatureActsIn, FeatureActsOut,
                   HealthOut, PatchIn, PatchOut, SteerIn, SteerOut, TokenFeaturesIn, TokenFeaturesOut, TokenizeIn, TokenizeOut,
                   TopFeaturesIn, TopFeaturesOut)

DOWN_HINT = ("the model worker is unavailable ({why}); precomputed pages still work. Live inspection comes back by "
             "itself once the worker answers again (`saescope serve` restarts its own worker; a separate one is "
             "started with `saescope worker --store STORE`).")
Out = TypeVar("Out", bound=BaseModel)


class WorkerClient:
    def __init__(self, url: str, timeout_s: float = WORKER.client_timeout_s,
                 explain_down: Callable[[], str | None] | None = None, secret: str | None = None):
        """`explain_down`, when given, says why the worker is down (e.g. the supervisor's last exit reason);
        `secret` is sent with every request when the worker requires one."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=1.0), headers=headers)
        self._health: tuple[float, HealthOut | None, str] = (0.0, None, "not checked yet")
        self._lock = threading.Lock()
        self._explain_down = explain_down

    def _why(self, err: Exception) -> str:
        reason = self._explain_down() if self._explain_down else None
        return reason or _why(err, self.url)

    def health(self, max_age_s: float = SERVE.health_max_age_s) -> tuple[HealthOut | None, str]:
        """(health or None, why it is down); cached for max_age_s so pages stay fast."""
        t, h, why = self._health
        if time.monotonic() - t < max_age_s:
            return h, why
        try:
            r = self._client.get("/health", timeout=1.0)
            r.raise_for_status()
            res: tuple[HealthOut | None, str] = (HealthOut.model_validate(r.json()), "")
        except httpx.HTTPStatusError as err:
            res = (None, _status_why(err, self.url))
        except (httpx.HTTPError, ValidationError, ValueError) as err:
            res = (None, self._why(err))
        with self._lock:
            self._health = (time.monotonic(), *res)
        return res

    def _call(self, path: str, body: BaseModel, out: type[Out], timeout_s: float | None = None) -> Out:
        try:
            r = self._client.post(path, json=body.model_dump(exclude_none=True),
                                  **({"timeout": httpx.Timeout(timeout_s, connect=1.0)} if timeout_s else {}))
        except httpx.HTTPError as err:
            self._health = (0.0, None, "")
            raise AppError(DOWN_HINT.format(why=self._why(err)), 503, title="Model worker unavailable") from err
        if r.status_code >= 400:
            try:
                e = r.json()["error"]
                raise AppError(e["message"], r.status_code, title=e.get("title"))
            except (ValueError, KeyError, TypeError):
                raise AppError(f"the model worker answered {r.status_code}", 502) from None
        try:
            return out.model_validate(r.json())
        except (ValidationError, ValueError) as err:
            raise AppError(f"the model worker's answer to {path} does not match this dashboard's version ({err})",
                           502) from err

    def tokenize(self, body: TokenizeIn) -> TokenizeOut:
        return self._call("/tokenize", body, TokenizeOut)

    def activations(self, body: FeatureActsIn) -> FeatureActsOut:
        return self._call("/activations", body, FeatureActsOut)

    def top_features(self, body: TopFeaturesIn) -> TopFeaturesOut:
        return self._call("/top_features", body, TopFeaturesOut)

    def token_features(self, body: TokenFeaturesIn) -> TokenFeaturesOut:
        return self._call("/token_features", body, TokenFeaturesOut)

    def steer(self, body: SteerIn) -> SteerOut:
        return self._call("/steer", body, SteerOut)

    def ablate(self, body: EditsIn) -> AblateOut:
        return self._call("/ablate", body, AblateOut)

    def attribute(self, body: AttributeIn) -> AttributeOut:
        return self._call("/attribute", body, AttributeOut)

    def graph(self, body: "GraphIn") -> "GraphOut":
        """An attribution graph (the worker bounds its time; the client waits as long)."""
        from saescope.precompute.config import CIRCUIT

        from ..settings import GRAPH
        from .wire import GraphOut
        return self._call("/graph", body, GraphOut, timeout_s=CIRCUIT.max_seconds + GRAPH.client_grace_s)

    def graph_intervene(self, body: "GraphInterveneIn") -> "GraphInterveneOut":
        """Node interventions from a graph (three forward passes of the prompt)."""
        from .wire import GraphInterveneOut
        return self._call("/graph/intervene", body, GraphInterveneOut)

    def steer_chat(self, body: ChatSteerIn) -> ChatSteerOut:
        return self._call("/steer_chat", body, ChatSteerOut)

    def patch(self, body: PatchIn) -> PatchOut:
        return self._call("/patch", body, PatchOut)

    def contrast(self, body: ContrastIn) -> ContrastOut:
        """Features separating two small sets of texts (waits as long as the worker's own limit)."""
        return self._call("/contrast", body, ContrastOut, timeout_s=WORKER.contrast_timeout_s + 5)

    def search_all(self, body: SearchAllIn) -> SearchAllOut:
        """A prompt's top features across every SAE at chosen positions."""
        return self._call("/search_all", body, SearchAllOut)

    def explain(self, body: ExplainIn) -> ExplainOut:
        """One feature explained by the worker's model (waits up to the worker's own explanation time limit)."""
        return self._call("/explain", body, ExplainOut, timeout_s=WORKER.explain_timeout_s + 5)


def _status_why(err: httpx.HTTPStatusError, url: str) -> str:
    if err.response.status_code == 401:
        return (f"{url} requires a shared secret this dashboard does not have or has wrong; start `saescope serve` "
                f"with --worker-secret (or ${WORKER.secret_env}) set to the worker's")
    return f"{url} answered {err.response.status_code}"


def _why(err: Exception, url: str) -> str:
    if isinstance(err, httpx.ConnectError):
        return f"nothing answers at {url}"
    if isinstance(err, httpx.TimeoutException):
        return f"{url} did not answer in time"
    if isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)):
        return f"{url} closed the connection mid-request (did it crash?)"
    if isinstance(err, httpx.HTTPStatusError):
        return f"{url} answered {err.response.status_code}"
    return f"{type(err).__name__} talking to {url}"
