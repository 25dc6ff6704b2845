"""`saescope verify` checks what the pages read: every example row's value and activation list, every table's blocks.

Held-out findings: a store whose `examples.value` was multiplied by 1.5 verified "ok"; one damaged copy of an
activation list shared by several example rows could hide behind a sound copy (`any_value`); fp32 verify printed
"0 of the SAE's peak" beside a nonzero absolute difference; a store with bytes overwritten mid-file did not say
which table was damaged.
"""

from __future__ import annotations

import shutil

import duckdb
import pytest

from saescope.precompute.store import Store, StoreError


def _copy(tmp_path, tiny_store, name):
    out = tmp_path / name
    shutil.copyfile(tiny_store, out)
    with Store(out) as s:
        ctx = s.sae("tiny").verify["ctx_ids"][0]
    return out, ctx


def test_verify_checks_each_examples_value(tmp_path, tiny_store, capsys):
    from saescope.app.cli import main
    from saescope.precompute.verify import verify_store

    copy, ctx = _copy(tmp_path, tiny_store, "value.duckdb")
    con = duckdb.connect(str(copy))
    feature, kind, grp, rank, pos, value = con.execute(
        """SELECT feature, kind, grp, rank, pos, value FROM examples WHERE sae_id = 'tiny' AND ctx_id = ?
           ORDER BY value DESC LIMIT 1""", [ctx]).fetchall()[0]
    con.execute("""UPDATE examples SET value = value * 1.5 WHERE sae_id = 'tiny' AND feature = ? AND kind = ?
                   AND grp = ? AND rank = ?""", [feature, kind, grp, rank])
    con.close()
    r = verify_store(copy, "tiny", sample=8, seed=0)["tiny"]
    assert not r["ok"]
    w = r["worst"]
    assert (w["what"], w["ctx_id"], w["feature"], w["pos"]) == ("value", ctx, feature, pos)
    assert w["stored"] == pytest.approx(value * 1.5, rel=1e-6) and w["recomputed"] == pytest.approx(value, rel=1e-5)
    assert r["max_rel_diff"] == pytest.approx(0.5 / 1.5, rel=1e-3)
    assert r["values"] > 0
    assert main(["verify", str(copy), "--sample", "8"]) == 1
    assert "(value): stored" in capsys.readouterr().out
    # the untouched store verifies: every value equals its recompute
    assert verify_store(tiny_store, "tiny", sample=8, seed=0)["tiny"]["ok"]


def test_verify_checks_every_copy_of_a_shared_activation_list(tmp_path, tiny_store):
    copy, ctx = _copy(tmp_path, tiny_store, "shared.duckdb")
    con = duckdb.connect(str(copy))
    # a (feature, context) whose list is held by several example rows (top and interval/quantile samples)
    shared = con.execute("""SELECT feature, min(kind || ':' || grp || ':' || rank), count(*) FROM examples
                            WHERE sae_id = 'tiny' AND ctx_id = ? GROUP BY feature HAVING count(*) > 1
                            ORDER BY feature LIMIT 1""", [ctx]).fetchall()
    assert shared, "the tiny store should have a feature with several example rows in one context"
    feature, key, n = shared[0]
    kind, grp, rank = key.split(":")
    con.execute("""UPDATE examples SET act_val = list_transform(act_val, lambda v: v * 1.01)
                   WHERE sae_id = 'tiny' AND ctx_id = ? AND feature = ? AND kind = ? AND grp = ? AND rank = ?""",
                [ctx, feature, kind, int(grp), int(rank)])
    con.close()
    from saescope.precompute.verify import verify_store

    r = verify_store(copy, "tiny", sample=8, seed=0)["tiny"]
    assert not r["ok"] and r["worst"]["feature"] == feature and r["worst"]["what"] == "act_val"
    assert r["max_rel_diff"] == pytest.approx(0.01 / 1.01, rel=1e-3)
    assert r["lists"] > r["features"]  # the damaged copy was compared beside the sound ones


def test_fp32_verify_states_the_share_of_the_peak(tmp_path, tiny_store):
    from saescope.precompute.verify import describe, verify_store

    copy, ctx = _copy(tmp_path, tiny_store, "peak.duckdb")
    con = duckdb.connect(str(copy))
    con.execute("""UPDATE examples SET act_val = list_transform(act_val, lambda v: v * 1.001)
                   WHERE sae_id = 'tiny' AND ctx_id = ?""", [ctx])
    con.close()
    r = verify_store(copy, "tiny", sample=8, seed=0)["tiny"]
    assert r["max_abs_diff"] > 0
    assert r["max_peak_diff"] == pytest.approx(r["max_abs_diff"] / r["sae_peak"], rel=1e-6)
    line = describe("tiny", r)[0]
    assert f"{r['max_peak_diff']:.2g} of the SAE's peak" in line and " 0 of the SAE's peak" not in line


def _damaged_copy(tmp_path, tiny_store):
    """A copy of the store with 4 KiB overwritten somewhere in the middle of a table's blocks (the first offset, in
    steps of 5% of the file, at which the store still opens and some table reads back wrong)."""
    size = tiny_store.stat().st_size
    for i in range(1, 20):
        copy = tmp_path / f"damaged{i}.duckdb"
        shutil.copyfile(tiny_store, copy)
        with open(copy, "r+b") as f:
            f.seek(size * i // 20)
            f.write(b"\xa5" * 4096)
        try:
            with Store(copy) as s:
                bad = {t: why for t, why in s.check_tables().items() if why}
        except StoreError:
            continue  # the header or the saes table: the store refuses to open, which says so already
        if bad:
            return copy, bad
    pytest.fail("no offset damaged a table")


def test_damaged_bytes_are_reported_by_table(tmp_path, tiny_store, capsys):
    from saescope.app.cli import main

    with Store(tiny_store) as s:
        assert all(why is None for why in s.check_tables().values())
    copy, bad = _damaged_copy(tmp_path, tiny_store)
    with Store(copy) as s:
        table = sorted(bad)[0]
        # a page reading that table names it in its error (and not a table it did not read)
        with pytest.raises(StoreError, match=rf"damaged or incomplete in table {table} ") as err:
            s._q(f"SELECT * FROM {table}")
        assert err.value.tables == [table] and "saescope verify" in str(err.value)
    assert main(["verify", str(copy), "--sample", "2"]) == 1
    out = capsys.readouterr().out
    for t in bad:
        assert f"damaged table {t}:" in out


# ---------------------------------------------------------------- the stored verification and the CLI
def test_precompute_stores_its_verification(tiny_store):
    with Store(tiny_store) as s:
        v = s.sae("tiny").verify
        assert v["ok"] and v["max_rel_diff"] <= 1e-4 and v["mismatches"] == 0
        assert v["contexts"] == 8 and v["positions"] > 100
        assert v["date"] == s.sae("tiny").created
        assert v["command"] == f"saescope verify {tiny_store} --sae tiny --sample 8 --seed 0"
        # the sampled contexts are stored ones, and every stored activation of them was compared
        stored = s.stored_activations("tiny", v["ctx_ids"])
        assert v["positions"] >= sum(len(p) for _, feats in stored.values() for p, _ in feats.values())


def test_verify_cli_on_the_tiny_store(tiny_store, capsys):
    from saescope.app.cli import main

    assert main(["verify", str(tiny_store), "--sae", "tiny", "--sample", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: ok: max rel. diff") and "on 5 contexts" in out


def test_verify_reports_a_tampered_value(tmp_path, tiny_store):
    """Change one stored activation (in every example row of that feature and context): verify names it."""
    from saescope.precompute.verify import verify_store

    copy = tmp_path / "tampered.duckdb"
    shutil.copyfile(tiny_store, copy)
    with Store(copy) as s:
        ctx = s.sae("tiny").verify["ctx_ids"][0]
        feats = s.stored_activations("tiny", [ctx])[ctx][1]
    feature = min(feats)
    pos, val = feats[feature]
    con = duckdb.connect(str(copy))
    con.execute("""UPDATE examples SET act_val = list_transform(act_val, lambda v, i: CASE WHEN i = 1 THEN v * 1.01 ELSE v END)
                   WHERE sae_id = 'tiny' AND ctx_id = ? AND feature = ?""", [ctx, feature])
    con.close()
    r = verify_store(copy, "tiny", sample=8, seed=0)["tiny"]
    assert not r["ok"]
    assert r["worst"]["ctx_id"] == ctx and r["worst"]["feature"] == feature and r["worst"]["pos"] == pos[0]
    assert r["max_rel_diff"] == pytest.approx(0.01 / 1.01, rel=1e-3)  # |1.01 v - v| / (1.01 v)
    assert r["worst"]["stored"] == pytest.approx(val[0] * 1.01, rel=1e-6)


def test_verify_reports_zero_nonzero_mismatches(tmp_path, tiny_store, capsys):
    """A stored activation dropped (a nonzero that the store says is zero) is a zero/nonzero mismatch."""
    from saescope.app.cli import main

    copy = tmp_path / "dropped.duckdb"
    shutil.copyfile(tiny_store, copy)
    with Store(copy) as s:
        ctx = s.sae("tiny").verify["ctx_ids"][0]
    con = duckdb.connect(str(copy))
    n = con.execute("""UPDATE examples SET act_pos = act_pos[2:], act_val = act_val[2:]
                       WHERE sae_id = 'tiny' AND ctx_id = ? AND len(act_pos) > 1""", [ctx]).fetchall()[0][0]
    n_feats = con.execute("""SELECT count(DISTINCT feature) FROM examples WHERE sae_id = 'tiny' AND ctx_id = ?
                             AND len(act_pos) >= 1""", [ctx]).fetchall()[0][0]
    con.close()
    assert n > 0
    assert main(["verify", str(copy), "--sample", "8"]) == 1
    out = capsys.readouterr().out
    assert "tiny: FAILED" in out and "worst: context" in out
    mism = int(out.split(" zero/nonzero mismatches")[0].rsplit(" ", 1)[1])
    assert 0 < mism <= n_feats


def test_verify_unknown_sae_says_what_exists(tiny_store):
    from saescope.precompute.verify import verify_store

    with pytest.raises(ValueError, match="no SAE 'nope'; valid: tiny"):
        verify_store(tiny_store, "nope")


def test_verify_needs_a_sample():
    from saescope.precompute.verify import sample_contexts

    with pytest.raises(ValueError, match="at least one context"):
        sample_contexts([1, 2, 3], 0)
    assert sample_contexts([5, 1, 3], 10) == [1, 3, 5]
    got = sample_contexts(list(range(100)), 8, seed=4)
    assert len(set(got)) == 8 and got == sorted(got) and got == sample_contexts(list(range(100)), 8, seed=4)

