"""Interventions through the real worker process and the dashboard: steering, ablation on text, attribution,
the shared secret, and bad input. Values are checked against computations written here (plain `generate`, a
hook of this file's own), not against the splice code."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from saescope.app.settings import WORKER
from saescope.app.web.app import create_app
from tests.conftest import free_port
from tests.test_worker import stop

pytestmark = pytest.mark.slow  # a worker subprocess serves every test here

SECRET = "s3cret-for-tests"
AUTH = {"Authorization": f"Bearer {SECRET}"}
PROMPT = "The file descriptor is closed because the buffer is full."


@pytest.fixture(scope="module")
def worker(tiny_store):
    port = free_port()
    env = {**os.environ, WORKER.secret_env: SECRET}
    cmd = [sys.executable, "-m", "saescope.app.cli", "worker", "--store", str(tiny_store), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if httpx.get(f"{url}/health", headers=AUTH, timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def parts(tiny_lm_dir, tiny_sae_dir):
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    return load_model(str(tiny_lm_dir), "cpu", "float32"), load_sae(str(tiny_sae_dir))


def post(url: str, path: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def _tokens(url: str, text: str) -> list[int]:
    return post(url, "/tokenize", {"sae_id": "tiny", "text": text}).json()["ids"]


def test_the_shared_secret_is_required_on_every_request(worker):
    for path, body in (("/health", None), ("/steer", {"sae_id": "tiny", "text": "x", "edits": [{"feature": 1}]})):
        r = httpx.get(worker + path) if body is None else post(worker, path, body, headers=None)
        assert r.status_code == 401 and "shared secret" in r.json()["error"]["message"]
        r = (httpx.get(worker + path, headers={"Authorization": "Bearer wrong"}) if body is None
             else post(worker, path, body, headers={"Authorization": "Bearer wrong"}))
        assert r.status_code == 401 and "wrong" in r.json()["error"]["message"]
    assert httpx.get(worker + "/health", headers=AUTH).status_code == 200


def test_steering_with_coefficient_zero_is_plain_greedy_generate(worker, parts):
    lm, _ = parts
    ids = _tokens(worker, PROMPT)
    r = post(worker, "/steer", {"sae_id": "tiny", "text": PROMPT, "max_new_tokens": 12,
                                "edits": [{"feature": 5, "mode": "add", "value": 0.0}]})
    assert r.status_code == 200, r.text
    out = r.json()
    with torch.no_grad():
        ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):].tolist()
    n = len(out["steered"]["ids"])
    assert out["steered"]["ids"] == ref[:n] and out["default"]["ids"] == ref[:len(out["default"]["ids"])]
    assert n == 12 or out["stopped"] == "eos"
    assert out["watch"] == [5] and len(out["steered"]["feature_acts"]) == n


def test_steering_changes_the_continuation_and_reports_feature_activity(worker):
    r = post(worker, "/steer", {"sae_id": "tiny", "text": PROMPT, "max_new_tokens": 8,
                                "edits": [{"feature": 3, "mode": "add", "value": 60.0}]}).json()
    assert r["steered"]["ids"] != r["default"]["ids"]
    # the same request twice: the same tokens (greedy), and a seeded sample repeats too
    again = post(worker, "/steer", {"sae_id": "tiny", "text": PROMPT, "max_new_tokens": 8,
                                    "edits": [{"feature": 3, "mode": "add", "value": 60.0}]}).json()
    assert again["steered"]["ids"] == r["steered"]["ids"]
    s1, s2 = (post(worker, "/steer", {"sae_id": "tiny", "text": PROMPT, "max_new_tokens": 6, "temperature": 1.0,
                                      "seed": 7, "edits": [{"feature": 3, "value": 5.0}]}).json() for _ in range(2))
    assert s1["steered"]["ids"] == s2["steered"]["ids"]


def _own_ablation(lm, sae, ids: list[int], f: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent recompute: this test's own hook on layer 1 subtracts z_f * W_dec[f] (no input normalisation)."""
    layer = lm.layers[int(sae.cfg.hook_name.split(".")[1])]

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        z = sae.encode(h.float())
        z[0, 0] = 0  # special tokens (BOS) never count as activations
        h2 = h - z[..., f:f + 1] * sae.W_dec[f]
        return (h2, *out[1:]) if isinstance(out, tuple) else h2

    x = torch.tensor([ids])
    with torch.no_grad():
        clean = torch.log_softmax(lm.model(input_ids=x).logits[0].float(), -1)
        handle = layer.register_forward_hook(hook)
        try:
            edited = torch.log_softmax(lm.model(input_ids=x).logits[0].float(), -1)
        finally:
            handle.remove()
    nxt = torch.tensor(ids[1:])
    delta = (edited[:-1].gather(1, nxt[:, None]) - clean[:-1].gather(1, nxt[:, None]))[:, 0].numpy()
    kl = (clean.exp() * (clean - edited)).sum(-1).numpy()
    return delta, kl


def test_ablation_equals_an_independent_recompute(worker, parts):
    lm, sae = parts
    ids = _tokens(worker, PROMPT)
    # the feature most active on this prompt, so the effect is not zero
    f = post(worker, "/top_features", {"sae_id": "tiny", "text": PROMPT, "k": 1}).json()["features"][0]["index"]
    r = post(worker, "/ablate", {"sae_id": "tiny", "text": PROMPT, "edits": [{"feature": f, "mode": "ablate"}]})
    assert r.status_code == 200, r.text
    out = r.json()
    delta, kl = _own_ablation(lm, sae, ids, f)
    got = np.array(out["delta_logprob"][:-1], dtype=np.float64)
    assert out["delta_logprob"][-1] is None and len(out["tokens"]) == len(ids)
    assert np.abs(got).max() > 1e-4, "the ablated feature should matter somewhere"
    np.testing.assert_allclose(got, delta, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(out["kl"], kl, atol=2e-5, rtol=1e-3)


def test_attribution_lists_features_with_the_true_ablation_effect(worker, parts):
    lm, sae = parts
    ids = _tokens(worker, PROMPT)
    p = len(ids) - 3
    r = post(worker, "/attribute", {"sae_id": "tiny", "text": PROMPT, "position": p, "n_top": 12, "n_verify": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    feats = out["features"]
    with torch.no_grad():
        top = int(lm.model(input_ids=torch.tensor([ids[:p + 1]])).logits[0, -1].argmax())
    assert out["target"] == top and out["position"] == p and out["top_predictions"][0][1] == top
    mags = [abs(fa["attribution"]) for fa in feats]
    assert mags == sorted(mags, reverse=True) and len(feats) == 12
    assert all(fa["ablation_true"] is not None for fa in feats[:5]) and all(fa["ablation_true"] is None for fa in feats[5:])
    for fa in feats[:2]:  # the true effect equals this test's own ablation hook (at every position <= p)
        layer = lm.layers[1]
        f = fa["feature"]

        def hook(_m, _a, o, f=f):
            h = o[0] if isinstance(o, tuple) else o
            z = sae.encode(h.float())
            z[0, 0] = 0
            h2 = h - z[..., f:f + 1] * sae.W_dec[f]
            return (h2, *o[1:]) if isinstance(o, tuple) else h2

        x = torch.tensor([ids[:p + 1]])
        with torch.no_grad():
            clean = torch.log_softmax(lm.model(input_ids=x).logits[0, -1].float(), -1)[top]
            hd = layer.register_forward_hook(hook)
            try:
                edited = torch.log_softmax(lm.model(input_ids=x).logits[0, -1].float(), -1)[top]
            finally:
                hd.remove()
        assert math.isclose(fa["ablation_true"], float(edited - clean), rel_tol=1e-3, abs_tol=1e-4)
        assert math.isclose(fa["ablation_estimate"], -fa["attribution"], rel_tol=1e-9)


@pytest.mark.parametrize("body, status, words", [
    ({"edits": [{"feature": 96}]}, 404, "features 0 to 95"),
    ({"edits": [{"feature": 1, "value": 1e9}]}, 422, "less than or equal to 1000"),
    ({"edits": [{"feature": 1}] * (WORKER.max_edits + 1)}, 422, f"at most {WORKER.max_edits}"),
    ({"edits": [{"feature": 1}], "max_new_tokens": WORKER.max_new_tokens + 1}, 422, f"less than or equal to {WORKER.max_new_tokens}"),
    ({"edits": [{"feature": 1}], "ids": []}, 422, "empty"),  # "" is BOS alone: a prompt (the one prompt rule)
    ({"edits": []}, 422, "at least 1"),
    ({"edits": [{"feature": 1, "mode": "boost"}]}, 422, "'ablate', 'clamp', 'add', 'orthogonal' or 'cap'"),
    ({"edits": [{"feature": 1}], "n_logprobs": WORKER.max_logprobs + 1}, 422,
     f"less than or equal to {WORKER.max_logprobs}"),
    ({"edits": [{"feature": 1, "positions": [999]}]}, 422, "out of range"),
])
def test_bad_steering_requests_are_clear_4xx(worker, body, status, words):
    r = post(worker, "/steer", {"sae_id": "tiny", "text": PROMPT, **body})
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert words in msg, msg


def test_nan_and_infinite_coefficients_are_refused(worker):
    for raw in ('NaN', 'Infinity', '-Infinity'):
        body = '{"sae_id": "tiny", "text": "hi", "edits": [{"feature": 1, "value": %s}]}' % raw
        r = httpx.post(worker + "/steer", content=body, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert "error" in r.json() and "detail" not in r.json()


@pytest.fixture(scope="module")
def dash(tiny_store, worker):
    return TestClient(create_app(tiny_store, worker_url=worker, worker_secret=SECRET))


def test_steer_page_shows_both_completions_and_keeps_state_in_the_url(dash):
    r = dash.get("/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": "3:add:60", "n": 6})
    assert r.status_code == 200, r.text
    assert 'id="default-completion"' in r.text and 'id="steered-completion"' in r.text
    assert 'value="3:add:60"' in r.text  # the form is refilled from the URL
    j = dash.get("/api/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": "3:add:60", "n": 6}).json()
    assert html_text(j["steered"]["tokens"][0]) in r.text
    form = dash.get("/steer", params={"sae": "tiny", "prompt": PROMPT, "feature": 3, "mode": "add", "value": 60, "n": 6})
    assert html_text(j["steered"]["tokens"][0]) in form.text
    bad = dash.get("/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": "3:boost:1"})
    assert "FEATURE:MODE:VALUE" in bad.text
    assert dash.get("/api/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": "999:add:1"}).status_code == 404


def html_text(tok: str) -> str:
    import html

    from saescope.app.web.tokens import visible

    return html.escape(visible(tok), quote=True)


def test_inspect_page_shows_the_ablation_row_and_the_attribution_table(dash, worker):
    f = post(worker, "/top_features", {"sae_id": "tiny", "text": PROMPT, "k": 1}).json()["features"][0]["index"]
    r = dash.get("/inspect", params={"sae": "tiny", "prompt": PROMPT, "ablate": f})
    assert 'id="ablation-row"' in r.text and "Δ log p(next)" in r.text
    api = dash.get("/api/ablate", params={"sae": "tiny", "prompt": PROMPT, "edit": f"{f}:ablate"}).json()
    first = next(d for d in api["delta_logprob"] if d is not None and d != 0)
    assert f'data-delta="{first:.6g}"' in r.text
    r = dash.get("/inspect", params={"sae": "tiny", "prompt": PROMPT, "why": 4})
    assert 'id="attribution-table"' in r.text and "true Δ log p" in r.text
    a = dash.get("/api/attribute", params={"sae": "tiny", "prompt": PROMPT, "position": 4}).json()
    assert f'{a["features"][0]["attribution"]:+.4f}' in r.text
    live = dash.post("/live/activations", data={"sae": "tiny", "feature": f, "text": PROMPT, "ablate": "true"})
    assert 'id="live-ablation"' in live.text


def test_steering_methods_and_logprobs_through_the_worker(worker, parts):
    """Every method through the worker equals this file's own hook; token_logprobs equal the model's log_softmax."""
    lm, sae = parts
    ids = _tokens(worker, PROMPT)
    n = 5
    for mode, value, norm in (("add", 30.0, False), ("orthogonal", 5.0, False), ("cap", -0.5, False),
                              ("add", 4.0, True)):
        r = post(worker, "/steer", {"sae_id": "tiny", "text": PROMPT, "max_new_tokens": n, "n_logprobs": 3,
                                    "edits": [{"feature": 3, "mode": mode, "value": value, "normalize": norm}]})
        assert r.status_code == 200, r.text
        out = r.json()
        new = out["steered"]["ids"]
        v = sae.W_dec[3].detach()
        u = v / v.norm()

        def hook(_m, _a, o, mode=mode, value=value, norm=norm):
            h = o[0] if isinstance(o, tuple) else o
            if mode == "add":
                h2 = h + value * (u if norm else v)
            elif mode == "orthogonal":
                p = (h @ u)[..., None] * u
                h2 = h - p + value * p
            else:
                p = h @ u
                h2 = h + (p.clamp(max=value) - p)[..., None] * u
            return (h2, *o[1:]) if isinstance(o, tuple) else h2

        layer = lm.layers[int(sae.cfg.hook_name.split(".")[1])]
        handle = layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ids + new[:-1]])).logits[0, len(ids) - 1:].float()
        finally:
            handle.remove()
        lp = torch.log_softmax(logits, -1)
        assert lp.argmax(-1).tolist() == new, mode
        tl = out["steered"]["token_logprobs"]
        assert [t["id"] for t in tl] == new and all(len(t["top_logprobs"]) == 3 for t in tl)
        for t, row in zip(tl, lp):
            assert math.isclose(t["logprob"], float(row[t["id"]]), abs_tol=2e-4)
            top = row.topk(3)
            assert [o["id"] for o in t["top_logprobs"]] == top.indices.tolist()
        assert len(out["kl"]) == len(new) and out["scale"]["resid_norm"] > 0
        assert out["scale"]["features"][0]["feature"] == 3


def test_steer_page_method_selector_presets_kl_plot_and_hover(dash):
    r = dash.get("/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": ["3:orthogonal:4", "5:add:20:unit"],
                                   "n": 5})
    assert r.status_code == 200, r.text
    assert 'id="steer-method"' in r.text and "<option>orthogonal</option>" in r.text and "<option>cap</option>" in r.text
    assert 'id="kl-plot"' in r.text and 'id="strength-hints"' in r.text
    for preset in ("gentle", "strong", "extreme"):
        assert f'data-preset="{preset}"' in r.text
    assert "log p " in r.text  # hover text of every generated token
    j = dash.get("/api/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": ["3:cap:0"], "n": 3}).json()
    assert j["steered"]["token_logprobs"][0]["top_logprobs"]
    form = dash.get("/steer", params={"sae": "tiny", "prompt": PROMPT, "feature": 3, "mode": "cap", "value": 0, "n": 3})
    assert 'value="3:cap:0"' in form.text
    bad = dash.get("/api/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": "3:clamp:1:unit"})
    assert bad.status_code == 422 and ":unit applies to the steering modes" in bad.json()["error"]["message"]
    bad = dash.get("/api/steer", params={"sae": "tiny", "prompt": PROMPT, "edit": "3:add:nan"})
    assert bad.status_code == 422 and "FEATURE:MODE:VALUE" in bad.json()["error"]["message"]


CLEAN, CORRUPTED = "The file is closed because the buffer is full.", "The file is open because the buffer is full."


def test_patching_route_equals_the_library_and_refuses_bad_input(worker, parts):
    from saescope.precompute.interventions.patching import Metric, patch

    lm, sae = parts
    c, x = _tokens(worker, CLEAN), _tokens(worker, CORRUPTED)
    assert len(c) == len(x)
    r = post(worker, "/patch", {"sae_id": "tiny", "clean": CLEAN, "corrupted": CORRUPTED, "metric": "logit_diff",
                                "target": 5, "other": 7, "n_features": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = patch(lm, sae, c, x, Metric("logit_diff", 5, 7), n_features=3)
    assert out["features"] == ref.features and out["positions"] == ref.positions
    for e, want in zip(out["per_position"], ref.per_position):
        assert math.isclose(e["metric"], want.metric, abs_tol=1e-4)
        assert math.isclose(e["estimate"], want.estimate, rel_tol=1e-3, abs_tol=1e-5)
    assert math.isclose(out["all_with_error"], out["source_metric"], abs_tol=1e-3)
    assert out["clean_tokens"][0] and len(out["cells"]) == len(out["positions"])
    bad = [({"corrupted": "Something much longer than the clean prompt, surely"}, 422, "aligned positions"),
           ({"direction": "sideways"}, 422, "corrupted_into_clean"),
           ({"metric": "prob"}, 422, "logit_diff"),
           ({"target_text": " closed and open"}, 422, "must be exactly one token"),
           ({"features": [96]}, 404, "features 0 to 95"),
           ({"n_features": WORKER.max_patch_features + 1}, 422, f"less than or equal to {WORKER.max_patch_features}"),
           ({"align": [[0, 99]]}, 422, "corrupted position 99 is out of range")]
    for extra, status, words in bad:
        r = post(worker, "/patch", {"sae_id": "tiny", "clean": CLEAN, "corrupted": CORRUPTED, **extra})
        assert r.status_code == status, (extra, r.text)
        assert words in r.json()["error"]["message"], (extra, r.json())


def test_patching_page_heatmap_and_json_twin(dash):
    params = {"sae": "tiny", "clean": CLEAN, "corrupted": CORRUPTED, "n_features": 3, "error": "true"}
    r = dash.get("/patch", params=params)
    assert r.status_code == 200, r.text
    assert 'id="patch-heatmap"' in r.text and "whole feature" in r.text and 'id="patch-summary"' in r.text
    j = dash.get("/api/patch", params=params).json()
    assert len(j["features"]) == 3
    for f in j["features"]:
        assert f'href="/sae/tiny/feature/{f}"' in r.text
    bad = dash.get("/api/patch", params={**params, "align": "0-0"})
    assert bad.status_code == 422 and "CLEAN:CORRUPTED" in bad.json()["error"]["message"]
    page = dash.get("/patch", params={**params, "corrupted": "short"})
    assert 'id="patch-error"' in page.text and "aligned positions" in page.text


CONVO = [{"role": "user", "content": "Hello! What is a file descriptor?"},
         {"role": "assistant", "content": "A number that names an open file."},
         {"role": "user", "content": "And a buffer?"}]


def test_steer_chat_route_equals_the_library_with_the_tokenizers_template(worker, parts):
    from saescope.precompute import interventions as iv

    lm, sae = parts
    edits = [{"feature": 3, "mode": "add", "value": 40.0}]
    r = post(worker, "/steer_chat", {"sae_id": "tiny", "messages": CONVO, "edits": edits, "max_new_tokens": 6,
                                     "temperature": 0.7, "seed": 4})
    assert r.status_code == 200, r.text
    out = r.json()
    text, g = iv.chat.steer_chat(lm, sae, CONVO, [iv.Edit(3, "add", 40.0)], 6, iv.Sampling(0.7, 1.0, 4))
    own = lm.tokenizer.apply_chat_template(CONVO, add_generation_prompt=True, tokenize=True)
    own = own["input_ids"] if hasattr(own, "keys") else own
    assert g.prompt_ids == list(own) and out["template"] == text
    assert out["steered"]["ids"] == g.steered.ids and out["default"]["ids"] == g.default.ids
    assert out["steered_reply"] == iv.chat.reply_text(lm, g.steered.ids)
    too_many = [{"role": "user", "content": "hi"}] * (WORKER.max_chat_turns + 1)
    for body, words in [({"messages": too_many}, f"at most {WORKER.max_chat_turns}"),
                        ({"messages": CONVO[:2]}, "the last message is the assistant's"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "'system', 'user' or 'assistant'"),
                        ({"edits": [{"feature": 3, "mode": "add", "value": 1.0, "normalize": True},
                                    {"feature": 4, "mode": "sideways"}]}, "'orthogonal' or 'cap'")]:
        r = post(worker, "/steer_chat", {"sae_id": "tiny", "messages": CONVO, "edits": edits, **body})
        assert r.status_code == 422, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.json())


def test_chat_page_side_by_side_replies_and_state_in_the_url(dash):
    ms = [f"{t['role']}:{t['content']}" for t in CONVO]
    r = dash.get("/chat", params={"sae": "tiny", "m": ms, "edit": "3:add:40", "n": 5})
    assert r.status_code == 200, r.text
    assert 'id="default-reply"' in r.text and 'id="steered-reply"' in r.text and 'id="continue-steered"' in r.text
    # the form is refilled with the request's settings, so submitting it again sends valid n, temperature, seed
    # (the merge once commented them out of the context: empty values, and the next submit was a 422 page)
    for name, value in (("n", "5"), ("temperature", "0.0"), ("seed", "0")):
        assert re.search(rf'<input type="number" name="{name}"[^>]* value="{re.escape(value)}"', r.text), name
    j = dash.get("/api/chat", params={"sae": "tiny", "m": ms, "edit": "3:add:40", "n": 5}).json()
    assert j["template"].endswith("assistant\n")
    import html as _html
    assert _html.escape(j["steered_reply"], quote=True) in r.text
    # continuing appends the reply as an assistant message; a new user message then gets new replies
    from urllib.parse import parse_qs, urlparse

    import re as _re
    link = _html.unescape(_re.search(r'id="continue-steered"', r.text) and
                          _re.search(r'href="([^"]+)" id="continue-steered"', r.text).group(1))
    q = parse_qs(urlparse(link).query)
    assert q["m"][-1] == f"assistant:{j['steered_reply']}" and len(q["m"]) == len(ms) + 1
    nxt = dash.get("/chat", params={**{k: v for k, v in q.items()}, "say": "Thanks!"})
    assert nxt.status_code == 200 and 'id="steered-reply"' in nxt.text
    bad = dash.get("/api/chat", params={"sae": "tiny", "m": ["robot:hi"], "edit": "3:add:1"})
    assert bad.status_code == 422 and "ROLE:TEXT" in bad.json()["error"]["message"]
    many = dash.get("/api/chat", params={"sae": "tiny", "m": ["user:hi"] * WORKER.max_chat_turns, "say": "one more",
                                         "edit": "3:add:1"})
    assert many.status_code == 422 and f"the limit is {WORKER.max_chat_turns}" in many.json()["error"]["message"]


def test_concurrent_steering_requests_each_equal_the_request_alone(worker):
    """Requests that arrive together are decoded as one batch (left padding, per-row seeds and stopping): every
    answer equals the same request sent alone, tokens and log-probs, greedy and sampled."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["The file", "A buffer is full when the", "Closed", "The descriptor is closed because the file",
               "Open the", "Full buffers are flushed to", "The", "Because the buffer is"]
    bodies = [{"sae_id": "tiny", "text": p, "max_new_tokens": 4 + i, "n_logprobs": 2,
               "temperature": 0.0 if i % 2 else 1.0, "seed": i,
               "edits": [{"feature": 3 + i, "mode": ("add", "orthogonal", "cap")[i % 3], "value": 5.0 + i}]}
              for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(worker, "/steer", b).json(), bodies))
    for body, got in zip(bodies, together):
        alone = post(worker, "/steer", body).json()
        for side in ("default", "steered"):
            assert got[side]["ids"] == alone[side]["ids"], (body, side)
            for a, b in zip(got[side]["logprobs"], alone[side]["logprobs"]):
                assert math.isclose(a, b, abs_tol=2e-4)
        assert [round(v, 3) for v in got["kl"]] == pytest.approx([round(v, 3) for v in alone["kl"]], abs=2e-3)
