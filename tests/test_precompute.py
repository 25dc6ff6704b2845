"""The stored dashboard data equals an independent dense brute force over the same small corpus."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pytest

from saescope.precompute.store import Store
from saescope.precompute.store.schema import priority
from tests.conftest import TINY_ARGS, interrupt_after
from tests.helpers import dense_reference, dump_tables

T = TINY_ARGS["context_len"]


@pytest.fixture(scope="module")
def brute(tiny_lm_dir, tiny_sae_dir, small_corpus):
    """Dense activations of every feature on every token, computed without the precompute code path."""
    ref = dense_reference(str(tiny_lm_dir), str(tiny_sae_dir), str(small_corpus), TINY_ARGS["tokens"], T)
    assert (ref["ctxs"][:, 0] == ref["tok"].bos_token_id).all()
    return ref


@pytest.fixture(scope="module")
def store(tiny_store):
    with Store(tiny_store) as s:
        yield s


def test_provenance(store, brute):
    sae = store.sae("tiny")
    n_ctx = brute["ctxs"].shape[0]
    assert sae.n_contexts == n_ctx and sae.n_tokens == n_ctx * T and sae.context_len == T
    assert sae.n_counted == int((~brute["special"]).sum())
    assert sae.hook == "blocks.1.hook_resid_post" and sae.prepend_bos and sae.d_sae == 96
    assert sae.params["top_k"] == TINY_ARGS["top_k"] and sae.saescope_version and sae.created


def test_statistics(store, brute):
    A, counted = brute["A"], int((~brute["special"]).sum())
    F = A.shape[-1]
    flat = A.reshape(-1, F)
    rows = {r.index: r for r in store.features("tiny", limit=1000)}
    assert len(rows) == F
    for f in range(F):
        v = flat[:, f][flat[:, f] > 0]
        r = store.feature("tiny", f)
        assert r.n_active == len(v)
        assert math.isclose(r.density, len(v) / counted, rel_tol=1e-12)
        if len(v) == 0:
            assert r.max_act == 0 and sum(r.hist) == 0
            continue
        assert math.isclose(r.max_act, v.max(), rel_tol=1e-6)
        assert math.isclose(r.mean_act, v.astype(np.float64).mean(), rel_tol=1e-5)
        edges = np.linspace(v.min(), v.max(), 51)
        bins = np.minimum(((v.astype(np.float64) - v.min()) / max(v.max() - v.min(), 1e-12) * 50).astype(int), 49)
        assert r.hist == np.bincount(bins, minlength=50).tolist(), f"feature {f}"
        assert math.isclose(r.hist_lo, edges[0], rel_tol=1e-6) and math.isclose(r.hist_hi, edges[-1], rel_tol=1e-6)


def test_top_examples(store, brute):
    A, ctxs = brute["A"], brute["ctxs"]
    k = TINY_ARGS["top_k"]
    checked = 0
    for f in range(A.shape[-1]):
        per_ctx = A[:, :, f]  # (n_ctx, T)
        mx, arg = per_ctx.max(1), per_ctx.argmax(1)  # argmax: the first position of the max
        order = sorted((i for i in range(len(mx)) if mx[i] > 0), key=lambda i: (-mx[i], i))[:k]
        got = store.examples("tiny", f, "top")
        assert [(e.ctx_id, e.pos) for e in got] == [(i, int(arg[i])) for i in order], f"feature {f}"
        for e in got:
            assert math.isclose(e.value, mx[e.ctx_id], rel_tol=1e-6)
            assert e.token_ids == ctxs[e.ctx_id].tolist()
            np.testing.assert_allclose(e.acts, per_ctx[e.ctx_id], rtol=1e-6, atol=0)
            checked += 1
        # the list view's top tokens are the tokens at the max of each top example, deduplicated
        want = list(dict.fromkeys(store.vocab(store.sae("tiny").model_key)[ctxs[i][arg[i]]] for i in order))
        assert store.feature("tiny", f).top_tokens == want
    assert checked > 100


def _active(A, f):
    n_ctx, T_ = A.shape[:2]
    c, p = np.nonzero(A[:, :, f] > 0)
    return [(int(ci), int(pi), float(A[ci, pi, f])) for ci, pi in zip(c, p)]


def test_interval_samples(store, brute):
    A = brute["A"]
    n_int, per = TINY_ARGS["n_intervals"], TINY_ARGS["per_interval"]
    for f in range(A.shape[-1]):
        act = _active(A, f)
        groups = {g.grp: g for g in store.groups("tiny", f, "interval")}
        if not act:
            assert not groups
            continue
        mx = np.float32(max(v for *_, v in act))
        bins: dict[int, list] = {}
        for c, p, v in act:
            b = min(math.floor(float(np.float32(v)) / float(mx) * n_int), n_int - 1)
            bins.setdefault(b, []).append((priority(c, p, f, T), c, p, v))
        assert set(groups) == set(bins), f"feature {f}"
        for b, items in bins.items():
            g = groups[b]
            assert g.n_tokens == len(items) and math.isclose(g.share, len(items) / len(act), rel_tol=1e-12)
            want = [(c, p) for _, c, p, _ in sorted(items)[:per]]
            assert [(e.ctx_id, e.pos) for e in g.examples] == want
            assert all(e.value > 0 for e in g.examples), "interval samples never draw zeros"
            assert all(g.lo - 1e-6 <= e.value <= g.hi + 1e-6 for e in g.examples)


def test_quantile_samples(store, brute):
    A = brute["A"]
    nq, per = TINY_ARGS["n_quantiles"], TINY_ARGS["per_quantile"]
    for f in range(A.shape[-1]):
        act = sorted(_active(A, f), key=lambda t: (t[2], t[0], t[1]))
        groups = {g.grp: g for g in store.groups("tiny", f, "quantile")}
        n = len(act)
        if n == 0:
            assert not groups
            continue
        # ntile: the first n % nq groups hold one extra row
        sizes = [n // nq + (1 if i < n % nq else 0) for i in range(nq)]
        start = 0
        for q, size in enumerate(sizes):
            if size == 0:
                continue
            chunk = act[start:start + size]
            start += size
            g = groups[q]
            assert g.n_tokens == size and math.isclose(g.lo, chunk[0][2], rel_tol=1e-6) and math.isclose(g.hi, chunk[-1][2], rel_tol=1e-6)
            want = [(c, p) for _, c, p in sorted((priority(c, p, f, T), c, p) for c, p, _ in chunk)[:per]]
            assert [(e.ctx_id, e.pos) for e in g.examples] == want, f"feature {f} quantile {q}"


def test_logit_effects_and_neighbours(store, brute):
    model, sae = brute["model"], brute["sae"]
    gain = model.model.norm.weight.detach()
    W_U = model.lm_head.weight.detach()  # (vocab, d)
    L = ((sae.W_dec.detach() * gain) @ W_U.T).numpy()  # full (F, vocab), fine at this size
    vocab = store.vocab(store.sae("tiny").model_key)
    Wn = sae.W_dec.detach().numpy() / np.linalg.norm(sae.W_dec.detach().numpy(), axis=1, keepdims=True)
    S = Wn @ Wn.T
    np.fill_diagonal(S, -np.inf)
    for f in (0, 7, 50, 95):
        r = store.feature("tiny", f)
        top = np.argsort(-L[f])[:10]
        assert [t for t, _ in r.logit_pos] == [vocab[i] for i in top]
        np.testing.assert_allclose([v for _, v in r.logit_pos], L[f][top], rtol=1e-4, atol=1e-5)
        bot = np.argsort(L[f])[:10]
        assert [t for t, _ in r.logit_neg] == [vocab[i] for i in bot]
        assert sum(r.logit_hist) == L.shape[1]
        nb = np.argsort(-S[f])[:10]
        assert [i for i, _ in r.neighbours] == nb.tolist()
        np.testing.assert_allclose([s for _, s in r.neighbours], S[f][nb], rtol=1e-5)


def test_stored_activations_equal_a_fresh_recompute(store, tiny_lm_dir, tiny_sae_dir):
    """Each top example's context, run alone through the live code path, gives the stored values to 1e-4."""
    from saescope.precompute.models import load_model
    from saescope.precompute.encode import encode_batch
    from saescope.precompute.saes import load_sae

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    sae = load_sae(str(tiny_sae_dir))
    for f in (3, 11, 40):
        for e in store.examples("tiny", f, "top")[:3]:
            z = encode_batch(lm, sae, np.asarray([e.token_ids], dtype=np.int32), sae.cfg.hook_name)[0, :, f].numpy()
            np.testing.assert_allclose(e.acts, z, rtol=1e-4, atol=1e-6)


def test_interrupted_run_resumes_to_the_same_store(tmp_path, tiny_store, tiny_lm_dir, tiny_sae_dir, small_corpus, caplog):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    args = dict(out=tmp_path / "r.duckdb", model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir), sae_id="tiny")],
                dataset=str(small_corpus), **TINY_ARGS)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(PrecomputeSpec(**args, on_event=interrupt_after("batch", batches=2)))
    assert not (tmp_path / "r.duckdb").exists(), "nothing is published before the run completes"
    caplog.set_level("INFO")
    run_precompute(PrecomputeSpec(**args))
    assert "resuming: 16 of 40 contexts already done" in caplog.text
    assert dump_tables(tmp_path / "r.duckdb") == dump_tables(tiny_store)
    assert not (tmp_path / "r.duckdb.work").exists()


PAUSING_PRECOMPUTE = """
import sys, time
from saescope.app.cli import build_parser
from saescope.app.cli.precompute import spec_from_args
from saescope.precompute.pipeline import run_precompute

def pause(name, **info):
    if name == "batch" and info["batches"] == 12:
        print("paused after 12 committed batches (for a test)", flush=True)
        time.sleep(600)

spec = spec_from_args(build_parser().parse_args(sys.argv[1:]))
spec.on_event = pause
run_precompute(spec)
"""


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes(tmp_path, tiny_store, tiny_lm_dir, tiny_sae_dir, small_corpus):
    """A real SIGKILL of the CLI mid-stream; the rerun completes and equals the uninterrupted store."""
    out = tmp_path / "k.duckdb"
    cmd = [sys.executable, "-m", "saescope.app.cli", "precompute", "--model", str(tiny_lm_dir), "--sae", str(tiny_sae_dir),
           "--dataset", str(small_corpus), "--sae-id", "tiny", "--tokens", str(TINY_ARGS["tokens"]),
           "--context-len", str(T), "--batch-size", "1", "--top-k", str(TINY_ARGS["top_k"]), "--out", str(out),
           "--no-map"]  # the map is checked elsewhere; here it would only add a numba compile to the subprocess
    for name in ("n_intervals", "per_interval", "n_quantiles", "per_quantile"):
        cmd += ["--" + name.replace("_", "-"), str(TINY_ARGS[name])]
    env = dict(os.environ)
    # the killed run: the same CLI parse and run, with an on_event that pauses after 12 committed batches, so that
    # the kill -9 lands mid-stream on any machine
    paused = [sys.executable, "-c", PAUSING_PRECOMPUTE, *cmd[3:]]
    proc = subprocess.Popen(paused, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline:  # wait until 12 batches are committed (the run pauses there), then kill -9
        line = proc.stdout.readline()
        seen += line
        if "paused after 12 committed batches" in line or not line:
            break
    assert "paused after 12" in seen, seen[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming:" in rerun.stderr
    d, ref = dump_tables(out), dump_tables(tiny_store)
    # batch size 1 vs 8 changes nothing here beyond float round-off; compare with a tolerance
    assert d["contexts"] == ref["contexts"] and d["vocab"] == ref["vocab"]
    assert [r[:6] for r in d["examples"]] == [r[:6] for r in ref["examples"]]
    np.testing.assert_allclose([r[7] for r in d["examples"]], [r[7] for r in ref["examples"]], rtol=1e-5)


# what a test of the run's bookkeeping (resume, SAE lists) skips: the map, co-occurrence, quality metrics and the fp32
# spot check, each tested on its own stores
LEAN = dict(feature_map=False, cooccurrence=False, eval_tokens=0, verify_sample=0)


def test_changed_settings_refuse_to_resume(tmp_path, tiny_lm_dir, tiny_sae_dir, small_corpus):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    args = dict(out=tmp_path / "c.duckdb", model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir))], dataset=str(small_corpus),
                **TINY_ARGS, **LEAN)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(PrecomputeSpec(**args, on_event=interrupt_after("batch", batches=1)))
    with pytest.raises(ValueError, match="--restart"):
        run_precompute(PrecomputeSpec(**{**args, "context_len": 32}))
    run_precompute(PrecomputeSpec(**{**args, "context_len": 32}, restart=True))
    with Store(tmp_path / "c.duckdb") as s:
        assert s.saes()[0].context_len == 32


def test_two_saes_share_one_store(tmp_path, tiny_lm_dir, tiny_sae_dir, small_corpus):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    out = tmp_path / "two.duckdb"
    for sid in ("a", "b"):
        run_precompute(PrecomputeSpec(out=out, model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir), sae_id=sid)],
                                      dataset=str(small_corpus), **{**TINY_ARGS, "tokens": 64 * 8}, **LEAN))
    with Store(out) as s:
        assert [x.sae_id for x in s.saes()] == ["a", "b"]
        assert s.count_features("a") == s.count_features("b") == 96


def test_unknown_store_version_is_refused(tmp_path):
    from saescope.precompute.store import StoreError

    p = tmp_path / "old.duckdb"
    con = duckdb.connect(str(p))
    con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR); INSERT INTO meta VALUES ('schema_version', '999')")
    con.close()
    with pytest.raises(StoreError, match="schema version 999.*Rebuild"):
        Store(p)
