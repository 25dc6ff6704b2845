"""A 2-D map of all features: a seeded UMAP of the decoder directions, plus its browser encoding.

The map is computed once at precompute time. `random_state` is fixed, so umap-learn runs single-threaded
and a rebuild on the same machine gives the same coordinates bit for bit. Coordinates are float32 in
[0, 1]: one uniform scale for both axes (the aspect ratio of the layout is kept), the longer axis spans
[0, 1] and the shorter one is centred.

Features left out of the fit by `mask` (e.g. dead ones, whose decoder rows are untrained noise) still get
a point, so every feature appears exactly once: each is placed at the similarity-weighted mean of the map
positions of its `k` nearest fitted features by decoder cosine — the same rule umap-learn's `transform`
uses to initialise new points, without its extra optimisation.

The k-nearest-neighbour graph is computed exactly here (`exact_knn`: chunked matmul + top-k) and handed to
umap-learn as `precomputed_knn`, so pynndescent is neither compiled nor run: measured on 2 busy cores, a
4,608-feature map in a fresh process took 152 s with NN-descent and 22 s with the exact graph (after the ~50 s
JIT of umap-learn's own functions that the first fit in a process pays either way). `init="pca"` avoids the
spectral eigen-solve at no visible cost to neighbourhood preservation.
"""

from __future__ import annotations

import base64
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from .errors import UserError

log = logging.getLogger(__name__)

QUANT_MAX = 65535  # coordinates are quantised to uint16 for the browser


@dataclass(frozen=True)
class MapParams:
    """UMAP settings. `n_epochs=None` lets the size decide (see `epochs_for`)."""

    n_neighbors: int = 15
    min_dist: float = 0.05
    n_epochs: int | None = None
    init: str = "pca"  # "spectral" costs an eigen-solve on the kNN graph; "pca" is cheap and deterministic
    low_memory: bool = True
    seed: int = 0


DEFAULT_PARAMS = MapParams()


def epochs_for(n: int) -> int:
    """umap-learn's own rule: 500 epochs up to 10,000 points, 200 above (65,536 features: ~1.5 min warm)."""
    return 500 if n <= 10_000 else 200


def _as_numpy(w: Any) -> np.ndarray:
    if hasattr(w, "detach"):  # torch tensor
        w = w.detach().to("cpu").float().numpy()
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UserError(f"decoder weights must be 2-D (d_sae, d_in); got shape {w.shape}")
    if not np.isfinite(w).all():
        raise UserError("decoder weights contain NaN or inf; the map needs finite directions")
    return w


def _unit_rows(w: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.maximum(norms, 1e-12)


def normalise_coords(xy: np.ndarray) -> np.ndarray:
    """(n, 2) -> (n, 2) float32 in [0, 1] with one scale for both axes; the shorter axis is centred."""
    xy = np.asarray(xy, dtype=np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = float((hi - lo).max())
    if span <= 0:
        return np.full(xy.shape, 0.5, dtype=np.float32)
    out = (xy - lo) / span  # longer axis in [0, 1]
    out += (1.0 - (hi - lo) / span) / 2  # centre the shorter axis
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _place_excluded(unit: np.ndarray, fitted: np.ndarray, xy_fit: np.ndarray, k: int = 5,
                    chunk_bytes: int = 64 * 2**20) -> np.ndarray:
    """Map positions for rows not in the fit: similarity-weighted mean over their k nearest fitted rows."""
    out = np.empty((len(unit), 2), dtype=np.float64)
    k = min(k, len(fitted))
    chunk = max(1, chunk_bytes // (4 * len(fitted)))  # one (chunk, n_fit) float32 block of cosines
    for s in range(0, len(unit), chunk):
        sims = unit[s:s + chunk] @ fitted.T  # (c, n_fit)
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (c, k)
        w = np.maximum(np.take_along_axis(sims, idx, axis=1), 0) + 1e-6  # (c, k)
        out[s:s + chunk] = (w[:, :, None] * xy_fit[idx]).sum(1) / w.sum(1, keepdims=True)
    return out


def exact_knn(unit: np.ndarray, k: int, chunk_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows by cosine (unit rows), self first, as umap-learn's precomputed_knn wants them:
    (n, k) int64 indices and (n, k) float32 cosine distances 1 - cos, ascending; ties to the lower index.

    One (chunk, n) block of cosines at a time (torch matmul + topk): exact, and no pynndescent compile or run."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    n = len(x)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    chunk = max(1, chunk_bytes // (4 * n))
    with torch.no_grad():
        for s in range(0, n, chunk):
            sims = x[s:s + chunk] @ x.T  # (c, n)
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + s] = float("inf")  # self first, whatever round-off says
            kth = sims.topk(k, dim=1).values[:, -1:]  # (c, 1): everything >= it is a candidate (ties included)
            rr, cc = torch.nonzero(sims >= kth, as_tuple=True)
            vv = sims[rr, cc].numpy()
            rr, cc = rr.numpy(), cc.numpy()
            order = np.lexsort((cc, -vv, rr))  # by row, then similarity descending, then lower index
            rr, cc, vv = rr[order], cc[order], vv[order]
            rank = np.arange(len(rr)) - np.searchsorted(rr, rr)  # position within its row
            keep = rank < k
            i = np.empty((len(sims), k), dtype=np.int64)
            v = np.empty((len(sims), k), dtype=np.float32)
            i[rr[keep], rank[keep]] = cc[keep]
            v[rr[keep], rank[keep]] = vv[keep]
            v[:, 0] = 1.0
            idx[s:s + chunk] = i
            dist[s:s + chunk] = np.maximum(0.0, 1.0 - v)
    return idx, dist


_JIT_CACHED = False


def cache_umap_jit() -> None:
    """Make umap-learn's numba functions cache their machine code on disk, as saescope's own kernels do
    (cache=True): most of umap-learn's are compiled in every process otherwise (~190 s of a 16k-feature map
    measured on 2 busy cores, against ~80 s of layout epochs). The cache goes to $NUMBA_CACHE_DIR, else to
    saescope's cache folder (config.cache_dir()/numba), never into the installed package. Same code, same results.

    numba picks a function's cache folder when its cache is made, from numba.config.CACHE_DIR at that moment: the
    folder is set only while umap-learn's caches are made, then put back. (Set for the whole process, it moved the
    cache of every kernel imported later, e.g. co-occurrence's, so that they compiled again (~8 s in the main thread
    of a 16k-feature run, holding the GIL) whenever the map had started first.)"""
    global _JIT_CACHED
    if _JIT_CACHED:
        return
    import numba
    from numba.core.dispatcher import Dispatcher

    from .config import cache_dir

    import umap.layouts
    import umap.umap_
    import umap.utils

    before = numba.config.CACHE_DIR
    if not before:
        folder = cache_dir() / "numba"
        folder.mkdir(parents=True, exist_ok=True)
        numba.config.CACHE_DIR = str(folder)
    try:
        for mod in (umap.umap_, umap.layouts, umap.utils):
            for obj in vars(mod).values():
                if isinstance(obj, Dispatcher) and obj.__module__.startswith("umap") and \
                        obj._cache.__class__.__name__ == "NullCache":
                    obj.enable_caching()  # its cache folder is fixed here
    finally:
        numba.config.CACHE_DIR = before
    _JIT_CACHED = True


def build_feature_map(w_dec: Any, mask: np.ndarray | None = None, params: MapParams = DEFAULT_PARAMS) -> np.ndarray:
    """UMAP (metric cosine, seeded) of decoder rows -> (d_sae, 2) float32 coordinates in [0, 1].

    w_dec: (d_sae, d_in) array or tensor. mask: optional (d_sae,) bool, True = fit this feature; the others
    are placed next to their nearest fitted features (see the module docstring).
    """
    import umap  # umap-learn; imported here so importing this module stays cheap

    cache_umap_jit()

    w = _as_numpy(w_dec)  # (d_sae, d_in)
    d_sae = len(w)
    keep = np.ones(d_sae, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != (d_sae,):
        raise UserError(f"mask must have shape ({d_sae},) (one flag per feature); got {keep.shape}")
    n_fit = int(keep.sum())
    if n_fit < 4:
        raise UserError(f"the map needs at least 4 features to fit; the mask selects {n_fit} of {d_sae}")
    unit = _unit_rows(w)  # cosine geometry; unit rows also make pynndescent's cosine path cheaper
    n_neighbors = min(params.n_neighbors, n_fit - 1)
    n_epochs = params.n_epochs or epochs_for(n_fit)
    t0 = time.perf_counter()
    knn = exact_knn(unit[keep], n_neighbors)  # exact, instead of compiling and running NN-descent
    reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=n_neighbors, min_dist=params.min_dist,
                        n_epochs=n_epochs, init=params.init, low_memory=params.low_memory,
                        random_state=params.seed, transform_seed=params.seed, verbose=False,
                        precomputed_knn=(knn[0], knn[1], None))
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": single-threaded by design
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)  # no transform()
        xy_fit = reducer.fit_transform(unit[keep]).astype(np.float64)  # (n_fit, 2)
    log.info("feature map: UMAP of %d features (n_neighbors=%d, n_epochs=%d, init=%s) in %.1f s",
             n_fit, n_neighbors, n_epochs, params.init, time.perf_counter() - t0)
    xy = np.empty((d_sae, 2), dtype=np.float64)
    xy[keep] = xy_fit
    if n_fit < d_sae:
        xy[~keep] = _place_excluded(unit[~keep], unit[keep], xy_fit)
    return normalise_coords(xy)


def map_neighbours(coords: np.ndarray, k: int = 10, features: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest features on the map (2-D Euclidean, self excluded, ties by lower index).

    coords: (d_sae, 2). features: which features to answer for (default all). Returns ids (q, k) int32 and
    distances (q, k) float32, nearest first.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    d_sae = len(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise UserError(f"coords must have shape (d_sae, 2); got {coords.shape}")
    if not 1 <= k < d_sae:
        raise UserError(f"k must be between 1 and d_sae - 1 = {d_sae - 1}; got {k}")
    q = np.arange(d_sae) if features is None else np.asarray(features, dtype=np.int64).reshape(-1)
    if q.size and (q.min() < 0 or q.max() >= d_sae):
        raise UserError(f"feature ids must be in [0, {d_sae}); got {q.min()}..{q.max()}")
    # take a few extra so that self and ties at the boundary are resolved exactly below
    extra = min(d_sae, k + 1 + 8)
    dist, idx = cKDTree(coords).query(coords[q], k=extra)  # (q, extra)
    dist = np.where(idx == q[:, None], np.inf, dist)  # drop self
    order = np.lexsort((idx, dist), axis=1)  # by distance, then lower index
    idx = np.take_along_axis(idx, order, 1)[:, :k]
    dist = np.take_along_axis(dist, order, 1)[:, :k]
    return idx.astype(np.int32), dist.astype(np.float32)


# ---------------------------------------------------------------- browser encoding
def encode_coords(coords: np.ndarray) -> dict[str, Any]:
    """Coordinates -> a compact JSON-able payload: x, y quantised to uint16, interleaved, little-endian, base64.

    In the browser:  const b = Uint8Array.from(atob(p.xy), c => c.charCodeAt(0));
                     const q = new Uint16Array(b.buffer);  // x_i = q[2i] / p.scale, y_i = q[2i+1] / p.scale
    The resolution is 1/65535 of the map, far below a pixel at any useful zoom.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise UserError(f"coords must have shape (n, 2); got {coords.shape}")
    if not np.isfinite(coords).all() or coords.min() < 0 or coords.max() > 1:
        raise UserError("coords must be finite and in [0, 1] (use normalise_coords first)")
    q = np.rint(coords * QUANT_MAX).astype("<u2")  # (n, 2)
    return {"n": int(len(coords)), "scale": QUANT_MAX, "xy": base64.b64encode(q.tobytes()).decode("ascii")}


def decode_coords(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_coords` (to 1/65535): payload -> (n, 2) float32."""
    raw = np.frombuffer(base64.b64decode(payload["xy"]), dtype="<u2")
    if raw.size != 2 * payload["n"]:
        raise UserError(f"payload holds {raw.size // 2} points but says n={payload['n']}")
    return (raw.reshape(-1, 2).astype(np.float32) / np.float32(payload["scale"]))
