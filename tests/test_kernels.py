"""The table builder's compiled kernels (store/kernels.py, build_range's default engine) against its reference SQL
(build_range(engine="sql")): identical tables on sealed activations full of ties, a feature active on every token,
features with fewer rows than quantile bins, one with a single value, and ranges that cross feature buckets."""

from __future__ import annotations

import numpy as np
import pytest

from saescope.precompute.pipeline import workdir as wd_mod
from saescope.precompute.pipeline.workdir import Plan, ShardWriter, WorkDir, bucket_width
from saescope.precompute.store.write import (RANGE_TABLES, FeatureStats, SampleSpec, SparseActs, StoreBuilder,
                                             build_range, feature_ranges, read_range_table)

T, D_SAE, N_CTX = 16, 200, 48
SPEC = SampleSpec(context_len=T, top_k=5, n_intervals=4, per_interval=3, n_quantiles=4, per_quantile=3, hist_bins=7)


def _acts(rng: np.random.Generator, c0: int, c1: int, negative: bool = False) -> SparseActs:
    """Activations of contexts c0..c1-1: coarse values (ties in every ordering), in batch order (ctx, pos, feature)."""
    ctx, pos, feat, val = [], [], [], []
    for c in range(c0, c1):
        for p in range(T):
            fs = set((20 + rng.choice(D_SAE - 20, size=6, replace=False)).tolist())
            fs.add(3)  # dense: every token
            if c == 5 and p == 2:
                fs.add(7)  # one activation in the whole run
            if c in (1, 30, 40) and p == 0:
                fs.add(8)  # fewer rows than quantile bins
            if p % 4 == 1:
                fs.add(10)  # always the same value
            for f in sorted(fs):
                ctx.append(c), pos.append(p), feat.append(f)
                if f == 10:
                    val.append(0.75)
                elif f == 3:
                    val.append(0.5 * (1 + (c + p) % 3))
                else:
                    val.append(round(float(rng.uniform(0.05, 2.0)), 1))
    v = np.array(val, np.float32)
    if negative:
        v[len(v) // 2] = -0.5
    return SparseActs(np.array(ctx, np.int32), np.array(pos, np.int16), np.array(feat, np.int32), v)


def _sealed(tmp_path, monkeypatch, negative: bool = False) -> WorkDir:
    """Two shards through the real ShardWriter, sealed in small chunks (so each bucket file holds several sorted runs)."""
    monkeypatch.setattr(wd_mod, "SEAL_ROWS", 700)
    rng = np.random.default_rng(0)
    work = WorkDir(tmp_path / "w.work")
    plan = Plan.make({"test": 1}, N_CTX, T, 8, [D_SAE], 2)
    work.open(plan)
    for s, (c0, c1) in enumerate(plan.shards):
        w = ShardWriter(work.shard_dir(s), c0, T, 1)
        for b0 in range(c0, c1, 8):
            b1 = min(c1, b0 + 8)
            tokens = rng.integers(0, 300, size=(b1 - b0, T))
            w.append(tokens, np.full(b1 - b0, T, np.int32), [_acts(rng, b0, b1, negative and s == 1)])
        w.seal(work, s, [D_SAE])
    return work


def _tables(folder) -> dict:
    out = {}
    for name in RANGE_TABLES:
        t = read_range_table(folder, name)
        out[name] = ([(f.name, str(f.type)) for f in t.schema], t.to_pylist())
    return out


def _build_all(work: WorkDir, engine: str, root, rows_per_range: int) -> list:
    counts = work.counts(0, D_SAE)
    width = bucket_width(D_SAE)
    folders = []
    for lo, hi in feature_ranges(counts, rows_per_range):
        folders.append(build_range(work.act_files(0, width, lo, hi), work.context_files(), lo, hi,
                                   root / engine / f"r{lo}", SPEC, engine=engine))
    return folders


@pytest.mark.parametrize("rows_per_range", [250, 100_000])
def test_kernels_equal_sql(tmp_path, monkeypatch, rows_per_range):
    work = _sealed(tmp_path, monkeypatch)
    counts = work.counts(0, D_SAE)
    assert counts[3] == N_CTX * T and counts[7] == 1 and counts[8] == 3  # the cases are there
    sql = _build_all(work, "sql", tmp_path, rows_per_range)
    ker = _build_all(work, "kernel", tmp_path, rows_per_range)
    assert (ker[0] / "examples.arrow").exists()  # the kernels ran (not the SQL fallback)
    if rows_per_range == 250:
        assert len(sql) > 4  # several ranges, some crossing a bucket edge
    for a, b in zip(sql, ker):
        ta, tb = _tables(a), _tables(b)
        for name in RANGE_TABLES:
            assert ta[name][0] == tb[name][0], name  # same columns, same types
            assert ta[name][1] == tb[name][1], name  # same rows in the same order
    # and the same store rows and statistics once assembled
    got = []
    for folders in (sql, ker):
        out = tmp_path / f"s{len(got)}.duckdb"
        b = StoreBuilder(out)
        st = FeatureStats.empty(D_SAE, SPEC.hist_bins)
        for f in folders:
            b.put_range("x", f, st)
        rows = [b.con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("examples", "groups")]
        b.abort()
        got.append((rows, st))
    (ra, sa), (rb, sb) = got
    assert ra == rb
    for k in ("n", "mx", "mn", "mean", "hist"):
        assert np.array_equal(getattr(sa, k), getattr(sb, k)), k
    assert sa.top_tokens == sb.top_tokens
    assert np.array_equal(np.unique(sa.used_contexts()), np.unique(sb.used_contexts()))


def test_kernels_fall_back_to_sql_on_values_they_do_not_take(tmp_path, monkeypatch):
    work = _sealed(tmp_path, monkeypatch, negative=True)
    sql = _build_all(work, "sql", tmp_path, 100_000)
    ker = _build_all(work, "kernel", tmp_path, 100_000)
    assert not (ker[0] / "examples.arrow").exists() and (ker[0] / "examples.parquet").exists()
    assert _tables(sql[0]) == _tables(ker[0])


def test_unknown_engine(tmp_path):
    from saescope.precompute.errors import UserError

    with pytest.raises(UserError, match="table engine"):
        build_range([], [], 0, 1, tmp_path / "r", SPEC, engine="spark")


def test_feature_order_is_lexsort_of_stream_order():
    """The seal's counting sort: records in the stream's (ctx, pos, feature) order come out exactly as a full
    lexsort by (feature, ctx, pos) puts them; records out of that order are reported, never mis-sorted."""
    from saescope.precompute.store.kernels import feature_order

    rng = np.random.default_rng(3)
    d_sae, T = 300, 16
    rows = []
    for ctx in range(40):
        for pos in range(T):
            for f in np.sort(rng.choice(d_sae, size=rng.integers(0, 12), replace=False)):
                rows.append((ctx, pos, f))
    ctx, pos, feat = (np.array(c) for c in zip(*rows))
    ctx, pos, feat = ctx.astype(np.int32), pos.astype(np.int16), feat.astype(np.int32)
    order, counts, ok = feature_order(ctx, pos, feat, d_sae)
    assert ok
    assert np.array_equal(order, np.lexsort((pos, ctx, feat)))
    assert np.array_equal(counts, np.bincount(feat, minlength=d_sae))
    j = int(np.flatnonzero((ctx[1:] == ctx[:-1]) & (pos[1:] == pos[:-1]))[0])
    swapped = feat.copy()
    swapped[[j, j + 1]] = swapped[[j + 1, j]]  # two records of one token out of feature order
    _, counts2, ok2 = feature_order(ctx, pos, swapped, d_sae)
    assert not ok2 and np.array_equal(counts2, counts)
    _, _, ok3 = feature_order(ctx[::-1].copy(), pos[::-1].copy(), feat[::-1].copy(), d_sae)
    assert not ok3
    with pytest.raises(ValueError, match="outside"):
        feature_order(ctx, pos, np.where(feat == feat[0], d_sae, feat).astype(np.int32), d_sae)
