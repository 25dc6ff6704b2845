"""SAE quality metrics (precompute/quality.py) against an independent computation written here.

The reference: its own forward hooks on the Hugging Face modules (spliced reconstruction at the kept positions,
zero ablation at every position), the SAE's encoder written out by hand, and every sum in float64 with numpy —
nothing from saescope's hook or SAE code. Two model families (GPT-2 with a resid_pre hook, Llama with the real
SmolLM2 tokenizer and a resid_post hook), an SAE that reconstructs exactly, and an SAE with no live features.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from saescope.precompute.models import HookedLM
from saescope.precompute.quality import METRICS, EvalSAE, quality_metrics, special_ids
from saescope.precompute.saes import SAEConfig
from saescope.precompute.saes.standard import StandardSAE
from saescope.precompute.saes.topk import TopKSAE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# a GPT-2 checkpoint from tests/conftest.py has no tokenizer; the metrics read only its structural special ids
GPT2_SPECIALS = types.SimpleNamespace(bos_token_id=3, eos_token_id=4, pad_token_id=None, sep_token_id=None)


@pytest.fixture(scope="module")
def gpt2(tiny_family_dir) -> HookedLM:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family_dir("gpt2"), dtype=torch.float32)
    return HookedLM(model, GPT2_SPECIALS, "gpt2", "cpu")


@pytest.fixture(scope="module")
def llama(tiny_lm_dir) -> HookedLM:
    from saescope.precompute.models import load_model

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    return lm


def _tokens(lm: HookedLM, n: int, T: int, seed: int = 0) -> np.ndarray:
    """Random contexts with BOS first and a few EOS inside (special positions to mask)."""
    g = np.random.default_rng(seed)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    ids = g.integers(10, min(vocab, 2000), size=(n, T))
    bos, eos = lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id
    ids[:, 0] = bos
    ids[g.random((n, T)) < 0.05] = eos
    ids[:, 0] = bos
    return ids


def _random_sae(arch: str, d: int, d_sae: int, hook: str, seed: int, scale: float):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=arch, d_in=d, d_sae=d_sae, hook_name=hook, k=5 if arch == "topk" else None)
    sae = (TopKSAE if arch == "topk" else StandardSAE)(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.W_enc.mul_(scale)
        sae.W_dec.mul_(0.3 / scale)
        sae.b_enc.mul_(0.3).sub_(0.4)
        sae.b_dec.mul_(0.05)
    return sae


# ------------------------------------------------------------------ the independent reference
def _layer(model, L: int):
    return model.transformer.h[L] if hasattr(model, "transformer") else model.model.layers[L]


def _ref_encode(sae, x: np.ndarray) -> np.ndarray:
    """The SAE by hand, float64: standard ReLU or TopK over (x - b_dec) W_enc + b_enc."""
    W_enc, b_enc, b_dec = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    if sae.cfg.architecture == "topk":
        out = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1, kind="stable")[..., : sae.cfg.k]
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return out
    return np.maximum(pre, 0)


def _ref_decode(sae, f: np.ndarray) -> np.ndarray:
    return f @ sae.W_dec.detach().double().numpy() + sae.b_dec.detach().double().numpy()


def _run(model, ids: torch.Tensor, L: int, pre: bool, fn=None):
    """Logits (float64 numpy) and the hooked activation; fn(x) -> replacement, applied by this file's own hook."""
    seen = {}

    if pre:
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen["x"] = x.detach().clone()
            if fn is None:
                return None
            y = fn(x)
            return ((y,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
        h = _layer(model, L).register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(_m, _a, out):
            x = out[0] if isinstance(out, tuple) else out
            seen["x"] = x.detach().clone()
            if fn is None:
                return None
            y = fn(x)
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
        h = _layer(model, L).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        h.remove()
    return logits.double().numpy(), seen["x"]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def reference(lm: HookedLM, sae, L: int, pre: bool, tokens: np.ndarray) -> dict[str, float]:
    model = lm.model
    ids = torch.from_numpy(tokens).long()
    sp = [t for t in (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id) if t is not None]
    keep = ~np.isin(tokens, sp)  # (B, T)
    logits0, x = _run(model, ids, L, pre)
    x64 = x.double().numpy()
    f = _ref_encode(sae, x64)
    xhat = _ref_decode(sae, f)

    def spliced(a):
        rec = torch.from_numpy(_ref_decode(sae, _ref_encode(sae, a.double().numpy()))).to(a.dtype)
        return torch.where(torch.from_numpy(keep)[..., None], rec, a)

    logits_s, _ = _run(model, ids, L, pre, spliced)
    logits_z, _ = _run(model, ids, L, pre, torch.zeros_like)
    lp0 = _log_softmax(logits0)

    def ce(lg):
        lp = _log_softmax(lg)[:, :-1]
        nll = -np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
        return nll[keep[:, :-1]].mean()

    def kl(lg):
        return (np.exp(lp0) * (lp0 - _log_softmax(lg))).sum(-1)[keep].mean()

    ce0, ces, cez, kls, klz = ce(logits0), ce(logits_s), ce(logits_z), kl(logits_s), kl(logits_z)
    X, H, F = x64[keep], xhat[keep], f[keep]
    nin, nout = np.linalg.norm(X, axis=1), np.linalg.norm(H, axis=1)
    var = (X ** 2).sum(1).mean() - (X.mean(0) ** 2).sum()
    mse = ((X - H) ** 2).sum(1).mean()
    dens = (F != 0).sum(0) / len(F)
    Wd = sae.W_dec.detach().double().numpy()
    Wd = Wd / np.linalg.norm(Wd, axis=1, keepdims=True)
    cos_d = Wd @ Wd.T
    np.fill_diagonal(cos_d, -np.inf)
    We = sae.W_enc.detach().double().numpy().T
    We = We / np.linalg.norm(We, axis=1, keepdims=True)
    cos_e = We @ We.T
    np.fill_diagonal(cos_e, -np.inf)
    return {
        "ce_loss_without_sae": ce0, "ce_loss_with_sae": ces, "ce_loss_with_ablation": cez,
        "ce_loss_score": (cez - ces) / (cez - ce0),
        "kl_div_with_sae": kls, "kl_div_with_ablation": klz, "kl_div_score": (klz - kls) / klz,
        "explained_variance": 1 - mse / var, "mse": mse,
        "cossim": ((X * H).sum(1) / (nin * nout)).mean(),
        "l2_norm_in": nin.mean(), "l2_norm_out": nout.mean(), "l2_ratio": (nout / np.where(nin < 1e-4, 1, nin)).mean(),
        "relative_reconstruction_bias": (nout ** 2).mean() / (X * H).sum(1).mean(),
        "l0": (F != 0).sum(1).mean(), "l1": np.abs(F).sum(1).mean(),
        "frac_alive": (dens > 0).mean(), "freq_over_1_percent": (dens > 0.01).mean(),
        "freq_over_10_percent": (dens > 0.1).mean(),
        "normalized_freq_over_1_percent": dens[dens > 0.01].sum() / dens.sum(),
        "normalized_freq_over_10_percent": dens[dens > 0.1].sum() / dens.sum() if dens.sum() else 0.0,
        "average_max_encoder_cosine_sim": cos_e.max(1).mean(), "average_max_decoder_cosine_sim": cos_d.max(1).mean(),
        "n_tokens": int(keep.sum()),
    }


CASES = [("gpt2", 1, True, "standard"), ("gpt2", 2, False, "topk"), ("llama", 1, False, "topk"),
         ("llama", 2, True, "standard")]


@pytest.mark.parametrize("family,layer,pre,arch", CASES)
def test_every_metric_equals_the_independent_computation(family, layer, pre, arch, request):
    lm = request.getfixturevalue(family)
    hook = f"blocks.{layer}.{'hook_resid_pre' if pre else 'hook_resid_post'}"
    d = lm.d_model
    x_norm = float(lm.activations(torch.from_numpy(_tokens(lm, 2, 16)).long(), hook).norm(dim=-1).mean())
    sae = _random_sae(arch, d, 3 * d, hook, seed=layer, scale=3.0 / x_norm)
    tokens = _tokens(lm, 6, 24, seed=layer)
    got = quality_metrics(lm, [EvalSAE(sae, hook, "s")], tokens, batch_size=4)[0]  # batches of 4 and 2
    want = reference(lm, sae, layer, pre, tokens)
    assert set(METRICS) <= set(got)
    assert got["n_tokens"] == want.pop("n_tokens") < tokens.size  # special positions were masked
    assert 0 < got["l0"] < 3 * d and 0 < got["frac_alive"] <= 1
    # the two scores are ratios of small differences on these random models (CE_ablated - CE_orig ~ 5e-3 on the
    # tiny Llama): held to the CE/KL terms' float32 error (~1e-6 absolute) propagated through the ratio
    tol = {"ce_loss_score": 2e-6 / abs(want["ce_loss_with_ablation"] - want["ce_loss_without_sae"]),
           "kl_div_score": 2e-6 / want["kl_div_with_ablation"]}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-4, abs=tol.get(k, 1e-6)), k


def test_several_saes_are_each_spliced_alone(llama):
    """Two SAEs in one call give exactly what each gives alone (the shared passes change nothing)."""
    d = llama.d_model
    a = _random_sae("topk", d, 2 * d, "blocks.1.hook_resid_post", 3, 3.0)
    b = _random_sae("standard", d, 2 * d, "blocks.2.hook_resid_post", 4, 3.0)
    tokens = _tokens(llama, 4, 20, seed=9)
    both = quality_metrics(llama, [EvalSAE(a, a.cfg.hook_name, "a"), EvalSAE(b, b.cfg.hook_name, "b")], tokens)
    alone = [quality_metrics(llama, [EvalSAE(s, s.cfg.hook_name, n)], tokens)[0] for s, n in ((a, "a"), (b, "b"))]
    for x, y in zip(both, alone):
        for k in METRICS:
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), k
    assert both[0]["ce_loss_with_sae"] != both[1]["ce_loss_with_sae"]


def _identity_sae(d: int, hook: str) -> StandardSAE:
    """x = ReLU(x) - ReLU(-x): W_enc = [I, -I], W_dec = [I; -I], all biases 0 reconstructs every x exactly."""
    sae = StandardSAE(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d, hook_name=hook))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


@pytest.mark.parametrize("family,hook", [("gpt2", "blocks.1.hook_resid_pre"), ("llama", "blocks.1.hook_resid_post")])
def test_a_perfect_sae_scores_one(family, hook, request):
    lm = request.getfixturevalue(family)
    m = quality_metrics(lm, [EvalSAE(_identity_sae(lm.d_model, hook), hook)], _tokens(lm, 4, 20))[0]
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["mse"] == pytest.approx(0.0, abs=1e-8) and m["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert m["average_max_decoder_cosine_sim"] == pytest.approx(0.0, abs=1e-7)  # e_i vs e_j, -e_j: 0; vs -e_i: -1
    assert m["frac_alive"] == 1.0  # every coordinate takes both signs on some token


def test_a_dead_sae_scores_zero(gpt2):
    """No feature ever fires and the decoder bias is the eval activations' mean: x_hat = mean, EV = 0 exactly;
    with b_dec = 0 and no special token in the text the splice IS the zero ablation: CE and KL scores 0."""
    hook = "blocks.1.hook_resid_post"
    d = gpt2.d_model
    tokens = _tokens(gpt2, 4, 20)
    keep = ~np.isin(tokens, [3, 4])
    x = gpt2.activations(torch.from_numpy(tokens).long(), hook).double().numpy()[keep]
    sae = StandardSAE(SAEConfig(architecture="standard", d_in=d, d_sae=8, hook_name=hook))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_()
        sae.b_enc.fill_(-1e6)  # never fires
        sae.b_dec.copy_(torch.from_numpy(x.mean(0)).float())
    m = quality_metrics(gpt2, [EvalSAE(sae, hook)], tokens)[0]
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-5)
    assert m["l0"] == 0 and m["l1"] == 0 and m["frac_alive"] == 0 and m["normalized_freq_over_1_percent"] == 0
    plain = tokens.copy()
    plain[plain < 5] = 10  # no special token anywhere
    with torch.no_grad():
        sae.b_dec.zero_()
    z = quality_metrics(gpt2, [EvalSAE(sae, hook)], plain)[0]
    assert z["ce_loss_score"] == pytest.approx(0.0, abs=1e-9) and z["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert z["ce_loss_with_sae"] == pytest.approx(z["ce_loss_with_ablation"], rel=1e-9)


def test_special_ids_are_saelens_structural_ones(llama):
    tok = llama.tokenizer
    want = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    assert set(special_ids(tok)) == want
    assert len(tok.all_special_ids) >= len(want)  # additional special tokens are text here, as in SAELens


# ------------------------------------------------------------------ the store and `saescope eval`
def test_precompute_stores_the_metrics_of_the_held_out_slice(tiny_store, tiny_lm_dir, tiny_sae_dir, small_corpus):
    """precompute wrote one quality row, computed on the contexts that follow the streamed ones (or, when the
    corpus ran out, the last streamed ones, said so); the same numbers come back from quality_metrics on them."""
    from saescope.precompute.config import PRECOMPUTE
    from saescope.precompute.data import iter_dataset_contexts
    from saescope.precompute.models import load_model
    from saescope.precompute.quality import FORMULA_VERSION
    from saescope.precompute.saes import load_sae
    from saescope.precompute.store import Store

    with Store(tiny_store) as st:
        q = st.quality()["tiny"]
        info = st.sae("tiny")
    assert q.formula_version == FORMULA_VERSION and q.context_len == info.context_len
    assert q.n_contexts == PRECOMPUTE.eval_tokens // info.context_len or not q.held_out
    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    ctxs = np.stack(list(iter_dataset_contexts(str(small_corpus), "text", lm.tokenizer, info.context_len, True)))
    assert q.held_out == (q.first_ctx >= info.n_contexts)
    assert q.first_ctx + q.n_contexts == min(len(ctxs), info.n_contexts + PRECOMPUTE.eval_tokens // info.context_len)
    sae = load_sae(str(tiny_sae_dir))
    want = quality_metrics(lm, [EvalSAE(sae, sae.cfg.hook_name)], ctxs[q.first_ctx:q.first_ctx + q.n_contexts])[0]
    assert q.n_tokens == want["n_tokens"]
    for k in METRICS:
        assert getattr(q, k) == pytest.approx(want[k], rel=1e-6, abs=1e-9), k


def test_saescope_eval_rewrites_the_rows(tmp_path, tiny_store):
    import shutil

    from saescope.app.cli import main
    from saescope.precompute.store import Store

    copy = tmp_path / "q.duckdb"
    shutil.copyfile(tiny_store, copy)
    with Store(tiny_store) as st:
        before = st.quality()["tiny"]
    assert main(["eval", str(copy), "--eval-tokens", "256", "--device", "cpu", "--dtype", "float32"]) == 0
    with Store(copy) as st:
        after = st.quality()["tiny"]
        assert st.feature("tiny", 3).index == 3  # the rest of the store is intact and readable
    assert after.n_contexts == 256 // after.context_len and after.created >= before.created
    assert after.l0 > 0 and after.explained_variance != before.explained_variance
    assert main(["eval", str(copy), "--sae", "nope"]) == 2  # an unknown SAE: a readable error, exit status 2


# ------------------------------------------------------------------ two SAEs in one run, and the pages
@pytest.fixture(scope="module")
def two_sae_store(tmp_path_factory, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus):
    from saescope.precompute.pipeline import PrecomputeSpec as PrecomputeArgs, SAESpec, run_precompute

    out = tmp_path_factory.mktemp("quality2") / "two.duckdb"
    run_precompute(PrecomputeArgs(out=out, model=str(tiny_lm_dir), dataset=str(small_corpus), tokens=64 * 12,
                                  context_len=64, batch_size=4, top_k=3, n_intervals=2, per_interval=2, n_quantiles=2,
                                  per_quantile=2, progress=False, feature_map=False, cooccurrence=False,
                                  verify_sample=0, eval_tokens=64 * 6,
                                  saes=[SAESpec(str(tiny_sae_dir), None, "tiny"),
                                        SAESpec(str(second_sae_dir), None, "relu")]))
    return out


def test_each_sae_of_a_run_is_evaluated_alone(two_sae_store, tiny_lm_dir, tiny_sae_dir, second_sae_dir, small_corpus):
    from saescope.precompute.data import iter_dataset_contexts
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae
    from saescope.precompute.store import Store

    with Store(two_sae_store) as st:
        q = st.quality()
    assert sorted(q) == ["relu", "tiny"] and q["tiny"].held_out and q["tiny"].first_ctx == 12
    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    ctxs = np.stack(list(iter_dataset_contexts(str(small_corpus), "text", lm.tokenizer, 64, True))[12:18])
    for sid, d in (("tiny", tiny_sae_dir), ("relu", second_sae_dir)):
        sae = load_sae(str(d))
        alone = quality_metrics(lm, [EvalSAE(sae, sae.cfg.hook_name)], ctxs)[0]
        for k in METRICS:
            assert getattr(q[sid], k) == pytest.approx(alone[k], rel=1e-6, abs=1e-9), (sid, k)
    assert q["tiny"].ce_loss_with_sae != q["relu"].ce_loss_with_sae
    # a zero residual stream stays zero through this bias-free Llama: uniform logits, CE = ln(vocab) exactly
    for sid in q:
        assert q[sid].ce_loss_with_ablation == pytest.approx(np.log(49152), rel=1e-6)


def test_home_table_sorts_plots_and_json_twin(two_sae_store):
    import re

    from fastapi.testclient import TestClient

    from saescope.app.web.app import create_app
    from saescope.precompute.store import Store

    with Store(two_sae_store) as st:
        q = st.quality()
    client = TestClient(create_app(two_sae_store, worker_url=None))
    html = client.get("/").text
    assert 'id="quality"' in html and html.count('aria-label="explained variance vs L0"') == 1
    assert 'aria-label="CE loss score vs L0"' in html and html.count("<circle") == 4  # 2 SAEs x 2 plots
    for order in ("asc", "desc"):
        body = client.get(f"/?qsort=explained_variance&qorder={order}").text
        table = body[body.index('class="quality-table"'):]
        seen = re.findall(r'<tr><td><a href="/sae/([^"]+)">', table)
        want = sorted(q, key=lambda s: q[s].explained_variance, reverse=order == "desc")
        assert seen == want
    frag = client.get("/?qsort=l0&qorder=asc", headers={"HX-Request": "true"}).text
    assert frag.lstrip().startswith("<h2>Quality") and "<html" not in frag  # the htmx block alone
    bad = client.get("/?qsort=nope")
    assert bad.status_code == 422 and "qsort must be one of" in bad.text
    api = {s["sae_id"]: s for s in client.get("/api/saes").json()}
    for sid in q:
        assert api[sid]["quality"]["ce_loss_score"] == pytest.approx(q[sid].ce_loss_score)
        assert api[sid]["quality"]["formula_version"] == q[sid].formula_version
    card = client.get("/sae/tiny").text
    assert "explained variance" in card and "held-out" in card


# ------------------------------------------------------------------ transcoders: scored on the MLP output they predict
def _mlp(model, L: int):
    return _layer(model, L).mlp


def _ref_transcoder(tc, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A skip transcoder by hand, float64: f = ReLU(x W_enc + b_enc) (no b_dec on the input), y = f W_dec + b_dec + x W_skip^T."""
    W_enc, b_enc, W_dec, b_dec, W_skip = (p.detach().double().numpy() for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, tc.W_skip))
    f = np.maximum(x @ W_enc + b_enc, 0)
    return f, f @ W_dec + b_dec + x @ W_skip.T


def _run_mlp(model, ids: torch.Tensor, L: int, fn=None):
    """Logits and the MLP's (input, output) seen by this file's own forward hook on the MLP module; fn(input,
    output) -> the output to use instead."""
    seen = {}

    def hook(_m, args, out):
        seen["x"], seen["y"] = args[0].detach().clone(), out.detach().clone()
        return None if fn is None else fn(args[0], out)
    h = _mlp(model, L).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        h.remove()
    return logits.double().numpy(), seen["x"], seen["y"]


@pytest.mark.parametrize("family,layer", [("gpt2", 1), ("llama", 2)])
def test_a_transcoders_metrics_are_of_the_mlp_output_it_predicts(family, layer, request):
    """A transcoder reads the MLP's input and predicts its output: explained variance, MSE and cosine compare its
    prediction with the MLP's real output; CE/KL splice the prediction in place of the MLP's output and the ablation
    zeroes the MLP's output (not its input). All from this test's own hook on the MLP module, float64."""
    from saescope.precompute.saes.transcoder import SkipTranscoder

    lm = request.getfixturevalue(family)
    model, d = lm.model, lm.d_model
    tokens = _tokens(lm, 6, 24, seed=layer + 20)
    ids = torch.from_numpy(tokens).long()
    logits0, X_in, Y = _run_mlp(model, ids, layer)
    torch.manual_seed(layer)
    tc = SkipTranscoder(SAEConfig(architecture="skip_transcoder", d_in=d, d_sae=4 * d,
                                  hook_name=f"blocks.{layer}.hook_mlp_in", hook_name_out=f"blocks.{layer}.hook_mlp_out"))
    with torch.no_grad():  # the skip path a least-squares fit of the MLP on these tokens: a transcoder worth scoring
        x64, y64 = X_in.double().reshape(-1, d), Y.double().reshape(-1, d)
        tc.W_skip.copy_(torch.linalg.lstsq(x64, y64).solution.T.float())
        for p in (tc.W_enc, tc.W_dec):
            p.normal_()
        tc.W_enc.mul_(1.0 / float(X_in.norm(dim=-1).mean()))
        tc.W_dec.mul_(0.01 * float(Y.norm(dim=-1).mean()) / d)  # small: the skip carries the fit
        tc.b_enc.fill_(-0.5)
        tc.b_dec.zero_()
    sp = [t for t in (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id) if t is not None]
    keep = ~np.isin(tokens, sp)
    f, yhat = _ref_transcoder(tc, X_in.double().numpy())

    def spliced(x, out):
        _, pred = _ref_transcoder(tc, x.double().numpy())
        return torch.where(torch.from_numpy(keep)[..., None], torch.from_numpy(pred).to(out.dtype), out)

    logits_s, _, _ = _run_mlp(model, ids, layer, spliced)
    logits_z, _, _ = _run_mlp(model, ids, layer, lambda x, out: torch.zeros_like(out))
    lp0 = _log_softmax(logits0)

    def ce(lg):
        nll = -np.take_along_axis(_log_softmax(lg)[:, :-1], tokens[:, 1:, None], -1)[..., 0]
        return nll[keep[:, :-1]].mean()

    def kl(lg):
        return (np.exp(lp0) * (lp0 - _log_softmax(lg))).sum(-1)[keep].mean()

    Yk, Hk, Fk = Y.double().numpy()[keep], yhat[keep], f[keep]
    var = (Yk ** 2).sum(1).mean() - (Yk.mean(0) ** 2).sum()
    mse = ((Yk - Hk) ** 2).sum(1).mean()
    ce0, ces, cez = ce(logits0), ce(logits_s), ce(logits_z)
    want = {"explained_variance": 1 - mse / var, "mse": mse, "l0": (Fk != 0).sum(1).mean(),
            "cossim": ((Yk * Hk).sum(1) / (np.linalg.norm(Yk, axis=1) * np.linalg.norm(Hk, axis=1))).mean(),
            "ce_loss_without_sae": ce0, "ce_loss_with_sae": ces, "ce_loss_with_ablation": cez,
            "kl_div_with_sae": kl(logits_s), "kl_div_with_ablation": kl(logits_z)}
    got = quality_metrics(lm, [EvalSAE(tc, tc.cfg.hook_name, "tc")], tokens, batch_size=4)[0]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-4, abs=1e-6), k
    assert got["ce_loss_score"] == pytest.approx((cez - ces) / (cez - ce0), rel=1e-3, abs=2e-6 / abs(cez - ce0))
    assert 0.5 < got["explained_variance"] <= 1.0  # the least-squares skip alone explains most of this MLP's output
