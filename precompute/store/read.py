"""Reading a store: the only code the server uses to ask questions of the DuckDB file.

Each call opens a cursor of one shared read-only connection (cursors are safe across threads) and returns
small dataclasses; no SQL leaves this module.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from .schema import FEATURES, SAES, SCHEMA_VERSION, STORE_TABLES


class StoreError(Exception):
    """The store is missing, unreadable or of an unknown version; the message says what to do."""


SAEInfo = SAES.row_type("SAEInfo")  # one field per column of the saes table, JSON columns as dicts


@dataclass
class FeatureRow:
    index: int
    density: float
    max_act: float
    mean_act: float
    n_active: int
    top_tokens: list[str]


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


@dataclass
class SearchHit:
    index: int
    score: float
    density: float
    max_act: float
    matched: str
    top_tokens: list[str]


SORTS = {"index": "feature", "density": "density", "max": "max_act"}


def damaged(path: Path, why: object) -> "StoreError":
    return StoreError(f"the store file {path} is damaged or incomplete ({str(why).splitlines()[0][:200]}); rebuild it "
                      f"with `saescope precompute --out {path}` (the same command that made it)")


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; make one with `saescope precompute --out {self.path}`")
        self._lock = threading.Lock()
        self._local = threading.local()
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
        # read every column of every table once: a truncated or corrupt block fails here, not on a later page
        for t in STORE_TABLES:
            self._q(f"SELECT count(*), {', '.join(f'count({n})' for n in t.names)} FROM {t.name}")
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
        except (duckdb.IOException, duckdb.InternalException, duckdb.SerializationException) as err:
            raise damaged(self.path, err) from err

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- SAEs
    def _load_saes(self) -> list[SAEInfo]:
        rows = self._q(f"SELECT {SAES.select_list()} FROM saes ORDER BY sae_id")
        return [SAEInfo(*(json.loads(v or "{}") if c.json else v for c, v in zip(SAES.cols, row))) for row in rows]

    def saes(self) -> list[SAEInfo]:
        return list(self._saes.values())

    def sae(self, sae_id: str) -> SAEInfo | None:
        return self._saes.get(sae_id)

    def vocab(self, model_key: str) -> list[str]:
        if model_key not in self._vocab:
            rows = self._q("SELECT token FROM vocab WHERE model_key = ? ORDER BY token_id", [model_key])
            self._vocab[model_key] = [r[0] for r in rows]
        return self._vocab[model_key]

    def _tok(self, sae_id: str):
        v = self.vocab(self._saes[sae_id].model_key)
        return lambda i: v[i] if 0 <= i < len(v) else f"<id {i}>"

    # ---------------------------------------------------------------- feature lists
    def features(self, sae_id: str, sort: str = "index", desc: bool = False, limit: int = 50, offset: int = 0,
                 min_density: float | None = None, max_density: float | None = None,
                 dead: bool | None = None) -> list[FeatureRow]:
        where, params = self._filters(sae_id, min_density, max_density, dead)
        order = f"{SORTS[sort]} {'DESC' if desc else 'ASC'}, feature"
        rows = self._q(f"""SELECT feature, density, max_act, mean_act, n_active, top_token_ids FROM features
                           WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?""", params + [limit, offset])
        return [self._row(sae_id, r) for r in rows]

    def _row(self, sae_id: str, r: tuple) -> FeatureRow:
        """(feature, density, max_act, mean_act, n_active, top_token_ids) -> FeatureRow."""
        tok = self._tok(sae_id)
        return FeatureRow(r[0], r[1], r[2], r[3], r[4], _dedup([tok(i) for i in r[5]]))

    def features_by_index(self, sae_id: str, indices: list[int]) -> dict[int, FeatureRow]:
        if not indices:
            return {}
        rows = self._q("""SELECT feature, density, max_act, mean_act, n_active, top_token_ids FROM features
                          WHERE sae_id = ? AND list_contains(?, feature)""", [sae_id, list(map(int, indices))])
        return {r[0]: self._row(sae_id, r) for r in rows}

    def count_features(self, sae_id: str, min_density: float | None = None, max_density: float | None = None,
                       dead: bool | None = None) -> int:
        where, params = self._filters(sae_id, min_density, max_density, dead)
        return int(self._q(f"SELECT count(*) FROM features WHERE {where}", params)[0][0])

    @staticmethod
    def _filters(sae_id, min_density, max_density, dead) -> tuple[str, list]:
        where, params = ["sae_id = ?"], [sae_id]
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
        expl = [e[0] for e in self._q("SELECT text FROM explanations WHERE sae_id = ? AND feature = ?",
                                      [sae_id, index])] if self._has_explanations else []
        return Feature(
            sae_id=sae_id, index=index, n_active=r["n_active"], density=r["density"], max_act=r["max_act"],
            mean_act=r["mean_act"], hist_lo=r["hist_lo"], hist_hi=r["hist_hi"], hist=r["hist"],
            top_tokens=_dedup([tok(i) for i in r["top_token_ids"]]),
            logit_pos=[(tok(i), v) for i, v in zip(r["logit_pos_ids"], r["logit_pos_vals"])],
            logit_neg=[(tok(i), v) for i, v in zip(r["logit_neg_ids"], r["logit_neg_vals"])],
            logit_hist_lo=r["logit_hist_lo"], logit_hist_hi=r["logit_hist_hi"], logit_hist=r["logit_hist"],
            neighbours=list(zip(r["neighbours"], r["neighbour_sims"])), explanations=expl)

    def examples(self, sae_id: str, index: int, kind: str = "top") -> list[Example]:
        rows = self._q("""SELECT kind, grp, rank, ctx_id, pos, value, act_pos, act_val FROM examples
                          WHERE sae_id = ? AND feature = ? AND kind = ? ORDER BY grp, rank""",
                       [sae_id, index, kind])
        if not rows:
            return []
        ctx_ids = sorted({r[3] for r in rows})
        ctx = dict(self._q("""SELECT ctx_id, tokens FROM contexts WHERE sae_id = ? AND ctx_id >= ? AND ctx_id <= ?
                              AND list_contains(?, ctx_id)""", [sae_id, ctx_ids[0], ctx_ids[-1], ctx_ids]))
        v = self.vocab(self._saes[sae_id].model_key)
        n = len(v)
        out = []
        for kind_, grp, rank, ctx_id, pos, value, apos, aval in rows:
            tokens = ctx[ctx_id]
            acts = [0.0] * len(tokens)
            for p, a in zip(apos, aval):
                acts[p] = a
            strs = [v[t] if 0 <= t < n else f"<id {t}>" for t in tokens]
            out.append(Example(kind_, grp, rank, ctx_id, pos, value, strs, list(tokens), acts))
        return out

    def groups(self, sae_id: str, index: int, kind: str) -> list[Group]:
        rows = self._q("""SELECT kind, grp, lo, hi, n_tokens, share FROM groups
                          WHERE sae_id = ? AND feature = ? AND kind = ? ORDER BY grp DESC""",
                       [sae_id, index, kind])
        groups = {r[1]: Group(*r) for r in rows}
        for ex in self.examples(sae_id, index, kind):
            if ex.grp in groups:
                groups[ex.grp].examples.append(ex)
        return list(groups.values())

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

    # ---------------------------------------------------------------- search
    def search_tokens(self, sae_id: str, text: str, limit: int = 50, offset: int = 0) -> tuple[list[SearchHit], int]:
        """Features whose top-activating tokens or top positive logits contain `text` (case-insensitive).

        Score: a match at rank r of the top-activating tokens adds 1/(r+1); in the logits, 0.5/(r+1).
        """
        model_key = self._saes[sae_id].model_key
        sql = """
            WITH hits AS (SELECT token_id, token FROM vocab WHERE model_key = ? AND contains(lower(token), lower(?))),
            scored AS (
                SELECT f.feature, u.r, u.t, 1.0 / (u.r) AS s FROM features f,
                       unnest(f.top_token_ids) WITH ORDINALITY AS u(t, r)
                WHERE f.sae_id = ? AND u.t IN (SELECT token_id FROM hits)
                UNION ALL
                SELECT f.feature, u.r, u.t, 0.5 / (u.r) FROM features f,
                       unnest(f.logit_pos_ids) WITH ORDINALITY AS u(t, r)
                WHERE f.sae_id = ? AND u.t IN (SELECT token_id FROM hits)),
            agg AS (SELECT feature, sum(s) AS score, arg_max(t, s) AS best FROM scored GROUP BY feature)
            SELECT a.feature, a.score, f.density, f.max_act, a.best, f.top_token_ids, count(*) OVER () AS total
            FROM agg a JOIN features f ON f.sae_id = ? AND f.feature = a.feature
            ORDER BY a.score DESC, a.feature LIMIT ? OFFSET ?"""
        rows = self._q(sql, [model_key, text, sae_id, sae_id, sae_id, limit, offset])
        tok = self._tok(sae_id)
        total = int(rows[0][6]) if rows else self._count_token_hits(sql, model_key, text, sae_id, offset)
        return [SearchHit(r[0], r[1], r[2], r[3], tok(r[4]), _dedup([tok(i) for i in r[5]])) for r in rows], total

    def _count_token_hits(self, sql: str, model_key: str, text: str, sae_id: str, offset: int) -> int:
        if offset == 0:
            return 0
        rows = self._q(sql, [model_key, text, sae_id, sae_id, sae_id, 1, 0])
        return int(rows[0][6]) if rows else 0

    def search_explanations(self, sae_id: str, text: str, limit: int = 50, offset: int = 0) -> tuple[list[SearchHit], int]:
        """Full-text search over explanations: every query word must occur; ranked by matched-word frequency."""
        words = [w for w in text.lower().split() if w]
        if not words:
            return [], 0
        conds = " AND ".join(["contains(lower(e.text), ?)"] * len(words))
        score = " + ".join(["(length(lower(e.text)) - length(replace(lower(e.text), ?, ''))) / length(?)"] * len(words))
        score_params: list = []
        for w in words:
            score_params += [w, w]
        rows = self._q(f"""SELECT e.feature, max({score}) AS score, f.density, f.max_act, any_value(e.text),
                                  f.top_token_ids, count(*) OVER () AS total
                           FROM explanations e JOIN features f ON f.sae_id = e.sae_id AND f.feature = e.feature
                           WHERE e.sae_id = ? AND {conds}
                           GROUP BY e.feature, f.density, f.max_act, f.top_token_ids
                           ORDER BY score DESC, e.feature LIMIT ? OFFSET ?""",
                       score_params + [sae_id] + words + [limit, offset])
        tok = self._tok(sae_id)
        total = int(rows[0][6]) if rows else 0
        return [SearchHit(r[0], float(r[1]), r[2], r[3], r[4], _dedup([tok(i) for i in r[5]])) for r in rows], total


def _dedup(items: list[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
