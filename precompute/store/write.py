"""Writing: the crash-safe activation cache of a running precompute, and the published store.

While precompute streams, every batch's sparse activations (ctx, pos, feature, value) and its contexts' tokens
go into a work DuckDB file in one transaction together with the progress counter, so a kill -9 loses at most
the batch in flight and a restart resumes after the last committed batch. When the stream is done, one set of
SQL queries (exact, out-of-core) turns the cache into per-feature dashboard data, written to a temporary copy
of the store that then replaces the store with an atomic rename: a reader never sees a half-written store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from .schema import (ACTS, CACHE_TABLES, CONTEXTS, CTX_TOKENS, EXAMPLES, EXPLANATIONS, FEATURES, GROUPS, META,
                     PER_SAE_TABLES, PRIORITY_SQL, RUN, SAES, SCHEMA_VERSION, STORE_TABLES, VOCAB, create_all)

log = logging.getLogger(__name__)


class ActivationCache:
    """The work file of one precompute run."""

    def __init__(self, path: Path, fingerprint: dict[str, Any], restart: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        if restart and path.exists():
            path.unlink()
            Path(str(path) + ".wal").unlink(missing_ok=True)
        self.path = path
        self.con = duckdb.connect(str(path))
        _run(self.con, "SET preserve_insertion_order = false")
        _run(self.con, create_all(CACHE_TABLES))
        want = json.dumps(fingerprint, sort_keys=True)
        row = next(iter(self.con.execute("SELECT value FROM run WHERE key = 'fingerprint'").fetchall()), None)
        if row is None:
            _run(self.con, f"INSERT INTO {RUN.name} (key, value) VALUES ('fingerprint', ?), ('contexts_done', '0')", [want])
        elif row[0] != want:
            have = json.loads(row[0])
            diff = {k: (have.get(k), v) for k, v in fingerprint.items() if have.get(k) != v}
            raise ValueError(f"{path} holds an unfinished run with other settings ({diff}: was, now); "
                             "rerun with --restart to discard it, or repeat the original command to resume it")

    @property
    def contexts_done(self) -> int:
        return int(self.con.execute("SELECT value FROM run WHERE key = 'contexts_done'").fetchall()[0][0])

    def append(self, first_ctx: int, tokens: np.ndarray, n_counted: np.ndarray, ctx: np.ndarray, pos: np.ndarray,
               feature: np.ndarray, value: np.ndarray) -> None:
        """One batch, atomically: tokens (B, T) int32; sparse activations as parallel arrays."""
        B = tokens.shape[0]
        acts = pa.table({"ctx": pa.array(ctx, pa.int32()), "pos": pa.array(pos, pa.int16()),
                         "feature": pa.array(feature, pa.int32()), "value": pa.array(value, pa.float32())})
        ctxs = pa.table({"ctx": pa.array(np.arange(first_ctx, first_ctx + B, dtype=np.int32)),
                         "tokens": pa.array(list(tokens), pa.list_(pa.int32())),
                         "n_counted": pa.array(n_counted, pa.int32())})
        con = self.con
        _run(con, "BEGIN TRANSACTION")
        try:
            con.register("batch_acts", acts)
            con.register("batch_ctx", ctxs)
            _run(con, ACTS.insert_sql("batch_acts"))
            _run(con, CTX_TOKENS.insert_sql("batch_ctx"))
            _run(con, "UPDATE run SET value = ? WHERE key = 'contexts_done'", [str(first_ctx + B)])
            _run(con, "COMMIT")
        except BaseException:
            _run(con, "ROLLBACK")
            raise
        finally:
            con.unregister("batch_acts")
            con.unregister("batch_ctx")

    def close(self) -> None:
        self.con.close()


def _run(con, sql: str, params: list | None = None) -> list:
    """Execute and drain (DuckDB 2 refuses new work while a result is unread)."""
    return con.execute(sql, params or []).fetchall()


def _list_col(values: list, typ: pa.DataType) -> pa.Array:
    return pa.array(values, pa.list_(typ))


class StoreBuilder:
    """Builds the dashboard tables of one SAE from a finished cache into a temporary copy of the store."""

    def __init__(self, out: Path, memory_limit: str):
        self.out = out
        self.tmp = out.with_name(out.name + ".tmp")
        self.tmp.unlink(missing_ok=True)
        Path(str(self.tmp) + ".wal").unlink(missing_ok=True)
        if out.exists():
            check_version(out)
            shutil.copyfile(out, self.tmp)
        self.con = duckdb.connect(str(self.tmp))
        _run(self.con, f"SET memory_limit = '{memory_limit}'")
        _run(self.con, create_all(STORE_TABLES))
        _run(self.con, f"INSERT OR REPLACE INTO {META.name} (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def replace_sae(self, sae_id: str) -> None:
        for t in PER_SAE_TABLES:
            _run(self.con, f"DELETE FROM {t.name} WHERE sae_id = ?", [sae_id])

    def put_vocab(self, model_key: str, tokens: list[str]) -> None:
        if self.con.execute("SELECT count(*) FROM vocab WHERE model_key = ?", [model_key]).fetchall()[0][0]:
            return
        tbl = pa.table({"model_key": pa.array([model_key] * len(tokens)),
                        "token_id": pa.array(np.arange(len(tokens), dtype=np.int32)), "token": pa.array(tokens)})
        self.con.register("v", tbl)
        _run(self.con, VOCAB.insert_sql("v"))
        self.con.unregister("v")

    def examples_from_cache(self, cache: Path, sae_id: str, d_sae: int, context_len: int, top_k: int,
                            n_intervals: int, per_interval: int, n_quantiles: int, per_quantile: int,
                            hist_bins: int) -> dict[str, np.ndarray]:
        """All activation-derived tables; returns per-feature stat arrays for the features table."""
        con = self.con
        quoted = str(cache).replace("'", "''")
        _run(con, f"ATTACH '{quoted}' AS saescope_cache (READ_ONLY)")
        prio = PRIORITY_SQL.format(T=context_len)
        _run(con, """CREATE TEMP TABLE fstats AS SELECT feature, count(*) AS n, max(value) AS mx,
                       min(value) AS mn, avg(value::DOUBLE) AS mean FROM saescope_cache.acts GROUP BY feature""")
        # top-k: the strongest context per feature, one example per context, ties to the earlier token/context
        _run(con, f"""CREATE TEMP TABLE ex AS
            WITH per_ctx AS (
                SELECT feature, ctx, pos, value FROM saescope_cache.acts
                QUALIFY row_number() OVER (PARTITION BY feature, ctx ORDER BY value DESC, pos) = 1)
            SELECT feature, 'top' AS kind, 0 AS grp,
                   row_number() OVER (PARTITION BY feature ORDER BY value DESC, ctx) - 1 AS rank, ctx, pos, value
            FROM per_ctx QUALIFY rank < {top_k}""")
        # equal-width intervals of (0, max]: never zero, each sampled by lowest priority
        _run(con, f"""CREATE TEMP TABLE binned AS
            SELECT a.feature, a.ctx, a.pos, a.value,
                   least(floor(a.value::DOUBLE / s.mx::DOUBLE * {n_intervals}), {n_intervals - 1})::INTEGER AS ibin,
                   (ntile({n_quantiles}) OVER (PARTITION BY a.feature ORDER BY a.value, a.ctx, a.pos)) - 1 AS qbin,
                   {prio} AS prio
            FROM saescope_cache.acts a JOIN fstats s USING (feature)""")
        for kind, col, per, lo_expr, hi_expr in (
            ("interval", "ibin", per_interval, f"any_value(s.mx) * ibin / {n_intervals}", f"any_value(s.mx) * (ibin + 1) / {n_intervals}"),
            ("quantile", "qbin", per_quantile, "min(b.value)", "max(b.value)"),
        ):
            _run(con, f"""INSERT INTO ex (feature, kind, grp, rank, ctx, pos, value) SELECT feature, '{kind}', {col}, rank, ctx, pos, value FROM (
                SELECT feature, {col}, ctx, pos, value,
                       row_number() OVER (PARTITION BY feature, {col} ORDER BY prio) - 1 AS rank FROM binned)
                WHERE rank < {per}""")
            _run(con, f"""INSERT INTO groups ({GROUPS.select_list()}) SELECT ?, b.feature, '{kind}', {col}, {lo_expr}, {hi_expr},
                count(*), count(*)::DOUBLE / any_value(s.n) FROM binned b JOIN fstats s USING (feature)
                GROUP BY b.feature, {col} ORDER BY b.feature, {col}""", [sae_id])
        # rows go in sorted by feature, so DuckDB's min/max zone maps let a page read only its own row groups
        _run(con, f"""INSERT INTO examples ({EXAMPLES.select_list()})
            SELECT ?, e.feature, e.kind, e.grp, e.rank, e.ctx, e.pos, e.value,
                   list(a.pos ORDER BY a.pos), list(a.value ORDER BY a.pos)
            FROM ex e JOIN saescope_cache.acts a ON a.feature = e.feature AND a.ctx = e.ctx
            GROUP BY ALL ORDER BY e.feature, e.kind, e.grp, e.rank""", [sae_id])
        _run(con, f"""INSERT INTO contexts ({CONTEXTS.select_list()}) SELECT ?, t.ctx, t.tokens FROM saescope_cache.ctx_tokens t
                       WHERE t.ctx IN (SELECT DISTINCT ctx FROM ex) ORDER BY t.ctx""", [sae_id])
        # histograms of active values over [min, max]
        hist = np.zeros((d_sae, hist_bins), dtype=np.int64)
        f, b, n = con.execute(f"""SELECT b.feature, least(floor((b.value - s.mn)::DOUBLE /
                    greatest((s.mx - s.mn)::DOUBLE, 1e-12) * {hist_bins}), {hist_bins - 1})::INTEGER AS bin, count(*)
                FROM saescope_cache.acts b JOIN fstats s USING (feature) GROUP BY ALL""").fetchnumpy().values()
        np.add.at(hist, (f.astype(np.int64), b.astype(np.int64)), n.astype(np.int64))
        stats = con.execute("SELECT feature, n, mx, mn, mean FROM fstats").fetchnumpy()
        top_tok = con.execute("""SELECT e.feature, list(t.tokens[e.pos + 1] ORDER BY e.rank)
                FROM ex e JOIN saescope_cache.ctx_tokens t ON t.ctx = e.ctx WHERE e.kind = 'top' GROUP BY e.feature""").fetchall()
        n_counted = int(con.execute("SELECT sum(n_counted) FROM saescope_cache.ctx_tokens").fetchall()[0][0] or 0)
        n_ctx = int(con.execute("SELECT count(*) FROM saescope_cache.ctx_tokens").fetchall()[0][0])
        _run(con, "DROP TABLE binned")
        _run(con, "DROP TABLE ex")
        _run(con, "DETACH saescope_cache")
        out = {k: np.zeros(d_sae, dtype=np.float64) for k in ("n", "mx", "mn", "mean")}
        idx = stats["feature"].astype(np.int64)
        for k in out:
            out[k][idx] = np.asarray(stats[k], dtype=np.float64)
        out["hist"] = hist
        out["top_tokens"] = {int(fe): list(tt) for fe, tt in top_tok}
        out["n_counted"] = n_counted
        out["n_ctx"] = n_ctx
        return out

    def put_features(self, sae_id: str, stats: dict[str, Any], logits: dict[str, np.ndarray],
                     neighbours: tuple[np.ndarray, np.ndarray]) -> None:
        d_sae = len(stats["n"])
        n_counted = max(1, stats["n_counted"])
        active = stats["n"] > 0
        cols = {
            "sae_id": pa.array([sae_id] * d_sae),
            "feature": pa.array(np.arange(d_sae, dtype=np.int32)),
            "n_active": pa.array(stats["n"].astype(np.int64)),
            "density": pa.array(stats["n"] / n_counted),
            "max_act": pa.array(stats["mx"].astype(np.float32)),
            "mean_act": pa.array(stats["mean"].astype(np.float32)),
            "hist_lo": pa.array(np.where(active, stats["mn"], 0).astype(np.float32)),
            "hist_hi": pa.array(np.where(active, stats["mx"], 0).astype(np.float32)),
            "hist": _list_col([list(map(int, r)) for r in stats["hist"]], pa.int32()),
            "top_token_ids": _list_col([stats["top_tokens"].get(i, []) for i in range(d_sae)], pa.int32()),
            "logit_pos_ids": _list_col(logits["pos_ids"].tolist(), pa.int32()),
            "logit_pos_vals": _list_col(logits["pos_vals"].tolist(), pa.float32()),
            "logit_neg_ids": _list_col(logits["neg_ids"].tolist(), pa.int32()),
            "logit_neg_vals": _list_col(logits["neg_vals"].tolist(), pa.float32()),
            "logit_hist_lo": pa.array(logits["hist_lo"].astype(np.float32)),
            "logit_hist_hi": pa.array(logits["hist_hi"].astype(np.float32)),
            "logit_hist": _list_col(logits["hist"].tolist(), pa.int32()),
            "neighbours": _list_col(neighbours[0].tolist(), pa.int32()),
            "neighbour_sims": _list_col(neighbours[1].tolist(), pa.float32()),
        }
        assert list(cols) == FEATURES.names, "features columns differ from the schema"
        self.con.register("f", pa.table(cols))
        _run(self.con, FEATURES.insert_sql("f"))
        self.con.unregister("f")

    def put_sae(self, row: dict[str, Any]) -> None:
        """One row of the saes table: exactly the schema's columns (JSON columns given as dicts)."""
        missing, extra = set(SAES.names) - set(row), set(row) - set(SAES.names)
        if missing or extra:
            raise ValueError(f"saes row: missing {sorted(missing)}, unknown {sorted(extra)}")
        values = [json.dumps(row[c.name], default=str) if c.json else row[c.name] for c in SAES.cols]
        _run(self.con, f"INSERT INTO {SAES.name} ({SAES.select_list()}) VALUES ({', '.join('?' * len(values))})", values)

    def publish(self) -> None:
        """Checkpoint, close, fsync, and atomically replace the store."""
        _run(self.con, "CHECKPOINT")
        self.con.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        try:
            self.con.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def check_version(path: Path) -> None:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = next(iter(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()), None)
    except duckdb.Error:
        row = None
    finally:
        con.close()
    if row is None or int(row[0]) != SCHEMA_VERSION:
        raise ValueError(f"{path} is not a saescope store of schema version {SCHEMA_VERSION} "
                         f"(found {row[0] if row else 'none'}); rebuild it with `saescope precompute --out {path}`")


def add_explanations(path: Path, sae_id: str, rows: list[tuple[int, str]], source: str, replace: bool = False) -> int:
    """Add (feature, text) explanations to one SAE of a store: copy, write, atomic rename."""
    check_version(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(path, tmp)
    con = duckdb.connect(str(tmp))
    try:
        d_sae = con.execute("SELECT d_sae FROM saes WHERE sae_id = ?", [sae_id]).fetchall()
        if not d_sae:
            have = [r[0] for r in con.execute("SELECT sae_id FROM saes ORDER BY sae_id").fetchall()]
            raise ValueError(f"{path} has no SAE {sae_id!r}; valid: {', '.join(have) or 'none'}")
        bad = [i for i, _ in rows if not 0 <= i < d_sae[0][0]]
        if bad:
            raise ValueError(f"feature indices {bad[:5]} are outside 0..{d_sae[0][0] - 1} of {sae_id}")
        if replace:
            _run(con, "DELETE FROM explanations WHERE sae_id = ?", [sae_id])
        tbl = pa.table({"sae_id": pa.array([sae_id] * len(rows)), "feature": pa.array([i for i, _ in rows], pa.int32()),
                        "text": pa.array([t for _, t in rows]), "source": pa.array([source] * len(rows))})
        con.register("new_expl", tbl)
        _run(con, EXPLANATIONS.insert_sql("new_expl"))
        con.unregister("new_expl")
        _run(con, "CHECKPOINT")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, path)
    return len(rows)
