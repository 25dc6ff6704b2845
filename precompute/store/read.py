"""Reading a store: the only code the server uses to ask questions of the DuckDB file.

Each call opens a cursor of one shared read-only connection (cursors are safe across threads) and returns
small dataclasses; no SQL leaves the store package (read.py, search.py, maps.py, explanations.py).
"""

from __future__ import annotations

import json
import re
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from ..errors import SaescopeError, UnknownSAE
from .maps import MapQueries
from .schema import (CONTRAST_FEATURES, CONTRASTS, EXPLANATIONS, FEATURES, GRAPHS, QUALITY, SAES, SCHEMA_VERSION,
                     STORE_TABLES)
from .search import SearchHit, SearchQueries, dedup as _dedup


class StoreError(SaescopeError):
    """The store is missing, unreadable or of an unknown version; the message says what to do."""


SAEInfo = SAES.row_type("SAEInfo")  # one field per column of the saes table, JSON columns as dicts
ContrastRun = CONTRASTS.row_type("ContrastRun")  # one stored contrast (probe as a dict)
ContrastFeature = CONTRAST_FEATURES.row_type("ContrastFeature")
Quality = QUALITY.row_type("Quality")  # one SAE's quality metrics (precompute/quality.py); NULL -> None
Explanation = EXPLANATIONS.row_type("Explanation")  # one explanation with its provenance and scores (NULL -> None)
StoredGraph = GRAPHS.row_type("StoredGraph")  # one stored attribution graph (sae_ids as a dict, graph as JSON text)


@dataclass
class FeatureRow:
    index: int
    density: float
    max_act: float
    mean_act: float
    n_active: int
    top_tokens: list[str]
    score: float | None = None  # best explanation score of the feature (see EXPLANATION_SCORE_SQL), None if unscored


@dataclass
class Example:
    kind: str
    grp: int
    rank: int
    ctx_id: int
    pos: int
    value: float
    tokens: list[str]  # the whole context
    token_ids: list[int]
    acts: list[float]  # this feature's activation on every token of the context (0 where inactive)


@dataclass
class Group:
    kind: str
    grp: int
    lo: float
    hi: float
    n_tokens: int
    share: float
    examples: list[Example] = field(default_factory=list)


@dataclass
class Feature:
    sae_id: str
    index: int
    n_active: int
    density: float
    max_act: float
    mean_act: float
    hist_lo: float
    hist_hi: float
    hist: list[int]
    top_tokens: list[str]
    logit_pos: list[tuple[str, float]]
    logit_neg: list[tuple[str, float]]
    logit_hist_lo: float
    logit_hist_hi: float
    logit_hist: list[int]
    neighbours: list[tuple[int, float]]
    explanations: list[str]
    cooc: list[tuple[int, float]] = field(default_factory=list)  # (feature, Jaccard) co-occurrence, [] if not computed
    map_xy: tuple[float, float] | None = None  # position on the feature map, None if not computed
    explanation_rows: list[Explanation] = field(default_factory=list)  # explanations with LLM provenance and scores
    logit_mean: float = 0.0  # mean logit effect over the vocabulary: centred effect = raw - logit_mean


SORTS = {"index": "feature", "density": "density", "max": "max_act", "score": "score"}
# One explanation's score: the mean of its detection and fuzzing balanced accuracies (whichever exist); a feature's
# score is the best of its explanations'. NULL when nothing was scored.
EXPLANATION_SCORE_SQL = """CASE WHEN score_detection IS NULL THEN score_fuzzing WHEN score_fuzzing IS NULL
    THEN score_detection ELSE (score_detection + score_fuzzing) / 2 END"""
_SCORED = f"(SELECT feature, max({EXPLANATION_SCORE_SQL}) AS score FROM explanations WHERE sae_id = ? GROUP BY feature)"


_TABLE_NAMES = {t.name for t in STORE_TABLES}
_FROM = re.compile(r"\b(?:FROM|JOIN)\s+([a-z_]+)", re.I)


def tables_of(sql: str) -> list[str]:
    """The store tables a query reads (so that a damaged-file message can name them)."""
    return sorted({t for t in _FROM.findall(sql) if t in _TABLE_NAMES})


FILE_HEADERS = 3 * 4096  # DuckDB's main header and its two database headers precede block 0


def damaged(path: Path, why: object, tables: list[str] | None = None) -> "StoreError":
    where = f" in table{'s' if len(tables) > 1 else ''} {', '.join(tables)}" if tables else ""
    err = StoreError(f"the store file {path} is damaged or incomplete{where} ({str(why).splitlines()[0][:200]}); "
                     f"`saescope verify {path}` lists every damaged table; rebuild the store with "
                     f"`saescope precompute --out {path}` (the same command that made it)")
    err.tables = tables or []
    return err


class Store(SearchQueries, MapQueries):
    """One store file, read-only. The questions pages ask are methods here (SAEs, feature lists, one feature, its
    examples and groups), in search.py (token and explanation search) and in maps.py (the map, cross-SAE
    matches); questions only the explainer asks are functions in explanations.py."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; make one with `saescope precompute --out {self.path}`")
        self._lock = threading.Lock()
        self._local = threading.local()
        self._bm25: dict[str, tuple[Any, list[int], list[str]]] = {}  # sae_id -> (BM25Index, features, texts)
        self._maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # sae_id -> map index (_map_index)
        self._summary: dict[str, tuple[np.ndarray, ...]] = {}  # sae_id -> feature summaries (_summaries)
        self._compared: dict[str, list[str]] | None = None  # sae_id -> SAEs it was compared with (cross_matches)
        try:
            self._con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as err:
            raise damaged(self.path, err) from err
        try:
            self._open()
        except BaseException:
            self._con.close()
            raise

    def _open(self) -> None:
        tables = {r[0] for r in self._q("SELECT table_name FROM information_schema.tables")}
        if "meta" not in tables:
            if tables - {"meta"}:
                raise StoreError(f"{self.path} is a DuckDB file but not a saescope store (tables: "
                                 f"{', '.join(sorted(tables))}); make one with `saescope precompute --out STORE`")
            raise damaged(self.path, "no tables")
        row = next(iter(self._q("SELECT value FROM meta WHERE key = 'schema_version'")), None)
        if row is None:
            raise damaged(self.path, "no schema version recorded")
        if int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema version {row[0]}; this saescope reads version "
                             f"{SCHEMA_VERSION}. Rebuild it with `saescope precompute --out {self.path}`")
        missing = {t.name for t in STORE_TABLES} - tables
        if missing:
            raise damaged(self.path, f"tables missing: {', '.join(sorted(missing))}")
        # a truncated file (an interrupted copy, a full disk) is shorter than the blocks its header lists. Block 0
        # starts after DuckDB's three file headers, so a file holding `used` blocks has at least
        # FILE_HEADERS + used * block_size bytes (without the headers, a cut inside the last block went unnoticed
        # here and every query of it failed later). Free blocks at the end of the file need not be on disk, so the
        # bound counts the blocks in use; with no free block (a freshly published store) it is the exact size.
        block_size, used_blocks = self._q("SELECT block_size, used_blocks FROM pragma_database_size()")[0]
        size, need = self.path.stat().st_size, FILE_HEADERS + block_size * used_blocks
        if size < need:
            raise damaged(self.path, f"the file is cut short: it has {size:,} bytes, and the {used_blocks} blocks of "
                                     f"{block_size:,} bytes its header lists in use need {need:,}")
        self._vocab: dict[str, list[str]] = {}
        self._saes = {s.sae_id: s for s in self._load_saes()}
        self._has_explanations = bool(self._q("SELECT count(*) FROM explanations")[0][0])

    # ---------------------------------------------------------------- plumbing
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            with self._lock:
                cur = self._con.cursor()
            self._local.cur = cur
        return cur

    def _q(self, sql: str, params: list | None = None) -> list[tuple]:
        """Run one query and fetch all its rows; a damaged file becomes a StoreError that says so."""
        try:
            return self._cursor().execute(sql, params or []).fetchall()
        except duckdb.ProgrammingError:
            raise  # this module's SQL is wrong (parser, binder, catalog): a bug, not a damaged file
        except duckdb.Error as err:  # I/O errors, and "Corrupt database file: computed checksum ..." (a plain Error)
            raise damaged(self.path, err, tables_of(sql)) from err

    def _np(self, sql: str, params: list | None = None) -> dict[str, np.ndarray]:
        """Like _q, as numpy columns."""
        try:
            return self._cursor().execute(sql, params or []).fetchnumpy()
        except duckdb.ProgrammingError:
            raise
        except duckdb.Error as err:
            raise damaged(self.path, err, tables_of(sql)) from err

    def close(self) -> None:
        self._con.close()

    def check_tables(self) -> dict[str, str | None]:
        """Read every column of every table once (DuckDB checks each block's checksum as it reads it): table ->
        None when it reads back, else why not. `saescope verify` reports it; pages name the table they failed on."""
        out: dict[str, str | None] = {}
        for t in STORE_TABLES:
            try:
                self._cursor().execute(f"SELECT count(*), bit_xor(hash(COLUMNS(*))) FROM {t.name}").fetchall()
                out[t.name] = None
            except duckdb.ProgrammingError:
                raise
            except duckdb.Error as err:
                out[t.name] = str(err).splitlines()[0][:200]
        return out

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- SAEs
    def _load_saes(self) -> list[SAEInfo]:
        rows = self._q(f"SELECT {SAES.select_list()} FROM saes ORDER BY sae_id")
        out = [SAEInfo(*(json.loads(v or "{}") if c.json else v for c, v in zip(SAES.cols, row))) for row in rows]
        for s in out:  # precompute's own check ran while the tables were built
            if s.verify and "date" not in s.verify:
                s.verify["date"] = s.created
            if s.verify and "command" in s.verify:  # stored as "saescope verify {store} ...": the file may move
                s.verify["command"] = s.verify["command"].replace("{store}", shlex.quote(str(self.path)))
        return out

    def saes(self) -> list[SAEInfo]:
        return list(self._saes.values())

    def sae(self, sae_id: str) -> SAEInfo | None:
        return self._saes.get(sae_id)

    def quality(self) -> dict[str, Quality]:
        """sae_id -> its quality metrics, for the SAEs that have them."""
        rows = self._q(f"SELECT {QUALITY.select_list()} FROM {QUALITY.name} ORDER BY sae_id")
        return {r[0]: Quality(*r) for r in rows}

    def contrasts(self, sae_id: str) -> list[str]:
        """Names of the SAE's stored contrasts."""
        return [r[0] for r in self._q("SELECT name FROM contrasts WHERE sae_id = ? ORDER BY name", [sae_id])]

    def contrast(self, sae_id: str, name: str) -> tuple[ContrastRun, dict[str, list[ContrastFeature]],
                                                         dict[str, list[list[int]]]] | None:
        """One stored contrast: its run row, its ranked features per side ('a', 'b') and its texts' token ids."""
        rows = self._q(f"SELECT {CONTRASTS.select_list()} FROM contrasts WHERE sae_id = ? AND name = ?", [sae_id, name])
        if not rows:
            return None
        run = ContrastRun(*(json.loads(v or "{}") if c.json else v for c, v in zip(CONTRASTS.cols, rows[0])))
        feats: dict[str, list[ContrastFeature]] = {"a": [], "b": []}
        have = {r[0] for r in self._q("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'contrast_features'")}
        cols = ", ".join(c if c in have else f"NULL AS {c}" for c in CONTRAST_FEATURES.names)  # older stores
        for r in self._q(f"SELECT {cols} FROM contrast_features WHERE sae_id = ? AND name = ? "
                         "ORDER BY side, rank", [sae_id, name]):
            feats[r[2]].append(ContrastFeature(*r))
        texts: dict[str, list[list[int]]] = {"a": [], "b": []}
        for side, ids in self._q("SELECT side, token_ids FROM contrast_texts WHERE sae_id = ? AND name = ? "
                                 "ORDER BY side, idx", [sae_id, name]):
            texts[side].append(list(ids))
        return run, feats, texts

    def graphs(self) -> list[StoredGraph]:
        """The stored attribution graphs, newest first, without their JSON text (graph = '')."""
        cols = [c.name if c.name != "graph" else "''" for c in GRAPHS.cols]
        rows = self._q(f"SELECT {', '.join(cols)} FROM {GRAPHS.name} ORDER BY created DESC, slug")
        return [StoredGraph(*(json.loads(v or "{}") if c.json else v for c, v in zip(GRAPHS.cols, r))) for r in rows]

    def graph(self, slug: str) -> StoredGraph | None:
        """One stored graph with its JSON text, or None."""
        rows = self._q(f"SELECT {GRAPHS.select_list()} FROM {GRAPHS.name} WHERE slug = ?", [slug])
        return StoredGraph(*(json.loads(v or "{}") if c.json else v for c, v in zip(GRAPHS.cols, rows[0]))) if rows else None

    def require_sae(self, sae_id: str) -> SAEInfo:
        """The SAE's row, or UnknownSAE naming the SAEs the store has (the one check every caller shares)."""
        s = self._saes.get(sae_id)
        if s is None:
            raise UnknownSAE(sae_id, self._saes, where=f"the store {self.path.name}")
        return s

    def vocab(self, model_key: str) -> list[str]:
        if model_key not in self._vocab:
            rows = self._q("SELECT token FROM vocab WHERE model_key = ? ORDER BY token_id", [model_key])
            self._vocab[model_key] = [r[0] for r in rows]
        return self._vocab[model_key]

    def warm(self) -> None:
        """Read into memory what any feature page needs besides its own rows (each SAE's vocabulary and map
        index), so that no page pays for it; meant for a background thread at startup (about a second)."""
        for s in self.saes():
            self.vocab(s.model_key)
            self._map_index(s.sae_id)
            self._summaries(s.sae_id)
        self.compared_with("")

    def _tok(self, sae_id: str):
        v = self.vocab(self._saes[sae_id].model_key)
        return lambda i: v[i] if 0 <= i < len(v) else f"<id {i}>"

    # ---------------------------------------------------------------- feature lists
    def features(self, sae_id: str, sort: str = "index", desc: bool = False, limit: int = 50, offset: int = 0,
                 min_density: float | None = None, max_density: float | None = None,
                 dead: bool | None = None, min_score: float | None = None) -> list[FeatureRow]:
        """One page of features; sort "score" orders by the best explanation score (unscored features last in
        either direction); min_score keeps only features with an explanation scoring at least that."""
        where, params = self._filters(sae_id, min_density, max_density, dead, min_score)
        order = f"{SORTS[sort]} {'DESC' if desc else 'ASC'} NULLS LAST, feature"
        rows = self._q(f"""SELECT feature, density, max_act, mean_act, n_active, top_token_ids, s.score
                           FROM features LEFT JOIN {_SCORED} s USING (feature)
                           WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?""", [sae_id] + params + [limit, offset])
        return [self._row(sae_id, r) for r in rows]

    def _row(self, sae_id: str, r: tuple) -> FeatureRow:
        """(feature, density, max_act, mean_act, n_active, top_token_ids[, score]) -> FeatureRow."""
        tok = self._tok(sae_id)
        return FeatureRow(r[0], r[1], r[2], r[3], r[4], _dedup([tok(i) for i in r[5]]), r[6] if len(r) > 6 else None)

    def features_by_index(self, sae_id: str, indices: list[int]) -> dict[int, FeatureRow]:
        """The summary rows of these features (ids that do not exist are left out), from the SAE's summary
        index in memory: no query, so a page may ask for dozens (a map neighbourhood, a list)."""
        if not indices:
            return {}
        feat, dens, mx, mean, n_act, offsets, toks = self._summaries(sae_id)
        tok = self._tok(sae_id)
        out = {}
        for i in map(int, indices):
            at = np.searchsorted(feat, i)
            if at < len(feat) and feat[at] == i and i not in out:
                ids = toks[offsets[at]:offsets[at + 1]].tolist()
                out[i] = FeatureRow(i, float(dens[at]), float(mx[at]), float(mean[at]), int(n_act[at]),
                                    _dedup([tok(t) for t in ids]))
        return out

    def _summaries(self, sae_id: str) -> tuple[np.ndarray, ...]:
        """(feature ascending, density, max_act, mean_act, n_active, top-token offsets, top tokens flat) of every
        feature of the SAE, read once (65,536 features: ~5 MB, tens of ms)."""
        with self._lock:
            hit = self._summary.get(sae_id)
        if hit is None:
            try:
                t = self._cursor().sql("""SELECT feature, density, max_act, mean_act, n_active, top_token_ids
                                          FROM features WHERE sae_id = ? ORDER BY feature""",
                                       params=[sae_id]).to_arrow_table()
            except duckdb.ProgrammingError:
                raise
            except duckdb.Error as err:
                raise damaged(self.path, err) from err
            t = t.combine_chunks()
            top = t.column("top_token_ids").chunk(0) if t.num_rows else None
            col = lambda name, dt: np.asarray(t.column(name).to_numpy(zero_copy_only=False), dt)
            offsets = np.asarray(top.offsets, np.int64) if top is not None else np.zeros(1, np.int64)
            flat = np.asarray(top.values, np.int64) if top is not None else np.zeros(0, np.int64)
            hit = (col("feature", np.int64), col("density", np.float64), col("max_act", np.float32),
                   col("mean_act", np.float32), col("n_active", np.int64), offsets, flat)
            with self._lock:
                self._summary[sae_id] = hit
        return hit

    def count_features(self, sae_id: str, min_density: float | None = None, max_density: float | None = None,
                       dead: bool | None = None, min_score: float | None = None) -> int:
        where, params = self._filters(sae_id, min_density, max_density, dead, min_score)
        if min_score is None:
            return int(self._q(f"SELECT count(*) FROM features WHERE {where}", params)[0][0])
        return int(self._q(f"SELECT count(*) FROM features LEFT JOIN {_SCORED} s USING (feature) WHERE {where}",
                           [sae_id] + params)[0][0])

    @staticmethod
    def _filters(sae_id, min_density, max_density, dead, min_score=None) -> tuple[str, list]:
        where, params = ["features.sae_id = ?"], [sae_id]
        if min_score is not None:
            where.append("s.score >= ?")
            params.append(min_score)
        if min_density is not None:
            where.append("density >= ?")
            params.append(min_density)
        if max_density is not None:
            where.append("density <= ?")
            params.append(max_density)
        if dead is True:
            where.append("n_active = 0")
        elif dead is False:
            where.append("n_active > 0")
        return " AND ".join(where), params

    def cross(self, sae_id: str, index: int) -> list[tuple[str, list[tuple[int, float]]]]:
        """The feature's nearest decoder directions in each other SAE of this store it was compared with."""
        if not self.compared_with(sae_id):  # most stores: one SAE, or SAEs of different widths (no query)
            return []
        rows = self._q("SELECT other, ids, cos FROM cross_matches WHERE sae_id = ? AND feature = ? ORDER BY other",
                       [sae_id, index])
        return [(o, list(zip(ids, cos))) for o, ids, cos in rows]

    def compared_with(self, sae_id: str) -> list[str]:
        """The SAEs this one has cross matches with (read once for the whole store)."""
        if self._compared is None:
            pairs: dict[str, list[str]] = {}
            for a, b in self._q("SELECT DISTINCT sae_id, other FROM cross_matches ORDER BY sae_id, other"):
                pairs.setdefault(a, []).append(b)
            self._compared = pairs
        return list(self._compared.get(sae_id, []))

    def best_matches(self, sae_id: str, other: str, limit: int, offset: int) -> list[tuple[int, int, float, bool]]:
        """(feature of sae_id, its best match in other, cosine, whether that match's best match is the feature)."""
        return [tuple(r) for r in self._q("""
            SELECT a.feature, a.ids[1], a.cos[1], coalesce(b.ids[1] = a.feature, false)
            FROM cross_matches a LEFT JOIN cross_matches b ON b.sae_id = a.other AND b.other = a.sae_id
                 AND b.feature = a.ids[1]
            WHERE a.sae_id = ? AND a.other = ? ORDER BY a.feature LIMIT ? OFFSET ?""",
            [sae_id, other, limit, offset])]

    def random_feature(self, sae_id: str) -> int:
        row = next(iter(self._q("SELECT feature FROM features WHERE sae_id = ? AND n_active > 0 ORDER BY random() LIMIT 1",
                      [sae_id])), None)
        return int(row[0]) if row else 0

    # ---------------------------------------------------------------- one feature
    def feature(self, sae_id: str, index: int) -> Feature | None:
        row = next(iter(self._q(f"SELECT {FEATURES.select_list()} FROM features WHERE sae_id = ? AND feature = ?",
                                [sae_id, index])), None)
        if row is None:
            return None
        r = dict(zip(FEATURES.names, row))
        tok = self._tok(sae_id)
        expl_rows = [Explanation(*e) for e in self._q(
            f"SELECT {EXPLANATIONS.select_list()} FROM explanations WHERE sae_id = ? AND feature = ?",
            [sae_id, index])] if self._has_explanations else []
        expl = [e.text for e in expl_rows]
        return Feature(
            sae_id=sae_id, index=index, n_active=r["n_active"], density=r["density"], max_act=r["max_act"],
            mean_act=r["mean_act"], hist_lo=r["hist_lo"], hist_hi=r["hist_hi"], hist=r["hist"],
            top_tokens=_dedup([tok(i) for i in r["top_token_ids"]]),
            logit_pos=[(tok(i), v) for i, v in zip(r["logit_pos_ids"], r["logit_pos_vals"])],
            logit_neg=[(tok(i), v) for i, v in zip(r["logit_neg_ids"], r["logit_neg_vals"])],
            logit_hist_lo=r["logit_hist_lo"], logit_hist_hi=r["logit_hist_hi"], logit_hist=r["logit_hist"],
            neighbours=list(zip(r["neighbours"], r["neighbour_sims"])), explanations=expl,
            cooc=list(zip(r["cooc_ids"] or [], r["cooc_jaccard"] or [])),
            map_xy=None if r["map_x"] is None or r["map_y"] is None else (r["map_x"], r["map_y"]),
            explanation_rows=expl_rows, logit_mean=r["logit_mean"] or 0.0)

    def examples(self, sae_id: str, index: int, kind: str = "top") -> list[Example]:
        return self.examples_by_kind(sae_id, index, (kind,))[kind]

    def examples_by_kind(self, sae_id: str, index: int, kinds: tuple[str, ...] = ("top", "interval", "quantile")
                         ) -> dict[str, list[Example]]:
        """kind -> the feature's stored examples of that kind (ordered by group, rank): two queries for all kinds
        (examples rows sit sorted by feature, so the scan reads one row group; then their contexts)."""
        out: dict[str, list[Example]] = {k: [] for k in kinds}
        rows = self._q(f"""SELECT kind, grp, rank, ctx_id, pos, value, act_pos, act_val FROM examples
                           WHERE sae_id = ? AND feature = ? AND kind IN ({', '.join('?' * len(kinds))})
                           ORDER BY kind, grp, rank""", [sae_id, index, *kinds])
        if not rows:
            return out
        ctx_ids = sorted({r[3] for r in rows})
        ctx = dict(self._q("""SELECT ctx_id, tokens FROM contexts WHERE sae_id = ? AND ctx_id >= ? AND ctx_id <= ?
                              AND list_contains(?, ctx_id)""", [sae_id, ctx_ids[0], ctx_ids[-1], ctx_ids]))
        v = self.vocab(self._saes[sae_id].model_key)
        n = len(v)
        for kind_, grp, rank, ctx_id, pos, value, apos, aval in rows:
            tokens = ctx[ctx_id]
            acts = [0.0] * len(tokens)
            for p, a in zip(apos, aval):
                acts[p] = a
            strs = [v[t] if 0 <= t < n else f"<id {t}>" for t in tokens]
            out[kind_].append(Example(kind_, grp, rank, ctx_id, pos, value, strs, list(tokens), acts))
        return out

    def context_ids(self, sae_id: str) -> list[int]:
        """Every context the SAE's examples refer to."""
        return [r[0] for r in self._q("SELECT ctx_id FROM contexts WHERE sae_id = ? ORDER BY ctx_id", [sae_id])]

    def stored_activations(self, sae_id: str, ctx_ids: list[int]) -> dict[int, tuple[list[int], dict[int, tuple[list[int], list[float]]]]]:
        """ctx_id -> (token ids, {feature: (active positions, values)}) for every feature with an example there."""
        return stored_activations(self._cursor(), sae_id, ctx_ids)

    def stored_examples(self, sae_id: str, ctx_ids: list[int]) -> dict[int, tuple[list[int], list[tuple]]]:
        """ctx_id -> (token ids, every example row there as (feature, value, pos, act_pos, act_val))."""
        return stored_examples(self._cursor(), sae_id, ctx_ids)

    def groups(self, sae_id: str, index: int, kind: str) -> list[Group]:
        return self.groups_by_kind(sae_id, index, (kind,))[kind]

    def groups_by_kind(self, sae_id: str, index: int, kinds: tuple[str, ...] = ("interval", "quantile"),
                       examples: dict[str, list[Example]] | None = None) -> dict[str, list[Group]]:
        """kind -> the feature's sample groups of that kind (highest group first) with their examples; pass
        `examples` (examples_by_kind with these kinds) when already read, to skip reading them again."""
        rows = self._q(f"""SELECT kind, grp, lo, hi, n_tokens, share FROM groups
                           WHERE sae_id = ? AND feature = ? AND kind IN ({', '.join('?' * len(kinds))})
                           ORDER BY kind, grp DESC""", [sae_id, index, *kinds])
        groups: dict[str, dict[int, Group]] = {k: {} for k in kinds}
        for r in rows:
            groups[r[0]][r[1]] = Group(*r)
        if examples is None:
            examples = self.examples_by_kind(sae_id, index, kinds)
        for kind in kinds:
            for ex in examples.get(kind, []):
                if ex.grp in groups[kind]:
                    groups[kind][ex.grp].examples.append(ex)
        return {k: list(g.values()) for k, g in groups.items()}

    def stats(self, sae_id: str) -> dict[str, int]:
        """Row counts and coverage, for reports and benchmarks."""
        top_k = int(self._saes[sae_id].params.get("top_k", 20))
        q = lambda sql: int(self._q(sql, [sae_id])[0][0])  # noqa: E731
        return {
            "examples": q("SELECT count(*) FROM examples WHERE sae_id = ?"),
            "contexts": q("SELECT count(*) FROM contexts WHERE sae_id = ?"),
            "live_features": q("SELECT count(*) FROM features WHERE sae_id = ? AND n_active > 0"),
            "full_top_k": q(f"""SELECT count(*) FROM (SELECT feature FROM examples WHERE sae_id = ? AND kind = 'top'
                                GROUP BY feature HAVING count(*) >= {top_k})"""),
        }

    # ---------------------------------------------------------------- explanations
    def explanation_scores(self, sae_id: str) -> list[float]:
        """The score of every feature with a scored explanation (its best), in feature order."""
        return [r[1] for r in self._q(f"SELECT feature, score FROM {_SCORED} WHERE score IS NOT NULL ORDER BY feature",
                                      [sae_id])]

def stored_activations(con, sae_id: str, ctx_ids: list[int]) -> dict[int, tuple[list[int], dict[int, tuple[list[int], list[float]]]]]:
    """What a store holds about some contexts: their token ids, and for each feature that has an example in the
    context (top, interval or quantile), its stored active positions and values there (the same for every example
    of that feature in that context). Used by `saescope verify`."""
    ids = sorted({int(i) for i in ctx_ids})
    if not ids:
        return {}
    toks = con.execute("SELECT ctx_id, tokens FROM contexts WHERE sae_id = ? AND list_contains(?, ctx_id)",
                       [sae_id, ids]).fetchall()
    out: dict[int, tuple[list[int], dict]] = {c: (list(t), {}) for c, t in toks}
    rows = con.execute("""SELECT ctx_id, feature, any_value(act_pos), any_value(act_val) FROM examples
                          WHERE sae_id = ? AND list_contains(?, ctx_id) GROUP BY ctx_id, feature""",
                       [sae_id, ids]).fetchall()
    for c, f, pos, val in rows:
        if c in out:
            out[c][1][int(f)] = (list(pos), list(val))
    return out


def sae_params(con, sae_id: str) -> dict[str, Any]:
    """The params JSON of one saes row ({} when the SAE is not there); verify reads the dtype from it."""
    rows = con.execute("SELECT params FROM saes WHERE sae_id = ?", [sae_id]).fetchall()
    return json.loads(rows[0][0] or "{}") if rows else {}


def stored_examples(con, sae_id: str, ctx_ids: list[int]) -> dict[int, tuple[list[int], list[tuple]]]:
    """Every example row of some contexts as the pages read it: (feature, value, pos, act_pos, act_val), with
    each context's token ids. `saescope verify` compares every row (not one copy per feature and context)."""
    ids = sorted({int(i) for i in ctx_ids})
    if not ids:
        return {}
    toks = con.execute("SELECT ctx_id, tokens FROM contexts WHERE sae_id = ? AND list_contains(?, ctx_id)",
                       [sae_id, ids]).fetchall()
    out: dict[int, tuple[list[int], list[tuple]]] = {c: (list(t), []) for c, t in toks}
    rows = con.execute("""SELECT ctx_id, feature, value, pos, act_pos, act_val FROM examples
                          WHERE sae_id = ? AND list_contains(?, ctx_id) ORDER BY ctx_id, feature, kind, grp, rank""",
                       [sae_id, ids]).fetchall()
    for c, f, v, p, ap, av in rows:
        if c in out:
            out[c][1].append((int(f), float(v), int(p), list(ap), list(av)))
    return out
