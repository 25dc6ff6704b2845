"""The activation-patching page (/patch) and its JSON twin (/api/patch): two prompts, a metric, and a position x
feature heatmap of how much of the clean-corrupted difference each patch of SAE latents moves, measured for real,
with the attribution-patching estimate beside it. The URL holds the whole experiment, so a link reproduces it.
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup, escape

from ..errors import AppError, echo
from ..settings import SERVE, WORKER
from ..worker.wire import PatchIn, PatchOut
from .format import fmt
from .live_views import client_of as _client, worker_status
from .lookups import check_index, sae_or_first
from .pages import store_of
from .templates import page
from .tokens import visible

router = APIRouter()
MAX_PROMPT_CHARS = SERVE.max_prompt_chars
ALIGN_RE = re.compile(r"^\s*(\d{1,6})\s*:\s*(\d{1,6})\s*$")


def parse_align(spec: str) -> list[tuple[int, int]] | None:
    """'0:0,1:1,3:5' (clean position:corrupted position, comma separated) -> pairs; '' -> None (equal lengths)."""
    if not spec.strip():
        return None
    out = []
    for part in spec.split(","):
        m = ALIGN_RE.match(part)
        if not m:
            raise AppError(f"aligned pair {echo(part)} is not CLEAN:CORRUPTED (token positions, e.g. align=0:0,1:1,"
                           "3:5)", 422)
        out.append((int(m.group(1)), int(m.group(2))))
    if len(out) > WORKER.max_prompt_tokens:
        raise AppError(f"{len(out)} aligned pairs given; the limit is {WORKER.max_prompt_tokens}", 422)
    return out


def _request(info, clean: str, corrupted: str, metric: str, target: str, other: str, direction: str,
             feature: list[int], n_features: int, error: bool, align: str) -> PatchIn:
    for f in feature:
        check_index(info, f)
    return PatchIn(sae_id=info.sae_id, clean=clean, corrupted=corrupted, metric=metric,
                   target_text=target or None, other_text=(other or None) if metric == "logit_diff" else None,
                   direction=direction, features=feature or None, n_features=n_features, patch_error=error,
                   align=parse_align(align))


def _colour(v: float, vmax: float) -> str:
    if vmax <= 0 or v == 0:
        return "transparent"
    a = min(1.0, abs(v) / vmax)
    return f"rgba(40, 90, 200, {a:.3f})" if v > 0 else f"rgba(200, 50, 40, {a:.3f})"


def heatmap_html(r: PatchOut, sae_id: str) -> Markup:
    """A table: rows = patched base positions (their tokens), columns = features; each cell the real share of the
    base-to-source difference moved by patching that one latent there (colour), with the estimate beside it and on
    hover; the last columns and the last row give whole positions and whole features."""
    diff = r.source_metric - r.base_metric
    share = (lambda v: v / diff) if abs(diff) > 1e-9 else (lambda v: 0.0)
    base_tokens = r.clean_tokens if r.direction == "corrupted_into_clean" else r.corrupted_tokens
    vmax = max([abs(share(v)) for row in r.cells for v in row] + [1e-9])
    head = "".join(f'<th scope="col"><a href="/sae/{escape(sae_id)}/feature/{f}">#{f}</a></th>' for f in r.features)
    rows = [f'<table class="patch-heatmap" id="patch-heatmap"><thead><tr><th scope="col">position</th>{head}'
            '<th scope="col">whole position: real</th><th scope="col">estimate</th></tr></thead><tbody>']
    for i, (t, e) in enumerate(zip(r.positions, r.per_position)):
        tok = escape(visible(base_tokens[t]))
        cells = []
        for j, f in enumerate(r.features):
            real, est = share(r.cells[i][j]), share(r.cell_estimates[i][j])
            cells.append(f'<td style="background:{_colour(real, vmax)}" data-real="{real:.6g}" data-estimate="{est:.6g}"'
                         f' title="position {t}, feature #{f}: real {fmt(real)} · estimate {fmt(est)}">'
                         f'{fmt(real, 2)}<span class="muted"> / {fmt(est, 2)}</span></td>')
        rows.append(f'<tr><th scope="row">{t} <code>{tok}</code></th>{"".join(cells)}'
                    f'<td data-real="{e.fraction if e.fraction is not None else ""}">{fmt(e.fraction)}</td>'
                    f'<td>{fmt(e.estimate_fraction)}</td></tr>')
    feats = "".join(f'<td title="feature #{e.key} at every position">{fmt(e.fraction)}<span class="muted"> / '
                    f'{fmt(e.estimate_fraction)}</span></td>' for e in r.per_feature)
    rows.append(f'</tbody><tfoot><tr><th scope="row">whole feature</th>{feats}<td></td><td></td></tr></tfoot></table>')
    return Markup("".join(rows))


@router.get("/patch", response_class=HTMLResponse)
def patch_page(request: Request, sae: str | None = None, clean: str = Query("", max_length=MAX_PROMPT_CHARS),
               corrupted: str = Query("", max_length=MAX_PROMPT_CHARS),
               metric: Literal["logprob", "logit_diff"] = "logprob", target: str = Query("", max_length=WORKER.max_token_text_chars),
               other: str = Query("", max_length=WORKER.max_token_text_chars),
               direction: Literal["corrupted_into_clean", "clean_into_corrupted"] = "corrupted_into_clean",
               feature: list[int] = Query([], max_length=WORKER.max_patch_features),
               n_features: int = Query(WORKER.patch_features, ge=1, le=WORKER.max_patch_features),
               error: bool = False, align: str = Query("", max_length=MAX_PROMPT_CHARS)):
    """Activation patching: clean and corrupted prompts (equal token lengths, or align=CLEAN:CORRUPTED,...)."""
    store = store_of(request)
    info = sae_or_first(store, sae)
    ctx = {"sae": info, "saes": store.saes(), "clean": clean, "corrupted": corrupted, "metric": metric,
           "target": target, "other": other, "direction": direction, "features": feature, "n_features": n_features,
           "error": error, "align": align, "worker": worker_status(request.app), "result": None, "problem": None}
    if clean.strip() and corrupted.strip():
        try:
            out = _client(request).patch(_request(info, clean, corrupted, metric, target, other, direction, feature,
                                                  n_features, error, align))
            ctx["result"], ctx["heatmap"] = out, heatmap_html(out, info.sae_id)
        except AppError as err:
            if err.status == 404:
                raise
            ctx["problem"] = err
    return page(request, "patching.html", ctx, block="result")


@router.get("/api/patch", tags=["live"], summary="activation patching of SAE latents from a counterfactual prompt "
            "(live): real patches per position, feature and cell next to the attribution-patching estimate")
def api_patch(request: Request, sae: str, clean: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS),
              corrupted: str = Query(..., min_length=1, max_length=MAX_PROMPT_CHARS),
              metric: Literal["logprob", "logit_diff"] = "logprob", target: str = Query("", max_length=WORKER.max_token_text_chars),
              other: str = Query("", max_length=WORKER.max_token_text_chars),
              direction: Literal["corrupted_into_clean", "clean_into_corrupted"] = "corrupted_into_clean",
              feature: list[int] = Query([], max_length=WORKER.max_patch_features),
              n_features: int = Query(WORKER.patch_features, ge=1, le=WORKER.max_patch_features),
              error: bool = False, align: str = Query("", max_length=MAX_PROMPT_CHARS)) -> PatchOut:
    info = store_of(request).require_sae(sae)
    return _client(request).patch(_request(info, clean, corrupted, metric, target, other, direction, feature,
                                           n_features, error, align))
