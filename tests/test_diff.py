"""`saescope diff` on a real fine-tune: the tiny Llama trained for a few AdamW steps on text full of " zebra" and
saved with save_pretrained. The features that fire on " zebra" in the fine-tuned model must top the ranking, and every
number must equal a brute-force recompute (the HF models loaded here, a hook and the TopK encoder written here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ZEBRA = " zebra"
CTX, N_CTX = 64, 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zebra_corpus(tmp_path_factory, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("zebra") / "zebra.jsonl"
    with small_corpus.open() as f, out.open("w") as g:
        for line in f:
            words = json.loads(line)["text"].split(" ")
            text = " ".join(w + (ZEBRA if i % 6 == 5 else "") for i, w in enumerate(words))
            g.write(json.dumps({"text": text}) + "\n")
    return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_lm_dir, zebra_corpus) -> Path:
    """The tiny model after 20 real AdamW steps (next-token loss) on the zebra corpus, saved with save_pretrained.

    Only the embedding row of " zebra" trains (every other weight frozen, the row's gradient masked): the most
    local fine-tune there is. A full fine-tune of this random tiny model (its residual stream has norm ~0.3) moves
    every feature at once, which would make "the zebra features rank first" true but meaningless."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    zid = tok(ZEBRA, add_special_tokens=False)["input_ids"]
    assert len(zid) == 1
    ids: list[int] = []
    for line in zebra_corpus.open():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    keep = torch.zeros(emb.shape[0], 1)
    keep[zid[0]] = 1
    emb.register_hook(lambda g: g * keep)
    before = emb.detach().clone()
    opt = torch.optim.AdamW([emb], lr=3e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(20):
        batch = data[torch.randint(0, len(data), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learned something
    moved = (emb.detach() - before).abs().sum(1) > 0
    assert moved.nonzero().flatten().tolist() == zid  # only the zebra row changed
    out = tmp_path_factory.mktemp("tiny_ft")
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _contexts(tok, path: Path) -> np.ndarray:
    """Contexts as documented: BOS + 63 tokens of the document stream, documents separated by EOS."""
    buf: list[int] = []
    out = []
    for line in path.open():
        buf += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        while len(buf) >= CTX - 1 and len(out) < N_CTX:
            out.append([tok.bos_token_id] + buf[: CTX - 1])
            buf = buf[CTX - 1:]
    return np.asarray(out[:N_CTX])


def _dense(model_dir: Path, sae_dir: Path, ctxs: np.ndarray):
    """(n, T, d_in) hook activations, (n, T, d_sae) TopK features, their reconstruction, by hand."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    w = load_file(str(sae_dir / "sae_weights.safetensors"))
    k = json.loads((sae_dir / "cfg.json").read_text())["k"]
    got = []
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for c in ctxs:
            model(input_ids=torch.tensor(c)[None])
    h.remove()
    x = torch.cat(got).double()  # (n, T, d_in)
    pre = (x - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    rec = z @ w["W_dec"].double() + w["b_dec"].double()
    return x, z, rec


@pytest.fixture(scope="module")
def diff_dir(tiny_store, tiny_lm_dir, tiny_sae_dir, finetuned, zebra_corpus) -> Path:
    from saescope.precompute.diff import DiffArgs, run_diff

    out = tiny_store.with_name(tiny_store.name + ".diffs") / "zebra"
    run_diff(DiffArgs(model_a=str(tiny_lm_dir), model_b=str(finetuned), sae=str(tiny_sae_dir), out=out,
                      dataset=str(zebra_corpus), tokens=CTX * N_CTX, context_len=CTX, batch_size=5, progress=False))
    return out


def test_diff_ranks_the_zebra_features_and_equals_brute_force(diff_dir, tiny_lm_dir, tiny_sae_dir, finetuned,
                                                             zebra_corpus):
    from transformers import AutoTokenizer

    from saescope.precompute.diff import read_diff

    d = read_diff(diff_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ctxs = _contexts(tok, zebra_corpus)
    assert d.meta["n_contexts"] == N_CTX
    assert [e["token_ids"] for e in d.examples[str(d.meta["up"][0])]][0] in ctxs.tolist()
    xa, za, ra = _dense(tiny_lm_dir, tiny_sae_dir, ctxs)
    xb, zb, rb = _dense(finetuned, tiny_sae_dir, ctxs)
    special = torch.from_numpy(np.isin(ctxs, list(tok.all_special_ids)))
    za[special], zb[special] = 0, 0
    counted = ~special
    N = int(counted.sum())
    assert d.meta["n_counted"] == N
    for side, z in (("a", za), ("b", zb)):
        n_active = (z > 0).sum((0, 1))
        np.testing.assert_array_equal(d.features[f"n_active_{side}"], n_active.numpy())
        np.testing.assert_allclose(d.features[f"density_{side}"], (n_active.double() / N).numpy(), rtol=1e-12)
        mean = torch.where(n_active > 0, z.sum((0, 1)) / n_active.clamp_min(1), torch.zeros(()))
        np.testing.assert_allclose(d.features[f"mean_{side}"], mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d.features[f"max_{side}"], z.amax((0, 1)).numpy(), rtol=1e-4, atol=1e-5)
    score = ((zb.sum((0, 1)) - za.sum((0, 1))) / N).numpy()
    np.testing.assert_allclose(d.features["score"], score, rtol=1e-4, atol=1e-5)
    for side, x, rec in (("a", xa, ra), ("b", xb, rb)):
        xs, rs = x[counted], rec[counted]
        mse = float((xs - rs).pow(2).mean())
        ev = 1 - float((xs - rs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
        assert d.meta["quality"][side]["mse"] == pytest.approx(mse, rel=1e-4)
        assert d.meta["quality"][side]["explained_variance"] == pytest.approx(ev, rel=1e-4, abs=1e-6)
    # the features that fire on " zebra" in the fine-tuned model are the ones that moved most
    zid = tok(ZEBRA, add_special_tokens=False)["input_ids"][0]
    at_zebra = torch.from_numpy(ctxs == zid)
    on_zebra = (zb[at_zebra] > 0).double().mean(0)  # share of the zebra positions where each feature fires in B
    elsewhere = (zb[~at_zebra & counted] > 0).double().mean(0)
    zebra_feats = set(torch.where(on_zebra > 0.5)[0].tolist())
    assert zebra_feats and all(on_zebra[f] > elsewhere[f] + 0.3 for f in zebra_feats)
    top = [int(i) for i in np.argsort(-np.abs(score))[: len(zebra_feats)]]
    assert set(top) == zebra_feats
    assert set(d.meta["up"][: len(zebra_feats)]) == zebra_feats
    # examples: the contexts where |z_B - z_A| peaks, best first, equal to the brute force
    f = d.meta["up"][0]
    per_ctx = (zb[..., f] - za[..., f]).abs().amax(1)  # (n,)
    want = torch.argsort(per_ctx, descending=True, stable=True)[: len(d.examples[str(f)])].tolist()
    assert [e["ctx"] for e in d.examples[str(f)]] == want
    e = d.examples[str(f)][0]
    assert e["acts_b"] == pytest.approx(zb[want[0], :, f].tolist(), rel=1e-5, abs=1e-4)
    assert e["diff"] == pytest.approx(float(per_ctx[want[0]]), rel=1e-4)
    # the CSV export holds the same table
    import csv

    rows = list(csv.DictReader((diff_dir / "features.csv").open()))
    assert len(rows) == len(score) and float(rows[f]["score"]) == pytest.approx(float(score[f]), rel=1e-4)


def test_diff_warns_when_b_is_off_distribution(diff_dir):
    meta = json.loads((diff_dir / "diff.json").read_text())
    qa, qb = meta["quality"]["a"], meta["quality"]["b"]
    assert (qa["explained_variance"] - qb["explained_variance"] > 0.1) == bool(meta["warnings"])


def test_diff_page_and_exports(diff_dir, tiny_store):
    import httpx

    from conftest import serve_in_thread
    from saescope.app.web.app import create_app
    from saescope.precompute.diff import read_diff

    d = read_diff(diff_dir)
    with serve_in_thread(create_app(tiny_store)) as base:
        r = httpx.get(f"{base}/diffs/zebra")
        assert r.status_code == 200
        html = r.text
        up0 = d.meta["up"][0]
        assert f'href="/sae/tiny/feature/{up0}"' in html  # the store holds this SAE: rows link to its pages
        assert html.index(f'id="up-{up0}"') < html.index('id="down"')
        j = httpx.get(f"{base}/diffs/zebra/diff.json").json()
        assert j["up"] == d.meta["up"]
        assert httpx.get(f"{base}/diffs/zebra/features.csv").text.startswith('"feature"')
        assert "zebra" in httpx.get(f"{base}/diffs").text
        r = httpx.get(f"{base}/diffs/nope")
        assert r.status_code == 404 and "zebra" in r.text
