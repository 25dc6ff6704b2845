"""`saescope explain` on a real store, the worker's /explain and /v1 chat routes, and explanations on the pages.

Real components only: the demo store (SmolLM2-135M-Instruct + the committed demo SAE), the embedded model as the
local LLM, and the worker (uvicorn on a free port) serving that model through its OpenAI-compatible route as the
HTTP LLM. The 135M model is slow and weak, so prompts are kept tiny (2 top examples, few answer tokens); what is
checked is the plumbing and the numbers stored, each against an independent computation: the negatives by
re-encoding with the model and SAE, the stored scores by scoring again through the same greedy backend, BM25 order
by BM25Index itself, score order by Python sorting.
"""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from saescope.precompute.store.explanations import explained_features, non_activating_contexts
from saescope.app.cli import main
from saescope.app.web.app import create_app
from saescope.precompute.explain import PROMPT_VERSION, ExplainConfig, OpenAIChatBackend, score_explanation
from saescope.precompute.explain.run import SOURCE, material_from_store, score_row
from saescope.precompute.store.search import BM25Index
from saescope.precompute.store import Store
from saescope.precompute.store.write import add_explanations
from tests.conftest import serve_in_thread

TINY = ["--n-top", "2", "--per-group", "0", "--no-progress"]  # 2 examples in the prompt: seconds, not minutes


def copy_store(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / "store.duckdb"
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture(scope="module")
def demo_info(demo_store):
    """(sae_id, a live feature with provable negatives, another one) of the demo store."""
    with Store(demo_store) as s:
        sae = s.saes()[0]
        live = [r.index for r in s.features(sae.sae_id, limit=200, dead=False)]
        covered = [i for i in live if non_activating_contexts(s, sae.sae_id, i, 4)
                   and len(s.examples(sae.sae_id, i, "quantile")) >= 6]
    return sae.sae_id, covered[0], covered[1]


def covers_every_activation(store: Store, sae_id: str, index: int) -> bool:
    """Independently of the store's query: the distinct contexts of the feature's examples hold all its active
    tokens (their nonzero counts add up to n_active)."""
    per_ctx = {e.ctx_id: sum(a > 0 for a in e.acts) for kind in ("top", "interval", "quantile")
               for e in store.examples(sae_id, index, kind)}
    return sum(per_ctx.values()) == store.feature(sae_id, index).n_active


@pytest.fixture(scope="module")
def engine(demo_store):
    """The model worker's engine for the demo store: the model and SAE the store was built with."""
    from saescope.app.worker.engine import build_engine, sources_from_store

    model, saes, hooks = sources_from_store(demo_store)
    return build_engine(model, saes, hooks, "cpu", "float32")


def test_non_activating_contexts_are_truly_zero(demo_store, demo_info, engine):
    """Re-encode the returned contexts with the model and SAE: the feature is 0 on every token of each."""
    from saescope.precompute.encode import encode_batch

    sae_id, f, _ = demo_info
    with Store(demo_store) as s:
        info = s.sae(sae_id)
        assert covers_every_activation(s, sae_id, f)
        ctx = non_activating_contexts(s, sae_id, f, 6, seed=0)
        assert len(ctx) == 6 and ctx == non_activating_contexts(s, sae_id, f, 6, seed=0)
        assert ctx != non_activating_contexts(s, sae_id, f, 6, seed=1)  # another seed, another sample
        mine = {tuple(e.tokens) for kind in ("top", "interval", "quantile") for e in s.examples(sae_id, f, kind)}
        assert not mine & {tuple(c) for c in ctx}
        vocab = s.vocab(info.model_key)
    con = duckdb.connect(str(demo_store), read_only=True)  # the contexts table read directly, not through Store
    stored = [r[0] for r in con.execute("SELECT tokens FROM contexts WHERE sae_id = ?", [sae_id]).fetchall()]
    con.close()
    by_text = {tuple(vocab[i] for i in ids): ids for ids in stored}
    ids = np.array([by_text[tuple(c)] for c in ctx], dtype=np.int32)  # (6, T)
    with Store(demo_store) as s:
        dense = next(r.index for r in s.features(sae_id, sort="density", desc=True, limit=5)
                     if not covers_every_activation(s, sae_id, r.index))
        assert non_activating_contexts(s, sae_id, dense, 6) == []  # nothing provable: nothing returned
    sae = engine.sae(sae_id)
    with engine.model_lock, torch.no_grad():
        z = encode_batch(engine.lm, sae, ids, sae.cfg.hook_name)  # (6, T, d_sae)
    assert float(z[:, :, f].abs().max()) == 0.0
    assert float(z.abs().max()) > 0  # the contexts do activate other features


def test_cli_local_explains_with_provenance_resumes_and_shows(demo_store, demo_info, tmp_path, capsys):
    sae_id, f, _ = demo_info
    path = copy_store(demo_store, tmp_path)
    argv = ["explain", str(path), "--features", str(f), "--no-score", "--max-tokens", "12", *TINY]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "weak" in out.err and "1 explanations written" in out.out
    with Store(path) as s:
        rows = s.feature(sae_id, f).explanation_rows
        assert explained_features(s, sae_id, "local:smollm2-135m-instruct", PROMPT_VERSION) == {f}
    assert len(rows) == 1
    e = rows[0]
    assert e.text.strip() and e.source == SOURCE and e.llm == "local:smollm2-135m-instruct"
    assert e.prompt_version == PROMPT_VERSION
    assert e.created[:10] == datetime.now(timezone.utc).date().isoformat()
    assert (e.score_detection, e.score_fuzzing, e.n_scored) == (None, None, None)

    assert main(argv) == 0  # resumable: the second run skips the feature
    again = capsys.readouterr().out  # (decided before loading the model)
    assert "0 explanations written" in again and "already explained by local:smollm2-135m-instruct" in again
    with Store(path) as s:
        assert len(s.feature(sae_id, f).explanation_rows) == 1

    with TestClient(create_app(path)) as c:
        html = c.get(f"/sae/{sae_id}/feature/{f}").text
        assert 'data-score="unscored"' in html and "local:smollm2-135m-instruct" in html
        assert str(e.text).replace('"', "&#34;").replace("'", "&#39;").replace("<", "&lt;") in html
        assert 'hx-post="/live/explain"' in html
        api = c.get(f"/api/saes/{sae_id}/features/{f}").json()
        assert api["explanation_rows"][0]["llm"] == "local:smollm2-135m-instruct"
        assert api["explanation_rows"][0]["n_scored"] is None

    assert main(["explain", str(path), "--features", "99999", "--no-score"]) == 2  # out of range: a clear error
    assert "outside 0-4095" in capsys.readouterr().err


@pytest.fixture(scope="module")
def worker_url(engine):
    """The model worker for the demo store, in this process under uvicorn on a free port."""

    from saescope.app.worker.routes import create_worker_app

    with serve_in_thread(create_worker_app(engine)) as url:
        yield url


def test_cli_scores_through_the_workers_openai_route(demo_store, demo_info, worker_url, tmp_path, capsys):
    sae_id, _, f = demo_info
    health = httpx.get(f"{worker_url}/health").json()
    name = health["chat_model"]
    assert name == "smollm2-135m-instruct"
    assert httpx.get(f"{worker_url}/v1/models").json()["data"][0]["id"] == name
    path = copy_store(demo_store, tmp_path)
    assert main(["explain", str(path), "--features", str(f), "--llm", f"{worker_url}/v1", "--llm-model", name,
                 "--score", "--n-test", "2", "--max-tokens", "12", "--concurrency", "1", *TINY]) == 0
    assert "weak" not in capsys.readouterr().err
    with Store(path) as s:
        (e,) = s.feature(sae_id, f).explanation_rows
        material = material_from_store(s, sae_id, f, 2 + 2)
    llm = f"{name} @ {worker_url}/v1"
    assert e.llm == llm and e.prompt_version == PROMPT_VERSION and e.text.strip()
    assert e.n_scored is not None and 0 <= e.n_scored <= 2 * (2 + 2)  # two methods, 2 + 2 snippets each
    # the stored numbers are what the scorer computes: score again through the same greedy backend
    cfg = ExplainConfig(explain_max_tokens=12, n_test=2, n_top=2, per_group_explain=0)
    with OpenAIChatBackend(f"{worker_url}/v1", name, max_concurrency=1) as http:
        again = score_row(score_explanation(http, e.text, material, cfg, seed=0))
    assert again == {"score_detection": e.score_detection, "score_fuzzing": e.score_fuzzing, "n_scored": e.n_scored}
    for v in (e.score_detection, e.score_fuzzing):
        assert v is None or 0.0 <= v <= 1.0
    with pytest.raises(httpx.HTTPStatusError):  # the worker's chat route refuses another model name
        httpx.post(f"{worker_url}/v1/chat/completions", json={"model": "gpt-9", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 2}).raise_for_status()


def test_explain_button_runs_through_the_worker(demo_store, demo_info, worker_url):
    """The dashboard sends the feature's stored examples to the worker's POST /explain; the answer is shown."""
    from saescope.app.web.live import explain_request
    from saescope.app.worker.client import WorkerClient

    sae_id, f, _ = demo_info
    with Store(demo_store) as s:
        body = explain_request(s, sae_id, f)
        assert [e.tokens for e in body.top[:2]] == [  # the stored top examples, cut to the explainer's window
            list(material_from_store(s, sae_id, f, 0).top[i].tokens[max(0, a - 24):a + 9])
            for i, a in enumerate(int(np.argmax(e.acts)) for e in s.examples(sae_id, f, "top")[:2])]
    small = body.model_copy(update={"top": body.top[:2], "quantiles": [], "max_tokens": 8})
    out = WorkerClient(worker_url).explain(small)
    assert out.llm.startswith("worker:") and "smollm2-135m-instruct" in out.llm and out.n_examples == 2
    assert out.prompt_version == PROMPT_VERSION and out.scores == []
    with TestClient(create_app(demo_store, worker_url=worker_url)) as c:
        r = c.post("/live/explain", data={"sae": sae_id, "feature": str(f)})
        assert r.status_code == 200 and "not saved" in r.text
        assert c.post("/live/explain", data={"sae": sae_id, "feature": "99999"}).status_code == 404
    with TestClient(create_app(demo_store)) as c:  # no worker: a plain notice
        r = c.post("/live/explain", data={"sae": sae_id, "feature": str(f)})
        assert r.status_code == 200 and "--no-worker" in r.text


# ---------------------------------------------------------------------------------------------------------------
# stored explanations: BM25 search, score badges, sort/filter, histogram (no LLM needed)

TEXTS = {
    3: ("Python keywords such as def and class", 0.91, 0.85, 40),
    5: ("the word the <b>bold</b>", 0.52, 0.50, 40),  # near chance, with markup that must be escaped
    8: ("closing parenthesis of a function call", 0.75, None, 20),
    9: ("function definitions in Python code: def", None, None, 0),  # judged but unparsable
    12: ("numbers and digits", None, None, None),  # not scored
    14: ("def def def keyword", 0.30, 0.42, 40),  # below chance
}


@pytest.fixture(scope="module")
def scored_store(demo_store, demo_info, tmp_path_factory):
    sae_id = demo_info[0]
    path = copy_store(demo_store, tmp_path_factory.mktemp("scored"))
    rows = [{"feature": i, "text": t, "llm": "judge-x", "prompt_version": PROMPT_VERSION, "created": "2025-01-02",
             "score_detection": d, "score_fuzzing": z, "n_scored": n} for i, (t, d, z, n) in TEXTS.items()]
    assert add_explanations(path, sae_id, rows, "test") == len(rows)
    assert add_explanations(path, sae_id, [(20, "imported python text")], "np.json") == 1  # old call shape
    return path


def feature_score(d, z):
    vals = [v for v in (d, z) if v is not None]
    return sum(vals) / len(vals) if vals else None


def test_bm25_search_ranks_and_highlights(scored_store, demo_info):
    sae_id = demo_info[0]
    with Store(scored_store) as s:
        hits, total = s.search_explanations(sae_id, "python def")
        texts = {**{i: t for i, (t, *_) in TEXTS.items()}, 20: "imported python text"}
        order = sorted(texts)  # the store indexes rows by (feature, text): one text per feature here
        want = BM25Index([texts[i] for i in order]).search("python def")
        assert [h.index for h in hits] == [order[w.index] for w in want]
        assert [h.score for h in hits] == pytest.approx([w.score for w in want])
        assert total == len(want) == 4 and {h.index for h in hits} == {3, 9, 14, 20}
        page2, total2 = s.search_explanations(sae_id, "python def", limit=2, offset=2)
        assert [h.index for h in page2] == [h.index for h in hits[2:4]] and total2 == 4
    with TestClient(create_app(scored_store)) as c:
        html = c.get(f"/sae/{sae_id}/search", params={"q": "python def", "by": "explanation"}).text
        assert "<mark>Python</mark> keywords such as <mark>def</mark> and class" in html
        shown = [int(i) for i in re.findall(r'<tr><td><a href="/sae/[^"]+/feature/(\d+)"', html)]
        assert shown == [h.index for h in hits]  # the page lists them in BM25 order
        html = c.get(f"/sae/{sae_id}/search", params={"q": "bold", "by": "explanation"}).text
        assert "&lt;b&gt;<mark>bold</mark>&lt;/b&gt;" in html and "<b>bold" not in html


def test_scores_sort_filter_badges_and_histogram(scored_store, demo_info):
    sae_id = demo_info[0]
    scores = {i: feature_score(d, z) for i, (_, d, z, _) in TEXTS.items()}
    ranked = sorted((i for i in scores if scores[i] is not None), key=lambda i: (-scores[i], i))
    with TestClient(create_app(scored_store)) as c:
        api = c.get(f"/api/saes/{sae_id}/features", params={"sort": "score", "order": "desc", "size": 6}).json()
        assert [r["index"] for r in api["features"][:len(ranked)]] == ranked
        assert [r["score"] for r in api["features"][:len(ranked)]] == pytest.approx([scores[i] for i in ranked])
        assert api["features"][len(ranked)]["score"] is None  # unscored ones come last
        asc = c.get(f"/api/saes/{sae_id}/features", params={"sort": "score", "order": "asc", "size": 4}).json()
        assert [r["index"] for r in asc["features"]] == ranked[::-1]
        flt = c.get(f"/api/saes/{sae_id}/features", params={"min_score": 0.6}).json()
        assert flt["total"] == sum(v is not None and v >= 0.6 for v in scores.values()) == 2
        assert {r["index"] for r in flt["features"]} == {3, 8}
        bad = c.get(f"/api/saes/{sae_id}/features", params={"min_score": 2})
        assert bad.status_code == 422

        html = c.get(f"/sae/{sae_id}", params={"sort": "score", "order": "desc"}).text
        assert "explanation score distribution" in html and "4 scored features" in html
        bars = re.findall(r"<title>([0-9.]+) – ([0-9.]+): (\d+)</title>", html)
        want = {}
        for v in scores.values():  # 20 equal bins of [0, 1] by hand (no score lies on an edge)
            if v is not None:
                want[int(v * 20)] = want.get(int(v * 20), 0) + 1
        assert {round(float(lo) * 20): int(n) for lo, _, n in bars} == want
        assert html.index(f'feature/{ranked[0]}"') < html.index(f'feature/{ranked[1]}"')
        assert "0.51 ≈ chance" in html  # feature 5: (0.52 + 0.50) / 2

        f5 = c.get(f"/sae/{sae_id}/feature/5").text
        assert 'data-score="chance"' in f5 and "detection 0.52 ≈ chance" in f5 and "fuzzing 0.50 ≈ chance" in f5
        assert "&lt;b&gt;bold&lt;/b&gt;" in f5
        f3 = c.get(f"/sae/{sae_id}/feature/3").text
        assert 'data-score="good"' in f3 and "detection 0.91" in f3 and "≈ chance" not in f3
        assert 'data-score="unparsable"' in c.get(f"/sae/{sae_id}/feature/9").text
        assert 'data-score="unscored"' in c.get(f"/sae/{sae_id}/feature/12").text
        assert "≈ chance" in c.get(f"/sae/{sae_id}/feature/14").text  # below chance is no better than chance
        f20 = c.get(f"/sae/{sae_id}/feature/20").text
        assert "imported python text" in f20 and "np.json" in f20
