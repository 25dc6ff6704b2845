"""The feature map: every feature of an SAE as a point of a 2-D map (UMAP of decoder directions, built at
precompute time by precompute.featuremap), drawn in the browser by static/map.js on one canvas.

The JSON payload is compact and binary-in-base64 so that 65,536 features stay light: coordinates as uint16
(precompute.featuremap.encode_coords) and each colouring as one uint8 per feature. Top tokens are not in it;
the page fetches them per hovered feature from /api/saes/{id}/list?f=N. The feature page shows the map
neighbourhood of its feature as a small server-side SVG (see `neighbourhood`).
"""

from __future__ import annotations

import base64
import math
import shlex
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from saescope.precompute.featuremap import QUANT_MAX, encode_coords
from saescope.precompute.store import Feature, SAEInfo, Store

from ..settings import MAP
from .cache import cacheable
from .lookups import check_index
from .templates import page
from .tokens import visible


Color = Literal["density", "max_act"]

router = APIRouter()


def _store(request: Request) -> Store:
    return request.app.state.store


# ---------------------------------------------------------------- payload
class ColorScale(BaseModel):
    codes: str = Field(description="one uint8 per point, base64; 0 = no value (dead), 1..255 = lo..hi linearly")
    lo: float = Field(description="value at code 1")
    hi: float = Field(description="value at the highest colour code")
    log10: bool = Field(description="whether lo/hi (and the linear scale) are log10 of the value")
    label: str = Field(description="what the colour shows")


class MapOut(BaseModel):
    sae_id: str = Field(description="SAE id")
    d_sae: int = Field(description="features of the SAE")
    n: int = Field(description="points on the map (every feature once when the map is complete; 0 = no map)")
    scale: int = Field(description="x_i = xy[2i] / scale, y_i = xy[2i+1] / scale, both in [0, 1]")
    xy: str = Field(description="uint16 little-endian (x, y) pairs, interleaved, base64")
    features: str | None = Field(description="uint32 little-endian feature id of each point, base64; "
                                             "null when point i is feature i")
    colors: dict[str, ColorScale] = Field(description="colourings by name: density (log10), max_act")


def _codes(values: np.ndarray, lo: float, hi: float, valid: np.ndarray) -> str:
    """Values -> uint8 codes 1..levels over [lo, hi] (0 where not valid), base64."""
    span = hi - lo if hi > lo else 1.0
    q = 1 + np.rint(np.clip((values - lo) / span, 0, 1) * (MAP.levels - 1))
    return base64.b64encode(np.where(valid, q, 0).astype(np.uint8).tobytes()).decode("ascii")


def map_payload(sae_id: str, d_sae: int, points: dict[str, list]) -> MapOut:
    """Store.map_points(...) -> the browser payload: uint16 coordinates and uint8 colour codes.

    Density is coloured by log10 over the range of the SAE's live features (code 0 = dead); max activation
    linearly over [0, max]. Coordinates outside [0, 1] are clipped and non-finite ones left out (the map builder
    writes neither).
    """
    xy = np.column_stack([np.asarray(points["x"], dtype=np.float64),
                          np.asarray(points["y"], dtype=np.float64)]).reshape(-1, 2)  # (n, 2)
    ok = np.isfinite(xy).all(1)  # a NaN position (never written by the map builder) is left off the map
    xy = np.clip(xy[ok], 0.0, 1.0)
    feats = np.asarray(points["feature"], dtype=np.int64)[ok]  # (n,)
    n = len(feats)
    enc = encode_coords(xy) if n else {"scale": QUANT_MAX, "xy": ""}
    dens = np.asarray(points["density"], dtype=np.float64)[ok]  # (n,)
    mx = np.asarray(points["max_act"], dtype=np.float64)[ok]  # (n,)
    live = dens > 0
    with np.errstate(divide="ignore"):
        ld = np.where(live, np.log10(np.where(live, dens, 1.0)), 0.0)
    d_lo, d_hi = (float(ld[live].min()), float(ld[live].max())) if live.any() else (0.0, 0.0)
    m_hi = float(mx.max()) if n and mx.max() > 0 else 0.0
    colors = {
        "density": ColorScale(codes=_codes(ld, d_lo, d_hi, live), lo=d_lo, hi=d_hi, log10=True,
                              label="density (share of tokens, log scale)"),
        "max_act": ColorScale(codes=_codes(mx, 0.0, m_hi, mx > 0), lo=0.0, hi=m_hi, log10=False,
                              label="max activation"),
    }
    contiguous = bool(n == 0 or np.array_equal(feats, np.arange(n)))
    ids = None if contiguous else base64.b64encode(feats.astype("<u4").tobytes()).decode("ascii")
    return MapOut(sae_id=sae_id, d_sae=d_sae, n=n, scale=enc["scale"], xy=enc["xy"], features=ids, colors=colors)


def _payload(request: Request, sae: SAEInfo) -> MapOut:
    """The payload of one SAE, built once per app (the store is read-only while served)."""
    memo = getattr(request.app.state, "map_payloads", None)
    if memo is None:
        memo = request.app.state.map_payloads = {}
    if sae.sae_id not in memo:
        memo[sae.sae_id] = map_payload(sae.sae_id, sae.d_sae, _store(request).map_points(sae.sae_id))
    return memo[sae.sae_id]


def build_command(store: Store, sae: SAEInfo) -> str:
    """The precompute command that rebuilds this SAE's tables, map included."""
    q = shlex.quote
    return (f"saescope precompute --model {q(sae.model_path)} --sae {q(sae.sae_path)} --sae-id {q(sae.sae_id)} "
            f"--dataset {q(sae.dataset)} --tokens {sae.n_tokens} --context-len {sae.context_len} "
            f"--out {q(str(store.path))}")


# ---------------------------------------------------------------- routes
@router.get("/api/saes/{sae_id}/map", response_model=MapOut, tags=["store"],
            summary="the feature map: every feature's 2-D position and colour codes, compactly encoded")
@cacheable
def api_map(request: Request, sae_id: str):
    return _payload(request, _store(request).require_sae(sae_id))


@router.get("/sae/{sae_id}/map", response_class=HTMLResponse)
@cacheable
def map_page(request: Request, sae_id: str, color: Color = "density",
             x: float = Query(0.5, ge=0, le=1, description="map x at the centre of the view"),
             y: float = Query(0.5, ge=0, le=1, description="map y at the centre of the view"),
             zoom: float = Query(MAP.min_zoom, ge=MAP.min_zoom, le=MAP.max_zoom, description="1 = the whole map"),
             f: int | None = Query(None, ge=0, description="the feature marked on the map")):
    store = _store(request)
    sae = store.require_sae(sae_id)
    if f is not None:
        check_index(sae, f)
    payload = _payload(request, sae)
    return page(request, "map.html", {
        "sae": sae, "n": payload.n, "color": color, "x": x, "y": y, "zoom": zoom, "f": f, "map": MAP,
        "given": {k for k in ("x", "y", "zoom") if k in request.query_params},
        "build_command": build_command(store, sae),
    })


# ---------------------------------------------------------------- the feature page's neighbourhood
@dataclass
class NearPoint:
    index: int
    cx: float  # SVG coordinates in the viewBox
    cy: float
    title: str  # "feature 12 · tok, tok" (escaped by the template)
    me: bool


@dataclass
class Neighbourhood:
    points: list[NearPoint]  # the current feature last, so it is drawn on top
    width: int
    height: int
    map_url: str  # the full map, centred on the feature


def neighbourhood(store: Store, sae: SAEInfo, f: Feature, k: int = MAP.neighbourhood_k) -> Neighbourhood | None:
    """The k nearest features to `f` on the map, laid out in an SVG viewBox (None when `f` has no map position)."""
    if f.map_xy is None:
        return None
    index = f.index
    near = store.map_neighbourhood(sae.sae_id, index, k)  # [(feature, x, y)], itself first
    mine = [p for p in near if p[0] == index]  # another feature at the very same spot may sort first
    near = mine + [p for p in near if p[0] != index]
    if not mine:
        return None
    ids = [int(j) for j, _, _ in near]
    rows = store.features_by_index(sae.sae_id, ids)
    xs = np.array([p[1] for p in near], dtype=np.float64)
    ys = np.array([p[2] for p in near], dtype=np.float64)
    pad = 12.0
    span = max(float(xs.max() - xs.min()), float(ys.max() - ys.min()), 1e-9)
    s = min((MAP.svg_w - 2 * pad) / span, (MAP.svg_h - 2 * pad) / span)  # one scale for both axes
    cx0 = MAP.svg_w / 2 - s * (xs.max() + xs.min()) / 2
    cy0 = MAP.svg_h / 2 - s * (ys.max() + ys.min()) / 2
    pts = []
    for j, x, y in near:
        toks = rows[j].top_tokens[:5] if j in rows else []
        title = f"feature {j}" + (" · " + "  ".join(visible(t) for t in toks) if toks else "")
        pts.append(NearPoint(int(j), round(cx0 + s * x, 2), round(cy0 + s * y, 2), title, j == index))
    pts = pts[1:] + pts[:1]
    span_zoom = min(MAP.max_zoom, max(MAP.min_zoom, 0.5 / span))  # about the neighbourhood's size
    x0, y0 = near[0][1], near[0][2]
    map_url = (f"/sae/{sae.sae_id}/map?f={index}&x={_r(x0)}&y={_r(y0)}&zoom={_r(span_zoom)}")
    return Neighbourhood(pts, MAP.svg_w, MAP.svg_h, map_url)


def _r(v: float) -> str:
    """A view number as the URL writes it: 4 decimals, no trailing zeros."""
    return f"{v:.4f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"
