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
