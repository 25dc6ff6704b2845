"""Sharded precompute on a real local Ray (2 CPUs): the store equals the one-process store, table for table."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_ARGS
from tests.helpers import dump_tables

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install -e '.[test,ray]'")

@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def args(out: Path, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus, **kw):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec

    return PrecomputeSpec(out=out, model=str(tiny_lm_dir), dataset=str(small_corpus),
                          saes=[SAESpec(str(tiny_sae_dir), None, "tiny"), SAESpec(str(second_sae_dir), None, "relu")],
                          rows_per_range=300, **{**TINY_ARGS, **kw})


@pytest.fixture(scope="module")
def single(two_sae_store) -> Path:
    """The same two SAEs precomputed in one process (the session's two-SAE store; feature ranges change no row)."""
    return two_sae_store


def test_sharded_on_ray_equals_one_process(local_ray, single, tmp_path, tiny_lm_dir, tiny_sae_dir, second_sae_dir,
                                           small_corpus, caplog):
    from saescope.precompute.pipeline import run_precompute

    caplog.set_level("INFO")
    out = tmp_path / "sharded.duckdb"
    run_precompute(args(out, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus, shards=3))
    assert "streaming 3 shard(s) of 3 on Ray" in caplog.text
    got, want = dump_tables(out), dump_tables(single)
    assert got.keys() == want.keys()
    for t in want:
        assert got[t] == want[t], f"table {t} differs between the sharded and the one-process run"
    assert len(want["examples"]) > 100 and len(want["saes"]) == 2
    assert not out.with_name(out.name + ".work").exists()


def test_a_sealed_shard_is_not_streamed_again(local_ray, single, tmp_path, tiny_lm_dir, tiny_sae_dir, second_sae_dir,
                                              small_corpus, caplog):
    """Shard 1 finished before the run was stopped: the rerun streams only shards 0 and 2 and equals the rest."""
    from saescope.precompute.embedded import resolve_model
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline.loading import load_saes
    from saescope.precompute.pipeline.stream import stream_shard
    from saescope.precompute.pipeline.workdir import Plan, WorkDir

    out = tmp_path / "resumed.duckdb"
    a = args(out, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus, shards=3)
    # what run_precompute will plan, streamed for shard 1 here in this process
    lm = load_model(resolve_model(a.model), "cpu", "float32")
    loaded = load_saes(a.saes)
    n_ctx = a.tokens // a.context_len
    fingerprint = {"model": str(tiny_lm_dir), "saes": [[x.path, x.hook] for x in loaded], "dataset": a.dataset,
                   "text_field": a.text_field, "contexts": n_ctx, "context_len": a.context_len,
                   "batch_size": a.batch_size, "prepend_bos": True, "device": "cpu", "dtype": "torch.float32"}
    plan = Plan.make(fingerprint, n_ctx, a.context_len, a.batch_size, [x.sae.cfg.d_sae for x in loaded], 3)
    work = WorkDir(out.with_name(out.name + ".work"))
    work.open(plan)
    stream_shard(a, lm, loaded, plan, work, 1, True, progress=False)
    assert work.is_sealed(1) and not work.is_sealed(0)

    from saescope.precompute.pipeline import run_precompute

    caplog.set_level("INFO")
    run_precompute(a)
    assert "streaming 2 shard(s) of 3 on Ray" in caplog.text
    assert dump_tables(out) == dump_tables(single)


def test_shard_plans_fall_on_batch_edges():
    from saescope.precompute.pipeline.workdir import Plan

    p = Plan.make({}, n_ctx=41, context_len=64, batch_size=8, d_sae=[96], n_shards=3)
    assert p.shards[0][0] == 0 and p.shards[-1][1] == 41
    assert all(c0 % 8 == 0 for c0, _ in p.shards) and all(b[0] == a[1] for a, b in zip(p.shards, p.shards[1:]))
    assert len(Plan.make({}, 10, 64, 8, [96], n_shards=5).shards) == 2  # never more shards than batches
    with pytest.raises(ValueError, match="--shards 0"):
        Plan.make({}, 10, 64, 8, [96], n_shards=0)


def test_ray_without_shards_is_refused(tmp_path, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus):
    from saescope.precompute.pipeline import run_precompute

    with pytest.raises(ValueError, match="--ray needs --shards"):
        run_precompute(args(tmp_path / "x.duckdb", tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus,
                            ray="auto"))


def test_sealed_parquet_partitions_features_by_bucket(tmp_path, tiny_lm_dir, tiny_sae_dir, small_corpus):
    """Each bucket file holds only its own features, sorted, and the counts file adds up to the rows."""
    import pyarrow.parquet as pq

    from saescope.precompute.embedded import resolve_model
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec
    from saescope.precompute.pipeline.loading import load_saes
    from saescope.precompute.pipeline.stream import stream_shard
    from saescope.precompute.pipeline.workdir import Plan, WorkDir, bucket_width

    a = PrecomputeSpec(out=tmp_path / "p.duckdb", model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir))],
                       dataset=str(small_corpus), **TINY_ARGS)
    lm = load_model(resolve_model(a.model), "cpu", "float32")
    loaded = load_saes(a.saes)
    plan = Plan.make({}, 40, a.context_len, a.batch_size, [96], 1)
    work = WorkDir(tmp_path / "w")
    work.open(plan)
    stream_shard(a, lm, loaded, plan, work, 0, True, progress=False)
    w = bucket_width(96)
    total = 0
    for f in work.all_act_files(0):
        t = pq.read_table(f).to_pydict()
        b = int(Path(f).parent.name.split("-")[1])
        assert all(b * w <= x < (b + 1) * w for x in t["feature"])
        keys = list(zip(t["feature"], t["ctx"], t["pos"]))
        assert keys == sorted(keys)
        total += len(keys)
    assert total == int(work.counts(0, 96).sum()) > 0
    ctx = pq.read_table(work.context_files()[0]).to_pydict()
    assert ctx["ctx"] == list(range(40)) and all(len(t) == 64 for t in ctx["tokens"])
    assert np.all(np.asarray(ctx["n_counted"]) <= 64)
