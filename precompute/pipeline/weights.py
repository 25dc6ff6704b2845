"""The weights-only tables, computed beside the stream instead of after it (issue 19).

Logit effects and decoder-cosine neighbours of every SAE (logits.py) need only the weights, so `WeightsWork`
starts them in a background thread when the run starts, while the stream (or the Ray tasks) run; the feature
map (featuremap.py, single-threaded UMAP) needs only the weights and which features are live, known once the
stream is sealed, so it starts then, beside the feature ranges. Publish takes the results (`logits`, `map`),
waiting for whatever is unfinished.

Same functions, same inputs, same results: the background thread uses `torch_threads` intra-op threads
(PRECOMPUTE.weights_threads, 1: the stream keeps its own threads) until the stream is done (`stream_done`), then as
many as the run's thread; float32 products were measured bit for bit
equal under 1 and 2 threads, and tests/test_pipeline.py compares a run's tables with the functions called directly.
The quality metrics that need only the weights (quality.weight_metrics: each encoder and decoder direction's largest
cosine with another) follow each SAE's logit effects in the same thread, so quality after the stream only runs the
model. Each SAE's logit effects and neighbours (and those metrics) are saved under OUT.work/weights/ when done (atomic rename), so a
resumed run (kill -9, or a stop) loads them instead of recomputing. A failure in the thread is raised by the
call that wants its result; `cancel()` (the driver calls it when the run stops early) makes the thread stop at
its next chunk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PRECOMPUTE
from ..logits import Cancelled, logit_effects, nearest_features
from ..quality import WEIGHT_METRICS, weight_metrics
from ..models import HookedLM
from .loading import LoadedSAE

log = logging.getLogger(__name__)
P = PRECOMPUTE
LOGIT_KEYS = ("pos_ids", "pos_vals", "neg_ids", "neg_vals", "hist", "hist_lo", "hist_hi", "mean")
FromWeights = tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]


def from_weights(lm: HookedLM, x: LoadedSAE, stop=None) -> FromWeights:
    """Logit effects and decoder-cosine neighbours of one SAE (small (d_sae, n) arrays)."""
    W_dec = x.sae.W_dec.detach().cpu()
    if x.sae.cfg.normalize_activations != "none":
        log.info("the SAE normalizes its input; logit effects use the raw decoder directions")
    logits = logit_effects(W_dec, lm.unembedding().detach().cpu(), lm.final_norm_gain(), n=P.n_logits, stop=stop)
    return logits, nearest_features(W_dec, n=P.n_neighbours, stop=stop)


def live_mask(counts: np.ndarray) -> np.ndarray | None:
    """The features the map is fitted on: the live ones (counts > 0), or all when fewer than map_min_live are."""
    live = counts > 0
    return live if live.sum() >= P.map_min_live else None


def feature_map(x: LoadedSAE, mask: np.ndarray | None) -> np.ndarray:
    from ..featuremap import build_feature_map

    log.info("building the feature map of %s (UMAP of %d decoder directions)", x.sae_id, x.sae.cfg.d_sae)
    return build_feature_map(x.sae.W_dec.detach().cpu().float().numpy(), mask=mask)


class _Job:
    """One background thread running fn(); result() joins it and returns (or raises) what fn did."""

    def __init__(self, name: str, fn):
        self.value: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0

        def run():
            t0 = time.perf_counter()
            try:
                self.value = fn()
            except BaseException as err:  # handed to the caller of result()
                self.error = err
            self.seconds = time.perf_counter() - t0

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def result(self) -> Any:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


class _Control:
    """The `stop` logits.py checks between chunks (in the worker thread): is_set() says whether to stop, and once
    `boost` is set (the stream is done) it first gives the worker thread `after` torch threads."""

    def __init__(self, after: int):
        self.stop, self.boost, self.after, self._boosted = threading.Event(), threading.Event(), after, False

    def is_set(self) -> bool:
        if self.boost.is_set() and not self._boosted:
            torch.set_num_threads(self.after)  # this (the worker) thread's intra-op threads
            self._boosted = True
        return self.stop.is_set()


class WeightsWork:
    """Background computation of every SAE's weights-only tables (module docstring)."""

    def __init__(self, lm: HookedLM, loaded: list[LoadedSAE], folder: Path, torch_threads: int = P.weights_threads,
                 quality: bool = True, beside_stream: bool = True):
        self.lm, self.loaded, self.folder = lm, loaded, Path(folder)
        self.quality = quality  # also the quality metrics that need only the weights (quality.weight_metrics)
        self.torch_threads = torch_threads
        self.control = _Control(torch.get_num_threads())  # the caller's thread count once the stream is done
        self.stop = self.control.stop
        self._maps: _Job | None = None
        self._weight_metrics: dict[int, dict[str, float]] = {}
        self._logits: _Job | None = None
        if beside_stream:
            self._logits = _Job("saescope-weights", self._all_from_weights)

    def _path(self, i: int) -> Path:
        return self.folder / f"sae-{i}.npz"

    def _all_from_weights(self) -> list[FromWeights]:
        torch.set_num_threads(self.torch_threads)  # this thread's intra-op threads only
        out = []
        for i, x in enumerate(self.loaded):
            p = self._path(i)
            if p.exists():
                with np.load(p) as z:
                    out.append(({k: z[k] for k in LOGIT_KEYS}, (z["nb_ids"], z["nb_sims"])))
                    self._weight_metrics[i] = {k: float(z[k]) for k in WEIGHT_METRICS if k in z}
                continue
            t0 = time.perf_counter()
            with torch.no_grad():
                logits, (ids, sims) = from_weights(self.lm, x, self.control)
                if self.control.is_set():
                    raise Cancelled
                wm = weight_metrics(x.sae) if self.quality else {}
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp.npz")
            np.savez(tmp, nb_ids=ids, nb_sims=sims, **logits, **{k: np.float64(v) for k, v in wm.items()})
            os.replace(tmp, p)
            log.info("logit effects and neighbours of %s in %.1f s (beside the stream)", x.sae_id,
                     time.perf_counter() - t0)
            out.append((logits, (ids, sims)))
            self._weight_metrics[i] = wm
        return out

    def stream_done(self) -> None:
        """The stream has ended: from its next chunk on, the logits thread uses as many torch threads as the run
        (or it starts now, with those threads, when it was not started beside the stream)."""
        self.control.boost.set()
        if self._logits is None:
            self.torch_threads = self.control.after
            self._logits = _Job("saescope-weights", self._all_from_weights)

    def start_maps(self, masks: list[np.ndarray | None]) -> None:
        """The feature map of every SAE, in a second background thread (masks: live_mask per SAE)."""
        def run():
            return [feature_map(x, m) for x, m in zip(self.loaded, masks)]

        self._maps = _Job("saescope-map", run)

    def logits(self) -> list[FromWeights]:
        """Per SAE (logit effects, (neighbour ids, sims)); waits for the thread."""
        if self._logits is None:
            self.stream_done()
        return self._logits.result()

    def quality_from_weights(self) -> list[dict[str, float] | None]:
        """Per SAE its quality.weight_metrics (None where not computed, e.g. a resumed run's older files); waits."""
        self.logits()
        return [self._weight_metrics.get(i) or None for i in range(len(self.loaded))]

    def maps(self) -> list[np.ndarray] | None:
        """Per SAE its map coordinates (None when start_maps was not called); waits for the thread."""
        return self._maps.result() if self._maps is not None else None

    def seconds(self, which: str) -> float:
        """How long the thread "logits" or "map" ran (0 when it did not)."""
        job = self._logits if which == "logits" else self._maps
        return job.seconds if job is not None else 0.0

    def cancel(self) -> None:
        """Stop the threads (at their next chunk; a map in progress runs to its end) and wait for them."""
        self.stop.set()
        for job in (self._logits, self._maps):
            if job is not None:
                job.thread.join()
