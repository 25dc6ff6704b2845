"""Writing: the table builder over a run's sealed activations, and the published store.

While precompute streams, pipeline/workdir.py keeps the activations (crash-safe, resumable) and seals them into Parquet
partitioned by feature bucket. Then `build_range` turns one feature range's activations into that range's
dashboard tables (exact SQL, out-of-core, in a fresh DuckDB each time), and `StoreBuilder` assembles the ranges,
the weights-only tables and the provenance into a temporary copy of the store that replaces the store with an
atomic rename: a reader never sees a half-written store.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from ..config import PRECOMPUTE
from .read import sae_params, stored_activations, stored_examples
from .schema import (CONTRAST_FEATURES, CONTRAST_TEXTS, CONTRASTS, CROSS, CONTEXTS, EXAMPLES, EXPLANATIONS, FEATURES,
                     GRAPHS, GROUPS, META, PER_SAE_TABLES, PRIORITY_SQL, QUALITY, SAES, SCHEMA_VERSION, STORE_TABLES,
                     VOCAB, create_all)
from ..errors import UnknownSAE, UserError

log = logging.getLogger(__name__)


@dataclass
class SparseActs:
    """The nonzero activations of one SAE on one batch, as parallel arrays (global context ids)."""

    ctx: np.ndarray  # (N,) int32
    pos: np.ndarray  # (N,) int16
    feature: np.ndarray  # (N,) int32
    value: np.ndarray  # (N,) float32


@dataclass
class FeatureStats:
    """One SAE's per-feature statistics, gathered from its feature ranges (`StoreBuilder.put_range`) and the
    contexts (`put_contexts`), written as the features table (`put_features`)."""

    n: np.ndarray  # (d_sae,) float64: active token positions
    mx: np.ndarray  # (d_sae,) float64: largest activation
    mn: np.ndarray  # (d_sae,) float64: smallest nonzero activation
    mean: np.ndarray  # (d_sae,) float64: mean nonzero activation
    hist: np.ndarray  # (d_sae, hist_bins) int64: activation histogram between mn and mx
    top_tokens: dict[int, list[int]] = field(default_factory=dict)  # feature -> its most frequent active token ids
    used_ctx: list[np.ndarray] = field(default_factory=list)  # int32 context ids the examples show, per range
    n_ctx: int = 0  # contexts streamed
    n_counted: int = 0  # token positions counted (special tokens excluded)

    @classmethod
    def empty(cls, d_sae: int, hist_bins: int) -> "FeatureStats":
        n, mx, mn, mean = (np.zeros(d_sae, dtype=np.float64) for _ in range(4))
        return cls(n, mx, mn, mean, np.zeros((d_sae, hist_bins), dtype=np.int64))

    def used_contexts(self) -> np.ndarray:
        return np.concatenate(self.used_ctx) if self.used_ctx else np.zeros(0, np.int32)


UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
STORE_SHARE = 0.25  # of --memory-limit for the store being assembled, which mostly appends (build_range gets all)


def size_bytes(size: str) -> int:
    """'1.5GB' -> 1500000000; a readable ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", size)
    if not m or m.group(2).upper() not in UNITS:
        raise UserError(f"--memory-limit {size!r} is not a size; write e.g. 512MB, 2GB or 1.5GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def configure(con, memory_limit: str, temp_dir: Path | None, threads: int | None = None, share: float = 1.0) -> None:
    """Bound a DuckDB connection: memory limit (share of it), spill folder, no order bookkeeping, thread count."""
    limit = max(64 * 2**20, int(size_bytes(memory_limit) * share))
    _run(con, f"SET memory_limit = '{limit // 2**20}MiB'")
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        _run(con, f"SET temp_directory = '{str(temp_dir).replace(chr(39), chr(39) * 2)}'")
    _run(con, "SET preserve_insertion_order = false")
    _run(con, f"SET threads = {int(threads or PRECOMPUTE.duckdb_threads)}")


def _run(con, sql: str, params: list | None = None) -> list:
    """Execute and drain (DuckDB 2 refuses new work while a result is unread)."""
    return con.execute(sql, params or []).fetchall()


def feature_ranges(counts: np.ndarray, rows_per_range: int) -> list[tuple[int, int]]:
    """Consecutive feature ranges [lo, hi] holding about rows_per_range activations each (a feature that alone
    holds more is a range of its own)."""
    ranges, lo, acc = [], 0, 0
    for f, n in enumerate(counts):
        if acc and acc + n > rows_per_range:
            ranges.append((lo, f - 1))
            lo, acc = f, 0
        acc += int(n)
    ranges.append((lo, len(counts) - 1))
    return ranges


def _sql_str(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join(_sql_str(p) for p in paths) + "]"


@dataclass(frozen=True)
class SampleSpec:
    """What the table builder keeps per feature (PrecomputeSpec's fields of the same names)."""

    context_len: int
    top_k: int
    n_intervals: int
    per_interval: int
    n_quantiles: int
    per_quantile: int
    hist_bins: int


ENGINES = ("kernel", "sql")


def build_range(act_files: list[str], ctx_files: list[str], lo: int, hi: int, out: Path, spec: SampleSpec,
                memory_limit: str = PRECOMPUTE.memory_limit, temp_dir: Path | None = None,
                engine: str = "kernel") -> Path:
    """Every activation-derived table of features lo..hi (inclusive), from sealed Parquet, into Parquet files in
    `out` (examples, groups, stats, hist, top). engine "kernel" (the default): the range's rows read into arrays,
    sorted by (feature, ctx, pos) and turned into the tables by compiled kernels (store/kernels.py); "sql": the
    reference, exact SQL in a fresh in-memory DuckDB whose memory goes back to the system when it closes. Both give
    the same files (tests/test_kernels.py). `out` appears complete or not at all (a folder renamed into place), so
    a killed run rebuilds only the ranges it had not finished. Pure function of its inputs: the same rows give the
    same files wherever it runs (a Ray task on another node, or the precompute process)."""
    if engine not in ENGINES:
        raise UserError(f"table engine {engine!r}: use one of {', '.join(ENGINES)}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if engine == "kernel" and _build_range_kernel(act_files, ctx_files, lo, hi, tmp, spec):
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out
    s = spec
    prio = PRIORITY_SQL.format(T=s.context_len)
    con = duckdb.connect()
    configure(con, memory_limit, temp_dir)
    try:
        _run(con, f"""CREATE TEMP TABLE r AS SELECT feature, ctx, pos, value FROM read_parquet({_sql_list(act_files)})
                      WHERE feature BETWEEN {int(lo)} AND {int(hi)}""")
        # the mean sums in (ctx, pos) order: the same double whichever shard or thread held a row
        _run(con, """CREATE TEMP TABLE fstats AS SELECT feature, count(*) AS n, max(value) AS mx, min(value) AS mn,
                     avg(value::DOUBLE ORDER BY ctx, pos) AS mean FROM r GROUP BY feature""")
        # top-k: the strongest context per feature, one example per context, ties to the earlier token/context
        _run(con, f"""CREATE TEMP TABLE ex AS
            WITH per_ctx AS (
                SELECT feature, ctx, pos, value FROM r
                QUALIFY row_number() OVER (PARTITION BY feature, ctx ORDER BY value DESC, pos) = 1)
            SELECT feature, 'top' AS kind, 0 AS grp,
                   row_number() OVER (PARTITION BY feature ORDER BY value DESC, ctx) - 1 AS rank, ctx, pos, value
            FROM per_ctx QUALIFY rank < {s.top_k}""")
        # equal-width intervals of (0, max]: never zero, each sampled by lowest priority; quantiles by rank
        _run(con, f"""CREATE TEMP TABLE binned AS
            SELECT a.feature, a.ctx, a.pos, a.value,
                   least(floor(a.value::DOUBLE / s.mx::DOUBLE * {s.n_intervals}), {s.n_intervals - 1})::INTEGER AS ibin,
                   (ntile({s.n_quantiles}) OVER (PARTITION BY a.feature ORDER BY a.value, a.ctx, a.pos)) - 1 AS qbin,
                   {prio} AS prio
            FROM r a JOIN fstats s USING (feature)""")
        _run(con, "CREATE TEMP TABLE grp (feature INTEGER, kind VARCHAR, grp SMALLINT, lo REAL, hi REAL, "
                  "n_tokens BIGINT, share DOUBLE)")
        for kind, col, per, lo_expr, hi_expr in (
            ("interval", "ibin", s.per_interval, f"any_value(s.mx) * ibin / {s.n_intervals}",
             f"any_value(s.mx) * (ibin + 1) / {s.n_intervals}"),
            ("quantile", "qbin", s.per_quantile, "min(b.value)", "max(b.value)"),
        ):
            _run(con, f"""INSERT INTO ex (feature, kind, grp, rank, ctx, pos, value)
                SELECT feature, '{kind}', {col}, rank, ctx, pos, value FROM (
                    SELECT feature, {col}, ctx, pos, value,
                           row_number() OVER (PARTITION BY feature, {col} ORDER BY prio) - 1 AS rank FROM binned)
                WHERE rank < {per}""")
            _run(con, f"""INSERT INTO grp SELECT b.feature, '{kind}', {col}, {lo_expr}, {hi_expr},
                count(*), count(*)::DOUBLE / any_value(s.n) FROM binned b JOIN fstats s USING (feature)
                GROUP BY b.feature, {col}""")
        _run(con, "DROP TABLE binned")
        # one activation list per distinct (feature, context), built once and joined to every example that shows
        # that context (a top example is often an interval/quantile sample too)
        _run(con, f"""COPY (
            WITH pairs AS (SELECT DISTINCT feature, ctx FROM ex),
            lists AS (SELECT a.feature, a.ctx, list(a.pos ORDER BY a.pos) AS ps, list(a.value ORDER BY a.pos) AS vs
                      FROM r a SEMI JOIN pairs p ON a.feature = p.feature AND a.ctx = p.ctx GROUP BY ALL)
            SELECT e.feature, e.kind, e.grp::SMALLINT AS grp, e.rank::SMALLINT AS rank, e.ctx AS ctx_id, e.pos,
                   e.value, l.ps::SMALLINT[] AS act_pos, l.vs AS act_val
            FROM ex e JOIN lists l USING (feature, ctx) ORDER BY e.feature, e.kind, e.grp, e.rank
            ) TO {_sql_str(tmp / 'examples.parquet')} (FORMAT parquet)""")
        _run(con, f"COPY (SELECT * FROM grp ORDER BY feature, kind, grp) TO {_sql_str(tmp / 'groups.parquet')} (FORMAT parquet)")
        _run(con, f"COPY (SELECT feature, n, mx, mn, mean FROM fstats ORDER BY feature) TO {_sql_str(tmp / 'stats.parquet')} (FORMAT parquet)")
        # histograms of active values over [min, max]
        _run(con, f"""COPY (SELECT b.feature, least(floor((b.value - s.mn)::DOUBLE /
                    greatest((s.mx - s.mn)::DOUBLE, 1e-12) * {s.hist_bins}), {s.hist_bins - 1})::INTEGER AS bin,
                    count(*) AS n FROM r b JOIN fstats s USING (feature) GROUP BY ALL ORDER BY ALL)
                  TO {_sql_str(tmp / 'hist.parquet')} (FORMAT parquet)""")
        _run(con, f"""COPY (SELECT e.feature, list(t.tokens[e.pos + 1] ORDER BY e.rank) AS tokens
                    FROM ex e JOIN read_parquet({_sql_list(ctx_files)}) t ON t.ctx = e.ctx WHERE e.kind = 'top'
                    GROUP BY e.feature ORDER BY e.feature) TO {_sql_str(tmp / 'top.parquet')} (FORMAT parquet)""")
    finally:
        con.close()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


RANGE_TABLES = ("examples", "groups", "stats", "hist", "top")


def read_range_table(folder: Path, name: str) -> pa.Table:
    """One table of a built range's folder: NAME.arrow (kernel engine) or NAME.parquet (SQL engine)."""
    import pyarrow.parquet as pq

    ipc = Path(folder) / f"{name}.arrow"
    if ipc.exists():
        with pa.memory_map(str(ipc)) as src:
            return pa.ipc.open_file(src).read_all()
    return pq.read_table(Path(folder) / f"{name}.parquet")


def _read_rows(act_files: list[str], lo: int, hi: int) -> dict[str, np.ndarray]:
    """The rows of features lo..hi from sealed Parquet, sorted by (feature, ctx, pos)."""
    import pyarrow.parquet as pq

    cols = ("feature", "ctx", "pos", "value")
    parts = []
    for path in act_files:  # whole bucket files (a range is whole buckets but at its ends), filtered here
        t = pq.ParquetFile(path).read(columns=list(cols))
        x = {k: t.column(k).to_numpy() for k in cols}
        keep = (x["feature"] >= lo) & (x["feature"] <= hi)
        parts.append(x if keep.all() else {k: a[keep] for k, a in x.items()})
    if not parts:
        return {k: np.zeros(0, d) for k, d in zip(cols, (np.int32, np.int32, np.int16, np.float32))}
    rows = {k: np.concatenate([x[k] for x in parts]) for k in cols}
    # one int64 key; the files are concatenations of sorted runs, which the stable sort (timsort) merges
    n_tok = (int(rows["ctx"].max()) + 1) * (int(rows["pos"].max()) + 1) if len(rows["ctx"]) else 1
    span = int(rows["pos"].max()) + 1 if len(rows["pos"]) else 1
    key = (rows["feature"].astype(np.int64) - lo) * n_tok + rows["ctx"].astype(np.int64) * span + rows["pos"]
    order = np.argsort(key, kind="stable")
    return {k: np.ascontiguousarray(v[order]) for k, v in rows.items()}


_CTX_CACHE: dict = {}
_CTX_LOCK = threading.Lock()  # ranges built in threads share the cache


def _context_tokens(ctx_files: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ctx ids ascending, list offsets, flat token ids) of the sealed contexts; the last set read is kept (the
    ranges of one run read the same files; ranges built in threads wait for one read)."""
    key = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in ctx_files)
    with _CTX_LOCK:
        return _context_tokens_locked(key, ctx_files)


def _context_tokens_locked(key: tuple, ctx_files: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    if key not in _CTX_CACHE:
        ids, offs, vals, base = [], [np.zeros(1, np.int64)], [], 0
        for p in ctx_files:
            t = pq.read_table(p, columns=["ctx", "tokens"])
            lst = t.column("tokens").combine_chunks()
            ids.append(t.column("ctx").to_numpy())
            o = lst.offsets.to_numpy().astype(np.int64)
            offs.append(o[1:] - o[0] + base)
            vals.append(lst.values.to_numpy()[o[0]:o[-1]])
            base += int(o[-1] - o[0])
        ctx = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        off = np.concatenate(offs)
        val = np.concatenate(vals) if vals else np.zeros(0, np.int32)
        order = np.argsort(ctx, kind="stable")
        starts, ends = off[:-1][order], off[1:][order]
        _CTX_CACHE.clear()
        _CTX_CACHE[key] = (ctx[order], starts, ends, val)
    return _CTX_CACHE[key]


def clear_context_cache() -> None:
    """Drop the context tokens build_range's kernels keep between ranges (4 bytes per streamed token)."""
    with _CTX_LOCK:
        _CTX_CACHE.clear()


def _list_array(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A list column whose row i is values[starts[i]:ends[i]]."""
    from .kernels import gather_segments

    offsets, flat = gather_segments(values, starts.astype(np.int64), ends.astype(np.int64))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, typ), type=pa.list_(pa.field("element", typ)))


KIND_NAMES = np.array(["interval", "quantile", "top"], dtype=object)


def _build_range_kernel(act_files: list[str], ctx_files: list[str], lo: int, hi: int, tmp: Path,
                        spec: SampleSpec) -> bool:
    """build_range's kernel engine (store/kernels.py) into the folder tmp; False (nothing written) when the rows
    hold a value the kernels do not take (not finite and positive): the SQL then builds the range."""
    from .kernels import range_kernel

    s = spec
    r = _read_rows(act_files, lo, hi)
    f, c, p, v = r["feature"], r["ctx"], r["pos"], r["value"]
    if len(v) and not (np.isfinite(v).all() and (v > 0).all()):
        return False
    n_rows = len(f)
    cut = np.flatnonzero(f[1:] != f[:-1]) + 1 if n_rows else np.zeros(0, np.int64)
    starts = np.concatenate([[0], cut, [n_rows]]).astype(np.int64) if n_rows else np.zeros(1, np.int64)
    feats = f[starts[:-1]] if n_rows else np.zeros(0, np.int32)
    (n, mx, mn, mean, hist, g_feat, g_kind, g_bin, g_lo, g_hi, g_cnt,
     e_feat, e_kind, e_grp, e_rank, e_row) = range_kernel(f, c, p, v, starts, int(s.context_len), int(s.top_k),
                                                          int(s.n_intervals), int(s.per_interval),
                                                          int(s.n_quantiles), int(s.per_quantile), int(s.hist_bins))

    def write(name: str, cols: dict) -> None:
        # scratch files read once by put_range (or sent back by a Ray task): Arrow IPC, 10x faster to write than
        # Parquet for the examples' activation lists
        tbl = pa.table(cols)
        with pa.OSFile(str(tmp / name.replace(".parquet", ".arrow")), "wb") as sink:
            with pa.ipc.new_file(sink, tbl.schema) as w:
                w.write_table(tbl)

    # one activation list per example: the (feature, ctx) segment of the sorted rows holding its row
    new = np.ones(n_rows, bool)
    if n_rows:
        new[1:] = (f[1:] != f[:-1]) | (c[1:] != c[:-1])
    seg_start = np.flatnonzero(new)
    seg_end = np.append(seg_start[1:], n_rows)
    seg = np.cumsum(new) - 1
    es = seg[e_row]
    write("examples.parquet", {
        "feature": pa.array(feats[e_feat], pa.int32()),
        "kind": pa.array(KIND_NAMES[e_kind], pa.string()),
        "grp": pa.array(e_grp.astype(np.int16), pa.int16()),
        "rank": pa.array(e_rank.astype(np.int16), pa.int16()),
        "ctx_id": pa.array(c[e_row], pa.int32()),
        "pos": pa.array(p[e_row], pa.int16()),
        "value": pa.array(v[e_row], pa.float32()),
        "act_pos": _list_array(p, seg_start[es], seg_end[es], pa.int16()),
        "act_val": _list_array(v, seg_start[es], seg_end[es], pa.float32()),
    })
    write("groups.parquet", {
        "feature": pa.array(feats[g_feat], pa.int32()),
        "kind": pa.array(KIND_NAMES[g_kind], pa.string()),
        "grp": pa.array(g_bin.astype(np.int16), pa.int16()),
        "lo": pa.array(g_lo, pa.float32()), "hi": pa.array(g_hi, pa.float32()),
        "n_tokens": pa.array(g_cnt, pa.int64()),
        "share": pa.array(g_cnt / n[g_feat].astype(np.float64), pa.float64()),
    })
    write("stats.parquet", {"feature": pa.array(feats, pa.int32()), "n": pa.array(n, pa.int64()),
                            "mx": pa.array(mx, pa.float32()), "mn": pa.array(mn, pa.float32()),
                            "mean": pa.array(mean, pa.float64())})
    hf, hb = np.nonzero(hist)
    write("hist.parquet", {"feature": pa.array(feats[hf], pa.int32()), "bin": pa.array(hb.astype(np.int32), pa.int32()),
                           "n": pa.array(hist[hf, hb], pa.int64())})
    top = e_kind == 2
    ctx_ids, t_start, t_end, tok = _context_tokens(ctx_files)
    at = np.searchsorted(ctx_ids, c[e_row[top]])
    if len(at) and (at.max() >= len(ctx_ids) or (ctx_ids[at] != c[e_row[top]]).any()):
        raise UserError(f"feature range {lo}..{hi}: an example's context is missing from the sealed contexts")
    tt = tok[t_start[at] + p[e_row[top]]]
    tf = e_feat[top]
    first = np.flatnonzero(np.r_[True, tf[1:] != tf[:-1]]) if len(tf) else np.zeros(0, np.int64)
    offsets = np.append(first, len(tf)).astype(np.int32)
    write("top.parquet", {"feature": pa.array(feats[tf[first]] if len(tf) else np.zeros(0, np.int32), pa.int32()),
                          "tokens": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(tt, pa.int32()),
                                                               type=pa.list_(pa.field("element", pa.int32())))})
    return True


def read_active(act_files: list[str], context_len: int, memory_limit: str = PRECOMPUTE.memory_limit,
                temp_dir: Path | None = None):
    """A reader for co-occurrence: read(t0, t1) -> (token index ctx*T+pos int64, feature int32) of every
    activation on tokens t0 <= index < t1, from the sealed Parquet files of one SAE. Each call reads only the row
    groups whose ctx range (Parquet statistics) meets the tokens asked for: a sealing chunk holds the contexts of a
    stretch of the stream, so the chunks of one run read every row about once. (memory_limit, temp_dir: unused,
    kept for callers.)"""
    import pyarrow.parquet as pq

    T = int(context_len)
    files: list[tuple[str, Any, np.ndarray, np.ndarray]] = []  # (path, metadata, min ctx, max ctx per row group)
    for path in act_files:
        md = pq.read_metadata(path)
        ci = md.schema.to_arrow_schema().get_field_index("ctx")
        lo, hi = [], []
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(ci).statistics
            ok = st is not None and st.has_min_max
            lo.append(st.min if ok else -2**31)
            hi.append(st.max if ok else 2**31 - 1)
        files.append((path, md, np.array(lo, np.int64), np.array(hi, np.int64)))

    def read(t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        c0, c1 = int(t0) // T, (int(t1) - 1) // T
        toks, feats = [], []
        for path, md, lo, hi in files:
            want = np.flatnonzero((hi >= c0) & (lo <= c1))
            if not len(want):
                continue
            with pq.ParquetFile(path, metadata=md) as pf:  # opened per call: no descriptor per file held
                t = pf.read_row_groups(want.tolist(), columns=["ctx", "pos", "feature"])
            tok = t.column("ctx").to_numpy().astype(np.int64) * T + t.column("pos").to_numpy()
            keep = (tok >= t0) & (tok < t1)
            toks.append(tok[keep])
            feats.append(t.column("feature").to_numpy()[keep])
        if not toks:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(toks), np.concatenate(feats).astype(np.int32, copy=False)

    return read


def _list_col(values: list, typ: pa.DataType) -> pa.Array:
    return pa.array(values, pa.list_(typ))


class StoreBuilder:
    """Builds the dashboard tables of one or more SAEs from a finished cache into a temporary copy of the store."""

    def __init__(self, out: Path, memory_limit: str = PRECOMPUTE.memory_limit, temp_dir: Path | None = None):
        self.out = out
        self.tmp = out.with_name(out.name + ".tmp")
        self.tmp.unlink(missing_ok=True)
        Path(str(self.tmp) + ".wal").unlink(missing_ok=True)
        if out.exists():
            check_version(out)
            shutil.copyfile(out, self.tmp)
        self.con = duckdb.connect(str(self.tmp))
        configure(self.con, memory_limit, temp_dir, share=STORE_SHARE)
        _run(self.con, create_all(STORE_TABLES))
        _run(self.con, f"INSERT OR REPLACE INTO {META.name} (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def replace_sae(self, sae_id: str) -> None:
        for t in PER_SAE_TABLES:
            _run(self.con, f"DELETE FROM {t.name} WHERE sae_id = ?", [sae_id])
        _run(self.con, f"DELETE FROM {CROSS.name} WHERE other = ?", [sae_id])  # matches into the old version

    def put_vocab(self, model_key: str, tokens: list[str]) -> None:
        if self.con.execute("SELECT count(*) FROM vocab WHERE model_key = ?", [model_key]).fetchall()[0][0]:
            return
        tbl = pa.table({"model_key": pa.array([model_key] * len(tokens)),
                        "token_id": pa.array(np.arange(len(tokens), dtype=np.int32)), "token": pa.array(tokens)})
        self.con.register("v", tbl)
        _run(self.con, VOCAB.insert_sql("v"))
        self.con.unregister("v")

    def put_range(self, sae_id: str, folder: Path, stats: FeatureStats) -> None:
        """Copy one feature range's finished tables (build_range's folder) into the store; fill in its statistics."""
        con = self.con
        ex, grp = read_range_table(folder, "examples"), read_range_table(folder, "groups")
        con.register("range_ex", ex)
        con.register("range_grp", grp)
        try:
            cols = EXAMPLES.select_list().removeprefix("sae_id, ")
            _run(con, f"""INSERT INTO {EXAMPLES.name} ({EXAMPLES.select_list()}) SELECT ?, {cols} FROM range_ex
                          ORDER BY feature, kind, grp, rank""", [sae_id])
            cols = GROUPS.select_list().removeprefix("sae_id, ")
            _run(con, f"""INSERT INTO {GROUPS.name} ({GROUPS.select_list()}) SELECT ?, {cols} FROM range_grp
                          ORDER BY feature, kind, grp""", [sae_id])
        finally:
            con.unregister("range_ex")
            con.unregister("range_grp")
        st = read_range_table(folder, "stats")
        idx = st.column("feature").to_numpy().astype(np.int64)
        for k in ("n", "mx", "mn", "mean"):
            getattr(stats, k)[idx] = st.column(k).to_numpy().astype(np.float64)
        h = read_range_table(folder, "hist")
        np.add.at(stats.hist, (h.column("feature").to_numpy().astype(np.int64), h.column("bin").to_numpy().astype(np.int64)),
                  h.column("n").to_numpy().astype(np.int64))
        for fe, tt in zip(*(read_range_table(folder, "top").column(k).to_pylist() for k in ("feature", "tokens"))):
            stats.top_tokens[int(fe)] = list(tt)
        used = np.unique(ex.column("ctx_id").to_numpy())
        stats.used_ctx.append(used.astype(np.int32))

    def put_contexts(self, sae_id: str, ctx_files: list[str], used: np.ndarray) -> tuple[int, int]:
        """The token ids of the contexts the SAE's examples show; returns (contexts streamed, tokens counted)."""
        con = self.con
        src = f"read_parquet({_sql_list(ctx_files)})"
        con.register("used_ctx", pa.table({"ctx": pa.array(np.unique(used), pa.int32())}))
        try:
            _run(con, f"""INSERT INTO {CONTEXTS.name} ({CONTEXTS.select_list()}) SELECT ?, t.ctx, t.tokens FROM {src} t
                          SEMI JOIN used_ctx u ON t.ctx = u.ctx ORDER BY t.ctx""", [sae_id])
        finally:
            con.unregister("used_ctx")
        n_ctx, n_counted = con.execute(f"SELECT count(*), sum(n_counted) FROM {src}").fetchall()[0]
        return int(n_ctx), int(n_counted or 0)

    def stored_activations(self, sae_id: str, ctx_ids: list[int]) -> dict[int, tuple[list[int], dict[int, tuple[list[int], list[float]]]]]:
        """What this (unpublished) store holds for some contexts; see read.stored_activations."""
        return stored_activations(self.con, sae_id, ctx_ids)

    def stored_examples(self, sae_id: str, ctx_ids: list[int]) -> dict[int, tuple[list[int], list[tuple]]]:
        """Every example row of some contexts in this (unpublished) store; see read.stored_examples."""
        return stored_examples(self.con, sae_id, ctx_ids)

    def sae_params(self, sae_id: str) -> dict[str, Any]:
        """The params of an SAE written so far (verify reads its dtype)."""
        return sae_params(self.con, sae_id)

    def context_ids(self, sae_id: str) -> list[int]:
        return [r[0] for r in self.con.execute("SELECT ctx_id FROM contexts WHERE sae_id = ? ORDER BY ctx_id", [sae_id]).fetchall()]

    def set_verify(self, sae_id: str, result: dict[str, Any]) -> None:
        _run(self.con, "UPDATE saes SET verify = ? WHERE sae_id = ?", [json.dumps(result, default=str), sae_id])

    def put_features(self, sae_id: str, stats: FeatureStats, logits: dict[str, np.ndarray],
                     neighbours: tuple[np.ndarray, np.ndarray], cooc: tuple[np.ndarray, np.ndarray] | None = None,
                     coords: np.ndarray | None = None) -> None:
        """cooc: (ids, jaccard) (d_sae, n) with id -1 for padding; coords: (d_sae, 2) map positions."""
        d_sae = len(stats.n)
        n_counted = max(1, stats.n_counted)
        active = stats.n > 0
        cols = {
            "sae_id": pa.array([sae_id] * d_sae),
            "feature": pa.array(np.arange(d_sae, dtype=np.int32)),
            "n_active": pa.array(stats.n.astype(np.int64)),
            "density": pa.array(stats.n / n_counted),
            "max_act": pa.array(stats.mx.astype(np.float32)),
            "mean_act": pa.array(stats.mean.astype(np.float32)),
            "hist_lo": pa.array(np.where(active, stats.mn, 0).astype(np.float32)),
            "hist_hi": pa.array(np.where(active, stats.mx, 0).astype(np.float32)),
            "hist": _list_col([list(map(int, r)) for r in stats.hist], pa.int32()),
            "top_token_ids": _list_col([stats.top_tokens.get(i, []) for i in range(d_sae)], pa.int32()),
            "logit_pos_ids": _list_col(logits["pos_ids"].tolist(), pa.int32()),
            "logit_pos_vals": _list_col(logits["pos_vals"].tolist(), pa.float32()),
            "logit_neg_ids": _list_col(logits["neg_ids"].tolist(), pa.int32()),
            "logit_neg_vals": _list_col(logits["neg_vals"].tolist(), pa.float32()),
            "logit_hist_lo": pa.array(logits["hist_lo"].astype(np.float32)),
            "logit_hist_hi": pa.array(logits["hist_hi"].astype(np.float32)),
            "logit_hist": _list_col(logits["hist"].tolist(), pa.int32()),
            "neighbours": _list_col(neighbours[0].tolist(), pa.int32()),
            "neighbour_sims": _list_col(neighbours[1].tolist(), pa.float32()),
            "logit_mean": pa.array(logits["mean"].astype(np.float32)),
            "cooc_ids": _list_col([[int(j) for j in r if j >= 0] for r in cooc[0]], pa.int32()) if cooc is not None
            else pa.nulls(d_sae, pa.list_(pa.int32())),
            "cooc_jaccard": _list_col([[float(v) for j, v in zip(ri, rv) if j >= 0] for ri, rv in zip(*cooc)],
                                      pa.float32()) if cooc is not None else pa.nulls(d_sae, pa.list_(pa.float32())),
            "map_x": pa.array(coords[:, 0].astype(np.float32)) if coords is not None else pa.nulls(d_sae, pa.float32()),
            "map_y": pa.array(coords[:, 1].astype(np.float32)) if coords is not None else pa.nulls(d_sae, pa.float32()),
        }
        assert list(cols) == FEATURES.names, "features columns differ from the schema"
        self.con.register("f", pa.table(cols))
        _run(self.con, FEATURES.insert_sql("f"))
        self.con.unregister("f")

    def put_cross(self, sae_id: str, other: str, ids: np.ndarray, cos: np.ndarray) -> None:
        """Each feature of sae_id: its nearest features in `other` by decoder cosine, (d_sae, n) arrays."""
        _run(self.con, f"DELETE FROM {CROSS.name} WHERE sae_id = ? AND other = ?", [sae_id, other])
        tbl = pa.table({"sae_id": pa.array([sae_id] * len(ids)), "feature": pa.array(np.arange(len(ids), dtype=np.int32)),
                        "other": pa.array([other] * len(ids)), "ids": _list_col(ids.tolist(), pa.int32()),
                        "cos": _list_col(cos.tolist(), pa.float32())})
        self.con.register("cross_new", tbl)
        _run(self.con, CROSS.insert_sql("cross_new"))
        self.con.unregister("cross_new")

    def put_sae(self, row: dict[str, Any]) -> None:
        """One row of the saes table: exactly the schema's columns (JSON columns given as dicts)."""
        missing, extra = set(SAES.names) - set(row), set(row) - set(SAES.names)
        if missing or extra:
            raise UserError(f"saes row: missing {sorted(missing)}, unknown {sorted(extra)}")
        values = [(None if row[c.name] is None else json.dumps(row[c.name], default=str)) if c.json else row[c.name]
                  for c in SAES.cols]
        _run(self.con, f"INSERT INTO {SAES.name} ({SAES.select_list()}) VALUES ({', '.join('?' * len(values))})", values)

    def put_quality(self, rows: list[dict[str, Any]]) -> None:
        """Quality-metric rows (schema.QUALITY; precompute/quality.py), replacing those of the same SAEs."""
        _put_quality(self.con, rows)

    def publish(self) -> None:
        """Index the features table, checkpoint, close, fsync, and atomically replace the store."""
        # one feature's row by an index lookup instead of a zone-map scan (2.3 -> 0.8 ms measured at 65,536 features)
        _run(self.con, f"CREATE INDEX IF NOT EXISTS features_key ON {FEATURES.name} (sae_id, feature)")
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
        raise UserError(f"{path} is not a saescope store of schema version {SCHEMA_VERSION} "
                         f"(found {row[0] if row else 'none'}); rebuild it with `saescope precompute --out {path}`")


EXPLANATION_EXTRAS = ("llm", "prompt_version", "created", "score_detection", "score_fuzzing", "n_scored")


def _explanation_table(sae_id: str, rows: list, source: str) -> pa.Table:
    """Rows as (feature, text) tuples, or dicts with 'feature', 'text' and any of EXPLANATION_EXTRAS (LLM
    provenance and scores; missing ones stay NULL) plus an optional 'source' overriding the call's."""
    recs = []
    for n, r in enumerate(rows):
        if isinstance(r, dict):
            unknown = set(r) - {"feature", "text", "source", *EXPLANATION_EXTRAS}
            if unknown or "feature" not in r or "text" not in r:
                raise UserError(f"explanation row {n}: needs 'feature' and 'text', may have source, "
                                 f"{', '.join(EXPLANATION_EXTRAS)}; got {', '.join(sorted(r))}")
            recs.append(r)
        else:
            feature, text = r
            recs.append({"feature": feature, "text": text})
    cols = {"sae_id": pa.array([sae_id] * len(recs)), "feature": pa.array([int(r["feature"]) for r in recs], pa.int32()),
            "text": pa.array([str(r["text"]) for r in recs]),
            "source": pa.array([r.get("source") or source for r in recs])}
    types = {"llm": pa.string(), "prompt_version": pa.string(), "created": pa.string(), "score_detection": pa.float64(),
             "score_fuzzing": pa.float64(), "n_scored": pa.int32()}
    for name in EXPLANATION_EXTRAS:
        if any(r.get(name) is not None for r in recs):
            cols[name] = pa.array([r.get(name) for r in recs], types[name])
    return pa.table(cols)


@contextmanager
def rewriting(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Change a published store safely: a connection to a copy, checkpointed and renamed over `path` when the block
    ends; on any error the copy is deleted and `path` is untouched (add_explanations, write_quality, write_contrast)."""
    check_version(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(path, tmp)
    con = duckdb.connect(str(tmp))
    try:
        yield con
        _run(con, "CHECKPOINT")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, path)


def add_explanations(path: Path, sae_id: str, rows: list, source: str, replace: bool = False) -> int:
    """Add explanations to one SAE of a store: copy, write, atomic rename. A row is (feature, text) or a dict
    with feature, text and optionally llm, prompt_version, created, score_detection, score_fuzzing, n_scored."""
    with rewriting(path) as con:
        d_sae = con.execute("SELECT d_sae FROM saes WHERE sae_id = ?", [sae_id]).fetchall()
        if not d_sae:
            have = [r[0] for r in con.execute("SELECT sae_id FROM saes ORDER BY sae_id").fetchall()]
            raise UnknownSAE(sae_id, have, where=f"the store {path.name}")
        tbl = _explanation_table(sae_id, rows, source)
        bad = [i for i in tbl.column("feature").to_pylist() if not 0 <= i < d_sae[0][0]]
        if bad:
            raise UserError(f"feature indices {bad[:5]} are outside 0..{d_sae[0][0] - 1} of {sae_id}")
        if replace:
            _run(con, "DELETE FROM explanations WHERE sae_id = ?", [sae_id])
        con.register("new_expl", tbl)
        given = ", ".join(tbl.column_names)  # the other columns (LLM provenance, scores) stay NULL
        _run(con, f"INSERT INTO {EXPLANATIONS.name} ({given}) SELECT {given} FROM new_expl")
        con.unregister("new_expl")
    return len(rows)


def _put_quality(con, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        missing, extra = set(QUALITY.names) - set(r), set(r) - set(QUALITY.names)
        if missing or extra:
            raise UserError(f"quality row: missing {sorted(missing)}, unknown {sorted(extra)}")
        _run(con, f"DELETE FROM {QUALITY.name} WHERE sae_id = ?", [r["sae_id"]])
        _run(con, f"INSERT INTO {QUALITY.name} ({QUALITY.select_list()}) VALUES ({', '.join('?' * len(QUALITY.cols))})",
             [r[c] for c in QUALITY.names])


def write_quality(path: Path, rows: list[dict[str, Any]]) -> None:
    """`saescope eval`: replace the quality rows of some SAEs of a published store (copy, write, atomic rename)."""
    with rewriting(path) as con:
        have = {r[0] for r in con.execute("SELECT sae_id FROM saes").fetchall()}
        unknown = sorted({r["sae_id"] for r in rows} - have)
        if unknown:
            raise UnknownSAE(unknown[0], sorted(have), where=f"the store {path.name}")
        _put_quality(con, rows)


def write_contrast(path: Path, run: dict[str, Any], features: dict[str, list], texts: dict[str, list]) -> None:
    """`saescope contrast`: store one contrast (replacing one of the same SAE and name): run = a CONTRASTS row,
    features = CONTRAST_FEATURES columns (without sae_id/name) as lists, texts = CONTRAST_TEXTS columns likewise."""
    with rewriting(path) as con:
        _run(con, create_all((CONTRASTS, CONTRAST_FEATURES, CONTRAST_TEXTS)))
        _run(con, "ALTER TABLE contrast_features ADD COLUMN IF NOT EXISTS top_acts REAL[][]")  # stores before it
        have = {r[0] for r in con.execute("SELECT sae_id FROM saes").fetchall()}
        if run["sae_id"] not in have:
            raise UnknownSAE(run["sae_id"], sorted(have), where=f"the store {path.name}")
        key = [run["sae_id"], run["name"]]
        for t in (CONTRASTS, CONTRAST_FEATURES, CONTRAST_TEXTS):
            _run(con, f"DELETE FROM {t.name} WHERE sae_id = ? AND name = ?", key)
        values = [json.dumps(run[c.name]) if c.json else run[c.name] for c in CONTRASTS.cols]
        _run(con, f"INSERT INTO {CONTRASTS.name} ({CONTRASTS.select_list()}) VALUES ({', '.join('?' * len(values))})",
             values)
        types = {"INTEGER": pa.int32(), "DOUBLE": pa.float64(), "VARCHAR": pa.string(), "INTEGER[]": pa.list_(pa.int32()),
                 "REAL[]": pa.list_(pa.float32()), "REAL[][]": pa.list_(pa.list_(pa.float32()))}
        for t, cols in ((CONTRAST_FEATURES, features), (CONTRAST_TEXTS, texts)):
            n = len(next(iter(cols.values())))
            full = {"sae_id": [run["sae_id"]] * n, "name": [run["name"]] * n, **cols}
            tbl = pa.table({c.name: pa.array(full[c.name], types[c.sql]) for c in t.cols})
            con.register("new_rows", tbl)
            _run(con, t.insert_sql("new_rows"))
            con.unregister("new_rows")


def write_graph(path: Path, row: dict[str, Any], replace: bool = False) -> None:
    """`saescope graph`: store one attribution graph (a GRAPHS row without `created`; copy, write, atomic rename).
    An existing slug is refused unless `replace`; sae_ids must name SAEs of the store."""
    from datetime import datetime, timezone

    missing, extra = set(GRAPHS.names) - {"created"} - set(row), set(row) - set(GRAPHS.names)
    if missing or extra:
        raise UserError(f"graph row: missing {sorted(missing)}, unknown {sorted(extra)}")
    with rewriting(path) as con:
        _run(con, create_all((GRAPHS,)))
        have = {r[0] for r in con.execute("SELECT sae_id FROM saes").fetchall()}
        unknown = sorted(set(row["sae_ids"].values()) - have)
        if unknown:
            raise UnknownSAE(unknown[0], sorted(have), where=f"the store {path.name}")
        if con.execute(f"SELECT count(*) FROM {GRAPHS.name} WHERE slug = ?", [row["slug"]]).fetchall()[0][0]:
            if not replace:
                raise UserError(f"the store {path.name} already has a graph {row['slug']!r}; choose another --slug "
                                "or pass --replace")
            _run(con, f"DELETE FROM {GRAPHS.name} WHERE slug = ?", [row["slug"]])
        full = {**row, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        values = [json.dumps(full[c.name]) if c.json else full[c.name] for c in GRAPHS.cols]
        _run(con, f"INSERT INTO {GRAPHS.name} ({GRAPHS.select_list()}) VALUES ({', '.join('?' * len(values))})", values)
