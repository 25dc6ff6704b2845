"""One data function per precomputed page, rendered by both the HTML page (pages.py) and its JSON twin (api.py),
so the twins cannot drift (Datasette's way). Each takes the store and the page's parameters, parsed once by a
parameter dataclass that both routes declare as a FastAPI dependency, and returns a dataclass of what the page
shows. The templates and the JSON schemas (api.py) only choose how to write it.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Query

from saescope.precompute.store import Feature, FeatureRow, SAEInfo, SearchHit, Store

from ..errors import AppError, echo
from ..settings import SERVE
from .lookups import (ListItem, Pager, check_index, feature_list, feature_list_items, feature_or_404, page_offset,
                      pager, score_histogram)
from .maps import Neighbourhood, neighbourhood

S = SERVE
Sort = Literal["index", "density", "max", "score"]
Show = Literal["all", "live", "dead", "dense"]
Share = Annotated[float | None, Query(ge=0, le=1)]
Page = Annotated[int, Query(ge=1, description="1-based page number")]  # bounded above by lookups.page_offset
EXAMPLE_KINDS = ("top", "interval", "quantile")


# ---------------------------------------------------------------- the SAE page: its feature list
@dataclass
class FeatureListParams:
    sort: Sort = "index"
    order: Literal["asc", "desc"] = "asc"
    page: Page = 1
    size: Annotated[int, Query(ge=1, le=S.max_page_size, description="features per page")] = S.page_size
    show: Show = "all"
    min_density: Share = None
    max_density: Share = None
    min_score: Share = None

    def link_params(self) -> dict:
        """The filters a link to another page of the same list keeps (page left out)."""
        return dict(sort=self.sort, order=self.order, size=self.size, show=self.show, min_density=self.min_density,
                    max_density=self.max_density, min_score=self.min_score)


@dataclass
class FeaturesView:
    sae: SAEInfo
    params: FeatureListParams
    pager: Pager
    rows: list[FeatureRow]
    compared: list[str]  # SAEs this one was compared with
    score_hist: list[int]  # best explanation scores in equal bins of [0, 1]
    n_scored: int


def features_view(store: Store, sae_id: str, p: FeatureListParams) -> FeaturesView:
    sae = store.require_sae(sae_id)
    pg, rows = feature_list(store, sae_id, p.sort, p.order, p.page, p.size, p.show, p.min_density, p.max_density,
                            p.min_score)
    hist, n_scored = score_histogram(store, sae_id)
    return FeaturesView(sae, p, pg, rows, store.compared_with(sae_id), hist, n_scored)


# ---------------------------------------------------------------- the feature page
@dataclass
class FeatureView:
    sae: SAEInfo
    f: Feature  # statistics, logit effects (raw; centred = raw - f.logit_mean), neighbours, co-occurrence
    examples: dict[str, list]  # kind -> stored examples (top; interval / quantile when asked)
    groups: dict[str, list]  # interval / quantile -> sample groups with their examples
    others: list[tuple[str, list[tuple[int, float]]]]  # (other SAE, [(feature, cosine)]) nearest decoder directions
    map_near: Neighbourhood | None  # the map around the feature (None: no map, or not asked)

    @property
    def logit_pos_centred(self) -> list[tuple[str, float]]:
        return [(t, v - self.f.logit_mean) for t, v in self.f.logit_pos]

    @property
    def logit_neg_centred(self) -> list[tuple[str, float]]:
        return [(t, v - self.f.logit_mean) for t, v in self.f.logit_neg]


def feature_view(store: Store, sae_id: str, index: int, kinds: tuple[str, ...] = EXAMPLE_KINDS,
                 near: bool = True) -> FeatureView:
    """Everything the feature page shows; `kinds` (examples read) and `near` (the map neighbourhood) let an htmx
    fragment read less. The JSON twin reads it all."""
    sae, f = feature_or_404(store, sae_id, index)
    examples = store.examples_by_kind(sae_id, index, kinds)  # every kind shown, in one query
    samples = tuple(k for k in kinds if k != "top")
    groups = store.groups_by_kind(sae_id, index, samples, examples=examples) if samples else {}
    return FeatureView(sae, f, examples, groups, store.cross(sae_id, index),
                       neighbourhood(store, sae, f) if near else None)


# ---------------------------------------------------------------- a shared list (lives in its URL)
class ListParams:
    """A shared list's URL: name=...&f=12&note=...&f=45&note=... (a class, not a dataclass: list defaults)."""

    def __init__(self, name: Annotated[str, Query(max_length=S.max_query_chars)] = "",
                 f: Annotated[list[int], Query(max_length=S.max_list, description="feature indices, in order")] = [],  # noqa: B006
                 note: Annotated[list[str], Query(max_length=S.max_list, description="one note per feature")] = []):  # noqa: B006
        self.name, self.f, self.note = name, list(f), list(note)


@dataclass
class ListView:
    sae: SAEInfo
    name: str
    items: list[ListItem]  # in the list's order, each with its note and Feature
    rows: dict[int, FeatureRow]  # the listed features' summary rows


def list_view(store: Store, sae_id: str, p: ListParams) -> ListView:
    sae = store.require_sae(sae_id)
    items = feature_list_items(store, sae, p.f, p.note)
    return ListView(sae, p.name, items, store.features_by_index(sae_id, [it.index for it in items]))


CSV_COLUMNS = ["sae_id", "list", "index", "note", "density", "max_act", "mean_act", "n_active", "top_tokens"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A cell a spreadsheet will not run: text starting with = + - @ tab or CR gets a leading ' (OWASP's rule
    against CSV injection); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def list_csv(v: ListView) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for it in v.items:
        r = v.rows[it.index]
        w.writerow([csv_cell(c) for c in (v.sae.sae_id, v.name, it.index, it.note, r.density, r.max_act, r.mean_act,
                                          r.n_active, " | ".join(r.top_tokens))])
    return buf.getvalue()


def list_filename(v: ListView) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", v.name or "features").strip("-") or "features") + ".csv"


# ---------------------------------------------------------------- search
SearchSize = Annotated[int, Query(ge=1, le=S.max_search_page_size, description="hits per page")]


@dataclass
class SearchParams:
    """The search page's parameters: by=auto jumps to a feature index, else searches tokens, then explanations."""

    q: Annotated[str, Query(max_length=S.max_query_chars)] = ""
    by: Literal["auto", "index", "token", "explanation"] = "auto"
    page: Page = 1
    size: SearchSize = S.search_page_size


@dataclass
class APISearchParams:
    """The JSON twin's: a query is required and `by` names what to search (no index jump)."""

    q: Annotated[str, Query(min_length=1, max_length=S.max_query_chars)]
    by: Literal["token", "explanation"] = "token"
    page: Page = 1
    size: SearchSize = S.search_page_size


@dataclass
class SearchView:
    sae: SAEInfo
    q: str  # stripped
    by: str
    mode: str  # what was searched: token or explanation
    hits: list[SearchHit]
    total: int
    pager: Pager | None  # None without a query
    segments: dict[int, list[tuple[str, bool]]]  # explanation hits: (text, matched) runs for <mark>
    index: int | None = None  # the query named a feature index: go there


INDEX_RE = re.compile(r"#?([0-9]{1,18})")  # ASCII digits only: str.isdigit() also takes '²' and '①'


def search_view(store: Store, sae_id: str, p: SearchParams | APISearchParams) -> SearchView:
    sae = store.require_sae(sae_id)
    q = p.q.strip()
    hits, total, mode = [], 0, p.by
    if q:
        m = INDEX_RE.fullmatch(q)
        if p.by in ("auto", "index") and m:
            index = int(m.group(1))
            check_index(sae, index)
            return SearchView(sae, q, p.by, "index", [], 0, None, {}, index=index)
        if p.by == "index":
            raise AppError(f"{echo(q)} is not a feature index; give a whole number from 0 to {sae.d_sae - 1}", 422)
        offset = page_offset(p.page, p.size)
        if p.by in ("auto", "token"):
            hits, total = store.search_tokens(sae_id, q, p.size, offset)
            mode = "token"
        if p.by == "explanation" or (p.by == "auto" and total == 0):
            hits, total = store.search_explanations(sae_id, q, p.size, offset)
            mode = "explanation"
    segments = {}
    if mode == "explanation":  # the matched words of each hit's explanation (escaped by the template)
        from saescope.precompute.store.search import highlight

        segments = {h.index: highlight(h.matched, q) for h in hits}
    return SearchView(sae, q, p.by, mode, hits, total, pager(p.page, p.size, total) if q else None, segments)


# ---------------------------------------------------------------- compare two SAEs
@dataclass
class CompareView:
    sae: SAEInfo
    other: SAEInfo
    pager: Pager
    rows: list[tuple[int, int, float, bool]]  # (feature, best match in other, cosine, mutual)


def compare_view(store: Store, sae_id: str, other: str, page: int, size: int) -> CompareView:
    sae, oth = store.require_sae(sae_id), store.require_sae(other)
    if other not in store.compared_with(sae_id):
        have = ", ".join(store.compared_with(sae_id)) or "none"
        raise AppError(f"{sae_id} was not compared with {other} (SAEs precomputed in one run with the same width are); "
                       f"compared with: {have}", 404, link=(f"/sae/{sae_id}", f"browse {sae_id}"))
    pg = pager(page, size, sae.d_sae)
    return CompareView(sae, oth, pg, store.best_matches(sae_id, other, size, pg.offset))
