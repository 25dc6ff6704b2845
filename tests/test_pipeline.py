"""The precompute pipeline (precompute/pipeline/): its house rules (one-way imports inside pipeline/, no private
names borrowed across modules, the old modules gone, the one d_in check), many SAEs in one forward pass, bounded
feature ranges, run files, and a run stopped while building tables."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from saescope.precompute.store import Store
from tests.conftest import TINY_ARGS, interrupt_after
from tests.helpers import dump_tables
from tests.test_architecture import ROOT, _imports

PIPELINE = ROOT / "precompute" / "pipeline"


def test_executors_and_the_stream_never_import_the_driver():
    for name in ("executors", "stream", "tables", "loading", "spec", "workdir", "publish"):
        mods = _imports(PIPELINE / f"{name}.py")
        assert "saescope.precompute.pipeline.driver" not in mods, name
        assert "saescope.precompute.pipeline" not in mods, f"{name} imports the package (and so the driver)"


def test_no_private_names_are_imported_across_modules():
    offenders = []
    for p in sorted(PIPELINE.rglob("*.py")) + sorted((ROOT / "app" / "cli").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{p.relative_to(ROOT)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


def test_the_old_driver_modules_are_gone():
    for old in ("precompute/run.py", "precompute/distributed.py", "precompute/store/spill.py", "app/cli.py",
                "app/commands.py"):
        assert not (ROOT / old).exists(), old


def test_the_d_in_check_names_both_widths(tiny_lm_dir, tmp_path):
    """check_d_in against the model's real hook width (read here from the model's config)."""
    import json

    from saescope.precompute.encode import check_d_in
    from saescope.precompute.errors import UserError
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import SAEConfig
    from saescope.precompute.saes.standard import StandardSAE

    width = json.loads((Path(tiny_lm_dir) / "config.json").read_text())["hidden_size"]
    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    ok = StandardSAE(SAEConfig(architecture="standard", d_in=width, d_sae=8, hook_name="blocks.0.hook_resid_post"))
    check_d_in(lm, ok)
    bad = StandardSAE(SAEConfig(architecture="standard", d_in=width + 1, d_sae=8, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(UserError, match=f"d_in={width + 1}, but blocks.0.hook_resid_post of model .* has width {width}"):
        check_d_in(lm, bad, sae_name="bad")


# ---------------------------------------------------------------- many SAEs in one pass, feature ranges, run files
def test_two_saes_in_one_pass_equal_separate_runs(two_sae_store, make_store, tiny_store, second_sae_dir):
    """The 2-SAE store equals each SAE alone (separate single-SAE runs over the same tokens)."""
    from saescope.precompute.pipeline import SAESpec

    single = {"tiny": tiny_store, "relu": make_store(saes=[SAESpec(str(second_sae_dir), sae_id="relu")])}
    for sae_id, path in single.items():
        want, got = dump_tables(path, sae_id), dump_tables(two_sae_store, sae_id)
        assert want["examples"], "the run stored examples"
        for table in want:
            assert got[table] == want[table], f"{sae_id}: table {table} differs between the 2-SAE and the single run"
    with Store(two_sae_store) as s:
        assert [x.sae_id for x in s.saes()] == ["relu", "tiny"]
        assert {x.sae_id: x.hook for x in s.saes()} == {"relu": "blocks.2.hook_resid_pre",
                                                         "tiny": "blocks.1.hook_resid_post"}
        assert s.sae("relu").architecture == "standard" and s.count_features("relu") == 48


def test_feature_ranges_give_the_same_tables(make_store, tiny_store):
    """Building tables in many small feature ranges (a few hundred activations each) changes no row."""
    out = make_store(rows_per_range=400)
    assert dump_tables(out, "tiny") == dump_tables(tiny_store, "tiny")


def test_feature_ranges_cut_by_row_count():
    from saescope.precompute.store.write import feature_ranges

    counts = np.array([3, 4, 5, 0, 20, 1, 1, 9, 2])
    ranges = feature_ranges(counts, 10)
    assert ranges == [(0, 1), (2, 3), (4, 4), (5, 6), (7, 7), (8, 8)]
    covered = [f for lo, hi in ranges for f in range(lo, hi + 1)]
    assert covered == list(range(len(counts)))
    assert all(counts[lo:hi + 1].sum() <= 10 or lo == hi for lo, hi in ranges)


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


@pytest.mark.slow  # interrupts a run, then two more runs
def test_a_run_stopped_while_building_tables_resumes_at_the_next_range(tmp_path, make_store, tiny_lm_dir, tiny_sae_dir,
                                                                      small_corpus, caplog):
    """Ctrl-C after 3 feature ranges: the rerun streams nothing, builds only the other ranges, and the store
    equals an uninterrupted run with the same ranges."""
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    kw = dict(model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir), sae_id="tiny")], dataset=str(small_corpus),
              rows_per_range=400, feature_map=False, **TINY_ARGS)
    ref = make_store(rows_per_range=400, feature_map=False)  # the same run, uninterrupted
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
    assert dump_tables(out, "tiny") == dump_tables(ref, "tiny")


def test_weights_work_equals_the_direct_calls_saves_and_reloads(tmp_path, tiny_lm_dir, tiny_sae_dir, caplog):
    """The background thread's logit effects, neighbours and map equal logits.py / featuremap.py called directly;
    its results are saved under the work folder and a second WeightsWork (a resumed run) loads them; a set stop
    event makes both functions raise Cancelled at their first chunk."""
    from saescope.precompute.featuremap import build_feature_map
    from saescope.precompute.logits import Cancelled, logit_effects, nearest_features
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline.loading import load_saes
    from saescope.precompute.pipeline.spec import SAESpec
    from saescope.precompute.pipeline.weights import WeightsWork, live_mask

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    loaded = load_saes([SAESpec(str(tiny_sae_dir))])
    W = loaded[0].sae.W_dec.detach()
    counts = np.arange(W.shape[0]) % 3  # every third feature dead
    caplog.set_level("INFO")
    work = WeightsWork(lm, loaded, tmp_path / "weights")
    work.start_maps([live_mask(counts)])
    (logits, (ids, sims)), = work.logits()
    want = logit_effects(W, lm.unembedding(), lm.final_norm_gain(), n=10)
    assert logits.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(logits[k], want[k])
    want_ids, want_sims = nearest_features(W, n=10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(sims, want_sims)
    np.testing.assert_array_equal(work.maps()[0], build_feature_map(W.float().numpy(), mask=counts > 0))
    assert (tmp_path / "weights" / "sae-0.npz").exists()
    assert caplog.text.count("logit effects and neighbours of") == 1
    again = WeightsWork(lm, loaded, tmp_path / "weights")  # a resumed run: loaded, not recomputed
    (logits2, (ids2, sims2)), = again.logits()
    assert caplog.text.count("logit effects and neighbours of") == 1
    for k in want:
        np.testing.assert_array_equal(logits2[k], want[k])
    np.testing.assert_array_equal(ids2, want_ids)
    assert again.maps() is None  # start_maps not called
    from saescope.precompute.quality import weight_metrics

    want_wm = weight_metrics(loaded[0].sae)  # the quality metrics of the weights: the same floats, also when loaded
    assert work.quality_from_weights() == [want_wm] == again.quality_from_weights()
    later = WeightsWork(lm, loaded, tmp_path / "later", beside_stream=False)  # started when the stream ends
    assert later._logits is None
    later.stream_done()
    (logits3, (ids3, _)), = later.logits()
    for k in want:
        np.testing.assert_array_equal(logits3[k], want[k])
    np.testing.assert_array_equal(ids3, want_ids)
    ev = threading.Event()  # set: the next chunk raises
    ev.set()
    with pytest.raises(Cancelled):
        logit_effects(W, lm.unembedding(), lm.final_norm_gain(), stop=ev)
    with pytest.raises(Cancelled):
        nearest_features(W, stop=ev)
