"""Contrast (features separating two sets of texts) and SAEBench-style sparse probing, against brute force.

The synthetic case has a known answer: the SAE reads blocks.0.hook_resid_pre (the token embedding of a Llama),
and feature 0's encoder row is one token's embedding with a threshold set between that token's own score and the
highest score of every other token in the vocabulary, so it fires exactly on that token. Texts A contain it,
texts B never do.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from saescope.precompute import contrast as ct
from saescope.precompute.encode import encode_batch
from saescope.precompute.saes import SAEConfig
from saescope.precompute.saes.standard import StandardSAE

HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from saescope.precompute.models import load_model

    m = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    return m


@pytest.fixture(scope="module")
def target(lm) -> int:
    ids = lm.tokenizer(" banana", add_special_tokens=False)["input_ids"]
    return ids[-1]


@pytest.fixture(scope="module")
def sae(lm, target) -> StandardSAE:
    E = lm.model.get_input_embeddings().weight.detach().float()  # (V, d)
    d = E.shape[1]
    e = E[target]
    scores = E @ e
    others = torch.cat([scores[:target], scores[target + 1:]]).max()
    assert others < scores[target]  # the construction's premise, checked over the whole vocabulary
    thr = float((scores[target] + others) / 2)
    torch.manual_seed(0)
    s = StandardSAE(SAEConfig(architecture="standard", d_in=d, d_sae=16, hook_name=HOOK))
    with torch.no_grad():
        s.W_enc.normal_().mul_(3.0)
        s.b_enc.normal_().mul_(0.2)
        s.W_dec.normal_()
        s.W_enc[:, 0] = e * 100
        s.b_enc[0] = -thr * 100
    return s


A_TEXTS = ["I like banana bread", "a banana a day", "the banana is yellow", "a banana split please",
           "ripe banana on the table", "she ate a banana", "green banana", "one banana, two apples",
           "some banana and milk", "my banana phone"]
B_TEXTS = ["I like apple pie", "an orange a day", "the lemon is yellow", "cherry split please",
           "ripe pear on the table", "she ate a plum", "green grapes", "one kiwi, two apples",
           "melon and milk", "my mango phone"]


def test_auroc_equals_pairwise_count_with_ties():
    g = np.random.default_rng(0)
    a, b = g.integers(0, 4, size=(13, 6)), g.integers(0, 4, size=(9, 6))  # many ties
    got = ct.auroc(a, b)
    for f in range(6):
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in itertools.product(a[:, f], b[:, f]))
        assert got[f] == pytest.approx(wins / (13 * 9), abs=1e-12)


def test_text_activations_equal_one_text_at_a_time(lm, sae):
    texts = A_TEXTS[:3] + B_TEXTS[:4]
    acts = ct.text_activations(lm, sae, HOOK, texts, batch_size=3)  # padded batches of mixed lengths
    for i, t in enumerate(texts):
        ids = np.asarray([ct.tokenize(lm, [t], True, 512)[0]])
        z = encode_batch(lm, sae, ids, HOOK)[0].numpy()  # (T, d_sae), special positions zeroed
        keep = ~np.isin(ids[0], lm.tokenizer.all_special_ids)
        np.testing.assert_allclose(acts.max[i], z[keep].max(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts.mean[i], z[keep].mean(0), rtol=1e-5, atol=1e-6)
        x = lm.activations(torch.from_numpy(ids).long(), HOOK)[0].numpy()
        np.testing.assert_allclose(acts.dense[i], x[keep].mean(0), rtol=1e-5, atol=1e-6)
        assert acts.n_tokens[i] == keep.sum()


def test_the_planted_feature_ranks_first_with_auroc_one(lm, sae, target):
    assert all(target in ct.tokenize(lm, [t], True, 512)[0] for t in A_TEXTS)
    assert not any(target in ct.tokenize(lm, [t], True, 512)[0] for t in B_TEXTS)
    a, b = ct.text_activations(lm, sae, HOOK, A_TEXTS), ct.text_activations(lm, sae, HOOK, B_TEXTS)
    assert (a.max[:, 0] > 0).all() and (b.max[:, 0] == 0).all()
    r = ct.contrast(a.max, b.max)
    assert r.top_a[0] == 0 and r.auroc[0] == 1.0
    np.testing.assert_allclose(r.auroc, [ct.auroc(a.max[:, f], b.max[:, f])[0] for f in range(16)])
    np.testing.assert_allclose(r.diff, a.max.astype(np.float64).mean(0) - b.max.astype(np.float64).mean(0), rtol=1e-12)
    assert 0 not in r.top_b and all(r.auroc[f] <= 0.5 for f in r.top_b)
    assert list(r.auroc[r.top_a]) == sorted(r.auroc[r.top_a], reverse=True)

    p = ct.sparse_probe(a.mean, b.mean, a.dense, b.dense, ks=(1, 2, 5), test_frac=0.3, seed=1)
    assert p.features[1] == [0] and p.sae_accuracy[1] == 1.0
    # the brute force: the same split, the k columns by |mean difference| found by a loop, a fresh fit
    tr, te = ct.split(10, 10, 0.3, 1)
    assert len(te) == 6 and len(set(tr) | set(te)) == 20 and not set(tr) & set(te)
    x = np.concatenate([a.mean, b.mean]).astype(np.float64)
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    for k in (1, 2, 5):
        d = [abs(x[tr][y[tr] == 1, f].mean() - x[tr][y[tr] == 0, f].mean()) for f in range(16)]
        cols = sorted(range(16), key=lambda f: -d[f])[:k]
        assert p.features[k] == cols
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        sc = StandardScaler().fit(x[tr][:, cols])
        clf = LogisticRegression(max_iter=1000, random_state=1).fit(sc.transform(x[tr][:, cols]), y[tr])
        pred = clf.predict(sc.transform(x[te][:, cols]))
        assert p.sae_accuracy[k] == sum(int(u == v) for u, v in zip(pred, y[te])) / len(te)
    assert 0.0 <= p.dense_accuracy <= 1.0


def test_bad_input_is_refused_with_the_limit(lm, sae):
    from saescope.precompute.errors import UserError

    with pytest.raises(UserError, match="at least one text on each side"):
        ct.contrast(np.zeros((0, 3)), np.zeros((2, 3)))
    with pytest.raises(UserError, match="the limit is 4"):
        ct.text_activations(lm, sae, HOOK, ["a long text with many tokens in it"], max_tokens=4)
    with pytest.raises(UserError, match="at least 2 texts per side"):
        ct.split(1, 5)


def test_saescope_contrast_stores_a_page(tmp_path, tiny_store, tiny_lm_dir, tiny_sae_dir):
    """The CLI stores the contrast; the page and the JSON twin show exactly what the library computes."""
    import shutil

    from fastapi.testclient import TestClient

    from saescope.app.cli import main
    from saescope.app.web.app import create_app
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    copy = tmp_path / "c.duckdb"
    shutil.copyfile(tiny_store, copy)
    (tmp_path / "a.txt").write_text("\n".join(A_TEXTS) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in B_TEXTS))
    assert main(["contrast", str(copy), "--sae", "tiny", "--a", str(tmp_path / "a.txt"), "--b",
                 str(tmp_path / "b.jsonl"), "--name", "fruit", "--top", "5", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    sae = load_sae(str(tiny_sae_dir))
    a = ct.text_activations(lm, sae, sae.cfg.hook_name, A_TEXTS)
    b = ct.text_activations(lm, sae, sae.cfg.hook_name, B_TEXTS)
    want = ct.contrast(a.max, b.max, top=5)
    client = TestClient(create_app(copy, worker_url=None))
    j = client.get("/api/saes/tiny/contrast/fruit").json()
    assert [f["feature"] for f in j["features"]["a"]] == list(want.top_a)
    assert [f["feature"] for f in j["features"]["b"]] == list(want.top_b)
    for f in j["features"]["a"] + j["features"]["b"]:
        assert f["auroc"] == pytest.approx(want.auroc[f["feature"]], abs=1e-12)
        side = a.max if f["side"] == "a" else b.max
        assert f["top_texts"][0] == int(np.argmax(side[:, f["feature"]]))
    probe = j["run"]["probe"]
    assert set(probe["sae_accuracy"]) == {"1", "2", "5", "20"} and 0 <= probe["dense_accuracy"] <= 1
    html = client.get("/sae/tiny/contrast/fruit").text
    assert "Sparse probing" in html and f'/sae/tiny/feature/{want.top_a[0]}"' in html and "banana" in html
    assert 'href="/sae/tiny/contrast/fruit"' in client.get("/sae/tiny").text
    missing = client.get("/sae/tiny/contrast/nope")
    assert missing.status_code == 404 and "stored: fruit" in missing.text
    assert main(["contrast", str(copy), "--sae", "tiny", "--a", str(tmp_path / "a.txt"), "--b",
                 str(tmp_path / "none.txt"), "--name", "x"]) == 2  # a missing file: a readable error


# ------------------------------------------------------------------ live: the worker's POST /contrast and the pages
def _brute_scores(lm, sae, texts):
    """Per text, alone: every feature's max over the non-special tokens, and its values on every token."""
    out, per_tok = [], []
    for t in texts:
        ids = np.asarray([ct.tokenize(lm, [t], sae.cfg.prepend_bos, 512)[0]])
        z = encode_batch(lm, sae, ids, sae.cfg.hook_name)[0].numpy()  # special positions zeroed
        keep = ~np.isin(ids[0], lm.tokenizer.all_special_ids)
        out.append(z[keep].max(0))
        per_tok.append(z)
    return np.stack(out), per_tok


@pytest.fixture(scope="module")
def tiny_pair(tiny_lm_dir, tiny_sae_dir):
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    return lm, load_sae(str(tiny_sae_dir))


def test_worker_contrast_equals_brute_force(worker_client, tiny_pair):
    """POST /contrast: AUROC by counting pairs, means, the top texts and their per-token values, each from texts
    encoded one at a time."""
    lm, sae = tiny_pair
    r = worker_client.post("/contrast", json={"sae_id": "tiny", "a": A_TEXTS, "b": B_TEXTS, "top": 8})
    assert r.status_code == 200, r.text
    out = r.json()
    sa, ta = _brute_scores(lm, sae, A_TEXTS)
    sb, tb = _brute_scores(lm, sae, B_TEXTS)
    F = sae.cfg.d_sae
    au = [sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in sa[:, f] for y in sb[:, f]) / (len(sa) * len(sb))
          for f in range(F)]
    diff = sa.astype(np.float64).mean(0) - sb.astype(np.float64).mean(0)
    want_a = sorted([f for f in range(F) if au[f] > 0.5 or (au[f] == 0.5 and diff[f] > 0)],
                    key=lambda f: (-au[f], -diff[f], f))[:8]
    want_b = sorted([f for f in range(F) if au[f] < 0.5 or (au[f] == 0.5 and diff[f] < 0)],
                    key=lambda f: (au[f], diff[f], f))[:8]
    got = {s: [f for f in out["features"] if f["side"] == s] for s in "ab"}
    assert [f["feature"] for f in got["a"]] == want_a and [f["feature"] for f in got["b"]] == want_b
    for side, scores, per_tok in (("a", sa, ta), ("b", sb, tb)):
        for f in got[side]:
            k = f["feature"]
            assert f["auroc"] == pytest.approx(au[k], abs=1e-12)
            assert f["diff"] == pytest.approx(diff[k], rel=1e-5, abs=1e-6)
            order = sorted(range(len(scores)), key=lambda i: (-scores[i, k], i))[:ct.TOP_TEXTS]
            assert f["top_texts"] == order
            for i, vals in zip(order, f["top_acts"]):
                np.testing.assert_allclose(vals, per_tok[i][:, k], rtol=1e-5, atol=1e-6)
            assert f["top_values"] == pytest.approx([max(v) for v in f["top_acts"]], rel=1e-5, abs=1e-6)
    assert out["n_a"] == 10 and set(out["probe"]["sae_accuracy"]) == {"1", "2", "5", "20"}
    assert [len(t) for t in out["token_ids"]["a"]] == [len(t) for t in ta]


def test_token_values_from_kept_nonzeros_equal_a_second_pass(tiny_pair, monkeypatch):
    lm, sae = tiny_pair
    kept = ct.text_activations(lm, sae, sae.cfg.hook_name, A_TEXTS, batch_size=3)
    want = {0: {1, 5}, 3: {2}, 9: {0, 7, 40}}
    monkeypatch.setattr(ct, "KEEP_NONZEROS", 0)  # nothing kept: every listed text encoded again
    again = ct.text_activations(lm, sae, sae.cfg.hook_name, A_TEXTS, batch_size=3)
    assert all(x is None for x in again.nonzeros) and all(x is not None for x in kept.nonzeros)
    a, b = ct.token_values(lm, sae, sae.cfg.hook_name, kept, want), ct.token_values(lm, sae, sae.cfg.hook_name, again, want)
    assert a.keys() == b.keys() == {(i, f) for i, fs in want.items() for f in fs}
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_worker_contrast_refuses_bad_sets_naming_the_limit(worker_client):
    from saescope.precompute.config import LIMITS as L

    def post(**body):
        r = worker_client.post("/contrast", json={"sae_id": "tiny", **body})
        assert r.status_code == 422, r.text
        return r.json()["error"]["message"]

    assert "A and B are empty" in post(a=[], b=[]) and f"1 to {L.max_contrast_texts}" in post(a=[], b=[])
    assert "B is empty" in post(a=["one text"], b=[])
    assert f"at most {L.max_contrast_texts}" in post(a=["x"] * (L.max_contrast_texts + 1), b=["y"])
    assert f"at most {L.max_contrast_chars}" in post(a=["x" * (L.max_contrast_chars + 1)], b=["y"])
    msg = post(a=["a " * 300], b=["y"])  # 600 characters, 301 tokens
    assert f"the limit is {L.max_contrast_tokens} tokens per text" in msg and "text 1 of A" in msg


def _result_div(html: str) -> str:
    start = html.index('<div id="contrast-result">')
    end = html.index("<!-- /contrast-result -->", start) if "<!-- /contrast-result -->" in html else None
    assert end is not None
    return html[start:end]


def test_bad_live_sets_are_a_4xx_even_without_a_worker(tiny_store):
    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app
    from saescope.precompute.config import LIMITS as L

    client = TestClient(create_app(tiny_store, worker_url=None))
    for params, says in ((dict(a="", b=""), "A and B are empty"), (dict(a="one\ntwo"), "B is empty"),
                         (dict(a="\n".join(["x"] * (L.max_contrast_texts + 1)), b="y"),
                          f"the live limit is {L.max_contrast_texts} per side"),
                         (dict(a="x" * (L.max_contrast_chars + 1), b="y"), f"the live limit is {L.max_contrast_chars}")):
        for url in ("/sae/tiny/contrast", "/api/saes/tiny/contrast"):
            r = client.get(url, params=params)
            assert r.status_code == 422 and says in r.text, (url, params, r.text[:300])
    long = "q" * 50_000  # refused, and the refilled form shows its start and length, never the whole text
    r = client.get("/sae/tiny/contrast", params={"a": f"kept text\n{long}", "b": "y"})
    assert r.status_code == 422 and "q" * 1000 not in r.text and "cut: 50,000 characters" in r.text
    assert "kept text" in r.text  # the texts within the limits stay in the form
    page = client.get("/sae/tiny/contrast")
    assert page.status_code == 200 and 'id="contrast-form"' in page.text  # the empty form
    assert client.get("/sae/tiny/contrast", params={"a": "x", "b": "y"}).status_code == 200  # worker off: notice
    assert client.get("/sae/nope/contrast", params={"a": "x", "b": "y"}).status_code == 404


def test_the_stored_contrast_page_equals_the_live_one(tmp_path, tiny_store, tiny_worker, tiny_pair):
    """The same texts through `saescope contrast` (stored) and through the worker (live): the same result HTML
    and the same numbers; the texts' tokens are shaded by the feature's activation (checked per token) and escaped."""
    import re
    import shutil

    from fastapi.testclient import TestClient

    from saescope.app.cli import main
    from saescope.app.web.app import create_app
    from saescope.app.web.tokens import alpha

    lm, sae = tiny_pair
    a_texts = A_TEXTS[:6] + ["<script>alert(1)</script> banana & co"]
    copy = tmp_path / "c.duckdb"
    shutil.copyfile(tiny_store, copy)
    (tmp_path / "a.txt").write_text("\n".join(a_texts) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(B_TEXTS) + "\n")
    assert main(["contrast", str(copy), "--sae", "tiny", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "b.txt"),
                 "--name", "fruit", "--top", "6", "--device", "cpu", "--dtype", "float32"]) == 0
    client = TestClient(create_app(copy, worker_url=tiny_worker))
    stored = client.get("/sae/tiny/contrast/fruit")
    params = {"a": "\n".join(a_texts), "b": "\n".join(B_TEXTS), "top": 6}
    live = client.get("/sae/tiny/contrast", params=params)
    assert stored.status_code == 200 and live.status_code == 200, live.text[:500]
    assert _result_div(stored.text) == _result_div(live.text)
    sj, lj = client.get("/api/saes/tiny/contrast/fruit").json(), client.get("/api/saes/tiny/contrast", params=params).json()
    assert sj["n_texts"] == lj["n_texts"] == {"a": 7, "b": 10}
    sp, lp = sj["run"]["probe"], lj["run"]["probe"]
    assert {k: v for k, v in sp.items() if k != "dense_accuracy"} == {k: v for k, v in lp.items() if k != "dense_accuracy"}
    assert sp["dense_accuracy"] == pytest.approx(lp["dense_accuracy"])
    for side in "ab":
        assert len(sj["features"][side]) == len(lj["features"][side]) > 0
        for s, v in zip(sj["features"][side], lj["features"][side]):
            assert (s["side"], s["rank"], s["feature"], s["top_texts"]) == (v["side"], v["rank"], v["feature"], v["top_texts"])
            assert s["auroc"] == v["auroc"]
            for key in ("mean_a", "mean_b", "diff", "top_values"):
                assert s[key] == pytest.approx(v[key], rel=1e-5, abs=1e-6)
            for x, y in zip(s["top_acts"], v["top_acts"]):
                assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    # the shading: per listed text, each active token's --a is alpha(value, the largest value of the feature's texts)
    _, per_a = _brute_scores(lm, sae, a_texts)
    html = _result_div(stored.text)
    f = sj["features"]["a"][0]
    vmax = max(max(v) for v in f["top_acts"])
    for i, vals in zip(f["top_texts"], f["top_acts"]):
        np.testing.assert_allclose(vals, per_a[i][:, f["feature"]], rtol=1e-5, atol=1e-6)
    items = re.findall(r'<li><span class="num">[^<]*</span> (<span class="strip">.*?</span>)</li>', html)
    first = items[:len(f["top_texts"])]
    for strip, vals in zip(first, f["top_acts"]):
        assert re.findall(r'style="--a:([0-9.]+)"', strip) == [alpha(v, vmax) for v in vals if v > 0]
    assert "<script>alert" not in stored.text and "<script>alert" not in live.text
    if any(6 in ft["top_texts"] for ft in sj["features"]["a"]):  # the hostile text is listed: shown escaped
        assert "&lt;" in html
