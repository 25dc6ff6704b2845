"""A real model-worker process on loopback: equal values, batching that changes nothing, clear refusals."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from saescope.app.settings import WORKER
from saescope.app.web.app import create_app
from saescope.precompute.config import LIMITS
from saescope.precompute.store import Store
from tests.conftest import free_port, serve_in_thread
from tests.helpers import start_process, stop_process, worker_cmd

TEXTS = ["The file descriptor is closed.", "def f(x):\n    return x + 1", "Return a new socket object.",
         "If the buffer is full, the call blocks.", "A", "Raise ValueError when the key is missing from the mapping."]


def start_worker(store, port: int, *extra: str) -> subprocess.Popen:
    """A worker process of its own (for tests that pass flags or kill it; others share conftest's tiny_worker)."""
    return start_process(worker_cmd(store, port, *extra), ready=f"http://127.0.0.1:{port}/health",
                         stdout=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    stop_process(proc, grace_s=0)


@pytest.fixture(scope="module")
def worker(tiny_worker):
    return tiny_worker


@pytest.fixture(scope="module")
def engine_parts(tiny_lm_dir, tiny_sae_dir):
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    return load_model(str(tiny_lm_dir), "cpu", "float32"), load_sae(str(tiny_sae_dir))


def direct(engine_parts, ids) -> np.ndarray:
    """The precompute code path on one sequence: (T, d_sae)."""
    from saescope.precompute.encode import encode_batch

    lm, sae = engine_parts
    return encode_batch(lm, sae, np.asarray([ids], dtype=np.int32), sae.cfg.hook_name)[0].numpy()


@pytest.mark.slow
def test_worker_equals_precompute_and_the_store(worker, tiny_store, engine_parts):
    with Store(tiny_store) as s:
        for f in (3, 11, 40, 77):
            for ex in s.examples("tiny", f, "top")[:2]:
                r = httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "ids": ex.token_ids, "feature": f})
                assert r.status_code == 200, r.text
                got = np.asarray(r.json()["values"])
                np.testing.assert_allclose(got, ex.acts, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(got, direct(engine_parts, ex.token_ids)[:, f], rtol=1e-4, atol=1e-6)
                assert r.json()["max_pos"] == ex.pos


@pytest.mark.slow
def test_text_is_tokenized_with_bos_like_precompute(worker, engine_parts):
    lm, sae = engine_parts
    r = httpx.post(f"{worker}/tokenize", json={"sae_id": "tiny", "text": TEXTS[0]}).json()
    assert r["ids"][0] == lm.tokenizer.bos_token_id
    assert r["ids"][1:] == lm.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    z = direct(engine_parts, r["ids"])
    a = httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "text": TEXTS[0], "feature": 5}).json()
    np.testing.assert_allclose(a["values"], z[:, 5], rtol=1e-4, atol=1e-6)
    assert a["values"][0] == 0, "BOS is special: never an activation"


@pytest.mark.slow
def test_top_and_per_token_features_match_a_dense_ranking(worker, engine_parts):
    ids = httpx.post(f"{worker}/tokenize", json={"sae_id": "tiny", "text": TEXTS[3]}).json()["ids"]
    z = direct(engine_parts, ids)
    top = httpx.post(f"{worker}/top_features", json={"sae_id": "tiny", "text": TEXTS[3], "k": 5}).json()
    mx = z.max(0)
    assert [h["index"] for h in top["features"]] == list(np.argsort(-mx, kind="stable")[:5])
    for h in top["features"]:
        assert h["value"] == pytest.approx(mx[h["index"]], rel=1e-4) and z[h["pos"], h["index"]] == pytest.approx(h["value"], rel=1e-4)
    np.testing.assert_allclose(top["token_max"], z.max(1), rtol=1e-4, atol=1e-6)
    at = httpx.post(f"{worker}/top_features", json={"sae_id": "tiny", "text": TEXTS[3], "k": 3, "positions": [2]}).json()
    assert [h["index"] for h in at["features"]] == list(np.argsort(-z[2], kind="stable")[:3])
    per = httpx.post(f"{worker}/token_features", json={"sae_id": "tiny", "text": TEXTS[3], "k": 4}).json()["per_token"]
    for t, hits in enumerate(per):
        want = [i for i in np.argsort(-z[t], kind="stable")[:4] if z[t, i] > 0]
        assert [h["index"] for h in hits] == want


@pytest.fixture(scope="module")
def inproc(tiny_lm_dir, tiny_sae_dir):
    """The worker app on a real uvicorn in this process (its engine reachable: the tests hold its model lock)."""
    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    engine = build_engine(str(tiny_lm_dir), {"tiny": str(tiny_sae_dir)}, {"tiny": None}, "cpu", "float32",
                          batch_wait_ms=30)
    with serve_in_thread(create_worker_app(engine)) as url:
        yield url, engine


def _wait_for(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _queued_while_locked(engine, n_admitted: int, submit):
    """Run submit() (which starts requests in threads) while the model lock is held, so every request is queued
    before the first forward pass can run; release once n_admitted requests are in the engine's queue."""
    with engine.model_lock:
        before = engine.admitted
        futures = submit()
        _wait_for(lambda: engine.admitted - before >= n_admitted, f"{n_admitted} requests queued")
    return [f.result() for f in futures]


def test_batching_changes_no_result(inproc):
    """Deterministic: the 24 requests are all queued (model lock held) before any forward pass runs."""
    worker, engine = inproc
    solo = {t: httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "text": t, "feature": 9}).json()["values"]
            for t in TEXTS}
    before = httpx.get(f"{worker}/health").json()
    jobs = [TEXTS[i % len(TEXTS)] for i in range(24)]
    with cf.ThreadPoolExecutor(24) as pool:
        outs = _queued_while_locked(engine, len(jobs), lambda: [pool.submit(
            lambda t=t: httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "text": t, "feature": 9},
                                   timeout=60).json()) for t in jobs])
    for t, o in zip(jobs, outs):
        np.testing.assert_allclose(o["values"], solo[t], rtol=1e-5, atol=1e-6)
    after = httpx.get(f"{worker}/health").json()
    n_req, n_batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert n_req == 24 and n_batches < n_req, f"{n_req} requests in {n_batches} forward passes: no batching happened"


@pytest.mark.slow
def test_bad_requests_get_clear_4xx(worker):
    r = httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "text": " ".join(["word"] * 700), "feature": 1})
    assert r.status_code == 413
    # the tiny Llama declares 256 positions: admission uses min(worker limit, the model's own)
    assert WORKER.max_prompt_tokens == 512
    assert r.json()["error"]["message"] == "prompt has 701 tokens; the limit is 256 (the model's position limit)"
    r = httpx.post(f"{worker}/activations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/activations", json={"sae_id": "nope", "text": "x", "feature": 1})
    assert r.status_code == 404 and "this worker has: tiny" in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "text": "x", "feature": 96})
    assert r.status_code == 404 and "features 0 to 95" in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "ids": [1, 10**9], "feature": 1})
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/top_features", json={"sae_id": "tiny", "text": "a b", "positions": [9]})
    assert r.status_code == 422 and "outside the prompt's 3 tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{worker}/activations", json={"sae_id": "tiny", "text": "", "feature": 1})
    assert r.status_code == 200  # BOS alone is a valid prompt with no activations
    assert r.json()["values"] == [0.0]


@pytest.mark.slow
def test_queue_limit_refuses_with_numbers(tiny_store):
    port = free_port()
    proc = start_worker(tiny_store, port, "--max-batch", "1", "--max-queue", "1", "--batch-wait-ms", "0")
    try:
        with cf.ThreadPoolExecutor(24) as pool:
            rs = list(pool.map(lambda i: httpx.post(f"http://127.0.0.1:{port}/activations", timeout=60,
                                                    json={"sae_id": "tiny", "text": TEXTS[i % 6] * 20, "feature": 1}),
                               range(48)))
        codes = {r.status_code for r in rs}
        assert codes <= {200, 503} and 503 in codes and 200 in codes
        busy = next(r for r in rs if r.status_code == 503).json()["error"]["message"]
        assert "(limit 1)" in busy and "retry" in busy
    finally:
        stop(proc)


@pytest.mark.slow
def test_dashboard_live_parts_and_worker_outage(tiny_store):
    port = free_port()
    proc = start_worker(tiny_store, port)
    client = TestClient(create_app(tiny_store, worker_url=f"http://127.0.0.1:{port}"))
    try:
        r = client.get("/inspect", params={"sae": "tiny", "prompt": TEXTS[0]})
        assert r.status_code == 200 and 'id="top-features"' in r.text
        top = httpx.post(f"http://127.0.0.1:{port}/top_features", json={"sae_id": "tiny", "text": TEXTS[0], "k": 20}).json()
        from saescope.app.web.format import fmt

        first = top["features"][0]
        assert f'href="/sae/tiny/feature/{first["index"]}"' in r.text and fmt(first["value"], 4) in r.text
        r = client.get("/inspect", params={"sae": "tiny", "prompt": TEXTS[0], "pos": 2}, headers={"HX-Request": "true", "HX-Target": "token-detail"})
        assert "Token 2" in r.text and "<html" not in r.text
        r = client.post("/live/activations", data={"sae": "tiny", "feature": first["index"], "text": TEXTS[0]})
        assert f'id="live-max">{fmt(first["value"], 4)}<' in r.text
        assert client.get("/api/inspect", params={"sae": "tiny", "prompt": TEXTS[0]}).json()["features"][0] == first
    finally:
        stop(proc)
    # the worker is gone: precomputed pages still work; live parts say so plainly
    time.sleep(2.1)  # past the health cache
    assert client.get("/sae/tiny/feature/3").status_code == 200
    r = client.get("/inspect", params={"sae": "tiny", "prompt": TEXTS[0]})
    assert r.status_code == 200 and "model worker is unavailable" in r.text and "precomputed pages still work" in r.text
    r = client.get("/api/inspect", params={"sae": "tiny", "prompt": TEXTS[0]})
    assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
    r = client.post("/live/activations", data={"sae": "tiny", "feature": 1, "text": "x"})
    assert "unavailable" in r.text
    # ... and recover by themselves when it is back
    proc = start_worker(tiny_store, port)
    try:
        time.sleep(2.1)
        r = client.get("/inspect", params={"sae": "tiny", "prompt": TEXTS[0]})
        assert 'id="top-features"' in r.text and "unavailable" not in r.text
    finally:
        stop(proc)


def test_a_worker_dying_mid_request_gives_a_clear_error(tiny_store):
    """A peer that takes the request and drops the connection, as a crashing worker does."""
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            data = conn.recv(65536)
            if data.startswith(b"GET /health"):
                body = json.dumps({"status": "ok", "model": "fake", "device": "cpu", "saes": [], "queued": 0,
                                   "max_prompt_tokens": 512, "max_batch": 1, "batches": 0, "requests": 0}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            conn.close()  # a POST: read it, then die without answering

    threading.Thread(target=serve, daemon=True).start()
    try:
        client = TestClient(create_app(tiny_store, worker_url=f"http://127.0.0.1:{port}"))
        t0 = time.time()
        r = client.get("/api/inspect", params={"sae": "tiny", "prompt": "hello"})
        assert time.time() - t0 < 10, "never a hung page"
        assert r.status_code == 503 and "closed the connection mid-request" in r.json()["error"]["message"]
    finally:
        srv.close()


@pytest.mark.slow
def test_the_child_worker_never_outlives_serve(tiny_store):
    """`saescope serve` starts the worker as a child; kill -9 the dashboard and the worker goes too."""
    port, wport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saescope.app.cli", "serve", str(tiny_store), "--port", str(port),
                             "--worker-port", str(wport), "--no-prewarm"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    health = f"http://127.0.0.1:{wport}/health"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(health, timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(health).json()["saes"][0]["sae_id"] == "tiny"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 15
    gone = False
    while time.time() < deadline and not gone:
        try:
            httpx.get(health, timeout=0.5)
            time.sleep(0.3)
        except httpx.HTTPError:
            gone = True
    assert gone, "the worker kept running after its dashboard was killed"


# ------------------------------------------------------------------ held-out findings (issues 16 and 17)
@pytest.fixture(scope="module")
def gpt2_128(tmp_path_factory, default_model_dir, tiny_sae_dir):
    """A tiny GPT-2 with 128 learned positions (the worker allows 512) and the real SmolLM2 tokenizer, served by an
    in-process worker with the tiny SAE (d_in 64 at blocks.1.hook_resid_post)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    out = tmp_path_factory.mktemp("gpt2_128")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(out)
    engine = build_engine(str(out), {"tiny": str(tiny_sae_dir)}, {"tiny": None}, "cpu", "float32", batch_wait_ms=30)
    with serve_in_thread(create_worker_app(engine)) as url:
        yield url, engine


def test_an_overlong_prompt_fails_alone_with_a_4xx_naming_the_models_limit(gpt2_128):
    """issue 17 #4: a prompt past the model's 128 positions gave 500 "index out of range in self", and so did the
    short requests batched with it."""
    from saescope.precompute.encode import encode_batch

    url, engine = gpt2_128
    assert WORKER.max_prompt_tokens > 128 and engine.max_prompt_tokens == 128
    short = [TEXTS[i % len(TEXTS)] for i in range(40)]
    long_text = " ".join(["word"] * 200)

    def post(text):
        return httpx.post(f"{url}/activations", json={"sae_id": "tiny", "text": text, "feature": 9}, timeout=60)

    with cf.ThreadPoolExecutor(41) as pool:
        def submit():
            futs = [pool.submit(post, t) for t in short[:20]]
            futs.append(pool.submit(post, long_text))
            return futs + [pool.submit(post, t) for t in short[20:]]
        rs = _queued_while_locked(engine, len(short), submit)
    bad = rs.pop(20)
    assert bad.status_code == 413, bad.text
    assert bad.json()["error"]["message"] == "prompt has 201 tokens; the limit is 128 (the model's position limit)"
    assert [r.status_code for r in rs] == [200] * 40
    sae = engine.saes["tiny"]
    for t, r in zip(short, rs):  # each equals the precompute path run on it alone
        ids = httpx.post(f"{url}/tokenize", json={"sae_id": "tiny", "text": t}).json()["ids"]
        want = encode_batch(engine.lm, sae, np.asarray([ids], dtype=np.int32), sae.cfg.hook_name)[0, :, 9].numpy()
        np.testing.assert_allclose(r.json()["values"], want, rtol=1e-5, atol=1e-6)


def test_one_prompt_rule_for_every_route(inproc):
    """issue 16 #3: whitespace tokenizes (BOS + 4 tokens) but /ablate and /attribute called it "empty", while
    /top_features took "". Now: a prompt is valid when it has at least one token after tokenization, everywhere."""
    url, _ = inproc
    edits = {"edits": [{"feature": 1, "mode": "ablate"}]}
    routes = {"/activations": {"feature": 1}, "/top_features": {}, "/token_features": {},
              "/steer": {**edits, "max_new_tokens": 2}, "/ablate": edits, "/attribute": {"n_top": 3, "n_verify": 1}}
    n_ws = len(httpx.post(f"{url}/tokenize", json={"sae_id": "tiny", "text": "    "}).json()["ids"])
    assert n_ws > 1
    for path, extra in routes.items():
        for text in ("    ", ""):
            r = httpx.post(url + path, json={"sae_id": "tiny", "text": text, **extra}, timeout=60)
            assert r.status_code == 200, (path, repr(text), r.text)
        r = httpx.post(url + path, json={"sae_id": "tiny", "ids": [], **extra}, timeout=60)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["message"] == ("the prompt is empty: it must contain at least one token after "
                                                "tokenization; got 0"), path


def test_the_worker_schema_states_the_enforced_limits(inproc):
    """issue 16 #2: the OpenAPI document said n_top <= 200 while the worker refused > 100."""
    from saescope.app.openapi import worker_doc

    url, _ = inproc
    schemas = worker_doc()["components"]["schemas"]
    n_top = schemas["AttributeIn"]["properties"]["n_top"]
    assert n_top["maximum"] == LIMITS.max_n_top
    assert schemas["EditsIn"]["properties"]["edits"]["maxItems"] == LIMITS.max_edits
    assert schemas["SteerIn"]["properties"]["max_new_tokens"]["maximum"] == LIMITS.max_new_tokens
    body = {"sae_id": "tiny", "text": "The file is closed.", "n_verify": 0}
    assert httpx.post(f"{url}/attribute", json={**body, "n_top": LIMITS.max_n_top}, timeout=60).status_code == 200
    r = httpx.post(f"{url}/attribute", json={**body, "n_top": LIMITS.max_n_top + 1}, timeout=60)
    assert r.status_code == 422 and f"less than or equal to {LIMITS.max_n_top}" in r.json()["error"]["message"]


def test_attribution_names_where_each_activation_is_read(inproc):
    """issue 16 #5: `activation` was read at best_position while the schema said "there" (the explained position)."""
    import torch

    url, engine = inproc
    text = "The file descriptor is closed because the buffer is full."
    ids = httpx.post(f"{url}/tokenize", json={"sae_id": "tiny", "text": text}).json()["ids"]
    p = len(ids) - 3
    out = httpx.post(f"{url}/attribute", json={"sae_id": "tiny", "text": text, "position": p, "n_top": 8,
                                               "n_verify": 0}, timeout=60).json()
    sae = engine.saes["tiny"]
    with torch.no_grad():  # the SAE's latents at the hook, computed here (no special-token masking: the splice's z)
        z = sae.encode(engine.lm.activations(torch.tensor([ids[:p + 1]]), sae.cfg.hook_name))[0]
    assert any(fa["best_position"] != p for fa in out["features"])
    for fa in out["features"]:
        f = fa["feature"]
        assert "activation" not in fa
        assert fa["activation_at_position"] == pytest.approx(float(z[p, f]), rel=1e-4, abs=1e-5)
        assert fa["activation_at_best_position"] == pytest.approx(float(z[fa["best_position"], f]), rel=1e-4, abs=1e-5)


def test_long_ids_are_echoed_bounded(inproc):
    """issue 17 #6: the unknown-SAE and unknown-model answers repeated a 100,000-character id whole."""
    url, _ = inproc
    long_id = "A" * 100_000
    r = httpx.post(f"{url}/activations", json={"sae_id": long_id, "text": "x", "feature": 1})
    assert r.status_code == 404 and len(r.content) < 1024, len(r.content)
    assert "this worker has: tiny" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": long_id, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and len(r.content) < 1024, len(r.content)
    assert "does not exist" in r.json()["error"]["message"]


def test_the_chat_route_caps_tokens_and_wall_time(inproc):
    """issue 17 #12: the chat route took max_tokens 512 with no time cap. Now max_tokens is capped by LIMITS and an
    answer stops at the wall-time cap like /steer (finish_reason "length")."""
    from fastapi import FastAPI

    from saescope.app.worker.chat import make_chat_router
    from saescope.app.worker.routes.explain import chat_backend, chat_model_name

    url, engine = inproc
    name = chat_model_name(engine)
    conv = [{"role": "user", "content": "Tell me a long story."}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": name, "messages": conv,
                                                      "max_tokens": LIMITS.max_chat_tokens + 1})
    assert r.status_code == 400 and f"the limit is {LIMITS.max_chat_tokens}" in r.json()["error"]["message"]
    app = FastAPI()  # the same route with a cap of 0 s: it stops after the first token
    app.include_router(make_chat_router(chat_backend(engine), model_name=name, time_limit_s=0.0))
    with serve_in_thread(app) as capped:
        r = httpx.post(f"{capped}/v1/chat/completions", json={"model": name, "messages": conv, "max_tokens": 40},
                       timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] < 40


def test_a_request_that_fails_inside_a_batch_fails_alone(gpt2_128):
    """issue 17 #4, the batcher's side: a job that breaks the forward pass (here one past the model's 128 positions,
    put in the queue past admission) fails alone; the batch's other jobs are retried and answered."""
    import asyncio

    from saescope.app.errors import AppError
    from saescope.app.worker.batcher import Engine, Job
    from saescope.precompute.encode import encode_batch

    _, served = gpt2_128
    engine = Engine(served.lm, served.saes, batch_wait_ms=30)  # its own queue and loop; the same model and SAE
    sae = engine.saes["tiny"]
    tok = engine.lm.tokenizer
    good = [np.asarray([1] + tok(t, add_special_tokens=False)["input_ids"], dtype=np.int32) for t in TEXTS]
    bad = np.asarray([1] * 200, dtype=np.int32)

    async def run():
        engine.start()
        loop = asyncio.get_running_loop()
        jobs = [Job("tiny", ids, loop.create_future()) for ids in good[:3] + [bad] + good[3:]]
        for j in jobs:  # all queued before the batching loop first runs: one batch
            engine.queue.put_nowait(j)
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    with cf.ThreadPoolExecutor(1) as pool:  # its own thread: a session fixture may hold a running loop in this one
        outs = pool.submit(asyncio.run, run()).result()
    err = outs.pop(3)
    assert isinstance(err, AppError) and err.status == 500 and "encoding failed" in err.message, repr(err)
    for ids, z in zip(good, outs):
        assert not isinstance(z, Exception), z
        want = encode_batch(engine.lm, sae, ids[None], sae.cfg.hook_name)[0]
        np.testing.assert_allclose(z.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    assert engine.batches == 1 + len(good) + 1  # the failed batch, then each of its jobs alone


# ---------------------------------------------------------------- the project's error format
def _project_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert "detail" not in body and set(body) == {"error"}, body
    assert set(body["error"]) == {"status", "title", "message"} and body["error"]["status"] == status
    return body["error"]["message"]



def test_the_worker_answers_unparsable_bodies_in_the_project_format(worker_client):
    """Before: bytes that are not UTF-8 (FastAPI's "There was an error parsing the body"), unknown routes and
    wrong methods came back as the framework's {"detail": ...}."""
    json_ct = {"content-type": "application/json"}
    msg = _project_error(worker_client.post("/top_features", content=b"\xff\xfe not json", headers=json_ct), 400)
    assert "body" in msg
    msg = _project_error(worker_client.post("/top_features", content=b"not json", headers=json_ct), 422)
    assert "JSON" in msg
    msg = _project_error(worker_client.post("/top_features", data={"sae_id": "tiny", "text": "hi"}), 422)
    assert "JSON object" in msg
    assert "/nope" in _project_error(worker_client.get("/nope"), 404)
    assert "GET /top_features" in _project_error(worker_client.get("/top_features"), 405)
    # the same worker still answers a good request
    ok = worker_client.post("/top_features", json={"sae_id": "tiny", "text": "hi", "k": 3})
    assert ok.status_code == 200 and ok.json()["tokens"]

