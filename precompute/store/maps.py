"""The Store's map questions: every feature's 2-D position, and a feature's neighbourhood on the map."""

from __future__ import annotations

import numpy as np


class MapQueries:
    """Mixed into read.Store, which provides _q, _np, _lock and the _maps cache."""

    def map_points(self, sae_id: str) -> dict[str, list]:
        """Every feature's 2-D map position with what the map colours by, in feature order (empty lists when the
        store has no map): feature, x, y, density, max_act."""
        rows = self._q("""SELECT feature, map_x, map_y, density, max_act FROM features
                          WHERE sae_id = ? AND map_x IS NOT NULL ORDER BY feature""", [sae_id])
        cols = ("feature", "x", "y", "density", "max_act")
        return {c: [r[i] for r in rows] for i, c in enumerate(cols)}

    def map_neighbourhood(self, sae_id: str, index: int, k: int) -> list[tuple[int, float, float]]:
        """The k features nearest to `index` on the map, itself first: (feature, x, y); [] when it has no point.

        Order: squared distance in float32 (REAL) arithmetic, ties by the lower feature, as the SQL
        `ORDER BY (map_x - x0) * (map_x - x0) + (map_y - y0) * (map_y - y0), feature` would give; computed in
        memory over the SAE's map index (one vectorised pass over its points, no scan of the table)."""
        feat, xs, ys = self._map_index(sae_id)
        at = np.searchsorted(feat, index)
        if at >= len(feat) or feat[at] != index:
            return []
        x0, y0 = xs[at], ys[at]
        dx, dy = xs - x0, ys - y0
        d = dx * dx + dy * dy  # (n,) float32
        m = min(k + 1, len(d))
        if m < len(d):  # everything within the m-th smallest distance (ties at the boundary included)
            cand = np.flatnonzero(d <= np.partition(d, m - 1)[m - 1])
        else:
            cand = np.arange(len(d))
        take = cand[np.lexsort((feat[cand], d[cand]))][:m]
        return [(int(feat[j]), float(xs[j]), float(ys[j])) for j in take]

    def _map_index(self, sae_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feature ids ascending, map x, map y as float32) of the SAE's features with a map point, read once."""
        with self._lock:
            hit = self._maps.get(sae_id)
        if hit is None:
            r = self._np("""SELECT feature, map_x, map_y FROM features
                            WHERE sae_id = ? AND map_x IS NOT NULL AND map_y IS NOT NULL ORDER BY feature""", [sae_id])
            hit = (np.asarray(r["feature"], np.int64), np.asarray(r["map_x"], np.float32),
                   np.asarray(r["map_y"], np.float32))
            with self._lock:
                self._maps[sae_id] = hit
        return hit
