"""From URL parameters to store answers, shared by pages and the JSON API: the SAE or feature a URL names (or
the 404 that says what exists), one page of a filtered feature list, pagination, and links."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
import re
from urllib.parse import quote, unquote, urlencode

from saescope.precompute.store import SAEInfo, Store

from ..errors import AppError, echo
from ..settings import SERVE
from .templates import ENV
from .tokens import vocab_html

log = logging.getLogger(__name__)


def warm_up(store: Store) -> None:
    """Load what every page reads besides its own rows (vocabularies and their HTML forms, each SAE's map index
    and feature summaries, compiled templates) ahead of the first request. Not pre-rendering: no page is
    rendered, and it takes under a second for a 65,536-feature SAE."""
    t0 = time.perf_counter()
    try:
        store.warm()
        for s in store.saes():
            vocab_html(store, s.model_key)
        for name in ENV.list_templates(filter_func=lambda n: n.endswith(".html")):
            ENV.get_template(name)  # compiled once, not on the first request that renders it
    except Exception:  # the pages load the same lazily (and report a damaged store themselves)
        log.exception("loading the store indexes ahead of the first page failed")
        return
    # what is loaded by now lives as long as the server: keep it out of the collector's full passes, which
    # otherwise stall one request in a few hundred for tens of ms (measured by bench/large_sae.py)
    gc.freeze()
    log.info("store indexes loaded in %.2f s", time.perf_counter() - t0)


def sae_or_first(store: Store, sae_id: str | None) -> SAEInfo:
    """The SAE a live page names, or the store's first one when it names none (404 when the store has none).
    An unknown id raises the store's UnknownSAE (a 404 through app.py's handler, the id echoed bounded)."""
    saes = store.saes()
    if not saes:
        raise AppError("this store holds no SAE to inspect with", 404)
    return store.require_sae(sae_id or saes[0].sae_id)


def check_index(sae: SAEInfo, index: int) -> None:
    if not 0 <= index < sae.d_sae:
        raise AppError(f"feature {index} does not exist: {sae.sae_id} has features 0 to {sae.d_sae - 1}", 404,
                       link=(f"/sae/{sae.sae_id}", f"browse {sae.sae_id}"))


def feature_or_404(store: Store, sae_id: str, index: int):
    """(SAEInfo, Feature) for a URL's sae_id and index, or the 404 that says what exists."""
    sae = store.require_sae(sae_id)
    check_index(sae, index)
    f = store.feature(sae_id, index)
    if f is None:
        raise AppError(f"feature {index} of {sae_id} is missing from the store (an interrupted build?)", 404)
    return sae, f


@dataclass
class ListItem:
    index: int
    note: str
    feature: object  # precompute.store.Feature


def feature_list_items(store: Store, sae: SAEInfo, f: list[int], note: list[str]) -> list[ListItem]:
    """A shared list from its URL (f=12&note=...&f=45&note=...): every feature checked, notes aligned with ids."""
    if len(f) > SERVE.max_list:
        raise AppError(f"the list has {len(f)} features; the limit is {SERVE.max_list}", 422)
    if note and len(note) != len(f):
        raise AppError(f"the list has {len(f)} features but {len(note)} notes; give one note per feature "
                       "(f=12&note=...&f=45&note=), empty notes included", 422)
    long = [n for n in note if len(n) > SERVE.max_note_chars]
    if long:
        raise AppError(f"a note has {len(long[0]):,} characters; the limit is {SERVE.max_note_chars}", 422)
    items = []
    for i, idx in enumerate(f):
        check_index(sae, idx)
        items.append(ListItem(idx, note[i] if note else "", store.feature(sae.sae_id, idx)))
    return items


def url(path: str, **params) -> str:
    q = {k: v for k, v in params.items() if v is not None and v != ""}
    return f"{path}?{urlencode(q)}" if q else path


def page_offset(page: int, size: int) -> int:
    """The row offset of a 1-based page: the one place a page number is bounded (SERVE.max_page), before any query
    (a huge page number would overflow the store's 64-bit offsets)."""
    if not 1 <= page <= SERVE.max_page:
        raise AppError(f"page {echo(page)} is out of range: give a page number from 1 to {SERVE.max_page:,}", 422)
    return (page - 1) * size


@dataclass
class Pager:
    page: int
    size: int
    total: int

    @property
    def past_end(self) -> bool:
        """A page after the last one: shown empty, with a link back to the last page."""
        return self.page > self.pages

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def first(self) -> int:
        return min(self.total, self.offset + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.offset + self.size)


    def prev_url(self, base: str, **params) -> str | None:
        """The previous page (the last page, from a page past the end), None on the first page."""
        return url(base, **params, page=min(self.page - 1, self.pages)) if self.page > 1 else None

    def next_url(self, base: str, **params) -> str | None:
        return url(base, **params, page=self.page + 1) if self.page < self.pages else None


def pager(page: int, size: int, total: int) -> Pager:
    """One page of `total` rows (a page past the end is an empty page, not an error; see page_offset's bound)."""
    page_offset(page, size)
    return Pager(page, size, total)


def feature_list(store: Store, sae_id: str, sort: str, order: str, page: int, size: int, show: str,
                 min_density: float | None, max_density: float | None, min_score: float | None = None):
    """One page of the SAE's feature list under the given filters: (pager, rows). Shared by page and API.
    min_score keeps features whose best explanation score (mean of detection and fuzzing) is at least that."""
    if min_density is not None and max_density is not None and min_density > max_density:
        raise AppError(f"min_density ({min_density}) is larger than max_density ({max_density})", 422)
    dead = {"all": None, "live": False, "dead": True, "dense": False}[show]
    if show == "dense":  # dense features fire on at least SERVE.dense_share of the tokens
        min_density = max(min_density or 0.0, SERVE.dense_share)
    page_offset(page, size)
    pg = pager(page, size, store.count_features(sae_id, min_density, max_density, dead, min_score))
    return pg, store.features(sae_id, sort, order == "desc", size, pg.offset, min_density, max_density, dead,
                              min_score)

SCORE_BINS = 20  # bins of the explanation score histogram over [0, 1]


def score_histogram(store: Store, sae_id: str, bins: int = SCORE_BINS) -> tuple[list[int], int]:
    """(counts of the features' best explanation scores in equal bins of [0, 1], how many features are scored)."""
    import numpy as np

    scores = store.explanation_scores(sae_id)
    counts = np.histogram(np.clip(scores, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0] if scores else [0] * bins
    return [int(c) for c in counts], len(scores)


_SAE_PATH = re.compile(r"^/sae/(?P<sae>[^/]+)(?:/feature/(?P<f>[^/]+))?")


def way_back(store: Store, path: str) -> list[tuple[str, str]]:
    """Links out of an error page under /sae/S/...: the SAE when it exists, and on a feature URL that names no
    feature (feature/abc, feature/99999, feature/-3) the nearest feature that exists."""
    m = _SAE_PATH.match(path)
    sae = store.sae(unquote(m["sae"])) if m else None
    if sae is None:
        return []
    base = f"/sae/{quote(sae.sae_id, safe='')}"
    links = [(base, f"browse {sae.sae_id}")]
    if m["f"] is not None and sae.d_sae > 0:
        raw = unquote(m["f"]).strip()
        try:
            near, how = min(max(int(raw, 10), 0), sae.d_sae - 1), "nearest"
        except ValueError:
            near, how = 0, "first"
        if str(near) != raw:
            links.append((f"{base}/feature/{near}", f"feature {near}, the {how} that exists"))
    return links
