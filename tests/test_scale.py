"""Precompute at scale: many SAEs in one forward pass, bounded feature ranges, and `saescope verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from saescope.precompute.store import Store
from tests.conftest import TINY_ARGS, interrupt_after

TABLES = ("features", "examples", "groups", "contexts", "explanations")


def rows(path: Path, sae_id: str) -> dict[str, list]:
    """Every row of every per-SAE table (sae_id column dropped, sorted), and the saes row without run times."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {t: sorted(con.execute(f"SELECT * EXCLUDE (sae_id) FROM {t} WHERE sae_id = ?", [sae_id]).fetchall(),
                         key=repr) for t in TABLES}
        out["saes"] = con.execute("SELECT * EXCLUDE (sae_id, created) FROM saes WHERE sae_id = ?", [sae_id]).fetchall()
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_store, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus):
    """One 2-SAE run, and each SAE alone (separate single-SAE runs; the TopK one is the session's tiny_store),
    over the same tokens."""
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    root = tmp_path_factory.mktemp("multi")
    common = dict(model=str(tiny_lm_dir), dataset=str(small_corpus), **TINY_ARGS)
    specs = [SAESpec(str(tiny_sae_dir), None, "tiny"), SAESpec(str(second_sae_dir), None, "relu")]
    run_precompute(PrecomputeSpec(out=root / "multi.duckdb", saes=specs, **common))
    relu = run_precompute(PrecomputeSpec(out=root / "relu.duckdb", saes=[SAESpec(str(second_sae_dir), sae_id="relu")], **common))
    return {"multi": root / "multi.duckdb", "single": {"tiny": tiny_store, "relu": relu}}


def test_two_saes_in_one_pass_equal_separate_runs(two_runs):
    for sae_id, path in two_runs["single"].items():
        want, got = rows(path, sae_id), rows(two_runs["multi"], sae_id)
        assert want["examples"], "the run stored examples"
        for table in want:
            assert got[table] == want[table], f"{sae_id}: table {table} differs between the 2-SAE and the single run"
    with Store(two_runs["multi"]) as s:
        assert [x.sae_id for x in s.saes()] == ["relu", "tiny"]
        assert {x.sae_id: x.hook for x in s.saes()} == {"relu": "blocks.2.hook_resid_pre",
                                                         "tiny": "blocks.1.hook_resid_post"}
        assert s.sae("relu").architecture == "standard" and s.count_features("relu") == 48


def test_activations_multi_equals_one_hook_at_a_time(tiny_lm_dir, small_corpus):
    """One pass with several hooks gives bitwise the activations of a pass per hook, and of the HF hidden states."""
    from saescope.precompute.models import load_model

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.2.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out"]
    got = lm.activations_multi(ids, hooks)
    assert list(got) == hooks
    for h in hooks:
        assert torch.equal(got[h], lm.activations(ids, h)), h
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], hs[2], rtol=0, atol=0)
    torch.testing.assert_close(got["blocks.2.hook_resid_pre"], hs[2], rtol=0, atol=0)


def test_activations_multi_stops_after_the_deepest_hook(tiny_lm_dir):
    from saescope.precompute.models import load_model

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    ran: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        lm.activations_multi(torch.tensor([[1, 5, 9]]), ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1], "layer 2 must not run when the deepest hook is in layer 1"


def test_feature_ranges_give_the_same_tables(tmp_path, tiny_store, tiny_lm_dir, tiny_sae_dir, small_corpus):
    """Building tables in many small feature ranges (a few hundred activations each) changes no row."""
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    out = tmp_path / "ranges.duckdb"
    run_precompute(PrecomputeSpec(out=out, model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir), sae_id="tiny")],
                                  dataset=str(small_corpus), rows_per_range=400, **TINY_ARGS))
    assert rows(out, "tiny") == rows(tiny_store, "tiny")


def test_feature_ranges_cut_by_row_count():
    from saescope.precompute.store.write import feature_ranges

    counts = np.array([3, 4, 5, 0, 20, 1, 1, 9, 2])
    ranges = feature_ranges(counts, 10)
    assert ranges == [(0, 1), (2, 3), (4, 4), (5, 6), (7, 7), (8, 8)]
    covered = [f for lo, hi in ranges for f in range(lo, hi + 1)]
    assert covered == list(range(len(counts)))
    assert all(counts[lo:hi + 1].sum() <= 10 or lo == hi for lo, hi in ranges)


def test_run_file_and_repeated_flags(tmp_path, tiny_sae_dir, second_sae_dir):
    from saescope.app.cli import build_parser
    from saescope.app.cli.precompute import spec_from_args
    from saescope.precompute.pipeline import SAESpec

    toml = tmp_path / "run.toml"
    toml.write_text(f'[[sae]]\npath = "{tiny_sae_dir}"\nid = "a"\n\n[[sae]]\npath = "{second_sae_dir}"\n'
                    'hook = "blocks.2.hook_resid_post"\nid = "b"\n')
    want = [SAESpec(str(tiny_sae_dir), None, "a"), SAESpec(str(second_sae_dir), "blocks.2.hook_resid_post", "b")]
    p = build_parser()
    a = spec_from_args(p.parse_args(["precompute", "--out", "x.duckdb", "--run", str(toml)]))
    assert a.saes == want
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"sae": [{"path": str(tiny_sae_dir), "id": "a"},
                                      {"path": str(second_sae_dir), "hook": "blocks.2.hook_resid_post", "id": "b"}]}))
    assert spec_from_args(p.parse_args(["precompute", "--out", "x", "--run", str(js)])).saes == want
    flags = ["precompute", "--out", "x", "--sae", str(tiny_sae_dir), "--sae", str(second_sae_dir),
             "--hook", "blocks.1.hook_resid_post", "--hook", "blocks.2.hook_resid_post", "--sae-id", "a", "--sae-id", "b"]
    got = spec_from_args(p.parse_args(flags)).saes
    assert got == [SAESpec(str(tiny_sae_dir), "blocks.1.hook_resid_post", "a"), want[1]]
    # one SAE, as before
    one = spec_from_args(p.parse_args(["precompute", "--out", "x", "--sae-id", "z"])).saes
    assert one == [SAESpec("default", None, "z")]


@pytest.mark.parametrize("argv, match", [
    (["--sae", "a", "--sae", "b", "--hook", "blocks.1.hook_resid_post"], "--hook was given 1 time"),
    (["--sae", "a", "--sae-id", "x", "--sae-id", "y"], "--sae-id was given 2 time"),
    (["--sae", "a", "--run", "r.toml"], "either with --run"),
    (["--run", "nope.toml"], "no such file"),
])
def test_bad_sae_lists_are_refused_readably(argv, match):
    from saescope.app.cli import build_parser
    from saescope.app.cli.precompute import spec_from_args

    with pytest.raises(ValueError, match=match):
        spec_from_args(build_parser().parse_args(["precompute", "--out", "x", *argv]))


def test_bad_run_files(tmp_path):
    from saescope.precompute.pipeline import load_run_file

    cases = {"a.toml": ("[[sae]]\nhook = 'x'\n", "needs a path"), "b.toml": ("[[sae]]\npath = 'p'\nlayer = 3\n", "unknown keys"),
             "c.json": ("{}", "lists no SAEs"), "d.yaml": ("sae: []", "unknown suffix"), "e.toml": ("[[sae", "could not be parsed")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_run_file(tmp_path / name)


def test_same_sae_id_twice_is_refused(tmp_path, tiny_lm_dir, tiny_sae_dir, small_corpus):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    specs = [SAESpec(str(tiny_sae_dir), None, "same"), SAESpec(str(tiny_sae_dir), "blocks.0.hook_resid_post", "same")]
    with pytest.raises(ValueError, match="both be stored as same"):
        run_precompute(PrecomputeSpec(out=tmp_path / "x.duckdb", model=str(tiny_lm_dir), saes=specs,
                                      dataset=str(small_corpus), **TINY_ARGS))


def test_bad_memory_limit_is_refused(tmp_path, tiny_lm_dir, tiny_sae_dir, small_corpus):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    with pytest.raises(ValueError, match="is not a size"):
        run_precompute(PrecomputeSpec(out=tmp_path / "x.duckdb", model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir))],
                                      dataset=str(small_corpus), memory_limit="lots", **TINY_ARGS))


# ------------------------------------------------------------------ verify


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


# ------------------------------------------------------------------ schema 2


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


def test_home_page_shows_the_verify_badge(tiny_store):
    import html

    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app

    with Store(tiny_store) as s:
        v = s.sae("tiny").verify
    page = TestClient(create_app(tiny_store, worker_url=None)).get("/")
    assert page.status_code == 200
    text = html.unescape(page.text)
    shown = f"{v['max_rel_diff']:.0e}" if v["max_rel_diff"] else "0"
    assert f"verified: max rel. diff {shown} on 8 contexts" in text
    assert f"saescope verify {tiny_store} --sae tiny --sample 8 --seed 0" in text
    api = TestClient(create_app(tiny_store, worker_url=None)).get("/api/saes")  # the JSON twin: the same record
    assert api.status_code == 200 and [x["verify"]["command"] for x in api.json()] == [v["command"]]


def test_sparse_features_in_token_slices_equal_one_slice(tiny_lm_dir, tiny_sae_dir, small_corpus):
    """Extracting nonzeros a few tokens at a time (wide SAEs) gives the same activations as the whole batch."""
    import itertools

    from saescope.precompute.data import iter_dataset_contexts, special_mask
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline.stream import sparse_features
    from saescope.precompute.saes import load_sae

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    sae = load_sae(str(tiny_sae_dir))
    ids = np.stack(list(itertools.islice(iter_dataset_contexts(str(small_corpus), "text", lm.tokenizer, 64, True), 3)))
    acts = lm.activations(torch.from_numpy(ids).long(), sae.cfg.hook_name)
    special = torch.from_numpy(special_mask(ids, lm.tokenizer))
    whole = sparse_features(sae, acts, special, 10)
    sliced = sparse_features(sae, acts, special, 10, chunk_bytes=4 * sae.cfg.d_sae * 7)  # 7 tokens per slice
    for k in ("ctx", "pos", "feature"):
        np.testing.assert_array_equal(getattr(sliced, k), getattr(whole, k))
    np.testing.assert_allclose(sliced.value, whole.value, rtol=1e-6, atol=1e-7)
    # and against the dense encode written here: every nonzero, at the right (context, position, feature)
    z = sae.encode(acts.detach()).detach().numpy()
    z[special.numpy()] = 0
    c, p, f = np.nonzero(z)
    np.testing.assert_array_equal(whole.ctx, c + 10)
    np.testing.assert_array_equal(whole.pos, p)
    np.testing.assert_array_equal(whole.feature, f)
    np.testing.assert_allclose(whole.value, z[c, p, f], rtol=1e-5)


def test_a_run_stopped_while_building_tables_resumes_at_the_next_range(tmp_path, tiny_lm_dir, tiny_sae_dir,
                                                                      small_corpus, caplog):
    """Ctrl-C after 3 feature ranges: the rerun streams nothing, builds only the other ranges, and the store
    equals an uninterrupted run with the same ranges."""
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    kw = dict(model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir), sae_id="tiny")], dataset=str(small_corpus),
              rows_per_range=400, feature_map=False, **TINY_ARGS)
    ref = run_precompute(PrecomputeSpec(out=tmp_path / "ref.duckdb", **kw))
    out = tmp_path / "stopped.duckdb"
    with pytest.raises(KeyboardInterrupt):
        run_precompute(PrecomputeSpec(out=out, on_event=interrupt_after("range", index=3), **kw))
    assert not out.exists()
    done = sorted(p.name for p in (tmp_path / "stopped.duckdb.work" / "tables" / "sae-0").iterdir())
    assert len(done) == 3 and not any(n.endswith(".tmp") for n in done)
    caplog.set_level("INFO")
    run_precompute(PrecomputeSpec(out=out, **kw))
    n_ranges = int(caplog.text.split("building per-feature tables: ")[1].split(" ")[0])
    assert f"{n_ranges} feature range(s), {n_ranges - 3} to do" in caplog.text and n_ranges > 3
    assert "resuming: 40 of 40 contexts already done" in caplog.text
    assert rows(out, "tiny") == rows(ref, "tiny")
