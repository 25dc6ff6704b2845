"""The store (precompute/store/): a damaged file is refused with a message that names the fix, the schema's columns
are there and read, and the in-memory map index answers as the ORDER BY it replaced."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient

from saescope.app.web.app import create_app
from saescope.precompute.store import Store, StoreError
from tests.helpers import damaged_copies

SAE = "tiny"
GENERIC = "something went wrong"


def test_a_damaged_store_is_refused_when_opened_with_a_clear_message(tmp_path, tiny_store):
    """Before: a truncated store opened fine and then every feature page answered a bare 500; at 50-80%
    truncation the start-up message said "schema version none"."""
    refused = []
    for name, path in damaged_copies(tiny_store, tmp_path).items():
        try:
            Store(path).close()
        except Exception as err:  # noqa: BLE001 (anything but a StoreError is the failure being tested for)
            assert isinstance(err, StoreError), (name, type(err), str(err)[:300])
            msg = str(err)
            assert "damaged or incomplete" in msg and "saescope precompute" in msg, (name, msg)
            assert "schema version none" not in msg.lower()
            refused.append(name)
            continue
        # opened: then no page may fail with the generic message; a failing page must say the store is damaged
        client = TestClient(create_app(path), raise_server_exceptions=False)
        sid = "tiny"
        urls = ["/", f"/sae/{sid}", f"/sae/{sid}/search?q=the"] + [
            f"/sae/{sid}/feature/{i}{q}" for i in range(96) for q in ("", "?samples=quantile")]
        for url in urls:
            r = client.get(url)
            assert GENERIC not in r.text, (name, url)
            if r.status_code >= 500:
                assert "damaged" in r.text, (name, url, r.text[-1000:])
    assert {"truncated50", "truncated80"} <= set(refused), refused


def _cuts(n: int, block: int) -> list[int]:
    """Truncation points of an n-byte store: inside and at the ends of DuckDB's three 4 kB headers, inside the
    first, middle and last blocks, at block boundaries, and the last byte."""
    h = 3 * 4096
    return sorted({0, 1, 100, 4096, 8192, h - 1, h, h + 1, h + block, n // 2, int(n * 0.8), n - block - 1, n - block,
                   n - block + 1, n - h - 1, n - h, n - 8192, n - 4096, n - 1} - {n})


def _refusal(path, err) -> None:
    msg = str(err)
    assert isinstance(err, StoreError), (path.name, type(err), msg[:300])
    assert str(path) in msg and "damaged or incomplete" in msg, msg
    assert f"saescope precompute --out {path}" in msg and f"saescope verify {path}" in msg, msg


def test_a_store_cut_short_anywhere_is_refused_when_opened(tmp_path, tiny_store):
    """A copy of a real store truncated at any of ~20 points is refused by Store() with a StoreError that names the
    file and the fix. Before: a cut in the last 12 kB (DuckDB's file headers were not counted in the size check)
    opened, and every query of the last block then failed."""
    data = tiny_store.read_bytes()
    con = duckdb.connect(str(tiny_store), read_only=True)
    block, total, used, free = con.execute(
        "SELECT block_size, total_blocks, used_blocks, free_blocks FROM pragma_database_size()").fetchone()
    con.close()
    assert free == 0 and used == total and len(data) == 3 * 4096 + total * block  # the layout the check relies on
    with Store(tiny_store) as s:  # the intact file opens
        assert s.check_tables() == {t: None for t in s.check_tables()}
    cuts = _cuts(len(data), block)
    assert len(cuts) >= 15
    for cut in cuts:
        path = tmp_path / f"cut{cut}.duckdb"
        path.write_bytes(data[:cut])
        with pytest.raises(Exception) as err:
            Store(path).close()
        _refusal(path, err.value)
        path.unlink()


def test_a_store_with_free_blocks_cut_short_never_answers_wrong_data(tmp_path, tiny_store):
    """With free blocks before the end of the file (a table rewritten after a dropped one), the size bound counts
    only the blocks in use, so a short cut can open: then every table either reads back exactly as in the intact
    file or is named damaged (check_tables, and a StoreError naming it from any query), never wrong data."""
    from saescope.precompute.store.schema import STORE_TABLES
    from tests.helpers import dump_tables

    base = tmp_path / "freed.duckdb"
    shutil.copyfile(tiny_store, base)
    con = duckdb.connect(str(base))
    con.execute("CREATE TABLE scratch AS SELECT range AS i, md5(range::VARCHAR) AS s FROM range(50000)")
    con.execute("CHECKPOINT")
    # examples rewritten after scratch, then scratch dropped: free blocks sit before the last used ones
    con.execute("CREATE TABLE examples2 AS SELECT * FROM examples")
    con.execute("DROP TABLE examples")
    con.execute("ALTER TABLE examples2 RENAME TO examples")
    con.execute("CHECKPOINT")
    con.execute("DROP TABLE scratch")
    con.execute("CHECKPOINT")
    block, free = con.execute("SELECT block_size, free_blocks FROM pragma_database_size()").fetchone()
    con.close()
    assert free > 0
    names = [t.name for t in STORE_TABLES if t.name != "saes"]  # dump_tables reads saes with every table
    want = dump_tables(base, tables=tuple(names))
    data = base.read_bytes()
    opened = 0
    for cut in _cuts(len(data), block):
        path = tmp_path / f"cut{cut}.duckdb"
        path.write_bytes(data[:cut])
        try:
            s = Store(path)
        except Exception as err:  # noqa: BLE001 (anything but a StoreError is the failure being tested for)
            _refusal(path, err)
            path.unlink()
            continue
        opened += 1
        with s:
            broken = {t for t, why in s.check_tables().items() if why}
            assert broken, cut  # the cut removed blocks in use: some table must say so
            for t in broken:  # a query of a damaged table is a StoreError naming it and the fix
                with pytest.raises(StoreError, match=rf"damaged or incomplete in table {t} .*saescope precompute"):
                    s._q(f"SELECT count(*), bit_xor(hash(COLUMNS(*))) FROM {t}")
        readable = tuple(t for t in names if t not in broken)
        got = dump_tables(path, tables=readable)  # every other table (and saes) reads back as in the intact file
        assert got == {t: want[t] for t in (*readable, "saes")}, cut
        path.unlink()
    assert opened > 0  # the free blocks let some cut past the size bound: the read-time path was exercised


# ---------------------------------------------------------------- schema 2
def test_schema_2_columns_exist_and_are_read(tiny_store):
    with Store(tiny_store) as s:
        f = s.feature("tiny", 3)
        # filled by precompute (values are checked against brute force in test_explore_store.py)
        assert f.cooc and all(isinstance(j, int) and 0 < c <= 1 for j, c in f.cooc)
        assert f.map_xy is not None and all(0 <= v <= 1 for v in f.map_xy) and f.explanation_rows == []
    con = duckdb.connect(str(tiny_store), read_only=True)
    cols = {(r[0], r[1]): r[2] for r in con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns").fetchall()}
    con.close()
    assert cols[("features", "cooc_ids")] == "INTEGER[]" and cols[("features", "cooc_jaccard")] == "FLOAT[]"
    assert cols[("features", "map_x")] == "FLOAT" and cols[("explanations", "score_fuzzing")] == "DOUBLE"
    assert cols[("explanations", "n_scored")] == "INTEGER" and cols[("saes", "verify")] == "VARCHAR"


def test_add_explanations_fills_new_columns_with_null(tmp_path, tiny_store):
    from saescope.precompute.store.write import add_explanations

    copy = tmp_path / "expl.duckdb"
    shutil.copyfile(tiny_store, copy)
    assert add_explanations(copy, "tiny", [(3, "a test feature")], "test") == 1
    con = duckdb.connect(str(copy))
    con.execute("UPDATE features SET cooc_ids = [4, 5], cooc_jaccard = [0.5, 0.25], map_x = 1.5, map_y = -2 "
                "WHERE sae_id = 'tiny' AND feature = 3")
    con.close()
    with Store(copy) as s:
        f = s.feature("tiny", 3)
        assert f.explanations == ["a test feature"]
        e = f.explanation_rows[0]
        assert (e.text, e.source, e.llm, e.score_detection, e.n_scored) == ("a test feature", "test", None, None, None)
        assert f.cooc == [(4, 0.5), (5, 0.25)] and f.map_xy == (1.5, -2.0)


# ---------------------------------------------------------------- the store's map index
@pytest.fixture(scope="module")
def mapped_store(tiny_store, tmp_path_factory):
    """A copy of the tiny store with map coordinates that have exact ties (a coarse grid) and a few NULLs."""
    out = tmp_path_factory.mktemp("largesae") / "mapped.duckdb"
    shutil.copy(tiny_store, out)
    con = duckdb.connect(str(out))
    try:
        d_sae = con.execute("SELECT count(*) FROM features WHERE sae_id = ?", [SAE]).fetchone()[0]
        g = np.random.default_rng(0)
        xy = (g.integers(0, 6, size=(d_sae, 2)) / 5).astype(np.float32)  # many features share a spot
        rows = [[float(x), float(y), SAE, i] for i, (x, y) in enumerate(xy)]
        rows[4][:2] = [None, None]
        con.executemany("UPDATE features SET map_x = ?, map_y = ? WHERE sae_id = ? AND feature = ?", rows)
    finally:
        con.close()
    return out, d_sae


def _sql_neighbourhood(path, index: int, k: int) -> list[tuple]:
    """The query the map index replaced (distance in REAL arithmetic, ties by feature)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("""
            WITH me AS (SELECT map_x AS x0, map_y AS y0 FROM features WHERE sae_id = ? AND feature = ?)
            SELECT feature, map_x, map_y FROM features, me WHERE sae_id = ? AND map_x IS NOT NULL
            ORDER BY (map_x - x0) * (map_x - x0) + (map_y - y0) * (map_y - y0), feature LIMIT ?""",
            [SAE, index, SAE, k + 1]).fetchall()
    finally:
        con.close()


def test_map_neighbourhood_equals_the_sql_order_with_ties(mapped_store):
    path, d_sae = mapped_store
    with Store(path) as s:
        for i in (i for i in range(d_sae) if i != 4):
            for k in (3, 30, d_sae + 5):
                got = s.map_neighbourhood(SAE, i, k)
                assert got == _sql_neighbourhood(path, i, k), (i, k)
        assert s.map_neighbourhood(SAE, 4, 5) == []  # no position: no neighbourhood
        assert s.map_neighbourhood(SAE, d_sae + 10, 5) == []


def test_features_by_index_reads_the_rows_asked_for(mapped_store):
    path, d_sae = mapped_store
    con = duckdb.connect(str(path), read_only=True)
    want = {r[0]: r for r in con.execute("""SELECT feature, density, max_act, n_active FROM features
                                           WHERE sae_id = ?""", [SAE]).fetchall()}
    con.close()
    ask = [d_sae - 1, 0, 17, 17, 5, d_sae + 3]
    with Store(path) as s:
        got = s.features_by_index(SAE, ask)
        assert set(got) == {d_sae - 1, 0, 17, 5}
        for i, row in got.items():
            assert (row.index, row.density, row.max_act, row.n_active) == want[i]
            assert row.top_tokens == s.feature(SAE, i).top_tokens
